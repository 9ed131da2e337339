"""FMix: the mask against a transcription of the authors' numpy code on the same injected spectrum, the
mask's area and the labels against the formula, per-sample and per-batch draws, the errors, and one
training step through a method spec."""
import math

import numpy as np
import pytest
import torch

from maxup import methods as M
from maxup.augment import collate
from maxup.augment.fmix import FMix
from maxup.functional.fmix import binarise_mask, fmix, fmix_frequencies, fmix_mask, fmix_spectrum, low_freq_image
from maxup.models import SmallCNN
from maxup.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the authors' algorithm, in numpy
#
# A transcription of github.com/ecs-vlc/FMix, fmix.py (commit e5991dc, MIT licence): fftfreqnd,
# get_spectrum, make_low_freq_image and binarise_mask, for 2-D masks (ch = 1). Two changes make the
# randomness injectable, nothing else: get_spectrum takes its Gaussian draws ``param`` instead of
# calling np.random.randn, and binarise_mask takes the coin of its random.random() call.
# ``combine`` picks how make_low_freq_image turns the (1, h, w', 2) draws into complex numbers:
# "released" is the repository's line ``spectrum[:, 0] + 1j * spectrum[:, 1]``, which indexes the
# first two frequency rows (axis 1), not the (real, imaginary) axis; "paper" pairs the last axis,
# the complex Gaussian spectrum the paper describes, which is what maxup.functional.fmix implements.


def ref_fftfreqnd(h, w):
    fy = np.expand_dims(np.fft.fftfreq(h), -1)
    fx = np.fft.fftfreq(w)[: w // 2 + 2] if w % 2 == 1 else np.fft.fftfreq(w)[: w // 2 + 1]
    return np.sqrt(fx * fx + fy * fy)


def ref_get_spectrum(freqs, decay_power, param, h, w):
    scale = np.ones(1) / (np.maximum(freqs, np.array([1.0 / max(w, h, 0)])) ** decay_power)
    assert param.shape == (1, *freqs.shape, 2)  # np.random.randn(*[ch] + list(freqs.shape) + [2]) there
    return np.expand_dims(scale, -1)[None, :] * param


def ref_make_low_freq_image(decay, shape, param, combine="paper"):
    freqs = ref_fftfreqnd(*shape)
    spectrum = ref_get_spectrum(freqs, decay, param, *shape)
    if combine == "released":
        spectrum = spectrum[:, 0] + 1j * spectrum[:, 1]
    else:
        spectrum = spectrum[..., 0] + 1j * spectrum[..., 1]
    mask = np.real(np.fft.irfftn(spectrum, shape, axes=(-2, -1)))
    mask = mask[:1, : shape[0], : shape[1]]
    mask = mask - mask.min()
    return mask / mask.max()


def ref_binarise_mask(mask, lam, in_shape, max_soft=0.0, coin=1.0):
    idx = mask.reshape(-1).argsort()[::-1]
    mask = mask.reshape(-1)
    num = math.ceil(lam * mask.size) if coin > 0.5 else math.floor(lam * mask.size)
    eff_soft = max_soft
    if max_soft > lam or max_soft > (1 - lam):
        eff_soft = min(lam, 1 - lam)
    soft = int(mask.size * eff_soft)
    num_low, num_high = num - soft, num + soft
    mask[idx[:num_high]] = 1
    mask[idx[num_low:]] = 0
    mask[idx[num_low:num_high]] = np.linspace(1, 0, (num_high - num_low))
    return mask.reshape((1, *in_shape))


def coin_for_round(lam, size):
    """The coin that makes the authors' ceil-or-floor choice our round(lam * size)."""
    return 1.0 if round(lam * size) == math.ceil(lam * size) else 0.0


def authors_param(h, w, seed):
    """The authors' draws for one h x w mask (w // 2 + 2 columns when w is odd) and ours (the w // 2 + 1
    columns the inverse transform reads), from the same numbers."""
    param = np.random.default_rng(seed).standard_normal((1, *ref_fftfreqnd(h, w).shape, 2))
    return param, torch.from_numpy(param[:, :, : w // 2 + 1].copy())


SHAPES = [(32, 32), (28, 28), (7, 9), (8, 5), (5, 12), (1, 6)]


# ------------------------------------------------------------------ side by side with the authors' code


@pytest.mark.parametrize("shape", SHAPES)
def test_low_freq_image_matches_the_authors_on_the_same_spectrum(shape):
    for seed in range(3):
        param, spectrum = authors_param(*shape, seed)
        ref = ref_make_low_freq_image(3.0, shape, param)
        ours = low_freq_image(spectrum, *shape, decay_power=3.0)
        assert ours.dtype == torch.float64 and ours.shape == (1, *shape)
        assert np.abs(ours.numpy() - ref).max() < 1e-7


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.3, 0.5, 0.77, 0.999, 1.0])
@pytest.mark.parametrize("decay_power", [1.0, 3.0, 5.5])
def test_mask_equals_the_authors_mask_on_the_same_spectrum(shape, lam, decay_power):
    size = shape[0] * shape[1]
    for seed in range(2):
        param, spectrum = authors_param(*shape, seed)
        image = ref_make_low_freq_image(decay_power, shape, param)
        ref = ref_binarise_mask(image.copy(), lam, shape, coin=coin_for_round(lam, size))
        ours = fmix_mask(lam, shape, decay_power, spectrum=spectrum)
        assert torch.equal(ours, torch.from_numpy(ref))
        assert int(ours.sum()) == round(lam * size)


@pytest.mark.parametrize("shape", [(32, 32), (7, 9)])
@pytest.mark.parametrize("lam, max_soft", [(0.4, 0.1), (0.3, 0.45), (0.8, 0.3), (0.5, 0.5), (0.6, 0.001)])
def test_soft_mask_matches_the_authors_ramp(shape, lam, max_soft):
    size = shape[0] * shape[1]
    param, spectrum = authors_param(*shape, 7)
    image = ref_make_low_freq_image(3.0, shape, param)
    ref = ref_binarise_mask(image.copy(), lam, shape, max_soft, coin=coin_for_round(lam, size))
    ours = fmix_mask(lam, shape, 3.0, max_soft, spectrum=spectrum)
    assert np.abs(ours.numpy() - ref).max() < 1e-7
    assert abs(float(ours.sum()) - round(lam * size)) < 1e-6  # the ramp keeps the mask's mean


def test_the_released_line_is_our_op_on_a_spectrum_with_two_x_frequencies():
    """The repository's ``spectrum[:, 0] + 1j * spectrum[:, 1]`` keeps y-frequencies 0..w // 2 (no negative
    ones) and x-frequencies 0 and 1 only: fed that spectrum, unscaled, our op gives its mask. This is the
    difference the card documents."""
    h = w = 32
    param, _ = authors_param(h, w, 3)
    scaled = ref_get_spectrum(ref_fftfreqnd(h, w), 3.0, param, h, w)
    released = np.zeros((h, w // 2 + 1), dtype=complex)
    released[: w // 2 + 1, :2] = scaled[0, 0, :, :] + 1j * scaled[0, 1, :, :]
    scale = 1.0 / fmix_frequencies(h, w).clamp_min(1.0 / 32).pow(3.0).numpy()
    spectrum = torch.from_numpy(np.stack([released.real / scale, released.imag / scale], -1)[None])
    ref = ref_make_low_freq_image(3.0, (h, w), param, combine="released")
    assert np.abs(low_freq_image(spectrum, h, w, 3.0).numpy() - ref).max() < 1e-7
    assert torch.equal(fmix_mask(0.5, (h, w), spectrum=spectrum),
                       torch.from_numpy(ref_binarise_mask(ref.copy(), 0.5, (h, w))))
    assert not torch.equal(fmix_mask(0.5, (h, w), spectrum=torch.from_numpy(param[:, :, : w // 2 + 1].copy())),
                           fmix_mask(0.5, (h, w), spectrum=spectrum))


def test_frequencies_match_the_authors_fftfreqnd():
    for h, w in SHAPES:
        ref = ref_fftfreqnd(h, w)[:, : w // 2 + 1]
        assert np.abs(fmix_frequencies(h, w).numpy() - ref).max() < 1e-15


# ------------------------------------------------------------------ the mask and the mixing


@pytest.mark.parametrize("shape", [(28, 28), (7, 9), (3, 1)])
def test_the_mask_has_round_lam_hw_ones(shape):
    g = torch.Generator().manual_seed(0)
    lam = torch.tensor([0.0, 0.013, 0.25, 0.5, 0.625, 0.9, 1.0])
    masks = fmix_mask(lam, shape, generator=g)
    size = shape[0] * shape[1]
    assert masks.shape == (7, *shape) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert masks.sum(dim=(1, 2)).tolist() == [float(round(v * size)) for v in lam.double().tolist()]


def test_the_kept_pixels_are_the_brightest_of_the_low_frequency_image():
    spectrum = fmix_spectrum(3, 16, 16, generator=torch.Generator().manual_seed(1))
    image = low_freq_image(spectrum, 16, 16)
    mask = binarise_mask(image, torch.tensor([0.2, 0.5, 0.9])).bool()
    assert (image.amin(dim=(1, 2)) == 0).all() and (image.amax(dim=(1, 2)) == 1).all()
    for i in range(3):
        assert image[i][mask[i]].min() > image[i][~mask[i]].max()


def test_a_float_lam_gives_one_mask_a_tensor_one_per_value():
    g = torch.Generator().manual_seed(0)
    assert fmix_mask(0.4, (8, 8), generator=g).shape == (1, 8, 8)
    assert fmix_mask(torch.rand(5, generator=g), (8, 8), generator=g).shape == (5, 8, 8)
    assert fmix_mask(0.4, (8, 8), spectrum=fmix_spectrum(3, 8, 8, generator=g)).shape == (3, 8, 8)


def test_the_same_generator_seed_gives_the_same_mask():
    a = fmix_mask(torch.tensor([0.3, 0.6]), (12, 10), generator=torch.Generator().manual_seed(5))
    b = fmix_mask(torch.tensor([0.3, 0.6]), (12, 10), generator=torch.Generator().manual_seed(5))
    c = fmix_mask(torch.tensor([0.3, 0.6]), (12, 10), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fmix_mixes_images_by_the_mask_and_labels_by_its_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 9, 7, generator=g)
    t = torch.eye(5)[torch.tensor([0, 1, 2, 3])]
    perm = torch.tensor([2, 0, 3, 1])
    mask = fmix_mask(torch.tensor([0.2, 0.5, 0.8, 1.0]), (9, 7), generator=g)
    x_mix, t_mix, weight = fmix(x, t, mask, perm)
    m = mask[:, None]
    assert torch.equal(x_mix, torch.where(m.bool(), x, x[perm]))       # binary: each pixel exactly one image
    assert torch.allclose(weight, mask.mean(dim=(1, 2)))
    assert torch.allclose(t_mix, weight[:, None] * t + (1 - weight[:, None]) * t[perm])
    assert torch.allclose(t_mix.sum(1), torch.ones(4))
    assert torch.equal(x_mix[3], x[3]) and torch.equal(t_mix[3], t[3])  # lam = 1: untouched
    soft = fmix_mask(0.4, (9, 7), 3.0, 0.2, generator=g)                  # one soft mask for the batch
    x_mix, t_mix, weight = fmix(x, t, soft[0], perm)
    assert torch.allclose(x_mix, soft * x + (1 - soft) * x[perm], atol=1e-6)
    assert torch.allclose(weight, soft.mean().expand(4))


def test_fmix_does_not_edit_its_inputs():
    x, t = torch.rand(4, 1, 6, 6), torch.eye(4)
    x0, t0 = x.clone(), t.clone()
    fmix(x, t, fmix_mask(0.5, (6, 6)), torch.tensor([1, 2, 3, 0]))
    FMix(num_classes=4, per_sample=True)(x, torch.arange(4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x0) and torch.equal(t, t0)


# ------------------------------------------------------------------ the augmentation


def constant_batch(n=6, h=10, w=12):
    """Sample i is the constant image i + 1, so each output pixel says which image it came from."""
    return torch.arange(1.0, n + 1)[:, None, None, None].expand(n, 2, h, w).clone(), torch.arange(n) % 3


@pytest.mark.parametrize("per_sample", [True, False])
def test_per_sample_draws_one_mask_per_sample_per_batch_one_for_all(per_sample):
    x, y = constant_batch()
    aug = FMix(num_classes=3, per_sample=per_sample)
    x_mix, t_mix = aug(x, y, generator=torch.Generator().manual_seed(3))
    assert x_mix.shape == x.shape and t_mix.shape == (6, 3)
    assert (x_mix[:, 0] == x_mix[:, 1]).all()                      # one mask for all channels
    kept = x_mix[:, 0] == x[:, 0]                                  # (B, H, W): where sample i kept itself
    mixed = kept[~kept.all(dim=(1, 2))]                            # samples whose partner is another image
    assert len(mixed) >= 2
    distinct = {tuple(k.flatten().tolist()) for k in mixed}
    assert len(distinct) == (len(mixed) if per_sample else 1)      # per batch: every sample, the same mask


def test_the_augmentation_equals_the_functional_ops_on_the_same_draws():
    x, y = torch.rand(5, 1, 11, 8), torch.tensor([0, 1, 2, 3, 4])
    t = torch.eye(5)[y]
    for per_sample in (True, False):
        aug = FMix(alpha=0.7, decay_power=2.5, max_soft=0.05, per_sample=per_sample, num_classes=5)
        got = aug(x, y, generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)
        lam, perm = aug._draw(x, g)
        spectrum = fmix_spectrum(lam.shape[0], 11, 8, generator=g)
        mask = fmix_mask(lam, (11, 8), 2.5, 0.05, spectrum=spectrum)
        assert mask.shape[0] == (5 if per_sample else 1)
        want = fmix(x, t, mask, perm)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_labels_follow_the_area_each_image_contributes():
    x, y = constant_batch(n=6)
    aug = FMix(num_classes=6, per_sample=True)
    x_mix, t_mix = aug(x, torch.arange(6), generator=torch.Generator().manual_seed(4))
    for i in range(6):
        share = torch.stack([(x_mix[i, 0] == j + 1).double().mean() for j in range(6)])
        assert torch.allclose(t_mix[i].double(), share, atol=1e-6)


def test_p_zero_leaves_the_batch_alone():
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    x_mix, t_mix = FMix(num_classes=4, p=0.0, per_sample=True)(x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_mix, x) and torch.equal(t_mix, torch.eye(4))


def test_runs_through_a_dataloader():
    data = torch.utils.data.TensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3)
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=collate(FMix(num_classes=3, per_sample=True),
                                                                                torch.Generator().manual_seed(0)))
    shapes = [(xb.shape, tb.shape) for xb, tb in loader]
    assert shapes[-1] == ((2, 1, 8, 8), (2, 3))  # an odd last batch too
    assert all(torch.allclose(tb.sum(1), torch.ones(len(tb))) for _, tb in loader)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, name", [
    ({"alpha": 0.0}, "alpha"), ({"decay_power": -1.0}, "decay_power"),
    ({"decay_power": float("inf")}, "decay_power"), ({"max_soft": 0.6}, "max_soft"), ({"max_soft": -0.1}, "max_soft"),
    ({"p": 1.5}, "p"), ({"num_classes": 0}, "num_classes"),
])
def test_bad_options_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FMix(**kwargs)


def test_bad_arguments_of_the_ops_raise_value_errors_naming_them():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="lam"):
        fmix_mask(1.5, (8, 8), generator=g)
    with pytest.raises(ValueError, match="lam"):
        fmix_mask(torch.tensor([0.5, -0.1]), (8, 8), generator=g)
    with pytest.raises(ValueError, match="shape"):
        fmix_mask(0.5, (0, 8))
    with pytest.raises(ValueError, match="shape"):
        fmix_mask(0.5, 8)
    with pytest.raises(ValueError, match="decay_power"):
        fmix_mask(0.5, (8, 8), decay_power=-2)
    with pytest.raises(ValueError, match="max_soft"):
        fmix_mask(0.5, (8, 8), max_soft=0.75)
    with pytest.raises(ValueError, match="spectrum"):
        fmix_mask(0.5, (8, 8), spectrum=torch.randn(1, 8, 8, 2))        # 8 // 2 + 1 = 5 columns needed
    with pytest.raises(ValueError, match="lam"):
        fmix_mask(torch.rand(3), (8, 8), spectrum=torch.randn(2, 8, 5, 2))
    x, t = torch.rand(4, 1, 8, 8), torch.eye(4)
    with pytest.raises(ValueError, match="mask"):
        fmix(x, t, torch.ones(4, 8, 7), torch.arange(4))
    with pytest.raises(ValueError, match="mask"):
        fmix(x, t, torch.ones(3, 8, 8), torch.arange(4))
    with pytest.raises(ValueError, match="mask"):
        fmix(x, t, torch.full((8, 8), 2.0), torch.arange(4))
    with pytest.raises(ValueError, match="x"):
        fmix(torch.rand(4, 64), t, torch.ones(8, 8), torch.arange(4))
    with pytest.raises(ValueError, match="x"):
        FMix(num_classes=4)(torch.rand(4, 64), torch.arange(4))            # images only


# ------------------------------------------------------------------ the registry and a training step


def test_registered_with_its_traits_and_options():
    entry = REGISTRY["fmix"]
    assert entry.cls is FMix and entry.kind == "augment"
    assert (FMix.domain, FMix.random, FMix.mixes_rows, FMix.last, FMix.context) == ("image", True, True, None, None)
    assert entry.options() == {"alpha": 1.0, "decay_power": 3.0, "max_soft": 0.0, "per_sample": True, "p": 1.0}
    assert "Fourier" in entry.summary


def test_a_spec_parses_and_one_maxup_step_trains():
    assert [t.name for t in M.parse("maxup(m=4)+fmix")] == ["maxup", "fmix"]
    assert [t.name for t in M.parse("fmix(alpha=0.5, decay_power=2.0, max_soft=0.1, per_sample=false)")] == ["fmix"]
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    step = M.build_step("maxup(m=2)+fmix", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                        num_classes=10)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 1, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
    result = step(model, x, y, generator=g)
    assert torch.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_two_seeded_runs_of_a_spec_agree():
    def run():
        torch.manual_seed(0)
        model = SmallCNN(in_channels=1, num_classes=3, channels=(4,))
        step = M.build_step("fmix(decay_power=2.0)", model=model,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=3)
        g = torch.Generator().manual_seed(1)
        x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        for _ in range(2):
            step(model, x, y, generator=g)
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))


@pytest.mark.parametrize("spec", ["fmix", "fmix(per_sample=false, max_soft=0.1)", "maxup(m=4)+fmix"])
def test_the_step_makes_no_host_read(spec):
    """On a GPU the step never waits for the device: lam, the spectrum, the sort and the labels stay there."""
    from maxup.functional import _random as R
    from maxup.train.syncs import count_step_syncs

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), num_classes=10)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    counter = count_step_syncs(step, model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2), steps=2)
    assert counter.reads == 0 and counter.made == 0, counter.report()
