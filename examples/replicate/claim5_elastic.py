"""Claim 5 (Nemotron / Star Elastic, MatFormer): nested variants trained jointly in one elastic checkpoint match the
same sizes trained separately, at one checkpoint's cost.

Start point: the shared trained teacher (`_common.trained_teacher`), converted to SlimMoe and made elastic with
`make_elastic` (calibration statistics of the teacher): `small` = hidden 64, 4 experts; `medium` = hidden 96, 6
experts; `full` = the teacher (hidden 128, 8 experts); every variant keeps 4 layers and top-2 routing. Arms:
- sliced: each variant of the untrained elastic model (`elastic_variant=name`), no training;
- joint: one `SlimDistillationTrainer` run with `elastic_sampling="sandwich"` (with 3 variants: full, medium and
  small on every batch), every variant distilled from the teacher (`elastic_teacher="teacher"`), N steps;
- alone: `small` and `medium` sliced out (`slice_variant`) and each distilled from the teacher for N steps.
Token budget: sandwich trains every variant on every batch, so each variant of the joint run sees N x 16 x 128
tokens, as each alone run does (the same rows in the same order within a seed). The full size alone is the teacher
itself (distilling it from itself has nothing to learn). Learning rates are tuned on the tune split (seed 0; the
joint arm one lr, by the mean tune loss of its three variants); the table is the report split over 3 seeds.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim5_elastic.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim5_elastic.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


VARIANTS = {"small": {"hidden_size": 64, "num_experts": 4}, "medium": {"hidden_size": 96, "num_experts": 6}}
NAMES = ("small", "medium", "full")
TRAINED_ALONE = ("small", "medium")  # the full size alone is the teacher
CALIBRATION_ROWS = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="distillation steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid", type=float, nargs="+", default=[3e-3, 6e-3, 1.2e-2], help="initial lr grid (geometric)")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between two points of the curves")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--smoke", action="store_true", help="a tiny run of the whole pipeline (~2 minutes)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.grid, args.eval_every, args.teacher_steps = 6, [0, 1], [1e-3, 3e-3, 9e-3], 3, 20
    return args


# ------------------------------------------------------------------------------------------------ pieces


def curve_callback(rows: torch.Tensor, every: int, variants: tuple, points: dict):
    """Report-split loss of each of `variants` (None: the model as is) at the start, every `every` steps and at the
    end."""
    from transformers import TrainerCallback

    def measure(model, step):
        for name in variants:
            kwargs = {} if name is None else {"elastic_variant": name}
            points.setdefault(name, []).append((step, _common.mean_loss(model, rows, **kwargs)))

    class Curve(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            measure(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step == state.max_steps:
                measure(model, state.global_step)

    return Curve()


def distill(student, teacher, stream, *, lr: float, seed: int, opts, joint: bool) -> dict:
    """Distill `student` for `opts.steps` steps over seed `seed`'s rows (sequential sampler, so every run of a seed
    sees the same rows in the same order); returns the tune and report losses per variant and the curves."""
    from trainers import SlimDistillationConfig, SlimDistillationTrainer

    order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(seed))[: opts.steps * 16]
    elastic = dict(elastic_sampling="sandwich", elastic_teacher="teacher") if joint else {}
    args = SlimDistillationConfig(
        output_dir=str(_common.CACHE / "runs" / f"claim5-{'joint' if joint else 'alone'}-{seed}-{lr:g}"),
        max_steps=opts.steps, per_device_train_batch_size=16, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, opts.steps // 20), weight_decay=0.01, max_length=_common.SEQ, beta_start=0.0,
        beta_end=0.0, train_sampling_strategy="sequential", logging_steps=max(1, opts.steps // 5), save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True,
        activation_checkpointing=False, **elastic,
    )  # fmt: skip
    variants = NAMES if joint else (None,)
    points: dict = {}
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=stream.select(order.tolist()),
        processing_class=_common.tokenizer(),
        callbacks=[curve_callback(_common.eval_rows("report"), opts.eval_every, variants, points)],
    )
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    result = {"model": model, "tune": {}, "report": {}, "curve": {}}
    for name in variants:
        kwargs = {} if name is None else {"elastic_variant": name}
        key = name or "model"
        result["tune"][key] = _common.tune_loss(model, **kwargs)
        result["report"][key] = points[name][-1][1]
        result["curve"][key] = points[name]
    return result


def folder_bytes(model) -> int:
    """Bytes of the weight files `save_pretrained` writes for `model` (safetensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    opts = parse_args(argv)
    torch.set_num_threads(1)
    from hf_slim.convert import from_hf
    from hf_slim.elastic import ElasticConfig, make_elastic, slice_variant
    from hf_slim.pruning import collect_statistics

    report = _common.Report("claim5_elastic", "Claim 5: elastic nested variants, joint vs sliced vs alone")
    stock, folder = _common.trained_teacher(steps=opts.teacher_steps)
    teacher = from_hf(stock).eval()
    stream = _common.train_dataset()
    calibration = torch.tensor(stream.select(range(CALIBRATION_ROWS))["input_ids"])
    stats = collect_statistics(teacher, calibration, num_samples=len(calibration), max_length=_common.SEQ,
                               batch_size=16, show_progress=False)  # fmt: skip
    elastic = make_elastic(teacher, ElasticConfig(variants=VARIANTS), stats)
    params = {name: sum(p.numel() for p in slice_variant(elastic, name).parameters()) for name in VARIANTS}
    params["full"] = sum(p.numel() for p in elastic.parameters())

    # (a) sliced: the untrained elastic model, per variant (deterministic: no seed, no lr)
    sliced = {name: _common.report_loss(elastic, elastic_variant=name) for name in NAMES}
    seed0 = opts.seeds[0]

    # (b) joint: one lr for the run, chosen by the mean tune loss of the variants
    joint_runs: dict[int, dict] = {}
    joint_by_lr: dict[float, dict] = {}

    def joint_tune(lr):
        joint_by_lr[lr] = distill(copy.deepcopy(elastic), teacher, stream, lr=lr, seed=seed0, opts=opts, joint=True)
        joint_by_lr[lr].pop("model")
        return statistics.fmean(joint_by_lr[lr]["tune"].values())

    joint_lr, joint_grid = _common.tune_lr(joint_tune, opts.grid, label="joint")
    joint_runs[seed0] = joint_by_lr[joint_lr]  # the tuning run of the chosen lr is seed 0's run
    for seed in opts.seeds[1:]:
        _common.log(f"joint: seed {seed} at lr {joint_lr:.3g}")
        joint_runs[seed] = distill(copy.deepcopy(elastic), teacher, stream, lr=joint_lr, seed=seed, opts=opts, joint=True)
        joint_runs[seed].pop("model")

    # (c) alone: each size sliced out and distilled separately, its own lr
    alone_runs: dict[str, dict[int, dict]] = {}
    alone_lr, alone_grid = {}, {}
    for name in TRAINED_ALONE:
        by_lr: dict[float, dict] = {}

        def alone_tune(lr, name=name, by_lr=by_lr):
            by_lr[lr] = distill(slice_variant(elastic, name), teacher, stream, lr=lr, seed=seed0, opts=opts, joint=False)
            by_lr[lr].pop("model")
            return by_lr[lr]["tune"]["model"]

        alone_lr[name], alone_grid[name] = _common.tune_lr(alone_tune, opts.grid, label=f"alone {name}")
        alone_runs[name] = {seed0: by_lr[alone_lr[name]]}
        for seed in opts.seeds[1:]:
            _common.log(f"alone {name}: seed {seed} at lr {alone_lr[name]:.3g}")
            alone_runs[name][seed] = distill(slice_variant(elastic, name), teacher, stream, lr=alone_lr[name],
                                             seed=seed, opts=opts, joint=False)  # fmt: skip
            alone_runs[name][seed].pop("model")
    # training changes no shape: the checkpoints of the start points weigh what the trained ones do
    joint_bytes = folder_bytes(elastic)
    alone_bytes = {name: folder_bytes(slice_variant(elastic, name)) for name in TRAINED_ALONE}
    alone_bytes["full"] = folder_bytes(teacher)
    teacher_report = _common.report_loss(teacher)

    # ---- report
    report.add("Star Elastic / Nemotron Elastic (MatFormer-style nesting): the nested sizes extracted from ONE joint "
               "elastic training run match the same sizes trained separately, and all of them ship as one "
               "checkpoint (the size of the largest).")
    report.add()
    report.add(f"Setup: teacher `{folder.name}` (stock Qwen3-MoE, 4 layers, hidden 128, 8 experts top-2, "
               f"{opts.teacher_steps} steps), converted with `hf_slim.convert.from_hf` and made elastic with "
               f"`make_elastic(model, ElasticConfig(variants={VARIANTS}), stats)` (defaults: hidden `slimqwen`, "
               f"experts `reap`; statistics of the teacher on {CALIBRATION_ROWS} training rows). Parameters: "
               + ", ".join(f"{n} {params[n] / 1e6:.2f}M" for n in NAMES) + ". Every run: `SlimDistillationTrainer` "
               f"defaults (λ 1.0 -> 0.75 linear, forward KL, T = 1; β = 0, no MTP heads), AdamW, cosine LR with 5% "
               f"warm-up, {opts.steps} steps of 16 x {_common.SEQ} tokens, distilled from the teacher. Joint: "
               "`elastic_sampling=\"sandwich\"` (full + small + the middle one = all three variants on every batch, "
               "the loss averaged over them), `elastic_teacher=\"teacher\"`. Alone: `slice_variant(elastic, name)`, "
               "then the same trainer without elastic sampling. Token budget: every variant sees "
               f"{opts.steps} x 16 x {_common.SEQ} tokens in both arms (the joint run's compute is that of the alone "
               "runs together, plus the full variant's passes); the same rows in the same order for every run of a "
               "seed. The full size 'alone' is the teacher itself, not trained further.")
    report.add()
    report.add(f"Learning rates tuned on the tune split with seed {seed0} (joint: one lr, by the mean tune loss of "
               "its three variants; alone: one lr per size); seed 0's reported run is the tuning run of the chosen "
               "lr. Tune-split losses per lr: joint "
               + _common.grid_text(joint_grid) + "; " + "; ".join(
                   f"alone {n} {_common.grid_text(alone_grid[n])}" for n in TRAINED_ALONE) + ".")
    report.add()
    rows = []
    for name in NAMES:
        joint_values = [joint_runs[s]["report"][name] for s in opts.seeds]
        if name in TRAINED_ALONE:
            alone_values = [alone_runs[name][s]["report"]["model"] for s in opts.seeds]
            alone = f"{_common.mean_std(alone_values)} (lr {alone_lr[name]:.3g})"
        else:
            alone_values = [teacher_report] * len(opts.seeds)
            alone = f"{teacher_report:.3f} (the teacher)"
        gap = _common.mean_std([j - a for j, a in zip(joint_values, alone_values)])
        # the share of the alone run's gain over the sliced start that the joint run gets (per seed)
        share = "—"  # the full size alone is the start point itself
        if name in TRAINED_ALONE:
            shares = [(sliced[name] - j) / (sliced[name] - a) for j, a in zip(joint_values, alone_values)]
            share = f"{100 * statistics.fmean(shares):.0f}%"
        rows.append([name, f"{params[name] / 1e6:.2f}M", f"{sliced[name]:.3f}",
                     f"{_common.mean_std(joint_values)} (lr {joint_lr:.3g})", alone, gap, share])  # fmt: skip
    report.table(["variant", "params", "sliced, untrained", f"joint (sandwich), mean ± std over {len(opts.seeds)} "
                  "seeds", "alone", "joint - alone", "joint gain / alone gain"], rows)  # fmt: skip
    report.add("Report-split loss (nats per token; lower is better). Last column: (sliced - joint) / (sliced - alone), "
               "the share of the alone run's improvement over the sliced start that the joint run reaches (mean over "
               "seeds).")
    report.add()
    separate = sum(alone_bytes.values())
    report.add("Checkpoint size (safetensors bytes written by `save_pretrained`, measured): one elastic checkpoint "
               f"holding all three sizes {joint_bytes:,} B; separate checkpoints small {alone_bytes['small']:,} + "
               f"medium {alone_bytes['medium']:,} + full {alone_bytes['full']:,} = {separate:,} B "
               f"({separate / joint_bytes:.2f}x).")
    report.add()
    report.add("![report-split loss over the steps](claim5_elastic.png)")
    report.add()
    report.add(f"The curves are the report-split loss of each variant every {opts.eval_every} steps, mean over seeds "
               "with a min–max band; step 0 is the sliced, untrained variant.")
    report.add()
    verdicts = []
    for name in TRAINED_ALONE:
        gaps = [joint_runs[s]["report"][name] - alone_runs[name][s]["report"]["model"] for s in opts.seeds]
        mean, spread = statistics.fmean(gaps), statistics.stdev(gaps) if len(gaps) > 1 else float("inf")
        if abs(mean) <= max(spread, 0.01):
            verdicts.append(f"{name}: joint matches alone (gap {mean:+.4f} ± {spread:.4f})")
        elif mean < 0:
            verdicts.append(f"{name}: joint better than alone (gap {mean:+.4f} ± {spread:.4f})")
        else:
            verdicts.append(f"{name}: joint worse than alone (gap {mean:+.4f} ± {spread:.4f})")
    matched = all("worse" not in v for v in verdicts)
    verdict = ("reproduced" if matched else "not reproduced") + ": " + "; ".join(verdicts) + (
        f"; one checkpoint is {separate / joint_bytes:.2f}x smaller than the separate ones.")
    report.add(f"Verdict: {verdict} (a gap within max(std over seeds, 0.01 nats) counts as a match).")
    report.data = {
        "variants": VARIANTS, "params": params, "steps": opts.steps, "seeds": opts.seeds, "sliced_report": sliced,
        "teacher_report_loss": teacher_report, "joint_lr": joint_lr, "alone_lr": alone_lr,
        "joint_tune_grid": {str(k): v for k, v in joint_grid.items()},
        "alone_tune_grid": {n: {str(k): v for k, v in g.items()} for n, g in alone_grid.items()},
        "joint": {str(s): joint_runs[s] for s in opts.seeds},
        "alone": {n: {str(s): r for s, r in runs.items()} for n, runs in alone_runs.items()},
        "checkpoint_bytes": {"elastic": joint_bytes, "separate": alone_bytes}, "verdict": verdict,
    }  # fmt: skip
    panels = []
    for name in TRAINED_ALONE:
        x = [step for step, _ in joint_runs[seed0]["curve"][name]]
        panels.append({
            "title": f"{name} ({params[name] / 1e6:.2f}M parameters)", "xlabel": "optimizer step",
            "ylabel": "report-split loss",
            "series": {
                f"joint (sandwich, lr {joint_lr:.3g})": (x, [[y for _, y in joint_runs[s]["curve"][name]] for s in opts.seeds]),
                f"alone (lr {alone_lr[name]:.3g})": (x, [[y for _, y in alone_runs[name][s]["curve"]["model"]] for s in opts.seeds]),
            },
        })  # fmt: skip
    _common.plot_curves(_common.RESULTS / "claim5_elastic.png", panels)
    report.write()


if __name__ == "__main__":
    main()
