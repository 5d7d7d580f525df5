"""Aurora benchmarks: optimizer cost vs Muon, batched experts, row balance, small-LM training, LoRA, routers.

Writes docs/aurora_bench.md (tables) and PNG plots into docs/. Every ratio is measured side by side in
one run. Sizes are chosen so that the whole script runs in under ~10 minutes on a 2-core CPU.

    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py            # cost,e2e,precision,batched,balance,lm,lora
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --parts cost,e2e,precision,batched,balance
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --parts router --output docs/aurora_bench_router.md
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --parts neurons --output docs/aurora_bench_neurons.md
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --replot    # redraw every PNG from docs/aurora_bench_curves.json

Every plot's curves (each seed separately) are stored in docs/aurora_bench_curves.json by the run that made
them; the PNGs are drawn from that file, so `--replot` changes the figures without recomputing anything.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_slim.optim import (  # noqa: E402
    AURORA_PRESETS,
    Aurora,
    AuroraLoRA,
    aurora_direction,
    aurora_lora_param_groups,
    aurora_param_groups,
    aurora_update,
)
from hf_slim.optim.health import NeuronHealthCallback  # noqa: E402


DOCS = ROOT / "docs"
CURVES = DOCS / "aurora_bench_curves.json"  # every plotted curve (per seed), so `--replot` redraws without training
BS = 8  # sequences per batch in sections 4-5
LINES: list[str] = []


def out(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


# --------------------------------------------------------------------------------------------------
# 1. Cost on the matrices of a real MoE config (Qwen3-30B-A3B, scaled)
# --------------------------------------------------------------------------------------------------

# Qwen3-30B-A3B: hidden 2048, 32 q heads x 128, 4 kv heads x 128, 128 experts, moe_intermediate 768.
# Scaled for a 2-core CPU: every width / 8, experts 128 -> 8 (aspect ratios kept).
def qwen3_30b_a3b_layer_shapes(div: int = 8, experts: int = 8) -> dict[str, tuple[int, ...]]:
    h, q, kv, inter = 2048 // div, 4096 // div, 512 // div, 768 // div
    return {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "experts.gate_up_proj": (experts, 2 * inter, h),
        "experts.down_proj": (experts, h, inter),
    }


def _time_step(make_opt, params, grads, reps: int) -> tuple[float, float]:
    """Median (CPU time, wall time) of `reps` optimizer steps after one warm-up step (state allocation).

    CPU time of this (one-thread) process is the primary figure: on an oversubscribed machine the wall time
    also counts the time other processes held the core.
    """
    opt = make_opt(params)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        opt.step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def _alternated(configs: dict, run, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """`run(config)` for every config, `rounds` times, in forward then reversed order (so drift hits all alike)."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
    names = list(configs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            samples[name].append(run(configs[name]))
    return samples


def _med_spread(xs: list[float], scale: float = 1e3) -> str:
    return f"{statistics.median(xs) * scale:.1f} ({min(xs) * scale:.1f}–{max(xs) * scale:.1f})"


MUON_FP32 = "Muon (Keller Jordan 5-step, ours, batched), fp32"
AURORA_DEFAULT = "**Aurora default** (Polar Express 6, 1 polar call, carried C; `ns_dtype=\"auto\"`)"


def bench_cost(reps: int, rounds: int = 7) -> dict[str, float]:
    from hf_slim.optim.polar import resolve_ns_dtype

    auto = str(resolve_ns_dtype("auto", torch.device("cpu"))).replace("torch.", "")
    out("## 1. Optimizer step cost (Qwen3-30B-A3B layer matrices, widths / 8, 8 experts, fp32 weights)")
    out()
    shapes = qwen3_30b_a3b_layer_shapes()
    out("Matrices of one decoder layer: " + ", ".join(f"`{k}` {list(v)}" for k, v in shapes.items()))
    out()
    g = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shapes.values()]
    grads = [torch.randn(s, generator=g) * torch.exp(torch.randn(*s[:-1], 1, generator=g)) for s in shapes.values()]
    # torch.optim.Muon takes 2D parameters only: the fused experts become E separate matrices.
    flat_params = [nn.Parameter(q.detach().clone()) for p in params for q in (p if p.ndim == 3 else [p])]
    flat_grads = [h for gr in grads for h in (gr if gr.ndim == 3 else [gr])]

    def ours(**kw):
        return lambda ps: Aurora(ps, lr=0.02, **kw), params, grads

    configs = {
        "AdamW (torch, foreach)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3), params, grads),
        MUON_FP32: ours(**{**AURORA_PRESETS["muon"], "ns_dtype": "float32"}),
        "Muon (Keller Jordan 5-step, ours, batched), bf16": ours(**{**AURORA_PRESETS["muon"], "ns_dtype": "bfloat16"}),
        AURORA_DEFAULT: ours(),
        "Aurora default, fp32 iterations": ours(ns_dtype="float32"),
        "Aurora `fast` preset (Polar Express 5; `auto`)": ours(**AURORA_PRESETS["fast"]),
        "Aurora reference preset (simple quintic 12 in bf16, 2 polar calls)": ours(
            **{k: v for k, v in AURORA_PRESETS["reference"].items() if k != "lr"}
        ),
    }
    if hasattr(torch.optim, "Muon"):
        configs[f"torch.optim.Muon (bf16 Newton–Schulz, per-matrix loop; experts as {len(flat_params) - 4} 2D params)"] = (
            lambda ps: torch.optim.Muon(ps, lr=0.02), flat_params, flat_grads
        )
    samples = _alternated(configs, lambda c: _time_step(c[0], c[1], c[2], reps), rounds)
    cpu = {k: [c for c, _ in v] for k, v in samples.items()}
    wall = {k: [w for _, w in v] for k, v in samples.items()}
    med = {k: statistics.median(v) for k, v in cpu.items()}
    muons = [k for k in med if "Muon" in k]
    fastest = min(muons, key=med.get)
    out(f"`ns_dtype=\"auto\"` resolves to **{auto}** on this CPU (native bf16: {auto == 'bfloat16'}). Each figure: median over "
        f"{rounds} rounds (run in alternating order) of the median of {reps} steps; spread = min–max of the rounds. "
        "CPU time of the one-thread process is the primary figure (the machine was shared); wall time for reference. "
        f"Fastest Muon here: {fastest}.")
    out()
    out("| optimizer | CPU ms / step (spread) | wall ms / step (spread) | / fastest Muon | / our fp32 Muon |")
    out("|---|---:|---:|---:|---:|")
    for name in configs:
        out(f"| {name} | {_med_spread(cpu[name])} | {_med_spread(wall[name])} | {med[name] / med[fastest]:.2f} | "
            f"{med[name] / med[MUON_FP32]:.2f} |")
    out()
    return med


def bench_e2e(cost: dict[str, float] | None, reps: int) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out("## 1b. Projected end-to-end training-step overhead")
    out()
    shapes = qwen3_30b_a3b_layer_shapes()
    h = shapes["q_proj"][1]
    E, two_i, _ = shapes["experts.gate_up_proj"]
    cfg = Qwen3MoeConfig(
        vocab_size=256, hidden_size=h, intermediate_size=4 * h, moe_intermediate_size=two_i // 2, num_hidden_layers=1,
        num_attention_heads=shapes["q_proj"][0] // 16, num_key_value_heads=shapes["k_proj"][0] // 16, head_dim=16,
        num_experts=E, num_experts_per_tok=2, max_position_embeddings=512,
    )  # fmt: skip
    torch.manual_seed(0)
    layer_model = Qwen3MoeForCausalLM(cfg)
    x = torch.randint(0, 256, (4, 256))
    times = []
    for i in range(reps + 1):
        t0 = time.process_time()
        layer_model(input_ids=x, labels=x).loss.backward()
        if i:
            times.append(time.process_time() - t0)
    per_token = statistics.median(times) / x.numel()
    if cost is None:
        cost = bench_cost(reps)
    muon = min(v for k, v in cost.items() if "Muon" in k)
    aurora = cost[AURORA_DEFAULT]
    adam = cost["AdamW (torch, foreach)"]
    out(f"Forward+backward of one such decoder layer (Qwen3-MoE, top-2 of {E} experts; embedding and head of a 256-token "
        f"vocab included, so this overstates the layer cost slightly): {per_token * 1e6:.1f} µs/token (CPU time) measured on 4 x 256 tokens.")
    out("The optimizer step is paid once per step, the forward/backward once per token, so the overhead of Aurora (default) over "
        "the fastest Muon is `(t_aurora - t_muon) / (t_muon + tokens * t_token)` (and likewise vs AdamW):")
    out()
    out("| tokens per optimizer step | Aurora vs fastest Muon | Aurora vs AdamW | Muon vs AdamW |")
    out("|---:|---:|---:|---:|")
    for tokens in (16_384, 131_072, 1_048_576):
        fb = tokens * per_token
        out(f"| {tokens:,} | {(aurora - muon) / (muon + fb) * 100:+.2f}% | {(aurora - adam) / (adam + fb) * 100:+.2f}% | "
            f"{(muon - adam) / (adam + fb) * 100:+.2f}% |")
    out()


def bench_precision() -> None:
    from hf_slim.optim import polar_factor

    out("## 1c. Precision: relative error of the polar factor (Frobenius, vs an exact SVD)")
    out()
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(96, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    cond100 = U @ torch.diag(torch.logspace(0, -2, 48)) @ V.T
    g = torch.Generator().manual_seed(2)
    skewed = torch.randn(512, 256, generator=g) * torch.exp(torch.randn(512, 1, generator=g))
    cases = [("cond-100 96x48 (the matrix of tests/test_aurora.py)", cond100), ("skewed rows 512x256", skewed)]
    cols = [(steps, dt) for dt in ("float32", "bfloat16") for steps in (5, 6, 7)]
    out("| matrix | " + " | ".join(f"PE {s}, {dt}" for s, dt in cols) + " |")
    out("|---|" + "---:|" * len(cols))
    for name, X in cases:
        Ud, _, Vd = torch.linalg.svd(X.double(), full_matrices=False)
        exact = (Ud @ Vd).float()
        errs = [float((polar_factor(X, "polar_express", s, dt).float() - exact).norm() / exact.norm()) for s, dt in cols]
        out(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
    out()


def bench_batched(reps: int, rounds: int = 5) -> None:
    from hf_slim.optim.polar import resolve_ns_dtype

    out("## 2. Fused 3D experts: one batched update vs a per-expert loop")
    out()
    out("`aurora_update` (momentum, balanced polar, shape scale) on the whole `[E, m, n]` tensor vs called once per expert, "
        f"CPU ms; median ({rounds} alternated rounds of {reps} steps) and min–max.")
    out()
    g = torch.Generator().manual_seed(1)
    out("| tensor | Newton–Schulz dtype | batched (ms) | per-expert loop (ms) | loop / batched |")
    out("|---|---|---:|---:|---:|")
    dtypes = [str(resolve_ns_dtype("auto", torch.device("cpu"))).replace("torch.", ""), "float32"]
    for name, shape in list(qwen3_30b_a3b_layer_shapes().items())[-2:]:
        grad = torch.randn(shape, generator=g)
        buf = torch.zeros(shape)
        for dt in dict.fromkeys(dtypes):
            def one(batched, dt=dt, grad=grad, buf=buf, experts=shape[0]):
                fn = (lambda: aurora_update(grad, buf, ns_dtype=dt)) if batched else (
                    lambda: [aurora_update(grad[e], buf[e], ns_dtype=dt) for e in range(experts)])
                fn()
                ts = []
                for _ in range(reps):
                    c0 = time.process_time()
                    fn()
                    ts.append(time.process_time() - c0)
                return statistics.median(ts)

            s = _alternated({"batched": True, "loop": False}, one, rounds)
            tb, tl = statistics.median(s["batched"]), statistics.median(s["loop"])
            out(f"| `{name}` {list(shape)} | {dt} | {_med_spread(s['batched'])} | {_med_spread(s['loop'])} | {tl / tb:.2f} |")
    out()


def _skewed(m: int, n: int, seed: int) -> torch.Tensor:
    # Rows from a low-rank cluster (low leverage) plus independent rows, with row scales spread e^{±1}.
    g = torch.Generator().manual_seed(seed)
    k = 3 * m // 4
    low = torch.randn(k, 32, generator=g) @ torch.randn(32, n, generator=g) + 0.5 * torch.randn(k, n, generator=g)
    hi = 5.6 * torch.randn(m - k, n, generator=g)
    return torch.cat([low, hi]) * torch.exp(torch.randn(m, 1, generator=g))


def bench_balance(steps: int = 10) -> None:
    out("## 3. Row balance on a skewed tall matrix (1536 x 384), gradient = fixed matrix + 50% noise")
    out()
    m, n = 1536, 384
    base = _skewed(m, n, 0)
    target = (n / m) ** 0.5
    cfgs = {
        "Muon (converged polar, 12-step quintic)": dict(pp_iterations=0, ns_schedule="tilde_quintic12"),
        "Aurora reference (K=2, no carry)": dict(pp_iterations=2, ns_schedule="tilde_quintic12", carry=False),
        "Aurora default (K=1, carried C), fp32 iterations": dict(pp_iterations=1, ns_schedule="polar_express", carry=True),
        "Aurora default (K=1, carried C), bf16 iterations": dict(pp_iterations=1, ns_schedule="polar_express", carry=True, ns_dtype="bfloat16"),
        "Aurora `fast` (Polar Express 5, carried C), bf16": dict(pp_iterations=1, ns_schedule="polar_express", ns_steps=5, carry=True, ns_dtype="bfloat16"),
        "Aurora K=1, no carry": dict(pp_iterations=1, ns_schedule="polar_express", carry=False),
    }
    curves = {}
    for name, cfg in cfgs.items():
        carry = cfg.pop("carry", False)
        g = torch.Generator().manual_seed(1)
        M = torch.zeros(m, n)
        C = None
        ratios = []
        for _ in range(steps):
            G = base + 0.5 * base.std() * torch.randn(m, n, generator=g)
            M.lerp_(G, 0.05)
            X = torch.lerp(G, M, 0.95)
            O, C_new = aurora_direction(X, row_scale=C if carry else None, **cfg)
            C = C_new if carry else None
            r = O.norm(dim=-1) / target
            ratios.append(float(r.max() / r.min()))
        curves[name] = ratios
    out("max/min row norm of the update, per step (target: <= 1.3)")
    out()
    out("| config | " + " | ".join(f"step {i + 1}" for i in range(steps)) + " |")
    out("|---|" + "---:|" * steps)
    for name, r in curves.items():
        out(f"| {name} | " + " | ".join(f"{x:.2f}" for x in r) + " |")
    out()
    _save_plot(DOCS / "aurora_row_balance.png", [{
        "title": f"Row balance of the update, skewed {m}x{n} matrix (one run)",
        "xlabel": "optimizer step",
        "ylabel": "max / min row norm of the update (ratio)",
        "hlines": [[1.3, "target 1.3"], [1.0, "perfectly even"]],
        "legend": "below",
        "series": [{"label": name, "x": list(range(1, steps + 1)), "runs": [r]} for name, r in curves.items()],
    }])


# --------------------------------------------------------------------------------------------------
# 4. Small LM on local text; 5. LoRA
# --------------------------------------------------------------------------------------------------


def _corpus(pattern: str, max_chars: int) -> str:
    text = []
    for path in sorted(glob.glob(pattern)):
        text.append(Path(path).read_text(errors="ignore"))
        if sum(map(len, text)) > max_chars:
            break
    return "".join(text)[:max_chars]


def _tokenizer(text: str, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>"], show_progress=False))
    return tok


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def _batches(ids: torch.Tensor, seq: int, bs: int, steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq - 1, (steps, bs), generator=g)
    return [torch.stack([ids[s : s + seq] for s in row]) for row in starts]


def _model(vocab: int, seed: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(cfg)


def _make_opt(name: str, model: nn.Module, lr: float):
    if name == "AdamW":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    groups = aurora_param_groups(model)
    if name == "Muon":
        return Aurora(groups, lr=lr, adamw_lr=3e-3, ns_dtype="float32", **AURORA_PRESETS["muon"])
    if name == "Aurora":
        return Aurora(groups, lr=lr, adamw_lr=3e-3, ns_dtype="float32")
    if name == "Aurora-LoRA (whitened)":
        return AuroraLoRA(aurora_lora_param_groups(model), lr=lr, adamw_lr=3e-3, ns_dtype="float32")
    raise ValueError(name)


@torch.no_grad()
def _eval(model, batches) -> float:
    model.eval()
    losses = [float(model(input_ids=b, labels=b).loss) for b in batches]
    model.train()
    return sum(losses) / len(losses)


def _train(model, opt, batches, track_dead: bool = False, threshold: float = 0.1, window: int = 10):
    """Train on `batches`; returns the per-step losses and, with `track_dead`, the per-step metrics of
    `NeuronHealthCallback(threshold, window)` (its own code, driven by hand around `opt.step()`: dead-neuron
    fraction and p90/p10 row spread of the MLP projections' updates, overall and per projection kind)."""
    losses = []
    health = NeuronHealthCallback(threshold=threshold, window=window) if track_dead else None
    state = types.SimpleNamespace(global_step=0)
    for step, b in enumerate(batches):
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        state.global_step = step
        if health is not None:
            health.on_pre_optimizer_step(None, state, None, model=model)
        opt.step()
        if health is not None:
            health.on_optimizer_step(None, state, None)
        losses.append(float(loss.detach()))
    return losses, (health.history if health is not None else [])


def bench_lm(steps: int, seeds: int) -> tuple[object, torch.Tensor]:
    out(f"## 4. Small MoE LM on local text ({steps} steps x {seeds} seeds per optimizer)")
    out()
    text = _corpus("/usr/share/vim/vim90/doc/*.txt", 3_000_000)
    tok = _tokenizer(text, 512)
    ids = _ids(tok, text)
    split = int(0.95 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    out(f"Data: Vim's help files (/usr/share/vim/vim90/doc/*.txt), {len(text) / 1e6:.1f} M chars, byte-level BPE "
        f"(vocab 512) trained with `tokenizers`; {len(train_ids) / 1e6:.2f} M train / {len(val_ids) / 1e3:.0f} k val tokens.")
    out("Model: Qwen3-MoE config, hidden 64, 2 layers, 4 experts (top-2), expert width 128; batch 8 x 128 tokens.")
    out("Learning rates: Muon and Aurora use the swept lr on hidden matrices and AdamW 3e-3 on the rest; "
        "each lr chosen by a 3-point sweep on seed 0 over a third of the steps (listed below).")
    out()
    val = _batches(val_ids, 128, 16, 8, 999)
    lrs = {"AdamW": [1e-3, 3e-3, 1e-2], "Muon": [0.01, 0.02, 0.05], "Aurora": [0.01, 0.02, 0.05]}
    sweep = {}
    for name, grid in lrs.items():
        for lr in grid:
            model = _model(512, 0)
            _train(model, _make_opt(name, model, lr), _batches(train_ids, 128, BS, steps // 3, 0))
            sweep[(name, lr)] = _eval(model, val)
    best = {name: min(grid, key=lambda lr: sweep[(name, lr)]) for name, grid in lrs.items()}
    out("LR sweep (seed 0, a third of the steps), validation loss: " + "; ".join(f"{n} lr={lr:g}: {v:.3f}" for (n, lr), v in sweep.items()))
    out()
    curves, finals, dead_runs, spread_runs, loss_runs = {}, {}, {}, {}, {}
    for name in lrs:
        runs, vals, dd, sp = [], [], [], []
        for seed in range(seeds):
            model = _model(512, seed)
            losses, hist = _train(model, _make_opt(name, model, best[name]), _batches(train_ids, 128, BS, steps, seed), track_dead=True)
            runs.append(losses)
            vals.append(_eval(model, val))
            dd.append([h["neuron_health/dead_frac"] for h in hist])
            sp.append([h["neuron_health/row_spread"] for h in hist])
        curves[name] = [statistics.mean(x) for x in zip(*runs)]
        finals[name] = vals
        loss_runs[name], dead_runs[name], spread_runs[name] = runs, dd, sp
    adam_final = statistics.mean(_smooth(curves["AdamW"])[-10:])
    out("Dead neurons and row spread: `NeuronHealthCallback` defaults (a neuron is dead when its update norm stayed "
        "below 0.1 x the median of its projection for 10 consecutive steps; row spread = p90/p10 of the per-neuron update "
        "norms, median over the expert `gate_up_proj` / `down_proj` tensors), measured every step.")
    out()
    out("| optimizer | lr | val loss (mean ± sd over seeds) | steps to AdamW's final train loss | dead-neuron fraction at end (max over seeds) | row spread p90/p10 at end (mean, min–max) |")
    out("|---|---:|---:|---:|---:|---:|")
    for name in lrs:
        sm = _smooth(curves[name])
        hit = next((i + 1 for i, v in enumerate(sm) if v <= adam_final), None)
        sd = statistics.stdev(finals[name]) if len(finals[name]) > 1 else 0.0
        ends = [r[-1] for r in spread_runs[name]]
        out(f"| {name} | {best[name]:g} | {statistics.mean(finals[name]):.3f} ± {sd:.3f} | {hit if hit else f'> {steps}'} | "
            f"{max(r[-1] for r in dead_runs[name]):.3f} | {statistics.mean(ends):.2f} ({min(ends):.2f}–{max(ends):.2f}) |")
    out()
    x = list(range(1, steps + 1))
    _save_plot(DOCS / "aurora_lm_loss.png", [
        {"title": f"Small MoE LM: training loss ({seeds} seeds)", "xlabel": "optimizer step",
         "ylabel": "train loss (nats/token, 10-step moving mean)",
         "series": [{"label": f"{n} (lr {best[n]:g})", "x": x, "runs": [_smooth(r) for r in loss_runs[n]]} for n in lrs]},
        {"title": "Evenness of the MLP (expert) updates across neurons", "xlabel": "optimizer step",
         "ylabel": "p90 / p10 of per-neuron update norm (ratio, 10-step moving mean)", "hlines": [[1.0, "perfectly even"]],
         "series": [{"label": n, "x": x, "runs": [_smooth(r) for r in spread_runs[n]]} for n in lrs]},
    ], band=seeds > 1)
    return tok, train_ids


def bench_lora(tok, pre_ids: torch.Tensor, pre_steps: int, steps: int, seeds: int) -> None:
    from peft import LoraConfig, get_peft_model

    out(f"## 5. LoRA fine-tuning of an AdamW-pretrained model ({steps} steps x {seeds} seeds)")
    out()
    base = _model(512, 123)
    _train(base, torch.optim.AdamW(base.parameters(), lr=3e-3, betas=(0.9, 0.95)), _batches(pre_ids, 128, BS, pre_steps, 123))
    text = _corpus("/usr/share/common-licenses/*", 400_000)
    ids = _ids(tok, text)
    split = int(0.9 * len(ids))
    tr, va = ids[:split], ids[split:]
    val = _batches(va, 128, 16, 8, 999)
    out(f"Base: the section-4 model pretrained {pre_steps} steps with AdamW on Vim help. Fine-tuning data: "
        f"/usr/share/common-licenses (license texts, a different domain), {len(tr) / 1e3:.0f} k train tokens. "
        "LoRA r=8, alpha=16 on q/k/v/o projections. Baseline val loss before fine-tuning: "
        f"{_eval(base, val):.3f}.")
    out()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def peft_model():
        m = _model(512, 123)
        m.load_state_dict(state)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
        return get_peft_model(m, cfg)

    names = {
        "AdamW-LoRA": [1e-3, 3e-3, 1e-2],
        "Muon on factors": [0.01, 0.02, 0.05],
        "Aurora on factors": [0.01, 0.02, 0.05],
        "Aurora-LoRA (whitened)": [0.01, 0.02, 0.05],
    }
    key = {"AdamW-LoRA": "AdamW", "Muon on factors": "Muon", "Aurora on factors": "Aurora", "Aurora-LoRA (whitened)": "Aurora-LoRA (whitened)"}
    sweep = {}
    for name, grid in names.items():
        for lr in grid:
            m = peft_model()
            _train(m, _make_opt(key[name], m, lr), _batches(tr, 128, BS, steps, 0))
            sweep[(name, lr)] = _eval(m, val)
    best = {n: min(g, key=lambda lr: sweep[(n, lr)]) for n, g in names.items()}
    out("LR sweep (seed 0), validation loss: " + "; ".join(f"{n} lr={lr:g}: {v:.3f}" for (n, lr), v in sweep.items()))
    out()
    out("| optimizer | best lr | val loss (mean ± sd over seeds) |")
    out("|---|---:|---:|")
    curves = {}
    for name in names:
        vals, runs = [], []
        for seed in range(seeds):
            torch.manual_seed(seed)
            m = peft_model()
            losses, _ = _train(m, _make_opt(key[name], m, best[name]), _batches(tr, 128, BS, steps, seed))
            vals.append(_eval(m, val))
            runs.append(losses)
        curves[name] = runs
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out(f"| {name} | {best[name]:g} | {statistics.mean(vals):.3f} ± {sd:.3f} |")
    out()
    label = {n: f"{n} (lr {best[n]:g})" for n in names}
    _save_plot(DOCS / "aurora_lora_loss.png", [
        {"title": f"LoRA fine-tuning on license texts ({seeds} seeds)", "xlabel": "optimizer step",
         "ylabel": "train loss (nats/token, 10-step moving mean)",
         "series": [{"label": label[n], "x": list(range(1, steps + 1)), "runs": [_smooth(r) for r in runs]}
                    for n, runs in curves.items()]},
        {"title": "Paired difference to AdamW-LoRA (same seed and batches)", "xlabel": "optimizer step",
         "ylabel": "Δ train loss vs AdamW-LoRA (nats/token, 10-step mean)", "paired_diff_of": 0,
         "reference": label["AdamW-LoRA"], "hlines": [[0.0, "AdamW-LoRA"]]},
    ], band=seeds > 1)


# --------------------------------------------------------------------------------------------------
# 7. Dead MLP neurons on a wide MLP (dense Qwen3): Muon vs Aurora
# --------------------------------------------------------------------------------------------------


def _dense_model(vocab: int, hidden: int, inter: int, seed: int, layers: int = 2):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg)


def _parse_opt_arms(spec: str) -> list[tuple[str, float]]:
    arms = []
    for item in spec.split(","):
        name, _, lr = item.partition(":")
        if name not in ("AdamW", "Muon", "Aurora") or not lr:
            raise ValueError(f"arm {item!r}: expected AdamW|Muon|Aurora:lr")
        arms.append((name, float(lr)))
    return arms


def _parse_mlp(spec: str) -> tuple[int, int, float]:
    """`HIDDENxINTER@LR`, e.g. `32x512@0.02`."""
    shape, _, lr = spec.partition("@")
    hidden, _, inter = shape.partition("x")
    return int(hidden), int(inter), float(lr)


def _pct_range(xs: list[float]) -> str:
    return f"{statistics.mean(xs) * 100:.1f} ({min(xs) * 100:.1f}–{max(xs) * 100:.1f})"


def bench_neurons(steps: int, seeds: int, mlp: str, arms: list[tuple[str, float]], scan: list[str], scan_steps: int) -> None:
    hidden, inter, _ = _parse_mlp(mlp + "@0")
    out(f"## 7. Dead MLP neurons on a wide MLP: Muon vs Aurora ({steps} steps x {seeds} seeds per arm)")
    out()
    t0 = time.time()
    text = _corpus("/usr/share/vim/vim90/doc/*.txt", 3_000_000)
    tok = _tokenizer(text, 512)
    ids = _ids(tok, text)
    split = int(0.95 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    val = _batches(val_ids, 128, 16, 8, 999)
    out(f"Data: as section 4 (Vim help, byte-level BPE vocab 512, {len(train_ids) / 1e6:.2f} M train tokens), batch {BS} x 128 tokens. "
        f"Model: dense `Qwen3ForCausalLM`, 2 layers, **hidden {hidden}, MLP width {inter} ({inter // hidden}x expansion)**: "
        f"`gate_proj` / `up_proj` [{inter}, {hidden}] (tall), `down_proj` [{hidden}, {inter}]; 4 heads x 16. "
        "Muon = `Aurora(..., **AURORA_PRESETS[\"muon\"])`, Aurora = the default preset, both fp32 iterations, the given lr on "
        "hidden matrices and AdamW 3e-3 on embeddings, head and norms; AdamW = `torch.optim.AdamW` on everything. Same seed = "
        "same init and batches in every arm.")
    out("Measured with `NeuronHealthCallback`'s own code at its defaults, every step: a neuron (row of `gate_proj`/`up_proj`, "
        "column of `down_proj`) is **dead** when its update norm stayed below 0.1 x the median of its projection for 10 "
        "consecutive steps; **row spread** = p90/p10 of the per-neuron update norms (median over projections; 1 = even).")
    out()
    res = {}
    for name, lr in arms:
        r = res[(name, lr)] = {"loss": [], "dead": [], "spread": [], "kinds": {}, "val": []}
        for seed in range(seeds):
            model = _dense_model(512, hidden, inter, seed)
            losses, hist = _train(model, _make_opt(name, model, lr), _batches(train_ids, 128, BS, steps, seed), track_dead=True)
            r["loss"].append(losses)
            r["dead"].append([h["neuron_health/dead_frac"] for h in hist])
            r["spread"].append([h["neuron_health/row_spread"] for h in hist])
            for k, v in hist[-1].items():
                if k.count("/") == 2 and k.endswith("/dead_frac"):
                    r["kinds"].setdefault(k.split("/")[1], []).append(v)
            r["val"].append(_eval(model, val))
            print(f"  {name} lr {lr:g} seed {seed}: dead {r['dead'][-1][-1]:.3f}, val {r['val'][-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    marks = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    kinds = sorted({k for r in res.values() for k in r["kinds"]})
    out("Dead neurons in % of all MLP neurons (mean over seeds, min–max in brackets); per projection kind at the end (mean); "
        "row spread at the end (mean, min–max); validation loss on 16 x 8 x 128 held-out tokens (mean ± sd).")
    out()
    out("| optimizer | lr | " + " | ".join(f"dead % at step {s}" for s in marks) + " | " + " | ".join(f"dead % {k}" for k in kinds)
        + " | row spread at end | val loss |")
    out("|---|---:|" + "---:|" * (len(marks) + len(kinds) + 2))
    for (name, lr), r in res.items():
        sd = statistics.stdev(r["val"]) if len(r["val"]) > 1 else 0.0
        ends = [x[-1] for x in r["spread"]]
        out(f"| {name} | {lr:g} | " + " | ".join(_pct_range([d[s - 1] for d in r["dead"]]) for s in marks) + " | "
            + " | ".join(f"{statistics.mean(r['kinds'].get(k, [0.0])) * 100:.1f}" for k in kinds)
            + f" | {statistics.mean(ends):.2f} ({min(ends):.2f}–{max(ends):.2f}) | {statistics.mean(r['val']):.3f} ± {sd:.3f} |")
    out()
    x = list(range(1, steps + 1))
    # colour = optimizer, line style = lr (ascending: dotted, dashed, solid, ...)
    colors = {"AdamW": "tab:blue", "Muon": "tab:orange", "Aurora": "tab:green"}
    styles = ["-", "--", ":", "-."]

    def series(runs_of):
        ls = {name: sorted({lr for n, lr in res if n == name}, reverse=True) for name, _ in res}
        return [{"label": f"{name}, lr {lr:g}", "x": x, "runs": runs_of(r), "color": colors[name],
                 "ls": styles[ls[name].index(lr) % len(styles)]} for (name, lr), r in res.items()]

    muon = sorted(lr for n, lr in res if n == "Muon")
    ref = f"Muon, lr {muon[0]:g}" if muon else f"{arms[0][0]}, lr {arms[0][1]:g}"  # the paired-difference reference
    _save_plot(DOCS / "aurora_dead_neurons.png", [
        {"title": f"Dead MLP neurons (dense, hidden {hidden}, MLP {inter} = {inter // hidden}x)", "xlabel": "optimizer step",
         "ylabel": "dead neurons (% of all MLP neurons)", "logy": False, "ymin": 0,
         "series": series(lambda r: [[v * 100 for v in d] for d in r["dead"]])},
        {"title": "Evenness of the MLP updates across neurons", "xlabel": "optimizer step",
         "ylabel": "p90 / p10 of per-neuron update norm (ratio, 10-step moving mean)", "hlines": [[1.0, "perfectly even"]],
         "smooth": 10, "series": series(lambda r: r["spread"])},
        {"title": "Training loss", "xlabel": "optimizer step", "ylabel": "train loss (nats/token, 25-step moving mean)",
         "smooth": 25, "series": series(lambda r: r["loss"])},
        {"title": f"Paired difference to {ref} (same seed and batches)", "xlabel": "optimizer step",
         "ylabel": f"Δ train loss vs {ref} (nats/token, 25-step mean)", "smooth": 25, "paired_diff_of": 2,
         "reference": ref, "hlines": [[0.0, ref]]},
    ], band=seeds > 1)
    out(f"Section wall time: {time.time() - t0:.0f} s.")
    out()
    if not scan:
        return
    t1 = time.time()
    out(f"### 7b. Settings scan: Muon vs Aurora, seed 0, {scan_steps} steps, dead % / row spread at the last step")
    out()
    out("Same data, batch and measurement; dense Qwen3, 2 layers, hidden x MLP width and the lr of the hidden matrices as "
        "listed (both optimizers at that lr). Train loss: mean of the last 50 steps.")
    out()
    out("| hidden x MLP (expansion) | lr | Muon dead % | Aurora dead % | Muon row spread | Aurora row spread | Muon train loss | Aurora train loss |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec in scan:
        h, i, lr = _parse_mlp(spec)
        row = {}
        for name in ("Muon", "Aurora"):
            model = _dense_model(512, h, i, 0)
            losses, hist = _train(model, _make_opt(name, model, lr), _batches(train_ids, 128, BS, scan_steps, 0), track_dead=True)
            row[name] = (hist[-1]["neuron_health/dead_frac"], hist[-1]["neuron_health/row_spread"], statistics.mean(losses[-50:]))
        print(f"  scan {spec}: {row} ({time.time() - t1:.0f} s)", flush=True)
        out(f"| {h} x {i} ({i // h}x) | {lr:g} | {row['Muon'][0] * 100:.1f} | {row['Aurora'][0] * 100:.1f} | {row['Muon'][1]:.2f} | "
            f"{row['Aurora'][1]:.2f} | {row['Muon'][2]:.3f} | {row['Aurora'][2]:.3f} |")
    out()
    out(f"Scan wall time: {time.time() - t1:.0f} s.")
    out()


# --------------------------------------------------------------------------------------------------
# 6. Where router weights go: AdamW (the default) vs Aurora
# --------------------------------------------------------------------------------------------------


def _router_model(vocab: int, seed: int, aux_coef: float):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False, output_router_logits=aux_coef > 0,
        router_aux_loss_coef=aux_coef,
    )  # fmt: skip
    return Qwen3MoeForCausalLM(cfg)


class _ExpertCounter:
    """Counts the tokens each router sends to each expert (forward hooks on the `mlp.gate` modules)."""

    def __init__(self, model: nn.Module):
        self.gates = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") and hasattr(m, "num_experts")]
        self.counts = [torch.zeros(m.num_experts) for _, m in self.gates]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(self.gates)]

    def _hook(self, i: int):
        def hook(module, args, output):
            indices = output[2]  # (tokens, top_k)
            self.counts[i] += torch.bincount(indices.flatten(), minlength=module.num_experts).float()

        return hook

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def stats(self) -> tuple[float, float, float]:
        """Mean over layers of the coefficient of variation of expert counts (population sd / mean), the
        fraction of (layer, expert) pairs that got < 10% of their fair share, and the largest count / fair share."""
        cvs, starved, top = [], [], []
        for c in self.counts:
            fair = c.sum() / c.numel()
            cvs.append(float(c.std(unbiased=False) / fair))
            starved.extend((c < 0.1 * fair).tolist())
            top.append(float(c.max() / fair))
        return statistics.mean(cvs), sum(starved) / len(starved), max(top)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _router_groups(model: nn.Module, router: str, router_lr: float | None) -> list[dict]:
    groups = aurora_param_groups(model, router=router)
    if router_lr is None:
        return groups
    # Give the router its own learning rate: move it out of whichever group the rule put it in.
    is_router = lambda name: name.endswith("mlp.gate.weight")
    moved = [(n, p) for g in groups for n, p in g["params"] if is_router(n)]
    for g in groups:
        g["params"] = [(n, p) for n, p in g["params"] if not is_router(n)]
    return groups + [{"params": moved, "use_aurora": router == "aurora", "lr": router_lr}]


def _parse_arm(spec: str) -> tuple[str, float | None]:
    router, _, lr = spec.partition(":")
    if router not in ("adamw", "aurora"):
        raise ValueError(f"router arm {spec!r}: expected adamw[:lr] or aurora[:lr]")
    return router, float(lr) if lr else None


def bench_router(steps: int, seeds: int, arms: list[str], aux_settings: list[float], plot: Path) -> None:
    out(f"## 6. Router weights in AdamW (default) or in Aurora ({steps} steps x {seeds} seeds per arm)")
    out()
    text = _corpus("/usr/share/vim/vim90/doc/*.txt", 3_000_000)
    tok = _tokenizer(text, 512)
    ids = _ids(tok, text)
    split = int(0.95 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    val = _batches(val_ids, 128, 16, 8, 999)
    out(f"Data: as section 4 (Vim help, byte-level BPE vocab 512, {len(train_ids) / 1e6:.2f} M train / "
        f"{len(val_ids) / 1e3:.0f} k val tokens). Model: Qwen3-MoE config, hidden 64, 2 layers, **8 experts, top-2**, "
        f"expert width 128, router `mlp.gate.weight` [8, 64]; batch {BS} x 128 tokens.")
    out("Every arm: `Aurora(aurora_param_groups(model, router=...), lr=0.01, adamw_lr=3e-3)` (section 4's chosen lrs); "
        "only the router's group differs (`adamw`: AdamW at 3e-3, `aurora`: Aurora at 0.01, `name:lr`: that group with the "
        "router's lr overridden). Same seed = same init and batches in every arm. Load-balancing auxiliary loss: "
        f"Qwen3-MoE's `router_aux_loss_coef` in {[f'{a:g}' for a in aux_settings]} (0.001 is its default when enabled; 0 = off).")
    out("Metrics at the end, on the 16 k validation tokens: LM loss (aux loss excluded); expert load per layer: "
        "coefficient of variation (CV, population sd / mean) of tokens per expert, mean over layers (0 = perfectly balanced); "
        "starved = fraction of (layer, expert) pairs receiving < 10% of the fair share (tokens x top-k / experts); "
        "max/fair = the busiest expert's load over the fair share (worst layer).")
    out()
    rows, curves = {}, {}
    for aux in aux_settings:
        for arm in arms:
            router, router_lr = _parse_arm(arm)
            vals, cvs, starv, tops, cv_curves = [], [], [], [], []
            for seed in range(seeds):
                model = _router_model(512, seed, aux)
                opt = Aurora(_router_groups(model, router, router_lr), lr=0.01, adamw_lr=3e-3, ns_dtype="float32")
                counter = _ExpertCounter(model)
                curve = []
                for b in _batches(train_ids, 128, BS, steps, seed):
                    counter.reset()
                    loss = model(input_ids=b, labels=b).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    curve.append(counter.stats()[0])
                counter.reset()
                model.eval()
                with torch.no_grad():
                    vals.append(statistics.mean(float(model(input_ids=b, labels=b, output_router_logits=False).loss) for b in val))
                cv, st, top = counter.stats()
                counter.remove()
                cvs.append(cv)
                starv.append(st)
                tops.append(top)
                cv_curves.append(curve)
            rows[(aux, arm)] = (vals, cvs, starv, tops)
            curves[f"router={arm}, aux {aux:g}"] = [_smooth(c) for c in cv_curves]

    def ms(x: list[float], fmt: str = ".3f") -> str:
        sd = statistics.stdev(x) if len(x) > 1 else 0.0
        return f"{statistics.mean(x):{fmt}} ± {sd:{fmt.lstrip('+')}}"

    out("| aux loss coef | router in | val loss | load CV | starved experts | max/fair | per-seed val loss |")
    out("|---:|---|---:|---:|---:|---:|---|")
    for (aux, arm), (vals, cvs, starv, tops) in rows.items():
        out(f"| {aux:g} | `{arm}`{' (default)' if arm == 'adamw' else ''} | {ms(vals)} | {ms(cvs, '.2f')} | "
            f"{ms(starv, '.3f')} | {ms(tops, '.2f')} | {', '.join(f'{v:.3f}' for v in vals)} |")
    out()
    if len(arms) > 1:
        out(f"Paired difference vs `{arms[0]}` (same seed), mean ± sd over seeds:")
        out()
        out("| aux loss coef | arm | Δ val loss | Δ load CV | Δ starved |")
        out("|---:|---|---:|---:|---:|")
        for aux in aux_settings:
            for arm in arms[1:]:
                a, b = rows[(aux, arms[0])], rows[(aux, arm)]
                d = [[y - x for x, y in zip(a[k], b[k])] for k in range(3)]
                out(f"| {aux:g} | `{arm}` | {ms(d[0], '+.3f')} | {ms(d[1], '+.2f')} | {ms(d[2], '+.3f')} |")
        out()
    _save_plot(plot, [
        {"title": f"Expert load balance ({seeds} seeds)", "xlabel": "optimizer step",
         "ylabel": "expert-load CV of the train batch (sd / mean, mean of layers; 10-step moving mean)",
         "series": [{"label": k, "x": list(range(1, steps + 1)), "runs": v} for k, v in curves.items()]},
    ], band=seeds > 1)


def _smooth(x: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(x[max(0, i - k + 1) : i + 1]) for i in range(len(x))]


def _sig(v: float) -> float:
    return float(f"{v:.5g}")


def _plot_key(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _save_plot(path: Path, panels: list[dict], band: bool = True) -> None:
    """Store a figure's curves in `CURVES` (under the PNG's path) and draw it with `_draw`.

    `panels`: one dict per panel with `title`, `xlabel`, `ylabel`, `series` (each `{"label", "runs"}`, `runs` = one
    list of y values per seed; optional `x`, default 1..n, and matplotlib `color` / `ls`), and optionally `hlines`
    (`[[y, label], ...]`), `logy` (True / False; default: log when every value is positive and they span at least a
    factor of 10), `ymin` (lower y limit), `smooth` (k: each run drawn as its k-step trailing moving mean),
    `legend` ("best" or "below"). A panel with `paired_diff_of` (index of
    another panel) and `reference` (a series label there) and no `series` shows, seed by seed, every other series of
    that panel minus the reference (same seed = same init and batches).
    With several runs a series is drawn as its mean with a min–max band over the runs.
    """
    _compact(panels)
    import fcntl
    import tempfile

    # Sections may run in parallel processes: serialize the read-modify-write of the shared file.
    with open(Path(tempfile.gettempdir()) / "hf_slim_aurora_bench_curves.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(CURVES.read_text()) if CURVES.exists() else {}
        data[_plot_key(path)] = {"panels": panels, "band": band}
        _write_curves(data)
    _draw(path, panels, band)


def _compact(panels: list[dict]) -> None:
    """Round values to 5 significant digits and drop `x` where it is just 1..n (the default)."""
    for panel in panels:
        for series in panel.get("series", []):
            series["runs"] = [[_sig(v) for v in run] for run in series["runs"]]
            if series.get("x") == list(range(1, len(series["runs"][0]) + 1)):
                del series["x"]


def _write_curves(data: dict) -> None:
    # One line per figure: small diffs, compact file.
    body = ",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in sorted(data.items()))
    CURVES.write_text("{\n" + body + "\n}\n")


_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"), (":", "*")]


def _draw(path: Path, panels: list[dict], band: bool = True) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    below = any(p.get("legend") == "below" for p in panels)
    ncols = 2 if len(panels) == 4 else len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.8, 5.4 * ncols), (4.2 + (0.9 if below else 0)) * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if "paired_diff_of" in panel:
            src = panels[panel["paired_diff_of"]]["series"]
            ref = next(s["runs"] for s in src if s["label"] == panel["reference"])
            panel = {**panel, "series": [
                {**s, "runs": [[a - b for a, b in zip(run, ref_run)] for run, ref_run in zip(s["runs"], ref)],
                 "color": s.get("color", f"C{j}"), "ls": s.get("ls", _STYLES[j % len(_STYLES)][0])}
                for j, s in enumerate(src) if s["label"] != panel["reference"]]}
        values = []
        nruns = 1
        for i, series in enumerate(panel["series"]):
            runs = [_smooth(r, panel["smooth"]) for r in series["runs"]] if panel.get("smooth") else series["runs"]
            nruns = max(nruns, len(runs))
            x = series.get("x") or list(range(1, len(runs[0]) + 1))
            mean = [statistics.mean(col) for col in zip(*runs)]
            values += [v for run in runs for v in run]
            ls, marker = _STYLES[i % len(_STYLES)]
            (line,) = ax.plot(x, mean, ls=series.get("ls", ls), lw=1.6, label=series["label"], color=series.get("color", f"C{i}"),
                              marker=marker if len(x) <= 20 else None, markersize=4, markevery=1)
            if band and len(runs) > 1:
                ax.fill_between(x, [min(c) for c in zip(*runs)], [max(c) for c in zip(*runs)],
                                color=line.get_color(), alpha=0.18, lw=0)
        for y, label in panel.get("hlines", []):
            ax.axhline(y, color="0.45", lw=0.9, ls=(0, (4, 3)), zorder=0)
            ax.annotate(label, (0.995, y), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7.5,
                        color="0.35")
        logy = panel.get("logy")
        if logy is None:
            pos = [v for v in values if v > 0]
            logy = len(pos) == len(values) and bool(pos) and max(pos) / min(pos) >= 10
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        if panel.get("ymin") is not None:
            ax.set_ylim(bottom=panel["ymin"])
        title = panel["title"]
        if band and nruns > 1:
            title += f"\nline: mean of {nruns} seeds; band: min–max over seeds"
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"], fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        if panel.get("legend") == "below":
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        else:
            ax.legend(fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def replot() -> None:
    """Redraw every figure stored in `CURVES` (no training); rewrites the file in the compact format."""
    data = json.loads(CURVES.read_text())
    for key, fig in data.items():
        _compact(fig["panels"])
        path = Path(key) if Path(key).is_absolute() else ROOT / key
        _draw(path, fig["panels"], fig.get("band", True))
        print(f"redrew {key}", flush=True)
    _write_curves(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="cost,e2e,precision,batched,balance,lm,lora")
    parser.add_argument("--reps", type=int, default=5, help="timed optimizer steps per measurement")
    parser.add_argument("--lm-steps", type=int, default=150)
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--router-steps", type=int, default=300)
    parser.add_argument("--router-arms", default="adamw,aurora", help="router arms: adamw|aurora, optionally :lr")
    parser.add_argument("--router-aux", default="0.001,0", help="router_aux_loss_coef values (0 = no aux loss)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--neuron-steps", type=int, default=1000, help="section 7 (`neurons`): steps per run")
    parser.add_argument("--neuron-mlp", default="32x512", help="section 7: HIDDENxMLP_WIDTH of the dense model")
    parser.add_argument("--neuron-arms", default="AdamW:0.003,Muon:0.01,Muon:0.02,Aurora:0.01,Aurora:0.02",
                        help="section 7: optimizer:lr arms (AdamW|Muon|Aurora)")
    parser.add_argument("--neuron-scan", default="64x512@0.02,64x1024@0.02,32x256@0.02,32x512@0.01,32x512@0.02,32x512@0.05,32x1024@0.02",
                        help="section 7b: HIDDENxMLP@LR settings, Muon vs Aurora, seed 0 ('' to skip)")
    parser.add_argument("--neuron-scan-steps", type=int, default=500)
    parser.add_argument("--replot", action="store_true", help=f"only redraw the PNGs from {CURVES.relative_to(ROOT)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU was oversubscribed)")
    parser.add_argument("--output", default=str(DOCS / "aurora_bench.md"))
    args = parser.parse_args()
    if args.replot:
        replot()
        return
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out("# Aurora benchmark results")
    out()
    out(f"Command: `HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py {' '.join(sys.argv[1:])}`".rstrip())
    out()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"Hardware: {cpu}, {args.threads} threads; shared machine, load average {load:.1f} at the start (2 cores). Versions: "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}.")
    out()
    t0 = time.time()
    cost = bench_cost(args.reps) if "cost" in parts else None
    if "e2e" in parts:
        bench_e2e(cost, args.reps)
    if "precision" in parts:
        bench_precision()
    if "batched" in parts:
        bench_batched(args.reps)
    if "balance" in parts:
        bench_balance()
    tok = ids = None
    if "lm" in parts or "lora" in parts:
        tok, ids = bench_lm(args.lm_steps, args.seeds) if "lm" in parts else (None, None)
    if "router" in parts:
        bench_router(args.router_steps, args.seeds, args.router_arms.split(","),
                     [float(a) for a in args.router_aux.split(",")], Path(args.output).with_name(Path(args.output).stem + "_load.png"))
    if "lora" in parts:
        if tok is None:
            text = _corpus("/usr/share/vim/vim90/doc/*.txt", 3_000_000)
            tok = _tokenizer(text, 512)
            ids = _ids(tok, text)
        bench_lora(tok, ids, args.lm_steps, args.lora_steps, args.seeds)
    if "neurons" in parts:
        bench_neurons(args.neuron_steps, args.seeds, args.neuron_mlp, _parse_opt_arms(args.neuron_arms),
                      [x for x in args.neuron_scan.split(",") if x], args.neuron_scan_steps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"Total wall time: {time.time() - t0:.0f} s; load average at the end {load:.1f}.")
    Path(args.output).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
