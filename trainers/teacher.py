"""The frozen teacher of a distillation run: one loader for `SlimDistillationTrainer` and `hf-slim distill` that
honours `teacher_model_init_kwargs` and `teacher_quantization`, and the placement of the loaded teacher."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from .distillation_config import SlimDistillationConfig


__all__ = [
    "fit_bnb_4bit_cpu_layers",
    "is_quantized",
    "load_teacher",
    "load_teacher_config",
    "prepare_teacher",
    "teacher_quantization_config",
]


def _init_kwargs(args: SlimDistillationConfig, quantized: bool) -> dict[str, Any]:
    """`from_pretrained` kwargs of the teacher: `teacher_model_init_kwargs` with a dtype name as a `torch.dtype`,
    `trust_remote_code` of the run, and the `quantization_config` of `teacher_quantization` when `quantized`."""
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(
                f"teacher_model_init_kwargs['dtype'] must be 'auto' or a torch dtype name such as 'bfloat16', "
                f"got {dtype!r}."
            )
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if quantized and args.teacher_quantization is not None:
        kwargs["quantization_config"] = teacher_quantization_config(args.teacher_quantization)
    return kwargs


def load_teacher(
    path: str,
    args: SlimDistillationConfig,
    processing_class: PreTrainedTokenizerBase | None = None,
    *,
    quantized: bool = True,
) -> PreTrainedModel:
    """Load the teacher at `path` with `args.teacher_model_init_kwargs`, quantized as `args.teacher_quantization`.

    Args:
        path (`str`): Hub id or folder of the teacher.
        args ([`SlimDistillationConfig`]): The run's settings.
        processing_class (`PreTrainedTokenizerBase`, *optional*): The student's tokenizer; when given, a tokenizer in
            the teacher's folder must map every token the same way.
        quantized (`bool`, *optional*, defaults to `True`): `False` loads the same weights unquantized (the source of
            a student pruned from a quantized teacher).

    Returns:
        [`~transformers.PreTrainedModel`]

    Raises:
        `ValueError`: a dtype name torch does not have, bitsandbytes missing for `teacher_quantization`, or a tokenizer
            mismatch.
    """
    teacher = AutoModelForCausalLM.from_pretrained(path, **_init_kwargs(args, quantized))
    if processing_class is not None:
        _check_teacher_tokenizer(path, processing_class, args.trust_remote_code)
    return teacher


def load_teacher_config(path: str, args: SlimDistillationConfig) -> Any:
    """The teacher's config as [`load_teacher`] would build it (init kwargs that are config fields override it),
    without loading any weights."""
    config, _ = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **_init_kwargs(args, quantized=False))
    return config


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` was loaded in 4bit or 8bit by bitsandbytes (its weights can be neither moved nor pruned)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_teacher(
    teacher: nn.Module, accelerator: Any, deepspeed: bool = False, placement: str = "shard"
) -> nn.Module:
    """Freeze `teacher` (eval mode, no gradients) and place it for training: wrapped by DeepSpeed, left where
    bitsandbytes put it, placed as `placement` says under FSDP2, or prepared by `accelerator` for evaluation.

    Args:
        teacher (`nn.Module`): The loaded teacher.
        accelerator (`accelerate.Accelerator`): The trainer's accelerator.
        deepspeed (`bool`, *optional*, defaults to `False`): Whether the run uses DeepSpeed.
        placement (`str`, *optional*, defaults to `"shard"`): Under FSDP2 only: `"shard"` (`fully_shard`, each block
            gathered for its forward and freed after it) or `"replicate"` (a full copy on every process's device).

    Returns:
        `nn.Module`: the teacher to run.

    Raises:
        `ValueError`: an unknown `placement`, or `"shard"` with a bitsandbytes-quantized teacher.
    """
    from .fsdp import TEACHER_PLACEMENTS, fsdp2_plugin, shard_teacher

    if placement not in TEACHER_PLACEMENTS:
        raise ValueError(f"teacher_placement must be one of {TEACHER_PLACEMENTS}, got {placement!r}.")
    teacher.eval()
    teacher.requires_grad_(False)
    if deepspeed:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    fsdp2 = fsdp2_plugin(accelerator) is not None
    if is_quantized(teacher):
        if fsdp2 and placement == "shard":
            raise ValueError(
                "teacher_placement='shard' cannot shard a bitsandbytes-quantized teacher (teacher_quantization): its "
                "packed weights do not survive fully_shard. Set teacher_placement='replicate' (every process holds "
                "the quantized teacher)."
            )
        fit_bnb_4bit_cpu_layers(teacher)
        return teacher  # bitsandbytes models are already placed and cannot be moved
    if fsdp2:
        # accelerate places no model under FSDP (prepare_model leaves the device alone), so the teacher is placed here
        if placement == "shard":
            shard_teacher(teacher, accelerator)
        else:
            teacher.to(accelerator.device)
        return accelerator.prepare_model(teacher, device_placement=False, evaluation_mode=True)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def teacher_quantization_config(kind: str):
    """The `BitsAndBytesConfig` of `teacher_quantization` (`"4bit"`: NF4 with bfloat16 compute; `"8bit"`: LLM.int8).

    Args:
        kind (`str`): `"4bit"` or `"8bit"`.

    Returns:
        `transformers.BitsAndBytesConfig`

    Raises:
        `ValueError`: unknown kind, or bitsandbytes is not installed.

    Note:
        bitsandbytes quantizes the `nn.Linear` layers (attention, shared expert, router, MTP `fc`); the fused 3-D
        expert tensors of transformers' MoE blocks stay in the load dtype. It runs on CPU too (bitsandbytes >= 0.48);
        for 4bit [`prepare_teacher`] applies [`fit_bnb_4bit_cpu_layers`] to the loaded teacher.
    """
    from transformers import BitsAndBytesConfig
    from transformers.utils import is_bitsandbytes_available

    if kind not in ("4bit", "8bit"):
        raise ValueError(f"teacher_quantization must be '4bit' or '8bit', got {kind!r}.")
    if not is_bitsandbytes_available():
        raise ValueError(
            f"teacher_quantization={kind!r} needs the bitsandbytes package (pip install bitsandbytes), which is not "
            "importable here; set teacher_quantization=None to load the teacher unquantized."
        )
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


# bitsandbytes' CPU packed-weight layout (bitsandbytes.functional._convert_weight_packed_for_cpu) packs the output
# rows in blocks of 32 and reshapes the absmax of the input columns to [out, in // blocksize].
_BNB_CPU_PACK_ROWS = 32


def fit_bnb_4bit_cpu_layers(model: nn.Module) -> list[str]:
    """Keep bitsandbytes' 4bit CPU fast path away from the `Linear4bit` layers whose shape it cannot pack.

    On a CPU with AVX512-BF16, bitsandbytes (0.48 - 0.50 at least) converts a `Linear4bit` weight to a packed layout
    on its first forward in eval mode under `no_grad` — exactly how the teacher runs. That conversion needs
    `out_features % 32 == 0` and `in_features % blocksize == 0` (blocksize 64 for NF4); any other layer fails:
    `in_features=32` gives `RuntimeError: shape '[32, 0]' is invalid` (32 // 64 = 0 absmax columns), and a
    `shared_expert_gate` (`out_features=1`) or a router with 4 experts gives `AssertionError: N must be divisible by
    block_n`. Real MoE teachers have such gates, so this is not a toy-size problem. For those layers only, this turns
    the fast path off (`support_avx512bf16_for_cpu = False`), so they run bitsandbytes' generic dequantize + matmul
    path, which handles any shape; the other layers keep the fast path. The result is the same NF4 computation.

    Args:
        model (`nn.Module`): A model loaded with `load_in_4bit` (other models are left alone).

    Returns:
        `list[str]`: the names of the layers switched to the generic path.
    """
    switched = []
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu") or not module.support_avx512bf16_for_cpu:
            continue
        state = getattr(module.weight, "quant_state", None)
        blocksize = int(getattr(state, "blocksize", None) or getattr(module.weight, "blocksize", 64))
        out_features, in_features = module.out_features, module.in_features
        if out_features % _BNB_CPU_PACK_ROWS or in_features < blocksize or in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
            switched.append(name)
    return switched


def _check_teacher_tokenizer(path: str, tokenizer: PreTrainedTokenizerBase, trust_remote_code: bool) -> None:
    """Compare the teacher folder's tokenizer (when it has one) with the student's, token by token."""
    from transformers import AutoTokenizer

    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if teacher_tokenizer.get_vocab() != tok.get_vocab():
        mine, theirs = tok.get_vocab(), teacher_tokenizer.get_vocab()
        differing = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
        raise ValueError(
            f"Tokenizer mismatch: the teacher at {path!r} maps tokens differently from processing_class "
            f"({len(theirs)} vs {len(mine)} tokens; e.g. {differing}). KD needs one shared tokenizer: pass the "
            "teacher's tokenizer as processing_class and use a student pruned from that teacher."
        )
