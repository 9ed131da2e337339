"""MixupE (maxup.steps.mixupe), AutoMix and SAMix (maxup.steps.automix): each element against its formula by
hand, side by side with a transcription of the authors' code on the same injected randomness, the invariants
(the mask in [0, 1] at the input's size, its mean pulled to lambda, the momentum encoder an EMA of the
classifier, the classifier's gradient from its own mixed loss only), state round trips and exact resume, the
specs on tiny data, no host read, and bad input.

References transcribed below (randomness made injectable, nothing else changed):

- MixupE: github.com/oneHuster/MixupE @ 5f93f68cd0a0a2c612ce38aa0bd880978170c87c, ``mixup.py``:
  ``mixup_data``, ``mixup_criterion``, ``beta_mean``, ``training_method`` (``mixupe_version`` 1 and 3);
- AutoMix, SAMix: github.com/Westlake-AI/openmixup @ 37e1372, ``openmixup/models/heads/pmix_block.py``
  (``PixelMixBlock.forward``, ``rescale_lam_mult``, ``mask_loss``), ``openmixup/models/classifiers/automix.py``
  (``AutoMixup.forward_train``, ``pixel_mixup``, ``momentum_update``), ``openmixup/models/necks/conv_necks.py``
  (``ConvNeck``, SAMix's value network), ``openmixup/models/heads/cls_mixup_head.py`` and
  ``openmixup/models/losses/cross_entropy_loss.py`` (the mixup heads' losses).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import methods as M
from maxup.functional import _random as R
from maxup.functional import soft_cross_entropy, soft_targets
from maxup.functional.mixing import mixup
from maxup.models import SmallCNN, create_model
from maxup.steps import SharpnessAware
from maxup.steps.automix import (
    AutoMix,
    MixBlock,
    SAMix,
    adjust_mask,
    eta_balanced_loss,
    mask_loss,
    mix_with_mask,
    rescale_lam,
)
from maxup.steps.mixupe import MixupE, combine_mixupe, lam_prime_mean, mixupe_term

C = 10


def cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=C, channels=(4, 8))


def batch(n=12, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def build(spec, model, lr=0.1):
    return M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), num_classes=C)


def grads(module):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p).detach() for p in module.parameters()]


def max_diff(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


# ============================================================================ MixupE: the authors' code

def ref_beta_mean(alpha, beta):
    return alpha / (alpha + beta)


def ref_mixup_data(x, y, lam, index):
    """``mixup_data`` with ``lam`` and ``index`` passed in (np.random.beta, torch.randperm)."""
    mixed_x = lam * x + (1 - lam) * x[index, :]
    return mixed_x, y, y[index], lam


def ref_mixupe_v3(model, input, target, lam, index, *, alpha, eta, threshold, num_classes):
    """``training_method`` for ``args.train == 'mixupe'`` and ``mixupe_version == 3`` (the README's command)."""
    criterion = nn.CrossEntropyLoss()
    bs = target.size(0)
    lamba_mod_mean = ref_beta_mean(alpha + 1, alpha)
    inputs, targets_a, targets_b, lam = ref_mixup_data(input, target, lam, index)
    output = model(inputs)
    loss = lam * criterion(output, targets_a) + (1 - lam) * criterion(output, targets_b)
    loss_scale = torch.abs(loss.detach().data.clone())
    y_onehot = torch.zeros(bs, num_classes)
    y_onehot.scatter_(1, target.view(bs, 1), 1)
    x = input.clone().detach().requires_grad_(True)
    f = model(x)
    b = y_onehot - torch.softmax(f, dim=1)
    loss_new = torch.sum(f * b, dim=1)
    negative_index = torch.nonzero(loss_new.data < threshold).squeeze().detach().data.clone()
    loss_new = (1.0 - lamba_mod_mean) * torch.sum(loss_new[negative_index]) / bs
    loss = loss - (eta * loss_new)
    loss_new_scale = torch.abs(loss.detach().data.clone())
    loss = (loss_scale / loss_new_scale) * loss
    return output, loss


def ref_mixupe_v1_rows(model, input, target, x_mean, num_classes):
    """The per-row quantity of ``mixupe_version == 1`` (the exact directional derivative), before the threshold."""
    bs = target.size(0)
    y_onehot = torch.zeros(bs, num_classes)
    y_onehot.scatter_(1, target.view(bs, 1), 1)
    x = input.clone().detach().requires_grad_(True)
    f = model(x)
    b = (torch.softmax(f, dim=1) - y_onehot).detach()
    dum = torch.sum(f * b, dim=1)
    grad = torch.autograd.grad(dum, x, grad_outputs=torch.ones_like(dum), create_graph=True, retain_graph=True)[0]
    delta = (x_mean.repeat(bs, 1) - x).detach()
    return torch.sum(grad * delta, dim=1)


def fixed_draw(step, lam, perm):
    """Make a MixupE step use ``lam`` and ``perm`` instead of drawing them."""
    step.draw = lambda n, generator=None, device=None: (torch.as_tensor([lam]), perm)
    return step


# ============================================================================ MixupE tests

def test_term_by_hand_on_a_linear_model():
    """R and its gradient against the formula written out: r_i = (t_i - p_i)^T f_i, f = W x + b,
    dr_i/df_i = (t_i - p_i) - p_i * (f_i - p_i^T f_i)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    lin = nn.Linear(5, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 5, generator=g) * 2)
        lin.bias.copy_(torch.randn(3, generator=g))
    t = soft_targets(y, 3)
    alpha = 2.0
    with torch.no_grad():
        fd = (x @ lin.weight.T + lin.bias).double()
        rows, dr = [], []
        for i in range(6):
            p = [math.exp(v) / sum(math.exp(u) for u in fd[i]) for v in fd[i]]
            rows.append(sum((float(t[i, c]) - p[c]) * float(fd[i, c]) for c in range(3)))
            pf = sum(p[c] * float(fd[i, c]) for c in range(3))
            dr.append([float(t[i, c]) - p[c] - p[c] * (float(fd[i, c]) - pf) for c in range(3)])
    threshold = sorted(rows)[3]  # rows at or above it are left out: three of six
    keep = [r < threshold for r in rows]
    factor = (1 - (alpha + 1) / (2 * alpha + 1)) / 6
    expected = factor * sum(r for r, k in zip(rows, keep) if k)
    dW = sum(factor * torch.tensor(dr[i], dtype=torch.float64)[:, None] * x[i].double()[None]
             for i in range(6) if keep[i])
    db = sum(factor * torch.tensor(dr[i], dtype=torch.float64) for i in range(6) if keep[i])
    term = mixupe_term(lin(x), t, alpha=alpha, threshold=threshold)
    term.backward()
    assert 0 < sum(keep) < 6, "the threshold must cut some rows for this test"
    assert abs(float(term.detach()) - expected) < 1e-6
    assert float((lin.weight.grad.double() - dW).abs().max()) < 1e-6
    assert float((lin.bias.grad.double() - db).abs().max()) < 1e-6
    assert lam_prime_mean(2.0) == pytest.approx(0.6)


def test_the_logit_form_is_the_directional_derivative_of_version_1_on_a_homogeneous_model():
    """On f(x) = W x (positively homogeneous) with x_mean = 0, the authors' version 1 row
    (p - y)^T J_f(x) (x_mean - x) equals version 3's (y - p)^T f(x): the same quantity, which version 1
    adds to the loss and version 3 (ours, the README's) subtracts."""
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(3, 4, generator=g))
    x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    v1 = ref_mixupe_v1_rows(lin, x, y, torch.zeros(1, 4), 3)
    f = lin(x)
    v3 = ((soft_targets(y, 3) - torch.softmax(f, -1)) * f).sum(-1)
    assert float((v1 - v3).detach().abs().max()) < 1e-6


@pytest.mark.parametrize("alpha, eta, threshold", [(1.0, 0.001, 1.0), (2.0, 0.5, 0.2), (0.5, 2.0, 5.0)])
def test_step_equals_the_authors_version_3_on_the_same_draws(alpha, eta, threshold):
    """Loss and every parameter's gradient of one step, BatchNorm in training mode, our MixupE against the
    transcribed ``training_method``: max difference 6e-8 (Mixup's blend is written as a lerp)."""
    x, y = batch()
    lam, perm = 0.37, torch.randperm(12, generator=torch.Generator().manual_seed(3))
    ours, theirs = cnn(), cnn()
    step = fixed_draw(MixupE(None, torch.optim.SGD(ours.parameters(), lr=0.1), alpha=alpha, eta=eta,
                             threshold=threshold, num_classes=C), lam, perm)
    result = step.forward_backward(ours, x, y)
    _, ref_loss = ref_mixupe_v3(theirs, x, y, lam, perm, alpha=alpha, eta=eta, threshold=threshold, num_classes=C)
    ref_loss.backward()
    assert abs(float(result.loss.detach()) - float(ref_loss.detach())) < 1e-6
    assert max_diff(grads(ours), grads(theirs)) < 1e-6
    for a, b in zip(ours.buffers(), theirs.buffers()):  # the same two forwards, in the same order
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_total_is_mixup_minus_eta_term_and_rescaled_to_the_mixup_loss():
    x, y = batch(seed=2)
    lam, perm = 0.6, torch.randperm(12, generator=torch.Generator().manual_seed(4))
    model = cnn()
    step = fixed_draw(MixupE(None, torch.optim.SGD(model.parameters(), lr=0.1), eta=0.3, rescale=False,
                             num_classes=C), lam, perm)
    r = step.evaluate(model, x, y, None)
    assert torch.allclose(r.loss, r.mix_loss - 0.3 * r.term)
    step.rescale = True
    r = step.evaluate(model, x, y, None)
    assert torch.allclose(r.loss, r.mix_loss)  # the value is the Mixup loss; the gradient is rescaled L's
    zero = torch.tensor(1.0, requires_grad=True)
    total = combine_mixupe(zero, torch.tensor(10.0), 0.1)  # L = 0: the authors' factor is 0/0; ours is 1
    total.backward()
    assert float(total.detach()) == 0.0 and float(zero.grad) == 1.0


def test_eta_zero_is_mixup():
    x, y = batch(seed=3)
    lam, perm = 0.25, torch.randperm(12, generator=torch.Generator().manual_seed(5))
    ours, plain = cnn(), cnn()
    fixed_draw(MixupE(None, torch.optim.SGD(ours.parameters(), lr=0.1), eta=0.0, num_classes=C),
               lam, perm).forward_backward(ours, x, y)
    xm, tm = mixup(x, soft_targets(y, C), lam, perm)
    soft_cross_entropy(plain(xm), tm).backward()
    assert max_diff(grads(ours), grads(plain)) < 1e-6


def test_mixupe_mixes_the_objectives_rows_and_sam_replays_them():
    """With an augmentation, the term's clean rows are the augmented rows; under SAM the second pass sees the
    same mixed and clean rows."""
    model = cnn()
    step = build("sam(rho=0.05)+mixupe(eta=0.1)+cutout", model)
    seen = []
    inner = step.step
    original = inner.reevaluate
    inner.reevaluate = lambda m, r: seen.append(r) or original(m, r)
    x, y = batch()
    result = step(model, x, y, torch.Generator().manual_seed(0))
    assert torch.equal(seen[0].inputs, result.inputs) and torch.equal(seen[0].clean, result.clean)
    assert not torch.equal(result.clean, x)  # cutout's rows, not the batch


# ============================================================================ AutoMix / SAMix: OpenMixup transcribed

def ref_rescale_lam_mult(lam, k=1):
    assert k >= 0
    k += 1
    lam = float(lam)
    return 1 / (k - 2 / 3) * (4 / 3 * math.pow(lam, 3) - 2 * lam ** 2 + k * lam)


class RefPixelMixBlock(nn.Module):
    """``PixelMixBlock`` for the two configs used (``ConvModule`` without norm or activation is a biased
    Conv2d; SAMix's ``ConvNeck`` value is conv(no bias)-BN-ELU-conv(no bias)); weights copied from ours."""

    def __init__(self, ours: MixBlock):
        super().__init__()
        self.in_channels, self.inter_channels = ours.channels, ours.inter
        self.use_scale = True
        samix = ours.variant == "samix"
        self.lam_concat = not samix
        self.lam_mul, self.lam_residual, self.lam_mul_k = (1.0, True, [ours.lam_mul_k]) if samix else (0, False, [-1])
        self.x_qk_concat = samix
        self.value_neck = samix
        self.query, self.key, self.value = copy.deepcopy(ours.query), copy.deepcopy(ours.key), copy.deepcopy(ours.value)
        self.up_mode = ours.upsample

    def embedded_gaussian(self, q_x, k_x):
        pairwise_weight = torch.matmul(q_x.type(torch.float32), k_x.type(torch.float32)).type(torch.float32)
        if self.use_scale:
            pairwise_weight /= q_x.shape[-1] ** 0.5
        return pairwise_weight.type(torch.float32).softmax(dim=-1)

    def forward(self, x, lam, index, scale_factor):
        n, _, h, w = x.size()
        x_lam = x
        x_lam_ = x[index, :]
        if self.lam_mul > 0:
            _lam_mul_k = self.lam_mul_k[0]
            lam_rescale = ref_rescale_lam_mult(lam, _lam_mul_k) if _lam_mul_k >= 0 else lam
            if self.lam_residual:
                x_lam = x_lam * (1 + lam_rescale * self.lam_mul)
                x_lam_ = x_lam_ * (1 + (1 - lam_rescale) * self.lam_mul)
            else:
                x_lam = x_lam * lam_rescale
                x_lam_ = x_lam_ * (1 - lam_rescale)
        if self.lam_concat:
            lam_block = torch.zeros(n, 1, h, w).to(x_lam)
            lam_block[:] = lam
            x_lam = torch.cat([x_lam, lam_block], dim=1)
            x_lam_ = torch.cat([x_lam_, 1 - lam_block], dim=1)
        v_ = x_lam_
        v_ = self.value(v_).view(n, 1, -1)
        v_ = v_.permute(0, 2, 1)
        if self.x_qk_concat:
            x_lam = torch.cat([x_lam, x_lam_], dim=1)
            x_lam_ = x_lam
        q_x = self.query(x_lam).view(n, self.inter_channels, -1).permute(0, 2, 1)
        if self.key is not None:
            k_x = self.key(x_lam_).view(n, self.inter_channels, -1)
        else:
            k_x = self.query(x_lam_).view(n, self.inter_channels, -1)
        pairwise_weight = self.embedded_gaussian(q_x, k_x)
        mask_lam_ = torch.matmul(pairwise_weight.type(torch.float32), v_.type(torch.float32)).view(n, 1, h, w)
        mask_lam_ = F.interpolate(mask_lam_, scale_factor=scale_factor, mode=self.up_mode)
        mask_lam_ = torch.sigmoid(mask_lam_.type(torch.float32))
        return torch.cat([1 - mask_lam_, mask_lam_], dim=1)


def ref_mask_loss(mask, lam, mode, margin):
    """``PixelMixBlock.mask_loss``."""
    n, k, h, w = mask.size()
    if k > 1:
        mask = mask[:, 1, :, :].unsqueeze(1)
    m_mean = mask.sum() / (n * h * w)
    if mode == "L1":
        return torch.clamp(torch.abs(1 - m_mean - lam) - margin, min=0.).mean()
    return torch.clamp(torch.abs(1 - m_mean - lam) - margin, min=0.).mean() - \
        2 * torch.clamp((torch.sum((mask - m_mean) ** 2) / (n * h * w)), min=0.)


def ref_mask_bb(mask_bb, lam, lam_bb, *, mask_adjust, coin, lam_margin):
    """The backbone mask of ``pixel_mixup``: ``mask_adjust`` (with ``np.random.rand()`` as ``coin``) and
    ``lam_margin``. OpenMixup adjusts towards ``lam[0]`` (the Mix Block's lambda); pass that as ``lam``."""
    mask_bb = mask_bb.clone()
    if mask_adjust > coin:
        epsilon = 1e-8
        _mask = mask_bb[:, 0, :, :].squeeze()
        _mask = _mask.clamp(min=epsilon, max=1 - epsilon)
        _mean = _mask.mean(dim=[1, 2]).squeeze()
        idx_larg = _mean[:] > lam + epsilon
        idx_less = _mean[:] < lam - epsilon
        mask_bb[idx_larg == True, 0, :, :] = _mask[idx_larg == True, :, :] * (  # noqa: E712 (transcribed)
            lam / _mean[idx_larg == True].view(-1, 1, 1))  # noqa: E712
        mask_bb[idx_larg == True, 1, :, :] = 1 - mask_bb[idx_larg == True, 0, :, :]  # noqa: E712
        mask_bb[idx_less == True, 1, :, :] = (1 - _mask[idx_less == True, :, :]) * (  # noqa: E712
            (1 - lam) / (1 - _mean[idx_less == True].view(-1, 1, 1)))  # noqa: E712
        mask_bb[idx_less == True, 0, :, :] = 1 - mask_bb[idx_less == True, 1, :, :]  # noqa: E712
    if lam_margin >= lam_bb or lam_margin >= 1 - lam_bb:
        mask_bb[:, 0, :, :] = lam_bb
        mask_bb[:, 1, :, :] = 1 - lam_bb
    return mask_bb


def ref_head_mix_loss(pred, y_a, y_b, lam, *, neg_weight=None):
    """``ClsMixupHead.loss`` for ``(y_a, y_b, lam)``: AutoMix's hard-label CE (``multi_label=False``), or SAMix's
    mixer head (``multi_label=True``, soft CE, ``neg_weight``: the "eta in SAMix" of the configs)."""
    if neg_weight is None:
        return lam * F.cross_entropy(pred, y_a) + (1 - lam) * F.cross_entropy(pred, y_b)
    y_mixed = lam * F.one_hot(y_a, pred.shape[1]) + (1 - lam) * F.one_hot(y_b, pred.shape[1])
    class_weight = (y_mixed > 0).type(torch.float).clamp(min=neg_weight)
    loss = -y_mixed * F.log_softmax(pred, dim=-1)
    loss *= class_weight
    return loss.sum(dim=-1).sum() / y_a.size(0)


def ref_forward_train(model_q, model_k, mix_block, layer, img, gt_label, lam, index_mb, index_bb, *, mask_loss_w,
                      margin, mode, lam_margin, neg_weight=None):
    """``AutoMixup.forward_train`` with one network for ``backbone_q`` + ``head_one_q`` / ``head_mix_q`` and its
    copy for ``backbone_k`` + ``head_mix_k`` (weights frozen), ``np.random`` draws passed in, the feature of
    ``backbone_k(img)[0]`` read by a hook at ``layer``."""
    store = {}
    handle = dict(model_k.named_modules())[layer].register_forward_hook(lambda m, a, o: store.setdefault("f", o))
    model_k(img)
    handle.remove()
    feature = store["f"]
    scale_factor = img.shape[-1] // feature.shape[-1]
    mask_mb = mix_block(feature, lam[0], index_mb, scale_factor)
    mask_bb = mix_block(feature, lam[1], index_bb, scale_factor).clone().detach()
    mask_bb = ref_mask_bb(mask_bb, lam[0], lam[1], mask_adjust=0.0, coin=1.0, lam_margin=lam_margin)
    mask_l = ref_mask_loss(mask_mb, lam[0], mode, margin) * mask_loss_w
    img_mix_mb = img * mask_mb[:, 0, :, :].unsqueeze(1) + img[index_mb, :] * mask_mb[:, 1, :, :].unsqueeze(1)
    img_mix_bb = img * mask_bb[:, 0, :, :].unsqueeze(1) + img[index_bb, :] * mask_bb[:, 1, :, :].unsqueeze(1)
    loss_mix_k = ref_head_mix_loss(model_k(img_mix_mb), gt_label, gt_label[index_mb], lam[0], neg_weight=neg_weight)
    loss_one_q = F.cross_entropy(model_q(img), gt_label)
    loss_mix_q = ref_head_mix_loss(model_q(img_mix_bb), gt_label, gt_label[index_bb], lam[1])
    return loss_mix_q + loss_one_q + loss_mix_k + mask_l


def ref_momentum_update(model_q, model_k, momentum):
    for param_q, param_k in zip(model_q.parameters(), model_k.parameters()):
        param_k.data = param_k.data * momentum + param_q.data * (1. - momentum)


def fix_automix_draw(step, lam, perm_mb, perm_bb, coin=None):
    step.draw = lambda n, generator=None, device=None: (torch.as_tensor(lam), perm_mb, perm_bb, coin)
    return step


def automix(model, cls=AutoMix, **options):
    return cls(None, torch.optim.SGD(model.parameters(), lr=0.1), model=model, num_classes=C, **options)


# ============================================================================ AutoMix / SAMix tests

@pytest.mark.parametrize("variant, upsample", [("automix", "nearest"), ("samix", "bilinear"), ("automix", "bilinear")])
@pytest.mark.parametrize("lam", [0.2, 0.71])
def test_mix_block_equals_openmixups_pixel_mix_block(variant, upsample, lam):
    """Same weights, features, lambda and partners: the masks agree to 3e-8 (0 for nearest upsampling)."""
    g = torch.Generator().manual_seed(0)
    ours = MixBlock(6, variant=variant, upsample=upsample, lam_mul_k=0.25, init_seed=3)
    with torch.no_grad():  # larger weights than the 0.01 initialisation, so the attention is not flat
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ref = RefPixelMixBlock(ours)
    feature, perm = torch.randn(5, 6, 4, 4, generator=g), torch.randperm(5, generator=g)
    ours.train(), ref.train()
    with torch.no_grad():
        mask = ours(feature, torch.tensor(lam), perm, (16, 16))
        expected = ref(feature, lam, perm, 4)
    assert float((mask - expected).abs().max()) < 1e-6
    assert mask.shape == (5, 2, 16, 16)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    assert torch.allclose(mask.sum(1), torch.ones(5, 16, 16))
    assert float(rescale_lam(torch.tensor(lam), 0.25)) == pytest.approx(ref_rescale_lam_mult(lam, 0.25))


def test_mask_is_in_the_unit_interval_at_the_input_size_on_a_resnet():
    """On a CIFAR ResNet the default layer is the last stage (8x8 for 32x32): the mask is 32x32 in [0, 1]."""
    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(3, 32, 32), num_classes=C, depth=8, width=8)
    step = automix(model)
    assert step.layer == model.stages[-1]
    x = torch.rand(4, 3, 32, 32)
    feature = step.features(x)
    step._build_mixer(feature.shape[1], x.device)
    mask = step.mixer(feature, torch.tensor(0.3), torch.tensor([1, 2, 3, 0]), x.shape[-2:]).detach()
    assert mask.shape == (4, 2, 32, 32) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert torch.allclose(mix_with_mask(x, mask, torch.tensor([1, 2, 3, 0])),
                          x * mask[:, :1] + x[[1, 2, 3, 0]] * mask[:, 1:])


@pytest.mark.parametrize("variance", [False, True])
def test_mask_loss_and_mask_adjust_equal_openmixups(variance):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(6, 1, 8, 8, generator=g) ** 2
    mask = torch.cat([1 - s, s], 1)
    for lam in (0.1, 0.5, 0.8):
        ours = mask_loss(mask, torch.tensor(lam), margin=0.1, variance=variance)
        theirs = ref_mask_loss(mask, lam, "L1+Variance" if variance else "L1", 0.1)
        assert abs(float(ours) - float(theirs)) < 1e-6
        adjusted = adjust_mask(mask, torch.tensor(lam))
        expected = ref_mask_bb(mask, lam, 0.5, mask_adjust=1.0, coin=0.0, lam_margin=0.0)
        assert float((adjusted - expected).abs().max()) < 1e-6
        assert torch.allclose(adjusted[:, 0].mean(dim=(1, 2)), torch.full((6,), lam), atol=1e-5)


def test_mask_mean_tracks_lambda_under_the_mask_loss():
    """The paper's rule: the mask loss pulls the mask's mean to within the margin of lambda. AutoMix's Mix Block
    (lambda concatenated) learns it for every lambda: trained on the mask loss alone with random lambdas, the
    means land within margin + 0.02 of 0.1, 0.3, 0.5, 0.7, 0.9."""
    mb = MixBlock(8, variant="automix")
    opt = torch.optim.SGD(mb.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    feature, perm = torch.randn(16, 8, 4, 4, generator=g), torch.randperm(16, generator=g)
    for _ in range(300):
        lam = torch.rand((), generator=g)
        loss = mask_loss(mb(feature, lam, perm, (8, 8)), lam, margin=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for lam in (0.1, 0.3, 0.5, 0.7, 0.9):
            mean = float(mb(feature, torch.tensor(lam), perm, (8, 8))[:, 0].mean())
            assert abs(mean - lam) <= 0.1 + 0.02, (lam, mean)


def test_lam_margin_gives_plain_mixup_and_mask_adjust_rescales_the_classifiers_mask():
    model = cnn()
    x, y = batch()
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    step = fix_automix_draw(automix(model), [0.5, 0.05], perm, perm)
    result = step.forward_backward(model, x, y)
    assert torch.allclose(result.inputs, 0.05 * x + 0.95 * x[perm], atol=1e-6)
    step = fix_automix_draw(automix(cnn(), mask_adjust=1.0), [0.5, 0.3], perm, perm, torch.tensor([0.5]))
    step.forward_backward(step._net, x, y)
    assert float(step.last["classifier_mask_mean"]) == pytest.approx(0.3, abs=1e-5)


@pytest.mark.parametrize("cls, mode, neg", [(AutoMix, "L1", None), (SAMix, "L1+Variance", 0.5)])
def test_step_equals_openmixups_forward_train_on_the_same_draws(cls, mode, neg):
    """One step's gradients, our AutoMix/SAMix against the transcribed ``forward_train`` (one summed loss, one
    backward) with the same Mix Block weights, lambdas and partners: the classifier's and the Mix Block's
    gradients agree to 1e-6. For SAMix we set eta=1: the released config's ``neg_weight=0.5`` multiplies only
    zero terms of the soft cross-entropy (see test_eta_balanced_loss...)."""
    x, y = batch(seed=4)
    g = torch.Generator().manual_seed(2)
    perm_mb, perm_bb = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    lam = [0.42, 0.66]
    ours_model = cnn()
    step = fix_automix_draw(automix(ours_model, cls, **({"eta": 1.0} if cls is SAMix else {})), lam, perm_mb, perm_bb)
    step.prepare(ours_model)
    result = step.forward_backward(ours_model, x, y)
    ref_q, ref_k = cnn(), cnn()
    for p in ref_k.parameters():
        p.requires_grad_(False)
    ref_block = RefPixelMixBlock(step.mixer)  # the Mix Block's weights before any update: its initial ones
    for p in ref_block.parameters():
        p.grad = None
    loss = ref_forward_train(ref_q, ref_k, ref_block, step.layer, x, y, lam, perm_mb, perm_bb, mask_loss_w=0.1,
                             margin=0.1, mode=mode, lam_margin=0.08, neg_weight=neg)
    loss.backward()
    assert max_diff(grads(ours_model), grads(ref_q)) < 1e-6
    assert max_diff(grads(step.mixer), grads(ref_block)) < 1e-6
    ref_classifier = ref_head_mix_loss(ref_q(result.inputs), y, y[perm_bb], lam[1]) + F.cross_entropy(ref_q(x), y)
    assert abs(float(result.loss.detach()) - float(ref_classifier.detach())) < 1e-5


def test_momentum_encoder_is_an_ema_of_the_classifier_by_hand():
    """After each step w_k = m w_k + (1 - m) w_q with the classifier's new weights (OpenMixup's
    ``momentum_update``): max difference 0 (the same two products and sum)."""
    model = cnn()
    step = automix(model, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), step.encoder.parameters()))
    assert not any(p.requires_grad for p in step.encoder.parameters())
    g = torch.Generator().manual_seed(0)
    shadow = copy.deepcopy(model)
    for seed in range(3):
        x, y = batch(seed=seed)
        before = [p.detach().clone() for p in step.encoder.parameters()]
        step(model, x, y, g)
        with torch.no_grad():
            for k, k0 in zip(shadow.parameters(), before):
                k.copy_(k0)
        ref_momentum_update(model, shadow, 0.9)
        assert max_diff(list(step.encoder.parameters()), list(shadow.parameters())) < 1e-7
        by_hand = [0.9 * k0 + 0.1 * q for k0, q in zip(before, model.parameters())]
        assert max_diff(list(step.encoder.parameters()), by_hand) < 1e-7


@pytest.mark.parametrize("cls", [AutoMix, SAMix])
def test_classifier_gradient_is_its_mixed_loss_with_the_detached_mask_and_the_mixer_learns(cls):
    """The classifier's gradient equals the gradient of CE(f(x_mix)) + clean_weight CE(f(x)), x_mix built
    from the Mix Block's mask as a constant, whatever the Mix Block's loss weighs; the Mix Block's parameters
    get a gradient and change; the momentum encoder's weights get none."""
    x, y = batch(seed=5)
    g = torch.Generator().manual_seed(3)
    perm_mb, perm_bb = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
    out = []
    for mask_weight, clean_weight in ((0.1, 1.0), (5.0, 1.0), (0.1, 0.0)):
        model = cnn()
        step = fix_automix_draw(automix(model, cls, mask_weight=mask_weight, clean_weight=clean_weight),
                                [0.3, 0.6], perm_mb, perm_bb)
        step.prepare(model)
        step.forward_backward(model, x, y)
        by_hand = cnn()
        t = soft_targets(y, C)
        with torch.no_grad():
            mask = step.mixer(step.features(x), torch.tensor(0.6), perm_bb, (8, 8))
        loss = soft_cross_entropy(by_hand(mix_with_mask(x, mask, perm_bb)), 0.6 * t + 0.4 * t[perm_bb])
        if clean_weight:
            loss = clean_weight * soft_cross_entropy(by_hand(x), t) + loss
        loss.backward()
        assert max_diff(grads(model), grads(by_hand)) < 1e-6
        assert all(p.grad is None for p in step.encoder.parameters())
        assert any(float(p.grad.abs().sum()) > 0 for p in step.mixer.parameters())
        before = [p.detach().clone() for p in step.mixer.parameters()]
        step.update()
        assert any(not torch.equal(a, b) for a, b in zip(before, step.mixer.parameters()))
        out.append(grads(model))
    assert max_diff(out[0], out[1]) == 0.0  # the Mix Block's loss never reaches the classifier


def test_eta_balanced_loss_decomposes_the_mixup_cross_entropy():
    """local + global = the mixup CE exactly (eta = 1), the same as both released heads; two classes: local is the
    binary CE of sigmoid(z_a - z_b) against lambda. The released SAMix config's ``neg_weight=0.5`` gives the
    plain mixup CE (it weighs only zero terms); our eta = 0.5 halves the global term."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, C, generator=g) * 3
    y_a, y_b = torch.randint(0, C, (8,), generator=g), torch.randint(0, C, (8,), generator=g)
    y_b = torch.where(y_b == y_a, (y_a + 1) % C, y_b)
    lam = 0.3
    t = lam * F.one_hot(y_a, C).float() + (1 - lam) * F.one_hot(y_b, C).float()
    ce = soft_cross_entropy(logits, t)
    assert abs(float(eta_balanced_loss(logits, t, 1.0)) - float(ce)) < 1e-6
    assert abs(float(ref_head_mix_loss(logits, y_a, y_b, lam)) - float(ce)) < 1e-6
    assert abs(float(ref_head_mix_loss(logits, y_a, y_b, lam, neg_weight=0.5)) - float(ce)) < 1e-6
    local = eta_balanced_loss(logits, t, 0.0, reduction="none")
    za, zb = logits.gather(1, y_a[:, None])[:, 0], logits.gather(1, y_b[:, None])[:, 0]
    bce = F.binary_cross_entropy_with_logits(za - zb, torch.full((8,), lam), reduction="none")
    assert float((local - bce).abs().max()) < 1e-5
    global_ = -torch.log(torch.softmax(logits, -1).gather(1, torch.stack([y_a, y_b], 1)).sum(1))
    half = eta_balanced_loss(logits, t, 0.5, reduction="none")
    assert float((half - (local + 0.5 * global_)).abs().max()) < 1e-5
    smooth = soft_targets(y_a, C, smoothing=0.1)  # every class held: no global term, eta is moot
    assert abs(float(eta_balanced_loss(logits, smooth, 0.2)) - float(soft_cross_entropy(logits, smooth))) < 1e-5


@pytest.mark.parametrize("spec", ["automix", "samix", "sam+automix", "samix(mask_adjust=0.5)+cropflip"])
def test_state_round_trips_and_resume_is_exact(spec):
    """Three steps in one go equal one step, a state_dict round trip into a fresh model and step, two more steps:
    the classifier, the momentum encoder, the Mix Block and both optimizers end bit for bit the same."""
    x, y = batch(seed=6)

    def run(model, step, g, n):
        for _ in range(n):
            step(model, x, y, g)

    torch.manual_seed(0)
    whole = cnn()
    step = build(spec, whole)
    g = R.DeviceGenerator("cpu", seed=1, host_seed=2)
    run(whole, step, g, 3)

    part = cnn()
    first = build(spec, part)
    g2 = R.DeviceGenerator("cpu", seed=1, host_seed=2)
    run(part, first, g2, 1)
    saved = copy.deepcopy({"model": part.state_dict(), "opt": first.optimizer.state_dict(),
                           "step": first.state_dict(), "rng": g2.get_state(), "host": g2.host.get_state()})
    resumed = cnn(seed=9)
    again = build(spec, resumed)
    resumed.load_state_dict(saved["model"])
    again.optimizer.load_state_dict(saved["opt"])
    again.load_state_dict(saved["step"])
    g3 = R.DeviceGenerator("cpu", seed=5, host_seed=6)
    g3.set_state(saved["rng"])
    g3.host.set_state(saved["host"])
    run(resumed, again, g3, 2)
    inner, inner_again = getattr(step, "step", step), getattr(again, "step", again)
    for a, b in ((whole, resumed), (inner.encoder, inner_again.encoder), (inner.mixer, inner_again.mixer)):
        for (name, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(u, v), name
    for a, b in zip(inner.mixer.parameters(), inner_again.mixer.parameters()):
        assert torch.equal(inner.mixer_optimizer.state[a]["momentum_buffer"],
                           inner_again.mixer_optimizer.state[b]["momentum_buffer"])


@pytest.mark.parametrize("spec", ["mixupe", "mixupe(alpha=2.0, per_sample=true)+cropflip", "sam+mixupe",
                                  "mixupe+maxup(m=2)+cutout", "automix", "samix", "sam+samix",
                                  "automix(clean_weight=0.0, upsample='bilinear')+maxup(m=2)+cutout"])
def test_specs_build_train_and_repeat_under_a_seed(spec):
    ends = []
    for _ in range(2):
        torch.manual_seed(0)
        model = cnn()
        step = build(spec, model)
        g = R.DeviceGenerator("cpu", seed=1, host_seed=2)
        for seed in range(2):
            result = step(model, *batch(seed=seed), g)
            assert torch.isfinite(result.loss)
        ends.append([p.detach().clone() for p in model.parameters()])
    assert max_diff(*ends) == 0.0


def test_fit_trains_automix_on_the_digits():
    from maxup.data import load_dataset

    data = load_dataset("digits", train_size=64)
    model = cnn()
    history = maxup.fit(model, "samix", train=data.train, epochs=2, batch_size=32, lr=0.05, seed=0, progress=False,
                        device="cpu")
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)


@pytest.mark.parametrize("spec", ["mixupe", "automix", "samix(mask_adjust=0.5)"])
def test_the_step_makes_no_host_read(spec):
    from maxup.train.syncs import count_step_syncs

    model = cnn()
    step = build(spec, model)
    x, y = batch()
    counter = count_step_syncs(step, model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2), steps=2)
    assert counter.reads == 0 and counter.made == 0, counter.report()


def test_registry_entries():
    for name, cls in (("mixupe", MixupE), ("automix", AutoMix), ("samix", SAMix)):
        entry = maxup.registry.REGISTRY[name]
        assert entry.cls is cls and entry.kind == "step" and cls.mixes_rows
        assert "model" not in entry.options() and "num_classes" not in entry.options()
    assert AutoMix.domain == "image" and MixupE.domain == "tensor"
    assert maxup.registry.REGISTRY["samix"].options()["eta"] == 0.5
    with pytest.raises(ValueError, match="manifold_mixup does not compose"):
        M.parse("automix+manifold_mixup")


def test_bad_input_gives_clear_errors():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model="):
        AutoMix(None, opt)
    with pytest.raises(ValueError, match="layer must name a module"):
        AutoMix(None, opt, model=model, layer="nope")
    with pytest.raises(ValueError, match="layer: Sequential has no .stages"):
        AutoMix(None, opt, model=nn.Sequential(nn.Flatten(), nn.Linear(64, C)))
    with pytest.raises(ValueError, match="layer 'classifier' must output a \\(B, C, h, w\\) feature map"):
        AutoMix(None, opt, model=model, layer="classifier", num_classes=C)(model, *batch(), None)
    for option, value in (("alpha", 0), ("momentum", 1.5), ("lam_margin", 0.5), ("mask_adjust", -0.1),
                          ("upsample", "bicubic"), ("clean_weight", -1), ("mixer_lr", 0), ("init_seed", -1)):
        with pytest.raises(ValueError, match=option):
            AutoMix(None, opt, model=model, **{option: value})
    with pytest.raises(ValueError, match="eta"):
        SAMix(None, opt, model=model, eta=-1)
    with pytest.raises(ValueError, match="images"):
        AutoMix(None, opt, model=model, num_classes=C)(model, torch.randn(4, 64), torch.arange(4), None)
    with pytest.raises(ValueError, match="another model"):
        AutoMix(None, opt, model=model, num_classes=C)(cnn(1), *batch(), None)
    for option, value in (("alpha", -1), ("eta", -0.1), ("threshold", float("nan")), ("per_sample", "yes")):
        with pytest.raises(ValueError, match=option):
            MixupE(None, opt, **{option: value})
    with pytest.raises(ValueError, match="num_classes"):
        MixupE(None, opt)(model, *batch(), None)
    with pytest.raises(ValueError, match="select mode"):
        MixupE(maxup.MaxUp(maxup.augment.Cutout(4, num_classes=C), m=2, temperature=1.0), opt)
    with pytest.raises(ValueError, match="ManifoldMixup acts inside"):
        MixupE(maxup.ERM(maxup.augment.ManifoldMixup(model=model, num_classes=C)), opt)
    with pytest.raises(ValueError, match="logits and targets"):
        mixupe_term(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="logits and targets"):
        eta_balanced_loss(torch.zeros(3, 4), torch.zeros(3, 5))


def test_sam_wrapper_drives_automix_and_the_mixer_learns_from_the_first_pass():
    model = cnn()
    step = build("sam(rho=0.05)+automix", model)
    assert isinstance(step, SharpnessAware)
    x, y = batch()
    calls = []
    inner = step.step
    original = inner.reevaluate
    inner.reevaluate = lambda m, r: calls.append(r) or original(m, r)
    step(model, x, y, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and calls[0].clean is not None  # one replay of the classifier's rows
    assert all(p.grad is not None for p in inner.mixer.parameters())  # from the first pass
