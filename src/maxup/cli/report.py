"""The report of a comparison, for every task: the summary over seeds, the markdown table, results.json,
results.md and results.png."""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import torch

from ..data.longtail import shot_thresholds
from .run import is_main
from .tasks import IMAGE, Task

#: clean training accuracy the baseline must reach for a comparison to show what a regulariser buys
CONVERGED = 0.99


def summarize(results: dict[str, list[list[dict]]], baseline: str | None,
              keys: tuple[str, ...] = IMAGE.summary_keys) -> list[dict]:
    """Mean and standard deviation over seeds of the final metrics ``keys`` (those every run recorded), the
    train-test gap (clean training accuracy minus test accuracy), time per epoch relative to the baseline, and
    total training time. With a validation perplexity: the epoch of the best one and the test perplexity there."""
    rows = []
    for method, runs in results.items():
        finals = [h[-1] for h in runs]
        row = {"method": method, "seeds": len(runs), "epochs": len(runs[0])}

        def stats(name, values, row=row):
            vals = torch.tensor([float(v) for v in values], dtype=torch.float64)
            row[name] = vals.mean().item()
            row[name + "_std"] = vals.std().item() if len(vals) > 1 else 0.0

        for key in keys:
            if all(key in f for f in finals):
                stats(key, [f[key] for f in finals])
        if all("clean_train_accuracy" in f and "test_accuracy" in f for f in finals):
            stats("gap", [f["clean_train_accuracy"] - f["test_accuracy"] for f in finals])
        evaluated = [[e for e in h if "val_perplexity" in e] for h in runs]  # every epoch, or --eval-every's
        if all(evaluated):
            best = [min(h, key=lambda e: e["val_perplexity"]) for h in evaluated]
            stats("best_val_epoch", [e["epoch"] for e in best])
            stats("test_perplexity_at_best_val", [e["test_perplexity"] for e in best])
        robust = [[e for e in h if "test_robust_accuracy" in e] for h in runs]
        if all(robust):  # robust overfitting: the best evaluated epoch beside the last
            best = [max(h, key=lambda e: e["test_robust_accuracy"]) for h in robust]
            stats("best_test_robust_accuracy", [e["test_robust_accuracy"] for e in best])
            stats("best_robust_epoch", [e["epoch"] for e in best])
        if all("test_class_accuracy" in f and "train_class_counts" in f for f in finals):  # long-tailed runs
            row.update(class_means(finals))
        # median over epochs and seeds: robust to the odd slow epoch on a shared machine
        row["epoch_time"] = torch.tensor([e["train_time"] for h in runs for e in h]).median().item()
        stats("train_time_total", [sum(e["train_time"] for e in h) for h in runs])
        rows.append(row)
    base = next((r for r in rows if r["method"] == baseline), rows[0])
    for r in rows:
        r["time_ratio"] = r["epoch_time"] / base["epoch_time"]
    return rows


def class_means(finals: list[dict]) -> dict:
    """The per-class test accuracy of a method, mean over its seeds (None for a class no seed measured), and the
    training class sizes (mean over seeds: the profile is the same for every seed unless the data differ)."""
    accuracy = []
    for values in zip(*(f["test_class_accuracy"] for f in finals)):
        measured = [v for v in values if v is not None]
        accuracy.append(sum(measured) / len(measured) if measured else None)
    counts = [sum(c) / len(c) for c in zip(*(f["train_class_counts"] for f in finals))]
    return {"test_class_accuracy": accuracy, "train_class_counts": counts}


def plot_classes(rows: list[dict], path: Path, title: str) -> bool:
    """Per-class test accuracy (mean over seeds) against the class's training samples, one series per method
    (log-scaled sizes); False (nothing written) when no row holds per-class accuracy."""
    rows = [r for r in rows if "test_class_accuracy" in r]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker below)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        pairs = sorted((n, 100 * a) for n, a in zip(r["train_class_counts"], r["test_class_accuracy"])
                       if a is not None and n > 0)
        ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=r["method"])
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    sizes = [n for r in rows for n in r["train_class_counts"] if n > 0]
    many, few = shot_thresholds(int(max(sizes)))
    for x, text in ((many, "many-shot >"), (few, "few-shot <")):
        if not min(sizes) <= x <= max(sizes):  # a boundary outside the data would only stretch the axis
            continue
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{text} {x:g}", (x, 1), xycoords=("data", "axes fraction"), fontsize=7, color="grey",
                    rotation=90, va="top", ha="right")
    ax.set_xlabel("training samples of the class (log scale)")
    ax.set_ylabel("test accuracy of the class (%), mean over seeds")
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 110)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(rows: list[dict], baseline: str, columns=IMAGE.columns) -> str:
    """A markdown table: mean ± sd over seeds of each column's metric ("-" where a run did not record it), the
    time per epoch over the baseline's, and the total training time per run."""
    columns = [c for c in columns if any(c[1] in r for r in rows)]  # e.g. no validation split: no such column
    lines = [f"| method | {' | '.join(c[0] for c in columns)} | time/epoch vs {baseline} | train time (s) |",
             "|---|" + "---|" * (len(columns) + 2)]
    for r in rows:
        cells = " | ".join(f"{scale * r[key]:.{d}f} ± {scale * r[key + '_std']:.{d}f}" if key in r else "-"
                           for _, key, scale, d in columns)
        lines.append(f"| {r['method']} | {cells} | {r['time_ratio']:.2f}x | {r['train_time_total']:.0f} |")
    return "\n".join(lines)


def convergence_note(rows: list[dict], baseline: str) -> str:
    """A line under the table when the baseline did not fit its training data (clean accuracy < 99%)."""
    base = next((r for r in rows if r["method"] == baseline), None)
    if base is None or "clean_train_accuracy" not in base or base["clean_train_accuracy"] >= CONVERGED:
        return ""
    return (f"\n\nNote: {baseline} reached {100 * base['clean_train_accuracy']:.2f}% clean training accuracy "
            f"(< {100 * CONVERGED:.0f}%): not converged: regularisers can only cost here.")


def plot(results: dict[str, list[list[dict]]], rows: list[dict], path: Path, title: str, *,
         key: str = "test_accuracy", curve_key: str = "test_accuracy", scale: float = 100.0,
         label: str = "test accuracy (%)", curve_label: str = "test accuracy (%)") -> None:
    """Bars of the final ``key`` (mean ± sd over seeds, times ``scale``) and the per-epoch curves of ``curve_key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(rows) > 8  # a long legend goes beside the curves, and the figure grows to hold it
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16 if many else 12, 4.5 + (0.12 * len(rows) if many else 0)))
    ax1.bar(range(len(rows)), [scale * r[key] for r in rows], yerr=[scale * r[key + "_std"] for r in rows],
            capsize=4, color="tab:blue", alpha=0.8)
    ax1.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    lo = min(scale * (r[key] - 2 * r[key + "_std"]) for r in rows)
    hi = max(scale * (r[key] + 2 * r[key + "_std"]) for r in rows)
    top = min(scale, hi + 0.05 * (hi - lo) + 1e-9) if key.endswith("accuracy") else None  # never past 100%
    ax1.set_ylim(max(0.0, lo - 0.05 * (hi - lo) - 1e-9), top)
    ax1.set_ylabel(f"final {label}, mean ± sd over seeds")
    # the epochs every seed of a method evaluated (all of them, or every --eval-every and the last)
    evaluated = {method: sorted(set.intersection(*({e["epoch"] for e in h if curve_key in e} for h in runs)))
                 for method, runs in results.items()}
    curves = sum(len(v) >= 2 for v in evaluated.values())
    if 2 * curves < len(evaluated) and all("clean_train_accuracy" in r for r in rows):
        # most methods have no curve (evaluated after the last epoch only): what each traded, fit against test
        for r in rows:
            ax2.errorbar(scale * r["clean_train_accuracy"], scale * r[key], xerr=scale * r["clean_train_accuracy_std"],
                         yerr=scale * r[key + "_std"], marker="o", capsize=3, label=r["method"], clip_on=False)
        ax2.set_xlabel("clean training accuracy (%), eval mode, no augmentation")
        ax2.set_xlim(None, min(scale, ax2.get_xlim()[1]))
    else:
        for method, runs in results.items():
            epochs = evaluated[method]
            curves = torch.tensor([[scale * float(e[curve_key]) for e in h if e["epoch"] in epochs] for h in runs],
                                  dtype=torch.float64)
            mean = curves.mean(0)
            sd = curves.std(0) if len(runs) > 1 else torch.zeros_like(mean)
            ax2.plot(epochs, mean, label=method, marker="o" if len(mean) < 3 else None)  # one epoch: a point
            ax2.fill_between(epochs, mean - sd, mean + sd, alpha=0.15)
        ax2.set_xlabel("epoch")
    ax2.set_ylabel(curve_label)
    if curve_key.endswith("accuracy"):
        ax2.set_ylim(None, min(scale, ax2.get_ylim()[1]))
    ax2.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {}))
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(task: Task, results: dict[str, list[list[dict]]], out: Path, budget: str, start: float, *,
           missing=()) -> list[dict]:
    """Summarise a comparison of ``task`` (baseline: erm when present, else the first method); on the main
    process print the table and write results.md, results.json and results.png into ``out``. ``missing`` names
    the runs not finished (``compare --report`` summarises the finished ones)."""
    if not results:
        raise ValueError(f"no finished run in {out} to report: train them first (maxup compare without --report)")
    title_line = budget + (f"; {len(missing)} runs not finished" if missing else "")
    if missing:
        budget += f"; not finished, left out: {', '.join(missing)}"
    specs = list(results)
    baseline = "erm" if "erm" in specs else specs[0]
    rows = summarize(results, baseline, keys=task.summary_keys)
    if not is_main():
        return rows
    text = table(rows, baseline, task.columns) + convergence_note(rows, baseline)
    print(f"\n{budget}\n\n{text}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(f"# {task.title}\n\n{budget}\n\n{text}\n\n"
                                    f"wall time {time.perf_counter() - start:.0f} s\n")
    seeds = {m: [s for s in range(len(hs) + sum(x.startswith(f"{m} seed ") for x in missing))
                 if f"{m} seed {s}" not in missing] for m, hs in results.items()}
    (out / "results.json").write_text(json.dumps({"budget": budget, "summary": rows, "runs": results,
                                                  "seeds": seeds, "missing": list(missing)}, indent=1))
    plot(results, rows, out / "results.png", title_line, **task.plot)
    by_class = plot_classes(rows, out / "results_classes.png", title_line)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'results.png'}"
          + (f" (per-class accuracy: {out / 'results_classes.png'})" if by_class else ""))
    return rows
