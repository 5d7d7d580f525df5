"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for `SlimDistillationTrainer` under `accelerate launch` with an FSDP
config of `fsdp_version: 2`: how the student and the teacher are sharded.

The trainer shards the student itself, before the Trainer builds the optimizer, instead of leaving it to accelerate's
`fsdp2_prepare_model` (which returns an already sharded model untouched; docs/distillation.md, "FSDP2"). accelerate 1.15 puts the input embedding
and `[final norm, lm_head]` in FSDP units of their own; two things here read those weights outside of the modules'
own forward calls, where such units hold them sharded:

- the chunked KD / LM losses project hidden states with `lm_head.weight` directly (no `[batch, seq, vocab]` logits),
  after the forward, and their backward writes the gradient of that weight;
- an elastic variant computes on prefix views (`embed_tokens.weight[:, :h]`, `norm.weight[:h]`,
  `lm_head.weight[:, :h]`) without calling those modules.

So the blocks (`_no_split_modules`, or `fsdp_transformer_layer_cls_to_wrap`) get one unit each and everything else
(embeddings, final norm, `lm_head`, MTP shared norm) stays in the root unit, which FSDP2 gathers at the start of the
forward and keeps gathered until the end of the backward (`reshard_after_forward=None` resolves to `False` for the
root). Every read of those weights then sees the full tensor, and the root's gradient reduce-scatter runs in the
backward's final callback, after every use of `lm_head.weight` has written its gradient.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .distillation_config import TEACHER_PLACEMENTS


__all__ = [
    "TEACHER_PLACEMENTS",
    "fsdp2_plugin",
    "fsdp_requested",
    "is_fsdp2_model",
    "shard_student",
    "shard_teacher",
]


def fsdp_requested(args: Any) -> bool:
    """Whether the run asks for FSDP (`fsdp` in the training arguments, or `accelerate launch` with an FSDP config),
    known before the Trainer builds its accelerator."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp2_plugin(accelerator: Any) -> Any | None:
    """The accelerate FSDP plugin of a run under FSDP2, `None` without FSDP.

    Raises:
        `ValueError`: FSDP version 1, or a plugin setting the trainer cannot honour.
    """
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    version = int(getattr(plugin, "fsdp_version", 1) or 1)
    if version != 2:
        raise ValueError(
            f"SlimDistillationTrainer runs under FSDP version 2 (fully_shard) only, got fsdp_version={version}: "
            "set `fsdp_version: 2` in the accelerate config (fsdp_config) or fsdp_config={'version': 2}. FSDP1's "
            "flat parameters hide lm_head.weight, which the chunked KD reads directly."
        )
    if plugin.activation_checkpointing:
        raise ValueError(
            "fsdp_activation_checkpointing=True is not supported by SlimDistillationTrainer: accelerate would wrap "
            "the blocks in checkpoint wrappers after the trainer has sharded them. Set fsdp_activation_checkpointing: "
            "false and activation_checkpointing=True (the model's own gradient checkpointing, which elastic variants "
            "support)."
        )
    if plugin.cpu_ram_efficient_loading:
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading=True is not supported by SlimDistillationTrainer: with it only process "
            "0 loads real weights, and the trainer shards the student and teacher it is given on every process. Set "
            "fsdp_cpu_ram_efficient_loading: false (every process loads the checkpoint, then keeps its shard)."
        )
    return plugin


def is_fsdp2_model(model: nn.Module) -> bool:
    """Whether `model` has been sharded with `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _root_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Parameters read outside their module's forward (head, embeddings, final norm): kept in the root unit."""
    from accelerate.utils.fsdp_utils import _find_final_norm

    modules = [
        getattr(model, "get_input_embeddings", lambda: None)(),
        getattr(model, "get_output_embeddings", lambda: None)(),
        _find_final_norm(model),
        getattr(getattr(model, "mtp", None), "norm", None),
    ]
    return {p for m in modules if isinstance(m, nn.Module) for p in m.parameters()}


def _class_named(model: nn.Module, name: str) -> type | None:
    return next((type(m) for m in model.modules() if type(m).__name__ == name), None)


def _block_policy(model: nn.Module, plugin: Any, strict: bool) -> Callable[[nn.Module], bool]:
    """Which modules get an FSDP unit of their own, following the plugin's auto-wrap policy without changing it (the
    same plugin serves the student and the teacher, which may be different architectures).

    `strict`: a class named in `fsdp_transformer_layer_cls_to_wrap` must exist in `model` (the student); otherwise
    (the teacher) unknown names fall back to the model's `_no_split_modules`.
    """
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    kept = _root_parameters(model)

    def holds_root_parameters(module: nn.Module) -> bool:
        return any(p in kept for p in module.parameters())

    policy = plugin.auto_wrap_policy
    policy = getattr(policy, "func", policy)
    if policy is transformer_auto_wrap_policy:
        default = list(getattr(model, "_no_split_modules", None) or [])
        names = list(plugin.transformer_cls_names_to_wrap or default)
        classes = {n: _class_named(model, n) for n in names}
        missing = [n for n, c in classes.items() if c is None]
        if missing and strict:
            raise ValueError(
                f"fsdp_transformer_layer_cls_to_wrap names {missing}, which the student "
                f"({type(model).__name__}) does not have; its block classes are {default}."
            )
        if missing:
            classes = {n: _class_named(model, n) for n in default}
        wrap = tuple(c for c in classes.values() if c is not None)
        return lambda module: bool(wrap) and isinstance(module, wrap) and not holds_root_parameters(module)
    if policy is size_based_auto_wrap_policy:
        minimum = int(plugin.min_num_params or 0)
        return lambda module: (
            sum(p.numel() for p in module.parameters()) > minimum and not holds_root_parameters(module)
        )
    return lambda module: False  # NO_WRAP: the whole model is one unit


def _fsdp2_kwargs(accelerator: Any, plugin: Any) -> dict[str, Any]:
    """`fully_shard` arguments as accelerate's `fsdp2_prepare_model` builds them from the plugin."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = getattr(accelerator, "torch_device_mesh", None)
    return {
        "offload_policy": plugin.cpu_offload,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "mesh": mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)] if mesh is not None else None,
    }


def _shard(model: nn.Module, policy: Callable[[nn.Module], bool], block_reshard: Any, **kwargs: Any) -> int:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = 0
    # children before parents (reversed pre-order), so a size-based policy wraps the smallest modules first
    for module in reversed(list(model.modules())[1:]):
        if not isinstance(module, FSDPModule) and policy(module):
            fully_shard(module, reshard_after_forward=block_reshard, **kwargs)
            blocks += 1
    # None: FSDP2 keeps the root unit gathered from its forward to the end of the backward (see the module docstring)
    fully_shard(model, reshard_after_forward=None, **kwargs)
    return blocks


def shard_student(model: nn.Module, accelerator: Any) -> nn.Module:
    """Shard the student in place with `fully_shard`: one unit per block, the rest (embeddings, final norm, `lm_head`)
    in the root unit. A model the user sharded already is returned as it is.

    Args:
        model (`nn.Module`): The student (its full weights on every process).
        accelerator (`accelerate.Accelerator`): The trainer's accelerator, with an FSDP2 plugin.

    Returns:
        `nn.Module`: the same module, sharded.
    """
    from accelerate.utils.fsdp_utils import get_parameters_from_modules

    if is_fsdp2_model(model):
        return model
    plugin = fsdp2_plugin(accelerator)
    # resolve the plugin's policy on the student's own classes now, as accelerate's `_prepare_fsdp2` does first: it
    # calls this again on the model it is given, whose classes fully_shard has renamed (`FSDP<class>`) by then
    plugin.set_auto_wrap_policy(model)
    kwargs = _fsdp2_kwargs(accelerator, plugin)
    if plugin.ignored_modules is not None:
        kwargs["ignored_params"] = get_parameters_from_modules(plugin.ignored_modules, model, accelerator.device)
    # as accelerate does: FSDP2 needs one dtype per unit for trainable parameters; the policy casts for compute
    if accelerator.mixed_precision != "no":
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)
    _shard(model, _block_policy(model, plugin, strict=True), plugin.reshard_after_forward, **kwargs)
    return model


def shard_teacher(model: nn.Module, accelerator: Any) -> nn.Module:
    """Shard the frozen teacher in place: each block is gathered for its forward and freed right after
    (`reshard_after_forward=True`, whatever the plugin says: there is no backward to keep it for), the input embedding
    (when not tied to the head) likewise; the root unit (final norm, `lm_head`) stays gathered after the first step.

    Args:
        model (`nn.Module`): The teacher (eval mode, no gradients), its full weights on every process.
        accelerator (`accelerate.Accelerator`): The trainer's accelerator, with an FSDP2 plugin.

    Returns:
        `nn.Module`: the same module, sharded.
    """
    from torch.distributed.fsdp import fully_shard

    if is_fsdp2_model(model):
        return model
    plugin = fsdp2_plugin(accelerator)
    kwargs = _fsdp2_kwargs(accelerator, plugin)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # the teacher never runs an elastic variant, so its embedding is always called as a module
    if isinstance(embedding, nn.Module) and getattr(head, "weight", None) is not getattr(embedding, "weight", None):
        fully_shard(embedding, reshard_after_forward=True, **kwargs)
    _shard(model, _block_policy(model, plugin, strict=False), True, **kwargs)
    return model
