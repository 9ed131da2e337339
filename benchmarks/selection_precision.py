"""How often MaxUp's selection pass picks another copy in bf16/fp16 than in fp32, on a trained model.

MaxUp's selection pass only needs each sample's argmax over its m copies, so it may run in
reduced precision (``MaxUp(..., select_amp="bf16")``) while training stays fp32. This trains
a model with ERM+CutMix, then at a few points of training draws m CutMix copies of every
training sample and compares the copy chosen from fp32 losses with the one chosen under
bf16 and fp16 autocast. Where they differ it reports the fp32 loss given up: the gap
between the fp32-worst copy and the reduced-precision pick (small gaps mean near-ties).

It also times the BatchNorm buffer snapshot of the selection pass: one ``clone`` per
buffer (before) against two fused ``_foreach_copy_`` calls (now).

Run:  PYTHONPATH=src python benchmarks/selection_precision.py [--dataset digits|fashion_mnist] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import maxup
from maxup.data import load_dataset
from maxup.models import create_model
from maxup.objectives import MaxUp, frozen_buffers


def agreement(model, data, m: int, amp: str, seed: int, batch: int = 256) -> dict:
    aug = maxup.augment.CutMix(num_classes=10, per_sample=True)
    g = torch.Generator().manual_seed(seed)
    same = total = 0
    gaps = []
    model.train()
    for i in range(0, len(data), batch):
        x, y = data.x[i:i + batch], data.y[i:i + batch]
        xs, ts = MaxUp(aug, m=m).candidates(x, y, g)
        full = MaxUp(aug, m=m)._losses(model, xs, ts)
        low = MaxUp(aug, m=m, select_amp=amp)._losses(model, xs, ts)
        pick_full, pick_low = full.argmax(0), low.argmax(0)
        differ = pick_full != pick_low
        same += int((~differ).sum())
        total += pick_full.numel()
        rows = torch.arange(full.shape[1])
        gap = (full[pick_full, rows] - full[pick_low, rows])[differ]
        gaps += gap.tolist()
    return {"agreement": same / total, "samples": total, "differ": total - same,
            "median_gap": statistics.median(gaps) if gaps else 0.0, "max_gap": max(gaps) if gaps else 0.0}


def snapshot_times(repeats: int = 50) -> dict:
    model = create_model("resnet", input_shape=(3, 32, 32), num_classes=10, depth=20)
    buffers = list(model.buffers())

    def clone_each():
        saved = [b.detach().clone() for b in buffers]
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)

    def fused():
        with frozen_buffers(model):
            pass

    out = {}
    for name, fn in (("clone_per_buffer", clone_each), ("foreach", fused)):
        for _ in range(5):
            fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name + "_us"] = 1e6 * (time.perf_counter() - t) / repeats
    out["buffers"] = len(buffers)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits", help="digits (bundled) or fashion_mnist (if installed)")
    p.add_argument("--train-size", type=int, default=None, help="training samples (default: all of digits, 5000 else)")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 5, 15], help="measure after these epochs")
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    size = a.train_size or (None if a.dataset == "digits" else 5000)
    splits = load_dataset(a.dataset, train_size=size, seed=a.seed)
    torch.manual_seed(a.seed)
    model = create_model("cnn", input_shape=splits.input_shape, num_classes=splits.num_classes)
    rows, done = [], 0
    for epochs in sorted(a.epochs):
        history = maxup.fit(model, "cutmix", train=splits.train, test=splits.test, epochs=epochs - done,
                            batch_size=128, device="cpu", progress=False, seed=a.seed + done,
                            num_classes=splits.num_classes)
        done = epochs
        for amp in ("bf16", "fp16"):
            r = agreement(model, splits.train, a.m, amp, seed=a.seed + epochs)
            r.update(epochs=epochs, amp=amp, test_accuracy=history[-1]["test_accuracy"])
            rows.append(r)
            print(f"epoch {epochs:3d}  {amp}  agreement {100 * r['agreement']:6.2f}%  ({r['differ']} of "
                  f"{r['samples']} differ; fp32-loss gap median {r['median_gap']:.4f}, max {r['max_gap']:.4f})  "
                  f"test acc {r['test_accuracy']:.3f}", flush=True)
    snap = snapshot_times()
    print(f"BatchNorm snapshot of ResNet-20 ({snap['buffers']} buffers), CPU: clone per buffer "
          f"{snap['clone_per_buffer_us']:.0f} us, fused foreach {snap['foreach_us']:.0f} us")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dataset": a.dataset, "m": a.m, "rows": rows, "snapshot": snap, "torch": torch.__version__},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
