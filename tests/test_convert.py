import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Glm4MoeConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

import hf_slim  # noqa: F401  (registers slim_moe)
from hf_slim.convert import SUPPORTED_MODEL_TYPES, from_hf, to_hf
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM


COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)

# One tiny random config per family, exercising the feature that family adds.
CASES = {
    "qwen3_moe": Qwen3MoeConfig(
        **COMMON, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[1], attention_bias=True,
    ),
    "qwen2_moe": Qwen2MoeConfig(
        **COMMON, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, intermediate_size=40,
        shared_expert_intermediate_size=24, decoder_sparse_step=1, norm_topk_prob=False,
    ),
    "olmoe": OlmoeConfig(
        **COMMON, num_experts=5, num_experts_per_tok=2, intermediate_size=16, clip_qkv=3.0, pad_token_id=1,
    ),
    "mixtral": MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, intermediate_size=24),
    "glm4_moe": Glm4MoeConfig(
        **COMMON, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, intermediate_size=40,
        n_shared_experts=2, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.5,
        attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=0,
    ),
}


def _stock(model_type):
    model = AutoModelForCausalLM.from_config(CASES[model_type]).float().eval()
    with torch.no_grad():  # stock init leaves some params at exact zero/one; randomise so parity means something
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif param.dim() == 1:
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_round_trip_logits_match_stock(model_type):
    stock = _stock(model_type)
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        expected = stock(ids, attention_mask=mask).logits
        slim = from_hf(stock, num_mtp_heads=1)
        assert isinstance(slim, SlimMoeForCausalLM) and slim.config.num_mtp_heads == 1
        torch.testing.assert_close(slim(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
        back = to_hf(slim, model_type)
        assert type(back) is type(stock)
        torch.testing.assert_close(back(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, atol=0, rtol=0)


def test_mtp_heads_start_from_last_sparse_layer():
    slim = from_hf(_stock("qwen3_moe"), num_mtp_heads=2)
    last = slim.model.layers[2].state_dict()  # layer 1 is dense, layer 2 the last sparse one
    for layer in slim.mtp.layers:
        for key, value in layer.state_dict().items():
            if key.split(".")[0] in ("enorm", "hnorm", "eh_proj", "post_norm"):  # the depth's own parts: new weights
                assert key not in last
            else:
                assert torch.equal(value, last[key]), key
        assert set(last) < set(layer.state_dict())


def test_unknown_model_type_lists_supported():
    slim = SlimMoeForCausalLM(SlimMoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8))
    with pytest.raises(ValueError, match="olmoe.*qwen2_moe.*qwen3_moe"):
        to_hf(slim, "llama")


@pytest.mark.parametrize(
    "model_type, field",
    [
        ("qwen3_moe", "shared_expert_intermediate_size"),
        ("mixtral", "qk_norm"),
        ("olmoe", "qk_norm"),
        ("qwen2_moe", "shared_expert_intermediate_size"),
    ],
)
def test_unexpressible_feature_names_the_field(model_type, field):
    shared = 8 if model_type == "qwen3_moe" else 0
    config = SlimMoeConfig(
        **COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=shared,
        qk_norm=None if model_type == "qwen2_moe" else "head",
    )
    with pytest.raises(ValueError, match=field):
        to_hf(SlimMoeForCausalLM(config), model_type)


def test_per_layer_expert_widths_cannot_go_to_a_stock_family():
    config = SlimMoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=[8, 16, 8])
    with pytest.raises(ValueError, match="moe_intermediate_size is a per-layer list"):
        to_hf(SlimMoeForCausalLM(config), "qwen3_moe")


def test_convertible_families_come_from_the_anatomy_registry():
    from hf_slim.anatomy import get_spec, supported_model_types

    expected = {mt for mt in supported_model_types() if get_spec(mt).to_slim_moe is not None}
    assert set(SUPPORTED_MODEL_TYPES) == expected
    assert {"qwen3_moe", "qwen2_moe", "olmoe", "mixtral"} <= expected
