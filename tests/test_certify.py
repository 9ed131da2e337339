"""Randomized smoothing: bounds against scipy, radii against the closed form of a linear classifier,
batch-size independence, bad input, and ``maxup certify`` end to end on digits."""
import csv
import json

import pytest
import torch
from scipy import stats
from torch import nn

from maxup.certify import (
    ABSTAIN,
    NOISE_CHUNK,
    Smooth,
    certified_accuracy,
    certify_from_counts,
    certify_many,
    clopper_pearson_lower,
    predict_from_counts,
    sample_counts,
)
from maxup.cli import main
from maxup.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """f(x) = 1 if w.x + b > 0 else 0, as two logits (0, w.x + b)."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], dim=1)


def linear_case(p: float, sigma: float, d: int = 10):
    """A linear classifier and a point x where P(f(x + e) = 1) = p; the smoothed radius there is |w.x + b| / ||w||."""
    w = torch.linspace(-1.0, 2.0, d, dtype=torch.float64).float()
    b = 0.3
    margin = sigma * stats.norm.ppf(p)  # signed distance of x to the hyperplane
    x0 = -b * w / w.dot(w)  # on the hyperplane
    x = x0 + margin * w / w.norm()
    return Linear(w, b), x, abs(float(w.dot(x) + b)) / float(w.norm())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("k, n", [(1, 1), (5, 10), (99, 100), (100, 100), (9_871, 10_000), (12, 100_000)])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_matches_the_beta_quantile_and_the_binomial_tail(k, n, alpha):
    lower = clopper_pearson_lower(k, n, alpha)
    assert lower == pytest.approx(stats.beta.ppf(alpha, k, n - k + 1), rel=1e-12, abs=1e-15)
    # the defining property: at p = lower, k or more successes have probability alpha
    assert stats.binom.sf(k - 1, n, lower) == pytest.approx(alpha, rel=1e-6)
    assert lower < k / n


def test_clopper_pearson_edges():
    assert clopper_pearson_lower(0, 50, 0.001) == 0.0
    assert clopper_pearson_lower(50, 50, 0.001) == pytest.approx(0.001 ** (1 / 50))


def test_tied_classes_abstain():
    assert predict_from_counts(torch.tensor([50, 50, 0]), 0.001) == ABSTAIN
    assert predict_from_counts(torch.tensor([0, 7, 7]), 0.99) == ABSTAIN  # a tie has p-value 1
    assert predict_from_counts(torch.tensor([3, 90, 7]), 0.001) == 1
    assert certify_from_counts(torch.tensor([10, 10]), torch.tensor([500, 500]), 0.5, 0.001) == (ABSTAIN, 0.0)


def test_smoothed_classifier_abstains_on_the_boundary():
    model, x, _ = linear_case(0.5, sigma=0.5)
    smooth = Smooth(model, num_classes=2, sigma=0.5)
    assert smooth.predict(x, n=2_000, alpha=0.001, generator=gen()) == ABSTAIN
    assert smooth.certify(x, n0=100, n=2_000, alpha=0.001, generator=gen()) == (ABSTAIN, 0.0)


# ------------------------------------------------------------------------------------------ radii


def test_linear_classifier_radius_approaches_the_exact_one_from_below():
    sigma = 0.5
    model, x, exact = linear_case(0.9, sigma)
    smooth = Smooth(model, num_classes=2, sigma=sigma)
    gaps = []
    for n in (100, 1_000, 10_000, 100_000):
        label, radius = smooth.certify(x, n0=100, n=n, alpha=0.001, batch_size=10_000, generator=gen(n))
        assert label == 1
        assert 0 < radius < exact
        gaps.append(exact - radius)
    # the bound tightens like 1/sqrt(n): compare n a factor 100 apart, far beyond the sampling noise
    assert gaps[2] < gaps[0] and gaps[3] < gaps[1]
    assert gaps[-1] < 0.03 * exact


def test_radius_is_sigma_times_the_normal_quantile_of_the_bound():
    counts0, counts = torch.tensor([2, 98]), torch.tensor([40, 960])
    label, radius = certify_from_counts(counts0, counts, 0.25, 0.001)
    assert label == 1
    assert radius == pytest.approx(0.25 * stats.norm.ppf(stats.beta.ppf(0.001, 960, 41)), rel=1e-9)


def test_certified_accuracy_counts_correct_points_at_each_radius():
    records = [{"label": 1, "prediction": 1, "radius": 0.6}, {"label": 0, "prediction": 0, "radius": 0.25},
               {"label": 2, "prediction": 1, "radius": 0.9}, {"label": 3, "prediction": ABSTAIN, "radius": 0.0}]
    assert certified_accuracy(records, [0.0, 0.25, 0.5, 1.0]) == [0.5, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="empty"):
        certified_accuracy([], [0.0])


# ------------------------------------------------------------------------------------------ sampling


def test_counts_follow_the_documented_noise_stream():
    model, x, _ = linear_case(0.7, sigma=0.5)
    n = 2 * NOISE_CHUNK + 37
    g = gen(3)
    noise = torch.cat([torch.randn((min(NOISE_CHUNK, n - i), *x.shape), generator=g)
                       for i in range(0, n, NOISE_CHUNK)])
    expected = torch.bincount(model(x + 0.5 * noise).argmax(1), minlength=2)
    counts = sample_counts(model, x, n, 0.5, num_classes=2, batch_size=64, generator=gen(3))
    assert counts.tolist() == expected.tolist()
    assert counts.dtype == torch.int64 and counts.sum() == n


@pytest.mark.parametrize("make", ["linear", "conv"])
def test_same_generator_same_results_for_every_batch_size(make):
    if make == "linear":
        model, x, _ = linear_case(0.7, sigma=0.5)
        smooth = Smooth(model, num_classes=2, sigma=0.5)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 10))
        x = torch.rand(1, 7, 7)  # 49 values: torch's CPU randn stream depends on how rows are split
        smooth = Smooth(model, num_classes=10, sigma=0.5)
    answers = {bs: (smooth.sample(x, 1_234, bs, generator=gen(1)).tolist(),
                    smooth.certify(x, 100, 1_234, 0.001, bs, generator=gen(2)),
                    smooth.predict(x, 1_234, 0.001, bs, generator=gen(2)))
               for bs in (1_000, 7, 100, 250, 5_000)}
    first = answers[1_000]
    assert all(a == first for a in answers.values()), answers
    assert max(first[0]) < 1_000  # the noise matters at this point: several classes come up


def test_sampling_leaves_the_model_and_input_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_inference_mode_enabled())))
    stats_before = model[2].running_mean.clone()
    x = torch.rand(4)
    x_before = x.clone()
    Smooth(model, num_classes=3, sigma=0.5).certify(x, 10, 50, 0.01, batch_size=20, generator=gen())
    assert seen and all(s == (False, True) for s in seen)
    assert model.training and torch.equal(model[2].running_mean, stats_before)
    assert torch.equal(x, x_before)


def test_certify_many_gives_each_point_its_own_stream():
    model, x, _ = linear_case(0.8, sigma=0.5)
    smooth = Smooth(model, num_classes=2, sigma=0.5)
    xs, ys = torch.stack([x, -x, x]), torch.tensor([1, 0, 1])
    every = list(certify_many(smooth, xs, ys, n0=20, n=500, alpha=0.01))
    assert [r["index"] for r in every] == [0, 1, 2]
    last = list(certify_many(smooth, xs, ys, n0=20, n=500, alpha=0.01, batch_size=33, indices=[2]))
    assert (last[0]["prediction"], last[0]["radius"]) == (every[2]["prediction"], every[2]["radius"])
    assert every[0]["radius"] != every[2]["radius"]  # same input, independent noise
    assert all(r["correct"] == (r["prediction"] == r["label"]) for r in every)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("call, message", [
    (lambda s, x: Smooth(s.model, 2, 0.0), "sigma must be > 0"),
    (lambda s, x: Smooth(s.model, 2, -0.5), "sigma must be > 0"),
    (lambda s, x: s.certify(x, 0, 100, 0.001), "n0 must be an integer >= 1"),
    (lambda s, x: s.certify(x, 10, 0, 0.001), "n must be an integer >= 1"),
    (lambda s, x: s.predict(x, 0, 0.001), "n must be an integer >= 1"),
    (lambda s, x: s.certify(x, 10, 100, 0.0), "alpha must be a probability strictly between 0 and 1"),
    (lambda s, x: s.certify(x, 10, 100, 1.0), "alpha"),
    (lambda s, x: s.predict(x, 10, 1.5), "alpha"),
    (lambda s, x: Smooth(s.model, 3, 0.5).certify(x, 10, 100, 0.001), "num_classes=3"),
    (lambda s, x: s.certify(x.long(), 10, 100, 0.001), "floating-point"),
    (lambda s, x: Smooth(lambda v: v, 2, 0.5), "torch.nn.Module"),
    (lambda s, x: clopper_pearson_lower(11, 10, 0.001), "k must be at most n"),
])
def test_bad_input_is_a_clear_error(call, message):
    model, x, _ = linear_case(0.8, sigma=0.5)
    with pytest.raises(ValueError, match=message):
        call(Smooth(model, 2, 0.5), x)


# ------------------------------------------------------------------------------------------ command line

TINY = ["--epochs", "1", "--test-size", "60", "--batch-size", "64", "--no-progress"]
CERT = ["--n0", "10", "--n", "100", "--alpha", "0.01", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, method in (("gauss", "gaussian(sigma=0.25)"), ("maxup", "maxup(m=4)+gaussian(sigma=0.25)")):
            assert main(["train", "--method", method, "--out", str(root / name), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def test_certify_command_writes_consistent_files(runs, tmp_path, capsys):
    out = tmp_path / "cert"
    argv = ["certify", str(runs / "gauss"), str(runs / "maxup"), "--limit", "6", "--out", str(out), *CERT]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| r=0 | r=0.25 | r=0.5 | r=0.75 | r=1 | abstain | s/example |" in printed
    assert "maxup(m=4)+gaussian(sigma=0.25)" in printed and "standardised" in printed
    for name in ("certify.csv", "certify.json", "certify.png"):
        assert (out / name).stat().st_size > 0
    result = json.loads((out / "certify.json").read_text())
    assert result["radii"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = list(csv.DictReader((out / "certify.csv").open()))
    assert [r["method"] for r in rows] == ["gaussian(sigma=0.25)", "maxup(m=4)+gaussian(sigma=0.25)"]
    for run, row in zip(result["runs"], rows):
        acc, records = run["certified_accuracy"], run["records"]
        assert run["points"] == len(records) == 6 and run["sigma"] == run["train_sigma"] == 0.25
        assert [r["index"] for r in records] == list(range(6))
        assert acc == sorted(acc, reverse=True)  # never grows with the radius
        assert acc[0] <= 1 - run["abstain"] + 1e-12
        assert acc == certified_accuracy(records, result["radii"])
        assert acc == [float(row[f"certified_accuracy@{r:g}"]) for r in result["radii"]]
        assert all((r["prediction"] == ABSTAIN) == (r["radius"] == 0.0) for r in records)
        assert all(r["radius"] <= 0.25 * stats.norm.ppf(0.01 ** (1 / 100)) + 1e-9 for r in records)

    # never over earlier results; --resume keeps the certified points and continues
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err
    assert main(argv[:4] + ["8"] + argv[5:] + ["--resume", "--batch-size", "30"]) == 0
    again = json.loads((out / "certify.json").read_text())
    for before, after in zip(result["runs"], again["runs"]):
        assert after["records"][:6] == before["records"] and after["points"] == 8
    # a fresh run with another batch size certifies the same points identically
    other = tmp_path / "other"
    assert main(["certify", str(runs / "gauss"), "--limit", "8", "--batch-size", "7", "--out", str(other), *CERT]) == 0
    fresh = json.loads((other / "certify.json").read_text())["runs"][0]["records"]
    assert [(r["prediction"], r["radius"]) for r in fresh] == \
        [(r["prediction"], r["radius"]) for r in again["runs"][0]["records"]]


def test_certify_sigma_option_and_radii(runs, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["certify", str(runs / "gauss"), "--sigma", "0.5", "--radii", "0,0.3", "--limit", "2",
                 "--out", str(out), *CERT]) == 0
    result = json.loads((out / "certify.json").read_text())
    assert result["radii"] == [0.0, 0.3]
    assert result["runs"][0]["sigma"] == 0.5 and result["runs"][0]["train_sigma"] == 0.25


@pytest.mark.parametrize("args, message", [
    (["--sigma", "0"], "argument --sigma: must be a finite number > 0"),
    (["--sigma", "-1"], "argument --sigma: must be a finite number > 0"),
    (["--sigma", "inf"], "argument --sigma: must be a finite number > 0"),
    (["--n", "0"], "argument --n: must be an integer >= 1"),
    (["--n0", "0"], "argument --n0: must be an integer >= 1"),
    (["--alpha", "0"], "--alpha must lie strictly between 0 and 1"),
    (["--alpha", "1"], "--alpha"),
    (["--limit", "0"], "argument --limit: must be an integer >= 1"),
])
def test_certify_bad_options_are_clear_errors(runs, tmp_path, capsys, args, message):
    assert main(["certify", str(runs / "gauss"), "--out", str(tmp_path / "x"), *CERT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxup: error:") and message in err


def test_certify_needs_a_finished_run_with_a_model(runs, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    assert main(["certify", str(bare), "--out", str(tmp_path / "x"), *CERT]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.yaml").write_text((runs / "gauss" / "config.yaml").read_text())
    assert main(["certify", str(half), "--out", str(tmp_path / "x"), *CERT]) == 2
    assert "holds no model" in capsys.readouterr().err
    assert main(["certify", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *CERT]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_certify_needs_a_sigma_when_the_run_had_no_noise(tmp_path, capsys):
    run = tmp_path / "erm"
    assert main(["train", "--method", "erm", "--out", str(run), *TINY]) == 0
    assert main(["certify", str(run), "--out", str(tmp_path / "x"), *CERT]) == 2
    assert "pass --sigma" in capsys.readouterr().err


def test_certify_rejects_a_model_with_another_number_of_outputs(runs, tmp_path, capsys):
    run = tmp_path / "wide"
    run.mkdir()
    (run / "config.yaml").write_text((runs / "gauss" / "config.yaml").read_text())
    model = create_model("cnn", input_shape=(1, 8, 8), num_classes=12)
    torch.save(model.state_dict(), run / "model.pt")
    assert main(["certify", str(run), "--out", str(tmp_path / "x"), *CERT]) == 2
    assert "does not load" in capsys.readouterr().err


def test_help_lists_the_certify_options(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = capsys.readouterr().out
    for option in ("--sigma", "--n0", "--n ", "--alpha", "--limit", "--batch-size", "--out", "--resume", "--progress"):
        assert option in text


# ------------------------------------------------------------------------------------------ issue 20: NaN abstains


class NaNModel(nn.Module):
    """Logits NaN wherever ``bad(x)`` holds (per row), else class 1 with a wide margin."""

    def __init__(self, bad):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.bad = bad

    def forward(self, x):
        out = torch.tensor([0.0, 10.0]).expand(x.shape[0], 2).clone() + self.w
        out[self.bad(x)] = float("nan")
        return out


def test_nan_input_or_nan_outputs_abstain():
    x = torch.zeros(3)
    always = Smooth(NaNModel(lambda b: torch.ones(b.shape[0], dtype=torch.bool)), 2, 0.25)
    assert always.certify(x, 10, 100, 0.01, generator=gen()) == (ABSTAIN, 0.0)
    assert always.predict(x, 100, 0.01, generator=gen()) == ABSTAIN
    never = Smooth(NaNModel(lambda b: torch.zeros(b.shape[0], dtype=torch.bool)), 2, 0.25)
    assert never.certify(x, 10, 100, 0.01, generator=gen())[0] == 1
    assert never.certify(torch.tensor([0.0, float("nan"), 0.0]), 10, 100, 0.01, generator=gen()) == (ABSTAIN, 0.0)
    assert never.predict(torch.full((3,), float("inf")), 100, 0.01, generator=gen()) == ABSTAIN
    # NaN outputs on part of the noise count against the top class: the radius shrinks, never grows
    half = Smooth(NaNModel(lambda b: b[:, 0] > 0), 2, 0.25)
    label, radius = half.certify(x, 10, 1000, 0.01, generator=gen())
    assert label == ABSTAIN and radius == 0.0  # about half the votes are NaN: p_A <= 1/2
    assert int(half.sample(x, 1000, generator=gen()).sum()) < 1000
