"""The command line end to end on digits, with a tiny budget."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maxup import methods as M
from maxup.cli import main

TINY = ["--epochs", "1", "--test-size", "120", "--batch-size", "64", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_writes_table_json_markdown_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "erm,maxup(m=2)+cutout", "--seeds", "2", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "| erm |" in printed and "| maxup(m=2)+cutout |" in printed
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    for row in results["summary"]:
        finals = torch.tensor([h[-1]["test_accuracy"] for h in results["runs"][row["method"]]], dtype=torch.float64)
        assert len(finals) == 2
        assert row["test_accuracy"] == pytest.approx(finals.mean().item())
        assert row["test_accuracy_std"] == pytest.approx(finals.std().item())
    erm = next(r for r in results["summary"] if r["method"] == "erm")
    assert erm["time_ratio"] == 1.0
    assert (out / "maxup_m=2_cutout" / "seed-1" / "metrics.jsonl").exists()
    # a second run never trains over the first; --resume reuses the finished runs as they are
    argv = ["compare", "--methods", "erm,maxup(m=2)+cutout", "--seeds", "2", "--out", str(out), *TINY]
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["test_accuracy"] for r in again["summary"]] == [r["test_accuracy"] for r in results["summary"]]


def test_train_writes_a_run_directory_and_resume_is_a_no_op_when_done(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "mixup(alpha=0.2)", "--seed", "3", "--out", str(run), *TINY]
    assert main(args) == 0
    first = (run / "metrics.jsonl").read_text()
    assert {"config.yaml", "metrics.csv", "metrics.jsonl", "model.pt"} <= {p.name for p in run.iterdir()}
    assert "method: mixup(alpha=0.2)" in (run / "config.yaml").read_text()
    assert main(args + ["--resume"]) == 0  # already finished: nothing more to train
    assert (run / "metrics.jsonl").read_text() == first
    assert "test accuracy" in capsys.readouterr().out


def test_model_options_and_features_model(tmp_path):
    assert main(["train", "--model", "mlp", "--model-opt", "hidden=(32,)", "--out", str(tmp_path / "m"), *TINY]) == 0


def test_suite_from_yaml(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("methods:\n  - erm\n  - cutmix(alpha=0.5)\nseeds: 1\n")
    assert main(["compare", "--suite", str(suite), "--out", str(tmp_path / "s"), *TINY]) == 0
    assert "| cutmix(alpha=0.5) |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "maxup(m=4)+blur"], "unknown method 'blur'"),
    (["train", "--method", "mixup(beta=1)"], "valid arguments: alpha=1.0"),
    (["train", "--method", "maxup(m=0)+cutout"], "m must be an integer >= 1"),
    (["train", "--dataset", "imagenet"], "imagenet"),
    (["train", "--model", "vgg"], "vgg"),
    (["train", "--resume"], "--resume needs --out"),
    (["compare", "--methods", "erm,erm"], "twice"),
    (["compare", "--seeds", "0"], "--seeds"),
    (["compare", "--suite", "/nonexistent/suite.yaml"], "suite"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, tmp_path):
    out = [] if "--resume" in argv else ["--out", str(tmp_path / "x")]
    assert main(argv + out + TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxup: error:") and message in err


def test_methods_lists_the_registry(capsys):
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    for entry in M.list_methods():
        assert entry.name in printed


@pytest.mark.parametrize("command", [[], ["train"], ["compare"]])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    if command:
        for option in ("--dataset", "--model", "--epochs", "--lr", "--out", "--train-size", "--amp"):
            assert option in text


def test_module_entry_point():
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "maxup", "methods"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(root / "src"), "PATH": ""}, timeout=120)
    assert done.returncode == 0 and "maxup" in done.stdout
