"""``maxup certify``: certified accuracy of trained runs under randomized smoothing (Cohen et al. 2019).

Each run directory (written by ``maxup train``) gives its config and final ``model.pt``;
the test split is rebuilt exactly as in training, normalisation included, and the noise
is added to the inputs as the model saw them. So ``sigma`` and every radius are in the
units of the model's input: [0, 1] pixels for runs trained with ``--no-normalize`` (as
in Cohen et al. and the MaxUp paper), standardised units otherwise (the output says which,
and how many pixel units one standardised unit is).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch

from .. import methods as M
from ..certify import ABSTAIN, Smooth, certified_accuracy, certify_many
from ..data import load_dataset
from ..models import create_model
from ..train.checkpoint import atomic_write_text, list_checkpoints
from ..train.distributed import resolve_device
from .files import check_out, read_yaml
from .options import POSITIVE, POSITIVE_INT, add_evaluation_options, slug

RADIUS_STEP = 0.25
POINTS_DIR = "points"


def radii_list(text: str, example: str) -> list[float]:
    """Comma-separated radii (``example`` shows the form), sorted and without duplicates (possibly none); an
    argparse error when one is not a number."""
    try:
        radii = [float(v) for v in M.split_outside(text, ",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated radii such as {example}, got {text!r}") from None
    return sorted(set(radii))


def _radii_arg(text: str) -> list[float]:
    radii = radii_list(text, "0,0.25,0.5")
    if not radii or any(r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be >= 0, got {text!r}")
    return radii


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("certify", help="certified L2 robustness of trained runs by randomized smoothing",
                       description="Certify the first --limit test images of each run with randomized smoothing "
                                   "(CERTIFY of Cohen et al. 2019); print certified accuracy at each radius, the "
                                   "abstain rate and the time per example, and write certify.csv, certify.json and "
                                   "certify.png into --out. Noise and radii are in the units of the model's input.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by maxup train")
    p.add_argument("--sigma", type=POSITIVE, default=None,
                   help="noise level in the model's input units (default: the sigma of each run's gaussian term)")
    p.add_argument("--n", type=POSITIVE_INT, default=10_000, help="noise samples that bound p_A (default: 10000)")
    p.add_argument("--n0", type=POSITIVE_INT, default=100, help="noise samples that pick the class (default: 100)")
    p.add_argument("--alpha", type=float, default=0.001,
                   help="failure probability of each certificate (default: 0.001)")
    p.add_argument("--limit", type=POSITIVE_INT, default=500, help="certify the first N test images (default: 500)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=1000,
                   help="noisy copies per forward pass; results do not depend on it (default: 1000)")
    p.add_argument("--radii", type=_radii_arg, default=None,
                   help="comma-separated radii for the table (default: 0, 0.25, ... up to max(1, 4 sigma))")
    add_evaluation_options(p, seed="noise seed; each test point has its own stream", out="runs/certify",
                           done="points certified")
    p.set_defaults(func=certify)
    return p


# ------------------------------------------------------------------------------------------ runs


def training_sigma(method: str) -> float | None:
    """The sigma of the one ``gaussian`` term of a method spec, or None."""
    terms = [t for t in M.parse(method) if t.name == "gaussian"]
    if len(terms) != 1:
        return None
    return float(terms[0].kwargs.get("sigma", M.REGISTRY["gaussian"].options()["sigma"]))


def read_run(run: Path) -> dict:
    """The config of a finished ``maxup train`` run; a clear error when ``run`` is not one."""
    if not run.is_dir():
        raise ValueError(f"run directory {run} does not exist")
    config_path, model_path = run / "config.yaml", run / "model.pt"
    if not config_path.is_file():
        raise ValueError(f"{run} is not a run directory: it has no config.yaml (write one with maxup train "
                         f"--out {run})")
    config = read_yaml(config_path, str(config_path)) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must be a YAML mapping as maxup train writes it, got {type(config).__name__}")
    missing = [k for k in ("dataset", "model", "method") if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}: certify runs written by maxup train or compare")
    if not model_path.is_file():
        hint = (f"the run has not finished; complete it with maxup train --resume --out {run} (and its other options)"
                if list_checkpoints(run / "checkpoints") else "train one with maxup train --out RUN_DIR")
        raise ValueError(f"{run} holds no model (no model.pt): {hint}")
    return config


def weights_file(run: Path, weights: str = "model") -> Path:
    """The state of the run's final model (``weights="model"``: model.pt) or of its weight average
    (``"ema"``/``"swa"``: ema_model.pt / swa_model.pt, or the average in the newest checkpoint)."""
    if weights == "model":
        return run / "model.pt"
    path = run / f"{weights}_model.pt"
    if path.is_file() or list_checkpoints(run / "checkpoints"):
        return path
    raise ValueError(f"{run} keeps no {weights.upper()} average (no {path.name}, no checkpoint): train it with a "
                     f"'+{weights}' method term, or drop --weights")


def _average_state(run: Path, weights: str) -> dict:
    """The averaged weights of ``run`` from ``<weights>_model.pt``, else from its newest checkpoint."""
    path = run / f"{weights}_model.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    newest = list_checkpoints(run / "checkpoints")[-1]
    average = torch.load(newest, map_location="cpu", weights_only=False).get("average") or {}
    key = {"ema": "module", "swa": "model"}[weights]  # maxup.averaging.EMA / SWA state_dict
    if key not in average:
        raise ValueError(f"{run} keeps no {weights.upper()} average: its method has no '+{weights}' term")
    state = average[key]
    prefix = "module."  # an SWA average is a torch.optim.swa_utils.AveragedModel around the model
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if weights == "swa" else state


def load_run(run: Path, config: dict, *, device, data_dir=None, weights: str = "model"):
    """The run's data splits (rebuilt as in training) and its final model on ``device`` (``weights``: the
    trained weights, or the ``"ema"``/``"swa"`` average the run kept)."""
    splits = load_dataset(config["dataset"], data_dir=data_dir or config.get("data_dir"),
                          val_size=config.get("val_size") or 0, train_size=config.get("train_size"),
                          normalize=config.get("normalize", True), seed=config.get("seed", 0))
    model = create_model(config["model"], input_shape=splits.input_shape, num_classes=splits.num_classes,
                         **dict(config.get("model_opt") or {}))
    path = weights_file(run, weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True) if weights == "model" else \
            _average_state(run, weights)
        model.load_state_dict(state)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(f"{path} does not load into the {config['model']} model its config.yaml "
                         f"describes ({type(err).__name__}: {' '.join(str(err).split())})") from None
    return splits, model.to(device)


def input_space(splits) -> tuple[str, float]:
    """What the model's input units are, and the [0, 1] pixel radius that one unit of radius covers at least
    (the smallest channel standard deviation: the standardised ball of radius R holds the pixel ball of
    radius R * min(std))."""
    if splits.std is None:
        return "[0, 1] pixels", 1.0
    scale = float(splits.std.min())
    return f"standardised inputs (a radius R covers at least R x {scale:.3g} in [0, 1] pixels)", scale


# ------------------------------------------------------------------------------------------ point logs


def point_logs(args, runs: list[Path], *, what: str, result: str) -> list[Path]:
    """The per-run logs ``--out/points/<run>.jsonl`` of an evaluation that ``--resume`` continues, after
    checking ``--out`` (it may hold only such results, ``result`` or the points); ``--force`` clears them."""
    out = Path(args.out)
    logs = [out / POINTS_DIR / f"{slug(str(r), keep='=.-')}.jsonl" for r in runs]
    check_out(out, resume=args.resume, force=args.force, what=what,
              holds=lambda o: (o / result).is_file() or (o / POINTS_DIR).is_dir())
    if args.force:
        for log in logs:
            log.unlink(missing_ok=True)
    return logs


def read_points(path: Path, header: dict) -> list[dict]:
    """The records of an earlier ``certify`` of the same run with the same settings (a prefix 0..k-1)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    try:
        old = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        old = {}
    if {k: old.get(k) for k in header} != header:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in header.items() if old.get(k) != v)
        raise ValueError(f"{path} was certified with other settings ({changed}): use the same settings to "
                         "--resume, or choose another --out")
    records = []
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption
            break
        if record.get("index") != len(records):
            break
        records.append(record)
    return records


def write_points(path: Path, header: dict, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [header, *records]))


# ------------------------------------------------------------------------------------------ output


def default_radii(sigmas) -> list[float]:
    top = max(1.0, 4 * max(sigmas))
    return [RADIUS_STEP * i for i in range(int(top / RADIUS_STEP + 1e-9) + 1)]


def table(rows: list[dict], radii: list[float]) -> str:
    head = ["run", "method", "sigma", *(f"r={r:g}" for r in radii), "abstain", "s/example"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        accs = [f"{100 * a:.1f}" for a in row["certified_accuracy"]]
        lines.append(f"| {row['run']} | {row['method']} | {row['sigma']:g} | " + " | ".join(accs)
                     + f" | {100 * row['abstain']:.1f} | {row['seconds_per_example']:.3g} |")
    return "\n".join(lines)


def csv_text(rows: list[dict], radii: list[float]) -> str:
    keys = ["run", "method", "dataset", "sigma", "train_sigma", "input_space", "points", "n0", "n", "alpha", "seed"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(keys + [f"certified_accuracy@{r:g}" for r in radii] + ["abstain", "seconds_per_example"])
    for row in rows:
        writer.writerow([row[k] for k in keys] + row["certified_accuracy"]
                        + [row["abstain"], row["seconds_per_example"]])
    return buf.getvalue()


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(max(r["radius"] for r in row["records"]) for row in rows)
    grid = [0.01 * i for i in range(int(100 * max(top, 0.25)) + 2)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.plot(grid, [100 * a for a in certified_accuracy(row["records"], grid)],
                label=f"{row['run']}: {row['method']} (sigma {row['sigma']:g})")
    ax.set_xlabel("L2 radius (model input units)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ command


def _check_args(args) -> None:
    if args.sigma is not None and not args.sigma > 0:
        raise ValueError(f"--sigma must be > 0, got {args.sigma}")
    for name in ("n", "n0", "limit", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha must lie strictly between 0 and 1 (e.g. 0.001), got {args.alpha}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")


def certify(args) -> list[dict]:
    _check_args(args)
    runs = [Path(r) for r in args.runs]
    if len({r.resolve() for r in runs}) != len(runs):
        raise ValueError("a run directory is listed twice")
    # every run is checked before any is certified: a typo must not cost an hour of certification
    configs, sigmas = [read_run(r) for r in runs], []
    for run, config in zip(runs, configs):
        sigma = args.sigma if args.sigma is not None else training_sigma(config["method"])
        if sigma is None:
            raise ValueError(f"{run} was not trained with one gaussian(sigma=...) term ({config['method']}): "
                             "pass --sigma")
        sigmas.append(sigma)
    out = Path(args.out)
    logs = point_logs(args, runs, what="certification results", result="certify.json")
    device = resolve_device(args.device, name="--device")
    radii = args.radii or default_radii(sigmas)
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    rows = []
    for run, config, sigma, log in zip(runs, configs, sigmas, logs):
        header = {"run": str(run), "sigma": sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha, "seed": args.seed}
        records = read_points(log, header) if args.resume else []
        splits, model = load_run(run, config, device=device, data_dir=args.data_dir)
        test = splits.test
        limit = min(args.limit, len(test))
        records = records[:limit]
        log.parent.mkdir(parents=True, exist_ok=True)
        write_points(log, header, records)
        smooth = Smooth(model, splits.num_classes, sigma)
        bar = None
        if show:
            from tqdm import tqdm

            bar = tqdm(total=limit, initial=len(records), desc=f"certify {run}", unit="point", file=sys.stderr,
                       dynamic_ncols=True)
        try:
            with open(log, "a", encoding="utf-8") as f:
                for record in certify_many(smooth, test.x, test.y, n0=args.n0, n=args.n, alpha=args.alpha,
                                           batch_size=args.batch_size, seed=args.seed,
                                           indices=range(len(records), limit)):
                    records.append(record)
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    if bar is not None:
                        bar.set_postfix(acc=f"{sum(r['correct'] for r in records) / len(records):.3f}", refresh=False)
                        bar.update()
        finally:
            if bar is not None:
                bar.close()
        space, scale = input_space(splits)
        rows.append({
            "run": str(run), "method": config["method"], "dataset": config["dataset"], "sigma": sigma,
            "train_sigma": training_sigma(config["method"]), "input_space": space, "pixel_scale": scale,
            "points": len(records), "n0": args.n0, "n": args.n, "alpha": args.alpha, "seed": args.seed,
            "certified_accuracy": certified_accuracy(records, radii),
            "abstain": sum(r["prediction"] == ABSTAIN for r in records) / len(records),
            "seconds_per_example": sum(r["time"] for r in records) / len(records),
            "records": records,
        })
        if not show:
            print(f"{run}: certified accuracy at radius 0 {100 * rows[-1]['certified_accuracy'][0]:.1f}% "
                  f"over {len(records)} points", file=sys.stderr, flush=True)
        del splits, model, smooth

    setting = (f"randomized smoothing, n0 {args.n0}, n {args.n}, alpha {args.alpha}, seed {args.seed}; "
               f"first {min(r['points'] for r in rows)} test images; certified accuracy (%) at each L2 radius")
    spaces = sorted({r["input_space"] for r in rows})
    where = spaces[0] if len(spaces) == 1 else "; ".join(f"{r['run']}: {r['input_space']}" for r in rows)
    text = table(rows, radii)
    print(f"\n{setting}\nsigma and radii in model input units: {where}\n\n{text}\n")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"n0": args.n0, "n": args.n, "alpha": args.alpha, "limit": args.limit, "seed": args.seed,
                "batch_size": args.batch_size, "device": str(device)}
    atomic_write_text(out / "certify.csv", csv_text(rows, radii))
    atomic_write_text(out / "certify.json", json.dumps({"settings": settings, "radii": radii, "runs": rows}, indent=1))
    plot(rows, out / "certify.png", setting.split(";")[0])
    print(f"wrote {out / 'certify.csv'}, {out / 'certify.json'} and {out / 'certify.png'}")
    return rows
