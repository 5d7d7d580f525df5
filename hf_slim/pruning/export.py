"""Hub-ready folder for a pruned model: `hf_slim.hub.save_for_hub` plus `pruning_config.json`, optional statistics,
and a model card whose recipe states the pruning, the sizes before/after, the calibration data and evaluations."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from .config import SIZE_FIELDS, PruneConfig
from .stats import ImportanceStats

__all__ = [
    "save_pruned",
    "size_summary",
    "pruned_card_kwargs",
    "write_pruning_record",
    "STATS_FILE",
    "PRUNING_CONFIG_FILE",
]

STATS_FILE = "importance_stats.safetensors"
PRUNING_CONFIG_FILE = "pruning_config.json"


def size_summary(model: Any) -> dict[str, Any]:
    """Parameter counts and per-axis sizes (canonical names) of a model, for tables and cards."""
    from ..anatomy import get_spec
    from ..utils import count_parameters

    spec = get_spec(model)
    counts = count_parameters(model)
    out: dict[str, Any] = {"total_params": counts["total"], "active_params": counts["active"]}
    for name in SIZE_FIELDS:
        value = getattr(model.config, spec.field(name), None)
        if value is not None and not (name == "intermediate_size" and spec.field("moe_intermediate_size") == name):
            out[name] = value
    return out


def _natural_key(key: str) -> tuple[tuple[Any, ...], str]:
    """Sort key that compares digit runs as numbers: layer `"10"` follows `"9"` and `"mtp.layers.10"` follows
    `"mtp.layers.9"`. A bare number (a decoder layer) starts with an empty text run, so decoder layers come before
    named blocks such as MTP layers."""
    # re.split with a capture group alternates text, digits, text, ...: equal positions always hold equal types
    parts = re.split(r"(\d+)", key)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), key


def _json_ready(obj: Any, where: str = "record") -> Any:
    """`obj` with every mapping key a string, mappings in [`_natural_key`] order, tuples as lists.

    The pruning report keys decoder layers by int and other blocks (MTP layers) by their module prefix;
    `json.dumps(sort_keys=True)` cannot order such mixed keys, and ordering their string forms plainly would put
    layer `"10"` before `"2"`. Ordering here keeps the file stable and readable for any mix.
    """
    if isinstance(obj, dict):
        items: dict[str, Any] = {}
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise TypeError(
                    f"{where} key {key!r}: pruning records are keyed by int or str, got {type(key).__name__}"
                )
            name = str(key)
            if name in items:
                raise ValueError(f"{where} key {key!r}: clashes with the key {name!r} once written as JSON")
            items[name] = _json_ready(value, f"{where}[{name!r}]")
        return {k: items[k] for k in sorted(items, key=_natural_key)}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v, where) for v in obj]
    return obj


def _recipe(config: PruneConfig, before: dict, after: dict, calibration: str | None, evals: dict | None) -> str:
    set_fields = {k: v for k, v in config.to_dict().items() if v is not None}
    lines = [
        "Structurally pruned with hf-slim (SlimQwen-style: score each axis on calibration data, keep the top "
        "indices, same architecture out). Pruning config:",
        "",
        "```json",
        json.dumps(set_fields, indent=2, sort_keys=True),
        "```",
        "",
        "| | before | after |",
        "|---|---|---|",
    ]
    for key in before:
        lines.append(f"| {key} | {before[key]} | {after.get(key, '-')} |")
    if calibration:
        lines += ["", f"Calibration data: {calibration}"]
    if evals:
        lines += ["", "| evaluation | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in evals.items()]
    return "\n".join(lines)


def pruned_card_kwargs(
    model_type: str,
    prune_config: PruneConfig,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    base_model: str | os.PathLike | None = None,
    calibration: str | None = None,
    eval_results: dict[str, Any] | None = None,
    datasets: str | list[str] | None = None,
) -> dict[str, Any]:
    """The model-card arguments of a pruned model (`hf_slim.hub.write_hub_files(card_kwargs=...)`): the recipe with
    the pruning config and the before/after table; `before` defaults to `after` when unknown. The metadata
    ([`hf_slim.hub.card_metadata`]): `base_model` (a Hub id or the local source folder) with
    `base_model_relation="prune"`, `datasets` (the calibration data; Hub ids only reach the metadata) and, from the
    finite numbers of `eval_results`, a `model-index`."""
    measured = {
        k: v for k, v in (eval_results or {}).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }  # fmt: skip
    return {
        "recipe": _recipe(prune_config, before or after, after, calibration, eval_results),
        "base_model": base_model,
        "base_model_relation": "prune",
        "datasets": datasets or None,
        "results": measured or None,
        "description": f"A pruned {model_type} Mixture-of-Experts model.",
        "tags": ["pruned"],
    }


def write_pruning_record(
    folder: str | os.PathLike,
    *,
    prune_config: PruneConfig,
    report: dict[str, Any],
    before: dict[str, Any] | None,
    after: dict[str, Any],
    base_model: str | None = None,
    calibration: str | None = None,
    stats: ImportanceStats | None = None,
) -> None:
    """Write `pruning_config.json` (the config, the kept indices and merges, sizes before/after) into `folder`, and
    the statistics as `importance_stats.safetensors` when given."""
    folder = Path(folder)
    record = {
        "prune_config": prune_config.to_dict(),
        "report": report,
        "before": before or {},
        "after": after,
        "base_model": base_model,
        "calibration": calibration,
        "statistics_file": STATS_FILE if stats is not None else None,
    }
    # no sort_keys: _json_ready already ordered every mapping (json cannot sort int and str keys together)
    text = json.dumps(_json_ready(record), indent=2, default=str)
    (folder / PRUNING_CONFIG_FILE).write_text(text + "\n")
    if stats is not None:
        stats.save(folder / STATS_FILE)


def save_pruned(
    model: Any,
    folder: str | os.PathLike,
    *,
    prune_config: PruneConfig,
    before: dict[str, Any] | None = None,
    stats: ImportanceStats | None = None,
    tokenizer: Any = None,
    base_model: str | None = None,
    calibration: str | None = None,
    eval_results: dict[str, Any] | None = None,
    overwrite: bool = False,
    datasets: str | list[str] | None = None,
) -> Path:
    """Write a pruned model as a Hub-ready folder, atomically (a failure leaves nothing at `folder`).

    Args:
        model: the pruned model (from [`prune`]).
        folder: output folder.
        prune_config ([`PruneConfig`]): saved as `pruning_config.json` together with the kept indices.
        before (`dict`, optional): [`size_summary`] of the source model, for the before/after table.
        stats ([`ImportanceStats`], optional): saved as `importance_stats.safetensors` when given.
        tokenizer: copied into the folder.
        base_model (`str`, optional): Hub id or local folder of the source, for the card metadata.
        calibration (`str`, optional): a line describing the calibration data.
        eval_results (`dict`, optional): evaluation numbers for the card (its finite numbers make the `model-index`).
        overwrite (`bool`): replace an existing non-empty folder.
        datasets (`str` or `list`, optional): the calibration dataset(s) by name (Hub ids reach the metadata).
    """

    from ..hub import save_for_hub
    from ..utils import atomic_directory

    if not isinstance(prune_config, PruneConfig):
        raise TypeError(f"prune_config must be a PruneConfig, got {type(prune_config).__name__}")
    if stats is not None and not isinstance(stats, ImportanceStats):
        raise TypeError(f"stats must be ImportanceStats or None, got {type(stats).__name__}")
    after = size_summary(model)
    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        inner = save_for_hub(
            model,
            tmp / "model",
            processing_class=tokenizer,
            repo_id=folder.name,
            card_kwargs=pruned_card_kwargs(
                model.config.model_type, prune_config, before, after, base_model, calibration, eval_results, datasets
            ),
        )
        for item in Path(inner).iterdir():
            shutil.move(str(item), tmp / item.name)
        Path(inner).rmdir()
        write_pruning_record(
            tmp,
            prune_config=prune_config,
            report=getattr(model, "hf_slim_pruning_report", {}),
            before=before,
            after=after,
            base_model=str(base_model) if base_model is not None else None,
            calibration=calibration,
            stats=stats,
        )
    return folder.resolve()
