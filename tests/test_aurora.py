"""Aurora optimizer: polar schedules, row balance, batching, routing, state round trip, bad input."""

import copy

import pytest
import torch
from torch import nn

from hf_slim.optim import (
    AURORA_PRESETS,
    Aurora,
    NonFiniteGradientError,
    aurora_direction,
    aurora_param_groups,
    aurora_update,
    polar_factor,
)


def _exact_polar(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return (U @ Vh).float()


def _skewed_tall(m: int = 512, n: int = 128, seed: int = 0) -> torch.Tensor:
    # Row scales spread over e^{±3}: Muon's polar factor then has very uneven row norms.
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g) * torch.exp(1.5 * torch.randn(m, 1, generator=g))


def _row_ratio(O: torch.Tensor) -> torch.Tensor:
    m, n = O.shape[-2:]
    return O.norm(dim=-1) / (n / m) ** 0.5


# Tolerances on the relative Frobenius error to the exact polar factor, for a matrix with condition
# number 100 (singular values log-spaced in [0.01, 1] before normalization). Keller Jordan's schedule
# does not converge to the polar factor by design (singular values land in about [0.4, 1.2]).
@pytest.mark.parametrize(
    "schedule, steps, tol",
    [("tilde_quintic12", None, 1e-3), ("polar_express", 7, 1e-3), ("polar_express", None, 2e-2), ("jordan5", None, 0.3)],
)
def test_polar_matches_svd(schedule, steps, tol):
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(96, 48, generator=g))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    X = U @ torch.diag(torch.logspace(0, -2, 48)) @ V.T
    for M in (X, X.T):  # tall and wide
        O = polar_factor(M, schedule, steps)
        err = (O - _exact_polar(M)).norm() / _exact_polar(M).norm()
        assert err < tol, (schedule, steps, float(err))
    if schedule == "jordan5":
        sv = torch.linalg.svdvals(polar_factor(X, schedule))
        assert 0.3 < sv.min() and sv.max() < 1.3


def test_polar_zero_matrix_stays_zero():
    assert torch.equal(polar_factor(torch.zeros(2, 8, 4)), torch.zeros(2, 8, 4))


def test_reference_preset_balances_rows_where_muon_does_not():
    G = _skewed_tall()
    muon = _row_ratio(_exact_polar(G))
    assert muon.min() < 0.9 or muon.max() > 1.1  # Muon's rows are badly unbalanced
    assert muon.max() / muon.min() > 10
    ref = AURORA_PRESETS["reference"]
    O, _ = aurora_direction(
        G, ns_schedule=ref["ns_schedule"], pp_iterations=ref["pp_iterations"], pp_beta=ref["pp_beta"], ns_dtype="float32"
    )
    r = _row_ratio(O)
    assert r.min() >= 0.9 and r.max() <= 1.1, (float(r.min()), float(r.max()))
    # Still (close to) orthogonal columns: the balance is not bought by giving up the polar structure.
    assert torch.linalg.svdvals(O).max() < 1.5


@pytest.mark.parametrize("preset, ns_dtype", [("default", "float32"), ("default", "bfloat16"), ("fast", "bfloat16")])
def test_default_balances_rows_after_a_few_steps_with_carried_scale(preset, ns_dtype):
    # bf16 iterations (what ns_dtype="auto" picks on CUDA and bf16-capable CPUs) keep the row balance.
    G = _skewed_tall()
    gen = torch.Generator().manual_seed(3)
    p = nn.Parameter(torch.zeros_like(G))
    opt = Aurora.from_preset([p], preset, lr=0.0, ns_dtype=ns_dtype)  # lr 0: observe the update, weights stay
    for step in range(6):
        p.grad = G + 0.3 * G.std() * torch.randn(G.shape, generator=gen)
        opt.step()
    state = opt.state[p]
    X = torch.lerp(p.grad, state["momentum_buffer"], 0.95)
    # The direction the next step would take, from the carried correction: one polar call.
    O, _ = aurora_direction(X, row_scale=state["row_scale"], ns_steps=opt.param_groups[0]["ns_steps"], ns_dtype=ns_dtype)
    r = _row_ratio(O)
    assert r.max() / r.min() < 1.3, (float(r.min()), float(r.max()))
    muon_ratio = _row_ratio(_exact_polar(X))
    assert muon_ratio.max() / muon_ratio.min() > 3
    # Without the carried correction a single polar call balances less well than with it.
    first = _row_ratio(aurora_direction(X, pp_iterations=1)[0])
    assert first.max() / first.min() > r.max() / r.min()


def test_auto_dtype_is_bf16_only_where_bf16_matmuls_are_native(monkeypatch):
    from hf_slim.optim import polar

    monkeypatch.setattr(polar, "cpu_has_native_bf16", lambda: True)
    assert polar.resolve_ns_dtype("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(polar, "cpu_has_native_bf16", lambda: False)
    assert polar.resolve_ns_dtype("auto", torch.device("cpu")) is torch.float32
    assert polar.resolve_ns_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert polar.resolve_ns_dtype("float32", torch.device("cuda")) is torch.float32


def test_wide_matrix_is_transposed_to_tall():
    G = _skewed_tall().T.contiguous()  # [128, 512]: columns are the neurons
    O, C = aurora_direction(G, pp_iterations=2, ns_schedule="tilde_quintic12")
    col = O.norm(dim=0) / (128 / 512) ** 0.5
    assert col.min() > 0.85 and col.max() < 1.15
    assert C.shape == (512, 1)


def test_square_equals_muon_update():
    g = torch.Generator().manual_seed(4)
    grad = torch.randn(64, 64, generator=g)
    buf_a, buf_b = torch.randn(64, 64, generator=g), None
    buf_b = buf_a.clone()
    upd, C = aurora_update(grad, buf_a, pp_iterations=2, ns_schedule="jordan5")
    # Keller Jordan's Muon step written out: Nesterov momentum then his 5-step schedule.
    buf_b.lerp_(grad, 0.05)
    X = grad.lerp(buf_b, 0.95)
    X = X / (X.norm() + 1e-7)
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    assert C is None
    torch.testing.assert_close(upd, X, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(buf_a, buf_b)


def test_batched_3d_equals_per_expert_loop():
    g = torch.Generator().manual_seed(5)
    E = 4
    W3 = torch.randn(E, 48, 16, generator=g)
    grads = [torch.randn(E, 48, 16, generator=g) for _ in range(3)]
    p3 = nn.Parameter(W3.clone())
    p2 = [nn.Parameter(W3[e].clone()) for e in range(E)]
    o3, o2 = Aurora([p3], lr=0.05, weight_decay=0.1), Aurora(p2, lr=0.05, weight_decay=0.1)
    for G in grads:
        p3.grad = G.clone()
        for e in range(E):
            p2[e].grad = G[e].clone()
        o3.step()
        o2.step()
    torch.testing.assert_close(p3.detach(), torch.stack([p.detach() for p in p2]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(p3.detach(), W3)


class _TinyMoe(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.q_proj = nn.Linear(16, 16, bias=True)
        self.gate = nn.Linear(16, 4, bias=False)  # router
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16) * 0.1)
        self.experts.down_proj = nn.Parameter(torch.randn(4, 16, 16) * 0.1)
        self.conv = nn.Conv1d(16, 16, 3, groups=16)
        self.lm_head = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_param_group_rule():
    model = _TinyMoe()
    groups = aurora_param_groups(model, lr=0.03, adamw_lr=1e-3)
    names = {g["use_aurora"]: [] for g in groups}
    for g in groups:
        names[g["use_aurora"]] += [n for n, _ in g["params"]]
    assert sorted(names[True]) == ["experts.down_proj", "experts.gate_up_proj", "q_proj.weight"]
    assert {"embed_tokens.weight", "lm_head.weight", "gate.weight", "norm.weight", "q_proj.bias", "conv.weight"} <= set(
        names[False]
    )
    opt = Aurora(groups)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 1e-3, 1e-3]
    assert opt.param_groups[0]["param_names"][0] in names[True]
    with_router = aurora_param_groups(model, router="aurora")
    assert "gate.weight" in [n for n, _ in with_router[0]["params"]]
    # Frozen parameters are left out.
    model.q_proj.weight.requires_grad_(False)
    assert "q_proj.weight" not in [n for g in aurora_param_groups(model) for n, _ in g["params"]]


def _train(model, opt, steps, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    # Learnable sequences: each next token is a fixed function of the current one.
    starts = [torch.randint(0, 50, (4, 1), generator=g) for _ in range(steps + start)]
    data = [torch.cat([(s * 7**k + 3 * k) % 50 for k in range(6)], dim=1) for s in starts]
    losses = []
    for ids in data[start:]:
        h = model.norm(model.embed_tokens(ids))
        h = h + model.q_proj(h)
        w = torch.softmax(model.gate(h), -1)
        up = torch.einsum("btd,eod->bteo", h, model.experts.gate_up_proj)[..., :16]
        moe = torch.einsum("bteo,edo->bted", torch.relu(up), model.experts.down_proj)
        h = h + (w.unsqueeze(-1) * moe).sum(-2)
        loss = nn.functional.cross_entropy(model.lm_head(h)[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_state_dict_round_trip_reproduces_uninterrupted_run():
    torch.manual_seed(0)
    base = _TinyMoe()
    kw = {"lr": 0.02, "adamw_lr": 3e-3, "weight_decay": 0.01, "adamw_weight_decay": 0.01}
    full = copy.deepcopy(base)
    opt_full = Aurora(aurora_param_groups(full), **kw)
    _train(full, opt_full, 6)

    part = copy.deepcopy(base)
    opt_part = Aurora(aurora_param_groups(part), **kw)
    _train(part, opt_part, 3)
    sd = copy.deepcopy(opt_part.state_dict())
    model_sd = copy.deepcopy(part.state_dict())
    assert any("row_scale" in s for s in sd["state"].values())

    resumed = _TinyMoe()
    resumed.load_state_dict(model_sd)
    opt_res = Aurora(aurora_param_groups(resumed), **kw)
    opt_res.load_state_dict(sd)
    _train(resumed, opt_res, 3, start=3)
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = _TinyMoe()
    losses = _train(model, Aurora(aurora_param_groups(model), lr=0.05, adamw_lr=3e-2), 40, seed=1)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.6, losses


def test_nonfinite_gradient_raises_and_writes_nothing():
    model = _TinyMoe()
    opt = Aurora(aurora_param_groups(model))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.q_proj.weight.grad[0, 0] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteGradientError, match="q_proj.weight"):
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    skip = Aurora(aurora_param_groups(model), nonfinite="skip")
    skip.step()
    assert skip.skipped_steps == 1 and not skip.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"ns_schedule": "cubic"}, "ns_schedule"),
        ({"pp_iterations": -1}, "pp_iterations"),
        ({"pp_beta": 0.0}, "pp_beta"),
        ({"scale": "rms"}, "scale"),
        ({"ns_dtype": "int8"}, "ns_dtype"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"ns_steps": 0}, "ns_steps"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Aurora([nn.Parameter(torch.zeros(4, 4))], **kwargs)


def test_bad_preset_and_1d_in_aurora_group():
    with pytest.raises(ValueError, match="preset='turbo'.*valid"):
        Aurora.from_preset([nn.Parameter(torch.zeros(4, 4))], "turbo")
    with pytest.raises(ValueError, match="use_aurora=False"):
        Aurora([{"params": [nn.Parameter(torch.zeros(4))], "use_aurora": True}])
    ref = Aurora.from_preset([nn.Parameter(torch.zeros(4, 4))], "reference", lr=0.1)
    assert ref.param_groups[0]["ns_schedule"] == "tilde_quintic12" and ref.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("shape", [(64, 16), (32, 32), (16, 64), (4, 24, 8)])
@pytest.mark.parametrize("ns_dtype", ["float32", "bfloat16"])
def test_a_finite_gradient_whose_norm_overflows_gives_the_same_update(shape, ns_dtype):
    """Entries of 1e20 are finite, but their squares overflow float32: the update must be the one of the same
    gradient at scale 1 (the direction is scale-free), not NaN or zero."""
    updates = []
    for scale in (1.0, 1e20):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape) * scale
        Aurora([p], lr=1.0, ns_dtype=ns_dtype).step()
        updates.append(p.detach().clone())
    assert torch.isfinite(updates[1]).all()
    torch.testing.assert_close(updates[1], updates[0], rtol=0, atol=1e-5 if ns_dtype == "float32" else 2e-2)
