"""Step time of SAM, ASAM, G-Mix, BG-Mix and DG-Mix over the ERM step, measured in one run.

    PYTHONPATH=src python benchmarks/sam_overhead.py            # ResNet-20 on 1x28x28, batch 128
    PYTHONPATH=src python benchmarks/sam_overhead.py --quick    # a smoke run (ResNet-8, fewer repeats)
    PYTHONPATH=src python benchmarks/sam_overhead.py --threads 1 --repeats 20   # on a shared machine

On a machine shared with other jobs, ``--threads 1`` gives far steadier times (two
threads that wait on each other stall whenever another process takes a core).

Every case trains its own copy of the same model on the same batch; the cases run
interleaved (one call of each per round, order rotated), and each ratio is the median
over rounds of (case time / ERM time in the same round). The floor for SAM is 2.0x (two
forward-backward passes); the sharpness-sensitivity pass of BG-Mix and DG-Mix and the
2B rows of DG-Mix cost more by construction (see maxup.steps.gmix).

Rows:
  erm            Standard(ERM()) -- the denominator
  mixup          Standard(ERM(Mixup)) -- what G-Mix is SAM on
  sam            maxup.steps.SharpnessAware(ERM(), rho=0.05)
  sam_wrapper    a plain user loop around maxup.optim.SAM (first_step / second_step)
  asam           maxup.steps.SharpnessAware(ERM(), adaptive=True, rho=0.5)
  sam_mixup      maxup.steps.SAMMixup (G-Mix: SAM on the Mixup loss; the spec term gmix is another method)
  bgmix          maxup.steps.BGMix
  dgmix          maxup.steps.DGMix
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved, machine, machine_line, median, ratio, spread, table, write_json  # noqa: E402

import maxup  # noqa: E402
from maxup.augment import Mixup  # noqa: E402
from maxup.models import create_model  # noqa: E402
from maxup.optim import SAM as SAMOptimizer  # noqa: E402
from maxup.steps import BGMix, DGMix, SAMMixup, SharpnessAware, Standard  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=20, help="ResNet depth (6n+2)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cases", default=None, help="comma-separated subset of the rows (erm is always run)")
    p.add_argument("--quick", action="store_true", help="ResNet-8, batch 64, few repeats: a smoke run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.batch = 8, 64
    repeats = args.repeats or (3 if args.quick else 9)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=args.depth)
    base.train()
    x = torch.rand(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    gen = torch.Generator().manual_seed(0)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def case(make):
        model = copy.deepcopy(base)
        step = make(model)
        return lambda: step(model, x, y, gen)

    def wrapper_case():
        model = copy.deepcopy(base)
        opt = SAMOptimizer(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9, weight_decay=5e-4)

        def run():
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()  # BatchNorm statistics move twice: the user's loop
            opt.second_step(zero_grad=True)
        return run

    makers = {
        "erm": lambda: case(lambda m: Standard(maxup.ERM(), sgd(m))),
        "mixup": lambda: case(lambda m: Standard(maxup.ERM(Mixup(1.0, per_sample=True, num_classes=10)), sgd(m))),
        "sam": lambda: case(lambda m: SharpnessAware(maxup.ERM(), sgd(m), rho=0.05)),
        "sam_wrapper": wrapper_case,
        "asam": lambda: case(lambda m: SharpnessAware(maxup.ERM(), sgd(m), rho=0.5, adaptive=True)),
        "sam_mixup": lambda: case(lambda m: SAMMixup(maxup.ERM(), sgd(m), alpha=1.0, num_classes=10)),
        "bgmix": lambda: case(lambda m: BGMix(maxup.ERM(), sgd(m), alpha=1.0, num_classes=10)),
        "dgmix": lambda: case(lambda m: DGMix(maxup.ERM(), sgd(m), alpha=1.0, num_classes=10)),
    }
    names = list(makers)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = sorted(set(wanted) - set(makers))
        if unknown:
            p.error(f"unknown cases {unknown}; valid: {', '.join(makers)}")
        names = ["erm"] + [n for n in wanted if n != "erm"]
    cases = {name: makers[name]() for name in names}

    info = machine()
    print(machine_line(info))
    print(f"model: resnet depth {args.depth} on 1x28x28, batch {args.batch}; {repeats} rounds after {warmup} warm-up, "
          "cases interleaved")
    times = interleaved(cases, repeats=repeats, warmup=warmup)
    rows, out = [], {}
    for name in names:
        lo, hi = spread([t * 1e3 for t in times[name]])
        r = ratio(times, name, "erm")
        per_round = sorted(a / b for a, b in zip(times[name], times["erm"]))
        rows.append([name, median(times[name]) * 1e3, f"{lo:.0f}-{hi:.0f}", r,
                     f"{per_round[0]:.2f}-{per_round[-1]:.2f}"])
        out[name] = {"median_ms": median(times[name]) * 1e3, "ratio_to_erm": r, "times_s": times[name]}
    print(table(["step", "median ms", "IQR ms", "x ERM (median)", "x ERM (range)"], rows))
    payload = {"machine": info, "depth": args.depth, "batch": args.batch, "repeats": repeats, "warmup": warmup,
               "results": out}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
