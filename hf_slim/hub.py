"""Hub-ready export: safetensors weights, config (with `auto_map` for SlimMoe), generation config, tokenizer, the
modeling code and a model card, written atomically into one folder that `from_pretrained` loads as it is.
`write_hub_files` writes everything but the weights, for whoever writes the weights another way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData
from safetensors.torch import save_file
from transformers import GenerationConfig, PreTrainedModel

from .models import slim_moe
from .models.slim_moe import SlimMoeForCausalLM
from .models.slim_moe.loading_slim_moe import SafetensorsFile
from .utils import atomic_directory, count_parameters

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


def render_model_card(
    model: PreTrainedModel,
    repo_id: str,
    *,
    description: str = "",
    recipe: str = "",
    base_model: str | None = None,
    remote_code: bool = False,
    mtp_note: str = "",
    tags: list[str] | None = None,
    extra_card_data: dict[str, Any] | None = None,
) -> ModelCard:
    """Render `model_cards/slim_moe.md` for `model` into a `huggingface_hub.ModelCard`.

    `tags` are added after the default ones (`hf-slim`, `moe`, the model type).
    """
    config = model.config
    counts = count_parameters(model)
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=list(dict.fromkeys(["hf-slim", "moe", config.model_type, *(tags or [])])),
        **(extra_card_data or {}),
    )
    elastic = getattr(config, "elastic", None) or {}
    variants = elastic.get("variants", {}) if isinstance(elastic, dict) else {}
    return ModelCard.from_template(
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
        recipe=recipe,
        remote_code=remote_code,
        code_files=", ".join(f"`{name}`" for name in REMOTE_CODE_FILES),
        mtp_note=mtp_note,
    )


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
        card_kwargs: Extra arguments for `render_model_card` (description, recipe, base_model, ...).
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
    card = render_model_card(
        model, repo_id or folder.name, remote_code=remote_code, mtp_note=mtp_note, **(card_kwargs or {})
    )
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
        card_kwargs: Extra arguments for `render_model_card` (description, recipe, base_model, ...).
        overwrite: Replace an existing non-empty folder.
        max_shard_size: Passed to `save_pretrained`.

    Returns:
        The output folder.
    """
    folder = Path(folder)
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


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload with hf-slim",
    token: str | None = None,
    api: HfApi | None = None,
) -> str:
    """Upload a folder written by `save_for_hub` (or `hf_slim.pruning.save_pruned`) to a Hub model repository.

    Creates the repository if needed, then uploads the folder with `huggingface_hub.HfApi.upload_folder`.

    Args:
        folder: A Hub-ready folder; it must contain `config.json`.
        repo_id: `"user/name"` of the model repository.
        private: Visibility of a newly created repository.
        commit_message: Message of the upload commit.
        token: Hub token (defaults to the logged-in one).
        api: An `HfApi` instance to use (for custom endpoints).

    Returns:
        The URL of the upload commit.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder {folder} has no config.json; write it with hf_slim.hub.save_for_hub first.")
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty 'user/name' string, got {repo_id!r}.")
    api = api or HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message
    )
    return str(getattr(commit, "commit_url", commit))


__all__ = [
    "AUTO_MAP",
    "MTP_FILE",
    "REMOTE_CODE_FILES",
    "add_to_index",
    "mtp_card_note",
    "native_mtp_card_note",
    "push_to_hub",
    "read_hub_files",
    "render_model_card",
    "run_without_hf_slim",
    "save_for_hub",
    "tensor_bytes",
    "write_hub_files",
]
