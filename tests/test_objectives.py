"""ERM and MaxUp: per-sample maximum, modes, BatchNorm, the gradient-norm penalty, steps."""
import copy
import math

import pytest
import torch
from torch import nn

import maxup
from maxup import augment as A
from maxup.objectives import ERM, MaxUp, Objective
from maxup.steps import Standard


class Shift(A.Augmentation):
    """Copy j of the batch is x + offsets[j]: losses known in advance, one row per call."""

    def __init__(self, offsets):
        super().__init__(num_classes=2)
        self.offsets, self.calls = offsets, 0

    def apply(self, x, t, generator):
        out = x + self.offsets[self.calls % len(self.offsets)][:, None]
        self.calls += 1
        return out, t


def score_model():
    """logits = (0, x): the loss of class 0 is softplus(x), increasing in x."""
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0], [1.0]]))
        model.bias.zero_()
    return model


@pytest.mark.parametrize("mode", ["select", "direct"])
def test_max_is_taken_per_sample_over_its_own_copies(mode):
    # 3 copies of 5 samples: the worst copy differs by sample, so any (m*B) -> (B, m) reshape mix-up fails
    offsets = torch.tensor([[0.0, 5.0, 1.0, 2.0, -1.0],
                            [3.0, 0.0, 1.5, 2.5, -3.0],
                            [1.0, 1.0, 4.0, 0.0, -2.0]])
    x, y = torch.zeros(5, 1), torch.zeros(5, dtype=torch.long)
    result = MaxUp(Shift(offsets), m=3, mode=mode)(score_model(), x, y)
    expected = torch.nn.functional.softplus(offsets.max(0).values)
    assert torch.allclose(result.losses, expected)
    assert torch.allclose(result.loss, expected.mean())
    if mode == "select":
        assert torch.allclose(result.inputs[:, 0], offsets.max(0).values)


def test_include_clean_is_a_candidate():
    offsets = -torch.ones(2, 4)  # every augmented copy is easier than the clean sample
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    result = MaxUp(Shift(offsets), m=2, include_clean=True)(score_model(), x, y)
    assert torch.allclose(result.inputs, x)
    assert torch.allclose(result.losses, torch.full((4,), math.log(2.0)))


def test_temperature_weights():
    offsets = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 0.0]])
    x, y = torch.zeros(2, 1), torch.zeros(2, dtype=torch.long)
    rows = torch.nn.functional.softplus(offsets)
    avg = MaxUp(Shift(offsets), m=3, temperature=math.inf)(score_model(), x, y)
    assert torch.allclose(avg.losses, rows.mean(0))
    soft = MaxUp(Shift(offsets), m=3, temperature=0.5)(score_model(), x, y)
    w = torch.softmax(rows / 0.5, 0)
    assert torch.allclose(soft.losses, (w * rows).sum(0))
    assert torch.allclose(soft.weights.sum(), torch.tensor(1.0))
    # small temperature -> the hard max
    hard = MaxUp(Shift(offsets), m=3, temperature=1e-4)(score_model(), x, y)
    assert torch.allclose(hard.losses, rows.max(0).values, atol=1e-4)


def test_copies_are_independent_draws():
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    xs, ts = MaxUp(A.CutMix(num_classes=3), m=4).candidates(x, y, torch.Generator().manual_seed(0))
    assert xs.shape == (4, 6, 1, 8, 8) and ts.shape == (4, 6, 3)
    assert len({tuple(t.flatten().tolist()) for t in ts}) == 4  # each copy its own lambda, box, partner


def test_warmup_uses_one_copy_then_m():
    obj = MaxUp(A.GaussianNoise(0.1, num_classes=3), m=4, warmup_steps=2, mode="direct")
    model = nn.Linear(5, 3)
    x, y = torch.rand(6, 5), torch.randint(0, 3, (6,))
    assert [obj(model, x, y).inputs.shape[0] for _ in range(3)] == [6, 6, 24]
    assert obj.state_dict() == {"num_steps": 3}
    fresh = MaxUp(A.GaussianNoise(0.1, num_classes=3), m=4, warmup_steps=2)
    fresh.load_state_dict(obj.state_dict())
    assert fresh.num_steps == 3


def small_net(bn=False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 4, 3, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("aug", [A.CutMix(num_classes=3, per_sample=True), A.Mixup(num_classes=3, per_sample=True),
                                 A.GaussianNoise(0.3, num_classes=3)], ids=lambda a: type(a).__name__)
def test_select_and_direct_give_the_same_gradient(aug):
    x, y = torch.rand(9, 1, 8, 8), torch.randint(0, 3, (9,))
    grads = []
    for mode in ("select", "direct"):
        model = small_net()
        MaxUp(aug, m=4, mode=mode)(model, x, y, torch.Generator().manual_seed(7)).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_chunked_selection_equals_one_pass():
    x, y = torch.rand(9, 1, 8, 8), torch.randint(0, 3, (9,))
    model = small_net()
    whole = MaxUp(A.CutMix(num_classes=3, per_sample=True), m=4)(model, x, y, torch.Generator().manual_seed(1))
    chunked = MaxUp(A.CutMix(num_classes=3, per_sample=True), m=4, select_batch_size=9)(
        model, x, y, torch.Generator().manual_seed(1))
    assert torch.equal(whole.inputs, chunked.inputs)


def test_selection_pass_leaves_batchnorm_statistics_untouched():
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    model = small_net(bn=True)
    reference = copy.deepcopy(model)
    result = MaxUp(A.CutMix(num_classes=3, per_sample=True), m=4)(model, x, y, torch.Generator().manual_seed(0))
    reference(result.inputs)  # one training-mode forward on the chosen copies, nothing else
    for (name, a), b in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name
    assert int(model[1].num_batches_tracked) == 1


def test_gaussian_maxup_is_a_gradient_norm_penalty():
    """max_j l(x + s e_j) - l(x) ~ c_m s ||grad_x l||; the average over copies gives only O(s^2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x0 = torch.randn(1, 6, dtype=torch.float64)
    y0 = torch.tensor([1])
    xg = x0.clone().requires_grad_(True)
    clean = torch.nn.functional.cross_entropy(model(xg), y0)
    (g,) = torch.autograd.grad(clean, xg)
    sigma, m, n = 0.01, 4, 20000
    c_m = 1.0293753730039641  # E[max of 4 standard normals]
    expected = c_m * sigma * g.norm().item()
    x, y = x0.expand(n, 6), y0.expand(n)
    gen = torch.Generator().manual_seed(0)
    gap_max = MaxUp(A.GaussianNoise(sigma, num_classes=3), m=m)(model, x, y, gen).losses.mean().item() - clean.item()
    gap_avg = MaxUp(A.GaussianNoise(sigma, num_classes=3), m=m, temperature=math.inf)(
        model, x, y, gen).losses.mean().item() - clean.item()
    assert gap_max == pytest.approx(expected, rel=0.08)
    assert abs(gap_avg) < 0.1 * expected


def test_erm_plain_and_augmented():
    model = small_net()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 3, (5,))
    r = ERM()(model, x, y)
    assert torch.allclose(r.loss, torch.nn.functional.cross_entropy(model(x), y))
    assert r.targets.shape == (5, 3) and torch.allclose(r.weights.sum(), torch.tensor(1.0))
    r2 = ERM(A.Cutout(4, num_classes=3))(model, x, y, torch.Generator().manual_seed(0))
    assert not torch.equal(r2.inputs, x)


@pytest.mark.parametrize("mode", ["select", "direct"])
def test_reevaluate_reuses_the_chosen_copies(mode):
    model = small_net()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    objective = MaxUp(A.CutMix(num_classes=3, per_sample=True), m=3, mode=mode)
    result = objective(model, x, y, torch.Generator().manual_seed(0))
    again = Objective.reevaluate(model, result)
    assert torch.allclose(again.loss, result.loss, atol=1e-6)
    assert again.inputs.shape[0] == 6  # zero-weight copies are skipped


def test_standard_step_matches_a_hand_written_update():
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 3, (6,))
    a, b = small_net(), small_net()
    step = Standard(ERM(), torch.optim.SGD(a.parameters(), lr=0.1))
    result = step(a, x, y)
    torch.nn.functional.cross_entropy(b(x), y).backward()
    with torch.no_grad():
        for p in b.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    assert result.logits.shape == (6, 3)


def test_standard_step_clips_the_gradient():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    step = Standard(ERM(), torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=0.01)
    step(model, torch.full((4, 3), 100.0), torch.zeros(4, dtype=torch.long))
    assert model.weight.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_maxup_step_trains():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    step = maxup.methods.build_step("maxup(m=4)+gaussian(sigma=0.1)", model=model,
                                    optimizer=torch.optim.SGD(model.parameters(), lr=0.5), num_classes=2)
    g = torch.Generator().manual_seed(0)
    first = step(model, x, y, g).loss.item()
    for _ in range(30):
        last = step(model, x, y, g).loss.item()
    assert last < 0.5 * first


@pytest.mark.parametrize("make, match", [
    (lambda: MaxUp(A.Identity(), m=0), "m must be an integer >= 1"),
    (lambda: MaxUp(A.Identity(), m=2.5), "m must be an integer"),
    (lambda: MaxUp(A.Identity(), temperature=-1.0), "temperature"),
    (lambda: MaxUp(A.Identity(), mode="fast"), "mode"),
    (lambda: MaxUp(A.Identity(), temperature=1.0, mode="select"), "temperature=0"),
    (lambda: MaxUp(A.Identity(), warmup_steps=-1), "warmup_steps"),
    (lambda: Standard(ERM(), "sgd"), "torch.optim.Optimizer"),
    (lambda: Standard(ERM(), torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1), amp="fp8"), "amp"),
])
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
