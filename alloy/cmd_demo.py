"""`alloy demo-family --kind tiny|smol OUT_DIR`: build a demo model family (a base and one specialist per skill)."""

from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alloy demo-family",
        description="Build a demo family: 'tiny' trains a small Llama from scratch (fast, for tests); 'smol' imports "
        "SmolLM2-135M-Instruct from its GGUF wheel and trains LoRA specialists of it (the real demo).",
    )
    p.add_argument("out_dir", help="output folder (base/, one folder per skill, data/, family.json)")
    p.add_argument("--kind", choices=["tiny", "smol"], default="smol")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default=None,
                   help="training steps per specialist: N, or per skill as facts=60,words=60,addition=100 (smol)")
    p.add_argument("--skills", default=None, help="comma-separated subset of the skills (default: all)")
    p.add_argument("--n-eval", type=int, default=60, help="held-out examples per skill in data/")
    p.add_argument("--base-dir", default=None, help="smol: an already imported base instead of importing one")
    p.add_argument("--source", default=None, help="smol: GGUF source of the base (path or pip:NAME==VERSION/FILE)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per thread count)")
    p.add_argument("--evaluate", action="store_true", help="smol: score every model on every skill (EM and MC)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return p


def parse_steps(text: str | None) -> int | dict[str, int] | None:
    from merging.errors import ConfigError

    if text is None:
        return None
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(",") if part.strip())}
    except ValueError:
        raise ConfigError(f"--steps: cannot read {text!r} (N, or skill=N,skill=N)") from None


def main(argv: list[str]) -> int:
    # Training runs OpenMP threads; on a shared machine their default busy-waiting burns 4-6x the CPU of the work
    # itself (measured on this 2-core box under load). Must be set before torch is imported to take effect.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parser().parse_args(argv)
    from alloy.demo.skills import SKILLS

    steps = parse_steps(args.steps)

    skills = tuple(s.strip() for s in args.skills.split(",") if s.strip()) if args.skills else SKILLS

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.kind == "tiny":
        from alloy.demo.tiny import TinySize, build_tiny_family  # imported lazily: each kind pulls in its own stack

        from merging.errors import ConfigError

        if isinstance(steps, dict):
            raise ConfigError("--steps: the tiny family takes one number of steps for every specialist")
        extra = {} if steps is None else {"specialist_steps": steps}
        result = build_tiny_family(args.out_dir, seed=args.seed, skills=skills, n_eval=args.n_eval,
                                   overwrite=args.overwrite, log=log, size=TinySize(threads=args.threads), **extra)  # fmt: skip
    else:
        from alloy.demo.smol import DEFAULT_SOURCE, LoraRecipe, build_smol_family

        result = build_smol_family(args.out_dir, seed=args.seed, steps=steps, skills=skills,
                                   source=args.source or DEFAULT_SOURCE, base_dir=args.base_dir,
                                   n_eval=args.n_eval, evaluate=args.evaluate, overwrite=args.overwrite,
                                   recipe=LoraRecipe(threads=args.threads), log=log)  # fmt: skip
    print(f"{result['root']}: base {result['base']}, specialists "
          + ", ".join(f"{s} {p}" for s, p in result["specialists"].items()))  # fmt: skip
    return 0
