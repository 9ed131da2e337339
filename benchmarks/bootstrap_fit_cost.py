"""The per-epoch work of ``bootstrap`` (the eval-mode losses of the training set and the Beta-mixture fit) over
one ERM epoch on the same data, measured in one run (interleaved rounds).

The step's per-batch cost is in ``benchmarks/method_cost.py``; this is the rest: after every epoch past the warm-up,
:meth:`maxup.steps.Bootstrap.on_epoch_end` forwards the whole training set once without gradients and fits the
mixture (10 EM iterations on the losses). The ratio is that work over one epoch of ERM steps.

    python benchmarks/bootstrap_fit_cost.py --threads 1 --clock cpu
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_clock_option, interleaved, machine_line, median, ratio, table  # noqa: E402

from maxup import methods as M  # noqa: E402
from maxup.data import TensorData  # noqa: E402
from maxup.models import create_model  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8, help="ResNet depth (6n+2; default 8)")
    p.add_argument("--samples", type=int, default=1280, help="training samples (one epoch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    add_clock_option(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=args.depth).train()
    data = TensorData(torch.rand(args.samples, 1, 28, 28), torch.randint(0, 10, (args.samples,)))
    gen = torch.Generator().manual_seed(0)

    def build(spec):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return net, M.build_step(spec, model=net, optimizer=opt, num_classes=10)

    erm_net, erm = build("erm")
    boot_net, boot = build("bootstrap(warmup_epochs=0)")

    def erm_epoch():
        for start in range(0, args.samples, args.batch):
            erm(erm_net, data.x[start:start + args.batch], data.y[start:start + args.batch], gen)

    times = interleaved({"erm epoch": erm_epoch, "bootstrap epoch end": lambda: boot.on_epoch_end(
        boot_net, data, epoch=1)}, repeats=args.repeats, warmup=args.warmup, clock=args.clock)
    print(machine_line())
    print(f"resnet depth {args.depth} on 1x28x28, {args.samples} samples, batch {args.batch}; {args.repeats} rounds "
          f"after {args.warmup} warm-up, {args.clock} clock")
    rows = [[name, median(t) * 1e3, ratio(times, name, "erm epoch")] for name, t in times.items()]
    print(table(["work", "median ms", "x ERM epoch"], rows))
    return {"times_s": times}


if __name__ == "__main__":
    main()
