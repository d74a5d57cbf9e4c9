"""params.yaml, the pipeline's single source of truth: pydantic models whose errors name the key path.

    models:      name -> where its weights come from (a local path, a hub id at a revision, a GGUF source, or a
                 member of the demo family); candidates refer to models by these names
    family:      the demo family to build first (tiny from scratch, or SmolLM2 LoRA specialists), optional
    candidates:  merges to try: a mergekit-style `config`, or `method` + parameters with a small `grid` over them
    merge, eval, quant, mlflow, champion, runner, paths: how to run, score, store and compare them
    search:      `alloy search`'s space of recipes and budget (optional; alloy/search.py)

A candidate with a grid expands into one config per point of the cartesian product. Grid keys are parameter
names: `lambda` sets a top-level parameter, `facts.weight` one model's parameter.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.config import read_yaml
from merging.errors import ConfigError

Scalar = Union[bool, int, float, str]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """One input model. Exactly one of path / hub / gguf / family says where it comes from."""

    path: Optional[str] = None  # a local Hugging Face checkpoint folder, used in place
    hub: Optional[str] = None  # a Hugging Face hub id ...
    revision: Optional[str] = None  # ... at this revision (a 40-hex commit pins it; a branch is resolved and recorded)
    gguf: Optional[str] = None  # a .gguf path or pip:NAME==VERSION/FILE, imported to a checkpoint
    dtype: str = "bfloat16"  # the dtype a GGUF import is saved in
    family: Optional[str] = None  # a member of the demo family: "base" or a skill name
    skill: Optional[str] = None  # the skill this model specialises in (scores are compared with it)
    sha256: Optional[dict[str, str]] = None  # expected file digests {file name: sha256}, checked after download
    lora: Optional[str] = None  # a PEFT LoRA adapter (folder or hub id) merged into this model first (base+adapter)
    lora_revision: Optional[str] = None  # the adapter's hub revision (a 40-hex commit pins it)

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        given = [k for k in ("path", "hub", "gguf", "family") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, hub, gguf, family (got {', '.join(given) or 'none'})")
        if self.revision and not self.hub:
            raise ValueError("revision only applies to a hub model")
        if self.lora_revision and not self.lora:
            raise ValueError("lora_revision only applies with lora")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype {self.dtype!r}: expected bfloat16, float16 or float32")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("path", "hub", "gguf", "family") if getattr(self, k))


class FamilySpec(_Strict):
    """The demo family built before anything is merged; its members become models named base and <skill>.

    kind, out, seed, steps, n_eval and source are `alloy demo-family` flags too (dvc.yaml passes them on).
    """

    kind: Literal["tiny", "smol"]
    out: Optional[str] = None  # default: <paths.models>/<kind>
    seed: int = 0
    # training steps per specialist (default: the kind's own); smol also takes per-skill steps as a string,
    # "facts=60,words=60,addition=120" (the form `alloy demo-family --steps` and dvc.yaml pass on)
    steps: Optional[Union[int, str]] = None
    n_eval: int = 60  # held-out examples per skill
    source: Optional[str] = None  # smol: the GGUF the base is imported from (default: the pinned SmolLM2 wheel)
    skills: Optional[list[str]] = None  # default: every skill
    base: Optional[str] = None  # smol: a model from `models` to fine-tune instead of importing `source`
    options: dict[str, Any] = Field(default_factory=dict)  # more builder keyword arguments (flow only)

    def builder_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"n_eval": self.n_eval, **self.options}
        if self.skills:
            kw["skills"] = list(self.skills)
        if self.kind == "tiny":
            if self.steps is not None:
                kw["specialist_steps"] = self.steps
        else:
            if self.steps is not None:
                from alloy.cmd_demo import parse_steps

                kw["steps"] = parse_steps(str(self.steps))
            if self.source:
                kw["source"] = self.source
        return kw


class GramSpec(_Strict):
    """What RegMean's Gram matrices (merging.gram) are taken on, per merged model: a .jsonl or text file, or
    skill:NAME (a demo skill's training split; the default for the family's specialists)."""

    data: dict[str, str] = Field(default_factory=dict)
    examples: int = Field(default=128, ge=1)
    seed: int = 0


class CandidateSpec(_Strict):
    name: str
    config: Optional[dict[str, Any]] = None  # a mergekit-style config, used as it is
    method: Optional[str] = None  # or: a merge method ...
    base_model: Optional[str] = None
    models: Optional[list[str]] = None  # ... over these models (names from `models`)
    parameters: dict[str, Any] = Field(default_factory=dict)  # top-level parameters (lambda, normalize, ...)
    model_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)  # {model: {weight, density}}
    dtype: Optional[str] = None
    grid: dict[str, list[Scalar]] = Field(default_factory=dict)  # {param or model.param: [values]}
    grams: Optional[GramSpec] = None  # methods that read Gram matrices (regmean): what they are taken on

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"{v!r}: use letters, digits, '_', '.', '-' (it names folders and runs)")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "CandidateSpec":
        if (self.config is None) == (self.method is None):
            raise ValueError("give either a mergekit-style 'config' or a 'method' (with models)")
        if self.method is not None and not self.models:
            raise ValueError("'models' must list the models the method merges")
        if self.config is not None and (self.models or self.model_parameters or self.base_model):
            raise ValueError("with 'config', put models and parameters inside the config")
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid.{key}: give at least one value")
        return self


class MergeSpec(_Strict):
    seed: int = 0
    shard_size: Union[int, str] = "2GB"
    dtype: Optional[str] = None
    device: str = "cpu"


class EvalSpec(_Strict):
    # bundled tasks, the aliases skills / skills_em / skills_mc, or lm-eval task names; a comma-separated string
    # works too (dvc.yaml can pass a string on, not a list)
    tasks: Union[str, list[str]] = "skills"
    limit: Optional[Union[int, float]] = None
    batch_size: int = 16
    device: str = "cpu"
    data_dir: Optional[str] = None  # default: the family's data folder
    parents: bool = True  # evaluate the input models too (cached by content), for comparison

    def task_list(self) -> list[str]:
        items = [self.tasks] if isinstance(self.tasks, str) else self.tasks
        return [t.strip() for item in items for t in item.split(",") if t.strip()]


class QuantSpec(_Strict):
    enabled: bool = True
    # held-out text: a .jsonl file (one document per line, "text" field) or a plain text file (one document);
    # default: the family's data/heldout.jsonl
    texts: Optional[str] = None
    max_tokens: int = 1024
    # a model (from `models`) whose own report every merge is compared with: a merge may be more fragile than
    # that model only within baseline_kl_ratio_max / baseline_top1_drop_max
    baseline: Optional[str] = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    block_registration: bool = True


class MlflowSpec(_Strict):
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<root>/mlflow.db
    artifact_location: str = "mlartifacts"  # for a new experiment; relative to the project root
    experiment: str = "alloy"
    registry_name: str = "alloy-merge"
    log_weights: bool = True  # log registered candidates' weights as artifacts (the model version's source)


class ChampionSpec(_Strict):
    metric: str = "mean_em"
    higher_is_better: bool = True


class RunnerSpec(_Strict):
    kind: Literal["thread", "dask"] = "thread"
    max_workers: int = 2  # thread pool size
    address: Optional[str] = None  # dask: a scheduler address; none starts a LocalCluster
    n_workers: int = 2  # dask LocalCluster
    threads_per_worker: int = 1
    # LocalCluster workers as processes (side by side, each with its own Prefect client; without a Prefect server
    # each starts a temporary one) or as threads of this process
    processes: bool = True


class SearchSpec(_Strict):
    """`alloy search`: an Optuna (TPE) study over merge recipes of `models` onto `base_model`.

    Each trial picks a method, then a value per model for each per-model parameter in `ranges` that the method takes
    (weight, density, ...) and one for each global one (lambda, ...). The objective is a weighted mean of skill
    scores on the tune split; the held-out split (the pipeline's eval files) is scored beside it, never tuned on.
    """

    trials: int = Field(default=24, ge=1)  # finished trials the study should hold; a re-run adds only the missing
    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "dare_ties", "dare_linear"],
                               min_length=1)  # registered methods that take a base model  # fmt: skip
    base_model: str = "base"
    models: Optional[list[str]] = None  # default: every model with a skill (the family's specialists)
    # [low, high] of each searched parameter, for the methods that take it; others keep the method's default
    ranges: dict[str, tuple[float, float]] = Field(default_factory=lambda: {
        "weight": (0.3, 1.2), "density": (0.3, 1.0), "lambda": (0.5, 1.2)})  # fmt: skip
    parameters: dict[str, Scalar] = Field(default_factory=dict)  # fixed, for every method that takes them
    layer_groups: int = Field(default=1, ge=1)  # > 1: the `gradient` parameters become per-layer-group gradients
    gradient: list[str] = Field(default_factory=lambda: ["weight"])
    objective: dict[str, float] = Field(default_factory=dict)  # {<skill>_em|_mc: weight}; default: mean EM
    # mean: the weighted mean of the objective's tasks; min: the smallest weight x score (the weakest skill: a merge
    # must keep every skill, and weights 1 / specialist's score make it the smallest share kept)
    aggregate: Literal["mean", "min"] = "mean"
    tune_split: Literal["tune", "heldout"] = "tune"  # heldout: tune on the eval files (to see what overfitting does)
    limit: Optional[int] = Field(default=None, ge=1)  # tune examples per task (default: all)
    heldout_limit: Optional[int] = Field(default=None, ge=1)  # held-out examples per task (default: eval.limit)
    heldout: bool = True  # score every trial on the held-out split too
    seed: int = 0
    startup_trials: int = Field(default=8, ge=0)  # random trials before TPE models the results
    storage: Optional[str] = None  # Optuna storage URL; default: sqlite optuna.db beside the MLflow sqlite store
    parallelism: int = Field(default=2, ge=1)  # trials per batch, run side by side through the task runner
    register_best: bool = False  # send the best recipe through merge -> quant-check -> evaluate -> register
    grams: Optional[GramSpec] = None  # for methods that read Gram matrices (regmean): what they are taken on

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for key, (lo, hi) in v.items():
            if lo > hi:
                raise ValueError(f"{key}: low {lo} is above high {hi}")
        return v

    @model_validator(mode="after")
    def _shape(self) -> "SearchSpec":
        from merging.methods import REGISTRY

        for m in self.methods:
            if m not in REGISTRY:
                near = difflib.get_close_matches(m, sorted(REGISTRY), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"methods: {m!r} is not a merge method{hint}")
            if not REGISTRY[m].base:
                raise ValueError(f"methods: {m!r} takes no base model; the search merges task vectors onto one")
        known = set().union(*(REGISTRY[m].parameters for m in self.methods))
        for where, keys in (("ranges", self.ranges), ("parameters", self.parameters)):
            for key in keys:
                if key not in known:
                    raise ValueError(f"{where}.{key}: none of the methods ({', '.join(self.methods)}) takes it")
        for key in self.gradient:
            if key not in self.ranges:
                raise ValueError(f"gradient: {key!r} has no range under search.ranges")
        from alloy.demo.skills import SKILLS

        tasks = {f"{s}_{k}" for s in SKILLS for k in ("em", "mc")}
        for key, w in self.objective.items():
            if key not in tasks:
                raise ValueError(f"objective.{key}: expected a skill task ({', '.join(sorted(tasks))})")
            if w < 0:
                raise ValueError(f"objective.{key}: a weight must be >= 0")
        if self.objective and not any(self.objective.values()):
            raise ValueError("objective: every weight is 0")
        return self


class PathsSpec(_Strict):
    models: str = "models"
    merges: str = "merges"
    results: str = "results"
    configs: str = "configs"


class Params(_Strict):
    name: str = "alloy"
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    family: Optional[FamilySpec] = None
    candidates: list[CandidateSpec] = Field(min_length=1)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    quant: QuantSpec = Field(default_factory=QuantSpec)
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec)
    champion: ChampionSpec = Field(default_factory=ChampionSpec)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)
    paths: PathsSpec = Field(default_factory=PathsSpec)
    search: Optional[SearchSpec] = None

    # not from YAML: the folder relative paths are resolved against (the params file's folder)
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _references(self) -> "Params":
        for name in self.models:
            if not NAME_RE.match(name):
                raise ValueError(f"models.{name}: use letters, digits, '_', '.', '-'")
        if self.quant.baseline and self.quant.baseline not in self.all_models():
            raise ValueError(f"quant.baseline: {self.quant.baseline!r} is not one of the models "
                             f"({', '.join(self.all_models())})")  # fmt: skip
        if self.family and self.family.base and self.family.base not in self.models:
            raise ValueError(f"family.base: {self.family.base!r} is not one of models ({', '.join(self.models)})")
        if self.search:
            known = self.all_models()
            for i, n in enumerate([self.search.base_model, *(self.search.models or [])]):
                if n not in known:
                    key = "search.base_model" if i == 0 else "search.models"
                    raise ValueError(f"{key}: {n!r} is not one of the models ({', '.join(known) or 'none'})")
        names = [c.name for c in self.candidates]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"candidates: name {dup[0]!r} is used twice")
        return self

    # ---- derived ----

    def path(self, rel: str | os.PathLike) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def family_dir(self) -> Path | None:
        if not self.family:
            return None
        return self.path(self.family.out or Path(self.paths.models) / self.family.kind)

    def all_models(self) -> dict[str, ModelSpec]:
        """`models`, plus the family's members (base and one per skill) unless named explicitly."""
        out = dict(self.models)
        if self.family:
            if "base" not in out:
                out["base"] = ModelSpec(family="base")
            for skill in family_skills(self.family):
                out.setdefault(skill, ModelSpec(family=skill, skill=skill))
        for name, spec in out.items():
            if spec.family and spec.family != "base" and spec.skill is None:
                out[name] = spec.model_copy(update={"skill": spec.family})
        return out

    def tracking_uri(self) -> str:
        uri = self.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri
        # four slashes: an absolute path (three would be relative to the current directory)
        return f"sqlite:///{self.path('mlflow.db').resolve()}"


def family_skills(fam: FamilySpec) -> list[str]:
    from alloy.demo.skills import SKILLS

    return list(fam.skills or SKILLS)


# ------------------------------------------------------------------------------------------------ loading


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or str(part).startswith(("function-", "literal", "str", "int", "float", "bool")):
            continue  # pydantic's union/validator labels mean nothing to a user
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _unknown_keys(data: Any, model: type[BaseModel], where: str, source: str) -> None:
    """`did you mean` for misspelt keys, before pydantic's terser 'extra inputs are not permitted'."""
    if not isinstance(data, dict):
        return
    fields = {k for k, f in model.model_fields.items() if not f.exclude}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"{source}: {where + '.' if where else ''}{key}: unknown key{hint}")
    nested = {"merge": MergeSpec, "eval": EvalSpec, "quant": QuantSpec, "mlflow": MlflowSpec,
              "champion": ChampionSpec, "runner": RunnerSpec, "paths": PathsSpec, "family": FamilySpec,
              "search": SearchSpec}  # fmt: skip
    if model is Params:
        for key, sub in nested.items():
            _unknown_keys(data.get(key), sub, key, source)
        for name, spec in (data.get("models") or {}).items() if isinstance(data.get("models"), dict) else []:
            _unknown_keys(spec, ModelSpec, f"models.{name}", source)
        for cand in data.get("candidates") or [] if isinstance(data.get("candidates"), list) else []:
            _unknown_keys(cand, CandidateSpec, f"candidates.{cand.get('name', '?')}" if isinstance(cand, dict) else "candidates", source)


def _candidates_as_list(data: dict) -> tuple[dict, list[str] | None]:
    """`candidates` may be a mapping {name: spec} (dvc.yaml's foreach names its stages by these keys)."""
    cands = data.get("candidates")
    if not isinstance(cands, dict):
        return data, None
    items = []
    for name, spec in cands.items():
        if spec is not None and not isinstance(spec, dict):
            raise ConfigError(f"candidates.{name}: expected a mapping, got {type(spec).__name__}")
        if spec and "name" in spec and spec["name"] != name:
            raise ConfigError(f"candidates.{name}.name: {spec['name']!r} differs from its key; leave it out")
        items.append({**(spec or {}), "name": str(name)})
    return {**data, "candidates": items}, [str(k) for k in cands]


def parse_params(data: Any, root: str | os.PathLike = ".", source: str = "params") -> Params:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data, keys = _candidates_as_list(data)
    _unknown_keys(data, Params, "", source)
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        err = min(e.errors(), key=lambda er: -len(er["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        where = _loc(err["loc"])
        if keys:  # say candidates.ta, as the file does, not candidates[0]
            where = re.sub(r"^candidates\[(\d+)\]", lambda m: f"candidates.{keys[int(m.group(1))]}", where)
        sub = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg)
        if sub and where != "(top level)":  # a validator naming a key below the one pydantic reports
            where, msg = f"{where}.{sub.group(1)}", sub.group(2)
        raise ConfigError(f"{source}: {where}: {msg}") from None
    params.root = Path(root).resolve()
    expand_candidates(params, source=source)  # a bad candidate fails at load time, not half-way through a run
    return params


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.path=value` (value read as YAML), as `dvc exp run -S` does to params.yaml; list items by index."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. eval.limit=10")
        value = yaml.safe_load(raw)
        parts = key.split(".")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {'.'.join(parts[:i]) or '(top)'} has no item {part}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
    return data


def load_params(path: str | os.PathLike, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    data = read_yaml(path, "params file")
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    return parse_params(data, root=path.resolve().parent, source=str(path))


# ---------------------------------------------------------------------------------------- candidate expansion


@dataclass
class Candidate:
    """One concrete merge: a mergekit-style config over model names, and what to call it."""

    name: str  # unique, file-system safe: folder and registry tag
    group: str  # the params.yaml candidate it came from
    config: dict  # mergekit-style, models referred to by their names in params.models
    point: dict[str, Scalar] = field(default_factory=dict)  # the grid values that made it
    seed: int = 0
    # Gram matrices the merge reads, to be computed first: {model: {"file", "data", "examples", "seed"}}
    grams: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.config["merge_method"]

    @property
    def config_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def run_name(self) -> str:
        """Method and key parameters, grid values first, readable: 'ties density=0.5 weight=1'."""
        flat = flat_params(self.config)
        keys = [k for k in self.point if k in flat] + [k for k in flat if k not in self.point]
        skip = ("dtype", "out_dtype", "tokenizer_source")
        bits = [self.method] + [f"{k}={_short(flat[k])}" for k in keys if k not in skip and not k.endswith(".gram")]
        return " ".join(bits)[:250]

    def parents(self) -> list[str]:
        names: list[str] = []
        if self.config.get("base_model"):
            names.append(_model_name(self.config["base_model"]))
        for m in self.config.get("models") or []:
            names.append(_model_name(m["model"]))
        for s in self.config.get("slices") or []:
            for src in s.get("sources", []):
                names.append(_model_name(src["model"]))
        return list(dict.fromkeys(names))


def _model_name(ref: Any) -> str:
    if isinstance(ref, dict):
        return str(ref.get("path") or ref.get("model"))
    return str(ref)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict) and "value" in v:  # a {filter, value} setting
        return _short(v["value"]) + (f"@{v['filter']}" if v.get("filter") else "")
    if isinstance(v, list):
        return ",".join(_short(x) for x in v)
    return str(v)


def flat_params(config: dict) -> dict[str, Any]:
    """The knobs of a config with readable names: `lambda`, `facts.weight`, `dtype` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in (config.get("parameters") or {}).items():
        out[k] = v
    for m in config.get("models") or []:
        for k, v in (m.get("parameters") or {}).items():
            out[f"{_model_name(m['model'])}.{k}"] = v
    for key in ("dtype", "out_dtype", "tokenizer_source"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def _slug(v: Scalar) -> str:
    s = _short(v) if not isinstance(v, bool) else str(v).lower()
    return re.sub(r"[^A-Za-z0-9.]+", "_", s)


def _config_of(c: CandidateSpec) -> dict:
    if c.config is not None:
        return copy.deepcopy(c.config)
    cfg: dict[str, Any] = {"merge_method": c.method}
    if c.base_model:
        cfg["base_model"] = c.base_model
    models = []
    for name in c.models or []:
        entry: dict[str, Any] = {"model": name}
        if c.model_parameters.get(name):
            entry["parameters"] = dict(c.model_parameters[name])
        models.append(entry)
    cfg["models"] = models
    if c.parameters:
        cfg["parameters"] = dict(c.parameters)
    if c.dtype:
        cfg["dtype"] = c.dtype
    return cfg


def _set_grid_value(cfg: dict, key: str, value: Scalar, where: str) -> None:
    model, dot, param = key.rpartition(".")
    if not dot:
        cfg.setdefault("parameters", {})[key] = value
        return
    for m in cfg.get("models") or []:
        if _model_name(m["model"]) == model:
            m.setdefault("parameters", {})[param] = value
            return
    names = [_model_name(m["model"]) for m in cfg.get("models") or []]
    raise ConfigError(f"{where}.grid.{key}: no model {model!r} in this candidate ({', '.join(names)})")


def gram_file(params: Params, model: str) -> str:
    """Where the pipeline keeps a model's Gram matrices, relative to the params file's folder (dvc.yaml's too)."""
    return f"{Path(params.paths.models).as_posix()}/grams/{model}.safetensors"


def gram_spec(params: Params, name: str, g: GramSpec, where: str) -> dict[str, Any]:
    """Model `name`'s Gram file (gram_file) and what it is taken on: grams.data, else the model's own skill."""
    known = params.all_models()
    data = g.data.get(name) or (f"skill:{known[name].skill}" if name in known and known[name].skill else None)
    if data is None:
        raise ConfigError(f"{where}.grams.data.{name}: say what model {name!r}'s Gram matrices are taken on "
                          "(a .jsonl or text file, or skill:NAME)")
    if not data.startswith("skill:"):
        data = str(params.path(data))
    return {"file": gram_file(params, name), "data": data, "examples": g.examples, "seed": g.seed}


def _plan_grams(params: Params, c: CandidateSpec, cfg: dict, where: str) -> dict[str, dict[str, Any]]:
    """For a method with Gram side inputs: each model without an explicit `gram` file gets the pipeline's, and
    what to compute it on (grams.data, a specialist's own skill by default)."""
    from merging.methods import REGISTRY

    spec = REGISTRY.get(cfg.get("merge_method", ""))
    if spec is None or "gram" not in spec.side_inputs:
        if c.grams is not None:
            raise ConfigError(f"{where}.grams: method {cfg.get('merge_method')!r} reads no Gram matrices")
        return {}
    g = c.grams or GramSpec()
    out: dict[str, dict[str, Any]] = {}
    for m in cfg.get("models") or []:
        if "gram" in (m.get("parameters") or {}):
            continue  # a file the user made (alloy gram)
        name = _model_name(m["model"])
        out[name] = gram_spec(params, name, g, where)
        m.setdefault("parameters", {})["gram"] = out[name]["file"]
    unknown = sorted(set(g.data) - {_model_name(m["model"]) for m in cfg.get("models") or []})
    if unknown:
        raise ConfigError(f"{where}.grams.data.{unknown[0]}: not one of this candidate's models")
    return out


def expand_candidates(params: Params, source: str = "params") -> list[Candidate]:
    """Every concrete merge, grids expanded, each config checked by the engine's parser."""
    from merging.config import parse_config

    known = params.all_models()
    out: list[Candidate] = []
    for i, c in enumerate(params.candidates):
        where = f"candidates.{c.name}"
        keys = list(c.grid)
        points = [dict(zip(keys, combo)) for combo in itertools.product(*(c.grid[k] for k in keys))] or [{}]
        for point in points:
            cfg = _config_of(c)
            for k, v in point.items():
                _set_grid_value(cfg, k, v, where)
            name = c.name + "".join(f"-{k.replace('.', '_')}{_slug(v)}" for k, v in point.items())
            grams = _plan_grams(params, c, cfg, where)
            cand = Candidate(name=name, group=c.name, config=cfg, point=point, seed=params.merge.seed, grams=grams)
            parse_config(cfg, f"{source}: {where}")
            missing = [p for p in cand.parents() if p not in known and not Path(p).expanduser().exists()
                       and "/" not in p]  # fmt: skip
            if missing:
                raise ConfigError(f"{source}: {where}: model {missing[0]!r} is not defined under models "
                                  f"(known: {', '.join(known) or 'none'})")  # fmt: skip
            out.append(cand)
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: candidates: two merges are both named {dup[0]!r}")
    needed_grams(out, source)  # one Gram file per model: candidates must agree on its data
    return out


def needed_grams(candidates: list[Candidate], source: str = "params") -> dict[str, dict[str, Any]]:
    """{model: gram spec} over all candidates; two candidates asking one model's Grams on different data fail."""
    out: dict[str, dict[str, Any]] = {}
    for c in candidates:
        for m, g in c.grams.items():
            if m in out and out[m] != g:
                raise ConfigError(f"{source}: candidates.{c.group}.grams: model {m!r}'s Gram matrices are asked on "
                                  f"{g['data']} ({g['examples']} examples) here and on {out[m]['data']} "
                                  f"({out[m]['examples']}) by another candidate; the pipeline keeps one per model")
            out[m] = g
    return out


# ------------------------------------------------------------------------------- metrics a champion is chosen by


def primary_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: the number a table shows} (exact match, accuracy, perplexity; the first metric otherwise)."""
    from eval.compare import primary_metric

    out = {}
    for t, m in scores.items():
        key = primary_metric(t, m)
        if key and key in m:
            out[t] = float(m[key])
    return out


def derived_metrics(scores: dict[str, dict[str, float]], own_skill: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Task scores plus `mean_em`, `mean_mc` and, given each specialist's own-skill scores
    ({skill: {task: score}}), `retained.<task>` (merge / specialist) and `min_retained_em` / `min_retained_mc`."""
    prim = primary_scores(scores)
    out = dict(prim)
    for kind in ("em", "mc"):
        vals = [v for t, v in prim.items() if t.endswith(f"_{kind}")]
        if vals:
            out[f"mean_{kind}"] = sum(vals) / len(vals)
    for kind in ("em", "mc"):
        ratios = []
        for skill, by_task in (own_skill or {}).items():
            t = f"{skill}_{kind}"
            ref = by_task.get(t)
            if t in prim and ref:
                out[f"retained.{t}"] = prim[t] / ref
                ratios.append(prim[t] / ref)
        if ratios:
            out[f"min_retained_{kind}"] = min(ratios)
    return out


def model_name_of(ref: Any) -> str:
    return _model_name(ref)
