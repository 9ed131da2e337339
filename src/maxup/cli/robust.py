"""``maxup robust``: PGD robust accuracy of trained runs at several radii (:func:`maxup.robust.robust_accuracy`).

Each run directory (written by ``maxup train``) gives its config and final ``model.pt``; the
test split is rebuilt as in training (:func:`maxup.cli.certify.load_run`). The attack works in
[0, 1] pixel units whatever the run's normalisation: a run trained on standardised inputs is
attacked through its normalisation (:class:`maxup.robust.Standardized`), so every ``--eps`` is a
distance between images in [0, 1] and the runs of one table are comparable.

Each (run, radius) result is appended to ``--out/points/<run>.jsonl`` as soon as it is done, so
``--resume`` continues an interrupted evaluation where it stopped. The command writes
``robust.md`` (the table), ``robust.json`` and ``robust.png`` (accuracy against eps, one line per run).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..functional.attacks import NORMS, check_attack
from ..robust import Standardized, robust_accuracy, to_pixels
from ..train.checkpoint import atomic_write_text
from ..train.distributed import resolve_device
from .certify import load_run, point_logs, radii_list, read_points, read_run, write_points
from .options import POSITIVE, POSITIVE_INT, add_evaluation_options

DEFAULT_EPS = "0.05,0.1,0.2"


def eps_arg(text: str) -> list[float]:
    """``--eps``: comma-separated radii >= 0, such as ``0.05,0.1,0.2`` (sorted, duplicates dropped)."""
    values = radii_list(text, DEFAULT_EPS)
    if not values or any(not (v >= 0 and v < float("inf")) for v in values):
        raise argparse.ArgumentTypeError(f"radii must be finite numbers >= 0, got {text!r}")
    return values


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("robust", help="PGD robust accuracy of trained runs at several radii",
                       description="Attack the first --limit test examples of each run with PGD (Madry et al. 2018) "
                                   "at each radius of --eps, in [0, 1] pixel units, the model in eval mode; print "
                                   "clean and robust accuracy and write robust.md, robust.json and robust.png into "
                                   "--out.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by maxup train")
    p.add_argument("--eps", type=eps_arg, default=eps_arg(DEFAULT_EPS),
                   help=f"comma-separated radii in [0, 1] pixel units (default: {DEFAULT_EPS})")
    p.add_argument("--norm", choices=NORMS, default="linf", help="the threat model (default: linf)")
    p.add_argument("--steps", type=POSITIVE_INT, default=10, help="PGD steps (default: 10)")
    p.add_argument("--step-size", type=POSITIVE, default=None,
                   help="length of each PGD step (default: 2.5 * eps / steps at each radius)")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start each attack uniformly in the ball (default: yes)")
    p.add_argument("--weights", choices=("model", "ema", "swa"), default="model",
                   help="attack the trained weights (model.pt, default) or the run's EMA / SWA average (a run "
                        "trained with a '+ema' or '+swa' method term)")
    p.add_argument("--limit", type=POSITIVE_INT, default=1000, help="attack the first N test examples (default: 1000)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=500,
                   help="examples attacked at once; the random starts depend on it (default: 500)")
    add_evaluation_options(p, seed="seed of the random starts", out="runs/robust", done="radii evaluated")
    p.set_defaults(func=robust)
    return p


# ------------------------------------------------------------------------------------------ output


def _eps_label(eps: float) -> str:
    return f"eps={eps:g}"


def table(rows: list[dict], eps_list: list[float]) -> str:
    """The markdown table: one row per run, clean accuracy and robust accuracy (%) at each radius."""
    head = ["run", "method", "clean", *(_eps_label(e) for e in eps_list), "s/example"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        accs = [f"{100 * a:.1f}" for a in row["robust_accuracy"]]
        lines.append(f"| {row['run']} | {row['method']} | {100 * row['clean_accuracy']:.1f} | " + " | ".join(accs)
                     + f" | {row['seconds_per_example']:.3g} |")
    return "\n".join(lines)


def plot(rows: list[dict], eps_list: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        xs, ys = [0.0], [100 * row["clean_accuracy"]]
        for e, a in zip(eps_list, row["robust_accuracy"]):
            if e > 0:
                xs.append(e)
                ys.append(100 * a)
        ax.plot(xs, ys, marker="o", label=f"{row['run']}: {row['method']}")
    ax.set_xlabel("eps ([0, 1] pixel units)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ command


def robust(args) -> list[dict]:
    """Run ``maxup robust`` on parsed arguments (see :func:`add_parser`); returns one dict per run."""
    runs = [Path(r) for r in args.runs]
    if len({r.resolve() for r in runs}) != len(runs):
        raise ValueError("a run directory is listed twice")
    for eps in args.eps:  # the attack's options, checked before any run is loaded
        check_attack(eps, args.norm, args.steps, args.step_size, args.random_start)
    configs = [read_run(r) for r in runs]  # every run checked before any is attacked
    out = Path(args.out)
    logs = point_logs(args, runs, what="robustness results", result="robust.json")
    device = resolve_device(args.device, name="--device")
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    attack = {"norm": args.norm, "steps": args.steps, "step_size": args.step_size, "random_start": args.random_start}
    rows = []
    for run, config, log in zip(runs, configs, logs):
        header = {"run": str(run), **attack, "limit": args.limit, "batch_size": args.batch_size, "seed": args.seed,
                  **({"weights": args.weights} if args.weights != "model" else {})}
        records = read_points(log, header) if args.resume else []
        log.parent.mkdir(parents=True, exist_ok=True)
        write_points(log, header, records)  # drops a line cut short by an interruption
        done = {r["eps"]: r for r in records}
        todo = [e for e in args.eps if e not in done]
        splits, model = load_run(run, config, device=device, data_dir=args.data_dir, weights=args.weights)
        test = splits.test
        n = min(args.limit, len(test))
        test = type(test)(test.x[:n], test.y[:n])
        if splits.std is not None:  # attack in [0, 1] pixels, through the run's normalisation
            model, test = Standardized(model, splits.mean, splits.std).to(device), to_pixels(test, splits.mean,
                                                                                            splits.std)
        bar = None
        if show and todo:
            from tqdm import tqdm

            bar = tqdm(total=n * len(todo), desc=f"robust {run}", unit="example", file=sys.stderr, dynamic_ncols=True)
        try:
            with open(log, "a", encoding="utf-8") as f:
                for eps in todo:
                    start = time.perf_counter()
                    result, = robust_accuracy(model, test, eps_list=[eps], **attack, batch_size=args.batch_size,
                                              device=device, seed=args.seed,
                                              progress=bar.update if bar is not None else None)
                    record = {"index": len(records), **result, "seconds": time.perf_counter() - start}
                    records.append(record)
                    done[eps] = record
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    if bar is not None:
                        bar.set_postfix(eps=f"{eps:g}", robust=f"{record['robust_accuracy']:.3f}", refresh=False)
                    else:
                        print(f"{run}: eps {eps:g}: robust accuracy {100 * record['robust_accuracy']:.1f}% over "
                              f"{n} examples", file=sys.stderr, flush=True)
        finally:
            if bar is not None:
                bar.close()
        chosen = [done[e] for e in args.eps]
        attacked = [r for r in chosen if r["eps"] > 0]
        rows.append({
            "run": str(run), "method": config["method"], "dataset": config["dataset"], "points": n,
            "input_space": "[0, 1] pixels" + (" (attacked through the run's normalisation)"
                                              if splits.std is not None else ""),
            "clean_accuracy": chosen[0]["clean_accuracy"], "eps": list(args.eps),
            "robust_accuracy": [r["robust_accuracy"] for r in chosen],
            "seconds_per_example": sum(r["seconds"] for r in attacked) / max(1, n * len(attacked)),
            "records": chosen,
        })
        del splits, model

    step = "2.5 eps / steps" if args.step_size is None else f"{args.step_size:g}"
    setting = (f"PGD {args.norm}, {args.steps} steps of {step}, "
               f"{'random start' if args.random_start else 'no random start'}, seed {args.seed}; model in eval mode; "
               f"first {min(r['points'] for r in rows)} test examples; accuracy (%) at each eps in [0, 1] pixel units")
    text = table(rows, list(args.eps))
    print(f"\n{setting}\n\n{text}\n")
    out.mkdir(parents=True, exist_ok=True)
    settings = {**attack, "eps": list(args.eps), "limit": args.limit, "batch_size": args.batch_size,
                "seed": args.seed, "device": str(device)}
    atomic_write_text(out / "robust.md", f"{setting}\n\n{text}\n")
    atomic_write_text(out / "robust.json", json.dumps({"settings": settings, "runs": rows}, indent=1))
    plot(rows, list(args.eps), out / "robust.png", setting.split(";")[0])
    print(f"wrote {out / 'robust.md'}, {out / 'robust.json'} and {out / 'robust.png'}")
    return rows
