"""Each functional op against its formula, with fixed lambda, permutation and boxes."""
import math

import pytest
import torch
import torch.nn.functional as F

from maxup import functional as MF
from maxup.functional import _random as R


def _batch(b=5, c=3, h=8, w=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    t = MF.soft_targets(torch.randint(0, classes, (b,), generator=g), classes)
    return x, t


def test_soft_targets_one_hot_and_smoothing():
    t = MF.soft_targets(torch.tensor([0, 2]), 3, smoothing=0.3)
    expected = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])
    assert torch.allclose(t, expected)
    soft = torch.tensor([[0.25, 0.75, 0.0]])
    assert torch.equal(MF.soft_targets(soft, 3), soft)


def test_soft_cross_entropy_matches_torch_and_reductions():
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    t = MF.soft_targets(y, 5)
    assert torch.allclose(MF.soft_cross_entropy(logits, t), F.cross_entropy(logits, y))
    assert torch.allclose(MF.soft_cross_entropy(logits, y, "none"), F.cross_entropy(logits, y, reduction="none"))
    assert torch.allclose(MF.soft_cross_entropy(logits, t, "sum"), F.cross_entropy(logits, y, reduction="sum"))
    soft = torch.softmax(torch.randn(6, 5), 1)
    manual = -(soft * torch.log_softmax(logits, 1)).sum(1)
    assert torch.allclose(MF.soft_cross_entropy(logits, soft, "none"), manual)
    with pytest.raises(ValueError, match="reduction"):
        MF.soft_cross_entropy(logits, t, "avg")


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_formula(per_sample):
    x, t = _batch()
    perm = torch.tensor([2, 0, 4, 1, 3])
    lam = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]) if per_sample else 0.3
    xm, tm = MF.mixup(x, t, lam, perm)
    lam_v = torch.as_tensor(lam).expand(5)
    for i in range(5):
        assert torch.allclose(xm[i], lam_v[i] * x[i] + (1 - lam_v[i]) * x[perm[i]])
        assert torch.allclose(tm[i], lam_v[i] * t[i] + (1 - lam_v[i]) * t[perm[i]])


def test_mixup_any_shape():
    x = torch.randn(3, 7)
    t = MF.soft_targets(torch.tensor([0, 1, 2]), 3)
    xm, tm = MF.mixup(x, t, 0.25, torch.tensor([1, 2, 0]))
    assert torch.allclose(xm, 0.25 * x + 0.75 * x[[1, 2, 0]])


def test_cutmix_formula_and_lambda_from_clipped_box():
    x, t = _batch(h=8, w=6)
    perm = torch.tensor([1, 2, 3, 4, 0])
    boxes = torch.tensor([[0, 0, 4, 3], [2, 1, 8, 6], [0, 0, 0, 0], [0, 0, 8, 6], [5, 5, 6, 6]])
    xm, tm, lam = MF.cutmix(x, t, boxes, perm)
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        expected = x[i].clone()
        expected[:, y0:y1, x0:x1] = x[perm[i], :, y0:y1, x0:x1]
        assert torch.equal(xm[i], expected)
        area = (y1 - y0) * (x1 - x0)
        assert lam[i].item() == pytest.approx(1 - area / 48)
        assert torch.allclose(tm[i], lam[i] * t[i] + (1 - lam[i]) * t[perm[i]])


def test_sample_boxes_clip_to_image_and_lambda_recomputed():
    area = torch.full((200,), 0.5)
    boxes = MF.sample_boxes(area, 10, 10, generator=torch.Generator().manual_seed(0))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 10).all() and (boxes[:, 3] <= 10).all()
    frac = MF.box_area(boxes) / 100
    assert (frac <= 0.5 + 1e-6).all() and (frac < 0.49).any()  # clipping shrinks some boxes


def test_hmix_limits_and_label_weight():
    x, t = _batch(h=8, w=8)
    perm = torch.tensor([4, 3, 2, 1, 0])
    none = torch.zeros(5, 4, dtype=torch.long)
    xm, tm, wgt = MF.hmix(x, t, 0.3, none, perm)
    xr, tr = MF.mixup(x, t, 0.3, perm)
    assert torch.allclose(xm, xr) and torch.allclose(tm, tr) and torch.allclose(wgt, torch.full((5,), 0.3))
    box = torch.tensor([[0, 0, 4, 4]]).expand(5, 4)  # a quarter of the image
    xm, tm, wgt = MF.hmix(x, t, 0.6, box, perm)
    lam_m = 0.6 / 0.75
    outside = lam_m * x + (1 - lam_m) * x[perm]
    assert torch.allclose(xm[:, :, :4, :4], x[perm][:, :, :4, :4])
    assert torch.allclose(xm[:, :, 4:, :], outside[:, :, 4:, :])
    assert torch.allclose(wgt, torch.full((5,), 0.6))
    assert torch.allclose(tm, 0.6 * t + 0.4 * t[perm])


def test_gmix_mask_formula_non_square():
    h, w = 6, 10
    x, t = _batch(h=h, w=w)
    perm = torch.tensor([1, 0, 3, 2, 4])
    lam = torch.tensor([0.2, 0.5, 0.9, 1.0, 0.7])
    centers = torch.tensor([[3.0, 5.0], [0.0, 0.0], [5.5, 9.5], [2.0, 2.0], [1.0, 8.0]])
    xm, tm, wgt = MF.gmix(x, t, lam, centers, perm)
    for i in range(5):
        p_y, p_x = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        d2 = (p_y - centers[i, 0]) ** 2 + (p_x - centers[i, 1]) ** 2
        mask = torch.exp(-math.pi * d2 / ((1 - lam[i]) * h * w)) if lam[i] < 1 else torch.zeros(h, w)
        assert torch.allclose(xm[i], (1 - mask) * x[i] + mask * x[perm[i]], atol=1e-6)
        assert wgt[i].item() == pytest.approx(1 - mask.mean().item(), abs=1e-6)
        assert torch.allclose(tm[i], wgt[i] * t[i] + (1 - wgt[i]) * t[perm[i]], atol=1e-6)
    assert torch.equal(xm[3], x[3])  # lam = 1: untouched


def test_gaussian_mask_area_matches_lambda_when_inside():
    # far from the border the mask integrates to (1 - lam) H W
    m = MF.gaussian_mask(torch.tensor([0.99]), torch.tensor([[50.0, 60.0]]), 100, 120)
    assert m.sum().item() == pytest.approx(0.01 * 100 * 120, rel=1e-3)


def test_resizemix_pastes_the_resized_partner():
    x, t = _batch(h=8, w=8)
    perm = torch.tensor([1, 2, 3, 4, 0])
    boxes = torch.tensor([[2, 4, 6, 8]]).expand(5, 4)  # a 4x4 box: the partner halved
    xm, tm, lam = MF.resizemix(x, t, boxes, perm)
    half = F.avg_pool2d(x[perm], 2)  # bilinear at exactly half size = 2x2 means
    assert torch.allclose(xm[:, :, 2:6, 4:8], half, atol=1e-6)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:6, 4:8] = False
    assert torch.equal(xm[:, :, outside], x[:, :, outside])
    assert torch.allclose(lam, torch.full((5,), 0.75))
    full = torch.tensor([[0, 0, 8, 8]]).expand(5, 4)
    xf, _, lamf = MF.resizemix(x, t, full, perm)
    assert torch.allclose(xf, x[perm], atol=1e-6) and torch.all(lamf == 0)


def test_cutout_formula():
    x, _ = _batch()
    boxes = torch.tensor([[0, 0, 2, 2], [3, 1, 8, 6], [0, 0, 0, 0], [7, 5, 8, 6], [1, 1, 3, 4]])
    out = MF.cutout(x, boxes, fill=0.5)
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        expected = x[i].clone()
        expected[:, y0:y1, x0:x1] = 0.5
        assert torch.equal(out[i], expected)


def test_crop_flip_matches_slicing():
    x, _ = _batch(h=6, w=7)
    offsets = torch.tensor([[0, 0], [4, 4], [2, 1], [1, 3], [2, 2]])
    flip = torch.tensor([False, True, True, False, False])
    out = MF.crop_flip(x, offsets, flip, padding=2)
    xp = F.pad(x, (2, 2, 2, 2))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        expected = xp[i, :, dy:dy + 6, dx:dx + 7]
        if flip[i]:
            expected = expected.flip(-1)
        assert torch.equal(out[i], expected)
    assert torch.equal(out[4], x[4])  # centred window, no flip: identity


def test_gaussian_noise_formula():
    x = torch.rand(4, 3)
    noise = torch.randn(4, 3)
    assert torch.allclose(MF.gaussian_noise(x, 0.5, noise), x + 0.5 * noise)
    sig = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.allclose(MF.gaussian_noise(x, sig, noise), x + sig[:, None] * noise)


def test_beta_sampler_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for a in (0.2, 1.0, 2.5):
        s = R.beta(a, (20000,), generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
        assert ((s >= 0) & (s <= 1)).all()
        assert stats.kstest(s, stats.beta(a, a).cdf).pvalue > 1e-3


def test_randomness_reproducible_from_generator():
    a = R.beta(1.0, (10,), generator=torch.Generator().manual_seed(0))
    b = R.beta(1.0, (10,), generator=torch.Generator().manual_seed(0))
    c = R.beta(1.0, (10,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad, match", [
    (lambda: MF.soft_targets(torch.tensor([0, 3]), 3), "num_classes"),
    (lambda: MF.soft_targets(torch.tensor([-1, 0]), 3), r"\[0, num_classes"),
    (lambda: MF.soft_targets(torch.tensor([[0.5, 0.6]]), 2), "sum to 1"),
    (lambda: MF.soft_targets(torch.tensor([[0.5, 0.5]]), 3), "num_classes"),
    (lambda: MF.soft_targets(torch.tensor([0, 1]), None), "num_classes is required"),
    (lambda: MF.soft_targets(torch.tensor([0]), 2, smoothing=1.5), "smoothing"),
])
def test_targets_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()
