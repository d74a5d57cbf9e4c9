"""From a config to one task per output tensor, reading nothing but headers.

Everything that can be wrong with a merge (a missing model, a missing tensor, shapes that disagree, a layer range past
the end, a parameter the method does not take) is found here, before any tensor is read or anything is written.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from merging.checks import (check_nan_policy, check_parameter_values, check_task_parameters, current_nan_policy,
                            parameter_kind, parameter_scopes, typed_value)
from merging.config import InputSlice, MergeConfig, ModelRef, OutputSlice, evaluate
from merging.errors import ConfigError, InputError
from merging.hub import looks_like_hub_id
from merging.io import Checkpoint
from merging.modules import DEFAULT, DEPTH_KEYS, MODULES, architecture, module_names, module_of
from merging.tokenizer import Alignment, OutputVocab, build_vocab
import merging.methods  # noqa: F401  (importing the package registers every method)
from merging.methods.registry import REGISTRY, MethodSpec

# a layer's tensors: `<stack>.<index>.<rest>`; the stack may be the whole prefix (GPT-2's own files name `h.0.attn`)
LAYER_RE = re.compile(r"^((?:.*?\.)?(?:layers|h|blocks|block|layer))\.(\d+)\.(.+)$")
PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings", "tok_embeddings")
# vision towers' input side (patch convolution, pre-norm), laid out before their layers as mergekit's pre_weights
PRE_VISION = ("ln_pre", "patch_conv", "layernorm_pre", ".conv1.", ".conv2.")
OUTPUT_HEADS = ("lm_head", "embed_out")  # output projections (GPT-NeoX's `embed_out` matches "embed" but is one)
TORCH_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass
class TensorTask:
    name: str  # output tensor name
    method: str
    inputs: list[tuple[int, str]]  # (model index, tensor name), the non-base models in config order
    base: Optional[tuple[int, str]]
    per_model: dict[str, list[Any]]
    global_params: dict[str, Any]
    dtype: torch.dtype  # output dtype
    shape: tuple[int, ...]
    compute_dtype: Optional[torch.dtype]
    align: Optional[Alignment] = None  # tokenizer policy: re-index the inputs' vocabulary rows before the method
    # side inputs (MethodSpec.side_inputs): per parameter, per model, (index in Plan.side_files, tensor) or None
    side: dict[str, list[Optional[tuple[int, str]]]] = field(default_factory=dict)


class SideFile:
    """A safetensors file of per-tensor statistics a method reads beside the models (RegMean's Gram matrices).

    Its header metadata may map tensor names to the stored name they share (`alloy.aliases`, JSON): layers that read
    the same input (q/k/v projections) have one Gram matrix."""

    def __init__(self, path: Path, parameter: str, given: str, nan_policy: str = "refuse"):
        import json

        from merging.io import read_header

        # `given`: the path as the config wrote it, which the manifest records (a resolved absolute path would
        # make the same merge's manifest differ between two clones of a project)
        self.path, self.parameter, self.given = path, parameter, given
        self.checkpoint = Checkpoint(path, nan_policy=nan_policy)  # a NaN statistic spreads to every merged value
        _, meta = read_header(path)
        try:
            self.aliases: dict[str, str] = json.loads(meta.get("alloy.aliases", "{}"))
        except ValueError:
            raise InputError(f"{path}: invalid alloy.aliases metadata") from None

    def stored_name(self, name: str) -> Optional[str]:
        stored = self.aliases.get(name, name)
        return stored if stored in self.checkpoint else None


@dataclass
class Plan:
    config: MergeConfig
    models: list[ModelRef]
    checkpoints: list[Checkpoint]
    tasks: list[TensorTask]
    base_index: Optional[int]
    num_layers: Optional[int]  # of the output, for config.json
    template_index: int  # the model whose config/tokenizer/non-layer layout the output follows
    notes: list[str] = field(default_factory=list)
    vocab: Optional[OutputVocab] = None  # the output vocabulary when a tokenizer policy re-aligns embeddings
    side_files: list["SideFile"] = field(default_factory=list)  # statistics files a method reads beside the models
    adapters: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # `base+adapter` key -> (base, adapter folders)
    untied: bool = False  # the template is tied, but the output has an lm_head (another model had one)
    depths: dict[str, int] = field(default_factory=dict)  # a modular model's config.json depth keys, as merged

    @property
    def bytes_in(self) -> int:
        total = 0
        for t in self.tasks:
            for m, name in t.inputs + ([t.base] if t.base else []):
                total += self.checkpoints[m].info(name).nbytes
        return total


def resolve_model_path(ref: ModelRef, search: list[Path]) -> Path:
    """A local folder as given, else relative to each search folder; hub ids are resolved by the download step."""
    p = Path(ref.path).expanduser()
    if p.is_absolute():
        return p
    for root in search:
        if (root / p).exists():
            return root / p
    return p


def default_lora_cache() -> Path:
    """Where `base+adapter` models are merged once and kept (mergekit's --lora-merge-cache)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "alloy" / "lora"


def _local_folder(ref: Any, what: str, search: list[Path], model_paths: dict[str, Path] | None) -> Path:
    """A model or adapter reference as a local folder: mapped by the caller, found locally, or fetched from the hub."""
    key = str(ref)
    path = Path((model_paths or {}).get(key) or resolve_model_path(ref, search))
    if not path.exists() and looks_like_hub_id(ref.path):
        from merging.hub import fetch

        try:
            path, _ = fetch(ref.path, ref.revision)
        except ValueError as e:  # huggingface_hub's id validation: `org/..` is neither a folder nor a repo
            raise InputError(f"{what} {key!r}: not a local folder, and not a valid hub id ({e})") from None
        except InputError as e:
            if what == "model":
                raise
            raise InputError(f"{what}: {e}") from None  # which reference it was: an adapter, a tokenizer source
    if not path.exists():
        raise InputError(f"{what} {key!r}: path {path} does not exist")
    return path


def local_model(ref: ModelRef, search: list[Path], model_paths: dict[str, Path] | None = None,
                lora_cache: str | Path | None = None, lora_dtype: torch.dtype | None = None
                ) -> tuple[Path, Optional[tuple[Path, Path]]]:
    """A model reference as a local checkpoint folder (a `base+adapter` one merged into the LoRA cache first), and
    for those the (base, adapter) folders."""
    path = _local_folder(ref.base, "model", search, model_paths)
    if ref.lora is None:
        return path, None
    from merging.lora import materialize_lora

    adapter = _local_folder(ref.lora, "LoRA adapter", search, model_paths)
    merged = materialize_lora(path, adapter, Path(lora_cache) if lora_cache else default_lora_cache(), lora_dtype)
    return merged, (path, adapter)


def num_layers_of(ckpt: Checkpoint) -> int:
    cfg = ckpt.config
    for key in LAYER_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    if isinstance(cfg.get("text_config"), dict):
        for key in LAYER_KEYS:
            if isinstance(cfg["text_config"].get(key), int):
                return cfg["text_config"][key]
    idx = [int(m.group(2)) for n in ckpt.tensors if (m := LAYER_RE.match(n))]
    return max(idx) + 1 if idx else 0


def _split(name: str) -> Optional[tuple[str, int, str]]:
    m = LAYER_RE.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def _method(config: MergeConfig) -> MethodSpec | None:
    if config.merge_method == "passthrough":
        return None
    if config.merge_method not in REGISTRY:
        near = difflib.get_close_matches(config.merge_method, list(REGISTRY) + ["passthrough"], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"merge_method: unknown method {config.merge_method!r}{hint}")
    return REGISTRY[config.merge_method]


def _check_parameter_names(config: MergeConfig, spec: MethodSpec | None) -> None:
    allowed = {"scale"} if spec is None else spec.parameters
    name = config.merge_method
    for where, params, _ in parameter_scopes(config):
        for key in params or {}:
            if key not in allowed:
                near = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (it takes: {', '.join(sorted(allowed)) or 'none'})"
                raise ConfigError(f"{where}.{key}: method {name!r} has no parameter {key!r}{hint}")


def check_config(config: MergeConfig) -> MethodSpec | None:
    """What can be checked of a config without its models: the method, its parameters' names, types and ranges."""
    spec = _method(config)
    _check_parameter_names(config, spec)
    check_parameter_values(config, per_model=set(spec.per_model) if spec else {"scale"},
                           shared=set(spec.globals) if spec else set())
    return spec


def _normalised_slices(models: list, base: Optional[ModelRef], depth) -> list[OutputSlice]:
    """`models:` as one slice of each model's whole depth (depth: ModelRef -> layers)."""
    sources = [InputSlice(model=m.model, layer_range=(0, max(depth(m.model), 1)), parameters=m.parameters)
               for m in models]
    if base is not None and all(str(s.model) != str(base) for s in sources):
        # as mergekit does, for every method: a base_model not listed under models is one more input, which methods
        # without a base (linear, karcher) then merge like the others
        sources.append(InputSlice(model=base, layer_range=(0, max(depth(base), 1))))
    return [OutputSlice(sources=sources)]


def _check_no_duplicate_inputs(slices: list[OutputSlice], at: str, from_slices: bool) -> None:
    """One entry per model in a merge (as mergekit: 'Duplicate merge inputs'): a second entry would take the first
    one's parameters, so its weight would silently count double."""
    for i, sl in enumerate(slices):
        first: dict[str, int] = {}
        for j, src in enumerate(sl.sources):
            key = str(src.model)
            if key in first:
                where, was = ((f"{at}slices[{i}].sources[{j}]", f"{at}slices[{i}].sources[{first[key]}]")
                              if from_slices else (f"{at}models[{j}]", f"{at}models[{first[key]}]"))
                raise ConfigError(f"{where}.model: {key} is already {was}; list each model once per merge")
            first[key] = j


class _Params:
    """Parameter lookup with mergekit's precedence: model-in-slice, slice, module, top level; first non-None wins."""

    def __init__(self, config: MergeConfig, out_slice: OutputSlice, module_params: Optional[dict] = None):
        self.config, self.slice, self.module_params = config, out_slice, module_params

    def get(self, name: str, tensor_name: str, t: float, model: Optional[ModelRef] = None) -> Any:
        method = self.config.merge_method
        interpolate = parameter_kind(method, name) in ("int", "number")
        scopes = [src.parameters for src in self.slice.sources if model is not None and str(src.model) == str(model)]
        for params in (*scopes, self.slice.parameters, self.module_params, self.config.parameters):
            if params and name in params:
                v = evaluate(params[name], tensor_name, t, interpolate=interpolate)
                if v is not None:
                    return typed_value(method, name, v, tensor_name)
        return None


def build_plan(config: MergeConfig, *, search_paths: list[Path] | None = None, dtype: str | None = None,
               model_paths: dict[str, Path] | None = None, allow_pickle: bool = False,
               nan_policy: str | None = None, lora_cache: str | Path | None = None,
               lora_dtype: str | None = None, allow_crimes: bool = False) -> Plan:
    """Resolve models, read their headers, and lay out every output tensor with its inputs and parameters.

    nan_policy: what reading a NaN/Inf input tensor does later, "refuse" or "warn" (default: the policy of the
    enclosing merging.checks.nan_policy context, itself "refuse").
    lora_cache: where `base+adapter` references are merged into full checkpoints (default: default_lora_cache()).
    lora_dtype: the dtype they are merged in (mergekit's --lora-merge-dtype; default: the base's).
    allow_crimes: merge models whose config.json names different architectures (mergekit's --allow-crimes); their
    tensors must still match by name and shape.
    """
    lora_torch_dtype = TORCH_DTYPES.get(lora_dtype.removeprefix("torch.")) if lora_dtype is not None else None
    if lora_dtype is not None and lora_torch_dtype is None:
        raise ConfigError(f"--lora-merge-dtype {lora_dtype!r}: expected one of float32, float16, bfloat16, float64")
    spec = check_config(config)
    policy = check_nan_policy(nan_policy) if nan_policy is not None else current_nan_policy()
    search = [Path.cwd()] + list(search_paths or [])
    refs = config.referenced_models()
    ckpts: dict[str, Checkpoint] = {}
    adapters: dict[str, tuple[Path, Path]] = {}
    for ref in refs:
        key = str(ref)
        path = (model_paths or {}).get(key)
        if path is None:
            path, adapter = local_model(ref, search, model_paths, lora_cache, lora_torch_dtype)
            if adapter is not None:
                adapters[key] = adapter
        ckpts[key] = Checkpoint(path, allow_pickle=allow_pickle, nan_policy=policy)
    layers = {k: num_layers_of(c) for k, c in ckpts.items()}
    models = refs
    index = {str(r): i for i, r in enumerate(models)}
    checkpoints = [ckpts[str(r)] for r in models]

    base = config.base_model
    uses_base = bool(spec and spec.base)
    first_group = config.modules[next(iter(config.modules))] if config.modules else config
    first_ref = first_group.models[0].model if first_group.models else first_group.slices[0].sources[0].model
    template = index[str(base)] if base is not None else index[str(first_ref)]
    arch = architecture(checkpoints[template].config)
    groups = _groups(config, arch)
    names = _Names(models, checkpoints, _module_membership(arch, groups, models, checkpoints))
    one_stack = {str(r): len(stacks_of(list(ck.tensors))) <= 1 for r, ck in zip(models, checkpoints)}

    def depth(ref: ModelRef, module: Optional[str], stack: Optional[str]) -> int:
        """A model's layers in one stack: its config's count for a one-stack model, else counted from names."""
        if stack is None:
            return 0
        if one_stack[str(ref)]:
            return layers[str(ref)]
        idx = [s[1] for n in names(ref, module) if (s := _split(n)) and s[0] == stack]
        return max(idx) + 1 if idx else 0

    group_layouts = []  # per group: (group, [(stack, slices)])
    for g in groups:
        stacks = stacks_of(names(models[template], g.module))
        if g.slices and len(stacks) > 1:
            spans = ", ".join(f"{st}: {depth(models[template], g.module, st)} layers" for st in stacks)
            raise ConfigError(f"{g.at}slices: model {models[template]} has several layer stacks ({spans}), and a "
                              "layer_range cannot say which it counts; merge it with models:, or, for an "
                              f"architecture alloy knows the modules of ({', '.join(sorted(MODULES))}), with modules:")
        if g.models:
            runs = [(st, _normalised_slices(g.models, base, lambda r, st=st: depth(r, g.module, st)))
                    for st in (stacks or [None])]
        else:
            runs = [(stacks[0] if stacks else None, g.slices)]
        slices = runs[0][1]
        if spec and spec.base is True:
            # as in mergekit, a slice may name its own base_model in place of the top-level one
            missing = [i for i, sl in enumerate(slices) if (sl.base_model or base) is None]
            if missing:
                where = "base_model" if len(missing) == len(slices) else f"{g.at}slices[{missing[0]}].base_model"
                raise ConfigError(f"{where}: method {config.merge_method!r} needs a base_model")
        _check_no_duplicate_inputs(slices, g.at, from_slices=bool(g.slices))
        group_layouts.append((g, runs))
    compute = TORCH_DTYPES[dtype or config.dtype] if (dtype or config.dtype) else None
    out_dtype_cfg = TORCH_DTYPES[config.out_dtype] if config.out_dtype else None
    if not allow_crimes:
        _check_architectures(models, checkpoints)
    vocab = build_vocab(config, models, checkpoints, _outside_tokenizer(config, index, search, model_paths))

    tasks: list[TensorTask] = []
    seen_out: set[str] = set()
    side_files: list[SideFile] = []
    side_index: dict[tuple[str, Path], int] = {}

    def side_entries(p: str, paths: list[Any], entries: list, out_name: str, shape: tuple[int, ...]) -> list:
        """Open each model's statistics file once; find this tensor's entry, checked against the tensor's shape."""
        found = []
        for path, (ref, (_, name)) in zip(paths, entries):
            f = Path((model_paths or {}).get(path, path)).expanduser()  # the pipeline maps its files like models
            if not f.is_absolute():
                f = next((d / f for d in search if (d / f).exists()), f)
            if not f.is_file():
                raise InputError(f"parameters.{p} of model {ref}: file {path} does not exist")
            key = (p, f.resolve())
            if key not in side_index:
                side_index[key] = len(side_files)
                side_files.append(SideFile(f, p, str(path), policy))
            sf = side_files[side_index[key]]
            stored = sf.stored_name(name)
            if stored is not None and len(shape) == 2:
                got = sf.checkpoint.info(stored).shape
                if got != (shape[1], shape[1]):
                    raise InputError(f"{f}: {p} of tensor {name!r} has shape {list(got)}, expected "
                                     f"{[shape[1], shape[1]]} (is it another model's file?)")
            found.append((side_index[key], stored) if stored is not None else None)
        have = [str(ref) for (ref, _), e in zip(entries, found) if e is not None]
        if have and len(have) != len(found):
            missing = next((paths[i], str(entries[i][0])) for i, e in enumerate(found) if e is None)
            raise InputError(f"{missing[0]}: no {p} for tensor {out_name!r} of model {missing[1]}, while the file of "
                             f"{have[0]} has one")
        return found

    def add(out_name: str, in_names: list[tuple[ModelRef, str]], params: _Params, t: float, slice_base: Optional[ModelRef]) -> None:
        if out_name in seen_out:
            raise ConfigError(f"slices: output tensor {out_name!r} would be written twice")
        seen_out.add(out_name)
        base_ref = slice_base if uses_base else None
        entries = []
        base_entry = None
        for ref, name in in_names:
            ck = ckpts[str(ref)]
            if name not in ck:
                has = next((str(r) for r, n in in_names if n in ckpts[str(r)]), None)
                raise InputError(f"model {ref}: tensor {name!r} is missing{f', but {has} has it' if has else ''} "
                                 f"({ck.path}); merged models need the same tensors: is it another architecture, "
                                 "or a partial or adapter-only checkpoint?")
            if base_ref is not None and str(ref) == str(base_ref):
                base_entry = (index[str(ref)], name)
            else:
                entries.append((ref, (index[str(ref)], name)))
        if base_ref is not None and base_entry is None:
            raise ConfigError(f"base_model {base_ref} is not among the sources of the slice producing {out_name!r}")
        infos = [(ref, ckpts[str(ref)].info(n)) for ref, n in in_names]
        shape0 = infos[0][1].shape
        align = None
        if vocab is not None and vocab.is_vocab_tensor(out_name, {str(r): i.shape for r, i in infos}):
            slots, k = [], 0
            for ref, _ in in_names:  # where each input sits in the task: its inputs in order, then its base
                is_base = base_entry is not None and str(ref) == str(base_ref)
                slots.append(len(entries) if is_base else k)
                k += not is_base
            align = vocab.alignment(out_name, [str(r) for r, _ in in_names], str(slice_base) if slice_base else None,
                                    slots)
            if align is not None:
                shape0 = (vocab.rows, *shape0[1:])
        for ref, info in infos[1:]:
            if info.shape != shape0 and (align is None or info.shape[1:] != shape0[1:]):
                vocab_like = any(h in out_name for h in PRE_HINTS) or "lm_head" in out_name
                if vocab_like and len(shape0) == len(info.shape) == 2 and shape0[1] == info.shape[1]:
                    raise InputError(
                        f"tensor {out_name!r}: vocabulary sizes differ ({shape0[0]} rows in {infos[0][0]}, "
                        f"{info.shape[0]} in {ref}); re-align them with tokenizer_source: union (or base, or a "
                        "tokenizer: section) on models that ship tokenizer files, or merge models that share one tokenizer")
                raise InputError(f"tensor {out_name!r}: shape {list(shape0)} in {infos[0][0]} but {list(info.shape)} "
                                 f"in {ref}; merged models must have the same shapes (same architecture and size)")
        if spec is None:
            if len(entries) != 1:
                raise ConfigError(f"passthrough takes exactly one source per slice; {out_name!r} has {len(entries)}")
            scale = params.get("scale", entries[0][1][1], t, entries[0][0])  # per input: filters see its name
            per_model = {"scale": [scale]}
            glob: dict[str, Any] = {}
        else:
            spec.check_models(len(entries), base_entry is not None)
            per_model = {}
            for p, default in spec.per_model.items():
                vals = []
                for ref, (mi, name) in entries:
                    v = params.get(p, name, t, ref)
                    vals.append(default if v is None else v)
                per_model[p] = vals
            glob = {}
            for p, default in spec.globals.items():
                v = params.get(p, out_name, t, None)
                glob[p] = default if v is None else v
            for p in sorted(spec.required & set(spec.globals)):
                if glob.get(p) is None:
                    raise ConfigError(f"parameters.{p}: method {spec.name!r} needs it (tensor {out_name!r})")
            for p, vals in per_model.items():
                if any(v is None for v in vals) and p in spec.required:
                    missing = [str(ref) for (ref, _), v in zip(entries, vals) if v is None]
                    raise ConfigError(f"parameters.{p}: required for model {missing[0]} (tensor {out_name!r})")
            check_task_parameters(spec.name, [str(ref) for ref, _ in entries], per_model, glob, out_name)
        # with neither dtype nor out_dtype set, inputs of several dtypes give their common one (bf16 and fp32 give
        # fp32), as mergekit's torch arithmetic does
        out_dtype = out_dtype_cfg or compute or functools.reduce(torch.promote_types, (i.dtype for _, i in infos))
        side = {p: side_entries(p, per_model[p], entries, out_name, tuple(shape0))
                for p in (spec.side_inputs if spec else ())}
        tasks.append(TensorTask(out_name, config.merge_method, [e for _, e in entries], base_entry, per_model,
                                glob, out_dtype, tuple(shape0), compute, align, side))

    out_depths: dict[str, int] = {}  # config.json key -> the output's layers in that module
    total_layers: Optional[int] = None
    untied = False
    for g, runs in group_layouts:
        n_out, head_out = _lay_out_group(config, g, runs, models[template], names, depth, add, base)
        if g.module is None:
            total_layers = next(iter(n_out.values())) if len(n_out) == 1 else None
        elif len(n_out) == 1:
            out_depths.update({key: n_out[next(iter(n_out))] for key in DEPTH_KEYS.get(g.module, ())})
        # the template is tied, but the output has an lm_head (another model had one)
        untied |= head_out and not any(any(h in n for h in OUTPUT_HEADS) for n in names(models[template], g.module))
    return Plan(config, models, checkpoints, tasks, index[str(base)] if base is not None else None,
                total_layers, template, untied=untied, notes=list(vocab.notes) if vocab else [], vocab=vocab, side_files=side_files,
                adapters=adapters, depths=out_depths)


@dataclass
class _Group:
    """What one module merges (module None: the whole model), from `models:` or `slices:`, with its parameters."""
    module: Optional[str]
    models: Optional[list] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict] = None
    at: str = ""  # the key path of its entries in error messages


def _groups(config: MergeConfig, arch: Optional[str]) -> list[_Group]:
    """The config as merges of modules: `models:` merges every module of a modular model (as mergekit does)."""
    modular = arch in MODULES
    if config.modules:
        allowed = module_names(arch)
        for key in config.modules:
            if key not in allowed:
                near = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise ConfigError(f"modules.{key}: {hint}{arch or 'the model'} has the module(s) {', '.join(allowed)}")
        if not modular:  # `default`: the whole model, with the module's parameters between slice and top level
            mod = config.modules[DEFAULT]
            return [_Group(None, mod.models, mod.slices, mod.parameters, f"modules.{DEFAULT}.")]
        return [_Group(k, m.models, m.slices, m.parameters, f"modules.{k}.") for k, m in config.modules.items()]
    if config.slices and modular:
        raise ConfigError(f"slices: {arch} has the modules {', '.join(module_names(arch))}, each with its own "
                          "layers; cut them with modules: (each module with its slices), as mergekit requires")
    if modular:
        return [_Group(k, config.models) for k in module_names(arch)]
    return [_Group(None, config.models, config.slices)]


def _module_membership(arch: Optional[str], groups: list[_Group], models: list[ModelRef],
                       checkpoints: list[Checkpoint]) -> dict[tuple[int, Optional[str]], list[str]]:
    """(model index, module) -> the model's tensor names in that module, in file order; module None: all of them.

    A modular model's tensor outside every module, or in a module the config leaves out, is refused: the output
    would lack it (mergekit writes only the listed modules, a model that no longer loads)."""
    out: dict[tuple[int, Optional[str]], list[str]] = {}
    listed = {g.module for g in groups}
    for i, (ref, ck) in enumerate(zip(models, checkpoints)):
        out[(i, None)] = list(ck.tensors)
        if arch not in MODULES:
            continue
        for m in module_names(arch):
            out[(i, m)] = []
        for n in ck.tensors:
            m = module_of(arch, n)
            if m is None:
                raise InputError(f"model {ref}: tensor {n!r} belongs to none of {arch}'s modules "
                                 f"({', '.join(module_names(arch))}); alloy cannot tell how to merge it ({ck.path})")
            if m not in listed:
                count = sum(module_of(arch, x) == m for x in ck.tensors)
                raise ConfigError(f"modules: {m} ({count} tensors of model {ref}) is not listed; list every module "
                                  f"of {arch} ({', '.join(module_names(arch))}), or the output would lack it")
            out[(i, m)].append(n)
    return out


class _Names:
    """Each model's tensor names in a module (None: all of them), and its checkpoint."""

    def __init__(self, models: list[ModelRef], checkpoints: list[Checkpoint],
                 membership: dict[tuple[int, Optional[str]], list[str]]):
        self._index = {str(r): i for i, r in enumerate(models)}
        self._checkpoints, self._membership = checkpoints, membership

    def __call__(self, ref: ModelRef, module: Optional[str]) -> list[str]:
        return self._membership[(self._index[str(ref)], module)]

    def checkpoint(self, ref: ModelRef) -> Checkpoint:
        return self._checkpoints[self._index[str(ref)]]


def stacks_of(names: list[str]) -> list[str]:
    """The layer stacks among tensor names (`model.layers`, `vision_tower.transformer.layers`), in name order."""
    return sorted({m.group(1) for n in names if (m := LAYER_RE.match(n))})


def _lay_out_group(config: MergeConfig, g: _Group, runs: list[tuple[Optional[str], list[OutputSlice]]],
                   template_ref: ModelRef, names: _Names, depth, add, base: Optional[ModelRef]
                   ) -> tuple[dict[str, int], bool]:
    """One module's output tensors, in output order: those before the layers (embeddings), each stack's layers,
    those after (final norm, head). Returns each stack's output depth, and whether the output has a head."""
    module = g.module

    def config_params(sl: OutputSlice) -> _Params:
        return _Params(config, sl, g.parameters)

    first, last = runs[0][1][0], runs[0][1][-1]
    non_layer = [n for n in names(template_ref, module) if _split(n) is None]
    pre = [n for n in non_layer if any(h in n for h in PRE_HINTS + PRE_VISION) and not any(h in n for h in OUTPUT_HEADS)]
    post = [n for n in non_layer if n not in pre]

    def sources_for(sl: OutputSlice) -> list[ModelRef]:
        return [s.model for s in sl.sources]

    # tied and untied checkpoints of one family mixed (a fine-tune saved with its own lm_head): as mergekit does,
    # the output has the head when any model has one, and a tied model gives its embedding matrix in its place
    tied_alias: dict[tuple[str, str], str] = {}
    heads = {n for n in post if any(h in n for h in OUTPUT_HEADS)} | {
        n for m in sources_for(last) for n in names(m, module)
        if _split(n) is None and any(h in n for h in OUTPUT_HEADS)}
    for head in sorted(heads):
        donor_ref = next(m for m in sources_for(last) + [template_ref] if head in names(m, module))
        shape = names.checkpoint(donor_ref).info(head).shape
        for m in sources_for(last):
            if head not in names(m, module):
                ck = names.checkpoint(m)
                alias = _tied_embedding(ck, names(m, module), shape)
                if alias is None:
                    has = next((x for x in sources_for(last) if head in names(x, module)), template_ref)
                    why = ("though its config says tie_word_embeddings: false" if _says_untied(ck)
                           else "and no tied embedding of its shape to stand for it")
                    raise InputError(f"model {m}: has no {head!r} {why}, while {has} has one ({ck.path}); merged "
                                     "models need the same tensors (a partial checkpoint?)")
                tied_alias[(str(m), head)] = alias
        if head not in post:
            post.append(head)

    for m in sources_for(first):
        _check_no_extra(m, [n for n in names(m, module) if _split(n) is None and n not in post], set(pre), template_ref)
    for m in sources_for(last):
        _check_no_extra(m, [n for n in names(m, module) if _split(n) is None and n not in pre], set(post), template_ref)
    for n in pre:
        add(n, [(m, n) for m in sources_for(first)], config_params(first), 0.0, first.base_model or base)

    out_depth: dict[str, int] = {}
    for stack, slices in runs:
        if stack is None:  # no layers here (a projector module): every tensor is laid out above or below
            if g.slices:
                raise ConfigError(f"{g.at}slices: model {template_ref} has no layers alloy recognises (names like "
                                  "model.layers.N.*) to take a layer_range of; merge it with models:")
            continue
        out_layer = 0
        for si, sl in enumerate(slices):
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
            if len(lengths) != 1:
                spans = ", ".join(f"{s.model}: {s.layer_range[1] - s.layer_range[0]}" for s in sl.sources)
                if g.models:  # the user wrote `models:`; the ranges are each model's whole depth
                    raise InputError(f"the models have different numbers of layers ({spans}{f' in {stack}' if stack else ''}); "
                                     "merged models must have the same architecture and size (or pick layers with "
                                     "slices: and layer_range)")
                raise ConfigError(f"{g.at}slices[{si}].sources: all sources of a slice must span the same number of "
                                  f"layers ({spans})")
            for j, s in enumerate(sl.sources):
                have = depth(s.model, module, stack)
                if s.layer_range[1] > have:
                    raise ConfigError(f"{g.at}slices[{si}].sources[{j}].layer_range: {list(s.layer_range)} goes beyond "
                                      f"model {s.model}, which has {have} layers")
            n_layers = lengths.pop()
            params = config_params(sl)
            ref0 = sl.sources[0]
            for k in range(n_layers):
                t = k / (n_layers - 1) if n_layers > 1 else 1.0
                in_layer0 = ref0.layer_range[0] + k
                suffixes = _layer_tensors(names(ref0.model, module), in_layer0, stack)
                if not suffixes and depth(ref0.model, module, stack) > 0:
                    raise InputError(f"model {ref0.model} has no tensors for layer {in_layer0}")
                for s in sl.sources[1:]:
                    layer = s.layer_range[0] + k
                    theirs = [f"{p}.{layer}.{x}" for p, x in _layer_tensors(names(s.model, module), layer, stack)]
                    _check_no_extra(s.model, theirs, {f"{p}.{layer}.{x}" for p, x in suffixes}, ref0.model,
                                    f" (its layer {in_layer0})")
                for prefix, suffix in suffixes:
                    out_name = f"{prefix}.{out_layer}.{suffix}"
                    ins = [(s.model, f"{prefix}.{s.layer_range[0] + k}.{suffix}") for s in sl.sources]
                    add(out_name, ins, params, t, sl.base_model or base)
                out_layer += 1
        if stack is not None:
            out_depth[stack] = out_layer

    for n in post:
        # mergekit 0.1.5 evaluates gradients at t=0 for every non-layer tensor, the final norm and lm_head too
        add(n, [(m, tied_alias.get((str(m), n), n)) for m in sources_for(last)], config_params(last), 0.0,
            last.base_model or base)
    return out_depth, any(any(h in n for h in OUTPUT_HEADS) for n in post)


def _layer_tensors(names: list[str], layer: int, stack: Optional[str]) -> list[tuple[str, str]]:
    """(stack, suffix) of the tensors of one layer, in one stack (None: any)."""
    return [(s[0], s[2]) for n in names if (s := _split(n)) and s[1] == layer and (stack is None or s[0] == stack)]


def _outside_tokenizer(config: MergeConfig, index: dict[str, int], search: list[Path],
                       model_paths: dict[str, Path] | None) -> Optional[Path]:
    """The folder of a tokenizer source that is not among the merged models (mergekit takes only its tokenizer)."""
    section = config.tokenizer
    source = section.source if section is not None else config.tokenizer_source
    if source is None or source in ("union", "base") or str(source) in index:
        return None
    key = "tokenizer.source" if section is not None else "tokenizer_source"
    if source.lora is not None:
        raise ConfigError(f"{key}: {source} carries a LoRA adapter; a tokenizer source is a plain model or folder")
    return _local_folder(source, key, search, model_paths)


def _says_untied(ck: Checkpoint) -> bool:
    text = ck.config.get("text_config")
    return ck.config.get("tie_word_embeddings") is False or (isinstance(text, dict)
                                                              and text.get("tie_word_embeddings") is False)


def _tied_embedding(ck: Checkpoint, names: list[str], shape: tuple[int, ...]) -> Optional[str]:
    """The input embedding a tied checkpoint uses as its output head: refused when its config says it is untied."""
    if _says_untied(ck):
        return None
    found = [n for n in names if _split(n) is None and any(h in n for h in PRE_HINTS)
             and not any(h in n for h in OUTPUT_HEADS) and tuple(ck.info(n).shape) == tuple(shape)]
    return found[0] if len(found) == 1 else None


def _check_no_extra(ref: ModelRef, names: list[str], expected: set[str], template: ModelRef,
                    where: str = "") -> None:
    """A tensor only some models have would be dropped without a word: the output follows one model's names."""
    extra = sorted(n for n in names if n not in expected)
    if extra and str(ref) != str(template):
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise InputError(f"model {ref}: tensor {extra[0]!r}{more and f' ({more.strip()})'} has no counterpart in {template}{where}, whose "
                         f"tensor names the output follows, so it would be dropped; merged models need the same "
                         "tensors (another architecture? tie_word_embeddings differing?)")


def _check_architectures(models: list[ModelRef], ckpts: list[Checkpoint]) -> None:
    archs = {}
    for ref, ck in zip(models, ckpts):
        a = ck.config.get("architectures") or [ck.config.get("model_type")]
        archs[str(ref)] = a[0] if a else None
    known = {k: v for k, v in archs.items() if v}
    if len(set(known.values())) > 1:
        (m1, a1), (m2, a2) = [(k, v) for k, v in known.items()][:1] + [
            (k, v) for k, v in known.items() if v != next(iter(known.values()))][:1]
        raise InputError(f"architectures differ: {m1} is {a1} but {m2} is {a2}; alloy merges models of one "
                         "architecture (fine-tunes of one base model): pick models of the same family, or pass "
                         "--allow-crimes to merge them anyway")
