"""SlimDistillationConfig / SlimDistillationTrainer on tiny teacher/student pairs (offline, CPU)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from _launch import launch_two_processes
from datasets import Dataset
from safetensors.torch import load_file
from trl import SFTConfig

from hf_slim.data import packed_lm_dataset, stdlib_corpus, train_tokenizer
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from trainers import (
    SlimDistillationConfig,
    SlimDistillationTrainer,
    sample_elastic_variants,
)

SEQ = 32


# ---- tiny models and data (also imported by tests/_distill_ddp_script.py) ----------------------------------------


def tiny_tokenizer():
    texts = stdlib_corpus(max_documents=200)
    return texts, train_tokenizer(texts, vocab_size=300)


def tiny_config(vocab_size: int, **overrides) -> SlimMoeConfig:
    fields = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, mlp_layer_types=["sparse", "sparse"], num_mtp_heads=2, pad_token_id=1,
    )  # fmt: skip
    fields.update(overrides)
    return SlimMoeConfig(**fields)


def train_teacher(dataset: Dataset, vocab_size: int, steps: int = 30, **overrides) -> SlimMoeForCausalLM:
    """A tiny SlimMoe trained a few LM steps so that its distribution is worth distilling."""
    torch.manual_seed(0)
    teacher = SlimMoeForCausalLM(tiny_config(vocab_size, **overrides))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    ids = torch.tensor(dataset["input_ids"][: 8 * steps])
    for step in range(steps):
        batch = ids[8 * step : 8 * step + 8]
        loss = teacher(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return teacher.eval()


def tiny_student(vocab_size: int, **overrides) -> SlimMoeForCausalLM:
    torch.manual_seed(1)
    fields = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8)
    fields.update(overrides)
    return SlimMoeForCausalLM(tiny_config(vocab_size, **fields))


def distill_args(out, **overrides) -> SlimDistillationConfig:
    fields = dict(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
        bf16=False, report_to=[], save_strategy="no", activation_checkpointing=False, use_cpu=True, disable_tqdm=True,
        seed=0, dataset_num_proc=None, max_length=SEQ,
    )  # fmt: skip
    fields.update(overrides)
    return SlimDistillationConfig(**fields)


@pytest.fixture(scope="module")
def data():
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts, tokenizer, SEQ)
    teacher = train_teacher(dataset, len(tokenizer))
    return tokenizer, dataset, teacher


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- config --------------------------------------------------------------------------------------------------


def test_config_fields_have_help_and_slimqwen_defaults(tmp_path):
    parent = {f.name for f in dataclasses.fields(SFTConfig)}
    own = [f for f in dataclasses.fields(SlimDistillationConfig) if f.name not in parent]
    assert len(own) >= 15
    assert all(f.metadata.get("help") for f in own)
    args = SlimDistillationConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)
    schedule = args.loss_weight_schedule()
    assert schedule.at_step(0, 10) == pytest.approx((1.0, 0.3))
    assert schedule.at_step(10, 10) == pytest.approx((0.75, 0.1))
    assert schedule.at_step(5, 10) == pytest.approx((0.875, 0.2))  # linear λ, cosine β midpoint
    assert args.divergence == "forward_kl" and args.router_aux_loss_coef is None


def test_config_parses_json_strings_like_the_cli(tmp_path):
    args = SlimDistillationConfig(
        output_dir=str(tmp_path), bf16=False, use_cpu=True, elastic_sampling="probabilities", activation_checkpointing=False,
        elastic_variant_probabilities='{"full": 0.5, "small": 0.5}', teacher_model_init_kwargs='{"dtype": "float32"}',
    )  # fmt: skip
    assert args.elastic_variant_probabilities == {"full": 0.5, "small": 0.5}
    assert args.teacher_model_init_kwargs == {"dtype": "float32"}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(divergence="kl"), r"divergence.*forward_kl.*'kl'"),
        (dict(lambda_start=1.5), r"lambda_start.*1\.5"),
        (dict(beta_end=-0.1), r"beta_end"),
        (dict(lambda_schedule="step"), r"lambda_schedule.*linear"),
        (dict(temperature=0.0), r"temperature.*0\.0"),
        (dict(jsd_beta=2.0), r"jsd_beta.*2\.0"),
        (dict(teacher_top_k=0), r"teacher_top_k.*0"),
        (dict(teacher_top_k=8, divergence="reverse_kl"), r"teacher_top_k=8.*reverse_kl"),
        (dict(kd_chunk_size=0), r"kd_chunk_size.*0"),
        (dict(teacher_quantization="2bit"), r"teacher_quantization.*4bit.*'2bit'"),
        (dict(mtp_kd_target="mtp"), r"mtp_kd_target.*teacher_main"),
        (dict(mtp_lambda=1.5), r"mtp_lambda must be a number in \[0, 1\] or None.*1\.5"),
        (dict(elastic_sampling="probabilities", elastic_variant_probabilities={"full": 0.5, "small": 0.3}),
         r"sum to 1.*0\.8"),
        (dict(elastic_sampling="probabilities"), r"elastic_variant_probabilities"),
        (dict(elastic_variant_probabilities={"full": 1.0}), r"elastic_sampling is None"),
        (dict(elastic_sampling="random"), r"elastic_sampling.*sandwich.*'random'"),
        (dict(elastic_teacher="self"), r"elastic_teacher.*'self'"),
        (dict(schedule_step_offset=10, schedule_total_steps=5), r"schedule_total_steps=5"),
        (dict(teacher_model_init_kwargs="{not json"), r"teacher_model_init_kwargs.*JSON"),
    ],
)  # fmt: skip
def test_config_validation_names_field_and_value(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        SlimDistillationConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, **overrides)


# ---- training --------------------------------------------------------------------------------------------------


def _eval_terms(trainer, dataset) -> dict[str, float]:
    metrics = trainer.evaluate(dataset) if dataset is not None else trainer.evaluate()
    return {k[len("eval_") :]: v for k, v in metrics.items() if k.startswith("eval_")}


def test_training_reduces_every_term_and_logs_them(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    teacher_before = params(teacher)
    args = distill_args(
        tmp_path, max_steps=15, lambda_start=0.5, lambda_end=0.5, beta_start=0.5, beta_end=0.5,
        lr_scheduler_type="constant", router_aux_loss_coef=0.01,
    )  # fmt: skip
    held_out = dataset.select(range(1000, 1016))
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset.select(range(200)),
        processing_class=tokenizer,
    )  # fmt: skip
    before = _eval_terms(trainer, held_out)
    trainer.train()
    after = _eval_terms(trainer, held_out)
    for term in ("lm", "kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2"):
        assert after[term] < before[term] - 0.05, (term, before[term], after[term])
    logged = trainer.state.log_history[0]
    expected = {"loss", "lm", "kd", "mtp_lm", "mtp_kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2", "aux",
                "lambda", "beta", "num_tokens"}  # fmt: skip
    assert expected <= set(logged), set(logged)
    assert logged["lambda"] == 0.5 and logged["beta"] == 0.5
    assert logged["num_tokens"] == 4 * SEQ
    # the logged total is the objective of the logged terms (+ aux)
    objective = 0.5 * logged["lm"] + 0.5 * logged["kd"] + 0.5 * (0.5 * logged["mtp_lm"] + 0.5 * logged["mtp_kd"])
    assert logged["loss"] == pytest.approx(objective + 0.01 * logged["aux"], rel=1e-4)
    # the teacher is frozen, in eval mode and untouched
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in params(teacher).items():
        torch.testing.assert_close(value, teacher_before[name], rtol=0, atol=0)


@pytest.mark.parametrize("mtp_lambda", [0.0, 1.0])
def test_mtp_lambda_weighs_the_mtp_terms_apart_from_lambda(tmp_path, data, mtp_lambda):
    """SlimQwen's Table 3 ablations: MTP-LM without MTP-KD (0) and MTP-KD without MTP-LM (1), λ unchanged."""
    tokenizer, dataset, teacher = data
    args = distill_args(
        tmp_path, max_steps=1, lambda_start=0.5, lambda_end=0.5, beta_start=0.5, beta_end=0.5, mtp_lambda=mtp_lambda,
        router_aux_loss_coef=0.0,
    )  # fmt: skip
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset.select(range(8)),
        processing_class=tokenizer,
    )  # fmt: skip
    terms = _eval_terms(trainer, dataset.select(range(8)))
    mtp = (1 - mtp_lambda) * terms["mtp_lm"] + mtp_lambda * terms["mtp_kd"]
    assert terms["loss"] == pytest.approx(0.5 * terms["lm"] + 0.5 * terms["kd"] + 0.5 * mtp, rel=1e-5)


def test_kd_is_zero_when_student_is_teacher(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = copy.deepcopy(teacher)
    args = distill_args(tmp_path, mtp_kd_target="teacher_mtp", divergence="jsd", jsd_beta=0.3)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    terms = _eval_terms(trainer, dataset.select(range(8)))
    assert abs(terms["kd"]) < 1e-6 and abs(terms["mtp_kd_1"]) < 1e-6 and abs(terms["mtp_kd_2"]) < 1e-6
    assert terms["lm"] > 1.0  # the LM term is not zero: the check above is not vacuous
    # against the teacher's main head at position i + k, the MTP heads do not match exactly
    trainer.args.mtp_kd_target = "teacher_main"
    assert _eval_terms(trainer, dataset.select(range(8)))["mtp_kd_1"] > 1e-3


def test_checkpoint_holds_the_student_only(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    args = distill_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    ).train()
    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert set(saved) <= set(student.state_dict())
    assert saved["model.layers.0.mlp.gate.weight"].shape[0] == 2  # the student's 2 experts, not the teacher's 4


# ---- bad input -------------------------------------------------------------------------------------------------


def test_vocab_mismatch_says_what_to_do(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = SlimMoeForCausalLM(tiny_config(len(tokenizer) + 8))
    with pytest.raises(ValueError, match=r"Vocabulary mismatch.*308.*300.*resize"):
        SlimDistillationTrainer(
            model=student, teacher_model=teacher, args=distill_args(tmp_path), train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


def test_mtp_weight_without_mtp_heads(tmp_path, data):
    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer), num_mtp_heads=0)
    with pytest.raises(ValueError, match=r"beta_start=0\.3.*no MTP heads.*num_mtp_heads"):
        SlimDistillationTrainer(
            model=student, teacher_model=teacher, args=distill_args(tmp_path), train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip
    # with β = 0 the same student trains (LM + KD only)
    args = distill_args(tmp_path, beta_start=0.0, beta_end=0.0, max_steps=1)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    assert "kd" in trainer.state.log_history[0] and "mtp_kd" not in trainer.state.log_history[0]


def test_teacher_mtp_target_needs_teacher_mtp_heads(tmp_path, data):
    tokenizer, dataset, _ = data
    teacher = SlimMoeForCausalLM(tiny_config(len(tokenizer), num_mtp_heads=0))
    with pytest.raises(ValueError, match=r"teacher_mtp.*2 MTP depths.*has 0"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=teacher,
            args=distill_args(tmp_path, mtp_kd_target="teacher_mtp"), train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip


def test_dataset_without_expected_column(tmp_path, data):
    tokenizer, _, teacher = data
    bad = Dataset.from_dict({"body": ["some text"] * 4})
    with pytest.raises(ValueError, match=r"\['body'\].*'input_ids'.*'text'.*dataset_text_field"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=teacher, args=distill_args(tmp_path), train_dataset=bad,
            processing_class=tokenizer,
        )  # fmt: skip


def test_text_dataset_is_tokenized_the_trl_way(tmp_path, data):
    tokenizer, _, teacher = data
    texts = Dataset.from_dict({"body": stdlib_corpus(max_documents=40)})
    args = distill_args(tmp_path, max_steps=1, dataset_text_field="body", per_device_train_batch_size=2)
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=texts,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.log_history[0]["kd"] > 0


def test_no_teacher(tmp_path, data):
    tokenizer, dataset, _ = data
    with pytest.raises(ValueError, match=r"No teacher.*teacher_model_name_or_path"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), args=distill_args(tmp_path), train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


# 4bit at hidden size 32 used to fail on AVX512-BF16 CPUs ("shape '[32, 0]' is invalid"): bitsandbytes' packed CPU
# layout needs in_features % 64 == 0 and out_features % 32 == 0; fit_bnb_4bit_cpu_layers routes the other layers to
# bitsandbytes' generic path (see docs/distillation.md).
@pytest.mark.parametrize("kind, layer", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_teacher_from_path(tmp_path, data, kind, layer):
    pytest.importorskip("bitsandbytes")
    tokenizer, dataset, teacher = data
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    args = distill_args(tmp_path / "out", max_steps=2, teacher_quantization=kind, teacher_model_name_or_path=str(folder))
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    assert type(trainer.teacher_model.model.layers[0].self_attn.q_proj).__name__ == layer
    trainer.train()
    kd = [h["kd"] for h in trainer.state.log_history if "kd" in h]
    assert len(kd) == 2 and all(0 < k < 10 for k in kd)
    # an instantiated teacher cannot be quantized after the fact: say so instead of ignoring the field
    with pytest.raises(ValueError, match=r"teacher_quantization.*already instantiated"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


def test_4bit_teacher_keeps_the_cpu_fast_path_where_bitsandbytes_can_pack(tmp_path, data):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import has_avx512bf16

    tokenizer, dataset, _ = data
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, head_dim=16, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    teacher = SlimMoeForCausalLM(tiny_config(len(tokenizer), **sizes)).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    args = distill_args(tmp_path / "out", teacher_quantization="4bit", teacher_model_name_or_path=str(tmp_path / "teacher"))
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    quantized = trainer.teacher_model
    batch = torch.tensor(dataset["input_ids"][:4])
    with torch.no_grad():
        got, want = quantized.model(input_ids=batch).last_hidden_state, teacher.model(input_ids=batch).last_hidden_state
    assert ((got.float() - want).norm() / want.norm()).item() < 0.3  # NF4 error, not garbage
    assert _eval_terms(trainer, dataset.select(range(8)))["kd"] > 0
    layers = {n: m for n, m in quantized.named_modules() if type(m).__name__ == "Linear4bit"}
    generic = {n for n, m in layers.items() if not m.support_avx512bf16_for_cpu}
    # only the 1-row shared-expert gates cannot be packed; the 64-wide projections keep bitsandbytes' fast path
    assert generic == {n for n in layers if n.endswith("shared_expert_gate")} and generic
    if has_avx512bf16():
        # the teacher ran its decoder (not its MTP blocks) under no_grad: each of those layers was packed
        packed = {n for n, m in layers.items() if getattr(m.weight.quant_state, "packing_format_for_cpu", False)}
        assert packed == {n for n in layers if n.startswith("model.")} - generic


def test_teacher_path_with_other_tokenizer(tmp_path, data):
    tokenizer, dataset, teacher = data
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    other = train_tokenizer(stdlib_corpus(max_documents=20), vocab_size=300)
    other.save_pretrained(folder)
    with pytest.raises(ValueError, match=r"Tokenizer mismatch.*processing_class"):
        SlimDistillationTrainer(
            model=tiny_student(len(tokenizer)), teacher_model=str(folder), args=distill_args(tmp_path / "o"),
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip
    tokenizer.save_pretrained(folder)  # the same tokenizer: loads and trains from the path
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=str(folder), args=distill_args(tmp_path / "o", max_steps=1),
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert trainer.state.log_history[0]["kd"] > 0


# ---- chat / prompt-completion data: TRL's preparation, KD on the LM loss mask only ------------------------------

# A minimal template with `{% generation %}` markers, so that TRL can build `assistant_only_loss` masks.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}"
    "{{ m['content'] + eos_token }}{% endgeneration %}{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def chat_datasets(kind: str, n: int = 48) -> tuple[Dataset, Dataset]:
    """(train, held-out) conversations: `messages` or conversational `prompt` / `completion` columns."""
    words = " ".join(stdlib_corpus(max_documents=200)).split()
    rows = [(" ".join(words[6 * i : 6 * i + 2]), " ".join(words[6 * i + 2 : 6 * i + 6])) for i in range(n + 8)]
    if kind == "messages":
        columns = {"messages": [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in rows]}
    else:
        columns = {
            "prompt": [[{"role": "user", "content": u}] for u, _ in rows],
            "completion": [[{"role": "assistant", "content": a}] for _, a in rows],
        }
    dataset = Dataset.from_dict(columns)
    return dataset.select(range(n)), dataset.select(range(n, n + 8))


def _teacher_perturbed_at(trainer, monkeypatch, where: str) -> None:
    """Add noise to the teacher's final hidden states at every position (`"all"`) or only at the positions whose next
    token is masked out of the LM loss (`"masked"`: under completion/assistant-only loss, the prompt)."""
    current = {}
    compute_loss, teacher_hidden = trainer.compute_loss, trainer._teacher_hidden

    def remember_labels(model, inputs, *args, **kwargs):
        current["labels"] = inputs["labels"]
        return compute_loss(model, inputs, *args, **kwargs)

    def perturbed(inputs, want_mtp):
        hidden, mtp = teacher_hidden(inputs, want_mtp)
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)) * 3.0
        if where == "masked":  # teacher position p only scores label p + 1 (main head and MTP-KD 'teacher_main')
            masked = torch.nn.functional.pad(current["labels"][:, 1:] == -100, (0, 1), value=True)
            noise = noise * masked[..., None]
        return hidden + noise.to(hidden.dtype), mtp

    monkeypatch.setattr(trainer, "compute_loss", remember_labels)
    monkeypatch.setattr(trainer, "_teacher_hidden", perturbed)


@pytest.mark.parametrize("kind, overrides", [("messages", dict(assistant_only_loss=True)), ("prompt_completion", {})])
def test_chat_data_is_prepared_the_trl_way_and_kd_follows_the_loss_mask(tmp_path, data, monkeypatch, kind, overrides):
    tokenizer, _, teacher = data
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHAT_TEMPLATE
    train, held_out = chat_datasets(kind)
    train_steps = 10 if kind == "messages" else 0
    args = distill_args(
        tmp_path, max_steps=max(train_steps, 1), max_length=64, lambda_start=0.5, lambda_end=0.5, beta_start=0.5,
        beta_end=0.5, lr_scheduler_type="constant", per_device_eval_batch_size=8, **overrides,
    )  # fmt: skip
    trainer = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=train,
        eval_dataset=held_out, processing_class=tokenizer,
    )  # fmt: skip
    # TRL built the labels: the rendered prompt (user turn, "<|assistant|>" header) is -100, the answer is not
    batch = next(iter(trainer.get_eval_dataloader()))
    real = batch["attention_mask"].bool()
    masked = (batch["labels"] == -100) & real
    assert 0.2 < masked.sum() / real.sum() < 0.8
    header = tokenizer("<|assistant|>\n")["input_ids"]
    ids = batch["input_ids"][0].tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)
    assert (batch["labels"][0, :start] == -100).all() and (batch["labels"][0, start:][real[0, start:]] != -100).all()

    def terms(where=None):
        with monkeypatch.context() as patch:
            if where is not None:
                _teacher_perturbed_at(trainer, patch, where)
            return _eval_terms(trainer, None)

    before = terms()
    # KD and MTP-KD are counted on the LM loss mask: a teacher changed only where the target is a prompt token
    # leaves them unchanged, while the same change everywhere moves them (the check is not vacuous)
    prompt_only, everywhere = terms("masked"), terms("all")
    for term in ("kd", "mtp_kd_1", "mtp_kd_2"):
        assert prompt_only[term] == pytest.approx(before[term], abs=1e-6), term
        assert abs(everywhere[term] - before[term]) > 1e-2, term
    assert prompt_only["lm"] == before["lm"]
    if train_steps:
        trainer.train()
        after = terms()
        for term in ("lm", "kd", "mtp_lm_1", "mtp_kd_1", "mtp_kd_2"):
            assert after[term] < before[term] - 0.05, (term, before[term], after[term])


# ---- packed pretraining text: per-document terms -----------------------------------------------------------------


def test_bfd_packing_gives_the_terms_of_the_separate_documents(tmp_path, data, monkeypatch):
    """Padding-free `bfd` packing puts several documents in one row with `position_ids` restarting at 0; every term
    (LM, KD, MTP-LM and MTP-KD per depth) must equal the one computed on the documents padded one per row."""
    import trainers.distillation_trainer as module

    tokenizer, _, teacher = data
    documents = _ragged(12)  # 6..32 tokens each, <= max_length so bfd packs them whole
    common = dict(max_steps=2, per_device_eval_batch_size=4, per_device_train_batch_size=4, lambda_start=0.5,
                  beta_start=0.5)  # fmt: skip
    packed = SlimDistillationTrainer(
        model=tiny_student(len(tokenizer)), teacher_model=teacher, train_dataset=documents, eval_dataset=documents,
        args=distill_args(tmp_path / "p", packing=True, packing_strategy="bfd", **common), processing_class=tokenizer,
    )  # fmt: skip
    padded = _train(tmp_path / "u", teacher, tokenizer, documents, **common)
    batch = next(iter(packed.get_eval_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one row
    restarts = (batch["position_ids"][0] == 0).sum().item()
    assert restarts > 1  # several documents share the row, positions reset at each
    assert len(packed.eval_dataset) < len(documents)
    reference = _eval_terms(padded, documents)
    got = _eval_terms(packed, None)
    for term in ("lm", "kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2"):
        assert got[term] == pytest.approx(reference[term], rel=1e-5, abs=1e-6), term
    # control: masking only position_ids == 0 (TRL's depth-0 rule) lets MTP depths score the next document's tokens
    with monkeypatch.context() as patch:
        original = module.depth_labels
        patch.setattr(module, "depth_labels", lambda labels, position_ids, depth: original(labels, position_ids, 0))
        leaky = _eval_terms(packed, None)
    assert leaky["kd"] == pytest.approx(reference["kd"], rel=1e-5)
    assert max(abs(leaky[t] - reference[t]) for t in ("mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2")) > 1e-3
    packed.train()
    assert all(h["kd"] > 0 for h in packed.state.log_history if "kd" in h)


# ---- ecosystem: accumulation, resume, aurora, LoRA, checkpointing ---------------------------------------------------


def _ragged(n: int = 16) -> Dataset:
    """Examples of different lengths, so micro-batches hold different numbers of target tokens."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, SEQ + 1, (n,), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(2, 300, (m,), generator=generator).tolist() for m in lengths]})


def _train(tmp_path, teacher, tokenizer, dataset, student=None, **overrides):
    student = student if student is not None else tiny_student(len(tokenizer))
    args = distill_args(tmp_path, **overrides)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer


def test_gradient_accumulation_matches_the_large_batch(tmp_path, data, monkeypatch):
    tokenizer, _, teacher = data
    ragged = _ragged()
    common = dict(max_steps=2, router_aux_loss_coef=0.0, lambda_start=0.5, beta_start=0.5, optim="sgd", learning_rate=0.5)
    big = _train(tmp_path / "a", teacher, tokenizer, ragged, per_device_train_batch_size=4, **common)
    big.train()
    accumulated = _train(
        tmp_path / "b", teacher, tokenizer, ragged, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        **common,
    )  # fmt: skip
    accumulated.train()
    for (name, p), q in zip(big.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # control: a per-micro-batch mean (no num_items_in_batch) does change the result on this ragged data
    monkeypatch.setattr(SlimDistillationTrainer, "_get_num_items_in_batch", lambda self, batches, device: None)
    naive = _train(
        tmp_path / "c", teacher, tokenizer, ragged, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        **common,
    )  # fmt: skip
    naive.train()
    diff = max((p - q).abs().max().item() for p, q in zip(big.model.parameters(), naive.model.parameters()))
    assert diff > 1e-4


def test_resume_from_checkpoint_reproduces_the_run(tmp_path, data):
    tokenizer, dataset, teacher = data
    subset = dataset.select(range(64))
    full = _train(tmp_path / "full", teacher, tokenizer, subset, max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    resumed = _train(tmp_path / "full", teacher, tokenizer, subset, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # the log history restored from the checkpoint, then steps 3 and 4 with the uninterrupted run's values
    logs = [h for h in resumed.state.log_history if "kd" in h]
    reference = [h for h in full.state.log_history if "kd" in h]
    assert [h["step"] for h in logs] == [1, 2, 3, 4]
    for got, want in zip(logs[2:], reference[2:]):
        for key in ("loss", "kd", "mtp_kd_2", "lambda", "beta"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_optim_aurora(tmp_path, data):
    import hf_slim.optim  # noqa: F401  (registers optim="aurora")

    tokenizer, dataset, teacher = data
    trainer = _train(tmp_path, teacher, tokenizer, dataset, max_steps=3, optim="aurora", learning_rate=1e-2)
    start = params(trainer.model)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(optimizer).__name__ == "Aurora"
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == len(start)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_peft_lora_student(tmp_path, data):
    from peft import LoraConfig

    tokenizer, dataset, teacher = data
    student = tiny_student(len(tokenizer))
    base = params(student)
    args = distill_args(tmp_path, max_steps=3, activation_checkpointing=True)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )  # fmt: skip
    trainer.train()
    named = dict(trainer.model.named_parameters())
    lora_b = [p for n, p in named.items() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero and learned
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in named.items() if "lora_" not in n}
    assert all(torch.equal(frozen[n], base[n]) for n in base if n in frozen)
    assert {"kd", "mtp_kd_1"} <= set(trainer.state.log_history[0])


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, data):
    tokenizer, dataset, teacher = data
    runs = []
    for flag in (False, True):
        trainer = _train(tmp_path / str(flag), teacher, tokenizer, dataset, max_steps=2, activation_checkpointing=flag)
        trainer.train()
        runs.append(trainer.model)
    assert runs[1].model.gradient_checkpointing
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ---- elastic students --------------------------------------------------------------------------------------------


def elastic_student(vocab_size: int) -> SlimMoeForCausalLM:
    from hf_slim.elastic import ElasticConfig

    student = tiny_student(vocab_size)
    variants = {"small": {"hidden_size": 16, "num_hidden_layers": 1}, "medium": {"hidden_size": 24}}
    student.config.elastic = ElasticConfig(variants=variants).to_dict()
    return student


def test_sampling_frequencies_follow_the_probabilities():
    names = ["small", "medium", "full"]
    probabilities = {"full": 0.5, "medium": 0.3, "small": 0.2}
    draws = Counter(
        sample_elastic_variants(names, "probabilities", probabilities, seed=0, step=step, micro_step=micro)[0]
        for step in range(1500)
        for micro in range(2)
    )
    for name, p in probabilities.items():
        assert abs(draws[name] / 3000 - p) < 0.03, (name, draws)
    # a pure function of (seed, step, micro_step): the same on every rank and after a resume
    assert sample_elastic_variants(names, "probabilities", probabilities, 3, 7, 1) == sample_elastic_variants(
        names, "probabilities", probabilities, 3, 7, 1
    )


def test_sandwich_rule():
    names = ["xs", "small", "medium", "full"]
    middles = Counter()
    for step in range(400):
        chosen = sample_elastic_variants(names, "sandwich", None, seed=0, step=step)
        assert chosen[0] == "full" and chosen[-1] == "xs" and len(chosen) == 3
        middles[chosen[1]] += 1
    assert set(middles) == {"small", "medium"} and min(middles.values()) > 150
    assert sample_elastic_variants(["small", "full"], "sandwich", None, 0, 0) == ["full", "small"]


def test_elastic_probabilities_training_logs_each_variant(tmp_path, data):
    tokenizer, dataset, teacher = data
    probabilities = {"full": 0.5, "medium": 0.3, "small": 0.2}
    args = distill_args(tmp_path, max_steps=6, elastic_sampling="probabilities", elastic_variant_probabilities=probabilities)
    trainer = SlimDistillationTrainer(
        model=elastic_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    names = ["small", "medium", "full"]
    for log in [h for h in trainer.state.log_history if "kd" in h]:
        expected = sample_elastic_variants(names, "probabilities", probabilities, 0, log["step"] - 1, 0)[0]
        logged = {key.split("/")[0] for key in log if "/" in key}
        assert logged == {expected}, (log["step"], logged)
        assert log[f"{expected}/kd"] == pytest.approx(log["kd"]) and log[f"{expected}/mtp_kd_2"] > 0


def test_elastic_sandwich_with_gradient_checkpointing_gives_the_same_steps(tmp_path, data):
    # The model hands each checkpointed block its variant sizes, so the backward recompute uses the same variant.
    tokenizer, dataset, teacher = data
    runs = []
    for flag in (False, True):
        torch.manual_seed(0)
        student = elastic_student(len(tokenizer))
        args = distill_args(tmp_path / str(flag), max_steps=2, elastic_sampling="sandwich", activation_checkpointing=flag)
        trainer = SlimDistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        trainer.train()
        runs.append(trainer.model)
    assert runs[1].model.layers[0].gradient_checkpointing and not runs[0].model.layers[0].gradient_checkpointing
    for (name, p), q in zip(runs[0].named_parameters(), runs[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_elastic_sandwich_with_full_variant_as_teacher(tmp_path, data):
    tokenizer, dataset, teacher = data
    args = distill_args(tmp_path, max_steps=2, elastic_sampling="sandwich", elastic_teacher="full")
    student = elastic_student(len(tokenizer))
    start = params(student)
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    log = trainer.state.log_history[0]
    assert {"full/kd", "medium/kd", "small/kd", "small/mtp_kd_1"} <= set(log)
    # the full variant learns from the teacher; the smaller ones from the full variant, a closer target
    assert log["small/kd"] < log["full/kd"] and log["medium/kd"] < log["full/kd"]
    assert log["kd"] == pytest.approx((log["full/kd"] + log["medium/kd"] + log["small/kd"]) / 3, rel=1e-4)
    assert any(not torch.equal(p, start[n]) for n, p in trainer.model.named_parameters())


@pytest.mark.parametrize(
    "student_kind, overrides, match",
    [
        ("elastic", dict(elastic_sampling="probabilities", elastic_variant_probabilities={"full": 0.5, "tiny": 0.5}),
         r"'tiny'.*valid variants: \['small', 'medium', 'full'\]"),
        ("plain", dict(elastic_sampling="sandwich"), r"elastic_sampling='sandwich' needs an elastic student"),
    ],
)  # fmt: skip
def test_elastic_bad_input(tmp_path, data, student_kind, overrides, match):
    tokenizer, dataset, teacher = data
    student = elastic_student(len(tokenizer)) if student_kind == "elastic" else tiny_student(len(tokenizer))
    with pytest.raises(ValueError, match=match):
        SlimDistillationTrainer(
            model=student, teacher_model=teacher, args=distill_args(tmp_path, **overrides), train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


def test_only_layer_dropping_variants_leave_parameters_without_gradient(data):
    """The premise of `unused_parameter_reasons`: width variants slice tensors that all still get a gradient; a
    variant with fewer layers leaves the dropped layers' parameters without one."""
    tokenizer, dataset, _ = data
    student = elastic_student(len(tokenizer))  # small: hidden 16 and 1 of 2 layers; medium: hidden 24
    batch = torch.tensor(dataset["input_ids"][:2])
    unused = {}
    for variant in ("full", "medium", "small"):
        student.zero_grad(set_to_none=True)
        kwargs = {} if variant == "full" else {"elastic_variant": variant}
        student(input_ids=batch, labels=batch, output_router_logits=True, **kwargs).loss.backward()
        unused[variant] = {n for n, p in student.named_parameters() if p.grad is None}
    assert unused["full"] == set() and unused["medium"] == set()
    assert unused["small"] and all(n.startswith("model.layers.1.") for n in unused["small"])


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(elastic_sampling="probabilities", elastic_variant_probabilities={"full": 0.5, "small": 0.5}), True),
        (dict(elastic_sampling="probabilities", elastic_variant_probabilities={"full": 0.5, "medium": 0.5}), None),
        (dict(elastic_sampling="sandwich"), None),  # the full variant runs every step
        (dict(beta_start=0.0, beta_end=0.0), True),  # MTP heads unused
        (dict(), None),
    ],
)  # fmt: skip
def test_ddp_find_unused_parameters_is_set_when_a_step_can_skip_parameters(tmp_path, data, overrides, expected):
    tokenizer, dataset, teacher = data
    # gradient checkpointing (SFTConfig's default) is what makes the Trainer default to find_unused_parameters=False
    args = distill_args(tmp_path, activation_checkpointing="elastic_sampling" not in overrides, **overrides)
    trainer = SlimDistillationTrainer(
        model=elastic_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.args.ddp_find_unused_parameters is expected


def test_explicit_find_unused_parameters_false_with_a_layer_dropping_variant(tmp_path, data, monkeypatch):
    tokenizer, dataset, teacher = data
    monkeypatch.setattr(SlimDistillationConfig, "world_size", property(lambda self: 2))  # as under DDP
    args = distill_args(
        tmp_path, ddp_find_unused_parameters=False, elastic_sampling="probabilities",
        elastic_variant_probabilities={"full": 0.8, "small": 0.2},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"ddp_find_unused_parameters=False.*'small'.*keeps 1 of 2 layers.*=True"):
        SlimDistillationTrainer(
            model=elastic_student(len(tokenizer)), teacher_model=teacher, args=args, train_dataset=dataset,
            processing_class=tokenizer,
        )  # fmt: skip


# ---- accelerate launch: 2 CPU processes (DDP, gloo) ---------------------------------------------------------------


def test_accelerate_launch_two_process_ddp(tmp_path):
    results = launch_two_processes(Path(__file__).with_name("_distill_ddp_script.py"), tmp_path, timeout=300)
    assert results[0]["world_size"] == 2 and results[0]["backend"] == "gloo"
    assert results[0]["wrapped"] == "DistributedDataParallel"
    assert results[0]["teacher_wrapped"] != "DistributedDataParallel"  # the frozen teacher is not wrapped
    # gradients were averaged: both ranks hold the same student; the logged terms are reduced over both ranks
    assert results[0]["checksum"] == results[1]["checksum"]
    assert results[0]["kd"] == results[1]["kd"] and all(k > 0 for k in results[0]["kd"])
    assert results[0]["num_tokens"] == 3 * 2 * 2 * SEQ  # steps x processes x batch x sequence
    # the elastic student trained its 1-layer "small" variant alone in some step: DDP ran with find_unused_parameters
    assert results[0]["find_unused"] is True
    assert ["small"] in results[0]["variants"] and results[0]["variants"] == results[1]["variants"]


# ---- progressive runner: hf-slim distill CONFIG.yaml ------------------------------------------------------------


def test_progressive_distill_cli_two_stages(tmp_path, data):
    import argparse

    from transformers import AutoModelForCausalLM

    from hf_slim.cli.distill import add_distill_parser

    tokenizer, dataset, _ = data
    teacher = train_teacher(dataset, len(tokenizer), steps=3, num_hidden_layers=4, mlp_layer_types=["sparse"] * 4)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    config = tmp_path / "distill.yaml"
    config.write_text(
        f"""
teacher_model_name_or_path: {tmp_path / "teacher"}
dataset_name: hf_slim:stdlib
prune_stages:
  - {{num_hidden_layers: 3}}
  - {{num_hidden_layers: 2, hidden_size: 24, num_experts: 2}}
stage_tokens: [256, 384]
calibration_samples: 8
output_dir: {tmp_path / "run"}
max_length: {SEQ}
per_device_train_batch_size: 4
logging_steps: 1
learning_rate: 0.001
lr_scheduler_type: linear
bf16: false
use_cpu: true
activation_checkpointing: false
report_to: []
save_strategy: "no"
disable_tqdm: true
"""
    )
    parser = argparse.ArgumentParser(prog="hf-slim")
    add_distill_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", str(config)])
    assert args.handler(args) == 0

    run = tmp_path / "run"
    stage1 = AutoModelForCausalLM.from_pretrained(run / "stage-1")
    stage2 = AutoModelForCausalLM.from_pretrained(run / "stage-2")
    assert stage1.config.num_hidden_layers == 3 and stage1.config.hidden_size == 32
    assert (stage2.config.num_hidden_layers, stage2.config.hidden_size, stage2.config.num_experts) == (2, 24, 2)
    # one schedule over both stages (2 + 3 steps): the LR and λ continue instead of restarting
    history = json.loads((run / "final" / "trainer_log_history.json").read_text())
    steps = [h for h in history if "kd" in h]
    assert [h["global_step"] for h in steps] == [1, 2, 3, 4, 5]
    assert [round(h["learning_rate"], 6) for h in steps] == [0.001, 0.0008, 0.0006, 0.0004, 0.0002]
    assert [h["lambda"] for h in steps] == pytest.approx([1.0, 0.95, 0.9, 0.85, 0.8])
    final = run / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "loss_curve.png"):
        assert (final / name).is_file(), name
    card = (final / "README.md").read_text()
    assert str(tmp_path / "teacher") in card and "num_hidden_layers=2, hidden_size=24, num_experts=2" in card
    assert "640 (5 optimizer steps)" in card and "![Loss curve](loss_curve.png)" in card
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert model.config.num_mtp_heads == 2 and model.config.hidden_size == 24
    # a second run refuses to overwrite the final folder
    with pytest.raises(FileExistsError, match="final"):
        args.handler(args)


def test_progressive_run_distills_from_the_quantized_teacher(tmp_path, data, monkeypatch):
    """`teacher_quantization` reaches the teacher of `hf-slim distill` (it used to be ignored: the teacher was loaded
    unquantized and the first stage's trainer then refused the setting); the student is pruned from the unquantized
    weights. Hidden size 64: bitsandbytes' 4bit CPU path packs it (see the 4bit tests above)."""
    pytest.importorskip("bitsandbytes")
    from trainers import progressive

    tokenizer, _, _ = data
    torch.manual_seed(0)
    sizes = dict(hidden_size=64, head_dim=16, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    SlimMoeForCausalLM(tiny_config(len(tokenizer), **sizes)).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    built = []

    class Spy(SlimDistillationTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(progressive, "SlimDistillationTrainer", Spy)
    script_args = progressive.DistillScriptArguments(
        dataset_name="hf_slim:stdlib", prune_stages=[{"num_hidden_layers": 1}], stage_tokens=[4 * SEQ],
        calibration_samples=4,
    )  # fmt: skip
    args = distill_args(
        tmp_path / "run", teacher_model_name_or_path=str(tmp_path / "teacher"), teacher_quantization="4bit"
    )
    _, results = progressive.run_progressive(script_args, args)
    (trainer,) = built
    teacher = trainer.teacher_model
    assert teacher.is_loaded_in_4bit and teacher.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert type(teacher.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    student = trainer.accelerator.unwrap_model(trainer.model)
    assert student.config.num_hidden_layers == 1 and not getattr(student, "is_loaded_in_4bit", False)
    assert type(student.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    kd = [h["kd"] for h in results[0].log_history if "kd" in h]
    assert len(kd) == 1 and 0 < kd[0] < 10


def test_teacher_helpers_moved_to_trainers_teacher_warn_at_the_old_path():
    import trainers.distillation_trainer as old
    from trainers import teacher

    for name in ("teacher_quantization_config", "fit_bnb_4bit_cpu_layers"):
        with pytest.warns(FutureWarning, match=rf"trainers\.teacher\.{name}"):
            assert getattr(old, name) is getattr(teacher, name)


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("dataset_name: x\nprune_stages: [{}]\nstage_tokens: [1, 2]\noutput_dir: o\n", r"stage_tokens.*one token budget"),
        ("dataset_name: x\nprune_stages: [{num_experts: -1}]\nstage_tokens: [1]\noutput_dir: o\n", r"num_experts"),
        ("dataset_name: x\nprune_stages: [{}]\nstage_tokens: [1]\noutput_dir: o\ndivergence: kl\n", r"divergence"),
        ("dataset_name: x\nprune_stages: [{}]\nstage_tokens: [1]\noutput_dir: o\nlamda_start: 1\n", r"lamda_start"),
    ],
)  # fmt: skip
def test_distill_config_errors(tmp_path, yaml_text, match):
    from trainers.progressive import load_distill_config

    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text + "use_cpu: true\nbf16: false\n")
    with pytest.raises(ValueError, match=match):
        load_distill_config(path)


def test_default_config_emits_no_deprecation_warning(tmp_path):
    # TRL's `gradient_checkpointing=True` default is deprecated by transformers 5.24; the config uses the new name.
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        args = SlimDistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert args.activation_checkpointing is True and args.gradient_checkpointing is True
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the user's own deprecated spelling still works
        args = SlimDistillationConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], gradient_checkpointing=False)
    assert args.activation_checkpointing is False
