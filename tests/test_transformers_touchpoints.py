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
