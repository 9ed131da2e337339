"""maxup.integrations.lightning with a real lightning.Trainer on digits (CPU, a few steps each)."""
from __future__ import annotations

import math
import types

import pytest
import torch

lightning = pytest.importorskip("lightning")

import maxup.data  # noqa: E402
import maxup.methods  # noqa: E402
import maxup.models  # noqa: E402
from maxup.integrations import MaxUpMixin, MaxUpModule, maxup_training_step  # noqa: E402
from maxup.integrations.lightning import CHECKPOINT_KEY  # noqa: E402

# Lightning's advice on DataLoader workers, validation and callbacks, and a deprecation inside Lightning itself
pytestmark = [pytest.mark.filterwarnings(f"ignore:.*{text}") for text in (
    "num_workers", "does not have many workers", "no `val_dataloader`", "callbacks used to create", "LeafSpec")]

BATCH = 64
TRAIN = 256  # 4 steps per epoch


@pytest.fixture(scope="module")
def digits():
    return maxup.data.load_dataset("digits", train_size=TRAIN, test_size=128)


def loaders(splits, *, val: bool = True):
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(splits.train.x, splits.train.y),
                                        batch_size=BATCH, shuffle=True)
    if not val:
        return train, None
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(splits.test.x, splits.test.y), batch_size=128)
    return train, test


def net(seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    return maxup.models.SmallCNN(in_channels=1, num_classes=10, channels=(8, 16, 32), dropout=dropout)


def trainer(max_steps: int, **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                   enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    options.update(kwargs)
    return lightning.Trainer(**options)


def fit(module, splits, max_steps: int, *, val: bool = True, ckpt_path=None, **kwargs):
    t = trainer(max_steps, **kwargs)
    train, test = loaders(splits, val=val)
    t.fit(module, train, test, ckpt_path=ckpt_path)
    return t


def optimizer_steps(module) -> list[int]:
    """A counter of the underlying torch optimizer's step() calls, hooked when training starts."""
    calls = [0]

    class Count(lightning.Callback):
        def on_train_start(self, trainer, pl_module):
            opt = pl_module.optimizers().optimizer
            opt.register_step_post_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))

    return calls, Count()


@pytest.mark.parametrize("spec", ["erm", "maxup(m=2)+cutmix", "sam+gradaug"])
def test_trains_with_each_method(digits, spec):
    model = net()
    before = [p.detach().clone() for p in model.parameters()]
    module = MaxUpModule(model, spec, num_classes=10, lr=0.05, scheduler="cosine", warmup_steps=1)
    calls, counter = optimizer_steps(module)
    t = fit(module, digits, 4, callbacks=[counter])
    assert t.global_step == 4
    assert calls[0] == 4  # one optimizer step per batch: Lightning's wrapper steps the optimizer once
    metrics = t.callback_metrics
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert math.isfinite(float(metrics[key])), key
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    step = module.maxup_step
    assert step.optimizer.optimizer is module.optimizers().optimizer  # the optimizer Lightning checkpoints
    if spec.startswith("sam"):
        assert step.num_steps == 4
    lr = step.optimizer.param_groups[0]["lr"]
    assert 0 <= lr < 0.05  # the cosine schedule stepped every optimizer step
    if spec != "erm":  # the augmentations (GradAug's widths: the host generator) drew from the seeded generator
        g = module.maxup_generator
        fresh = maxup.functional._random.DeviceGenerator(seed=maxup.train.trainer.generator_seed(0, 0),
                                                         host_seed=maxup.train.trainer.host_generator_seed(0, 0))
        assert not torch.equal(g.get_state(), fresh.get_state()) or not torch.equal(g.host.get_state(),
                                                                                    fresh.host.get_state())


def test_resume_through_lightning_is_exact(digits, tmp_path):
    """8 steps straight vs. 4 steps, a checkpoint, a new module resumed to 8: the same weights, EMA, step state,
    generator, optimizer and learning rate (dropout and the DataLoader's shuffling draw from the global RNG)."""
    spec = "sam+maxup(m=2)+cutmix+ema(decay=0.9)"
    options = dict(num_classes=10, lr=0.05, scheduler="cosine", warmup_steps=2, seed=3)
    ckpt = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    straight = MaxUpModule(net(0, dropout=0.2), spec, **options)
    fit(straight, digits, 8, callbacks=[ckpt], enable_checkpointing=True)
    first = sorted(tmp_path.glob("*step=4*.ckpt"))
    assert len(first) == 1, sorted(p.name for p in tmp_path.iterdir())
    saved = torch.load(first[0], weights_only=True)  # plain tensors and numbers: loads without pickle
    assert saved[CHECKPOINT_KEY]["step"]["num_steps"] == 4

    resumed = MaxUpModule(net(1, dropout=0.2), spec, **options)  # other initial weights: the checkpoint's win
    t = fit(resumed, digits, 8, ckpt_path=first[0])
    assert t.global_step == 8
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(straight.maxup_average.state_dict()["module"].items(),
                            resumed.maxup_average.state_dict()["module"].values()):
        assert torch.equal(a, b), f"ema {name}"
    assert straight.maxup_average.updates == resumed.maxup_average.updates == 8
    assert straight.maxup_step.state_dict() == resumed.maxup_step.state_dict()
    assert resumed.maxup_step.num_steps == 8
    assert torch.equal(straight.maxup_generator.get_state(), resumed.maxup_generator.get_state())
    assert torch.equal(straight.maxup_generator.host.get_state(), resumed.maxup_generator.host.get_state())
    a_opt, b_opt = straight.maxup_step.optimizer, resumed.maxup_step.optimizer
    assert [g["lr"] for g in a_opt.param_groups] == [g["lr"] for g in b_opt.param_groups]
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a_opt.state[pa]["momentum_buffer"], b_opt.state[pb]["momentum_buffer"])

    # validate from the last checkpoint: a fresh module evaluates the checkpoint's EMA
    last = sorted(tmp_path.glob("*step=8*.ckpt"))[0]
    _, test = loaders(digits)
    expected = trainer(8).validate(straight, test, verbose=False)[0]
    fresh = MaxUpModule(net(2, dropout=0.2), spec, **options)
    got = trainer(8).validate(fresh, test, ckpt_path=last, verbose=False)[0]
    assert got == pytest.approx(expected) and "ema_val_accuracy" in got


def test_swa_and_ema_are_evaluated(digits):
    module = MaxUpModule(net(), "cutmix+swa(start=1)", num_classes=10, lr=0.05)
    t = fit(module, digits, 8)
    assert module.maxup_average.updates == 2  # after epochs 1 and 2
    assert math.isfinite(float(t.callback_metrics["swa_val_accuracy"]))
    module = MaxUpModule(net(), "ema(decay=0.5)", num_classes=10, lr=0.05)
    t = fit(module, digits, 4)
    assert module.maxup_average.updates == 4
    assert math.isfinite(float(t.callback_metrics["ema_val_loss"]))


class OwnModule(MaxUpMixin, lightning.LightningModule):
    """A user's own LightningModule: its network, optimizer and logging; maxup trains it."""

    def __init__(self, method: str):
        super().__init__()
        self.net = net()
        self.init_maxup(method, num_classes=10, model=self.net, seed=0, max_grad_norm=5.0)
        self.seen = []

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}

    def training_step(self, batch, batch_idx):
        result = self.maxup_training_step(batch)
        self.seen.append(float(result.loss.detach()))
        return result.loss.detach()


def test_own_module_with_the_mixin(digits, tmp_path):
    module = OwnModule("sam+maxup(m=2)+cutmix")
    before = [p.detach().clone() for p in module.parameters()]
    t = fit(module, digits, 4, val=False)
    assert t.global_step == 4 and len(module.seen) == 4 and all(math.isfinite(v) for v in module.seen)
    assert module.maxup_step.num_steps == 4
    assert module.maxup_step.max_grad_norm == 5.0
    assert module.optimizers().optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.9 ** 4)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    path = tmp_path / "own.ckpt"
    t.save_checkpoint(path)
    again = OwnModule("sam+maxup(m=2)+cutmix")
    t = fit(again, digits, 6, val=False, ckpt_path=path)
    assert again.maxup_step.num_steps == 6  # the SAM counter came back from the checkpoint
    with pytest.raises(ValueError, match="trained with the method"):
        fit(OwnModule("erm"), digits, 6, val=False, ckpt_path=path)


class ExplicitStep(lightning.LightningModule):
    """The function form: the user builds the step and the generator."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = net()

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_train_start(self):
        self.step = maxup.methods.build_step("maxup(m=2)+cutmix", model=self.net, optimizer=self.optimizers(),
                                             num_classes=10)
        self.generator = torch.Generator().manual_seed(0)

    def training_step(self, batch, batch_idx):
        return maxup_training_step(self, batch, self.step, self.generator, model=self.net).loss.detach()


def test_function_with_own_step(digits):
    module = ExplicitStep()
    before = [p.detach().clone() for p in module.parameters()]
    t = fit(module, digits, 3, val=False)
    assert t.global_step == 3
    assert math.isfinite(float(t.callback_metrics["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_refusals(digits):
    with pytest.raises(ValueError, match="automatic_optimization"):
        module = ExplicitStep()
        module.automatic_optimization = True
        maxup_training_step(module, (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), None)
    with pytest.raises(ValueError, match="self.optimizers"):
        module = ExplicitStep()
        plain = torch.optim.SGD(module.parameters(), lr=0.1)
        maxup_training_step(module, (torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)),
                            maxup.methods.build_step("erm", model=module.net, optimizer=plain, num_classes=10))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        MaxUpModule(net(), "erm", num_classes=10, optimizer="lbfgs")
    with pytest.raises(ValueError, match="scheduler must be"):
        MaxUpModule(net(), "erm", num_classes=10, scheduler="step")
    with pytest.raises(ValueError, match="unknown method"):
        MaxUpModule(net(), "maxupp", num_classes=10)
    module = MaxUpModule(net(), "erm", num_classes=10)
    module._trainer = types.SimpleNamespace(world_size=1, precision="16-mixed")  # Lightning has no fp16 on CPU
    with pytest.raises(ValueError, match="amp='fp16'"):
        module.on_fit_start()
    module._trainer = types.SimpleNamespace(world_size=2, precision="32-true")
    with pytest.raises(ValueError, match="one process"):
        module.on_fit_start()


def test_mixed_precision(digits):
    """Lightning's bf16 autocast around training_step, and the step's own fp16 autocast and scaler."""
    module = MaxUpModule(net(), "maxup(m=2)+cutmix", num_classes=10)
    t = fit(module, digits, 2, val=False, precision="bf16-mixed")
    assert t.global_step == 2 and math.isfinite(float(t.callback_metrics["train_loss"]))
    module = MaxUpModule(net(), "sam+cutmix", num_classes=10, amp="fp16")  # the step's GradScaler
    t = fit(module, digits, 2, val=False)
    assert module.maxup_step.num_steps == 2 and t.global_step == 2 - module.maxup_step.skipped_steps
    assert math.isfinite(float(t.callback_metrics["train_loss"]))
    state = {}
    module.on_save_checkpoint(state)
    assert "scaler" in state[CHECKPOINT_KEY]["step"]


def test_terms_that_read_the_training_set_and_follow_the_epochs(digits):
    """train= reaches the long-tail terms; the Trainer's epochs reach CMO's schedule; bootstrap fits after each."""
    train = (digits.train.x, digits.train.y)
    module = MaxUpModule(net(), "cmo(start_epoch=1)+balanced_softmax", num_classes=10, train=train)
    fit(module, digits, 8, val=False, max_epochs=2)
    terms = {type(m).__name__: m for m in module.maxup_step.objective.augment.modules()}
    assert (terms["CMO"].epoch, terms["CMO"].epochs) == (1, 2)  # the epoch hook ran at the start of each epoch
    counts = torch.bincount(digits.train.y, minlength=10)
    assert torch.equal(terms["BalancedSoftmax"].class_counts.cpu().long(), counts)

    module = MaxUpModule(net(), "bootstrap(warmup_epochs=1, mixup=true)", num_classes=10, train=train)
    fit(module, digits, 8, val=False, max_epochs=2)
    assert module.maxup_step.epoch == 2 and module.maxup_step.last_fit is not None  # fitted after the warm-up

    with pytest.raises(ValueError, match=r"pass train=\(x, y\)"):
        fit(MaxUpModule(net(), "bootstrap", num_classes=10), digits, 4, val=False)
    with pytest.raises(ValueError, match="max_epochs"):
        fit(MaxUpModule(net(), "cmo", num_classes=10, train=train), digits, 4, val=False, max_epochs=-1)
