"""The fused multi-term objective (`distillation_objective`): same values and gradients as plain full-logit
references and as today's per-term functions, with one head-gradient buffer held between forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from hf_slim.losses import distillation_objective, lm_loss, mtp_kd_loss, slimqwen_objective
from test_losses import kd_per_token  # the one full-logit reference divergence


B, T, H_S, H_T, V, DEPTHS = 3, 10, 8, 12, 61, 2


def make_objective_inputs(dtype=torch.float64, seed=0, bias=True, pad=True, depths=DEPTHS):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        t = torch.randn(*shape, generator=g, dtype=dtype) * scale
        return t.requires_grad_() if grad else t

    inputs = dict(
        hidden=randn(B, T, H_S, grad=True),
        weight=randn(V, H_S, scale=0.7, grad=True),
        bias=randn(V, scale=0.3, grad=True) if bias else None,
        mtp=[randn(B, T - k, H_S, grad=True) for k in range(1, depths + 1)],
        teacher=randn(B, T, H_T),
        t_weight=randn(V, H_T, scale=0.7),
        t_bias=randn(V, scale=0.3) if bias else None,
        teacher_mtp=[randn(B, T - k, H_T) for k in range(1, depths + 1)],
    )
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 7:] = -100
    labels[1, 4] = -100
    attention_mask = torch.ones(B, T, dtype=torch.long)
    if pad:
        # padding whose labels are NOT -100: the LM still counts these rows, KD does not (rows of one term only)
        attention_mask[2, :2] = 0
        attention_mask[0, 8:] = 0
    # per depth, a different ignored target (as packed documents give)
    inputs["labels"] = [labels] + [labels.masked_fill(torch.arange(T) == 3 + k, -100) for k in range(1, depths + 1)]
    inputs["attention_mask"] = attention_mask if pad else None
    return inputs


def full_logit_objective(
    inputs, lam, beta, *, temperature=1.0, divergence="forward_kl", jsd_beta=0.5, top_k=None,
    use_teacher_mtp=False, num_items=None, mtp_num_items=None,
):  # fmt: skip
    """SlimQwen's formula on full logits: F.cross_entropy for LM, F.kl_div for KD, per depth."""
    hidden, weight, bias, mtp = inputs["hidden"], inputs["weight"], inputs["bias"], inputs["mtp"]
    am = inputs["attention_mask"]
    am = torch.ones(B, T, dtype=torch.bool) if am is None else am.bool()
    lm, kd = [], []
    for k, h in enumerate([hidden, *mtp]):
        n = T - 1 - k
        labels = inputs["labels"][k]
        s_logits = h[:, :n] @ weight.T + (0 if bias is None else bias)
        target = labels[:, 1 + k : 1 + k + n]
        lm_sum = F.cross_entropy(s_logits.reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
        if k and use_teacher_mtp:
            source, offset = inputs["teacher_mtp"][k - 1][:, :n], 0
        else:
            source, offset = inputs["teacher"][:, k : k + n], k
        t_logits = source @ inputs["t_weight"].T + (0 if inputs["t_bias"] is None else inputs["t_bias"])
        per_token = kd_per_token(s_logits, t_logits, temperature, divergence, jsd_beta, top_k)
        kd_mask = (target != -100) & am[:, :n] & am[:, offset : offset + n] & am[:, 1 + k : 1 + k + n]
        kd_sum = per_token[kd_mask].sum() * temperature**2
        count = ((labels[:, 1 + k :] != -100) & am[:, 1 + k :]).sum().clamp_min(1)
        if num_items is None:
            denominator = count
        else:
            denominator = num_items if k == 0 else mtp_num_items[k]
        lm.append(lm_sum / denominator)
        kd.append(kd_sum / denominator)
    total = (1 - lam) * lm[0] + lam * kd[0]
    if len(lm) > 1:
        total = total + beta * ((1 - lam) * sum(lm[1:]) / len(lm[1:]) + lam * sum(kd[1:]) / len(kd[1:]))
    return total


def per_term_objective(inputs, lam, beta, *, use_teacher_mtp=False, num_items=None, mtp_num_items=None, **options):
    """Today's per-term functions (`lm_loss`, `mtp_kd_loss`) weighed by `slimqwen_objective`, one call per term."""
    hidden, weight, mtp, teacher = inputs["hidden"], inputs["weight"], inputs["mtp"], inputs["teacher"]
    am = inputs["attention_mask"]
    lm_terms, kd_terms = [], []
    for k, h in enumerate([hidden, *mtp]):
        labels = inputs["labels"][k]
        h = h if k == 0 else F.pad(h, (0, 0, 0, k))
        if k and use_teacher_mtp:
            target, teacher_depth = F.pad(inputs["teacher_mtp"][k - 1], (0, 0, 0, k)), k
        else:
            target, teacher_depth = teacher, 0
        count = labels[:, 1 + k :].ne(-100)
        count = (count if am is None else count & am[:, 1 + k :].bool()).sum().clamp_min(1)
        denominator = count if num_items is None else (num_items if k == 0 else mtp_num_items[k])
        lm = lm_loss(h, weight, labels, depth=k, head_bias=inputs["bias"], reduction="sum", **_lm_only(options))
        kd = mtp_kd_loss(
            h, weight, target, inputs["t_weight"], k, labels=labels, attention_mask=am, teacher_depth=teacher_depth,
            student_head_bias=inputs["bias"], teacher_head_bias=inputs["t_bias"], reduction="sum", **options,
        )  # fmt: skip
        lm_terms.append(lm / denominator)
        kd_terms.append(kd / denominator)
    loss, _ = slimqwen_objective(lm_terms[0], kd_terms[0], lm_terms[1:], kd_terms[1:], lam, beta)
    return loss


def _lm_only(options):
    return {k: v for k, v in options.items() if k in ("chunk_size", "recompute")}


def fused(inputs, lam, beta, *, use_teacher_mtp=False, num_items=None, mtp_num_items=None, **options):
    return distillation_objective(
        inputs["hidden"], inputs["weight"], inputs["teacher"], inputs["t_weight"], inputs["labels"], lam=lam,
        beta=beta, mtp_hidden=inputs["mtp"], teacher_mtp_hidden=inputs["teacher_mtp"] if use_teacher_mtp else (),
        head_bias=inputs["bias"], teacher_head_bias=inputs["t_bias"], attention_mask=inputs["attention_mask"],
        num_items_in_batch=num_items, mtp_num_items=mtp_num_items, **options,
    )  # fmt: skip


def student_params(inputs):
    return [t for t in (inputs["hidden"], inputs["weight"], inputs["bias"], *inputs["mtp"]) if t is not None]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_grads_close(actual, expected, tol):
    for a, e in zip(actual, expected):
        if e is None or a is None:  # no gradient on one side: zero on the other
            assert (a if e is None else e) is None or torch.all((a if e is None else e) == 0)
        else:
            torch.testing.assert_close(a, e, rtol=tol, atol=tol)


KD_CASES = [
    # divergence, jsd_beta, temperature, top_k
    ("forward_kl", 0.5, 1.0, None),
    ("forward_kl", 0.5, 2.0, None),
    ("reverse_kl", 0.5, 1.0, None),
    ("reverse_kl", 0.5, 0.7, None),
    ("jsd", 0.3, 1.0, None),
    ("jsd", 0.8, 1.5, None),
    ("forward_kl", 0.5, 1.0, 5),
    ("forward_kl", 0.5, 2.0, 5),
    ("jsd", 0.4, 1.0, 5),
    ("jsd", 0.4, 1.5, 5),
]
WEIGHTS = [(0.75, 0.3), (1.0, 0.3), (0.0, 0.3), (0.6, 0.0)]


@pytest.mark.parametrize("divergence,jsd_beta,temperature,top_k", KD_CASES)
@pytest.mark.parametrize("lam,beta", WEIGHTS)
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_objective_matches_full_logits_and_per_term(divergence, jsd_beta, temperature, top_k, lam, beta, recompute):
    inputs = make_objective_inputs()
    kd = dict(temperature=temperature, divergence=divergence, jsd_beta=jsd_beta)
    params = student_params(inputs)
    loss, logs = fused(inputs, lam, beta, teacher_top_k=top_k, chunk_size=4, recompute=recompute, **kd)
    ref = full_logit_objective(inputs, lam, beta, top_k=top_k, **kd)
    today = per_term_objective(inputs, lam, beta, teacher_top_k=top_k, chunk_size=4, recompute=recompute, **kd)
    assert loss.dtype == torch.float64 and ref.item() > 0.01
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, today, rtol=1e-10, atol=1e-10)
    g_fused = grads(loss, params)
    assert_grads_close(g_fused, grads(ref, params), 1e-10)
    assert_grads_close(g_fused, grads(today, params), 1e-10)
    if beta == 0.0:  # the MTP terms are only logged: no gradient reaches the MTP hidden states
        assert g_fused[-DEPTHS:] == (None,) * DEPTHS
    assert set(logs) == {"lm", "kd", "mtp_lm", "mtp_kd", "mtp_lm_1", "mtp_lm_2", "mtp_kd_1", "mtp_kd_2"}
    assert all(torch.isfinite(value) and not value.requires_grad for value, _ in logs.values())


@pytest.mark.parametrize("use_teacher_mtp", [False, True])
@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_fused_objective_masks_teacher_mtp_and_chunking(use_teacher_mtp, pad, chunk_size):
    inputs = make_objective_inputs(seed=3, pad=pad)
    params = student_params(inputs)
    options = dict(use_teacher_mtp=use_teacher_mtp, temperature=1.3, divergence="jsd", jsd_beta=0.25)
    loss, logs = fused(inputs, 0.7, 0.4, chunk_size=chunk_size, **options)
    ref = full_logit_objective(inputs, 0.7, 0.4, **options)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert_grads_close(grads(loss, params), grads(ref, params), 1e-10)
    # the logs are those of the per-term functions: summed term and its counted targets
    _, per_term_logs = distillation_objective_per_term_logs(inputs, use_teacher_mtp)
    for name, (value, count) in per_term_logs.items():
        torch.testing.assert_close(logs[name][0], value, rtol=1e-6, atol=1e-6)
        assert logs[name][1].item() == count.item()


def distillation_objective_per_term_logs(inputs, use_teacher_mtp):
    """(summed term, counted targets) of each term from the per-term functions, with the options of the test above."""
    am = inputs["attention_mask"]
    logs = {}
    for k, h in enumerate([inputs["hidden"], *inputs["mtp"]]):
        labels = inputs["labels"][k]
        h = h if k == 0 else F.pad(h, (0, 0, 0, k))
        target = F.pad(inputs["teacher_mtp"][k - 1], (0, 0, 0, k)) if k and use_teacher_mtp else inputs["teacher"]
        count = labels[:, 1 + k :].ne(-100)
        count = (count if am is None else count & am[:, 1 + k :].bool()).sum()
        with torch.no_grad():
            lm = lm_loss(h, inputs["weight"], labels, depth=k, head_bias=inputs["bias"], reduction="sum")
            kd = mtp_kd_loss(
                h, inputs["weight"], target, inputs["t_weight"], k, labels=labels, attention_mask=am,
                teacher_depth=k if k and use_teacher_mtp else 0, student_head_bias=inputs["bias"],
                teacher_head_bias=inputs["t_bias"], reduction="sum", temperature=1.3, divergence="jsd", jsd_beta=0.25,
            )  # fmt: skip
        names = ("lm", "kd") if k == 0 else (f"mtp_lm_{k}", f"mtp_kd_{k}")
        logs[names[0]] = (lm.float(), count)
        logs[names[1]] = (kd.float(), count)
    return None, logs


def test_gradient_accumulation_with_num_items_equals_one_big_batch():
    inputs = make_objective_inputs(seed=7)
    params = student_params(inputs)
    options = dict(temperature=2.0, divergence="reverse_kl", chunk_size=3)
    big, _ = fused(inputs, 0.8, 0.25, **options)
    g_big = grads(big, params)
    am = inputs["attention_mask"].bool()
    items = {k: ((inputs["labels"][k][:, 1 + k :] != -100) & am[:, 1 + k :]).sum() for k in range(DEPTHS + 1)}
    total = None
    for rows in (slice(0, 1), slice(1, B)):
        micro = dict(inputs)
        for key in ("hidden", "teacher", "attention_mask"):
            micro[key] = inputs[key][rows]
        for key in ("mtp", "teacher_mtp", "labels"):
            micro[key] = [t[rows] for t in inputs[key]]
        loss, _ = fused(micro, 0.8, 0.25, num_items=items[0], mtp_num_items={1: items[1], 2: items[2]}, **options)
        total = loss if total is None else total + loss
    torch.testing.assert_close(total, big, rtol=1e-10, atol=1e-10)
    assert_grads_close(grads(total, params), g_big, 1e-10)
    # and num_items_in_batch divides like the full-logit reference
    n = dict(num_items=torch.tensor(70), mtp_num_items={1: torch.tensor(60), 2: torch.tensor(50)})
    loss, _ = fused(inputs, 0.8, 0.25, **n, **options)
    ref = full_logit_objective(inputs, 0.8, 0.25, temperature=2.0, divergence="reverse_kl", **n)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    assert_grads_close(grads(loss, params), grads(ref, params), 1e-10)


def test_float32_and_bfloat16_heads():
    inputs64 = make_objective_inputs()
    ref = full_logit_objective(inputs64, 0.75, 0.3)
    g_ref = grads(ref, student_params(inputs64))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        inputs = {
            key: (
                [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in value]
                if isinstance(value, list) and key != "labels"
                else value.detach().to(dtype).requires_grad_(value.requires_grad)
                if isinstance(value, torch.Tensor) and value.is_floating_point()
                else value
            )
            for key, value in inputs64.items()
        }
        loss, _ = fused(inputs, 0.75, 0.3, chunk_size=4)
        params = student_params(inputs)
        g = grads(loss, params)
        assert loss.dtype == torch.float32 and all(t.dtype == dtype for t in g)
        if tol is not None:
            torch.testing.assert_close(loss, ref.float(), rtol=tol, atol=tol)
            assert_grads_close(g, [t.float() for t in g_ref], tol)
        else:  # bfloat16: the same as today's per-term functions on the same bfloat16 tensors
            today = per_term_objective(inputs, 0.75, 0.3, chunk_size=4)
            torch.testing.assert_close(loss, today, rtol=1e-5, atol=1e-5)
            assert_grads_close(g, grads(today, params), 1e-2)


def _held_head_buffers(objective, inputs):
    """Tensors of the head's `[V, H]` shape that autograd keeps from forward to backward, besides the head itself."""
    held = []

    def pack(t):
        if t.shape == inputs["weight"].shape and t.data_ptr() != inputs["weight"].data_ptr():
            held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective()
    return loss, held


@pytest.mark.parametrize("recompute", [False, True])
def test_one_head_gradient_buffer_for_all_terms(recompute):
    inputs = make_objective_inputs()
    fused_loss, fused_held = _held_head_buffers(lambda: fused(inputs, 0.75, 0.3, recompute=recompute)[0], inputs)
    today_loss, today_held = _held_head_buffers(
        lambda: per_term_objective(inputs, 0.75, 0.3, recompute=recompute), inputs
    )
    # today: one float32 head-gradient buffer per term (LM and KD of each depth); fused: one for the objective
    assert len(today_held) == (0 if recompute else 2 + 2 * DEPTHS)
    assert len(fused_held) == (0 if recompute else 1)
    params = student_params(inputs)
    assert_grads_close(grads(fused_loss, params), grads(today_loss, params), 1e-10)


def test_no_grad_and_upstream_scaling():
    inputs = make_objective_inputs()
    loss, _ = fused(inputs, 0.75, 0.3)
    with torch.no_grad():
        no_grad_loss, _ = fused(inputs, 0.75, 0.3)
    assert not no_grad_loss.requires_grad
    torch.testing.assert_close(no_grad_loss, loss.detach(), rtol=1e-12, atol=1e-12)
    params = student_params(inputs)
    g1 = grads(loss, params)
    loss2, _ = fused(inputs, 0.75, 0.3)
    assert_grads_close(grads(-2.5 * loss2 / 3, params), [-2.5 * g / 3 for g in g1], 1e-12)


def test_fused_objective_errors():
    inputs = make_objective_inputs()
    bad = dict(inputs, labels=[lab.clone() for lab in inputs["labels"]])
    bad["labels"][1][0, 5] = V
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 61\)"):
        fused(bad, 0.5, 0.3)
    with pytest.raises(ValueError, match="teacher_top_k must be <= the vocabulary size 61"):
        fused(inputs, 0.5, 0.3, teacher_top_k=V + 1)
    with pytest.raises(ValueError, match="lam .* must be a number in \\[0, 1\\]"):
        fused(inputs, 1.5, 0.3)
    with pytest.raises(ValueError, match="divergence must be one of"):
        fused(inputs, 0.5, 0.3, divergence="kl")
    wide = dict(inputs, teacher=torch.randn(B, T, H_T + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="teacher_hidden has hidden size 13"):
        fused(wide, 0.5, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7), (5, 61), (33, 1000)])
def test_in_place_kernels_the_chunks_rely_on(dtype, shape):
    # The chunk losses compute log_softmax and entr over their input (`out=` the input) to hold two [chunk, vocab]
    # buffers instead of three or four; a torch version that stopped computing these exactly would fail here.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g, dtype=dtype) * 4
    x = base.clone()
    out = torch.log_softmax(x, dim=-1, out=x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, torch.log_softmax(base, dim=-1), rtol=0, atol=0)
    big = torch.randn(4, *shape, generator=g, dtype=dtype)
    view = big[1]  # a contiguous row block of a larger buffer, as the chunks use
    expected = torch.log_softmax(view, dim=-1)
    torch.log_softmax(view, dim=-1, out=view)
    torch.testing.assert_close(big[1], expected, rtol=0, atol=0)
    p = torch.softmax(base, dim=-1)
    expected = torch.special.entr(p)
    torch.special.entr(p, out=p)
    torch.testing.assert_close(p, expected, rtol=0, atol=0)
