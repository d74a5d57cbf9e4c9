"""`alloy merge CONFIG.yml OUT_DIR`: the engine from the shell."""

from __future__ import annotations

import argparse
import re
import sys

from alloy.argtypes import add_model_source_options
from merging.errors import ConfigError

# mergekit's --out-shard-size reads K, M and B as thousand, million and billion ("5B", its default, is 5e9 bytes);
# a shard of a few bytes is never meant, so a lone B here is a billion as there, and GB/MB/KB the usual bytes
_UNITS = {"": 1, "B": 1e9, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"--shard-size: cannot read {text!r} (try 2GB, 500MB, 1GiB, or mergekit's 5B)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"--shard-size: must be positive, got {text!r}")
    return size


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy merge", description="Merge models from a mergekit-style YAML config.")
    p.add_argument("config", help="mergekit-style YAML")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted merge from its verified shards")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_engine_options(p)
    return p


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The options of each merge (alloy merge's, and alloy multimerge's for every recipe)."""
    # mergekit-yaml's names for the same options are accepted too: --random-seed, --cuda, --out-shard-size
    p.add_argument("--seed", "--random-seed", type=int, default=None,
                   help="seed for random methods (dare, della); default 0")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda runs the Triton kernels)")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="the same as --device cuda")
    p.add_argument("--shard-size", "--out-shard-size", default="2GB",
                   help="largest output shard, e.g. 2GB, 500MB (mergekit's 5B: 5e9 bytes)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="compute dtype override")
    p.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt inputs (loaded with weights_only=True)")
    p.add_argument("--tie-break", default="index", choices=["index", "torch"],
                   help="mergekit's selection rules or alloy's: elements tied at a magnitude threshold (the first by "
                        "position, default; or whatever torch's sort keeps) and DARE/DELLA's random drops (15-bit "
                        "draws, default; or torch.bernoulli): 'torch' selects exactly as mergekit does (TIES and friends "
                        "bit-identical; DARE/DELLA the same rule but not the same draws: alloy seeds each tensor from "
                        "(seed, name), mergekit one stream for the run), and is slower")
    p.add_argument("--nan-policy", default="refuse", choices=["refuse", "warn"],
                   help="an input tensor holding NaN or Inf: refuse the merge (default), or warn and merge it anyway "
                        "(recorded in alloy_manifest.json)")
    add_model_source_options(p)
    p.add_argument("--lora-merge-dtype", default=None, metavar="DTYPE",
                   help="merge `base+adapter` models in this dtype (float32, bfloat16, float16, float64; default: the "
                        "base's), as mergekit's option: the base's floating tensors are cast to it first")
    p.add_argument("--no-progress", action="store_true")
    _mergekit_options(p)


def _mergekit_options(p: argparse.ArgumentParser) -> None:
    """mergekit-yaml's other options, so that its command lines run unchanged: those alloy acts on, those that ask
    for what alloy always does (accepted, nothing to change), and two it refuses."""
    g = p.add_argument_group("mergekit-yaml options")
    yes_no = argparse.BooleanOptionalAction
    g.add_argument("--no-cuda", dest="device", action="store_const", const="cpu", help="the same as --device cpu")
    g.add_argument("--allow-crimes", action=yes_no, default=False,
                   help="merge models whose config.json names different architectures (their tensors must still "
                        "match by name and shape)")
    g.add_argument("--copy-tokenizer", action=yes_no, default=True,
                   help="copy the tokenizer into the output (default); --no-copy-tokenizer writes one only when the "
                        "config builds it (tokenizer_source / tokenizer)")
    g.add_argument("--write-model-card", action=yes_no, default=True, help="write README.md (default)")
    g.add_argument("--quiet", action=yes_no, default=False, help="no progress bar and no summary line")
    g.add_argument("-v", dest="verbose", action="count", default=0, help="log what alloy does (-vv: more)")
    g.add_argument("-j", "--num-threads", type=int, default=None, metavar="N",
                   help="compute N tensors side by side (default: one per core)")
    g.add_argument("--gpu-rich", dest="device", action="store_const", const="cuda", help="the same as --cuda")
    g.add_argument("--multi-gpu", action=yes_no, default=False,
                   help="implies --cuda; alloy merges on one GPU (says so when given)")
    always = {  # what each asks for, and why alloy needs nothing to do it
        "--lazy-unpickle": "alloy maps checkpoints (pickles too, with --allow-pickle) and reads each tensor as it is merged",
        "--low-cpu-memory": "alloy holds a few tensors at a time",
        "--read-to-gpu": "with --cuda each tensor's inputs go to the GPU to be merged there",
        "--async-write": "alloy always writes in a thread of its own",
        "--clone-tensors": "alloy writes each tensor's bytes on its own: tensors sharing memory are fine",
        "--trust-remote-code": "alloy reads config.json and tensors only, never a model's Python code",
    }
    for flag, why in always.items():
        g.add_argument(flag, action=yes_no, default=False, help=f"accepted: {why}")
    g.add_argument("--write-threads", type=int, default=None, metavar="N", help="accepted: one writer thread suffices")
    g.add_argument("--safe-serialization", action=yes_no, default=True,
                   help="safetensors output, the only kind alloy writes (--no-safe-serialization is refused)")
    g.add_argument("--unsafe-truncate-embeddings", action=yes_no, default=False,
                   help="refused: give a tokenizer section (tokenizer: {source: base}) instead")


def _check_mergekit_options(args: argparse.Namespace) -> None:
    if not args.safe_serialization:
        raise ConfigError("--no-safe-serialization: alloy writes safetensors only (pickled checkpoints can run code "
                          "when loaded)")
    if args.unsafe_truncate_embeddings:
        raise ConfigError("--unsafe-truncate-embeddings: not supported; a tokenizer section (tokenizer: {source: "
                          "base}) keeps the base's rows by token, not by position")
    if args.num_threads is not None and args.num_threads < 1:
        raise ConfigError(f"--num-threads: must be at least 1, got {args.num_threads}")
    if args.multi_gpu:
        args.device = "cuda" if args.device == "cpu" else args.device
        print("alloy: --multi-gpu: alloy merges on one GPU", file=sys.stderr)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """run_merge's keywords from the engine options; sets up logging, threads and SIGTERM as a merge wants them."""
    import logging
    import os
    import signal

    _check_mergekit_options(args)
    if args.verbose:
        logging.basicConfig(format="%(message)s")
        logging.getLogger("alloy").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    if args.num_threads is not None:
        os.environ["ALLOY_COMPUTE_WORKERS"] = str(args.num_threads)  # read by merging.engine.compute_workers

    def terminated(signum, frame):  # `kill` stops a merge as Ctrl-C does: lock released, finished shards kept
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    return dict(seed=args.seed, device=args.device, shard_size=parse_size(args.shard_size), dtype=args.dtype,
                progress=not (args.no_progress or args.quiet) and sys.stderr.isatty(),
                allow_pickle=args.allow_pickle, tie_break=args.tie_break, nan_policy=args.nan_policy,
                lora_cache=args.lora_merge_cache, lora_dtype=args.lora_merge_dtype,
                allow_crimes=args.allow_crimes, copy_tokenizer=args.copy_tokenizer,
                model_card=args.write_model_card, hub_cache=args.transformers_cache)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    kwargs = engine_kwargs(args)
    from pathlib import Path

    from merging.engine import partial_folder, run_merge

    try:
        result = run_merge(args.config, args.out_dir, resume=args.resume, overwrite=args.overwrite, **kwargs)
    except KeyboardInterrupt:
        tmp = partial_folder(Path(args.out_dir).absolute())
        if tmp.exists():
            print(f"alloy: interrupted; finished shards are kept in {tmp}: the same command with --resume continues "
                  "from them", file=sys.stderr)
            return 130
        raise
    if not args.quiet:
        print(result.summary())
    return 0
