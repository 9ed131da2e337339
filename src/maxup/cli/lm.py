"""Word-level language modelling: ``maxup lm``, ``maxup lm-corpus`` and ``maxup compare --task lm``.

    maxup lm-corpus --out data/kjv                    # the King James Bible as train/valid/test.txt
    maxup lm --corpus data/kjv --method "maxup(m=4)+embed_noise(sigma=0.1)" --out runs/lm
    maxup compare --task lm --corpus data/kjv --methods "erm,maxup(m=4)+word_dropout(p=0.1)" --seeds 3

A corpus is a folder in the PTB / WikiText layout (see :mod:`maxup.data.text`); ``--corpus
kjv`` builds the King James Bible on first use. The model is :class:`LSTMLanguageModel`;
runs write the same run directory as image training, with ``val_perplexity`` and
``test_perplexity`` in ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import torch

from .. import methods as M
from ..data.text import build_kjv_corpus, kjv_corpus, load_corpus, read_corpus
from ..models import LSTMLanguageModel
from ..train import fit
from .run import (POSITIVE_INT, _is_main, _key_value, add_optim_options, add_run_dir_options, check_run_dir,
                  comparison_specs, fill_task_defaults, report, run_comparison, with_budget)

#: the optimisation defaults of language modelling (the image ones are in run.IMAGE_DEFAULTS)
LM_DEFAULTS = {"epochs": 3, "batch_size": 32, "optimizer": "adamw", "lr": 5e-3, "weight_decay": 0.01,
               "max_grad_norm": 0.5}
LM_KEYS = ("corpus", "bptt", "train_tokens", "model_opt", "epochs", "batch_size", "optimizer", "lr", "momentum",
           "weight_decay", "warmup_epochs", "amp", "max_grad_norm", "device")
DEFAULT_LM_METHODS = ["erm", "embed_noise(sigma=0.1)", "maxup(m=4)+embed_noise(sigma=0.1)", "word_dropout(p=0.1)",
                      "maxup(m=4)+word_dropout(p=0.1)"]
SUMMARY_KEYS = ("test_perplexity", "val_perplexity", "test_loss", "test_accuracy", "clean_train_perplexity")
#: the method terms that perturb token sequences (maxup.augment.text)
LM_AUGMENTS = ("embed_noise", "word_dropout", "token_sub")


def add_corpus_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus (language modelling)")
    g.add_argument("--corpus", default="kjv",
                   help="folder with train.txt, valid.txt and test.txt (one sentence per line, PTB / WikiText "
                        "layout), or 'kjv': the King James Bible, built on first use into $MAXUP_DATA/kjv or "
                        "~/.cache/maxup/kjv from the Debian packages bible-kjv and bible-kjv-text (default: kjv)")
    g.add_argument("--bptt", type=POSITIVE_INT, default=35, help="tokens per segment (truncated back-propagation through "
                                                        "time; default: 35)")
    g.add_argument("--train-tokens", type=POSITIVE_INT, default=None, help="use only the first N training tokens (quick runs)")


def add_parsers(sub) -> None:
    """The ``lm`` and ``lm-corpus`` commands."""
    p = sub.add_parser("lm", help="train a word-level LSTM language model with one method; reports perplexity",
                       description="Train an LSTM language model with one method; prints valid and test "
                                   "perplexity per epoch and writes metrics, config and checkpoints into --out.")
    add_corpus_options(p)
    g = p.add_argument_group("model")
    g.add_argument("--model-opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="LSTM option, repeatable: dim (default 200), layers (2), dropout (0.2), tie_weights (true)")
    add_optim_options(p)
    p.set_defaults(**LM_DEFAULTS)
    p.add_argument("--method", default="erm",
                   help="method spec, e.g. 'maxup(m=4)+embed_noise(sigma=0.1)' (default: erm); perturbations: "
                        "embed_noise(sigma), word_dropout(p), token_sub(p)")
    add_run_dir_options(p)

    p = sub.add_parser("lm-corpus", help="write the King James Bible as a language-modelling corpus",
                       description="Write the King James Bible (the `bible` program of the Debian packages "
                                   "bible-kjv and bible-kjv-text) as train.txt, valid.txt and test.txt: one verse "
                                   "per line, lower-cased, punctuation removed, chapters split 90/5/5 "
                                   "deterministically, rare words as <unk>.")
    p.add_argument("--out", default=None, help="output folder (default: the one `maxup lm --corpus kjv` reads, "
                                               "$MAXUP_DATA/kjv or ~/.cache/maxup/kjv)")
    p.add_argument("--min-count", type=int, default=3,
                   help="words seen fewer times in the training split become <unk> (default: 3)")


def corpus_folder(corpus: str) -> Path:
    """The folder of ``--corpus``: a path, or ``kjv`` (built on first use) when no such folder exists."""
    path = Path(corpus)
    if str(corpus) == "kjv" and not path.is_dir():
        return kjv_corpus()
    return path


def lm_model(vocab_size: int, options: dict) -> LSTMLanguageModel:
    """The LSTM language model with ``--model-opt`` options, checked by name."""
    valid = [k for k in inspect.signature(LSTMLanguageModel).parameters if k != "vocab_size"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(map(repr, unknown))} for the LSTM language model; "
                         f"valid options: {', '.join(valid)}")
    return LSTMLanguageModel(vocab_size, **options)


def lm_method(spec: str) -> str:
    """``spec`` in canonical form, checked for language modelling: token perturbations only (one at least
    under MaxUp), and of the steps only SAM / ASAM."""
    terms = M.parse(spec)
    augments = [t.name for t in terms if M.REGISTRY[t.name].kind == "augment"]
    other = [name for name in augments if name not in LM_AUGMENTS]
    if other:
        raise ValueError(f"method {spec!r}: {', '.join(other)} works on images or features; language models take "
                         f"the token perturbations {', '.join(LM_AUGMENTS)}")
    steps = [t.name for t in terms if M.REGISTRY[t.name].kind == "step" and t.name not in M.SAM_TERMS]
    if steps:
        raise ValueError(f"method {spec!r}: {', '.join(steps)} is not available for language models "
                         f"(of the steps, {' and '.join(M.SAM_TERMS)} are)")
    return M.canonical(spec)


def lm_config(args, method: str, seed: int) -> dict:
    config = {"task": "lm", **{k: getattr(args, k) for k in LM_KEYS}}
    config["model_opt"] = dict(config["model_opt"])
    config["method"] = lm_method(method)
    config["seed"] = seed
    return config


def run_lm(config: dict, *, out_dir=None, resume: bool = False, progress=None, splits=None) -> list[dict]:
    """Train one language-modelling configuration (the keys of :data:`LM_KEYS`, ``method``, ``seed``)."""
    if splits is None:
        splits = load_corpus(corpus_folder(config["corpus"]), bptt=config["bptt"], train_tokens=config["train_tokens"])
    torch.manual_seed(config["seed"])
    model = lm_model(splits.num_classes, config["model_opt"])
    return fit(model, config["method"], train=splits.train, test=splits.test, val=splits.val, epochs=config["epochs"],
               batch_size=config["batch_size"], lr=config["lr"], optimizer=config["optimizer"],
               momentum=config["momentum"], weight_decay=config["weight_decay"],
               warmup_epochs=config["warmup_epochs"], seed=config["seed"], device=config["device"], out_dir=out_dir,
               amp=config["amp"], max_grad_norm=config["max_grad_norm"], num_classes=splits.num_classes,
               progress=progress, resume=resume, config=config)


def lm(args) -> list[dict]:
    """``maxup lm``: one method, one seed."""
    config = lm_config(args, args.method, args.seed)
    check_run_dir(args)
    history = run_lm(config, out_dir=args.out, resume=args.resume, progress=args.progress)
    if _is_main() and history:
        for r in history:
            print(f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}  valid perplexity {r['val_perplexity']:.2f}  "
                  f"test perplexity {r['test_perplexity']:.2f}  ({r['train_time']:.0f} s)")
        last = history[-1]
        print(f"{config['method']} on {config['corpus']}, epoch {last['epoch']}: valid perplexity "
              f"{last['val_perplexity']:.2f}, test perplexity {last['test_perplexity']:.2f}")
        if args.out:
            print(f"run directory: {args.out}")
    return history


def lm_corpus(args) -> Path:
    """``maxup lm-corpus``: build the KJV corpus and print its size."""
    out = build_kjv_corpus(args.out, min_count=args.min_count) if args.out else \
        kjv_corpus(min_count=args.min_count, rebuild=True)
    corpus = read_corpus(out)
    print(f"wrote {out}: vocabulary {len(corpus.vocab)} words; tokens (with <eos>): train {len(corpus.train)}, "
          f"valid {len(corpus.valid)}, test {len(corpus.test)}")
    return out


# ------------------------------------------------------------------------------------------ compare


#: the columns of the language-model comparison table (see :func:`maxup.cli.run.table`)
LM_COLUMNS = (("test perplexity", "test_perplexity", 1.0, 2), ("valid perplexity", "val_perplexity", 1.0, 2),
              ("best valid epoch", "best_val_epoch", 1.0, 1),
              ("test perplexity at best valid", "test_perplexity_at_best_val", 1.0, 2),
              ("clean train perplexity", "clean_train_perplexity", 1.0, 2), ("test accuracy (%)", "test_accuracy", 100.0, 2))


def compare_lm(args) -> list[dict]:
    """``maxup compare --task lm``: every method with every seed on one corpus, under the same budget."""
    fill_task_defaults(args, {**LM_DEFAULTS, "train_size": None})
    specs = comparison_specs(args, args.methods or DEFAULT_LM_METHODS, with_budget(lm_method))
    out = Path(args.out)
    splits = load_corpus(corpus_folder(args.corpus), bptt=args.bptt, train_tokens=args.train_tokens)
    start = time.perf_counter()
    budget = (f"{splits.name} (vocabulary {splits.num_classes}, {len(splits.train)} training segments of {args.bptt} "
              f"tokens), LSTM {dict(args.model_opt) or 'defaults'}, {args.epochs} epochs, batch {args.batch_size}, "
              f"{args.optimizer} lr {args.lr}, seeds 0..{args.seeds - 1}")
    results, missing = run_comparison(
        args, specs, lambda spec, seed: lm_config(args, spec, seed), run_lm, lambda seed: splits,
        lambda spec, seed, last: f"{spec} seed {seed}: test perplexity {last['test_perplexity']:.2f}", budget)
    return report(results, out, budget, start, title="maxup compare --task lm", keys=SUMMARY_KEYS, columns=LM_COLUMNS,
                  missing=missing, key="test_perplexity", curve_key="val_perplexity", scale=1.0, label="test perplexity",
                  curve_label="valid perplexity")
