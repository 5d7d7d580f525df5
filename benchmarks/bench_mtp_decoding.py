"""Self-speculative decoding at a size bound by weight reads: MTP heads with and without MTP-KD, a nested elastic
variant as the draft, and transformers' prompt lookup, against plain greedy decoding of the same model.

The model (defaults): SlimMoe, hidden 1024, 6 layers, 16 heads of 64 (4 KV heads), 8 experts of width 2048 with
top-2 routing, vocab 8192: 108M active parameters per token (embedding and head included), 445M in all with its
2 MTP depths. Timed in fp32 (or `--dtype bfloat16`) on CPU, batch 1. Trained here, in stages cached under `--workdir`:

1. `tokenizer`: byte-level BPE (`hf_slim.data.train_tokenizer`) on the source of the Python standard library's
   top-level modules (4.7 MB of Python, PSF licence, on every machine), every `--eval-every`-th file held out.
2. `trunk`: the model without MTP heads trained from scratch with `transformers.Trainer` (LM loss).
3. `mtp_lm` and `mtp_kd`: two MTP depths added to the frozen trunk (each block starts as a copy of the last decoder
   layer, as `hf_slim.convert.from_hf` does) and trained the same steps, data and learning rate, once with MTP-LM
   only (β of MTP-KD = 0) and once with `(1 - λ)·MTP-LM + λ·MTP-KD`, λ = `--mtp-kd-lambda`, the KD target being the
   model's own main head at position i + k (the frozen trunk is the teacher: what its drafts are verified against).
   Only the heads train, so the two differ in the MTP-KD term alone.
4. `elastic`: the `mtp_kd` model nested by importance (`make_elastic` on calibration statistics of training text),
   with a `small` variant that drafts for the full model (`model.as_draft("small")`); not trained as a variant.

Then, on held-out prompts, greedy: every speculative output is first checked to equal plain greedy token for token
(the run aborts otherwise), then plain greedy and each method are timed in alternated order (A B C D, D C B A, ...),
`--repeats` times. Reported: tokens/s over plain greedy's (median of per-repeat ratios, min-max), mean tokens per
verification step (1.0 = no speed-up possible) and MTP per-depth acceptance.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_mtp_decoding.py            # train (cached) and measure
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_mtp_decoding.py --stage trunk   # one stage only
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_mtp_decoding.py --verify-cost   # forward cost of 1-6 tokens

In bf16 a forward over several tokens rounds differently from one over a single token, so a speculative output can
differ from plain greedy at a near-tie; the bf16 run counts such prompts (and where they differ) instead of aborting.
Results: docs/mtp.md ("Benchmarks").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import time
from pathlib import Path

import torch
from _bench import alternate, load_average, machine_note, median, ratios, spread

STAGES = ("tokenizer", "trunk", "mtp_lm", "mtp_kd", "elastic", "measure")


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _texts(args):
    """The top-level modules of the Python standard library, as source text (on every machine with Python; PSF
    licence), sorted by name; every `--eval-every`-th file is held out for the prompts."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    held = {i for i in range(len(texts)) if i % args.eval_every == args.eval_every - 1}
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def stage_tokenizer(args, work: Path):
    from transformers import AutoTokenizer

    from hf_slim.data import train_tokenizer

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        train, _ = _texts(args)
        train_tokenizer(train, vocab_size=args.vocab).save_pretrained(folder)
        _log(f"tokenizer: vocab {args.vocab} -> {folder}")
    return AutoTokenizer.from_pretrained(folder)


def _config(args, tokenizer, num_mtp_heads: int):
    from hf_slim.models.slim_moe import SlimMoeConfig

    h = args.hidden
    return SlimMoeConfig(
        vocab_size=len(tokenizer), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=args.layers,
        num_attention_heads=h // 64, num_key_value_heads=h // 256, head_dim=64, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate, num_mtp_heads=num_mtp_heads,
        max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def _dataset(args, tokenizer):
    from hf_slim.data import packed_lm_dataset

    train, _ = _texts(args)
    return packed_lm_dataset(train, tokenizer, args.block)


def stage_trunk(args, work: Path, tokenizer):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments, set_seed

    from hf_slim.models.slim_moe import SlimMoeForCausalLM
    from hf_slim.utils import count_parameters

    folder = work / "trunk"
    if (folder / "config.json").exists():
        return folder
    set_seed(args.seed)
    model = SlimMoeForCausalLM(_config(args, tokenizer, num_mtp_heads=0))
    _log(f"trunk: {count_parameters(model)}")
    dataset = _dataset(args, tokenizer)
    _log(f"trunk: {len(dataset)} blocks of {args.block} tokens; {args.trunk_steps} steps of {args.batch} blocks")
    training = TrainingArguments(
        output_dir=str(work / "runs" / "trunk"), max_steps=args.trunk_steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.trunk_steps // 20),
        weight_decay=0.01, logging_steps=10, save_strategy="no", report_to="none", use_cpu=True, seed=args.seed,
        dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    Trainer(model=model, args=training, train_dataset=dataset, data_collator=collator).train()
    model.config.use_cache = True  # training switched it off; decoding wants the KV cache
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _with_heads(trunk: Path, num_mtp_heads: int):
    """The trunk with `num_mtp_heads` MTP depths, each block a copy of the last decoder layer, `eh_proj` at the
    standard init and the norms at one (what `hf_slim.convert.from_hf` starts a stock model's heads from)."""
    from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM

    config = SlimMoeConfig.from_pretrained(trunk)
    config.num_mtp_heads = num_mtp_heads
    base = SlimMoeForCausalLM.from_pretrained(trunk)
    torch.manual_seed(0)
    model = SlimMoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("mtp.") for name in missing), (missing, unexpected)
    last = base.model.layers[-1].state_dict()
    for layer in model.mtp.layers:
        layer.load_state_dict(last, strict=False)
    return model


def stage_heads(args, work: Path, tokenizer, trunk: Path, kind: str):
    """Train the MTP heads on the frozen trunk: MTP-LM only (`kind="mtp_lm"`) or with MTP-KD (`"mtp_kd"`)."""
    from transformers import get_cosine_schedule_with_warmup

    from hf_slim.losses import mtp_kd_loss, mtp_lm_loss

    folder = work / kind
    if (folder / "config.json").exists():
        return folder
    model = _with_heads(trunk, args.mtp_heads)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("mtp."))
    head = model.lm_head.weight
    dataset = _dataset(args, tokenizer)
    generator = torch.Generator().manual_seed(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, args.head_steps // 20), args.head_steps)
    lam = args.mtp_kd_lambda if kind == "mtp_kd" else 0.0
    _log(f"{kind}: {args.head_steps} steps, λ = {lam}, {sum(p.numel() for p in params) / 1e6:.1f}M trained parameters")
    model.train()
    for step in range(args.head_steps):
        rows = torch.randint(0, len(dataset), (args.batch,), generator=generator).tolist()
        ids = torch.tensor(dataset[rows]["input_ids"])
        out = model(input_ids=ids, return_mtp=True, output_hidden_states=True)
        main = out.hidden_states[-1].detach()  # the frozen trunk's last normed state: its main head's input
        terms = []
        for k, hidden in enumerate(out.mtp_hidden_states, start=1):
            hidden = torch.nn.functional.pad(hidden, (0, 0, 0, k))  # depth k has T - k positions; pads never read
            loss = (1 - lam) * mtp_lm_loss(hidden, head, ids, depth=k)
            if lam:
                loss = loss + lam * mtp_kd_loss(hidden, head, main, head.detach(), depth=k, labels=ids)
            terms.append(loss)
        loss = torch.stack(terms).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.head_steps - 1:
            _log(f"{kind} step {step}: loss {loss.item():.4f} (" + ", ".join(f"{t.item():.3f}" for t in terms) + ")")
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def stage_elastic(args, work: Path, tokenizer, source: Path):
    from hf_slim.elastic import ElasticConfig, make_elastic
    from hf_slim.models.slim_moe import SlimMoeForCausalLM
    from hf_slim.pruning import collect_statistics

    folder = work / "elastic"
    if (folder / "config.json").exists():
        return folder
    model = SlimMoeForCausalLM.from_pretrained(source).eval()
    dataset = _dataset(args, tokenizer)
    calibration = torch.tensor(dataset[: args.calibration_samples]["input_ids"])
    stats = collect_statistics(model, calibration, num_samples=len(calibration), max_length=args.block,
                               batch_size=8, show_progress=False)
    elastic = make_elastic(model, ElasticConfig(variants={"small": json.loads(args.small)}), stats,
                           layer_method="block_influence")
    elastic.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _log(f"elastic: small = {args.small} -> {folder}")
    return folder


def stage_elastic_trained(args, work: Path, tokenizer, source: Path):
    """The `elastic` model with its variants trained jointly (Star Elastic): `SlimDistillationTrainer` with sandwich
    sampling, the full variant distilled from a frozen copy of itself (λ = 1, so it stays what the drafts are verified
    against) and `small` from the full variant (`elastic_teacher="full"`); MTP terms off (β = 0)."""
    from hf_slim.models.slim_moe import SlimMoeForCausalLM
    from trainers import SlimDistillationConfig, SlimDistillationTrainer

    folder = work / "elastic_trained"
    if (folder / "config.json").exists():
        return folder
    student = SlimMoeForCausalLM.from_pretrained(source)
    teacher = SlimMoeForCausalLM.from_pretrained(source).eval()
    config = SlimDistillationConfig(
        output_dir=str(work / "runs" / "elastic_trained"), max_steps=args.elastic_steps,
        per_device_train_batch_size=args.batch, learning_rate=args.elastic_lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.elastic_steps // 20), lambda_start=1.0, lambda_end=1.0, beta_start=0.0,
        beta_end=0.0, elastic_sampling="sandwich", elastic_teacher="full", max_length=args.block, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
        dataset_num_proc=None, seed=args.seed, disable_tqdm=True,
    )  # fmt: skip
    _log(f"elastic_trained: {args.elastic_steps} steps of {args.batch}x{args.block} tokens, lr {args.elastic_lr}")
    trainer = SlimDistillationTrainer(model=student, teacher_model=teacher, args=config,
                                      train_dataset=_dataset(args, tokenizer), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            _log("elastic_trained " + ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float)))
    student.config.use_cache = True
    student.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MARK_TRAINED = "<!-- bench_mtp_decoding_trained_draft:start -->", "<!-- bench_mtp_decoding_trained_draft:end -->"


def measure_trained_draft(args, work: Path, tokenizer) -> None:
    """The `small` variant drafting for its full model, nested only (`elastic`) and trained jointly
    (`elastic_trained`): each draft's output checked against its own model's plain greedy, k tuned on the tuning
    prompts, then the four runs timed in alternated order."""
    import transformers

    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    load_before = load_average()
    dtype = getattr(torch, args.dtype)
    models = {kind: SlimMoeForCausalLM.from_pretrained(work / kind, dtype=dtype).eval()
              for kind in ("elastic", "elastic_trained")}  # fmt: skip
    report, tune = _prompts(args, tokenizer)
    n = args.new_tokens
    greedy = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "use_cache": True,
              "pad_token_id": tokenizer.pad_token_id}

    def run(kind: str, k: int | None, prompts):
        model = models[kind]
        draft = model.as_draft("small", num_assistant_tokens=k) if k else None
        outputs, steps, seconds = [], [], 0.0
        with torch.no_grad():
            for ids in prompts:
                start = time.perf_counter()
                outputs.append(model.generate(ids, **({"assistant_model": draft} if draft else {}), **greedy))
                seconds += time.perf_counter() - start
                steps.append(draft.stats.tokens_per_step if draft else 1.0)
        return seconds, outputs, steps

    tuned, grids, differ = {}, {}, {}
    for kind in models:
        _, plain, _ = run(kind, None, report + tune)
        rates = {}
        for k in GRID:
            seconds, outputs, _ = run(kind, k, tune)
            rates[k] = len(tune) * n / seconds
        grids[kind], tuned[kind] = rates, max(rates, key=rates.get)
        _, outputs, _ = run(kind, tuned[kind], report)
        differ[kind] = sum(not torch.equal(a, b) for a, b in zip(outputs, plain[: len(report)]))
        if differ[kind] and args.dtype == "float32":
            raise SystemExit(f"{kind}: the draft's output differs from plain greedy on {differ[kind]} prompts")
        _log(f"{kind}: k = {tuned[kind]}; tuning tokens/s " + ", ".join(f"{k}: {r:.1f}" for k, r in rates.items()))

    steps = {}

    def timed(kind: str, drafted: bool):
        def fn():
            seconds, _, per_step = run(kind, tuned[kind] if drafted else None, report)
            steps[(kind, drafted)] = per_step
            return len(report) * n / seconds

        return fn

    runs = [(f"{kind}/{'draft' if drafted else 'greedy'}", timed(kind, drafted)) for kind in models
            for drafted in (False, True)]  # fmt: skip
    rates = alternate(runs, args.repeats)
    load_after = load_average()
    lines = [
        f"Measured by `python benchmarks/bench_mtp_decoding.py --trained-draft` ({time.strftime('%Y-%m-%d')}; "
        f"{machine_note(args.threads, load_before, load_after)} torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {args.threads} threads, {args.dtype}, batch 1.) Joint training: "
        f"{args.elastic_steps} steps of {args.batch}x{args.block} tokens, lr {args.elastic_lr}, sandwich sampling, "
        "full variant distilled from a frozen copy of itself (λ = 1), `small` from the full variant.",
        "",
        f"{len(report)} held-out prompts, {n} new tokens, {args.repeats} alternated repeats. Outputs differing from "
        f"their own model's plain greedy: {differ} (bf16 rounding at near-ties; fp32 aborts on any).",
        "",
        "| draft of the full model | k (tuned) | tokens/s ÷ the same model's plain greedy: median (min–max) | "
        "tokens per verification step |",
        "|---|---:|---:|---:|",
    ]
    names = {"elastic": "`small`, nested by importance, not trained as a variant",
             "elastic_trained": "`small`, trained jointly with the full variant"}  # fmt: skip
    for kind in models:
        r = ratios(rates[f"{kind}/draft"], rates[f"{kind}/greedy"])
        lines.append(f"| {names[kind]} | {tuned[kind]} | {median(r):.2f} ({spread(r, '{:.2f}')}) | "
                     f"{statistics.mean(steps[(kind, True)]):.2f} |")
    lines += ["", "Tuning (tokens/s per k): " + "; ".join(
        f"{kind}: " + ", ".join(f"{k}: {r:.1f}" for k, r in grids[kind].items()) for kind in models) + "."]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from _docs import write_marked_block

        write_marked_block(args.output, *MARK_TRAINED, body, "Multi-token prediction (MTP)")


MARK_START, MARK_END = "<!-- bench_mtp_decoding:start -->", "<!-- bench_mtp_decoding:end -->"
GRID = (1, 2, 3, 5, 8, 12, 16, 24)  # draft tokens per step tried on the tuning prompts (elastic draft, prompt lookup)


def _prompts(args, tokenizer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`--prefix`-token prompts cut from the held-out files at a quarter, half and three quarters of their length;
    alternately for reporting and for tuning (two disjoint sets)."""
    _, held = _texts(args)
    prompts = []
    for text in held:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        for fraction in (0.25, 0.5, 0.75):
            start = int(len(ids) * fraction)
            if start + args.prefix <= len(ids):
                prompts.append(torch.tensor([ids[start : start + args.prefix]]))
    report, tune = prompts[0::2], prompts[1::2]
    return report[: args.prompts], tune[: args.tune_prompts]


class _ForwardCounter:
    """Counts forwards of a model (verification steps of prompt lookup, which exposes no statistics)."""

    def __init__(self, model):
        self.count = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


def measure(args, work: Path, tokenizer) -> None:
    import transformers

    from hf_slim.models.slim_moe import SlimMoeForCausalLM
    from hf_slim.utils import count_parameters

    load_before = load_average()
    dtype = getattr(torch, args.dtype)
    elastic = SlimMoeForCausalLM.from_pretrained(work / "elastic", dtype=dtype).eval()  # MTP-KD heads, nested
    lm_only = SlimMoeForCausalLM.from_pretrained(work / "mtp_lm", dtype=dtype).eval()
    counter = _ForwardCounter(elastic)
    report, tune = _prompts(args, tokenizer)
    n = args.new_tokens
    greedy = {"do_sample": False, "max_new_tokens": n, "min_new_tokens": n, "use_cache": True,
              "pad_token_id": tokenizer.pad_token_id}

    def method(name: str, k: int | None = None):
        """`(model, generate kwargs, tokens-per-step reader)` of one decoding method."""
        if name == "greedy":
            return elastic, {}, lambda: 1.0
        if name == "mtp_kd":
            return elastic, {"use_mtp": True}, lambda: elastic.mtp_stats.tokens_per_step
        if name == "mtp_lm":
            return lm_only, {"use_mtp": True}, lambda: lm_only.mtp_stats.tokens_per_step
        if name == "elastic":
            draft = elastic.as_draft("small", num_assistant_tokens=k)
            return elastic, {"assistant_model": draft}, lambda: draft.stats.tokens_per_step
        if name == "lookup":
            return elastic, {"prompt_lookup_num_tokens": k}, None  # tokens per step: n / forwards of the model
        raise ValueError(name)

    def run(name: str, k: int | None, prompts) -> tuple[float, list[torch.Tensor], list[float]]:
        model, kwargs, per_step = method(name, k)
        outputs, steps, seconds = [], [], 0.0
        with torch.no_grad():
            for ids in prompts:
                forwards = counter.count
                start = time.perf_counter()
                outputs.append(model.generate(ids, **kwargs, **greedy))
                seconds += time.perf_counter() - start
                steps.append(per_step() if per_step else n / (counter.count - forwards))
        return seconds, outputs, steps

    # plain greedy of both models, and the check that they agree (one trunk, permuted by make_elastic)
    _, plain, _ = run("greedy", None, report + tune)
    with torch.no_grad():
        plain_lm = [lm_only.generate(ids, **greedy) for ids in report + tune]
    agree = sum(torch.equal(a, b) for a, b in zip(plain, plain_lm))
    _log(f"plain greedy: nested model and MTP-LM-only model agree on {agree} of {len(plain)} prompts")
    plain_of = {"elastic": plain, "lm_only": plain_lm}

    mismatches: dict[str, list[int]] = {}

    def check(name: str, k: int | None, prompts, offset: int) -> None:
        """fp32: abort unless the output equals plain greedy. bf16: a forward over several tokens rounds differently
        from one over a single token, so a near-tie can flip; count the prompts that differ and where."""
        _, outputs, _ = run(name, k, prompts)
        reference = plain_of["lm_only" if name == "mtp_lm" else "elastic"][offset : offset + len(prompts)]
        for i, (a, b) in enumerate(zip(outputs, reference)):
            if not torch.equal(a, b):
                if args.dtype == "float32":
                    raise SystemExit(f"{name} (k={k}) output differs from plain greedy on prompt {offset + i}")
                first = int((a[0, : b.shape[1]] != b[0, : a.shape[1]]).nonzero()[0]) - args.prefix
                mismatches.setdefault(f"{name} k={k}" if k else name, []).append(first)

    # tuning on the other prompts: draft tokens per step of the elastic draft and of prompt lookup, by tokens/s
    tuned, grids = {}, {}
    for name in ("elastic", "lookup"):
        check(name, GRID[0], tune, len(report))  # warm-up and check
        rates = {}
        for k in GRID:
            check(name, k, tune, len(report))
            seconds, _, _ = run(name, k, tune)
            rates[k] = len(tune) * n / seconds
        grids[name] = rates
        tuned[name] = max(rates, key=rates.get)
        inside = GRID[0] < tuned[name] < GRID[-1]
        _log(f"tuned {name}: k = {tuned[name]} ({'inside' if inside else 'AT THE EDGE OF'} the grid {GRID}); "
             + ", ".join(f"{k}: {r:.1f} tok/s" for k, r in rates.items()))

    names = ["greedy", "mtp_kd", "mtp_lm", "elastic", "lookup"]
    mismatches.clear()  # from here on: the reported prompts
    for name in names[1:]:
        check(name, tuned.get(name), report, 0)
    if mismatches:
        equal_note = (f"Outputs equal plain greedy's token for token except (bf16 rounding; method: first differing new "
                      f"token per differing prompt): {mismatches}.")
    else:
        equal_note = "Every output equals plain greedy's token for token (checked before timing)."
    _log(equal_note)

    steps: dict[str, list[float]] = {}
    depth_acceptance: dict[str, list[list[float]]] = {"mtp_kd": [], "mtp_lm": []}

    def timed(name):
        def fn():
            seconds, _, per_step = run(name, tuned.get(name), report)
            steps[name] = per_step
            if name in depth_acceptance:
                model = elastic if name == "mtp_kd" else lm_only
                depth_acceptance[name].append(model.mtp_stats.depth_acceptance)
            return len(report) * n / seconds

        return fn

    rates = alternate([(name, timed(name)) for name in names], args.repeats)
    load_after = load_average()

    # depth acceptance over the reported prompts (the last repeat's runs; greedy is deterministic)
    accept = {}
    for name in depth_acceptance:
        model = elastic if name == "mtp_kd" else lm_only
        per_prompt = []
        with torch.no_grad():
            for ids in report:
                model.generate(ids, use_mtp=True, **greedy)
                per_prompt.append(model.mtp_stats.depth_acceptance)
        accept[name] = [statistics.mean(p[d] for p in per_prompt) for d in range(model.config.num_mtp_heads)]

    active = count_parameters(elastic)["active"]
    small = elastic.slice_variant("small")
    small_active = count_parameters(small)["active"]
    del small
    greedy_ms = 1e3 / median(rates["greedy"])
    labels = {
        "greedy": "plain greedy",
        "mtp_kd": f"MTP heads, {elastic.config.num_mtp_heads} depths, trained with MTP-KD (λ = {args.mtp_kd_lambda})",
        "mtp_lm": f"MTP heads, {lm_only.config.num_mtp_heads} depths, MTP-LM only (β of MTP-KD = 0)",
        "elastic": f"nested `small` variant drafting k = {tuned['elastic']} per step",
        "lookup": f"prompt lookup (transformers), k = {tuned['lookup']}",
    }
    lines = [
        f"Measured by `python benchmarks/bench_mtp_decoding.py` ({time.strftime('%Y-%m-%d')}; "
        f"{machine_note(args.threads, load_before, load_after)} torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {args.threads} threads, {args.dtype}, batch 1.)",
        "",
        f"Model: SlimMoe hidden {args.hidden}, {args.layers} layers, {args.experts} experts of width "
        f"{args.moe_intermediate} (top-{args.top_k}), vocab {len(tokenizer)}: {active / 1e6:.1f}M active parameters "
        f"per token ({active * dtype.itemsize / 1e6:.0f} MB of {args.dtype} weights read per plain greedy token, "
        f"{greedy_ms:.1f} ms per token). `small`: {args.small}, {small_active / 1e6:.1f}M active "
        f"({small_active / active:.2f} of full). Trunk trained {args.trunk_steps} steps of {args.batch}x{args.block} "
        f"tokens, heads {args.head_steps} steps (stages in the script's docstring).",
        "",
        f"{len(report)} held-out prompts of {args.prefix} tokens, {n} new tokens each, greedy, {args.repeats} "
        f"repeats in alternated order. {equal_note}",
        "",
        "| method | tokens/s ÷ plain greedy: median (min–max) | tokens per verification step, mean over prompts |",
        "|---|---:|---:|",
    ]
    for name in names:
        r = ratios(rates[name], rates["greedy"])
        lines.append(f"| {labels[name]} | {median(r):.2f} ({spread(r, '{:.2f}')}) | "
                     f"{statistics.mean(steps[name]):.2f} |")
    lines += [
        "",
        f"Plain greedy: {median(rates['greedy']):.1f} tokens/s ({spread(rates['greedy'])}). MTP acceptance per depth "
        f"(share of drafting steps in which depth k's token was accepted, mean over prompts): with MTP-KD "
        f"{', '.join(f'{a:.3f}' for a in accept['mtp_kd'])}; MTP-LM only {', '.join(f'{a:.3f}' for a in accept['mtp_lm'])}.",
        "",
        f"Tuning ({len(tune)} other held-out prompts, tokens/s per k in {list(GRID)}): "
        + "; ".join(f"{name}: " + ", ".join(f"{k}: {r:.1f}" for k, r in grids[name].items()) for name in grids)
        + ".",
    ]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from _docs import write_marked_block

        write_marked_block(args.output, MARK_START, MARK_END, body, "Multi-token prediction (MTP)")


def verify_cost(args, work: Path) -> None:
    """Seconds of one cached forward over n new tokens (what verifying n - 1 drafts costs) ÷ one token, and the
    distinct routed experts the n tokens select per layer: the reason speculation pays less in an MoE."""
    from transformers import DynamicCache

    from hf_slim.models.slim_moe import SlimMoeForCausalLM

    model = SlimMoeForCausalLM.from_pretrained(work / "elastic", dtype=getattr(torch, args.dtype)).eval()
    picked: list[int] = []

    def count(module, inputs, output):  # the router returns (logits, scores, indices)
        picked.append(int(output[-1].unique().numel()))

    hooks = [layer.mlp.gate.register_forward_hook(count) for layer in model.model.layers]
    generator = torch.Generator().manual_seed(args.seed)
    sizes = (1, 2, 3, 4, 6)
    experts: dict[int, list[int]] = {n: [] for n in sizes}

    def forward(n):
        def fn():
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(torch.randint(100, len(model.get_input_embeddings().weight), (1, 64), generator=generator),
                      cache=cache, use_cache=True)
                new = torch.randint(100, 8000, (1, n), generator=generator)
                picked.clear()
                start = time.perf_counter()
                model(new, cache=cache, use_cache=True)
                seconds = time.perf_counter() - start
            experts[n].append(statistics.mean(picked))
            return seconds

        return fn

    times = alternate([(str(n), forward(n)) for n in sizes], args.repeats * 2)
    for hook in hooks:
        hook.remove()
    one = times["1"]
    print("| new tokens in one cached forward | seconds ÷ 1 token: median (min–max) | ms | distinct experts per layer |")
    print("|---:|---:|---:|---:|")
    for n in sizes:
        r = ratios(times[str(n)], one)
        print(f"| {n} | {median(r):.2f} ({spread(r, '{:.2f}')}) | {median(times[str(n)]) * 1e3:.1f} | "
              f"{statistics.mean(experts[n]):.2f} of {model.config.num_experts} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench_mtp"))
    parser.add_argument("--stage", choices=STAGES, default=None, help="run up to this stage only (default: all)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-intermediate", type=int, default=2048)
    parser.add_argument("--mtp-heads", type=int, default=2)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--trunk-steps", type=int, default=200)
    parser.add_argument("--head-steps", type=int, default=150)
    parser.add_argument("--mtp-kd-lambda", type=float, default=0.75)
    parser.add_argument("--small", default='{"hidden_size": 512, "num_attention_heads": 8, "num_experts": 4, '
                        '"moe_intermediate_size": 1024, "intermediate_size": 1024}',
                        help="the nested variant that drafts (JSON of config fields)")
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10, help="hold out every n-th source file")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prefix", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft-tokens", type=int, default=3, help="tokens the nested variant drafts per step")
    parser.add_argument("--lookup-tokens", type=int, default=3, help="prompt_lookup_num_tokens")
    parser.add_argument("--tune-prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "mtp.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the timed models")
    parser.add_argument("--trained-draft", action="store_true",
                        help="train the variants jointly (stage elastic_trained, cached) and measure both drafts")
    parser.add_argument("--elastic-steps", type=int, default=60)
    parser.add_argument("--elastic-lr", type=float, default=2e-4)
    parser.add_argument("--verify-cost", action="store_true",
                        help="only time cached forwards of 1-6 new tokens on the trained model (after the stages)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.verify_cost:
        return verify_cost(args, args.workdir)
    if args.trained_draft:
        tokenizer = stage_tokenizer(args, args.workdir)
        stage_elastic_trained(args, args.workdir, tokenizer, args.workdir / "elastic")
        return measure_trained_draft(args, args.workdir, tokenizer)
    last = STAGES.index(args.stage) if args.stage else len(STAGES) - 1
    tokenizer = stage_tokenizer(args, args.workdir)
    if last < 1:
        return
    trunk = stage_trunk(args, args.workdir, tokenizer)
    if last < 2:
        return
    stage_heads(args, args.workdir, tokenizer, trunk, "mtp_lm")
    if last < 3:
        return
    with_kd = stage_heads(args, args.workdir, tokenizer, trunk, "mtp_kd")
    if last < 4:
        return
    stage_elastic(args, args.workdir, tokenizer, with_kd)
    if last < 5:
        return
    measure(args, args.workdir, tokenizer)


if __name__ == "__main__":
    main()
