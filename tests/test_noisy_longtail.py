"""Noisy labels and long tails: label-noise generators, label files, the long-tailed profile, class-aware samplers
(also sharded as under DDP), the memorisation and per-class metrics, and the command-line options."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import maxup
from maxup.cli import main
from maxup.cli.report import plot_classes, summarize
from maxup.data import (
    NOISE_PRESETS,
    ClassSampler,
    Loader,
    TensorData,
    add_label_noise,
    asymmetric_noise,
    class_counts,
    class_probabilities,
    from_tensors,
    load_dataset,
    long_tail_counts,
    long_tail_indices,
    pairflip_noise,
    read_label_file,
    sample_indices,
    sample_probabilities,
    shot_accuracy,
    shot_groups,
    shot_thresholds,
    symmetric_noise,
    transition_matrix,
)
from maxup.data.noise import parse_noise_map
from maxup.train.label_metrics import memorisation
from maxup.train.metrics import evaluate

TINY = ["--epochs", "1", "--test-size", "120", "--batch-size", "64", "--no-progress", "--train-size", "200"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def balanced(n_per_class: int, num_classes: int) -> torch.Tensor:
    return torch.arange(num_classes).repeat_interleave(n_per_class)


# --------------------------------------------------------------------------- label noise: rates and structure


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.37, 0.5, 0.8])
def test_symmetric_noise_flips_exactly_the_rate_and_each_class_its_share(rate):
    labels = torch.cat([balanced(97, 10), torch.tensor([3] * 13)])  # uneven classes: 97 or 110 samples
    before = labels.clone()
    noisy = symmetric_noise(labels, rate, 10, gen())
    assert torch.equal(labels, before)  # the input is never edited
    flipped = noisy != labels
    assert int(flipped.sum()) == math.floor(rate * len(labels) + 0.5)
    for c in range(10):
        n_c = int((labels == c).sum())
        assert math.floor(rate * n_c) <= int(flipped[labels == c].sum()) <= math.ceil(rate * n_c)


def test_symmetric_flips_are_uniform_over_the_other_classes():
    labels = balanced(4000, 5)
    noisy = symmetric_noise(labels, 0.5, 5, gen(1))
    for c in range(5):
        new = noisy[(labels == c) & (noisy != labels)]
        assert len(new) == 2000 and not (new == c).any()
        freq = torch.bincount(new, minlength=5).double() / len(new)
        others = [k for k in range(5) if k != c]
        # each other class 1/4; the sd of a frequency over 2000 flips is 0.0097: 4 sd
        assert torch.allclose(freq[others], torch.full((4,), 0.25, dtype=torch.float64), atol=0.04)


def test_asymmetric_noise_follows_the_map_exactly():
    labels = balanced(50, 10)
    mapping = NOISE_PRESETS["cifar10"]
    noisy = asymmetric_noise(labels, 0.3, 10, "cifar10", gen())
    pairs = {(int(a), int(b)) for a, b in zip(labels, noisy) if a != b}
    assert pairs == set(mapping.items())  # truck->automobile, bird->airplane, deer->horse, cat<->dog
    for c in range(10):
        n_flipped = int((noisy[labels == c] != c).sum())
        assert n_flipped == (15 if c in mapping else 0)
    # a map as text; the others classes keep their labels
    noisy = asymmetric_noise(labels, 0.4, 10, "0:1, 1:0", gen())
    assert int((noisy != labels).sum()) == 40 and torch.equal(noisy[labels >= 2], labels[labels >= 2])


def test_pairflip_goes_to_the_next_class_wrapping_around():
    labels = balanced(20, 4)
    noisy = pairflip_noise(labels, 0.25, 4, gen())
    changed = noisy != labels
    assert int(changed.sum()) == 20
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 4)
    assert int(((labels == 3) & (noisy == 0)).sum()) == 5  # C-1 -> 0


def test_noise_is_seeded():
    labels = balanced(30, 10)
    for fn in (lambda g: symmetric_noise(labels, 0.3, 10, g), lambda g: pairflip_noise(labels, 0.3, 10, g),
               lambda g: asymmetric_noise(labels, 0.3, 10, "mnist", g)):
        assert torch.equal(fn(gen(5)), fn(gen(5)))
        assert not torch.equal(fn(gen(5)), fn(gen(6)))


def test_transition_matrix_matches_the_draw():
    t = transition_matrix("symmetric", 0.2, 5)
    assert torch.allclose(t.sum(1), torch.ones(5, dtype=torch.float64))
    assert t[0, 0] == pytest.approx(0.8) and t[0, 1] == pytest.approx(0.05)
    labels = balanced(100, 10)
    noisy = asymmetric_noise(labels, 0.3, 10, "cifar10", gen())
    empirical = torch.zeros(10, 10, dtype=torch.float64)
    empirical.index_put_((labels, noisy), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    assert torch.allclose(empirical / 100, transition_matrix("asymmetric", 0.3, 10, "cifar10"))


def test_add_label_noise_keeps_the_clean_labels():
    data = TensorData(torch.randn(40, 3), balanced(10, 4))
    noisy = add_label_noise(data, 0.5, num_classes=4, noise_type="pairflip", generator=gen())
    assert torch.equal(noisy.clean_y, data.y) and noisy.x is data.x and data.clean_y is None
    assert int(noisy.flipped.sum()) == 20
    assert add_label_noise(data, 0.0, num_classes=4) is data
    with pytest.raises(ValueError, match="already"):
        add_label_noise(noisy, 0.1, num_classes=4)
    with pytest.raises(ValueError, match="clean_y"):
        TensorData(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- label noise in load_dataset


def test_load_dataset_noise_touches_the_training_split_only():
    clean = load_dataset("digits", val_size=0.1, train_size=400, seed=3)
    noisy = load_dataset("digits", val_size=0.1, train_size=400, seed=3, label_noise=0.25)
    assert torch.equal(noisy.train.x, clean.train.x)  # the same samples...
    assert torch.equal(noisy.train.clean_y, clean.train.y)  # ... and their true labels kept
    assert int(noisy.train.flipped.sum()) == round(0.25 * len(clean.train))
    for split in ("val", "test"):
        assert torch.equal(getattr(noisy, split).y, getattr(clean, split).y)
        assert getattr(noisy, split).clean_y is None
    again = load_dataset("digits", val_size=0.1, train_size=400, seed=3, label_noise=0.25)
    other = load_dataset("digits", val_size=0.1, train_size=400, seed=4, label_noise=0.25)
    assert torch.equal(again.train.y, noisy.train.y)
    assert not torch.equal(other.train.flipped, noisy.train.flipped)


def test_load_dataset_asymmetric_uses_the_dataset_preset_or_the_map():
    d = load_dataset("digits", label_noise=0.3, noise_type="asymmetric")
    pairs = {(int(a), int(b)) for a, b in zip(d.train.clean_y, d.train.y) if a != b}
    assert pairs == set(NOISE_PRESETS["digits"].items())
    d = load_dataset("digits", label_noise=0.3, noise_map="1:7")  # a map alone means asymmetric
    assert {(int(a), int(b)) for a, b in zip(d.train.clean_y, d.train.y) if a != b} == {(1, 7)}
    with pytest.raises(ValueError, match="no preset map for tensors.*--noise-map"):
        from_tensors(np.random.rand(40, 3), np.arange(40) % 4, label_noise=0.2, noise_type="asymmetric")


def test_noisy_label_files(tmp_path):
    base = load_dataset("digits", normalize=False)
    labels = base.train.y.clone()
    labels[:100] = (labels[:100] + 1) % 10
    text = tmp_path / "noisy.txt"
    text.write_text("\n".join(map(str, labels.tolist())) + "\n\n")
    np.save(tmp_path / "noisy.npy", labels.numpy())
    for path in (text, tmp_path / "noisy.npy"):
        d = load_dataset("digits", noisy_labels=path, val_size=0.2, train_size=1000)
        assert torch.equal(d.train.y != d.train.clean_y, d.train.flipped)
        full = load_dataset("digits", noisy_labels=path)
        assert torch.equal(full.train.y, labels) and torch.equal(full.train.clean_y, base.train.y)
        assert d.val.clean_y is None  # the validation split keeps the true labels
        assert torch.equal(d.val.y, load_dataset("digits", val_size=0.2, train_size=1000).val.y)
    assert torch.equal(read_label_file(text, num_samples=len(labels), num_classes=10), labels)
    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(ValueError, match=r"noisy_labels \(--noisy-labels\).*holds 2 labels.*1348 samples"):
        load_dataset("digits", noisy_labels=tmp_path / "short.txt")
    bad = labels.clone()
    bad[7] = 12
    np.save(tmp_path / "bad.npy", bad.numpy())
    with pytest.raises(ValueError, match="entry 7 .* is class 12, but the dataset has 10 classes"):
        load_dataset("digits", noisy_labels=tmp_path / "bad.npy")
    (tmp_path / "word.txt").write_text("1\ncat\n")
    with pytest.raises(ValueError, match="line 2 .* 'cat', not an integer"):
        read_label_file(tmp_path / "word.txt", num_samples=2, num_classes=10)
    np.save(tmp_path / "float.npy", np.zeros(3))
    with pytest.raises(ValueError, match="1-D integer array"):
        read_label_file(tmp_path / "float.npy", num_samples=3, num_classes=10)
    with pytest.raises(ValueError, match="no such file"):
        read_label_file(tmp_path / "missing.txt", num_samples=3, num_classes=10)


@pytest.mark.parametrize("kwargs, message", [
    ({"label_noise": 1.0}, r"label_noise \(--label-noise\) must be a noise rate in \[0, 1\)"),
    ({"label_noise": -0.1}, r"label_noise \(--label-noise\)"),
    ({"label_noise": float("nan")}, r"label_noise \(--label-noise\)"),
    ({"label_noise": 0.2, "noise_type": "uniform"}, r"noise_type \(--noise-type\) must be one of"),
    ({"label_noise": 0.2, "noise_map": "12:1"}, r"noise_map \(--noise-map\) names class 12, but there are 10"),
    ({"label_noise": 0.2, "noise_map": "3:3"}, r"maps class 3 to itself"),
    ({"label_noise": 0.2, "noise_map": "3:4,3:5"}, r"gives class 3 twice"),
    ({"label_noise": 0.2, "noise_map": "3-4"}, r"cannot read '3-4'"),
    ({"label_noise": 0.2, "noise_map": "1:2", "noise_type": "pairflip"}, r"is for noise_type='asymmetric'"),
    ({"noise_type": "pairflip"}, r"noise_type \(--noise-type\) needs a noise rate"),
    ({"noisy_labels": "x.txt", "label_noise": 0.1}, r"do not combine it with label_noise"),
    ({"imbalance": 0.5}, r"imbalance \(--imbalance\) must be an imbalance ratio >= 1"),
    ({"imbalance": float("inf")}, r"imbalance \(--imbalance\)"),
    ({"imbalance": 200}, r"imbalance \(--imbalance\) 200 leaves class 9 with no training sample.*at most 130"),
])
def test_bad_noise_and_imbalance_settings_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", **kwargs)


# --------------------------------------------------------------------------- long tails


def test_long_tail_profile_counts():
    # floor(n_max * ratio ** (-c / (C - 1))): the published CIFAR-LT sizes
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(long_tail_counts(5000, 10, 100)) == 12406
    assert sum(long_tail_counts(5000, 10, 50)) == 13996
    assert sum(long_tail_counts(5000, 10, 10)) == 20431
    assert sum(long_tail_counts(500, 100, 100)) == 10847
    for n_max, k, ratio in ((134, 10, 10), (37, 7, 3.5), (500, 100, 100), (10, 2, 1)):
        expected = [math.floor(n_max * ratio ** (-c / (k - 1)) + 1e-9) for c in range(k)]
        assert long_tail_counts(n_max, k, ratio) == expected
        assert expected[0] == n_max and expected[-1] == math.floor(n_max / ratio + 1e-9)


def test_long_tail_indices_draw_the_profile_seeded():
    labels = torch.cat([balanced(60, 5), torch.tensor([0] * 7)])  # class 0 has 67: n_max is the smallest, 60
    idx = long_tail_indices(labels, 10, 5, generator=gen())
    assert class_counts(labels[idx], 5).tolist() == long_tail_counts(60, 5, 10) == [60, 33, 18, 10, 6]
    assert torch.equal(idx, idx.sort().values) and len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, long_tail_indices(labels, 10, 5, generator=gen()))
    assert not torch.equal(idx, long_tail_indices(labels, 10, 5, generator=gen(1)))
    with pytest.raises(ValueError, match="class 4 has no training sample"):
        long_tail_indices(labels[labels < 4], 2, 5)


def test_load_dataset_imbalance_keeps_val_and_test_balanced():
    clean = load_dataset("digits", val_size=0.1)
    d = load_dataset("digits", val_size=0.1, imbalance=10)
    n_max = int(class_counts(clean.train.y, 10).min())
    assert class_counts(d.train.y, 10).tolist() == long_tail_counts(n_max, 10, 10)
    assert torch.equal(d.val.y, clean.val.y) and torch.equal(d.test.y, clean.test.y)
    both = load_dataset("digits", val_size=0.1, imbalance=10, label_noise=0.2)
    assert torch.equal(both.train.clean_y, d.train.y)  # the profile is drawn on the true labels, then the noise
    assert int(both.train.flipped.sum()) == round(0.2 * len(d.train))


def test_shot_groups_and_accuracy():
    assert shot_thresholds(500) == (100.0, 20.0) and shot_thresholds(5000) == (100.0, 20.0)
    assert shot_thresholds(134) == pytest.approx((26.8, 5.36))  # scaled by 134 / 500 on small data
    assert shot_groups([500, 101, 100, 20, 19]) == ["many", "many", "medium", "medium", "few"]
    out = shot_accuracy([10, 8, 3, 0], [10, 10, 10, 0], [600, 150, 10, 5])
    assert out["class_accuracy"] == [1.0, 0.8, 0.3, None]
    assert out["many_accuracy"] == pytest.approx(0.9) and "medium_accuracy" not in out
    assert out["few_accuracy"] == pytest.approx(0.3)


# --------------------------------------------------------------------------- samplers


def test_class_probabilities_follow_their_definitions():
    counts = torch.tensor([400, 100, 25, 0])
    expected = {"instance": [400, 100, 25], "sqrt": [20, 10, 5], "class": [1, 1, 1],
                "reversed": [1 / 400, 1 / 100, 1 / 25]}
    for name, weights in expected.items():
        w = torch.tensor(weights + [0], dtype=torch.float64)
        assert torch.allclose(class_probabilities(counts, name), w / w.sum()), name
    probs = sample_probabilities(torch.tensor([0, 0, 0, 1]), "class")
    assert torch.allclose(probs, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2], dtype=torch.float64))
    with pytest.raises(ValueError, match="sampler must be one of instance, sqrt, class, reversed"):
        class_probabilities(counts, "balanced")


@pytest.mark.parametrize("sampler", ["instance", "class", "sqrt", "reversed", -0.5])
def test_loader_sampler_frequencies_match_their_definition(sampler):
    labels = torch.tensor([0] * 300 + [1] * 80 + [2] * 20)
    loader = Loader(TensorData(torch.arange(400.0)[:, None], labels), batch_size=100, seed=0, sampler=sampler)
    seen = torch.cat([y for _ in range(25) for _, y in loader])  # 25 epochs of 400 draws
    freq = torch.bincount(seen, minlength=3).double() / len(seen)
    expected = class_probabilities(torch.tensor([300, 80, 20]), sampler)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)  # sd of a frequency <= 0.0025 here
    if sampler == "instance":  # a permutation: every sample once per epoch
        x = torch.cat([x for x, _ in loader]).flatten()
        assert torch.equal(x.sort().values, torch.arange(400.0))


def test_weighted_sampler_is_seeded_per_epoch_and_resumable():
    data = TensorData(torch.randn(50, 2), torch.tensor([0] * 45 + [1] * 5))
    a, b = Loader(data, 8, seed=3, sampler="class"), Loader(data, 8, seed=3, sampler="class")
    assert torch.equal(a.indices(4), b.indices(4))
    assert not torch.equal(a.indices(4), a.indices(5))
    b.set_epoch(2)
    first = [y for _, y in a][0]  # epoch 0
    assert torch.equal(first, data.y[a.indices(0)[:8]])
    assert torch.equal(torch.cat([y for _, y in b]), data.y[a.indices(2)])
    with pytest.raises(ValueError, match="shuffle=False"):
        Loader(data, 8, shuffle=False, sampler="class")
    with pytest.raises(ValueError, match="Loader: sampler must be one of"):
        Loader(data, 8, sampler="minority")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_shards_across_ranks_like_distributed_sampler(world_size):
    data = TensorData(torch.randn(101, 2), torch.tensor([0] * 90 + [1] * 11))
    whole = Loader(data, 4, seed=7, sampler="reversed")
    shards = [Loader(data, 4, seed=7, sampler="reversed", rank=r, world_size=world_size) for r in range(world_size)]
    parts = [s.indices(3) for s in shards]
    assert len({len(p) for p in parts}) == 1 and len({len(s) for s in shards}) == 1  # same steps on every rank
    order = whole.indices(3)
    padded = torch.cat([order, order[: len(parts[0]) * world_size - len(order)]])
    interleaved = torch.stack(parts, 1).flatten()  # rank r holds positions r, r + W, ...
    assert torch.equal(interleaved, padded)


def test_paired_batches_and_class_sampler():
    data = TensorData(torch.arange(200.0)[:, None], torch.tensor([0] * 180 + [1] * 20))
    loader = Loader(data, 20, seed=1)
    pairs = list(loader.paired("reversed"))
    assert len(pairs) == len(loader) == 10 and loader.epoch == 1
    first = torch.cat([y for (_, y), _ in pairs])
    second = torch.cat([y2 for _, (_, y2) in pairs])
    assert int((first == 1).sum()) == 20  # the instance order: every sample once
    assert int((second == 1).sum()) > 150  # reversed: class 1 drawn with probability 0.9
    loader.set_epoch(0)
    again = [y2 for _, (_, y2) in loader.paired("reversed")]
    assert all(torch.equal(a, b[1][1]) for a, b in zip(again, pairs))  # seeded: the same second batches
    other = loader.resampled("class")
    assert other.x.data_ptr() == loader.x.data_ptr() and other.batch_size == 20  # no copy of the data
    sampler = ClassSampler(data.y, "class")
    drawn = data.y[sampler.draw(4000, gen())]
    assert abs(float((drawn == 1).double().mean()) - 0.5) < 0.04
    idx = sample_indices(data.y, 450, "instance", generator=gen())
    assert torch.equal(torch.bincount(idx[:400], minlength=200), torch.full((200,), 2))


# --------------------------------------------------------------------------- metrics


class Oracle(nn.Module):
    """Predicts the class written in a sample's first feature (plus a trainable bias to keep an optimizer busy)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return 10.0 * nn.functional.one_hot(x[:, 0].long(), self.num_classes).float() + 0.0 * self.bias


def test_memorisation_by_hand():
    # 6 samples; 4 flipped. The model predicts: the noisy label for 2 flipped, the true one for 1, another for 1.
    pred = torch.tensor([0, 2, 1, 3, 2, 1])
    clean = torch.tensor([0, 1, 1, 2, 3, 1])
    noisy = torch.tensor([0, 2, 0, 3, 0, 1])  # flipped: 1, 2, 3, 4
    data = TensorData(pred[:, None].float(), noisy, clean)
    out = memorisation(Oracle(4), data, batch_size=2)
    assert out == {"noisy_memorised": pytest.approx(2 / 4), "noisy_true_accuracy": pytest.approx(1 / 4)}
    assert memorisation(Oracle(4), TensorData(data.x, clean, clean)) == {}
    assert memorisation(Oracle(4), TensorData(data.x, clean)) == {}


def test_evaluate_per_class_sums():
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    out = evaluate(Oracle(3), TensorData(pred[:, None].float(), y), num_classes=3, batch_size=4, per_class=True)
    assert out["class_correct"] == [1, 2, 0] and out["class_total"] == [2, 3, 1]
    assert out["accuracy"] == pytest.approx(3 / 6)


def test_a_tiny_noisy_long_tailed_run_reports_memorisation_and_class_metrics():
    torch.manual_seed(0)
    splits = load_dataset("digits", train_size=300, imbalance=5, label_noise=0.3, seed=1)
    model = maxup.models.create_model("mlp", input_shape=splits.input_shape, num_classes=10)
    history = maxup.fit(model, "erm", train=splits.train, test=splits.test, epochs=2, batch_size=32, progress=False,
                        class_metrics=True, sampler="class", lr=0.1)
    last = history[-1]
    # by hand, on the trained model: the flipped training samples and the test set
    flipped = splits.train.flipped
    with torch.no_grad():
        model.eval()
        pred = model(splits.train.x[flipped]).argmax(-1)
        test_pred = model(splits.test.x).argmax(-1)
    assert last["noisy_memorised"] == pytest.approx(float((pred == splits.train.y[flipped]).double().mean()))
    assert last["noisy_true_accuracy"] == pytest.approx(float((pred == splits.train.clean_y[flipped]).double().mean()))
    counts = class_counts(splits.train.clean_y, 10)
    assert last["train_class_counts"] == counts.tolist() == long_tail_counts(int(counts[0]), 10, 5)
    by_class = [float((test_pred[splits.test.y == c] == c).double().mean()) for c in range(10)]
    assert last["test_class_accuracy"] == pytest.approx(by_class)
    many, few = shot_thresholds(int(counts.max()))
    groups = shot_groups(counts, (many, few))
    for group in ("many", "medium", "few"):
        members = torch.tensor([g == group for g in groups])
        mask = members[splits.test.y]
        if mask.any():
            assert last[f"test_{group}_accuracy"] == pytest.approx(float((test_pred[mask] == splits.test.y[mask])
                                                                        .double().mean()))
        else:
            assert f"test_{group}_accuracy" not in last
    assert "train_class_counts" not in history[0] and "noisy_memorised" in history[0]


# --------------------------------------------------------------------------- command line


def test_cli_records_the_settings_and_refuses_a_resume_that_changes_them(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--label-noise", "0.2", "--noise-type", "pairflip", "--imbalance", "4",
            "--class-sampler", "reversed", *TINY]
    assert main(argv) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["label_noise"], config["noise_type"], config["imbalance"]) == (0.2, "pairflip", 4.0)
    assert config["class_sampler"] == "reversed" and config["trainer"]["sampler"] == "reversed"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"noisy_memorised", "noisy_true_accuracy", "test_class_accuracy", "train_class_counts"} <= set(record)
    capsys.readouterr()
    for old, new in (("0.2", "0.3"), ("4", "5"), ("reversed", "class")):
        again = [new if a == old else a for a in argv]
        again[again.index("--epochs") + 1] = "2"
        assert main(again + ["--resume"]) == 2
        assert "cannot resume" in capsys.readouterr().err
    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), *TINY]) == 0
    keys = set(yaml.safe_load((plain / "config.yaml").read_text()))
    assert not keys & {"label_noise", "noise_type", "noise_map", "noisy_labels", "imbalance", "class_sampler"}
    argv = ["train", "--out", str(plain), "--label-noise", "0.1", "--resume", *TINY]
    argv[argv.index("--epochs") + 1] = "2"
    assert main(argv) == 2 and "label_noise '(not set)' -> 0.1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--label-noise", "1"], "argument --label-noise: must be a noise rate in [0, 1)"),
    (["--imbalance", "0.9"], "argument --imbalance: must be a finite number >= 1"),
    (["--noise-type", "uniform"], "argument --noise-type: invalid choice"),
    (["--label-noise", "0.1", "--noise-map", "9:12"], "noise_map (--noise-map) names class 12"),
    (["--imbalance", "500"], "imbalance (--imbalance) 500 leaves class 9 with no training sample"),
    (["--noisy-labels", "missing.txt"], "noisy_labels (--noisy-labels): no such file missing.txt"),
])
def test_cli_errors_name_the_option(argv, message, capsys):
    assert main(["train", *argv, "--epochs", "1"]) == 2
    assert message in capsys.readouterr().err


def test_compare_budget_table_and_class_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "erm", "--seeds", "1", "--out", str(out), "--label-noise", "0.2",
            "--imbalance", "4", *TINY]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["budget"].endswith("label noise 0.2 symmetric, long tail ratio 4")
    row = results["summary"][0]
    assert {"noisy_memorised", "test_class_accuracy", "train_class_counts", "test_many_accuracy"} <= set(row)
    assert (out / "results_classes.png").stat().st_size > 0
    assert "noisy labels memorised (%)" in capsys.readouterr().out
    # the budget holds the settings: a comparison resumed with other noise does not reuse these runs
    assert main([a if a != "0.2" else "0.3" for a in argv] + ["--resume"]) == 2
    assert "label_noise 0.2 -> 0.3" in capsys.readouterr().err


def test_report_class_means_and_plot(tmp_path):
    run = [{"epoch": 1, "train_time": 1.0, "test_accuracy": 0.5, "test_class_accuracy": [1.0, None],
            "train_class_counts": [100, 10]}]
    other = [dict(run[0], test_class_accuracy=[0.5, 0.0])]
    rows = summarize({"erm": [run, other]}, "erm")
    assert rows[0]["test_class_accuracy"] == [0.75, 0.0] and rows[0]["train_class_counts"] == [100, 10]
    assert plot_classes(rows, tmp_path / "c.png", "t") and (tmp_path / "c.png").stat().st_size > 0
    assert not plot_classes(summarize({"erm": [[{"epoch": 1, "train_time": 1.0}]]}, "erm"), tmp_path / "d.png", "t")


def test_noise_map_parsing():
    assert parse_noise_map("fashion-mnist", 10) == {0: 6, 2: 4, 5: 7}
    assert parse_noise_map({1: 2}, 3) == {1: 2}
    with pytest.raises(ValueError, match="empty"):
        parse_noise_map(" , ", 10)


def test_a_changed_label_file_is_a_changed_setting(tmp_path, capsys):
    labels = load_dataset("digits", normalize=False).train.y.clone()
    labels[:50] = (labels[:50] + 1) % 10
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(map(str, labels.tolist())))
    argv = ["train", "--out", str(tmp_path / "run"), "--noisy-labels", str(path), *TINY]
    assert main(argv) == 0
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["noisy_labels"] == str(path) and config["noisy_train_labels"]["flipped"] > 0
    labels[50:100] = (labels[50:100] + 1) % 10  # the same file name, other labels
    path.write_text("\n".join(map(str, labels.tolist())))
    argv[argv.index("--epochs") + 1] = "2"
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2 and "noisy_train_labels" in capsys.readouterr().err


def test_language_modelling_refuses_the_image_options():
    import argparse

    from maxup.cli.tasks import LM

    with pytest.raises(ValueError, match="--imbalance is an option of image classification"):
        LM.config(argparse.Namespace(imbalance=10.0), "erm", 0)
