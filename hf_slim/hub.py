"""Hub-ready export: safetensors weights, config (with `auto_map` for SlimMoe), generation config, tokenizer, the
modeling code and a model card, written atomically into one folder that `from_pretrained` loads as it is.
`write_hub_files` writes everything but the weights, for whoever writes the weights another way.

Model cards carry the Hub's metadata ([`card_metadata`]): `base_model` and `base_model_relation` from the source
model, the source's licence, the datasets known by Hub name, and a `model-index` of what was measured. [`push_to_hub`]
uploads a folder with its card re-rendered for the repository id ([`plan_push`] says what it would upload)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedModel

from .models import slim_moe
from .models.slim_moe import SlimMoeForCausalLM
from .models.slim_moe.loading_slim_moe import SafetensorsFile
from .utils import atomic_directory, count_parameters, parse_size

#: The SlimMoe family's files, copied next to the weights (auto_map names the first and third; they import the rest).
REMOTE_CODE_FILES = (
    "configuration_slim_moe.py",
    "variants_slim_moe.py",
    "modeling_slim_moe.py",
    "loading_slim_moe.py",
    "generation_slim_moe.py",
    "mtp_slim_moe.py",
    "routing_slim_moe.py",
)
AUTO_MAP = {
    "AutoConfig": "configuration_slim_moe.SlimMoeConfig",
    "AutoModel": "modeling_slim_moe.SlimMoeModel",
    "AutoModelForCausalLM": "modeling_slim_moe.SlimMoeForCausalLM",
}
MTP_FILE = "mtp.safetensors"
#: Prepended to the scripts of `run_without_hf_slim`: `import hf_slim` raises ImportError from then on (the editable
#: install stays on sys.path, so it is blocked in `sys.modules` rather than by the path), and the script stops at
#: once if it does not.
_NO_HF_SLIM_PREAMBLE = """\
import sys
sys.modules["hf_slim"] = None
try:
    import hf_slim
except ImportError:
    pass
else:
    raise SystemExit("hf_slim is importable")
"""


def _card_template(name: str) -> Path:
    # Templates live in the top-level `model_cards` package (shipped as package data).
    return Path(str(resources.files("model_cards").joinpath(name)))


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


#: The `base_model_relation` values the Hub's model tree accepts (huggingface.co/docs/hub/model-cards, "Specifying a
#: base model"); left out, the Hub infers one.
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
#: hf-slim's ways of making a model from another (`base_model_relation=` also takes these) and the Hub relation each
#: declares: the Hub has none for pruning, slicing or distilling, whose weights are new weights derived from the
#: base's, so those declare `finetune`; a conversion re-lays the same weights out and declares none.
DERIVATIONS = {"prune": "finetune", "slice": "finetune", "distill": "finetune", "elastic": "finetune", "convert": None}
_DERIVED = {"prune": ("pruned", "from"), "slice": ("sliced", "out of"), "distill": ("distilled", "from"),
            "elastic": ("made elastic", "from"), "convert": ("converted", "from")}  # fmt: skip
_DATA_FILE = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow", ".tsv")
#: `license_name` of a card whose licence hf-slim does not know (with `license: other`).
UNKNOWN_LICENSE = "unknown"


def hub_model_id(value: str | os.PathLike | None) -> str | None:
    """`value` when it reads as a Hub repository id (`"org/name"` or `"name"`, not an existing local path nor a
    data file), else `None`."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    text = str(value).strip() if isinstance(value, str) else ""
    if not text or text.startswith((".", "/", "~")) or text.count("/") > 1 or text.lower().endswith(_DATA_FILE):
        return None
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return None if Path(text).exists() else text


def _read_card(source: str | os.PathLike, download: bool = True) -> ModelCard | None:
    """The model card of a local folder, or of a Hub model (the local cache first; then, with `download`, the Hub
    unless offline)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    path: Any = Path(source) / "README.md"
    if not Path(source).is_dir():
        path = try_to_load_from_cache(str(source), "README.md")
        if not isinstance(path, str):
            if not download:
                return None
            try:
                path = hf_hub_download(str(source), "README.md", etag_timeout=5)
            except (OSError, ValueError, EntryNotFoundError):  # offline, gated, missing: the licence stays unknown
                return None
    try:
        return ModelCard.load(path, ignore_metadata_errors=True) if Path(path).is_file() else None
    except (OSError, ValueError):
        return None


def _local_base_model(folder: Path, card: ModelCard | None) -> tuple[str | None, str]:
    """The Hub id a local checkpoint stands for, and where it was read: the Hub cache's folder name
    (`models--org--name/snapshots/...`), the config's `_name_or_path`, or the folder's own card's `base_model`."""
    parts = folder.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/"), "its Hub cache folder"
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if hub_model_id(name):
        return name, "its config's `_name_or_path`"
    bases = getattr(card.data, "base_model", None) if card is not None else None
    bases = [b for b in ([bases] if isinstance(bases, str) else bases or []) if hub_model_id(b)]
    if bases:
        return bases[0], "its model card's `base_model`"
    return None, ""


def _card_licence(card: ModelCard | None) -> dict[str, Any]:
    """`license`, `license_name`, `license_link` of a card's metadata (`{}` when it has no `license`)."""
    if card is None or not getattr(card.data, "license", None):
        return {}
    return {k: getattr(card.data, k, None) for k in ("license", "license_name", "license_link")}


def _relation(value: str | None) -> tuple[str | None, str | None]:
    """(Hub `base_model_relation`, hf-slim derivation) for `base_model_relation=`."""
    if value is None or value in BASE_MODEL_RELATIONS:
        return value, None
    if value in DERIVATIONS:
        return DERIVATIONS[value], value
    valid = ", ".join([*BASE_MODEL_RELATIONS, *DERIVATIONS])
    raise ValueError(f"base_model_relation={value!r}: valid values are {valid}.")


def _eval_results(
    results: Mapping[str, Any] | Sequence[EvalResult], eval_dataset: str | None
) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """`EvalResult`s for the metadata and rows for the card's table, from `{metric: value}` or `EvalResult`s."""
    if isinstance(results, Mapping):
        dataset = eval_dataset or "held-out evaluation data"
        evals = []
        for name, value in results.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(f"results[{name!r}] must be a number or a string, got {type(value).__name__}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"results[{name!r}] is {value}: the card holds finite measurements only.")
            metric = "perplexity" if "perplexity" in name else "loss" if "loss" in name else name
            evals.append(EvalResult(
                task_type="text-generation", task_name="Text Generation", dataset_type=dataset,
                dataset_name=dataset, metric_type=metric, metric_name=name,
                metric_value=round(value, 4) if isinstance(value, float) else value,
            ))  # fmt: skip
    else:
        evals = list(results)
        if not all(isinstance(r, EvalResult) for r in evals):
            raise TypeError("results must be a {metric: value} mapping or a list of huggingface_hub.EvalResult.")
    split = [f" ({r.dataset_split})" if r.dataset_split else "" for r in evals]
    rows = [{"metric": r.metric_name or r.metric_type, "value": r.metric_value, "dataset": r.dataset_name + s}
            for r, s in zip(evals, split, strict=True)]  # fmt: skip
    return evals, rows


def card_metadata(
    repo_id: str,
    *,
    base_model: str | os.PathLike | None = None,
    base_model_relation: str | None = None,
    datasets: str | Sequence[str] | None = None,
    results: Mapping[str, Any] | Sequence[EvalResult] | None = None,
    eval_dataset: str | None = None,
    tags: Sequence[str] = (),
    extra_card_data: dict[str, Any] | None = None,
) -> tuple[ModelCardData, dict[str, Any]]:
    """The Hub metadata of a card for a model made from `base_model`, and the template variables saying in the body
    where it comes from (`provenance`) and what was measured (`results`).

    Args:
        base_model: A Hub id, or a local folder standing for the Hub id in its Hub cache folder name, its config's
            `_name_or_path` or its own card's `base_model` (else no `base_model`, and the body says so).
        base_model_relation: A Hub relation (`BASE_MODEL_RELATIONS`) or an hf-slim derivation (`DERIVATIONS`).
        datasets: Calibration / training data: Hub ids go to `datasets`, others (local files) only to the body.
        results: `{name: value}` (names holding "loss" / "perplexity" get that metric type) or `EvalResult`s, on
            `eval_dataset`: the `model-index`, and a table in the body.
        extra_card_data: Metadata set last (`{"license": "mit"}` overrides the inherited licence).

    The licence is the one in the card of the local source or else of the base model (the Hub cache, or the Hub
    unless offline); unknown, it is `other` with `license_name: unknown` and the body asks to set it.
    """
    relation, derivation = _relation(base_model_relation)
    lines: list[str] = []
    source = str(base_model) if base_model is not None else None
    base = hub_model_id(base_model)
    source_card = None
    if source is not None and base is None and Path(source).is_dir():
        source_card = _read_card(source)
        base, where = _local_base_model(Path(source), source_card)
        made = " ".join(_DERIVED.get(derivation or "", ("made", "from")))
        lines.append(f"{made.capitalize()} the local checkpoint `{source}`, " + (
            f"which stands for the Hub model `{base}` ({where})." if base
            else "which names no Hub model (no Hub cache folder, config `_name_or_path` or card `base_model`): "
            "the metadata has no `base_model`."
        ))  # fmt: skip
    elif source is not None and base is None:
        lines.append(f"Made from `{source}`, which is neither a local folder nor a Hub id: no `base_model`.")
    if base:
        said = f"Base model: [`{base}`](https://huggingface.co/{base})"
        if derivation and derivation != "convert":
            said += f", {_DERIVED[derivation][0]} (`base_model_relation: {relation}`: the Hub has no {derivation})"
        elif derivation == "convert":
            said += ", converted (the same weights in another layout: no `base_model_relation`, the Hub infers one)"
        elif relation:
            said += f" (`base_model_relation: {relation}`)"
        lines.append(said + ".")
    licence, whose = _card_licence(source_card), f"the local checkpoint `{source}`"
    if not licence and base:
        # a Hub source is read from the Hub anyway; a local one stays offline (its base model's card from the cache)
        local = source is not None and Path(source).is_dir()
        licence, whose = _card_licence(_read_card(base, download=not local)), f"`{base}`"
    if licence:
        named = f" ({licence['license_name']})" if licence.get("license_name") else ""
        lines.append(f"Licence: `{licence['license']}`{named}, inherited from the model card of {whose}.")
    else:
        link = f"https://huggingface.co/{base}" if base else None
        licence = {"license": "other", "license_name": UNKNOWN_LICENSE, "license_link": link}
        lines.append("Licence: unknown to hf-slim, so the metadata says `license: other`" + (
            f" (the model card of `{base}` could not be read): check the base model's licence, whose terms usually "
            "carry over to derived weights, and set `license` before publishing." if base
            else " (no base model on the Hub was given): set `license` before publishing."
        ))  # fmt: skip
    named = [datasets] if isinstance(datasets, str) else list(datasets or [])
    on_hub = [d for d in named if hub_model_id(d)]  # dataset ids follow the same rules as model ids
    if named:
        lines.append("Data: " + ", ".join(
            f"[`{d}`](https://huggingface.co/datasets/{d})" if d in on_hub else f"`{d}` (not on the Hub)" for d in named
        ) + ".")  # fmt: skip
    evals, rows = _eval_results(results, eval_dataset) if results else ([], [])
    fields: dict[str, Any] = dict(
        library_name="transformers", pipeline_tag="text-generation", base_model=base, datasets=on_hub or None,
        eval_results=evals or None, model_name=repo_id.split("/")[-1] if evals else None,
        tags=list(dict.fromkeys(tags)) or None,
        **{k: v for k, v in licence.items() if v},
    )  # fmt: skip
    if base and relation:
        fields["base_model_relation"] = relation
    fields.update(extra_card_data or {})
    provenance = "\n".join(f"- {line}" for line in lines)
    return ModelCardData(**fields), {"provenance": provenance, "results": rows}


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    *,
    description: str = "",
    recipe: str = "",
    base_model: str | os.PathLike | None = None,
    base_model_relation: str | None = None,
    datasets: str | Sequence[str] | None = None,
    results: Mapping[str, Any] | Sequence[EvalResult] | None = None,
    eval_dataset: str | None = None,
    has_tokenizer: bool = False,
    remote_code: bool = False,
    mtp_note: str = "",
    tags: list[str] | None = None,
    extra_card_data: dict[str, Any] | None = None,
) -> ModelCard:
    """Render `model_cards/slim_moe.md` for `model` into a `huggingface_hub.ModelCard`.

    `base_model`, `base_model_relation`, `datasets`, `results`, `eval_dataset` and `extra_card_data` make the
    metadata ([`card_metadata`]); `tags` are added after the default ones (`hf-slim`, `moe`, the model type). The
    usage snippet loads `repo_id` (with its tokenizer when `has_tokenizer`, and a nested variant with
    `elastic_variant=` for an elastic checkpoint).
    """
    config = model.config
    counts = count_parameters(model)
    card_data, card_vars = card_metadata(
        repo_id, base_model=base_model, base_model_relation=base_model_relation, datasets=datasets,
        results=results, eval_dataset=eval_dataset, tags=["hf-slim", "moe", config.model_type, *(tags or [])],
        extra_card_data=extra_card_data,
    )  # fmt: skip
    elastic = getattr(config, "elastic", None) or {}
    variants = elastic.get("variants", {}) if isinstance(elastic, dict) else {}
    card = ModelCard.from_template(
        card_data,
        template_path=str(_card_template("slim_moe.md")),
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        description=description or f"A {config.model_type} Mixture-of-Experts causal language model.",
        architecture=type(model).__name__,
        model_type=config.model_type,
        total_params=_human(counts["total"]),
        active_params=_human(counts["active"]),
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        num_experts=getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None),
        num_experts_per_tok=config.num_experts_per_tok,
        moe_intermediate_size=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
        # SlimMoe's heads, or the MTP layers a stock family holds in its own layout (GLM-4-MoE's num_mtp_layers)
        num_mtp_heads=getattr(config, "num_mtp_heads", getattr(config, "num_mtp_layers", 0)),
        elastic_variants=", ".join(["full", *variants]) if variants else "",
        elastic_variant=next(iter(variants), ""),
        recipe=recipe,
        remote_code=remote_code,
        has_tokenizer=has_tokenizer,
        code_files=", ".join(f"`{name}`" for name in REMOTE_CODE_FILES),
        mtp_note=mtp_note,
        **card_vars,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", str(card)))  # the template's blocks leave runs of blank lines


def _write_mtp_tensors(folder: Path, mtp_state: dict) -> None:
    """Store MTP tensors in their own shard and index every shard, so stock loaders skip them by name."""
    save_file({k: v.contiguous() for k, v in mtp_state.items()}, str(folder / MTP_FILE), metadata={"format": "pt"})
    add_to_index(folder, MTP_FILE, list(mtp_state))


def mtp_card_note(num_mtp_heads: int) -> str:
    """The model card's line about MTP tensors kept beside a stock checkpoint in [`MTP_FILE`]."""
    return (
        f"The checkpoint keeps {num_mtp_heads} multi-token-prediction depth(s) under `mtp.*` in `{MTP_FILE}` "
        "(transformers' MTP layout: `mtp.layers.{k}.` holds `enorm`, `hnorm`, `eh_proj`, `post_norm` and a decoder "
        "block). Stock transformers skips them, and no engine drafts with MTP heads for this architecture: "
        "`generate(use_mtp=True)` on this checkpoint does not use them. They are the MTP heads of the SlimMoe model "
        "this was exported from; `hf-slim convert THIS_FOLDER OUT --to slim_moe` (or `hf_slim.convert_checkpoint`, "
        "one tensor at a time) converts this folder back to SlimMoe with them, and that checkpoint drafts with them "
        "(`generate(use_mtp=True)`). Loading this folder with `from_pretrained` and converting in memory "
        "(`hf_slim.convert.from_hf`) drops them."
    )


def native_mtp_card_note(config: Any) -> str:
    """The model card's line about MTP layers a stock export holds in its family's own layout (GLM-4-MoE's
    `model.layers.{N + k}`), or `""` when it holds none; says whether stock `generate(use_mtp=True)` finds them."""
    from .anatomy import get_spec
    from .convert import mtp_found_by_transformers

    spec = get_spec(config.model_type)
    depths = spec.trailing_mtp.count(config) if spec.trailing_mtp is not None else 0
    if not depths:
        return ""
    n = config.num_hidden_layers
    where = f"`model.layers.{n}`" if depths == 1 else f"`model.layers.{n}` to `model.layers.{n + depths - 1}`"
    note = (
        f"The checkpoint holds {depths} multi-token-prediction layer(s) in {config.model_type}'s own layout, {where} "
        "(`enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, copies of the embedding and the LM head as `embed_tokens` "
        "and `shared_head.head`, and a decoder block), exported from the MTP heads of a SlimMoe model."
    )
    found, numbers = mtp_found_by_transformers(config)
    if found:
        return note + " Stock transformers drafts with them: `generate(use_mtp=True)`."
    return note + (
        f" Stock transformers loads {config.model_type}'s MTP layers only from "
        f"{' or '.join(f'`model.layers.{k}`' for k in numbers)}, so `generate(use_mtp=True)` does not find these "
        "(a model of that depth would). `hf-slim convert THIS_FOLDER OUT --to slim_moe` (or "
        "`hf_slim.convert_checkpoint`) converts this folder back to SlimMoe with them, and that checkpoint drafts with "
        "them."
    )


def tensor_bytes(folder: str | os.PathLike, files: list[str] | None = None) -> int:
    """The tensor bytes in a folder's safetensors files (`files`, or every `*.safetensors`), headers left out: what
    an index's `total_size` counts."""
    folder = Path(folder)
    total = 0
    for name in files if files is not None else sorted(p.name for p in folder.glob("*.safetensors")):
        with SafetensorsFile(folder / name) as handle:
            total += sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in handle.header.values())
    return total


def add_to_index(folder: str | os.PathLike, file: str, names: list[str]) -> None:
    """List the tensors `names`, stored in `folder / file`, in the folder's `model.safetensors.index.json`.

    A folder holding a single `model.safetensors` gets an index of it first; `metadata.total_size` becomes the tensor
    bytes of every indexed file (as `save_pretrained` counts them, headers left out). This is how MTP tensors are kept
    beside a stock checkpoint ([`MTP_FILE`]): stock loaders skip them by name.
    """
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        with SafetensorsFile(folder / "model.safetensors") as handle:
            keys = handle.keys()
        index = {"metadata": {}, "weight_map": {key: "model.safetensors" for key in keys}}
    index["weight_map"].update({key: file for key in names})
    index["metadata"]["total_size"] = tensor_bytes(folder, sorted(set(index["weight_map"].values())))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_hub_files(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    *,
    processing_class: Any | None = None,
    generation_config: GenerationConfig | None = None,
    repo_id: str | None = None,
    card_kwargs: dict[str, Any] | None = None,
    mtp_note: str = "",
) -> None:
    """Write everything of a Hub-ready folder but the weights: `config.json` (for SlimMoe with `auto_map` and the
    family's modeling code next to it), `generation_config.json`, the tokenizer and the model card.

    [`save_for_hub`] calls it after `save_pretrained`; the streaming writers (`hf_slim.pruning.prune_checkpoint`,
    `hf_slim.convert_streaming.stream_export`) call it for a model on the meta device, whose weights they write
    themselves. Only `model`'s config, class and parameter shapes are read (and its generation config when
    `generation_config` is not given).

    Args:
        model: The model (any device, `meta` included); `model.config` is written as it is.
        folder: An existing folder.
        processing_class: Tokenizer/processor to save alongside.
        generation_config: Defaults to the model's own, else one derived from its config.
        repo_id: Name used in the model card (defaults to the folder name).
        card_kwargs: Extra arguments for `render_model_card` (description, recipe, base_model, results, ...).
        mtp_note: A line for the card about MTP weights kept beside a stock checkpoint.
    """
    folder = Path(folder)
    remote_code = isinstance(model, SlimMoeForCausalLM)
    model.config.save_pretrained(folder)
    if remote_code:
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["auto_map"] = AUTO_MAP
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        source_dir = Path(slim_moe.__file__).parent
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(source_dir / name, folder / name)
    gen = generation_config or getattr(model, "generation_config", None) or GenerationConfig.from_model_config(
        model.config
    )
    gen.save_pretrained(folder)
    if processing_class is not None:
        processing_class.save_pretrained(folder)
    card_kwargs = {"has_tokenizer": processing_class is not None, **(card_kwargs or {})}
    card = render_model_card(model, repo_id or folder.name, remote_code=remote_code, mtp_note=mtp_note, **card_kwargs)
    card.save(folder / "README.md")


def read_hub_files(
    folder: str | os.PathLike | None, *, load_tokenizer: bool = True
) -> tuple[Any | None, GenerationConfig | None]:
    """The tokenizer and generation config a checkpoint folder carries, to pass on to [`write_hub_files`] for a model
    written from it tensor by tensor (`None` for each one the folder lacks, or for `folder=None`).

    A tokenizer that cannot be loaded is left out with a warning; the weights do not depend on it.
    `load_tokenizer=False` skips the tokenizer (the caller has one already).
    """
    if folder is None:
        return None, None
    folder = Path(folder)
    tokenizer = generation_config = None
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if load_tokenizer and any((folder / name).is_file() for name in tokenizer_files):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            warnings.warn(f"the tokenizer in {folder} cannot be loaded ({error}); the output has none", stacklevel=2)
    if (folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(folder)
    return tokenizer, generation_config


def save_for_hub(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    *,
    model_type: str | None = None,
    keep_mtp: bool = True,
    processing_class: Any | None = None,
    generation_config: GenerationConfig | None = None,
    repo_id: str | None = None,
    card_kwargs: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a Hub-ready folder for `model`.

    A `SlimMoeForCausalLM` is saved as SlimMoe with its modeling code and `auto_map`, so
    `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where hf_slim is not installed.
    With `model_type` (e.g. `"qwen3_moe"`), the model is first converted with `hf_slim.convert.to_hf` and saved as
    that stock architecture (no remote code); with `keep_mtp=True` its MTP heads are kept as `mtp.*` tensors in a
    separate shard (`mtp.safetensors`, listed in the index), which stock transformers skips, or, for a family that
    stores MTP layers after its decoder layers (`glm4_moe`), in that family's own layout (`model.layers.{N + k}`),
    which stock `generate(use_mtp=True)` drafts with when `N` is a depth transformers looks at (46 or 92 for
    GLM-4-MoE; a warning and the model card say so otherwise).

    Args:
        model: The model to export (SlimMoe or any `PreTrainedModel`).
        folder: Output folder; written atomically (nothing half-written is left on failure).
        model_type: Convert to this stock architecture first (see `hf_slim.convert.SUPPORTED_MODEL_TYPES`).
        keep_mtp: Keep MTP weights when converting to a stock architecture.
        processing_class: Tokenizer/processor to save alongside.
        generation_config: Defaults to the model's own generation config.
        repo_id: Name used in the model card (defaults to the folder name).
        card_kwargs: Extra arguments for `render_model_card` (description, recipe, base_model, results, ...).
        overwrite: Replace an existing non-empty folder.
        max_shard_size: Passed to `save_pretrained`.

    Returns:
        The output folder.
    """
    folder = Path(folder)
    parse_size(max_shard_size, "max_shard_size")  # before any work: a bogus size names the argument
    mtp_state: dict = {}
    export = model
    mtp_note = ""
    if model_type is not None and model_type != getattr(model.config, "model_type", None):
        from .convert import mtp_copies, to_hf

        if not isinstance(model, SlimMoeForCausalLM):
            raise TypeError(f"model_type={model_type!r} converts a SlimMoeForCausalLM, got {type(model).__name__}.")
        export = to_hf(model, model_type, keep_mtp=keep_mtp)
        if mtp_copies(export.config):  # MTP layers in the family's own layout, written by save_pretrained
            mtp_note = native_mtp_card_note(export.config)
        elif keep_mtp and model.mtp is not None:
            mtp_state = {f"mtp.{k}": v.detach().cpu() for k, v in model.mtp.state_dict().items()}
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        export.save_pretrained(tmp, max_shard_size=max_shard_size)
        if mtp_state:
            _write_mtp_tensors(tmp, mtp_state)
            mtp_note = mtp_card_note(getattr(model.config, "num_mtp_heads", 0))
        write_hub_files(
            export,
            tmp,
            processing_class=processing_class,
            generation_config=generation_config,
            repo_id=repo_id or folder.name,
            card_kwargs=card_kwargs,
            mtp_note=mtp_note,
        )
    return folder.resolve()


def run_without_hf_slim(
    script: str,
    *,
    cwd: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = 600,
) -> subprocess.CompletedProcess:
    """Run the Python `script` in a fresh interpreter where hf_slim cannot be imported, as on a machine that has only
    transformers and torch: `from_pretrained(..., trust_remote_code=True)` there loads the modeling code shipped in
    the folder (a class from a `transformers_modules` module), never the installed one.

    The run is offline (`HF_HUB_OFFLINE=1`) with an empty `PYTHONPATH` and its own temporary `HF_MODULES_CACHE`, so
    concurrent runs never share the copied remote code.

    Args:
        script: Python source (dedented before it runs).
        cwd: Working directory (defaults to the temporary folder).
        env: Extra environment variables, applied last.
        timeout: Seconds before `subprocess.TimeoutExpired`.

    Returns:
        The `subprocess.CompletedProcess` (`stdout`/`stderr` as text); check `returncode`.
    """
    with tempfile.TemporaryDirectory(prefix="hf_slim_remote_") as scratch:
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_MODULES_CACHE": os.path.join(scratch, "modules"),
            "PYTHONPATH": "",
            **(env or {}),
        }
        return subprocess.run(
            [sys.executable, "-c", _NO_HF_SLIM_PREAMBLE + textwrap.dedent(script)],
            stdin=subprocess.DEVNULL,  # a prompt (e.g. transformers asking to trust remote code) gets EOF, not a hang
            capture_output=True,
            text=True,
            check=False,
            env=full_env,
            cwd=str(cwd) if cwd is not None else scratch,
            timeout=timeout,
        )


_USAGE_ID = re.compile(r"""(from_pretrained\(\s*)(["'])([^"']+)\2""")


def _is_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"folder {folder} does not exist.")
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder {folder} is not a model folder: it has no config.json (write one with "
                         "hf_slim.hub.save_for_hub or hf-slim prune, convert, slice or distill).")  # fmt: skip
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise ValueError(f"folder {folder} is not a model folder: it has a config.json but no weights "
                         "(*.safetensors).")  # fmt: skip


def card_for_repo(folder: str | os.PathLike, repo_id: str) -> ModelCard:
    """The model card of a Hub-ready folder re-rendered for the repository `repo_id`; the folder is not changed.

    A card written by hf-slim names the folder where it was written (`# name`, `from_pretrained("name")`, the
    `model-index` name): those become `repo_id` (and its last part); the rest is kept as it is.
    """
    folder = Path(folder)
    readme = folder / "README.md"
    if not readme.is_file():
        raise ValueError(f"folder {folder} has no README.md; write the folder with hf_slim.hub.save_for_hub (or "
                         "write_hub_files), which writes the model card.")  # fmt: skip
    card = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=False)
    name = repo_id.split("/")[-1]
    heading = re.search(r"^# (.+)$", card.content, flags=re.MULTILINE)
    old = heading.group(1).strip() if heading else None
    content = card.content
    if old is not None:
        content = content[: heading.start()] + f"# {name}" + content[heading.end():]

    def retarget(match: re.Match) -> str:
        used = match.group(3)
        if used.replace("\\", "/").rstrip("/").split("/")[-1] in (old, folder.name) or Path(used) == folder:
            used = repo_id
        return f"{match.group(1)}{match.group(2)}{used}{match.group(2)}"

    card.content = _USAGE_ID.sub(retarget, content)
    if getattr(card.data, "eval_results", None):
        card.data.model_name = name
    return ModelCard(str(card))


@dataclasses.dataclass
class PushPlan:
    """What [`push_to_hub`] uploads: `files` (path in the repository, bytes; `README.md` is the re-rendered
    `card`) from `folder` to `repo_id` at `revision`, and `card_diff`, the card's lines changed from the local one
    (a unified diff; the whole card when the folder has none)."""

    folder: Path
    repo_id: str
    revision: str | None
    files: list[tuple[str, int]]
    card: ModelCard
    card_diff: list[str]


def plan_push(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None) -> PushPlan:
    """What [`push_to_hub`] would upload, read from `folder` without touching the Hub or the folder.

    Every file under `folder` is uploaded but hidden ones (a name starting with `.`, e.g. `.cache/`), with
    `README.md` replaced by [`card_for_repo`]'s card.

    Raises:
        `ValueError`: `folder` is not a model folder (no `config.json`, no weights), or `repo_id` is not a Hub id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id {repo_id!r} is not a Hub repository id: {error}") from None
    _is_model_folder(folder)
    card = card_for_repo(folder, repo_id)
    text = str(card)
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    }
    files["README.md"] = len(text.encode("utf-8"))
    local = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").is_file() else ""
    diff = list(difflib.unified_diff(local.splitlines(), text.splitlines(), f"{folder.name}/README.md",
                                     f"{repo_id}/README.md", n=0, lineterm=""))  # fmt: skip
    return PushPlan(folder, repo_id, revision, sorted(files.items()), card, diff)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with hf-slim",
    token: str | None = None,
    api: Any | None = None,
) -> str:
    """Upload a Hub-ready folder (`save_for_hub`, `hf-slim prune`, ...) to a Hub model repository in one commit, its
    model card re-rendered for `repo_id` ([`plan_push`]), without changing the folder: `HfApi.create_repo` (if needed),
    `create_branch` (for a `revision` other than `main`), then `create_commit` with a `CommitOperationAdd` per file.

    Args:
        private: Visibility of a newly created repository (`None`: the Hub's default).
        revision: The branch to commit to (created from `main` if needed; default `main`).
        token: Hub token (defaults to the logged-in one); api: an `HfApi`-like object to use instead.

    Returns:
        The URL of the upload commit.
    """
    import huggingface_hub
    from huggingface_hub import CommitOperationAdd

    plan = plan_push(folder, repo_id, revision=revision)
    api = api or huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_id=repo_id, repo_type="model", branch=revision, exist_ok=True)
    card = str(plan.card).encode("utf-8")
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=card if name == "README.md" else str(plan.folder / name))
        for name, _ in plan.files
    ]
    commit = api.create_commit(repo_id=repo_id, repo_type="model", operations=operations,
                               commit_message=commit_message, revision=revision)  # fmt: skip
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "AUTO_MAP",
    "BASE_MODEL_RELATIONS",
    "DERIVATIONS",
    "MTP_FILE",
    "REMOTE_CODE_FILES",
    "UNKNOWN_LICENSE",
    "PushPlan",
    "add_to_index",
    "card_for_repo",
    "card_metadata",
    "hub_model_id",
    "mtp_card_note",
    "native_mtp_card_note",
    "plan_push",
    "push_to_hub",
    "read_hub_files",
    "render_model_card",
    "run_without_hf_slim",
    "save_for_hub",
    "tensor_bytes",
    "write_hub_files",
]
