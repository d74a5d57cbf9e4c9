"""Dense models as the experts of one Mixtral mixture-of-experts model (mergekit-moe's YAML and output).

Attention, norms, embeddings and head come from the base model; layer L's expert i is model i's MLP of layer L
(gate/up/down_proj -> w1/w3/w2, with the expert's optional noise_scale and residual_scale); layer L's router row i
points where expert i's prompts point (mergekit's gate modes):
- hidden / hidden_last: the base model's hidden state entering layer L at the prompt's last token, averaged over the
  prompts (hidden_avg: over all positions); negative prompts' vector subtracted; normalised per layer. As mergekit:
  the model runs in bfloat16, prompts are `bos + prompt` padded on the left with the bos token.
- cheap_embed: the normalised sum of the prompts' token embeddings, the same at every layer.
- random / uniform_random: seeded draws (mergekit draws from torch's global stream; with the same seed, the same).
The output is written in the checkpoint layout transformers saves Mixtral in (`block_sparse_moe.experts.N.w1`), which
every Mixtral reader takes; transformers 5 loads it into its fused experts.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merging.config import DTYPES, ModelRef, _loc, read_yaml
from merging.errors import ConfigError, InputError
from merging.io import Checkpoint, ShardFile, ShardLayout

MLP = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))  # mergekit's order (its noise draws follow it)
GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")


class Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source_model: ModelRef
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None


class MoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_model: ModelRef
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal["hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random"] = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None


def load_moe_config(path: str | Path, allow_all_same: bool = False) -> MoEConfig:
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        config = MoEConfig.model_validate(data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda er: -len(er["loc"]))
        raise ConfigError(f"{path}: {_loc(err['loc'])}: {err['msg'].removeprefix('Value error, ')}") from None
    check_moe_config(config, allow_all_same)
    return config


def check_moe_config(config: MoEConfig, allow_all_same: bool = False) -> None:
    """mergekit's refusals (is_bad_config), each naming its key; and what alloy's Mixtral output cannot hold."""
    if config.dtype is not None and config.dtype.removeprefix("torch.") not in DTYPES:
        raise ConfigError(f"dtype: unknown dtype {config.dtype!r}; expected one of float32, float16, bfloat16")
    if config.architecture is not None and not "mixtral".startswith(config.architecture.lower()):
        raise ConfigError(f"architecture: {config.architecture!r}: alloy writes Mixtral mixtures only")
    if config.shared_experts:
        raise ConfigError("shared_experts: Mixtral has no shared experts (mergekit writes those as Qwen2-MoE or "
                          "DeepSeek, which alloy does not)")
    if config.experts_per_token < 1:
        raise ConfigError(f"experts_per_token: must be at least 1, got {config.experts_per_token}")
    if len(config.experts) < config.experts_per_token:
        raise ConfigError(f"experts: {len(config.experts)} expert(s), fewer than experts_per_token "
                          f"({config.experts_per_token})")
    for i, e in enumerate(config.experts):
        for key in ("noise_scale", "residual_scale"):
            v = getattr(e, key)
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"experts[{i}].{key}: must be a finite number, got {v}")
    if config.gate_mode not in ("random", "uniform_random"):
        for i, e in enumerate(config.experts):
            if not e.positive_prompts:
                raise ConfigError(f"experts[{i}].positive_prompts: gate_mode {config.gate_mode} routes by prompts; "
                                  "give each expert some (or use gate_mode: random)")
        first = (config.experts[0].positive_prompts, config.experts[0].negative_prompts or [])
        if all((e.positive_prompts, e.negative_prompts or []) == first for e in config.experts[1:]):
            raise ConfigError("experts: every expert has the same prompts, so the router cannot tell them apart")
    if not allow_all_same and len(config.experts) > 1 and all(
            str(e.source_model) == str(config.experts[0].source_model) for e in config.experts[1:]):
        raise ConfigError("experts: every expert is the same model: the mixture computes what that model does, at "
                          "more cost (pass --i-understand-this-is-not-useful-without-training to build it anyway)")


def _torch_dtype(name: str) -> torch.dtype:
    from merging.plan import TORCH_DTYPES

    return TORCH_DTYPES[name.removeprefix("torch.")]


def gate_vectors(config: MoEConfig, base_dir: Path, base: Checkpoint, layers: int, hidden: int,
                 generator: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """(layers, experts, hidden): each layer's router rows, one per expert."""
    n = len(config.experts)
    if config.gate_mode == "random":
        return torch.randn((layers, n, hidden), generator=generator)
    if config.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)  # torch.nn.Linear's default initialisation
        return torch.rand((layers, n, hidden), generator=generator) * 2 * scale - scale
    from merging.tokenizer import load_tokenizer

    tok = load_tokenizer(base_dir, str(config.base_model))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token

    def tokenize(prompts: list[str]):
        return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                   add_special_tokens=False)

    if config.gate_mode == "cheap_embed":
        embed = base.read("model.embed_tokens.weight").float()

        def vector(prompts: list[str]) -> torch.Tensor:
            t = tokenize(prompts)
            h = embed[t["input_ids"]] * t["attention_mask"].unsqueeze(-1)  # the rows a one-hot product picks
            summed = h.sum(dim=1).sum(dim=0, keepdim=True)
            return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)
    else:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as tf_logging

        bar = tf_logging.is_progress_bar_enabled()
        tf_logging.disable_progress_bar()  # alloy's stderr carries its own messages, not a loading bar
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(device).eval()
        finally:
            if bar:
                tf_logging.enable_progress_bar()

        def vector(prompts: list[str]) -> torch.Tensor:
            t = tokenize(prompts).to(device)
            with torch.no_grad():
                states = torch.stack(model(**t, output_hidden_states=True, return_dict=True).hidden_states[:-1])
            per_prompt = (states.sum(dim=2) / states.shape[2] if config.gate_mode == "hidden_avg"
                          else states[:, :, -1, :])
            return (per_prompt.sum(dim=1) / per_prompt.shape[1]).cpu()

    rows = []
    for e in config.experts:
        v = vector(e.positive_prompts)
        if e.negative_prompts:
            v = v - vector(e.negative_prompts)
        rows.append(v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows).permute(1, 0, 2)


def mixtral_config(base_dir: Path, experts: int, per_token: int, dtype: torch.dtype) -> dict:
    """config.json of the mixture: the base's, as transformers' MixtralConfig (as mergekit builds it)."""
    import transformers

    from merging.io import DTYPE_NAME

    cfg = transformers.AutoConfig.from_pretrained(base_dir)
    if not isinstance(cfg, transformers.MistralConfig):
        mistral = transformers.MistralConfig(**cfg.to_dict())
        mistral.max_position_embeddings = cfg.max_position_embeddings
        cfg = mistral
    out = transformers.MixtralConfig(**cfg.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts, out.num_experts_per_tok, out.sliding_window = experts, per_token, None
    data = out.to_diff_dict()  # what save_pretrained writes (mergekit's): only what differs from the defaults
    data["dtype"] = DTYPE_NAME.get(dtype, str(dtype).removeprefix("torch."))
    data.pop("torch_dtype", None)
    return data


def moe_card(config: MoEConfig, config_text: str, folders: list[Path]) -> str:
    """The mixture's model card: what went in and how it routes; `base_model` lists hub ids only (the Hub refuses a
    card that names a local path there)."""
    from merging.hub import snapshot_repo_id

    hub = [r for r in dict.fromkeys(snapshot_repo_id(Path(f)) for f in folders) if r]
    front = "---\n" + ("base_model:\n" + "".join(f"- {r}\n" for r in hub) if hub else "") + \
        "library_name: transformers\ntags:\n- alloy\n- moe\n- mixtral\n---\n\n"
    experts = "".join(f"{i}. `{e.source_model}`" + (f": {', '.join(repr(p) for p in e.positive_prompts)}"
                                                      if e.positive_prompts else "") + "\n"
                      for i, e in enumerate(config.experts))
    return (f"{front}# Mixture of experts\n\nMade with alloy (`alloy moe`): a Mixtral mixture of {len(config.experts)} "
            f"experts, {config.experts_per_token} per token, on `{config.base_model}` (attention, norms, embeddings "
            f"and head); each expert is a model's MLP, routed by `{config.gate_mode}` gates. Experts (and the prompts "
            f"that route to them):\n\n{experts}\n## Configuration\n\n```yaml\n{config_text.rstrip()}\n```\n")


def build_moe(config: MoEConfig | str | Path, out: str | Path, *, seed: int = 0, device: str = "cpu",
              shard_size: int = 2 * 1024**3, copy_tokenizer: bool = True, overwrite: bool = False,
              allow_all_same: bool = False, search: Optional[list[Path]] = None,
              lora_cache: str | Path | None = None) -> dict:
    """Write the Mixtral mixture of a mergekit-moe config into `out` (atomically); returns its manifest."""
    from merging.folders import build_folder, replace_folder
    from merging.plan import local_model
    from merging.tokenizer import TOKENIZER_COPY
    from merging.io import model_file

    source = None
    if not isinstance(config, MoEConfig):
        source = Path(config)
        search = [source.resolve().parent, *(search or [])]
        config = load_moe_config(source, allow_all_same)
    else:
        check_moe_config(config, allow_all_same)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: exists; pass --overwrite to replace it")
    roots = [Path.cwd(), *(search or [])]
    base_dir, _ = local_model(config.base_model, roots, lora_cache=lora_cache)
    base = Checkpoint(base_dir, nan_policy="refuse")
    experts = []
    for i, e in enumerate(config.experts):
        folder, _ = local_model(e.source_model, roots, lora_cache=lora_cache)
        experts.append(Checkpoint(folder, nan_policy="refuse"))
    # every mistake before any forward pass or write
    kinds = {str(config.base_model): base.config.get("model_type")}
    kinds.update({str(e.source_model): ck.config.get("model_type") for e, ck in zip(config.experts, experts)})
    if any(k not in ("llama", "mistral") for k in kinds.values()) or len(set(kinds.values())) > 1:
        found = ", ".join(f"{m}: {k}" for m, k in kinds.items())
        raise InputError(f"a Mixtral mixture takes Llama or Mistral models, all of one type ({found})")
    layers, hidden = base.config.get("num_hidden_layers"), base.config.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(hidden, int):
        raise InputError(f"{base.path}/config.json: num_hidden_layers and hidden_size are needed")
    for e, ck in zip(config.experts, experts):
        for layer in range(layers):
            for src, _ in MLP:
                name = f"model.layers.{layer}.mlp.{src}.weight"
                if name not in ck:
                    raise InputError(f"expert {e.source_model}: tensor {name!r} is missing ({ck.path})")
                if name in base and ck.info(name).shape != base.info(name).shape:
                    raise InputError(f"expert {e.source_model}: tensor {name!r} has shape {list(ck.info(name).shape)}, "
                                     f"the base's {list(base.info(name).shape)}; experts must be the base's size")
    dtype = _torch_dtype(config.dtype) if config.dtype else _torch_dtype(
        base.config.get("dtype") or base.config.get("torch_dtype") or "float32")

    generator = torch.Generator().manual_seed(seed)
    gates = gate_vectors(config, base_dir, base, layers, hidden, generator, device)

    # output layout: the base's tensors without its MLPs, then each layer's experts and router
    def mlp_of_base(name: str) -> bool:
        return ".mlp." in name

    entries = [(n, dtype, tuple(base.info(n).shape)) for n in base.tensors if not mlp_of_base(n)]
    sources: dict[str, tuple[int, str, str]] = {}  # output expert tensor -> (expert, input name, projection)
    for layer in range(layers):
        for i, ck in enumerate(experts):
            for src, dst in MLP:
                name = f"model.layers.{layer}.block_sparse_moe.experts.{i}.{dst}.weight"
                sources[name] = (i, f"model.layers.{layer}.mlp.{src}.weight", src)
                entries.append((name, dtype, tuple(ck.info(sources[name][1]).shape)))
        entries.append((f"model.layers.{layer}.block_sparse_moe.gate.weight", dtype, (len(experts), hidden)))
    layout = ShardLayout.plan(entries, shard_size)

    # read in layout order, which is mergekit's (layer, expert, gate/down/up): noise draws follow its stream
    def expert_tensor(name: str) -> torch.Tensor:
        i, src_name, src = sources[name]
        t = experts[i].read(src_name)
        e = config.experts[i]
        if e.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * e.noise_scale
        if src == "down_proj" and e.residual_scale is not None:
            t = t * e.residual_scale
        return t.to(dtype)

    tmp = build_folder(out, "moe")
    try:
        for fname, shard_entries in zip(layout.file_names, layout.shards):
            shard = ShardFile(tmp / fname, shard_entries, {"format": "pt"})
            for name, _, _ in shard_entries:
                if name in sources:
                    t = expert_tensor(name)
                elif name.endswith("block_sparse_moe.gate.weight"):
                    t = gates[int(name.split(".")[2])].to(dtype).contiguous()
                else:
                    t = base.read(name).to(dtype)
                shard.write(name, t)
            shard.close()
        if len(layout.file_names) > 1:
            index = {"metadata": {"total_size": layout.total_bytes()}, "weight_map": layout.weight_map()}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(mixtral_config(base_dir, len(experts), config.experts_per_token,
                                                                   dtype), indent=2) + "\n")
        if copy_tokenizer:
            for name in TOKENIZER_COPY:
                if (f := model_file(base_dir, name)) is not None:
                    shutil.copyfile(f, tmp / name)
        text = source.read_text() if source is not None else json.dumps(config.model_dump(mode="json"), indent=2)
        (tmp / "mergekit_moe_config.yml").write_text(text)
        (tmp / "README.md").write_text(moe_card(config, text, [base_dir, *(ck.path for ck in experts)]))
        manifest = {"kind": "moe", "gate_mode": config.gate_mode, "seed": seed, "experts": len(experts),
                    "experts_per_token": config.experts_per_token, "dtype": str(dtype).removeprefix("torch."),
                    "base_model": str(config.base_model),
                    "expert_models": [str(e.source_model) for e in config.experts],
                    "outputs": layout.weight_map()}
        (tmp / "alloy_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
