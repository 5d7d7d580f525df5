import json
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

from hf_slim.hub import REMOTE_CODE_FILES, run_without_hf_slim, save_for_hub
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


def _model(**overrides):
    fields = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, num_mtp_heads=1,
    )
    fields.update(overrides)
    return SlimMoeForCausalLM(SlimMoeConfig(**fields)).eval()


def test_remote_code_loads_without_hf_slim(tmp_path):
    model = _model(shared_expert_intermediate_size=8)
    folder = save_for_hub(model, tmp_path / "export")
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            *REMOTE_CODE_FILES} <= set(os.listdir(folder))
    assert set(REMOTE_CODE_FILES) == {f"{concern}_slim_moe.py" for concern in
                                      ("configuration", "variants", "modeling", "loading", "generation", "mtp",
                                       "routing")}
    card = (folder / "README.md").read_text()
    assert all(f"`{name}`" in card for name in REMOTE_CODE_FILES)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith(
        "SlimMoeForCausalLM"
    )
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    torch.save({"ids": ids, "logits": expected}, tmp_path / "ref.pt")
    result = run_without_hf_slim(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], atol=1e-6, rtol=1e-6)
        print("REMOTE_OK", type(model).__name__)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK SlimMoeForCausalLM" in result.stdout


def test_stock_export_keeps_mtp_tensors_that_stock_loading_skips(tmp_path):
    model = _model(num_mtp_heads=2)
    folder = save_for_hub(model, tmp_path / "stock", model_type="qwen3_moe")
    assert not (folder / "modeling_slim_moe.py").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    mtp_keys = {k for k, v in index["weight_map"].items() if v == "mtp.safetensors"}
    assert {"mtp.layers.1.eh_proj.weight", "mtp.layers.1.enorm.weight", "mtp.layers.1.hnorm.weight",
            "mtp.layers.1.post_norm.weight", "mtp.layers.1.mlp.experts.gate_up_proj"} <= mtp_keys
    assert mtp_keys == {f"mtp.{k}" for k in model.mtp.state_dict()}
    with safe_open(str(folder / "mtp.safetensors"), framework="pt") as handle:
        torch.testing.assert_close(
            handle.get_tensor("mtp.layers.1.eh_proj.weight"), model.mtp.layers[1].eh_proj.weight, atol=0, rtol=0
        )
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(stock, Qwen3MoeForCausalLM)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_failed_export_leaves_nothing_and_existing_folder_is_protected(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="qk_norm"):
        save_for_hub(_model(qk_norm=None), target, model_type="olmoe")
    assert not target.exists() and os.listdir(tmp_path) == []
    save_for_hub(_model(), target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_for_hub(_model(), target)
    save_for_hub(_model(), target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_model_card_states_sizes(tmp_path):
    folder = save_for_hub(_model(), tmp_path / "card", card_kwargs={"recipe": "Pruned from X; distilled 1B tokens."})
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "Pruned from X" in card
    assert "multi-token-prediction depths | 1" in card


class _RecordingApi:
    """Stands in for huggingface_hub.HfApi: records calls instead of touching the network."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(("create_commit", kwargs))
        return type("Commit", (), {"commit_url": f"https://hub.example/{kwargs['repo_id']}/commit/1"})()


def test_push_to_hub_creates_repo_and_uploads_the_folder(tmp_path):
    from hf_slim.hub import push_to_hub

    folder = save_for_hub(_model(), tmp_path / "export")
    api = _RecordingApi()
    url = push_to_hub(folder, "me/tiny-slim", private=True, api=api)
    assert url.endswith("me/tiny-slim/commit/1")
    # one commit of every file, the card re-rendered for the repo id (tests/test_push.py tests the rest)
    assert [name for name, _ in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1] == {"repo_id": "me/tiny-slim", "repo_type": "model", "private": True, "exist_ok": True}
    uploaded = {op.path_in_repo: op.path_or_fileobj for op in api.calls[1][1]["operations"]}
    assert set(uploaded) == set(os.listdir(folder))
    assert uploaded["config.json"] == str(folder / "config.json")
    assert b'from_pretrained("me/tiny-slim"' in uploaded["README.md"]
    with pytest.raises(ValueError, match="config.json"):
        push_to_hub(tmp_path, "me/tiny-slim", api=api)
