"""Tests of the pure loss terms in `hf_slim.losses` against plain full-logit references."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_slim.losses import (
    DIVERGENCES,
    LossWeightSchedule,
    align_mtp_positions,
    check_kd_options,
    chunked_kd_loss,
    cosine_schedule,
    distillation_objective,
    linear_schedule,
    lm_loss,
    mtp_kd_loss,
    mtp_lm_loss,
    slimqwen_objective,
)

N, H_S, H_T, V = 29, 8, 12, 53
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_inputs(dtype=torch.float64, seed=0, n=N, bias=True):
    g = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(n, H_S, generator=g, dtype=dtype).requires_grad_()
    student_weight = (torch.randn(V, H_S, generator=g, dtype=dtype) * 0.7).requires_grad_()
    student_bias = (torch.randn(V, generator=g, dtype=dtype) * 0.3).requires_grad_() if bias else None
    teacher_hidden = torch.randn(n, H_T, generator=g, dtype=dtype)
    teacher_weight = torch.randn(V, H_T, generator=g, dtype=dtype) * 0.7
    teacher_bias = torch.randn(V, generator=g, dtype=dtype) * 0.3 if bias else None
    mask = torch.rand(n, generator=g) > 0.3
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask


def kd_per_token(s_logits, t_logits, temperature=1.0, divergence="forward_kl", jsd_beta=0.5, top_k=None):
    """Full-logit divergence per token with F.kl_div (kl_div(input=log q, target=p) is KL(p || q))."""
    log_ps = F.log_softmax(s_logits / temperature, dim=-1)
    log_pt = F.log_softmax(t_logits / temperature, dim=-1)
    if top_k is not None:
        values, index = (t_logits / temperature).topk(top_k, dim=-1)
        pt = torch.zeros_like(log_pt).scatter(-1, index, F.softmax(values, dim=-1))
    else:
        pt = log_pt.exp()
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0):
        return F.kl_div(log_ps, pt, reduction="none").sum(-1)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1):
        return F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    log_m = ((1 - jsd_beta) * log_ps.exp() + jsd_beta * pt).log()
    return jsd_beta * F.kl_div(log_m, pt, reduction="none").sum(-1) + (1 - jsd_beta) * F.kl_div(
        log_m, log_ps, reduction="none", log_target=True
    ).sum(-1)


def naive_kd(hs, ws, bs, ht, wt, bt, mask, *, temperature=1.0, divergence="forward_kl", jsd_beta=0.5, top_k=None):
    """Full-logit reference (`kd_per_token` on the projected logits), masked mean times T²."""
    s_logits = hs @ ws.T + (0 if bs is None else bs)
    t_logits = ht @ wt.T + (0 if bt is None else bt)
    per_token = kd_per_token(s_logits, t_logits, temperature, divergence, jsd_beta, top_k)
    return per_token[mask].sum() / mask.sum() * temperature**2


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def assert_all_close(actual, expected, tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------------------------
# chunked KD == full-logit KD
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("divergence,jsd_beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.8)])
@pytest.mark.parametrize(
    "chunk_size,temperature,recompute", [(1, 1.0, False), (7, 2.5, False), (7, 2.5, True), (1000, 0.7, False)]
)
def test_chunked_kd_matches_full_logits(dtype, divergence, jsd_beta, chunk_size, temperature, recompute):
    hs, ws, bs, ht, wt, bt, mask = make_inputs(dtype)
    ref = naive_kd(hs, ws, bs, ht, wt, bt, mask, temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    out = chunked_kd_loss(
        hs,
        ws,
        ht,
        wt,
        mask,
        temperature=temperature,
        divergence=divergence,
        jsd_beta=jsd_beta,
        chunk_size=chunk_size,
        student_head_bias=bs,
        teacher_head_bias=bt,
        recompute=recompute,
    )
    assert out.dtype == dtype
    assert ref.item() > 0.01  # a real divergence, not a trivial zero
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert_all_close(grads(out, [hs, ws, bs]), grads(ref, [hs, ws, bs]), TOL[dtype])


@pytest.mark.parametrize("divergence,jsd_beta", [("forward_kl", 0.5), ("jsd", 0.0), ("jsd", 0.4)])
@pytest.mark.parametrize("recompute", [False, True])
def test_teacher_top_k_matches_renormalised_reference(divergence, jsd_beta, recompute):
    hs, ws, bs, ht, wt, bt, mask = make_inputs()
    ref = naive_kd(hs, ws, bs, ht, wt, bt, mask, temperature=1.5, divergence=divergence, jsd_beta=jsd_beta, top_k=5)
    out = chunked_kd_loss(
        hs,
        ws,
        ht,
        wt,
        mask,
        temperature=1.5,
        divergence=divergence,
        jsd_beta=jsd_beta,
        teacher_top_k=5,
        chunk_size=6,
        student_head_bias=bs,
        teacher_head_bias=bt,
        recompute=recompute,
    )
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(out, [hs, ws, bs]), grads(ref, [hs, ws, bs]), 1e-10)
    dense = chunked_kd_loss(
        hs,
        ws,
        ht,
        wt,
        mask,
        temperature=1.5,
        divergence=divergence,
        jsd_beta=jsd_beta,
        student_head_bias=bs,
        teacher_head_bias=bt,
    )
    assert not torch.allclose(out, dense)  # the truncation changes the target


def test_teacher_top_k_of_whole_vocab_is_the_dense_loss():
    hs, ws, bs, ht, wt, bt, mask = make_inputs()
    full = chunked_kd_loss(hs, ws, ht, wt, mask, teacher_top_k=V, student_head_bias=bs, teacher_head_bias=bt)
    dense = chunked_kd_loss(hs, ws, ht, wt, mask, student_head_bias=bs, teacher_head_bias=bt)
    torch.testing.assert_close(full, dense, rtol=1e-10, atol=1e-10)


def test_leading_batch_dims_and_labels_mask():
    hs, ws, _, ht, wt, _, mask = make_inputs(n=24, bias=False)
    labels = torch.where(mask, torch.arange(24) % V, torch.full((24,), -100))
    flat = chunked_kd_loss(hs, ws, ht, wt, mask, chunk_size=5)
    batched = chunked_kd_loss(hs.view(4, 6, H_S), ws, ht.view(4, 6, H_T), wt, labels=labels.view(4, 6), chunk_size=5)
    torch.testing.assert_close(batched, flat, rtol=1e-12, atol=1e-12)
    assert_all_close(grads(batched, [hs, ws]), grads(flat, [hs, ws]), 1e-12)


def test_bfloat16_inputs_keep_their_dtypes_and_match_float32():
    hs, ws, _, ht, wt, _, mask = make_inputs(torch.float32, bias=False)
    hs16, ws16 = hs.detach().bfloat16().requires_grad_(), ws.detach().bfloat16().requires_grad_()
    out16 = chunked_kd_loss(hs16, ws16, ht.bfloat16(), wt.bfloat16(), mask, chunk_size=8)
    g_h, g_w = grads(out16, [hs16, ws16])
    assert out16.dtype == torch.float32 and g_h.dtype == torch.bfloat16 and g_w.dtype == torch.bfloat16
    ref = naive_kd(hs16.float(), ws16.float(), None, ht.bfloat16().float(), wt.bfloat16().float(), None, mask)
    torch.testing.assert_close(out16, ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------------
# TRL's generalized_jsd_loss on full logits
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize(
    "divergence,jsd_beta,trl_beta",
    # TRL: beta=0 is KL(teacher || student), beta=1 is KL(student || teacher), mixture (1-beta)·student + beta·teacher
    [("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 1.0), ("jsd", 0.5, 0.5), ("jsd", 0.2, 0.2), ("jsd", 0.0, 0.0)],
)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_trl_generalized_jsd_loss(trl_generalized_jsd, divergence, jsd_beta, trl_beta, temperature):
    hs, ws, bs, ht, wt, bt, mask = make_inputs()
    labels = torch.where(mask, torch.zeros(N, dtype=torch.long), torch.full((N,), -100)).view(1, N)
    s_logits = (hs @ ws.T + bs).view(1, N, V)
    t_logits = (ht @ wt.T + bt).view(1, N, V)
    trl = trl_generalized_jsd(s_logits, t_logits, labels=labels, beta=trl_beta, temperature=temperature)
    ours = chunked_kd_loss(
        hs.view(1, N, H_S),
        ws,
        ht.view(1, N, H_T),
        wt,
        labels=labels,
        temperature=temperature,
        divergence=divergence,
        jsd_beta=jsd_beta,
        chunk_size=4,
        student_head_bias=bs,
        teacher_head_bias=bt,
    )
    # We scale by T² (Hinton); TRL does not.
    torch.testing.assert_close(ours, trl * temperature**2, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(ours, [hs, ws]), grads(trl * temperature**2, [hs, ws]), 1e-10)


def test_num_items_in_batch_matches_trl(trl_generalized_jsd):
    hs, ws, bs, ht, wt, bt, mask = make_inputs()
    labels = torch.where(mask, 0, -100).view(1, N)
    trl = trl_generalized_jsd(
        (hs @ ws.T + bs).view(1, N, V), (ht @ wt.T + bt).view(1, N, V), labels=labels, beta=0.0, num_items_in_batch=50
    )
    ours = chunked_kd_loss(
        hs, ws, ht, wt, labels=labels.view(N), num_items_in_batch=50, student_head_bias=bs, teacher_head_bias=bt
    )
    torch.testing.assert_close(ours, trl, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_zero_kd_when_student_is_teacher(divergence):
    hs, ws, bs, _, _, _, mask = make_inputs()
    out = chunked_kd_loss(
        hs,
        ws,
        hs.detach(),
        ws.detach(),
        mask,
        divergence=divergence,
        temperature=2.0,
        student_head_bias=bs,
        teacher_head_bias=bs.detach(),
        chunk_size=5,
    )
    assert abs(out.item()) < 1e-12
    for g in grads(out, [hs, ws, bs]):
        assert g.abs().max().item() < 1e-12


def test_teacher_receives_no_gradient():
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    ht.requires_grad_()
    wt.requires_grad_()
    chunked_kd_loss(hs, ws, ht, wt, mask, chunk_size=8).backward()
    assert ht.grad is None and wt.grad is None
    assert hs.grad is not None and hs.grad.abs().sum() > 0 and ws.grad.abs().sum() > 0
    # masked-out rows of the student get exactly zero gradient
    assert torch.all(hs.grad[~mask] == 0) and torch.all(hs.grad[mask].abs().sum(-1) > 0)


def test_frozen_student_head_gets_no_gradient_but_hidden_does():
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    ws.requires_grad_(False)
    out = chunked_kd_loss(hs, ws, ht, wt, mask, chunk_size=8)
    (g_h,) = torch.autograd.grad(out, [hs])
    (ref_g,) = torch.autograd.grad(naive_kd(hs, ws, None, ht, wt, None, mask), [hs])
    torch.testing.assert_close(g_h, ref_g, rtol=1e-10, atol=1e-10)


def test_no_grad_forward_matches_and_builds_no_graph():
    hs, ws, bs, ht, wt, bt, mask = make_inputs()
    with torch.no_grad():
        out = chunked_kd_loss(hs, ws, ht, wt, mask, student_head_bias=bs, teacher_head_bias=bt)
    assert not out.requires_grad
    torch.testing.assert_close(out, naive_kd(hs, ws, bs, ht, wt, bt, mask).detach(), rtol=1e-10, atol=1e-10)


def test_reductions_and_num_items_in_batch():
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    n_valid = int(mask.sum())
    mean = chunked_kd_loss(hs, ws, ht, wt, mask)
    total = chunked_kd_loss(hs, ws, ht, wt, mask, reduction="sum")
    by_items = chunked_kd_loss(hs, ws, ht, wt, mask, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(total, mean * n_valid, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_items, total / 40, rtol=1e-10, atol=1e-10)
    # the masked loss only sees the masked rows
    only_valid = chunked_kd_loss(hs[mask], ws, ht[mask], wt)
    torch.testing.assert_close(mean, only_valid, rtol=1e-10, atol=1e-10)


def test_gradient_accumulation_with_num_items_equals_one_big_batch():
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    total_items = int(mask.sum())
    big = chunked_kd_loss(hs, ws, ht, wt, mask)
    g_big = grads(big, [hs, ws])
    halves = [slice(0, 11), slice(11, N)]
    acc = sum(chunked_kd_loss(hs[s], ws, ht[s], wt, mask[s], num_items_in_batch=total_items) for s in halves)
    torch.testing.assert_close(acc, big, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(acc, [hs, ws]), g_big, 1e-10)


def test_fully_masked_batch_is_zero_without_nan():
    hs, ws, _, ht, wt, _, _ = make_inputs(bias=False)
    out = chunked_kd_loss(hs, ws, ht, wt, torch.zeros(N, dtype=torch.bool))
    assert out.item() == 0.0
    g_h, g_w = grads(out, [hs, ws])
    assert torch.all(g_h == 0) and torch.all(g_w == 0)


def test_backward_scales_by_upstream_gradient():
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    g1 = grads(chunked_kd_loss(hs, ws, ht, wt, mask), [hs, ws])
    g3 = grads(-3.0 * chunked_kd_loss(hs, ws, ht, wt, mask), [hs, ws])
    assert_all_close(g3, [-3.0 * g for g in g1], 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# LM / MTP-LM
# ----------------------------------------------------------------------------------------------------------------


def _lm_inputs(dtype=torch.float64, b=3, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, H_S, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H_S, generator=g, dtype=dtype).requires_grad_()
    bias = torch.randn(V, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, 5:] = -100
    labels[2, 2] = -100
    return hidden, weight, bias, labels


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("recompute", [False, True])
def test_lm_loss_matches_cross_entropy_with_shift(dtype, depth, recompute):
    hidden, weight, bias, labels = _lm_inputs(dtype)
    shift = 1 + depth
    logits = hidden @ weight.T + bias
    ref = F.cross_entropy(logits[:, :-shift].reshape(-1, V), labels[:, shift:].reshape(-1), ignore_index=-100)
    if depth == 0:
        out = lm_loss(hidden, weight, labels, head_bias=bias, chunk_size=4, recompute=recompute)
    else:
        out = mtp_lm_loss(hidden, weight, labels, depth, head_bias=bias, chunk_size=4, recompute=recompute)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    assert_all_close(grads(out, [hidden, weight, bias]), grads(ref, [hidden, weight, bias]), TOL[dtype])


def test_lm_loss_num_items_in_batch_and_sum():
    hidden, weight, _, labels = _lm_inputs()
    logits = hidden @ weight.T
    ref_sum = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(lm_loss(hidden, weight, labels, reduction="sum"), ref_sum, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        lm_loss(hidden, weight, labels, num_items_in_batch=100), ref_sum / 100, rtol=1e-10, atol=1e-10
    )


# ----------------------------------------------------------------------------------------------------------------
# MTP-KD alignment
# ----------------------------------------------------------------------------------------------------------------


def test_align_mtp_positions_hand_built():
    b, t, k = 2, 7, 2
    # hidden value = position index, so the returned rows say which positions were paired
    pos = torch.arange(t, dtype=torch.float64).view(1, t, 1).expand(b, t, 3)
    labels = torch.arange(t).repeat(b, 1)
    labels[0, 4] = -100  # target of depth-2 position 1 (token 1 + 1 + 2 = 4)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, :2] = 0  # left padding in row 1
    s_rows, t_rows, counted = align_mtp_positions(pos, pos, k, labels=labels, attention_mask=attention_mask)
    assert s_rows.shape == (b, t - 1 - k, 3) and t_rows.shape == (b, t - 1 - k, 3)
    assert s_rows[0, :, 0].tolist() == [0, 1, 2, 3]
    assert t_rows[0, :, 0].tolist() == [2, 3, 4, 5]  # teacher main head at i + k predicts token i + 1 + k
    assert counted.tolist() == [[True, False, True, True], [False, False, True, True]]
    # the teacher's own depth-1 head at i + 1 predicts the same token as student depth 2 at i
    _, t_rows_d1, _ = align_mtp_positions(pos, pos, k, teacher_depth=1)
    assert t_rows_d1[0, :, 0].tolist() == [1, 2, 3, 4]
    # depth 0 is the usual next-token shift
    s0, t0, c0 = align_mtp_positions(pos, pos, 0)
    assert s0[0, :, 0].tolist() == t0[0, :, 0].tolist() == list(range(t - 1)) and c0.all()


def test_mtp_kd_loss_uses_the_teacher_distribution_of_the_same_future_token():
    g = torch.Generator().manual_seed(3)
    b, t, k = 2, 8, 2
    teacher_hidden = torch.randn(b, t, H_S, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H_S, generator=g, dtype=torch.float64)
    # a student MTP head that reproduces the teacher at i + k has zero MTP-KD at depth k, and not at other depths
    student = torch.zeros(b, t, H_S, dtype=torch.float64)
    student[:, : t - k] = teacher_hidden[:, k:]
    student.requires_grad_()
    assert mtp_kd_loss(student, weight, teacher_hidden, weight, k).abs().item() < 1e-12
    assert mtp_kd_loss(student, weight, teacher_hidden, weight, k - 1).item() > 0.1
    assert mtp_kd_loss(student, weight, teacher_hidden, weight, k + 1).item() > 0.1


def test_mtp_kd_loss_matches_explicit_loop_with_padding():
    g = torch.Generator().manual_seed(4)
    b, t, k = 2, 9, 1
    student = torch.randn(b, t, H_S, generator=g, dtype=torch.float64).requires_grad_()
    s_weight = torch.randn(V, H_S, generator=g, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(b, t, H_T, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H_T, generator=g, dtype=torch.float64)
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, 6:] = 0  # right padding
    labels = torch.randint(0, V, (b, t), generator=g).masked_fill(attention_mask == 0, -100)
    labels[0, 3] = -100
    terms = []
    for row in range(b):
        for i in range(t - 1 - k):
            target = i + 1 + k
            if labels[row, target] == -100 or not attention_mask[row, i] or not attention_mask[row, target]:
                continue
            log_q = F.log_softmax(teacher[row, i + k] @ t_weight.T, -1)
            log_p = F.log_softmax(student[row, i] @ s_weight.T, -1)
            terms.append((log_q.exp() * (log_q - log_p)).sum())
    ref = torch.stack(terms).mean()
    out = mtp_kd_loss(
        student, s_weight, teacher, t_weight, k, labels=labels, attention_mask=attention_mask, chunk_size=3
    )
    assert len(terms) == 2 * (t - 1 - k) - 1 - 3
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(out, [student, s_weight]), grads(ref, [student, s_weight]), 1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Objective and schedules
# ----------------------------------------------------------------------------------------------------------------


def test_slimqwen_objective_follows_the_formula():
    lm, kd = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0)
    mtp_lm, mtp_kd = [torch.tensor(4.0), torch.tensor(6.0)], [torch.tensor(1.0), torch.tensor(3.0)]
    lam, beta = 0.8, 0.25
    total, logs = slimqwen_objective(lm, kd, mtp_lm, mtp_kd, lam, beta)
    expected = (1 - lam) * 2.0 + lam * 3.0 + beta * ((1 - lam) * 5.0 + lam * 2.0)
    assert total.item() == pytest.approx(expected)
    assert total.requires_grad
    assert {k: round(v.item(), 6) for k, v in logs.items()} == {
        "lm": 2.0,
        "kd": 3.0,
        "mtp_lm": 5.0,
        "mtp_kd": 2.0,
        "mtp_lm_1": 4.0,
        "mtp_lm_2": 6.0,
        "mtp_kd_1": 1.0,
        "mtp_kd_2": 3.0,
        "total": round(expected, 6),
    }
    assert not any(v.requires_grad for v in logs.values())


def test_slimqwen_objective_allows_missing_zero_weight_terms():
    total, logs = slimqwen_objective(None, torch.tensor(3.0), [], [], lam=1.0, beta=0.0)
    assert total.item() == pytest.approx(3.0) and set(logs) == {"kd", "total"}
    with pytest.raises(ValueError, match="mtp_kd is missing but its weight is 0.3"):
        slimqwen_objective(None, torch.tensor(3.0), [], [], lam=1.0, beta=0.3)
    total, _ = slimqwen_objective(torch.tensor(2.0), torch.tensor(3.0), [], [torch.tensor(5.0)], lam=1.0, beta=0.5)
    assert total.item() == pytest.approx(3.0 + 0.5 * 5.0)


@pytest.mark.parametrize("mtp_lam", [0.0, 0.4, 1.0])
def test_slimqwen_objective_mtp_lam_replaces_lambda_inside_the_mtp_group(mtp_lam):
    lm, kd = torch.tensor(2.0), torch.tensor(3.0)
    mtp_lm, mtp_kd = [torch.tensor(4.0), torch.tensor(6.0)], [torch.tensor(1.0), torch.tensor(3.0)]
    total, _ = slimqwen_objective(lm, kd, mtp_lm, mtp_kd, lam=0.8, beta=0.25, mtp_lam=mtp_lam)
    assert total.item() == pytest.approx(0.2 * 2.0 + 0.8 * 3.0 + 0.25 * ((1 - mtp_lam) * 5.0 + mtp_lam * 2.0))
    # MTP-LM only: the MTP-KD terms may be left out (weight 0) even though λ > 0
    total, logs = slimqwen_objective(lm, kd, mtp_lm, [], lam=0.8, beta=0.25, mtp_lam=0.0)
    assert total.item() == pytest.approx(0.2 * 2.0 + 0.8 * 3.0 + 0.25 * 5.0) and "mtp_kd" not in logs


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(lm=torch.tensor(1.0), kd=torch.tensor(1.0), mtp_lm=[], mtp_kd=[], lam=0.5, beta=0.0, mtp_lam=1.5),
            r"mtp_lam.*\[0, 1\] or None.*1.5",
        ),
        (dict(lm=None, kd=torch.tensor(1.0), mtp_lm=[], mtp_kd=[], lam=0.9, beta=0.0), "lm is missing.*0.1"),
        (
            dict(lm=torch.tensor(1.0), kd=torch.tensor(1.0), mtp_lm=[], mtp_kd=[], lam=0.9, beta=0.3),
            "mtp_lm is missing",
        ),
        (
            dict(
                lm=torch.tensor(1.0),
                kd=torch.tensor(1.0),
                mtp_lm=[torch.tensor(1.0)],
                mtp_kd=[torch.tensor(1.0)] * 2,
                lam=0.9,
                beta=0.3,
            ),
            "one loss per MTP depth.*1 and 2",
        ),
        (
            dict(lm=torch.tensor(1.0), kd=torch.tensor(1.0), mtp_lm=[], mtp_kd=[], lam=1.5, beta=0.0),
            r"lam.*\[0, 1\].*1.5",
        ),
        (
            dict(lm=torch.tensor(1.0), kd=torch.tensor(1.0), mtp_lm=[], mtp_kd=[], lam=0.5, beta=-0.1),
            "beta.*>= 0.*-0.1",
        ),
    ],
)
def test_slimqwen_objective_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slimqwen_objective(**kwargs)


def _objective_inputs(b=2, t=8, depths=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, H_S, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(V, H_S, generator=g, dtype=torch.float64).requires_grad_()
    mtp = [torch.randn(b, t - k, H_S, generator=g, dtype=torch.float64).requires_grad_() for k in range(1, depths + 1)]
    teacher = torch.randn(b, t, H_T, generator=g, dtype=torch.float64)
    teacher_mtp = [torch.randn(b, t - k, H_T, generator=g, dtype=torch.float64) for k in range(1, depths + 1)]
    t_weight = torch.randn(V, H_T, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, 6:] = -100
    labels[1, 3] = -100
    return hidden, weight, mtp, teacher, teacher_mtp, t_weight, labels


def _full_logit_terms(hidden, weight, mtp, teacher, teacher_mtp, t_weight, labels, use_teacher_mtp):
    """Per depth: summed cross-entropy, summed KL(teacher || student) and counted targets, from full logits."""
    t = labels.shape[1]
    out = []
    for k, h in enumerate([hidden, *mtp]):
        n = t - 1 - k
        counted = labels[:, 1 + k :] != -100
        log_p = F.log_softmax(h[:, :n] @ weight.T, -1)
        source = teacher_mtp[k - 1][:, :n] if k and use_teacher_mtp else teacher[:, k : k + n]
        log_q = F.log_softmax(source @ t_weight.T, -1)
        ce = -log_p.gather(-1, labels[:, 1 + k :].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)
        out.append((ce[counted].sum(), kl[counted].sum(), counted.sum()))
    return out


@pytest.mark.parametrize("use_teacher_mtp", [False, True])
@pytest.mark.parametrize("num_items", [False, True])
def test_distillation_objective_is_the_formula_of_full_logit_terms(use_teacher_mtp, num_items):
    hidden, weight, mtp, teacher, teacher_mtp, t_weight, labels = inputs = _objective_inputs()
    lam, beta = 0.75, 0.3
    denominators = {0: 50, 1: torch.tensor(40), 2: torch.tensor(30)} if num_items else None
    loss, logs = distillation_objective(
        hidden, weight, teacher, t_weight, [labels] * 3, lam=lam, beta=beta, mtp_hidden=mtp,
        teacher_mtp_hidden=teacher_mtp if use_teacher_mtp else (), chunk_size=3,
        num_items_in_batch=denominators[0] if num_items else None,
        mtp_num_items={k: denominators[k] for k in (1, 2)} if num_items else None,
    )  # fmt: skip
    terms = _full_logit_terms(*inputs, use_teacher_mtp)
    lm, kd = [], []
    for k, (ce, kl, count) in enumerate(terms):
        denominator = denominators[k] if num_items else count
        lm.append(ce / denominator)
        kd.append(kl / denominator)
    ref = (1 - lam) * lm[0] + lam * kd[0] + beta * ((1 - lam) * (lm[1] + lm[2]) / 2 + lam * (kd[1] + kd[2]) / 2)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(loss, [hidden, weight, *mtp]), grads(ref, [hidden, weight, *mtp]), 1e-10)
    # logs: (summed loss, counted targets) per term, (depth mean of per-target means, 1) for the MTP groups
    for k, (ce, kl, count) in enumerate(terms):
        lm_name, kd_name = ("lm", "kd") if k == 0 else (f"mtp_lm_{k}", f"mtp_kd_{k}")
        for name, value in ((lm_name, ce), (kd_name, kl)):
            torch.testing.assert_close(logs[name][0], value.detach().float(), rtol=1e-6, atol=1e-6)
            assert logs[name][1].item() == count.item() and not logs[name][0].requires_grad
    for group, index in (("mtp_lm", 0), ("mtp_kd", 1)):
        mean = sum(terms[k][index] / terms[k][2] for k in (1, 2)) / 2
        assert logs[group][0].item() == pytest.approx(mean.item(), rel=1e-6) and logs[group][1].item() == 1
    assert set(logs) == {"lm", "kd", "mtp_lm", "mtp_kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2"}


@pytest.mark.parametrize("mtp_lam", [0.0, 1.0, 0.3])
def test_distillation_objective_mtp_lam_against_full_logit_terms(mtp_lam):
    hidden, weight, mtp, teacher, teacher_mtp, t_weight, labels = inputs = _objective_inputs()
    lam, beta = 0.75, 0.3
    loss, _ = distillation_objective(
        hidden, weight, teacher, t_weight, [labels] * 3, lam=lam, beta=beta, mtp_lam=mtp_lam, mtp_hidden=mtp,
        chunk_size=3,
    )  # fmt: skip
    lm, kd = zip(*[(ce / count, kl / count) for ce, kl, count in _full_logit_terms(*inputs, False)])
    mtp_part = (1 - mtp_lam) * (lm[1] + lm[2]) / 2 + mtp_lam * (kd[1] + kd[2]) / 2
    ref = (1 - lam) * lm[0] + lam * kd[0] + beta * mtp_part
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert_all_close(grads(loss, [hidden, weight, *mtp]), grads(ref, [hidden, weight, *mtp]), 1e-10)


def test_distillation_objective_zero_weight_terms_are_logged_without_a_graph():
    hidden, weight, mtp, teacher, _, t_weight, labels = _objective_inputs()
    loss, logs = distillation_objective(
        hidden, weight, teacher, t_weight, [labels] * 3, lam=1.0, beta=0.0, mtp_hidden=mtp
    )
    assert all(torch.isfinite(value) and value > 0 for value, _ in logs.values())
    assert torch.autograd.grad(loss, mtp, allow_unused=True) == (None, None)  # β = 0: the MTP heads get nothing
    # an elastic variant of width H_S - 2 uses the first columns of the heads
    narrow = hidden[..., :-2].detach()
    _, sliced = distillation_objective(narrow, weight, teacher, t_weight, [labels], lam=0.5, beta=0.0)
    _, reference = distillation_objective(narrow, weight[:, :-2], teacher, t_weight, [labels], lam=0.5, beta=0.0)
    assert {k: v[0].item() for k, v in sliced.items()} == {k: v[0].item() for k, v in reference.items()}
    with pytest.raises(ValueError, match="labels of every depth 0..2.*got 1"):
        distillation_objective(hidden, weight, teacher, t_weight, [labels], lam=1.0, beta=0.0, mtp_hidden=mtp)


def test_check_kd_options_names_the_callers_field():
    check_kd_options("jsd", 2.0, 0.3, 5, 64)
    with pytest.raises(ValueError, match="kd_chunk_size must be a positive int.*got 0"):
        check_kd_options(chunk_size=0, chunk_size_name="kd_chunk_size")
    with pytest.raises(ValueError, match="temperature must be a number > 0, got inf"):
        check_kd_options(temperature=float("inf"))


def test_schedules_at_start_middle_end():
    assert [linear_schedule(1.0, 0.75, p) for p in (0, 0.5, 1)] == pytest.approx([1.0, 0.875, 0.75])
    assert [cosine_schedule(0.3, 0.1, p) for p in (0, 0.5, 1)] == pytest.approx([0.3, 0.2, 0.1])
    assert cosine_schedule(0.3, 0.1, 0.25) == pytest.approx(0.1 + 0.2 * (1 + math.cos(math.pi / 4)) / 2)
    sched = LossWeightSchedule()
    assert [(sched.lam(p), sched.beta(p)) for p in (0, 0.5, 1)] == [
        pytest.approx((1.0, 0.3)),
        pytest.approx((0.875, 0.2)),
        pytest.approx((0.75, 0.1)),
    ]
    assert sched.at_step(50, 100) == pytest.approx((0.875, 0.2))
    assert sched.at_step(150, 100) == pytest.approx((0.75, 0.1))
    const = LossWeightSchedule(lambda_start=0.6, lambda_schedule="constant", beta_schedule="linear")
    assert const.lam(0.7) == pytest.approx(0.6) and const.beta(0.5) == pytest.approx(0.2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lambda_start=1.2), r"lambda_start.*\[0, 1\].*1.2"),
        (dict(lambda_end=-0.1), r"lambda_end.*\[0, 1\].*-0.1"),
        (dict(beta_end=-1.0), "beta_end.*>= 0.*-1.0"),
        (dict(beta_schedule="exp"), "beta_schedule.*linear.*cosine.*constant.*'exp'"),
        (dict(lambda_schedule="step"), "lambda_schedule.*'step'"),
    ],
)
def test_loss_weight_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossWeightSchedule(**kwargs)


def test_schedule_progress_and_step_validation():
    with pytest.raises(ValueError, match=r"progress.*\[0, 1\].*1.5"):
        linear_schedule(1.0, 0.75, 1.5)
    with pytest.raises(ValueError, match="progress.*-0.1"):
        cosine_schedule(0.3, 0.1, -0.1)
    with pytest.raises(ValueError, match="max_steps.*>= 1.*0"):
        LossWeightSchedule().at_step(1, 0)
    with pytest.raises(ValueError, match="step.*>= 0.*-2"):
        LossWeightSchedule().at_step(-2, 10)


# ----------------------------------------------------------------------------------------------------------------
# Validation of the loss terms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(divergence="kl"), "divergence.*forward_kl.*reverse_kl.*jsd.*'kl'"),
        (dict(temperature=0.0), "temperature.*> 0.*0.0"),
        (dict(temperature=-1), "temperature.*> 0.*-1"),
        (dict(jsd_beta=1.5, divergence="jsd"), r"jsd_beta.*\[0, 1\].*1.5"),
        (dict(jsd_beta=-0.1), r"jsd_beta.*\[0, 1\].*-0.1"),
        (dict(chunk_size=0), "chunk_size.*positive int.*0"),
        (dict(chunk_size=2.5), "chunk_size.*positive int.*2.5"),
        (dict(chunk_size=True), "chunk_size.*positive int.*True"),
        (dict(teacher_top_k=0), "teacher_top_k.*positive int.*0"),
        (dict(teacher_top_k=V + 1), f"teacher_top_k.*<= the vocabulary size {V}.*{V + 1}"),
        (dict(teacher_top_k=5, divergence="reverse_kl"), "teacher_top_k=5.*reverse_kl.*infinite.*forward_kl"),
        (dict(teacher_top_k=5, divergence="jsd", jsd_beta=1.0), "teacher_top_k=5.*jsd_beta=1.0"),
        (dict(reduction="batchmean"), "reduction.*mean.*sum.*'batchmean'"),
        (dict(num_items_in_batch=-3), "num_items_in_batch.*> 0.*-3"),
    ],
)
def test_kd_option_errors(kwargs, match):
    hs, ws, _, ht, wt, _, mask = make_inputs(bias=False)
    with pytest.raises(ValueError, match=match):
        chunked_kd_loss(hs, ws, ht, wt, mask, **kwargs)


def test_vocab_mismatch_error_says_what_to_do():
    hs, ws, _, ht, _, _, _ = make_inputs(bias=False)
    with pytest.raises(
        ValueError, match=r"(?s)student_head_weight has 53 rows.*teacher_head_weight has 60.*len\(tokenizer\)"
    ):
        chunked_kd_loss(hs, ws, ht, torch.randn(60, H_T, dtype=torch.float64))


def test_shape_errors():
    hs, ws, bs, ht, wt, _, mask = make_inputs()
    with pytest.raises(ValueError, match="student_hidden has hidden size 8.*student_head_weight expects 12"):
        chunked_kd_loss(hs, torch.randn(V, H_T, dtype=torch.float64), ht, wt)
    with pytest.raises(ValueError, match="teacher_hidden must have the same leading shape"):
        chunked_kd_loss(hs, ws, ht[:-1], wt)
    with pytest.raises(ValueError, match=r"mask must have the hidden states' leading shape \(29,\)"):
        chunked_kd_loss(hs, ws, ht, wt, mask[:-1])
    with pytest.raises(ValueError, match=r"student_head_bias must have shape \(53,\)"):
        chunked_kd_loss(hs, ws, ht, wt, student_head_bias=bs[:-1])


def test_mtp_and_lm_argument_errors():
    hidden, weight, _, labels = _lm_inputs()
    with pytest.raises(ValueError, match="depth must be an int >= 1.*lm_loss.*got 0"):
        mtp_lm_loss(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match="depth must be an int >= 0, got -1"):
        lm_loss(hidden, weight, labels, depth=-1)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 53\)"):
        lm_loss(hidden, weight, labels.masked_fill(labels == labels[1, 1], V + 7))
    with pytest.raises(ValueError, match="labels \\[batch, seq\\]"):
        lm_loss(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="teacher_depth must be <= depth \\(1\\).*got 2"):
        align_mtp_positions(hidden, hidden, 1, teacher_depth=2)
    with pytest.raises(ValueError, match="depth must be an int >= 0, got -1"):
        mtp_kd_loss(hidden, weight, hidden.detach(), weight.detach(), -1)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, seq\]"):
        align_mtp_positions(hidden, hidden, 1, attention_mask=labels[:, :-1])
