"""`alloy moe CONFIG.yml OUT_DIR`: dense models as the experts of a Mixtral mixture (mergekit-moe's YAML)."""

from __future__ import annotations

import argparse
import sys

from alloy.argtypes import add_model_source_options


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alloy moe", description="Build a Mixtral mixture-of-experts model from a base "
                                "model and dense expert models (mergekit-moe's YAML).")
    p.add_argument("config", help="mergekit-moe YAML: base_model, experts (source_model, positive_prompts, ...), "
                                  "gate_mode, dtype, experts_per_token")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--seed", "--random-seed", type=int, default=0,
                   help="seed of the random gate modes and of noise_scale (default 0)")
    p.add_argument("--device", default="cpu", help="where hidden-state gates run the base model: cpu or cuda")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="the same as --device cuda")
    p.add_argument("--shard-size", "--out-shard-size", default="2GB", help="largest output shard (2GB, 500MB, 5B)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--copy-tokenizer", action=argparse.BooleanOptionalAction, default=True,
                   help="copy the base's tokenizer into the output (default)")
    p.add_argument("--i-understand-this-is-not-useful-without-training", dest="allow_all_same", action="store_true",
                   help="build it even when every expert is the same model")
    add_model_source_options(p)
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from alloy.cmd_merge import parse_size
    from merging.engine import check_device
    from merging.hub import hub_cache
    from merging.moe import build_moe

    check_device(args.device)
    with hub_cache(args.transformers_cache):
        manifest = build_moe(args.config, args.out_dir, seed=args.seed, device=args.device,
                             shard_size=parse_size(args.shard_size), copy_tokenizer=args.copy_tokenizer,
                             overwrite=args.overwrite, allow_all_same=args.allow_all_same,
                             lora_cache=args.lora_merge_cache)
    if not args.quiet:
        print(f"mixture of {manifest['experts']} experts ({manifest['experts_per_token']} per token, gates: "
              f"{manifest['gate_mode']}) -> {args.out_dir}", file=sys.stdout)
    return 0
