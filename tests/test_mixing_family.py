"""Manifold Mixup, Soft Augmentation, LUMix, label smoothing and MaxUp's soft weighting as method specs:
each element against its formula with fixed randomness, composition with MaxUp and SAM, and the errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import augment as A
from maxup import functional as MF
from maxup import methods as M
from maxup.cli import main, method_line
from maxup.functional.manifold import HiddenMix
from maxup.models import SmallCNN
from maxup.objectives import ERM, MaxUp, Objective

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Sequential:
    """Modules "0" (linear), "1" (ReLU), "2" (linear): no batch statistics, so every row is its own."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------ Manifold Mixup


def test_manifold_mixup_matches_the_formula_at_a_fixed_layer_lambda_and_permutation():
    model, x = mlp(), torch.randn(5, 4)
    t = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    lam, perm = torch.tensor([0.3, 0.9, 0.5, 1.0, 0.2]), torch.tensor([2, 0, 4, 1, 3])
    logits, t_mix = MF.manifold_mixup(model, x, t, "1", lam, perm)
    h = model[1](model[0](x))
    expected = model[2](lam[:, None] * h + (1 - lam[:, None]) * h[perm])
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(t_mix, lam[:, None] * t + (1 - lam[:, None]) * t[perm])
    assert no_hooks(model)
    logits, _ = MF.manifold_mixup(model, x, t, "input", 0.25, perm)  # the input point mixes the inputs
    assert torch.allclose(logits, model(0.25 * x + 0.75 * x[perm]), atol=1e-6)
    assert no_hooks(model)


def test_hooks_are_removed_after_an_error_and_gradients_reach_both_partners():
    model, x = mlp(), torch.randn(4, 4, requires_grad=True)
    plan = HiddenMix.single(("input", "0"), 1, 0.5, torch.tensor([1, 0, 3, 2]))
    with pytest.raises(RuntimeError, match="boom"):
        with MF.mix_hidden(model, plan):
            raise RuntimeError("boom")
    assert no_hooks(model)
    with MF.mix_hidden(model, plan):
        model(x)[0].sum().backward()  # row 0 mixes with row 1
    assert no_hooks(model)
    assert x.grad[:2].abs().sum() > 0 and x.grad[2:].abs().sum() == 0


def test_blocks_of_a_stacked_plan_mix_as_if_forwarded_alone():
    model, x = mlp(), torch.randn(4, 4)
    a = HiddenMix.single(("input", "0", "1"), 0, 0.3, torch.tensor([3, 2, 1, 0]))
    b = HiddenMix.single(("input", "0", "1"), 2, torch.tensor([0.1, 0.4, 0.6, 0.8]), torch.tensor([1, 2, 3, 0]))
    c = HiddenMix.identity(("input", "0", "1"), 4)
    with MF.mix_hidden(model, HiddenMix.stack([a, b, c])):
        together = model(torch.cat([x, x, x]))
    alone = []
    for plan in (a, b, c):
        with MF.mix_hidden(model, plan):
            alone.append(model(x))
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)
    assert torch.allclose(alone[2], model(x))


def test_manifold_mixup_augmentation_draws_layer_lambda_partner_and_keeps_inputs():
    aug = A.ManifoldMixup(layers=("input", "0", "1"), num_classes=3, per_sample=True)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    xa, ta, plan = aug.draw(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(xa, x) and torch.equal(aug(x, y, torch.Generator().manual_seed(3))[1], ta)
    assert plan.layer.unique().numel() == 1 and 0 <= int(plan.layer[0]) < 3
    t = F.one_hot(y, 3).float()
    assert torch.allclose(ta, plan.lam[:, None] * t + (1 - plan.lam[:, None]) * t[plan.perm])
    again = A.ManifoldMixup(layers=("input", "0", "1"), num_classes=3, per_sample=True)
    _, _, drawn = again.draw(x, y, torch.Generator().manual_seed(3))
    assert torch.equal(drawn.lam, plan.lam) and torch.equal(drawn.perm, plan.perm)


def test_maxup_over_manifold_mixup_takes_the_worst_of_copies_each_with_its_own_draw():
    model, x, y = mlp(), torch.randn(8, 4), torch.randint(0, 3, (8,))
    aug = A.ManifoldMixup(layers=("input", "0", "1"), num_classes=3, per_sample=True)
    objective = MaxUp(aug, m=4)
    assert objective.mode == "direct"
    result = objective(model, x, y, torch.Generator().manual_seed(0))
    assert no_hooks(model)
    plan, n = result.context, x.shape[0]
    blocks = [HiddenMix(plan.points, plan.layer[j * n:(j + 1) * n], plan.lam[j * n:(j + 1) * n],
                        plan.perm[j * n:(j + 1) * n] - j * n) for j in range(4)]
    assert len({(int(b.layer[0]), tuple(b.perm.tolist())) for b in blocks}) == 4  # own layer/partner per copy
    losses = []
    for j, block in enumerate(blocks):
        with MF.mix_hidden(model, block):
            logits = model(x)
        losses.append(MF.soft_cross_entropy(logits, result.targets[j * n:(j + 1) * n], reduction="none"))
    assert torch.allclose(result.losses, torch.stack(losses).max(0).values, atol=1e-6)
    # the second pass of SAM reuses each row's layer, lambda and partner
    again = Objective.reevaluate(model, result)
    assert torch.allclose(again.loss, result.loss, atol=1e-6) and no_hooks(model)
    plain = MF.soft_cross_entropy(model(result.inputs), result.targets, reduction="none")
    assert not torch.allclose((result.weights * plain).sum(), result.loss)


def test_manifold_mixup_trains_under_erm_maxup_and_sam_on_a_bundled_model():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for spec in ["manifold_mixup", "maxup(m=3, temperature=0.5)+cropflip+manifold_mixup(alpha=1.0)",
                 "sam+maxup(m=2)+manifold_mixup(layers=('blocks.1',))",
                 "maxup(m=2, include_clean=true)+manifold_mixup"]:
        step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)
        result = step(model, x, y, torch.Generator().manual_seed(1))
        assert math.isfinite(result.loss.item()) and no_hooks(model)
        assert result.context is not None and len(result.context) == result.inputs.shape[0]
    assert M.REGISTRY["manifold_mixup"].factory(model=model).layers == ("input", "blocks.0", "blocks.1")


@pytest.mark.parametrize("spec, message", [
    ("manifold_mixup+cutout", "must be the last augmentation"),
    ("maxup(mode='select')+manifold_mixup", "mode='direct'"),
    ("manifold_mixup(layers=('nope',))", "no module named 'nope'"),
    ("sam_mixup+manifold_mixup", "does not compose with sam_mixup"),
    ("soft_augment(reweight=true)+cutout", "must be the last augmentation"),
    ("soft_augment+cutout", "pass soft_augment(reweight=false)"),  # reweight is on by default
    ("sam_mixup+soft_augment(reweight=true)", "does not compose with"),
    ("sam_mixup+soft_augment", "reweight"),
])
def test_combinations_that_cannot_work_are_clear_errors(spec, message):
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)
        step(model, torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,)))


def test_manifold_mixup_needs_layers_without_stages():
    with pytest.raises(ValueError, match="layers="):
        A.ManifoldMixup(model=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="layers="):
        A.ManifoldMixup()
    with pytest.raises(ValueError, match="module named"):
        with MF.mix_hidden(mlp(), HiddenMix.single(("7",), 0, 0.5, torch.arange(2))):
            pass



def test_terms_that_must_come_last_are_checked_through_nested_compositions():
    mm = A.ManifoldMixup(layers=["input"], num_classes=3)
    for inner in (A.Compose([A.Cutout(2, num_classes=3), mm]), A.RandomChoice([mm, A.Cutout(2, num_classes=3)])):
        with pytest.raises(ValueError, match="must be the last augmentation"):
            A.Compose([inner, A.Cutout(2, num_classes=3)])
        A.Compose([A.Cutout(2, num_classes=3), inner])  # last: fine
    with pytest.raises(ValueError, match="scales each target row"):
        A.Compose([A.SoftAugmentation(num_classes=3, reweight=True), A.Cutout(2, num_classes=3)])
    with pytest.raises(ValueError, match=r"reweight \(on by default\)"):
        A.Compose([A.SoftAugmentation(num_classes=3), A.Cutout(2, num_classes=3)])
    A.Compose([A.SoftAugmentation(num_classes=3, reweight=False), A.Cutout(2, num_classes=3)])


def test_manifold_mixup_is_refused_by_the_data_loader_collate():
    """A loader cannot mix inside the model: it would return unmixed inputs with mixed targets."""
    aug = A.Compose([A.Cutout(2, num_classes=3), A.ManifoldMixup(layers=["input"], num_classes=3)])
    with pytest.raises(ValueError, match="collate cannot apply ManifoldMixup"):
        A.collate(aug)

# ------------------------------------------------------------------------------------------ Soft Augmentation


def curve(v: float, k: int, p_max: float, t: float, power: float) -> float:
    return p_max if v >= t else p_max - (p_max - 1.0 / k) * ((t - v) / t) ** power


def test_softening_curve_matches_the_formula_for_crafted_visibilities():
    v = [0.0, 0.1, 0.35, 0.5, 0.79, 0.8, 0.95, 1.0]
    for k, p_max, t, power in [(10, 1.0, 1.0, 4.0), (5, 0.9, 0.8, 2.0), (100, 0.7, 0.5, 1.0)]:
        got = MF.softening_curve(torch.tensor(v), k, p_max=p_max, threshold=t, power=power)
        expected = torch.tensor([curve(a, k, p_max, t, power) for a in v])
        assert torch.allclose(got, expected, atol=1e-6)
    assert MF.softening_curve(torch.tensor([0.0]), 10).item() == pytest.approx(0.1)  # nothing visible: chance
    t = MF.soften_targets(F.one_hot(torch.tensor([2, 0]), 4).float(), torch.tensor([0.7, 0.25]))
    assert torch.allclose(t, torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    with pytest.raises(ValueError, match="p_max must be at least 1/num_classes"):
        MF.softening_curve(torch.tensor([0.5]), 4, p_max=0.2)


def test_shift_crop_and_occlusion_report_the_visible_fraction():
    x = torch.arange(2 * 3 * 6 * 5, dtype=torch.float32).view(2, 3, 6, 5)
    out, visible = MF.shift_crop(x, torch.tensor([[2, -1], [-6, 0]]), fill=-1.0)
    expected = torch.full_like(x[0], -1.0)
    expected[:, :4, 1:] = x[0, :, 2:, :4]  # output (i, j) = x[i + 2, j - 1]
    assert torch.equal(out[0], expected) and bool((out[1] == -1).all())
    assert torch.allclose(visible, torch.tensor([4 * 4 / 30, 0.0]))
    out, visible = MF.occlude(x, torch.tensor([[1, 1, 3, 4], [0, 0, 0, 0]]), fill=torch.zeros(2, 3))
    assert bool((out[0, :, 1:3, 1:4] == 0).all()) and torch.equal(out[1], x[1])
    assert torch.allclose(visible, torch.tensor([1 - 6 / 30, 1.0]))


@pytest.mark.parametrize("transform", ["crop", "cutout"])
def test_soft_augmentation_targets_follow_the_visible_fraction(transform):
    aug = A.SoftAugmentation(transform, sigma=0.5, fill=0.0, num_classes=10, power=2.0, reweight=False)
    x, y = torch.ones(64, 1, 8, 8), torch.arange(64) % 10
    xa, ta = aug(x, y, torch.Generator().manual_seed(0))
    visible = xa.mean((1, 2, 3))  # ones where the image is left, zeros elsewhere
    p = MF.softening_curve(visible, 10, power=2.0)
    assert visible.min() < 0.9 and torch.allclose(ta[torch.arange(64), y], p, atol=1e-6)
    others = (ta.sum(1) - p) / 9
    assert torch.allclose(ta.sum(1), torch.ones(64)) and torch.allclose(ta.min(1).values, others, atol=1e-6)
    weighted = A.SoftAugmentation(transform, sigma=0.5, fill=0.0, num_classes=10, power=2.0, reweight=True)
    _, tw = weighted(x, y, torch.Generator().manual_seed(0))
    assert torch.allclose(tw, ta * p[:, None], atol=1e-6)  # the loss of a row is p times its loss


def test_soft_augmentation_shifts_stay_within_the_image_and_errors():
    offsets = A.SoftAugmentation(sigma=2.0)._offsets(5000, 8, 6, torch.Generator().manual_seed(0), None)
    assert offsets[:, 0].abs().max() <= 8 and offsets[:, 1].abs().max() <= 6 and offsets.abs().max() > 4
    with pytest.raises(ValueError, match="transform"):
        A.SoftAugmentation("rotate")
    with pytest.raises(ValueError, match="threshold"):
        A.SoftAugmentation(threshold=0.0)


#: the recipe the authors' CIFAR code runs (github.com/youngleox/soft_augmentation at 1dcf469,
#: cifar/read_me.sh and README: `train.py --da 2 --loss st --pcrop 2 --crop 12`), as our arguments
AUTHORS_CODE = {
    "transform": "crop",   # --da 2: utils.get_training_dataloader builds SoftCrop (utils.py:283-294)
    "sigma": 12 / 32,      # --crop 12 px (train.py:230), drawn on 32 x 32 CIFAR images (SoftCrop.draw_offset)
    "power": 2.0,          # --pcrop 2 (train.py:233)
    "threshold": 1.0,      # t_crop=1.0, fixed (utils.py:291)
    "p_max": 1.0,          # --max_p 1.0 (train.py:242)
    "fill": None,          # one randn value per channel (utils.py:572) ...
    "fill_scale": 0.01,    # ... times --bgcrop 0.01 (train.py:236)
    "reweight": True,      # --rw: store_true with default=True, always on (train.py:272)
    "p": 1.0,              # every sample is cropped (SoftCrop.__call__)
}
#: this class's defaults before it followed train.py: those of the authors' SoftCrop.__init__
#: (utils.py:536) and get_training_dataloader (utils.py:244), which train.py overrides
OLD_DEFAULTS = {"sigma": 0.3125, "power": 4.0, "fill_scale": 1.0, "reweight": False}


def test_soft_augmentation_defaults_are_the_authors_code_recipe():
    options = A.SoftAugmentation(num_classes=10)._options()
    assert {k: options[k] for k in AUTHORS_CODE} == AUTHORS_CODE
    assert {k: M.REGISTRY["soft_augment"].options()[k] for k in AUTHORS_CODE} == AUTHORS_CODE  # the spec term's
    curve = MF.softening_curve(torch.tensor([0.5]), 10)  # the functional curve's defaults: k = 2, T = 1, p_max = 1
    assert curve.item() == pytest.approx(1 - 0.9 * 0.5 ** 2)
    built = M.build_augment("soft_augment(sigma=0.3125, power=4.0, fill_scale=1.0, reweight=false)", 10)
    assert {k: built._options()[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS


def test_soft_augmentation_default_fill_is_the_scaled_noise_and_rows_are_weighted():
    x, y = torch.ones(256, 2, 8, 8), torch.arange(256) % 10
    xa, ta = A.SoftAugmentation(num_classes=10)(x, y, torch.Generator().manual_seed(0))
    xb, tb = A.SoftAugmentation(num_classes=10, fill_scale=1.0)(x, y, torch.Generator().manual_seed(0))
    band = xb != 1  # the filled pixels (an N(0, 1) draw is never exactly 1)
    assert bool(band.any()) and torch.equal(xa != 1, band)
    assert torch.allclose(xa[band], 0.01 * xb[band])  # the same draws, scaled by 0.01
    visible = (xa == 1).float().mean((1, 2, 3))
    p = MF.softening_curve(visible, 10, power=2.0)
    assert torch.allclose(ta[torch.arange(256), y], p * p, atol=1e-6)  # soft target p, weighted by p
    assert torch.allclose(ta.sum(1), p, atol=1e-6) and torch.equal(ta, tb)


@pytest.mark.parametrize("transform", ["crop", "cutout"])
def test_soft_augmentation_with_the_old_defaults_passed_is_unchanged(transform):
    """The old defaults, passed explicitly, give what the class gave before, draw for draw."""
    x, y = torch.randn(16, 3, 9, 7), torch.arange(16) % 5
    aug = A.SoftAugmentation(transform, num_classes=5, **OLD_DEFAULTS)
    xa, ta = aug(x, y, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the draws in their order: shifts, fill, then the box corners
    offsets = aug._offsets(16, 9, 7, g, None)
    fill = torch.randn((16, 3), generator=g)
    if transform == "crop":
        expected, visible = MF.shift_crop(x, offsets, fill)
    else:
        size = offsets.abs()
        y0 = (torch.rand(16, generator=g, dtype=torch.float64) * (10 - size[:, 0])).long()
        x0 = (torch.rand(16, generator=g, dtype=torch.float64) * (8 - size[:, 1])).long()
        expected, visible = MF.occlude(x, torch.stack([y0, x0, y0 + size[:, 0], x0 + size[:, 1]], 1), fill)
    assert torch.equal(xa, expected) and visible.min() < 1
    p = MF.softening_curve(visible, 5, power=4.0)
    assert torch.allclose(ta, MF.soften_targets(F.one_hot(y, 5).float(), p), atol=1e-6)


def test_soft_augmentation_fill_scale_errors():
    with pytest.raises(ValueError, match="fill_scale must be >= 0"):
        A.SoftAugmentation(fill_scale=-1.0)
    with pytest.raises(ValueError, match="drop fill_scale or fill"):
        A.SoftAugmentation(fill=0.0, fill_scale=1.0)
    assert A.SoftAugmentation(fill=0.0).fill == 0.0 and A.SoftAugmentation(fill_scale=0.0).fill_scale == 0.0


# ------------------------------------------------------------------------------------------ LUMix


def test_lumix_mixes_images_by_lambda_and_labels_by_the_perturbed_ratio():
    x, t = torch.randn(4, 1, 4, 4), F.one_hot(torch.tensor([0, 1, 2, 3]), 4).float()
    perm, delta = torch.tensor([1, 2, 3, 0]), torch.tensor([0.1, -0.3, 0.25, 0.0])
    out, t_mix, lam_y = MF.lumix(x, t, 0.8, perm, delta)
    assert torch.allclose(out, MF.mixup(x, t, 0.8, perm)[0])
    assert torch.allclose(lam_y, torch.tensor([0.9, 0.5, 1.0, 0.8]))
    assert torch.allclose(t_mix, lam_y[:, None] * t + (1 - lam_y[:, None]) * t[perm])
    boxes = torch.tensor([[0, 0, 2, 2]] * 4)
    out, _, lam_y = MF.lumix(x, t, 0.5, perm, delta, boxes)
    assert torch.equal(out, MF.cutmix(x, t, boxes, perm)[0])
    assert torch.allclose(lam_y, (0.75 + delta).clamp(0, 1))


def test_lumix_label_ratios_stay_in_0_1_and_follow_the_documented_distribution():
    n, u = 2000, 0.2
    aug = A.LUMix(alpha=1.0, uncertainty=u, per_sample=True, num_classes=n)
    xa, ta = aug(torch.eye(n), torch.arange(n), torch.Generator().manual_seed(0))  # row i: e_i mixed with e_perm(i)
    lam_x, lam_y = xa.diagonal(), ta.diagonal()
    paired = lam_x < 1  # rows whose partner is another sample
    lam_x, lam_y = lam_x[paired], lam_y[paired]
    assert bool(((lam_y >= 0) & (lam_y <= 1)).all())
    inside = (lam_y > 0) & (lam_y < 1)
    delta = (lam_y - lam_x)[inside]
    assert delta.abs().max() <= u + 1e-6
    # lam ~ U(0, 1), delta ~ U[-u, u]: each end is hit with probability u / 4, the rest is lam + delta
    for end in (lam_y == 0, lam_y == 1):
        assert abs(end.double().mean().item() - u / 4) < 0.015
    kept = delta[(lam_x[inside] > u) & (lam_x[inside] < 1 - u)]  # no clipping possible: delta is exactly uniform
    grid = torch.linspace(-u, u, 21)
    ecdf = (kept[None, :] <= grid[:, None]).double().mean(1)
    assert (ecdf - (grid + u) / (2 * u)).abs().max() < 1.63 / math.sqrt(kept.numel())  # Kolmogorov-Smirnov, 1%


def test_lumix_with_cutmix_base_and_errors():
    aug = A.LUMix(base="cutmix", uncertainty=0.0, num_classes=3)
    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    g = torch.Generator().manual_seed(5)
    _, ta = aug(x, y, g)
    _, tc = A.CutMix(num_classes=3)(x, y, torch.Generator().manual_seed(5))
    assert torch.allclose(ta, tc)  # no uncertainty: CutMix's labels
    with pytest.raises(ValueError, match="base"):
        A.LUMix(base="gmix")
    with pytest.raises(ValueError, match="uncertainty"):
        A.LUMix(uncertainty=1.5)


# ------------------------------------------------------------------------------------------ specs


def test_label_smoothing_spec():
    aug = M.build_augment(M.parse("smooth(eps=0.2)"), 5)
    x, y = torch.randn(3, 2), torch.tensor([0, 4, 2])
    xa, ta = aug(x, y)
    assert torch.equal(xa, x) and torch.allclose(ta, 0.8 * F.one_hot(y, 5).float() + 0.04)
    with pytest.raises(ValueError, match="eps"):
        M.build_augment(M.parse("smooth(eps=2)"), 5)
    for spec in ("maxup(m=4)", "maxup(m=4)+smooth", "sam+maxup(m=2)+smooth(eps=0.2)"):
        with pytest.raises(ValueError, match="MaxUp needs a random augmentation"):
            M.parse(spec)
    M.parse("maxup(m=4)+cutout+smooth")
    M.parse("maxup(m=4)+sam_mixup")  # the step mixes each copy itself


def test_maxup_soft_weighting_spec_is_mmel():
    objective = M.build_objective("maxup(m=4, temperature=0.5)+mixup", 3)
    assert isinstance(objective, MaxUp) and objective.temperature == 0.5 and objective.mode == "direct"
    model, x, y = mlp(), torch.randn(6, 4), torch.randint(0, 3, (6,))
    result = objective(model, x, y, torch.Generator().manual_seed(0))
    rows = MF.soft_cross_entropy(result.logits, result.targets, reduction="none").view(4, 6)
    assert torch.allclose(result.weights.view(4, 6) * 6, torch.softmax(rows / 0.5, 0), atol=1e-6)
    assert torch.allclose(result.losses, (torch.softmax(rows / 0.5, 0) * rows).sum(0), atol=1e-6)
    assert M.canonical("MAXUP(m=4, temperature=0.5)+Cutout+smooth") == "maxup(m=4, temperature=0.5)+cutout+smooth"
    assert isinstance(M.build_objective("smooth+mixup", 3), ERM)


@pytest.mark.parametrize("mode", ["select", "direct"])
def test_maxup_score_kl_picks_the_worst_fit_not_the_most_ambiguous_target(mode):
    """score='kl' ranks copies by CE - H(t) = KL(t || p); the chosen copy still trains on its CE."""
    model, x, y = mlp(), torch.randn(16, 4), torch.randint(0, 3, (16,))
    aug = A.Mixup(num_classes=3, per_sample=True)
    picks = {}
    for score in ("loss", "kl"):
        objective = MaxUp(aug, m=4, score=score, mode=mode)
        xs, ts = objective.candidates(x, y, torch.Generator().manual_seed(1))
        with torch.no_grad():
            ce = MF.soft_cross_entropy(model(xs.flatten(0, 1)), ts.flatten(0, 1), reduction="none").view(4, 16)
        entropy = -(ts * ts.clamp_min(1e-30).log()).sum(-1)
        pick = (ce - entropy if score == "kl" else ce).argmax(0)
        result = objective(model, x, y, torch.Generator().manual_seed(1))
        assert torch.allclose(result.losses, ce[pick, torch.arange(16)], atol=1e-5)  # trained on the chosen CE
        picks[score] = pick
    assert not torch.equal(picks["loss"], picks["kl"])  # the entropy term changes the choice
    with pytest.raises(ValueError, match="score must be"):
        MaxUp(aug, score="ce")
    assert M.build_objective("maxup(m=2, score='kl')+cutmix", 3).score == "kl"


def test_methods_listing_shows_every_term_with_its_options_on_one_line(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for entry in M.list_methods():
        assert f"  {method_line(entry)}" in lines
    line = method_line(M.REGISTRY["soft_augment"])
    assert line.startswith("soft_augment(transform='crop', sigma=0.375, power=2.0, threshold=1.0, p_max=1.0, "
                           "fill=None, fill_scale=0.01, reweight=True")
    assert method_line(M.REGISTRY["smooth"]).startswith("smooth(eps=0.1) -- ")
    assert method_line(M.REGISTRY["erm"]).startswith("erm -- ")


def test_new_terms_fit_end_to_end():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=4, channels=(4, 8))
    x, y = torch.rand(24, 1, 8, 8), torch.arange(24) % 4
    spec = "maxup(m=2)+soft_augment(transform='cutout', reweight=false)+lumix(base='cutmix')"
    history = maxup.fit(model, spec, train=(x, y),
                        epochs=1, batch_size=12, progress=False, device="cpu")
    assert math.isfinite(history[-1]["train_loss"])
