"""Online teacher against an offline teacher-logits folder: peak memory, optimizer-step time, and disk bytes per token.

Three parts, all on the same rows (stdlib docstrings, `hf_slim.data.stdlib_corpus`, packed into `--seq`-token rows):

1. One `prepare` subprocess builds the teacher (seeded random init), writes the teacher-logits folders with
   `write_teacher_logits` (k = `--top-k` with float32 log-probabilities first: its write time is the one-off cost of
   the offline run; then every k of `--disk-top-k` in float32 and bfloat16), and checks, before anything is timed, that
   one optimizer step of (a) the online teacher with `teacher_top_k=k` and (b) the offline folder give the same loss
   (relative difference <= 1e-4; the benchmark stops otherwise).
2. (a) and (b) are trained `--warmup` + `--steps` optimizer steps each, every run in its own fresh subprocess (so the
   peaks do not mix), in alternated order over `--repeats` repeats (a b, b a, a b, ...). Peak memory is the process's
   resident-set high-water mark (`ru_maxrss`: libraries, models, optimizer state, activations: everything); the step
   time is measured by a `TrainerCallback` from `on_step_begin` to `on_step_end` (forward of the teacher when online,
   reading the folder when offline, the student's forward and backward, the optimizer step), the first `--warmup`
   steps left out. Same student (seeded), same rows in the same order, same hyperparameters, MTP terms on
   (`num_mtp_heads=2`, the default β schedule).
3. Disk bytes per token of each folder (sum of shard bytes / tokens) next to the arithmetic of the layout.

The table, the exact command, the hardware and the versions are written into `docs/offline_teacher.md` between
marker comments (a second run replaces the block).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_offline_teacher.py          # writes the doc
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_offline_teacher.py --quick  # smoke run, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import alternate, environment, load_average, machine_note, median, ratios, spread
from _docs import write_marked_block

MARKS = ("<!-- bench_offline_teacher:start -->", "<!-- bench_offline_teacher:end -->")
CONFIGS = {"online": "(a) online teacher, `teacher_top_k={k}`", "offline": "(b) offline folder, k = {k}"}
LOSS_RTOL = 1e-4

# model shapes: the teacher's weights should dominate an online run's memory (>= 5x the student's parameters)
PRESETS = {
    "full": {
        "teacher": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                        head_dim=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
                        shared_expert_intermediate_size=768, num_mtp_heads=0),
        "student": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                        shared_expert_intermediate_size=256, num_mtp_heads=2),
        "run": dict(vocab=32_000, seq=256, batch=2, warmup=1, steps=3, repeats=3),
    },
    "quick": {
        "teacher": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                        shared_expert_intermediate_size=256, num_mtp_heads=0),
        "student": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=64,
                        shared_expert_intermediate_size=64, num_mtp_heads=2),
        "run": dict(vocab=8_000, seq=64, batch=2, warmup=1, steps=2, repeats=3),
    },
}  # fmt: skip


# ---- helpers shared by the driver and the workers -------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _model(kind: str, args: argparse.Namespace, pad_token_id: int):
    import torch

    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM

    shape = dict(PRESETS[args.preset][kind])
    layers = shape["num_hidden_layers"]
    config = SlimMoeConfig(vocab_size=args.vocab, intermediate_size=2 * shape["moe_intermediate_size"],
                           mlp_layer_types=["sparse"] * layers, pad_token_id=pad_token_id, **shape)  # fmt: skip
    torch.manual_seed(0 if kind == "teacher" else 1)  # the same weights in every process
    model = SlimMoeForCausalLM(config)
    return model.eval() if kind == "teacher" else model


def _tokenizer(workdir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(workdir / "tokenizer"))


def _training_args(args: argparse.Namespace, out: Path, **fields):
    from trainers import SlimDistillationConfig

    return SlimDistillationConfig(
        output_dir=str(out), max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch,
        max_length=args.seq, learning_rate=1e-3, logging_steps=1, seed=0, bf16=False, use_cpu=True, report_to=[],
        save_strategy="no", activation_checkpointing=False, disable_tqdm=True, dataset_num_proc=None, **fields,
    )  # fmt: skip


def _trainer(config: str, args: argparse.Namespace, workdir: Path, student, teacher, tokenizer, callbacks):
    from datasets import load_from_disk

    from trainers import SlimDistillationTrainer

    out = workdir / f"run-{config}"
    if config == "online":
        return SlimDistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=load_from_disk(str(workdir / "rows")),
            processing_class=tokenizer, callbacks=callbacks, args=_training_args(args, out, teacher_top_k=args.top_k),
        )  # fmt: skip
    folder = workdir / f"logits-k{args.top_k}-float32"
    return SlimDistillationTrainer(
        model=student, processing_class=tokenizer, callbacks=callbacks,
        args=_training_args(args, out, teacher_logits_dir=str(folder)),
    )  # fmt: skip


def _step_timer():
    """A callback that times every optimizer step (wall and process CPU time) and keeps every logged loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self, stop_after: int | None = None):
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self.losses: list[float] = []
            self.stop_after = stop_after

        def on_step_begin(self, args, state, control, **kwargs):
            self._t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self._t[0])
            self.cpu.append(time.process_time() - self._t[1])
            if self.stop_after is not None and len(self.wall) >= self.stop_after:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer


# ---- workers (each in a fresh subprocess) ---------------------------------------------------------------------------


def _prepare_worker(args: argparse.Namespace) -> dict:
    """Teacher folders (timed), their sizes, and the first-step loss check of online against offline."""
    import copy

    import torch
    from datasets import load_from_disk

    from hf_slim.teacher_logits import write_teacher_logits

    workdir = Path(args.workdir)
    tokenizer = _tokenizer(workdir)
    rows = load_from_disk(str(workdir / "rows"))
    teacher = _model("teacher", args, tokenizer.pad_token_id)
    student = _model("student", args, tokenizer.pad_token_id)
    sizes = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in
             (("teacher", teacher), ("student", student))}  # fmt: skip
    with torch.no_grad():  # warm up thread pools and kernels, so the first timed write is not the slowest
        teacher.get_decoder()(input_ids=torch.tensor(rows[: args.batch]["input_ids"]), use_cache=False)

    folders = []
    settings = [(args.top_k, "float32")] + [
        (k, dtype) for k in args.disk_top_k for dtype in ("float32", "bfloat16") if (k, dtype) != (args.top_k, "float32")
    ]
    for k, dtype in settings:
        folder = workdir / f"logits-k{k}-{dtype}"
        start = time.perf_counter()
        reader = write_teacher_logits(teacher, rows, folder, tokenizer=tokenizer, top_k=k, max_length=args.seq,
                                      batch_size=args.batch, log_prob_dtype=dtype, progress=False, overwrite=True)  # fmt: skip
        seconds = time.perf_counter() - start
        folders.append({
            "top_k": k, "dtype": dtype, "seconds": seconds, "rows": reader.num_rows, "has_labels": reader.has_labels,
            "shards": len(reader.shards), "tokens": sum(s["num_tokens"] for s in reader.shards),
            "bytes": sum(s["bytes"] for s in reader.shards),
        })  # fmt: skip
        print(f"  wrote {folder.name}: {folders[-1]['tokens']} tokens, {folders[-1]['bytes']:,} bytes, {seconds:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    write_maxrss = _maxrss_bytes()

    # the check, before anything is timed: one optimizer step of each configuration, from the same student
    first = {}
    for config in ("online", "offline"):
        timer = _step_timer()(stop_after=1)
        trainer = _trainer(config, args, workdir, copy.deepcopy(student), teacher, tokenizer, [timer])
        trainer.train()
        first[config] = timer.losses[0]
        print(f"  first-step loss {config}: {first[config]:.8f}", file=sys.stderr, flush=True)
    return {"sizes": sizes, "folders": folders, "write_maxrss": write_maxrss, "first_loss": first}


def _train_worker(args: argparse.Namespace) -> dict:
    config = args.worker.split(":", 1)[1]
    workdir = Path(args.workdir)
    tokenizer = _tokenizer(workdir)
    student = _model("student", args, tokenizer.pad_token_id)
    teacher = _model("teacher", args, tokenizer.pad_token_id) if config == "online" else None
    timer = _step_timer()()
    trainer = _trainer(config, args, workdir, student, teacher, tokenizer, [timer])
    rss_loaded = _rss_bytes()  # models built, trainer ready: what every step starts from
    trainer.train()
    assert len(timer.wall) == args.warmup + args.steps, (len(timer.wall), args.warmup + args.steps)
    return {
        "config": config, "maxrss": _maxrss_bytes(), "rss_loaded": rss_loaded, "wall": timer.wall[args.warmup :],
        "cpu": timer.cpu[args.warmup :], "warmup_wall": timer.wall[: args.warmup], "losses": timer.losses,
    }  # fmt: skip


def _subprocess(worker: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--workdir", str(args.workdir), "--preset", args.preset,
           "--threads", str(args.threads), "--top-k", str(args.top_k), "--disk-top-k", ",".join(map(str, args.disk_top_k))]
    for name in ("vocab", "seq", "batch", "warmup", "steps"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if worker == "prepare" else subprocess.PIPE,
                          text=True, env=env)  # fmt: skip
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {worker} failed (exit {proc.returncode}):\n{(proc.stderr or '')[-4000:]}")


# ---- the driver --------------------------------------------------------------------------------------------------


def _prepare_rows(args: argparse.Namespace, workdir: Path) -> dict:
    """The tokenizer (trained on the stdlib corpus) and the rows, saved for the workers."""
    from hf_slim.data import packed_lm_dataset, stdlib_corpus, train_tokenizer

    texts = stdlib_corpus()
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    if len(tokenizer) > args.vocab:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, more than --vocab {args.vocab}")
    rows = packed_lm_dataset(texts, tokenizer, args.seq)
    needed = args.batch * (args.warmup + args.steps)
    if len(rows) < needed:
        raise SystemExit(f"the corpus gives {len(rows)} rows of {args.seq} tokens; {needed} are needed")
    rows = rows.select(range(needed))
    tokenizer.save_pretrained(str(workdir / "tokenizer"))
    rows.save_to_disk(str(workdir / "rows"))
    return {"tokenizer_size": len(tokenizer), "rows": needed, "tokens": needed * args.seq}


def _layout_bytes(k: int, dtype: str, has_labels: bool) -> int:
    """Bytes per token of the stored tensors: top-k ids (int32) and log-probs, rest log-mass, input_ids (+ labels)."""
    return k * (4 + (4 if dtype == "float32" else 2)) + 4 + 4 + (4 if has_labels else 0)


def _report(args, data, prep, results, env, command, note, wall) -> str:
    sizes, k = prep["sizes"], args.top_k
    t, s = PRESETS[args.preset]["teacher"], PRESETS[args.preset]["student"]
    tokens_per_step = args.batch * args.seq
    lines = [
        f"Command: `{command}`",
        "",
        f"Hardware: {env['cpu']}, {env['cores']} cores visible, {env['mem_gib']:.0f} GiB RAM, {args.threads} torch "
        f"threads, no GPU. {note} Versions: Python {env['python']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, TRL {env['trl']}. Whole benchmark: {wall / 60:.1f} min wall.",
        "",
        f"Models (SlimMoe, random init, float32): teacher {sizes['teacher'] / 4e6:,.0f}M parameters "
        f"({_mib(sizes['teacher'])} MiB; hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, "
        f"{t['num_experts']} experts top-{t['num_experts_per_tok']}, no MTP), student {sizes['student'] / 4e6:,.0f}M "
        f"({_mib(sizes['student'])} MiB, {sizes['teacher'] / sizes['student']:.1f}x smaller; hidden "
        f"{s['hidden_size']}, {s['num_hidden_layers']} layers, {s['num_experts']} experts top-"
        f"{s['num_experts_per_tok']}, {s['num_mtp_heads']} MTP heads). Vocabulary: both heads have {args.vocab:,} rows; "
        f"the tokens are stdlib docstrings tokenized by `train_tokenizer(vocab_size={args.vocab})`"
        + (f", which stops at {data['tokenizer_size']:,} tokens on this small corpus (the other rows of the heads are "
           "never an input, like the padding rows of production vocabularies, but are part of every softmax and top-k)"
           if data["tokenizer_size"] < args.vocab else "")
        + f". Rows: {data['rows']} rows of {args.seq} tokens ({data['tokens']:,} tokens); "
        f"batch {args.batch} ({tokens_per_step:,} tokens per optimizer step), AdamW, lr 1e-3, λ 1.0 → 0.75, β 0.3 → "
        f"0.1 (defaults), forward KL on the teacher's top {k}, MTP-KD from the teacher's main head.",
        "",
        f"Check before timing: first-step loss online {prep['first_loss']['online']:.6f}, offline "
        f"{prep['first_loss']['offline']:.6f} (relative difference {_rel(prep['first_loss']):.1e}, limit {LOSS_RTOL:g}); "
        f"over every logged step of the timed runs the largest relative difference between (a) and (b) was "
        f"{_max_step_rel(results):.1e}.",
        "",
        f"{args.repeats} repeats, each configuration in a fresh process, the order alternated ((a) (b), (b) (a), ...); "
        f"{args.warmup + args.steps} optimizer steps per run, the first {args.warmup} left out of the step time. Peak "
        "memory: the process's `ru_maxrss` (everything: Python, torch, the models, AdamW state, activations); "
        "after load: its resident set once the models and the trainer are built, before the first step. Step time: "
        f"median over all timed steps of all repeats (min–max). Offline / online: per-repeat ratios, median (min–max).",
        "",
        "| configuration | peak memory (MiB) | after load (MiB) | step time (s) | CPU time per step (s) | "
        "s per 1k tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for config in ("online", "offline"):
        runs = results[config]
        peaks = [r["maxrss"] for r in runs]
        loaded = [r["rss_loaded"] for r in runs]
        steps = [w for r in runs for w in r["wall"]]
        cpu = [c for r in runs for c in r["cpu"]]
        summary[config] = (peaks, [median(r["wall"]) for r in runs])
        lines.append(
            f"| {CONFIGS[config].format(k=k)} | {_mib(median(peaks))} ({_mib(min(peaks))}–{_mib(max(peaks))}) | "
            f"{_mib(median(loaded))} | {median(steps):.2f} ({spread(steps, '{:.2f}')}) | {median(cpu):.2f} | "
            f"{median(steps) / tokens_per_step * 1000:.2f} |"
        )
    mem_ratio = ratios(summary["offline"][0], summary["online"][0])
    time_ratio = ratios(summary["offline"][1], summary["online"][1])
    lines.append(
        f"| offline / online | {median(mem_ratio):.2f}x ({spread(mem_ratio, '{:.2f}')}) | | "
        f"{median(time_ratio):.2f}x ({spread(time_ratio, '{:.2f}')}) | | |"
    )
    one_off = prep["folders"][0]
    lines += [
        f"| one-off: writing the k = {k} float32 folder (`write_teacher_logits`, batch {args.batch}) | "
        f"{_mib(prep['write_maxrss'])} (the writing process) | | — | | "
        f"{one_off['seconds'] / one_off['tokens'] * 1000:.2f} (once: {one_off['seconds']:.1f} s for "
        f"{one_off['tokens']:,} tokens) |",
        "",
        "Per run (peak MiB, step times in s, warm-up steps in brackets):",
        "",
        "| repeat | " + " | ".join(CONFIGS[c].format(k=k) for c in ("online", "offline")) + " |",
        "|---|---|---|",
    ]
    for i in range(args.repeats):
        cells = []
        for config in ("online", "offline"):
            r = results[config][i]
            cells.append(f"{_mib(r['maxrss'])}; " + ", ".join(f"{w:.2f}" for w in r["wall"])
                         + " [" + ", ".join(f"{w:.2f}" for w in r["warmup_wall"]) + "]")  # fmt: skip
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Disk: the same {data['rows']} rows written with k = {', '.join(map(str, args.disk_top_k))} and float32 / "
        "bfloat16 log-probabilities. Measured = sum of the shard files' bytes / tokens. Layout = top-k ids (int32, 4 B) "
        "+ top-k log-probs (4 or 2 B) per entry, + rest log-mass (float32, 4 B) + input_ids (int32, 4 B) per token"
        + (" + labels (int32, 4 B)" if one_off["has_labels"] else " (these rows have no labels column; with one, + 4 B)")
        + ". The difference is each shard's safetensors header and its `row_offsets` (int64, 8 B per row). Every write "
        "runs the teacher's forward over all the rows again (the same work for every k); its time is a single "
        "measurement on the shared machine.",
        "",
        "| k | log-probs | measured bytes / token | layout bytes / token | difference | folder size | write time (s per 1k "
        "tokens) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for f in sorted(prep["folders"], key=lambda f: (f["top_k"], f["dtype"] != "float32")):
        measured = f["bytes"] / f["tokens"]
        layout = _layout_bytes(f["top_k"], f["dtype"], f["has_labels"])
        lines.append(
            f"| {f['top_k']} | {f['dtype']} | {measured:,.2f} | {layout:,} | {measured - layout:+.2f} | "
            f"{f['bytes'] / 2**20:,.2f} MiB | {f['seconds'] / f['tokens'] * 1000:.2f} |"
        )
    return "\n".join(lines)


def _rel(first: dict) -> float:
    a, b = first["online"], first["offline"]
    return abs(a - b) / max(abs(a), 1e-12)


def _max_step_rel(results: dict) -> float:
    worst = 0.0
    for on, off in zip(results["online"], results["offline"]):
        for a, b in zip(on["losses"], off["losses"]):
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and few tokens, a smoke run of the whole pipeline (prints, writes no doc)")
    parser.add_argument("--vocab", type=int, help="rows of both heads (default 32000; quick 8000)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 256; quick 64)")
    parser.add_argument("--batch", type=int, help="rows per optimizer step (default 2)")
    parser.add_argument("--warmup", type=int, help="optimizer steps left out of the step time (default 1)")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per run (default 3; quick 2)")
    parser.add_argument("--repeats", type=int, help="repeats of (a) and (b), order alternated (default 3)")
    parser.add_argument("--top-k", type=int, default=32, help="k of (a) and (b)")
    parser.add_argument("--disk-top-k", default="8,32,128", help="k of the disk-size folders")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))
    parser.add_argument("--workdir", type=Path, help="where the rows and folders go (default: a temporary folder)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "offline_teacher.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.preset = args.preset or ("quick" if args.quick else "full")
    for name, value in PRESETS[args.preset]["run"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.disk_top_k = [int(x) for x in str(args.disk_top_k).split(",") if x.strip()]
    if args.top_k not in args.disk_top_k:
        args.disk_top_k = sorted({*args.disk_top_k, args.top_k})

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        result = _prepare_worker(args) if args.worker == "prepare" else _train_worker(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    env_prefix = "HF_HUB_OFFLINE=1" + (f" OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
                                       if "OMP_NUM_THREADS" in os.environ else "")  # fmt: skip
    command = f"{env_prefix} .venv/bin/python benchmarks/bench_offline_teacher.py {' '.join(sys.argv[1:])}"
    start = time.perf_counter()
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_offline_teacher-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        args.workdir.mkdir(parents=True, exist_ok=True)
        data = _prepare_rows(args, args.workdir)
        print(f"tokenizer {data['tokenizer_size']} tokens, {data['rows']} rows, {data['tokens']} tokens; preparing "
              f"folders and checking the first step ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        prep = _subprocess("prepare", args)
        rel = _rel(prep["first_loss"])
        if not rel <= LOSS_RTOL:
            raise SystemExit(
                f"FAILED: the first-step loss of the online teacher ({prep['first_loss']['online']!r}) and of the "
                f"offline folder ({prep['first_loss']['offline']!r}) differ by {rel:.2e} relative (limit {LOSS_RTOL:g}); "
                "the two configurations do not train the same thing, so their timings are not comparable."
            )
        print(f"first-step loss check passed (relative difference {rel:.1e}); prepared in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip

        def run(config: str):
            def go() -> dict:
                r = _subprocess(f"train:{config}", args)
                print(f"  {config:7s} peak {_mib(r['maxrss'])} MiB, after load {_mib(r['rss_loaded'])} MiB, steps "
                      + ", ".join(f"{w:.2f}" for w in r["wall"]) + f" s ({time.perf_counter() - start:.0f} s elapsed)",
                      flush=True)  # fmt: skip
                return r

            return go

        results = alternate([(c, run(c)) for c in ("online", "offline")], args.repeats)
    wall = time.perf_counter() - start
    worst = _max_step_rel(results)
    if worst > LOSS_RTOL:
        print(f"WARNING: a logged step loss of the timed runs differs by {worst:.1e} relative between (a) and (b)")
    note = machine_note(args.threads, load_before, load_average())
    block = _report(args, data, prep, results, environment(), command.strip(), note, wall)
    print(block)
    print(f"total wall time {wall:.0f} s")
    if not (args.no_write or args.quick):
        write_marked_block(args.output, *MARKS, block, "Offline teacher")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
