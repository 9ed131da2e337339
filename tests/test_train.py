"""Tests for maxup.train: a learnable run and its files, exact resume after SIGKILL, NaN stops,
corrupt and failed checkpoints, the one-call fit on images/signals/features, the schedule,
ECE, two-process DDP on Gloo, and bf16 autocast on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from maxup.data import TensorData
from maxup.methods import build_step
from maxup.train import (
    TIMING_KEYS,
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    evaluate,
    expected_calibration_error,
    fit,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# MaxUp's step counter (its warm-up ends in epoch 2) and the augmentation generator both shape the run.
METHOD = "maxup(m=2, warmup_steps=10)+gaussian(sigma=0.1)"


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int = 200, dim: int = 16, seed: int = 0, shift: float = 1.0) -> TensorData:
    """Two Gaussian blobs at -shift and +shift in every coordinate: linearly separable in practice."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, dim, generator=g)
    y = torch.arange(2 * n) % 2
    return TensorData(x + shift * (2.0 * y[:, None] - 1.0), y)


class MLP(nn.Module):
    """A tiny MLP with BatchNorm (buffers) and dropout (global torch RNG); ``delay`` slows training forwards."""

    def __init__(self, dim: int = 16, hidden: int = 16, classes: int = 2, delay: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Dropout(0.1), nn.Linear(hidden, classes))
        self.delay = delay

    def forward(self, x):
        if self.delay and self.training:
            time.sleep(self.delay)
        return self.net(x)


def make_trainer(out_dir, *, epochs: int = 4, delay: float = 0.0, **kwargs) -> Trainer:
    """The run used by the resume tests (also imported by the subprocess scripts)."""
    torch.manual_seed(0)
    model = MLP(delay=delay)
    opt = make_optimizer(model, "sgd", lr=0.1)
    step = build_step(METHOD, model=model, optimizer=opt, num_classes=2)
    options = dict(test=blobs(50, seed=1), epochs=epochs, batch_size=32, seed=3, out_dir=out_dir, num_classes=2,
                   progress=False, device="cpu")
    options.update(kwargs)
    trainer = Trainer(model, step, blobs(100), **options)
    trainer.scheduler = make_scheduler(opt, epochs=epochs, steps_per_epoch=trainer.steps_per_epoch, warmup_epochs=1)
    return trainer


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def kill_when(script: str, path: Path, message: str) -> None:
    """Run ``script`` in a new Python process and SIGKILL it as soon as ``path`` exists (within 60 s)."""
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not path.exists():
            if proc.poll() is not None:
                pytest.fail(f"training script exited early:\n{proc.stdout.read().decode()}")
            assert time.monotonic() < deadline, message
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(tmp_path, script_text: str) -> Path:
    """Run ``script_text`` under ``torch.distributed.run`` with 2 processes (gloo, one thread each), its output
    folder ``tmp_path / "run"`` as its argument; fails the test with the output when it exits non-zero."""
    script = tmp_path / "ddp_script.py"
    script.write_text(textwrap.dedent(script_text))
    out = tmp_path / "run"
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# --------------------------------------------------------------------------- a learnable run and its files


def test_trainer_learns_and_writes_run_files(tmp_path, capsys):
    torch.manual_seed(0)
    model = MLP()
    opt = make_optimizer(model, "sgd", lr=0.1)
    step = build_step("erm", model=model, optimizer=opt, num_classes=2)
    train = blobs(150)
    trainer = Trainer(model, step, train, val=blobs(40, seed=2), test=blobs(60, seed=1), epochs=3,
                      batch_size=32, out_dir=tmp_path, keep_checkpoints=2, num_classes=2, progress=True,
                      config={"experiment": "blobs"}, device="cpu")
    trainer.scheduler = make_scheduler(opt, epochs=3, steps_per_epoch=trainer.steps_per_epoch)
    history = trainer.fit()

    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["test_accuracy"] > 0.95 and history[-1]["val_accuracy"] > 0.95
    assert history[-1]["train_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["step"] == 3 * trainer.steps_per_epoch == 3 * 10
    keys = {"epoch", "step", "lr", "train_loss", "train_accuracy", "val_accuracy", "val_loss", "val_ece",
            "test_accuracy", "test_loss", "test_ece", "train_time", "time", "samples_per_s"}
    assert set(history[0]) == keys
    clean = {"clean_train_accuracy", "clean_train_loss", "clean_train_ece"}  # the last epoch: convergence
    assert set(history[-1]) == keys | clean
    fitted = evaluate(model, train, num_classes=2)  # the training set in eval mode, no augmentation
    assert history[-1]["clean_train_accuracy"] == fitted["accuracy"]
    assert history[-1]["clean_train_loss"] == pytest.approx(fitted["loss"], rel=1e-6)
    assert "epoch 1/3" in capsys.readouterr().err  # the progress bar

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and set(csv_lines[0].split(",")) == keys | clean
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["experiment"] == "blobs"
    assert config["trainer"]["epochs"] == 3 and config["trainer"]["batch_size"] == 32
    assert config["trainer"]["world_size"] == 1 and config["trainer"]["model"] == "MLP"

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch-0002.pt", "epoch-0003.pt"]  # keep_checkpoints=2
    state = torch.load(tmp_path / "checkpoints" / "epoch-0003.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "step", "epoch", "global_step", "history", "rng"} <= state.keys()
    assert state["epoch"] == 3 and state["global_step"] == 30 and state["history"] == history
    assert {"torch", "python", "numpy", "generator"} <= state["rng"][0].keys()
    assert_same_state(torch.load(tmp_path / "model.pt", weights_only=True), model.state_dict())

    # A fresh run into a directory that holds checkpoints is refused.
    with pytest.raises(ValueError, match="resume=True"):
        make_trainer(tmp_path).fit()


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    with pytest.warns(UserWarning, match="no checkpoint"):
        history = make_trainer(tmp_path, epochs=1).fit(resume=True)
    assert len(history) == 1
    with pytest.raises(ValueError, match="step"):
        Trainer(MLP(), object(), blobs(10), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        Trainer(MLP(), make_trainer(None).step, blobs(10), num_classes=1)


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    import maxup.train.logs as logs

    monkeypatch.setattr(logs, "_TB_WARNED", False)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.warns(UserWarning, match="TensorBoard"):
            make_trainer(tmp_path, epochs=1, log_tensorboard=True).fit()
    else:
        make_trainer(tmp_path, epochs=1, log_tensorboard=True).fit()
        assert any((tmp_path / "tensorboard").iterdir())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------- exact resume after SIGKILL

KILLED_RUN = """
import sys, torch
torch.set_num_threads({threads})
from test_train import make_trainer
make_trainer({out!r}, delay=0.05).fit()
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    script = KILLED_RUN.format(threads=torch.get_num_threads(), out=str(killed))
    kill_when(script, killed / "checkpoints" / "epoch-0001.pt", "no checkpoint appeared within 60 s")
    done = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert not (killed / "model.pt").exists() and "epoch-0004.pt" not in done, "the run finished before the kill"
    # A killed run may have logged an epoch it never checkpointed: resume must drop such lines.
    with open(killed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 99, "train_loss": 1.0}) + "\n")

    stale = killed / "checkpoints" / ".epoch-0009.pt.12345.tmp"  # as a write killed midway leaves it
    stale.write_bytes(b"partial")

    resumed = make_trainer(killed)
    history = resumed.fit(resume=True)
    assert not stale.exists()
    reference = make_trainer(whole)
    expected = reference.fit()

    assert untimed(history) == untimed(expected)  # exact float equality
    assert len(history) == 4
    assert_same_state(resumed.module.state_dict(), reference.module.state_dict())
    assert_same_state(torch.load(killed / "model.pt", weights_only=True), reference.module.state_dict())
    assert resumed.step.objective.num_steps == reference.step.objective.num_steps == 4 * 7
    assert torch.equal(resumed.generator.get_state(), reference.generator.get_state())
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert lines == history  # rewritten from the checkpoint's history, then appended


# --------------------------------------------------------------------------- NaN, corrupt and failed checkpoints


class NaNAfter(nn.Module):
    """A linear model whose ``n``-th training forward returns NaN logits."""

    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(16, 2)
        self.n, self.calls = n, 0

    def forward(self, x):
        out = self.lin(x)
        if self.training:
            self.calls += 1
            if self.calls == self.n:
                out = out * float("nan")
        return out


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = NaNAfter(5)  # 2 steps per epoch: the 5th step is epoch 3, step 1
    opt = make_optimizer(model, lr=0.1)
    step = build_step("erm", model=model, optimizer=opt, num_classes=2)
    trainer = Trainer(model, step, blobs(32), epochs=4, batch_size=32, out_dir=tmp_path, num_classes=2,
                      progress=False, device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 1 of 2") as info:
        trainer.fit()
    assert info.value.epoch == 3 and info.value.step == 1 and info.value.global_step == 5
    assert "learning rate" in str(info.value) and "max_grad_norm" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch-0002.pt")
    assert state["epoch"] == 2 and state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model.pt").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path):
    make_trainer(tmp_path, epochs=2).fit()
    newest = tmp_path / "checkpoints" / "epoch-0002.pt"
    data = newest.read_bytes()

    newest.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="epoch-0002.pt") as info:
        load_checkpoint(newest)
    assert "previous checkpoint is epoch-0001.pt" in str(info.value)
    only = tmp_path / "only"
    make_trainer(only, epochs=1).fit()
    (only / "checkpoints" / "epoch-0001.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="epoch-0001.pt.*Delete"):  # no earlier one to fall back to
        make_trainer(only, epochs=3).fit(resume=True)

    newest.write_bytes(b"this is not a checkpoint" * 10)  # garbage
    with pytest.raises(CheckpointError, match="epoch-0002.pt"):
        load_checkpoint(newest)

    torch.save({"model": {}}, newest)  # a valid file that is not a training state
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(newest)

    newest.unlink()  # as the message says: resume from the previous one
    history = make_trainer(tmp_path, epochs=3).fit(resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    make_trainer(tmp_path, epochs=1).fit()
    good = tmp_path / "checkpoints" / "epoch-0001.pt"
    before = good.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint" * 100)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="epoch-0002.pt.*No space left"):
        make_trainer(tmp_path, epochs=2).fit(resume=True)
    with pytest.raises(CheckpointError, match="intact"):  # overwriting an existing file fails the same way
        save_checkpoint({"epoch": 5}, good)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["epoch-0001.pt"]  # no temp file left behind
    assert good.read_bytes() == before
    assert load_checkpoint(good)["epoch"] == 1


# --------------------------------------------------------------------------- the one-call API


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))

    def forward(self, x):
        return self.net(x)


class TinyCNN1d(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                 nn.Linear(4, classes))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("shape, make", [((1, 8, 8), TinyCNN), ((2, 16), TinyCNN1d), ((10,), lambda: MLP(10, 8, 3))],
                         ids=["images", "signals", "features"])
def test_fit_any_sample_shape_from_numpy(shape, make):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 96)
    x = (rng.normal(size=(96, *shape)) + y.reshape(-1, *[1] * len(shape))).astype(np.float32)
    torch.manual_seed(0)
    history = fit(make(), "maxup(m=2)+mixup", train=(x[:64], y[:64]), test=(x[64:], y[64:]), epochs=2,
                  batch_size=16, lr=0.05, warmup_epochs=0.5, progress=False, device="cpu")
    assert isinstance(history, list) and len(history) == 2
    for record in history:
        assert math.isfinite(record["train_loss"]) and 0 <= record["test_accuracy"] <= 1
        assert record["step"] % 4 == 0


def test_fit_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    model = MLP(hidden=32)
    dtypes = set()
    model.net[1].register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    data = blobs(150, shift=0.6)
    history = fit(model, "erm", train=data, test=blobs(50, seed=1, shift=0.6), epochs=4, batch_size=32, lr=0.05,
                  amp="bf16", progress=False, device="cpu")
    assert torch.bfloat16 in dtypes  # the forward really ran under bf16 autocast
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["test_accuracy"] > 0.85


# --------------------------------------------------------------------------- schedule, optimizer, ECE


def test_cosine_schedule_with_warmup_follows_formula():
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    sched = make_scheduler(opt, epochs=4, steps_per_epoch=5, warmup_epochs=1)  # W = 5, T = 20
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s in (0, 2, 4):
        assert seen[s] == pytest.approx(0.5 * (s + 1) / 5)
    for s in (5, 9, 12, 19):
        assert seen[s] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 15)))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 after T steps

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    sched = make_scheduler(opt, epochs=2, steps_per_epoch=4, warmup_epochs=0.5, schedule="constant")
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="schedule"):
        make_scheduler(opt, epochs=2, steps_per_epoch=4, schedule="linear")
    with pytest.raises(ValueError, match="warmup_epochs"):
        make_scheduler(opt, epochs=2, steps_per_epoch=4, warmup_epochs=3)


def test_make_optimizer_no_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = make_optimizer(model, "sgd", lr=0.1, weight_decay=1e-3)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-3 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(no_decay["params"]) == 6 and opt.defaults["nesterov"]
    assert isinstance(make_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer name"):
        make_optimizer(model, "lion")


def test_ece_matches_hand_computed_value():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.38, 0.62], [0.31, 0.69], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0, 1])  # right, wrong, right, wrong, wrong
    logits = probs.log().float()
    # bins of width 1/15: 0.95 -> (14/15, 1], 0.62 -> (9/15, 10/15], 0.69 -> (10/15, 11/15], 0.55 -> (8/15, 9/15]
    expected = 2 / 5 * abs(0.5 - 0.95) + 1 / 5 * abs(1 - 0.62) + 1 / 5 * abs(0 - 0.69) + 1 / 5 * abs(0 - 0.55)
    assert expected == pytest.approx(0.504)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, abs=1e-6)
    metrics = evaluate(nn.Identity(), TensorData(logits, labels), batch_size=2, num_classes=2)
    assert metrics["ece"] == pytest.approx(expected, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(0.4)
    nll = -sum(math.log(v) for v in (0.95, 0.05, 0.62, 0.31, 0.45)) / 5
    assert metrics["loss"] == pytest.approx(nll, rel=1e-5)


# --------------------------------------------------------------------------- two-process DDP

DDP_RUN = """
import json, os, sys, torch
import torch.distributed as dist
torch.set_num_threads(1)
from maxup.methods import build_step
from maxup.train import Trainer, make_optimizer, make_scheduler
from test_train import MLP, METHOD, blobs

rank = int(os.environ["RANK"])
out = sys.argv[1]
torch.manual_seed(100 + rank)  # different initial weights: DDP must broadcast rank 0's
model = MLP()
opt = make_optimizer(model, lr=0.1)
step = build_step(METHOD, model=model, optimizer=opt, num_classes=2)
trainer = Trainer(model, step, blobs(100), test=blobs(25, seed=1), epochs=2, batch_size=16, out_dir=out,
                  num_classes=2, progress=False, device="cpu")
trainer.scheduler = make_scheduler(opt, epochs=2, steps_per_epoch=trainer.steps_per_epoch)
history = trainer.fit()
assert not dist.is_initialized(), "the trainer created the group and must destroy it"
torch.save(model.state_dict(), os.path.join(out, f"params-rank{rank}.pt"))
with open(os.path.join(out, f"history-rank{rank}.json"), "w") as f:
    json.dump({"history": history, "steps": trainer.steps_per_epoch,
               "generator": trainer.generator.get_state().tolist()}, f)
"""


@pytest.mark.slow
def test_two_process_ddp_on_gloo(tmp_path):
    out = run_two_processes(tmp_path, DDP_RUN)

    p0 = torch.load(out / "params-rank0.pt", weights_only=True)
    p1 = torch.load(out / "params-rank1.pt", weights_only=True)
    assert_same_state(p0, p1)  # parameters and broadcast BatchNorm statistics
    assert_same_state(p0, torch.load(out / "model.pt", weights_only=True))
    r0, r1 = (json.loads((out / f"history-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 7  # ceil(200 samples / 2 ranks / batch 16)
    assert untimed(r0["history"]) == untimed(r1["history"])  # metrics reduced across ranks
    assert r0["generator"] != r1["generator"]  # each rank draws its own augmentations
    assert r0["history"][-1]["step"] == 14
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # only rank 0 writes
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["world_size"] == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]
    assert len(load_checkpoint(out / "checkpoints" / "epoch-0002.pt")["rng"]) == 2


# ---------------------------------------------------------------- issue 20: what a resume and a checkpoint promise


def test_resume_with_other_settings_is_refused_and_more_epochs_are_recorded(tmp_path):
    make_trainer(tmp_path, epochs=2, config={"lr": 0.1, "dataset": "blobs", "data_dir": "a"}).fit()
    with pytest.raises(ValueError, match=r"lr 0\.1 -> 0\.2, seed 3 -> 4") as info:
        make_trainer(tmp_path, epochs=2, seed=4,
                     config={"lr": 0.2, "dataset": "blobs", "data_dir": "a"}).fit(resume=True)
    assert "config.yaml" in str(info.value)
    with pytest.raises(ValueError, match=r"dataset 'blobs' -> 'other'"):
        make_trainer(tmp_path, epochs=2, config={"lr": 0.1, "dataset": "other"}).fit(resume=True)
    with pytest.raises(ValueError, match=r"batch_size 32 -> 16"):
        make_trainer(tmp_path, epochs=2, batch_size=16, config={"lr": 0.1, "dataset": "blobs"}).fit(resume=True)
    with pytest.raises(ValueError, match=r"epochs '2 trained' -> 1"):
        make_trainer(tmp_path, epochs=1, config={"lr": 0.1, "dataset": "blobs"}).fit(resume=True)
    # more epochs and another data location may change; the change is recorded in config.yaml
    history = make_trainer(tmp_path, epochs=3, config={"lr": 0.1, "dataset": "blobs", "data_dir": "b"}).fit(resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["resumed"] == [{"after_epoch": 2, "epochs": [2, 3]}] and config["data_dir"] == "b"
    assert load_checkpoint(tmp_path / "checkpoints" / "epoch-0003.pt")["meta"]["resumes"] == config["resumed"]


def test_flipped_tensor_byte_fails_the_checksum_and_resume_falls_back_with_a_message(tmp_path):
    make_trainer(tmp_path, epochs=2).fit()
    newest = tmp_path / "checkpoints" / "epoch-0002.pt"
    weight = load_checkpoint(newest)["model"]["net.1.weight"]
    data = bytearray(newest.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10  # one bit of one weight
    newest.write_bytes(bytes(data))
    assert not torch.equal(torch.load(newest, weights_only=True)["model"]["net.1.weight"], weight)  # torch loads it
    with pytest.raises(CheckpointError, match=r"epoch-0002.pt is corrupt: its content does not match its checksum"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"epoch-0002.pt is corrupt.*previous good checkpoint epoch-0001.pt"):
        history = make_trainer(tmp_path, epochs=2).fit(resume=True)
    assert untimed(history) == untimed(make_trainer(tmp_path / "whole", epochs=2).fit())
    assert load_checkpoint(newest)["epoch"] == 2  # written again, whole


def test_checkpoint_fields_of_the_wrong_type_name_the_field(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    path = tmp_path / "checkpoints" / "epoch-0001.pt"
    state = torch.load(path, weights_only=True)
    state.pop("checksum")
    state["epoch"] = "one"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"entry 'epoch' must be an int >= 0, found str 'one'"):
        load_checkpoint(path)


def test_checkpoint_error_keeps_torchs_whole_message(tmp_path, monkeypatch):
    path = tmp_path / "epoch-0001.pt"
    path.write_bytes(b"x")
    long = "first line\n" + "word " * 100 + "THE END"

    def broken(*args, **kwargs):
        raise RuntimeError(long)

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(CheckpointError, match="THE END"):
        load_checkpoint(path)


class BNBlowsUp(nn.Module):
    """A BatchNorm model whose running variance becomes inf in epoch ``n`` while the training loss stays finite."""

    def __init__(self, n: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.lin = nn.Linear(16, 2)
        self.n, self.calls = n, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 2 * self.n - 1:  # 2 steps per epoch
                x = x * 1e30  # the batch statistics overflow; in training mode the output stays normalised
        return self.lin(self.bn(x))


def test_nonfinite_batchnorm_statistics_are_never_saved_as_good(tmp_path):
    torch.manual_seed(0)
    model = BNBlowsUp(3)
    opt = make_optimizer(model, lr=0.1)
    step = build_step("erm", model=model, optimizer=opt, num_classes=2)
    trainer = Trainer(model, step, blobs(32), test=blobs(10, seed=1), epochs=4, batch_size=32, out_dir=tmp_path,
                      num_classes=2, progress=False, device="cpu")
    with pytest.raises(NonFiniteLossError, match=r"epoch 3 holds non-finite values \(model.bn.running_var") as info:
        trainer.fit()
    assert "last good checkpoint" in str(info.value) and "epoch-0002.pt" in str(info.value)
    assert "model.bn.running_var" in info.value.names
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001.pt", "epoch-0002.pt"]


def test_the_last_good_checkpoint_is_the_last_finite_one(tmp_path):
    from maxup.train import last_good_checkpoint

    make_trainer(tmp_path, epochs=2).fit()
    newest = tmp_path / "checkpoints" / "epoch-0002.pt"
    state = torch.load(newest, weights_only=True)
    state["history"][-1]["test_loss"] = float("nan")  # written by a version without the check
    save_checkpoint(state, newest)
    assert last_good_checkpoint(tmp_path / "checkpoints").name == "epoch-0001.pt"
    with pytest.warns(UserWarning, match=r"history\[epoch 2\].test_loss.*epoch-0001.pt"):
        make_trainer(tmp_path, epochs=2).fit(resume=True)


def test_disk_full_names_the_file_and_says_so(tmp_path, monkeypatch):
    import errno

    import maxup.train.checkpoint as C

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"epoch-0001.pt: no space left on device"):
        save_checkpoint({"epoch": 1}, tmp_path / "epoch-0001.pt")
    with pytest.raises(OSError) as info:
        C.atomic_write_text(tmp_path / "metrics.csv", "a,b\n")
    assert info.value.filename == str(tmp_path / "metrics.csv") and info.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # no temporary file left behind


KILLED_IN_WRITE = """
import sys, time, torch
torch.set_num_threads({threads})
import maxup.train.checkpoint as C
from test_train import make_trainer
real, calls = C.torch.save, []

def slow_save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: write half of it, then hang until killed
        f.write(b"half a checkpoint" * 1000)
        f.flush()
        open({marker!r}, "w").close()
        time.sleep(120)
    return real(obj, f, *args, **kwargs)

C.torch.save = slow_save
make_trainer({out!r}).fit()
"""


@pytest.mark.slow
def test_kill_during_the_checkpoint_write_loses_nothing(tmp_path):
    killed, marker = tmp_path / "killed", tmp_path / "writing"
    script = KILLED_IN_WRITE.format(threads=torch.get_num_threads(), out=str(killed), marker=str(marker))
    kill_when(script, marker, "the checkpoint write did not start within 60 s")
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert len(names) == 2 and names[0].startswith(".epoch-0002.pt.") and names[1] == "epoch-0001.pt"
    assert load_checkpoint(killed / "checkpoints" / "epoch-0001.pt")["epoch"] == 1
    history = make_trainer(killed).fit(resume=True)
    assert untimed(history) == untimed(make_trainer(tmp_path / "whole").fit())
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["epoch-0003.pt", "epoch-0004.pt"]


def test_eval_every_evaluates_every_kth_and_last_epoch_without_changing_training(tmp_path):
    every = make_trainer(None, epochs=5).fit()
    sparse_trainer = make_trainer(tmp_path / "run", epochs=5, eval_every=3)
    sparse = sparse_trainer.fit()
    assert [r["epoch"] for r in sparse if "test_accuracy" in r] == [3, 5]
    for a, b in zip(untimed(every), untimed(sparse), strict=True):  # the same training, fewer evaluations
        assert {k: v for k, v in a.items() if k in b} == b
    assert sparse_trainer.resolved_config()["trainer"]["eval_every"] == 3
    # a resume may change it (it changes no weight)
    assert make_trainer(tmp_path / "run", epochs=6, eval_every=1).fit(resume=True)[-1]["epoch"] == 6
    with pytest.raises(ValueError, match="eval_every"):
        make_trainer(None, eval_every=0)


PADDLES_DDP = """
import os, sys, torch
torch.set_num_threads(1)
from maxup.data import TensorData
from maxup.methods import build_step
from maxup.models import create_model
from maxup.train import Trainer, make_optimizer

g = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 1, 12, 12, generator=g), torch.arange(64) % 3
torch.manual_seed(0)
model = create_model("resnet", input_shape=(1, 12, 12), num_classes=3, depth=8, width=4)
opt = make_optimizer(model, lr=0.1)
step = build_step("paddles(amplitude_stop=0, phase_stop=1)", model=model, optimizer=opt, num_classes=3)
Trainer(model, step, TensorData(x, y), epochs=3, batch_size=8, num_classes=3, progress=False, device="cpu",
        out_dir=sys.argv[1], keep_checkpoints=3).fit()
torch.save(model.state_dict(), os.path.join(sys.argv[1], f"params-rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_paddles_under_ddp_freezes_the_layers_before_its_split(tmp_path):
    """After phase_stop the layers up to PADDLES's split get no gradient: DDP must not wait for them, and they
    stay as they were (no momentum, no weight decay) on every rank."""
    out = run_two_processes(tmp_path, PADDLES_DDP)
    p0, p1 = (torch.load(out / f"params-rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_state(p0, p1)
    after_phase_stop = load_checkpoint(out / "checkpoints" / "epoch-0001.pt")["model"]
    weights = [k for k in p0 if k.endswith(("weight", "bias"))]
    frozen = [k for k in weights if k.startswith(("stem", "layer1", "layer2"))]  # the split: after layer2
    assert frozen and all(torch.equal(after_phase_stop[k], p0[k]) for k in frozen)
    assert not all(torch.equal(after_phase_stop[k], p0[k]) for k in weights if k not in frozen)
