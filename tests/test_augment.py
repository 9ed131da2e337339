"""The augmentation modules: contracts shared by all, randomness, DataLoader use, bad input."""
import pytest
import torch

from maxup import augment as A

C = 10


def all_augs(per_sample=True):
    return [
        A.Identity(num_classes=C),
        A.GaussianNoise(0.2, num_classes=C),
        A.Cutout(4, num_classes=C),
        A.RandomCropFlip(2, num_classes=C),
        A.Mixup(1.0, num_classes=C, per_sample=per_sample),
        A.CutMix(1.0, num_classes=C, per_sample=per_sample),
        A.HMix(1.0, num_classes=C, per_sample=per_sample),
        A.GMix(1.0, num_classes=C, per_sample=per_sample),
        A.ResizeMix(num_classes=C, per_sample=per_sample),
        A.Compose([A.RandomCropFlip(2), A.CutMix(num_classes=C)]),
        A.RandomChoice([A.Mixup(num_classes=C), A.Cutout(3, num_classes=C)]),
    ]


def _batch(b=7):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, 12, 10, generator=g), torch.randint(0, C, (b,), generator=g)


@pytest.mark.parametrize("aug", all_augs(), ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("b", [1, 7])  # odd batch sizes and a single sample
def test_contract(aug, b):
    x, y = _batch(b)
    x0, y0 = x.clone(), y.clone()
    out, t = aug(x, y, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert t.shape == (b, C)
    assert (t >= 0).all() and torch.allclose(t.sum(1), torch.ones(b))  # targets are distributions
    assert torch.equal(x, x0) and torch.equal(y, y0)  # no in-place edits
    again, t2 = aug(x, y, torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and torch.equal(t, t2)  # same seed, same output


@pytest.mark.parametrize("aug", all_augs()[1:], ids=lambda a: type(a).__name__)
def test_different_seeds_differ(aug):
    x, y = _batch()
    a, _ = aug(x, y, torch.Generator().manual_seed(1))
    b, _ = aug(x, y, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)


def test_soft_targets_pass_through():
    x, y = _batch()
    t = torch.softmax(torch.randn(7, C), 1)
    _, out = A.Cutout(4)(x, t)  # no num_classes needed for soft targets
    assert torch.equal(out, t)


@pytest.mark.parametrize("cls", [A.Mixup, A.CutMix, A.HMix, A.GMix, A.ResizeMix])
def test_per_sample_lambda(cls):
    x, y = torch.rand(64, 1, 16, 16), torch.zeros(64, dtype=torch.long)
    y[32:] = 1
    g = torch.Generator().manual_seed(0)
    _, t_batch = cls(num_classes=2)(x, y, g)
    _, t_sample = cls(num_classes=2, per_sample=True)(x, y, g)
    # weight of the own label: one value for the batch vs one per sample
    own_b = torch.where(y == 0, t_batch[:, 0], t_batch[:, 1])
    mixed = t_batch.max(1).values < 1  # only rows mixed with the other class reveal lambda
    assert own_b[mixed].unique().numel() <= 2  # lam and 1-lam... from a single draw
    own_s = torch.where(y == 0, t_sample[:, 0], t_sample[:, 1])
    assert own_s.unique().numel() > 5


def test_probability_zero_is_identity():
    x, y = _batch()
    for aug in [A.Mixup(num_classes=C, p=0.0), A.CutMix(num_classes=C, p=0.0, per_sample=True),
                A.Cutout(4, num_classes=C, p=0.0), A.RandomCropFlip(2, num_classes=C, p=0.0),
                A.GaussianNoise(1.0, num_classes=C, p=0.0), A.ResizeMix(num_classes=C, p=0.0)]:
        out, t = aug(x, y, torch.Generator().manual_seed(0))
        assert torch.allclose(out, x), aug
        assert torch.equal(t, torch.nn.functional.one_hot(y, C).float())


def test_gaussian_noise_statistics():
    x = torch.zeros(4000, 1, 5, 5)
    y = torch.zeros(4000, dtype=torch.long)
    out, _ = A.GaussianNoise(0.3, num_classes=2)(x, y, torch.Generator().manual_seed(0))
    assert out.mean().abs() < 0.01 and abs(out.std().item() - 0.3) < 0.005


def test_cutout_zeroes_a_box_of_the_given_size():
    x = torch.ones(200, 1, 16, 16)
    out, _ = A.Cutout(6, num_classes=2)(x, torch.zeros(200, dtype=torch.long), torch.Generator().manual_seed(0))
    holes = (out == 0).sum((1, 2, 3))
    assert holes.max() == 36 and holes.min() >= 9  # clipped at the border, never more than 6x6


def test_generator_on_cpu_drives_other_device_batches():
    # the generator lives on the CPU; draws move to the batch's device (here meta-free CPU check of the path)
    x, y = _batch()
    out, _ = A.CutMix(num_classes=C, per_sample=True)(x.to("cpu"), y, torch.Generator(device="cpu").manual_seed(0))
    assert out.device == x.device


def test_inside_a_real_dataloader():
    xs, ys = torch.rand(30, 1, 8, 8), torch.randint(0, 3, (30,))
    ds = torch.utils.data.TensorDataset(xs, ys)
    aug = A.Compose([A.RandomCropFlip(1), A.Mixup(num_classes=3, per_sample=True)])
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=A.collate(aug), num_workers=0)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [8, 8, 8, 6]
    for xb, tb in batches:
        assert tb.shape == (xb.shape[0], 3) and torch.allclose(tb.sum(1), torch.ones(xb.shape[0]))


def test_inside_a_dataloader_with_workers():
    xs, ys = torch.rand(16, 1, 8, 8), torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=8,
                                         collate_fn=A.collate(A.CutMix(num_classes=3)), num_workers=1)
    assert sum(b[0].shape[0] for b in loader) == 16


@pytest.mark.parametrize("make, match", [
    (lambda: A.Mixup(alpha=0), "alpha"),
    (lambda: A.CutMix(alpha=-1.0), "alpha"),
    (lambda: A.GaussianNoise(sigma=-0.1), "sigma"),
    (lambda: A.Mixup(p=1.5), "p must be a probability"),
    (lambda: A.RandomCropFlip(flip=-0.1), "flip"),
    (lambda: A.HMix(ratio=2.0), "ratio"),
    (lambda: A.ResizeMix(scale=(0.8, 0.1)), "scale"),
    (lambda: A.Cutout(size=(4, 4, 4)), "size"),
    (lambda: A.Mixup(num_classes=0), "num_classes"),
    (lambda: A.RandomChoice([A.Mixup()], weights=[-1.0]), "weights"),
])
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("x, y, match", [
    (torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long), "floating-point"),
    (torch.rand(4, 8, 8), torch.zeros(4, dtype=torch.long), r"\(B, C, H, W\)"),
    (torch.rand(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), "3 labels but x holds 4"),
    (torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 10]), "num_classes=10"),
    (torch.rand(4, 1, 8, 8), torch.full((4, 10), 0.2), "sum to 1"),
])
def test_bad_batches(x, y, match):
    with pytest.raises(ValueError, match=match):
        A.CutMix(num_classes=10)(x, y)


def test_integer_labels_need_num_classes():
    with pytest.raises(ValueError, match="num_classes is required"):
        A.Mixup()(torch.rand(2, 3), torch.tensor([0, 1]))


def test_cutout_default_size_is_half_of_each_side():
    x = torch.ones(300, 1, 16, 12)
    out, _ = A.Cutout(num_classes=2)(x, torch.zeros(300, dtype=torch.long), torch.Generator().manual_seed(0))
    assert (out == 0).sum((1, 2, 3)).max() == 8 * 6
