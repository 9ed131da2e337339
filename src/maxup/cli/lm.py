"""Word-level language modelling: ``maxup lm``, ``maxup lm-corpus`` (``maxup compare --task lm`` is
:mod:`maxup.cli.comparison` on the same task).

    maxup lm-corpus --out data/kjv                    # the King James Bible as train/valid/test.txt
    maxup lm --corpus data/kjv --method "maxup(m=4)+embed_noise(sigma=0.1)" --out runs/lm
    maxup compare --task lm --corpus data/kjv --methods "erm,maxup(m=4)+word_dropout(p=0.1)" --seeds 3

A corpus is a folder in the PTB / WikiText layout (see :mod:`maxup.data.text`); ``--corpus
kjv`` builds the King James Bible on first use. The model is :class:`LSTMLanguageModel`;
runs write the same run directory as image training, with ``val_perplexity`` and
``test_perplexity`` in ``metrics.jsonl``. What is particular to language modelling (defaults,
data, model, metrics) is :class:`maxup.cli.tasks.LMTask`; ``maxup lm`` is :func:`maxup.cli.run.train`
on it.
"""
from __future__ import annotations

from pathlib import Path

from ..data.text import SPLIT_FILES, build_kjv_corpus, kjv_corpus, read_corpus
from .files import check_writable
from .options import add_corpus_options, add_model_opt, add_optim_options, add_run_dir_options
from .run import train
from .tasks import LM

#: the files ``maxup lm-corpus`` writes (and the temporary names it writes them under)
CORPUS_FILES = frozenset(n for name in SPLIT_FILES.values() for n in (name, name + ".tmp"))


def add_parsers(sub) -> None:
    """The ``lm`` and ``lm-corpus`` commands."""
    p = sub.add_parser("lm", help="train a word-level LSTM language model with one method; reports perplexity",
                       description="Train an LSTM language model with one method; prints valid and test "
                                   "perplexity per epoch and writes metrics, config and checkpoints into --out.")
    add_corpus_options(p)
    g = p.add_argument_group("model")
    add_model_opt(g, "LSTM option, repeatable: dim (default 200), layers (2), dropout (0.2), tie_weights (true)")
    add_optim_options(p, LM.defaults)
    p.add_argument("--method", default="erm",
                   help="method spec, e.g. 'maxup(m=4)+embed_noise(sigma=0.1)' (default: erm); perturbations: "
                        "embed_noise(sigma), word_dropout(p), token_sub(p)")
    add_run_dir_options(p)
    p.set_defaults(func=train, task=LM.name)

    p = sub.add_parser("lm-corpus", help="write the King James Bible as a language-modelling corpus",
                       description="Write the King James Bible (the `bible` program of the Debian packages "
                                   "bible-kjv and bible-kjv-text) as train.txt, valid.txt and test.txt: one verse "
                                   "per line, lower-cased, punctuation removed, chapters split 90/5/5 "
                                   "deterministically, rare words as <unk>.")
    p.add_argument("--out", default=None, help="output folder (default: the one `maxup lm --corpus kjv` reads, "
                                               "$MAXUP_DATA/kjv or ~/.cache/maxup/kjv)")
    p.add_argument("--min-count", type=int, default=3,
                   help="words seen fewer times in the training split become <unk> (default: 3)")
    p.add_argument("--force", action="store_true",
                   help="write into an --out that holds other files (its train.txt, valid.txt and test.txt are "
                        "replaced, the other files left as they are)")
    p.set_defaults(func=lm_corpus)


def check_corpus_out(out, *, force: bool) -> None:
    """Refuse an ``--out`` for ``lm-corpus`` that is a file, cannot be written, or holds files other than a corpus
    that ``lm-corpus`` wrote (unless ``force``)."""
    out = Path(out)
    check_writable(out, "the corpus")
    if force or not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in CORPUS_FILES)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ValueError(f"--out {out} holds other files ({shown}): lm-corpus writes train.txt, valid.txt and "
                         "test.txt there; choose an empty folder, or pass --force to write into it anyway")


def lm_corpus(args) -> Path:
    """``maxup lm-corpus``: build the KJV corpus and print its size."""
    if args.out:
        check_corpus_out(args.out, force=args.force)
        out = build_kjv_corpus(args.out, min_count=args.min_count)
    else:
        out = kjv_corpus(min_count=args.min_count, rebuild=True)
    corpus = read_corpus(out)
    print(f"wrote {out}: vocabulary {len(corpus.vocab)} words; tokens (with <eos>): train {len(corpus.train)}, "
          f"valid {len(corpus.valid)}, test {len(corpus.test)}")
    return out
