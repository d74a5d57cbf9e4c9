"""The bundled lm-eval tasks: YAMLs over the synthetic skills' JSONL, generated with absolute data paths.

Each skill is measured two ways:

- ``<skill>_em``: ``generate_until``, greedy, a few new tokens, stop at the end of the line; exact match after
  stripping whitespace.
- ``<skill>_mc``: ``multiple_choice``, the 4 options scored by summed log-likelihood (``acc``, chance 0.25) and
  by length-normalised log-likelihood (``acc_norm``).

``heldout_ppl`` is a ``loglikelihood_rolling`` perplexity over the held-out text (word and byte perplexity,
bits per byte). lm-eval reads local files only through absolute ``data_files`` paths, so the YAMLs are written at
run time into a folder named after the data they point at.

``<skill>_em_tune`` and ``<skill>_mc_tune`` are the same tasks over the tune split (``<skill>.tune.jsonl``), which a
recipe search tunes on so that the eval files stay held out; the ``skills`` aliases never include them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from alloy.demo.skills import SKILLS, TUNE_SUFFIX
from merging.errors import InputError

MAX_GEN_TOKS = 10
PPL_TASK = "heldout_ppl"
TUNE = "_tune"  # task name suffix of the tune split
HELDOUT_TASKS: tuple[str, ...] = (*(f"{s}_{kind}" for s in SKILLS for kind in ("em", "mc")), PPL_TASK)
TUNE_TASKS: tuple[str, ...] = tuple(f"{s}_{kind}{TUNE}" for s in SKILLS for kind in ("em", "mc"))
BUNDLED_TASKS: tuple[str, ...] = HELDOUT_TASKS + TUNE_TASKS
# Names that stand for several bundled tasks on the command line.
ALIASES: dict[str, tuple[str, ...]] = {
    "skills": HELDOUT_TASKS,
    "skills_em": tuple(f"{s}_em" for s in SKILLS),
    "skills_mc": tuple(f"{s}_mc" for s in SKILLS),
    "skills_tune": TUNE_TASKS,
    "skills_em_tune": tuple(f"{s}_em{TUNE}" for s in SKILLS),
    "skills_mc_tune": tuple(f"{s}_mc{TUNE}" for s in SKILLS),
}
# The number a table shows for each bundled task.
PRIMARY_METRIC: dict[str, str] = {
    **{f"{s}_em": "exact_match" for s in SKILLS},
    **{f"{s}_mc": "acc" for s in SKILLS},
    PPL_TASK: "word_perplexity",
    **{f"{s}_em{TUNE}": "exact_match" for s in SKILLS},
    **{f"{s}_mc{TUNE}": "acc" for s in SKILLS},
}


def expand_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """Aliases expanded, duplicates dropped, order kept."""
    out: list[str] = []
    for t in tasks:
        for name in ALIASES.get(t, (t,)):
            if name not in out:
                out.append(name)
    return out


def data_file(task: str, data_dir: Path) -> Path:
    """The JSONL a bundled task reads."""
    if task == PPL_TASK:
        return data_dir / "heldout.jsonl"
    if task.endswith(TUNE):
        return data_dir / f"{task.removesuffix(TUNE).rsplit('_', 1)[0]}{TUNE_SUFFIX}"
    return data_dir / f"{task.rsplit('_', 1)[0]}.jsonl"


def _yaml_for(task: str, path: Path) -> dict:
    common = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "metadata": {"version": 1.0},
    }
    if task == PPL_TASK:
        return {
            **common,
            "output_type": "loglikelihood_rolling",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        }
    if task.removesuffix(TUNE).endswith("_mc"):
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        }
    return {
        **common,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False, "temperature": 0.0},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }


def task_fingerprint(task: str, data_dir: Path) -> str:
    """sha256 of what a bundled task is: its YAML (minus the path) and its data bytes."""
    path = data_file(task, data_dir)
    spec = _yaml_for(task, Path("DATA"))
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(path.read_bytes())
    return h.hexdigest()


def write_task_yamls(data_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None) -> Path:
    """Write one lm-eval YAML per bundled task (default: all) into ``out_dir``; returns ``out_dir``.

    The YAMLs point at ``data_dir``'s JSONL files by absolute path. A missing data file raises InputError.
    """
    import yaml

    data = Path(data_dir).resolve()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for task in tasks or BUNDLED_TASKS:
        if task not in BUNDLED_TASKS:
            raise InputError(f"task {task!r}: not a bundled task ({', '.join(BUNDLED_TASKS)})")
        path = data_file(task, data)
        if not path.is_file():
            raise InputError(f"{path}: missing data file for task {task!r} (write it with write_skill_data)")
        text = yaml.safe_dump(_yaml_for(task, path), sort_keys=False, allow_unicode=True)
        (out / f"{task}.yaml").write_text(text)
    return out
