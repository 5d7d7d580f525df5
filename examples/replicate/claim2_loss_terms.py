"""Claim 2 (SlimQwen Table 3): of the four loss terms (LM, KD, MTP-LM, MTP-KD), using all four is best.

SlimQwen, MMLU of the pruned student: NTP-KD 74.16; + LM 74.93; NTP-KD + MTP-KD 75.13; all four terms 75.67. Here,
at toy scale on Python source (`_common`), on the student of claim 1 with 2 MTP depths:

- the teacher `_common.trained_teacher()` converted with `from_hf(teacher, num_mtp_heads=2)` (each new depth starts
  as a copy of the last decoder layer) BEFORE calibration and pruning, so the MTP depths are pruned along (3 layers,
  hidden 96, 4 of 8 experts, `partial_preserve`);
- four arms with `SlimDistillationTrainer`, objective (1-λ)LM + λKD + β((1-μ)MTP-LM + μMTP-KD):
  LM only (λ = 0, β = 0); LM + KD (SlimQwen's λ, linear 1.0 -> 0.75; β = 0); + MTP-LM (default λ and β, cosine
  0.3 -> 0.1; μ = `mtp_lambda` = 0, no MTP-KD); all four (defaults: μ follows λ). MTP-KD's target is the teacher's
  main head at position i + k (the trainer's default; the stock teacher has no MTP heads);
- per arm, the learning rate is tuned on the tune split (main-head loss, seed 0); the seed-0 run at the chosen lr
  is seed 0 of the table; reported on the report split: the main head's loss, each MTP depth's own loss, and MTP
  self-speculative decoding as it runs (`model.generate(ids, use_mtp=True)`, greedy, `model.mtp_stats`) from
  prompts cut from the report split: accepted drafts per verification step and per-depth acceptance.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim2_loss_terms.py
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim2_loss_terms.py --smoke

In the LM-only and LM + KD arms β = 0: their MTP depths are never trained, so their acceptance is that of the
untrained depths (pruned copies of the teacher's last layer with a fresh `eh_proj`).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import _common
import torch
from _common import SEQ, Report, log, mean_std
from claim1_pruned_vs_scratch import (
    Objective,
    StudentShape,
    count_params,
    main_loss,
    parse_grid,
    pruned_student,
    training_rows,
    tuned_arm,
)

NUM_MTP_HEADS = 2

ARMS = {
    "LM only": Objective(kd=False, beta=False),
    "LM + KD": Objective(kd=True, beta=False),
    "LM + KD + MTP-LM": Objective(kd=True, beta=True, mtp_lambda=0.0),
    "all four (LM + KD + MTP-LM + MTP-KD)": Objective(kd=True, beta=True),
}


@torch.no_grad()
def mtp_losses(model, rows: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Each MTP depth's own next-(k+1)-token cross-entropy over `rows` (`out.mtp_losses`, depth 1 first)."""
    model.eval()
    totals = [0.0] * NUM_MTP_HEADS
    batches = 0
    for i in range(0, len(rows), batch_size):
        out = model(input_ids=rows[i : i + batch_size], labels=rows[i : i + batch_size])
        for k, loss in enumerate(out.mtp_losses):
            totals[k] += float(loss)
        batches += 1
    return [t / batches for t in totals]


def prompts(count: int, length: int) -> torch.Tensor:
    """`count` prompts of `length` tokens evenly spaced over the REPORT split."""
    stream = _common.token_stream("report")
    stride = (len(stream) - length) // count
    return torch.stack([stream[i * stride : i * stride + length] for i in range(count)]).long()


@torch.no_grad()
def acceptance(model, prompt_ids: torch.Tensor, new_tokens: int) -> dict:
    """Greedy MTP self-speculative decoding of every prompt (batch 1, as docs/mtp.md and
    benchmarks/bench_mtp_acceptance.py do), pooled over the prompts: accepted drafts per verification step that
    drafted, tokens per verification step, per-depth acceptance; and how many outputs equal plain greedy."""
    model.eval()
    pad = _common.tokenizer().pad_token_id
    common = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    drafted: list[int] = []
    accepted: list[int] = []
    steps = new = equal = 0
    # Training with TRL's default bf16=True leaves accelerate's bf16 autocast wrapper on the model's `forward` (an
    # instance attribute); decode in float32 without it, where greedy MTP decoding equals plain greedy exactly (in
    # bf16 a multi-token verification rounds differently from a one-token step, and near-ties flip).
    autocast_forward = vars(model).pop("forward", None)
    try:
        for ids in prompt_ids:
            ids = ids[None]
            with_mtp = model.generate(ids, use_mtp=True, **common)
            stats = model.mtp_stats
            drafted += stats.drafted
            accepted += stats.accepted
            steps += len(stats.new_tokens)
            new += sum(stats.new_tokens)
            equal += int(torch.equal(with_mtp, model.generate(ids, **common)))
    finally:
        if autocast_forward is not None:
            model.forward = autocast_forward
    drafting = [(a, d) for a, d in zip(accepted, drafted) if d > 0]
    per_depth = []
    for depth in range(1, NUM_MTP_HEADS + 1):
        reached = [a for a, d in drafting if d >= depth]
        per_depth.append(sum(a >= depth for a in reached) / len(reached) if reached else float("nan"))
    return {
        "accepted_per_step": sum(a for a, _ in drafting) / len(drafting),
        "tokens_per_step": new / steps,
        "depth_acceptance": per_depth,
        "equal_to_greedy": equal,
        "prompts": len(prompt_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=1500, help="steps of the shared trained teacher")
    parser.add_argument("--steps", type=int, default=80, help="training steps of 16 x 128 tokens per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--grid", default="1e-3,3e-3,9e-3", help="initial lr grid (geometric, extended as needed)")
    parser.add_argument("--prompts", type=int, default=12, help="report-split prompts for the acceptance")
    parser.add_argument("--prefix", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny teacher, 4 steps, 2 seeds (tests the pipeline)")
    args = parser.parse_args()
    if args.smoke:
        args.teacher_steps, args.steps, args.seeds, args.prompts, args.new_tokens = 20, 4, 2, 3, 8
    torch.set_num_threads(1)
    name = "claim2_loss_terms"
    report = Report(name, "Claim 2: all four loss terms (LM, KD, MTP-LM, MTP-KD) vs fewer")
    shape = StudentShape()

    teacher, folder = _common.trained_teacher(steps=args.teacher_steps)  # the defaults' key: the shared teacher
    teacher_loss = _common.report_loss(teacher)
    student = pruned_student(teacher, shape, num_mtp_heads=NUM_MTP_HEADS)
    report_rows = _common.eval_rows("report")
    prompt_ids = prompts(args.prompts, args.prefix)
    before = {"main": main_loss(student, report_rows), "mtp": mtp_losses(student, report_rows),
              "acceptance": acceptance(student, prompt_ids, args.new_tokens)}
    train_set = training_rows(args.steps)
    eval_every = max(1, args.steps // 5)
    run_root = _common.CACHE / "runs" / name

    results = {}
    for arm, objective in ARMS.items():
        measured: dict[int, dict] = {}

        def keep(seed, model, measured=measured, arm=arm):
            # the final runs' models: MTP losses and decoding acceptance on the report split
            measured[seed] = {"mtp": mtp_losses(model, report_rows),
                              "acceptance": acceptance(model, prompt_ids, args.new_tokens)}
            log(f"{arm} seed {seed}: {measured[seed]}")

        results[arm] = tuned_arm(arm.replace(" ", "_"), lambda seed: copy.deepcopy(student), teacher, objective,
                                 steps=args.steps, grid=parse_grid(args.grid), seeds=args.seeds, train_set=train_set,
                                 run_root=run_root, eval_every=eval_every, keep_model=keep)
        results[arm]["measured"] = [measured[s] for s in range(args.seeds)]

    # ---------------------------------------------------------------- the report
    tokens = args.steps * 16 * SEQ
    report.add("SlimQwen (Table 3, MMLU of the pruned student): NTP-KD 74.16; + LM 74.93; NTP-KD + MTP-KD 75.13; all "
               "four terms 75.67. Claim: training with all four terms (LM, KD, MTP-LM, MTP-KD) gives the best main "
               "model.")
    report.add()
    report.add(f"Setup: teacher `_common.trained_teacher(steps={args.teacher_steps})` (stock Qwen3-MoE, "
               f"{count_params(teacher) / 1e6:.2f}M parameters, report loss {teacher_loss:.3f}); student = "
               f"`from_hf(teacher, num_mtp_heads={NUM_MTP_HEADS})` calibrated with `collect_statistics` on "
               f"{shape.calibration_rows} training-split rows and pruned with `prune` to {shape.text()}, the MTP "
               f"depths pruned along: {count_params(student) / 1e6:.2f}M parameters with its MTP depths. Every arm "
               f"trains a copy of it with `SlimDistillationTrainer` (AdamW, cosine, 5% warm-up, weight decay 0.01, "
               f"forward KL, T = 1) for {args.steps} steps of 16 x {SEQ} tokens ({tokens / 1e6:.2f}M tokens; the same "
               f"rows in the same order for every arm of a seed). Arms: LM only (λ = 0, β = 0); LM + KD (λ linear "
               f"1.0 -> 0.75, β = 0); + MTP-LM (same λ, β cosine 0.3 -> 0.1, `mtp_lambda=0`: MTP-LM only); all four "
               f"(defaults: MTP part β((1-λ)MTP-LM + λMTP-KD), MTP-KD target the teacher's main head at i + k).")
    report.add()
    report.add(f"Protocol: per arm, lr tuned on the tune split (main-head loss, seed 0) over a geometric grid "
               f"extended until the best is strictly inside; the seed-0 run at the chosen lr is seed 0 of the table. "
               f"Reported on the report split, mean ± sample std over {args.seeds} seeds: main-head loss, each MTP "
               f"depth's loss, and greedy MTP self-speculative decoding (`generate(ids, use_mtp=True)`, batch 1) of "
               f"{args.prompts} prompts of {args.prefix} tokens cut evenly from the report split, {args.new_tokens} "
               f"new tokens each: accepted drafts per verification step (pooled over the steps that drafted; at most "
               f"{NUM_MTP_HEADS}) and per-depth acceptance (depth k counts only when depths < k were accepted). "
               f"**In the LM-only and LM + KD arms β = 0: their MTP depths are never trained, so their acceptance "
               f"is that of untrained depths** (pruned copies of the teacher's last layer with a fresh `eh_proj`).")
    report.add()

    def measured(arm, key, index=None):
        values = [m[key] if index is None else m[key][index] for m in results[arm]["measured"]]
        return values

    def accept(arm, key, index=None):
        return [m["acceptance"][key] if index is None else m["acceptance"][key][index]
                for m in results[arm]["measured"]]

    b = before["acceptance"]
    rows = [["pruned, before training", "-", f"{before['main']:.3f}",
             *[f"{v:.3f}" for v in before["mtp"]], f"{b['accepted_per_step']:.3f}",
             *[f"{v:.3f}" for v in b["depth_acceptance"]]]]
    for arm, res in results.items():
        rows.append([arm, f"{res['lr']:.3g}", mean_std(res["report"]),
                     *[mean_std(measured(arm, "mtp", k)) for k in range(NUM_MTP_HEADS)],
                     mean_std(accept(arm, "accepted_per_step")),
                     *[mean_std(accept(arm, "depth_acceptance", k)) for k in range(NUM_MTP_HEADS)]])
    report.table(["arm", "lr (tuned)", "main-head loss", *[f"MTP depth {k + 1} loss" for k in range(NUM_MTP_HEADS)],
                  "accepted / step", *[f"depth {k + 1} acceptance" for k in range(NUM_MTP_HEADS)]], rows)
    equal = sum(m["acceptance"]["equal_to_greedy"] for res in results.values() for m in res["measured"])
    total = sum(m["acceptance"]["prompts"] for res in results.values() for m in res["measured"])
    report.add(f"Training ran under TRL's default bf16 autocast; decoding is measured in float32 (the autocast "
               f"wrapper that training leaves on `forward` removed). MTP decoding gave plain greedy's tokens in "
               f"{equal} of {total} generations (a correctness check of the speculative path). Teacher's report "
               f"loss: {teacher_loss:.3f}.")
    report.add()
    report.add("Learning-rate grids (tune-split main-head loss, seed 0):")
    report.add()
    for arm, res in results.items():
        report.add(f"- {arm}: {res['grid_text']}")
    report.add()

    names = list(ARMS)
    full = names[-1]

    def diffs(a, key="report"):
        return [x - y for x, y in zip(results[full][key], results[a][key])]

    report.table(["main-head report loss, all four - arm (per seed)", "difference", "seeds where all four is lower"],
                 [[arm, mean_std(diffs(arm)), f"{sum(d < 0 for d in diffs(arm))}/{args.seeds}"]
                  for arm in names[:-1]])
    means = {arm: statistics.fmean(res["report"]) for arm, res in results.items()}
    best = min(means, key=means.get)
    all_lower = all(all(d < 0 for d in diffs(arm)) for arm in names[:-1])
    kd_helps = all(x < y for x, y in zip(results["LM + KD"]["report"], results["LM only"]["report"]))
    mtp_accept = statistics.fmean(accept(full, "accepted_per_step"))
    mtplm_accept = statistics.fmean(accept("LM + KD + MTP-LM", "accepted_per_step"))
    verdict = "reproduced" if all_lower else "partly reproduced" if best == full or kd_helps else "not reproduced"
    report.add(f"Lowest mean main-head loss: {best}. All four below every other arm on every seed: {all_lower}. "
               f"LM + KD below LM only on every seed: {kd_helps}. Accepted drafts per step, all four vs + MTP-LM "
               f"(what MTP-KD adds to the heads): {mtp_accept:.3f} vs {mtplm_accept:.3f}.")
    report.add()
    report.add(f"Verdict on the main model (the claim): **{verdict}** at {tokens / 1e6:.2f}M tokens per run; see the "
               f"per-seed differences above for the size of each gap against its seed-to-seed spread.")
    report.add()

    x = [eval_every * (i + 1) for i in range(len(results[full]["report_curves"][0]))]
    _common.plot_curves(_common.RESULTS / f"{name}.png", [
        {"title": "report-split main-head loss (32 rows)", "xlabel": "step", "ylabel": "cross-entropy",
         "series": {arm: (x, res["report_curves"]) for arm, res in results.items()}},
        {"title": "MTP acceptance per depth (greedy decoding)", "xlabel": "depth", "ylabel": "acceptance",
         "series": {arm: (list(range(1, NUM_MTP_HEADS + 1)),
                          [m["acceptance"]["depth_acceptance"] for m in res["measured"]])
                    for arm, res in results.items()}},
    ])  # fmt: skip
    report.add(f"![main-head loss vs step and acceptance per depth]({name}.png) — left: report-split main-head loss "
               f"during training (32 rows; mean over seeds, band = min–max); right: per-depth acceptance of greedy "
               f"MTP decoding (the LM-only and LM + KD arms' depths are untrained).")
    report.data.update(
        teacher_report_loss=teacher_loss, before=before, steps=args.steps, seeds=args.seeds, tokens_per_run=tokens,
        student=shape.text(), student_params=count_params(student), teacher_folder=folder.name, arms=results,
        eval_every=eval_every, prompts=args.prompts, prefix=args.prefix, new_tokens=args.new_tokens, verdict=verdict,
    )  # fmt: skip
    report.write()


if __name__ == "__main__":
    main()
