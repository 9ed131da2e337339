"""Shared timing helpers for the benchmarks: interleaved repeats, medians, machine record.

Timings on shared machines are noisy, so the benchmarks never time all of A and then
all of B. :func:`interleaved` runs every case once per round (ABCABC...), rotating the
order each round, and keeps one time per case per round; ratios are then taken per
round (both numbers from the same moment) and summarised by their median.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch


def machine() -> dict:
    """CPU model, core count, torch version and thread settings: printed with every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        # glibc malloc settings change large-tensor costs a lot on CPU (see docs/BENCHMARKS.md)
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
    }
    try:
        load = os.getloadavg()
        info["loadavg_1m"] = round(load[0], 2)
    except OSError:
        pass
    return info


def machine_line(info: Mapping | None = None) -> str:
    info = machine() if info is None else info
    return (f"machine: {info['cpu']} ({info['cpu_count']} cpus), torch {info['torch']}, "
            f"threads {info['torch_threads']} (interop {info['torch_interop_threads']}), "
            f"python {info['python']}" + (f", load {info['loadavg_1m']}" if "loadavg_1m" in info else "")
            + (f", malloc env {info['malloc_env']}" if info.get("malloc_env") else ""))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def add_clock_option(parser) -> None:
    """``--clock wall|cpu`` on a benchmark's argument parser."""
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time (default) or this process's CPU time "
                             "(steadier on a busy machine with --threads 1)")


def interleaved(cases: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                inner: int = 1, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of every case, one sample per case per round, cases interleaved.

    Each case is called ``warmup`` times first (also interleaved). A sample is the mean
    of ``inner`` back-to-back calls, for cases too short to time one at a time. The case
    order rotates every round so no case always runs right after the same other one.
    ``clock="cpu"`` measures this process's CPU time (all its threads) instead of wall
    time: with one torch thread it ignores the time the process spends descheduled by
    other jobs on a busy machine; with several threads it also counts their spin-waits.
    """
    now = CLOCKS[clock]
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = cases[name]
            t0 = now()
            for _ in range(inner):
                fn()
            times[name].append((now() - t0) / inner)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def spread(xs) -> tuple[float, float]:
    """The 25th and 75th percentiles (a rough error bar for the median)."""
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def ratio(times: Mapping[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``num / den`` (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width (markdown-compatible) table."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.3g}" if isinstance(c, float) else str(c)
                                           for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def fmt(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")
