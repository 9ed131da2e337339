"""The method layer: terms that describe and register themselves, specs parsed once, SAM as a wrapper around
any step, one forward-context mechanism, and a package whose modules import alone (no import cycle)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maxup
from maxup import augment as A
from maxup import methods as M
from maxup.functional import EmbeddingNoise, enter
from maxup.models import LSTMLanguageModel
from maxup.objectives import ERM, MaxUp
from maxup.registry import REGISTRY, register
from maxup.steps import GradAug, SharpnessAware, Standard, Step

SRC = Path(maxup.__file__).resolve().parent


def test_every_module_imports_alone():
    """Each module of the package imported first, in a fresh set of maxup modules: no import cycle."""
    modules = sorted("maxup." + ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                     for p in SRC.rglob("*.py"))
    modules = [m.removesuffix(".__init__") for m in modules if m != "maxup.__main__"]
    script = textwrap.dedent(f"""
        import importlib, sys, warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in {modules!r}:
            for key in [k for k in sys.modules if k == "maxup" or k.startswith("maxup.")]:
                del sys.modules[key]
            importlib.import_module(name)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_registry_entries_describe_themselves():
    for name, entry in REGISTRY.items():
        assert entry.kind in ("augment", "objective", "step", "wrapper", "average"), name
        assert entry.cls.domain in ("any", "tensor", "image", "sequence"), name
        for key in entry.options():
            assert key not in entry.cls.filled, (name, key)
    assert REGISTRY["mixup"].options()["per_sample"] is True and A.Mixup().per_sample is False  # the spec's default
    assert REGISTRY["smooth"].cls.random is False and REGISTRY["cutout"].cls.random is True
    assert REGISTRY["manifold_mixup"].cls.context == "batch" and REGISTRY["embed_noise"].cls.context == "rows"
    assert REGISTRY["sam"].kind == REGISTRY["asam"].kind == "wrapper"
    assert "adaptive" not in REGISTRY["asam"].options() and REGISTRY["asam"].options()["rho"] == 0.5
    assert REGISTRY["bgmix"].cls.sharpness_aware and not REGISTRY["gradaug"].cls.sharpness_aware
    assert "sam_mixup" in REGISTRY["gmix"].summary and "gmix" in REGISTRY["sam_mixup"].summary  # the two G(-)Mixes


def test_a_new_term_is_one_class_and_composes_everywhere():
    @register("flip_sign", "multiply the inputs by -1 with probability p")
    class FlipSign(A.Augmentation):
        def apply(self, x, t, generator):
            flip = self._applied(x.shape[0], generator, x.device)
            return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), -x, x), t

    try:
        spec = M.parse("sam(rho=0.1)+gradaug(n_subnets=2)+maxup(m=2)+flip_sign(p=0.5)")
        assert str(spec) == "sam(rho=0.1)+gradaug(n_subnets=2)+maxup(m=2)+flip_sign(p=0.5)"
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        step = spec.build_step(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=3)
        assert isinstance(step, SharpnessAware) and isinstance(step.step, GradAug)
        result = step(model, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.Generator().manual_seed(0))
        assert torch.isfinite(result.loss)
        with pytest.raises(ValueError, match="gradaug is not available for language models"):
            spec.check_domain("sequence")
        with pytest.raises(ValueError, match="flip_sign works on images and features"):
            M.parse("flip_sign").check_domain("sequence")
    finally:
        del REGISTRY["flip_sign"]


def test_composition_rules_come_from_the_traits():
    for spec, match in [("maxup(m=4)+smooth", "draws nothing"), ("sam+asam", "more than one wrapper"),
                        ("gradaug+bgmix", "more than one step"), ("asam+dgmix", "already trains under SAM"),
                        ("manifold_mixup+cutout", "must be the last augmentation"),
                        ("bgmix+manifold_mixup", "does not compose with bgmix")]:
        with pytest.raises(ValueError, match=match):
            M.parse(spec)
    M.parse("maxup(m=4)+sam_mixup")  # the step draws the mixing: the copies differ
    assert M.parse("sam+word_dropout").check_domain("sequence")
    with pytest.raises(ValueError, match="gradaug is not available for language models"):
        M.parse("gradaug+word_dropout").check_domain("sequence")
    with pytest.raises(ValueError, match="word_dropout works on token sequences"):
        M.parse("word_dropout").check_domain("image")


def test_a_spec_is_parsed_once_and_passed_down():
    spec = M.parse("MAXUP(m=2)+Cutout(size=2)")
    assert M.parse(spec) is spec and M.canonical(spec) == "maxup(m=2)+cutout(size=2)"
    assert isinstance(M.build_objective(spec, 3), MaxUp)


def test_sam_wraps_any_step_through_its_passes():
    """A step that adds a loss in forward_backward and replays it: SAM runs both passes of it, at w and w + eps."""
    class Doubled(Step):
        calls = []

        def forward_backward(self, model, x, y, generator=None, *, sync=True, scale=1.0):
            self.calls.append("first")
            result = super().forward_backward(model, x, y, generator, sync=sync, scale=scale)
            self.backward(self.reevaluate(model, result).loss)  # the same loss once more: twice the gradient
            return result

        def replay(self, model, result, *, sync=True):
            self.calls.append("replay")
            again = super().replay(model, result, sync=sync)
            self.backward(self.reevaluate(model, result).loss)
            return again

    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    m1, m2 = nn.Linear(4, 3), nn.Linear(4, 3)
    m2.load_state_dict(m1.state_dict())
    s1 = SharpnessAware(Doubled(ERM(), torch.optim.SGD(m1.parameters(), lr=0.1)), rho=0.2)
    s1(m1, x, y)
    assert Doubled.calls == ["first", "replay"]
    # by hand: the ascent along 2g has the direction of g; the update applies twice the gradient at w + eps
    s2 = SharpnessAware(ERM(), torch.optim.SGD(m2.parameters(), lr=0.2), rho=0.2)
    s2(m2, x, y)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_second_pass_of_sam_enters_the_same_forward_context():
    """Embedding noise under SAM: the replay at w + eps adds the noise drawn at w (checked by hand)."""
    torch.manual_seed(0)
    vocab, dim = 11, 6
    model = LSTMLanguageModel(vocab, dim=dim, dropout=0.0)
    ref = LSTMLanguageModel(vocab, dim=dim, dropout=0.0)
    ref.load_state_dict(model.state_dict())
    x, y = torch.randint(0, vocab, (3, 5)), torch.randint(0, vocab, (3, 5))
    step = M.build_step("sam(rho=0.3)+embed_noise(sigma=0.5)", model=model,
                        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), num_classes=vocab)
    result = step(model, x, y, torch.Generator().manual_seed(4))
    assert isinstance(result.context, EmbeddingNoise)
    noise = result.context.noise
    assert torch.equal(noise, A.EmbeddingNoise(0.5, dim=dim).draw(x, y, torch.Generator().manual_seed(4))[2].noise)

    def loss(net):
        with enter(net, EmbeddingNoise(noise)):
            return F.cross_entropy(net(x).flatten(0, 1), y.flatten())

    ps = list(ref.parameters())
    g = torch.autograd.grad(loss(ref), ps)
    norm = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(ps, g):
            p.add_(0.3 * gi / norm)
    g2 = torch.autograd.grad(loss(ref), ps)
    with torch.no_grad():
        for p, gi, g2i in zip(ps, g, g2):
            p.sub_(0.3 * gi / norm).sub_(0.1 * g2i)
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert not model.embedding._forward_hooks


def test_maxup_select_mode_takes_each_chosen_copy_with_its_own_context():
    torch.manual_seed(0)
    vocab = 9
    model = LSTMLanguageModel(vocab, dim=4, dropout=0.0)
    x, y = torch.randint(0, vocab, (5, 4)), torch.randint(0, vocab, (5, 4))
    objective = MaxUp(A.EmbeddingNoise(1.0, dim=4), m=3)
    assert objective.mode == "select"
    result = objective(model, x, y, torch.Generator().manual_seed(1))
    copies = [A.EmbeddingNoise(1.0, dim=4).draw(x, y, g)[2].noise
              for g in [torch.Generator().manual_seed(1)] for _ in range(3)]
    with torch.no_grad():
        losses = []
        for noise in copies:
            with enter(model, EmbeddingNoise(noise)):
                losses.append(F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1))
        pick = torch.stack(losses).argmax(0)
    expected = torch.stack([copies[int(k)][i] for i, k in enumerate(pick)])
    assert torch.equal(result.context.noise, expected)
    assert torch.allclose(result.losses, torch.stack(losses).max(0).values, atol=1e-5)


def test_standard_is_a_step_and_steps_are_plain_subclasses():
    model = nn.Linear(3, 2)
    step = Standard(ERM(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert isinstance(step, Step) and step.kind == "step" and step.domain == "any"


def test_a_forward_context_survives_later_augmentations():
    """embed_noise followed by word_dropout: the noise context of the first member reaches the forward."""
    model = LSTMLanguageModel(12, dim=4, dropout=0.0)
    x, y = torch.randint(1, 12, (3, 5)), torch.randint(0, 12, (3, 5))
    aug = M.parse("embed_noise(sigma=1.0)+word_dropout(p=0.5)").build_augment(12, model)
    xa, ya, context = aug.draw(x, y, torch.Generator().manual_seed(0))
    assert isinstance(context, EmbeddingNoise) and context.noise.shape == (3, 5, 4) and not torch.equal(xa, x)
