"""Loading a checkpoint folder's tokenizer and model with transformers: quietly, and with one-line errors.

Shared by the commands that run a model (quant-check, gram, eval): a folder without tokenizer files is named in one
line before any model is loaded, and transformers' per-tensor "Loading weights" bar stays off the terminal (the
commands print their own summary; in logs and pipes its carriage-return redraws are noise)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from merging.errors import InputError

# What AutoTokenizer can build a tokenizer from: a fast tokenizer's serialisation, a sentencepiece or tiktoken model,
# or BPE/WordPiece vocabularies.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off for the duration (restored after)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_tokenizer_files(model_dir: str | Path) -> None:
    """InputError naming the folder when it holds no tokenizer files at all (a weights-only copy of a model)."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"{model_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); copy the "
                         "tokenizer of the model it was made from into the folder")  # fmt: skip


def load_tokenizer(model_dir: str | Path):
    """The folder's tokenizer (local files only); InputError naming the folder when it has none or it cannot load."""
    from transformers import AutoTokenizer

    from merging.loading import LOAD_LOCK

    check_tokenizer_files(model_dir)
    try:
        with LOAD_LOCK, quiet_transformers():
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"{model_dir}: cannot load its tokenizer with transformers ({msg})") from None
