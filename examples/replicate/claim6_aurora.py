"""Claim 6 — Aurora (Tilde Research), a leverage-aware Muon: dead MLP neurons, a small MoE LM, and LoRA.

The seed's statement: Muon's polar factor of a tall m x n update cannot have equal row norms, so some MLP neurons get
persistently tiny updates and die ("over a quarter of MLP neurons effectively dead by step 500" under Muon); Aurora
targets equal row norms and keeps them alive. Open question: does Aurora fix Muon on LoRA?

Parts (`--parts a,b,c`, each written into its own section of docs/results/claim6_aurora.md; a part run alone keeps
the other parts' sections from the previous run):

a. Dead neurons: dense Qwen3 with a wide MLP, a short Muon settings scan (seed 0), then the chosen setting with Muon,
   Aurora and AdamW over 3 seeds; `hf_slim.optim.health.NeuronHealthCallback`'s own code, driven around
   `opt.step()` every step (benchmarks/bench_aurora.py `_train`), gives the dead fraction.
b. A small stock Qwen3-MoE from scratch: AdamW vs Muon vs Aurora, each lr tuned on the tune split with
   `_common.tune_lr` (strictly inside its grid), then 3 seeds on the report split, same batches per seed.
c. LoRA on a base pretrained (AdamW) on the training split, fine-tuned on sympy's sources (not in any split):
   AdamW-LoRA vs Muon on the factors vs Aurora on the factors vs Aurora-LoRA (whitened joint update); lr tuned on one
   held-out set of sympy files, reported on another disjoint one.

Muon everywhere = `Aurora(groups, **AURORA_PRESETS["muon"])` (Keller Jordan's 5-step Newton–Schulz, no row
balancing; fused 3D experts handled as batched matrices, which `torch.optim.Muon` does not take). Muon-style arms put
embeddings, head, norms and routers in AdamW (`aurora_param_groups`).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim6_aurora.py --parts a,b,c
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim6_aurora.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
from bench_aurora import _dense_model, _train

from hf_slim.optim import (
    AURORA_PRESETS,
    Aurora,
    AuroraLoRA,
    aurora_lora_param_groups,
    aurora_param_groups,
)

NAME = "claim6_aurora"
PART_TITLES = {
    "a": "Part (a): dead MLP neurons under Muon vs Aurora",
    "b": "Part (b): small MoE LM from scratch, AdamW vs Muon vs Aurora",
    "c": "Part (c): LoRA fine-tuning on a domain shift (sympy)",
}
FT_PACKAGE = "sympy"  # fine-tuning domain of part (c): installed by the lock, in none of _common's splits


# ------------------------------------------------------------------------------------------------ shared pieces


def train_rows() -> torch.Tensor:
    """The training split as `[rows, SEQ]` (the rows of `_common.train_dataset()`, without the Dataset detour)."""
    stream = C.token_stream("train").long()
    n = len(stream) // C.SEQ
    return stream[: n * C.SEQ].view(n, C.SEQ)


def batches(rows: torch.Tensor, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches drawn by a seeded permutation of the rows: the same order for every method of a seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(-(-steps * batch_size // len(rows)))])
    return [rows[order[i * batch_size : (i + 1) * batch_size]] for i in range(steps)]


def make_opt(name: str, model, lr: float, *, adamw_lr: float = 3e-3, weight_decay: float = 0.0):
    """AdamW (everything), Muon / Aurora (hidden matrices; AdamW at `adamw_lr` on embeddings, head, norms, routers),
    or Aurora-LoRA (the whitened joint update of each LoRA pair). fp32 polar iterations on this CPU."""
    if name.startswith("AdamW"):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    if name.startswith("Aurora-LoRA"):
        return AuroraLoRA(aurora_lora_param_groups(model), lr=lr, adamw_lr=adamw_lr, ns_dtype="float32")
    preset = AURORA_PRESETS["muon"] if name.startswith("Muon") else {}
    return Aurora(aurora_param_groups(model), lr=lr, adamw_lr=adamw_lr, weight_decay=weight_decay,
                  ns_dtype="float32", **preset)  # fmt: skip


def lr_schedule(opt, steps: int):
    """Cosine with 5% linear warm-up, as `_common.training_args` (applied to every group's own lr)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)


def fit(model, opt, data: list[torch.Tensor], *, track_dead: bool = False, schedule: bool = True):
    """bench_aurora's `_train` (NeuronHealthCallback around `opt.step()` when `track_dead`), with a cosine schedule."""
    if schedule:
        sched = lr_schedule(opt, len(data))
        step = opt.step

        def stepped(*args, **kwargs):
            out = step(*args, **kwargs)
            sched.step()
            return out

        opt.step = stepped
    return _train(model, opt, data, track_dead=track_dead)


def smooth(x: list[float], k: int = 20) -> list[float]:
    return [statistics.fmean(x[max(0, i - k + 1) : i + 1]) for i in range(len(x))]


def finite(x: float) -> float:
    return x if math.isfinite(x) else float("inf")


def table_rows(results: dict, names: list[str], best: dict) -> list[list[str]]:
    return [[n, f"{best[n]:.3g}", C.mean_std(results[n]), ", ".join(f"{v:.3f}" for v in results[n])] for n in names]


# ------------------------------------------------------------------------------------------------ part (a)


def parse_setting(spec: str) -> dict:
    """`HIDDENxMLP@LR[/wdWD]`, e.g. `32x512@0.05/wd0.1`."""
    shape, _, rest = spec.partition("@")
    lr, _, wd = rest.partition("/wd")
    hidden, _, inter = shape.partition("x")
    return {"hidden": int(hidden), "inter": int(inter), "lr": float(lr), "wd": float(wd or 0.0), "spec": spec}


def dead_run(name: str, s: dict, lr: float, steps: int, seed: int, rows: torch.Tensor, batch_size: int):
    model = _dense_model(C.VOCAB, s["hidden"], s["inter"], seed)
    opt = make_opt(name, model, lr, weight_decay=s["wd"] if name != "AdamW" else 0.0)
    losses, hist = fit(model, opt, batches(rows, steps, batch_size, seed), track_dead=True, schedule=False)
    kinds = {k.split("/")[1]: v for k, v in hist[-1].items() if k.count("/") == 2 and k.endswith("/dead_frac")}
    return {"dead": [h["neuron_health/dead_frac"] for h in hist], "spread": [h["neuron_health/row_spread"] for h in hist],
            "kinds": kinds, "loss": losses, "report": C.report_loss(model)}  # fmt: skip


def part_a(args, rep: list[str], data: dict) -> None:
    rows = train_rows()
    steps, bs = args.a_steps, args.batch
    marks = [m for m in (250, 500) if m < steps] + [steps] if steps > 250 else [max(1, steps // 2), steps]
    rep += [f"Model: dense `Qwen3ForCausalLM` (bench_aurora's `_dense_model`), 2 layers, 4 heads x 16, vocab {C.VOCAB}, "
            f"untied head; batch {bs} x {C.SEQ} tokens of the training split, constant lr (no schedule, as the prior "
            "benchmark). Muon = `Aurora(..., **AURORA_PRESETS[\"muon\"])`, Aurora = the default preset (Polar Express 6, "
            "one balancing iteration, carried row scale), both fp32; AdamW 3e-3 on embeddings, head and norms; AdamW arm = "
            "`torch.optim.AdamW` (betas 0.9/0.95) on everything at 3e-3. Same seed = same init and batches in every arm.",
            "",
            "Dead neuron = `NeuronHealthCallback` at its defaults, measured every step: a neuron (row of `gate_proj`/"
            "`up_proj`, column of `down_proj`) whose update norm stayed below 0.1 x the median of its projection for 10 "
            "consecutive steps; row spread = p90/p10 of the per-neuron update norms (median over projections).", ""]
    scan = [parse_setting(s) for s in args.a_scan.split(",") if s]
    scan_res = {}
    if scan:
        rep += [f"### Settings scan (Muon only, seed 0, {args.a_scan_steps} steps)", "",
                "Aurora was at 0.0% dead in every setting of the prior scan (docs/aurora_bench_neurons.md), so the scan "
                "spends its time on Muon; the setting with the most dead neurons at the last step is then run in full.", ""]
        for s in scan:
            r = dead_run("Muon", s, s["lr"], args.a_scan_steps, 0, rows, bs)
            scan_res[s["spec"]] = r
            C.log(f"scan {s['spec']}: dead {r['dead'][-1]:.3f}, spread {r['spread'][-1]:.1f}, report {r['report']:.3f}")
        half = max(1, args.a_scan_steps // 2)
        C_rows = [[s["spec"], f"{s['inter'] // s['hidden']}x", f"{scan_res[s['spec']]['dead'][half - 1] * 100:.1f}",
                   f"{scan_res[s['spec']]['dead'][-1] * 100:.1f}", f"{scan_res[s['spec']]['spread'][-1]:.1f}",
                   f"{scan_res[s['spec']]['report']:.3f}"] for s in scan]  # fmt: skip
        rep_table(rep, ["hidden x MLP @ lr [/ weight decay]", "expansion", f"Muon dead % at step {half}",
                        f"Muon dead % at step {args.a_scan_steps}", "row spread at end", "report loss"], C_rows)
        data["scan"] = {k: {"dead": v["dead"], "report": v["report"]} for k, v in scan_res.items()}
    chosen = parse_setting(args.a_setting) if args.a_setting else max(scan, key=lambda s: scan_res[s["spec"]]["dead"][-1])
    arms = [("AdamW", 3e-3), ("Muon", chosen["lr"]), ("Aurora", chosen["lr"])]
    rep += [f"### Chosen setting `{chosen['spec']}`: hidden {chosen['hidden']}, MLP {chosen['inter']} "
            f"({chosen['inter'] // chosen['hidden']}x), lr {chosen['lr']:g} on hidden matrices, weight decay {chosen['wd']:g} "
            f"(Muon/Aurora); {steps} steps x {args.seeds} seeds", ""]
    res = {}
    for name, lr in arms:
        res[name] = [dead_run(name, chosen, lr, steps, seed, rows, bs) for seed in range(args.seeds)]
        C.log(f"{name}: dead at end {[round(r['dead'][-1], 3) for r in res[name]]}")
    kinds = sorted({k for runs in res.values() for r in runs for k in r["kinds"]})
    pct = lambda xs: f"{statistics.fmean(xs) * 100:.1f} ({min(xs) * 100:.1f}–{max(xs) * 100:.1f})"
    table = [[name, f"{lr:g}", *[pct([r["dead"][m - 1] for r in res[name]]) for m in marks],
              *[f"{statistics.fmean(r['kinds'].get(k, 0.0) for r in res[name]) * 100:.1f}" for k in kinds],
              f"{statistics.fmean(r['spread'][-1] for r in res[name]):.2f}", C.mean_std([r["report"] for r in res[name]])]
             for name, lr in arms]  # fmt: skip
    rep += ["Dead % of all MLP neurons: mean over seeds (min–max); per projection kind at the end (mean); report-split "
            "loss mean ± std.", ""]
    rep_table(rep, ["optimizer", "lr", *[f"dead % step {m}" for m in marks], *[f"dead % {k}" for k in kinds],
                    "row spread at end", "report loss"], table)
    x = list(range(1, steps + 1))
    C.plot_curves(C.RESULTS / "claim6_dead_neurons.png", [
        {"title": f"Dead MLP neurons, {chosen['spec']} ({args.seeds} seeds)", "xlabel": "step", "ylabel": "dead neurons (%)",
         "series": {f"{n} lr {lr:g}": (x, [[v * 100 for v in r["dead"]] for r in res[n]]) for n, lr in arms}},
        {"title": "Row spread p90/p10 of MLP updates (20-step mean)", "xlabel": "step", "ylabel": "p90 / p10",
         "series": {f"{n} lr {lr:g}": (x, [smooth(r["spread"]) for r in res[n]]) for n, lr in arms}},
        {"title": "Train loss (20-step mean)", "xlabel": "step", "ylabel": "nats/token",
         "series": {f"{n} lr {lr:g}": (x, [smooth(r["loss"]) for r in res[n]]) for n, lr in arms}},
    ])  # fmt: skip
    rep += ["Plot: `claim6_dead_neurons.png` (dead %, row spread and train loss vs step; mean with min–max band).", ""]
    at = min(marks, key=lambda m: abs(m - 500))
    muon, aurora = (statistics.fmean(r["dead"][at - 1] for r in res[n]) * 100 for n in ("Muon", "Aurora"))
    worst_scan = max((r["dead"][min(len(r["dead"]), 500) - 1] * 100 for r in scan_res.values()), default=0.0)
    verdict = ("reproduced" if muon > 25 and aurora < 1 else
               "partly: the mechanism (Muon leaves neurons without updates, Aurora none) reproduces, the magnitude "
               "(> 25% by step 500) does not" if muon > 2 * aurora + 1 else "not reproduced")
    rep += [f"**Verdict (a): {verdict}.** Muon {muon:.1f}% vs Aurora {aurora:.1f}% dead at step {at} (mean of "
            f"{args.seeds} seeds); the most any scanned Muon setting reached by step 500 (seed 0): {worst_scan:.1f}%. "
            "Rule: reproduced = Muon > 25% and Aurora < 1%; partly = Muon > 2 x Aurora + 1 point.", ""]
    data["chosen"] = chosen
    data["runs"] = {n: [{"dead": r["dead"], "report": r["report"], "kinds": r["kinds"]} for r in res[n]] for n in res}
    data["marks"] = marks


def verdict_line(part: str, diffs: list[float], name: str, ref: str) -> str:
    """Paired comparison: a difference counts when its mean exceeds twice its standard error over seeds."""
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("inf")
    word = ("lower (better)" if mean < 0 else "higher (worse)") if abs(mean) > 2 * se else "no clear difference"
    return f"- ({part}) {name} vs {ref}: report loss {mean:+.3f} (paired, ± {se:.3f} s.e.) -> {word}."


def rep_table(rep: list[str], header: list[str], rows: list[list[str]]) -> None:
    rep.append("| " + " | ".join(header) + " |")
    rep.append("|---|" + "---:|" * (len(header) - 1))
    rep += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    rep.append("")


# ------------------------------------------------------------------------------------------------ part (b)


def moe_model(seed: int):
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(C.teacher_config(**MOE_SIZE))


MOE_SIZE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)  # fmt: skip


def part_b(args, rep: list[str], data: dict) -> None:
    rows = train_rows()
    steps, bs = args.b_steps, args.batch
    n_params = sum(p.numel() for p in moe_model(0).parameters())
    rep += [f"Model: stock `Qwen3MoeForCausalLM` from `_common.teacher_config({', '.join(f'{k}={v}' for k, v in MOE_SIZE.items())})` "
            f"({n_params / 1e6:.2f}M parameters; 8 experts top-2, the teacher's vocab {C.VOCAB}). {steps} steps x {bs} x "
            f"{C.SEQ} tokens ({steps * bs * C.SEQ / 1e6:.2f}M tokens, the same for every optimizer), cosine with 5% warm-up. "
            "AdamW = `torch.optim.AdamW` (betas 0.9/0.95, no weight decay) on everything. Muon = `Aurora(..., **AURORA_PRESETS[\"muon\"])` "
            "(not `torch.optim.Muon`, which takes 2D parameters only, not the fused 3D experts), Aurora = the default preset, "
            "both fp32 iterations: the tuned lr on "
            "attention and expert matrices (`aurora_param_groups`), AdamW at AdamW's tuned lr on embeddings, head, norms and "
            "routers. lr tuned with `_common.tune_lr` on the tune split (seed 100, batches of seed 100), reported on the "
            f"report split over seeds 0..{args.seeds - 1}; every optimizer sees the same batches within a seed.", ""]  # fmt: skip
    grids = {"AdamW": [1.5e-3, 3e-3, 6e-3], "Muon": [0.01, 0.02, 0.04], "Aurora": [0.01, 0.02, 0.04]}
    if args.smoke:
        grids = {k: [v[0] / 8, v[0], v[0] * 8] for k, v in grids.items()}
    best, tuned = {}, {}

    def run(name: str, lr: float, seed: int, split: str):
        model = moe_model(seed)
        losses, _ = fit(model, make_opt(name, model, lr, adamw_lr=best.get("AdamW", 3e-3)), batches(rows, steps, bs, seed))
        return finite(C.tune_loss(model) if split == "tune" else C.report_loss(model)), losses

    for name in grids:  # AdamW first: its lr is the AdamW lr of the other arms
        best[name], tuned[name] = C.tune_lr(lambda lr, name=name: run(name, lr, 100, "tune")[0], grids[name], label=name)
    rep += ["Tune-split loss per lr (seed 100): " + "; ".join(f"**{n}** {C.grid_text(tuned[n])} -> {best[n]:.3g}"
                                                            for n in grids), ""]  # fmt: skip
    results, curves = {}, {}
    for name in grids:
        out = [run(name, best[name], seed, "report") for seed in range(args.seeds)]
        results[name], curves[name] = [o[0] for o in out], [smooth(o[1]) for o in out]
        C.log(f"{name} lr {best[name]:.3g}: report {results[name]}")
    rep_table(rep, ["optimizer", "tuned lr", "report loss (mean ± std)", "per seed"], table_rows(results, list(grids), best))
    diffs = {n: [b - a for a, b in zip(results["Muon"], results[n])] for n in ("Aurora", "AdamW")}
    rep += ["Paired difference to Muon (same seed and batches), report loss: "
            + "; ".join(f"{n} − Muon {C.mean_std(d)}" for n, d in diffs.items()), ""]
    x = list(range(1, steps + 1))
    rep += [verdict_line("b", diffs["Aurora"], "Aurora", "Muon"), verdict_line("b", diffs["AdamW"], "AdamW", "Muon"), ""]
    C.plot_curves(C.RESULTS / "claim6_moe_loss.png", [
        {"title": f"Small Qwen3-MoE from scratch ({args.seeds} seeds)", "xlabel": "step", "ylabel": "train loss (20-step mean)",
         "series": {f"{n} lr {best[n]:.3g}": (x, curves[n]) for n in grids}}])  # fmt: skip
    rep += ["Plot: `claim6_moe_loss.png` (training loss vs step).", ""]
    data.update(best=best, tune=tuned, report=results)


# ------------------------------------------------------------------------------------------------ part (c)


def sympy_rows(every: int = 1) -> dict[str, torch.Tensor]:
    """sympy's files split by file index: i % 10 == 3 -> tune, i % 10 == 7 -> report, the rest -> fine-tuning
    (every `every`-th file only: the smoke run tokenizes a tenth)."""
    tok = C.tokenizer()
    path = C.CACHE / f"tokens-{FT_PACKAGE}-{C._key(C.VOCAB, C._versions('train'), every)}.pt"
    if not path.exists():
        from importlib.metadata import version

        files = C.package_files(FT_PACKAGE)[::every]
        parts: dict[str, list[int]] = {"ft": [], "tune": [], "report": []}
        for i, f in enumerate(files):
            ids = tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
            parts["tune" if i % 10 == 3 else "report" if i % 10 == 7 else "ft"].extend(ids + [tok.eos_token_id])
        torch.save({"version": version(FT_PACKAGE), "files": len(files), **{k: torch.tensor(v) for k, v in parts.items()}}, path)
    saved = torch.load(path)
    out = {"version": saved["version"], "files": saved["files"]}
    for k in ("ft", "tune", "report"):
        s = saved[k].long()
        n = len(s) // C.SEQ
        out[k] = s[: n * C.SEQ].view(n, C.SEQ)
    return out


def eval_spaced(rows: torch.Tensor, n: int = C.EVAL_ROWS) -> torch.Tensor:
    return rows[torch.linspace(0, len(rows) - 1, n).long()]


def lora_base(args):
    """Part (b)'s MoE architecture pretrained with AdamW on the training split, cached."""
    steps = args.c_base_steps
    path = C.CACHE / f"claim6-lora-base-{C._key(MOE_SIZE, steps, C._versions('train'))}.pt"
    if not path.exists():
        model = moe_model(123)
        C.log(f"pretraining the LoRA base ({steps} steps, AdamW 3e-3) -> {path}")
        fit(model, make_opt("AdamW", model, 3e-3), batches(train_rows(), steps, args.batch, 123))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return torch.load(path)


def part_c(args, rep: list[str], data: dict) -> None:
    from peft import LoraConfig, get_peft_model

    sp = sympy_rows(10 if args.smoke else 1)
    state = lora_base(args)
    tune_rows, report_rows = eval_spaced(sp["tune"]), eval_spaced(sp["report"])
    steps, bs = args.c_steps, args.batch

    def peft_model():
        m = moe_model(0)
        m.load_state_dict(state)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
        return get_peft_model(m, cfg)

    base = peft_model()
    base_tune, base_report = C.mean_loss(base, tune_rows), C.mean_loss(base, report_rows)
    rep += [f"Base: part (b)'s architecture pretrained {args.c_base_steps} steps (AdamW 3e-3, batch {bs}) on the training "
            f"split. Fine-tuning domain: {FT_PACKAGE} {sp['version']} ({sp['files']} files, in none of the splits), split by "
            f"file index: i % 10 == 3 -> tune set ({len(sp['tune'])} rows), i % 10 == 7 -> report set ({len(sp['report'])} "
            f"rows), the other files -> fine-tuning ({len(sp['ft'])} rows of {C.SEQ}); evaluation on {C.EVAL_ROWS} rows "
            f"evenly spaced over each set. PEFT LoRA r=8, alpha=16 on q/k/v/o, {steps} steps x {bs} rows, cosine with 5% "
            f"warm-up. Base model before fine-tuning: tune {base_tune:.3f}, report {base_report:.3f}.",
            "",
            "Arms: AdamW-LoRA = `torch.optim.AdamW` (betas 0.9/0.95) on the factors; Muon / Aurora on the factors = "
            "`Aurora(aurora_param_groups(peft_model), **AURORA_PRESETS[\"muon\"])` / default preset, each factor "
            "orthogonalized on its own; Aurora-LoRA = `AuroraLoRA(aurora_lora_param_groups(peft_model))`, the whitened "
            "joint update of each (A, B) pair. lr tuned on the tune set (seed 100) with `_common.tune_lr`, reported on "
            f"the report set over seeds 0..{args.seeds - 1} (same batches for every arm of a seed).", ""]  # fmt: skip
    grids = {"AdamW-LoRA": [3e-3, 6e-3, 1.2e-2], "Muon on factors": [0.01, 0.02, 0.04],
             "Aurora on factors": [0.01, 0.02, 0.04], "Aurora-LoRA (whitened)": [0.01, 0.02, 0.04]}  # fmt: skip
    if args.smoke:
        grids = {k: [v[0] / 8, v[0], v[0] * 8] for k, v in grids.items()}

    def run(name: str, lr: float, seed: int, rows_eval: torch.Tensor):
        torch.manual_seed(seed)
        m = peft_model()
        losses, _ = fit(m, make_opt(name, m, lr), batches(sp["ft"], steps, bs, seed))
        return finite(C.mean_loss(m, rows_eval)), losses

    best, tuned = {}, {}
    for name in grids:
        best[name], tuned[name] = C.tune_lr(lambda lr, name=name: run(name, lr, 100, tune_rows)[0], grids[name], label=name)
    rep += ["Tune-set loss per lr (seed 100): " + "; ".join(f"**{n}** {C.grid_text(tuned[n])} -> {best[n]:.3g}"
                                                          for n in grids), ""]  # fmt: skip
    results, curves = {}, {}
    for name in grids:
        out = [run(name, best[name], seed, report_rows) for seed in range(args.seeds)]
        results[name], curves[name] = [o[0] for o in out], [smooth(o[1]) for o in out]
        C.log(f"{name} lr {best[name]:.3g}: report {results[name]}")
    rep_table(rep, ["method", "tuned lr", "report-set loss (mean ± std)", "per seed"], table_rows(results, list(grids), best))
    ref = "Muon on factors"
    rep += ["Paired difference to Muon on the factors (same seed and batches): "
            + "; ".join(f"{n} − Muon {C.mean_std([b - a for a, b in zip(results[ref], results[n])])}"
                        for n in grids if n != ref), ""]  # fmt: skip
    rep += [verdict_line("c", [b - a for a, b in zip(results[ref], results[n])], n, ref) for n in grids if n != ref] + [""]
    x = list(range(1, steps + 1))
    C.plot_curves(C.RESULTS / "claim6_lora_loss.png", [
        {"title": f"LoRA fine-tuning on {FT_PACKAGE} ({args.seeds} seeds)", "xlabel": "step",
         "ylabel": "train loss (20-step mean)", "series": {f"{n} lr {best[n]:.3g}": (x, curves[n]) for n in grids}}])
    rep += ["Plot: `claim6_lora_loss.png` (fine-tuning loss vs step).", ""]
    data.update(best=best, tune=tuned, report=results, base={"tune": base_tune, "report": base_report})


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--smoke", action="store_true", help="tiny run of the whole pipeline (< 2 minutes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="rows of SEQ tokens per step")
    parser.add_argument("--a-steps", type=int, default=1000)
    parser.add_argument("--a-scan", default="32x512@0.02,16x256@0.02,16x256@0.04,16x128@0.04,16x64@0.03,32x512@0.02/wd0.1",
                        help="part (a) Muon scan: HIDDENxMLP@LR[/wdWD],...")
    parser.add_argument("--a-scan-steps", type=int, default=500)
    parser.add_argument("--a-setting", default="", help="part (a) setting to run in full (default: the scan's worst)")
    parser.add_argument("--b-steps", type=int, default=300)
    parser.add_argument("--c-base-steps", type=int, default=600)
    parser.add_argument("--c-steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        args.seeds, args.a_steps, args.a_scan, args.a_scan_steps = 2, 30, "16x128@0.05", 20
        args.b_steps, args.c_base_steps, args.c_steps = 10, 10, 10
    report = C.Report(NAME, "Claim 6 — Aurora vs Muon: dead neurons, a small MoE LM, LoRA")
    sections = {}
    command = "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python examples/replicate/claim6_aurora.py " + " ".join(sys.argv[1:])
    for part in args.parts.split(","):
        started = time.perf_counter()
        lines, data = [], {}
        {"a": part_a, "b": part_b, "c": part_c}[part](args, lines, data)
        wall = time.perf_counter() - started
        sections[part] = {"lines": lines, "data": data, "wall_seconds": wall, "command": command}
        C.log(f"part {part} done in {wall / 60:.1f} min")
    previous = C.RESULTS / f"{NAME}.json"  # read at the end: parts may run in separate, concurrent processes
    if previous.exists() and not args.smoke:
        sections = {**json.loads(previous.read_text()).get("parts", {}), **sections}
    report.add("Seed's statement (Tilde Research, Aurora): Muon's polar factor of a tall m x n update cannot give every "
               "row the same norm, so some MLP neurons get persistently tiny updates and die — \"over a quarter of MLP "
               "neurons effectively dead by step 500\" under Muon; Aurora targets equal row norms. Open question: does "
               "Aurora fix Muon on LoRA?")
    report.add()
    for part in sorted(sections):
        s = sections[part]
        report.add(f"## {PART_TITLES[part]}")
        report.add()
        report.add(f"Command: `{s['command']}`; wall time of this part {s['wall_seconds'] / 60:.1f} min.")
        report.add()
        for line in s["lines"]:
            report.add(line)
    report.data["parts"] = sections
    report.write()


if __name__ == "__main__":
    main()
