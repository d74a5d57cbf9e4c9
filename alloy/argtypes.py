"""argparse types shared by the commands: bad values are refused by argparse (usage line, exit 2) before any work."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer of at least 1 (token counts, batch sizes, threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def device(text: str) -> str:
    """cpu, cuda or cuda:N (whether that GPU is there is checked when the command starts)."""
    from merging.engine import DEVICE_RE  # merge's own rule, one pattern for every command

    if not DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cpu, cuda or cuda:N")
    return text


def add_model_source_options(p: argparse.ArgumentParser) -> None:
    """Where `base+adapter` references are merged and hub ids downloaded (mergekit's names for both)."""
    p.add_argument("--lora-merge-cache", default=None, metavar="DIR",
                   help="where `base+adapter` models are merged into full checkpoints once and reused "
                        "(default: ~/.cache/alloy/lora, or $XDG_CACHE_HOME/alloy/lora)")
    p.add_argument("--transformers-cache", default=None, metavar="DIR",
                   help="download hub ids into DIR instead of huggingface_hub's cache")
