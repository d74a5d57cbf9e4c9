"""`alloy gram MODEL DATA OUT.safetensors`: the Gram matrices RegMean merges with (merging.gram).

DATA: a .jsonl file (rows with "text", or "prompt" and "answer": the answer follows the prompt after a space, as the
demo's skills are trained), a text file (one text per non-empty line), or skill:NAME for the training split of a
bundled demo skill (the data the demo's specialists were tuned on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alloy.argtypes import positive_int
from eval.texts import jsonl_rows, read_text
from merging.errors import ConfigError, InputError, OutputError


def load_texts(data: str, n: int, seed: int = 0) -> list[str | tuple[str, str]]:
    """Up to n texts of a data spec (see the module docstring); (prompt, continuation) pairs for prompt/answer rows."""
    if n < 1:
        raise ConfigError(f"examples={n}: take the Gram matrices on at least one text")
    if data.startswith("skill:"):
        from alloy.demo import skills as sk

        return [(e["prompt"], " " + e["answer"] + "\n") for e in sk.make_examples(data[6:], "train", n, seed=seed)]
    path = Path(data)
    if not path.is_file():
        raise InputError(f"{data}: no such file (give a .jsonl or text file, or skill:NAME)")
    out: list[str | tuple[str, str]] = []
    if path.suffix != ".jsonl":
        out += [ln for ln in read_text(path).splitlines() if ln.strip()][:n]
    else:
        for i, row in jsonl_rows(path):
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                out.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("answer"), str):
                out.append((row["prompt"], " " + row["answer"] + "\n"))
            else:
                raise InputError(f"{path}:{i}: a row needs a string 'text', or 'prompt' and 'answer'")
            if len(out) == n:
                break
    if not out:
        raise InputError(f"{path}: no texts")
    return out


def data_label(data: str, examples: int, seed: int) -> str:
    return f"{data} examples={examples} seed={seed}"


def ensure_grams(model_dir: str | Path, data: str, out: str | Path, *, examples: int = 128, seed: int = 0) -> dict:
    """Compute `out` unless it already holds this model's Grams on this data (the model's files by sha256).

    Returns {"path", "reused", "seconds", "tokens"}."""
    import time

    from merging.gram import model_files_digest, read_metadata

    t0 = time.perf_counter()
    out = Path(out)
    label = data_label(data, examples, seed)
    if out.is_file():
        try:
            meta = read_metadata(out)
        except Exception:  # noqa: BLE001 - an unreadable file is recomputed
            meta = {}
        if meta.get("data") == label and meta.get("model_files") == model_files_digest(model_dir):
            return {"path": str(out), "reused": True, "seconds": time.perf_counter() - t0, "tokens": int(meta["tokens"])}
    from merging.gram import write_grams

    meta = write_grams(model_dir, load_texts(data, examples, seed), out, data=label, overwrite=True)
    return {"path": str(out), "reused": False, "seconds": round(time.perf_counter() - t0, 2), "tokens": int(meta["tokens"])}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="alloy gram", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (Hugging Face checkpoint)")
    p.add_argument("data", help="a .jsonl or text file, or skill:NAME")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--examples", type=positive_int, default=128, help="texts to read (default 128)")
    p.add_argument("--seed", type=int, default=0, help="skill:NAME only: the draw of the training split")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="tokens per text kept (default 512)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = p.parse_args(argv)
    from merging.gram import write_grams
    from merging.guard import check_output_file

    # before any work: OUT may not be the model's folder or lie in it, nor be the data file
    inputs = [args.model] + ([] if args.data.startswith("skill:") else [args.data])
    check_output_file(args.out, inputs, option="OUT")
    if Path(args.out).exists() and not args.overwrite:
        raise OutputError(f"{args.out} exists (pass --overwrite to replace it)")
    texts = load_texts(args.data, args.examples, args.seed)
    meta = write_grams(args.model, texts, args.out, data=data_label(args.data, args.examples, args.seed),
                       max_tokens=args.max_tokens, overwrite=args.overwrite)
    n = len(json.loads(meta["alloy.aliases"]))
    print(f"{args.out}: Gram matrices of {args.model} on {meta['texts']} texts ({meta['tokens']} tokens), "
          f"{n} layers sharing another's input")
    return 0
