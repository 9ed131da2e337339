"""A GPU-grade training step, checked on CPU: no host reads, device generators, compile, speed settings.

Tests marked ``gpu`` need CUDA and skip without it (``benchmarks/gpu_check.py`` runs them on a GPU).
"""
import math
import warnings

import pytest
import torch

import maxup
from maxup import methods as M
from maxup._modules import local, strip_compile_prefix, uncompiled, unwrap
from maxup.data import TensorData, load_dataset
from maxup.functional import _random as R
from maxup.models import SmallCNN
from maxup.objectives import MaxUp, frozen_buffers
from maxup.train import Trainer
from maxup.train.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from maxup.train.distributed import resolve_device
from maxup.train.syncs import HostSyncCounter, count_step_syncs
from maxup.train.trainer import NonFiniteLossError

pytestmark = pytest.mark.usefixtures("one_thread")

#: the specs whose step must make no host read (issue 15)
ZERO = ["erm", "cutout", "cutmix", "mixup(alpha=0.4)", "gaussian", "cropflip", "maxup(m=4)+cutout",
        "maxup(m=4)+cutmix", "maxup(m=4)+cropflip+mixup(alpha=0.2)", "sam", "sam+maxup(m=4)+cutmix", "sam_mixup",
        "gradaug", "manifold_mixup"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def small_model():
    return SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))


def setup(spec, batch=16, device="cpu"):
    torch.manual_seed(0)
    model = small_model().to(device)
    step = M.build_step(spec, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), num_classes=10)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, 8, 8, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, step, x, y


@pytest.mark.parametrize("spec", ZERO)
def test_the_step_makes_no_host_read(spec):
    model, step, x, y = setup(spec)
    counter = count_step_syncs(step, model, x, y, R.DeviceGenerator("cpu", seed=1, host_seed=2), steps=2)
    assert counter.reads == 0, f"{spec}:\n{counter.report()}"
    assert counter.made == 0, f"{spec}:\n{counter.report()}"


def test_the_counter_sees_each_kind_of_host_read():
    t = torch.arange(6.0)
    with HostSyncCounter() as counter:
        t.sum().item()
        bool(t.max() > 2)
        t[t > 2]
        t.nonzero()
        torch.unique(t)
        t.tolist()
        torch.tensor([1.0, 2.0])
    assert counter.reads == 6 and counter.made == 1, counter.report()
    assert "test_gpu_step.py" in counter.report() or "item" in counter.report() or counter.where


def _loop_reads(spec, steps):
    model, step, x, y = setup(spec, batch=8 * steps)
    trainer = Trainer(model, step, TensorData(x, y), epochs=1, batch_size=8, num_classes=10, device="cpu",
                      progress=False, check_every=1000)
    with HostSyncCounter(locate=False) as counter:
        trainer.fit()
    return counter.reads


@pytest.mark.parametrize("spec", ["erm", "maxup(m=4)+cutmix"])
def test_the_trainer_loop_reads_nothing_per_step(spec):
    assert _loop_reads(spec, 6) == _loop_reads(spec, 3)


def test_label_values_are_checked_on_the_first_call_only():
    aug = maxup.augment.Cutout(num_classes=3)
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="labels must lie in"):
        aug(x, torch.tensor([0, 3]))
    aug(x, torch.tensor([0, 2]))
    with HostSyncCounter() as counter:
        aug(x, torch.tensor([1, 2]))
    assert counter.reads == 0
    with pytest.raises((RuntimeError, IndexError)):  # out of range still fails, in the scatter kernel
        aug(x, torch.tensor([0, 5]))


def test_fixed_round_gamma_matches_the_rejection_sampler_and_stays_finite():
    for a in (0.2, 0.4, 1.0, 2.0):
        exact = R.gamma(a, (500,), generator=torch.Generator().manual_seed(4))
        fixed = R.gamma_fixed(a, (500,), generator=torch.Generator().manual_seed(4))
        assert torch.equal(exact, fixed)  # one round suffices at this size: draw for draw the same
    big = R.gamma_fixed(0.4, (200000,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(big).all() and (big >= 0).all()
    assert abs(float(big.mean()) - 0.4) < 0.01


# ---------------------------------------------------------------------------- generators


def test_device_generator_carries_a_host_generator_and_round_trips():
    g = R.DeviceGenerator("cpu", seed=3, host_seed=4)
    assert isinstance(g, torch.Generator) and R.host(g) is g.host and R.host(None) is None
    plain = torch.Generator().manual_seed(5)
    assert R.host(plain) is plain
    state = capture_rng(g)
    a, b = torch.rand(3, generator=g), R.host_rand(2, generator=g)
    restore_rng(state, g)
    assert torch.equal(torch.rand(3, generator=g), a) and R.host_rand(2, generator=g) == b


def test_a_generator_on_another_device_than_the_data_is_handled():
    # draws happen on the generator's device and are moved to the data's: the same stream, never ignored
    g, fresh = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert R.rand((4,), generator=g, device="meta").device.type == "meta"
    assert R.randint(5, (4,), generator=g, device="meta").device.type == "meta"
    torch.rand(4, generator=fresh)
    torch.rand(4, generator=fresh, dtype=torch.float64)
    assert torch.equal(R.rand((3,), generator=g), torch.rand(3, generator=fresh))


def test_a_checkpoint_of_another_device_generator_warns_and_starts_afresh():
    g = R.DeviceGenerator("cpu", seed=0)
    state = capture_rng(g)
    state["generator_device"] = "cuda"
    with pytest.warns(UserWarning, match="starts afresh"):
        restore_rng(state, g)


def test_wrong_device_names_the_option(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="--device 'cuda'.*CUDA is not available"):
        resolve_device("cuda", name="--device")
    from maxup.cli import main
    try:
        code = main(["train", "--device", "cuda", "--epochs", "1"])
    except SystemExit as exit:
        code = exit.code
    assert code not in (0, None)
    assert "--device 'cuda'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the trainer


def test_nonfinite_loss_is_found_at_the_check_and_names_the_first_bad_step(tmp_path):
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_model()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * float("nan") if self.calls >= 3 else out

    torch.manual_seed(0)
    model = Exploding()
    step = M.build_step("erm", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), num_classes=10)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    trainer = Trainer(model, step, TensorData(x, y), epochs=1, batch_size=8, num_classes=10, device="cpu",
                      progress=False, check_every=5, out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"step 3 of 8 \(global step 3, found by the check of steps 1-5\)") \
            as err:
        trainer.fit()
    assert err.value.step == 3 and err.value.global_step == 3


def test_speed_settings_are_recorded_and_checked():
    model, step, x, y = setup("erm")
    with pytest.raises(ValueError, match="check_every"):
        Trainer(model, step, TensorData(x, y), num_classes=10, device="cpu", check_every=0)
    with pytest.raises(ValueError, match="channels_last"):
        Trainer(model, step, TensorData(x, y), num_classes=10, device="cpu", channels_last="yes")
    trainer = Trainer(model, step, TensorData(x, y), num_classes=10, device="cpu", channels_last=True, progress=False,
                      epochs=1)
    xb, _ = next(iter(trainer.loader))
    assert xb.is_contiguous(memory_format=torch.channels_last)
    assert trainer.resolved_config()["trainer"]["channels_last"] is True
    trainer.fit()


def test_frozen_buffers_restores_every_buffer_exactly():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with frozen_buffers(model):
        model(torch.rand(4, 1, 5, 5))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reduced_precision_selection_and_fused_selection():
    torch.manual_seed(0)
    model = small_model()
    model.eval()  # no batch statistics: one fused forward gives the same losses as one per copy
    aug = maxup.augment.CutMix(num_classes=10, per_sample=True)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    xs, ts = MaxUp(aug, m=4).candidates(x, y, torch.Generator().manual_seed(0))
    per = MaxUp(aug, m=4)._losses(model, xs, ts)
    fused = MaxUp(aug, m=4, select_batch_size=64)._losses(model, xs, ts)
    torch.testing.assert_close(per, fused)
    low = MaxUp(aug, m=4, select_amp="bf16")._losses(model, xs, ts)
    assert low.dtype == torch.float32
    assert (low.argmax(0) == per.argmax(0)).float().mean() >= 0.75
    with pytest.raises(ValueError, match="select_amp"):
        MaxUp(aug, m=4, select_amp="fp8")
    with pytest.raises(ValueError, match="select_amp needs mode='select'"):
        MaxUp(aug, m=4, mode="direct", select_amp="bf16")
    M.build_step("maxup(m=2, select_amp='bf16')+cutout", model=model,
                 optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10)


# ---------------------------------------------------------------------------- torch.compile


def test_unwrapping_sees_through_compile_and_ddp_wrappers():
    net = small_model()
    compiled = torch.compile(net, backend="eager")
    assert unwrap(compiled) is net and uncompiled(compiled) is net and local(compiled) is compiled
    state = {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}
    assert strip_compile_prefix(state).keys() == net.state_dict().keys()
    assert strip_compile_prefix(net.state_dict()).keys() == net.state_dict().keys()


def test_a_checkpoint_written_with_a_compiled_model_loads_into_a_plain_one(tmp_path):
    digits = load_dataset("digits", train_size=48).train
    torch.manual_seed(0)
    model = small_model()
    maxup.fit(torch.compile(model, backend="eager"), "maxup(m=2)+cutmix", train=digits, epochs=1, batch_size=16,
              device="cpu", progress=False, out_dir=tmp_path, num_classes=10)
    state = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt")
    plain = small_model()
    plain.load_state_dict(state["model"])
    plain.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    # a state dict saved from the compiled module itself resumes too
    state["model"] = {f"_orig_mod.{k}": v for k, v in state["model"].items()}
    state.pop("checksum", None)
    save_checkpoint(state, tmp_path / "checkpoints" / "epoch-0001.pt")
    maxup.fit(small_model(), "maxup(m=2)+cutmix", train=digits, epochs=2, batch_size=16, device="cpu",
              progress=False, out_dir=tmp_path, num_classes=10, resume=True)


def test_the_last_short_batch_does_not_recompile():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    digits = load_dataset("digits", train_size=80).train  # batches of 32, 32 and 16
    torch.manual_seed(0)
    maxup.fit(small_model(), "erm", train=digits, epochs=2, batch_size=32, device="cpu", progress=False,
              num_classes=10, compile="eager")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _compile_specs():
    from test_methods_contract import IMAGE_SPECS
    return IMAGE_SPECS


@pytest.mark.parametrize("spec", _compile_specs())
def test_compile_trains_every_method(spec):
    """Every registered method (and the promised compositions) trains with a compiled model; the eager
    backend keeps this fast (the inductor run is in the slow test below and in benchmarks/gpu_check.py)."""
    digits = load_dataset("digits", train_size=32).train
    torch.manual_seed(0)
    from test_methods_contract import vit_model

    model = vit_model() if "transmix" in spec else small_model()  # transmix reads a transformer's attention
    history = maxup.fit(model, spec, train=digits, epochs=1, batch_size=16, device="cpu", progress=False,
                        num_classes=10, compile="eager", seed=1)
    assert math.isfinite(history[-1]["train_loss"])


@pytest.mark.slow
def test_compile_with_inductor_matches_eager_training():
    digits = load_dataset("digits", train_size=64).train
    runs = []
    for compile in (False, True):
        torch.manual_seed(0)
        model = small_model()
        maxup.fit(model, "maxup(m=2)+cutmix", train=digits, epochs=1, batch_size=32, device="cpu", progress=False,
                  num_classes=10, compile=compile, seed=1)
        runs.append(model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@cuda
def test_gpu_device_generator_draws_on_the_device():
    g = R.DeviceGenerator("cuda", seed=0, host_seed=1)
    x = torch.rand(8, 3, 16, 16, device="cuda")
    xa, ya = maxup.augment.CutMix(num_classes=10, per_sample=True)(x, torch.randint(0, 10, (8,), device="cuda"), g)
    assert xa.device.type == "cuda" and ya.device.type == "cuda"
    state = capture_rng(g)
    a = R.rand((5,), generator=g, device="cuda")
    restore_rng(state, g)
    assert torch.equal(R.rand((5,), generator=g, device="cuda"), a)
    # a CPU generator with CUDA data: drawn on the CPU, moved (handled, the same stream)
    cpu = R.rand((5,), generator=torch.Generator().manual_seed(0), device="cuda")
    assert torch.equal(cpu.cpu(), torch.rand(5, generator=torch.Generator().manual_seed(0)))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("spec", ZERO)
def test_gpu_step_never_synchronises(spec):
    model, step, x, y = setup(spec, batch=32, device="cuda")
    g = R.DeviceGenerator("cuda", seed=0, host_seed=1)
    step(model, x, y, g)  # the first call checks the labels once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step(model, x, y, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@cuda
def test_gpu_compile_trains():
    digits = load_dataset("digits", train_size=256).train
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = maxup.fit(small_model(), "maxup(m=4)+cutmix", train=digits, epochs=2, batch_size=64,
                            device="cuda", progress=False, num_classes=10, compile=True)
    assert math.isfinite(history[-1]["train_loss"])
