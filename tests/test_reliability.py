"""Bad parameters and bad data give a clear ValueError naming the argument, never a hang, a NaN spread
or a silently wrong target (issue 20)."""
import math

import pytest
import torch

from maxup import ERM, MaxUp
from maxup import augment as A
from maxup import functional as MF
from maxup.functional import _random as R
from maxup.train import make_optimizer, make_scheduler

INF, NAN = math.inf, math.nan


# --------------------------------------------------------------------------- finite parameters, bounded loops


@pytest.mark.parametrize("alpha", [INF, NAN, 0.0, -1.0])
def test_beta_sampler_refuses_non_finite_alpha_instead_of_hanging(alpha):
    with pytest.raises(ValueError, match="concentration"):
        R.beta(alpha, (4,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="alpha"):
        A.Mixup(alpha, num_classes=3)


def test_gamma_rejection_loop_is_bounded(monkeypatch):
    monkeypatch.setattr(R, "rand", lambda shape, **kw: torch.ones(shape, dtype=kw.get("dtype", torch.float32)))
    with pytest.raises(RuntimeError, match="rounds"):  # every candidate rejected: log(1) < ... never holds
        R.gamma(2.0, (3,))


@pytest.mark.parametrize("build, name", [
    (lambda: A.GaussianNoise(INF), "sigma"),
    (lambda: A.Cutout(4, fill=INF), "fill"),
    (lambda: A.Cutout(4, fill=NAN), "fill"),
    (lambda: A.SoftAugmentation(sigma=1e6, num_classes=3), "sigma"),
    (lambda: A.SoftAugmentation(fill=INF, num_classes=3), "fill"),
    (lambda: A.CutMix(alpha=INF, num_classes=3), "alpha"),
    (lambda: make_optimizer(torch.nn.Linear(2, 2), lr=INF), "lr"),
    (lambda: make_optimizer(torch.nn.Linear(2, 2), weight_decay=INF), "weight_decay"),
    (lambda: make_scheduler(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), epochs=2,
                            steps_per_epoch=2, warmup_epochs=INF), "warmup_epochs"),
    (lambda: __import__("maxup").steps.Standard(ERM(), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                                                max_grad_norm=INF), "max_grad_norm"),
])
def test_non_finite_parameters_are_refused_by_name(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_maxup_temperature_inf_still_means_the_plain_average():
    assert MaxUp(A.GaussianNoise(0.1, num_classes=2), m=2, temperature=INF).temperature == INF


def test_soft_augmentation_shift_redraws_are_bounded():
    aug = A.SoftAugmentation(sigma=10.0, num_classes=3, reweight=False)  # the largest sigma: most draws leave the image
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 3, (64,))
    out, t = aug(x, y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and torch.allclose(t.sum(1), torch.ones(64))


# --------------------------------------------------------------------------- options that make no sense for the data


def test_cutout_larger_than_the_image_is_refused():
    with pytest.raises(ValueError, match=r"Cutout size \(10, 10\) is larger than the 8x8"):
        A.Cutout(10, num_classes=3)(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    out, _ = A.Cutout(8, num_classes=3)(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))  # the whole side is fine
    assert out.shape == (2, 1, 8, 8)


def test_crop_padding_as_large_as_the_image_is_refused():
    with pytest.raises(ValueError, match="padding=8"):
        A.RandomCropFlip(8, num_classes=3)(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))


def test_non_finite_fill_does_not_spread_nan_beyond_the_box():
    x = torch.rand(2, 1, 8, 8)
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 3, 3]])
    with pytest.raises(ValueError, match="fill"):
        MF.cutout(x, boxes, fill=INF)
    with pytest.raises(ValueError, match="fill"):
        MF.occlude(x, boxes, fill=NAN)


# --------------------------------------------------------------------------- functional ops: lambdas and boxes


def _batch():
    x = torch.rand(4, 1, 8, 8)
    return x, MF.soft_targets(torch.tensor([0, 1, 2, 0]), 3), torch.tensor([1, 2, 3, 0])


@pytest.mark.parametrize("lam", [1.5, -0.5, NAN, torch.tensor([0.5, 0.5, 2.0, 0.5])])
def test_mixing_weights_outside_unit_interval_are_refused(lam):
    x, t, perm = _batch()
    with pytest.raises(ValueError, match="lam must lie in"):
        MF.mixup(x, t, lam, perm)
    with pytest.raises(ValueError, match="lam must lie in"):
        MF.gmix(x, t, lam, torch.rand(4, 2), perm)
    with pytest.raises(ValueError, match="lam must lie in"):
        MF.hmix(x, t, lam, torch.zeros(4, 4, dtype=torch.long), perm)
    with pytest.raises(ValueError, match="p must lie in"):
        MF.soften_targets(t, lam)


@pytest.mark.parametrize("box", [[0, 0, 9, 4], [-1, 0, 4, 4], [4, 0, 2, 4], [0, 0, 4, 20]])
def test_boxes_outside_the_image_are_refused(box):
    x, t, perm = _batch()
    boxes = torch.tensor([box] * 4)
    for op in (lambda: MF.cutmix(x, t, boxes, perm), lambda: MF.resizemix(x, t, boxes, perm),
               lambda: MF.hmix(x, t, 0.5, boxes, perm), lambda: MF.occlude(x, boxes),
               lambda: MF.lumix(x, t, 0.5, perm, 0.0, boxes=boxes)):
        with pytest.raises(ValueError, match="boxes must satisfy"):
            op()


def test_valid_mixing_never_gives_negative_targets():
    x, t, perm = _batch()
    for out in (MF.mixup(x, t, 0.3, perm)[1], MF.cutmix(x, t, torch.tensor([[0, 0, 8, 8]] * 4), perm)[1],
                MF.hmix(x, t, 1.0, torch.tensor([[2, 2, 4, 4]] * 4), perm)[1]):
        assert (out >= 0).all() and torch.allclose(out.sum(1), torch.ones(4))


# --------------------------------------------------------------------------- objectives: soft targets, empty batch


def test_erm_without_augmentation_checks_soft_targets():
    model = torch.nn.Linear(3, 2)
    x = torch.rand(2, 3)
    with pytest.raises(ValueError, match="sum to 1"):
        ERM()(model, x, torch.tensor([[0.9, 0.9], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="non-negative"):
        ERM()(model, x, torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    assert torch.isfinite(ERM()(model, x, torch.tensor([[0.25, 0.75], [1.0, 0.0]])).loss)


def test_empty_batch_is_refused_not_divided_by_zero():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="non-empty batch"):
        ERM()(model, torch.rand(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty batch"):
        MaxUp(A.GaussianNoise(0.1, num_classes=2), m=2)(model, torch.rand(0, 3), torch.zeros(0, dtype=torch.long))


def test_method_spec_with_a_repeated_key_is_refused():
    from maxup import methods as M

    with pytest.raises(ValueError, match="gives alpha more than once"):
        M.parse("mixup(alpha=0.2, alpha=1.0)")
    with pytest.raises(ValueError, match="cannot parse"):
        M.parse("mixup(**{'alpha': 1})")
