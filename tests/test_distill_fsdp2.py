"""SlimDistillationTrainer under FSDP2 (`fully_shard`) through `accelerate launch`, on 2 CPU processes (gloo).

One launch (`_distill_fsdp2_script.py` with `examples/accelerate_fsdp2.yaml`) runs, on an elastic SlimMoe student with
2 MTP depths (its 1-layer "small" variant drawn alone in some steps):
- `sharded`: teacher sharded, AdamW, 4 steps of 2 x 2 rows, a checkpoint at step 2, a FULL_STATE_DICT export at the end;
- `resumed`: the same run resumed from `sharded/checkpoint-2`;
- `replicated`: the teacher replicated on both processes, 2 steps;
- `sgd`: 2 plain SGD steps (no Adam normalisation between the gradients and the weights) with the gradients clipped
  (their norm is above `max_grad_norm`), then `evaluate()`.
The test compares them with single-process runs on the same global batch (4 rows). The slow test adds a sandwich run
(three variants per micro-batch, self-distillation from the full variant, the teacher's MTP heads as MTP-KD targets)
with gradient accumulation.
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _launch import launch_two_processes
from safetensors.torch import load_file
from test_distillation import SEQ, distill_args, elastic_student, tiny_tokenizer, train_teacher

from hf_slim.data import packed_lm_dataset, stdlib_corpus
from trainers import SlimDistillationConfig, SlimDistillationTrainer, sample_elastic_variants
from trainers.distillation_trainer import check_batch_split
from trainers.fsdp import fsdp2_plugin


ROOT = Path(__file__).parents[1]
SCRIPT = Path(__file__).with_name("_distill_fsdp2_script.py")
CONFIG = ROOT / "examples" / "accelerate_fsdp2.yaml"
PROBABILITIES = {"full": 0.5, "small": 0.5}
TERMS = ("loss", "lm", "kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2", "num_tokens", "learning_rate", "grad_norm")

# run name -> settings (read by the launched script too); `overrides` are SlimDistillationConfig fields
RUNS = {
    "sharded": dict(teacher_placement="shard", max_steps=4, save_steps=2, export=True),
    "resumed": dict(teacher_placement="shard", max_steps=4, save_steps=2, resume_from="sharded/checkpoint-2"),
    "replicated": dict(teacher_placement="replicate", max_steps=2),
    "sgd": dict(
        teacher_placement="shard", max_steps=2, evaluate=True,
        overrides=dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.3, per_device_eval_batch_size=2),
    ),
    "sandwich": dict(
        teacher_placement="shard", max_steps=2, overrides=dict(
            elastic_sampling="sandwich", elastic_variant_probabilities=None, elastic_teacher="full",
            mtp_kd_target="teacher_mtp", per_device_train_batch_size=1, gradient_accumulation_steps=2,
        ),
    ),
}  # fmt: skip
FAST_RUNS = ("sharded", "resumed", "replicated", "sgd")


# ---- shared with the launched script ---------------------------------------------------------------------------


def load_pair(data_dir: Path):
    """(tokenizer, dataset, teacher, student) from the teacher folder the test wrote; the student is built fresh."""
    from transformers import AutoTokenizer

    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    folder = Path(data_dir) / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dataset = packed_lm_dataset(stdlib_corpus(max_documents=200), tokenizer, SEQ).select(range(64))
    teacher = SlimMoeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return tokenizer, dataset, teacher, elastic_student(len(tokenizer))


def run_args(out: Path, spec: dict, **overrides) -> SlimDistillationConfig:
    """One setting for every run: elastic sampling with a layer-dropping variant, both MTP depths, λ = 0.5 (LM and
    KD both train), no router aux loss (a per-process batch statistic, so not a global-batch quantity)."""
    fields = dict(
        max_steps=spec["max_steps"], per_device_train_batch_size=2, lambda_start=0.5, lambda_end=0.5,
        router_aux_loss_coef=0.0, elastic_sampling="probabilities", elastic_variant_probabilities=PROBABILITIES,
        teacher_placement=spec["teacher_placement"], activation_checkpointing=True,
    )  # fmt: skip
    if spec.get("save_steps"):
        fields.update(save_strategy="steps", save_steps=spec["save_steps"])
    fields.update(spec.get("overrides", {}))
    fields.update(overrides)
    return distill_args(out, **fields)


def logged_terms(trainer) -> list[dict]:
    return [
        {k: v for k, v in h.items() if k in TERMS or k == "step" or "/" in k}
        for h in trainer.state.log_history
        if "kd" in h
    ]


# ---- the launch and the single-process reference ------------------------------------------------------------------


def _make_data(data: Path) -> None:
    texts, tokenizer = tiny_tokenizer()
    teacher = train_teacher(packed_lm_dataset(texts, tokenizer, SEQ), len(tokenizer), steps=5)
    teacher.save_pretrained(data / "teacher")
    tokenizer.save_pretrained(data / "teacher")


def _launch(data: Path, out: Path, runs: tuple[str, ...]) -> list[dict]:
    # a generous limit: the run takes ~20 s on 2 idle cores, several times that on a loaded machine
    return launch_two_processes(SCRIPT, out, timeout=900, config_file=CONFIG, args=(str(data), ",".join(runs)))


def reference_run(data: Path, name: str, out: Path) -> dict:
    """Run `name`'s settings in one process on the global batch: twice the rows per micro-batch."""
    tokenizer, dataset, teacher, student = load_pair(data)
    overrides = RUNS[name].get("overrides", {})
    args = run_args(
        out, RUNS[name], per_device_train_batch_size=2 * overrides.get("per_device_train_batch_size", 2),
        per_device_eval_batch_size=2 * overrides.get("per_device_eval_batch_size", 4), save_strategy="no",
    )  # fmt: skip
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = {"logs": logged_terms(trainer), "params": params}
    if RUNS[name].get("evaluate"):
        result["eval"] = trainer.evaluate(eval_rows(dataset))
    return result


def eval_rows(dataset):
    return dataset.select(range(8))


def assert_same_run(logs: list[dict], params: dict[str, torch.Tensor], reference: dict, atol: float) -> None:
    """Logged terms within fp32 rounding of the reference's, and every parameter within `atol`."""
    ref_logs, ref_params = reference["logs"], reference["params"]
    assert [h["step"] for h in logs] == [h["step"] for h in ref_logs]
    for got, want in zip(logs, ref_logs):
        assert set(got) == set(want)
        assert got["num_tokens"] == want["num_tokens"]
        for key in sorted(set(got) - {"step", "num_tokens"}):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (got["step"], key)
    assert set(params) == set(ref_params)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    data = tmp_path_factory.mktemp("fsdp2_data")
    _make_data(data)
    out = tmp_path_factory.mktemp("fsdp2_runs")
    return data, out, _launch(data, out, FAST_RUNS)


def test_fsdp2_shards_student_and_teacher(launched):
    _, _, results = launched
    for rank in (0, 1):
        sharded = results[rank]["sharded"]
        assert sharded["world_size"] == 2 and sharded["distributed_type"] == "FSDP" and sharded["fsdp_version"] == 2
        assert sharded["student_class"] == "FSDPSlimMoeForCausalLM"
        # 2 decoder blocks + 2 MTP blocks + the root (embeddings, final norm, lm_head, MTP norm)
        assert sharded["student_units"] == 5
        assert sharded["head_sharded"] and sharded["head_local_rows"] == 150  # 300 vocabulary rows over 2 ranks
        assert sharded["optimizer_params_dtensor"]  # the optimizer steps the shards
        assert sharded["optimizer_params_once"] and results[rank]["resumed"]["optimizer_params_once"]
        # the sharded teacher: its 4 blocks, its input embedding and the root; the replicated one is not sharded
        assert sharded["teacher_class"] == "FSDPSlimMoeForCausalLM" and sharded["teacher_units"] == 6
        replicated = results[rank]["replicated"]
        assert replicated["teacher_class"] == "SlimMoeForCausalLM" and replicated["teacher_units"] == 0
    # both ranks log the same (reduced) terms
    assert results[0]["sharded"]["logs"] == results[1]["sharded"]["logs"]


def test_fsdp2_equals_a_single_process_run_on_the_global_batch(launched, tmp_path):
    data, out, results = launched
    logs = results[0]["sharded"]["logs"]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    # the elastic draw is a function of (seed, step): the 1-layer variant ran alone in some steps, the full one in
    # the others
    drawn = [sample_elastic_variants(["small", "full"], "probabilities", PROBABILITIES, 0, s, 0)[0] for s in range(4)]
    assert set(drawn) == {"small", "full"}
    for got, variant in zip(logs, drawn):
        assert {k.split("/")[0] for k in got if "/" in k} == {variant}
        assert {"mtp_kd_1", "mtp_kd_2", "mtp_lm_2"} <= set(got)
    params = load_file(str(out / "sharded" / "params.safetensors"))
    # AdamW divides each gradient by its running RMS, which turns fp32 rounding of tiny gradients into ~1e-6 steps
    assert_same_run(logs, params, reference_run(data, "sharded", tmp_path / "adamw"), atol=1e-5)
    # plain SGD: the weights move by lr x (clipped) gradient, so they agree to fp32 rounding
    sgd = load_file(str(out / "sgd" / "params.safetensors"))
    reference = reference_run(data, "sgd", tmp_path / "sgd")
    assert all(h["grad_norm"] > 0.3 for h in reference["logs"])  # clipping was active in both steps
    assert_same_run(results[0]["sgd"]["logs"], sgd, reference, atol=1e-7)
    # evaluate() on 8 rows: 2 x 2 rows per step on two processes, the terms reduced over both
    got, want = results[0]["sgd"]["eval"], reference["eval"]
    assert {"eval_kd", "eval_mtp_kd_2", "eval_lm"} <= set(got)
    for key in ("eval_loss", "eval_lm", "eval_kd", "eval_mtp_lm_1", "eval_mtp_kd_1", "eval_mtp_kd_2"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_fsdp2_resume_continues_bitwise(launched):
    _, out, results = launched
    full, resumed = results[0]["sharded"]["logs"], results[0]["resumed"]["logs"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]  # steps 1-2 restored from the checkpoint's log history
    # steps 3 and 4 recomputed: the same values, bit for bit (`num_tokens` counts this train() call's tokens only,
    # as in every SlimDistillationTrainer resume)
    assert [{k: v for k, v in h.items() if k != "num_tokens"} for h in resumed[2:]] == [
        {k: v for k, v in h.items() if k != "num_tokens"} for h in full[2:]
    ]
    assert (out / "sharded" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # SHARDED_STATE_DICT (DCP)
    a = load_file(str(out / "sharded" / "params.safetensors"))
    b = load_file(str(out / "resumed" / "params.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_teacher_placements_give_the_same_steps(launched):
    _, _, results = launched
    sharded, replicated = results[0]["sharded"]["logs"][:2], results[0]["replicated"]["logs"]
    assert [h["step"] for h in replicated] == [1, 2]
    # 2 steps instead of 4: the same terms; the LR and β schedules (so loss and grad_norm) differ from step 2 on
    for got, want in zip(replicated, sharded):
        assert set(got) == set(want)
        for key in sorted(set(want) - {"step", "loss", "learning_rate", "grad_norm"}):
            assert got[key] == want[key], (got["step"], key)
    assert replicated[0]["loss"] == sharded[0]["loss"] and replicated[0]["grad_norm"] == sharded[0]["grad_norm"]


def test_fsdp2_full_state_dict_export_loads_without_fsdp(launched):
    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    _, out, _ = launched
    model = SlimMoeForCausalLM.from_pretrained(out / "sharded" / "final")
    params = load_file(str(out / "sharded" / "params.safetensors"))
    for name, value in model.named_parameters():
        assert torch.equal(value.detach(), params[name]), name
    assert model.config.num_mtp_heads == 2 and model.config.elastic


@pytest.mark.slow
def test_fsdp2_sandwich_self_distillation_with_accumulation(tmp_path):
    """Several student forwards before one backward (sandwich: full, medium, small), the smaller variants learning
    from the full one (its head weight detached), the teacher's own MTP heads as targets, 2 micro-batches per step."""
    data, out = tmp_path / "data", tmp_path / "runs"
    data.mkdir()
    out.mkdir()
    _make_data(data)
    results = _launch(data, out, ("sandwich",))
    logs = results[0]["sandwich"]["logs"]
    assert {"full/kd", "medium/kd", "small/kd", "small/mtp_kd_2"} <= set(logs[0])
    params = load_file(str(out / "sandwich" / "params.safetensors"))
    assert_same_run(logs, params, reference_run(data, "sandwich", tmp_path / "reference"), atol=1e-5)


# ---- bad input (no launch) ---------------------------------------------------------------------------------------


def test_world_size_must_divide_a_split_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(SlimDistillationConfig, "world_size", property(lambda self: 2))  # as under 2 processes
    args = distill_args(tmp_path, per_device_train_batch_size=3, accelerator_config={"split_batches": True})
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=3 cannot be split over 2 processes.*=4"):
        check_batch_split(args)
    args = distill_args(tmp_path, per_device_eval_batch_size=5, accelerator_config={"split_batches": True})
    check_batch_split(args)  # no eval dataset: the eval batch is never split
    with pytest.raises(ValueError, match=r"per_device_eval_batch_size=5.*split_batches=False"):
        check_batch_split(args, has_eval=True)
    check_batch_split(distill_args(tmp_path, per_device_train_batch_size=3))  # per process: any world size


def test_world_size_check_runs_before_training(tmp_path, monkeypatch):
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts[:40], tokenizer, SEQ)
    monkeypatch.setattr(SlimDistillationConfig, "world_size", property(lambda self: 2))
    args = distill_args(tmp_path, per_device_train_batch_size=3, accelerator_config={"split_batches": True})
    student = elastic_student(len(tokenizer))
    with pytest.raises(ValueError, match=r"per_device_train_batch_size=3"):
        SlimDistillationTrainer(
            model=student, teacher_model=copy.deepcopy(student), args=args, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


def _accelerator(**plugin):
    fields = dict(fsdp_version=2, activation_checkpointing=False, cpu_ram_efficient_loading=False)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**{**fields, **plugin})))


@pytest.mark.parametrize(
    "plugin, match",
    [
        (dict(fsdp_version=1), r"fsdp_version=1.*fsdp_version: 2"),
        (dict(activation_checkpointing=True), r"fsdp_activation_checkpointing=True.*activation_checkpointing=True"),
        (dict(cpu_ram_efficient_loading=True), r"fsdp_cpu_ram_efficient_loading=True.*false"),
    ],
)  # fmt: skip
def test_fsdp_settings_the_trainer_cannot_honour(plugin, match):
    with pytest.raises(ValueError, match=match):
        fsdp2_plugin(_accelerator(**plugin))
    assert fsdp2_plugin(_accelerator()) is not None
    assert fsdp2_plugin(SimpleNamespace(state=SimpleNamespace())) is None  # no FSDP


def test_teacher_placement_is_validated(tmp_path):
    with pytest.raises(ValueError, match=r"teacher_placement.*'shard'.*'replicate'.*'gpu'"):
        distill_args(tmp_path, teacher_placement="gpu")


def test_quantized_teacher_cannot_be_sharded():
    from trainers.teacher import prepare_teacher

    teacher = torch.nn.Linear(2, 2)
    teacher.is_loaded_in_4bit = True
    with pytest.raises(ValueError, match=r"teacher_placement='shard'.*quantized.*teacher_placement='replicate'"):
        prepare_teacher(teacher, _accelerator(), placement="shard")


def test_progressive_runner_refuses_fsdp(tmp_path, monkeypatch):
    from trainers.progressive import DistillScriptArguments, run_progressive

    args = distill_args(tmp_path)
    script_args = DistillScriptArguments(dataset_name="hf_slim:stdlib", prune_stages=[{}], stage_tokens=[64])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    with pytest.raises(ValueError, match=r"does not run under FSDP.*--multi_gpu"):
        run_progressive(script_args, args)


def test_explicit_find_unused_parameters_false_is_fine_under_fsdp(tmp_path, monkeypatch):
    """DDP's `find_unused_parameters` does not exist under FSDP: the refusal for layer-dropping variants is DDP's only."""
    monkeypatch.setattr(SlimDistillationConfig, "world_size", property(lambda self: 2))
    args = distill_args(
        tmp_path, ddp_find_unused_parameters=False, elastic_sampling="probabilities",
        elastic_variant_probabilities={"full": 0.5, "small": 0.5},
    )  # fmt: skip
    student = elastic_student(300)
    with pytest.raises(ValueError, match=r"ddp_find_unused_parameters=False"):
        SlimDistillationTrainer._fit_ddp_find_unused_parameters(student, args)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    SlimDistillationTrainer._fit_ddp_find_unused_parameters(student, args)
    assert args.ddp_find_unused_parameters is False
