"""One-pass calibration: forward hooks collect every importance statistic the pruning axes need.

A model in memory runs here; a checkpoint (a folder, a Hub id or a `CheckpointReader`) goes to
[`collect_statistics_layerwise`], which holds one block in memory at a time. The hooks are shared (`collector.py`).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..integrations.transformers_experts import grouped_linear_kernel as _grouped_linear_kernel  # noqa: F401
from .collector import _Collector, input_device, pack_calibration_data, unloaded_modules
from .layerwise import collect_statistics_layerwise
from .stats import ImportanceStats

__all__ = ["collect_statistics", "pack_calibration_data"]


def _is_checkpoint(source: Any) -> bool:
    """A folder or Hub id, or an object with the `CheckpointReader` interface (duck-typed: `StateDictReader` too)."""
    if isinstance(source, (str, os.PathLike)):
        return True
    return all(hasattr(source, attr) for attr in ("config", "names", "read", "block_names"))


@torch.no_grad()
def collect_statistics(
    model: Any,
    data: Any,
    num_samples: int = 1024,
    max_length: int = 2048,
    batch_size: int = 8,
    *,
    tokenizer: Any = None,
    text_column: str = "text",
    show_progress: bool = True,
    **layerwise_kwargs: Any,
) -> ImportanceStats:
    """Run the calibration data through `model` once and collect every importance statistic.

    Args:
        model ([`~transformers.PreTrainedModel`] or checkpoint): a causal LM of a supported family (see
            [`hf_slim.anatomy.supported_model_types`]), in any dtype and possibly dispatched by accelerate
            (`from_pretrained(..., device_map=...)`, offloaded modules included; the inputs go to the device of the
            input embeddings); or a checkpoint too large to load: a folder, a Hub id or a `CheckpointReader`, which
            [`collect_statistics_layerwise`] calibrates one block at a time (same statistics, same metadata).
        data: a `datasets.Dataset` (an `input_ids` column, or a text column), a list of texts (needs
            `tokenizer`), a list of token-id lists/tensors, or a `[n, length]` token tensor. Everything is
            concatenated and cut into `num_samples` rows of `max_length` tokens (SlimQwen uses 1024 samples).
        num_samples (`int`, defaults to 1024): number of sequences.
        max_length (`int`, defaults to 2048): tokens per sequence.
        batch_size (`int`, defaults to 8): sequences per forward.
        tokenizer: a tokenizer for text data.
        text_column (`str`, defaults to `"text"`): column of a text dataset.
        show_progress (`bool`, defaults to `True`): show a tqdm bar.
        layerwise_kwargs: for a checkpoint only, the options of [`collect_statistics_layerwise`] (`dtype`,
            `device`, `max_memory`, `work_dir`, `keep_work_files`).

    Returns:
        [`ImportanceStats`] indexed like the source model, in float32 whatever the model's dtype.

    Raises:
        `ValueError`: empty calibration data, bad sizes, an unsupported model type, or weights on the meta device
            that no accelerate hook loads.
        `TypeError`: layer-by-layer options given with a model in memory.
    """
    if _is_checkpoint(model):
        return collect_statistics_layerwise(
            model, data, num_samples, max_length, batch_size, tokenizer=tokenizer, text_column=text_column,
            show_progress=show_progress, **layerwise_kwargs,
        )
    if layerwise_kwargs:
        raise TypeError(
            f"collect_statistics: {sorted(layerwise_kwargs)} apply to a checkpoint (a folder, a Hub id or a "
            f"CheckpointReader), not to a {type(model).__name__} in memory; drop them or pass the checkpoint"
        )
    from tqdm.auto import tqdm

    from ..anatomy import get_spec

    spec = get_spec(model)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    unloaded = unloaded_modules(model)
    if unloaded:
        raise ValueError(
            f"{unloaded[0]}: its weights are on the meta device and no accelerate hook loads them; load the model "
            "with its weights (from_pretrained, with device_map= to offload) or calibrate the checkpoint with "
            "collect_statistics(path, ...)"
        )
    ids = pack_calibration_data(
        data, tokenizer=tokenizer, num_samples=num_samples, max_length=max_length, text_column=text_column
    )
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"data: token ids in [{int(ids.min())}, {int(ids.max())}] but the model's embedding has {vocab} rows "
            f"(valid ids: 0..{vocab - 1}); tokenize with the model's tokenizer"
        )
    device = input_device(model)  # a dispatched model's embeddings may run elsewhere than its first parameter
    collector = _Collector(model, spec, device=device)  # float32 accumulators where the inputs go
    import inspect

    extra = {"return_mtp": True} if "return_mtp" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    collector.install()
    try:
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="calibration", disable=not show_progress):
            batch = ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False, **extra)
            collector.tokens += batch.numel()
            collector.samples += batch.shape[0]
    finally:
        collector.remove()
        model.train(was_training)
    return collector.finish(collector.metadata(int(ids.shape[1])))

