"""`hf-slim trl`: TRL's own scripts with `--optim aurora` / `aurora_lora`, end to end with `trl sft` on a tiny stock
Qwen3-MoE (offline, CPU); and the one-time warning of plain Aurora on LoRA factors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

import hf_slim.optim.trainer as optim_trainer
from hf_slim.cli import build_parser, main
from hf_slim.cli.trl import trl_training_commands
from hf_slim.data import stdlib_corpus, train_tokenizer
from hf_slim.optim import AuroraFactory


def tiny_qwen3_moe(vocab_size: int, **ids) -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **ids,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A model folder (tiny stock Qwen3-MoE + a BPE tokenizer trained offline) and a dataset folder (`train.jsonl`)."""
    root = tmp_path_factory.mktemp("trl")
    texts = stdlib_corpus(max_documents=60)
    tokenizer = train_tokenizer(texts, vocab_size=300)
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tiny_qwen3_moe(len(tokenizer), **ids).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in texts[:32]))
    return root


def sft_args(tiny, out, *extra: str) -> list[str]:
    return [
        "sft", "--model_name_or_path", str(tiny / "model"), "--dataset_name", str(tiny / "data"), "--max_steps", "2",
        "--output_dir", str(out), "--report_to", "none", "--use_cpu", "--per_device_train_batch_size", "2",
        "--max_length", "32", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "1e-3", *extra,
    ]  # fmt: skip


def saved_param_groups(out) -> list[dict]:
    """The optimizer's param groups as the Trainer saved them at the last step (what actually trained)."""
    return torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=False)["param_groups"]


def test_trl_sft_optim_aurora_through_accelerate_launch(tiny, tmp_path, monkeypatch):
    """`hf-slim trl sft` does what `trl sft` does (parse here, `accelerate launch` the script); the launched process
    registers hf-slim first, so TRL's unchanged sft.py trains with Aurora."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "out"
    # `--num_processes` is not a script option: it goes to accelerate launch, as with `trl sft`
    assert main(["trl", *sft_args(tiny, out, "--optim", "aurora", "--num_processes", "1")]) == 0
    groups = saved_param_groups(out)
    assert [g["use_aurora"] for g in groups].count(True) == 1 and "lora_scaling" not in groups[0]
    assert groups[0]["scale"] == "match_rms_adamw" and len(groups[0]["params"]) == 12  # 2 layers x (q, k, v, o + 2 expert stacks)
    assert (out / "model.safetensors").is_file()


def test_trl_sft_aurora_lora_with_peft_in_process(tiny, tmp_path):
    out = tmp_path / "out"
    argv = sft_args(tiny, out, "--optim", "aurora_lora", "--use_peft", "--lora_r", "4",
                    "--lora_target_modules", "q_proj", "v_proj")  # fmt: skip
    assert main(["trl", "--in-process", *argv]) == 0
    (pairs, *_) = saved_param_groups(out)
    assert pairs["use_aurora"] and len(pairs["lora_scaling"]) == 4 and len(pairs["params"]) == 8  # 2 layers x q, v
    assert (out / "adapter_model.safetensors").is_file()


def test_parsing_and_passthrough(capsys):
    args = build_parser().parse_args(["trl", "sft", "--optim", "aurora", "--use_peft"])
    assert (args.trl_args, args.in_process, args.handler.__name__) == (["sft", "--optim", "aurora", "--use_peft"], False, "run_trl")
    assert build_parser().parse_args(["trl", "--in-process", "dpo", "--help"]).trl_args == ["dpo", "--help"]
    assert {"sft", "dpo", "grpo", "kto", "reward", "rloo"} <= set(trl_training_commands())
    with pytest.raises(SystemExit) as exit_info:
        main(["trl", "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: hf-slim trl")
    assert main(["trl"]) == 0 and "sft" in capsys.readouterr().out  # TRL's own help: its commands
    assert main(["trl", "env"]) == 0 and "PEFT version" in capsys.readouterr().out  # a non-training command: TRL's CLI
    # TRL's parser now lists hf-slim's optimizers among the --optim choices
    with pytest.raises(SystemExit) as exit_info:
        main(["trl", "sft", "--optim", "nope", "--output_dir", "x"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage: hf-slim trl sft" in err
    assert "invalid choice: 'nope'" in err and "'aurora'" in err and "'aurora_lora'" in err
    assert main(["trl", "sfft", "--optim", "aurora"]) == 2
    assert capsys.readouterr().err.startswith("hf-slim trl: error: 'sfft' is not a TRL command; TRL's commands: ")
    assert main(["trl", "--in-process", "env"]) == 2
    assert capsys.readouterr().err.strip() == (
        "hf-slim trl: error: --in-process runs a TRL training script "
        f"({', '.join(trl_training_commands())}), not 'env'"
    )


def test_plain_aurora_on_lora_factors_warns_once(monkeypatch):
    from peft import LoraConfig, get_peft_model

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = optim_trainer.logger  # transformers' logger tree does not propagate to the root (caplog)
    logger.addHandler(handler)
    monkeypatch.setattr(optim_trainer, "_warned_lora", False)
    try:
        AuroraFactory()(tiny_qwen3_moe(64))  # full fine-tuning: nothing to say
        assert records == []
        model = get_peft_model(tiny_qwen3_moe(64), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        AuroraFactory()(model)
        AuroraFactory()(model)
    finally:
        logger.removeHandler(handler)
    (record,) = records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "8 trainable LoRA factors" in message
    assert "optim='aurora_lora'" in message and "lora_A" in message
