"""Shared by the speed benchmarks: alternated timing, median and spread, and the machine description for the docs."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence


def alternate(runs: Sequence[tuple[str, Callable[[], float]]], repeats: int) -> dict[str, list[float]]:
    """Run every `(name, fn)` once per repeat, the order reversed on every other repeat (A B C, C B A, A B C, ...).

    Each `fn` returns the value it measured (seconds, tokens/s, ...). Returns `{name: [value per repeat]}`, so the
    i-th values of two names come from the same repeat and can be paired into per-repeat ratios.
    """
    values: dict[str, list[float]] = {name: [] for name, _ in runs}
    for r in range(repeats):
        for name, fn in runs if r % 2 == 0 else list(runs)[::-1]:
            values[name].append(fn())
    return values


def timed(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> Callable[[], float]:
    """A callable that runs `fn` and returns its wall time in seconds."""

    def run() -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    return run


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.1f}") -> str:
    """`min–max` of `values`, formatted."""
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repeat ratios of two series measured in the same alternated repeats."""
    return [a / b for a, b in zip(numerator, denominator)]


def cpu_model() -> str:
    """`model name` from /proc/cpuinfo, with family / model / stepping (a KVM guest often shows only the brand)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name") or platform.processor() or platform.machine()
    extra = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields)
    return f"{name} ({extra})" if extra else name


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def machine_note(threads: int, load_before: float | None, load_after: float | None) -> str:
    """One sentence on whether other work shared the machine: the 1-minute load average at start and end."""
    cores = os.cpu_count() or 1
    if load_before is None or load_after is None:
        return "Load average unavailable."
    shared = max(load_before, load_after) > threads + 0.25  # this process accounts for about `threads`
    text = f"1-minute load average {load_before:.2f} at the start, {load_after:.2f} at the end, on {cores} cores"
    if shared:
        return (f"{text}: the machine was shared with other jobs while this ran, so single timings are noisy; "
                "compare medians and look at the spread.")
    return (f"{text}: little other load by that measure (it lags by about a minute; the min–max shows any "
            "bursts from other jobs on this shared machine).")


def environment() -> dict:
    """The machine and the versions a benchmark table states: CPU, cores, RAM, Python, torch, transformers, TRL."""
    import torch
    import transformers
    import trl

    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        mem_gib = float("nan")
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "mem_gib": mem_gib, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
    }  # fmt: skip
