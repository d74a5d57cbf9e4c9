"""`alloy extract-lora --model FT --base-model BASE --out-path OUT`: a fine-tune as a LoRA adapter of its base
(mergekit-extract-lora's command line)."""

from __future__ import annotations

import argparse

from alloy.argtypes import add_model_source_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy extract-lora",
                                description="Extract a PEFT LoRA adapter that takes the base model to the fine-tuned "
                                            "one: each linear layer's difference, truncated by SVD.")
    p.add_argument("--model", required=True, help="fine-tuned model: folder, hub id[@revision] or base+adapter")
    p.add_argument("--base-model", required=True, help="its base model (the same forms)")
    p.add_argument("--out-path", required=True, help="adapter folder to write (must not exist unless --overwrite)")
    p.add_argument("--max-rank", type=int, default=128, help="largest rank kept per module (default 128)")
    yes_no = argparse.BooleanOptionalAction
    p.add_argument("--distribute-scale", action=yes_no, default=True,
                   help="split the singular values between A and B as square roots (default), or keep them in A")
    p.add_argument("--embed-lora", action=yes_no, default=False,
                   help="decompose embeddings too (default: save them whole, as modules_to_save)")
    p.add_argument("--save-module", dest="modules_to_save", action="append", default=[], metavar="NAME",
                   help="save this module whole (a module's full name or its last part; repeatable)")
    p.add_argument("--exclude-regex", "-e", action="append", default=[], metavar="REGEX",
                   help="leave out modules whose name matches (repeatable)")
    p.add_argument("--include-regex", "-i", action="append", default=[], metavar="REGEX",
                   help="decompose only modules whose name matches (repeatable)")
    p.add_argument("--sv-epsilon", type=float, default=0.0,
                   help="drop singular values at or below this (a module's rank can then be lower)")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out modules that are not linear layers (norms) instead of saving them whole")
    p.add_argument("--device", default="cpu", help="where the SVDs run: cpu or cuda")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="the same as --device cuda")
    p.add_argument("--overwrite", action="store_true", help="replace --out-path if it exists")
    add_model_source_options(p)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from pathlib import Path

    from merging.config import ModelRef
    from merging.engine import check_device
    from merging.errors import ConfigError, InputError
    from merging.extract import extract_lora
    from merging.hub import hub_cache
    from merging.plan import local_model

    check_device(args.device)
    refs = {}
    for flag, text in (("--model", args.model), ("--base-model", args.base_model)):
        try:
            refs[flag] = ModelRef.model_validate(text)
        except ValueError as e:
            raise ConfigError(f"{flag} {text!r}: not a model reference ({e})") from None
    folders = {}
    with hub_cache(args.transformers_cache):
        for flag, ref in refs.items():
            try:
                folders[flag], _ = local_model(ref, [Path.cwd()], lora_cache=args.lora_merge_cache)
            except InputError as e:
                raise InputError(f"{flag}: {e}") from None
    model, base = folders["--model"], folders["--base-model"]
    result = extract_lora(model, base, args.out_path, max_rank=args.max_rank, distribute_scale=args.distribute_scale,
                          embed_lora=args.embed_lora, modules_to_save=args.modules_to_save,
                          include=args.include_regex, exclude=args.exclude_regex, sv_epsilon=args.sv_epsilon,
                          skip_undecomposable=args.skip_undecomposable, device=args.device,
                          overwrite=args.overwrite, base_name=args.base_model)
    if not args.quiet:
        print(result.summary())
    return 0
