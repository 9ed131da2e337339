"""Weight averaging: EMA and SWA against their formulas, in the trainer (metrics, checkpoints, exact resume)."""
import copy
import shutil

import pytest
import torch
from torch import nn

import maxup
from maxup import methods as M
from maxup.averaging import EMA, SWA
from maxup.data import TensorData


def net(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def perturb(model: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        model.train()(torch.randn(16, 4))  # moves the BatchNorm statistics


def test_ema_follows_its_recursion_with_warmup_and_buffers():
    model = net()
    ema = EMA(model, decay=0.9, warmup=5)
    floats = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(1, 8):
        perturb(model, 0.1)
        ema.after_step(model)
        d = min(0.9, (1 + n) / (5 + n))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                floats[k] = d * floats[k] + (1 - d) * v.double()
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), floats[k], atol=1e-6), k
        else:
            assert torch.equal(v, model.state_dict()[k]), k  # num_batches_tracked is copied
    assert ema.updates == 7 and all(not p.requires_grad for p in ema.module.parameters())


def test_swa_is_the_mean_of_the_epoch_end_weights_with_recomputed_statistics():
    model = net()
    swa = SWA(model, start=2)
    seen = []
    for epoch in range(1, 5):
        perturb(model, 0.2)
        swa.after_epoch(model, epoch)
        if epoch >= 2:
            seen.append({k: v.clone() for k, v in model.named_parameters()})
    train = TensorData(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    averaged = swa.averaged(train, device="cpu", batch_size=40)
    for name, p in averaged.named_parameters():
        assert torch.allclose(p, torch.stack([s[name] for s in seen]).mean(0), atol=1e-6)
    with torch.no_grad():  # the statistics of the clean training set under the averaged weights
        h = averaged[0](train.x)
    assert torch.allclose(averaged[1].running_mean, h.mean(0), atol=1e-5)
    assert torch.allclose(averaged[1].running_var, h.var(0), atol=1e-4)
    assert swa.lr(0) is None and SWA(model, start=3, lr=0.01).lr(2) == 0.01


def test_bad_settings_are_clear_errors():
    for decay in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="decay"):
            EMA(net(), decay=decay)
    with pytest.raises(ValueError, match="start"):
        SWA(net(), start=0)
    with pytest.raises(ValueError, match="lr"):
        SWA(net(), lr=-1.0)
    with pytest.raises(ValueError, match="more than one average term"):
        M.parse("cutout+ema+swa")
    with pytest.raises(ValueError, match="decay"):
        M.parse("ema(decay=2)").build_average(net())
    with pytest.raises(ValueError, match="average must be"):
        maxup.Trainer(net(), maxup.steps.Standard(maxup.ERM(), torch.optim.SGD(net().parameters(), lr=0.1)),
                      TensorData(torch.randn(8, 4), torch.randint(0, 3, (8,))), num_classes=3, average="ema")


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return (x[:48], y[:48]), (x[48:], y[48:])


@pytest.mark.parametrize("spec", ["gaussian(sigma=0.1)+ema(decay=0.8)", "gaussian(sigma=0.1)+swa(start=2, lr=0.02)"])
def test_the_trainer_evaluates_checkpoints_and_resumes_the_average_exactly(spec, tmp_path, one_thread):
    train, test = data()
    kw = dict(train=train, test=test, epochs=4, batch_size=16, lr=0.05, progress=False, seed=3)
    full = maxup.fit(net(), spec, out_dir=tmp_path / "full", **kw)
    prefix = "ema" if "ema" in spec else "swa"
    assert all(f"{prefix}_test_accuracy" in r for r in full[1:]) and f"{prefix}_test_loss" in full[-1]
    if prefix == "swa":
        assert "swa_test_accuracy" not in full[0] and full[-1]["lr"] == 0.02  # from epoch 2 on
    part = tmp_path / "part"  # the same run killed after epoch 3: its last checkpoint removed
    shutil.copytree(tmp_path / "full", part)
    (part / "checkpoints" / "epoch-0004.pt").unlink()
    resumed = maxup.fit(net(), spec, out_dir=part, resume=True, **kw)
    strip = lambda h: [{k: v for k, v in r.items() if "time" not in k and k != "samples_per_s"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full)
    a = torch.load(tmp_path / "full" / "checkpoints" / "epoch-0004.pt", weights_only=False)["average"]
    b = torch.load(part / "checkpoints" / "epoch-0004.pt", weights_only=False)["average"]
    flat = lambda s: torch.cat([v.flatten().double() for v in (s.get("module") or s["model"]).values()])  # noqa: E731
    assert torch.equal(flat(a), flat(b))


def test_ema_with_decay_near_zero_evaluates_like_the_model(one_thread):
    """decay -> 0: the average is the last weights, so its metrics equal the model's."""
    train, test = data()
    history = maxup.fit(net(bn=False), "ema(decay=1e-9)", train=train, test=test, epochs=2, batch_size=16,
                        progress=False)
    assert history[-1]["ema_test_loss"] == pytest.approx(history[-1]["test_loss"], abs=1e-6)


def test_a_trainer_built_by_hand_moves_the_average_to_its_device():
    model = net()
    ema = EMA(copy.deepcopy(model))
    step = maxup.steps.Standard(maxup.ERM(), torch.optim.SGD(model.parameters(), lr=0.1))
    trainer = maxup.Trainer(model, step, TensorData(torch.randn(8, 4), torch.randint(0, 3, (8,))), num_classes=3,
                            epochs=1, batch_size=4, average=ema, progress=False)
    assert trainer.average is ema and next(ema.module.parameters()).device == trainer.device
    assert "ema_train_loss" not in trainer.fit()[-1]


def test_the_average_is_saved_and_loads_for_evaluation(tmp_path, one_thread):
    """ema_model.pt holds the average; the robustness command loads it (or, without the file, the average in the
    newest checkpoint)."""
    from maxup.cli.certify import load_run, read_run

    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    run = tmp_path / "run"
    maxup.fit(maxup.models.create_model("cnn", in_channels=1, num_classes=10), "ema(decay=0.9)",
              train=(x, y), test=(x[:20], y[:20]), epochs=2, batch_size=8, progress=False, out_dir=run,
              config={"dataset": "digits", "model": "cnn", "train_size": 100, "normalize": False})
    saved = torch.load(run / "ema_model.pt", weights_only=True)
    ckpt = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=False)["average"]["module"]
    assert all(torch.equal(saved[k], ckpt[k]) for k in saved)
    config = read_run(run)
    _, model = load_run(run, config, device="cpu", weights="ema")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    (run / "ema_model.pt").unlink()
    _, again = load_run(run, config, device="cpu", weights="ema")
    assert all(torch.equal(v, saved[k]) for k, v in again.state_dict().items())
    with pytest.raises(ValueError, match="no SWA average"):
        load_run(run, config, device="cpu", weights="swa")
