"""Write the "## Results" section of every method card from the comparisons in docs/results/<name>/results.json.

    python scripts/card_results.py            # rewrite docs/methods/*.md in place
    python scripts/card_results.py --check    # exit 1 if a card is out of date

Each card lists, for every comparison that ran the method (alone or as a term of a spec), the mean ± sd over
seeds beside the baseline of the same comparison, the clean training accuracy and the time per epoch.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS, CARDS = ROOT / "docs" / "results", ROOT / "docs" / "methods"
HEADING, NEXT = "## Results", "## When it hurts"


def terms(label: str) -> set[str]:
    """The term names of a comparison's method label: ``maxup(m=4, score='kl')+cutmix@epochs=9`` -> {maxup, cutmix}."""
    spec = label.split("@")[0]
    depth, names, cur = 0, set(), ""
    for ch in spec + "+":
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "+" and depth == 0:
            names.add(cur.strip())
            cur = ""
        elif depth == 0:
            cur += ch
    return names


def cell(row: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * row[key]:.{digits}f} ± {scale * row[key + '_std']:.{digits}f}" if key in row else "-"


def section(name: str, comparisons: dict[str, dict]) -> str:
    lines = [HEADING, ""]
    found = False
    for cname, data in comparisons.items():
        rows = data["summary"]
        base = next((r for r in rows if r["method"] == "erm"), rows[0])
        mine = [r for r in rows if name in terms(r["method"]) and (r is not base or name == "erm")]
        if not mine:
            continue
        found = True
        lm = "test_perplexity" in base
        budget = data["budget"].split("; not finished")[0]  # the seeds column says which runs finished
        lines += [f"**[{cname}](../results/{cname}/results.md)**: {budget}.", ""]
        if lm:
            lines += ["| method | seeds | test perplexity | vs erm | best valid epoch "
                      "| test perplexity at best valid | time/epoch vs erm |", "|---|---|---|---|---|---|---|"]
            for r in ([base] if base not in mine else []) + mine:
                diff = r["test_perplexity"] - base["test_perplexity"]
                lines.append(f"| {r['method']} | {r['seeds']} | {cell(r, 'test_perplexity', 1.0)} | {diff:+.2f} | "
                             f"{cell(r, 'best_val_epoch', 1.0, 1)} | {cell(r, 'test_perplexity_at_best_val', 1.0)} | "
                             f"{r['time_ratio']:.2f}x |")
        else:
            shown = ([base] if base not in mine else []) + mine
            extra = {"ema_test_accuracy": "EMA test accuracy (%)", "swa_test_accuracy": "SWA test accuracy (%)",
                     "test_robust_accuracy": "robust test (%)", "best_test_robust_accuracy": "best robust test (%)"}
            averages = [k for k in extra if any(k in r for r in shown)]
            heads = "".join(f" {extra[k]} |" for k in averages)
            lines += ["| method | seeds | test accuracy (%) | vs erm (points) |" + heads
                      + " clean train accuracy (%) | time/epoch vs erm | train time (s) |",
                      "|---|---|---|---|" + "---|" * len(averages) + "---|---|---|"]
            for r in shown:
                diff = 100 * (r["test_accuracy"] - base["test_accuracy"])
                lines.append(f"| {r['method']} | {r['seeds']} | {cell(r, 'test_accuracy')} | {diff:+.2f} | "
                             + "".join(f"{cell(r, k)} | " for k in averages)
                             + f"{cell(r, 'clean_train_accuracy')} | {r['time_ratio']:.2f}x | "
                             f"{r['train_time_total']:.0f} |")
        lines.append("")
    if not found:
        lines += ["No comparison in [docs/results](../results) has run this method yet.", ""]
    lines += ["Mean ± sd over the seeds that finished (± 0.00 with one seed: no spread measured), "
              "written from each comparison's results.json by `python scripts/card_results.py`; "
              "the reading is in [RESULTS.md](../RESULTS.md).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every card is up to date")
    args = parser.parse_args(argv)
    comparisons = {p.parent.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("*/results.json"))}
    stale = []
    for card in sorted(CARDS.glob("*.md")):
        if card.stem == "README":
            continue
        text = card.read_text()
        match = re.search(rf"^{re.escape(HEADING)}\n.*?(?=^{re.escape(NEXT)})", text, flags=re.S | re.M)
        if match is None:
            raise SystemExit(f"{card}: no '{HEADING}' section before '{NEXT}'")
        new = text[:match.start()] + section(card.stem, comparisons) + "\n" + text[match.end():]
        if new != text:
            stale.append(card.name)
            if not args.check:
                card.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python scripts/card_results.py", file=sys.stderr)
        return 1
    print(f"{'checked' if args.check else 'wrote'} {len(list(CARDS.glob('*.md'))) - 1} cards"
          + (f"; changed: {', '.join(stale)}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
