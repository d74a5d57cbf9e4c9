"""download: local folders, hub snapshots (a fake offline cache), GGUF and family sources, digests and errors."""

import hashlib
import json
from pathlib import Path

import pytest

from merging.errors import AlloyError
from tasks.download import folder_digest, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_checkpoint(path: Path, payload: bytes = b"weights") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(payload)
    return path


def test_local_path_digests_and_expected_sha(tmp_path):
    make_checkpoint(tmp_path / "m")
    info = resolve_model("m", {"path": "m"}, root=tmp_path, models_dir=tmp_path / "models")
    assert info["path"] == str((tmp_path / "m").resolve()) and info["kind"] == "path"
    assert info["files"]["model.safetensors"] == hashlib.sha256(b"weights").hexdigest()
    assert info["digest"] == folder_digest(info["files"])
    good = {"model.safetensors": hashlib.sha256(b"weights").hexdigest()}
    resolve_model("m", {"path": "m", "sha256": good}, root=tmp_path, models_dir=tmp_path)
    with pytest.raises(AlloyError, match=r"models\.m\.sha256: model\.safetensors is .* expects"):
        resolve_model("m", {"path": "m", "sha256": {"model.safetensors": "0" * 64}}, root=tmp_path, models_dir=tmp_path)


def test_local_path_errors_name_the_model(tmp_path):
    with pytest.raises(AlloyError, match=r"models\.gone\.path: .* does not exist"):
        resolve_model("gone", {"path": "nowhere"}, root=tmp_path, models_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlloyError, match=r"models\.empty: .* no config\.json"):
        resolve_model("empty", {"path": "empty"}, root=tmp_path, models_dir=tmp_path)


def fake_hub_cache(cache: Path, repo: str, payload: bytes) -> Path:
    """The layout huggingface_hub writes: blobs named by content (sha256 for LFS files), snapshots of symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    blobs = root / "blobs"
    blobs.mkdir()
    lfs = blobs / hashlib.sha256(payload).hexdigest()
    lfs.write_bytes(payload)
    (snap / "model.safetensors").symlink_to(lfs)
    cfg = blobs / "cfgetag"
    cfg.write_text(json.dumps({"model_type": "llama"}))
    (snap / "config.json").symlink_to(cfg)
    return lfs


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    cache = tmp_path / "hf"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_pinned_commit_offline(tmp_path, hub_cache):
    fake_hub_cache(hub_cache, "org/tiny", b"hub weights")
    info = resolve_model("h", {"hub": "org/tiny", "revision": COMMIT}, root=tmp_path, models_dir=tmp_path)
    assert info["revision"] == COMMIT and "warning" not in info
    assert info["lfs_verified"] == 1
    assert info["files"]["model.safetensors"] == hashlib.sha256(b"hub weights").hexdigest()
    # a branch is resolved to its commit, recorded, and the user is told to pin it
    info = resolve_model("h", {"hub": "org/tiny", "revision": "main"}, root=tmp_path, models_dir=tmp_path)
    assert info["revision"] == COMMIT and COMMIT in info["warning"]


def test_hub_not_cached_offline_is_one_clear_line(tmp_path, hub_cache):
    with pytest.raises(AlloyError, match=r"org/absent.*not in the local Hugging Face cache"):
        resolve_model("h", {"hub": "org/absent", "revision": COMMIT}, root=tmp_path, models_dir=tmp_path)


def test_hub_corrupted_blob_is_caught(tmp_path, hub_cache):
    lfs = fake_hub_cache(hub_cache, "org/tiny", b"hub weights")
    lfs.write_bytes(b"bit rot")  # same name (the sha256 of the original), other bytes
    with pytest.raises(AlloyError, match=r"models\.h: model\.safetensors does not match its hub sha256"):
        resolve_model("h", {"hub": "org/tiny", "revision": COMMIT}, root=tmp_path, models_dir=tmp_path)


def test_gguf_source_errors(tmp_path):
    with pytest.raises(AlloyError, match=r"not-a-package.*not installed"):
        resolve_model("g", {"gguf": "pip:not-a-package==1.0/x.gguf"}, root=tmp_path, models_dir=tmp_path)
    with pytest.raises(AlloyError, match=r"no such file"):
        resolve_model("g", {"gguf": str(tmp_path / "missing.gguf")}, root=tmp_path, models_dir=tmp_path)


def test_family_member(tmp_path):
    make_checkpoint(tmp_path / "fam" / "facts")
    info = resolve_model("facts", {"family": "facts", "skill": "facts"}, root=tmp_path, models_dir=tmp_path,
                         family_members={"facts": str(tmp_path / "fam" / "facts")})
    assert info["skill"] == "facts" and info["kind"] == "family"
    with pytest.raises(AlloyError, match=r"models\.x\.family: 'words' is not a member"):
        resolve_model("x", {"family": "words"}, root=tmp_path, models_dir=tmp_path, family_members={"facts": "."})


def _family_and_adapter(tmp_path: Path):
    """A tiny Llama and a hand-written PEFT adapter on layer 0's q_proj (scaling 4 / 2 = 2)."""
    import sys

    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "merging"))
    from family import make_family

    fam = make_family(tmp_path / "fam", n_finetunes=0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_dropout": 0.0,
        "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": "base", "task_type": "CAUSAL_LM"}))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    save_file({prefix + "lora_A.weight": a, prefix + "lora_B.weight": b}, str(adapter / "adapter_model.safetensors"))
    return fam["base"], adapter, 2.0 * (b @ a)


def test_lora_adapter_merged_into_the_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "hash-cache"))
    base, adapter, delta = _family_and_adapter(tmp_path)
    info = resolve_model("facts", {"path": str(base), "lora": "adapter"}, root=tmp_path, models_dir=tmp_path / "models")
    merged = Path(info["path"])
    assert merged.parent == (tmp_path / "models" / "lora").resolve()
    name = "model.layers.0.self_attn.q_proj.weight"
    want = load_file(str(base / "model.safetensors"))[name] + delta
    assert torch_equal(load_file(str(merged / "model.safetensors"))[name], want)
    assert info["lora"]["source"] == "adapter" and info["lora"]["path"] == str(adapter.resolve())
    assert info["lora"]["files"]["adapter_model.safetensors"] == hashlib.sha256(
        (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert info["digest"] == folder_digest(info["files"]) and info["files"] != {}
    again = resolve_model("facts", {"path": str(base), "lora": "adapter"}, root=tmp_path, models_dir=tmp_path / "models")
    assert again["path"] == info["path"] and again["digest"] == info["digest"]  # the cache folder reused
    with pytest.raises(AlloyError, match=r"models\.facts\.lora: .*nowhere does not exist"):
        resolve_model("facts", {"path": str(base), "lora": "nowhere"}, root=tmp_path, models_dir=tmp_path / "models")


def test_lora_adapter_from_the_hub_pinned(tmp_path, hub_cache, monkeypatch):
    """An adapter hub id at a commit, from the (offline) hub cache; unpinned, a warning names the commit."""
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "hash-cache"))
    base, adapter, _ = _family_and_adapter(tmp_path)
    root = hub_cache / "models--org--facts-lora"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for f in adapter.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    spec = {"path": str(base), "lora": "org/facts-lora", "lora_revision": COMMIT}
    info = resolve_model("facts", spec, root=tmp_path, models_dir=tmp_path / "models")
    assert info["lora"]["revision"] == COMMIT and "warning" not in info["lora"]
    local = resolve_model("facts", {"path": str(base), "lora": "adapter"}, root=tmp_path, models_dir=tmp_path / "m2")
    weights = {k: v for k, v in info["files"].items() if k != "alloy_lora.json"}  # (which records the adapter path)
    assert weights == {k: v for k, v in local["files"].items() if k != "alloy_lora.json"} and weights  # same merge
    info = resolve_model("facts", {"path": str(base), "lora": "org/facts-lora"}, root=tmp_path, models_dir=tmp_path / "models")
    assert f"lora_revision: {COMMIT}" in info["lora"]["warning"]
    with pytest.raises(AlloyError, match=r"models\.facts\.lora: model org/absent"):
        resolve_model("facts", {"path": str(base), "lora": "org/absent", "lora_revision": COMMIT}, root=tmp_path,
                      models_dir=tmp_path / "models")


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=1e-6)
