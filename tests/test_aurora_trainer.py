"""optim="aurora" / "aurora_lora" through transformers.Trainer, HfArgumentParser, TRL, and DDP (gloo)."""

import json
from pathlib import Path

import pytest
import torch
from _launch import launch_two_processes
from datasets import Dataset
from transformers import (
    HfArgumentParser,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.training_args import OptimizerNames

from hf_slim.optim import Aurora, AuroraFactory, register_aurora_with_transformers

VOCAB = 128


def tiny_moe(seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return Qwen3MoeForCausalLM(cfg)


def learnable_dataset(n: int = 64, length: int = 16, seed: int = 0) -> Dataset:
    # Each next token is a fixed function of the current one, so the loss can fall quickly.
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=g)
    rows = [start]
    for _ in range(length - 1):
        rows.append((rows[-1] * 5 + 3) % (VOCAB - 1) + 1)
    ids = torch.cat(rows, dim=1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=25,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_registration_enum_parser_and_other_names(tmp_path):
    n_members = len(OptimizerNames)
    assert register_aurora_with_transformers() and register_aurora_with_transformers()
    assert len(OptimizerNames) == n_members  # idempotent
    assert OptimizerNames("aurora") is OptimizerNames.AURORA
    args = TrainingArguments(str(tmp_path), optim="aurora", optim_args="pp_iterations=2,pp_beta=0.5", report_to=[])
    assert args.optim == "aurora"
    assert json.loads(args.to_json_string())["optim"] == "aurora"
    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--optim", "aurora_lora", "--report_to", "none"]
    )
    assert parsed.optim == OptimizerNames.AURORA_LORA
    # Other names keep working, and an unknown one is still rejected.
    assert TrainingArguments(str(tmp_path), optim="sgd", report_to=[]).optim == OptimizerNames.SGD
    assert TrainingArguments(str(tmp_path), report_to=[]).set_optimizer(name="aurora").optim == "aurora"
    with pytest.raises(ValueError, match="not a valid OptimizerNames"):
        TrainingArguments(str(tmp_path), optim="aurora2", report_to=[])
    sgd_cls, _ = Trainer.get_optimizer_cls_and_kwargs(TrainingArguments(str(tmp_path), optim="sgd", report_to=[]))
    assert sgd_cls is torch.optim.SGD


def test_trl_parser_accepts_optim_aurora(tmp_path):
    from trl import SFTConfig, TrlParser

    (cfg,) = TrlParser((SFTConfig,)).parse_args_and_config(
        ["--output_dir", str(tmp_path), "--optim", "aurora", "--optim_args", "preset=reference", "--report_to", "none", "--bf16", "false", "--use_cpu"]
    )
    assert cfg.optim == "aurora"
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(cfg)
    assert cls is AuroraFactory and kwargs["ns_schedule"] == "tilde_quintic12" and kwargs["pp_iterations"] == 2
    assert kwargs["lr"] == cfg.learning_rate  # the Trainer owns the learning rate, not the preset


@pytest.mark.parametrize(
    "optim_args, match",
    [
        ("pp_iterations=2,foo=1", r"\['foo'\].*valid keys: \[.*'pp_beta'"),
        ("preset=turbo", "preset='turbo'.*valid"),
        ("nesterov=maybe", "nesterov"),
        ("momentum=1.5", "momentum"),
    ],
)
def test_bad_optim_args_name_the_key(tmp_path, optim_args, match):
    args = TrainingArguments(str(tmp_path), optim="aurora", optim_args=optim_args, report_to=[])
    with pytest.raises(ValueError, match=match):
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        cls()(tiny_moe(), **kwargs)


def test_trainer_optim_aurora_reduces_loss(tmp_path):
    model = tiny_moe()
    trainer = Trainer(model=model, args=_args(tmp_path, optim="aurora", optim_args="router=adamw"), train_dataset=learnable_dataset())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer, Aurora)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    aurora_names = [n for g in opt.param_groups if g["use_aurora"] for n in g["param_names"]]
    assert any(n.endswith("experts.gate_up_proj") for n in aurora_names)
    assert not any("embed_tokens" in n or "lm_head" in n or n.endswith("mlp.gate.weight") for n in aurora_names)


def test_trainer_optimizer_cls_and_kwargs(tmp_path):
    model = tiny_moe()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=3),
        train_dataset=learnable_dataset(),
        optimizer_cls_and_kwargs=(AuroraFactory, {"lr": 0.02, "adamw_lr": 3e-3, "pp_iterations": 2}),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Aurora) and opt.param_groups[0]["pp_iterations"] == 2
    assert any("row_scale" in s for s in opt.state.values())


def test_trl_sft_trainer_optim_aurora(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    ds = learnable_dataset(32).map(lambda r: {"text": " ".join(f"t{max(i, 2)}" for i in r["input_ids"])})
    ds = ds.remove_columns(["input_ids", "labels"])
    cfg = SFTConfig(
        output_dir=str(tmp_path),
        optim="aurora",
        optim_args="pp_iterations=1",
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=32,
        bf16=False,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=tiny_moe(), args=cfg, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Aurora)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_accelerate_launch_two_process_ddp(tmp_path):
    results = launch_two_processes(Path(__file__).with_name("_aurora_ddp_script.py"), tmp_path, timeout=240)
    assert results[0]["world_size"] == 2 and results[0]["optimizer"] == "Aurora"
    assert results[0]["backend"] == "gloo" and results[0]["wrapped"] == "DistributedDataParallel"
    # DDP averaged the gradients, so both ranks took identical Aurora steps.
    assert results[0]["checksum"] == results[1]["checksum"]
    assert results[0]["moved"] > 0


def test_neuron_health_callback_counts_idle_neurons():
    from types import SimpleNamespace

    from torch import nn

    from hf_slim.optim import NeuronHealthCallback

    model = nn.Module()
    model.mlp = nn.Module()
    model.mlp.up_proj = nn.Linear(8, 20, bias=False)  # neurons: rows
    model.mlp.down_proj = nn.Linear(20, 8, bias=False)  # neurons: columns
    cb = NeuronHealthCallback(threshold=0.1, window=3)
    state = SimpleNamespace(global_step=0, log_history=[])
    for step in range(4):
        state.global_step = step
        cb.on_pre_optimizer_step(None, state, None, model=model)
        with torch.no_grad():
            mask = torch.ones(20)
            mask[:5] = 0.01  # neurons 0-4 get 1% of a typical update
            model.mlp.up_proj.weight.add_(torch.randn(20, 8) * mask[:, None])
            model.mlp.down_proj.weight.add_(torch.randn(8, 20) * mask[None, :])
        cb.on_optimizer_step(None, state, None)
        if step < 2:  # the window is not full yet
            assert cb.latest["neuron_health/dead_frac"] == 0.0
    assert cb.latest["neuron_health/up_proj/dead_frac"] == pytest.approx(0.25)
    assert cb.latest["neuron_health/down_proj/dead_frac"] == pytest.approx(0.25)
    assert cb.latest["neuron_health/up_proj/row_spread"] > 10
    logs = {"loss": 1.0}
    state.log_history.append(dict(logs))
    cb.on_log(None, state, None, logs=logs)
    assert state.log_history[-1]["neuron_health/dead_frac"] == pytest.approx(0.25)


def test_neuron_health_callback_logs_in_trainer(tmp_path):
    from hf_slim.optim import NeuronHealthCallback

    cb = NeuronHealthCallback(window=2)
    trainer = Trainer(
        model=tiny_moe(), args=_args(tmp_path, optim="aurora", max_steps=4), train_dataset=learnable_dataset(), callbacks=[cb]
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "neuron_health/dead_frac" in h]
    assert logged and 0.0 <= logged[-1]["neuron_health/dead_frac"] <= 1.0
    assert "neuron_health/gate_up_proj/row_spread" in logged[-1] and len(cb.history) == 4
