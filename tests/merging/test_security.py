"""Nothing a checkpoint or a config carries runs as code, and nothing outside a model's folder is read.

Pickle checkpoints are covered in test_engine.py (refused by default, weights_only with --allow-pickle)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from merging.engine import run_merge
from family import linear_of, write_cfg
from merging.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[2]
ALLOY = [sys.executable, "-m", "alloy"]
CODE_DIRS = ("alloy", "merging", "eval", "tasks", "flows")


def source_files(suffixes=(".py", ".yaml", ".yml", ".toml", ".cfg", ".json")) -> list[Path]:
    """The project's own code and configuration (whatever git tracks or not), without data folders."""
    files = [p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in suffixes and p.is_file()]
    files += [p for p in ROOT.glob("*") if p.suffix in suffixes and p.is_file()]
    files = [p for p in files if "__pycache__" not in p.parts and "data" not in p.relative_to(ROOT).parts]
    assert len([p for p in files if p.suffix == ".py"]) > 30, "the scan found too little code to mean anything"
    return files


def occurrences(pattern: str, suffixes=(".py", ".yaml", ".yml", ".toml", ".cfg", ".json")) -> list[str]:
    rx = re.compile(pattern)
    hits = []
    for p in source_files(suffixes):
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if rx.search(line) and not line.lstrip().startswith("#"):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()}")
    return hits


# --------------------------------------------------------------------------------------------- remote code


def test_alloy_never_sets_trust_remote_code():
    """Any mention must pin it off (trust_remote_code=False); nothing passes it through or turns it on."""
    bad = [h for h in occurrences(r"trust_remote_code")
           if not re.search(r"trust_remote_code\W{0,3}\s*[=:]\s*\W?(False|false)\b", h)]
    assert bad == [], "trust_remote_code must never be enabled or forwarded:\n" + "\n".join(bad)


EVIL = "import pathlib\npathlib.Path({sentinel!r}).write_text('ran')\n"


def custom_code_model(src: Path, dst: Path, sentinel: Path) -> Path:
    """A copy of a model whose config and tokenizer config point at code that writes a file when imported."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                       "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}, "model_max_length": 128}))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (dst / name).write_text(EVIL.format(sentinel=str(sentinel)))
    return dst


def test_model_with_custom_code_merges_without_running_it(family_fp32, tmp_path):
    sentinel = tmp_path / "code-ran"
    evil = custom_code_model(family_fp32["ft0"], tmp_path / "evil", sentinel)
    cfg = write_cfg(tmp_path, linear_of(evil, family_fp32["ft1"]))  # the custom-code model is the template
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert not sentinel.exists()
    out = tmp_path / "out"
    assert not list(out.glob("*.py")), "custom code was copied into the output"
    # the output still loads (as the Llama it is) and loading it runs nothing either
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not sentinel.exists()


# -------------------------------------------------------------------------------------------------- YAML


def test_yaml_is_read_with_safe_loaders_only():
    unsafe = occurrences(r"yaml\.(load|load_all|unsafe_load|unsafe_load_all|full_load|full_load_all)\s*\(|"
                         r"yaml\.(Unsafe|Full)?Loader\b|UnsafeLoader|FullLoader", (".py",))
    safe = [h for h in unsafe if re.search(r"Loader\s*=\s*yaml\.(Safe|CSafe)Loader", h)]
    assert sorted(set(unsafe) - set(safe)) == []


@pytest.mark.parametrize("doc", [
    "merge_method: linear\nmodels: !!python/object/apply:os.system ['touch {s}']\n",
    "merge_method: !!python/name:os.system linear\nmodels: []\n",
    "merge_method: linear\nmodels:\n  - model: !!python/object/new:pathlib.Path ['{s}']\n",
])
def test_python_yaml_tags_are_refused_cleanly(tmp_path, doc):
    sentinel = tmp_path / "pwned"
    cfg = tmp_path / "evil.yml"
    cfg.write_text(doc.format(s=sentinel))
    with pytest.raises(ConfigError) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert msg.startswith(f"{cfg}: line ") and "YAML tag '!!python/" in msg and "not allowed" in msg
    assert not sentinel.exists() and not (tmp_path / "out").exists()
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------- pickles


def test_every_torch_load_is_weights_only():
    calls = occurrences(r"torch\.load\s*\(", (".py",))
    assert calls, "expected the --allow-pickle loader"
    assert [c for c in calls if "weights_only=True" not in c] == []


# ---------------------------------------------------------------------------------- paths out of the folder


def sharded_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _index(model: Path) -> dict:
    return json.loads((model / "model.safetensors.index.json").read_text())


def _set_index(model: Path, index: dict) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _repoint_shard(model: Path, new_name: str) -> None:
    index = _index(model)
    old = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (new_name if v == old else v) for k, v in index["weight_map"].items()}
    _set_index(model, index)


def _escape_dotdot(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copyfile(shard, outside / "x.safetensors")
    _repoint_shard(model, "../outside/x.safetensors")
    return "'../outside/x.safetensors' is not a plain name inside the model folder"


def _escape_nested_dotdot(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copyfile(shard, outside / "x.safetensors")
    (model / "sub").mkdir()
    _repoint_shard(model, "sub/../../outside/x.safetensors")
    return "is not a plain name"


def _escape_absolute(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shutil.copyfile(shard, outside / "x.safetensors")
    _repoint_shard(model, str(outside / "x.safetensors"))
    return "is not a plain name"


def _escape_shard_symlink(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shutil.move(shard, outside / shard.name)
    os.symlink(outside / shard.name, shard)
    return f"'{shard.name}' is a symlink to {outside / shard.name}, outside the model folder"


def _escape_dir_symlink(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shutil.move(shard, outside / shard.name)
    os.symlink(outside, model / "linked")
    _repoint_shard(model, f"linked/{shard.name}")
    return "outside the model folder"


def _escape_config_symlink(model: Path, outside: Path) -> str:
    shutil.move(model / "config.json", outside / "config.json")
    os.symlink(outside / "config.json", model / "config.json")
    return "'config.json' is a symlink"


def _escape_tokenizer_symlink(model: Path, outside: Path) -> str:
    (outside / "secret.txt").write_text("the contents of a file the merge must not copy")
    os.symlink(outside / "secret.txt", model / "tokenizer.json")
    return "'tokenizer.json' is a symlink"


def _not_a_regular_file(model: Path, outside: Path) -> str:
    shard = sorted(model.glob("model-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)  # a read would block forever
    return "is not a regular file"


def _weight_map_not_names(model: Path, outside: Path) -> str:
    index = _index(model)
    index["weight_map"] = {k: 3 for k in index["weight_map"]}
    _set_index(model, index)
    return "weight_map must map tensor names to shard file names"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", [_escape_dotdot, _escape_nested_dotdot, _escape_absolute, _escape_shard_symlink,
                                    _escape_dir_symlink, _escape_config_symlink, _escape_tokenizer_symlink,
                                    _not_a_regular_file, _weight_map_not_names], ids=lambda f: f.__name__.strip("_"))
def test_model_files_cannot_lead_outside_the_model_folder(family_bf16, tmp_path, attack):
    model = sharded_copy(family_bf16["ft0"], tmp_path / "in" / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    words = attack(model, outside)
    cfg = write_cfg(tmp_path, linear_of(model, family_bf16["ft1"]))
    with pytest.raises(InputError) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert msg.startswith(str(model)) and words in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_hugging_face_cache_snapshot_links_are_inside_the_input_tree(family_bf16, tmp_path):
    """A hub snapshot's files are links to ../../blobs/: that is still the model's own tree, and merges."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0123456789abcdef" * 3)[:40]
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in family_bf16["ft0"].iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        os.symlink(Path("..") / ".." / "blobs" / blob.name, snap / f.name)
    run_merge(write_cfg(tmp_path, linear_of(snap, family_bf16["ft1"])), tmp_path / "a", progress=False)
    run_merge(write_cfg(tmp_path, linear_of(family_bf16["ft0"], family_bf16["ft1"]), "d.yml"), tmp_path / "b",
              progress=False)
    a, b = ({n: t for f in sorted((tmp_path / d).glob("*.safetensors")) for n, t in load_file(f).items()} for d in "ab")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # a snapshot link that leaves the repository's blobs is still refused
    os.unlink(snap / "config.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    os.symlink(tmp_path / "elsewhere.json", snap / "config.json")
    with pytest.raises(InputError, match="'config.json' is a symlink"):
        run_merge(write_cfg(tmp_path, linear_of(snap, family_bf16["ft1"]), "e.yml"), tmp_path / "c", progress=False)


@pytest.mark.parametrize("ref", ["org/..", "../org/..", "a/../b"])
def test_model_reference_with_dotdot_is_a_clean_error(tmp_path, ref):
    with pytest.raises(InputError) as info:
        run_merge(write_cfg(tmp_path, linear_of(ref)), tmp_path / "out", progress=False)
    assert ref in str(info.value) and "\n" not in str(info.value)
