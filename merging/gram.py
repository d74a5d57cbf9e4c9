"""Gram matrices of every linear layer's inputs on a model's own data: what RegMean (merging.methods.regmean) needs.

For each `nn.Linear` whose weight is a tensor of the checkpoint, G = X^T X / n over the n non-padding tokens the
layer saw while the model read the given texts (float64 sums, stored float32). Layers that read the very same input
tensor (q/k/v projections, gate/up) share one stored matrix; the file's metadata maps the others to it, which keeps
a SmolLM2-135M file at ~400 MB instead of ~520 MB. Only these statistics leave the model's owner, never the data:
the reason the paper calls the merge "dataless".
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from merging.errors import ConfigError, InputError, OutputError

FORMAT = "alloy-gram/1"


def _token_rows(tok, texts: Sequence[str | tuple[str, str]]) -> list[list[int]]:
    rows = []
    for t in texts:
        if isinstance(t, tuple):  # (prompt, continuation): tokenized apart, as lm-eval and the demo's trainer do
            rows.append(tok(t[0], add_special_tokens=False)["input_ids"] + tok(t[1], add_special_tokens=False)["input_ids"])
        else:
            rows.append(tok(t)["input_ids"])
    return [r for r in rows if r]


def compute_grams(model_dir: str | Path, texts: Sequence[str | tuple[str, str]], *, batch_size: int = 16,
                  max_tokens: int = 512) -> tuple[dict, dict[str, str], int]:
    """({stored name: float32 Gram [in, in]}, {weight name: stored name}, tokens seen) for a checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model folder (no config.json)")
    if not texts:
        raise InputError(f"{model_dir}: no texts to take the Gram matrices on")
    if max_tokens < 1 or batch_size < 1:
        raise ConfigError(f"max_tokens={max_tokens}, batch_size={batch_size}: both must be at least 1")
    from merging.hf import load_tokenizer, quiet_transformers
    from merging.loading import LOAD_LOCK

    tok = load_tokenizer(model_dir)  # a folder without one is named before the model loads
    with LOAD_LOCK, quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    tied = model.get_output_embeddings()
    layers = {name: mod for name, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and mod is not tied}
    sums: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    state: dict = {}

    def hook(name):
        def pre(_mod, args):
            x = args[0]
            # The entry holds x, so its memory cannot be freed and reused by a later layer's input of the same shape.
            owner, _ = state["seen"].setdefault((x.data_ptr(), tuple(x.shape)), (name, x))
            if owner != name:  # the same input tensor as an earlier layer of this forward pass
                aliases[name] = owner
                return
            flat = x[state["mask"]].to(torch.float64)
            sums[name] = sums.get(name, 0) + flat.T @ flat
        return pre

    handles = [mod.register_forward_pre_hook(hook(name)) for name, mod in layers.items()]
    rows = [r[:max_tokens] for r in _token_rows(tok, texts)]
    n_tokens = 0
    try:
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                batch = rows[i:i + batch_size]
                width = max(map(len, batch))
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
                state.update(mask=mask.bool(), seen={})
                model(input_ids=ids, attention_mask=mask)
                n_tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    grams = {f"{n}.weight": (g / n_tokens).to(torch.float32) for n, g in sums.items()}
    names = {f"{n}.weight": f"{o}.weight" for n, o in aliases.items()}
    return grams, names, n_tokens


def write_grams(model_dir: str | Path, texts: Sequence[str | tuple[str, str]], out: str | Path, *,
                data: str = "", batch_size: int = 16, max_tokens: int = 512, overwrite: bool = False) -> dict:
    """Compute and write `out` (one safetensors file) atomically; returns its metadata.

    The same model and texts give the same bytes wherever the project lives (dvc compares outputs by md5): tensors in
    name order, metadata in a fixed order (safetensors' own writer orders it differently in each process) and the
    model as a path relative to the file's folder."""
    from merging.gguf import _umask
    from merging.guard import check_output_file
    from merging.io import ShardFile

    out = Path(out)
    check_output_file(out, [model_dir], option="Gram file")  # never over or inside the model's folder
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists (pass --overwrite to replace it)")
    weights = model_files_digest(model_dir)
    grams, aliases, n_tokens = compute_grams(model_dir, texts, batch_size=batch_size, max_tokens=max_tokens)
    meta = {"format": FORMAT, "model": os.path.relpath(Path(model_dir).absolute(), out.parent.absolute()),
            "model_files": weights, "data": data, "texts": str(len(texts)), "tokens": str(n_tokens),
            "alloy.aliases": json.dumps(aliases, sort_keys=True)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    names = sorted(grams)
    try:
        shard = ShardFile(tmp, [(n, grams[n].dtype, tuple(grams[n].shape)) for n in names], meta)
        try:
            for n in names:
                shard.write(n, grams[n])
        finally:
            shard.close()
        os.chmod(tmp, 0o666 & ~_umask())  # an ordinary file, as the user's umask makes them
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"writing {out} failed: {e.strerror or e}") from None
    return meta


def model_files_digest(model_dir: str | Path) -> str:
    """The model's weight files and their sha256 as sorted JSON: what a Gram file records of the model it was taken on."""
    from merging.hashing import file_sha256
    from merging.io import Checkpoint

    return json.dumps({f.name: file_sha256(f) for f in Checkpoint(model_dir).files()}, sort_keys=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    from merging.io import read_header

    return read_header(Path(path))[1]
