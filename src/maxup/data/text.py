"""Word-level corpora for language modelling (Penn Treebank / WikiText layout), and the KJV builder.

A corpus is a folder holding ``train.txt``, ``valid.txt`` and ``test.txt`` (or the
``ptb.train.txt`` / ``wiki.train.tokens`` names of the PTB and WikiText downloads): one sentence
per line, words separated by spaces. Every non-blank line ends with an ``<eos>`` token
(blank lines are skipped). The vocabulary comes from the training split: ``<unk>`` (index
0), ``<eos>`` (index 1), then the words by decreasing count (ties alphabetical). Words of
the validation or test split that the training split lacks become ``<unk>``, which the
training split must then contain (rare words mapped to ``<unk>``, as in PTB and WikiText).

Batching is by fixed segments for truncated back-propagation through time: a split's
token stream is cut into consecutive segments of ``bptt`` tokens; the input of segment i
is ``tokens[i*bptt : (i+1)*bptt]`` and its target the same window shifted by one token.
Segments are independent samples (each starts from a zero LSTM state), so the in-memory
:class:`~maxup.data.Loader` shuffles and batches them like images; the last
``< bptt`` tokens of a split are left out. Perplexities measured on independent segments
are higher than those of stateful evaluation, which carries the LSTM state across segments
(as PTB and WikiText papers report).

>>> corpus = read_corpus("data/kjv")                      # doctest: +SKIP
>>> splits = load_corpus("data/kjv", bptt=35)             # doctest: +SKIP
>>> splits.train.x.shape, splits.num_classes              # doctest: +SKIP
(torch.Size([21192, 35]), 6629)
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_int
from .core import DataSplits, TensorData

__all__ = ["Corpus", "EOS", "UNK", "build_kjv_corpus", "kjv_corpus", "load_corpus", "read_corpus", "segments"]

UNK, EOS = "<unk>", "<eos>"
SPLIT_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
_OTHER_NAMES = ("ptb.{}.txt", "wiki.{}.tokens")  # the PTB and WikiText downloads


def _split_file(root: Path, split: str) -> Path:
    for name in (SPLIT_FILES[split], *(n.format(split) for n in _OTHER_NAMES)):
        if (root / name).is_file():
            return root / name
    return root / SPLIT_FILES[split]


@dataclass(eq=False)
class Corpus:
    """A corpus read into memory: the vocabulary and each split as a 1-D int64 token stream."""

    vocab: list[str]
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    name: str = "corpus"

    def __repr__(self) -> str:
        return (f"Corpus(name={self.name!r}, vocab={len(self.vocab)}, train={len(self.train)}, "
                f"valid={len(self.valid)}, test={len(self.test)} tokens)")


def _read_lines(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a corpus folder needs train.txt, valid.txt and test.txt "
                                "(one sentence per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}): save the corpus as UTF-8") from None
    lines = [line.split() for line in text.splitlines()]
    lines = [words for words in lines if words]
    if not lines:
        raise ValueError(f"{path} is empty: every split needs at least one non-blank line")
    return lines


def read_corpus(path: str | os.PathLike) -> Corpus:
    """Read ``train.txt``, ``valid.txt`` and ``test.txt`` from ``path`` (see the module notes).

    Raises:
        FileNotFoundError: the folder or one of the three files is missing.
        ValueError: an empty split, or validation/test words outside the training vocabulary
            while the training split holds no ``<unk>`` to map them to.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist (it needs train.txt, valid.txt and test.txt)")
    files = {split: _split_file(root, split) for split in SPLIT_FILES}
    lines = {split: _read_lines(path) for split, path in files.items()}
    counts = Counter(w for words in lines["train"] for w in words)
    counts.pop(UNK, None)
    counts.pop(EOS, None)
    vocab = [UNK, EOS] + sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    has_unk = any(UNK in words for words in lines["train"])
    streams = {}
    for split, split_lines in lines.items():
        missing = sorted({w for words in split_lines for w in words if w not in index})
        if missing and not has_unk:
            raise ValueError(
                f"{files[split]} holds {len(missing)} word(s) that the training split lacks (e.g. "
                f"{', '.join(repr(w) for w in missing[:3])}) and it holds no {UNK} to stand for them: "
                f"replace rare words by {UNK} in every split (as maxup lm-corpus does)")
        ids = [index.get(w, 0) for words in split_lines for w in (*words, EOS)]
        streams[split] = torch.tensor(ids, dtype=torch.int64)
    return Corpus(vocab, streams["train"], streams["valid"], streams["test"], name=root.name)


def segments(tokens: torch.Tensor, bptt: int, *, name: str = "tokens") -> TensorData:
    """Cut a 1-D token stream into ``(N, bptt)`` inputs and next-token targets, in order.

    ``x[i] = tokens[i*bptt : (i+1)*bptt]`` and ``y[i] = tokens[i*bptt + 1 : (i+1)*bptt + 1]``.

    >>> d = segments(torch.arange(8), 3)
    >>> d.x.tolist(), d.y.tolist()
    ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]])
    """
    bptt = check_int("bptt", bptt)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise ValueError(f"{name} must be a 1-D integer tensor of token ids")
    n = (len(tokens) - 1) // bptt
    if n < 1:
        raise ValueError(f"{name} holds {len(tokens)} tokens, too few for one segment of bptt={bptt} "
                         f"(needs bptt + 1 = {bptt + 1}): use a smaller bptt")
    x = tokens[: n * bptt].view(n, bptt)
    y = tokens[1: n * bptt + 1].view(n, bptt)
    return TensorData(x.clone(), y.clone())


def load_corpus(path: str | os.PathLike, *, bptt: int = 35, train_tokens: int | None = None,
                eval_tokens: int | None = None) -> DataSplits:
    """A corpus folder as :class:`DataSplits` of segments (``val`` is ``valid.txt``).

    ``num_classes`` is the vocabulary size, ``classes`` the vocabulary, ``input_shape``
    ``(bptt,)``. ``train_tokens`` keeps only the first N training tokens (quick runs);
    ``eval_tokens`` only the first N tokens of the valid and of the test split (cheaper
    evaluation on a CPU; perplexities then describe that prefix).
    """
    bptt = check_int("bptt", bptt)
    corpus = read_corpus(path)
    train, valid, test = corpus.train, corpus.valid, corpus.test
    if train_tokens is not None:
        train = train[: check_int("train_tokens", train_tokens, minimum=2)]
    if eval_tokens is not None:
        n = check_int("eval_tokens", eval_tokens, minimum=2)
        valid, test = valid[:n], test[:n]
    return DataSplits(
        train=segments(train, bptt, name=f"{corpus.name} train split"),
        val=segments(valid, bptt, name=f"{corpus.name} valid split"),
        test=segments(test, bptt, name=f"{corpus.name} test split"),
        num_classes=len(corpus.vocab), input_shape=(bptt,), name=corpus.name, mean=None, std=None,
        classes=corpus.vocab)


# ------------------------------------------------------------------------------------ the KJV corpus

KJV_PACKAGES = "bible-kjv bible-kjv-text"
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+)\s*(.*)$")
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")


def _kjv_verses(program: str) -> list[tuple[tuple[str, str], str]]:
    """``((book, chapter), text)`` for every verse printed by ``bible -f "Gen1:1-Rev22:21"``."""
    exe = shutil.which(program)
    if exe is None:
        raise FileNotFoundError(f"the {program!r} program is not installed: install the Debian packages "
                                f"{KJV_PACKAGES} (apt-get install {KJV_PACKAGES})")
    try:
        out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True,
                             env={**os.environ, "COLUMNS": "100000"}).stdout
    except subprocess.CalledProcessError as err:
        raise ValueError(f"{program} failed (exit status {err.returncode}): {err.stderr.strip()[:200]}") from None
    verses: list[tuple[tuple[str, str], str]] = []
    for line in out.splitlines():
        match = _VERSE.match(line)
        if match:
            verses.append(((match[1], match[2]), match[4]))
        elif line.strip() and verses:  # a wrapped verse continues on the next line
            verses[-1] = (verses[-1][0], verses[-1][1] + " " + line.strip())
    if len(verses) < 1000:
        raise ValueError(f"{program} printed {len(verses)} verses, expected about 31,102: is {KJV_PACKAGES} complete?")
    return verses


def build_kjv_corpus(out_dir: str | os.PathLike, *, min_count: int = 3, program: str = "bible") -> Path:
    """Write the King James Bible as a PTB-style corpus (train/valid/test.txt) into ``out_dir``.

    Needs the ``bible`` program of the Debian packages ``bible-kjv`` and ``bible-kjv-text``.
    One verse per line; verse references are dropped; text is lower-cased and a word is a
    run of letters with inner apostrophes or hyphens (``king's``, ``loving-kindness``), all
    other characters (punctuation, a trailing apostrophe) removed. The split is by chapter,
    counted 1..1189 from Genesis 1: chapters ``c % 20 == 10`` go to valid, ``c % 20 == 0`` to
    test, the rest (90%) to train. Words seen fewer than ``min_count`` times in train become
    ``<unk>`` in every split. The result is the same on every machine.
    """
    min_count = check_int("min_count", min_count)
    chapters: dict[tuple[str, str], int] = {}
    split_lines: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for key, text in _kjv_verses(program):
        c = chapters.setdefault(key, len(chapters) + 1)
        split = "test" if c % 20 == 0 else "valid" if c % 20 == 10 else "train"
        split_lines[split].append(_WORD.findall(text.lower()))
    counts = Counter(w for words in split_lines["train"] for w in words)
    keep = {w for w, n in counts.items() if n >= min_count}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, lines in split_lines.items():
        text = "\n".join(" ".join(w if w in keep else UNK for w in words) for words in lines if words) + "\n"
        tmp = out / (SPLIT_FILES[split] + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / SPLIT_FILES[split])
    return out


def kjv_corpus(root: str | os.PathLike | None = None, *, min_count: int = 3, rebuild: bool = False) -> Path:
    """The folder of the KJV corpus, built on first use (or with ``rebuild``): ``root``/kjv
    (``kjv-minN`` for another ``min_count``), where ``root`` defaults to ``$MAXUP_DATA`` or
    ``~/.cache/maxup``."""
    min_count = check_int("min_count", min_count)
    if root is None:
        root = os.environ.get("MAXUP_DATA") or Path.home() / ".cache" / "maxup"
    folder = Path(root) / ("kjv" if min_count == 3 else f"kjv-min{min_count}")
    if rebuild or not all((folder / name).is_file() for name in SPLIT_FILES.values()):
        build_kjv_corpus(folder, min_count=min_count)
    return folder
