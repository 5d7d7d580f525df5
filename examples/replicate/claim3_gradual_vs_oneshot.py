"""Claim 3 (SlimQwen, progressive pruning): two gradual, depth-first stages beat one-shot pruning at equal tokens.

SlimQwen prunes in two stages (40B then 360B distillation tokens, the LR schedule continuing across them): stage 1
makes half of the depth cut, stage 2 the rest of the depth and all the width; that beat one-shot pruning to the final
size (MMLU 75.86 -> 77.39, MMLU-Redux 75.41 -> 78.01), and a third stage gave nothing more.

Here, at equal total tokens (N steps of 16 x 128 tokens), from the shared trained teacher (`_common.trained_teacher`,
converted to SlimMoe) to the final size (2 of 4 layers, hidden 96 of 128, 4 of 8 experts, top-2 kept):
- one-shot: `ProgressivePlan(stages=[final])`, then distill N steps;
- two stages: `ProgressivePlan.depth_first(final)` (stage 1: 4 -> 3 layers; stage 2: 3 -> 2 layers, hidden and
  experts), distilling N1 = share x N steps after stage 1 and N - N1 after stage 2 with the LR and λ schedules
  continuing (`schedule_step_offset` / `schedule_total_steps`), as trainers/progressive.py does.
Both arms run through `prune_progressively` (calibrate -> prune -> distill per stage) and see the same rows in the
same order (one shuffled stream per seed, read sequentially across stages). The learning rate of each arm is tuned
on the tune split (seed 0); the table is the report split over 3 seeds.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim3_gradual_vs_oneshot.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim3_gradual_vs_oneshot.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


FINAL = dict(num_hidden_layers=2, hidden_size=96, num_experts=4)  # from 4 layers, hidden 128, 8 experts
CALIBRATION_ROWS = 64  # training rows (of SEQ tokens) each stage's statistics are collected on


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="total distillation steps of each arm")
    parser.add_argument("--stage1-share", type=float, default=0.1, help="share of the steps after stage 1 (SlimQwen 0.1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3], help="initial lr grid (geometric)")
    parser.add_argument("--eval-every", type=int, default=15, help="steps between two points of the curve")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--smoke", action="store_true", help="a tiny run of the whole pipeline (~2 minutes)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.grid, args.eval_every, args.teacher_steps = 10, [0, 1], [1e-3, 3e-3, 9e-3], 5, 20
    return args


# ------------------------------------------------------------------------------------------------ pieces


def curve_callback(rows: torch.Tensor, every: int, offset: int, points: list):
    """Report-split loss at the start of a stage, every `every` steps and at its end, on the global step axis."""
    from transformers import TrainerCallback

    class Curve(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            points.append((offset, _common.mean_loss(model, rows)))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = offset + state.global_step
            if step % every == 0 or state.global_step == state.max_steps:
                points.append((step, _common.mean_loss(model, rows)))

    return Curve()


def distill(student, teacher, rows, *, lr, seed, offset, total, run_dir, curve_rows, every, points):
    """`SlimDistillationTrainer` over `rows` in their order (sequential sampler), the LR and λ/β schedules at global
    steps `offset .. offset + len(rows) / 16` of `total`."""
    from trainers import SlimDistillationConfig, SlimDistillationTrainer

    steps = len(rows) // 16
    args = SlimDistillationConfig(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, total // 20), weight_decay=0.01, max_length=_common.SEQ,
        beta_start=0.0, beta_end=0.0,
        schedule_step_offset=offset, schedule_total_steps=total, train_sampling_strategy="sequential",
        logging_steps=max(1, steps // 5), save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, activation_checkpointing=False,
    )  # fmt: skip
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=rows, processing_class=_common.tokenizer(),
        callbacks=[curve_callback(curve_rows, every, offset, points)],
    )
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)


def run_arm(arm: str, teacher, stream, *, lr: float, seed: int, opts, calibration) -> dict:
    """Prune the teacher along the arm's plan and distill after every stage; returns the final tune and report
    losses and the report-split curve."""
    from hf_slim.pruning import ProgressivePlan, PruneConfig, collect_statistics, prune_progressively

    final = PruneConfig(**FINAL)
    if arm == "one-shot":
        plan, steps = ProgressivePlan(stages=[final]), [opts.steps]
    else:
        plan = ProgressivePlan.depth_first(final, num_source_layers=teacher.config.num_hidden_layers)
        first = max(1, round(opts.steps * opts.stage1_share))
        steps = [first, opts.steps - first]
    order = torch.randperm(len(stream), generator=torch.Generator().manual_seed(seed))[: opts.steps * 16]
    bounds = [0] + [sum(steps[: i + 1]) * 16 for i in range(len(steps))]
    report_rows, points = _common.eval_rows("report"), []

    def calibrate(model):
        return collect_statistics(model, calibration, num_samples=len(calibration), max_length=_common.SEQ,
                                  batch_size=16, show_progress=False)  # fmt: skip

    def after_stage(model, index, stage):
        rows = stream.select(order[bounds[index] : bounds[index + 1]].tolist())
        run_dir = _common.CACHE / "runs" / f"claim3-{arm}-{seed}-{lr:g}-stage{index + 1}"
        return distill(model, teacher, rows, lr=lr, seed=seed, offset=bounds[index] // 16, total=opts.steps,
                       run_dir=run_dir, curve_rows=report_rows, every=opts.eval_every, points=points)  # fmt: skip

    student = prune_progressively(copy.deepcopy(teacher), plan, calibrate, after_stage, after_last_stage=True)
    sizes = {k: getattr(student.config, k) for k in FINAL}
    return {"tune": _common.tune_loss(student), "report": points[-1][1], "curve": points, "sizes": sizes,
            "stage_steps": steps, "params": sum(p.numel() for p in student.parameters())}  # fmt: skip


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    opts = parse_args(argv)
    torch.set_num_threads(1)
    from hf_slim.convert import from_hf

    report = _common.Report("claim3_gradual_vs_oneshot", "Claim 3: two gradual pruning stages vs one-shot (SlimQwen)")
    stock, folder = _common.trained_teacher(steps=opts.teacher_steps)
    teacher = from_hf(stock).eval()
    stream = _common.train_dataset()
    calibration = torch.tensor(stream.select(range(CALIBRATION_ROWS))["input_ids"])
    arms = ("one-shot", "two stages")
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in arms}
    chosen, grids = {}, {}
    for arm in arms:
        by_lr: dict[float, dict] = {}

        def tune_run(lr, arm=arm, by_lr=by_lr):
            by_lr[lr] = run_arm(arm, teacher, stream, lr=lr, seed=opts.seeds[0], opts=opts, calibration=calibration)
            return by_lr[lr]["tune"]

        chosen[arm], grids[arm] = _common.tune_lr(tune_run, opts.grid, label=arm)
        runs[arm][opts.seeds[0]] = by_lr[chosen[arm]]  # the tuning run of the chosen lr is seed 0's run
        for seed in opts.seeds[1:]:
            _common.log(f"{arm}: seed {seed} at lr {chosen[arm]:.3g}")
            runs[arm][seed] = run_arm(arm, teacher, stream, lr=chosen[arm], seed=seed, opts=opts, calibration=calibration)

    teacher_report = _common.report_loss(teacher)
    first = runs["two stages"][opts.seeds[0]]["stage_steps"]
    report.add("SlimQwen (Table 5, progressive pruning): two depth-first stages (40B then 360B tokens, the LR schedule "
               "continuing) beat one-shot pruning to the same size at the same 400B tokens: MMLU 75.86 -> 77.39, "
               "MMLU-Redux 75.41 -> 78.01; three stages gave no further gain.")
    report.add()
    report.add(f"Setup: teacher `{folder.name}` (stock Qwen3-MoE, 4 layers, hidden 128, 8 experts top-2, "
               f"{opts.teacher_steps} steps; report-split loss {teacher_report:.3f}), converted with "
               f"`hf_slim.convert.from_hf`. Final student: {FINAL} (top-2 kept, "
               f"{runs['one-shot'][opts.seeds[0]]['params'] / 1e6:.2f}M parameters), pruned with `prune` defaults "
               f"(depth `last`, hidden `slimqwen`, experts `reap`), statistics of the model each stage starts from on "
               f"{CALIBRATION_ROWS} training rows. Both arms: `SlimDistillationTrainer` defaults (λ 1.0 -> 0.75 "
               f"linear, forward KL, T = 1; no MTP heads, so β = 0), AdamW, cosine LR with 5% warm-up over the {opts.steps} "
               f"steps of 16 x {_common.SEQ} tokens in all. One-shot: 1 stage of {opts.steps} steps. Two stages "
               f"(`ProgressivePlan.depth_first`, `prune_progressively`): 4 -> 3 layers, {first[0]} steps "
               f"({opts.stage1_share:.0%}, SlimQwen's 40B/400B split, not tuned); then 3 -> 2 layers + hidden + "
               f"experts, {first[1]} steps, LR and λ schedules continuing (`schedule_step_offset`, "
               f"`schedule_total_steps`). Same rows in the same order for both arms within a seed (one shuffled "
               "stream per seed, read sequentially across the stages).")
    report.add()
    report.add(f"Learning rate per arm tuned on the tune split with seed {opts.seeds[0]} (the two-stage arm: one lr "
               "for its continuing schedule); seed 0's reported run is that tuning run, seeds "
               f"{', '.join(map(str, opts.seeds[1:]))} rerun at the chosen lr. Report split below.")
    report.add()
    rows = []
    for arm in arms:
        values = [runs[arm][s]["report"] for s in opts.seeds]
        rows.append([arm, f"{chosen[arm]:.3g}", _common.grid_text(grids[arm]), _common.mean_std(values)])
    report.table(["arm", "lr", "tune-split loss per lr (seed 0)", f"report loss, mean ± std over {len(opts.seeds)} seeds"], rows)
    deltas = [runs["one-shot"][s]["report"] - runs["two stages"][s]["report"] for s in opts.seeds]
    wins = sum(d > 0 for d in deltas)
    report.add(f"Per seed, one-shot minus two stages (report loss; > 0: two stages better): "
               f"{', '.join(f'{d:+.4f}' for d in deltas)} (mean {_common.mean_std(deltas, 4)}; two stages better in "
               f"{wins}/{len(deltas)} seeds).")
    report.add()
    report.add("![report-split loss over the steps](claim3_gradual_vs_oneshot.png)")
    report.add()
    report.add("The curve is the report-split loss (96 rows) of the model being trained, every "
               f"{opts.eval_every} steps and at each stage start (the two-stage curve jumps at step {first[0]}, "
               "where stage 2 prunes the rest); mean over seeds with a min–max band.")
    report.add()
    mean_delta = statistics.fmean(deltas)
    spread = statistics.stdev(deltas) if len(deltas) > 1 else float("inf")
    if wins == len(deltas) and mean_delta > spread:
        verdict = "reproduced (direction): two stages reach a lower report loss than one-shot in every seed"
    elif wins == 0 and -mean_delta > spread:
        verdict = "not reproduced: one-shot is better than two stages in every seed"
    else:
        verdict = "not reproduced at this scale: the difference is within the seed spread"
    report.add(f"Verdict: {verdict} (mean gap {mean_delta:+.4f} nats, std over seeds {spread:.4f}).")
    report.data = {
        "final": FINAL, "steps": opts.steps, "stage_steps": first, "seeds": opts.seeds, "lr": chosen,
        "tune_grid": {arm: {str(k): v for k, v in grids[arm].items()} for arm in arms},
        "teacher_report_loss": teacher_report, "verdict": verdict,
        "runs": {arm: {str(s): runs[arm][s] for s in opts.seeds} for arm in arms},
    }  # fmt: skip
    _common.plot_curves(
        _common.RESULTS / "claim3_gradual_vs_oneshot.png",
        [{
            "title": f"2 of 4 layers, hidden 96, 4 experts; {opts.steps} steps",
            "xlabel": "optimizer step (all stages)", "ylabel": "report-split loss",
            "series": {f"{arm} (lr {chosen[arm]:.3g})": ([x for x, _ in runs[arm][opts.seeds[0]]["curve"]],
                                                          [[y for _, y in runs[arm][s]["curve"]] for s in opts.seeds])
                       for arm in arms},
        }],
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
