"""Step time of GradAug over the ERM step, measured in one run, beside the estimate of its convolutional cost.

    PYTHONPATH=src python benchmarks/gradaug_overhead.py            # ResNet-20 on 1x28x28, batch 128
    PYTHONPATH=src python benchmarks/gradaug_overhead.py --quick    # a smoke run (ResNet-8, batch 16, 1 thread)
    PYTHONPATH=src python benchmarks/gradaug_overhead.py --threads 1 --clock cpu --repeats 15   # a busy machine

Every case trains its own copy of the same model on the same batch; the cases run
interleaved (one call of each per round, order rotated), and each ratio is the median
over rounds of (case time / ERM time in the same round).

The estimate for one GradAug step, in ERM steps, is ``1 + sum_i w_i^2 (r_i / R)^2``:
sub-network i at width w_i keeps about w_i^2 of the convolutions' multiply-adds (input
and output channels both shrink), and at resolution r_i of R about (r_i / R)^2 of them.
The widths and resolutions are drawn afresh every step, so the estimate is taken per
round from the sub-networks that round's step drew (``step.last_subnets``), and the
table gives its median and the median of (measured / estimate). Under SAM both are
doubled. What the estimate leaves out: the unsliced classifier, the distillation loss,
resizing the input, and the copies of sliced weights.

Rows:
  erm            Standard(ERM()) -- the denominator
  gradaug        GradAug(ERM()) with the defaults: 3 sub-networks, widths [0.9, 1.0], no resizing
  gradaug_paper  the paper's CIFAR settings: widths [0.8, 1.0], resolutions 28/24/21 (32/28/24 scaled to 28),
                 bilinear resizing with align_corners=True (the default, as in the authors' scripts)
  sam_gradaug    sam(rho=0.05)+gradaug: SharpnessAware(GradAug(ERM()), rho=0.05), SAM on the GradAug loss (defaults)
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import maxup  # noqa: E402
from maxup.models import create_model  # noqa: E402
from maxup.steps import GradAug, SharpnessAware, Standard  # noqa: E402

SIZE = 28
CASES = {  # name: (GradAug options, SAM's rho (0: no SAM wrapper); the estimate doubles under SAM)
    "gradaug": ({}, 0),
    "gradaug_paper": ({"width_range": (0.8, 1.0), "resolutions": (28, 24, 21)}, 0),
    "sam_gradaug": ({}, 0.05),
}


def estimate(subnets, size: int = SIZE) -> float:
    """``1 + sum_i w_i^2 (r_i / R)^2`` for one step's sub-networks (r_i = R when not resized)."""
    return 1.0 + sum(w * w * ((r or size) / size) ** 2 for w, r in subnets)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=None, help="ResNet depth 6n+2 (default 20; --quick: 8)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 128; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick: 1)")
    T.add_clock_option(p)
    p.add_argument("--cases", default=None, help=f"comma-separated subset of {', '.join(CASES)} (erm always runs)")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 16, one thread, few repeats: a smoke run")
    p.add_argument("--json", default=None, help="also write every number (and the raw per-round times) here")
    a = p.parse_args(argv)
    a.depth = a.depth or (8 if a.quick else 20)
    a.batch = a.batch or (16 if a.quick else 128)
    a.threads = a.threads or (1 if a.quick else None)
    repeats = a.repeats or (3 if a.quick else 9)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    names = list(CASES)
    if a.cases:
        names = [c.strip() for c in a.cases.split(",") if c.strip() and c.strip() != "erm"]
        unknown = sorted(set(names) - set(CASES))
        if unknown:
            p.error(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
    if a.threads:
        torch.set_num_threads(a.threads)

    torch.manual_seed(0)
    base = create_model("resnet", input_shape=(1, SIZE, SIZE), num_classes=10, depth=a.depth)
    base.train()
    x = torch.rand(a.batch, 1, SIZE, SIZE)
    y = torch.randint(0, 10, (a.batch,))
    gen = torch.Generator().manual_seed(0)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def erm_case():
        model = copy.deepcopy(base)
        step = Standard(maxup.ERM(), sgd(model))
        return lambda: step(model, x, y, gen)

    estimates: dict[str, list[float]] = {}

    def gradaug_case(name):
        options, rho = CASES[name]
        model = copy.deepcopy(base)
        gradaug = GradAug(maxup.ERM(), sgd(model), **options)
        step = SharpnessAware(gradaug, rho=rho) if rho else gradaug
        factor = 2 if rho else 1
        record = estimates.setdefault(name, [])

        def run():
            step(model, x, y, gen)
            record.append(factor * estimate(gradaug.last_subnets))
        return run

    cases = {"erm": erm_case(), **{name: gradaug_case(name) for name in names}}
    info = T.machine()
    print(T.machine_line(info))
    print(f"model: resnet depth {a.depth} on 1x{SIZE}x{SIZE}, batch {a.batch}; {repeats} rounds after {warmup} "
          f"warm-up, cases interleaved, {a.clock} clock")
    times = T.interleaved(cases, repeats=repeats, warmup=warmup, clock=a.clock)
    rows, out = [], {}
    for name in ["erm"] + names:
        r = T.ratio(times, name, "erm")
        if name == "erm":
            rows.append([name, T.median(times[name]) * 1e3, r, "1", "1"])
            out[name] = {"median_ms": T.median(times[name]) * 1e3, "times_s": times[name]}
            continue
        est = estimates[name][-repeats:]  # the timed calls (after the warm-up ones)
        per_round = [t / e / est_i for t, e, est_i in zip(times[name], times["erm"], est)]
        rows.append([name, T.median(times[name]) * 1e3, r, T.median(est), T.median(per_round)])
        out[name] = {"median_ms": T.median(times[name]) * 1e3, "ratio_to_erm": r, "estimate": T.median(est),
                     "measured_over_estimate": T.median(per_round), "estimates": est, "times_s": times[name]}
    print(T.table(["step", "median ms", "x ERM (measured)", "x ERM (estimate)", "measured / estimate"], rows))
    payload = {"machine": info, "depth": a.depth, "batch": a.batch, "repeats": repeats, "warmup": warmup,
               "clock": a.clock, "cases": {k: {"options": {o: list(v) if isinstance(v, tuple) else v
                                                           for o, v in CASES[k][0].items()}, "sam_rho": CASES[k][1]}
                                           for k in names},
               "results": out}
    T.write_json(a.json, payload)
    return payload


if __name__ == "__main__":
    main()
