"""Why a merge works or fails: task-vector geometry, streamed tensor by tensor with bounded memory.

For every pair of task vectors (model - base): cosine similarity and the sign-conflict rate (of the positions where
both moved, the share where they moved in opposite directions). For each model: the norm of its task vector, the
share of its energy that magnitude trimming at the configured density removes, and the share of its delta (L1) that
survives a TIES merge (kept by the trim and agreeing with the elected sign). Per layer and overall.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merging.checks import all_finite, check_nan_policy, current_nan_policy
from merging.config import MergeConfig, load_config
from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.plan import LAYER_RE, build_plan
from merging.plan import _method as check_method  # the check `alloy merge` runs, message and all


@dataclass
class _Acc:
    n: int
    dot: dict = field(default_factory=dict)  # (i, j) -> sum d_i d_j
    both: dict = field(default_factory=dict)  # (i, j) -> positions where both are non-zero
    conflict: dict = field(default_factory=dict)  # (i, j) -> of those, opposite signs
    sq: list = field(default_factory=list)  # i -> sum d_i^2
    trimmed_sq: list = field(default_factory=list)  # i -> energy removed by trimming
    l1: list = field(default_factory=list)
    survived_l1: list = field(default_factory=list)
    params: int = 0

    def __post_init__(self):
        self.sq = [0.0] * self.n
        self.trimmed_sq = [0.0] * self.n
        self.l1 = [0.0] * self.n
        self.survived_l1 = [0.0] * self.n
        for pair in itertools.combinations(range(self.n), 2):
            self.dot[pair] = self.both[pair] = self.conflict[pair] = 0.0

    def add(self, deltas: list[torch.Tensor], densities: list[float]) -> None:
        self.params += deltas[0].numel()
        kept = []
        for i, d in enumerate(deltas):
            a = d.abs()
            k = max(1, int(densities[i] * d.numel())) if densities[i] < 1 else d.numel()
            if k < d.numel():
                thresh = torch.kthvalue(a.flatten(), d.numel() - k + 1).values
                mask = a >= thresh
            else:
                mask = torch.ones_like(d, dtype=torch.bool)
            kd = d * mask
            kept.append(kd)
            sq = float((d * d).sum())
            self.sq[i] += sq
            self.trimmed_sq[i] += sq - float((kd * kd).sum())
            self.l1[i] += float(a.sum())
        elected = torch.sign(sum(kept))
        for i, kd in enumerate(kept):
            self.survived_l1[i] += float((kd.abs() * (torch.sign(kd) == elected)).sum())
        for i, j in itertools.combinations(range(self.n), 2):
            di, dj = deltas[i], deltas[j]
            self.dot[(i, j)] += float((di * dj).sum())
            nz = (di != 0) & (dj != 0)
            self.both[(i, j)] += float(nz.sum())
            self.conflict[(i, j)] += float((nz & (torch.sign(di) != torch.sign(dj))).sum())

    def summary(self, names: list[str]) -> dict:
        pairs = {}
        for (i, j), dot in self.dot.items():
            denom = math.sqrt(self.sq[i] * self.sq[j])
            pairs[f"{names[i]} | {names[j]}"] = {
                "cosine": dot / denom if denom else 0.0,
                "sign_conflict": self.conflict[(i, j)] / self.both[(i, j)] if self.both[(i, j)] else 0.0,
            }
        models = {}
        for i, name in enumerate(names):
            models[name] = {
                "norm": math.sqrt(self.sq[i]),
                "trimmed_energy": self.trimmed_sq[i] / self.sq[i] if self.sq[i] else 0.0,
                "survives_ties": self.survived_l1[i] / self.l1[i] if self.l1[i] else 0.0,
            }
        return {"params": self.params, "pairs": pairs, "models": models}


def _without_parameters(data: Any) -> Any:
    """A config's data with every parameters block dropped (a method's parameters mean nothing to the probe)."""
    if isinstance(data, dict):
        return {k: _without_parameters(v) for k, v in data.items() if k != "parameters"}
    if isinstance(data, list):
        return [_without_parameters(v) for v in data]
    return data


def inspect_merge(config: MergeConfig | str | Path, *, dtype: str | None = "float32",
                  model_paths: dict[str, Path] | None = None, nan_policy: str | None = None,
                  lora_cache: str | Path | None = None, lora_dtype: str | None = None) -> dict:
    """Task-vector statistics of a config's models against its base, overall and per layer.

    model_paths: model name in the config -> folder (as run_merge takes them).
    nan_policy: a tensor holding NaN/Inf (in the base or a model): "refuse" (the default, as merges do: an
    InputError naming model and tensor), or "warn": that tensor is left out of the statistics and listed under
    the report's "nonfinite" (its statistics would all be NaN)."""
    search = []
    if not isinstance(config, MergeConfig):
        search.append(Path(config).resolve().parent)
        config = load_config(config)
    check_method(config)  # an unknown merge_method is refused as `alloy merge` refuses it, "did you mean" and all
    if config.base_model is None:
        raise ConfigError("base_model: inspect needs a base_model to form task vectors")
    policy = check_nan_policy(nan_policy) if nan_policy is not None else current_nan_policy()
    # plan as a task-arithmetic merge so every model appears as a task vector against the base, whatever the method
    probe = MergeConfig.model_validate({**_without_parameters(config.model_dump(exclude_none=True)),
                                        "merge_method": "task_arithmetic", "parameters": {"weight": 1.0}})
    plan = build_plan(probe, search_paths=search, dtype=dtype, model_paths=model_paths, nan_policy=policy,
                      lora_cache=lora_cache, lora_dtype=lora_dtype)
    if policy == "warn":  # read as they are; non-finite tensors are found and left out below
        for ck in plan.checkpoints:
            ck.nan_policy = None
    # the real plan is only read for densities; a method with side inputs (regmean's Gram files) has none, and its
    # files may not exist yet when the pipeline inspects
    spec = REGISTRY.get(config.merge_method)
    real = (build_plan(config, search_paths=search, dtype=dtype, model_paths=model_paths, nan_policy=policy,
                       lora_cache=lora_cache, lora_dtype=lora_dtype)
            if spec is not None and not spec.side_inputs else None)
    density_of = {t.name: t.per_model.get("density") for t in real.tasks} if real else {}
    names = [str(plan.models[m]) for m, _ in plan.tasks[0].inputs] if plan.tasks else []
    overall = _Acc(len(names))
    layers: dict[tuple[str, int], _Acc] = {}
    nonfinite: list[str] = []
    for task in plan.tasks:
        if task.base is None:
            continue
        base = plan.checkpoints[task.base[0]].read(task.base[1]).float()
        xs = [plan.checkpoints[m].read(n).float() for m, n in task.inputs]
        if policy == "warn" and not all(all_finite(t) for t in [base, *xs]):
            nonfinite.append(task.name)
            continue
        if task.align is not None:  # a tokenizer policy: rows re-indexed to the output vocabulary first
            xs, base = task.align.apply(xs, base)
        deltas = [x - base for x in xs]
        dens = density_of.get(task.name) or [1.0] * len(deltas)
        dens = [float(x) if x is not None else 1.0 for x in dens]
        overall.add(deltas, dens)
        m = LAYER_RE.match(task.name)
        if m:
            layers.setdefault((m.group(1), int(m.group(2))), _Acc(len(names))).add(deltas, dens)
    # one stack: layers by index, as always; a VLM's stacks (text decoder, vision tower): by stack and index
    one_stack = len({stack for stack, _ in layers}) <= 1
    return {"method": config.merge_method, "base": str(config.base_model), "models": names,
            "overall": overall.summary(names),
            "layers": {(str(i) if one_stack else f"{stack}.{i}"): layers[(stack, i)].summary(names)
                       for stack, i in sorted(layers)},
            **({"nonfinite": nonfinite} if nonfinite else {})}


def format_table(report: dict) -> str:
    lines = [f"task vectors against {report['base']} ({report['overall']['params']:,} parameters)", "",
             f"{'pair':<60} {'cosine':>8} {'sign conflict':>14}"]
    for pair, v in report["overall"]["pairs"].items():
        lines.append(f"{pair[-60:]:<60} {v['cosine']:>8.3f} {v['sign_conflict']:>14.3f}")
    lines += ["", f"{'model':<60} {'norm':>10} {'trimmed energy':>15} {'survives TIES':>14}"]
    for name, v in report["overall"]["models"].items():
        lines.append(f"{name[-60:]:<60} {v['norm']:>10.3f} {v['trimmed_energy']:>15.3f} {v['survives_ties']:>14.3f}")
    if report["layers"]:
        lines += ["", "sign conflict per layer (mean over pairs): " + " ".join(
            f"{k}:{sum(p['sign_conflict'] for p in v['pairs'].values()) / max(1, len(v['pairs'])):.2f}"
            for k, v in report["layers"].items())]
    if report.get("nonfinite"):
        bad = report["nonfinite"]
        lines += ["", f"left out (NaN/Inf in the base or a model, --nan-policy warn): {len(bad)} tensor(s): "
                  + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")]
    return "\n".join(lines)
