"""Host reads per training step, for every registered method (and the compositions the issue names).

A host read (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``, boolean-mask indexing,
``unique``, ...) makes the host wait for the device on a GPU; on a CPU it costs nothing
and is invisible. :class:`maxup.train.syncs.HostSyncCounter` counts them through a
``TorchDispatchMode``, so this runs on any machine. For each spec it prints:

* ``step``: reads per call of the training step (after one warm-up call, which may check
  its inputs once), on a small CNN and 8x8 images (token specs: the LSTM language model);
* ``loop``: reads per step of the whole Trainer loop (step, loss bookkeeping, non-finite
  check, progress bar), taken as the difference between one epoch of 2S steps and one
  of S steps, so the epoch's own work (evaluation, metrics) cancels;
* ``made``: tensors built from Python data per step (blocking host-to-device copies on a GPU
  when built for the device).

Run:  PYTHONPATH=src python benchmarks/host_syncs.py [--specs erm 'maxup(m=4)+cutmix'] [--where] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from maxup import methods as M
from maxup.data import TensorData
from maxup.models import LSTMLanguageModel, SmallCNN
from maxup.train import Trainer
from maxup.train.syncs import HostSyncCounter, count_step_syncs

LM_AUGMENTS = [e.name for e in M.list_methods() if e.cls.domain == "sequence"]

#: the specs the issue requires to make no host read (steps and Trainer loop)
ZERO = ["erm", "cutout", "cutmix", "mixup(alpha=0.4)", "gaussian", "cropflip", "maxup(m=4)+cutout",
        "maxup(m=4)+cutmix", "maxup(m=4)+cropflip+mixup(alpha=0.2)", "sam", "sam+maxup(m=4)+cutmix", "sam_mixup",
        "gradaug", "manifold_mixup"]


def all_specs() -> list[str]:
    """The required specs, then one spec per registered term not yet covered."""
    specs = list(ZERO)
    named = {t.name for s in specs for t in M.parse(s)}
    for entry in M.list_methods():
        if entry.name in named:
            continue
        if entry.name in LM_AUGMENTS:
            specs.append(entry.name if entry.name != "embed_noise" else "embed_noise(sigma=0.1)")
        elif entry.kind == "augment":
            specs.append(entry.name)
        elif entry.name == "maxup":
            specs.append("maxup(m=4)+cutout")
        else:
            specs.append(entry.name)
    specs += ["maxup(m=4)+manifold_mixup", "sam+gradaug", "maxup(m=4)+embed_noise(sigma=0.1)"]
    return list(dict.fromkeys(specs))


def is_token_spec(spec: str) -> bool:
    return any(t.name in LM_AUGMENTS for t in M.parse(spec))


def setup(spec: str, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if is_token_spec(spec):
        model, classes = LSTMLanguageModel(20, dim=8, layers=1, dropout=0.0), 20
        ids = torch.randint(1, 20, (batch, 9), generator=g)
        x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    else:
        model, classes = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8)), 10
        x, y = torch.rand(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = M.build_step(spec, model=model, optimizer=opt, num_classes=classes)
    return model, step, x, y, classes


def step_reads(spec: str, batch: int = 16, steps: int = 2) -> tuple[float, float, HostSyncCounter]:
    model, step, x, y, _ = setup(spec, batch)
    generator = torch.Generator().manual_seed(1)
    counter = count_step_syncs(step, model, x, y, generator, steps=steps)
    return counter.reads / steps, counter.made / steps, counter


def _epoch_reads(spec: str, n_steps: int, batch: int) -> int:
    model, step, x, y, classes = setup(spec, batch * n_steps)
    trainer = Trainer(model, step, TensorData(x, y), epochs=1, batch_size=batch, num_classes=classes, device="cpu",
                      progress=False)
    counter = HostSyncCounter(locate=False)
    with counter:
        trainer.fit()
    return counter.reads


def loop_reads(spec: str, batch: int = 16, s: int = 4) -> float:
    return (_epoch_reads(spec, 2 * s, batch) - _epoch_reads(spec, s, batch)) / s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--specs", nargs="+", default=None, help="method specs (default: every registered method)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--no-loop", action="store_true", help="skip the Trainer-loop figure (faster)")
    p.add_argument("--where", action="store_true", help="list where each read happens")
    p.add_argument("--json", default=None, help="write the counts here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    specs = a.specs or all_specs()
    rows = []
    print(f"{'method':44s} {'step':>6s} {'loop':>6s} {'made':>6s}")
    for spec in specs:
        reads, made, counter = step_reads(spec, a.batch)
        loop = float("nan") if a.no_loop else loop_reads(spec, a.batch)
        rows.append({"method": spec, "step_reads": reads, "loop_reads": loop, "made": made,
                     "required_zero": spec in ZERO})
        print(f"{spec:44s} {reads:6.1f} {loop:6.2f} {made:6.1f}")
        if a.where and counter.where:
            print("    " + counter.report().replace("\n", "\n    "))
        sys.stdout.flush()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "batch": a.batch, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
