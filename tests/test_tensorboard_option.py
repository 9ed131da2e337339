"""``--tensorboard`` on ``maxup train``, ``lm`` and ``compare``: log_tensorboard=True reaches the Trainer; without
TensorBoard installed, one warning per command and the runs train on."""
import json
import sys
import types

import pytest

from maxup.cli import main
from maxup.cli.main import build_parser

TINY = ["--epochs", "1", "--train-size", "100", "--test-size", "60", "--batch-size", "50", "--no-progress"]


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""

    scalars: list = []
    dirs: list = []

    def __init__(self, log_dir):
        FakeWriter.dirs.append(log_dir)

    def add_scalar(self, key, value, step):
        FakeWriter.scalars.append((key, value, step))

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeWriter.scalars, FakeWriter.dirs = [], []
    return FakeWriter


@pytest.fixture
def no_tensorboard(monkeypatch):
    import maxup.train.logs as logs

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: ImportError
    monkeypatch.setattr(logs, "_TB_WARNED", False, raising=False)


def test_the_commands_take_tensorboard():
    parser = build_parser()
    for command in (["train"], ["lm"], ["compare"]):
        assert parser.parse_args([*command, "--tensorboard"]).tensorboard is True
        assert parser.parse_args(command).tensorboard is False


def test_train_writes_tensorboard_scalars_into_the_run_directory(tmp_path, fake_tensorboard):
    run = tmp_path / "run"
    assert main(["train", "--tensorboard", "--out", str(run), *TINY]) == 0
    assert fake_tensorboard.dirs == [str(run / "tensorboard")]
    assert ("test/accuracy", json.loads((run / "metrics.jsonl").read_text())["test_accuracy"], 1) in \
        fake_tensorboard.scalars


def test_train_without_out_is_refused(capsys):
    assert main(["train", "--tensorboard", *TINY]) == 2
    assert "--tensorboard writes TensorBoard logs into the run directory: give --out" in capsys.readouterr().err


def test_without_tensorboard_a_comparison_warns_once_and_trains(tmp_path, capsys, no_tensorboard):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "erm,mixup", "--seeds", "1", "--tensorboard", "--out", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert err.count("TensorBoard is not available") == 1 and "pip install tensorboard" in err
    assert (out / "results.json").is_file() and not (out / "erm" / "seed-0" / "tensorboard").exists()
