"""Claim 4 (SlimQwen): expert-importance strategies compared at a size where experts specialise.

SlimQwen ranks the experts to keep by frequency E[1{i in topk(x)}], by the soft score E[1{i in topk} z_i / sum_topk z_j],
by REAP (mean over routed tokens of z_i ||E_i(x)||), by merging (each discarded expert averaged into its most similar
kept one, importance-weighted) and by partial preservation (Algorithm 1: the top half of the kept experts intact, the
rest merged into a base set), and reports mixed results, better on MMLU-Pro / GSM8K for partial preservation.

Setup: a stock Qwen3-MoE teacher with MANY small experts (64 experts of width 32, top-4, hidden 128, 4 layers, trained
from scratch with a load-balancing loss, `_common.trained_teacher`), fixed for every seed. For each seed: calibration
statistics (`collect_statistics`) on a seed-chosen sample of training-split rows; then, for each strategy and a random
selection (the sanity floor), `prune` to 16 experts per layer ONLY (depth, widths and top-4 kept, so every student has
the same active and total size and only the chosen / merged experts differ); report-split loss before recovery; a
`SlimDistillationTrainer` recovery from the teacher (same steps and data order for every strategy of a seed, the order
varying with the seed); report-split loss after. The recovery lr is tuned per strategy on the tune split (seed 0's
calibration), strictly inside its grid.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim4_expert_strategies.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim4_expert_strategies.py --smoke

Writes docs/results/claim4_expert_strategies.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics

import torch

import _common as c


STRATEGIES = ("random", "frequency", "soft", "reap", "merge", "partial_preserve")
SCORES = ("frequency", "soft", "reap")  # the drop-only scores whose kept sets are compared


def load_teacher(args):
    """The fixed 64-expert teacher (stock Qwen3-MoE), trained once and cached by its settings."""
    teacher, folder = c.trained_teacher(
        steps=args.teacher_steps, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_width, output_router_logits=True, router_aux_loss_coef=args.aux_coef,
    )  # fmt: skip
    # the balancing loss shaped the training only; evaluation and KD read the LM loss / logits alone
    teacher.config.output_router_logits = False
    return teacher, folder


def calibration_stats(slim_teacher, seed: int, rows: int):
    """Statistics on `rows` training-split rows drawn with `seed` (the calibration sample varies with the seed)."""
    from hf_slim.pruning import collect_statistics

    stream = c.token_stream("train")
    n = len(stream) // c.SEQ
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + seed))[:rows]
    ids = stream[: n * c.SEQ].view(n, c.SEQ)[pick].long()
    return collect_statistics(slim_teacher, ids, num_samples=rows, max_length=c.SEQ, batch_size=16,
                              show_progress=False)


def random_stats(stats, seed: int):
    """The same statistics with the frequency score replaced by uniform noise: `frequency` on it keeps a random set."""
    noise = torch.rand(stats["expert.frequency"].shape, generator=torch.Generator().manual_seed(2000 + seed))
    return dataclasses.replace(stats, tensors={**stats.tensors, "expert.frequency": noise})


def pruned_student(slim_teacher, stats, strategy: str, seed: int, n_keep: int):
    from hf_slim.pruning import PruneConfig, prune

    if strategy == "random":
        stats, strategy = random_stats(stats, seed), "frequency"
    student = prune(slim_teacher, PruneConfig(num_experts=n_keep, expert_strategy=strategy), stats)
    student.config.output_router_logits = False
    return student


class ReportCurve:
    """Report-split loss every `every` steps of the recovery (a TrainerCallback; observation only, not tuning)."""

    def __init__(self, every: int):
        from transformers import TrainerCallback

        outer = self
        self.every, self.points = every, []

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % outer.every == 0:
                    outer.points.append((state.global_step, c.report_loss(model)))

        self.callback = _Callback()


def recover(student, teacher, *, lr: float, seed: int, steps: int, run_dir, every: int | None = None):
    """Short distillation from the teacher; the same rows and (for a seed) the same order for every strategy."""
    from trainers import SlimDistillationConfig, SlimDistillationTrainer

    args = SlimDistillationConfig(
        output_dir=str(run_dir), max_steps=steps, per_device_train_batch_size=16, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01, max_length=c.SEQ,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", use_cpu=True, seed=seed,
        data_seed=seed, dataloader_num_workers=0, disable_tqdm=True, router_aux_loss_coef=0.0, beta_start=0.0, beta_end=0.0,
    )  # fmt: skip
    curve = ReportCurve(every) if every else None
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=c.train_dataset(rows=steps * 16),
        processing_class=c.tokenizer(), callbacks=[curve.callback] if curve else None,
    )  # fmt: skip
    trainer.train()
    return curve.points if curve else []


# ------------------------------------------------------------------------------------------------ specialisation


def routing_profile(stats, n_keep: int) -> dict:
    """How unevenly the teacher uses its experts, per layer: normalised entropy of the load (1 = uniform), the load
    share of the `n_keep` busiest experts (uniform: n_keep / E), the busiest expert's load over the mean, the number
    of nearly idle experts (load under a tenth of the mean) and the coefficient of variation of the REAP score (how
    much the experts' contributions differ)."""
    freq, reap = stats["expert.frequency"].double(), stats["expert.reap"].double()
    n = freq.shape[1]
    load = freq / freq.sum(1, keepdim=True)
    entropy = -(load * load.clamp_min(1e-30).log()).sum(1) / math.log(n)
    top_share = load.sort(1, descending=True).values[:, :n_keep].sum(1)
    return {
        "load_entropy": entropy.tolist(),
        "top_share": top_share.tolist(),
        "max_over_mean": (load.max(1).values * n).tolist(),
        "idle": (load < 0.1 / n).sum(1).double().tolist(),
        "reap_cv": (reap.std(1) / reap.mean(1)).tolist(),
        "sorted_load": load.sort(1, descending=True).values.tolist(),
    }


def kept_overlap(stats, n_keep: int) -> dict[str, float]:
    """Mean over layers of |A ∩ B| / n_keep between the sets the drop-only scores keep: if they keep the same experts,
    the strategies cannot differ."""
    from hf_slim.pruning.experts import expert_importance
    from hf_slim.pruning.scores import top_indices

    layers = stats["expert.frequency"].shape[0]
    kept = {s: [set(top_indices(expert_importance(stats, i, s), n_keep).tolist()) for i in range(layers)]
            for s in SCORES}
    return {f"{a}~{b}": statistics.fmean(len(x & y) / n_keep for x, y in zip(kept[a], kept[b]))
            for i, a in enumerate(SCORES) for b in SCORES[i + 1:]}


# ------------------------------------------------------------------------------------------------ verdict


def _paired(a: list[float], b: list[float]) -> tuple[float, float, int]:
    """Mean and sample std of a - b over seeds, and in how many seeds a < b."""
    diffs = [x - y for x, y in zip(a, b)]
    std = statistics.stdev(diffs) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), std, sum(d < 0 for d in diffs)


def verdict_lines(before: dict, after: dict, strategies: list[str]) -> list[str]:
    """What the numbers say, computed from them: is each step of the ranking larger than its paired spread, and do
    merging / partial preservation beat dropping by the same importance (frequency) and the best drop-only score?"""
    seeds = len(next(iter(after.values())))
    order = sorted(strategies, key=lambda s: statistics.fmean(after[s]))
    lines = ["Measured (after recovery, paired over seeds; 'separated' = |mean Δ| > std of Δ and the same sign in "
             "every seed):", ""]
    for better, worse in zip(order, order[1:]):
        mean, std, wins = _paired(after[better], after[worse])
        separated = abs(mean) > std and wins in (0, seeds)
        lines.append(f"- {better} vs {worse}: Δ {mean:+.4f} ± {std:.4f}, better in {wins}/{seeds} seeds: "
                     f"{'separated' if separated else 'NOT separated'}")
    drops = [s for s in ("frequency", "soft", "reap") if s in strategies]
    best_drop = min(drops, key=lambda s: statistics.fmean(after[s])) if drops else None
    for merged in ("merge", "partial_preserve"):
        for ref in dict.fromkeys(r for r in ("frequency", best_drop) if r and r != merged):
            if merged in strategies and ref in strategies:
                for name, table in (("before", before), ("after", after)):
                    mean, std, wins = _paired(table[merged], table[ref])
                    lines.append(f"- {merged} vs {ref} ({name} recovery): Δ {mean:+.4f} ± {std:.4f}, better in "
                                 f"{wins}/{seeds} seeds")
    lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny run of the whole pipeline (~2 minutes)")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-width", type=int, default=32)
    parser.add_argument("--aux-coef", type=float, default=0.01, help="teacher's load-balancing loss coefficient")
    parser.add_argument("--keep", type=int, default=16, help="experts kept per layer")
    parser.add_argument("--calibration-rows", type=int, default=128, help="rows of 128 tokens per calibration")
    parser.add_argument("--recovery-steps", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="3e-4,1e-3,3e-3", help="recovery lr grid (geometric, extended if needed)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()
    if args.smoke:
        args.teacher_steps, args.recovery_steps, args.seeds, args.calibration_rows = 20, 2, 2, 16
        args.experts, args.keep, args.grid = 16, 4, "1e-6,1e-4,1e-2"
    torch.set_num_threads(1)
    from hf_slim.convert import from_hf

    strategies = args.strategies.split(",")
    grid = [float(x) for x in args.grid.split(",")]
    report = c.Report("claim4_expert_strategies", "Claim 4: expert strategies, 64 -> 16 experts")
    teacher, folder = load_teacher(args)
    slim_teacher = from_hf(teacher).eval()
    teacher_loss = c.report_loss(teacher)
    c.log(f"teacher {folder.name}: report loss {teacher_loss:.4f}")
    runs = c.CACHE / "runs" / "claim4"
    stats = {s: calibration_stats(slim_teacher, s, args.calibration_rows) for s in range(args.seeds)}

    # ---- the recovery lr of each strategy, on the tune split (seed 0's calibration and data order)
    chosen, grids = {}, {}
    for strategy in strategies:
        def tune_run(lr, strategy=strategy):
            student = pruned_student(slim_teacher, stats[0], strategy, 0, args.keep)
            try:
                recover(student, slim_teacher, lr=lr, seed=0, steps=args.recovery_steps, run_dir=runs / "tune")
            except FloatingPointError:  # the trainer refuses a non-finite loss: this lr diverges
                return math.inf
            return c.tune_loss(student)

        chosen[strategy], grids[strategy] = c.tune_lr(tune_run, grid, label=strategy)

    # ---- every seed: prune, measure, recover, measure
    every = max(1, args.recovery_steps // 5)
    before, after, curves = ({s: [] for s in strategies} for _ in range(3))
    for seed in range(args.seeds):
        for strategy in strategies:
            student = pruned_student(slim_teacher, stats[seed], strategy, seed, args.keep)
            before[strategy].append(c.report_loss(student))
            points = recover(student, slim_teacher, lr=chosen[strategy], seed=seed, steps=args.recovery_steps,
                             run_dir=runs / "final", every=every)
            after[strategy].append(c.report_loss(student))
            curves[strategy].append([before[strategy][-1]] + [loss for _, loss in points])
            c.log(f"seed {seed} {strategy}: before {before[strategy][-1]:.4f} after {after[strategy][-1]:.4f}")
    steps_axis = [0] + [step for step, _ in points]

    # ---- report
    profiles = [routing_profile(stats[s], args.keep) for s in range(args.seeds)]
    overlaps = [kept_overlap(stats[s], args.keep) for s in range(args.seeds)]
    layers = len(profiles[0]["load_entropy"])
    uniform_share = args.keep / args.experts
    report.add("SlimQwen's claim: frequency, soft, REAP, merging and partial preservation (Algorithm 1) are compared "
               "as expert-selection strategies; results mixed, partial preservation better on MMLU-Pro / GSM8K.")
    report.add()
    report.add(f"Setup: teacher = stock Qwen3-MoE, hidden 128, {layers} layers, {args.experts} experts of width "
               f"{args.expert_width}, top-{args.top_k}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M "
               f"parameters, trained from scratch {args.teacher_steps} steps (lr 3e-3, LM loss + {args.aux_coef} x "
               f"load-balancing loss), report loss {teacher_loss:.3f}; fixed for all seeds. Students: `prune` to "
               f"{args.keep} experts per layer only (depth, widths and top-{args.top_k} kept, so every student has "
               f"the same size; top-k not reduced, so the active size equals the teacher's). `merge` and "
               f"`partial_preserve` use PruneConfig's defaults (similarity `router_logits`, importance `frequency`); "
               f"`random` keeps a seed-drawn random set (dropping, no merge). Calibration: {args.calibration_rows} "
               f"rows of {c.SEQ} training-split tokens drawn with the seed. Recovery: `SlimDistillationTrainer` from "
               f"the teacher (λ 1 -> 0.75, no MTP heads, no aux loss), {args.recovery_steps} steps of 16 x {c.SEQ} tokens, cosine, "
               f"the same rows and (per seed) the same order for every strategy. Seeds {args.seeds}: each varies the "
               f"calibration sample, the random set and the recovery data order; the teacher is the same.")
    report.add()
    report.add("Expert specialisation of the teacher (mean over layers and seeds' calibration samples; uniform "
               f"routing gives entropy 1, top-{args.keep} load share {uniform_share:.2f}, max / mean 1, no idle expert):")
    report.add()
    mean = lambda key: statistics.fmean(v for p in profiles for v in p[key])
    report.table(
        ["layer", "load entropy / log E", f"load share of the top {args.keep}", "max / mean load",
         "idle experts (< 0.1 x mean load)", "CV of REAP score"],
        [[i, f"{statistics.fmean(p['load_entropy'][i] for p in profiles):.3f}",
          f"{statistics.fmean(p['top_share'][i] for p in profiles):.3f}",
          f"{statistics.fmean(p['max_over_mean'][i] for p in profiles):.1f}",
          f"{statistics.fmean(p['idle'][i] for p in profiles):.1f}",
          f"{statistics.fmean(p['reap_cv'][i] for p in profiles):.2f}"] for i in range(layers)]
        + [["mean", f"{mean('load_entropy'):.3f}", f"{mean('top_share'):.3f}", f"{mean('max_over_mean'):.1f}",
            f"{mean('idle'):.1f}", f"{mean('reap_cv'):.2f}"]],
    )  # fmt: skip
    report.add(f"Overlap of the kept sets (|A ∩ B| / {args.keep}, mean over layers, mean ± std over seeds): "
               + "; ".join(f"{k.replace('~', ' vs ')} {c.mean_std([o[k] for o in overlaps], 2)}" for k in overlaps[0])
               + ".")
    report.add()
    report.add("Recovery lr per strategy (tune split, seed 0; chosen value strictly inside the grid): "
               + "; ".join(f"{s} **{chosen[s]:.3g}** ({c.grid_text(grids[s])})" for s in strategies) + ".")
    report.add()

    order = sorted(strategies, key=lambda s: statistics.fmean(after[s]))
    per_seed_rank = [sorted(strategies, key=lambda s: after[s][k]) for k in range(args.seeds)]
    report.add(f"Report-split loss (mean ± std over {args.seeds} seeds; teacher {teacher_loss:.3f}). Rank by the mean "
               "after recovery; 'ranks per seed' is the rank in each seed separately.")
    report.add()
    report.table(
        ["strategy", "loss before recovery", "loss after recovery", "rank", "ranks per seed", "recovery lr"],
        [[s, c.mean_std(before[s]), c.mean_std(after[s]), order.index(s) + 1,
          "/".join(str(r.index(s) + 1) for r in per_seed_rank), f"{chosen[s]:.3g}"] for s in order],
    )  # fmt: skip
    base = "frequency" if "frequency" in strategies else order[0]
    report.add(f"Paired differences to `{base}` (same seed, calibration sample and data order; mean ± std over seeds; "
               "negative = better):")
    report.add()
    report.table(
        ["strategy", "Δ before recovery", "Δ after recovery"],
        [[s, c.mean_std([a - b for a, b in zip(before[s], before[base])]),
          c.mean_std([a - b for a, b in zip(after[s], after[base])])] for s in order if s != base],
    )  # fmt: skip

    report.data.update(
        settings=vars(args), teacher=folder.name, teacher_report_loss=teacher_loss, chosen_lr=chosen,
        lr_grids={s: {str(k): v for k, v in g.items()} for s, g in grids.items()}, before=before, after=after,
        curve_steps=steps_axis, curves=curves, overlaps=overlaps,
        profiles=[{k: v for k, v in p.items() if k != "sorted_load"} for p in profiles],
    )  # fmt: skip
    png = c.RESULTS / "claim4_expert_strategies.png"
    c.plot_curves(png, [
        {"title": "teacher expert load, sorted (band: layers x seeds)", "xlabel": "expert rank", "ylabel":
         "share of routed tokens", "series": {"teacher": (list(range(1, args.experts + 1)),
                                                          [row for p in profiles for row in p["sorted_load"]])}},
        {"title": f"recovery of the {args.keep}-expert students", "xlabel": "recovery step",
         "ylabel": "report-split loss", "series": {s: (steps_axis, curves[s]) for s in order}},
    ])  # fmt: skip
    report.add(f"![recovery curves]({png.name})")
    report.add()
    for line in verdict_lines(before, after, strategies):
        report.add(line)
    report.write()


if __name__ == "__main__":
    main()
