"""Images per second of the batch augmentations in maxup.augment (and kornia's, when installed).

Every augmentation is called as a module on the same float batch (default 256x3x32x32)
with integer labels (num_classes=10), so the label handling (one-hot, mixed soft
targets) is in the time, as it is in training. All cases run interleaved in one run;
each sample is the mean of ``--inner`` back-to-back calls; the table gives the median
over ``--repeats`` samples after ``--warmup`` rounds. ``x.clone()`` is the memory
floor: one read and one write of the batch.

Run:  PYTHONPATH=src python benchmarks/augment_throughput.py [--json out.json] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

import maxup.augment as A  # noqa: E402

TARGET = 300_000  # images/s for per-sample Mixup and CutMix on two CPU cores (the issue)


def ours(num_classes: int) -> dict:
    c = num_classes
    return {
        "maxup Mixup (per sample)": A.Mixup(1.0, per_sample=True, num_classes=c),
        "maxup CutMix (per sample)": A.CutMix(1.0, per_sample=True, num_classes=c),
        "maxup GMix (per sample)": A.GMix(1.0, per_sample=True, num_classes=c),
        "maxup HMix (per sample)": A.HMix(1.0, per_sample=True, num_classes=c),
        "maxup ResizeMix (per sample)": A.ResizeMix(per_sample=True, num_classes=c),
        "maxup Mixup (per batch)": A.Mixup(1.0, num_classes=c),
        "maxup CutMix (per batch)": A.CutMix(1.0, num_classes=c),
        "maxup Mixup alpha=0.4 (per sample)": A.Mixup(0.4, per_sample=True, num_classes=c),
        "maxup Cutout 8x8": A.Cutout(8, num_classes=c),
        "maxup RandomCropFlip pad 4": A.RandomCropFlip(4, num_classes=c),
    }


def kornia_cases() -> dict:
    """kornia's RandomMixUpV2 / RandomCutMixV2 with data_keys=["input", "class"]: (images, labels) in,
    [images, (B, 3) or (1, B, 3) label-pair-lambda params] out (per-sample lambdas and boxes)."""
    try:
        import kornia
        import kornia.augmentation as K
    except ImportError:
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mix = K.RandomMixUpV2(data_keys=["input", "class"])
        try:
            cut = K.RandomCutMixV2(data_keys=["input", "class"], use_correct_lambda=True)
        except TypeError:  # older kornia
            cut = K.RandomCutMixV2(data_keys=["input", "class"])
    return {f"kornia {kornia.__version__} RandomMixUpV2": mix, f"kornia {kornia.__version__} RandomCutMixV2": cut}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 15; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; --quick: 1)")
    p.add_argument("--inner", type=int, default=None, help="calls per timed sample (default 20; --quick: 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; --quick: 1)")
    p.add_argument("--no-kornia", action="store_true", help="skip kornia even when it is installed")
    T.add_clock_option(p)
    p.add_argument("--quick", action="store_true", help="few repeats, for a smoke test")
    p.add_argument("--json", default=None, help="write the numbers (and raw samples) here")
    a = p.parse_args(argv)
    a.threads = a.threads or (1 if a.quick else None)
    a.repeats = a.repeats or (2 if a.quick else 15)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.inner = a.inner or (2 if a.quick else 20)
    return a


def main(argv=None):
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = T.machine()
    torch.manual_seed(0)
    x = torch.rand(a.batch, a.channels, a.size, a.size)
    y = torch.randint(0, a.num_classes, (a.batch,))
    augs = ours(a.num_classes)
    if not a.no_kornia:
        augs.update(kornia_cases())
    cases = {name: (lambda aug=aug: aug(x, y)) for name, aug in augs.items()}
    cases["x.clone() (memory floor)"] = lambda: x.clone()

    print(T.machine_line(info))
    print(f"batch {a.batch}x{a.channels}x{a.size}x{a.size} float32, integer labels ({a.num_classes} classes), "
          f"{a.repeats} samples of {a.inner} calls after {a.warmup} warm-up rounds, {a.clock} clock")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times = T.interleaved(cases, repeats=a.repeats, warmup=a.warmup, inner=a.inner, clock=a.clock)

    ref = "maxup Mixup (per sample)"
    rows, results = [], {}
    for name, ts in times.items():
        med = T.median(ts)
        lo, hi = T.spread(ts)
        ips = a.batch / med
        results[name] = {"ms_per_batch": med * 1e3, "images_per_s": ips,
                         "iqr_images_per_s": [a.batch / hi, a.batch / lo],
                         "time_vs_maxup_mixup": T.ratio(times, name, ref)}
        target = "yes" if ips >= TARGET else "no"
        rows.append([name, f"{med * 1e3:.3f}", f"{ips:,.0f}", f"{a.batch / hi:,.0f}-{a.batch / lo:,.0f}",
                     f"{T.ratio(times, name, ref):.2f}", target if "per sample)" in name and "alpha" not in name
                     and ("Mixup" in name or "CutMix" in name) else ""])
    print(T.table(["augmentation", "ms/batch", "images/s", "IQR images/s", "time / maxup Mixup", f">= {TARGET:,}?"],
                  rows))
    T.write_json(a.json, {"machine": info, "args": vars(a), "results": results,
                          "samples_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}})
    return results


if __name__ == "__main__":
    main()
