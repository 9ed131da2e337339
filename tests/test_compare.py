"""`maxup compare` as evidence: convergence on the clean training set, per-method budgets, worker processes."""
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from maxup import methods as M
from maxup.cli import main
from maxup.cli.comparison import split_budget, with_budget
from maxup.cli.main import build_parser
from maxup.cli.report import convergence_note, summarize, table
from maxup.cli.tasks import get_task
from maxup.methods import split_outside

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--test-size", "120", "--train-size", "200", "--batch-size", "64", "--no-progress"]


def untimed(runs):
    return {m: [[{k: v for k, v in e.items() if "time" not in k and k != "samples_per_s"} for e in h] for h in hs]
            for m, hs in runs.items()}


def _history(epochs, test, clean, time=1.0):
    rows = [{"epoch": e + 1, "train_time": time, "test_accuracy": test, "test_loss": 0.5, "test_ece": 0.1}
            for e in range(epochs)]
    rows[-1].update(clean_train_accuracy=clean, clean_train_loss=0.01)
    return rows


def test_split_budget_reads_epochs_and_refuses_the_rest():
    assert split_budget("cutout") == ("cutout", {})
    assert split_budget("maxup(m=4)+cutout@epochs=40") == ("maxup(m=4)+cutout", {"epochs": 40})
    assert with_budget(M.canonical)("MIXUP(alpha=0.2)@epochs=3") == "mixup(alpha=0.2)@epochs=3"
    for bad, message in [("cutout@lr=0.1", "budget keys: epochs"), ("cutout@epochs=x", "whole number"),
                         ("cutout@epochs=0", ">= 1"), ("cutout@", "empty budget")]:
        with pytest.raises(ValueError, match=message):
            split_budget(bad)


def test_summary_has_clean_training_accuracy_gap_and_total_time():
    results = {"erm": [_history(3, 0.90, 1.00), _history(3, 0.92, 0.98)],
               "cutout@epochs=6": [_history(6, 0.93, 0.97, time=2.0), _history(6, 0.95, 0.99, time=2.0)]}
    rows = summarize(results, "erm")
    erm, long = rows
    assert erm["clean_train_accuracy"] == pytest.approx(0.99)
    assert erm["clean_train_accuracy_std"] == pytest.approx(0.0141421356, rel=1e-6)
    assert erm["gap"] == pytest.approx(((1.00 - 0.90) + (0.98 - 0.92)) / 2)
    assert erm["train_time_total"] == pytest.approx(3.0) and long["train_time_total"] == pytest.approx(12.0)
    assert long["time_ratio"] == pytest.approx(2.0) and long["epochs"] == 6
    text = table(rows, "erm")
    assert "clean train accuracy (%)" in text and "| 99.00 ± 1.41 |" in text and "valid accuracy" not in text
    assert convergence_note(rows, "erm") == ""
    results["erm"][1][-1]["clean_train_accuracy"] = 0.90
    note = convergence_note(summarize(results, "erm"), "erm")
    assert "95.00% clean training accuracy" in note and "not converged" in note


def test_summary_of_runs_without_clean_metrics_shows_a_dash():
    old = [{"epoch": 1, "train_time": 1.0, "test_accuracy": 0.9, "test_loss": 0.3, "test_ece": 0.02}]
    rows = summarize({"erm": [old], "cutout": [_history(1, 0.8, 1.0)]}, "erm")
    assert "clean_train_accuracy" not in rows[0] and "gap" not in rows[0]
    text = table(rows, "erm")
    assert "| erm | 90.00 ± 0.00 | - | - |" in text and "| cutout | 80.00 ± 0.00 | 100.00 ± 0.00 |" in text
    assert "valid accuracy" not in text  # a column no run recorded is left out
    assert "clean train" not in table(summarize({"erm": [old]}, "erm"), "erm")


def test_compare_gives_a_method_its_own_epochs_and_records_convergence(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "erm,erm@epochs=2", "--epochs", "1", "--seeds", "1", "--out", str(out),
                 *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [len(results["runs"][m][0]) for m in ("erm", "erm@epochs=2")] == [1, 2]
    for row in results["summary"]:
        last = results["runs"][row["method"]][0][-1]
        assert 0 <= row["clean_train_accuracy"] <= 1
        assert row["gap"] == pytest.approx(last["clean_train_accuracy"] - last["test_accuracy"])
    assert (out / "erm@epochs=2" / "seed-0" / "config.yaml").read_text().count("epochs: 2") >= 1
    assert "not converged" in (out / "results.md").read_text()  # one epoch on 200 digits does not fit them


@pytest.mark.slow
def test_worker_processes_give_the_same_runs_as_one_process(tmp_path):
    argv = ["compare", "--methods", "erm,mixup", "--epochs", "1", "--seeds", "2", *TINY]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    assert main(argv + ["--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in ("one", "two"))
    assert untimed(one) == untimed(two)


def test_report_summarises_the_finished_runs_and_names_the_rest(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "erm,cutout", "--epochs", "1", "--seeds", "2", "--out", str(out), *TINY]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert main(argv + ["--report"]) == 0  # everything finished: the same summary, nothing trained
    assert json.loads((out / "results.json").read_text())["summary"] == first["summary"]
    capsys.readouterr()
    assert main(argv + ["--lr", "0.1", "--report"]) == 2  # runs trained otherwise are not reported as these
    assert "other settings: lr 0.05 -> 0.1" in capsys.readouterr().err
    assert main(argv + ["--eval-every", "2", "--report"]) == 0  # how often it evaluated changes no number
    (out / "cutout" / "seed-1" / "metrics.jsonl").unlink()
    assert main(argv + ["--report"]) == 0  # the run is still recorded in results.json
    assert json.loads((out / "results.json").read_text())["summary"] == first["summary"]
    (out / "results.json").unlink()
    assert main(argv + ["--report"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["missing"] == ["cutout seed 1"] and "not finished, left out: cutout seed 1" in again["budget"]
    assert [r["seeds"] for r in again["summary"]] == [2, 1]
    assert again["runs"]["cutout"] == first["runs"]["cutout"][:1]
    assert main(["compare", "--methods", "mixup", "--out", str(out), *TINY, "--report"]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_resume_reuses_the_runs_of_a_results_json_and_trains_the_rest(tmp_path):
    """A committed grid continues: its results.json is copied into a fresh --out, only the missing runs train."""
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "erm,cutout", "--epochs", "1", "--seeds", "2", *TINY]
    assert main(argv + ["--out", str(out)]) == 0
    first = json.loads((out / "results.json").read_text())
    assert first["seeds"] == {"erm": [0, 1], "cutout": [0, 1]}
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    kept = dict(first, runs={"erm": first["runs"]["erm"], "cutout": first["runs"]["cutout"][1:]},
                seeds={"erm": [0, 1], "cutout": [1]})
    kept["runs"]["erm"][0][-1]["test_accuracy"] = 0.123  # marks a reused run
    (fresh / "results.json").write_text(json.dumps(kept))
    assert main(argv + ["--out", str(fresh), "--resume"]) == 0
    again = json.loads((fresh / "results.json").read_text())
    assert again["runs"]["erm"][0][-1]["test_accuracy"] == 0.123
    assert not (fresh / "erm").exists() and (fresh / "cutout" / "seed-0" / "metrics.jsonl").exists()
    assert untimed(again["runs"])["cutout"] == untimed(first["runs"])["cutout"]  # seed 0 retrained: the same run
    other = dict(kept, budget=kept["budget"].replace("batch 64", "batch 32"))  # another budget: nothing reused
    (fresh / "results.json").write_text(json.dumps(other))
    assert main(argv + ["--out", str(fresh), "--resume"]) == 0
    assert (fresh / "erm" / "seed-0" / "metrics.jsonl").exists()


def test_force_trains_again_instead_of_reusing_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "erm", "--epochs", "1", "--seeds", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    metrics = out / "erm" / "seed-0" / "metrics.jsonl"
    metrics.write_text(metrics.read_text().replace('"test_accuracy": ', '"test_accuracy": 0.123, "was": '))
    assert main(argv + ["--force"]) == 0
    assert json.loads((out / "results.json").read_text())["runs"]["erm"][0][-1]["test_accuracy"] != 0.123


def test_workers_is_an_alias_of_jobs():
    """--workers N is --jobs N: the worker processes give the same runs as one process (the test above)."""
    from maxup.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["compare", "--workers", "2"]).jobs == 2
    assert parser.parse_args(["compare", "--jobs", "3"]).jobs == 3 and parser.parse_args(["compare"]).jobs == 1
    assert "--jobs JOBS, --workers JOBS" in parser._subparsers._group_actions[0].choices["compare"].format_help()


def test_bad_jobs_is_refused(capsys):
    assert main(["compare", "--jobs", "0", "--out", "unused"]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_every_evidence_grid_is_a_valid_comparison(tmp_path):
    """scripts/evidence.sh --list: each grid's options parse as `maxup compare` options and each method spec,
    budget included, parses and suits the grid's task (a typo would surface only hours into a grid)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "evidence.sh"
    listed = subprocess.run(["bash", str(script), "--list"], capture_output=True, text=True, check=True).stdout
    grids = [line.split("\t") for line in listed.splitlines()]
    assert len(grids) >= 10 and {"fm1k", "fm1k_noise40s", "fm5k_lt100", "fm1k_mix", "fm1k_vit", "fm1k_adv", "lm"} <= \
        {g for g, _, _ in grids}
    for name, options, methods in grids:
        args = build_parser().parse_args(["compare", *shlex.split(options), "--out", str(tmp_path / name)])
        task = get_task(args.task)
        specs = split_outside(methods, ",")
        assert len(set(specs)) == len(specs), name
        for label in specs:
            spec, _ = split_budget(label)
            task.spec(spec)  # parses and suits the task's inputs
            task.config(args, task.method(spec), 0)


def test_compare_with_eval_every_reports_the_evaluated_epochs(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "erm", "--epochs", "3", "--eval-every", "2", "--seeds", "1",
                 "--out", str(out), *TINY]) == 0
    data = json.loads((out / "results.json").read_text())
    (history,) = data["runs"]["erm"]
    assert [e["epoch"] for e in history if "test_accuracy" in e] == [2, 3]
    assert data["summary"][0]["test_accuracy"] == history[-1]["test_accuracy"]
    assert (out / "results.png").stat().st_size > 0
    assert yaml.safe_load((out / "erm" / "seed-0" / "config.yaml").read_text())["eval_every"] == 2
