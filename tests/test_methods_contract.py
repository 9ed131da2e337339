"""The registry-wide contract: every registered method term trains two steps with ``maxup.fit``, is
deterministic under a seed, and round-trips its state through a checkpoint.

For each term, a run trains two steps (two epochs of one step); a second run with the same seed must
end in the same state bit for bit; then the second run's last checkpoint is removed and a fresh model
resumes from its first, and must again end in the same state and history (a complete checkpoint).

Image and feature terms run on the bundled digits (8x8, 32 training samples, a small CNN). The
token perturbations (``LM_AUGMENTS``: the terms of the "sequence" domain, they only apply to token
ids) run on a tiny token corpus with the LSTM language model instead; the test checks that this list
is exactly the registry's token terms, so a new term cannot slip past.
"""
import math

import pytest
import torch

import maxup
from maxup import methods as M
from maxup.data import TensorData, load_dataset
from maxup.models import LSTMLanguageModel, SmallCNN, ViT
from maxup.train import TIMING_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")

LM_AUGMENTS = [e.name for e in M.list_methods() if e.cls.domain == "sequence"]

#: how a term is run when it is not an augmentation run under MaxUp (objectives need something to draw from)
SPECS = {"maxup": "maxup(m=2, warmup_steps=1)+cutout", "gradaug": "gradaug(n_subnets=2)",
         "adv": "adv(bounds=None, steps=2)"}  # standardised digits lie outside [0, 1]
#: compositions the methods promise (MaxUp, SAM and GradAug around the mixing family)
COMPOSITIONS = [
    "sam+maxup(m=2)+manifold_mixup",
    "asam+maxup(m=2, temperature=0.5)+lumix(base='cutmix')",
    "gradaug(n_subnets=2)+maxup(m=2)+soft_augment(transform='cutout', reweight=true)",
    "sam+gradaug(n_subnets=2)+smooth+cutmix",
    "bgmix+maxup(m=2)+soft_augment",
    "sam_mixup+smooth(eps=0.2)",
    "maxup(m=2, include_clean=true)+cropflip+manifold_mixup(alpha=1.0)",
    "gradaug(n_subnets=2)+maxup(m=2)+manifold_mixup",
    "sam(accumulation_steps=2)+manifold_mixup",
]


def spec_for(entry: M.Entry) -> str:
    if entry.name in SPECS:
        return SPECS[entry.name]
    if entry.kind == "augment" and entry.cls.random:
        return f"maxup(m=2)+{entry.name}"
    return entry.name


IMAGE_SPECS = [spec_for(e) for e in M.list_methods() if e.name not in LM_AUGMENTS] + COMPOSITIONS
TOKEN_SPECS = [f"maxup(m=2)+{name}" for name in LM_AUGMENTS] + ["sam+word_dropout(p=0.2)+token_sub+embed_noise"]


@pytest.fixture(scope="module")
def digits() -> TensorData:
    return load_dataset("digits", train_size=32).train


@pytest.fixture(scope="module")
def tokens() -> TensorData:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 20, (16, 7), generator=g)
    return TensorData(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())


def image_model() -> torch.nn.Module:
    return SmallCNN(in_channels=1, num_classes=10, channels=(4, 8))


def vit_model() -> torch.nn.Module:
    """For the terms that read a vision transformer's attention (transmix): 8x8 digits in 2x2 patches."""
    return ViT(in_channels=1, num_classes=10, image_size=8, patch_size=2, dim=16, depth=2, heads=2)


def token_model() -> torch.nn.Module:
    return LSTMLanguageModel(20, dim=8, layers=1, dropout=0.0)


def train(make, spec, data, num_classes, out_dir, epochs, resume=False):
    torch.manual_seed(0)
    model = make()
    history = maxup.fit(model, spec, train=data, epochs=epochs, batch_size=len(data), lr=0.05, seed=3,
                        num_classes=num_classes, out_dir=out_dir, resume=resume, progress=False, device="cpu")
    return model, history


def check_contract(make, spec, data, num_classes, tmp_path):
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in make().state_dict().items()}
    whole, history = train(make, spec, data, num_classes, tmp_path / "whole", epochs=2)
    assert [r["step"] for r in history] == [1, 2]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    state = whole.state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in start if k in state), f"{spec} did not train"

    again, _ = train(make, spec, data, num_classes, tmp_path / "split", epochs=2)
    assert_same(state, again.state_dict(), f"{spec}: a second run with the same seed differs")
    # as if the run had stopped after its first step: resume from that checkpoint in a fresh model
    (tmp_path / "split" / "checkpoints" / "epoch-0002.pt").unlink()
    resumed, resumed_history = train(make, spec, data, num_classes, tmp_path / "split", epochs=2, resume=True)
    assert untimed(resumed_history) == untimed(history)
    assert_same(state, resumed.state_dict(), f"{spec}: the state differs after a checkpoint round trip")


def untimed(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def assert_same(a: dict, b: dict, message: str) -> None:
    assert a.keys() == b.keys(), message
    for key in a:
        assert torch.equal(a[key], b[key]), f"{message} ({key})"


@pytest.mark.parametrize("spec", IMAGE_SPECS)
def test_every_method_trains_is_deterministic_and_resumes_exactly(spec, digits, tmp_path):
    check_contract(vit_model if "transmix" in spec else image_model, spec, digits, 10, tmp_path)


@pytest.mark.parametrize("spec", TOKEN_SPECS)
def test_token_perturbations_on_a_language_model(spec, tokens, tmp_path):
    check_contract(token_model, spec, tokens, 20, tmp_path)


def test_the_token_terms_are_exactly_the_registered_sequence_augmentations():
    model = token_model()
    found = set()
    for entry in M.list_methods():
        if entry.kind != "augment":
            continue
        try:
            aug = M.build_augment([M.Term(entry.name)], 20, model)
        except ValueError:  # needs an image model (manifold_mixup reads its stages)
            continue
        if aug.sequence:
            found.add(entry.name)
    assert found == set(LM_AUGMENTS)
