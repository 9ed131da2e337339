"""The long-tail methods (maxup.augment.longtail, maxup.functional.longtail): logit adjustment and Balanced Softmax,
CMO, bilateral mixup with class-wise temperatures (DBN-Mix), class-distance partner selection, and the Trainer's
epoch hooks and the builder's training-data arguments they rely on.

Side by side with the authors' code (transcribed below, randomness injected):
- google-research/google-research, logit_adjustment/utils.py, ``build_loss_fn`` (commit 1d4d2f1a), TF -> numpy;
- jiawei-ren/BalancedMetaSoftmax-Classification, loss/BalancedSoftmaxLoss.py, ``balanced_softmax_loss`` (read from
  the fork caisarl76/BalancedMetaSoftmax-Classification at commit 00c52b11);
- naver-ai/cmo, cifar_train.py, ``rand_bbox`` and the CMO branch of ``train`` (commit 46eab7a2), and
  imbalance_data/imbalance_cifar.py, ``get_weighted_sampler``;
- soony1213/DBN-Mix, losses.py, ``mixup`` (use_experts off) and ``MixLoss.forward`` (commit 43595853).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import methods as M
from maxup.augment import Compose, CutMix
from maxup.augment.longtail import CMO, BalancedSoftmax, BilateralMixup, ClassDistanceMix, LogitAdjust
from maxup.data import TensorData, load_dataset
from maxup.data.longtail import class_counts
from maxup.data.sampling import class_probabilities
from maxup.functional import soft_cross_entropy, soft_targets
from maxup.functional.longtail import (
    LogitTransform,
    bilateral_mix,
    class_distances,
    class_probability_matrix,
    class_temperatures,
    log_prior,
    partner_weights,
    paste_boxes,
)
from maxup.functional.mixing import sample_boxes
from maxup.models import SmallCNN
from maxup.objectives import ERM, MaxUp
from maxup.train.syncs import count_step_syncs
from maxup.train.trainer import epoch_hooks

COUNTS = [50, 20, 8, 2]


def linear(num_features: int, num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(num_features, num_classes))


def class_images(counts, size=8, channels=1, extra_classes=0):
    """A training set whose images of class c are constant c + 1 (so a pasted pixel names its source class)."""
    y = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    x = (y.float() + 1.0)[:, None, None, None].expand(-1, channels, size, size).contiguous()
    return TensorData(x, y), len(counts) + extra_classes


# ---------------------------------------------------------------------------------------- the references

def ref_logit_adjusted_loss(labels, logits, base_probs, tau):
    """google-research logit_adjustment/utils.py build_loss_fn(use_la_loss=True, ...), in numpy."""
    logits = logits + np.log(base_probs ** tau + 1e-12)
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean()


def ref_balanced_softmax_loss(labels, logits, sample_per_class, reduction="mean"):
    """BalancedMetaSoftmax-Classification loss/BalancedSoftmaxLoss.py balanced_softmax_loss, as released."""
    spc = sample_per_class.type_as(logits)
    spc = spc.unsqueeze(0).expand(logits.shape[0], -1)
    logits = logits + spc.log()
    return F.cross_entropy(input=logits, target=labels, reduction=reduction)


def ref_rand_bbox(size, lam, cx, cy):
    """naver-ai/cmo cifar_train.py rand_bbox, the centre (np.random.randint) injected."""
    W = size[2]
    H = size[3]
    cut_rat = np.sqrt(1. - lam)
    cut_w = int(W * cut_rat)
    cut_h = int(H * cut_rat)
    bbx1 = np.clip(cx - cut_w // 2, 0, W)
    bby1 = np.clip(cy - cut_h // 2, 0, H)
    bbx2 = np.clip(cx + cut_w // 2, 0, W)
    bby2 = np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def ref_cmo_loss(input, target, input2, target2, lam, cx, cy, model, criterion):
    """The CMO branch of naver-ai/cmo cifar_train.py train(), lam (np.random.beta) and the centre injected."""
    input = input.clone()
    bbx1, bby1, bbx2, bby2 = ref_rand_bbox(input.size(), lam, cx, cy)
    input[:, :, bbx1:bbx2, bby1:bby2] = input2[:, :, bbx1:bbx2, bby1:bby2]
    lam = 1 - ((bbx2 - bbx1) * (bby2 - bby1) / (input.size()[-1] * input.size()[-2]))
    output = model(input)
    loss = criterion(output, target) * lam + criterion(output, target2) * (1. - lam)
    return input, loss, lam, (bbx1, bby1, bbx2, bby2)


def ref_cmo_class_probabilities(cls_num_list, weighted_alpha=1.0):
    """The class chances of naver-ai/cmo get_weighted_sampler: sample weight cls_weight[t], summed per class."""
    cls_num_list = np.asarray(cls_num_list, dtype=np.float64)
    cls_weight = 1.0 / (cls_num_list ** weighted_alpha)
    cls_weight = cls_weight / np.sum(cls_weight) * len(cls_num_list)
    per_class = cls_weight * cls_num_list
    return per_class / per_class.sum()


def ref_dbn_mixup(input, target, input_b, target_b, lam, index, num_classes):
    """soony1213/DBN-Mix losses.py mixup(), use_experts off; lam (np.random.beta) and index (randperm) injected."""
    target = F.one_hot(target, num_classes)
    target_b = F.one_hot(target_b, num_classes)
    mixed_input = lam * input[index] + (1 - lam) * input_b
    mixed_target = lam * target[index] + (1 - lam) * target_b
    return mixed_input, mixed_target


def ref_dbn_mixloss(logit, target, cls_num_list, temp_epsilon, temp_eta):
    """soony1213/DBN-Mix losses.py MixLoss.forward, weight None."""
    n_max = max(cls_num_list)
    phi = temp_epsilon * len(cls_num_list) * (cls_num_list / n_max) + (1 - temp_epsilon)
    phi = max(phi) / phi
    phi = phi ** (1 / temp_eta)
    logit = logit / phi
    pred = torch.softmax(logit, dim=1)
    return - torch.mean(torch.sum(torch.log(pred) * target, dim=1)
                        + torch.sum(torch.log(1 - pred) * (1 - target), dim=1))


def ref_dbn_phi(cls_num_list, temp_epsilon, temp_eta):
    n_max = max(cls_num_list)
    phi = temp_epsilon * len(cls_num_list) * (cls_num_list / n_max) + (1 - temp_epsilon)
    phi = max(phi) / phi
    return phi ** (1 / temp_eta)


# ---------------------------------------------------------------------------------------- logit adjustment

@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjusted_loss_equals_the_authors_formula(tau):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    model = linear(6, 4)
    result = ERM(LogitAdjust(tau, class_counts=COUNTS))(model, x, y)
    counts = np.asarray(COUNTS, dtype=np.float64)
    ref = ref_logit_adjusted_loss(y.numpy(), model(x).detach().double().numpy(), counts / counts.sum(), tau)
    assert abs(float(result.loss.detach()) - ref) < 1e-5
    # by hand: -log softmax(z + tau log pi)_y
    bias = tau * torch.log(torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS))
    hand = -torch.log_softmax(model(x).detach().double() + bias, -1)[torch.arange(16), y].mean()
    assert abs(float(result.loss.detach()) - float(hand)) < 1e-5


def test_balanced_softmax_equals_the_authors_loss_and_logit_adjust_with_tau_one():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)
    model = linear(6, 4)
    ours = ERM(BalancedSoftmax(class_counts=COUNTS))(model, x, y)
    ref = ref_balanced_softmax_loss(y, model(x).detach(), torch.tensor(COUNTS))
    assert abs(float(ours.loss.detach()) - float(ref)) < 1e-5                        # measured: < 5e-7
    per_row = ref_balanced_softmax_loss(y, model(x).detach(), torch.tensor(COUNTS), "none")
    assert torch.allclose(ours.losses.detach(), per_row, atol=1e-5)
    la = ERM(LogitAdjust(1.0, class_counts=COUNTS))(model, x, y)
    assert torch.equal(ours.losses, la.losses)


@pytest.mark.parametrize("term", [lambda c: LogitAdjust(0.7, class_counts=c),
                                  lambda c: BalancedSoftmax(class_counts=c)])
def test_uniform_counts_give_plain_cross_entropy(term):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    model = linear(6, 4)
    adjusted = ERM(term([25, 25, 25, 25]))(model, x, y)
    plain = ERM()(model, x, y)
    assert (adjusted.losses - plain.losses).abs().max() < 1e-6


def test_tau_zero_is_plain_cross_entropy():
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    model = linear(6, 4)
    assert torch.allclose(ERM(LogitAdjust(0.0, class_counts=COUNTS))(model, x, y).losses, ERM()(model, x, y).losses,
                          atol=1e-6)


def test_log_prior_formula_and_empty_classes():
    prior = log_prior([3, 1, 0], tau=2.0)
    expected = torch.log(torch.tensor([0.75 ** 2, 0.25 ** 2, 0.0]) + 1e-12)
    assert torch.allclose(prior, expected)
    assert torch.isfinite(prior).all()                                          # log(1e-12), not -inf
    # a class without samples: its soft target weight 0 keeps the loss finite
    t = torch.tensor([[0.5, 0.5, 0.0]])
    assert torch.isfinite(soft_cross_entropy(torch.zeros(1, 3) + prior, t))


def test_logit_adjust_composes_with_mixing_on_soft_targets():
    """cutmix + logit_adjust: the loss of the CutMix rows under the adjusted logits, -sum_c t_c log softmax(z+b)_c."""
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    model = linear(64, 4)
    cutmix = CutMix(num_classes=4, per_sample=True)
    result = ERM(Compose([cutmix, LogitAdjust(class_counts=COUNTS)]))(model, x, y, torch.Generator().manual_seed(5))
    x_mix, t_mix = cutmix(x, y, torch.Generator().manual_seed(5))             # the same draws
    assert torch.equal(result.inputs, x_mix) and torch.equal(result.targets, t_mix)
    assert (t_mix.max(-1).values < 1).any()                                   # some rows really are soft
    bias = log_prior(COUNTS)
    hand = -(t_mix * torch.log_softmax(model(x_mix).detach() + bias, -1)).sum(-1)
    assert (result.losses.detach() - hand).abs().max() < 1e-5
    # the order of the terms does not matter: the adjustment acts in the forward, not on the inputs
    swapped = ERM(Compose([LogitAdjust(class_counts=COUNTS), cutmix]))(model, x, y, torch.Generator().manual_seed(5))
    assert torch.equal(swapped.losses, result.losses)


def test_maxup_picks_the_worst_copy_under_the_adjusted_loss():
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    model = linear(64, 4)
    aug = Compose([CutMix(num_classes=4, per_sample=True), LogitAdjust(class_counts=COUNTS)])
    objective = MaxUp(aug, m=3)
    result = objective(model, x, y, torch.Generator().manual_seed(7))
    xs, ts = objective.candidates(x, y, torch.Generator().manual_seed(7))
    bias = log_prior(COUNTS)
    losses = torch.stack([-(ts[j] * torch.log_softmax(model(xs[j]).detach() + bias, -1)).sum(-1) for j in range(3)])
    assert abs(float(result.loss.detach()) - float(losses.max(0).values.mean())) < 1e-5


def test_adjustment_only_in_training_evaluation_uses_plain_logits():
    model = linear(6, 4)
    x = torch.randn(4, 6)
    aug = LogitAdjust(class_counts=COUNTS)
    _, _, context = aug.draw(x, torch.zeros(4, dtype=torch.long))
    with maxup.functional.enter(model, context):
        inside = model(x)
    assert torch.allclose(inside, model(x) + log_prior(COUNTS))
    assert torch.equal(model(x), model(x))                                    # the hook is gone afterwards
    assert not model._forward_hooks


# ---------------------------------------------------------------------------------------- CMO

@pytest.mark.parametrize("lam, cx, cy", [(0.3, 4, 5), (0.64, 0, 7), (0.5, 3, 3), (0.1, 7, 0)])
def test_cmo_paste_and_loss_equal_the_authors(lam, cx, cy):
    g = torch.Generator().manual_seed(11)
    x, x2 = torch.rand(6, 2, 8, 8, generator=g), torch.rand(6, 2, 8, 8, generator=g)
    y, y2 = torch.randint(0, 4, (6,), generator=g), torch.randint(0, 4, (6,), generator=g)
    model = linear(128, 4)
    ref_x, ref_loss, ref_lam, box = ref_cmo_loss(x, y, x2, y2, lam, cx, cy, model, nn.CrossEntropyLoss())
    boxes = torch.tensor([box], dtype=torch.long).expand(6, 4)
    out, t, ours_lam = paste_boxes(x, soft_targets(y, 4), x2, soft_targets(y2, 4), boxes)
    assert torch.equal(out, ref_x)
    assert torch.allclose(ours_lam, torch.full((6,), float(ref_lam)))
    loss = soft_cross_entropy(model(out), t)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-6                           # measured: < 3e-7


@pytest.mark.parametrize("lam", [0.0, 0.19, 0.3, 0.51, 0.75, 0.9])
def test_cmo_boxes_match_the_authors_for_even_sides_and_add_a_pixel_for_odd(lam):
    """Our CutMix boxes (sample_boxes) keep floor(sqrt(1 - lam) H) rows before clipping; the authors' rand_bbox
    spans 2 * (that // 2), one fewer when it is odd. Same centres, drawn from the same generator."""
    h = w = 16
    n = 64
    boxes = sample_boxes(torch.full((n,), 1.0 - lam), h, w, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    cy = (torch.rand(n, generator=g, dtype=torch.float64) * h).long()
    cx = (torch.rand(n, generator=g, dtype=torch.float64) * w).long()
    side = int(h * np.sqrt(1.0 - lam))
    for i in range(n):
        cy_i, cx_i = int(cy[i]), int(cx[i])
        ref = ref_rand_bbox((n, 1, h, w), lam, cy_i, cx_i)
        y0, x0, y1, x1 = boxes[i].tolist()
        assert (y0, x0) == (ref[0], ref[1])
        if side % 2 == 0:
            assert (y1, x1) == (ref[2], ref[3])
        else:
            assert (ref[2], ref[3]) == (min(cy_i + side // 2, h), min(cx_i + side // 2, w))
            assert (y1, x1) == (min(cy_i + side // 2 + 1, h), min(cx_i + side // 2 + 1, w))


def test_cmo_sampler_default_is_the_authors_weighted_sampler():
    assert np.allclose(class_probabilities(torch.tensor(COUNTS), "class").numpy(), ref_cmo_class_probabilities(COUNTS))
    assert np.allclose(class_probabilities(torch.tensor(COUNTS), 0.5).numpy(), ref_cmo_class_probabilities(COUNTS, 0.5))


@pytest.mark.parametrize("sampler", ["class", "reversed"])
def test_cmo_pastes_sources_drawn_by_the_sampler_labels_by_area(sampler):
    """The background rows are class 4 (no training sample); a pasted pixel equals its source's class + 1."""
    data, classes = class_images(COUNTS, size=16, extra_classes=1)
    aug = CMO(sampler=sampler, per_sample=True, p=1.0, train=data, num_classes=classes)
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(len(COUNTS))
    for _ in range(25):
        x = torch.zeros(160, 1, 16, 16)
        out, t = aug(x, torch.full((160,), 4, dtype=torch.long), g)
        pasted = out != 0
        area = pasted.flatten(1).sum(1).double() / 256
        assert torch.allclose(t[:, 4].double(), 1 - area, atol=1e-6)           # label of the background by area
        has = area > 0
        source = out.flatten(1).max(1).values.long() - 1
        assert torch.allclose(t[has, source[has]].double(), area[has], atol=1e-6)  # the source's label by area
        assert torch.equal(out.flatten(1).max(1).values[has], (source[has] + 1).float())
        seen += torch.bincount(source[has], minlength=len(COUNTS)).float()
    freq = seen / seen.sum()
    expected = class_probabilities(torch.tensor(COUNTS), sampler).float()
    assert (freq - expected).abs().max() < 0.03, (freq, expected)               # ~3,900 draws: sd < 0.008


def test_cmo_schedule_is_the_authors():
    data, classes = class_images(COUNTS)
    aug = CMO(train=data, num_classes=classes)
    assert aug.active                                                           # no epoch told: always
    epochs = 12
    for epoch in range(epochs):
        aug.on_epoch_start(epoch, epochs)
        authors = 3 < epoch < (epochs - 3)                                      # start_data_aug < epoch < E - end
        assert aug.active == authors
    aug.on_epoch_start(0, epochs)
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    out, t = aug(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and torch.equal(t, soft_targets(y, classes))


def test_cmo_per_batch_draws_one_box_and_one_coin():
    data, classes = class_images(COUNTS, size=16, extra_classes=1)
    aug = CMO(per_sample=False, p=0.5, train=data, num_classes=classes)
    g = torch.Generator().manual_seed(4)
    outcomes = []
    for _ in range(40):
        out, t = aug(torch.zeros(8, 1, 16, 16), torch.full((8,), 4, dtype=torch.long), g)
        masks = (out != 0).flatten(1)
        assert (masks == masks[:1]).all()                                       # one box for the batch
        outcomes.append(bool(masks.any()))
    assert 8 < sum(outcomes) < 32                                               # about half the batches


# ---------------------------------------------------------------------------------------- bilateral mixup

def test_bilateral_mix_and_temperatures_equal_the_authors():
    g = torch.Generator().manual_seed(8)
    counts = torch.tensor([60., 25., 9., 3.])
    x, x_b = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    y, y_b = torch.randint(0, 4, (10,), generator=g), torch.randint(0, 4, (10,), generator=g)
    index = torch.randperm(10, generator=g)
    lam = 0.37
    ref_x, ref_t = ref_dbn_mixup(x, y, x_b, y_b, lam, index, 4)
    ours_x, ours_t = bilateral_mix(x[index], soft_targets(y[index], 4), x_b, soft_targets(y_b, 4), lam)
    assert (ours_x - ref_x).abs().max() < 1e-6 and (ours_t - ref_t).abs().max() < 1e-6
    for eps, eta in ((0.6, 7.0), (0.6, 3.0), (0.3, 1.0), (0.0, 5.0)):
        phi = class_temperatures(counts, eps, eta)
        assert (phi.double() - ref_dbn_phi(counts.double(), eps, eta)).abs().max() < 1e-6
    # the loss: the authors' MixLoss is our cross-entropy of logits / phi plus its one-vs-rest term
    model = linear(5, 4)
    logits = model(ours_x).detach()
    phi = class_temperatures(counts, 0.6, 7.0)
    ours = soft_cross_entropy(LogitTransform(scale=phi).transform(logits), ours_t)
    pred = torch.softmax(logits / phi, 1)
    complement = -torch.mean(torch.sum(torch.log(1 - pred) * (1 - ours_t), 1))
    ref = ref_dbn_mixloss(logits, ref_t, counts, 0.6, 7.0)
    assert abs(float(ref) - float(ours + complement)) < 1e-5


def test_temperature_formula_by_hand():
    phi = class_temperatures([100, 50, 10], epsilon=0.5, eta=2.0)
    g = [0.5 * 3 * 1.0 + 0.5, 0.5 * 3 * 0.5 + 0.5, 0.5 * 3 * 0.1 + 0.5]
    assert torch.allclose(phi, torch.tensor([math.sqrt(g[0] / v) for v in g]))
    assert torch.equal(class_temperatures([100, 50, 10], epsilon=0.0), torch.ones(3))


def test_bilateral_pairs_batch_rows_with_reversed_sampler_draws():
    """Row i of the result blends row i of the batch (class 4, no training samples, zeros) with a draw of the
    re-balanced sampler (features = class + 1); the drawn classes follow the sampler."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    data = TensorData((y.float() + 1)[:, None].expand(-1, 3).contiguous(), y)
    aug = BilateralMixup(per_sample=True, train=data, num_classes=5)
    g = torch.Generator().manual_seed(1)
    seen = torch.zeros(4)
    for _ in range(20):
        x = torch.zeros(200, 3)
        out, t, context = aug.draw(x, torch.full((200,), 4, dtype=torch.long), g)
        lam = t[:, 4]
        drawn = t[:, :4].argmax(1)
        assert torch.allclose(out[:, 0], (1 - lam) * (drawn + 1).float(), atol=1e-5)   # lam x + (1 - lam) x_b
        assert torch.allclose(t[:, :4].sum(1), 1 - lam, atol=1e-6)
        seen += torch.bincount(drawn, minlength=4).float()
    expected = class_probabilities(torch.tensor(COUNTS), "reversed").float()
    assert ((seen / seen.sum()) - expected).abs().max() < 0.03
    assert torch.allclose(context.scale, class_temperatures(COUNTS + [0], 0.6, 7.0))


def test_bilateral_temperature_applies_in_the_forward():
    y = torch.tensor([0] * 30 + [1] * 6 + [2] * 2)
    data = TensorData(torch.randn(38, 5), y)
    aug = BilateralMixup(train=data, num_classes=3)
    model = linear(5, 3)
    x = torch.randn(8, 5)
    result = ERM(aug)(model, x, torch.zeros(8, dtype=torch.long), torch.Generator().manual_seed(0))
    phi = class_temperatures([30, 6, 2], 0.6, 7.0)
    hand = soft_cross_entropy(model(result.inputs).detach() / phi, result.targets, reduction="none")
    assert (result.losses.detach() - hand).abs().max() < 1e-6
    assert BilateralMixup(epsilon=0.0, train=data, num_classes=3).draw(x, y[:8])[2] is None


# ---------------------------------------------------------------------------------------- class distances

def test_class_distances_update_from_the_statistics_as_defined():
    torch.manual_seed(0)
    counts = [6, 4, 3]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(len(y), 5)
    aug = ClassDistanceMix(train=TensorData(x, y), num_classes=3)
    assert torch.equal(aug.distances, torch.zeros(3, 3))                        # before any statistics
    model = nn.Linear(5, 3)
    model.train()
    aug.on_epoch_start(0, 10, model)
    assert model.training                                                       # the mode is restored
    probs = torch.softmax(model(x), 1).detach().double().numpy()
    P = np.stack([probs[y.numpy() == c].mean(0) for c in range(3)])
    D = np.sqrt(((P[:, None] - P[None]) ** 2).sum(-1))
    assert np.abs(aug.matrix.numpy() - P).max() < 1e-6
    assert np.abs(aug.distances.numpy() - D).max() < 1e-6
    # the weights of the partner classes: prior_b exp(-D[a, b] / T), b != a, normalised
    w = np.exp(-D / 0.2) * (1 - np.eye(3))
    assert np.abs(aug.partner_weights().numpy() - w / w.sum(1, keepdims=True)).max() < 1e-6
    with torch.no_grad():                                                       # the model changes: so do they
        model.weight.mul_(3.0)
    before = aug.distances.clone()
    aug.on_epoch_start(1, 10, model)
    assert not torch.allclose(aug.distances, before)


def test_class_distance_functions():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.7, 0.3, 0.0], [0.0, 0.2, 0.8], [0.1, 0.1, 0.8]])
    P, n = class_probability_matrix(probs, torch.tensor([0, 0, 2, 2]), 3)
    assert torch.allclose(P, torch.tensor([[0.8, 0.2, 0.0], [0.0, 0.0, 0.0], [0.05, 0.15, 0.8]], dtype=torch.float64))
    assert n.tolist() == [2.0, 0.0, 2.0]
    D = class_distances(P)
    assert torch.allclose(D[0, 2], torch.tensor(math.sqrt(0.75 ** 2 + 0.05 ** 2 + 0.8 ** 2), dtype=torch.float64))
    assert torch.equal(D.diagonal(), torch.zeros(3, dtype=torch.float64))
    w = partner_weights(D, torch.tensor([0.5, 0.0, 0.5]), temperature=0.1)     # class 1 has no samples
    assert torch.allclose(w[0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    far = partner_weights(D, torch.ones(3), temperature=0.5, prefer="far")
    assert far[1].argmax() != far[1].argmin()


def test_class_distance_partners_follow_the_weights():
    counts = [30, 20, 10, 5]
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    data = TensorData((y.float() + 1)[:, None].expand(-1, 2).contiguous(), y)
    aug = ClassDistanceMix(train=data, num_classes=4, per_sample=True, temperature=0.1)
    aug.distances = torch.tensor([[0.0, 0.1, 0.3, 0.6], [0.1, 0.0, 0.2, 0.4], [0.3, 0.2, 0.0, 0.1],
                                  [0.6, 0.4, 0.1, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    seen = torch.zeros(4)
    for _ in range(20):
        out, t = aug(torch.zeros(200, 2), torch.zeros(200, dtype=torch.long), g)
        lam = t[:, 0]
        partner = t[:, 1:].argmax(1) + 1                                        # class 0 is never a partner
        assert torch.allclose(out[:, 0], (1 - lam) * (partner + 1).float(), atol=1e-5)
        assert torch.allclose(t[torch.arange(200), partner], 1 - lam, atol=1e-6)
        seen += torch.bincount(partner, minlength=4).float()
    assert seen[0] == 0                                                         # never its own class
    assert ((seen / seen.sum()) - aug.partner_weights()[0].float()).abs().max() < 0.03


# ---------------------------------------------------------------------------------------- the pipeline

SPECS = ["balanced_softmax", "logit_adjust(tau=1.5)", "maxup(m=2)+cutmix+balanced_softmax",
         "cmo(start_epoch=0, end_epochs=0)", "maxup(m=2)+cmo(start_epoch=0, end_epochs=0)+logit_adjust",
         "bilateral_mixup", "maxup(m=2)+bilateral_mixup(sampler='class')", "class_distance_mix",
         "maxup(m=2)+class_distance_mix(base='cutmix', prefer='far')", "sam+cutmix+logit_adjust"]


@pytest.fixture(scope="module")
def longtail():
    return load_dataset("digits", imbalance=10)


@pytest.mark.parametrize("spec", SPECS)
def test_specs_train_on_imbalanced_digits(spec, longtail):
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    history = maxup.fit(model, spec, train=longtail.train, test=longtail.test, epochs=1, batch_size=128,
                        progress=False, device="cpu", class_metrics=True)
    assert math.isfinite(history[-1]["train_loss"]) and "test_class_accuracy" in history[-1]


def test_builder_fills_counts_and_training_set(longtail):
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = M.build_step("maxup(m=2)+cmo+balanced_softmax", model=model, optimizer=opt, num_classes=10,
                        train=longtail.train)
    cmo, bs = step.objective.augment.augmentations
    assert torch.equal(bs.class_counts, class_counts(longtail.train.y, 10).double())
    assert torch.equal(cmo.data.x, longtail.train.x)
    with pytest.raises(ValueError, match="class counts.*train=data"):
        M.build_step("balanced_softmax", model=model, optimizer=opt, num_classes=10)
    with pytest.raises(ValueError, match="cmo draws from the training set"):
        M.build_step("cmo", model=model, optimizer=opt, num_classes=10)
    assert "class_counts" not in M.REGISTRY["logit_adjust"].options()
    assert "train" not in M.REGISTRY["cmo"].options()
    with pytest.raises(ValueError, match="unknown argument 'train'"):
        M.parse("cmo(train=1)")


def test_registry_traits():
    R = M.REGISTRY
    assert R["logit_adjust"].cls.context == "rows" and not R["logit_adjust"].cls.random
    assert R["cmo"].cls.domain == "image" and R["cmo"].cls.mixes_rows and R["cmo"].defaults == {"per_sample": True}
    assert R["bilateral_mixup"].cls.context == "rows" and R["bilateral_mixup"].cls.mixes_rows
    assert R["class_distance_mix"].cls.random
    M.parse("maxup(m=4)+cmo+balanced_softmax")
    with pytest.raises(ValueError, match="MaxUp needs a random augmentation"):
        M.parse("maxup(m=4)+balanced_softmax")
    with pytest.raises(ValueError, match="both act inside the model's forward"):
        M.build_augment("bilateral_mixup+logit_adjust", 4, train=class_images(COUNTS)[0])


def test_epoch_hooks_are_found_and_called_on_resume(tmp_path):
    calls = []

    class Recorder(CMO):
        def on_epoch_start(self, epoch, epochs, model=None):
            calls.append((epoch, epochs, type(model).__name__))
            super().on_epoch_start(epoch, epochs, model)

    data = load_dataset("digits", train_size=64).train
    model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = Recorder(train=data, num_classes=10)
    step = maxup.steps.SharpnessAware(maxup.steps.Standard(MaxUp(Compose([CutMix(num_classes=10), rec]), m=2), opt))
    hooks = epoch_hooks(step)
    assert len(hooks) == 1 and hooks[0].__self__ is rec
    trainer = maxup.train.Trainer(model, step, data, epochs=2, batch_size=64, num_classes=10, out_dir=tmp_path,
                                  progress=False, device="cpu")
    trainer.fit()
    assert calls == [(0, 2, "SmallCNN"), (1, 2, "SmallCNN")]
    calls.clear()
    (tmp_path / "checkpoints" / "epoch-0002.pt").unlink()
    trainer = maxup.train.Trainer(model, step, data, epochs=3, batch_size=64, num_classes=10, out_dir=tmp_path,
                                  progress=False, device="cpu")
    trainer.fit(resume=True)
    assert calls == [(1, 3, "SmallCNN"), (2, 3, "SmallCNN")]


@pytest.mark.parametrize("spec", ["maxup(m=2)+cutmix+balanced_softmax", "cmo(start_epoch=0, p=1.0)",
                                  "bilateral_mixup", "class_distance_mix(base='cutmix')"])
def test_no_host_read_during_a_step(spec):
    data, classes = class_images(COUNTS, size=8)
    model = SmallCNN(in_channels=1, num_classes=classes, channels=(4, 8))
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                        num_classes=classes, train=data)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, classes, (8,))
    counter = count_step_syncs(step, model, x, y, maxup.functional._random.DeviceGenerator("cpu", seed=0, host_seed=1))
    assert counter.reads == 0, counter.report()


def test_seeded_runs_agree(longtail):
    out = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))
        maxup.fit(model, "maxup(m=2)+class_distance_mix+logit_adjust", train=longtail.train, epochs=2,
                  batch_size=128, progress=False, device="cpu", seed=5)
        out.append(model.state_dict())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_inputs_are_not_edited():
    data, classes = class_images(COUNTS, size=8)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 4, (6,))
    keep = x.clone()
    for aug in (CMO(p=1.0, train=data, num_classes=classes), BilateralMixup(train=data, num_classes=classes),
                ClassDistanceMix(base="cutmix", train=data, num_classes=classes),
                LogitAdjust(class_counts=COUNTS)):
        aug(x, y, torch.Generator().manual_seed(0))
        assert torch.equal(x, keep)


# ---------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("make, match", [
    (lambda: LogitAdjust(), "needs the training class counts"),
    (lambda: LogitAdjust(-1.0, class_counts=COUNTS), "tau must be >= 0"),
    (lambda: LogitAdjust(class_counts=[3, -1]), "class_counts must hold"),
    (lambda: LogitAdjust(class_counts=[3, 1], num_classes=3), "class_counts has 2 entries but num_classes is 3"),
    (lambda: LogitAdjust(class_counts="many"), "class_counts must be"),
    (lambda: CMO(), "cmo draws from the training set"),
    (lambda: CMO(train=class_images(COUNTS)[0], sampler="minority"), "sampler must be one of"),
    (lambda: CMO(train=class_images(COUNTS)[0], start_epoch=-1), "start_epoch must be an integer >= 0"),
    (lambda: CMO(train=class_images(COUNTS)[0], p=1.5), "p must be a probability"),
    (lambda: CMO(train=(torch.rand(3, 2), torch.rand(3))), "integer class labels"),
    (lambda: CMO(train=class_images(COUNTS)[0], num_classes=2), "out of range for num_classes=2"),
    (lambda: BilateralMixup(train=class_images(COUNTS)[0], epsilon=1.5), "epsilon must be <= 1"),
    (lambda: BilateralMixup(train=class_images(COUNTS)[0], eta=0), "eta must be > 0"),
    (lambda: ClassDistanceMix(train=class_images(COUNTS)[0], base="fmix"), "base must be 'mixup'"),
    (lambda: ClassDistanceMix(train=class_images(COUNTS)[0], prefer="close"), "prefer must be 'near'"),
    (lambda: ClassDistanceMix(train=class_images(COUNTS)[0], temperature=0), "temperature must be > 0"),
    (lambda: ClassDistanceMix(train=class_images(COUNTS)[0], stat_per_class=0), "stat_per_class must be"),
])
def test_bad_arguments_raise_a_named_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_batch_of_another_shape_is_refused():
    aug = CMO(train=class_images(COUNTS, size=8)[0], num_classes=4, p=1.0)
    with pytest.raises(ValueError, match=r"training samples have shape \(1, 8, 8\) but the batch \(1, 16, 16\)"):
        aug(torch.rand(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))
    model = linear(6, 3)
    _, _, context = LogitAdjust(class_counts=COUNTS).draw(torch.rand(2, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="returns 3 logits per sample but the class counts hold 4"):
        with maxup.functional.enter(model, context):
            model(torch.rand(2, 6))
