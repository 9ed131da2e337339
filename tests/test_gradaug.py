"""maxup.slim and the GradAug step: slices against smaller layers, BatchNorm statistics, the gradient by hand,
composition with CutMix, MaxUp and SAM, method specs, bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import augment as A
from maxup import methods as M
from maxup.models import create_model
from maxup.objectives import ERM, MaxUp
from maxup.optim import sam_perturbation
from maxup.slim import SlimConv2d, SlimLinear, is_slimmable, kept_channels, set_width, slimmable
from maxup.steps import GradAug, SharpnessAware, Standard
from maxup.steps.gradaug import distillation_loss, draw_subnets, resize

pytestmark = pytest.mark.usefixtures("one_thread")


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def cnn(dim=2, bn=True, seed=0, classes=3):
    """Conv-BN-ReLU, a grouped conv, global pooling, a linear classifier (1-D or 2-D)."""
    torch.manual_seed(seed)
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    norm = (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d) if bn else (lambda c: nn.Identity())
    pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
    return nn.Sequential(conv(2, 8, 3, padding=1), norm(8), nn.ReLU(), conv(8, 8, 3, padding=1, groups=2), norm(8),
                         nn.ReLU(), pool, nn.Flatten(), nn.Linear(8, classes))


def data(dim=2, n=6, size=8, seed=1, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 2, *(size,) * dim, generator=g), torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("groups,c_in,width", [(1, 3, 0.5), (1, 6, 0.75), (2, 3, 0.5), (6, 3, 0.5), (3, 4, 0.6)])
@pytest.mark.parametrize("bias,padding_mode", [(True, "zeros"), (False, "reflect")])
def test_sliced_conv_equals_a_smaller_conv_of_the_first_channels(dim, groups, c_in, width, bias, padding_mode):
    torch.manual_seed(0)
    Conv = nn.Conv1d if dim == 1 else nn.Conv2d
    conv = Conv(6, 12 if groups != 6 else 6, 3, stride=2, padding=1, groups=groups, bias=bias,
                padding_mode=padding_mode)
    slim = slimmable(conv, inplace=False, keep=[])
    x = torch.randn(2, c_in, *(7,) * dim)
    with set_width(slim, width):
        out = slim(x)
    c_out = kept_channels(conv.out_channels, width)
    assert out.shape[1] == c_out
    # the full layer on the input padded with zero channels, first outputs: for any groups
    padded = torch.cat([x, x.new_zeros(2, 6 - c_in, *x.shape[2:])], 1)
    assert torch.allclose(out, conv(padded)[:, :c_out], atol=1e-5)
    per_in, per_out = 6 // groups, conv.out_channels // groups
    if c_in % per_in == 0 and c_out == c_in // per_in * per_out:  # whole groups: a smaller conv of the first ones
        small = Conv(c_in, c_out, 3, stride=2, padding=1, groups=c_in // per_in, bias=bias, padding_mode=padding_mode)
        with torch.no_grad():
            small.weight.copy_(conv.weight[:c_out])
            if bias:
                small.bias.copy_(conv.bias[:c_out])
        assert torch.allclose(out, small(x), atol=1e-5)


def test_sliced_linear_and_the_kept_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 3))
    ref = copy.deepcopy(model)
    slimmable(model)
    assert isinstance(model[0], SlimLinear) and model[0].slice_out and not model[2].slice_out
    x = torch.randn(5, 4)
    with set_width(model, 0.5):
        out = model(x)
    hidden = F.relu(F.linear(x, ref[0].weight[:5], ref[0].bias[:5]))
    assert torch.allclose(out, F.linear(hidden, ref[2].weight[:, :5], ref[2].bias), atol=1e-6)
    assert torch.equal(model(x), ref(x))


def test_set_width_restores_the_model_and_works_as_a_call():
    model = slimmable(cnn())
    x, _ = data()
    full = model(x)
    with set_width(model, 0.5) as m:
        assert m is model and all(mod.width == 0.5 for mod in model.modules() if hasattr(mod, "slice_out"))
        with set_width(model, 0.25):
            pass
        assert model[0].width == 0.5  # nested: the outer width is back
        assert model[0](x).shape[1] == 4
    assert all(getattr(mod, "width", 1.0) == 1.0 for mod in model.modules())
    with pytest.raises(RuntimeError):
        with set_width(model, 0.5):
            raise RuntimeError("boom")
    assert model[0].width == 1.0
    set_width(model, 0.75)  # a plain call keeps the width
    assert model[0](x).shape[1] == 6
    set_width(model, 1.0)
    assert torch.equal(model(x), full)


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_below_full_width_uses_batch_statistics_and_leaves_running_ones(train):
    model = slimmable(cnn())
    with torch.no_grad():
        model[1].running_mean.uniform_()
        model[1].weight.uniform_(0.5, 1.5)
    model.train(train)
    x, _ = data()
    buffers = [b.clone() for b in model.buffers()]
    with set_width(model, 0.5):
        h = model[0](x)
        out = model[1](h)
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.allclose(out, F.batch_norm(h, None, None, model[1].weight[:4], model[1].bias[:4], True), atol=1e-5)
    model.train()
    model(x)  # full width, training: the running statistics move
    assert not torch.equal(buffers[0], model[1].running_mean)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck in plain torch (with ResNeXt-style groups)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TorchvisionStyleResNet(nn.Module):
    def __init__(self, layers=(2, 1), planes=(4, 8), num_classes=10, groups=2):
        super().__init__()
        self.inplanes = 8
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        for i, (n, p) in enumerate(zip(layers, planes)):
            stride = 1 if i == 0 else 2
            down = nn.Sequential(nn.Conv2d(self.inplanes, p * 4, 1, stride, bias=False), nn.BatchNorm2d(p * 4))
            blocks = [Bottleneck(self.inplanes, p, stride, down, groups)]
            self.inplanes = p * 4
            blocks += [Bottleneck(self.inplanes, p, groups=groups) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_converted_torchvision_style_resnet_is_unchanged_at_full_width():
    torch.manual_seed(0)
    model = TorchvisionStyleResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(3, 3, 32, 32)
    slim = slimmable(model, inplace=False)
    assert type(model.conv1) is nn.Conv2d and isinstance(slim.conv1, SlimConv2d) and not slim.fc.slice_out
    assert list(slim.state_dict()) == list(model.state_dict())
    for train in (False, True):
        model.train(train), slim.train(train)
        assert torch.equal(slim(x), model(x))
    for width in (0.3, 0.7):  # residual additions stay shape-consistent, grouped convs too
        with set_width(slim, width):
            assert slim(x).shape == (3, 10)
    assert torch.equal(slim(x), model(x))


@pytest.mark.parametrize("name,shape,options", [("cnn", (1, 8, 8), {}), ("mlp", (1, 8, 8), {}),
                                                ("cnn1d", (2, 16), {}), ("resnet", (3, 8, 8), {"depth": 8}),
                                                ("wrn", (3, 8, 8), {"depth": 10, "widen_factor": 1})])
def test_every_bundled_model_is_width_sliceable(name, shape, options):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=5, **options).eval()
    ref = copy.deepcopy(model)
    slimmable(model)
    x = torch.rand(4, *shape)
    assert torch.equal(model(x), ref(x))
    for width in (0.3, 0.8):
        with set_width(model, width):
            assert model(x).shape == (4, 5)
            assert torch.isfinite(model(x)).all()


def test_keep_names_the_classifier_when_it_is_not_registered_last():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model = slimmable(HeadFirst(), keep=["head"])
    with set_width(model, 0.5):
        assert model(x).shape == (6, 3)
    wrong = slimmable(HeadFirst())  # default: the last layer registered, here the body
    step = GradAug(ERM(), torch.optim.SGD(wrong.parameters(), lr=0.1), width_range=(0.5, 0.5))
    with pytest.raises(ValueError, match="keep="):
        step(wrong, x, y)


# ---------------------------------------------------------------------------- the functional core


def test_draw_subnets_smallest_first_in_range_and_seeded():
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    subs = draw_subnets(5, (0.6, 0.9), (8, 6, 4), generator=gen())
    assert subs == draw_subnets(5, (0.6, 0.9), (8, 6, 4), generator=gen())
    assert subs[0][0] == 0.6 and all(0.6 <= w <= 0.9 for w, _ in subs) and all(r in (8, 6, 4) for _, r in subs)
    assert draw_subnets(1, (0.5, 1.0)) == [(0.5, None)]
    many = draw_subnets(200, (0.5, 1.0), (8, 4), generator=gen())
    assert {r for _, r in many} == {8, 4} and len({w for w, _ in many}) == 200


def test_resize_and_distillation_loss():
    x = torch.rand(2, 3, 8, 6)
    assert resize(x, None) is x and resize(x, 4).shape == (2, 3, 4, 4)
    assert resize(torch.rand(2, 3, 10), 7).shape == (2, 3, 7)
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    p = t.softmax(-1)
    rows = (p * (p.log() - s.log_softmax(-1))).sum(-1)
    assert torch.allclose(distillation_loss(s, t), rows.mean(), atol=1e-6)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.allclose(distillation_loss(s, t, w), (w * rows).sum(), atol=1e-6)
    assert distillation_loss(t, t).abs() < 1e-6


# ---------------------------------------------------------------------------- the step


def gradaug_grads(model, x, y, subnets, kd_weight):
    """By hand: the full network's CE gradient plus each sub-network's distillation gradient."""
    ps = list(model.parameters())
    logits = model(x)
    total = list(torch.autograd.grad(F.cross_entropy(logits, y), ps))
    teacher = logits.detach().softmax(-1)
    for width, r in subnets:
        size = (r,) * (x.dim() - 2)
        xi = x if r is None or x.shape[2:] == size else F.interpolate(  # the authors' align_corners=True
            x, size=size, mode="bilinear" if x.dim() == 4 else "linear", align_corners=True)
        with set_width(model, width):
            sub = model(xi)
        kd = kd_weight * (teacher * (teacher.log() - sub.log_softmax(-1))).sum(-1).mean()
        total = [a + b for a, b in zip(total, torch.autograd.grad(kd, ps))]
    return total


@pytest.mark.parametrize("dim,resolutions", [(2, (8, 6, 5)), (1, (8, 7)), (2, None)])
def test_gradient_is_the_full_gradient_plus_each_subnetwork_by_hand(dim, resolutions):
    model = cnn(dim)
    ref = slimmable(copy.deepcopy(model))
    x, y = data(dim)
    step = GradAug(ERM(), torch.optim.SGD(model.parameters(), lr=1.0), n_subnets=3, width_range=(0.4, 1.0),
                   resolutions=resolutions, kd_weight=0.7)
    before = params(model)
    step(model, x, y, torch.Generator().manual_seed(3))
    subnets = draw_subnets(3, (0.4, 1.0), resolutions, generator=torch.Generator().manual_seed(3))
    assert step.last_subnets == subnets and subnets[0][0] == 0.4 and is_slimmable(model)
    grads = gradaug_grads(ref, x, y, subnets, 0.7)
    for old, new, g in zip(before, model.parameters(), grads):
        assert torch.allclose(old - g, new, atol=1e-5)
    for a, b in zip(model.buffers(), ref.buffers()):  # running statistics: the full pass only
        assert torch.equal(a, b)


def test_sam_gradaug_gradient_by_hand_and_statistics_from_the_first_pass():
    model = cnn()
    ref = slimmable(copy.deepcopy(model))
    x, y = data()
    step = M.build_step("sam(rho=0.3)+gradaug(n_subnets=2, width_range=(0.5, 1.0), resolutions=(8, 6))",
                        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), num_classes=3)
    assert isinstance(step, SharpnessAware) and isinstance(step.step, GradAug) and step.rho == 0.3
    assert not step.adaptive
    before = params(model)
    step(model, x, y, torch.Generator().manual_seed(2))
    subnets = draw_subnets(2, (0.5, 1.0), (8, 6), generator=torch.Generator().manual_seed(2))
    ps = list(ref.parameters())
    eps = sam_perturbation(ps, gradaug_grads(ref, x, y, subnets, 1.0), 0.3)
    stats = [b.clone() for b in ref.buffers()]  # after the first pass
    with torch.no_grad():
        torch._foreach_add_(ps, eps)
    grads = gradaug_grads(ref, x, y, subnets, 1.0)  # teacher: the full network at w + eps
    for old, new, g in zip(before, model.parameters(), grads):
        assert torch.allclose(old - g, new, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))


def test_sam_plus_gradaug_is_deterministic_and_rho_zero_is_plain_gradaug():
    x, y = data(n=8)

    def run(spec, seed=0):
        model = cnn()
        step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                            num_classes=3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(2):
            step(model, x, y, gen)
        return torch.cat([p.flatten() for p in model.state_dict().values() if p.is_floating_point()])

    spec = "sam(rho=0.1)+gradaug(resolutions=(8, 6), width_range=(0.5, 1.0))+cutmix"
    assert torch.equal(run(spec), run(spec))
    assert not torch.equal(run(spec), run(spec, seed=1))
    assert torch.equal(run(spec.replace("0.1", "0")), run(spec.split("+", 1)[1]))
    assert not torch.equal(run(spec), run(spec.split("+", 1)[1]))
    step = M.build_step("asam+gradaug", model=cnn(), optimizer=torch.optim.SGD(cnn().parameters(), lr=0.1),
                        num_classes=3)
    assert step.adaptive and step.rho == 0.5


def test_subnetworks_see_the_rows_the_full_network_trained_on():
    model = cnn()
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x, y = data(n=8)
    obj = MaxUp(A.CutMix(num_classes=3, per_sample=True), m=2)
    step = GradAug(obj, torch.optim.SGD(model.parameters(), lr=0.1), n_subnets=2, resolutions=(8, 5))
    result = step(model, x, y, torch.Generator().manual_seed(0))
    assert torch.equal(seen[-3], result.inputs)  # after MaxUp's selection pass: the chosen copies
    for got, (_, r) in zip(seen[-2:], step.last_subnets):
        assert torch.equal(got, resize(result.inputs, r))


def test_kd_weight_zero_is_the_objective_alone():
    x, y = data(n=8)
    m1, m2 = cnn(), cnn()
    obj = lambda: ERM(A.CutMix(num_classes=3))  # noqa: E731
    GradAug(obj(), torch.optim.SGD(m1.parameters(), lr=0.1), kd_weight=0)(m1, x, y, torch.Generator().manual_seed(0))
    Standard(obj(), torch.optim.SGD(m2.parameters(), lr=0.1))(m2, x, y, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_full_width_subnetworks_under_manifold_mixup_match_the_teacher():
    """Sub-networks forward under the full network's hidden mixing: at width 1 and the input size their
    logits equal the teacher's, the distillation loss is 0 and the step is the objective's alone."""
    x, y = data(n=8)
    m1, m2 = cnn(), cnn()
    mix = lambda: ERM(A.ManifoldMixup(layers=("3",), num_classes=3))  # noqa: E731  (after the grouped conv)
    step = GradAug(mix(), torch.optim.SGD(m1.parameters(), lr=0.1), n_subnets=2, width_range=(1.0, 1.0))
    step(m1, x, y, torch.Generator().manual_seed(0))
    Standard(mix(), torch.optim.SGD(m2.parameters(), lr=0.1))(m2, x, y, torch.Generator().manual_seed(0))
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_accumulation_trains_the_same_subnetworks_on_every_micro_batch():
    x, y = data(n=8)
    m1, m2 = cnn(bn=False), cnn(bn=False)
    kw = dict(n_subnets=2, width_range=(0.5, 1.0), resolutions=(8, 6))
    s1 = GradAug(ERM(), torch.optim.SGD(m1.parameters(), lr=0.2), **kw)
    s2 = SharpnessAware(GradAug(ERM(), torch.optim.SGD(m2.parameters(), lr=0.2), **kw), rho=0, accumulation_steps=2)
    for seed in range(2):
        s1(m1, x, y, torch.Generator().manual_seed(seed))
        s2(m2, x, y, torch.Generator().manual_seed(seed))
        assert s1.last_subnets == s2.step.last_subnets
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_subnetworks_at_full_width_leave_running_statistics_alone():
    model, ref = cnn(), cnn()
    x, y = data()
    GradAug(ERM(), torch.optim.SGD(model.parameters(), lr=0.1), width_range=(1.0, 1.0), resolutions=(6,))(model, x, y)
    ref.train()(x)
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))


# ---------------------------------------------------------------------------- specs, trainer, bad input


@pytest.mark.parametrize("spec", ["gradaug(n_subnets=2, width_range=(0.5, 1.0), resolutions=(6, 4))+cutmix",
                                  "gradaug(kd_weight=0.5)+maxup(m=2)+cutout(size=2)", "sam+gradaug"])
def test_specs_build_train_round_trip_their_state_and_repeat_under_a_seed(spec):
    x, y = data(n=8, size=6)

    def run(state=None):
        model = cnn()
        step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                            num_classes=3, amp="bf16")
        assert isinstance(getattr(step, "step", step), GradAug) and is_slimmable(model)  # converted when built
        if state is not None:
            step.load_state_dict(state)
        gen = torch.Generator().manual_seed(0)
        losses = [step(model, x, y, gen).loss.item() for _ in range(2)]
        return losses, step.state_dict()

    losses, state = run()
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert run()[0] == losses and run(state)[1].keys() == state.keys()
    if spec.startswith("sam"):  # the SAM wrapper counts its steps (for interval); they round-trip
        assert state["num_steps"] == 2 and run(state)[1]["num_steps"] == 4
    assert M.canonical(spec) and "n_subnets" in M.REGISTRY["gradaug"].options()


def test_fit_trains_with_gradaug():
    x, y = data(n=24, size=6)
    model = create_model("cnn", input_shape=(2, 6, 6), num_classes=3, channels=(8, 8))
    history = maxup.fit(model, "gradaug(width_range=(0.5, 1.0), resolutions=(6, 4))", train=(x, y), test=(x, y),
                        epochs=1, batch_size=12, progress=False)
    assert len(history) == 1 and 0.0 <= history[-1]["test_accuracy"] <= 1.0


def test_bad_input_gives_clear_errors():
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad, match in [((0.0, 1.0), r"\(0, 1\]"), ((0.5, 1.2), r"\(0, 1\]"), ((-0.1, 0.5), r"\(0, 1\]"),
                       ((1.0, 0.9), "reversed"), (0.9, "pair"), (("a", 1), "pair")]:
        with pytest.raises(ValueError, match=match):
            GradAug(ERM(), opt, width_range=bad)
        with pytest.raises(ValueError, match="width_range"):
            draw_subnets(2, bad)
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_subnets"):
            GradAug(ERM(), opt, n_subnets=n)
    for res in ((), (8, 0), (-4,), (8.0,), "32"):
        with pytest.raises(ValueError, match="resolutions"):
            GradAug(ERM(), opt, resolutions=res)
    with pytest.raises(ValueError, match="kd_weight"):
        GradAug(ERM(), opt, kd_weight=-1.0)
    x, y = data(size=8)
    with pytest.raises(ValueError, match="must not exceed the input size 8"):
        GradAug(ERM(), opt, resolutions=(8, 10))(model, x, y)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="resolutions=None"):
        GradAug(ERM(), torch.optim.SGD(mlp.parameters(), lr=0.1), resolutions=(4,))(mlp, torch.randn(4, 4), y[:4])
    no_layers = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(ValueError, match="no width-sliceable layer"):
        slimmable(no_layers)
    with pytest.raises(ValueError, match="no width-sliceable layer"):
        GradAug(ERM(), torch.optim.SGD(no_layers.parameters(), lr=0.1))(no_layers, torch.randn(4, 4), y[:4])
    with pytest.raises(ValueError, match="no width-sliceable layer"):
        M.build_step("gradaug", model=no_layers, optimizer=torch.optim.SGD(no_layers.parameters(), lr=0.1),
                     num_classes=3)
    vit = create_model("vit", input_shape=(1, 8, 8), num_classes=3, patch_size=2)
    with pytest.raises(ValueError, match="cannot slice ViT: its parameter 'embed.cls_token'"):
        M.build_step("gradaug", model=vit, optimizer=torch.optim.SGD(vit.parameters(), lr=0.1), num_classes=3)
    with pytest.raises(ValueError, match="'1.weight' is not in an nn.Conv1d"):
        slimmable(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3)))
    with pytest.raises(ValueError, match="slimmable"):
        set_width(cnn(), 0.5)
    for w in (0, 1.5, -0.5, True, "1"):
        with pytest.raises(ValueError, match="width"):
            set_width(slimmable(cnn()), w)
    with pytest.raises(ValueError, match="keep"):
        slimmable(cnn(), keep=["nope"])
    with pytest.raises(ValueError, match="torch.nn.Module"):
        slimmable("model")
    for spec, match in (("sam+asam", "more than one wrapper term"), ("bgmix+gradaug", "more than one step term"),
                        ("sam+sam_mixup", "already trains under SAM")):
        with pytest.raises(ValueError, match=match):
            M.parse(spec)
    with pytest.raises(ValueError, match="unknown argument 'sam'"):
        M.parse("gradaug(sam=1)")
