import importlib.util
import json
import shlex
from pathlib import Path

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


TINY = dict(
    vocab_size=300, block_size=32, hidden_size=32, num_hidden_layers=2, num_experts=4, moe_intermediate_size=16,
    num_mtp_heads=1, teacher_steps=3, distill_steps=3, batch_size=4, calibration_samples=8, eval_documents=20,
)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """One tiny demo run shared by the tests of this module: (output folder, returned summary)."""
    out = tmp_path_factory.mktemp("demo_a")
    return out, run_demo(DemoConfig(output_dir=str(out), **TINY))


def _comparable(summary: dict) -> dict:
    """A summary without what legitimately differs between two runs (wall time, output paths)."""
    summary = json.loads(json.dumps(summary))
    for key in ("seconds", "exports"):
        summary.pop(key)
    summary["config"].pop("output_dir")
    return summary


def test_demo_runs_end_to_end_at_tiny_size(tiny_demo):
    tmp_path, summary = tiny_demo
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


def test_demo_cards_report_what_the_demo_measured(tiny_demo):
    """Each export's card has a `model-index` of the held-out loss and perplexity measured for it; the teacher lives in
    memory only (no `base_model`) and the stdlib docstrings are no Hub dataset (named in the body only)."""
    import math

    from huggingface_hub import ModelCard

    _, summary = tiny_demo
    measured = {"elastic": "pruned + distilled", "qwen3_moe": "pruned + distilled",
                "small": "elastic 'small' (runtime view)"}  # fmt: skip
    for export, row in measured.items():
        card = ModelCard.load(Path(summary["exports"][export]) / "README.md")
        lm = summary["stages"][row]["losses"]["lm"]
        got = {r.metric_name: (r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results}
        data = "held-out stdlib docstrings"
        assert got == {"eval_loss": ("loss", pytest.approx(lm, abs=1e-4), data),
                       "perplexity": ("perplexity", pytest.approx(math.exp(lm), rel=1e-3), data)}  # fmt: skip
        assert card.data.base_model is None and card.data.datasets is None and card.data.license == "other"
        assert "`hf_slim:stdlib` (not on the Hub)" in card.text and "AutoTokenizer.from_pretrained" in card.text
    elastic = ModelCard.load(Path(summary["exports"]["elastic"]) / "README.md").text
    assert 'elastic_variant="small"' in elastic


def test_demo_reloads_the_elastic_export_through_its_shipped_code(tiny_demo):
    # Defect 5: with hf_slim imported, trust_remote_code=True resolves to the installed class; the demo must load
    # the export where hf_slim cannot be imported, so the class comes from the copied remote code.
    tmp_path, summary = tiny_demo
    reload = json.loads((tmp_path / "summary.json").read_text())["shipped_code_reload"]
    assert reload["class"].startswith("transformers_modules.") and reload["class"].endswith(".SlimMoeForCausalLM")
    assert reload["hf_slim_importable"] is False
    assert reload["matches_in_process"] is True  # the shipped code generates what the installed code does
    assert summary["budget_generation_sample"].startswith("Return a list of")


def test_two_tiny_demo_runs_give_the_same_numbers(tiny_demo, tmp_path):
    first_dir, first = tiny_demo
    second = run_demo(DemoConfig(output_dir=str(tmp_path), **TINY))
    saved = [json.loads((folder / "summary.json").read_text()) for folder in (first_dir, tmp_path)]
    assert saved[0]["stages"] == saved[1]["stages"]  # every loss and parameter count, bit for bit
    assert _comparable(first) == _comparable(second)


@pytest.mark.slow
def test_two_default_demo_runs_give_the_same_numbers(tmp_path):
    summaries = []
    for name in ("a", "b"):
        run_demo(DemoConfig(output_dir=str(tmp_path / name)))
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert summaries[0]["stages"] == summaries[1]["stages"]
    assert _comparable(summaries[0]) == _comparable(summaries[1])


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


def test_bench_calibration_prints_a_command_that_reproduces_the_run(monkeypatch):
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))  # the benchmark imports its sibling `_docs`
    spec = importlib.util.spec_from_file_location("bench_calibration", bench_dir / "bench_calibration.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    parser = bench.build_parser()
    for argv in ([], ["--rounds", "7", "--write-docs"], ["--write-docs", "--threads", "1", "--rounds", "3"],
                 ["--quality", "--steps", "10", "--write-docs"]):
        args = parser.parse_args(argv)
        command = bench.command_line(args)
        assert command.startswith(bench.SCRIPT)
        assert parser.parse_args(shlex.split(command[len(bench.SCRIPT):])) == args, command
    assert bench.command_line(parser.parse_args(["--rounds", "7", "--write-docs"])).endswith(
        "bench_calibration.py --rounds 7 --write-docs"
    )
