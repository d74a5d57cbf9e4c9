"""`base+adapter`: a PEFT LoRA adapter merged into its base model's weights, streamed from safetensors.

mergekit 0.1.5 loads the base as a transformers model, wraps it with `peft.PeftModel.from_pretrained` and saves
`merge_and_unload()` into `--lora-merge-cache`. alloy computes the same tensors without building a model: it reads
the adapter's header and config first (every mistake is an InputError naming the adapter file and tensor, before
anything is written), then copies the base one shard at a time, adding each targeted weight's delta as it passes.

Numerics follow peft 0.21 as `PeftModel.from_pretrained` sets it up (what mergekit calls):
- the LoRA parameters live in float32 whatever the files hold: peft creates them in the base layer's dtype and then
  `autocast_adapter_dtype=True` (the default) casts float16/bfloat16 ones to float32; a float64 base keeps float64;
- Linear: delta = transpose(B @ A, fan_in_fan_out) * scaling in that dtype, added in place to the base weight
  (`W += delta`, so a bfloat16 W is summed in float32 and rounded once);
- Embedding: delta = (B @ A)^T * scaling, cast to the weight's dtype first, then added (rounded twice, as peft does);
- `lora_bias`: bias += B.bias * scaling;
- scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; per-module r and alpha from rank_pattern /
  alpha_pattern, the first key matching the module's name as peft's `get_pattern_key` matches it.
- fan_in_fan_out: peft ignores the config's flag and takes it from the layer type (False for nn.Linear, True for
  transformers' Conv1D), so alloy does the same from the shapes and the architecture (see `_transposed`).
With a dtype (mergekit's --lora-merge-dtype, its `from_pretrained(torch_dtype=...)`), the base's floating tensors are
cast to it first and everything above follows from that dtype.
Whole tensors in the adapter (`modules_to_save` copies, `X.base_layer.weight` saved with embedding layers, biases
saved by `bias: all`) replace the base's tensor, cast to its dtype, as peft's `load_state_dict` does.

Refused, with one line: DoRA, peft types other than LORA, LoRA variants whose merge is not W + s·BA (aLoRA, QA-LoRA,
target_parameters, layer_replication, trainable tokens, ...), PiSSA/OLoRA/CorDA/LoftQ-initialised adapters that were
saved without converting them back to plain LoRA (they need their own residual base), pickle (.bin) adapters, and
convolution LoRA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.errors import InputError
from merging.hashing import file_sha256
from merging.io import DTYPE_NAME, Checkpoint, ShardFile, TensorInfo, dtype_size, model_file, read_header, read_tensor
from merging.tokenizer import TOKENIZER_COPY, has_tokenizer

# Bump when the output for the same inputs could change (numerics, layout, copied files): old cache folders are then
# never reused, as their names no longer match.
FORMAT_VERSION = 1
MANIFEST = "alloy_lora.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
CONFIG_FILES = ("config.json", "generation_config.json")
PEFT_PREFIX = "base_model.model."
# model types whose projections are transformers' Conv1D (weight stored (in, out)), for which peft forces
# fan_in_fan_out=True; everywhere else the targets are nn.Linear and peft forces it False
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
# adapter_config.json keys whose presence (truthy) means the merge is not W + scaling * B @ A
UNSUPPORTED_KEYS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) depends on the input and cannot be merged",
    "use_qalora": "QA-LoRA (use_qalora)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer_replication changes the layer stack",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
# init_lora_weights values that leave the base untouched; the others (pissa, olora, corda, loftq, mica, ...) train
# against a modified residual base, which plain `base+adapter` does not have
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
LORA_KINDS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


@dataclass
class _Lora:
    """One targeted module: where its A/B (and B's bias) are in the adapter, and how to apply them."""

    module: str  # as peft names it (adapter key, less `base_model.model.`): rank/alpha patterns match this
    tensors: dict[str, str] = field(default_factory=dict)  # kind (lora_A, lora_B, lora_B.bias, ...) -> adapter key
    target: str = ""  # the base tensor it changes
    embedding: bool = False
    transposed: bool = False
    scaling: float = 1.0


@dataclass
class _Adapter:
    """The parsed adapter: what changes which base tensor. Built from headers and JSON only."""

    dir: Path
    weights: Path
    config: dict[str, Any]
    infos: dict[str, TensorInfo]
    loras: dict[str, _Lora]  # base tensor name -> its LoRA (weight deltas)
    bias_loras: dict[str, _Lora]  # base bias name -> the LoRA whose lora_B bias adds to it
    replace: dict[str, str]  # base tensor name -> adapter key of its replacement


def materialize_lora(model_dir: Path, adapter_dir: Path, cache_root: Path, dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face checkpoint folder holding model_dir's weights with adapter_dir's LoRA merged in; made once under
    cache_root, reused after. `dtype` (mergekit's --lora-merge-dtype): the base's floating tensors are cast to it
    before the merge, as `from_pretrained(torch_dtype=...)` does, and the folder holds that dtype."""
    model_dir, adapter_dir, cache_root = Path(model_dir), Path(adapter_dir), Path(cache_root)
    if not model_dir.is_dir():
        raise InputError(f"LoRA base {model_dir} is not a model folder")
    if not adapter_dir.is_dir():
        raise InputError(f"LoRA adapter {adapter_dir} is not a folder")
    base = Checkpoint(model_dir)
    adapter_files = _adapter_files(adapter_dir)
    tok_dir = adapter_dir if has_tokenizer(adapter_dir) else model_dir
    copies = _copied_files(model_dir, tok_dir)
    # mergekit names its cache folder by model and adapter only, so a folder merged in one dtype is reused for another
    key = _cache_key(model_dir, base, adapter_files, copies, dtype)
    # no `+` in the name: mergekit-style references split a model path on it (`base+adapter`)
    final = cache_root / f"{_slug(model_dir.name)}__{_slug(adapter_dir.name)}-{key[:20]}"
    if _complete(final):
        return final

    adapter = _parse_adapter(adapter_dir, adapter_files, base)  # every input error surfaces here, before writing
    cache_root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(cache_root, final.name)
    tmp = cache_root / f".{final.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        counts = _write_weights(base, adapter, tmp, dtype)
        for name, src in copies.items():
            if name == "config.json" and dtype is not None:
                _write_config_dtype(src, tmp / name, dtype)
            else:
                shutil.copyfile(src, tmp / name)
        record = {
            "format": FORMAT_VERSION,
            "base": str(model_dir.resolve()),
            "adapter": str(adapter_dir.resolve()),
            "adapter_sha256": {name: file_sha256(p) for name, p in adapter_files.items()},
            "adapter_weights_sha256": file_sha256(adapter.weights),
            "tokenizer_from": "adapter" if tok_dir == adapter_dir else "base",
            "peft_type": adapter.config.get("peft_type"),
            "r": adapter.config.get("r"),
            "lora_alpha": adapter.config.get("lora_alpha"),
            "use_rslora": bool(adapter.config.get("use_rslora")),
            "dtype": None if dtype is None else DTYPE_NAME[dtype],
            **counts,
        }
        # written last: a folder is complete exactly when it has this file (the rename below makes it visible)
        (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(final)
        except OSError:
            if not _complete(final):  # a concurrent build won the race only if its folder is complete
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ---------------------------------------------------------------------------------------------------------- cache


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "model"


def _complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT_VERSION
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _cache_key(model_dir: Path, base: Checkpoint, adapter_files: dict[str, Path], copies: dict[str, Path],
               dtype: torch.dtype | None) -> str:
    """Content hashes for the adapter (small, and often rewritten in place by training scripts); for the base, whose
    weights may be many GB, each file's name, size and mtime, as a changed file changes them."""
    def stat(p: Path) -> list:
        st = p.stat()
        return [p.name, st.st_size, st.st_mtime_ns]

    base_files = [stat(f) for f in base.files()]
    index = model_file(model_dir, "model.safetensors.index.json")
    if index is not None:
        base_files.append(stat(index))
    blob = json.dumps({
        "format": FORMAT_VERSION,
        "base": str(model_dir.resolve()),  # two copies of a base with equal stats (cp -p) stay apart
        "base_files": base_files,
        "copied": {name: [str(p.parent.resolve()), *stat(p)] for name, p in sorted(copies.items())},
        "adapter": {name: file_sha256(p) for name, p in sorted(adapter_files.items())},
        **({} if dtype is None else {"dtype": DTYPE_NAME[dtype]}),  # absent by default: old cache keys stay valid
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _sweep_stale(cache_root: Path, name: str) -> None:
    """Remove temp folders of this entry left by builds whose process is gone (killed mid-write)."""
    for p in cache_root.glob(f".{name}.tmp.*"):
        try:
            pid = int(p.name.split(".tmp.")[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _copied_files(model_dir: Path, tok_dir: Path) -> dict[str, Path]:
    """Non-weight files of the output: config from the base, tokenizer from tok_dir (the adapter when it has one:
    adapters that add tokens ship the tokenizer they were trained with)."""
    out: dict[str, Path] = {}
    for name in CONFIG_FILES:
        if (p := model_file(model_dir, name)) is not None:
            out[name] = p
    for name in TOKENIZER_COPY:
        if (p := model_file(tok_dir, name)) is not None:
            out[name] = p
    return out


# -------------------------------------------------------------------------------------------------------- adapter


def _adapter_files(adapter_dir: Path) -> dict[str, Path]:
    """The adapter's config and safetensors weights (a pickle adapter is refused unread), plus its tokenizer files."""
    cfg = model_file(adapter_dir, ADAPTER_CONFIG, what="adapter file")
    if cfg is None:
        raise InputError(f"{adapter_dir}: not a PEFT adapter ({ADAPTER_CONFIG} is missing)")
    weights = model_file(adapter_dir, ADAPTER_WEIGHTS, what="adapter file")
    if weights is None:
        for name in PICKLE_WEIGHTS:
            if (adapter_dir / name).exists():
                raise InputError(f"{adapter_dir / name}: pickle adapters can run code and are refused; save it as "
                                 f"{ADAPTER_WEIGHTS} (peft save_pretrained(..., safe_serialization=True))")
        raise InputError(f"{adapter_dir}: has no {ADAPTER_WEIGHTS}")
    files = {ADAPTER_CONFIG: cfg, ADAPTER_WEIGHTS: weights}
    for name in TOKENIZER_COPY:
        if (p := model_file(adapter_dir, name, what="adapter file")) is not None:
            files[name] = p
    return files


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters can be merged")
    for key, what in UNSUPPORTED_KEYS.items():
        if cfg.get(key):
            raise InputError(f"{path}: {key} is set ({what}); base+adapter merging supports plain LoRA only")
    init = cfg.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in PLAIN_INITS):
        raise InputError(f"{path}: init_lora_weights={init!r} trains against a modified base; save the adapter "
                         "converted to plain LoRA (save_pretrained(path_initial_model_for_weight_conversion=...))")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise InputError(f"{path}: {key} must be a positive number, got {cfg.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise InputError(f"{path}: {key} must be a mapping of module patterns to numbers")
    return cfg


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """peft.utils.other.get_pattern_key: the first pattern (in file order) that matches the end of the module name
    at a dot boundary, as a regular expression."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            raise InputError(f"rank/alpha pattern {key!r} is not a valid regular expression") from None
    return None


def _split_key(key: str) -> tuple[str, str, str | None] | None:
    """`<module>.<kind>[.<adapter name>][.weight|.bias]` -> (module, kind, param) for LoRA tensors, else None.
    peft saves without the adapter name (`lora_A.weight`); some tools keep it (`lora_A.default.weight`)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in LORA_KINDS or parts[i] == "lora_magnitude_vector":
            tail = parts[i + 1:]
            param = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
            rest = tail[:-1] if param else tail
            if len(rest) > 1:
                return None
            return ".".join(parts[:i]), parts[i], param
    return None


def _module_in_base(module: str, base: Checkpoint, suffix: str) -> str | None:
    """The base tensor for a peft module name: the same name, or with the head model's `model.` prefix added or
    dropped (an adapter trained on a bare LlamaModel, applied to a LlamaForCausalLM checkpoint, or the reverse)."""
    for cand in (module, f"model.{module}", module.removeprefix("model.")):
        if f"{cand}.{suffix}" in base:
            return f"{cand}.{suffix}"
    return None


def _parse_adapter(adapter_dir: Path, files: dict[str, Path], base: Checkpoint) -> _Adapter:
    cfg_path, weights = files[ADAPTER_CONFIG], files[ADAPTER_WEIGHTS]
    cfg = _read_config(cfg_path)
    infos, _ = read_header(weights)
    where = str(weights)
    loras: dict[str, _Lora] = {}
    replace_keys: dict[str, str] = {}
    for key in infos:
        name = key.removeprefix(PEFT_PREFIX)
        split = _split_key(name)
        if split is not None:
            module, kind, param = split
            if kind == "lora_magnitude_vector":
                raise InputError(f"{where}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
            if kind.startswith("lora_embedding") and param == "weight":
                param = None  # peft stores embedding factors as bare parameters; tolerate a `.weight` suffix
            if (kind.startswith("lora_embedding") or kind == "lora_A") and param == "bias":
                raise InputError(f"{where}: tensor {key!r} is not a LoRA tensor alloy knows")
            sub = kind if param is None else f"{kind}.{param}"
            lora = loras.setdefault(module, _Lora(module))
            if sub in lora.tensors:
                raise InputError(f"{where}: tensor {key!r} duplicates {lora.tensors[sub]!r}")
            lora.tensors[sub] = key
            continue
        # a whole tensor: modules_to_save copies (`X.modules_to_save[.name].weight` or, as peft saves them, plain
        # `X.weight`), and base weights saved with embedding layers (`X.base_layer.weight`)
        target = re.sub(r"\.(modules_to_save(\.[^.]+)?|base_layer)(?=\.[^.]+$)", "", name)
        if target.split(".")[-2:-1] == ["original_module"]:
            continue  # peft never saves it; if a tool did, it is the unchanged base
        found = target if target in base else _module_in_base(target.rsplit(".", 1)[0], base, target.rsplit(".", 1)[-1])
        if found is None:
            raise InputError(f"{where}: tensor {key!r} replaces {target!r}, which the base {base.path} lacks")
        if found in replace_keys:
            raise InputError(f"{where}: tensors {replace_keys[found]!r} and {key!r} both replace {found!r}")
        replace_keys[found] = key

    if not loras and not replace_keys:
        raise InputError(f"{where}: holds no LoRA tensors")

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    conv1d = base.config.get("model_type") in CONV1D_MODEL_TYPES
    by_target: dict[str, _Lora] = {}
    bias_loras: dict[str, _Lora] = {}
    for module, lora in loras.items():
        lora.embedding = "lora_embedding_A" in lora.tensors or "lora_embedding_B" in lora.tensors
        a, b = ("lora_embedding_A", "lora_embedding_B") if lora.embedding else ("lora_A.weight", "lora_B.weight")
        extra = set(lora.tensors) - {a, b, "lora_B.bias"}
        for need in (a, b):
            if need not in lora.tensors:
                have = next(iter(lora.tensors.values()))
                raise InputError(f"{where}: tensor {have!r} has no matching {need.split('.')[0]}")
        if extra:
            raise InputError(f"{where}: tensor {lora.tensors[sorted(extra)[0]]!r} mixes LoRA kinds on one module")
        target = _module_in_base(module, base, "weight")
        if target is None:
            raise InputError(f"{where}: tensor {lora.tensors[a]!r} targets {module}.weight, which the base "
                             f"{base.path} lacks")
        if target in replace_keys and not replace_keys[target].removeprefix(PEFT_PREFIX).endswith(".base_layer.weight"):
            raise InputError(f"{where}: tensor {replace_keys[target]!r} replaces {target!r}, which the adapter also "
                             "changes by LoRA (ambiguous)")
        lora.target = target
        r_key, alpha_key = _pattern_key(rank_pattern, module), _pattern_key(alpha_pattern, module)
        r = rank_pattern[r_key] if r_key is not None else cfg["r"]
        alpha = alpha_pattern[alpha_key] if alpha_key is not None else cfg["lora_alpha"]
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
            raise InputError(f"{cfg_path}: rank {r!r} / alpha {alpha!r} for module {module} is not valid")
        lora.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # peft's update_layer
        A, B, W = infos[lora.tensors[a]], infos[lora.tensors[b]], base.info(target)
        if W.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise InputError(f"{base.path}: tensor {target!r} is {W.dtype}; LoRA merges need float weights")
        if len(A.shape) != 2 or len(B.shape) != 2 or len(W.shape) != 2:
            raise InputError(f"{where}: tensor {lora.tensors[a]!r} targets {target!r} of shape {list(W.shape)}; "
                             "only 2-D (linear and embedding) LoRA is supported")
        if A.shape[0] != r or B.shape[1] != r:
            raise InputError(f"{where}: tensors {lora.tensors[a]!r} {list(A.shape)} and {lora.tensors[b]!r} "
                             f"{list(B.shape)} do not have the rank {r} that {cfg_path.name} gives module {module}")
        delta_shape = (B.shape[0], A.shape[1])  # B @ A
        if lora.embedding:
            ok, lora.transposed = W.shape == delta_shape[::-1], True  # peft: transpose(B @ A, True) always
        else:
            lora.transposed = _transposed(W.shape, delta_shape, conv1d)
            ok = W.shape == (delta_shape[::-1] if lora.transposed else delta_shape)
        if not ok:
            raise InputError(f"{where}: tensors {lora.tensors[a]!r} {list(A.shape)} and {lora.tensors[b]!r} "
                             f"{list(B.shape)} do not fit {target!r} {list(W.shape)} of {base.path}")
        if "lora_B.bias" in lora.tensors:
            bias = target.removesuffix(".weight") + ".bias"
            if bias not in base or base.info(bias).shape != (B.shape[0],):
                raise InputError(f"{where}: tensor {lora.tensors['lora_B.bias']!r} (lora_bias) needs {bias!r} of "
                                 f"shape [{B.shape[0]}] in the base {base.path}")
            bias_loras[bias] = lora
        if target in by_target:
            raise InputError(f"{where}: modules {by_target[target].module} and {module} both target {target!r}")
        by_target[target] = lora

    for target, key in replace_keys.items():
        if infos[key].shape != base.info(target).shape:
            raise InputError(f"{where}: tensor {key!r} {list(infos[key].shape)} does not fit {target!r} "
                             f"{list(base.info(target).shape)} of {base.path}")
    return _Adapter(adapter_dir, weights, cfg, infos, by_target, bias_loras, replace_keys)


def _transposed(w_shape: tuple[int, ...], delta_shape: tuple[int, int], conv1d: bool) -> bool:
    """Whether the base stores this weight (in, out), as transformers' Conv1D does. peft decides fan_in_fan_out by
    the layer's type, not the config; from a checkpoint that is the shape when it is not square, else the
    architecture (only GPT-2-style models have Conv1D layers, and there every square 2-D target is one)."""
    straight, flipped = w_shape == delta_shape, w_shape == delta_shape[::-1]
    if straight and flipped:
        return conv1d
    return flipped and conv1d


# --------------------------------------------------------------------------------------------------------- merge


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype peft's LoRA parameters end up in: the base layer's, then float16/bfloat16 autocast to float32."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _lora_pair(adapter: _Adapter, lora: _Lora, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = ("lora_embedding_A", "lora_embedding_B") if lora.embedding else ("lora_A.weight", "lora_B.weight")
    return (read_tensor(adapter.infos[lora.tensors[a]]).to(dtype),
            read_tensor(adapter.infos[lora.tensors[b]]).to(dtype))


def _delta(A: torch.Tensor, B: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """peft's get_delta_weight, op for op (Linear and Embedding share it; they differ in how the sum is taken)."""
    dtype = B.dtype
    cast_to_fp32 = dtype in (torch.float16, torch.bfloat16)  # peft on CPU; unreachable after autocast, kept exact
    if cast_to_fp32:
        A, B = A.float(), B.float()
    out = B @ A
    out = (out.T if transposed else out) * scaling
    return out.to(dtype) if cast_to_fp32 else out


def _out_dtype(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and stored.is_floating_point else stored  # from_pretrained casts floats only


def _merged(name: str, base: Checkpoint, adapter: _Adapter, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The output tensor `name`: the base's (or the adapter's replacement) with any LoRA delta added; the base loaded
    as `dtype` first when one is given."""
    info = base.info(name)
    out_dtype = _out_dtype(info.dtype, dtype)
    if name in adapter.replace:
        # load_state_dict copies into the existing parameter, so the replacement takes the (loaded) base's dtype
        t = read_tensor(adapter.infos[adapter.replace[name]]).to(out_dtype)
    else:
        t = base.read(name).to(out_dtype)
    if (lora := adapter.loras.get(name)) is not None:
        A, B = _lora_pair(adapter, lora, _adapter_dtype(out_dtype))
        delta = _delta(A, B, lora.scaling, lora.transposed)
        out = t.clone()  # the read tensor may be a private mapping of the file; write into memory of our own
        if lora.embedding:
            out += delta.to(out.dtype)  # peft's Embedding.merge casts the delta first
        else:
            out += delta  # peft's Linear.merge adds in the promoted dtype, rounding once
        return out
    if (lora := adapter.bias_loras.get(name)) is not None:
        bias = read_tensor(adapter.infos[lora.tensors["lora_B.bias"]]).to(_adapter_dtype(out_dtype))
        out = t.clone()
        out += bias * lora.scaling  # peft: base_layer.bias.data += lora_B.bias * scaling
        return out
    return t


def _write_weights(base: Checkpoint, adapter: _Adapter, out_dir: Path, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Mirror the base's shard files (same names, tensors, dtypes unless `dtype` is given, and metadata) and index, one
    shard at a time; each shard is written front to back as its tensors are computed, so memory holds a few tensors,
    not a shard."""
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in base.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for file, infos in by_file.items():
        infos.sort(key=lambda i: i.start)  # read each input front to back too
        _, metadata = read_header(file)
        entries = [(i.name, _out_dtype(i.dtype, dtype), i.shape) for i in infos]
        shard = ShardFile(out_dir / file.name, entries, metadata)
        try:
            for info in infos:
                shard.write(info.name, _merged(info.name, base, adapter, dtype))
        finally:
            shard.close()
    index = model_file(base.path, "model.safetensors.index.json")
    if index is not None and dtype is None:
        shutil.copyfile(index, out_dir / index.name)
    elif index is not None:  # the same weight map; the byte count follows the new dtype
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = sum(
            dtype_size(_out_dtype(i.dtype, dtype)) * math.prod(i.shape) for i in base.tensors.values())
        (out_dir / index.name).write_text(json.dumps(data, indent=2) + "\n")
    return {"lora_tensors": len(adapter.loras) + len(adapter.bias_loras), "replaced_tensors": len(adapter.replace)}


def _write_config_dtype(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """The base's config.json saying the dtype the folder now holds (save_pretrained writes the loaded dtype)."""
    cfg = json.loads(src.read_text())
    cfg["dtype"] = DTYPE_NAME[dtype]
    if "torch_dtype" in cfg:  # transformers before 4.56 reads only this name
        cfg["torch_dtype"] = cfg["dtype"]
    dst.write_text(json.dumps(cfg, indent=2) + "\n")
