"""``maxup tune`` and :mod:`maxup.tune`: the search space from the registry's declarations, ``--space``, a real
study on digits that resumes and refuses other data, the budget, the pruner, and a test set never read."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from maxup import methods as M
from maxup import tune as T
from maxup.cli import main
from maxup.cli.tasks import IMAGE
from maxup.registry import REGISTRY, Choice, Range, register, search_range
from maxup.train import fit

optuna = pytest.importorskip("optuna")

TINY = ["--dataset", "digits", "--train-size", "200", "--val-size", "60", "--epochs", "3", "--batch-size", "32",
        "--optimizer", "adamw", "--lr", "0.01", "--model-opt", "channels=(8,16)", "--no-progress", "--min-epochs", "1"]
METHODS = ["--methods", "erm,mixup,maxup(m=2)+gaussian"]


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 3))


def images(n=24, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.arange(n) % 3


# ------------------------------------------------------------------------------------------ the space


def test_the_terms_declare_their_search_space_next_to_their_constructor():
    space = {name: {k: str(v) for k, v in REGISTRY[name].search_space().items()}
             for name in ("maxup", "mixup", "cutmix", "fmix", "cutout", "gaussian", "sam", "asam", "ema")}
    assert space["maxup"] == {"m": "2..8(int)", "temperature": "0|0.1|0.5|2"}
    assert space["mixup"] == space["cutmix"] == space["fmix"] == {"alpha": "0.1..2(log)"}
    assert space["cutout"] == {"size": "2..16(int)"} and space["gaussian"] == {"sigma": "0.05..1(log)"}
    assert space["sam"] == {"rho": "0.01..0.5(log)"} and space["asam"] == {"rho": "0.1..2(log)"}  # asam's own
    assert set(space["ema"]) == {"decay"} and isinstance(REGISTRY["ema"].search_space()["decay"], Choice)
    for name, entry in REGISTRY.items():  # every declaration names an option of the spec
        assert set(entry.search_space()) <= set(entry.options()), name


def test_every_declared_range_builds_and_trains_at_its_ends():
    names = ["mixup", "cutmix", "fmix", "hmix", "cutout", "cropflip", "gaussian", "smooth", "maxup(m=2)+gaussian",
             "maxup(temperature=0.1)+gaussian", "sam", "asam", "ema"]
    x, y = images()
    T.check_values(T.candidates(names), T.step_probe(tiny_cnn, (x, y), 3))


def test_register_refuses_a_search_space_that_is_not_an_option_or_not_a_range():
    from maxup.augment import Augmentation

    class Bad(Augmentation):
        search_space = {"strength": (0.1, 1.0)}

        def __init__(self, sigma: float = 0.1, *, num_classes=None, p: float = 1.0):
            super().__init__(num_classes=num_classes, p=p)

    with pytest.raises(ValueError, match="names 'strength', which is not an option"):
        register("bad_space", "x")(Bad)
    Bad.search_space = {"sigma": (1.0, 0.1)}
    with pytest.raises(ValueError, match="runs from low to high"):
        register("bad_space", "x")(Bad)
    assert "bad_space" not in REGISTRY
    assert search_range((1, 4, "int")) == Range(1, 4, integer=True)
    with pytest.raises(ValueError, match="unknown scale 'cubic'"):
        search_range((1, 4, "cubic"))


def test_a_spec_keeps_its_fixed_arguments_and_searches_its_other_declared_options():
    cands = T.candidates("mixup,cutmix(alpha=0.4),maxup(m=4)+cutout,sam,erm")
    assert [str(c) for c in cands] == ["mixup", "cutmix(alpha=0.4)", "maxup(m=4)+cutout", "sam", "erm"]
    assert [c.names for c in cands] == [["mixup.alpha"], [], ["maxup.temperature", "cutout.size"], ["sam.rho"], []]
    spec = cands[2].build({"maxup.temperature": 0.1, "cutout.size": 3})
    assert str(spec) == "maxup(m=4, temperature=0.1)+cutout(size=3)" and spec == M.parse(str(spec))
    assert str(cands[0].build({"mixup.alpha": 0.123456})) == "mixup(alpha=0.123)"  # what trained is what is written
    assert cands[2].defaults() == {"maxup.temperature": 0.0}  # cutout's size=None lies outside 2..16: sampled
    assert [p.name for p in T.candidates("cutout+cutout")[0].params] == ["cutout.size", "cutout#2.size"]


def test_space_narrows_widens_and_fixes_options():
    cands = T.candidates("mixup,maxup+gaussian", space=["mixup.alpha=0.2..1", "maxup.m=2|4,gaussian.sigma=0.3",
                                                        "mixup.p=0.5..1(linear)"])
    ranges = {p.name: p.range for c in cands for p in c.params}
    assert ranges["mixup.alpha"] == Range(0.2, 1, log=True)  # no scale written: the declared one
    assert ranges["mixup.p"] == Range(0.5, 1)  # an option no class declares
    assert ranges["maxup.m"] == Choice((2, 4)) and ranges["gaussian.sigma"] == Choice((0.3,))
    assert ranges["maxup.temperature"] == Choice((0.0, 0.1, 0.5, 2.0))
    assert all(p.given == (p.name != "maxup.temperature") for c in cands for p in c.params)
    warmup = T.candidates("maxup+gaussian", space="maxup.warmup_steps=0..10")[0].params
    assert next(p for p in warmup if p.name == "maxup.warmup_steps").range == Range(0, 10, integer=True)  # int default


@pytest.mark.parametrize("space, message", [
    ("mixup.alpha", "write TERM.OPTION=LOW..HIGH"),
    ("mixup.alpha=2..1", "runs from low to high"),
    ("mixup.alpha=0..2(log)", "a log range needs low > 0"),
    ("mixup.alpha=0.1..2(lg)", "unknown scale 'lg'"),
    ("mixup.alpha=a..b", "cannot read the value"),
    ("mixup.alpha=1, mixup.alpha=2", "gives mixup.alpha twice"),
    ("mixup.alpah=0.1..2", "mixup has no option 'alpah'; options: alpha"),
    ("cutmix.alpha=0.1..2", "no candidate has the term cutmix"),
    ("nothing.alpha=1", "unknown method 'nothing'"),
    ("maxup.m=2..8", "maxup.m is fixed in every candidate that has maxup"),
    ("mixup.alpha=0.5..2(int)", "whole-number ends"),
])
def test_space_errors_name_the_entry_and_the_fix(space, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        T.candidates("mixup,maxup(m=4)+gaussian", space=space)


def test_a_space_outside_the_valid_values_is_refused():
    x, y = images(size=8)
    probe = T.step_probe(tiny_cnn, (x, y), 3)
    with pytest.raises(ValueError, match=r"--space mixup.alpha=-1..2 is outside the valid values of mixup: "
                                         r"alpha=-1 .*> 0"):
        T.check_values(T.candidates("mixup", space="mixup.alpha=-1..2(linear)"), probe)
    with pytest.raises(ValueError, match=r"--space ema.decay=0.99\|1 is outside the valid values of ema: decay=1"):
        T.check_values(T.candidates("ema", space="ema.decay=0.99|1"), probe)
    with pytest.raises(ValueError, match=r"outside the valid values of cutout: size=9 .*larger than the 8x8 images"):
        T.check_values(T.candidates("cutout", space="cutout.size=1..9"), probe)
    with pytest.raises(ValueError, match=r"declared search range cutout.size=2..16\(int\) of cutout does not fit here.*"
                                         r"narrow it with --space cutout.size=LOW..HIGH"):
        T.check_values(T.candidates("cutout"), probe)  # 8x8 digits: the declared range needs narrowing
    T.check_values(T.candidates("cutout", space="cutout.size=1..4"), probe)


# ------------------------------------------------------------------------------------------ the trainer's hook


def test_on_epoch_sees_each_record_and_can_stop_training():
    x, y = images(n=12, size=8)
    seen = []
    history = fit(tiny_cnn(), "erm", train=(x, y), val=(x, y), epochs=3, batch_size=6, on_epoch=seen.append,
                  progress=False)
    assert seen == history and [r["epoch"] for r in seen] == [1, 2, 3]

    class Stop(Exception):
        pass

    def stop(record):
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(tiny_cnn(), "erm", train=(x, y), val=(x, y), epochs=5, batch_size=6, on_epoch=stop, progress=False)
    with pytest.raises(ValueError, match="on_epoch must be a function"):
        fit(tiny_cnn(), "erm", train=(x, y), epochs=1, on_epoch=3)


# ------------------------------------------------------------------------------------------ the search


def _mock_train(good="erm", epochs=6, calls=None):
    """A train_fn whose validation accuracy is 0.9 per epoch for ``good`` and 0.1 for anything else."""
    def train_fn(spec, on_epoch):
        history = []
        for epoch in range(1, epochs + 1):
            record = {"epoch": epoch, "val_accuracy": 0.9 if str(spec) == good else 0.1, "train_time": 0.0}
            history.append(record)
            if calls is not None:
                calls.append((str(spec), epoch))
            on_epoch(dict(record))
        return history
    return train_fn


@pytest.mark.parametrize("pruner", ["halving", "hyperband", "median"])
def test_the_pruner_stops_a_clearly_worse_trial_after_a_few_epochs(pruner):
    cands = T.candidates("erm,mixup")
    with T.quiet():
        study = T.open_study(None, "s", settings={}, pruner=pruner, epochs=6, min_epochs=1, seed=0)
        for _ in range(3):
            study.enqueue_trial({"method": "erm"})
        calls = []
        T.run_search(cands, _mock_train(calls=calls), study=study, epochs=6, n_trials=10)
    state = optuna.trial.TrialState
    pruned = [t for t in study.trials if t.state == state.PRUNED]
    assert pruned and all(t.params["method"] == "mixup" and len(t.intermediate_values) < 6 for t in pruned)
    assert all(t.state == state.COMPLETE for t in study.trials if t.params["method"] == "erm")
    assert T.best_spec(study) == "erm" and T.spent(study) == 10
    assert sum(1 for spec, _ in calls if spec != "erm") < 6 * sum(1 for t in study.trials
                                                                  if t.params["method"] == "mixup")


def test_the_candidates_as_written_train_to_the_end_and_a_spec_trains_once():
    cands = T.candidates("erm,mixup")
    calls = []
    with T.quiet():
        study = T.open_study(None, "s", settings={}, pruner="halving", epochs=6, min_epochs=1, seed=0)
        T.run_search(cands, _mock_train(calls=calls), study=study, epochs=6, n_trials=8)
    first = study.trials[1]
    assert first.user_attrs["defaults"] and first.user_attrs["spec"] == "mixup(alpha=1.0)"
    assert first.state.name == "COMPLETE" and len(first.intermediate_values) == 6  # bad, but the reference
    again = [t for t in study.trials if t.params["method"] == "erm" and t.number > 0]
    assert again and all(t.user_attrs["same_as"] == 0 and t.value == 0.9 for t in again)
    assert sum(1 for spec, _ in calls if spec == "erm") == 6  # erm trained once


def test_a_zero_budget_is_refused(capsys):
    with T.quiet():
        study = T.open_study(None, "s", settings={}, epochs=2, min_epochs=1)
    for budget, message in [({"n_trials": 0}, "a budget of zero"), ({"timeout": 0}, "a budget of zero"),
                            ({}, "give a budget")]:
        with pytest.raises(ValueError, match=message):
            T.run_search(T.candidates("erm"), _mock_train(), study=study, epochs=2, **budget)
    assert main(["tune", "--trials", "0", "--out", "unused"]) == 2
    assert "--trials: a budget of 0 searches nothing" in capsys.readouterr().err
    assert main(["tune", "--timeout", "0", "--out", "unused"]) == 2
    assert "--timeout: a budget of 0 searches nothing" in capsys.readouterr().err
    assert main(["tune", "--val-size", "0", "--out", "unused"]) == 2
    assert "never the test set" in capsys.readouterr().err


def test_resume_requeues_an_interrupted_trial_and_refuses_other_settings(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    settings = {"dataset": "digits", "epochs": 6}
    with T.quiet():
        study = T.open_study(storage, "s", settings=settings, epochs=6, min_epochs=1)

        def interrupted(spec, on_epoch):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            T.run_search(T.candidates("erm,mixup"), interrupted, study=study, epochs=6, n_trials=4)
        with pytest.raises(ValueError, match="already holds the study 's': pass --resume"):
            T.open_study(storage, "s", settings=settings, epochs=6, min_epochs=1)
        with pytest.raises(ValueError, match="other settings: dataset 'digits' -> 'fashion-mnist'"):
            T.open_study(storage, "s", settings={**settings, "dataset": "fashion-mnist"}, resume=True, epochs=6,
                         min_epochs=1)
        with pytest.raises(ValueError, match="no study 'other' to resume"):
            T.open_study(storage, "other", settings=settings, resume=True, epochs=6, min_epochs=1)
        study = T.open_study(storage, "s", settings=settings, resume=True, epochs=6, min_epochs=1)
        T.run_search(T.candidates("erm,mixup"), _mock_train(), study=study, epochs=6, n_trials=4)
    trials = study.trials
    again = [t for t in trials if t.user_attrs.get("requeued_from") == 0]
    assert trials[0].state.name == "FAIL" and len(again) == 1 and again[0].state.name == "COMPLETE"
    assert again[0].params == trials[0].params == {"method": "erm"}  # the interrupted trial ran again
    assert trials[1].params == {"method": "mixup", "mixup.alpha": 1.0}  # the queue of the first session went on
    assert T.spent(study) == 4 and len(trials) == 5


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_a_tiny_study_on_digits_writes_its_report_resumes_and_refuses_other_data(tmp_path, capsys):
    out = tmp_path / "tune"
    argv = ["tune", *METHODS, *TINY, "--out", str(out)]
    assert main([*argv, "--trials", "3"]) == 0
    printed = capsys.readouterr()
    best = json.loads((out / "best.json").read_text())
    assert M.canonical(best["spec"]) == best["spec"] and f"best: {best['spec']}" in printed.out
    assert best["settings"]["candidates"] == ["erm", "mixup", "maxup(m=2)+gaussian"]
    assert best["settings"]["data"]["train"] == 140 and best["settings"]["data"]["val"] == 60
    assert 0 < best["value"] <= 1 and sum(best["trials"].values()) == 3
    for name in ("study.db", "trials.md", "history.png", "importance.png"):
        assert (out / name).is_file(), name
    table = (out / "trials.md").read_text()
    assert "| rank | trial | method spec | valid accuracy (%) |" in table and f"`{best['spec']}`" in table
    assert printed.err.count("trial ") >= 3
    storage = f"sqlite:///{out / 'study.db'}"

    assert main([*argv, "--trials", "3"]) == 2  # the study is there: --resume or --force
    assert "holds a search: pass --resume" in capsys.readouterr().err
    assert main([*argv, "--trials", "5", "--resume"]) == 0
    capsys.readouterr()
    study = optuna.load_study(storage=storage, study_name="maxup-tune")
    assert T.spent(study) == 5 and len(study.trials) == 5  # two more trials in the same study
    assert sum(json.loads((out / "best.json").read_text())["trials"].values()) == 5

    other = [a if a != "200" else "300" for a in argv]  # another subset of the data: another dataset
    assert main([*other, "--trials", "6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume the study 'maxup-tune'" in err and "train_size 200 -> 300" in err and "hash" in err
    assert main([*argv, "--trials", "2", "--force"]) == 0  # starts over
    assert T.spent(optuna.load_study(storage=storage, study_name="maxup-tune")) == 2


@pytest.mark.slow
def test_the_objective_never_reads_the_test_set(tmp_path, monkeypatch, capsys):
    """The test split is poisoned: any read fails the run. The best value is the validation accuracy that
    `maxup train` records for the best spec with the same seed and split."""
    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"the test set was read ({name})")

        def __len__(self):
            raise AssertionError("the test set was read (len)")

    load = type(IMAGE).load
    monkeypatch.setattr(type(IMAGE), "load", lambda self, config: dataclasses.replace(load(self, config),
                                                                                     test=Poisoned()))
    out = tmp_path / "tune"
    assert main(["tune", *METHODS, *TINY, "--trials", "2", "--pruner", "none", "--out", str(out)]) == 0
    best = json.loads((out / "best.json").read_text())
    monkeypatch.setattr(type(IMAGE), "load", load)
    run = tmp_path / "run"
    assert main(["train", "--method", best["spec"], *TINY[:-2], "--out", str(run)]) == 0
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_accuracy"] == best["value"]
    capsys.readouterr()


def test_search_in_the_library_trains_with_fit_and_never_takes_a_test_set():
    x, y = images(n=30, size=8)
    with pytest.raises(ValueError, match="never reads a test set"):
        T.search("erm", model_fn=tiny_cnn, train=(x, y), val=(x, y), epochs=1, n_trials=1, test=(x, y))
    with T.quiet():
        study = T.search("erm,gaussian", model_fn=tiny_cnn, train=(x[:20], y[:20]), val=(x[20:], y[20:]), epochs=2,
                         n_trials=3, batch_size=10, pruner="none")
    assert T.spent(study) == 3 and T.best_spec(study) is not None
    assert study.user_attrs["settings"]["candidates"] == ["erm", "gaussian"]


def test_a_spec_with_a_weight_average_is_judged_by_the_average():
    record = {"epoch": 3, "val_accuracy": 0.5, "ema_val_accuracy": 0.7}
    assert T.score(record, M.parse("erm+ema")) == 0.7 and T.score(record, M.parse("erm")) == 0.5
    assert T.score({"epoch": 1, "val_accuracy": 0.5}, M.parse("erm+swa(start=2)")) == 0.5  # before SWA starts
