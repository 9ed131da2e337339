"""The command line under hostile input (issue 20): a resume never changes a setting silently, --out never
overwrites a user's folder, and every error is one ``maxup: error:`` line (2: usage, 1: failure in a run)."""
import contextlib
import errno
import io
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxup.cli import main

TINY = ["--epochs", "1", "--test-size", "60", "--train-size", "100", "--batch-size", "64", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("maxup: warning:")]
    assert len(lines) == 1 and lines[0].startswith("maxup: error: "), err
    assert "Traceback" not in err and "unexpected" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("runs") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--method", "cutout", "--lr", "0.05", "--out", str(run), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- a resume never changes a setting silently


@pytest.mark.parametrize("change, named", [
    (["--lr", "0.1"], "lr 0.05 -> 0.1"),
    (["--weight-decay", "0.01"], "weight_decay 0.0005 -> 0.01"),
    (["--momentum", "0.5"], "momentum 0.9 -> 0.5"),
    (["--train-size", "120"], "train_size 100 -> 120"),
    (["--val-size", "0.1"], "val_size 0 -> 0.1"),
    (["--no-normalize"], "normalize True -> False"),
    (["--method", "mixup"], "method 'cutout' -> 'mixup'"),
    (["--seed", "1"], "seed 0 -> 1"),
])
def test_resume_with_a_changed_setting_is_refused_naming_it(finished, tmp_path, capsys, change, named):
    run = copy_run(finished, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    argv = ["train", "--method", "cutout", "--lr", "0.05", "--out", str(run), "--resume", *TINY]
    argv += change
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert named in line and "cannot resume" in line
    assert (run / "config.yaml").read_text() == before  # nothing recorded that was not used


def test_resume_with_fewer_epochs_is_refused_and_more_are_recorded(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    base = ["train", "--method", "cutout", "--lr", "0.05", "--out", str(run), "--resume", *TINY]
    assert main(base + ["--epochs", "2"]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["epochs"] == 2 and config["resumed"] == [{"after_epoch": 1, "epochs": [1, 2]}]
    assert main(base) == 2  # --epochs 1 after 2 trained
    assert "epochs '2 trained' -> 1" in one_error_line(capsys)


# --------------------------------------------------------------------------- --out never overwrites a user's folder


def test_out_with_a_users_files_is_never_written_without_force(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.yaml", "model.pt", "metrics.csv"):
        (mine / name).write_text(f"my own {name}\n")
    for extra in ([], ["--resume"]):
        assert main(["train", "--out", str(mine), *TINY, *extra]) == 2
        assert "--out" in one_error_line(capsys)
        assert (mine / "config.yaml").read_text() == "my own config.yaml\n"
    assert main(["compare", "--methods", "erm", "--seeds", "1", "--out", str(mine), *TINY]) == 2
    one_error_line(capsys)
    assert main(["train", "--out", str(mine), "--force", *TINY]) == 0
    assert "method: erm" in (mine / "config.yaml").read_text()


def test_a_finished_run_without_checkpoints_is_not_trained_over(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path / "run")
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    model = (run / "model.pt").read_bytes()
    for extra in ([], ["--resume"]):
        assert main(["train", "--method", "cutout", "--lr", "0.05", "--out", str(run), *TINY, *extra]) == 2
        one_error_line(capsys)
    assert (run / "model.pt").read_bytes() == model


def test_force_starts_afresh_over_an_earlier_run(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    assert main(["train", "--method", "mixup", "--out", str(run), "--force", *TINY]) == 0
    assert "method: mixup" in (run / "config.yaml").read_text()
    assert main(["train", "--method", "mixup", "--out", str(run), "--resume", *TINY]) == 0  # its own run now


def test_out_that_is_a_file_or_unwritable_is_a_usage_error(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--out", str(afile), *TINY]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert main(["train", "--out", str(afile / "below"), *TINY]) == 2
    assert "cannot write into" in one_error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert main(["train", "--out", str(locked / "run"), *TINY]) == 2
        assert "cannot write into" in one_error_line(capsys)


# --------------------------------------------------------------------------- one line per error


def test_checkpoint_and_run_failures_are_one_line_with_status_1(finished, tmp_path, capsys, monkeypatch):
    run = copy_run(finished, tmp_path / "run")
    (run / "checkpoints" / "epoch-0001.pt").write_bytes(b"garbage")
    assert main(["train", "--method", "cutout", "--lr", "0.05", "--out", str(run), "--resume", *TINY]) == 1
    assert "epoch-0001.pt is corrupt" in one_error_line(capsys)

    import maxup.train.checkpoint as C

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.os, "fsync", full)
    assert main(["train", "--out", str(tmp_path / "full"), *TINY]) == 1
    line = one_error_line(capsys)
    assert "no space left on device" in line and "config.yaml" in line


@pytest.mark.parametrize("text, message", [
    ("methods: [erm\n", "is not valid YAML"),
    ("methods: !!python/object/apply:os.system ['echo hi']\n", "is not valid YAML"),
    ("methods: []\n", "non-empty list of method specs"),
    ("methods: erm\n", "a list 'methods:'"),
    ("methods: [erm]\nseeds: [1, 2]\n", "'seeds'"),
    ("methods: [erm]\nseeds: two\n", "'seeds'"),
    ("methods: [erm]\nnormalize: 'no'\n", "'normalize' in --suite"),
    ("methods: [erm]\nlr: .inf\n", "'lr' in --suite"),
    ("methods: [erm]\nseeds: 1\nseeds: 2\n", "repeats the key seeds"),
    ("methods: [erm, 3]\n", "non-empty list of method specs"),
    ("- erm\n", "a list 'methods:'"),
])
def test_bad_suite_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    assert main(["compare", "--suite", str(suite), "--out", str(tmp_path / "o"), *TINY]) == 2
    line = one_error_line(capsys)
    assert message in line and ("suite.yaml" in line or "--suite" in line)
    assert not (tmp_path / "o").exists()


def test_non_utf8_suite_names_the_file(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_bytes(b"methods: [erm]\n# \xff\n")
    assert main(["compare", "--suite", str(suite), "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "suite.yaml is not UTF-8" in one_error_line(capsys)


@pytest.mark.parametrize("argv, message", [
    (["train", "--seed", "-1"], "argument --seed: must be an integer >= 0"),
    (["train", "--lr", "inf"], "argument --lr: must be a finite number > 0"),
    (["train", "--lr", "nan"], "argument --lr"),
    (["train", "--epochs", "0"], "argument --epochs"),
    (["train", "--max-grad-norm", "inf"], "argument --max-grad-norm"),
    (["train", "--method", "mixup(alpha=inf)"], "alpha must be a finite number"),
    (["train", "--method", "mixup(alpha=1, alpha=2)"], "more than once"),
    (["train", "--method", "cutout(size=99)"], "larger than the 8x8 images"),
    (["train", "--resume", "--force"], "contradict"),
    (["compare", "--methods", ","], "argument --methods"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--robust-steps", "5"], "--robust-steps sets the attack of --robust-eps"),
    (["train", "--robust-eps", "0"], "argument --robust-eps"),
    (["train", "--eval-every", "0"], "argument --eval-every"),
    (["lm", "--eval-every", "-2"], "argument --eval-every"),
])
def test_bad_options_are_one_line_naming_the_option(tmp_path, capsys, argv, message):
    assert main(argv + ["--out", str(tmp_path / "o"), *TINY]) == 2
    assert message in one_error_line(capsys)


def test_a_repeated_model_option_is_refused_naming_the_key(tmp_path, capsys):
    for command in (["train"], ["lm", "--corpus", str(tmp_path / "no-corpus")], ["compare"]):
        argv = command + ["--model-opt", "width=3", "--model-opt", "depth=2", "--model-opt", "width=4"]
        assert main(argv + ["--out", str(tmp_path / "o")]) == 2
        line = one_error_line(capsys)
        assert "argument --model-opt" in line and "'width' is given twice" in line
    assert not (tmp_path / "o").exists()


def test_suite_seeds_must_be_an_integer_not_a_string(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("methods: [erm]\nseeds: '2'\n")
    assert main(["compare", "--suite", str(suite), "--out", str(tmp_path / "o"), *TINY]) == 2
    line = one_error_line(capsys)
    assert "'seeds' in --suite" in line and "must be an integer, got '2'" in line
    assert not (tmp_path / "o").exists()


def test_lm_corpus_never_writes_into_a_folder_of_other_files(tmp_path, capsys, monkeypatch):
    import maxup.cli.lm as L

    def build(out, min_count=3):  # a stand-in for the KJV builder: writes the three splits
        out.mkdir(parents=True, exist_ok=True)
        for name in ("train.txt", "valid.txt", "test.txt"):
            (out / name).write_text("in the beginning\n")
        return out

    monkeypatch.setattr(L, "build_kjv_corpus", lambda out, min_count=3: build(Path(out), min_count))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    assert main(["lm-corpus", "--out", str(mine)]) == 2
    line = one_error_line(capsys)
    assert f"--out {mine} holds other files (notes.txt)" in line and "--force" in line
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["lm-corpus", "--out", str(afile)]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert main(["lm-corpus", "--out", str(mine), "--force"]) == 0
    assert (mine / "notes.txt").read_text() == "my notes\n" and (mine / "train.txt").exists()
    corpus = tmp_path / "corpus"
    for _ in range(2):  # a new folder, then the corpus lm-corpus wrote there: rebuilt without --force
        assert main(["lm-corpus", "--out", str(corpus)]) == 0
    assert sorted(p.name for p in corpus.iterdir()) == ["test.txt", "train.txt", "valid.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    assert main(["train", "--device", "cuda", "--out", str(tmp_path / "o"), *TINY]) == 2
    assert "CUDA is not available" in one_error_line(capsys)


# ---------------------------------------------------------------------- fuzz: exit 0 or one line, never a traceback

TERMS = ["erm", "cutout", "mixup", "cutmix", "gaussian", "maxup", "hmix", "gmix", "resizemix", "cropflip", "smooth",
         "soft_augment", "lumix", "sam", "gradaug", "blur", "manifold_mixup", "embed_noise"]
KEYS = ["alpha", "size", "sigma", "m", "p", "fill", "rho", "padding", "ratio", "scale", "eps", "per_sample", "x"]
VALUES = ["0", "1", "-1", "0.5", "2", "inf", "nan", "1e9", "-inf", "true", "'a'", "(1, 2)", "(0.1, 0.9)", "()", "[1]",
          "1 +", ""]


@st.composite
def specs(draw):
    terms = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(TERMS))
        args = draw(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)), max_size=2))
        terms.append(f"{name}({', '.join(f'{k}={v}' for k, v in args)})" if args else name)
    return "+".join(terms)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(spec=specs(), options=st.lists(st.sampled_from([
    ["--lr", "1e30"], ["--lr", "-1"], ["--batch-size", "1"], ["--batch-size", "0"], ["--val-size", "0.5"],
    ["--val-size", "2000"], ["--warmup-epochs", "5"], ["--max-grad-norm", "0.1"], ["--momentum", "1"],
    ["--optimizer", "adamw"], ["--model", "mlp"], ["--model-opt", "width=0"], ["--model-opt", "hidden=(4,)"],
    ["--train-size", "5"], ["--amp", "fp16"], ["--seed", "7"]]), max_size=2))
def test_fuzz_cli_ends_in_success_or_one_error_line(tmp_path_factory, spec, options):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    argv = ["train", "--method", spec, "--out", str(out), "--epochs", "1", "--train-size", "40", "--test-size", "20",
            "--batch-size", "16", "--no-progress"] + [a for o in options for a in o]
    err = io.StringIO()  # capsys does not reset between @given examples
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    text = err.getvalue()
    lines = [line for line in text.splitlines() if not line.startswith("maxup: warning:")]
    assert "Traceback" not in text and "unexpected" not in text, (argv, text)
    if status == 0:
        assert (out / "model.pt").exists(), (argv, text)
    else:
        assert status in (1, 2) and len(lines) == 1 and lines[0].startswith("maxup: error: "), (argv, text)
