# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe multi-token prediction (MTP) in transformers' MTP layout, trained and decoded with the same modules.

Depth k (1-based) combines the previous depth's state at position i with the embedding of token i+k and predicts
token i+k+1 through the model's `lm_head`:
`g^k_i = post_norm_k(block_k(eh_proj_k(cat[enorm_k(emb(t_{i+k})), hnorm_k(g^{k-1}_i)])))`, `g^0` being the main model's
final (normed) hidden state. The checkpoint holds depth k under `mtp.layers.{k-1}.`: `enorm`, `hnorm`, `eh_proj`,
`post_norm` and the decoder block's own tensors (`self_attn.*`, `mlp.*`, `input_layernorm`, ...): DeepSeek-V3's
per-depth layout (`model.layers.{L+k}.*` there, with `shared_head.norm` for `post_norm`) under the `mtp.` prefix, which
transformers' `MtpModel` checkpoint conversion loads as is.

`model.generate(input_ids, use_mtp=True)` runs transformers' MTP speculative decoding (`MTPCandidateGenerator`'s
drafting and cache logic, `MtpModel`'s drafting loop, `MtpCache`) on the model's own `mtp.layers` rather than on a
second copy loaded from disk (what transformers' `MTPCandidateGenerator` does), so what `forward(return_mtp=True)`
trains is what drafts, also for a model never saved and under an elastic variant.

Old hf-slim checkpoints (`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.norm`, shared by all
depths) load through a conversion at load time (`prepare_mtp_load` / `finish_mtp_load`); with two or more depths they
keep their arithmetic through `config.mtp_shared_norm`.

This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim, nor from
`modeling_slim_moe.py` (which imports it: the decoder block and the RMSNorm class come in as arguments).

Transformers touch points, each checked by `tests/test_transformers_touchpoints.py` (hf_slim's `integrations` room
cannot hold them: this file may not import it):
- `transformers.modeling_layers.MtpModel`: built around the model with `num_mtp_layers=0` (so it allocates nothing),
  then given the model's `mtp.layers` as `layers` and a head that computes the model's logits as `shared_head`. Its
  `forward` (the drafting loop: one token per depth, `logits_processor`, sampling) and `forward_layer` /
  `create_masks_for_mtp_layer` (embeddings, RoPE, masks) run unchanged.
- The `MtpLayer` call contract: `MtpModel.forward_layer` calls `layers[k](inputs_embeds, previous_hidden_state,
  position_embeddings=..., position_ids=..., cache=..., attention_mask=..., **kwargs)` and chains what it returns
  into depth k+1 and into `shared_head`; `SlimMoeMtpLayerMixin.forward` takes that call.
- `transformers.generation.candidate_generator.MTPCandidateGenerator`: subclassed; `__init__` is re-implemented
  (it would call `MtpModel.from_pretrained`) and sets the attributes `get_candidates` reads: `num_mtp_layers`,
  `model_kwargs_overrides`, `device`, `mtp_model`, `mtp_cache`, `do_sample`, `logits_processor`,
  `is_main_model_prefill`. `get_candidates(..., **kwargs)` forwards `kwargs` to `mtp_model(...)` (how the elastic
  variant reaches the layers); `update_candidate_strategy(input_ids, scores, num_matches)` is called once per
  verification step with the accepted count (how acceptance is recorded). Drafts past `generation_config.max_length`
  are cut as `DFlashTokenCandidateGenerator` cuts its own (`max_length - len(input_ids) - 1` at most).
- `GenerationMixin._get_candidate_generator` (private): overridden to route `use_mtp=True` to
  `SlimMoeMTPCandidateGenerator`, keeping transformers' order (early exit and prompt lookup first).
- `transformers.cache_utils.MtpCache` and `Cache.activate_past_recording()`, as `MTPCandidateGenerator` uses them.
- The MTP config protocol of `PreTrainedConfig.get_mtp_config()`: `num_mtp_layers` (an alias of `num_mtp_heads`),
  `mtp_layer_types`, `mtp_mlp_layer_types` (see `configuration_slim_moe.py`).
- `MtpModel.get_mtp_weights_regex` finds MTP weights through the model's `_keys_to_ignore_on_load_unexpected`
  (`^mtp\\.`), and `MtpModel`'s checkpoint conversion (`PrefixChange("mtp")`, then block tensors under `layers.{k}.`
  nested into `mtp_block`) maps this layout onto stock `MtpLayer`s: `MtpModel.from_pretrained(model)` loads a saved
  SlimMoe's MTP (checked by a test), though SlimMoe never needs it.
- `PreTrainedModel.init_parallel_plans` merges a child module's `_tp_plan` / `_ep_plan` under its name, which is how
  the depths get their tensor / expert parallel plans (checked by `tests/test_parallel_plans.py`).
"""

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers.cache_utils import MtpCache
from transformers.generation.candidate_generator import MTPCandidateGenerator
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import MtpModel
from transformers.utils import cached_file, logging

from .configuration_slim_moe import SlimMoeConfig, mtp_tp_plan_for
from .generation_slim_moe import SpeculationCounts
from .variants_slim_moe import FULL_VARIANT, SlimMoeVariantPlan


logger = logging.get_logger(f"transformers.{__name__}")

#: Names of hf-slim's first MTP layout, shared by all depths, and what each depth holds of them now.
OLD_LAYOUT_SHARED = {
    "mtp.fc.weight": "eh_proj.weight",
    "mtp.pre_fc_norm_embedding.weight": "enorm.weight",
    "mtp.pre_fc_norm_hidden.weight": "hnorm.weight",
    "mtp.norm.weight": "post_norm.weight",
}
#: What `MtpModel.get_mtp_weights_regex` finds the MTP tensors of a checkpoint by (see the touch points above).
MTP_KEYS_PATTERN = r"^mtp\."


# ---- the modules -------------------------------------------------------------------------------------------------
class SlimMoeMtpLayerMixin:
    """One MTP depth on top of a SlimMoe decoder block: `SlimMoeMtpLayer` (in `modeling_slim_moe.py`) mixes it into
    `SlimMoeDecoderLayer`, so the block's tensors sit next to `enorm`, `hnorm`, `eh_proj` and `post_norm`.

    Its `forward` takes transformers' `MtpLayer` call; `variant_plan` (the active elastic variant, `None`: the full
    model) makes it compute on prefix views. The class using it sets `_prefix_norm(norm, x, width)`: `norm` over the
    first `width` channels (`width=None`: the whole module).
    """

    _prefix_norm: Callable[[nn.Module, torch.Tensor, int | None], torch.Tensor]

    def _init_mtp_parts(self, config: SlimMoeConfig, depth: int, norm_cls: type[nn.Module]) -> None:
        self.depth = depth
        # the block's KV slot in the MtpCache (MtpModel numbers depths 0..D-1)
        self.self_attn.layer_idx = depth
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = norm_cls(hidden, eps=eps)
        self.hnorm = norm_cls(hidden, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden, hidden, bias=False)
        # with `mtp_shared_norm` (the first hf-slim layout) one norm before the LM head serves every depth
        self.post_norm = None if config.mtp_shared_norm else norm_cls(hidden, eps=eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        previous_hidden_state: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        variant_plan: SlimMoeVariantPlan | None = None,
        **kwargs,
    ) -> torch.Tensor:
        r"""
        inputs_embeds (`torch.Tensor` of shape `(batch, length, hidden)`): embeddings of tokens i+k (the full model's
            width is fine under a variant: the prefix is used).
        previous_hidden_state (`torch.Tensor` of shape `(batch, length, hidden)`): depth k-1's output at position i.
        variant_plan (`SlimMoeVariantPlan`, *optional*): compute as this elastic variant.

        Returns the state depth k+1 takes (`post_norm`'s output; the block's output itself with
        `config.mtp_shared_norm`), which the LM head reads too (through `mtp.norm` with `config.mtp_shared_norm`).
        """
        sizes = None if variant_plan is None else variant_plan.mtp_blocks[self.depth]
        width = None if sizes is None else sizes.hidden
        if width is not None:
            inputs_embeds = inputs_embeds[..., :width]
        embeds = self._prefix_norm(self.enorm, inputs_embeds, width)
        hidden = self._prefix_norm(self.hnorm, previous_hidden_state, width)
        if width is None:
            fused = self.eh_proj(torch.cat([embeds, hidden], dim=-1))
        else:  # eh_proj's input holds the embedding half then the hidden half: two prefix views, no concatenation
            weight, half = self.eh_proj.weight, self.eh_proj.in_features // 2
            fused = F.linear(embeds, weight[:width, :width]) + F.linear(hidden, weight[:width, half : half + width])
        hidden = super().forward(
            fused,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            position_embeddings=position_embeddings,
            elastic_sizes=sizes,
            **kwargs,
        )
        return hidden if self.post_norm is None else self._prefix_norm(self.post_norm, hidden, width)


class SlimMoeMultiTokenPredictor(nn.Module):
    """The model's `num_mtp_heads` MTP depths (`mtp.layers`) and, with `config.mtp_shared_norm`, their shared head
    norm (`mtp.norm`).

    Args:
        config (`SlimMoeConfig`): the model's config.
        layer_cls (`type`): the depth class (`SlimMoeMtpLayer`), built as `layer_cls(config, depth)`.
        norm_cls (`type`): the RMSNorm class.
    """

    def __init__(self, config: SlimMoeConfig, layer_cls: type[nn.Module], norm_cls: type[nn.Module]):
        super().__init__()
        self.num_heads = config.num_mtp_heads
        self.layers = nn.ModuleList(layer_cls(config, k) for k in range(self.num_heads))
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps) if config.mtp_shared_norm else None
        self._prefix_norm = layer_cls._prefix_norm
        # transformers' `init_parallel_plans` takes a child's plans under its name (`mtp.`): the depths, outside the
        # base model, are sharded as the decoder blocks are
        self._tp_plan = mtp_tp_plan_for(config)
        self._ep_plan = dict(config.base_model_ep_plan)

    def head_input(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the LM head reads of a depth's output: the output itself, or `mtp.norm` of it with
        `config.mtp_shared_norm` (over the first `hidden_states.shape[-1]` channels under a variant)."""
        if self.norm is None:
            return hidden_states
        width = hidden_states.shape[-1]
        return self._prefix_norm(self.norm, hidden_states, None if width == self.norm.weight.shape[0] else width)

    def forward(
        self,
        config: SlimMoeConfig,
        rotary_emb: nn.Module,
        hidden_states: torch.Tensor,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        variant_plan: SlimMoeVariantPlan | None = None,
    ) -> list[torch.Tensor]:
        """Every depth over a whole sequence, as in training: depth k has `T - k` positions. Returns what the LM head
        reads of each depth (`head_input`). Depth k at position i embeds token i+k at position id `position_ids[i] + k`
        (what `MTPCandidateGenerator` feeds it when decoding); masks (the causal one, a 2D padding `attention_mask`,
        documents packed into one row by restarting `position_ids`) follow position i, so no depth looks into
        another document."""
        outputs = []
        seq_len = hidden_states.shape[1]
        previous = hidden_states
        for k, layer in enumerate(self.layers, start=1):
            length = seq_len - k
            if length <= 0:
                break
            embeds = inputs_embeds[:, k:]
            positions = position_ids[..., :length]
            padding = attention_mask[:, :length] if attention_mask is not None and attention_mask.dim() == 2 else None
            mask = create_causal_mask(
                config=config, inputs_embeds=embeds, attention_mask=padding, cache=None, position_ids=positions
            )
            previous = layer(
                embeds,
                previous[:, :length],
                position_embeddings=rotary_emb(embeds, positions + k),
                attention_mask=mask,
                position_ids=positions,
                variant_plan=variant_plan,
            )
            outputs.append(self.head_input(previous))
        return outputs


def mtp_logits(model: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The LM head over a depth's output (its `head_input`), at the width of `hidden_states` (a prefix of `lm_head`'s
    input under an elastic variant)."""
    hidden_states = model.mtp.head_input(hidden_states)
    weight = model.lm_head.weight
    if hidden_states.shape[-1] == weight.shape[1]:
        return model.lm_head(hidden_states)
    return F.linear(hidden_states, weight[:, : hidden_states.shape[-1]])


class _SharedHead(nn.Module):
    """`MtpModel.shared_head` for a SlimMoe model: its LM head through `mtp_logits` (the model is not a submodule)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["_model"] = model

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return mtp_logits(self._model, hidden_states)


def mtp_drafter(model: nn.Module) -> MtpModel:
    """transformers' `MtpModel` over `model`'s own MTP modules (no weights of its own, nothing loaded): its drafting
    loop, masks and RoPE, with `model.mtp.layers` as its layers and `model`'s LM head (see `mtp_logits`)."""
    check_mtp_heads(model)
    with torch.device("meta"):  # nothing to allocate or initialise: MtpModel(..., 0) builds no layers
        drafter = MtpModel(model, 0)
    drafter.layers = model.mtp.layers
    drafter.num_mtp_layers = len(model.mtp.layers)
    drafter.shared_head = _SharedHead(model)
    return drafter


def check_mtp_heads(model: nn.Module) -> None:
    """Raise `ValueError` when `model` has no MTP heads to draft with."""
    if getattr(model, "mtp", None) is None or not model.config.num_mtp_heads:
        raise ValueError(
            f"use_mtp=True needs MTP heads, but this {type(model).__name__} has none (config.num_mtp_heads=0); "
            "generate without use_mtp, or add heads (hf_slim.convert.from_hf(model, num_mtp_heads=1)) and train them."
        )


# ---- decoding ----------------------------------------------------------------------------------------------------
@dataclass
class MtpAcceptanceStats(SpeculationCounts):
    r"""
    Acceptance of one `generate(..., use_mtp=True)` call (`model.mtp_stats` after it).

    Each verification step is one forward of the model over the tokens its MTP depths drafted: it keeps the longest
    accepted prefix and adds one token of its own (the correction, or the bonus token when every draft was accepted),
    so `new tokens = accepted tokens + steps`. The first step (the prompt's forward) drafts nothing; where EOS or the
    length limit cut the last step, tokens accepted past the cut are not counted.

    Args:
        num_depths (`int`): MTP depths (tokens drafted per step).
        variant (`str`): the elastic variant that decoded (`"full"`: the model).
        drafted (`list[int]`): tokens drafted before each verification step.
        accepted (`list[int]`): drafted tokens each step accepted.
        new_tokens (`list[int]`): tokens each step appended (accepted + 1).
    """

    num_depths: int
    variant: str = FULL_VARIANT
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)

    @property
    def depth_acceptance(self) -> list[float]:
        """Per depth k = 1..D: share of the steps that drafted it in which its token was accepted (a depth's token
        counts only if every shallower one was accepted too)."""
        rates = []
        for depth in range(1, self.num_depths + 1):
            steps = [a for a, d in zip(self.accepted, self.drafted) if d >= depth]
            rates.append(sum(a >= depth for a in steps) / len(steps) if steps else 0.0)
        return rates

    def to_dict(self) -> dict:
        """The recorded lists and every derived statistic, as plain Python values."""
        return {
            "num_depths": self.num_depths, "variant": self.variant, **self.counts_dict(),
            "depth_acceptance": self.depth_acceptance,
        }


class SlimMoeMTPCandidateGenerator(MTPCandidateGenerator):
    """transformers' `MTPCandidateGenerator` drafting with the model's own MTP modules (`mtp_drafter`) instead of a
    copy loaded from `config.name_or_path`, as the model's elastic variant when it decodes as one, and recording
    acceptance in `main_model.mtp_stats` (an `MtpAcceptanceStats`).
    """

    def __init__(self, main_model, generation_config, model_kwargs: dict, logits_processor=None):
        # Not super().__init__(): it loads the MTP weights a second time with MtpModel.from_pretrained. The attributes
        # below are the ones MTPCandidateGenerator.get_candidates reads (a touch point, see the top of this file).
        self.mtp_model = mtp_drafter(main_model)
        self.num_mtp_layers = len(main_model.mtp.layers)
        variant = model_kwargs.get("elastic_variant") or main_model.active_elastic_variant
        self.variant_plan = None if variant == FULL_VARIANT else main_model._plan_for(variant)
        # Only the last hidden state is needed. An index selects it among `config.num_hidden_layers + 1` states, which
        # a variant that drops layers does not produce: then all are kept (the last is the normed final state).
        dropped = self.variant_plan is not None and len(self.variant_plan.layers) != main_model.config.num_hidden_layers
        self.model_kwargs_overrides = {"output_hidden_states": True if dropped else -1}
        self.device = next(main_model.mtp.layers[-1].parameters()).device
        self.mtp_cache = MtpCache(config=main_model.config.get_mtp_config())
        self.mtp_cache.activate_past_recording()
        self.do_sample = generation_config.do_sample
        self.logits_processor = logits_processor
        self.is_main_model_prefill = True
        self.max_length = generation_config.max_length
        self.stats = MtpAcceptanceStats(num_depths=self.num_mtp_layers, variant=variant)
        self._drafted = 0
        main_model.mtp_stats = self.stats

    def get_candidates(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kwargs):
        if self.variant_plan is not None:
            kwargs["variant_plan"] = self.variant_plan  # reaches each SlimMoeMtpLayer through MtpModel.forward
        candidates, logits = super().get_candidates(
            input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kwargs
        )
        # Offer no draft past `max_length` (as DFlashTokenCandidateGenerator caps its drafts): the model's forward
        # over them would not fit a cache sized to it (a static cache). The MTP state is that of all depths either
        # way, and transformers' cache correction depends only on the accepted count.
        room = max(self.max_length - input_ids.shape[1] - 1, 0)
        if candidates.shape[1] - input_ids.shape[1] > room:
            candidates = candidates[:, : input_ids.shape[1] + room]
            logits = logits[:, :room] if room else None
        self._drafted = candidates.shape[1] - input_ids.shape[1]
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        accepted = int(num_matches)
        self.stats.drafted.append(self._drafted)
        self.stats.accepted.append(accepted)
        self.stats.new_tokens.append(accepted + 1)


class SlimMoeMtpGenerationMixin:
    """Routes `generate(..., use_mtp=True)` of `SlimMoeForCausalLM` to `SlimMoeMTPCandidateGenerator`."""

    #: Acceptance of the last `generate(..., use_mtp=True)` call (`None` before the first).
    mtp_stats: MtpAcceptanceStats | None = None

    def _get_candidate_generator(
        self,
        generation_config,
        input_ids,
        inputs_tensor,
        logits_processor,
        model_kwargs,
        assistant_model=None,
        target_tokenizer=None,
        assistant_tokenizer=None,
    ):
        # transformers' order: early-exit and prompt-lookup candidates come before MTP
        if (
            generation_config.use_mtp
            and generation_config.assistant_early_exit is None
            and generation_config.prompt_lookup_num_tokens is None
        ):
            return SlimMoeMTPCandidateGenerator(
                self, generation_config, model_kwargs, logits_processor=logits_processor
            )
        return super()._get_candidate_generator(
            generation_config=generation_config,
            input_ids=input_ids,
            inputs_tensor=inputs_tensor,
            logits_processor=logits_processor,
            model_kwargs=model_kwargs,
            assistant_model=assistant_model,
            target_tokenizer=target_tokenizer,
            assistant_tokenizer=assistant_tokenizer,
        )


# ---- loading: old checkpoints and missing MTP tensors ------------------------------------------------------------
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


@dataclass
class MtpLoadPlan:
    """What `finish_mtp_load` copies after `from_pretrained`: `filled` (`{tensor: old layout tensor}`) from `files`
    (`{old layout tensor: safetensors file}`)."""

    filled: dict[str, str]
    files: dict[str, str]
    num_depths: int
    shared_norm: bool


_CONVERTED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("slim_moe_converted_mtp", default=())


@contextlib.contextmanager
def converting_mtp_keys(plan: MtpLoadPlan | None) -> Iterator[None]:
    """While `from_pretrained` runs under a conversion plan, the models it builds expect `plan.filled` to be missing
    from the checkpoint (`converted_mtp_keys`), so transformers does not report them as newly initialised."""
    token = _CONVERTED.set(tuple(plan.filled) if plan is not None else ())
    try:
        yield
    finally:
        _CONVERTED.reset(token)


def converted_mtp_keys() -> set[str]:
    """Patterns for `_keys_to_ignore_on_load_missing` of a model built inside `converting_mtp_keys`."""
    return {f"^{re.escape(name)}$" for name in _CONVERTED.get()}


def checkpoint_weight_map(path: str, hub_kwargs: dict, required: bool = True) -> dict[str, str] | None:
    """Tensor name -> local safetensors file of a checkpoint (a folder or a Hub repo id). When it has no safetensors
    weights, raise what `cached_file` raises (`required`) or return `None`."""
    raise_missing = {} if required else {"_raise_exceptions_for_missing_entries": False}
    try:
        index = cached_file(
            path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs
        )
        if index is not None:
            with open(index) as handle:
                names = json.load(handle)["weight_map"]
            files = {file: cached_file(path, file, **hub_kwargs) for file in set(names.values())}
            return {name: files[file] for name, file in names.items()}
        single = cached_file(path, "model.safetensors", **raise_missing, **hub_kwargs)
    except (OSError, ValueError):
        if required:
            raise
        return None
    if single is None:
        return None
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def old_layout_config(config: SlimMoeConfig, names) -> SlimMoeConfig:
    """`config` for a checkpoint holding the tensor `names`: with the old MTP layout and two or more depths, a copy
    with `mtp_shared_norm=True` (the old depths chain their un-normed state and share one head norm); else `config`."""
    if "mtp.fc.weight" in names and config.num_mtp_heads > 1 and not config.mtp_shared_norm:
        config = type(config).from_dict(config.to_dict())
        config.mtp_shared_norm = True
    return config


def prepare_mtp_load(model_class: type, path: str | os.PathLike, kwargs: dict) -> MtpLoadPlan | None:
    """Before `model_class.from_pretrained(path, **kwargs)` (which it may give a `config`): read the checkpoint's tensor
    names; for the old MTP layout, plan its conversion (and, with two or more depths, set `mtp_shared_norm` on the
    config); raise when the config declares MTP tensors the checkpoint lacks.

    Raises:
        `ValueError`: one sentence naming the missing MTP tensors.
    """
    if kwargs.get("state_dict") is not None or kwargs.get("gguf_file") is not None:
        return None
    hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    config = kwargs.get("config")
    if not isinstance(config, SlimMoeConfig):
        try:  # with the config fields among `kwargs` applied, as `from_pretrained` applies them (`num_mtp_heads=0`)
            config, _ = SlimMoeConfig.from_pretrained(path, return_unused_kwargs=True, **kwargs)
        except (OSError, ValueError, TypeError):
            return None  # not a SlimMoe folder: from_pretrained itself says what is wrong
    if not config.num_mtp_heads:
        return None
    files = checkpoint_weight_map(str(path), hub_kwargs, required=False)
    if files is None:
        return None
    old = "mtp.fc.weight" in files
    adapted = old_layout_config(config, files)
    if adapted is not config:
        if isinstance(kwargs.get("config"), SlimMoeConfig):
            kwargs["config"] = adapted
        else:  # a config field among the kwargs, which from_pretrained applies to the config it loads
            kwargs["mtp_shared_norm"] = True
        config = adapted
    with torch.device("meta"):
        expected = [name for name in model_class(config).state_dict() if name.startswith("mtp.")]
    filled = {}
    if old:
        for name in expected:
            source = old_layout_name(name)
            if source is not None and source in files:
                filled[name] = source
    missing = [name for name in expected if name not in files and name not in filled]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(
            f"{path} declares num_mtp_heads={config.num_mtp_heads} in its config but its checkpoint has no MTP "
            f"tensor{'s' if len(missing) > 1 else ''} {shown}; save the model with its MTP heads, or load it with "
            "num_mtp_heads=0."
        )
    if not filled:
        return None
    return MtpLoadPlan(
        filled=filled,
        files={source: files[source] for source in set(filled.values())},
        num_depths=config.num_mtp_heads,
        shared_norm=config.mtp_shared_norm,
    )


def old_layout_name(name: str) -> str | None:
    """The tensor of the old MTP layout that the per-depth tensor `name` (`mtp.layers.{k}.eh_proj.weight`, ...) copies,
    or `None`."""
    if not name.startswith("mtp.layers."):
        return None
    rest = name.split(".", 3)[3]
    for old, new in OLD_LAYOUT_SHARED.items():
        if rest == new:
            return old
    return None


@torch.no_grad()
def finish_mtp_load(model: nn.Module, plan: MtpLoadPlan | None) -> None:
    """After `from_pretrained`: copy the old layout's shared tensors into every depth (`prepare_mtp_load`'s plan)."""
    if plan is None or getattr(model, "mtp", None) is None:
        return
    tensors = {}
    for source, file in plan.files.items():
        with safe_open(file, framework="pt") as handle:
            tensors[source] = handle.get_tensor(source)
    params = dict(model.named_parameters())
    offloaded = sorted(name for name in plan.filled if params[name].device.type == "meta")
    if offloaded:
        raise ValueError(
            f"the old hf-slim MTP layout is converted into the loaded parameters, but {offloaded[0]} is offloaded; load "
            "this checkpoint once without offloading (no device_map to disk) and save_pretrained it in the new layout."
        )
    for name, source in plan.filled.items():
        params[name].copy_(tensors[source].to(device=params[name].device, dtype=params[name].dtype))
    logger.info(
        "converted the old hf-slim MTP layout (%s) of %d depth(s) to per-depth tensors%s",
        ", ".join(sorted(tensors)), plan.num_depths, " with a shared head norm" if plan.shared_norm else "",
    )


__all__ = [
    "MTP_KEYS_PATTERN",
    "MtpAcceptanceStats",
    "OLD_LAYOUT_SHARED",
    "SlimMoeMTPCandidateGenerator",
    "SlimMoeMtpGenerationMixin",
    "SlimMoeMtpLayerMixin",
    "SlimMoeMultiTokenPredictor",
    "check_mtp_heads",
    "checkpoint_weight_map",
    "converted_mtp_keys",
    "converting_mtp_keys",
    "finish_mtp_load",
    "mtp_drafter",
    "mtp_logits",
    "old_layout_config",
    "old_layout_name",
    "prepare_mtp_load",
]
