"""Recipes that build on each other (mergekit-multi's YAML): several merge configs in one file, one YAML document each.

A document with `name: X` is merged into INTERMEDIATE_DIR/X, and any later (or earlier) document may list `X` as a
model; the one document without a name is the final merge, written to OUT_PATH. Every document is read and checked,
and the order worked out, before anything is merged: a typo in the last recipe stops the run before the first.

Lazy runs (the default, as mergekit's) skip a recipe whose output is already there, but only when that output's
manifest says it was merged from the same config: a recipe edited since, or one whose input is merged again in this
run, is merged again (mergekit would keep the stale output). The final output is replaced only with overwrite, and
a folder alloy did not write (no manifest) never is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


from merging.config import MergeConfig, ModelRef, parse_config, read_yaml
from merging.errors import ConfigError
from merging.plan import check_config

MANIFEST = "alloy_manifest.json"


@dataclass
class Recipe:
    name: Optional[str]  # None: the final merge
    config: MergeConfig
    needs: list[str] = field(default_factory=list)  # the names of the recipes whose outputs it merges

    @property
    def label(self) -> str:
        return self.name if self.name is not None else "the final merge"


def load_recipes(path: str | Path) -> list[Recipe]:
    """The documents of a multi-merge file, in an order where every recipe comes after those it merges."""
    path = Path(path)
    docs = read_yaml(path, documents=True)
    recipes: dict[Optional[str], Recipe] = {}
    for i, doc in enumerate(docs, 1):
        if doc is None:  # an empty document (a trailing `---`)
            continue
        if not isinstance(doc, dict):
            raise ConfigError(f"{path} document {i}: expected a mapping, got {type(doc).__name__}")
        name = doc.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
            raise ConfigError(f"{path} document {i}: name: {name!r} is not a folder name")
        if name in recipes:
            raise ConfigError(f"{path} document {i}: " + (f"name: {name!r} is used twice" if name is not None else
                                                           "a second document without a name (only the final merge "
                                                           "has none)"))
        where = f"{path} document {i}" + (f" ({name})" if name else "")
        config = parse_config({k: v for k, v in doc.items() if k != "name"}, where)
        try:
            check_config(config)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        recipes[name] = Recipe(name, config)
    if not recipes:
        raise ConfigError(f"{path}: no merge configs in it")
    for r in recipes.values():
        r.needs = sorted({ref.path for ref in _references(r.config) if ref.path in recipes})
        if r.name in r.needs:
            raise ConfigError(f"{path}: {r.label} merges its own output")
    return _ordered(recipes, path)


def _references(config: MergeConfig) -> list[ModelRef]:
    refs = list(config.referenced_models())
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    if isinstance(source, ModelRef):
        refs.append(source)
    return refs


def _ordered(recipes: dict[Optional[str], Recipe], path: Path) -> list[Recipe]:
    done: list[Recipe] = []
    state: dict[Optional[str], str] = {}

    def visit(name: Optional[str], trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(str(name)):] + [str(name)]
            raise ConfigError(f"{path}: the recipes merge each other's outputs in a circle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for dep in recipes[name].needs:
            visit(dep, trail + [str(name)])
        state[name] = "done"
        done.append(recipes[name])

    for name in recipes:
        visit(name, [])
    return done


def config_sha256(config: MergeConfig) -> str:
    """The manifest's config_sha256 of a merge of this config (merging.output writes the same)."""
    return hashlib.sha256(config.to_yaml().encode()).hexdigest()


def _merged_from(out: Path) -> Optional[str]:
    try:
        return json.loads((out / MANIFEST).read_text()).get("config_sha256")
    except (OSError, ValueError, AttributeError):
        return None


@dataclass
class Step:
    recipe: Recipe
    out: Path
    action: str  # "merge", "skip" (merged from this config already) or "remerge" (an alloy output, replaced)
    why: str = ""  # why a "remerge" merges again
    result: Any = None  # merging.engine.MergeResult, once merged


def plan_steps(recipes: list[Recipe], intermediate_dir: Path, out_path: Optional[Path], lazy: bool,
               overwrite: bool = False) -> list[Step]:
    """What each recipe will do, decided (and every refusal raised) before anything is merged."""
    if any(r.name is None for r in recipes) and out_path is None:
        raise ConfigError("--out-path: the file has a final merge (a document without a name); say where it goes")
    steps: list[Step] = []
    remerged: set[str] = set()
    for r in recipes:
        out = out_path if r.name is None else intermediate_dir / r.name
        assert out is not None
        stale = [d for d in r.needs if d in remerged]
        merged_from = _merged_from(out) if out.exists() else None
        if not out.exists():
            action, why = "merge", ""
        elif merged_from is None and not (r.name is None and overwrite):
            raise ConfigError(f"{out}: exists, and is not an alloy merge output (no {MANIFEST}); {r.label} "
                              "would replace it: move it away" + (", or pass --overwrite" if r.name is None else ""))
        elif lazy and not stale and merged_from == config_sha256(r.config):
            action, why = "skip", ""
        else:
            action = "remerge"
            why = (f"its input {stale[0]} is merged again" if stale else "--no-lazy" if not lazy
                   else "it was merged from another version of its config" if merged_from else "")
        if r.name is None and action == "remerge" and not overwrite:
            raise ConfigError(f"{out}: the final merge's output exists ({why}); pass --overwrite to replace it")
        if action != "skip" and r.name is not None:
            remerged.add(r.name)
        steps.append(Step(r, out, action, why))
    return steps


def run_multimerge(path: str | Path, intermediate_dir: str | Path, out_path: str | Path | None = None, *,
                   lazy: bool = True, overwrite: bool = False, log: Any = None, **merge_kwargs: Any) -> list[Step]:
    """Merge every recipe of a multi-merge file in order (merging.engine.run_merge's keywords apply to each).

    overwrite: replace OUT_PATH when the final merge runs again (intermediates are alloy's own outputs and are
    replaced when their recipe runs again)."""
    from merging.engine import partial_folder, run_merge

    path = Path(path)
    recipes = load_recipes(path)
    intermediate_dir = Path(intermediate_dir)
    steps = plan_steps(recipes, intermediate_dir, Path(out_path) if out_path is not None else None, lazy, overwrite)
    names = {r.name: intermediate_dir / r.name for r in recipes if r.name is not None}
    intermediate_dir.mkdir(parents=True, exist_ok=True)
    for step in steps:
        # a recipe killed mid-merge left its verified shards beside its output: they are reused (the engine
        # checks they belong to this config, inputs and seed, and starts over if not)
        resume = step.action != "skip" and partial_folder(step.out.absolute()).exists()
        if log is not None:
            log(f"{step.recipe.label}: " + ("already merged from this config, kept" if step.action == "skip"
                                            else f"{'resuming' if resume else 'merging'} into {step.out}"
                                            + (f" ({step.why})" if step.why else "")))
        if step.action == "skip":
            continue
        # the recipes' names stand for their output folders, as models, adapters' bases and tokenizer sources
        step.result = run_merge(step.recipe.config, step.out, model_paths=dict(names),
                                overwrite=step.action == "remerge", resume=resume,
                                search_paths=[path.resolve().parent], **merge_kwargs)
    return steps
