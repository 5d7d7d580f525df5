"""A teacher read one block at a time (`layerwise_final_hidden`): the in-memory decoder's last hidden state at every
real position of right-padded rows, the output head as the model holds it (tied or not), bf16 kept, spilled hidden
states, kept work files answering at once, and malformed masks refused."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import tiny_model, token_batch

from hf_slim.checkpoints import StateDictReader, open_checkpoint
from hf_slim.pruning import layerwise, layerwise_state
from hf_slim.teacher_logits.layerwise import layerwise_final_hidden

LENGTHS = [24, 5, 13, 24, 1, 9, 17]  # batches of 3, 3, 1 rows; the last batch has no padding
BATCH = 3
FAMILIES = {  # family -> tie_word_embeddings
    "qwen3_moe": False,
    "slim_moe": False,  # SlimMoe with a dense layer, a shared expert and an MTP head (not run for the hidden state)
    "slim_moe_full_qk_norm": True,  # tied head, 2 MTP heads
}


def _padded(lengths=LENGTHS, length=24, pad_id=0):
    ids = token_batch(len(lengths), length)
    mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def _saved(tmp_path, family, dtype=torch.float32, **overrides):
    model = tiny_model(family, **overrides).to(dtype)
    folder = tmp_path / family
    model.save_pretrained(folder)
    return model, folder


def _decoder(model, ids, mask):
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_final_hidden_and_head_equal_the_in_memory_model(tmp_path, family):
    model, folder = _saved(tmp_path, family)
    ids, mask = _padded()
    out = layerwise_final_hidden(str(folder), ids, mask, batch_size=BATCH, show_progress=False)
    real = mask.bool()
    hidden = out.last_hidden_state
    assert hidden.shape == (7, 24, 32) and hidden.dtype == torch.float32
    torch.testing.assert_close(hidden[real], _decoder(model, ids, mask)[real], rtol=0, atol=1e-5)
    assert (hidden[~real] == 0).all()
    for b0 in range(0, len(LENGTHS), BATCH):  # each batch padded to its own longest row, as the writer runs it
        length = max(LENGTHS[b0 : b0 + BATCH])
        rows = slice(b0, b0 + BATCH)
        ref = _decoder(model, ids[rows, :length], mask[rows, :length])
        keep = mask[rows, :length].bool()
        assert torch.equal(hidden[rows, :length][keep], ref[keep])  # the same arithmetic: bitwise
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == FAMILIES[family]
    assert torch.equal(out.lm_head_weight, head.weight) and out.lm_head_bias is None


def test_tied_qwen3_moe_head_reader_and_no_mask(tmp_path):
    model, folder = _saved(tmp_path, "qwen3_moe", tie_word_embeddings=True)
    ids = token_batch(5, 16)
    with open_checkpoint(folder) as reader:  # an open reader is used and left open
        out = layerwise_final_hidden(reader, ids, batch_size=2, show_progress=False)
        assert reader.read("model.norm.weight").shape == (32,)
    assert "lm_head.weight" not in open_checkpoint(folder).names()  # tied: read from the embeddings
    assert torch.equal(out.lm_head_weight, model.get_output_embeddings().weight)
    torch.testing.assert_close(out.last_hidden_state, _decoder(model, ids, None), rtol=0, atol=1e-5)
    in_ram = StateDictReader(model.state_dict(), model.config)
    again = layerwise_final_hidden(in_ram, ids, torch.ones_like(ids), batch_size=2, show_progress=False)
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state, rtol=0, atol=1e-6)


def test_bf16_checkpoint_stays_bf16(tmp_path):
    _, folder = _saved(tmp_path, "qwen3_moe", torch.bfloat16)
    # loaded, not cast: `.to(bf16)` would round the RoPE frequencies too, which a loaded model keeps in float32
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    ids, mask = _padded()
    out = layerwise_final_hidden(folder, ids, mask, batch_size=BATCH, show_progress=False)
    assert out.last_hidden_state.dtype == out.lm_head_weight.dtype == torch.bfloat16
    assert torch.equal(out.lm_head_weight, model.get_output_embeddings().weight)
    for b0 in range(0, len(LENGTHS), BATCH):  # in bf16 only the same arithmetic routes all alike
        length = max(LENGTHS[b0 : b0 + BATCH])
        rows = slice(b0, b0 + BATCH)
        ref = _decoder(model, ids[rows, :length], mask[rows, :length])
        keep = mask[rows, :length].bool()
        assert torch.equal(out.last_hidden_state[rows, :length][keep], ref[keep])
    as_f32 = layerwise_final_hidden(folder, ids, mask, dtype="float32", batch_size=BATCH, show_progress=False)
    assert as_f32.last_hidden_state.dtype == as_f32.lm_head_weight.dtype == torch.float32


@pytest.mark.parametrize("work_dir", [True, False])
def test_spilled_hidden_states_give_the_same_numbers(tmp_path, monkeypatch, work_dir):
    _, folder = _saved(tmp_path, "slim_moe_full_qk_norm")
    ids, mask = _padded()
    in_memory = layerwise_final_hidden(folder, ids, mask, batch_size=BATCH, show_progress=False)
    with open_checkpoint(folder) as reader:
        run = layerwise._Run(reader, ids, torch.float32, torch.device("cpu"), BATCH, mask, statistics=False)
        plan = run.memory_plan(10**15, None)
    assert plan.in_memory and plan.hidden == 7 * 24 * 32 * 4
    folders = []
    real = layerwise_state.HiddenStates.start
    monkeypatch.setattr(layerwise_state.HiddenStates, "start",
                        lambda self, f, path: (folders.append(f), real(self, f, path))[1])  # fmt: skip
    work = tmp_path / "work" if work_dir else None
    spilled = layerwise_final_hidden(folder, ids, mask, batch_size=BATCH, max_memory=plan.need + plan.hidden // 2,
                                     work_dir=work, show_progress=False)  # fmt: skip
    assert folders[0] is not None  # the hidden states went to files
    assert torch.equal(spilled.last_hidden_state, in_memory.last_hidden_state)
    assert not os.path.exists(folders[0].path)  # work files removed on success


def test_kept_work_files_answer_at_once_and_other_masks_are_refused(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path, "qwen3_moe")
    ids, mask = _padded()
    work = tmp_path / "work"
    kw = {"batch_size": BATCH, "work_dir": work, "show_progress": False}
    first = layerwise_final_hidden(folder, ids, mask, keep_work_files=True, **kw)
    loads = []
    real = layerwise._Run._load
    monkeypatch.setattr(layerwise._Run, "_load", lambda self, m, prefix: (loads.append(prefix), real(self, m, prefix)))
    other = mask.clone()
    other[0, 20:] = 0
    with pytest.raises(ValueError, match=r"different inputs \(attention mask"):
        layerwise_final_hidden(folder, ids, other, **kw)
    again = layerwise_final_hidden(folder, ids, mask, **kw)
    assert loads == ["lm_head"]  # no block read again, only the head
    assert torch.equal(again.last_hidden_state, first.last_hidden_state) and not work.exists()


def test_masks_that_are_not_right_padding_are_refused(tmp_path):
    _, folder = _saved(tmp_path, "qwen3_moe")
    ids, mask = _padded()
    with pytest.raises(ValueError, match="right padding"):
        layerwise_final_hidden(folder, ids, mask.flip(1), show_progress=False)
    with pytest.raises(ValueError, match="at least one real token"):
        layerwise_final_hidden(folder, ids, mask * (torch.arange(7) != 2)[:, None], show_progress=False)
    with pytest.raises(ValueError, match="shape of input_ids"):
        layerwise_final_hidden(folder, ids, mask[:, :5], show_progress=False)
    with pytest.raises(ValueError, match=r"\[N, T\] tensor"):
        layerwise_final_hidden(folder, ids[0], show_progress=False)


def test_a_layerwise_teacher_writes_the_same_logits_as_the_teacher_in_memory(tmp_path):
    """write_teacher_logits with LayerwiseTeacher (passes of 6 rows over the checkpoint, in batches of 3) against the
    same model in memory: the same shards, bitwise."""
    from datasets import Dataset
    from test_distillation import tiny_tokenizer, train_teacher

    from hf_slim.data import packed_lm_dataset
    from hf_slim.teacher_logits import LayerwiseTeacher, TeacherLogitsReader, write_teacher_logits

    texts, tokenizer = tiny_tokenizer()
    packed = packed_lm_dataset(texts, tokenizer, 24).select(range(16))
    teacher = train_teacher(packed, len(tokenizer), steps=2)
    teacher.save_pretrained(tmp_path / "teacher")
    generator = torch.Generator().manual_seed(0)
    rows = Dataset.from_list(
        [{"input_ids": packed[i]["input_ids"][: int(torch.randint(3, 25, (1,), generator=generator))]} for i in range(11)]
    )
    options = dict(tokenizer=tokenizer, top_k=6, max_length=24, batch_size=3, progress=False)
    memory = write_teacher_logits(teacher, rows, tmp_path / "memory", **options)
    layerwise = write_teacher_logits(
        LayerwiseTeacher(tmp_path / "teacher", rows_per_pass=5), rows, tmp_path / "layerwise",
        teacher_name=memory.meta["teacher"], **options,
    )  # fmt: skip
    assert isinstance(layerwise, TeacherLogitsReader) and layerwise.num_rows == 11
    for r in range(11):
        a, b = memory.row(r), layerwise.row(r)
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.log_probs, b.log_probs)
        assert torch.equal(a.rest_log_prob, b.rest_log_prob)
