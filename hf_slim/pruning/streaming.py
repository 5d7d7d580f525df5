"""`prune_checkpoint`: prune a checkpoint on disk into a Hub-ready folder, one tensor at a time.

The selection is planned exactly as [`prune`] plans it, from the model's structure alone (a model built on the meta
device from the source config) and the calibration statistics; the router weights a `router_weight` merge needs are
read from the checkpoint. Then every source tensor is read through `hf_slim.checkpoints` (only the kept experts,
rows and columns), renamed, cast, and written to the output shard. The full model is never in memory: at most one
tensor, or one block's fused experts when experts merge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..anatomy import (
    check_coverage,
    index_tensor,
    normalize_selection,
    renamed,
    select_config,
    tensor_index,
)
from ..checkpoints import (
    CheckpointReader,
    ShardedCheckpointWriter,
    StateDictReader,
    open_checkpoint,
)
from ..convert_streaming import meta_model, parse_dtype, read_bounded
from ..utils import atomic_directory, format_bytes, parse_size
from .config import PruneConfig
from .export import pruned_card_kwargs, size_summary, write_pruning_record
from .prune import expert_merge_tensors, plan_selection
from .stats import ImportanceStats

__all__ = ["prune_checkpoint"]

def prune_checkpoint(
    source: str | os.PathLike | CheckpointReader | StateDictReader,
    output: str | os.PathLike,
    config: PruneConfig,
    stats: ImportanceStats | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    tokenizer: Any = None,
    base_model: str | os.PathLike | None = None,
    calibration: str | None = None,
    datasets: str | list[str] | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    show_progress: bool = True,
    save_stats: bool = False,
) -> Path:
    """Prune a checkpoint on disk tensor by tensor into a Hub-ready folder; the full model is never materialised.

    The output is what `save_pruned(prune(model, config, stats), ...)` writes for the loaded model: the same
    weights (bitwise, in the stored dtype unless `dtype` is given), config, generation config, tokenizer, model
    card and `pruning_config.json` (for SlimMoe also the modeling code and `auto_map`), written atomically.

    Args:
        source: a checkpoint folder, a Hub model id (see `hf_slim.checkpoints.open_checkpoint`), or an open reader.
        output: the output folder.
        config ([`PruneConfig`]): target sizes and methods.
        stats ([`ImportanceStats`], optional): calibration statistics of the source model (from
            [`collect_statistics`] on the loaded model, or its layer-by-layer variant); required unless only depth
            (`last`) or top-k changes.
        dtype (`torch.dtype` or `str`, optional): cast floating-point tensors to it (e.g. `"bfloat16"`).
        tokenizer (optional): saved into the folder; by default the source folder's tokenizer, if it has one.
        base_model (`str`, optional): the source for the card's `base_model` (a Hub id, or a local folder standing
            for one: see `hf_slim.hub.card_metadata`); defaults to `source` (a reader's folder).
        calibration (`str`, optional): a line describing the calibration data, for the card.
        datasets (`str` or `list`, optional): the calibration dataset(s) by name; Hub ids reach the card's metadata.
        overwrite (`bool`): replace an existing non-empty `output`.
        max_shard_size (`int` or `str`, defaults to `"5GB"`): shard size of the output, as `save_pretrained` reads it.
        show_progress (`bool`, defaults to `True`): a progress bar over the tensors.
        save_stats (`bool`, defaults to `False`): also save `stats` as `importance_stats.safetensors`.

    Returns:
        The output folder.

    Raises:
        `ValueError`: bad targets or options (as [`prune`]), a bogus `max_shard_size` or `dtype`;
            `hf_slim.checkpoints.CheckpointError` for a checkpoint that cannot be read; `FileExistsError` when
            `output` exists and `overwrite` is not set. Nothing is left at `output` on failure.

    Example:
        ```python
        >>> stats = ImportanceStats.load("qwen3-30b-a3b-stats.safetensors")
        >>> prune_checkpoint("Qwen/Qwen3-30B-A3B", "qwen3-pruned", PruneConfig(num_experts=64), stats)
        ```
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    if stats is not None and not isinstance(stats, ImportanceStats):
        raise TypeError(f"stats must be ImportanceStats or None, got {type(stats).__name__}")
    parse_size(max_shard_size, "max_shard_size")
    cast = parse_dtype(dtype)
    output = Path(output)
    own = not isinstance(source, (CheckpointReader, StateDictReader))
    reader = open_checkpoint(source) if own else source
    if base_model is None:  # a local folder (a reader's: the Hub cache's for a Hub id) names its Hub model itself
        base_model = str(source) if own else str(reader.folder) if reader.folder is not None else None
    try:
        if reader.folder is not None and output.resolve() == reader.folder.resolve():
            raise ValueError(f"output={str(output)!r} is the source folder; write the pruned model elsewhere.")
        with atomic_directory(output, overwrite=overwrite) as tmp:
            extras = {
                "tokenizer": tokenizer,
                "base_model": base_model,
                "calibration": calibration,
                "datasets": datasets,
                "stats": stats if save_stats else None,
            }
            _prune_into(tmp, reader, config, stats, cast, max_shard_size, show_progress, output.name, extras)
    finally:
        if own:
            reader.close()
    return output.resolve()


def _prune_into(
    folder: Path,
    reader: Any,
    config: PruneConfig,
    stats: ImportanceStats | None,
    cast: torch.dtype | None,
    max_shard_size: int | str,
    show_progress: bool,
    repo_id: str,
    extras: dict[str, Any],
) -> None:
    from tqdm.auto import tqdm

    from ..hub import read_hub_files, write_hub_files

    spec, source_config = reader.spec, reader.config
    source_tokenizer, source_generation = read_hub_files(reader.folder, load_tokenizer=extras["tokenizer"] is None)
    structure = meta_model(source_config)
    before = size_summary(structure)
    sel, merges, updates, report = plan_selection(structure, config, stats, tensors=reader)
    del structure
    sel = normalize_selection(spec, sel)
    new_config = select_config(spec, source_config, sel, updates)
    names = reader.names()
    check_coverage(spec, source_config, names, sel)
    merged = expert_merge_tensors(spec, merges)
    out_dtype = cast
    with ShardedCheckpointWriter(folder, spec=spec, config=new_config, max_shard_size=max_shard_size) as writer:
        bar = tqdm(names, desc="pruning checkpoint", unit="tensor", disable=not show_progress)
        for name in bar:
            bar.set_postfix_str(
                f"layer {spec.split_name(name)[0] or '-'}, read {format_bytes(reader.bytes_read)}, "
                f"wrote {format_bytes(writer.bytes_written)}",
                refresh=False,
            )
            idx = tensor_index(spec, name, reader.shape(name), source_config, sel)
            if idx is None:
                continue  # a dropped layer
            if name in merged:
                # a merge averages whole experts, so the block's fused tensor is read whole, then selected
                tensor = merged[name].apply(reader.read(name))
                tensor = index_tensor(tensor, idx) if any(i is not None for i in idx) else tensor
            else:
                tensor = read_bounded(reader, name, idx)  # the result plus one chunk in memory
            if tensor.is_floating_point():
                if cast is not None:
                    tensor = tensor.to(cast)
                out_dtype = out_dtype or tensor.dtype
            writer.add(renamed(spec, name, sel), tensor)
    pruned = meta_model(new_config)
    # what save_pretrained records about the weights it writes
    pruned.config.architectures = [type(pruned).__name__]
    pruned.config.dtype = str(out_dtype or torch.float32).split(".")[1]
    after = size_summary(pruned)
    write_hub_files(
        pruned,
        folder,
        processing_class=extras["tokenizer"] if extras["tokenizer"] is not None else source_tokenizer,
        generation_config=source_generation,
        repo_id=repo_id,
        card_kwargs=pruned_card_kwargs(
            new_config.model_type, config, before, after, extras["base_model"], extras["calibration"],
            datasets=extras["datasets"],
        ),
    )
    write_pruning_record(
        folder,
        prune_config=config,
        report=report,
        before=before,
        after=after,
        base_model=extras["base_model"],
        calibration=extras["calibration"],
        stats=extras["stats"],
    )
