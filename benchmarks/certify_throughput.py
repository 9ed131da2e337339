"""Noise samples per second when certifying a ResNet on 28x28 inputs: maxup.certify beside a reference-style loop.

    PYTHONPATH=src python benchmarks/certify_throughput.py                  # ResNet-8, n = 10000, batch 1000
    PYTHONPATH=src python benchmarks/certify_throughput.py --quick          # a smoke run (n = 1000, batch 500)
    PYTHONPATH=src python benchmarks/certify_throughput.py --threads 1 --clock cpu   # on a busy shared machine
    PYTHONPATH=src python benchmarks/certify_throughput.py --device cuda --n 100000

One call of a case counts the base model's classes on n noisy copies of one image (what
CERTIFY does twice per test point, with n0 and n). The cases run interleaved in one
process on the same model and image (one call of each per round, order rotated); the
ratio is the median over rounds of (reference time / maxup time in the same round).

Rows:
  maxup       maxup.certify.sample_counts: noise drawn in chunks of NOISE_CHUNK rows straight into
              one reused buffer, scaled and shifted in place, counts kept on the device
  reference   the loop of Cohen et al.'s core.py: per batch x.repeat, randn_like(batch) * sigma,
              model(batch + noise).argmax(1), counts accumulated on the CPU with numpy bincount
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

from maxup.certify import sample_counts  # noqa: E402
from maxup.models import create_model  # noqa: E402


def reference_counts(model, x, num: int, sigma: float, batch_size: int, num_classes: int) -> np.ndarray:
    """Cohen et al.'s ``Smooth._sample_noise``, with numpy bincount for the counts (``x`` is (1, C, H, W))."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        for _ in range(math.ceil(num / batch_size)):
            this_batch_size = min(batch_size, num)
            num -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch, device=x.device) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8, help="ResNet depth 6n+2 (default 8, the model of docs/RESULTS.md)")
    p.add_argument("--width", type=int, default=16, help="ResNet width (default 16)")
    p.add_argument("--n", type=int, default=None, help="noise samples per call (default 10000; --quick: 1000)")
    p.add_argument("--batch", type=int, default=None, help="rows per forward pass (default 1000; --quick: 500)")
    p.add_argument("--sigma", type=float, default=0.25, help="noise level (default 0.25)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5; --quick: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    T.add_clock_option(p)
    p.add_argument("--quick", action="store_true", help="n = 1000, batch 500, two rounds: a smoke run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    a.n = a.n or (1000 if a.quick else 10_000)
    a.batch = a.batch or (500 if a.quick else 1000)
    a.repeats = a.repeats or (2 if a.quick else 5)
    a.warmup = a.warmup if a.warmup is not None else 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=a.depth, width=a.width).to(device)
    model.eval()
    x = torch.rand(1, 28, 28, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ours():
        sample_counts(model, x, a.n, a.sigma, num_classes=10, batch_size=a.batch, generator=gen)

    def reference():
        reference_counts(model, x[None], a.n, a.sigma, a.batch, 10)
        sync()

    cases = {"maxup": ours, "reference": reference}
    info = T.machine()
    print(T.machine_line(info))
    print(f"model: resnet depth {a.depth} width {a.width} on 1x28x28, eval mode, device {device}; "
          f"n {a.n} noise samples per call, batch {a.batch}, sigma {a.sigma}; "
          f"{a.repeats} rounds after {a.warmup} warm-up, cases interleaved, {a.clock} clock")
    times = T.interleaved(cases, repeats=a.repeats, warmup=a.warmup, clock=a.clock)
    rows, out = [], {}
    for name in cases:
        rates = [a.n / t for t in times[name]]
        lo, hi = T.spread(rates)
        rows.append([name, f"{T.median(rates):,.0f}", f"{lo:,.0f}-{hi:,.0f}", T.median(times[name]) * 1e3])
        out[name] = {"samples_per_s": T.median(rates), "median_ms_per_call": T.median(times[name]) * 1e3,
                     "times_s": times[name]}
    print(T.table(["case", "samples/s (median)", "samples/s (IQR)", "ms per call"], rows))
    speedup = T.ratio(times, "reference", "maxup")
    print(f"maxup / reference throughput (median of per-round ratios): {speedup:.2f}x")
    payload = {"machine": info, "args": vars(a), "results": out, "speedup": speedup}
    T.write_json(a.json, payload)
    return payload


if __name__ == "__main__":
    main()
