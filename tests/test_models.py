"""Tests for maxup.models: shapes, gradients, argument errors, parameter counts,
mixing points, determinism and a short real training run on sklearn digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maxup.models import (
    CNN1d,
    MLP,
    ResNet,
    SmallCNN,
    WideResNet,
    create_model,
    list_models,
    model_options,
)

# Input shapes each model must accept (one sample, no batch dim). Every name in
# list_models() must appear here, so a new model cannot slip in untested.
INPUTS: dict[str, list[tuple[int, ...]]] = {
    "cnn": [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 12, 20)],
    "resnet": [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 12, 20)],
    "wrn": [(1, 8, 8), (3, 16, 16), (3, 12, 20)],
    "cnn1d": [(8, 8), (2, 100), (1, 33)],
    "mlp": [(64,), (1, 8, 8), (3, 4, 5)],
    "vit": [(1, 8, 8), (3, 32, 32), (1, 28, 28), (3, 12, 20)],  # patch 4 (the default) divides each
}
SMALL_OPTS: dict[str, dict] = {  # keeps the heavier models quick in tests
    "wrn": {"widen_factor": 1},
}
CASES = [(name, shape) for name in INPUTS for shape in INPUTS[name]]
ALLOWED_LEAVES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.Dropout,
    nn.Flatten,
    nn.Identity,
)


def test_list_models_is_the_documented_set():
    assert list_models() == ["cnn", "mlp", "cnn1d", "resnet", "wrn", "vit"]
    assert set(INPUTS) == set(list_models())


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_logits_shape_and_gradients_reach_every_parameter(name, shape):
    torch.manual_seed(0)
    model = create_model(name, input_shape=shape, num_classes=7, **SMALL_OPTS.get(name, {}))
    x = torch.randn(3, *shape)
    logits = model(x)
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 3, 6])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


def test_input_shape_overrides_in_channels_and_in_channels_alone_works():
    model = create_model("cnn", in_channels=3, input_shape=(1, 8, 8))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    model = create_model("resnet", in_channels=3, depth=8)
    assert model(torch.randn(2, 3, 10, 10)).shape == (2, 10)
    model = create_model("cnn1d", in_channels=4)
    assert model(torch.randn(2, 4, 16)).shape == (2, 10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("resnet18")
    msg = str(err.value)
    assert "resnet18" in msg
    for name in list_models():
        assert name in msg


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn1d", "resnet", "wrn"])
def test_unknown_kwarg_names_argument_and_valid_options(name):
    with pytest.raises(ValueError) as err:
        create_model(name, input_shape=INPUTS[name][0], bogus_option=3)
    msg = str(err.value)
    assert "bogus_option" in msg
    for opt in model_options(name):
        assert opt in msg


def test_model_options_come_from_constructor_signatures():
    assert model_options("resnet") == {"depth": 20, "width": 16, "zero_init_residual": False}
    assert model_options("wrn") == {"depth": 16, "widen_factor": 4, "dropout": 0.0}
    assert model_options("mlp") == {"hidden": (256, 256), "dropout": 0.0}
    assert set(model_options("cnn1d")) == {"channels", "kernel_size", "dropout"}


@pytest.mark.parametrize(
    "name,depth,form",
    [("resnet", 21, "6n+2"), ("resnet", 2, "6n+2"), ("resnet", 20.0, "6n+2"), ("wrn", 20, "6n+4"), ("wrn", 4, "6n+4")],
)
def test_bad_depth_names_depth_and_valid_form(name, depth, form):
    with pytest.raises(ValueError) as err:
        create_model(name, depth=depth)
    assert "depth" in str(err.value) and form in str(err.value)


@pytest.mark.parametrize(
    "name,kwargs,word",
    [
        ("mlp", {}, "input_shape"),
        ("resnet", {"input_shape": (28, 28)}, "input_shape"),
        ("cnn1d", {"input_shape": (1, 8, 8)}, "input_shape"),
        ("cnn", {"input_shape": (1, 0, 8)}, "input_shape"),
        ("resnet", {"width": 0}, "width"),
        ("wrn", {"widen_factor": -1}, "widen_factor"),
        ("wrn", {"dropout": 1.0}, "dropout"),
        ("cnn", {"channels": ()}, "channels"),
        ("cnn1d", {"kernel_size": 4}, "kernel_size"),
        ("mlp", {"input_shape": (64,), "hidden": (32, 0)}, "hidden"),
        ("cnn", {"num_classes": 0}, "num_classes"),
    ],
)
def test_invalid_values_raise_value_error_naming_argument(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        create_model(name, **kwargs)


def _n_conv(cin, cout, k):
    return cin * cout * k * k  # convs before BN carry no bias


def _n_bn(c):
    return 2 * c


def resnet_param_count(depth, width, in_channels, num_classes):
    """Parameters of the CIFAR ResNet, counted from the architecture."""
    n = (depth - 2) // 6
    total = _n_conv(in_channels, width, 3) + _n_bn(width)  # stem
    prev = width
    for ch, stride in zip((width, 2 * width, 4 * width), (1, 2, 2)):
        for b in range(n):
            cin = prev if b == 0 else ch
            total += _n_conv(cin, ch, 3) + _n_bn(ch) + _n_conv(ch, ch, 3) + _n_bn(ch)
            if b == 0 and (stride != 1 or cin != ch):
                total += _n_conv(cin, ch, 1) + _n_bn(ch)  # projection shortcut
        prev = ch
    return total + prev * num_classes + num_classes


def wrn_param_count(depth, k, in_channels, num_classes):
    n = (depth - 4) // 6
    total = _n_conv(in_channels, 16, 3)
    prev = 16
    for ch, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2)):
        for b in range(n):
            cin = prev if b == 0 else ch
            total += _n_bn(cin) + _n_conv(cin, ch, 3) + _n_bn(ch) + _n_conv(ch, ch, 3)
            if b == 0 and (stride != 1 or cin != ch):
                total += _n_conv(cin, ch, 1)
        prev = ch
    return total + _n_bn(prev) + prev * num_classes + num_classes


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_count_matches_architecture():
    model = create_model("resnet", input_shape=(3, 32, 32), num_classes=10)
    expected = resnet_param_count(20, 16, 3, 10)
    assert _count(model) == expected == 272_474  # the paper's "0.27M" (+2,752 for 1x1 projections)
    assert abs(expected - 0.27e6) / 0.27e6 < 0.01
    model = create_model("resnet", input_shape=(1, 28, 28), num_classes=5, depth=32, width=8)
    assert _count(model) == resnet_param_count(32, 8, 1, 5)


def test_wrn_parameter_count_matches_architecture():
    model = create_model("wrn", input_shape=(3, 32, 32), num_classes=10)  # WRN-16-4
    assert _count(model) == wrn_param_count(16, 4, 3, 10)
    assert 2.7e6 < _count(model) < 2.8e6
    model = create_model("wrn", input_shape=(3, 32, 32), num_classes=100, depth=10, widen_factor=2)
    assert _count(model) == wrn_param_count(10, 2, 3, 100)


def test_resnet_uses_projection_shortcuts_only_where_shape_changes():
    model = ResNet(in_channels=3, depth=14, width=16)
    projections = [n for n, m in model.named_modules() if n.endswith("shortcut") and not isinstance(m, nn.Identity)]
    assert projections == ["layer2.0.shortcut", "layer3.0.shortcut"]


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn1d", "resnet", "wrn"])
def test_stages_exist_and_are_visited_in_order(name):
    shape = INPUTS[name][0]
    model = create_model(name, input_shape=shape, **SMALL_OPTS.get(name, {}))
    modules = dict(model.named_modules())
    assert model.stages and all(s in modules for s in model.stages)
    seen = []
    hooks = [
        modules[s].register_forward_hook(lambda m, i, o, s=s: seen.append((s, o.shape[0])))
        for s in model.stages
    ]
    model(torch.randn(2, *shape))
    for h in hooks:
        h.remove()
    assert seen == [(s, 2) for s in model.stages]


def test_replacing_a_stage_output_changes_logits():
    # what Manifold Mixup will do: swap hidden features at a stage
    torch.manual_seed(0)
    model = create_model("resnet", input_shape=(1, 8, 8), depth=8).eval()
    x = torch.randn(4, 1, 8, 8)
    base = model(x)
    handle = model.get_submodule(model.stages[1]).register_forward_hook(lambda m, i, o: o.flip(0))
    swapped = model(x)
    handle.remove()
    assert not torch.allclose(base, swapped)
    assert torch.allclose(base, model(x))


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn1d", "resnet", "wrn"])
def test_built_from_standard_layers_with_linear_classifier(name):
    model = create_model(name, input_shape=INPUTS[name][0], num_classes=6, **SMALL_OPTS.get(name, {}))
    for mname, m in model.named_modules():
        if not list(m.children()):
            assert isinstance(m, ALLOWED_LEAVES), f"{name}: non-standard leaf {mname} ({type(m).__name__})"
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 6


@pytest.mark.parametrize("name", ["cnn", "mlp", "cnn1d", "resnet", "wrn"])
def test_eval_mode_is_deterministic_and_construction_is_seeded(name):
    shape = INPUTS[name][0]
    opts = dict(SMALL_OPTS.get(name, {}))
    if "dropout" in model_options(name):
        opts["dropout"] = 0.5  # dropout must switch off in eval mode
    torch.manual_seed(1)
    a = create_model(name, input_shape=shape, **opts)
    torch.manual_seed(1)
    b = create_model(name, input_shape=shape, **opts)
    x = torch.randn(5, *shape)
    a.train()
    a(x)  # update BN running stats once so eval differs from init
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    with torch.no_grad():
        out1, out2, out3 = a(x), a(x), b(x)
    assert torch.equal(out1, out2)
    assert torch.equal(out1, out3)


def test_other_widths_build_from_layer_channel_counts():
    assert create_model("resnet", input_shape=(3, 8, 8), width=5, depth=8)(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    wrn = create_model("wrn", input_shape=(2, 8, 8), depth=10, widen_factor=1)
    assert wrn(torch.randn(2, 2, 8, 8)).shape == (2, 10)
    assert create_model("cnn", input_shape=(1, 8, 8), channels=(6, 10))(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert create_model("cnn1d", input_shape=(3, 9), channels=(5,))(torch.randn(2, 3, 9)).shape == (2, 10)
    assert create_model("mlp", input_shape=(10,), hidden=())(torch.randn(2, 10)).shape == (2, 10)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    model = create_model("resnet", input_shape=(1, 8, 8), depth=8, zero_init_residual=True)
    for i in (1, 2, 3):
        assert torch.all(model.get_submodule(f"layer{i}.0.bn2").weight == 0)


def test_classes_are_exported_and_match_registry():
    assert isinstance(create_model("cnn"), SmallCNN)
    assert isinstance(create_model("cnn1d"), CNN1d)
    assert isinstance(create_model("mlp", input_shape=(4,)), MLP)
    assert isinstance(create_model("resnet"), ResNet)
    assert isinstance(create_model("wrn", widen_factor=1), WideResNet)
    assert isinstance(create_model("ReSNet", depth=8), ResNet)  # names are case-insensitive


def test_cnn_trains_on_digits_in_two_epochs():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor((X / 16.0).astype(np.float32)).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(X), generator=g)
    n_train = math.floor(0.75 * len(X))
    tr, te = order[:n_train], order[n_train:]

    torch.manual_seed(0)
    model = create_model("cnn", input_shape=(1, 8, 8), num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        model.train()
        perm = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(X[te]).argmax(1) == y[te]).float().mean().item()
    assert acc > 0.8, acc
