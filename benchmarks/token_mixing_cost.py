"""Step time of the token-mixing methods (TransMix, TokenMix) over the ERM step of the same vision transformer.

    PYTHONPATH=src python benchmarks/token_mixing_cost.py --threads 1 --clock cpu    # the figures in the cards

``benchmarks/method_cost.py`` times every method on a ResNet; TransMix reads a vision
transformer's attention, so these cases run on :class:`maxup.models.ViT` instead (the default
one: dim 64, depth 4, 4 heads, patches of 4 on 1x28x28, batch 128, AdamW), every case on its own
copy of the model, built by ``maxup.methods.build_step`` as ``maxup train`` builds it. The TokenMix
teacher cases build ``ERM(TokenMix(teacher=...))`` in Python with a small CNN (channels 32, 64, 128)
or a copy of the ViT as the teacher. Cases run interleaved; each ratio is the median over rounds of
(case time / ERM time in the same round): see benchmarks/_timing.py.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_clock_option, interleaved, machine, machine_line, median, ratio, table, write_json  # noqa: E402

import maxup  # noqa: E402
from maxup import methods as M  # noqa: E402
from maxup.augment.tokenmix import TokenMix  # noqa: E402
from maxup.models import SmallCNN, create_model  # noqa: E402
from maxup.steps import Standard  # noqa: E402

SPECS = ["erm", "cutmix", "transmix", "maxup(m=4)+cutmix", "maxup(m=4)+transmix", "tokenmix",
         "maxup(m=4)+tokenmix"]
TEACHERS = ["tokenmix(teacher=cnn)", "tokenmix(teacher=vit)"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--patch", type=int, default=4, help="ViT patch size on 28x28 (default 4: 7x7 tokens)")
    p.add_argument("--repeats", type=int, default=11, help="timed rounds (default 11)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_clock_option(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    vit = create_model("vit", input_shape=(1, 28, 28), num_classes=10, patch_size=args.patch).train()
    cnn = SmallCNN(in_channels=1, num_classes=10).eval()
    x, y = torch.rand(args.batch, 1, 28, 28), torch.randint(0, 10, (args.batch,))
    gen = torch.Generator().manual_seed(0)

    def case(spec: str):
        model = copy.deepcopy(vit)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        if spec in TEACHERS:
            teacher = cnn if "cnn" in spec else copy.deepcopy(vit).eval()
            step = Standard(maxup.ERM(TokenMix(teacher=teacher, model=model, per_sample=True, num_classes=10)), opt)
        else:
            step = M.build_step(spec, model=model, optimizer=opt, num_classes=10)
        return lambda: step(model, x, y, gen)

    specs = SPECS + TEACHERS
    cases = {spec: case(spec) for spec in specs}
    info = machine()
    print(machine_line(info))
    grid = 28 // args.patch
    print(f"ViT dim 64 x depth 4, 4 heads, patch {args.patch} ({grid}x{grid} tokens) on 1x28x28, batch {args.batch}, "
          f"AdamW; {args.repeats} rounds after {args.warmup} warm-up, cases interleaved, {args.clock} clock")
    times = interleaved(cases, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
    rows, out = [], {}
    for spec in specs:
        per_round = sorted(a / b for a, b in zip(times[spec], times["erm"]))
        r = ratio(times, spec, "erm")
        rows.append([spec, median(times[spec]) * 1e3, r, f"{per_round[0]:.2f}-{per_round[-1]:.2f}"])
        out[spec] = {"median_ms": median(times[spec]) * 1e3, "ratio_to_erm": r, "times_s": times[spec]}
    print(table(["method", "median ms", "x ERM (median)", "x ERM (range)"], rows))
    payload = {"machine": info, "batch": args.batch, "patch": args.patch, "repeats": args.repeats,
               "warmup": args.warmup, "clock": args.clock, "results": out}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
