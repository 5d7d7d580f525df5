import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_slim.cli import main
from hf_slim.data import packed_lm_dataset, stdlib_corpus, train_tokenizer
from hf_slim.demo import DemoConfig, run_demo
from hf_slim.models.slim_moe import SlimMoeForCausalLM


def test_corpus_and_tokenizer_are_real_and_deterministic():
    texts = stdlib_corpus(max_documents=200)
    assert len(texts) == 200 and texts == stdlib_corpus(max_documents=200)
    tokenizer = train_tokenizer(texts, vocab_size=300)
    sample = "Return a new list containing all items."
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    dataset = packed_lm_dataset(texts, tokenizer, block_size=32)
    assert all(len(row) == 32 for row in dataset["input_ids"][:5])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts, vocab_size=100)


def test_demo_runs_end_to_end_at_tiny_size(tmp_path):
    summary = run_demo(DemoConfig(
        output_dir=str(tmp_path), vocab_size=300, block_size=32, hidden_size=32, num_hidden_layers=2,
        num_experts=4, moe_intermediate_size=16, num_mtp_heads=1, teacher_steps=3, distill_steps=3, batch_size=4,
        calibration_samples=8, eval_documents=20,
    ))
    assert summary["conversion_max_abs_logit_diff"] < 1e-4
    stages = summary["stages"]
    assert list(stages) == ["teacher (stock Qwen3-MoE)", "pruned, before recovery", "pruned + distilled",
                            "elastic 'small' (runtime view)"]
    assert set(stages["pruned + distilled"]["losses"]) == {"lm", "mtp_1"}
    sizes = [stages[name]["params"]["total"] for name in stages]
    assert sizes[1] < sizes[0] and sizes[3] < sizes[2]  # pruning and the small variant really shrink the model
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["stages"]["pruned + distilled"]["params"]["mtp"] > 0
    assert json.loads((tmp_path / "slim_moe_elastic" / "config.json").read_text())["elastic"]["variants"]["small"]
    assert (tmp_path / "slim_moe_small" / "modeling_slim_moe.py").exists()
    assert (tmp_path / "qwen3_moe" / "mtp.safetensors").exists()


def test_demo_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="teacher_steps"):
        DemoConfig(teacher_steps=0)


def test_convert_cli_round_trip(tmp_path):
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=16, intermediate_size=32)
    stock = Qwen3MoeForCausalLM(config).eval()
    stock.save_pretrained(tmp_path / "stock")
    assert main(["convert", str(tmp_path / "stock"), str(tmp_path / "slim"), "--num-mtp-heads", "1"]) == 0
    slim = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    assert isinstance(slim, SlimMoeForCausalLM) and slim.config.num_mtp_heads == 1
    assert main(["convert", str(tmp_path / "slim"), str(tmp_path / "back"), "--to", "qwen3_moe"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, stock(ids).logits, atol=1e-5, rtol=1e-5)
    # Existing output without --overwrite: clear error, exit code 2, folder untouched.
    assert main(["convert", str(tmp_path / "slim"), str(tmp_path / "back"), "--to", "qwen3_moe"]) == 2
