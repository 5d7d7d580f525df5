"""Bad input at the Python API: each case asserts the error type and that the message names the field or file, the
value where there is one, and what is valid (issue 15). Organised by entry point, one parametrized table each."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from torch import nn

from hf_slim import (
    ElasticConfig,
    PruneConfig,
    SlimMoeConfig,
    SlimMoeForCausalLM,
    collect_statistics,
    convert_checkpoint,
    make_elastic,
    prune,
    prune_checkpoint,
    slice_checkpoint,
    slice_variant,
)
from hf_slim import losses as L
from hf_slim.checkpoints import CheckpointError, open_checkpoint
from hf_slim.convert import from_hf, to_hf
from hf_slim.hub import save_for_hub
from hf_slim.optim import Aurora
from hf_slim.optim.lora import AuroraLoRA


TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
)  # fmt: skip


def _raises(call, error, pattern):
    with pytest.raises(error) as info:
        call()
    message = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SlimMoe, its statistics, its checkpoint folder and an elastic checkpoint (variant `small`)."""
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(SlimMoeConfig(**TINY)).eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, ids, num_samples=4, max_length=16, batch_size=4, show_progress=False)
    root = tmp_path_factory.mktemp("bad_input")
    model.save_pretrained(root / "ckpt")
    elastic = make_elastic(model, {"variants": {"small": {"hidden_size": 16}}}, stats)
    elastic.save_pretrained(root / "elastic")
    return model, ids, stats, root, elastic


# ---- SlimMoeConfig: every numeric field's range ----------------------------------------------------------------
V = ValueError
S = StrictDataclassFieldValidationError  # huggingface_hub's strict dataclass: the type of a field (the CLI: exit 2)
SLIM_MOE_CONFIG = [
    ({"vocab_size": 0}, V, r"vocab_size must be a positive integer, got 0"),
    ({"vocab_size": -3}, V, r"vocab_size must be a positive integer, got -3"),
    ({"vocab_size": "64"}, S, r"'vocab_size' expected int, got str"),
    ({"vocab_size": 64.0}, S, r"'vocab_size' expected int, got float"),
    ({"hidden_size": 0}, V, r"hidden_size must be a positive integer, got 0"),
    ({"hidden_size": 30, "head_dim": None}, V, r"hidden_size=30 is not a multiple of num_attention_heads=4"),
    ({"num_hidden_layers": 0}, V, r"num_hidden_layers must be a positive integer, got 0"),
    ({"num_attention_heads": 0}, V, r"num_attention_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 0}, V, r"num_key_value_heads must be a positive integer, got 0"),
    ({"num_key_value_heads": 3}, V, r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    ({"head_dim": 0}, V, r"head_dim must be a positive integer, got 0"),
    ({"head_dim": 7}, V, r"head_dim must be even for RoPE, got 7"),
    ({"num_experts": 0}, V, r"num_experts must be a positive integer, got 0"),
    ({"num_experts_per_tok": 0}, V, r"num_experts_per_tok must be a positive integer, got 0"),
    ({"num_experts_per_tok": 5}, V, r"num_experts_per_tok \(5\) is larger than num_experts \(4\)"),
    ({"moe_intermediate_size": 0}, V, r"moe_intermediate_size must be a positive integer or a list.*got 0"),
    ({"moe_intermediate_size": [16]}, V, r"moe_intermediate_size has 1 entries but num_hidden_layers is 2"),
    ({"moe_intermediate_size": [16, 0]}, V, r"moe_intermediate_size entries must be positive integers, got \[0\]"),
    ({"intermediate_size": 0, "mlp_layer_types": ["dense", "sparse"]}, V, r"intermediate_size must be a positive"),
    ({"shared_expert_intermediate_size": -1}, V, r"shared_expert_intermediate_size must be an integer >= 0, got -1"),
    ({"num_mtp_heads": -1}, V, r"num_mtp_heads must be an integer >= 0, got -1"),
    ({"mtp_loss_weight": -0.5}, V, r"mtp_loss_weight must be >= 0, got -0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0.0}}, V, r"\['rope_theta'\] must be a number > 0, got 0.0"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1e4}}, V, r"\['rope_theta'\] must be a number > 0"),
    ({"rope_theta": 0.0}, V, r"\['rope_theta'\] must be a number > 0, got 0.0"),
    ({"rope_parameters": {"rope_type": "bogus", "rope_theta": 1e4}}, V, r"\['rope_type'\]='bogus' is unknown; valid"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}}, V,
     r"\['partial_rotary_factor'\] must be in \(0, 1\], got 1.5"),
    ({"rms_norm_eps": 0.0}, V, r"rms_norm_eps must be a number > 0 .*got 0.0"),
    ({"rms_norm_eps": -1e-6}, V, r"rms_norm_eps must be a number > 0 .*got -1e-06"),
    ({"rms_norm_eps": "1e-6"}, S, r"'rms_norm_eps' expected float, got str"),
    ({"pad_token_id": 64}, V, r"pad_token_id=64 is outside the vocabulary; valid values: None or 0..63"),
    ({"pad_token_id": -1}, V, r"pad_token_id=-1 is outside the vocabulary"),
    ({"max_position_embeddings": 0}, V, r"max_position_embeddings must be a positive integer, got 0"),
    ({"initializer_range": -0.02}, V, r"initializer_range must be a number >= 0, got -0.02"),
    ({"attention_dropout": 1.0}, V, r"attention_dropout must be a probability in \[0, 1\), got 1.0"),
    ({"router_aux_loss_coef": -1.0}, V, r"router_aux_loss_coef must be a number >= 0, got -1.0"),
    ({"clip_qkv": 0.0}, V, r"clip_qkv must be None or a number > 0, got 0.0"),
    ({"sliding_window": -4}, V, r"sliding_window must be None or a positive integer, got -4"),
    ({"layer_types": ["sliding_attention"] * 2}, V, r"sliding_window must be set when layer_types has"),
    ({"layer_types": ["full_attention"]}, V, r"layer_types has 1 entries but num_hidden_layers is 2"),
    ({"mlp_layer_types": ["sparse", "moe"]}, V, r"mlp_layer_types has invalid entries \['moe'\]; valid entries"),
    ({"hidden_act": "swish2"}, V, r"hidden_act='swish2' is unknown; valid values"),
    ({"qk_norm": "layer"}, V, r"qk_norm must be one of \('head', 'full'\) or None, got 'layer'"),
    ({"router_scoring": "topk"}, V, r"router_scoring must be one of \('softmax', 'sigmoid'\), got 'topk'"),
    ({"n_group": 2}, V, r"n_group=2, topk_group=1: group-limited routing is part of router_scoring='sigmoid'"),
    ({"router_scoring": "sigmoid", "n_group": 3}, V, r"n_group=3: .*num_experts=4 must split"),
    ({"router_scoring": "sigmoid", "n_group": 2, "topk_group": 3}, V, r"topk_group=3 is larger than n_group=2"),
    ({"routed_scaling_factor": 0}, V, r"routed_scaling_factor must be a number > 0, got 0"),
    ({"elastic": {"variants": {"a": {"hidden_size": 64}}}}, V, r"variant 'a': hidden_size=64 is out of range"),
    ({"elastic": {"variants": {"a": {"bogus": 1}}}}, V, r"variant 'a': unknown field\(s\) \['bogus'\]; valid fields"),
    ({"elastic": {"variants": [1]}}, V, r"elastic must be a dict like"),
    ({"elastic": {"variants": {"a": {"num_experts": 0}}}}, V, r"variant 'a': num_experts=0 is out of range"),
    ({"elastic": "small"}, S, r"Field 'elastic' with value 'small'"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, error, pattern", SLIM_MOE_CONFIG, ids=lambda v: None)
def test_slim_moe_config(overrides, error, pattern):
    _raises(lambda: SlimMoeConfig(**{**TINY, **overrides}), error, pattern)


# ---- PruneConfig ---------------------------------------------------------------------------------------------------
PRUNE_CONFIG = [
    ({"hidden_size": 0}, r"hidden_size=0: must be >= 1"),
    ({"hidden_size": 1.5}, r"hidden_size=1.5: a fraction must lie in \(0, 1\]"),
    ({"hidden_size": "16"}, r"hidden_size='16': must be an int, a float in \(0, 1\] or None"),
    ({"num_key_value_heads": 0.5}, r"num_key_value_heads=0.5: must be an int \(no fractions"),
    ({"num_experts": 2, "num_experts_per_tok": 3}, r"num_experts_per_tok=3: larger than num_experts=2"),
    ({"num_attention_heads": 3, "num_key_value_heads": 2}, r"num_attention_heads=3: must be a multiple of num_key_value_heads=2"),
    ({"depth_method": "first"}, r"depth_method='first': valid values are \['last', 'block_influence'\]"),
    ({"hidden_method": "bogus"}, r"hidden_method='bogus': valid values are"),
    ({"expert_strategy": "drop"}, r"expert_strategy='drop': valid values are"),
    ({"merge_similarity": "cosine"}, r"merge_similarity='cosine': valid values are"),
    ({"keep_mtp_decodable": "yes"}, r"keep_mtp_decodable='yes': must be true or false"),
    ({"target_total_params": "lots"}, r"target_total_params='lots': not a parameter count"),
    ({"target_active_params": -5}, r"target_active_params=-5: a parameter count must be >= 1"),
    ({"target_total_params": "1M", "budget_axes": ["depth"]}, r"budget_axes: 'depth' is not a size field"),
    ({"budget_axes": ["hidden_size"]}, r"budget_axes=\['hidden_size'\]: set target_total_params"),
]  # fmt: skip


@pytest.mark.parametrize("fields, pattern", PRUNE_CONFIG)
def test_prune_config(fields, pattern):
    _raises(lambda: PruneConfig(**fields), ValueError, pattern)


def test_prune_config_from_dict_names_unknown_fields():
    _raises(lambda: PruneConfig.from_dict({"hiden_size": 3}), ValueError, r"unknown field\(s\) \['hiden_size'\]")


# ---- prune / collect_statistics / prune_checkpoint -------------------------------------------------------------
PRUNE = [
    ({"hidden_size": 1}, ValueError, r"hidden_size=1: a residual stream of 1 channel is degenerate.*valid sizes are 2..32"),
    ({"hidden_size": 0.01}, ValueError, r"hidden_size=0.01: a residual stream of 1 channel is degenerate"),
    ({"hidden_size": 64}, ValueError, r"hidden_size=64: larger than the source model's hidden_size=32"),
    ({"num_attention_heads": 8}, ValueError, r"num_attention_heads=8: larger than the source model's"),
    ({"num_attention_heads": 3}, ValueError, r"num_attention_heads=3: must be a multiple of num_key_value_heads=2"),
    ({"num_key_value_heads": 3}, ValueError, r"num_key_value_heads=3: larger than the source model's"),
    ({"num_experts": 1}, ValueError, r"num_experts_per_tok=2: larger than num_experts=1"),
    ({"num_hidden_layers": 5}, ValueError, r"num_hidden_layers=5: larger than the source model's num_hidden_layers=2"),
    ({"moe_intermediate_size": 100}, ValueError, r"moe_intermediate_size=100: larger than the source model's"),
    ({"intermediate_size": 8}, ValueError, r"intermediate_size=8: the model has no dense FFN layer"),
    ({"shared_expert_intermediate_size": 8}, ValueError, r"shared_expert_intermediate_size=8: slim_moe has no shared expert"),
]  # fmt: skip


@pytest.mark.parametrize("fields, error, pattern", PRUNE)
def test_prune(tiny, fields, error, pattern):
    model, _, stats, _, _ = tiny
    _raises(lambda: prune(model, PruneConfig(**fields), stats), error, pattern)


def test_prune_without_statistics_or_config(tiny):
    model, _, stats, _, _ = tiny
    _raises(lambda: prune(model, PruneConfig(hidden_size=16), None), ValueError, r"stats: pruning \['hidden_size'\] needs ImportanceStats")
    _raises(lambda: prune(model, {"hidden_size": 16}, stats), TypeError, r"config must be a PruneConfig, got dict")


COLLECT = [
    ({"num_samples": 0}, r"num_samples=0: must be >= 1"),
    ({"max_length": 1}, r"max_length=1: must be >= 2"),
    ({"batch_size": 0}, r"batch_size=0: must be >= 1"),
    ({"data": "oov"}, r"data: token ids in \[\d+, \d+\] but the model's embedding has 64 rows \(valid ids: 0..63\)"),
    ({"data": "negative"}, r"data: token ids in \[-\d+, -?\d+\] .*valid ids: 0..63"),
    ({"data": []}, r"data: the calibration set is empty"),
    ({"data": ["some text"]}, r"tokenizer: text calibration data needs a tokenizer"),
]  # fmt: skip


@pytest.mark.parametrize("overrides, pattern", COLLECT)
def test_collect_statistics(tiny, overrides, pattern):
    model, ids, _, _, _ = tiny
    kwargs = dict(data=ids, num_samples=4, max_length=16, batch_size=4, show_progress=False)
    kwargs.update(overrides)
    kwargs["data"] = {"oov": ids + 100, "negative": ids - 100}.get(kwargs["data"], kwargs["data"]) if isinstance(
        kwargs["data"], str) else kwargs["data"]  # fmt: skip
    _raises(lambda: collect_statistics(model, **kwargs), ValueError, pattern)


PRUNE_CHECKPOINT = [
    ("missing", {}, CheckpointError, r"missing' does not exist: no such local folder"),
    ("ckpt", {"max_shard_size": "bogus"}, ValueError, r"max_shard_size='bogus' is not a size"),
    ("ckpt", {"dtype": "float99"}, ValueError, r"dtype='float99' is not a floating-point torch dtype"),
    ("ckpt", {"config": PruneConfig(hidden_size=1)}, ValueError, r"hidden_size=1: a residual stream of 1 channel"),
]  # fmt: skip


@pytest.mark.parametrize("source, kwargs, error, pattern", PRUNE_CHECKPOINT)
def test_prune_checkpoint(tiny, tmp_path, source, kwargs, error, pattern):
    _, _, stats, root, _ = tiny
    config = kwargs.pop("config", PruneConfig(hidden_size=16))
    call = lambda: prune_checkpoint(root / source, tmp_path / "out", config, stats, show_progress=False, **kwargs)  # noqa: E731
    _raises(call, error, pattern)


# ---- elastic: ElasticConfig / make_elastic / slice_variant / slice_checkpoint ----------------------------------
ELASTIC_CONFIG = [
    ({}, r"ElasticConfig.variants must be a non-empty dict"),
    ([1], r"ElasticConfig.variants must be a non-empty dict.*got \[1\]"),
    ({"a": "x"}, r"elastic variant 'a' must map config fields to sizes, got 'x'"),
    ({"a": {"hidden_size": -1}}, r"elastic variant 'a': hidden_size=-1 is out of range; it must be >= 1"),
    ({"a": {"hidden_size": 1.5}}, r"elastic variant 'a': hidden_size must be an integer, got 1.5"),
    ({"full": {"hidden_size": 16}}, r"name 'full' is invalid"),
]  # fmt: skip


@pytest.mark.parametrize("variants, pattern", ELASTIC_CONFIG)
def test_elastic_config(variants, pattern):
    _raises(lambda: ElasticConfig(variants=variants), ValueError, pattern)


def _elastic_calls(tiny, tmp_path):
    model, _, stats, root, elastic = tiny
    small = {"variants": {"a": {"hidden_size": 16}}}
    return {
        "from_dict": (lambda: ElasticConfig.from_dict([1]), ValueError, r"ElasticConfig.from_dict needs a dict, got list"),
        "too_big": (lambda: make_elastic(model, {"variants": {"a": {"hidden_size": 64}}}, stats), ValueError,
                    r"variant 'a': hidden_size=64 is out of range; it must be between 1 and the full model's 32"),
        "layer_method": (lambda: make_elastic(model, small, stats, layer_method="first"), ValueError,
                         r"layer_method='first': valid values are"),
        "hidden_method": (lambda: make_elastic(model, small, stats, hidden_method="x"), ValueError,
                          r"hidden_method='x': valid values are"),
        "expert_method": (lambda: make_elastic(model, small, stats, expert_method="x"), ValueError,
                          r"expert importance 'x': valid values are"),
        "no_stats": (lambda: make_elastic(model, small, None), ValueError, r"statistics: make_elastic orders"),
        "not_elastic": (lambda: slice_variant(model, "small"), ValueError, r"elastic_variant='small': this SlimMoeConfig has no elastic"),
        "unknown_variant": (lambda: slice_variant(elastic, "tiny"), KeyError, r"elastic_variant='tiny' is not a variant.*\['small', 'full'\]"),
        "ckpt_unknown": (lambda: slice_checkpoint(root / "elastic", "tiny", tmp_path / "o", show_progress=False), KeyError,
                         r"elastic_variant='tiny' is not a variant"),
        "ckpt_missing": (lambda: slice_checkpoint(root / "nope", "small", tmp_path / "o", show_progress=False),
                         CheckpointError, r"nope' does not exist: no such local folder"),
        "ckpt_model_type": (lambda: slice_checkpoint(root / "elastic", "small", tmp_path / "o", model_type="llama",
                                                     show_progress=False), ValueError, r"model_type='llama' is not a family"),
        "ckpt_shard": (lambda: slice_checkpoint(root / "elastic", "small", tmp_path / "o", max_shard_size="12XB",
                                                show_progress=False), ValueError, r"max_shard_size='12XB' is not a size"),
    }  # fmt: skip


ELASTIC_CALLS = ["from_dict", "too_big", "layer_method", "hidden_method", "expert_method", "no_stats", "not_elastic",
                 "unknown_variant", "ckpt_unknown", "ckpt_missing", "ckpt_model_type", "ckpt_shard"]  # fmt: skip


@pytest.mark.parametrize("case", ELASTIC_CALLS)
def test_elastic(tiny, tmp_path, case):
    _raises(*_elastic_calls(tiny, tmp_path)[case])


# ---- convert / save_for_hub / open_checkpoint -------------------------------------------------------------------
def _file_calls(tiny, tmp_path):
    model, _, _, root, _ = tiny
    truncated = tmp_path / "truncated"
    shutil.copytree(root / "ckpt", truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    header_only = tmp_path / "header_only"
    shutil.copytree(root / "ckpt", header_only)
    (header_only / "model.safetensors").write_bytes(data[:5])
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    ckpt = root / "ckpt"
    return {
        "missing_abs": (lambda: open_checkpoint(tmp_path / "nope"), CheckpointError,
                        r"nope' does not exist: no such local folder"),
        "missing_rel": (lambda: open_checkpoint("./nope/dir"), CheckpointError, r"'./nope/dir' does not exist"),
        "a_file": (lambda: open_checkpoint(tmp_path / "file.json"), CheckpointError, r"file.json' is a file; give a checkpoint folder"),
        "empty_dir": (lambda: open_checkpoint(tmp_path / "empty"), CheckpointError, r"empty has no config.json"),
        "truncated": (lambda: open_checkpoint(truncated), CheckpointError,
                      r"truncated/model.safetensors is truncated: its header describes \d+ bytes but the file has \d+"),
        "header_only": (lambda: open_checkpoint(header_only), CheckpointError,
                        r"header_only/model.safetensors is truncated or not a safetensors file"),
        "to": (lambda: convert_checkpoint(ckpt, tmp_path / "o", to="llama", show_progress=False), ValueError,
               r"to='llama' is not a family hf_slim converts to; valid values"),
        "num_mtp_heads": (lambda: convert_checkpoint(ckpt, tmp_path / "o", to="qwen3_moe", num_mtp_heads=-1,
                                                     show_progress=False), ValueError, r"num_mtp_heads=-1 must be an int >= 0"),
        "dtype": (lambda: convert_checkpoint(ckpt, tmp_path / "o", to="qwen3_moe", dtype="int7", show_progress=False),
                  ValueError, r"dtype='int7' is not a floating-point torch dtype"),
        "exists": (lambda: convert_checkpoint(ckpt, tmp_path / "full", to="qwen3_moe", show_progress=False),
                   FileExistsError, r"full exists and is not empty; pass overwrite=True"),
        "missing_source": (lambda: convert_checkpoint(tmp_path / "nope", tmp_path / "o", show_progress=False),
                           CheckpointError, r"nope' does not exist: no such local folder"),
        "to_hf": (lambda: to_hf(model, "llama"), ValueError, r"Unsupported model_type 'llama'; hf_slim.convert supports"),
        "from_hf_slim": (lambda: from_hf(model), ValueError, r"Unsupported model_type 'slim_moe'"),
        "to_hf_not_slim": (lambda: to_hf("x", "qwen3_moe"), TypeError, r"model must be a SlimMoeForCausalLM .* got str"),
        "shard_bogus": (lambda: save_for_hub(model, tmp_path / "h", max_shard_size="bogus"), ValueError,
                        r"max_shard_size='bogus' is not a size; give a positive number of bytes"),
        "shard_zero": (lambda: save_for_hub(model, tmp_path / "h", max_shard_size=0), ValueError, r"max_shard_size=0 is not a size"),
        "shard_negative": (lambda: save_for_hub(model, tmp_path / "h", max_shard_size="-5GB"), ValueError,
                           r"max_shard_size='-5GB' is not a size"),
        "hub_model_type": (lambda: save_for_hub(model, tmp_path / "h", model_type="llama"), ValueError,
                           r"Unsupported model_type 'llama'"),
    }  # fmt: skip


FILE_CALLS = ["missing_abs", "missing_rel", "a_file", "empty_dir", "truncated", "header_only", "to", "num_mtp_heads",
              "dtype", "exists", "missing_source", "to_hf", "from_hf_slim", "shard_bogus", "shard_zero", "shard_negative",
              "hub_model_type"]  # fmt: skip


@pytest.mark.parametrize("case", FILE_CALLS)
def test_files_and_conversion(tiny, tmp_path, case):
    _raises(*_file_calls(tiny, tmp_path)[case])


def test_from_hf_mtp_arguments(tiny):
    stock = to_hf(tiny[0], "qwen3_moe")
    _raises(lambda: from_hf(stock, num_mtp_heads=-1), ValueError, r"num_mtp_heads must be an integer >= 0, got -1")
    _raises(lambda: from_hf(stock, num_mtp_heads=1, mtp_init="zeros"), ValueError, r"mtp_init must be 'last_layer' or 'random', got 'zeros'")


# ---- losses: shapes and ranges ---------------------------------------------------------------------------------
H, W, LABELS = torch.randn(2, 5, 8), torch.randn(16, 8), torch.randint(0, 16, (2, 5))
LOSSES = [
    (lambda: L.lm_loss(H, torch.randn(16, 7), LABELS), r"hidden has hidden size 8 .* head_weight expects 7"),
    (lambda: L.lm_loss(H, W, LABELS + 16), r"labels must be token ids in \[0, 16\) or ignore_index=-100, got values in \[\d+, \d+\]"),
    (lambda: L.lm_loss(H, W, LABELS[:, :3]), r"labels \[batch, seq\]; got shapes \(2, 5, 8\) and \(2, 3\)"),
    (lambda: L.lm_loss(H, W, LABELS, chunk_size=0), r"chunk_size must be a positive int .*got 0"),
    (lambda: L.lm_loss(H, W, LABELS, reduction="avg"), r"reduction must be one of \('mean', 'sum'\), got 'avg'"),
    (lambda: L.lm_loss(H, W, LABELS, depth=-1), r"depth must be an int >= 0, got -1"),
    (lambda: L.lm_loss(H, W, LABELS, num_items_in_batch=0), r"num_items_in_batch must be > 0 .*got 0"),
    (lambda: L.lm_loss(H, W, LABELS, head_bias=torch.randn(3)), r"head_bias must have shape \(16,\), got \(3,\)"),
    (lambda: L.chunked_kd_loss(H, W, H, W, temperature=0), r"temperature must be a number > 0, got 0"),
    (lambda: L.chunked_kd_loss(H, W, H, W, divergence="kl"), r"divergence must be one of .*got 'kl'"),
    (lambda: L.chunked_kd_loss(H, W, H, W, divergence="jsd", jsd_beta=1.5), r"jsd_beta must be a number in \[0, 1\].*got 1.5"),
    (lambda: L.chunked_kd_loss(H, W, H, W, teacher_top_k=0), r"teacher_top_k must be None or a positive int, got 0"),
    (lambda: L.chunked_kd_loss(H, W, H, W, teacher_top_k=100), r"teacher_top_k must be <= the vocabulary size 16, got 100"),
    (lambda: L.chunked_kd_loss(H, W, H, torch.randn(17, 8)), r"student_head_weight has 16 rows but teacher_head_weight has 17"),
    (lambda: L.chunked_kd_loss(H, W, H, W, mask=torch.ones(3, 3)), r"mask must have the hidden states' leading shape \(2, 5\), got \(3, 3\)"),
    (lambda: L.chunked_kd_loss(H, W, H[:, :3], W), r"teacher_hidden must have the same leading shape as student_hidden"),
    (lambda: L.mtp_lm_loss(H, W, LABELS, depth=0), r"depth must be an int >= 1 for an MTP head"),
    (lambda: L.slimqwen_objective(torch.tensor(1.0), torch.tensor(1.0), [], [], lam=1.5, beta=0.1), r"lam \(λ, the KD weight\) must be a number in \[0, 1\], got 1.5"),
    (lambda: L.slimqwen_objective(torch.tensor(1.0), torch.tensor(1.0), [], [], lam=0.5, beta=-0.1), r"beta \(β, the MTP weight\) must be a number >= 0, got -0.1"),
    (lambda: L.LossWeightSchedule(lambda_start=2.0), r"lambda_start must be a number in \[0, 1\].*got 2.0"),
    (lambda: L.linear_schedule(0, 1, 1.5), r"progress must be a number in \[0, 1\].*got 1.5"),
]  # fmt: skip


@pytest.mark.parametrize("call, pattern", LOSSES)
def test_losses(call, pattern):
    _raises(call, ValueError, pattern)


# ---- Aurora / AuroraLoRA constructor arguments ------------------------------------------------------------------
AURORA = [
    ({"lr": -1}, r"lr=-1 must be a non-negative number"),
    ({"weight_decay": -1}, r"weight_decay=-1 must be a non-negative number"),
    ({"momentum": 1.0}, r"momentum=1.0 must be in \[0, 1\)"),
    ({"ns_schedule": "bogus"}, r"ns_schedule='bogus' is not a known schedule; valid"),
    ({"ns_steps": 0}, r"ns_steps=0 must be a positive integer"),
    ({"pp_iterations": -1}, r"pp_iterations=-1 must be a non-negative integer"),
    ({"pp_beta": 0}, r"pp_beta=0 must be in \(0, 1\]"),
    ({"scale": "bogus"}, r"scale='bogus' is not supported; valid"),
    ({"ns_dtype": "int8"}, r"ns_dtype='int8' is not supported; valid"),
    ({"eps": -1}, r"eps=-1 and adamw_eps=1e-08 must be positive"),
    ({"adamw_betas": (1.0, 0.9)}, r"adamw_betas=\(1.0, 0.9\) must both be in \[0, 1\)"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, pattern", AURORA)
def test_aurora(kwargs, pattern):
    _raises(lambda: Aurora([nn.Parameter(torch.zeros(4, 4))], **kwargs), ValueError, pattern)


def test_aurora_empty_preset_and_lora():
    p = [nn.Parameter(torch.zeros(4, 4))]
    _raises(lambda: Aurora([]), ValueError, r"params is empty: Aurora needs at least one parameter")
    _raises(lambda: Aurora.from_preset(p, "bogus"), ValueError, r"preset='bogus' is not known; valid")
    _raises(lambda: AuroraLoRA(p, lora_damping=-1.0), ValueError, r"lora_damping")
    _raises(lambda: Aurora(p, nesterov="no"), TypeError, r"nesterov='no' must be True or False")
