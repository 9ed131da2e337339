"""The GPU check: one short run that says whether maxup's training step is GPU-grade, with figures.

Sections (each runs on its own; a failure is recorded and the next section runs):

1. ``environment``: torch, CUDA, the device, TF32 settings.
2. ``pytest_gpu``: the tests marked ``gpu`` (``pytest -m gpu tests``): device generators, no
   synchronisation in the step (``torch.cuda.set_sync_debug_mode("error")``), compile on CUDA.
3. ``syncs``: per method, the synchronising CUDA calls of two training steps counted with
   ``set_sync_debug_mode("warn")`` (off CUDA: host reads counted by
   :class:`maxup.train.syncs.HostSyncCounter`); a method required to make none that makes one fails.
4. ``step_time``: ERM, MaxUp(m=4)+CutMix, SAM and GradAug on a synthetic batch (3x32x32 by default),
   plain fp32 (TF32), bf16 autocast, ``torch.compile`` and compile+bf16: median step time, the ratio
   to ERM in the same variant, images/s, peak memory, and sync warnings per step (two untimed steps).
5. ``selection``: how often MaxUp's bf16 selection pass picks another copy than the fp32 one.
6. ``digits``: a few epochs of each method on the bundled digits (no download) through
   ``maxup.fit``, plain and with compile+bf16: accuracy and samples/s.

Everything is printed, and written to ``OUT/gpu_check.json`` (``--out``, default ``gpu_check_out``)
even when a section fails; the exit status is non-zero when any section failed.

Run (sized for under 3 minutes on an H200; --quick on two CPU cores: 25 s quiet, about 2 minutes busy):
    PYTHONPATH=src python benchmarks/gpu_check.py
    PYTHONPATH=src python benchmarks/gpu_check.py --device cpu --quick      # every section, small, on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import maxup  # noqa: E402
from maxup import methods as M  # noqa: E402
from maxup.data import load_dataset  # noqa: E402
from maxup.functional._random import DeviceGenerator  # noqa: E402
from maxup.models import create_model  # noqa: E402
from maxup.objectives import MaxUp  # noqa: E402
from maxup.train.speed import compile_model, configure_backends  # noqa: E402
from maxup.train.syncs import HostSyncCounter  # noqa: E402

METHODS = {"erm": "erm", "maxup4_cutmix": "maxup(m=4)+cutmix", "sam": "sam", "gradaug": "gradaug"}
ZERO = ["erm", "cutout", "cutmix", "mixup(alpha=0.4)", "gaussian", "cropflip", "maxup(m=4)+cutout",
        "maxup(m=4)+cutmix", "maxup(m=4)+cropflip+mixup(alpha=0.2)", "sam", "sam+maxup(m=4)+cutmix", "sam_mixup",
        "gradaug", "manifold_mixup"]
EXTRA = ["asam", "bgmix", "dgmix", "gmix", "hmix", "resizemix", "lumix", "smooth", "soft_augment",
         "maxup(m=4)+manifold_mixup", "sam+gradaug"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda",
                   help="cuda (default) or cpu (with --quick: a smoke run of every section)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CPU smoke test)")
    p.add_argument("--out", default="gpu_check_out", help="directory for gpu_check.json (default gpu_check_out)")
    p.add_argument("--model", default="cnn", help="model for the step timings (default cnn; e.g. resnet)")
    p.add_argument("--batch", type=int, default=None, help="batch size of the step timings (default 256; quick 16)")
    p.add_argument("--size", type=int, default=None, help="image side of the step timings (default 32; quick 8)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="digits epochs per run (default 2; quick 1)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; quick on CPU: eager)")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    a = p.parse_args(argv)
    a.batch = a.batch or (16 if a.quick else 256)
    a.size = a.size or (8 if a.quick else 32)
    a.steps = a.steps or (2 if a.quick else 20)
    a.epochs = a.epochs or (1 if a.quick else 2)
    a.train_size = 256 if a.quick else None  # digits samples for the selection and digits sections
    a.backend = a.backend or ("eager" if a.quick and a.device == "cpu" else "inductor")
    return a


def is_cuda(args) -> bool:
    return torch.device(args.device).type == "cuda"


def sync(args) -> None:
    if is_cuda(args):
        torch.cuda.synchronize()


@contextlib.contextmanager
def sync_warnings(args, counts: list):
    """Count synchronising CUDA calls inside the block (appends the count to ``counts``)."""
    if not is_cuda(args):
        with HostSyncCounter(locate=False) as counter:
            yield
        counts.append(counter.reads)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))


# ------------------------------------------------------------------------------------------ sections


def environment(args) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "cuda_available": torch.cuda.is_available(), "quick": args.quick, "compile_backend": args.backend}
    if is_cuda(args):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available (use --device cpu --quick for a smoke run)")
        props = torch.cuda.get_device_properties(torch.device(args.device))
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        info["backends"] = configure_backends(args.device, tf32=True)
    return info


def pytest_gpu(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(ROOT / "tests")]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
    print("\n".join("    " + line for line in tail))
    if run.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest -m gpu exited with {run.returncode}")
    return {"returncode": run.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - start}


def _setup(spec, args, *, batch, size, channels=3, model="cnn", amp=None, compile=False):
    torch.manual_seed(0)
    net = create_model(model, input_shape=(channels, size, size), num_classes=10).to(args.device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    step = M.build_step(spec, model=net, optimizer=opt, num_classes=10, **({"amp": amp} if amp else {}))
    runner = compile_model(net, backend=args.backend) if compile else net
    if is_cuda(args):  # as the Trainer sets it: no cuDNN autotuning for steps whose shapes change (GradAug)
        torch.backends.cudnn.benchmark = getattr(step, "fixed_shapes", True)
    g = DeviceGenerator(args.device, seed=0, host_seed=1)
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(1)).to(args.device)
    return runner, step, x, y, g


def syncs(args) -> dict:
    out, bad = {}, []
    for spec in ZERO + ([] if args.quick else EXTRA):
        model, step, x, y, g = _setup(spec, args, batch=min(args.batch, 32), size=args.size)
        step(model, x, y, g)  # the first call checks the labels once
        sync(args)
        counts = []
        with sync_warnings(args, counts):
            for _ in range(2):
                step(model, x, y, g)
        sync(args)
        out[spec] = counts[0] / 2
        print(f"    {spec:40s} {out[spec]:5.1f} per step" + ("  (required: 0)" if spec in ZERO else ""))
        if spec in ZERO and counts[0]:
            bad.append(spec)
    if bad:
        raise RuntimeError(f"synchronising calls in steps required to make none: {bad}")
    return {"per_step": out, "unit": "sync warnings" if is_cuda(args) else "host reads (CPU count)"}


def _time_case(spec, args, amp, compile):
    model, step, x, y, g = _setup(spec, args, batch=args.batch, size=args.size, model=args.model, amp=amp,
                                  compile=compile)
    if is_cuda(args):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(1 if args.quick else 3):  # warm-up (compiles)
        step(model, x, y, g)
    sync(args)
    times, counts = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(model, x, y, g)
        sync(args)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if is_cuda(args) else float("nan")
    with sync_warnings(args, counts):  # two more steps, untimed, with no synchronize of the timer's own
        for _ in range(2):
            step(model, x, y, g)
    sync(args)
    return statistics.median(times), counts[0] / 2, peak


def step_time(args) -> dict:
    variants = {"fp32": (None, False), "bf16": ("bf16", False), "compile": (None, True),
                "compile_bf16": ("bf16", True)}
    rows, failed = [], []
    for vname, (amp, compile) in variants.items():
        base = None
        for mname, spec in METHODS.items():
            try:
                t, warns, peak = _time_case(spec, args, amp, compile)
            except Exception as err:  # noqa: BLE001 -- record, go on
                failed.append(f"{mname}/{vname}: {type(err).__name__}: {err}")
                print(f"    {mname:14s} {vname:13s} FAILED {type(err).__name__}: {str(err)[:200]}")
                continue
            base = t if mname == "erm" else base
            row = {"method": spec, "variant": vname, "step_ms": 1000 * t,
                   "ratio_vs_erm": t / base if base else float("nan"), "images_per_s": args.batch / t,
                   "peak_mib": peak, "sync_warnings": warns}
            rows.append(row)
            print(f"    {mname:14s} {vname:13s} {row['step_ms']:8.2f} ms  x{row['ratio_vs_erm']:5.2f} vs erm  "
                  f"{row['images_per_s']:9.0f} img/s  peak {peak:8.1f} MiB  syncs {warns}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return {"batch": args.batch, "size": args.size, "model": args.model, "rows": rows}


def selection(args) -> dict:
    """Train a model briefly, then compare MaxUp's bf16 selection with the fp32 one on many batches."""
    data = load_dataset("digits", train_size=args.train_size).train
    torch.manual_seed(0)
    net = create_model("cnn", input_shape=tuple(data.x.shape[1:]), num_classes=10)
    maxup.fit(net, "cutmix", train=data, epochs=1 if args.quick else 5, batch_size=64, device=args.device,
              progress=False, num_classes=10, seed=0)
    net.train()
    x, y = data.x.to(args.device), data.y.to(args.device)
    aug = maxup.augment.CutMix(num_classes=10, per_sample=True)
    same = total = 0
    g = DeviceGenerator(args.device, seed=5)
    for i in range(0, len(x) - 127, 128):
        xs, ts = MaxUp(aug, m=4).candidates(x[i:i + 128], y[i:i + 128], g)
        full = MaxUp(aug, m=4)._losses(net, xs, ts).argmax(0)
        low = MaxUp(aug, m=4, select_amp="bf16")._losses(net, xs, ts).argmax(0)
        same += int((full == low).sum())
        total += full.numel()
    agreement = same / max(total, 1)
    print(f"    bf16 selection picks the fp32 copy for {100 * agreement:.2f}% of {total} samples")
    return {"agreement": agreement, "samples": total}


def digits(args) -> dict:
    data = load_dataset("digits", train_size=args.train_size)
    rows = []
    for vname, (amp, compile) in {"fp32": (None, False), "compile_bf16": ("bf16", args.backend)}.items():
        for mname, spec in METHODS.items():
            torch.manual_seed(0)
            net = create_model("cnn", input_shape=data.input_shape, num_classes=10)
            start = time.perf_counter()
            history = maxup.fit(net, spec, train=data.train, test=data.test, epochs=args.epochs, batch_size=128,
                                device=args.device, progress=False, num_classes=10, seed=0, amp=amp,
                                compile=compile)
            last = history[-1]
            row = {"method": spec, "variant": vname, "test_accuracy": last["test_accuracy"],
                   "samples_per_s": statistics.median(r["samples_per_s"] for r in history),
                   "seconds": time.perf_counter() - start}
            rows.append(row)
            print(f"    {mname:14s} {vname:13s} test acc {row['test_accuracy']:.3f}  "
                  f"{row['samples_per_s']:9.0f} samples/s  {row['seconds']:6.1f} s")
    return {"epochs": args.epochs, "rows": rows}


SECTIONS = [("environment", environment), ("pytest_gpu", pytest_gpu), ("syncs", syncs), ("step_time", step_time),
            ("selection", selection), ("digits", digits)]


def main(argv=None) -> int:
    args = parse(argv)
    for name in ("recompile_limit", "cache_size_limit"):  # many models of one class compile in one process
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "sections": {}, "failed": []}
    start = time.perf_counter()
    for name, section in SECTIONS:
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            result = section(args)
            report["sections"][name] = {"ok": True, **result}
        except Exception as err:  # noqa: BLE001 -- every section runs; the exit status says what failed
            traceback.print_exc()
            report["sections"][name] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            report["failed"].append(name)
        report["sections"][name]["seconds"] = time.perf_counter() - t
        print(f"   ({report['sections'][name]['seconds']:.1f} s)", flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - start
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    status = "FAILED: " + ", ".join(report["failed"]) if report["failed"] else "all sections passed"
    print(f"\n{status} in {report['seconds']:.0f} s; figures in {out_dir / 'gpu_check.json'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
