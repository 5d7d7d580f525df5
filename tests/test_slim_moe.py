import json

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_slim
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM, SlimMoeModel


def tiny_config(**overrides) -> SlimMoeConfig:
    fields = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, mlp_layer_types=["sparse", "dense", "sparse"], num_mtp_heads=2,
    )
    fields.update(overrides)
    return SlimMoeConfig(**fields)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts_per_tok=8), "num_experts_per_tok"),
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_mtp_heads=-1), "num_mtp_heads"),
        (dict(mlp_layer_types=["sparse", "moe", "sparse"]), "mlp_layer_types"),
        (dict(mlp_layer_types=["sparse"]), "mlp_layer_types"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(layer_types=["sliding_attention"] * 3), "sliding_window"),
        (dict(elastic=[1, 2]), "elastic"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    # Value errors are ours (ValueError); type errors come from transformers' strict dataclass validation.
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match=field):
        tiny_config(**overrides)


def test_auto_classes_and_config_round_trip(tmp_path):
    elastic = {"variants": {"small": {"num_experts": 4, "hidden_size": 16}}}
    config = tiny_config(elastic=elastic)
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["elastic"] == elastic
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SlimMoeConfig) and loaded.elastic == elastic
    assert loaded.mlp_layer_types == ["sparse", "dense", "sparse"]
    assert isinstance(AutoModel.from_config(config), SlimMoeModel)
    assert isinstance(AutoModelForCausalLM.from_config(config), SlimMoeForCausalLM)


def test_save_load_round_trip_is_exact(tmp_path):
    model = SlimMoeForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 9))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        a, b = model(ids, labels=ids), loaded(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=1e-6)
    for x, y in zip(a.mtp_logits, b.mtp_logits):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def test_mismatched_checkpoint_names_tensor_and_shapes(tmp_path):
    SlimMoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["moe_intermediate_size"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts\.(gate_up|down)_proj.*shape \[6, .*builds \[6, "):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_forward_outputs_and_loss_terms_against_naive_reference():
    model = SlimMoeForCausalLM(tiny_config(router_aux_loss_coef=0.01)).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        out = model(ids, labels=ids, output_router_logits=True)
    assert out.logits.shape == (2, 10, 128)
    assert [h.shape for h in out.mtp_hidden_states] == [(2, 9, 32), (2, 8, 32)]
    # Main loss: token i predicts i+1. MTP depth k at position i predicts token i+k+1.
    naive_lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, naive_lm)
    naive_mtp = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        usable = logits[:, : 10 - k - 1]
        naive_mtp.append(F.cross_entropy(usable.reshape(-1, 128), ids[:, k + 1 :].reshape(-1)))
        torch.testing.assert_close(out.mtp_losses[k - 1], naive_mtp[-1])
    expected = naive_lm + 0.3 * torch.stack(naive_mtp).mean() + 0.01 * out.aux_loss
    torch.testing.assert_close(out.loss, expected)
    assert len(out.router_logits) == 2  # two sparse layers, the dense one has no router


def test_mtp_depth_one_uses_next_token_embedding():
    # Changing token j changes MTP depth-1 outputs only at positions >= j-1 (it enters as emb(t_{i+1})).
    model = SlimMoeForCausalLM(tiny_config(num_mtp_heads=1)).eval()
    ids = torch.randint(0, 128, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 128
    with torch.no_grad():
        a = model(ids, return_mtp=True).mtp_hidden_states[0]
        b = model(changed, return_mtp=True).mtp_hidden_states[0]
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5], b[:, 5])


def test_no_mtp_work_without_labels():
    model = SlimMoeForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 128, (1, 6)))
    assert out.mtp_hidden_states is None and out.loss is None


def test_greedy_generation_with_cache_equals_without_cache():
    model = SlimMoeForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 128, (2, 5))
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    torch.testing.assert_close(with_cache, without, atol=0, rtol=0)


def test_left_padding_matches_unpadded_row():
    model = SlimMoeForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, 128, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids).logits
        batched = model(padded, attention_mask=mask, position_ids=position_ids).logits[:, 3:]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_experts_kernels_match_eager(implementation):
    model = SlimMoeForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 9))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        reference = model(ids).logits
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config()
    ids = torch.randint(0, 128, (2, 8))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SlimMoeForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.layers[0].gradient_checkpointing and model.mtp.layers[0].gradient_checkpointing
        model(ids, labels=ids, output_router_logits=True).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("mtp.") for k in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_mtp_loss_decreases_on_repeated_batch():
    model = SlimMoeForCausalLM(tiny_config(num_mtp_heads=2)).train()
    ids = torch.randint(0, 128, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        out = model(ids, labels=ids)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        first = first or [loss.item() for loss in out.mtp_losses]
    last = [loss.item() for loss in out.mtp_losses]
    assert all(after < 0.5 * before for before, after in zip(first, last)), (first, last)


def test_bf16_forward_backward():
    model = SlimMoeForCausalLM(tiny_config()).to(torch.bfloat16).train()
    ids = torch.randint(0, 128, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad.dtype == torch.bfloat16


def test_top_level_exports():
    assert hf_slim.SlimMoeForCausalLM is SlimMoeForCausalLM


@pytest.mark.parametrize("width, expected", [(6, "batched_mm"), (16, "grouped_mm")])
def test_default_experts_kernel_handles_unaligned_widths(width, expected):
    # grouped_mm needs 16-byte row strides; a pruned width like 6 falls back to batched_mm instead of failing.
    model = SlimMoeForCausalLM(tiny_config(moe_intermediate_size=width)).eval()
    assert model.config._experts_implementation == expected
    model.set_experts_implementation("eager")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        reference = model(ids).logits
        model.set_experts_implementation(expected)
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_config_accepts_an_elastic_config_object_and_stores_its_dict(tmp_path):
    # Defect 4: strict validation refused `elastic=ElasticConfig(...)`; it is now stored as `ElasticConfig.to_dict()`.
    from hf_slim.elastic import ElasticConfig

    elastic = ElasticConfig(variants={"small": {"num_experts": 4, "hidden_size": 16}})
    config = tiny_config(elastic=elastic)
    assert config.elastic == elastic.to_dict() == {"variants": {"small": {"num_experts": 4, "hidden_size": 16}}}
    assert type(config.elastic) is dict
    assert config.elastic_variant_names() == ["small", "full"]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["elastic"] == elastic.to_dict()
    loaded = SlimMoeConfig.from_pretrained(tmp_path)
    assert loaded.elastic == elastic.to_dict() and loaded.to_dict() == config.to_dict()
    loaded.elastic = ElasticConfig(variants={"tiny": {"num_experts": 2}})  # assignment converts as well
    assert loaded.elastic == {"variants": {"tiny": {"num_experts": 2}}}
    for bad in ("small", 3, [elastic]):
        with pytest.raises(StrictDataclassFieldValidationError, match="elastic"):
            tiny_config(elastic=bad)
    # An object with a to_dict() that is not elastic variants is still refused, naming the field.
    with pytest.raises(ValueError, match="elastic"):
        tiny_config(elastic=tiny_config())


def test_trainer_predict_gathers_logits_not_the_cache(tmp_path):
    # Trainer.prediction_step drops config.keys_to_ignore_at_inference from the outputs it gathers; since 5.24 the
    # KV cache is `cache` (ignoring "past_key_values" handed Trainer a Cache as a "logit"), and the per-term and MTP
    # outputs are left out so predictions are the logits, as with a stock model.
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = SlimMoeForCausalLM(tiny_config()).eval()
    assert model.config.use_cache and model.config.num_mtp_heads == 2
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to=[], use_cpu=True)
    prediction = Trainer(model=model, args=args).predict(data)
    assert prediction.predictions.shape == (4, 6, 128)
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), expected, atol=1e-5, rtol=1e-5)


def test_family_logs_follow_transformers_verbosity():
    from transformers.utils import logging as hf_logging

    from hf_slim.models.slim_moe import generation_slim_moe, loading_slim_moe

    before = hf_logging.get_verbosity()
    try:
        for module in (generation_slim_moe, loading_slim_moe):
            hf_logging.set_verbosity_info()
            assert module.logger.getEffectiveLevel() == hf_logging.INFO
            hf_logging.set_verbosity_error()
            assert module.logger.getEffectiveLevel() == hf_logging.ERROR
    finally:
        hf_logging.set_verbosity(before)
