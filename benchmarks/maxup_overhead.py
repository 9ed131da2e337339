"""Cost of a MaxUp step relative to an ERM step on the same model and batch (CPU by default).

For each m it reports, as ratios to t(ERM step) measured in the same rounds:

* the floor ``(m * t_nograd + t_erm) / t_erm``: m no-grad forwards of the batch plus one
  forward-backward-update (DESIGN.md, "MaxUp");
* MaxUp ``mode="select"`` with the library default ``select_batch_size`` and with the
  selection pass chunked at B, 2B and m*B rows;
* MaxUp ``mode="direct"`` (forward and backward through all m*B rows);
* the best select step divided by the floor (target: <= 1.10).

Run:  PYTHONPATH=src python benchmarks/maxup_overhead.py [--m 2 4 8] [--json out.json]
      add --breakdown for a per-part profile of one select step, --quick for a smoke run.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import maxup  # noqa: E402
from maxup.models import create_model  # noqa: E402
from maxup.objectives import frozen_buffers  # noqa: E402
from maxup.steps import Standard  # noqa: E402

AUGS = {
    "cutout": lambda: maxup.augment.Cutout(8, num_classes=10),
    "cutmix": lambda: maxup.augment.CutMix(1.0, per_sample=True, num_classes=10),
    "mixup": lambda: maxup.augment.Mixup(1.0, per_sample=True, num_classes=10),
    "gmix": lambda: maxup.augment.GMix(1.0, per_sample=True, num_classes=10),
    "noise": lambda: maxup.augment.GaussianNoise(0.1, num_classes=10),
}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--m", type=int, nargs="+", default=None, help="copies per sample (default 2 4 8; --quick: 2)")
    p.add_argument("--aug", choices=sorted(AUGS), default="cutout",
                   help="augmentation for ERM and MaxUp (default cutout)")
    p.add_argument("--depth", type=int, default=None, help="ResNet depth 6n+2 (default 20; --quick: 8)")
    p.add_argument("--width", type=int, default=16, help="ResNet width (default 16)")
    p.add_argument("--batch", type=int, default=None, help="batch size B (default 128; --quick: 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick: 1)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last memory format")
    p.add_argument("--breakdown", action="store_true", help="also time the parts of one select step")
    T.add_clock_option(p)
    p.add_argument("--quick", action="store_true", help="few small repeats, for a smoke test")
    p.add_argument("--json", default=None, help="write every number (and the raw per-round times) here")
    a = p.parse_args(argv)
    a.m = a.m or ([2] if a.quick else [2, 4, 8])
    a.batch = a.batch or (16 if a.quick else 128)
    a.depth = a.depth or (8 if a.quick else 20)
    a.threads = a.threads or (1 if a.quick else None)
    a.repeats = a.repeats or (2 if a.quick else 7)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    if any(m < 2 for m in a.m):
        p.error("--m values must be >= 2")
    return a


def setup(a):
    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=a.depth, width=a.width)
    x, y = torch.rand(a.batch, 1, 28, 28), torch.randint(0, 10, (a.batch,))
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    # a small lr keeps the weights (and so the work per step) stable across hundreds of steps
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, x, y, opt


def step_cases(a, model, x, y, opt):
    """name -> callable, and name -> (m, kind, rows per selection chunk or None)."""
    aug, b = AUGS[a.aug](), a.batch
    cases, meta = {}, {}

    erm = Standard(maxup.ERM(aug), opt)
    cases["erm"] = lambda: erm(model, x, y)

    def nograd():
        with torch.no_grad():
            model(x)

    cases["nograd_B"] = nograd
    for m in a.m:
        variants = {f"select_m{m}_default": None}
        for k in sorted({1, 2, m}):
            variants[f"select_m{m}_{k}B"] = k * b
        for name, sbs in variants.items():
            st = Standard(maxup.MaxUp(aug, m, mode="select", select_batch_size=sbs), opt)
            cases[name] = (lambda st=st: st(model, x, y))
            meta[name] = (m, "select", sbs)
        st = Standard(maxup.MaxUp(aug, m, mode="direct"), opt)
        cases[f"direct_m{m}"] = (lambda st=st: st(model, x, y))
        meta[f"direct_m{m}"] = (m, "direct", None)
    return cases, meta


def breakdown_cases(a, model, x, y, opt, m):
    """The parts of one select step, each timed on its own (same model and batch)."""
    aug, b = AUGS[a.aug](), a.batch
    by_copy = maxup.MaxUp(aug, m, mode="select", select_batch_size=b)
    at_once = maxup.MaxUp(aug, m, mode="select", select_batch_size=m * b)
    xs, ts = by_copy.candidates(x, y)
    pick, rows = torch.randint(0, m, (b,)), torch.arange(b)
    xc, tc = xs[pick, rows], ts[pick, rows]
    plain = Standard(maxup.ERM(None), opt)
    erm = Standard(maxup.ERM(aug), opt)

    def nograd():
        with torch.no_grad():
            model(x)

    def snapshot():
        with frozen_buffers(model):
            pass

    return {
        "ERM step (reference)": lambda: erm(model, x, y),
        "augment 1 copy (ERM's share)": lambda: aug(x, y),
        f"augment {m} copies + stack": lambda: by_copy.candidates(x, y),
        "snapshot/restore buffers": snapshot,
        "no-grad forward, B rows": nograd,
        f"selection pass, {m} chunks of B rows": lambda: by_copy._losses(model, xs, ts),
        f"selection pass, 1 chunk of {m}B rows": lambda: at_once._losses(model, xs, ts),
        "gather chosen copies": lambda: (xs[pick, rows], ts[pick, rows]),
        "forward+backward+SGD on B chosen rows": lambda: plain(model, xc, tc),
    }


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = T.machine()
    model, x, y, opt = setup(a)
    print(T.machine_line(info))
    print(f"model: resnet depth {a.depth} width {a.width}, input (1, 28, 28), batch {a.batch}, aug {a.aug}, "
          f"{'channels_last, ' if a.channels_last else ''}repeats {a.repeats} after {a.warmup} warm-up rounds, "
          f"{a.clock} clock")

    cases, meta = step_cases(a, model, x, y, opt)
    times = T.interleaved(cases, repeats=a.repeats, warmup=a.warmup, clock=a.clock)
    t_erm, t_ng = T.median(times["erm"]), T.median(times["nograd_B"])
    print(f"t(ERM step) = {t_erm * 1e3:.1f} ms, t(no-grad forward of B) = {t_ng * 1e3:.1f} ms "
          f"(ratio {T.ratio(times, 'nograd_B', 'erm'):.3f})\n")

    results, rows = [], []
    for m in a.m:
        floor_rounds = [m * n + e for n, e in zip(times["nograd_B"], times["erm"])]
        floor = T.median(f / e for f, e in zip(floor_rounds, times["erm"]))
        rec = {"m": m, "floor": floor}
        for name, (mm, kind, sbs) in meta.items():
            if mm != m:
                continue
            key = kind if kind == "direct" else ("select_default" if sbs is None else f"select_{sbs // a.batch}B")
            rec[key] = T.ratio(times, name, "erm")
            rec[key + "_vs_floor"] = T.median(t / f for t, f in zip(times[name], floor_rounds))
        best = min((k for k in rec if k.startswith("select") and not k.endswith("_vs_floor")), key=lambda k: rec[k])
        rec["best_select"] = best
        results.append(rec)
        rows.append([m, f"{floor:.2f}x", f"{rec['select_default']:.2f}x", f"{rec['select_1B']:.2f}x",
                     f"{rec['select_2B']:.2f}x", f"{rec[f'select_{m}B']:.2f}x", f"{rec['direct']:.2f}x",
                     f"{rec['select_default_vs_floor']:.2f}", f"{rec['select_1B_vs_floor']:.2f}"])
    print("Step time / ERM step time (median of per-round ratios); last two columns: select / floor")
    print(T.table(["m", "floor", "select (default)", "select B", "select 2B", "select mB", "direct",
                   "default/floor", "B-chunks/floor"], rows))

    out = {"machine": info, "args": vars(a), "t_erm_ms": t_erm * 1e3, "t_nograd_ms": t_ng * 1e3,
           "results": results, "times_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}

    if a.breakdown:
        m = 4 if 4 in a.m else a.m[0]
        parts = breakdown_cases(a, model, x, y, opt, m)
        pt = T.interleaved(parts, repeats=a.repeats, warmup=a.warmup, clock=a.clock)
        ref = "ERM step (reference)"
        print(f"\nParts of one select step (m={m}, selection chunks of B rows unless said), timed interleaved "
              f"with an ERM step; last column: median per-round ratio to it")
        print(T.table(["part", "ms", "/ t(ERM step)"],
                      [[k, f"{T.median(v) * 1e3:.2f}", f"{T.ratio(pt, k, ref):.3f}"] for k, v in pt.items()]))
        out["breakdown_ms"] = {k: T.median(v) * 1e3 for k, v in pt.items()}
        out["breakdown_vs_erm"] = {k: T.ratio(pt, k, ref) for k in pt}
    T.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
