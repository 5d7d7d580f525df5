# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe's router: which experts each token goes to, and with what weights.

Two scorings (`config.router_scoring`):

- `"softmax"` (the default, Qwen-MoE): probabilities over all experts, the top-k kept, optionally renormalised
  (`norm_topk_prob`).
- `"sigmoid"` (GLM-4-MoE, DeepSeek-V3): independent sigmoid scores, computed in float32. The experts are chosen by
  `score + e_score_correction_bias` (a float32 buffer, one entry per expert, adjusted outside backprop by the
  auxiliary-loss-free balancing of these models) inside the `topk_group` best of `n_group` expert groups (a group
  scored by its two best corrected scores); they are weighed by their plain scores, renormalised with
  `norm_topk_prob`. This is `transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeTopkRouter`'s arithmetic, operation
  for operation, so converted GLM-4-MoE checkpoints give the stock logits.

Both multiply the weights by `routed_scaling_factor` when it is not 1. Under an elastic variant the router computes
with the prefix of its experts and hidden channels.

This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports only torch.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SlimMoeTopKRouter(nn.Module):
    """Top-k router: softmax over all experts, or sigmoid scores with a correction bias inside expert groups (see the
    module docstring). Returns `(router_logits, top_k_weights, top_k_index)`."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.scoring = getattr(config, "router_scoring", "softmax")
        self.n_group = getattr(config, "n_group", 1)
        self.topk_group = getattr(config, "topk_group", 1)
        self.routed_scaling_factor = getattr(config, "routed_scaling_factor", 1.0)
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        if self.scoring == "sigmoid":
            self.e_score_correction_bias = nn.Buffer(torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(
        self, hidden_states: torch.Tensor, elastic_sizes=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight, top_k, hidden_dim = self.weight, self.top_k, self.hidden_dim
        bias = getattr(self, "e_score_correction_bias", None)
        if elastic_sizes is not None:
            top_k, hidden_dim = elastic_sizes.top_k, elastic_sizes.hidden
            weight = weight[: elastic_sizes.num_experts, :hidden_dim]
            bias = bias[: elastic_sizes.num_experts] if bias is not None else None
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        if self.scoring == "sigmoid":
            return self._sigmoid_route(hidden_states, weight, bias, top_k)
        router_logits = F.linear(hidden_states, weight)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, top_k, dim=-1)
        if self.norm_topk_prob:
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        if self.routed_scaling_factor != 1:
            top_value = top_value * self.routed_scaling_factor
        return router_logits, top_value.to(router_logits.dtype), top_index

    def _sigmoid_route(
        self, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_experts, n_group = weight.shape[0], self.n_group
        router_logits = F.linear(hidden_states.type(torch.float32), weight.type(torch.float32))
        scores = router_logits.sigmoid()
        scores_for_choice = scores + bias
        group_scores = scores_for_choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = (
            group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        )
        scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
        top_index = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
        top_weights = scores.gather(1, top_index)
        if self.norm_topk_prob:
            top_weights /= top_weights.sum(dim=-1, keepdim=True) + 1e-20
        top_weights = top_weights * self.routed_scaling_factor
        return router_logits, top_weights, top_index


__all__ = ["SlimMoeTopKRouter"]
