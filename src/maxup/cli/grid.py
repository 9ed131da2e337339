"""Grids across machines: ``maxup compare --storage URL`` puts the grid of a comparison into a shared database as
an Optuna study, and ``maxup worker --storage URL`` on each machine (or each GPU) trains its runs until none is left.

    maxup compare --storage postgresql://me@db-host/maxup --out /shared/runs/c --methods erm,mixup --seeds 3
    maxup worker --storage postgresql://me@db-host/maxup                  # on each machine, as many as you like
    CUDA_VISIBLE_DEVICES=1 maxup worker --storage postgresql://me@db-host/maxup      # one more on the second GPU
    maxup compare --storage postgresql://me@db-host/maxup --out /shared/runs/c --methods erm,mixup --seeds 3 --report

The study holds one trial per run (method, seed), enqueued as a WAITING trial whose user attribute ``maxup_run``
holds what the run trains with (method, seed, the task's resolved config, its folder); the study's user attribute
``maxup`` holds the grid (task, methods, seeds, the budget line of the report, the output folder, the maxup version
and the heartbeat). A worker claims a WAITING trial (only one worker can: the state change to RUNNING locks the
row), trains the run into ``OUT/<method>/seed-N`` exactly as ``maxup compare`` does (with its checkpoints, so a
run handed to another worker resumes from its last epoch), records the history as the trial's user attribute
``history`` and completes the trial. While it trains, a thread records a heartbeat every ``--heartbeat`` seconds;
a run whose heartbeat is older than twice that (its worker was killed, or lost its machine) is failed by the next
worker that looks for work and queued again as a new trial (``retry_of``), which resumes it. A COMPLETE run is
never trained again: ``maxup compare --storage`` enqueues only the runs that have no WAITING, RUNNING or COMPLETE
trial (running it again adds nothing), and a worker that draws a run another trial already holds gives it up.

The report is :func:`maxup.cli.report.report`, from the histories of the trials (or the run folders): the same
results.json, results.md and results.png as a sequential ``maxup compare`` with the same seeds. The worker that
completes the last run writes it into the grid's output folder; ``maxup compare --storage ... --report`` writes
it at any time from what has finished.

Each worker appends a line to ``attempts.jsonl`` in the run folder when it starts a run (trial, worker, the epoch
it starts from): the record that no run was trained twice.

SQLite (``sqlite:///grid.db``) serves workers on one machine; claims there go through a lock file next to the
database (``grid.db.maxup-lock``), since SQLite cannot lock one row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from .. import __version__
from ..train import list_checkpoints
from .comparison import FREE_KEYS, finished_history, split_budget
from .files import check_writable
from .options import POSITIVE_INT, slug
from .report import report
from .run import run
from .tasks import Task, get_task

#: the study's user attribute that describes the grid
STUDY_KEY = "maxup"
#: the trial's user attribute that describes its run
RUN_KEY = "maxup_run"
#: the seconds between two heartbeats of a running run, unless ``--heartbeat`` says otherwise; a run silent for
#: twice as long is handed to another worker
HEARTBEAT = 60
_EPOCH = re.compile(r"^epoch-(\d+)\.pt$")
#: the drivers of ``postgresql://`` URLs that name none, in order of preference
POSTGRES_DRIVERS = ("psycopg", "psycopg2")
URL_HELP = "sqlite:///PATH.db (one machine) or postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE"


class RunsFailed(RuntimeError):
    """``maxup worker``: some runs ended with an error (each recorded in its trial's ``error`` attribute)."""


# ------------------------------------------------------------------------------------------ the database


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ValueError("--storage needs Optuna and a database driver: pip install 'maxup[grid]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@contextlib.contextmanager
def _quiet():
    """Optuna's ExperimentalWarning and FutureWarning for the heartbeat API are not the user's business."""
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield optuna


def shown_url(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        return parsed.render_as_string(hide_password=True) if parsed.password else str(url)
    except Exception:
        return url


def _sqlite_file(url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def hand_back(study, trial) -> None:
    """The heartbeat-stale callback: the run of a trial whose worker went silent is queued again as a new trial,
    which resumes it from its checkpoints (what Optuna's RetryFailedTrialCallback does, keeping only the run)."""
    run_ = trial.user_attrs.get(RUN_KEY)
    if run_ is not None:
        study.enqueue_trial({}, user_attrs={RUN_KEY: run_, "retry_of": trial.number})


def open_storage(url: str, *, heartbeat: int | None = None):
    """An Optuna ``RDBStorage`` on ``url`` (with ``heartbeat``: stale runs are failed and handed back by
    :func:`hand_back`). Every problem is a ValueError naming ``--storage``: not a URL, an unknown kind of
    database, a missing driver, a server that cannot be reached or refuses the login."""
    with _quiet() as optuna:
        import sqlalchemy
        from sqlalchemy.engine import make_url

        try:
            parsed = make_url(str(url))
        except (sqlalchemy.exc.ArgumentError, ValueError):
            raise ValueError(f"--storage {url!r} is not a database URL: write {URL_HELP}") from None
        shown = parsed.render_as_string(hide_password=True) if parsed.password else str(url)
        engine: dict = {"pool_pre_ping": True}
        if parsed.get_backend_name() == "sqlite":
            if not parsed.database or parsed.database == ":memory:":
                raise ValueError(f"--storage {shown}: an in-memory SQLite database is seen by one process only; "
                                 "give a file, e.g. sqlite:///grid.db")
            folder = Path(parsed.database).absolute().parent
            if not folder.is_dir():
                raise ValueError(f"--storage {shown}: the folder {folder} does not exist")
            engine = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
        elif parsed.drivername == "postgresql":  # no driver named: the one installed (SQLAlchemy's default varies)
            import importlib.util

            driver = next((d for d in POSTGRES_DRIVERS if importlib.util.find_spec(d) is not None), None)
            if driver is None:
                raise ValueError(f"--storage {shown}: no PostgreSQL driver is installed: pip install 'maxup[grid]' "
                                 "(psycopg)")
            url = parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
        kwargs = {}
        if heartbeat is not None:
            import inspect

            params = inspect.signature(optuna.storages.RDBStorage).parameters
            callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
                else "failed_trial_callback"  # Optuna < 4.9
            kwargs = {"heartbeat_interval": int(heartbeat), "grace_period": 2 * int(heartbeat), callback: hand_back}
        try:
            return optuna.storages.RDBStorage(str(url), engine_kwargs=engine, **kwargs)
        except sqlalchemy.exc.NoSuchModuleError:
            raise ValueError(f"--storage {shown}: unknown kind of database {parsed.drivername!r}; write "
                             f"{URL_HELP}") from None
        except ImportError as err:
            cause = err.__cause__ if isinstance(err.__cause__, ImportError) else err
            driver = getattr(cause, "name", None) or "for this database"
            raise ValueError(f"--storage {shown}: the database driver {driver} is not installed: pip install "
                             "'maxup[grid]' (psycopg for PostgreSQL)") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            reason = " ".join(str(getattr(err, "orig", None) or err).split("\n")[0:2]).strip()
            raise ValueError(f"--storage {shown}: cannot use the database: {' '.join(reason.split())}") from None
        except RuntimeError as err:  # Optuna: the tables were written by an incompatible Optuna version
            raise ValueError(f"--storage {shown}: {' '.join(str(err).split())}") from None


@contextlib.contextmanager
def claim_lock(url: str):
    """Serialises claims and enqueues on SQLite (it cannot lock a row: two workers could claim one run);
    PostgreSQL and MySQL lock the trial's row themselves."""
    path = _sqlite_file(url)
    try:
        import fcntl
    except ImportError:  # not POSIX: SQLite there serves one worker
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    with open(f"{path}.maxup-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def study_names(storage) -> list[str]:
    """The names of the studies in ``storage`` that hold a maxup grid, oldest first."""
    return [s.study_name for s in sorted(storage.get_all_studies())
            if STUDY_KEY in s.user_attrs]


def load_grid(storage, name: str, url: str):
    """The study ``name`` and its grid (the ``maxup`` user attribute); errors name ``--study``."""
    with _quiet() as optuna:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            names = study_names(storage)
            listed = f"; grids there: {', '.join(names)}" if names else "; it holds no grid"
            raise ValueError(f"--study {name!r}: no such study in --storage {shown_url(url)}{listed}") from None
    grid = study.user_attrs.get(STUDY_KEY)
    if not isinstance(grid, dict):
        raise ValueError(f"--study {name!r} in --storage {shown_url(url)} is an Optuna study but not a maxup grid: "
                         "choose another --study")
    return study, grid


def run_key(trial) -> tuple[str, int] | None:
    run_ = trial.user_attrs.get(RUN_KEY)
    return None if run_ is None else (run_["spec"], int(run_["seed"]))


def _states():
    from optuna.trial import TrialState

    return TrialState


# ------------------------------------------------------------------------------------------ maxup compare --storage


def default_study(out: Path) -> str:
    """The study of a grid without ``--study``: named after its (absolute) output folder."""
    return f"maxup compare {out}"


def check_compare_args(args) -> None:
    """The options ``--storage`` does not go with, and those that need it."""
    if not getattr(args, "storage", None):
        for option in ("study", "heartbeat"):
            if getattr(args, option, None) is not None:
                raise ValueError(f"--{option} needs --storage URL (a grid in a shared database)")
        return
    if getattr(args, "jobs", 1) != 1:
        raise ValueError("--jobs with --storage: the runs are trained by `maxup worker --storage URL` processes; "
                         "start as many as you want side by side instead")
    if getattr(args, "force", False):
        raise ValueError("--force with --storage: a study never trains a finished run again; to start afresh use "
                         "another --study and --out")


def grid_runs(task: Task, args, specs: list[str]) -> list[dict]:
    """The runs of the grid, seeds outer as in :func:`maxup.cli.comparison.run_comparison`: each with its method,
    seed, config (as the database holds it: JSON) and folder below ``--out``."""
    runs = []
    for seed in range(args.seeds):
        for spec in specs:
            method, own = split_budget(spec)
            config = json.loads(json.dumps({**task.config(args, method, seed), **own}, default=str))
            runs.append({"spec": spec, "seed": seed, "config": config, "dir": f"{slug(spec)}/seed-{seed}"})
    return runs


def _differences(old: dict, new: dict) -> list[str]:
    """The settings ``new`` changes for a run already in the study, besides those that change no result
    (:data:`maxup.cli.comparison.FREE_KEYS`: a waiting run keeps the values it was enqueued with)."""
    keys = sorted((set(old) | set(new)) - set(FREE_KEYS))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def compare_on_storage(task: Task, args, specs: list[str], budget: str, start: float) -> list[dict]:
    """``maxup compare --storage URL``: enqueue the runs of the grid that no trial holds yet (idempotent), and
    write the report when every run has finished (``--report``: whatever has finished, enqueuing nothing)."""
    url, out = args.storage, Path(args.out).absolute()
    name = args.study or default_study(out)
    storage = open_storage(url)
    runs = grid_runs(task, args, specs)
    states = _states()
    with _quiet() as optuna, claim_lock(url):
        if args.report:
            study, grid = load_grid(storage, name, url)
        else:
            direction = "minimize" if task.plot.get("key", "test_accuracy").endswith("perplexity") else "maximize"
            study = optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)
            grid = study.user_attrs.get(STUDY_KEY)
            if grid is None and study.get_trials(deepcopy=False):
                raise ValueError(f"--study {name!r} in --storage {shown_url(url)} is an Optuna study of something "
                                 "else: choose another --study")
        if grid is not None:
            _check_grid(grid, name, url, task, out)
        trials = study.get_trials(deepcopy=False)
        held = {}  # the run of each (method, seed) in the study, and whether a trial still holds it
        for t in trials:
            key = run_key(t)
            if key is not None:
                held.setdefault(key, [t.user_attrs[RUN_KEY], False])
                if t.state in (states.WAITING, states.RUNNING, states.COMPLETE):
                    held[key][1] = True
        for r in runs:
            old = held.get((r["spec"], r["seed"]))
            if old is not None and _differences(old[0]["config"], r["config"]):
                raise ValueError(f"--study {name!r} in --storage {shown_url(url)} holds {r['spec']} seed {r['seed']} "
                                 f"with other settings ({'; '.join(_differences(old[0]['config'], r['config']))}): "
                                 "give the settings it was enqueued with, or another --study and --out")
        added = 0
        if not args.report:
            heartbeat = args.heartbeat or (grid or {}).get("heartbeat") or HEARTBEAT
            study.set_user_attr(STUDY_KEY, {"version": __version__, "task": task.name, "specs": specs,
                                            "seeds": args.seeds, "budget": budget, "out": str(out),
                                            "heartbeat": heartbeat,
                                            "created": (grid or {}).get("created", time.time())})
            for r in runs:
                if not held.get((r["spec"], r["seed"]), [None, False])[1]:
                    study.enqueue_trial({}, user_attrs={RUN_KEY: r})
                    added += 1
    results, missing = gather(study, specs, args.seeds, out)
    if args.report or not missing:
        return report(task, results, Path(args.out), budget, start, missing=missing)
    counts = {s: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in (states.WAITING, states.RUNNING)}
    print(f"study {name!r} in {shown_url(url)}: {len(runs)} runs, {len(runs) - len(missing)} finished, "
          f"{counts[states.RUNNING]} running, {counts[states.WAITING]} waiting ({added} enqueued now).\n"
          f"Train them with `maxup worker --storage {shown_url(url)} --study {name!r}` on each machine (or GPU); "
          f"the worker that finishes the last run writes the report into {args.out} (at any time: this command "
          "with --report).")
    return []


def _check_grid(grid: dict, name: str, url: str, task: Task, out: Path) -> None:
    where = f"--study {name!r} in --storage {shown_url(url)}"
    if grid.get("version") != __version__:
        raise ValueError(f"{where} was enqueued by maxup {grid.get('version')} and this is maxup {__version__}: "
                         f"use maxup {grid.get('version')} (its workers train with it), or another --study")
    if grid.get("task") != task.name:
        raise ValueError(f"{where} holds a grid of --task {grid.get('task')}, not {task.name}: choose another --study")
    if grid.get("out") != str(out):
        raise ValueError(f"{where} holds the grid of --out {grid.get('out')}, not {out}: give that --out, or "
                         "another --study")


def gather(study, specs: list[str], seeds: int, out: Path) -> tuple[dict[str, list], list[str]]:
    """The histories of the grid's finished runs by method, in seed order (from the COMPLETE trials, else from a
    finished run folder), and the runs not finished: what :func:`maxup.cli.report.report` takes."""
    states = _states()
    histories, runs = {}, {}
    for t in study.get_trials(deepcopy=False):
        key = run_key(t)
        if key is None:
            continue
        runs.setdefault(key, t.user_attrs[RUN_KEY])
        if t.state == states.COMPLETE and "history" in t.user_attrs:
            histories.setdefault(key, t.user_attrs["history"])
    results: dict[str, list] = {s: [None] * seeds for s in specs}
    for spec in specs:
        for seed in range(seeds):
            history = histories.get((spec, seed))
            if history is None and (spec, seed) in runs:
                r = runs[(spec, seed)]
                history = finished_history(out / r["dir"], r["config"])
            results[spec][seed] = history
    missing = [f"{spec} seed {seed}" for spec, hs in results.items() for seed, h in enumerate(hs) if h is None]
    return {spec: [h for h in hs if h is not None] for spec, hs in results.items() if any(hs)}, missing


# ------------------------------------------------------------------------------------------ maxup worker


class Heartbeat:
    """Records the heartbeat of a trial every ``interval`` seconds in a thread, from the first at start."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.storage.record_heartbeat(trial_id)
        self.thread = threading.Thread(target=self._beat, daemon=True, name="maxup-heartbeat")
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as err:  # the database is away for a moment: try again at the next beat
                print(f"maxup: warning: heartbeat of trial {self.trial_id} not recorded: {err}", file=sys.stderr)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def start_epoch(run_dir: Path) -> int:
    """The epoch a run in ``run_dir`` resumes from: its newest checkpoint's, 0 without one."""
    found = list_checkpoints(run_dir / "checkpoints")
    return int(_EPOCH.match(found[-1].name).group(1)) if found else 0


class Worker:
    """``maxup worker``: claims the WAITING runs of the grids in ``url`` (``study``: of that one only) and
    trains them until none is waiting or running."""

    def __init__(self, url: str, *, study: str | None = None, out: str | None = None, device: str | None = None,
                 wait: bool = True):
        self.url, self.study_name, self.out, self.device, self.wait = url, study, out, device, wait
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.storages = {None: open_storage(url)}
        self.failed: list[str] = []
        self.trained = 0

    def storage(self, heartbeat: int):
        if heartbeat not in self.storages:
            self.storages[heartbeat] = open_storage(self.url, heartbeat=heartbeat)
        return self.storages[heartbeat]

    def grids(self) -> list[tuple[str, dict]]:
        """(name, grid) of the studies this worker serves: ``--study``, or every grid of this maxup version."""
        base = self.storages[None]
        if self.study_name is not None:
            _, grid = load_grid(base, self.study_name, self.url)
            if grid.get("version") != __version__:
                raise ValueError(f"--study {self.study_name!r} in --storage {shown_url(self.url)} was enqueued by "
                                 f"maxup {grid.get('version')} and this worker is maxup {__version__}: install maxup "
                                 f"{grid.get('version')} here (every run of a grid trains with one version)")
            return [(self.study_name, grid)]
        names = study_names(base)
        if not names:
            raise ValueError(f"--storage {shown_url(self.url)} holds no maxup grid: enqueue one with `maxup compare "
                             "--storage URL ...`")
        with _quiet() as optuna:
            grids = [(n, optuna.load_study(study_name=n, storage=base).user_attrs[STUDY_KEY]) for n in names]
        mine = [(n, g) for n, g in grids if g.get("version") == __version__]
        if not mine:
            versions = sorted({str(g.get("version")) for _, g in grids})
            raise ValueError(f"the grids in --storage {shown_url(self.url)} were enqueued by maxup "
                             f"{', '.join(versions)} and this worker is maxup {__version__}: install that version "
                             "here (or pick a grid with --study)")
        return mine

    def work(self) -> None:
        """Claim and train runs until no grid has a run waiting or running (``wait=False``: waiting)."""
        while True:
            busy = False
            grids = self.grids()
            for name, grid in grids:
                storage = self.storage(int(grid.get("heartbeat") or HEARTBEAT))
                with _quiet() as optuna:
                    study = optuna.load_study(study_name=name, storage=storage)
                    with claim_lock(self.url):
                        optuna.storages.fail_stale_trials(study)  # silent workers' runs go back to the queue
                        claimed = self.claim(study, storage)
                if claimed is not None:
                    self.train(study, storage, grid, *claimed)
                    busy = True
                    break
                states = _states()
                busy = busy or any(t.state == states.RUNNING for t in study.get_trials(deepcopy=False))
            else:
                if not busy or not self.wait:
                    return
                time.sleep(min([5] + [int(g.get("heartbeat") or HEARTBEAT) for _, g in grids]))

    def claim(self, study, storage):
        """A WAITING trial of ``study`` set RUNNING by this worker (the database's row lock makes the claim
        exclusive), with its id; None when none is waiting."""
        import optuna

        states = _states()
        study_id = storage.get_study_id_from_name(study.study_name)
        for t in study.get_trials(deepcopy=False, states=(states.WAITING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            try:
                if storage.set_trial_state_values(trial_id, state=states.RUNNING):
                    return t, trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None

    def _duplicate(self, study, trial, key):
        states = _states()
        for t in study.get_trials(deepcopy=False, states=(states.COMPLETE, states.RUNNING)):
            if t.number != trial.number and run_key(t) == key and \
                    (t.state == states.COMPLETE or t.number < trial.number):
                return t
        return None

    def train(self, study, storage, grid: dict, trial, trial_id: int) -> None:
        """Train the run of ``trial`` into the grid's folder (resuming from its checkpoints) and complete the
        trial with the history; an error fails the trial (recorded in ``error``); an interrupt hands it back."""
        states = _states()
        r = trial.user_attrs[RUN_KEY]
        key = (r["spec"], int(r["seed"]))
        label = f"{r['spec']} seed {r['seed']}"
        other = self._duplicate(study, trial, key)
        if other is not None:  # two trials for one run (two enqueues at once): the older one trains it
            storage.set_trial_user_attr(trial_id, "duplicate_of", other.number)
            storage.set_trial_state_values(trial_id, state=states.PRUNED)
            return
        task = get_task(grid["task"])
        config = dict(r["config"])
        if self.device is not None:
            config["device"] = self.device
        run_dir = Path(self.out or grid["out"]) / r["dir"]
        storage.set_trial_user_attr(trial_id, "worker", self.name)
        beat = Heartbeat(storage, trial_id, int(grid.get("heartbeat") or HEARTBEAT))
        try:
            first = start_epoch(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "attempts.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"study": study.study_name, "trial": trial.number, "worker": self.name,
                                    "start_epoch": first, "time": time.time()}) + "\n")
            print(f"{self.name}: {label} (trial {trial.number}" + (f", from epoch {first}" if first else "") + ")",
                  file=sys.stderr, flush=True)
            history = run(task, config, out_dir=run_dir, resume=first > 0, progress=False)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run goes back to the queue now, not after the grace
            beat.close()
            with _quiet():
                storage.set_trial_state_values(trial_id, state=states.FAIL)
                hand_back(study, storage.get_trial(trial_id))
            print(f"{self.name}: {label} handed back to the grid (the next worker resumes it)", file=sys.stderr)
            raise
        except Exception as err:
            beat.close()
            message = " ".join(str(err).split()) or type(err).__name__
            storage.set_trial_user_attr(trial_id, "error", f"{type(err).__name__}: {message}")
            storage.set_trial_state_values(trial_id, state=states.FAIL)
            self.failed.append(f"{label}: {message}")
            print(f"maxup: warning: {label} failed: {message}", file=sys.stderr, flush=True)
            return
        beat.close()
        metric = task.plot.get("key", "test_accuracy")
        value = history[-1].get(metric) if history else None
        if not isinstance(value, (int, float)) or math.isnan(value):
            value = -math.inf if study.direction.name == "MAXIMIZE" else math.inf
        import optuna

        try:
            storage.set_trial_user_attr(trial_id, "history", history)
            storage.set_trial_state_values(trial_id, state=states.COMPLETE, values=[float(value)])
        except optuna.exceptions.UpdateFinishedTrialError:  # silent past the grace period: handed to another worker
            print(f"maxup: warning: {label} was handed to another worker while this one trained it (no heartbeat "
                  "for longer than the grace period); its run folder holds the finished run", file=sys.stderr)
            return
        self.trained += 1
        print(f"{self.name}: {task.describe(r['spec'], r['seed'], history[-1])}", file=sys.stderr, flush=True)
        self.report_if_done(study, grid)

    def report_if_done(self, study, grid: dict) -> None:
        """After the last run of the grid: its report into the grid's folder."""
        states = _states()
        if any(t.state in (states.WAITING, states.RUNNING) for t in study.get_trials(deepcopy=False)):
            return
        out = Path(self.out or grid["out"])
        results, missing = gather(study, grid["specs"], grid["seeds"], out)
        if results and not missing:
            start = time.perf_counter() - (time.time() - grid.get("created", time.time()))
            report(get_task(grid["task"]), results, out, grid["budget"], start)


def worker(args) -> int:
    """``maxup worker``: train the runs of the grids in ``--storage`` until none is left."""
    if args.out is not None and args.study is None:
        raise ValueError("--out needs --study NAME: each grid has its own output folder")
    w = Worker(args.storage, study=args.study, out=args.out, device=args.device, wait=args.wait)
    if args.out is not None:
        check_writable(Path(args.out), "the grid's runs")
    else:
        for _, grid in w.grids():
            check_writable(Path(grid["out"]), "the grid's runs (give this machine's path to it with --out)")
    previous = None
    if threading.current_thread() is threading.main_thread():
        def stop(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)  # e.g. a preempted machine: hand the run back at once
    try:
        w.work()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(f"{w.name}: nothing left to train ({w.trained} run{'' if w.trained == 1 else 's'} trained here)",
          file=sys.stderr)
    if w.failed:
        raise RunsFailed(f"{len(w.failed)} runs failed: " + "; ".join(w.failed) + " (fix the cause and enqueue them "
                         "again with the same maxup compare --storage command)")
    return 0


def add_compare_options(p: argparse.ArgumentParser) -> None:
    """The options of ``maxup compare`` for a grid in a shared database."""
    g = p.add_argument_group("grids across machines")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="put the grid into this database (an Optuna study) instead of training it here; `maxup "
                        "worker --storage URL` on each machine or GPU trains its runs, and the last one writes the "
                        "report. e.g. postgresql://USER@HOST/DATABASE, or sqlite:///grid.db on one machine")
    g.add_argument("--study", default=None, metavar="NAME",
                   help="the grid's name in --storage (default: 'maxup compare ' and the absolute --out)")
    g.add_argument("--heartbeat", type=POSITIVE_INT, default=None, metavar="SECONDS",
                   help=f"with --storage: how often a worker signals that its run is alive (default: {HEARTBEAT}); "
                        "a run silent for twice as long goes to another worker, which resumes it")


def add_parser(sub) -> argparse.ArgumentParser:
    """The ``worker`` command."""
    p = sub.add_parser("worker", help="train the runs of grids enqueued with `maxup compare --storage`",
                       description="Claim the runs of the grids that `maxup compare --storage URL` enqueued and train "
                                   "them, one at a time, until none is waiting or running; start one per machine or "
                                   "GPU (CUDA_VISIBLE_DEVICES). A run whose worker dies is resumed by another.")
    p.add_argument("--storage", required=True, metavar="URL", help=f"the database of the grid: {URL_HELP}")
    p.add_argument("--study", default=None, metavar="NAME",
                   help="train this grid only (default: every grid in --storage enqueued by this maxup version)")
    p.add_argument("--out", default=None,
                   help="where this machine sees the grid's output folder (default: the --out it was enqueued with)")
    p.add_argument("--device", default=None, help="train on this device, e.g. cuda:1 (default: the grid's --device)")
    p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                   help="while other workers train the last runs, wait to take over any whose worker dies (default); "
                        "--no-wait: stop when no run is waiting")
    p.set_defaults(func=worker)
    return p
