"""Methods for noisy labels: dynamic bootstrapping with a Beta mixture (``bootstrap``, Arazo et al. 2019) and
PADDLES (``paddles``, Huang et al. 2023), each compared with a transcription of the authors' code.

References (transcribed below; numpy and scipy only here, never in src/):

- PaulAlbert31/LabelNoiseCorrection, ``utils.py`` (commit 414e3d2f5c23710da571a41104a29023fd373e21):
  ``weighted_mean``, ``fit_beta_weighted``, ``BetaMixture1D`` (``fit``, ``posterior``, ``create_lookup``,
  ``look_lookup``), the normalisation of ``track_training_loss`` and ``compute_probabilities_batch``, and the
  losses of ``train_mixUp_HardBootBeta`` and ``mixup_criterion_mixSoft`` (with the model's outputs passed in).
- CoderHHX/PADDLES, ``networks/ResNet_New_DetachB4B5.py`` (commit fbf159fa63c01a268e9521f916d17b2e90d82dc5):
  ``ResNet.detach_Freq`` (``.cuda()`` dropped).
"""
import math
import warnings

import numpy as np
import pytest
import scipy.stats as stats
import torch
import torch.nn.functional as F

import maxup
from maxup import methods as M
from maxup.data import TensorData, load_dataset
from maxup.functional import _random as R
from maxup.functional.bmm import beta_pdf, fit_bmm, loss_posterior, normalise_losses, posterior_lookup
from maxup.functional.spectrum import spectral_detach
from maxup.models import SmallCNN
from maxup.registry import REGISTRY
from maxup.steps import PADDLES, Bootstrap, SharpnessAware
from maxup.steps import bootstrap as bootstrap_module
from maxup.steps.bootstrap import bootstrap_targets, class_balance_penalty, mixed_bootstrap_targets, training_losses
from maxup.steps.paddles import spectral_split
from maxup.train import TIMING_KEYS, Trainer

# ---------------------------------------------------------------- the authors' code, transcribed


def ref_weighted_mean(x, w):
    return np.sum(w * x) / np.sum(w)


def ref_fit_beta_weighted(x, w):
    x_bar = ref_weighted_mean(x, w)
    s2 = ref_weighted_mean((x - x_bar) ** 2, w)
    alpha = x_bar * ((x_bar * (1 - x_bar)) / s2 - 1)
    beta = alpha * (1 - x_bar) / x_bar
    return alpha, beta


class RefBetaMixture1D:
    def __init__(self, max_iters=10, alphas_init=(1, 2), betas_init=(2, 1), weights_init=(0.5, 0.5)):
        self.alphas = np.array(alphas_init, dtype=np.float64)
        self.betas = np.array(betas_init, dtype=np.float64)
        self.weight = np.array(weights_init, dtype=np.float64)
        self.max_iters = max_iters
        self.lookup = np.zeros(100, dtype=np.float64)
        self.lookup_resolution = 100
        self.eps_nan = 1e-12

    def likelihood(self, x, y):
        return stats.beta.pdf(x, self.alphas[y], self.betas[y])

    def weighted_likelihood(self, x, y):
        return self.weight[y] * self.likelihood(x, y)

    def probability(self, x):
        return sum(self.weighted_likelihood(x, y) for y in range(2))

    def posterior(self, x, y):
        return self.weighted_likelihood(x, y) / (self.probability(x) + self.eps_nan)

    def responsibilities(self, x):
        r = np.array([self.weighted_likelihood(x, i) for i in range(2)])
        r[r <= self.eps_nan] = self.eps_nan
        r /= r.sum(axis=0)
        return r

    def fit(self, x):
        x = np.copy(x)
        eps = 1e-4
        x[x >= 1 - eps] = 1 - eps
        x[x <= eps] = eps
        for _ in range(self.max_iters):
            r = self.responsibilities(x)
            self.alphas[0], self.betas[0] = ref_fit_beta_weighted(x, r[0])
            self.alphas[1], self.betas[1] = ref_fit_beta_weighted(x, r[1])
            self.weight = r.sum(axis=1)
            self.weight /= self.weight.sum()
        return self

    def create_lookup(self, y):
        x_l = np.linspace(0 + self.eps_nan, 1 - self.eps_nan, self.lookup_resolution)
        lookup_t = self.posterior(x_l, y)
        lookup_t[np.argmax(lookup_t):] = lookup_t.max()
        self.lookup = lookup_t

    def look_lookup(self, x, loss_max, loss_min):
        x_i = x.clone().cpu().numpy()
        x_i = np.array((self.lookup_resolution * x_i).astype(int))
        x_i[x_i < 0] = 0
        x_i[x_i == self.lookup_resolution] = self.lookup_resolution - 1
        return self.lookup[x_i]


def ref_track_training_loss(all_losses: torch.Tensor):
    """The fit of ``track_training_loss``, given the losses of all training samples."""
    loss_tr = all_losses.data.numpy()
    max_perc = np.percentile(loss_tr, 95)
    min_perc = np.percentile(loss_tr, 5)
    loss_tr = loss_tr[(loss_tr <= max_perc) & (loss_tr >= min_perc)]
    bmm_model_maxLoss = torch.FloatTensor([max_perc])
    bmm_model_minLoss = torch.FloatTensor([min_perc]) + 10e-6
    loss_tr = (loss_tr - bmm_model_minLoss.data.cpu().numpy()) / (
        bmm_model_maxLoss.data.cpu().numpy() - bmm_model_minLoss.data.cpu().numpy() + 1e-6)
    loss_tr[loss_tr >= 1] = 1 - 10e-4
    loss_tr[loss_tr <= 0] = 10e-4
    bmm_model = RefBetaMixture1D(max_iters=10)
    bmm_model.fit(loss_tr)
    bmm_model.create_lookup(1)
    return bmm_model, bmm_model_maxLoss, bmm_model_minLoss, loss_tr


def ref_compute_probabilities_batch(batch_losses, bmm_model, bmm_model_maxLoss, bmm_model_minLoss):
    """``compute_probabilities_batch`` from the batch's losses on, then the clipping of B in the training loops."""
    batch_losses = (batch_losses - bmm_model_minLoss) / (bmm_model_maxLoss - bmm_model_minLoss + 1e-6)
    batch_losses[batch_losses >= 1] = 1 - 10e-4
    batch_losses[batch_losses <= 0] = 10e-4
    B = torch.FloatTensor(bmm_model.look_lookup(batch_losses, bmm_model_maxLoss, bmm_model_minLoss))
    B[B <= 1e-4] = 1e-4
    B[B >= 1 - 1e-4] = 1 - 1e-4
    return B


def ref_reg_loss_class(mean_tab, num_classes=10):
    loss = 0
    for items in mean_tab:
        loss += (1. / num_classes) * torch.log((1. / num_classes) / items)
    return loss


def ref_hard_boot_loss(output, target, output_x1, B, lam, index, reg_term=0.0, num_classes=10):
    """The loss of ``train_mixUp_HardBootBeta`` from the model's outputs on (``output``: the mixed batch's logits,
    ``output_x1``: the clean batch's logits, ``B``: already clipped)."""
    output_mean = F.softmax(output, dim=1)
    tab_mean_class = torch.mean(output_mean, -2)
    output = F.log_softmax(output, dim=1)
    output_x1 = F.log_softmax(output_x1, dim=1)
    output_x2 = output_x1[index, :]
    B2 = B[index]
    targets_1, targets_2 = target, target[index]
    z1 = torch.max(output_x1, dim=1)[1]
    z2 = torch.max(output_x2, dim=1)[1]
    loss_x1_vec = (1 - B) * F.nll_loss(output, targets_1, reduction='none')
    loss_x1 = torch.sum(loss_x1_vec) / len(loss_x1_vec)
    loss_x1_pred_vec = B * F.nll_loss(output, z1, reduction='none')
    loss_x1_pred = torch.sum(loss_x1_pred_vec) / len(loss_x1_pred_vec)
    loss_x2_vec = (1 - B2) * F.nll_loss(output, targets_2, reduction='none')
    loss_x2 = torch.sum(loss_x2_vec) / len(loss_x2_vec)
    loss_x2_pred_vec = B2 * F.nll_loss(output, z2, reduction='none')
    loss_x2_pred = torch.sum(loss_x2_pred_vec) / len(loss_x2_pred_vec)
    loss = lam * (loss_x1 + loss_x1_pred) + (1 - lam) * (loss_x2 + loss_x2_pred)
    return loss + reg_term * ref_reg_loss_class(tab_mean_class, num_classes)


def ref_mixup_criterion_mix_soft(pred, y_a, y_b, B, lam, index, output_x1, output_x2):
    """``mixup_criterion_mixSoft`` (``pred``: log-probabilities of the mixed batch; ``lam`` unused, as theirs)."""
    return torch.sum(
        (0.5) * (
            (1 - B) * F.nll_loss(pred, y_a, reduction='none') + B * (-torch.sum(F.softmax(output_x1, dim=1) * pred,
                                                                                   dim=1))) +
        (0.5) * (
            (1 - B[index]) * F.nll_loss(pred, y_b, reduction='none') + B[index] * (
                -torch.sum(F.softmax(output_x2, dim=1) * pred, dim=1)))) / len(pred)


def ref_detach_freq(out, stop_AM, stop_PH):
    fft = torch.fft.fftn(out)
    im_AM, im_PH = torch.abs(fft), torch.angle(fft)
    if stop_AM:
        im_AM = im_AM.detach()
    if stop_PH:
        im_PH = im_PH.detach()
    ep = torch.exp((1j) * im_PH)
    with warnings.catch_warnings():  # torch warns that casting complex to float drops the imaginary part
        warnings.simplefilter("ignore")
        return torch.fft.ifftn(im_AM * (ep)).float()


# ---------------------------------------------------------------- helpers


def loss_sample(seed: int, n_clean: int = 400, n_noisy: int = 100) -> torch.Tensor:
    """Training losses as a network has them under label noise: most clean ones near zero, the noisy ones large."""
    g = torch.Generator().manual_seed(seed)
    clean = -0.3 * torch.log(torch.rand(n_clean, generator=g))
    noisy = (2.5 + 0.6 * torch.randn(n_noisy, generator=g)).clamp_min(0)
    return torch.cat([clean, noisy]).float()


def tiny_model(seed: int = 0) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))


def batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.fixture(scope="module")
def noisy_digits():
    return load_dataset("digits", train_size=64, label_noise=0.4, seed=0).train


# ================================================================ the Beta mixture


@pytest.mark.parametrize("seed", range(4))
def test_bmm_equals_the_authors_beta_mixture_on_the_same_losses(seed):
    losses = loss_sample(seed)
    ref, ref_max, ref_min, ref_x = ref_track_training_loss(losses.clone())
    x, low, high = normalise_losses(losses)
    assert float(low) == float(ref_min) and float(high) == float(ref_max)
    assert np.abs(x.numpy() - ref_x).max() == 0.0  # the same float32 normalisation
    mixture = fit_bmm(x, iters=10)
    assert mixture.noisy == 1  # the authors' component 1, the high-loss one
    for ours, theirs in ((mixture.alphas, ref.alphas), (mixture.betas, ref.betas), (mixture.weights, ref.weight)):
        assert np.abs(ours.numpy() / theirs - 1).max() < 1e-7  # measured over 20 seeds: <= 7.5e-9 relative
    table = posterior_lookup(mixture)
    assert np.abs(table.numpy() - ref.lookup).max() < 1e-8  # measured: <= 7.7e-10
    batch_losses = losses[torch.randperm(len(losses), generator=torch.Generator().manual_seed(seed))[:128]]
    ours = loss_posterior(batch_losses, table, low, high)
    theirs = ref_compute_probabilities_batch(batch_losses.clone(), ref, ref_max, ref_min)
    assert (ours - theirs).abs().max() < 1e-6  # measured: <= 3.0e-8 (one float32 step), same lookup cells


def test_beta_pdf_equals_scipy():
    x = torch.linspace(1e-4, 1 - 1e-4, 101, dtype=torch.float64)
    for a, b in ((1.0, 2.0), (0.3, 0.7), (5.0, 40.0), (2.0, 1.0)):
        ref = stats.beta.pdf(x.numpy(), a, b)
        ours = beta_pdf(x, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        assert np.abs(ours.numpy() / ref - 1).max() < 1e-11


@pytest.mark.parametrize("seed", range(3))
def test_posteriors_lie_in_0_1_and_grow_with_the_loss(seed):
    losses = loss_sample(seed)
    x, low, high = normalise_losses(losses)
    table = posterior_lookup(fit_bmm(x))
    w = loss_posterior(losses, table, low, high)
    assert bool(((w >= 1e-4) & (w <= 1 - 1e-4)).all())
    assert bool((w[losses.argsort()].diff() >= 0).all())  # non-decreasing in the loss
    assert float(w[400:].mean()) > 0.9 and float(w[:400].mean()) < 0.1  # the large losses are the noisy ones
    assert bool((table.diff()[int(table.argmax()):] == 0).all())  # held at its maximum from there on


def test_bmm_is_deterministic_and_counts_its_iterations():
    x, _, _ = normalise_losses(loss_sample(0))
    a, b = fit_bmm(x, iters=3), fit_bmm(x, iters=3)
    assert torch.equal(a.alphas, b.alphas) and torch.equal(a.weights, b.weights)
    ref = RefBetaMixture1D(max_iters=3).fit(x.numpy())
    assert np.abs(a.alphas.numpy() / ref.alphas - 1).max() < 1e-7
    assert not torch.equal(fit_bmm(x, iters=1).alphas, a.alphas)


def test_bmm_on_equal_losses_is_flagged_not_finite():
    x, _, _ = normalise_losses(torch.full((50,), 0.7))
    assert not fit_bmm(x).finite


@pytest.mark.parametrize("call, match", [
    (lambda: normalise_losses(torch.ones(2, 2)), "losses"),
    (lambda: normalise_losses(torch.rand(10), percentiles=(95, 5)), "percentiles"),
    (lambda: normalise_losses(torch.rand(1)), "at least 2"),
    (lambda: fit_bmm(torch.rand(10), iters=0), "iters"),
    (lambda: loss_posterior(torch.rand(4), torch.rand(100), 0.0, 1.0, clip=0.6), "clip"),
])
def test_bmm_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ================================================================ bootstrapped targets


def test_bootstrap_targets_equal_the_formula_by_hand():
    t = F.one_hot(torch.tensor([0, 1, 2]), 3).float()
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    w = torch.tensor([0.2, 0.5, 0.9])
    hard = bootstrap_targets(t, logits, w, "hard")
    expected = torch.tensor([[0.8, 0.2, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(hard, expected)
    soft = bootstrap_targets(t, logits, w, "soft")
    p = torch.softmax(logits, 1)
    assert torch.allclose(soft, (1 - w[:, None]) * t + w[:, None] * p)
    assert torch.allclose(soft.sum(1), torch.ones(3))
    lam, perm = 0.7, torch.tensor([2, 0, 1])
    mixed = mixed_bootstrap_targets(t, logits, w, "hard", lam, perm)
    assert torch.allclose(mixed, 0.7 * expected + 0.3 * expected[perm])
    assert torch.equal(mixed_bootstrap_targets(t, None, None, "hard", lam, perm), 0.7 * t + 0.3 * t[perm])


@pytest.mark.parametrize("lam", [0.5, 0.62])
def test_hard_mixup_loss_equals_the_authors_train_mixup_hardbootbeta(lam):
    g = torch.Generator().manual_seed(1)
    n, c = 12, 10
    output, clean = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    target = torch.randint(0, c, (n,), generator=g)
    B = torch.rand(n, generator=g).clamp(1e-4, 1 - 1e-4)
    index = torch.randperm(n, generator=g)
    T = mixed_bootstrap_targets(F.one_hot(target, c).float(), clean, B, "hard", lam, index)
    ours = maxup.functional.soft_cross_entropy(output, T) + 0.3 * class_balance_penalty(output)
    theirs = ref_hard_boot_loss(output, target, clean, B, lam, index, reg_term=0.3, num_classes=c)
    assert abs(float(ours) - float(theirs)) < 1e-5  # measured over 20 draws: <= 4.8e-7 (float32)


def test_soft_mixup_loss_equals_the_authors_at_lam_one_half_and_weights_by_lam_otherwise():
    g = torch.Generator().manual_seed(2)
    n, c = 12, 10
    output, clean = torch.randn(n, c, generator=g), torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    B = torch.rand(n, generator=g)
    index = torch.randperm(n, generator=g)
    pred = F.log_softmax(output, 1)
    theirs = ref_mixup_criterion_mix_soft(pred, y, y[index], B, 0.9, index, clean, clean[index])

    def ours(lam):
        T = mixed_bootstrap_targets(F.one_hot(y, c).float(), clean, B, "soft", lam, index)
        return float(maxup.functional.soft_cross_entropy(output, T))

    # measured: <= 4.8e-7; their rule weights the two samples 0.5 and 0.5 whatever lam
    assert abs(ours(0.5) - float(theirs)) < 1e-5
    assert abs(ours(0.9) - float(theirs)) > 1e-3  # ours weights them lam and 1 - lam (the paper's formula)


def test_class_balance_penalty_equals_the_authors_reg_loss_class():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    ref = ref_reg_loss_class(torch.mean(F.softmax(logits, 1), -2), 5)
    assert abs(float(class_balance_penalty(logits)) - float(ref)) < 1e-6


def fitted_step(mode="hard", mixup=False, **kw):
    """A bootstrap step past its warm-up, its mixture fitted on a loss sample, on a tiny CNN."""
    model = tiny_model()
    step = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), mode=mode, mixup=mixup,
                     warmup_epochs=1, **kw)
    x, y = batch(64, seed=5)
    step.on_epoch_end(model, TensorData(x, y), epoch=1)
    return model, step


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("mixup", [False, True])
def test_step_trains_on_the_bootstrapped_targets_by_hand(mode, mixup):
    model, step = fitted_step(mode, mixup, alpha=2.0)
    x, y = batch(16, seed=7)
    # by hand: the clean batch's loss and prediction in eval mode (before the training forward moves the BatchNorm
    # statistics), the posterior, the targets, the draws
    model.eval()
    with torch.no_grad():
        clean = model(x)
    model.train()
    result = step.evaluate(model, x, y, torch.Generator().manual_seed(3))
    fit = step.last_fit
    losses = F.cross_entropy(clean, y, reduction="none")
    w = loss_posterior(losses, posterior_lookup(fit), step._fit["low"], step._fit["high"])
    q = F.one_hot(clean.argmax(1), 10).float() if mode == "hard" else torch.softmax(clean, 1)
    u = (1 - w[:, None]) * F.one_hot(y, 10).float() + w[:, None] * q
    inputs = x
    if mixup:
        g2 = torch.Generator().manual_seed(3)
        lam = R.beta(2.0, (1,), generator=g2)
        perm = R.randperm(16, generator=g2)
        inputs = lam * x + (1 - lam) * x[perm]
        u = lam * u + (1 - lam) * u[perm]
    assert torch.allclose(result.inputs, inputs, atol=1e-6)
    assert torch.allclose(result.targets, u, atol=1e-6)
    assert torch.allclose(result.loss, F.cross_entropy(result.logits, u), atol=1e-6)


def test_warmup_trains_plain_targets_and_skips_the_fit():
    model = tiny_model()
    step = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), warmup_epochs=2)
    x, y = batch(16)
    data = TensorData(*batch(64, seed=5))
    for epoch in (0, 1):
        assert not step.bootstrapping
        result = step(model, x, y)
        assert torch.equal(result.targets, F.one_hot(y, 10).float())  # plain labels, no prediction mixed in
        step.on_epoch_end(model, data, epoch=epoch + 1)
        assert (step.last_fit is None) == (epoch == 0)  # fitted at the end of epoch warmup_epochs, not before
    assert step.bootstrapping
    assert not torch.equal(step(model, x, y).targets, F.one_hot(y, 10).float())


def test_mixup_warmup_is_plain_mixup():
    model = tiny_model()
    step = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), mixup=True, alpha=1.0,
                     warmup_epochs=5)
    x, y = batch(16)
    result = step.evaluate(model, x, y, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    lam, perm = R.beta(1.0, (1,), generator=g), R.randperm(16, generator=g)
    t = F.one_hot(y, 10).float()
    assert torch.allclose(result.targets, lam * t + (1 - lam) * t[perm])


def test_without_a_fit_the_weight_is_one_half():
    model = tiny_model()
    step = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), warmup_epochs=0)
    assert step.bootstrapping and step.last_fit is None
    assert torch.equal(step.weights(torch.rand(5)), torch.full((5,), 0.5))


def test_state_round_trips_and_a_degenerate_fit_keeps_the_previous_one():
    model, step = fitted_step("soft", True)
    other = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), mode="soft", mixup=True,
                      warmup_epochs=1)
    other.load_state_dict(step.state_dict())
    losses = torch.rand(20) * 3
    assert torch.equal(other.weights(losses), step.weights(losses)) and other.epoch == step.epoch
    before = step.state_dict()["fit"]
    same = TensorData(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))  # every loss equal
    with pytest.warns(RuntimeWarning, match="degenerate"):
        step.on_epoch_end(model, same, epoch=2)
    assert all(torch.equal(before[k], v) for k, v in step.state_dict()["fit"].items())


@pytest.mark.parametrize("wrong, reg_weight, warns", [(0.9, 0.0, True), (0.9, 1.0, False), (0.4, 0.0, False)])
def test_a_fit_that_judges_most_labels_wrong_warns_once_without_the_balance_term(monkeypatch, wrong, reg_weight,
                                                                                   warns):
    g = torch.Generator().manual_seed(0)
    n_wrong = int(1000 * wrong)  # two well separated groups of training losses: small (clean) and large (wrong)
    losses = torch.cat([torch.rand(1000 - n_wrong, generator=g) * 0.3, 2 + torch.rand(n_wrong, generator=g)])
    monkeypatch.setattr(bootstrap_module, "training_losses", lambda *a, **k: losses)
    model = tiny_model()
    step = Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), reg_weight=reg_weight,
                     warmup_epochs=1)
    data = TensorData(*batch(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.on_epoch_end(model, data, epoch=1)
        step.on_epoch_end(model, data, epoch=2)
    assert step.noisy_share == pytest.approx(wrong, abs=0.02)  # the fit finds the wrong group
    messages = [str(w.message) for w in caught if "collapsing onto one class" in str(w.message)]
    assert len(messages) == warns and all("reg_weight=1.0" in m and "after epoch 1" in m for m in messages)


def test_training_losses_are_eval_mode_cross_entropies_and_leave_the_model_as_it_was():
    model = tiny_model()
    x, y = batch(40)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = training_losses(model, TensorData(x, y), batch_size=16)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none")
    assert torch.allclose(losses, expected, atol=1e-6)
    model.train()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BatchNorm buffers untouched


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "medium"}, "mode"), ({"mixup": 1}, "mixup"), ({"alpha": 0}, "alpha"),
    ({"warmup_epochs": -1}, "warmup_epochs"), ({"reg_weight": -1.0}, "reg_weight"), ({"iters": 0}, "iters"),
    ({"percentiles": (50, 10)}, "percentiles"), ({"eval_batch_size": 0}, "eval_batch_size"),
])
def test_bootstrap_bad_arguments_raise(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        Bootstrap(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


@pytest.mark.parametrize("spec, match", [("bootstrap+maxup(m=2)+cutout", "ERM"),
                                         ("bootstrap+cutmix", "mixup=true")])
def test_bootstrap_refuses_other_objectives_and_mixing_augmentations(spec, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)


# ================================================================ PADDLES


def test_split_is_the_identity_before_any_stop_and_the_round_trip_after():
    x = torch.randn(3, 4, 6, 5, requires_grad=True)
    assert spectral_detach(x) is x  # no stop: untouched
    for kw in ({"amplitude": True}, {"phase": True}):
        y = spectral_detach(x, **kw)
        assert (y - x).abs().max() < 1e-5 and y.requires_grad
    both = spectral_detach(x, amplitude=True, phase=True)
    assert torch.equal(both, x.detach()) and not both.requires_grad
    v = torch.randn_like(x)  # neither part detached: the recombination's Jacobian is the identity
    x2 = x.detach().clone().requires_grad_(True)
    f = torch.fft.fftn(x2, dim=(2, 3))
    y = torch.fft.ifftn(torch.polar(f.abs(), f.angle()), dim=(2, 3)).real
    (v * y).sum().backward()
    assert (x2.grad - v).abs().max() < 1e-5


@pytest.mark.parametrize("stop", [(True, False), (False, True), (True, True)])
def test_split_equals_the_authors_detach_freq_over_all_dims(stop):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 6, 6, generator=g)
    v = torch.randn(4, 3, 6, 6, generator=g)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = spectral_detach(a, amplitude=stop[0], phase=stop[1], dims="all")
    theirs = ref_detach_freq(b, *stop)
    if stop == (True, True):  # they run it once per flag; both detach everything
        theirs = ref_detach_freq(theirs, *stop)
        assert not ours.requires_grad and not theirs.requires_grad
        assert (ours - theirs).abs().max() < 1e-5  # we return x itself: their transform rounds (8.3e-7)
        return
    assert (ours - theirs).abs().max() < 1e-6  # measured: 0 (identical)
    (v * ours).sum().backward()
    (v * theirs).sum().backward()
    assert (a.grad - b.grad).abs().max() < 1e-5  # measured over 10 seeds: <= 4.8e-7


@pytest.mark.parametrize("dims", ["spatial", "all"])
def test_a_stopped_spectrum_passes_no_gradient(dims):
    """The gradient with the amplitude detached is orthogonal to every input change that moves only the amplitude
    spectrum (and likewise for the phase): the stopped part's gradient is zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    fdims = (0, 1, 2, 3) if dims == "all" else (2, 3)
    spectrum = torch.fft.fftn(x, dim=fdims)
    r = torch.fft.fftn(torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), dim=fdims)
    d_amp = torch.fft.ifftn(r.real * torch.exp(1j * spectrum.angle()), dim=fdims).real  # symmetric dA: x stays real
    d_phase = torch.fft.ifftn(spectrum * 1j * r.imag, dim=fdims).real                   # antisymmetric dphi
    grads = {}
    for stop in ("amplitude", "phase", "none"):
        xi = x.clone().requires_grad_(True)
        out = spectral_detach(xi, amplitude=stop == "amplitude", phase=stop == "phase", dims=dims) \
            if stop != "none" else torch.fft.ifftn(torch.polar(*(lambda f: (f.abs(), f.angle()))(
                torch.fft.fftn(xi, dim=fdims))), dim=fdims).real
        (v * out).sum().backward()
        grads[stop] = xi.grad
    assert abs(float((grads["amplitude"] * d_amp).sum())) < 1e-10
    assert abs(float((grads["phase"] * d_phase).sum())) < 1e-10
    assert abs(float((grads["none"] * d_amp).sum())) > 1e-3  # not orthogonal when nothing is stopped
    assert torch.allclose(grads["amplitude"] + grads["phase"], grads["none"])  # the two paths add up


def paddles_grads(epoch, **kw):
    model = tiny_model()
    step = PADDLES(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), amplitude_stop=2, phase_stop=4,
                   model=model, **kw)
    step.on_epoch_end(model, None, epoch=epoch)
    x, y = batch(8)
    step.optimizer.zero_grad()
    step.forward_backward(model, x, y, torch.Generator().manual_seed(0))
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}, step


def test_paddles_stops_the_amplitude_then_the_phase_at_their_epochs():
    plain = paddles_grads(0)[0]
    before = [n for n in plain if n.startswith("blocks.0")]  # default layers: the penultimate stage, blocks.0
    after = [n for n in plain if not n.startswith("blocks.0")]
    for epoch in (0, 1):  # no stop yet: the plain step, exactly
        grads, step = paddles_grads(epoch)
        assert step.stopped == (False, False) and step.layers == ("blocks.0",)
        assert all(torch.equal(grads[n], plain[n]) for n in plain)
    for epoch in (2, 3):  # amplitude stopped: blocks.0 learns through the phase only
        grads, step = paddles_grads(epoch)
        assert step.stopped == (True, False)
        assert all(torch.allclose(grads[n], plain[n], atol=1e-5) for n in after)
        assert any((grads[n] - plain[n]).abs().max() > 1e-4 for n in before)
    for epoch in (4, 10):  # both stopped: blocks.0 gets no gradient; the rest trains as before
        grads, step = paddles_grads(epoch)
        assert step.stopped == (True, True)
        assert all(grads[n] is None for n in before)
        assert all(torch.allclose(grads[n], plain[n], atol=1e-6) for n in after)


def test_paddles_hooks_only_training_forwards_and_removes_them():
    model = tiny_model()
    x = torch.rand(4, 1, 8, 8)
    with spectral_split(model, ["blocks.0"], amplitude=True, phase=False):
        with torch.no_grad():
            out = model(x)
        seen = [len(m._forward_hooks) for m in model.modules()]
    assert torch.equal(out, model(x).detach()) and sum(seen) == 1
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_paddles_layers_default_all_and_errors():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert PADDLES(maxup.ERM(), opt, model=model).layers == ("blocks.0",)
    assert PADDLES(maxup.ERM(), opt, layers="all", model=model).layers == ("blocks.0", "blocks.1")
    assert PADDLES(maxup.ERM(), opt, layers=["blocks.1"], model=model).layers == ("blocks.1",)
    for kwargs, match in (({"layers": ["nope"]}, "not modules"), ({"layers": 3}, "layers"),
                          ({"dims": "time"}, "dims"), ({"amplitude_stop": -1}, "amplitude_stop"),
                          ({"phase_stop": 1.5}, "phase_stop"), ({"layers": ["classifier"]}, "spatial")):
        with pytest.raises(ValueError, match=match):
            step = PADDLES(maxup.ERM(), opt, model=model, **{"amplitude_stop": 0, **kwargs})
            step(model, *batch(4))  # the classifier's (B, C) output has no feature maps: refused at the forward


def test_paddles_state_round_trips():
    model = tiny_model()
    step = PADDLES(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), amplitude_stop=1, phase_stop=3)
    step.on_epoch_end(model, None, epoch=2)
    other = PADDLES(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1), amplitude_stop=1, phase_stop=3)
    other.load_state_dict(step.state_dict())
    assert other.epoch == 2 and other.stopped == (True, False)


# ================================================================ the Trainer's hook, specs, training


class Spy(Bootstrap):
    """Records what reaches the step: every batch's labels and the data of every end of epoch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels, self.ends = [], []

    def forward_backward(self, model, x, y, generator=None, **kwargs):
        self.labels.append(y.clone())
        return super().forward_backward(model, x, y, generator, **kwargs)

    def on_epoch_end(self, model, data, *, epoch):
        self.ends.append((epoch, data))
        return super().on_epoch_end(model, data, epoch=epoch)


def test_trainer_calls_the_epoch_hook_with_noisy_labels_only(noisy_digits):
    assert int(noisy_digits.flipped.sum()) > 0
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    spy = Spy(maxup.ERM(), opt, warmup_epochs=1)
    trainer = Trainer(model, SharpnessAware(spy, rho=0.05), noisy_digits, epochs=2, batch_size=16, num_classes=10,
                      progress=False, device="cpu")
    trainer.fit()
    assert [e for e, _ in spy.ends] == [1, 2]  # seen through the sam wrapper
    for _, data in spy.ends:
        assert data.clean_y is None and torch.equal(data.y, noisy_digits.y) and torch.equal(data.x, noisy_digits.x)
    order = torch.cat([trainer.loader.indices(e) for e in (0, 1)])
    assert torch.equal(torch.cat(spy.labels), noisy_digits.y[order])  # the noisy labels, batch by batch
    assert spy.last_fit is not None


SPECS = ["bootstrap(warmup_epochs=1)", "bootstrap(mode='soft', warmup_epochs=1)",
         "bootstrap(mixup=true, warmup_epochs=1, reg_weight=0.5)",
         "bootstrap(mode='soft', mixup=true, warmup_epochs=0)",
         "sam+bootstrap(mixup=true, warmup_epochs=1)+cropflip", "paddles(amplitude_stop=1, phase_stop=2)",
         "paddles(amplitude_stop=0, phase_stop=1, dims='all', layers='all')+maxup(m=2)+cutout"]


@pytest.mark.parametrize("spec", SPECS)
def test_specs_train_deterministically_and_resume_exactly_on_noisy_digits(spec, noisy_digits, tmp_path):
    def run(out, epochs=3, resume=False):
        model = tiny_model()
        history = maxup.fit(model, spec, train=noisy_digits, epochs=epochs, batch_size=32, lr=0.05, seed=1,
                            num_classes=10, out_dir=out, resume=resume, progress=False, device="cpu")
        return model, history

    whole, history = run(tmp_path / "a")
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert "noisy_memorised" in history[-1] and "noisy_true_accuracy" in history[-1]
    (tmp_path / "a" / "checkpoints" / "epoch-0003.pt").unlink()
    resumed, again = run(tmp_path / "a", resume=True)
    untimed = [[{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h] for h in (history, again)]
    assert untimed[0] == untimed[1]
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_registry_entries_and_options():
    boot, pad = REGISTRY["bootstrap"], REGISTRY["paddles"]
    assert boot.kind == pad.kind == "step"
    assert boot.options() == {"mode": "hard", "mixup": False, "alpha": 32.0, "warmup_epochs": 105,
                              "reg_weight": 0.0, "iters": 10, "percentiles": (5.0, 95.0), "eval_batch_size": 512}
    assert pad.options() == {"amplitude_stop": 19, "phase_stop": 30, "layers": None, "dims": "spatial"}
    M.parse("sam+bootstrap(mode='soft', mixup=true)+cropflip")
    M.parse("paddles(layers=['blocks.0'])+maxup(m=4)+cutout")


@pytest.mark.parametrize("spec", ["bootstrap(mixup=true, warmup_epochs=0)",
                                  "paddles(amplitude_stop=0, phase_stop=5)"])
def test_no_host_read_in_a_step(spec):
    from maxup.train.syncs import count_step_syncs

    model = tiny_model()
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), num_classes=10)
    if isinstance(step, Bootstrap):
        step.on_epoch_end(model, TensorData(*batch(64, seed=5)), epoch=1)
    x, y = batch(16)
    counter = count_step_syncs(step, model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2), steps=2)
    assert counter.reads == 0 and counter.made == 0, counter.report()
