"""Model-card metadata (`hf_slim.hub.card_metadata`: base model, relation, licence, datasets, model-index) and
`hf-slim push` (`hf_slim.hub.plan_push` / `push_to_hub`) against a recording stand-in for `huggingface_hub.HfApi`.
Offline: nothing reaches the Hub."""

import json
from typing import ClassVar

import huggingface_hub
import pytest
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from hf_slim.cli import main
from hf_slim.hub import (
    BASE_MODEL_RELATIONS,
    DERIVATIONS,
    card_metadata,
    plan_push,
    render_model_card,
    save_for_hub,
)
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


def _model(**overrides):
    fields = {
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 16,
    }  # fmt: skip
    fields.update(overrides)
    return SlimMoeForCausalLM(SlimMoeConfig(**fields)).eval()


def _tokenizer():
    vocab = {"[UNK]": 0, "[PAD]": 1, "def": 2, "return": 3}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _round_trip(card: ModelCard) -> dict:
    """The metadata as the Hub reads it back: YAML parsed by huggingface_hub, rebuilt as `ModelCardData` (which
    validates `model-index` into `EvalResult`s) and dumped again."""
    loaded = ModelCard(str(card))
    data = loaded.data.to_dict()
    assert ModelCardData(**data).to_dict() == data
    return data


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache; `add(repo_id, readme)` puts a model card in it as `hf_hub_download` would have."""
    cache = tmp_path / "hub_cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id, readme):
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("a" * 40)
        (repo / "snapshots" / ("a" * 40)).mkdir(parents=True)
        (repo / "snapshots" / ("a" * 40) / "README.md").write_text(readme)
        return repo / "snapshots" / ("a" * 40)

    return add


# ---- card metadata -----------------------------------------------------------------------------------------------
def test_card_metadata_from_a_hub_source_round_trips(hub_cache):
    hub_cache("Qwen/Qwen3-30B-A3B", "---\nlicense: apache-2.0\n---\n# Qwen3\n")
    card = render_model_card(
        _model(), "me/slim", base_model="Qwen/Qwen3-30B-A3B", base_model_relation="prune",
        datasets=["Salesforce/wikitext", "calibration.jsonl"], results={"eval_loss": 2.345678, "perplexity": 10.44},
        eval_dataset="Salesforce/wikitext", has_tokenizer=True, remote_code=True,
    )  # fmt: skip
    data = _round_trip(card)
    assert data["base_model"] == "Qwen/Qwen3-30B-A3B"
    assert data["base_model_relation"] == "finetune" and data["base_model_relation"] in BASE_MODEL_RELATIONS
    assert data["license"] == "apache-2.0" and "license_name" not in data
    assert data["datasets"] == ["Salesforce/wikitext"]  # the local file is not a Hub dataset
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"hf-slim", "moe", "slim_moe"} <= set(data["tags"])
    loaded = ModelCard(str(card)).data
    assert loaded.model_name == "slim"
    assert [(r.metric_type, r.metric_name, r.metric_value, r.dataset_type) for r in loaded.eval_results] == [
        ("loss", "eval_loss", 2.3457, "Salesforce/wikitext"),
        ("perplexity", "perplexity", 10.44, "Salesforce/wikitext"),
    ]
    text = card.content
    assert "## Evaluation" in text and "| eval_loss | 2.3457 | Salesforce/wikitext |" in text
    assert "Licence: `apache-2.0`, inherited from the model card of `Qwen/Qwen3-30B-A3B`" in text
    assert "`calibration.jsonl` (not on the Hub)" in text and "the Hub has no prune)" in text
    assert 'tokenizer = AutoTokenizer.from_pretrained("me/slim", trust_remote_code=True)' in text
    assert 'AutoModelForCausalLM.from_pretrained("me/slim", trust_remote_code=True)' in text


def test_no_results_no_model_index_and_an_unknown_licence_is_other(hub_cache):
    card = render_model_card(_model(), "me/slim", base_model="org/not-cached", base_model_relation="convert")
    data = _round_trip(card)
    assert "model-index" not in data and "model_name" not in data
    assert data["base_model"] == "org/not-cached" and "base_model_relation" not in data  # a conversion declares none
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "unknown", "https://huggingface.co/org/not-cached"
    )
    card = render_model_card(_model(), "me/slim")  # nothing known about a source
    data = _round_trip(card)
    assert "base_model" not in data and data["license"] == "other" and "license_link" not in data
    assert "no base model on the Hub was given" in card.content and "## Evaluation" not in card.content


def test_local_source_stands_for_its_hub_id_and_passes_on_its_licence(tmp_path, hub_cache):
    source = tmp_path / "teacher"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "_name_or_path": "org/teacher"}))
    (source / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tongyi-qianwen\nlicense_link: https://example.org/LICENSE\n"
        "base_model: org/grandparent\n---\n# teacher\n"
    )
    card = render_model_card(_model(), "me/slim", base_model=str(source), base_model_relation="distill")
    data = _round_trip(card)
    assert data["base_model"] == "org/teacher"  # config's _name_or_path: nearer than the card's base_model
    assert data["base_model_relation"] == DERIVATIONS["distill"] == "finetune"
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other", "tongyi-qianwen", "https://example.org/LICENSE"
    )
    assert f"Distilled from the local checkpoint `{source}`" in card.content
    # without _name_or_path the folder's own card names the base; a Hub cache snapshot names itself
    (source / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    data = _round_trip(render_model_card(_model(), "me/slim", base_model=str(source)))
    assert data["base_model"] == "org/grandparent"
    snapshot = hub_cache("org/cached-model", "---\nlicense: mit\n---\n")
    data = _round_trip(render_model_card(_model(), "me/slim", base_model=str(snapshot), base_model_relation="slice"))
    assert (data["base_model"], data["license"]) == ("org/cached-model", "mit")


def test_local_source_naming_no_hub_model_leaves_base_model_out(tmp_path):
    source = tmp_path / "scratch"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "_name_or_path": "/data/run3"}))
    card = render_model_card(_model(), "me/slim", base_model=source, base_model_relation="prune",
                             datasets="hf_slim:stdlib")  # fmt: skip
    data = _round_trip(card)
    assert "base_model" not in data and "base_model_relation" not in data and "datasets" not in data
    assert "which names no Hub model" in card.content and "the metadata has no `base_model`" in card.content
    assert "`hf_slim:stdlib` (not on the Hub)" in card.content


def test_card_metadata_inputs_are_checked():
    with pytest.raises(ValueError, match="base_model_relation='pruned': valid values are adapter, merge"):
        card_metadata("me/x", base_model="org/x", base_model_relation="pruned")
    with pytest.raises(ValueError, match=r"results\['eval_loss'\] is nan"):
        card_metadata("me/x", results={"eval_loss": float("nan")})
    evals = [EvalResult(task_type="text-generation", dataset_type="org/data", dataset_name="data", metric_type="loss",
                        metric_value=1.5, dataset_split="test")]  # fmt: skip
    data, variables = card_metadata("me/x", results=evals, extra_card_data={"license": "mit"})
    assert data.license == "mit" and data.eval_results == evals
    assert variables["results"] == [{"metric": "loss", "value": 1.5, "dataset": "data (test)"}]


def test_export_card_shows_the_tokenizer_and_the_elastic_variant(tmp_path):
    model = _model(elastic={"variants": {"small": {"hidden_size": 16}}})
    folder = save_for_hub(model, tmp_path / "nested", processing_class=_tokenizer())
    text = (folder / "README.md").read_text()
    assert 'tokenizer = AutoTokenizer.from_pretrained("nested", trust_remote_code=True)' in text  # else a prompt
    assert 'from_pretrained("nested", trust_remote_code=True, elastic_variant="small")' in text
    assert "\n\n\n" not in text


# ---- hf-slim push ------------------------------------------------------------------------------------------------
class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records every instance and call, touches no network."""

    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.init = kwargs
        self.calls = []
        RecordingApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()


@pytest.fixture
def recording_api(monkeypatch):
    RecordingApi.instances = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


@pytest.fixture
def export(tmp_path):
    folder = save_for_hub(_model(), tmp_path / "tiny-local", processing_class=_tokenizer())
    (folder / ".cache").mkdir()
    (folder / ".cache" / "lock").write_text("x")  # hidden: never uploaded
    return folder


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_dry_run_prints_the_plan_and_uploads_nothing(export, recording_api, capsys):
    before = _snapshot(export)
    assert main(["push", str(export), "me/tiny-slim", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert recording_api.instances == []
    assert _snapshot(export) == before
    assert f"{export} -> https://huggingface.co/me/tiny-slim" in out and out.rstrip().endswith("nothing uploaded")
    size = (export / "model.safetensors").stat().st_size
    assert f"{size:,}  model.safetensors" in out and ".cache" not in out
    assert '+model = AutoModelForCausalLM.from_pretrained("me/tiny-slim", trust_remote_code=True)' in out
    assert '-model = AutoModelForCausalLM.from_pretrained("tiny-local", trust_remote_code=True)' in out
    assert "+# tiny-slim" in out


def test_push_uploads_the_folder_with_the_card_rendered_for_the_repo_id(export, recording_api, capsys):
    before = _snapshot(export)
    argv = ["push", str(export), "me/tiny-slim", "--private", "--revision", "dev", "--commit-message", "first"]
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip().endswith("uploaded: https://hub.example/me/tiny-slim/commit/1")
    assert _snapshot(export) == before  # the folder is not changed
    (api,) = recording_api.instances
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/tiny-slim", "repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][1] == {"repo_id": "me/tiny-slim", "repo_type": "model", "branch": "dev", "exist_ok": True}
    commit = api.calls[2][1]
    assert (commit["repo_id"], commit["revision"], commit["commit_message"]) == ("me/tiny-slim", "dev", "first")
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in commit["operations"]}
    assert set(uploaded) == {name for name in before if not name.startswith(".cache")}
    assert uploaded["model.safetensors"] == str(export / "model.safetensors")
    card = uploaded["README.md"].decode()
    assert 'from_pretrained("me/tiny-slim"' in card and '"tiny-local"' not in card and "# tiny-slim\n" in card
    assert ModelCard(card).data.to_dict() == ModelCard(before["README.md"].decode()).data.to_dict()


def test_plan_keeps_results_and_names_the_model_index_for_the_repo(tmp_path):
    card_kwargs = {"results": {"eval_loss": 1.25}, "eval_dataset": "held-out docs"}
    folder = save_for_hub(_model(), tmp_path / "measured", card_kwargs=card_kwargs)
    plan = plan_push(folder, "me/renamed")
    assert plan.card.data.model_name == "renamed" and plan.card.data.eval_results[0].metric_value == 1.25
    assert dict(plan.files)["README.md"] == len(str(plan.card).encode())


def _error_line(capsys, argv):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-slim push: error: "), captured.err
    return lines[0][len("hf-slim push: error: "):]


def test_push_bad_input_is_one_line(tmp_path, export, recording_api, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error_line(capsys, ["push", str(empty), "me/x"]) == (
        f"folder {empty} is not a model folder: it has no config.json (write one with hf_slim.hub.save_for_hub or "
        "hf-slim prune, convert, slice or distill)."
    )
    (empty / "config.json").write_text("{}")
    assert "it has a config.json but no weights" in _error_line(capsys, ["push", str(empty), "me/x", "--dry-run"])
    assert _error_line(capsys, ["push", str(tmp_path / "missing"), "me/x"]).endswith("does not exist.")
    message = _error_line(capsys, ["push", str(export), "me/x/y"])
    assert message.startswith("repo_id 'me/x/y' is not a Hub repository id")
    (export / "README.md").unlink()
    assert "has no README.md" in _error_line(capsys, ["push", str(export), "me/x"])
    assert recording_api.instances == []


def test_push_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: hf-slim push") and "--dry-run" in shown and "--revision" in shown
