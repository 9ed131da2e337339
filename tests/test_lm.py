"""Language modelling: the corpus reader and segments, the KJV builder (with a stand-in `bible`), the token
perturbations, MaxUp over segments, perplexity, and `maxup lm` / `maxup compare --task lm` end to end."""
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from maxup import MaxUp
from maxup import augment as A
from maxup import functional as MF
from maxup import methods as M
from maxup.cli import main
from maxup.data import Loader, TensorData, build_kjv_corpus, load_corpus, read_corpus, segments
from maxup.models import LSTMLanguageModel
from maxup.train import evaluate, perplexity

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = "the cat sat on the mat\n\nthe dog sat\na <unk> cat\n"
VALID = "the cat ran\nthe dog sat on the mat\n"
TEST = "a dog sat on the cat\n"


def write_corpus(root: Path, train=TRAIN, valid=VALID, test=TEST, names=("train.txt", "valid.txt", "test.txt")):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in zip(names, (train, valid, test)):
        (root / name).write_text(text)
    return root


# ------------------------------------------------------------------------------------------ corpus


def test_vocabulary_eos_and_unk(tmp_path):
    corpus = read_corpus(write_corpus(tmp_path / "c"))
    # <unk>, <eos>, then by count (the 3, cat 2, sat 2), ties alphabetical
    assert corpus.vocab == ["<unk>", "<eos>", "the", "cat", "sat", "a", "dog", "mat", "on"]
    words = [corpus.vocab[i] for i in corpus.train]
    assert words == "the cat sat on the mat <eos> the dog sat <eos> a <unk> cat <eos>".split()  # blank line skipped
    assert [corpus.vocab[i] for i in corpus.valid[:4]] == ["the", "cat", "<unk>", "<eos>"]  # 'ran' is not in train
    assert corpus.train.dtype == torch.int64 and corpus.name == "c"


def test_ptb_and_wikitext_file_names(tmp_path):
    ptb = read_corpus(write_corpus(tmp_path / "ptb", names=("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")))
    wiki = read_corpus(write_corpus(tmp_path / "wiki", names=("wiki.train.tokens", "wiki.valid.tokens",
                                                               "wiki.test.tokens")))
    assert ptb.vocab == wiki.vocab and torch.equal(ptb.test, wiki.test)


def test_segments_shapes_and_order():
    tokens = torch.arange(20)
    d = segments(tokens, 6)
    assert d.x.shape == d.y.shape == (3, 6)  # 19 shifted pairs -> 3 full segments, the rest left out
    assert torch.equal(d.x.flatten(), tokens[:18]) and torch.equal(d.y.flatten(), tokens[1:19])
    d.x[0, 0] = 99
    assert tokens[0] == 0  # copies, not views of the stream


def test_load_corpus_batches_in_order(tmp_path):
    splits = load_corpus(write_corpus(tmp_path / "c"), bptt=4)
    corpus = read_corpus(tmp_path / "c")
    assert splits.num_classes == len(corpus.vocab) == 9 and splits.input_shape == (4,)
    assert splits.classes == corpus.vocab
    assert splits.train.x.shape == (3, 4) and splits.val.x.shape == (2, 4)
    assert torch.equal(splits.train.x.flatten(), corpus.train[:12])
    assert torch.equal(splits.train.y.flatten(), corpus.train[1:13])
    assert splits.test.x.shape == (1, 4) and torch.equal(splits.test.y[0], corpus.test[1:5])
    batches = list(Loader(splits.train, batch_size=2, shuffle=False))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 4), (1, 4)]
    assert torch.equal(torch.cat([x for x, _ in batches]), splits.train.x)
    quick = load_corpus(tmp_path / "c", bptt=4, train_tokens=9)
    assert quick.train.x.shape == (2, 4)
    prefix = load_corpus(tmp_path / "c", bptt=4, eval_tokens=5)  # one segment of each evaluation split
    assert prefix.val.x.shape == prefix.test.x.shape == (1, 4) and torch.equal(prefix.train.x, splits.train.x)
    assert torch.equal(prefix.val.y[0], corpus.valid[1:5])
    with pytest.raises(ValueError, match="eval_tokens"):
        load_corpus(tmp_path / "c", bptt=4, eval_tokens=1)


def test_bad_corpora_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    root = write_corpus(tmp_path / "missing")
    (root / "valid.txt").unlink()
    with pytest.raises(FileNotFoundError, match="valid.txt is missing"):
        read_corpus(root)
    with pytest.raises(ValueError, match="test.txt is empty"):
        read_corpus(write_corpus(tmp_path / "empty", test="\n  \n"))
    with pytest.raises(ValueError, match="no <unk>"):  # 'ran' cannot map to <unk>: train holds none
        read_corpus(write_corpus(tmp_path / "nounk", train="the cat sat\n"))
    # every word covered: no <unk> needed
    read_corpus(write_corpus(tmp_path / "covered", train="the cat ran\n", valid="ran\n", test="cat\n"))
    for bptt in (0, -1, 1.5):
        with pytest.raises(ValueError, match="bptt must be an integer >= 1"):
            load_corpus(tmp_path / "covered", bptt=bptt)
    with pytest.raises(ValueError, match="too few for one segment of bptt=5"):
        load_corpus(tmp_path / "covered", bptt=5)


def test_tensor_data_takes_token_targets():
    TensorData(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="like x for token sequences"):
        TensorData(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))


# ------------------------------------------------------------------------------------------ KJV builder

BOOKS = (("Ge", 30), ("Exo", 31))  # 61 chapters of 20 verses; the chapter count runs across books


def fake_bible(folder: Path) -> Path:
    """A stand-in for the `bible` program of bible-kjv: prints verses in its format."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "bible"
    script.write_text(f"""#!{sys.executable}
import sys
assert sys.argv[1:] == ["-f", "Gen1:1-Rev22:21"], sys.argv
for book, chapters in {BOOKS!r}:
    for c in range(1, chapters + 1):
        for v in range(1, 21):
            rare = " Mahershalalhashbaz," if (book, c, v) == ("Ge", 1, 1) else ""
            print(f"{{book}}{{c}}:{{v}} And the LORD's servant{{rare}} said, Let there be light: and it was so{{c}}.")
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_kjv_builder_splits_by_chapter_lowercases_and_maps_rare_words(tmp_path):
    out = build_kjv_corpus(tmp_path / "kjv", program=str(fake_bible(tmp_path / "bin")))
    lines = {s: (out / f"{s}.txt").read_text().splitlines() for s in ("train", "valid", "test")}
    # chapters c % 20 == 10 (10, 30, 50) -> valid, c % 20 == 0 (20, 40, 60) -> test; 20 verses each
    assert [len(lines[s]) for s in ("train", "valid", "test")] == [55 * 20, 3 * 20, 3 * 20]
    assert lines["train"][0] == "and the lord's servant <unk> said let there be light and it was so"
    assert lines["valid"][0] == lines["train"][1]
    corpus = read_corpus(out)
    assert "mahershalalhashbaz" not in corpus.vocab and "lord's" in corpus.vocab
    again = build_kjv_corpus(tmp_path / "again", program=str(tmp_path / "bin" / "bible"))
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in ("train.txt", "valid.txt", "test.txt"))


def test_kjv_builder_without_the_program(tmp_path):
    with pytest.raises(FileNotFoundError, match="bible-kjv"):
        build_kjv_corpus(tmp_path / "kjv", program="no-such-bible-program")


# ------------------------------------------------------------------------------------------ perturbations


def test_word_dropout_rate_and_targets():
    x = torch.randint(2, 50, (200, 500))
    y = torch.randint(0, 50, (200, 500))
    xa, ya = A.WordDropout(0.2, num_classes=50)(x, y, torch.Generator().manual_seed(0))
    rate = (xa == 0).double().mean().item()
    assert abs(rate - 0.2) < 0.005  # 100,000 tokens: sd of the rate 0.0013
    assert torch.equal(xa[xa != 0], x[xa != 0]) and ya is y
    assert (x != 0).all()  # the input is not edited in place
    again, _ = A.WordDropout(0.2)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(xa, again)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 2] = True
    assert MF.word_dropout(torch.full((2, 3), 7), mask=mask, unk_index=3).tolist() == [[7, 7, 7], [7, 7, 3]]


def test_token_substitution_rate_and_uniform_replacements():
    vocab = 20
    x = torch.full((200, 500), 5)
    xa, _ = A.TokenSubstitution(0.3, num_classes=vocab)(x, x, torch.Generator().manual_seed(1))
    changed = xa != 5
    assert abs(changed.double().mean().item() - 0.3 * (1 - 1 / vocab)) < 0.006
    counts = torch.bincount(xa[changed], minlength=vocab).double()
    assert counts[5] == 0 and int(xa.max()) < vocab
    others = counts[torch.arange(vocab) != 5]
    assert ((others - others.mean()).abs() < 5 * others.mean().sqrt()).all()  # uniform over the vocabulary
    mask = torch.tensor([[True, False]])
    assert MF.token_substitution(torch.tensor([[1, 2]]), 0.5, 9, mask=mask,
                                 replacement=torch.tensor([[8, 8]])).tolist() == [[8, 2]]


def test_embedding_noise_scale_and_the_model_adds_it():
    x = torch.randint(0, 30, (64, 50))
    xa, ya, context = A.EmbeddingNoise(0.3, dim=16).draw(x, x, torch.Generator().manual_seed(2))
    assert xa is x and ya is x and context.noise.shape == (64, 50, 16)
    noise = context.noise
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.3) < 0.01
    model = LSTMLanguageModel(30, dim=16, dropout=0.0).eval()
    with torch.no_grad():
        out, _ = model.lstm(model.embedding(x[:4]) + noise[:4])
        with MF.enter(model, context.rows(torch.arange(4))):
            assert torch.allclose(model(x[:4]), model.classifier(out), atol=1e-6)
        assert not model.embedding._forward_hooks  # the hook is gone after the block
        with MF.enter(model, MF.embedding_noise(x[:4], 0.0, 16)):
            assert torch.allclose(model(x[:4]), model(x[:4]), atol=1e-6)


def test_token_augmentations_reject_bad_inputs():
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="integer token ids"):
        A.WordDropout(0.1)(ids.float(), ids)
    with pytest.raises(ValueError, match=r"next-token ids of x"):
        A.WordDropout(0.1)(ids, ids[:, :4])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        A.TokenSubstitution(0.1, num_classes=5)(ids + 5, ids)
    with pytest.raises(ValueError, match="needs num_classes"):
        A.TokenSubstitution(0.1)
    with pytest.raises(ValueError, match="unk_index=12"):
        A.WordDropout(0.1, unk_index=12, num_classes=10)
    with pytest.raises(ValueError, match="cannot be combined"):
        A.Compose([A.WordDropout(0.1), A.Cutout(2)])
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="p must be a probability"):
            A.WordDropout(p)


# ------------------------------------------------------------------------------------------ MaxUp over segments


class Copies(A.TokenAugmentation):
    """Copy j is copies[j]: known inputs, one per call."""

    def __init__(self, copies):
        super().__init__()
        self.copies, self.calls = copies, 0

    def apply(self, x, y, generator):
        out = self.copies[self.calls % len(self.copies)]
        self.calls += 1
        return out, y


def segment_losses(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)


@pytest.mark.parametrize("mode", ["select", "direct"])
def test_maxup_picks_per_segment_the_copy_with_the_highest_mean_token_loss(mode):
    torch.manual_seed(0)
    model = LSTMLanguageModel(12, dim=8, dropout=0.0)
    x, y = torch.randint(0, 12, (6, 7)), torch.randint(0, 12, (6, 7))
    copies = [torch.randint(0, 12, (6, 7)) for _ in range(3)]
    with torch.no_grad():
        losses = torch.stack([segment_losses(model, c, y) for c in copies])  # (m, B)
    pick = losses.argmax(0)
    assert len(set(pick.tolist())) > 1  # the worst copy differs by segment
    result = MaxUp(Copies(copies), m=3, mode=mode)(model, x, y)
    assert torch.allclose(result.losses, losses.max(0).values, atol=1e-5)
    assert torch.allclose(result.loss, losses.max(0).values.mean(), atol=1e-5)
    if mode == "select":
        assert torch.equal(result.inputs, torch.stack(copies)[pick, torch.arange(6)])
        assert torch.equal(result.targets, y)


def test_sequence_cross_entropy_is_the_mean_token_loss_per_segment():
    logits, y = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    rows = MF.soft_cross_entropy(logits, y, reduction="none")
    assert torch.allclose(rows, F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1))
    assert torch.allclose(MF.soft_cross_entropy(logits, F.one_hot(y, 7).float(), reduction="none"), rows)
    with pytest.raises(ValueError, match="do not match logits"):
        MF.soft_cross_entropy(logits, y[:, :4])


def test_method_specs_build_for_language_models():
    model = LSTMLanguageModel(20, dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 20, (4, 6))
    for spec in ["maxup(m=4)+embed_noise(sigma=0.1)", "maxup(m=2)+word_dropout(p=0.1)+token_sub(p=0.1)+embed_noise",
                 "sam(rho=0.05)+maxup(m=2)+embed_noise", "token_sub(p=0.2)"]:
        step = M.build_step(spec, model=model, optimizer=opt, num_classes=20)
        result = step(model, x, y, torch.Generator().manual_seed(0))
        assert math.isfinite(result.loss.item()) and result.logits.shape == (4, 6, 20)
    with pytest.raises(ValueError, match="embed_noise needs a model"):
        M.build_step("maxup+embed_noise", model=torch.nn.Linear(3, 3), optimizer=opt, num_classes=20)
    clean = M.build_step("maxup(m=2, include_clean=true)+embed_noise", model=model, optimizer=opt,
                         num_classes=20)(model, x, y)  # the clean copy enters a blank (zero) noise context
    assert math.isfinite(clean.loss.item()) and clean.context.noise.shape == (4, 6, 8)


# ------------------------------------------------------------------------------------------ perplexity


def test_perplexity_is_exp_of_the_mean_token_loss():
    torch.manual_seed(0)
    model = LSTMLanguageModel(15, dim=8, dropout=0.5)
    data = TensorData(torch.randint(0, 15, (9, 6)), torch.randint(0, 15, (9, 6)))
    metrics = evaluate(model, data, batch_size=4, num_classes=15)
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(data.x).flatten(0, 1), data.y.flatten()).item()
        accuracy = (model(data.x).argmax(-1) == data.y).double().mean().item()
    assert model.training is False and metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert perplexity(math.log(50.0)) == pytest.approx(50.0) and perplexity(1e4) == math.inf


# ------------------------------------------------------------------------------------------ command line


def words_corpus(root: Path) -> Path:
    """About 3,000 tokens of a toy language with some structure."""
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)]

    def text(n):
        lines = []
        for _ in range(n):
            start = int(torch.randint(0, 30, (1,), generator=g))
            lines.append(" ".join(words[(start + 3 * k) % 30] for k in range(8)))
        return "\n".join(lines) + "\n<unk> w1\n"

    return write_corpus(root, text(300), text(20), text(20))


TINY = ["--epochs", "1", "--batch-size", "16", "--bptt", "10", "--model-opt", "dim=8", "--no-progress"]


def test_lm_command_writes_a_run_directory_with_perplexity(tmp_path, capsys):
    corpus = words_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    tiny = ["dim=32" if a == "dim=8" else a for a in TINY]  # a --model-opt key is given once
    argv = ["lm", "--corpus", str(corpus), "--method", "maxup(m=2)+embed_noise(sigma=0.1)", "--out", str(run), *tiny,
            "--epochs", "3", "--lr", "0.03"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "valid perplexity" in printed and "test perplexity" in printed
    assert {"config.yaml", "metrics.csv", "metrics.jsonl", "model.pt", "checkpoints"} <= {p.name for p in run.iterdir()}
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["test_perplexity"] == pytest.approx(math.exp(record["test_loss"]))
    assert record["val_perplexity"] < 20  # uniform over the 32 words would be 32
    assert "task: lm" in (run / "config.yaml").read_text()
    assert main(argv + ["--resume"]) == 0  # finished: nothing more to train
    assert main(argv) == 2 and "--resume" in capsys.readouterr().err


def test_compare_accepts_the_lm_task(tmp_path, capsys):
    corpus = words_corpus(tmp_path / "corpus")
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "lm", "--corpus", str(corpus), "--methods", "erm,maxup(m=2)+word_dropout(p=0.1)",
                 "--seeds", "2", "--out", str(out), *TINY]) == 0
    assert "| maxup(m=2)+word_dropout(p=0.1) |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    for row in results["summary"]:
        finals = torch.tensor([h[-1]["test_perplexity"] for h in results["runs"][row["method"]]], dtype=torch.float64)
        assert row["test_perplexity"] == pytest.approx(finals.mean().item())
    config = (out / "erm" / "seed-1" / "config.yaml").read_text()
    assert "optimizer: adamw" in config and "batch_size: 16" in config  # the LM defaults, and the options given
    assert (out / "results.png").stat().st_size > 0
    assert "eval_tokens" not in config  # set only when given: runs saved before the option resume unchanged
    cut = tmp_path / "cut"
    assert main(["compare", "--task", "lm", "--corpus", str(corpus), "--methods", "erm", "--eval-tokens", "21",
                 "--out", str(cut), *TINY]) == 0
    assert "eval_tokens: 21" in (cut / "erm" / "seed-0" / "config.yaml").read_text()
    assert "valid and test cut to 21 tokens" in json.loads((cut / "results.json").read_text())["budget"]


def test_lm_corpus_command_and_kjv_on_first_use(tmp_path, monkeypatch, capsys):
    fake_bible(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(tmp_path / "bin") + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("MAXUP_DATA", str(tmp_path / "data"))
    assert main(["lm-corpus", "--out", str(tmp_path / "kjv")]) == 0
    assert "vocabulary" in capsys.readouterr().out and (tmp_path / "kjv" / "test.txt").exists()
    monkeypatch.chdir(tmp_path / "bin")  # no folder named kjv here: --corpus kjv builds into $MAXUP_DATA/kjv
    assert main(["lm", "--corpus", "kjv", *TINY]) == 0
    assert (tmp_path / "data" / "kjv" / "train.txt").read_text() == (tmp_path / "kjv" / "train.txt").read_text()


@pytest.mark.parametrize("argv, message", [
    (["lm", "--corpus", "/nonexistent/corpus"], "does not exist"),
    (["lm", "--bptt", "0"], "argument --bptt: must be an integer >= 1"),
    (["lm", "--method", "maxup+cutout"], "cutout works on images"),
    (["lm", "--method", "maxup(m=4)"], "MaxUp needs a random augmentation"),
    (["lm", "--method", "gradaug+word_dropout"], "gradaug is not available for language models"),
    (["compare", "--task", "lm", "--methods", "erm,mixup"], "mixup works on images"),
    (["lm", "--model-opt", "width=3"], "unknown model option(s) 'width'"),
    (["lm", "--eval-tokens", "0"], "argument --eval-tokens: must be an integer >= 1"),
    (["compare", "--dataset", "digits", "--methods", "erm", "--eval-tokens", "50"],
     "--eval-tokens is an option of language modelling"),
])
def test_lm_bad_input_is_a_clear_error(argv, message, tmp_path, capsys):
    corpus = ["--corpus", str(words_corpus(tmp_path / "c"))] if "--corpus" not in argv else []
    assert main([argv[0], *TINY, *argv[1:], *corpus, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("maxup: error:") and message in err


def test_lm_run_summary_shows_the_epochs_without_evaluation(capsys):
    from maxup.cli.tasks import LM

    history = [{"epoch": 1, "train_loss": 5.0, "train_time": 2.0},
               {"epoch": 2, "train_loss": 4.0, "train_time": 2.0, "val_perplexity": 90.0, "test_perplexity": 95.0,
                "time": 3.0}]
    LM.print_run({"method": "erm", "corpus": "kjv"}, history)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "epoch 1: train loss 5.0000  (2 s)"
    assert lines[1] == "epoch 2: train loss 4.0000  valid perplexity 90.00  test perplexity 95.00  (2 s)"
    assert LM.describe("erm", 0, history[-1]) == "erm seed 0: test perplexity 95.00 (last epoch 3 s)"
