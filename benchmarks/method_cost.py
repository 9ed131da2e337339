"""Step time of every registered method over the ERM step, measured in one run.

    PYTHONPATH=src python benchmarks/method_cost.py --threads 1 --clock cpu    # the figures in the method cards
    PYTHONPATH=src python benchmarks/method_cost.py --quick                     # a smoke run
    PYTHONPATH=src python benchmarks/method_cost.py --cases "cutout,maxup(m=4)+cutout"

Each case is a method spec built by ``maxup.methods.build_step`` exactly as ``maxup train`` builds
it, on its own copy of the model used in docs/RESULTS.md (the CIFAR-style ResNet, depth 8, on
1x28x28 inputs, batch 128, SGD). The language-model rows (``lm:...``) use the LSTM of ``maxup lm``
(dim 200, 2 layers, a 6,629-word vocabulary like the KJV corpus, batch 32 x 35 tokens, AdamW) and
are relative to that model's ERM step. Every augmentation is timed alone and under MaxUp with
m = 4. The cases run interleaved (one call of each per round, order rotated) and each ratio is
the median over rounds of (case time / ERM time in the same round): see benchmarks/_timing.py.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import add_clock_option, interleaved, machine, machine_line, median, ratio, table, write_json  # noqa: E402

from maxup import methods as M  # noqa: E402
from maxup.cli.options import methods_arg  # noqa: E402
from maxup.data import TensorData  # noqa: E402
from maxup.models import LSTMLanguageModel, create_model  # noqa: E402

LM_VOCAB, LM_BATCH, LM_BPTT = 6629, 32, 35
LM_AUGMENTS = [e.name for e in M.list_methods() if e.cls.domain == "sequence"]
EXTRA = ["maxup(m=4, temperature=0.5)+cutout", "maxup(m=4)+cutout+smooth",
         "gradaug(width_range=(0.8, 1.0), resolutions=(28, 24, 21))"]


def image_specs() -> list[str]:
    """erm, every image augmentation alone and under MaxUp(m=4), the extra compositions, every step."""
    entries = [e for e in M.list_methods() if e.name not in LM_AUGMENTS]
    augments = [e.name for e in entries if e.kind == "augment"]
    steps = [e.name for e in entries if e.kind == "step"]
    return ["erm"] + augments + [f"maxup(m=4)+{a}" for a in augments if M.REGISTRY[a].cls.random] + EXTRA + steps


def lm_specs() -> list[str]:
    return ["lm:erm"] + [f"lm:{a}" for a in LM_AUGMENTS] + [f"lm:maxup(m=4)+{a}" for a in LM_AUGMENTS]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=8, help="ResNet depth (6n+2; default 8, the model of docs/RESULTS.md)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 11; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; 1 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--cases", type=methods_arg, default=None,
                   help="comma-separated specs to time, 'lm:' before a language-model one (erm and lm:erm, the "
                        "denominators, are added)")
    p.add_argument("--no-lm", action="store_true", help="skip the language-model rows")
    p.add_argument("--quick", action="store_true", help="batch 32, LM batch 4, few repeats: a smoke run")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_clock_option(p)
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 11)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    batch, lm_batch = (32, 4) if args.quick else (args.batch, LM_BATCH)
    if args.threads:
        torch.set_num_threads(args.threads)

    specs = image_specs() + ([] if args.no_lm else lm_specs())
    if args.cases:
        lm = ["lm:erm"] if any(s.startswith("lm:") for s in args.cases) else []
        specs = list(dict.fromkeys(["erm"] + lm + args.cases))
    for spec in specs:  # a bad spec fails here with the parser's message, before any timing
        M.parse(spec.removeprefix("lm:"))

    torch.manual_seed(0)
    image_model = create_model("resnet", input_shape=(1, 28, 28), num_classes=10, depth=args.depth).train()
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    lm_model = LSTMLanguageModel(LM_VOCAB).train()
    ids = torch.randint(1, LM_VOCAB, (lm_batch, LM_BPTT + 1))
    tokens, next_tokens = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    gen = torch.Generator().manual_seed(0)

    def case(spec: str):
        lm = spec.startswith("lm:")
        model = copy.deepcopy(lm_model if lm else image_model)
        if lm:
            opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.01)
            inputs, targets, classes = tokens, next_tokens, LM_VOCAB
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
            inputs, targets, classes = x, y, 10
        step = M.build_step(spec.removeprefix("lm:"), model=model, optimizer=opt, num_classes=classes,
                            **({} if lm else {"train": TensorData(x, y)}))  # the terms that read the training set
        return lambda: step(model, inputs, targets, gen)

    cases = {}
    for spec in list(specs):
        try:
            cases[spec] = case(spec)
        except ValueError as err:  # a term this model cannot run (transmix needs a ViT): said, then skipped
            if args.cases:
                raise
            print(f"skipped {spec}: {err}")
            specs.remove(spec)
    info = machine()
    print(machine_line(info))
    print(f"image: resnet depth {args.depth} on 1x28x28, batch {batch}; lm: LSTM dim 200 x 2, vocab {LM_VOCAB}, "
          f"batch {lm_batch} x {LM_BPTT}; {repeats} rounds after {warmup} warm-up, cases interleaved, "
          f"{args.clock} clock")
    times = interleaved(cases, repeats=repeats, warmup=warmup, clock=args.clock)
    rows, out = [], {}
    for spec in specs:
        den = "lm:erm" if spec.startswith("lm:") else "erm"
        per_round = sorted(a / b for a, b in zip(times[spec], times[den]))
        r = ratio(times, spec, den)
        rows.append([spec, median(times[spec]) * 1e3, r, f"{per_round[0]:.2f}-{per_round[-1]:.2f}"])
        out[spec] = {"median_ms": median(times[spec]) * 1e3, "ratio_to_erm": r, "times_s": times[spec]}
    print(table(["method", "median ms", "x ERM (median)", "x ERM (range)"], rows))
    payload = {"machine": info, "depth": args.depth, "batch": batch, "lm_batch": lm_batch, "repeats": repeats,
               "warmup": warmup, "clock": args.clock, "results": out}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
