"""Hidden-channel scores: `minitron_modelopt` equals NVIDIA ModelOpt's aggregation recomputed by hand from captured
norm outputs; statistics without its key fail with a clear message; every `hidden_method` prunes."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_anatomy import tiny_model, token_batch  # noqa: E402

from hf_slim.anatomy import get_spec  # noqa: E402
from hf_slim.pruning import (  # noqa: E402
    ImportanceStats,
    PruneConfig,
    collect_statistics,
    hidden_importance,
    prune,
)
from hf_slim.pruning.scores import HIDDEN_METHODS  # noqa: E402
from hf_slim.pruning.stats import STAT_KEYS, STAT_KEYS_SINCE  # noqa: E402

X = token_batch(8, 32)
KEY = "hidden.minitron_modelopt"


@contextlib.contextmanager
def decoder_norm_outputs(model):
    """Capture every decoder norm's output per forward call ({(layer, j): [tensor, ...]}), and accumulate the
    statistic with the one line the calibration hook adds (`_Collector._hook_norm`)."""
    spec = get_spec(model)
    names = [n for n in spec.modules["decoder_norms"].split(",") if n][:2]
    layers = [model.get_submodule(b) for b in spec.blocks(model)]
    L, H = len(layers), model.config.hidden_size
    captured: dict[tuple[int, int], list[torch.Tensor]] = {}
    acc = torch.zeros(L, 2, H)
    handles = []
    for i, layer in enumerate(layers):
        for j, name in enumerate(names):
            def hook(_m, _a, out, i=i, j=j):
                x = out.detach().float()
                captured.setdefault((i, j), []).append(x)
                acc[i, j] += x.abs().mean(dim=1).pow(2).sum(dim=0)  # the line for calibration's _hook_norm

            handles.append(layer.get_submodule(name).register_forward_hook(hook))
    try:
        yield captured, acc
    finally:
        for h in handles:
            h.remove()


def modelopt_reference(captured, num_decoder_layers):
    """ModelOpt's hidden-size importance, written out naively from the recorded activations: per norm and per
    sample, the mean over positions of |x|; per norm, the L2 norm of those over every sample of every forward call;
    then the sum over the decoder layers' norms (mcore_minitron.py, `_register_hidden_size_importance`)."""
    total = 0
    for (i, _j), calls in sorted(captured.items()):
        if i >= num_decoder_layers:
            continue
        per_sample = [x[b].abs().mean(dim=0) for x in calls for b in range(x.shape[0])]
        total = total + torch.stack(per_sample).pow(2).sum(0).sqrt()
    return total


@pytest.mark.parametrize("family", ["mixtral", "slim_moe"])
def test_minitron_modelopt_equals_the_modelopt_aggregation(family):
    model = tiny_model(family)
    with decoder_norm_outputs(model) as (captured, acc), torch.no_grad():
        for start in (0, 4):  # two forward calls: accumulation across calls is part of the aggregation
            model(X[start : start + 4])
    n_dec = model.config.num_hidden_layers
    stats = ImportanceStats({KEY: acc}, {"sizes": {"num_hidden_layers": n_dec}})
    score = hidden_importance(stats, "minitron_modelopt")
    torch.testing.assert_close(score, modelopt_reference(captured, n_dec), rtol=1e-5, atol=1e-6)
    # MTP blocks (slim_moe's last rows) and the final norm are not part of it, as in ModelOpt
    if acc.shape[0] > n_dec:
        acc[n_dec:] = 1e6
        torch.testing.assert_close(hidden_importance(stats, "minitron_modelopt"), score)


def test_minitron_modelopt_differs_from_the_signed_minitron_mean():
    # one norm, one sample, two positions: x = (+1, -1) per channel 0, (0.5, 0.5) for channel 1
    x = torch.tensor([[[1.0, 0.5], [-1.0, 0.5]]])
    modelopt = ImportanceStats({KEY: x.abs().mean(1).pow(2).sum(0).view(1, 1, 2)})
    signed = ImportanceStats({"hidden.minitron": x.mean(1).norm(dim=0).view(1, 1, 2)})
    torch.testing.assert_close(hidden_importance(modelopt, "minitron_modelopt"), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(hidden_importance(signed, "minitron"), torch.tensor([0.0, 0.5]))


def test_statistics_without_the_key_say_to_recalibrate():
    stats = ImportanceStats({"hidden.norm_abs_mean": torch.ones(2, 2, 4)})
    with pytest.raises(ValueError, match=rf"re-run collect_statistics with hf-slim >= {STAT_KEYS_SINCE[KEY]}"):
        hidden_importance(stats, "minitron_modelopt")
    with pytest.raises(ValueError, match="valid values are"):
        hidden_importance(stats, "modelopt")
    with pytest.raises(ValueError, match="hidden_method='nope'"):
        PruneConfig(hidden_method="nope")
    assert KEY in STAT_KEYS and set(STAT_KEYS_SINCE) <= set(STAT_KEYS)


def test_collected_statistic_matches_the_reference():
    """Once calibration collects the key, it must be ModelOpt's accumulator (sum over samples of the squared
    per-sample mean |x|, not yet square-rooted)."""
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=4, show_progress=False)
    if KEY not in stats:
        pytest.skip(f"calibration does not collect {KEY!r} yet (the _hook_norm line is not in)")
    with decoder_norm_outputs(model) as (captured, acc), torch.no_grad():
        model(X[:4])
        model(X[4:])
    torch.testing.assert_close(stats[KEY], acc, rtol=1e-5, atol=1e-6)
    n_dec = model.config.num_hidden_layers
    torch.testing.assert_close(hidden_importance(stats, "minitron_modelopt"), modelopt_reference(captured, n_dec),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", HIDDEN_METHODS)
def test_every_hidden_method_prunes(method):
    model = tiny_model("qwen3_moe")
    stats = collect_statistics(model, X, num_samples=8, max_length=32, batch_size=8, show_progress=False)
    if KEY not in stats:
        with decoder_norm_outputs(model) as (_, acc), torch.no_grad():
            model(X)
        stats.tensors[KEY] = acc
    small = prune(model, PruneConfig(hidden_size=24, hidden_method=method), stats)
    assert small.config.hidden_size == 24
    kept = torch.sort(torch.argsort(hidden_importance(stats, method), descending=True, stable=True)[:24]).values
    torch.testing.assert_close(small.model.embed_tokens.weight, model.model.embed_tokens.weight[:, kept])
