"""Grids across machines: ``maxup compare --storage URL`` enqueues the grid in a database (an Optuna study) and
``maxup worker --storage URL`` processes train it; the report equals a sequential ``maxup compare``'s.

The PostgreSQL tests start a private server (``initdb`` and ``pg_ctl`` on PATH, from ``pg_config --bindir`` or
Debian's /usr/lib/postgresql/*/bin; as root through the ``postgres`` user) and skip without one, unless
MAXUP_REQUIRE_POSTGRES=1 (``.ci/run``) makes a missing or broken server an error.
"""
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from maxup import __version__  # noqa: E402
from maxup.cli import grid, main  # noqa: E402

TINY = ["--test-size", "120", "--train-size", "200", "--batch-size", "64", "--no-progress"]
TIMING = ("time", "train_time", "samples_per_s", "epoch_time", "time_ratio", "train_time_total",
          "train_time_total_std")


def untimed(results: dict) -> dict:
    """results.json without what measures time (it differs between any two runs) and the wall time."""
    return {"budget": results["budget"], "seeds": results["seeds"], "missing": results["missing"],
            "runs": {m: [[{k: v for k, v in e.items() if k not in TIMING} for e in h] for h in hs]
                     for m, hs in results["runs"].items()},
            "summary": [{k: v for k, v in r.items() if k not in TIMING} for r in results["summary"]]}


def read_results(out: Path) -> dict:
    return untimed(json.loads((out / "results.json").read_text()))


def attempts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def trials(url: str) -> list:
    storage = optuna.storages.RDBStorage(url)
    (name,) = grid.study_names(storage)
    return optuna.load_study(study_name=name, storage=storage).get_trials()


# ------------------------------------------------------------------------------------------ PostgreSQL


def _bindir() -> Path | None:
    found = [shutil.which("initdb"), shutil.which("pg_ctl")]
    if all(found):
        return Path(found[0]).parent
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
        if (Path(out) / "initdb").is_file():
            return Path(out)
    except (OSError, subprocess.CalledProcessError):
        pass
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(debian[-1]).parent if debian else None


def _unavailable(reason: str):
    if os.environ.get("MAXUP_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (MAXUP_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server on a unix socket in a temporary folder (trust login as ``postgres``), stopped
    at the end; as root, initdb and the server run as the ``postgres`` user (initdb refuses root)."""
    import importlib.util

    driver = next((d for d in grid.POSTGRES_DRIVERS if importlib.util.find_spec(d) is not None), None)
    if driver is None:
        _unavailable("no PostgreSQL driver for Python (pip install 'maxup[grid]')")
    bindir = _bindir()
    if bindir is None:
        _unavailable("no PostgreSQL server programs (initdb, pg_ctl) found")
    root = Path(tempfile.mkdtemp(prefix="maxup-pg-"))
    as_user = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            _unavailable("running as root and there is no 'postgres' user to run the server")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else None
    port = "5432"  # a unix socket in our own folder: no clash with another server
    pg_ctl = [str(bindir / "pg_ctl"), "-D", str(root / "data")]

    def call(cmd):
        if as_user is None:  # su: one shell command line
            cmd = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(f"'{c}'" for c in cmd)]
        else:
            cmd = as_user + cmd
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    started = time.perf_counter()
    done = call([str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                 "--no-sync"])
    if done.returncode == 0:
        done = call(pg_ctl + ["-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                              f"-p {port} -k {root} -c listen_addresses= -c fsync=off", "start"])
    if done.returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"the PostgreSQL server did not start: {done.stderr.strip()} {log[-500:]}")
    print(f"PostgreSQL {bindir} up in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    try:
        yield {"host": str(root), "port": port, "driver": driver}
    finally:
        call(pg_ctl + ["-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database on the private server, as a ``--storage`` URL."""
    import importlib

    name = f"maxup_{uuid.uuid4().hex[:12]}"
    driver = importlib.import_module(postgres_server["driver"])
    conn = driver.connect(dbname="postgres", user="postgres", host=postgres_server["host"],
                          port=postgres_server["port"])
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    conn.close()
    return f"postgresql://postgres@/{name}?host={postgres_server['host']}&port={postgres_server['port']}"


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'grid.db'}"
    return request.getfixturevalue("postgres_url")


def start_worker(url: str, cwd: Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread, as the tests' own runs
    return subprocess.Popen([sys.executable, "-m", "maxup", "worker", "--storage", url, *extra], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(worker: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = worker.communicate(timeout=timeout)
    assert worker.returncode == 0, out
    return out


# ------------------------------------------------------------------------------------------ one machine, SQLite


def test_a_grid_on_sqlite_is_trained_by_a_worker_into_the_sequential_report(tmp_path, capsys):
    argv = ["compare", "--methods", "erm", "--epochs", "1", "--seeds", "2", *TINY]
    assert main(argv + ["--out", str(tmp_path / "seq")]) == 0
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    enqueue = argv + ["--out", str(tmp_path / "grid"), "--storage", url]
    assert main(enqueue) == 0
    assert "2 waiting (2 enqueued now)" in capsys.readouterr().out
    assert main(enqueue) == 0  # idempotent: nothing added
    assert "(0 enqueued now)" in capsys.readouterr().out
    assert [t.state.name for t in trials(url)] == ["WAITING", "WAITING"]
    assert not (tmp_path / "grid" / "results.json").exists()

    assert main(["worker", "--storage", url]) == 0  # trains both and writes the report (the last run's worker)
    assert read_results(tmp_path / "grid") == read_results(tmp_path / "seq")
    done = trials(url)
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert [t.user_attrs["maxup_run"]["seed"] for t in done] == [0, 1]
    for seed in (0, 1):
        assert [a["start_epoch"] for a in attempts(tmp_path / "grid" / "erm" / f"seed-{seed}")] == [0]

    (tmp_path / "grid" / "results.json").unlink()
    assert main(enqueue) == 0  # again: adds nothing, and writes the report of the finished grid
    assert len(trials(url)) == 2 and read_results(tmp_path / "grid") == read_results(tmp_path / "seq")
    assert main(enqueue + ["--report"]) == 0
    assert read_results(tmp_path / "grid") == read_results(tmp_path / "seq")
    assert main(["worker", "--storage", url]) == 0  # nothing left
    assert "0 runs trained here" in capsys.readouterr().err


def enqueue_one_run(tmp_path) -> tuple[str, list[str]]:
    """A one-run grid (erm, one seed, one epoch) enqueued in SQLite with --out tmp_path/g; returns its URL and the
    command that enqueued it."""
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    argv = ["compare", "--methods", "erm", "--epochs", "1", "--seeds", "1", *TINY, "--out", str(tmp_path / "g"),
            "--storage", url]
    assert main(argv) == 0
    return url, argv


def test_an_interrupted_worker_hands_its_run_back(tmp_path, monkeypatch, capsys):
    url, _ = enqueue_one_run(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(grid, "run", interrupted)
    assert main(["worker", "--storage", url]) == 130
    first, retry = trials(url)
    assert first.state.name == "FAIL" and retry.state.name == "WAITING" and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["maxup_run"] == first.user_attrs["maxup_run"]
    monkeypatch.undo()
    assert main(["worker", "--storage", url]) == 0
    assert [t.state.name for t in trials(url)] == ["FAIL", "COMPLETE"]
    assert (tmp_path / "g" / "results.json").is_file()


def test_a_run_that_fails_is_recorded_and_the_worker_exits_1(tmp_path, monkeypatch, capsys):
    url, argv = enqueue_one_run(tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("disk on fire")

    monkeypatch.setattr(grid, "run", broken)
    assert main(["worker", "--storage", url]) == 1
    assert "erm seed 0: disk on fire" in capsys.readouterr().err
    (failed,) = trials(url)
    assert failed.state.name == "FAIL" and failed.user_attrs["error"] == "ValueError: disk on fire"
    assert main(argv) == 0  # the same command enqueues the failed run again
    assert [t.state.name for t in trials(url)] == ["FAIL", "WAITING"]


def test_bad_storage_study_and_version_are_clear_errors(tmp_path, capsys):
    def error(argv) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "--storage 'nonsense' is not a database URL" in error(["worker", "--storage", "nonsense"])
    assert "unknown kind of database 'foo'" in error(["worker", "--storage", "foo://host/db"])
    assert f"the folder {tmp_path / 'no'} does not exist" in error(
        ["worker", "--storage", f"sqlite:///{tmp_path / 'no' / 'grid.db'}"])
    unreachable = error(["worker", "--storage", "postgresql://me:secret@127.0.0.1:1/grid"])
    assert "--storage postgresql://me:***@127.0.0.1:1/grid: cannot use the database" in unreachable
    assert "secret" not in unreachable

    url = f"sqlite:///{tmp_path / 'grid.db'}"
    assert "holds no maxup grid" in error(["worker", "--storage", url])
    argv = ["compare", "--methods", "erm", "--epochs", "1", "--seeds", "1", *TINY, "--out", str(tmp_path / "g")]
    assert "--study needs --storage" in error(argv + ["--study", "x"])
    assert "--jobs with --storage" in error(argv + ["--storage", url, "--jobs", "2"])
    assert "--force with --storage" in error(argv + ["--storage", url, "--force"])
    assert "--study 'x': no such study" in error(argv + ["--storage", url, "--study", "x", "--report"])
    assert main(argv + ["--storage", url]) == 0
    capsys.readouterr()
    assert "--study 'nope': no such study" in error(["worker", "--storage", url, "--study", "nope"])
    assert "--out needs --study" in error(["worker", "--storage", url, "--out", str(tmp_path)])
    other = error(argv + ["--storage", url, "--lr", "0.1"])
    assert "holds erm seed 0 with other settings (lr 0.05 -> 0.1)" in other and "--study" in other
    assert main(argv + ["--storage", url, "--eval-every", "2"]) == 0  # changes no result: enqueues nothing new
    assert len(trials(url)) == 1
    moved = error(argv[:-1] + [str(tmp_path / "elsewhere"), "--storage", url, "--study", grid.default_study(
        tmp_path / "g")])
    assert "holds the grid of --out" in moved

    storage = optuna.storages.RDBStorage(url)
    (name,) = grid.study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    study.set_user_attr("maxup", dict(study.user_attrs["maxup"], version="0.0.1"))
    old = error(["worker", "--storage", url, "--study", name])
    assert f"--study '{name}'" in old and f"enqueued by maxup 0.0.1 and this worker is maxup {__version__}" in old
    assert "were enqueued by maxup 0.0.1" in error(["worker", "--storage", url])
    assert "enqueued by maxup 0.0.1" in error(argv + ["--storage", url])


# ------------------------------------------------------------------------------------------ several workers


@pytest.mark.slow
def test_two_workers_on_postgresql_train_every_run_once_into_the_sequential_report(tmp_path, postgres_url):
    argv = ["compare", "--methods", "erm,cutout", "--epochs", "2", "--seeds", "2", *TINY]
    assert main(argv + ["--out", str(tmp_path / "seq")]) == 0
    assert main(argv + ["--out", str(tmp_path / "grid"), "--storage", postgres_url, "--heartbeat", "2"]) == 0
    started = time.perf_counter()
    workers = [start_worker(postgres_url, tmp_path) for _ in range(2)]
    logs = [finish(w) for w in workers]
    print(f"two workers: {time.perf_counter() - started:.1f} s\n" + "\n".join(logs), file=sys.stderr)
    done = trials(postgres_url)
    assert [t.state.name for t in done] == ["COMPLETE"] * 4  # no retry, no duplicate: each run once
    keys = sorted((t.user_attrs["maxup_run"]["spec"], t.user_attrs["maxup_run"]["seed"]) for t in done)
    assert keys == sorted((m, s) for m in ("erm", "cutout") for s in (0, 1))
    for method in ("erm", "cutout"):
        for seed in (0, 1):
            run_dir = tmp_path / "grid" / method / f"seed-{seed}"
            assert [a["start_epoch"] for a in attempts(run_dir)] == [0]  # one training, from scratch
            assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
                == [1, 2]
    assert read_results(tmp_path / "grid") == read_results(tmp_path / "seq")
    assert (tmp_path / "grid" / "results.png").is_file() and (tmp_path / "grid" / "results.md").is_file()


@pytest.mark.slow
def test_a_killed_worker_run_is_resumed_by_another_and_trained_once(tmp_path, storage_url):
    epochs = 30
    argv = ["compare", "--methods", "erm", "--epochs", str(epochs), "--seeds", "1", *TINY]
    assert main(argv + ["--out", str(tmp_path / "seq")]) == 0
    assert main(argv + ["--out", str(tmp_path / "grid"), "--storage", storage_url, "--heartbeat", "1"]) == 0
    run_dir = tmp_path / "grid" / "erm" / "seed-0"
    first = start_worker(storage_url, tmp_path)
    deadline = time.monotonic() + 300
    while grid.start_epoch(run_dir) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # mid-run: no chance to hand the run back
    first.communicate()
    killed_at = grid.start_epoch(run_dir)
    assert 2 <= killed_at < epochs, "the worker was not killed mid-run"
    assert [t.state.name for t in trials(storage_url)] == ["RUNNING"]  # until its heartbeat goes stale

    started = time.perf_counter()
    log = finish(start_worker(storage_url, tmp_path))
    print(f"killed at epoch {killed_at}; the second worker took {time.perf_counter() - started:.1f} s\n{log}",
          file=sys.stderr)
    killed, retry = trials(storage_url)
    assert killed.state.name == "FAIL" and retry.state.name == "COMPLETE" and retry.user_attrs["retry_of"] == 0
    assert [a["start_epoch"] for a in attempts(run_dir)] == [0, killed_at]  # resumed, not started again
    assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, epochs + 1))
    assert read_results(tmp_path / "grid") == read_results(tmp_path / "seq")  # resumed = the sequential run
