"""Aurora benchmarks: optimizer cost vs Muon, batched experts, row balance, small-LM training, LoRA, routers.

Writes docs/aurora_bench.md (tables) and PNG plots into docs/. Every ratio is measured side by side in
one run. Sizes are chosen so that the whole script runs in under ~10 minutes on a 2-core CPU.

    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py            # cost,e2e,precision,batched,balance,lm,lora
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --parts cost,e2e,precision,batched,balance
    HF_HUB_OFFLINE=1 python benchmarks/bench_aurora.py --parts router --output docs/aurora_bench_router.md
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import statistics
import sys
import time
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
from hf_slim.optim.health import neuron_update_norms  # noqa: E402


DOCS = ROOT / "docs"
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
    _plot(curves, "step", "max/min update row norm", DOCS / "aurora_row_balance.png", logy=True)


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


def _train(model, opt, batches, track_dead: bool = False, every: int = 10):
    losses, dead = [], []
    window: dict[str, list] = {}
    tracked = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ("proj" in n and ("mlp" in n or "experts" in n))]
    for step, b in enumerate(batches):
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        snap = {n: p.detach().clone() for n, p in tracked} if track_dead else None
        opt.step()
        losses.append(float(loss))
        if track_dead:
            idle_all = []
            for n, p in tracked:
                norms = neuron_update_norms(p.detach() - snap[n], n)
                w = window.setdefault(n, [])
                w.append(norms / norms.median().clamp(min=1e-30) < 0.1)
                del w[:-10]
                idle_all.append(torch.stack(w).all(0) if len(w) == 10 else torch.zeros_like(w[-1]))
            if step % every == every - 1:
                dead.append(float(torch.cat(idle_all).float().mean()))
    return losses, dead


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
    curves, finals, deads = {}, {}, {}
    for name in lrs:
        runs, vals, dd = [], [], []
        for seed in range(seeds):
            model = _model(512, seed)
            losses, dead = _train(model, _make_opt(name, model, best[name]), _batches(train_ids, 128, BS, steps, seed), track_dead=True)
            runs.append(losses)
            vals.append(_eval(model, val))
            dd.append(dead)
        curves[name] = [statistics.mean(x) for x in zip(*runs)]
        finals[name] = vals
        deads[name] = [statistics.mean(x) for x in zip(*dd)]
    adam_final = statistics.mean(_smooth(curves["AdamW"])[-10:])
    out("| optimizer | lr | val loss (mean ± sd over seeds) | steps to AdamW's final train loss | dead-neuron fraction at end |")
    out("|---|---:|---:|---:|---:|")
    for name in lrs:
        sm = _smooth(curves[name])
        hit = next((i + 1 for i, v in enumerate(sm) if v <= adam_final), None)
        sd = statistics.stdev(finals[name]) if len(finals[name]) > 1 else 0.0
        out(f"| {name} | {best[name]:g} | {statistics.mean(finals[name]):.3f} ± {sd:.3f} | {hit if hit else f'> {steps}'} | {deads[name][-1]:.3f} |")
    out()
    _plot({k: _smooth(v) for k, v in curves.items()}, "step", "train loss (mean of seeds, smoothed)", DOCS / "aurora_lm_loss.png")
    _plot({k: v for k, v in deads.items()}, "step / 10", "dead-neuron fraction (MLP)", DOCS / "aurora_dead_neurons.png")
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
        curves[name] = _smooth([statistics.mean(x) for x in zip(*runs)])
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out(f"| {name} | {best[name]:g} | {statistics.mean(vals):.3f} ± {sd:.3f} |")
    out()
    _plot(curves, "step", "LoRA train loss (mean of seeds, smoothed)", DOCS / "aurora_lora_loss.png")


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
            curves[f"router={arm}, aux {aux:g}"] = _smooth([statistics.mean(x) for x in zip(*cv_curves)])

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
    _plot(curves, "step", "expert-load CV (train batch; mean of layers, seeds)", plot)


def _smooth(x: list[float], k: int = 10) -> list[float]:
    return [statistics.mean(x[max(0, i - k + 1) : i + 1]) for i in range(len(x))]


def _plot(curves: dict[str, list[float]], xlabel: str, ylabel: str, path: Path, logy: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU was oversubscribed)")
    parser.add_argument("--output", default=str(DOCS / "aurora_bench.md"))
    args = parser.parse_args()
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
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"Total wall time: {time.time() - t0:.0f} s; load average at the end {load:.1f}.")
    Path(args.output).write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
