"""The replication scripts behind docs/RESULTS.md (examples/replicate/): the protocol pieces they share, and (slow) a
smoke run of every script, written to a temporary folder."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPLICATE = Path(__file__).resolve().parents[1] / "examples" / "replicate"
SCRIPTS = sorted(p.name for p in REPLICATE.glob("claim*.py"))


@pytest.fixture(scope="module")
def common():
    sys.path.insert(0, str(REPLICATE))
    try:
        yield importlib.import_module("_common")
    finally:
        sys.path.remove(str(REPLICATE))


def test_splits_are_disjoint_packages_with_text(common):
    files = {split: {p for pkg in packages for p in common.package_files(pkg)} for split, packages in common.SPLITS.items()}
    assert all(files.values())
    assert not files["train"] & files["tune"] and not files["train"] & files["report"] and not files["tune"] & files["report"]
    roots = {split: {p.parts[: p.parts.index("site-packages") + 2] for p in paths} for split, paths in files.items()}
    assert not roots["train"] & roots["report"] and not roots["tune"] & roots["report"]  # split by package


def test_tune_lr_extends_the_grid_until_the_best_is_inside(common):
    calls = []

    def run(lr):  # a bowl with its minimum at lr = 0.08, above the given grid
        calls.append(lr)
        return (lr - 0.08) ** 2

    best, results = common.tune_lr(run, [0.005, 0.01, 0.02])
    assert best == pytest.approx(0.08)
    ordered = sorted(results)
    assert ordered[0] < best < ordered[-1]  # strictly inside
    assert ordered == pytest.approx([0.005, 0.01, 0.02, 0.04, 0.08, 0.16])
    assert len(calls) == len(set(calls))  # no lr is run twice

    best, results = common.tune_lr(lambda lr: (lr - 1e-3) ** 2, [0.004, 0.008, 0.016])  # below the grid
    assert best == pytest.approx(1e-3) and min(results) < best


def test_tune_lr_refuses_a_grid_it_cannot_judge(common):
    with pytest.raises(ValueError, match="at least 3 values"):
        common.tune_lr(lambda lr: lr, [0.1, 0.2])
    with pytest.raises(RuntimeError, match="still at the edge"):
        common.tune_lr(lambda lr: -lr, [0.1, 0.2, 0.4], max_extensions=2)


def test_mean_std(common):
    assert common.mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_smoke_run_writes_its_report(script, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_SLIM_REPLICATE_CACHE=str(tmp_path / "cache"),
               HF_SLIM_REPLICATE_RESULTS=str(tmp_path / "results"))  # fmt: skip
    done = subprocess.run([sys.executable, script, "--smoke"], cwd=REPLICATE, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = list((tmp_path / "results").glob("*.md"))
    assert reports, "the smoke run wrote no report"
    for report in reports:
        text = report.read_text()
        assert "Command:" in text and "|" in text and "±" in text
