"""Every transformers internal hf-slim touches (hf_slim/integrations) still has the shape relied on.

One block per concern. When a transformers release moves or reshapes one of these, a test here fails naming it
(run the suite against the newest release with `make test-latest`) before users meet a confusing error.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_slim.integrations.transformers_experts as experts_touch
import hf_slim.integrations.transformers_optim as optim_touch
from hf_slim.integrations import TransformersCompatError, transformers_version
from hf_slim.optim import AuroraFactory, register_aurora_with_transformers


sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import FAMILIES, tiny_model  # noqa: E402


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, **kw)


# ---- optimizer names: hf_slim/integrations/transformers_optim.py ------------------------------------------------


@pytest.mark.parametrize("dotted", sorted(optim_touch.TOUCH_POINTS))
def test_optim_touch_point_exists(dotted):
    assert _resolve(dotted) is not None, dotted


def test_optimizer_names_is_a_str_enum_that_validates_optim(tmp_path):
    assert issubclass(OptimizerNames, enum.Enum) and issubclass(OptimizerNames, str)
    # the enum internals a member is added through (what `enum` itself uses)
    if sys.version_info >= (3, 13):
        assert callable(OptimizerNames._add_member_)
    else:
        assert isinstance(OptimizerNames._member_map_, dict) and isinstance(OptimizerNames._member_names_, list)
    assert isinstance(OptimizerNames._value2member_map_, dict)
    # TrainingArguments and set_optimizer convert through the enum (so an added member is accepted) ...
    assert _args(tmp_path, optim="sgd").optim is OptimizerNames.SGD
    assert _args(tmp_path).set_optimizer(name="aurora").optim is OptimizerNames.AURORA
    # ... and reject what is not a member
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        _args(tmp_path, optim="aurora2")


def test_argument_parser_choices_come_from_the_enum():
    (action,) = [a for a in HfArgumentParser(TrainingArguments)._actions if a.dest == "optim"]
    assert list(action.choices) == [x.value for x in OptimizerNames]
    assert {"aurora", "aurora_lora"} <= set(action.choices)


def test_handler_table_is_consulted_with_a_context(tmp_path, monkeypatch):
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS, OptimizerContext

    assert isinstance(_OPTIMIZER_HANDLERS, dict) and callable(_OPTIMIZER_HANDLERS[OptimizerNames.SGD])
    fields = {f.name for f in dataclasses.fields(OptimizerContext)}
    assert {"args", "optim_args"} <= fields
    seen = []

    def probe(ctx):
        seen.append(ctx)
        return torch.optim.SGD, {"lr": 1.0}

    monkeypatch.setitem(_OPTIMIZER_HANDLERS, OptimizerNames.AURORA, probe)
    args = _args(tmp_path, optim="aurora", optim_args="pp_iterations=2, scale=spectral")
    assert Trainer.get_optimizer_cls_and_kwargs(args) == (torch.optim.SGD, {"lr": 1.0})
    (ctx,) = seen
    assert ctx.args is args and ctx.optim_args == {"pp_iterations": "2", "scale": "spectral"}


def test_registered_handler_returns_our_factory(tmp_path):
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    assert register_aurora_with_transformers()
    handler = _OPTIMIZER_HANDLERS[OptimizerNames.AURORA]
    assert handler.__module__ == optim_touch.__name__
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(_args(tmp_path, optim="aurora", optim_args="pp_iterations=1"))
    assert cls is AuroraFactory and kwargs["pp_iterations"] == 1


def test_factory_protocol(tmp_path):
    from transformers.trainer_optimizer import is_optimizer_factory

    assert is_optimizer_factory(AuroraFactory) and not is_optimizer_factory(torch.optim.SGD)
    calls = []

    class ProbeFactory:
        def __call__(self, model, **kwargs):
            calls.append((model, kwargs))
            return torch.optim.SGD(model.parameters(), **kwargs)

    model = torch.nn.Linear(4, 4)
    trainer = Trainer(model=model, args=_args(tmp_path), optimizer_cls_and_kwargs=(ProbeFactory, {"lr": 0.5}))
    optimizer = trainer.create_optimizer()
    assert calls == [(model, {"lr": 0.5})] and isinstance(optimizer, torch.optim.SGD)


def test_registration_waits_for_the_training_modules_in_a_fresh_process():
    """`import hf_slim` must not import transformers' training stack, yet `optim="aurora"` must work once it loads."""
    code = textwrap.dedent(
        """
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        import hf_slim
        assert "transformers.training_args" not in sys.modules and "transformers.trainer_optimizer" not in sys.modules
        from transformers import HfArgumentParser, Trainer, TrainingArguments
        args = TrainingArguments("unused", optim="aurora", report_to=[])
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "unused", "--optim", "aurora_lora", "--report_to", "none"]
        )
        print(Trainer.get_optimizer_cls_and_kwargs(args)[0].__name__, parsed.optim.value)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AuroraFactory", "aurora_lora"]
    assert "not registered" not in out.stderr, out.stderr


def test_a_missing_internal_names_itself_and_the_version(monkeypatch, caplog):
    from transformers import trainer_optimizer

    monkeypatch.setattr(optim_touch, "_warned", set())
    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(TransformersCompatError, match=r"transformers \S+ .*\._OPTIMIZER_HANDLERS") as e:
        register_aurora_with_transformers()
    assert isinstance(e.value, RuntimeError) and transformers_version() in str(e.value)
    assert "optimizer_cls_and_kwargs" in str(e.value)  # says what to do instead
    # The import-time route never raises (it may run inside transformers' own import): it warns once.
    with caplog.at_level(logging.WARNING, logger=optim_touch.__name__):
        optim_touch._after_load("transformers.trainer_optimizer")
        optim_touch._after_load("transformers.trainer_optimizer")
    (record,) = caplog.records
    assert "_OPTIMIZER_HANDLERS" in record.getMessage() and "not registered" in record.getMessage()


def test_a_changed_handler_context_names_itself():
    handler = optim_touch._adapt(lambda args, optim_args: (AuroraFactory, {}))
    with pytest.raises(TransformersCompatError, match="OptimizerContext"):
        handler(types.SimpleNamespace(args=None))


def test_a_name_transformers_defines_keeps_its_handler(monkeypatch, caplog):
    from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

    monkeypatch.setattr(optim_touch, "_warned", set())
    original = _OPTIMIZER_HANDLERS[OptimizerNames.SGD]
    n_members = len(OptimizerNames)
    with caplog.at_level(logging.WARNING, logger=optim_touch.__name__):
        optim_touch.register_optimizers({"sgd": lambda args, optim_args: (AuroraFactory, {})})
    assert _OPTIMIZER_HANDLERS[OptimizerNames.SGD] is original and len(OptimizerNames) == n_members
    assert "already defines optim='sgd'" in caplog.text


# ---- experts kernels: hf_slim/integrations/transformers_experts.py ----------------------------------------------


def _experts(model):
    return next(m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), torch.nn.Parameter))


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_layout_and_dispatch(family):
    model = tiny_model(family)
    experts = _experts(model)
    # the layout the calibration forward (and its grouped GEMM) assumes
    assert (experts.has_gate, experts.is_concatenated) == (True, True)
    assert (experts.has_bias, experts.is_transposed, experts.has_post_expert_norm) == (False, False, False)
    E, two_i, H = experts.gate_up_proj.shape
    assert experts.down_proj.shape == (E, H, two_i // 2)
    params = list(inspect.signature(type(experts).forward).parameters)
    assert params == ["self", "hidden_states", "top_k_index", "top_k_weights"]
    # the private config field we read is the one the public setter writes, and grouped_mm is the default
    assert experts_touch.experts_implementation(experts) == "grouped_mm"
    assert experts_touch.grouped_linear_kernel(experts) is experts_touch.grouped_linear
    model.set_experts_implementation("eager")
    assert experts_touch.experts_implementation(experts) == "eager"
    assert experts_touch.grouped_linear_kernel(experts) is None


def test_experts_touch_points_exist():
    from transformers import PreTrainedConfig

    assert isinstance(inspect.getattr_static(PreTrainedConfig, "_experts_implementation"), property)
    for dotted in sorted(experts_touch.TOUCH_POINTS):
        if not dotted.startswith("transformers.PreTrainedConfig."):
            assert callable(_resolve(dotted)), dotted


def test_grouped_linear_is_a_per_expert_linear():
    assert hasattr(F, "grouped_mm")  # public since torch 2.10
    x, w = torch.randn(37, 16), torch.randn(4, 10, 16)
    counts = [5, 0, 20, 12]  # an empty group too
    out = experts_touch.grouped_linear(x, w, torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32))
    ref = torch.cat([F.linear(rows, w[e]) for e, rows in enumerate(x.split(counts))])
    torch.testing.assert_close(out, ref)


def test_grouped_linear_reproduces_transformers_grouped_mm_experts():
    from transformers.integrations import grouped_mm_experts_forward

    experts = _experts(tiny_model("qwen3_moe"))
    E = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, experts.gate_up_proj.shape[-1], generator=g)
    top_k_index = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(24)])
    top_k_weights = torch.rand(24, 2, generator=g)
    with torch.no_grad():
        ref = grouped_mm_experts_forward(experts, hidden, top_k_index, top_k_weights)
        flat = top_k_index.flatten()
        order = torch.argsort(flat, stable=True)
        offsets = torch.cumsum(torch.bincount(flat, minlength=E), 0, dtype=torch.int32)
        gate, up = experts_touch.grouped_linear(hidden[order // 2], experts.gate_up_proj, offsets).chunk(2, dim=-1)
        y = experts_touch.grouped_linear(experts.act_fn(gate) * up, experts.down_proj, offsets)
        out = torch.zeros_like(hidden).index_add_(0, order // 2, y * top_k_weights.flatten()[order, None])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ---- assisted generation with a nested draft: hf_slim/models/slim_moe/generation_slim_moe.py -----------------------
# The family file cannot import hf_slim.integrations (it ships as remote code), so its touch points are listed at its
# top and checked here against stock models: what assisted generation reads from an assistant, the cache call it
# makes for an assistant's cache, and when it calls the stopping criteria.


def _stock_pair():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    )
    return Qwen3ForCausalLM(config).eval(), Qwen3ForCausalLM(config).eval()


class _RecordingAssistant:
    """Forwards every attribute to a stock assistant and records the names read and each `generate` call."""

    def __init__(self, model):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "read", set())
        object.__setattr__(self, "calls", [])

    def __getattr__(self, name):
        self.read.add(name)
        value = getattr(self._model, name)
        if name != "generate":
            return value

        def generate(*args, **kwargs):
            out = value(*args, **kwargs)
            self.calls.append((args, kwargs, out))
            return out

        return generate


@pytest.mark.parametrize("do_sample", [False, True])
def test_assisted_generation_reads_only_what_the_nested_draft_provides(do_sample):
    from hf_slim.models.slim_moe.generation_slim_moe import SlimMoeElasticDraft

    target, stock = _stock_pair()
    stock.generation_config.num_assistant_tokens = 3
    stock.generation_config.assistant_confidence_threshold = 0.0
    assistant = _RecordingAssistant(stock)
    ids = torch.randint(1, 64, (1, 5))
    target.generate(ids, do_sample=do_sample, max_new_tokens=12, assistant_model=assistant)
    provided = {name for name in vars(SlimMoeElasticDraft) if not name.startswith("__")} | {"config", "generation_config"}
    assert assistant.read <= provided, assistant.read - provided
    assert {"device", "generation_config", "config", "_supports_logits_to_keep", "generate"} <= assistant.read
    assert len(assistant.calls) >= 2
    for i, (args, kwargs, out) in enumerate(assistant.calls):
        assert not args and isinstance(kwargs["input_ids"], torch.Tensor)
        assert kwargs["generation_config"].is_assistant and kwargs["generation_config"].return_dict_in_generate
        # the first round brings no cache (the assistant makes its own), later rounds bring the one it returned
        assert (kwargs.get("cache") is None) == (i == 0)
        if i:
            assert kwargs["cache"] is assistant.calls[i - 1][2].cache
        assert out.sequences.shape[1] == kwargs["input_ids"].shape[1] + len(out.scores)


def test_generate_records_the_past_of_an_assistant_cache():
    """`generate` calls `activate_past_recording()` on a cache it builds for an assistant; the nested draft builds its
    variant-shaped cache itself, so it makes the same call (without it, cropping a full sliding window fails)."""
    from transformers import DynamicCache

    target, stock = _stock_pair()
    calls = []
    original = DynamicCache.activate_past_recording

    def recording(self):
        calls.append(self)
        return original(self)

    DynamicCache.activate_past_recording = recording
    try:
        target.generate(torch.randint(1, 64, (1, 6)), do_sample=False, max_new_tokens=10, assistant_model=stock)
    finally:
        DynamicCache.activate_past_recording = original
    assert len({id(cache) for cache in calls}) == 2  # the target's cache, and the assistant's


def test_stopping_criteria_run_once_per_verification_step():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Lengths(StoppingCriteria):
        def __init__(self):
            self.lengths = []

        def __call__(self, input_ids, scores, **kwargs):
            self.lengths.append(input_ids.shape[-1])
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    target, stock = _stock_pair()
    stock.generation_config.assistant_confidence_threshold = 0.0
    forwards = []
    handle = target.register_forward_hook(lambda module, args, out: forwards.append(out.logits.shape[1]))
    lengths = Lengths()
    try:
        out = target.generate(
            torch.randint(1, 64, (1, 5)), do_sample=False, max_new_tokens=12, assistant_model=stock,
            stopping_criteria=StoppingCriteriaList([lengths]),
        )
    finally:
        handle.remove()
    assert len(lengths.lengths) == len(forwards) and lengths.lengths[-1] == out.shape[1]
    assert all(a < b for a, b in zip([5, *lengths.lengths], lengths.lengths))


# ---- MTP speculative decoding: hf_slim/models/slim_moe/mtp_slim_moe.py ---------------------------------------------
# The family file cannot import hf_slim.integrations (it ships as remote code), so its touch points are listed at its
# top and checked here: MTPCandidateGenerator's attributes and hooks, MtpModel's layer contract and head, the private
# _get_candidate_generator it overrides, the MTP config protocol, and that stock MtpModel loads the SlimMoe layout.


def _self_attributes(function) -> set[str]:
    import re

    return set(re.findall(r"self\.(\w+)\s*=(?!=)", inspect.getsource(function)))


def test_mtp_candidate_generator_sets_what_get_candidates_reads():
    import re

    from transformers.generation.candidate_generator import CandidateGenerator, MTPCandidateGenerator

    from hf_slim.models.slim_moe.mtp_slim_moe import SlimMoeMTPCandidateGenerator

    stock_init = _self_attributes(MTPCandidateGenerator.__init__)
    assert stock_init <= _self_attributes(SlimMoeMTPCandidateGenerator.__init__), stock_init
    read = set(re.findall(r"self\.(\w+)", inspect.getsource(MTPCandidateGenerator.get_candidates)))
    assert read <= stock_init | _self_attributes(MTPCandidateGenerator.get_candidates), read
    params = list(inspect.signature(MTPCandidateGenerator.get_candidates).parameters)
    assert params == ["self", "input_ids", "model_kwargs", "model_outputs", "is_first_iteration", "n_last_matches",
                      "kwargs"]
    assert "**kwargs" in inspect.getsource(MTPCandidateGenerator.get_candidates).split("self.mtp_model(")[1]
    assert list(inspect.signature(CandidateGenerator.update_candidate_strategy).parameters) == [
        "self", "input_ids", "scores", "num_matches"
    ]


def test_assisted_decoding_routes_use_mtp_through_get_candidate_generator():
    from transformers.generation import GenerationMixin

    from hf_slim.models.slim_moe.mtp_slim_moe import SlimMoeMtpGenerationMixin

    ours = inspect.signature(SlimMoeMtpGenerationMixin._get_candidate_generator).parameters
    assert list(inspect.signature(GenerationMixin._get_candidate_generator).parameters) == list(ours)
    source = inspect.getsource(GenerationMixin._get_candidate_generator)
    # transformers' order, which the override keeps: early exit, prompt lookup, then MTP
    order = [source.index(key) for key in ("assistant_early_exit", "prompt_lookup_num_tokens", "use_mtp")]
    assert order == sorted(order)
    decoding = inspect.getsource(GenerationMixin._assisted_decoding)
    assert "self._get_candidate_generator(" in decoding
    assert "candidate_generator.update_candidate_strategy(input_ids, new_logits, n_matches)" in decoding
    assert "model_inputs |= candidate_generator.model_kwargs_overrides" in decoding


def test_mtp_model_layer_contract_and_head():
    from transformers.modeling_layers import MtpLayer, MtpModel

    from hf_slim.models.slim_moe.mtp_slim_moe import SlimMoeMtpLayerMixin

    stock = list(inspect.signature(MtpLayer.forward).parameters)
    ours = list(inspect.signature(SlimMoeMtpLayerMixin.forward).parameters)
    assert stock[:-1] == ours[: len(stock) - 1] and stock[-1] == ours[-1] == "kwargs"
    forward_layer = inspect.getsource(MtpModel.forward_layer)
    call = forward_layer.split("self.layers[layer_idx](")
    assert len(call) == 2 and "**kwargs" in call[1]
    assert "self.shared_head(" in inspect.getsource(MtpModel._project_to_logits)
    assert "range(len(self.layers))" in inspect.getsource(MtpModel.forward)


def test_mtp_config_protocol_and_weight_discovery():
    from transformers.cache_utils import MtpCache
    from transformers.modeling_layers import MtpModel

    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM

    config = SlimMoeConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=[8, 12, 10], intermediate_size=24,
        mlp_layer_types=["sparse", "dense", "sparse"], num_mtp_heads=2,
    )
    assert config.num_mtp_layers == config.get_text_config().num_mtp_layers == 2
    mtp = config.get_mtp_config()
    assert (mtp.num_hidden_layers, mtp.layer_types, mtp.mlp_layer_types) == (2, ["full_attention"] * 2, ["sparse"] * 2)
    assert mtp.moe_intermediate_size == 10 and config.num_hidden_layers == 3  # the widest sparse layer; a copy
    assert len(MtpCache(config=mtp).layers) == 2
    model = SlimMoeForCausalLM(config)
    regex = MtpModel.get_mtp_weights_regex(model)
    assert all(regex.search(name) for name in model.state_dict() if name.startswith("mtp."))
    assert not any(regex.search(name) for name in model.state_dict() if not name.startswith("mtp."))


def test_stock_mtp_model_loads_the_slim_moe_layout_and_drafts_the_same(tmp_path):
    """transformers' own `MtpModel.from_pretrained` (what its `MTPCandidateGenerator` uses) finds and loads a saved
    SlimMoe's MTP tensors into stock `MtpLayer`s, and drafts what SlimMoe's drafter (its own modules) drafts."""
    from transformers.cache_utils import MtpCache
    from transformers.modeling_layers import MtpLayer, MtpModel

    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
    from hf_slim.models.slim_moe.mtp_slim_moe import mtp_drafter

    config = SlimMoeConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=[8, 12, 10], intermediate_size=24,
        mlp_layer_types=["sparse", "dense", "sparse"], shared_expert_intermediate_size=8, num_mtp_heads=2,
    )
    SlimMoeForCausalLM(config).save_pretrained(tmp_path)
    model = SlimMoeForCausalLM.from_pretrained(tmp_path).eval()
    stock = MtpModel.from_pretrained(model)  # raises if any MTP weight were missing
    assert isinstance(stock.layers[1], MtpLayer) and len(stock.layers) == 2
    ids = torch.randint(0, 32, (1, 9))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1]
        positions = torch.arange(1, 9)[None]
        drafts = [
            drafter(ids[:, 1:], hidden[:, :-1], None, positions, MtpCache(config=config.get_mtp_config()))
            for drafter in (stock, mtp_drafter(model))
        ]
    assert torch.equal(drafts[0][0], drafts[1][0])
    torch.testing.assert_close(drafts[0][1], drafts[1][1], atol=1e-6, rtol=1e-6)
