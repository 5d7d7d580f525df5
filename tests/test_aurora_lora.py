"""optim="aurora_lora": whitened joint (A, B) updates on PEFT LoRA adapters."""

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer

from hf_slim.optim import AuroraLoRA, aurora_lora_param_groups, lora_pair_update


sys.path.insert(0, str(Path(__file__).parent))
from test_aurora_trainer import _args, learnable_dataset, tiny_moe  # noqa: E402


def _peft(seed: int = 0):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0, modules_to_save=["lm_head"])
    return get_peft_model(tiny_moe(seed), cfg)


def _w_step(A, B, uA, uB, s):
    # First-order change of the effective weight s * B @ A for the factor steps (-uA, -uB).
    return -s * (uB @ A + B @ uA)


def test_param_groups_pair_adapters_and_route_the_rest():
    model = _peft()
    groups = aurora_lora_param_groups(model)
    pair_names = groups[0]["param_names"] if "param_names" in groups[0] else [n for n, _ in groups[0]["params"]]
    assert len(pair_names) == 2 * 2 * 3  # 2 layers x 3 targets x (A, B)
    assert all(".lora_A." in a and ".lora_B." in b for a, b in zip(pair_names[::2], pair_names[1::2]))
    assert groups[0]["lora_scaling"] == [2.0] * 6
    rest = [n for g in groups[1:] for n, _ in g["params"]]
    assert any("lm_head" in n for n in rest) and not any("lora_" in n for n in rest)
    opt = AuroraLoRA(groups)
    assert len(opt.param_groups) == len(groups)


def test_non_lora_model_is_rejected():
    with pytest.raises(ValueError, match="no trainable PEFT LoRA"):
        aurora_lora_param_groups(tiny_moe())


def test_whitened_step_is_invariant_to_factor_rebalancing():
    g = torch.Generator().manual_seed(0)
    out, r, inp, s = 48, 4, 24, 2.0
    A = torch.randn(r, inp, generator=g)
    B = torch.randn(out, r, generator=g) * 0.1
    G_W = torch.randn(out, inp, generator=g)  # gradient w.r.t. the effective weight
    R = torch.randn(r, r, generator=g) + 3 * torch.eye(r)  # any invertible re-parametrization
    steps, muon_steps = [], []
    for A_, B_ in ((A, B), (R @ A, B @ torch.linalg.inv(R))):
        G_A, G_B = s * B_.T @ G_W, s * G_W @ A_.T
        kw = dict(lora_scaling=s, lora_damping=1e-12, ns_schedule="tilde_quintic12", pp_iterations=2)
        uA, uB, _, _ = lora_pair_update(A_, B_, G_A, G_B, **kw)
        steps.append(_w_step(A_, B_, uA, uB, s))
        # Muon on each factor separately: the same function, parametrized differently, moves differently.
        from hf_slim.optim import polar_factor

        muon_steps.append(_w_step(A_, B_, polar_factor(G_A), polar_factor(G_B), s))
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-3, atol=1e-3)
    assert (muon_steps[0] - muon_steps[1]).norm() > 0.1 * muon_steps[0].norm()


def test_whitened_step_balances_output_neurons_of_the_effective_update():
    g = torch.Generator().manual_seed(1)
    out, r, inp, s = 256, 8, 32, 1.0
    A = torch.randn(r, inp, generator=g)
    B = torch.zeros(out, r)  # PEFT initialization: only B moves at first
    G_B = torch.randn(out, r, generator=g) * torch.exp(1.5 * torch.randn(out, 1, generator=g))
    uA, uB, _, _ = lora_pair_update(A, B, torch.zeros(r, inp), G_B, lora_scaling=s, pp_iterations=2, ns_schedule="tilde_quintic12", scale="none")
    assert torch.count_nonzero(uA) == 0
    rows = _w_step(A, B, uA, uB, s).norm(dim=1) / (r / out) ** 0.5
    assert rows.min() > 0.85 and rows.max() < 1.15, (float(rows.min()), float(rows.max()))


def test_trainer_optim_aurora_lora_trains_adapters_only(tmp_path):
    model = _peft()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, optim="aurora_lora", learning_rate=1e-2, max_steps=25, optim_args="lora_damping=1e-4"),
        train_dataset=learnable_dataset(),
    )
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, AuroraLoRA)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert any("row_scale" in s for s in opt.state.values())
