"""Everything in a merged folder besides the weights: index, config, tokenizer, model card, manifest."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from merging.config import ModelRef
from merging.errors import ConfigError, InputError
from merging.hub import snapshot_repo_id
from merging.hashing import file_sha256
from merging.lora import MANIFEST as LORA_MANIFEST
from merging.io import DTYPE_NAME, ShardLayout, model_file
from merging.methods import REGISTRY
from merging.plan import Plan
from merging.tokenizer import CHAT_TEMPLATES, save_tokenizer

log = logging.getLogger("alloy")

TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
BUILTIN_TEMPLATES = CHAT_TEMPLATES  # chatml, llama3, mistral, alpaca, exaone (merging.tokenizer)
CHATML = CHAT_TEMPLATES["chatml"]


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("alloy", "torch", "safetensors", "transformers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _path_of(plan: Plan, ref: ModelRef) -> Path:
    return plan.checkpoints[[str(m) for m in plan.models].index(str(ref))].path


def _copy_path(cfg: dict, parents: list[str]) -> dict:
    """The dict at cfg[p0][p1]..., copied on the way down so the template's own config is left as it was."""
    node = cfg
    for p in parents:
        node[p] = dict(node[p])
        node = node[p]
    return node


def _resize_layer_types(cfg: dict, n: int) -> None:
    """Newer transformers configs list one type per layer: keep the list as long as the layers."""
    if isinstance(cfg.get("layer_types"), list):
        types = cfg["layer_types"]
        cfg["layer_types"] = [types[min(i, len(types) - 1)] for i in range(n)]


def output_config(plan: Plan) -> dict:
    cfg = dict(plan.checkpoints[plan.template_index].config)
    if plan.num_layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in cfg:
                cfg[key] = plan.num_layers
                break
        _resize_layer_types(cfg, plan.num_layers)
    for path, n in plan.depths.items():  # a modular model's module depths (text_config.num_hidden_layers, ...)
        *parents, key = path.split(".")
        parent = cfg
        for p in parents:
            parent = parent.get(p) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or key not in parent:
            continue
        parent = _copy_path(cfg, parents)
        parent[key] = n
        if key == "num_hidden_layers":
            _resize_layer_types(parent, n)
    if plan.untied:  # the output has its own lm_head: say so (transformers warns on a tied config with both)
        if isinstance(cfg.get("text_config"), dict) and "tie_word_embeddings" in cfg["text_config"]:
            cfg["text_config"] = {**cfg["text_config"], "tie_word_embeddings": False}
        cfg["tie_word_embeddings"] = False
    if plan.vocab is not None:  # a tokenizer policy sets the vocabulary (mergekit writes it whatever the policy)
        if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict):
            cfg["text_config"] = {**cfg["text_config"], "vocab_size": plan.vocab.rows}
        else:
            cfg["vocab_size"] = plan.vocab.rows
    dtypes = Counter(DTYPE_NAME.get(t.dtype, str(t.dtype)) for t in plan.tasks)
    if dtypes:
        key = "dtype" if "dtype" in cfg or "torch_dtype" not in cfg else "torch_dtype"
        cfg[key] = dtypes.most_common(1)[0][0]
    return cfg


def _tokenizer_donor(plan: Plan) -> Path:
    cfg = plan.config
    if plan.vocab is not None:
        return plan.vocab.donor
    src = cfg.tokenizer.source if cfg.tokenizer is not None else cfg.tokenizer_source
    if src is None or src == "base" or src == "union":  # union without tokenizers is refused by the planner
        if src == "base" and cfg.base_model is None:
            raise ConfigError("tokenizer_source: 'base' needs a base_model")
        return plan.checkpoints[plan.template_index].path
    if str(src) not in [str(m) for m in plan.models]:  # a source outside the merge is read into plan.vocab
        raise ConfigError(f"tokenizer_source: {src} is not one of the merged models, and none of them ships "
                          "tokenizer files to align their embeddings to its vocabulary")
    return _path_of(plan, src)


def check_tokenizer_policy(plan: Plan) -> None:
    """Everything finalize_output will need from the inputs, checked before the merge starts: the tokenizer source,
    the chat template, and the side files of every model (no link out of its folder, JSON that parses)."""
    _tokenizer_donor(plan)
    _chat_template(plan)
    check_model_files(plan)


SIDE_FILES = TOKENIZER_FILES + ("generation_config.json", "README.md", "alloy_source.json")


def check_model_files(plan: Plan) -> None:
    for ck in plan.checkpoints:
        if not ck.path.is_dir():
            continue
        for name in SIDE_FILES:
            f = model_file(ck.path, name)
            if f is not None and name in ("tokenizer_config.json", "alloy_source.json", "generation_config.json"):
                _read_json(f)


def _chat_template(plan: Plan) -> str | None:
    tpl = plan.config.chat_template
    if not tpl:
        return None
    if tpl == "auto":  # the template most models have (stripped, as mergekit compares them); ties: config order
        found = []
        for ck in plan.checkpoints:
            if not ck.path.is_dir():
                continue
            t = None
            if f := model_file(ck.path, "chat_template.jinja"):  # transformers prefers it to tokenizer_config's
                t = f.read_text()
            elif f := model_file(ck.path, "tokenizer_config.json"):
                t = _read_json(f).get("chat_template")
                if isinstance(t, list):  # named templates: the default one
                    t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
            if isinstance(t, str) and t.strip():
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if tpl in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[tpl]
    if "{" not in tpl or len(tpl) < 20:
        raise ConfigError(f"chat_template: {tpl!r} is neither 'auto', a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja template")
    return tpl


def _read_json(f: Path) -> dict:
    try:
        data = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{f}: invalid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def copy_tokenizer(plan: Plan, out: Path, *, copy_files: bool = True) -> list[str]:
    """Write the output's tokenizer: the one the config builds, else (copy_files) the donor's files; the names written.
    copy_files=False is mergekit's --no-copy-tokenizer: a built tokenizer is still written, nothing is copied."""
    donor = _tokenizer_donor(plan)
    copied = []
    if plan.vocab is not None and plan.vocab.tokenizer is not None:  # a new vocabulary (union, added tokens)
        copied = save_tokenizer(plan.vocab, out)
    elif not copy_files:
        if plan.config.chat_template:
            log.warning("alloy: chat_template is not written: no tokenizer is copied (--no-copy-tokenizer)")
        return []
    else:
        for name in TOKENIZER_FILES:
            # model_file refuses a link out of the donor's folder: its target would be copied into the output
            if donor.is_dir() and (f := model_file(donor, name)):
                shutil.copyfile(f, out / name)
                copied.append(name)
    tpl = _chat_template(plan)
    if tpl is not None:
        (out / "chat_template.jinja").write_text(tpl)
        tc = out / "tokenizer_config.json"
        if tc.exists():
            data = json.loads(tc.read_text())
            data.pop("chat_template", None)  # chat_template.jinja wins in transformers; keep one source of truth
            tc.write_text(json.dumps(data, indent=2) + "\n")
        if "chat_template.jinja" not in copied:
            copied.append("chat_template.jinja")
    return copied


def _input_card_facts(plan: Plan) -> tuple[set[str], list[str]]:
    """Licences and base models declared by the inputs (model-card front matter or alloy_source.json).

    Licences are case-folded: the Hub's identifiers are lower case ("apache-2.0"), and an input spelling one
    "Apache-2.0" declares the same licence, not a second one that would make the merge's "other"."""
    licences: set[str] = set()
    bases: list[str] = []
    for ck in plan.checkpoints:
        if not ck.path.is_dir():
            continue
        if src := model_file(ck.path, "alloy_source.json"):
            data = _read_json(src)
            if data.get("license"):
                licences.add(str(data["license"]).strip().lower())
            if data.get("base_model"):
                bases.append(data["base_model"])
        if readme := model_file(ck.path, "README.md"):
            text = readme.read_text(errors="replace")
            if text.startswith("---"):
                try:
                    front = yaml.safe_load(text.split("---", 2)[1]) or {}
                except yaml.YAMLError:
                    front = {}
                if isinstance(front, dict):
                    if front.get("license"):
                        licences.add(str(front["license"]).strip().lower())
                    b = front.get("base_model")
                    bases += [str(x) for x in (b if isinstance(b, list) else [b] if b else [])]
    return licences, list(dict.fromkeys(bases))


def _hub_ids(plan: Plan) -> list[str]:
    """The hub ids of the merged models (and of their LoRA adapters), from the snapshot folders they were read from:
    the only names the Hub accepts in a card's base_model (it refuses a commit whose card lists a local path)."""
    folders = []
    for ref, ck in zip(plan.models, plan.checkpoints):
        folders += list(plan.adapters[str(ref)]) if str(ref) in plan.adapters else [ck.path]
    return [i for i in (snapshot_repo_id(f) for f in folders) if i]


def model_card(plan: Plan, extra: dict | None, seed: int = 0) -> str:
    licences, upstream = _input_card_facts(plan)
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "alloy", plan.config.merge_method]}
    if len(licences) == 1:
        front["license"] = next(iter(licences))
    elif licences:
        front["license"] = "other"
    if bases := list(dict.fromkeys(upstream + _hub_ids(plan))):
        front["base_model"] = bases
    method = plan.config.merge_method
    spec = REGISTRY.get(method)
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", "# Merged model", "",
             f"Made with alloy using the **{method}** merge method"
             + (f" ({spec.paper})." if spec is not None and spec.paper else "."), ""]
    if plan.base_index is not None:
        lines += [f"Base model: `{plan.models[plan.base_index]}`.", ""]
    if spec is not None and spec.seeded:  # the draws are part of the recipe: the same seed rebuilds the same bytes
        lines += [f"Random seed: {seed} (`alloy merge --seed {seed}` on the same device draws the same; the "
                  "manifest, `alloy_manifest.json`, records the device and kernels).", ""]
    merged = [m for i, m in enumerate(plan.models) if i != plan.base_index]
    lines += ["## Models merged", ""] + [f"- `{m}`" for m in merged] + [""]
    if upstream:
        lines += ["## Upstream", "", "Built on " + ", ".join(f"`{b}`" for b in upstream)
                  + (f", licensed {', '.join(sorted(licences))}." if licences else "."), ""]
    for key, value in (extra or {}).items():
        lines += [f"## {key}", "", str(value), ""]
    lines += ["## Configuration", "", "```yaml", plan.config.to_yaml().strip(), "```", ""]
    return "\n".join(lines)


def finalize_output(plan: Plan, out: Path, layout: ShardLayout, tensor_sha: dict[str, str], *, seed: int,
                    extra_card: dict | None = None, run_info: dict | None = None, tokenizer: bool = True,
                    card: bool = True) -> dict:
    """Write everything but the shards: index, config, tokenizer (tokenizer=False: only one the config builds, as
    mergekit's --no-copy-tokenizer), model card and mergekit_config.yml (card=False: neither, as
    --no-write-model-card) and alloy_manifest.json; returns the manifest."""
    if len(layout.file_names) > 1:
        index = {"metadata": {"total_size": layout.total_bytes()}, "weight_map": layout.weight_map()}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(output_config(plan), indent=2) + "\n")
    template = plan.checkpoints[plan.template_index].path
    if template.is_dir() and (gen := model_file(template, "generation_config.json")):
        shutil.copyfile(gen, out / "generation_config.json")
    tokenizer_files = copy_tokenizer(plan, out, copy_files=tokenizer)
    if card:
        (out / "README.md").write_text(model_card(plan, extra_card, seed))
        # as mergekit writes beside its card: the config to merge again from (its sha256 is the manifest's config_sha256)
        (out / "mergekit_config.yml").write_text(plan.config.to_yaml())
    inputs = []
    for ref, ck in zip(plan.models, plan.checkpoints):
        entry = {"model": str(ref), "revision": ref.revision, "files": {f.name: file_sha256(f) for f in ck.files()}}
        if str(ref) in plan.adapters:  # the files above are the merged cache folder's; say what it was made from
            entry["lora"] = json.loads((ck.path / LORA_MANIFEST).read_text())
        inputs.append(entry)
    manifest = {
        "format": "alloy-manifest/1",
        "merge_method": plan.config.merge_method,
        "config": yaml.safe_load(plan.config.to_yaml()),
        "config_sha256": hashlib.sha256(plan.config.to_yaml().encode()).hexdigest(),
        "seed": seed,
        **(run_info or {}),  # device, kernels and tie rule: DARE's draws and tied selections depend on them
        "inputs": inputs,
        **({"side_inputs": [{"parameter": sf.parameter, "file": sf.given, "sha256": file_sha256(sf.path)}
                            for sf in plan.side_files]} if plan.side_files else {}),
        "outputs": {name: [n for n, _, _ in shard] for name, shard in zip(layout.file_names, layout.shards)},
        "tokenizer_files": tokenizer_files,
        "tensors": {name: tensor_sha[name] for name in sorted(tensor_sha)},
        "versions": _versions(),
    }
    nonfinite = {str(ref): sorted(ck.nonfinite) for ref, ck in zip(plan.models, plan.checkpoints) if ck.nonfinite}
    if nonfinite:  # only with --nan-policy warn: which inputs held NaN/Inf and were merged anyway
        manifest["nonfinite_inputs"] = nonfinite
    manifest["weights_sha256"] = hashlib.sha256(json.dumps(manifest["tensors"]).encode()).hexdigest()
    (out / "alloy_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
