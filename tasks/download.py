"""download: make one input model a local, verified checkpoint folder and record where it came from.

- a local path is used in place;
- a hub id goes through `huggingface_hub.snapshot_download` (merging.hub.fetch) and is pinned to the commit it
  resolved to; files the hub stores by content (LFS: the cache names the blob by its sha256) are re-hashed and
  compared, and offline runs fail with one line when the snapshot is not cached;
- a GGUF source (a path or `pip:NAME==VERSION/FILE`) is imported by merging.gguf.import_gguf, cached by content;
- a family member is the folder the demo-family task built;
- with `lora:` (a folder or hub id, `lora_revision:` pins it) the adapter is merged into that model first, by
  merging.lora (peft's merge_and_unload, streamed; cached under <models>/lora by the inputs' content).

Every file's sha256 is recorded (cached by path, size, mtime and inode) and checked against `sha256:` in params.yaml.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from merging.errors import InputError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SKIP = {".gitattributes"}


def file_digests(folder: Path) -> dict[str, str]:
    from merging.hashing import file_sha256

    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in SKIP}


def folder_digest(files: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in sorted(files.items())).encode()).hexdigest()


def _check_checkpoint(name: str, path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"models.{name}: {path} is not a folder")
    if not (path / "config.json").is_file():
        raise InputError(f"models.{name}: {path} has no config.json (not a Hugging Face checkpoint)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise InputError(f"models.{name}: {path} holds no weight files (*.safetensors)")


def _verify_lfs(name: str, folder: Path, digests: dict[str, str]) -> int:
    """Hub snapshots link each LFS file to blobs/<sha256>: recompute and compare. Returns how many were checked."""
    checked = 0
    for fname, sha in digests.items():
        p = folder / fname
        if p.is_symlink():
            blob = Path(p.resolve()).name
            if SHA256.match(blob):
                if blob != sha:
                    raise InputError(f"models.{name}: {fname} does not match its hub sha256 {blob[:12]} (corrupted cache; "
                                     f"delete {p.resolve()} and download again)")  # fmt: skip
                checked += 1
    return checked


def resolve_model(name: str, spec: dict, *, root: str | Path, models_dir: str | Path,
                  family_members: dict[str, str] | None = None) -> dict:
    """Local folder, provenance and file digests of one `models:` entry (a ModelSpec as a dict)."""
    root, models_dir = Path(root), Path(models_dir)
    kind = next(k for k in ("path", "hub", "gguf", "family") if spec.get(k))
    info: dict = {"name": name, "kind": kind, "skill": spec.get("skill"), "revision": None, "source": spec[kind]}
    if kind == "path":
        p = Path(spec["path"]).expanduser()
        path = p if p.is_absolute() else root / p
        if not path.exists():
            raise InputError(f"models.{name}.path: {path} does not exist")
    elif kind == "hub":
        from merging.hub import fetch

        rev = spec.get("revision")
        path, commit = fetch(spec["hub"], rev)
        info["revision"] = commit
        if rev and not COMMIT.match(rev):
            info["warning"] = (f"models.{name}.revision {rev!r} is not a commit; resolved to {commit} for this run "
                               f"(pin it in params.yaml: revision: {commit})")  # fmt: skip
        elif not rev:
            info["warning"] = f"models.{name}: no revision; resolved to {commit} (pin it: revision: {commit})"
    elif kind == "gguf":
        from merging.gguf import import_gguf

        res = import_gguf(spec["gguf"], models_dir / name, dtype=spec.get("dtype", "bfloat16"))
        path = res.out_dir
        src = res.manifest.get("source", {})
        info["gguf"] = {"sha256": res.sha256, "quant_type": res.quant_type, "package": src.get("package"),
                        "version": src.get("version"), "cached": res.cached, "license": res.manifest.get("license"),
                        "base_model": res.manifest.get("base_model")}  # fmt: skip
        info["revision"] = f"sha256:{res.sha256}"
    else:
        member = spec["family"]
        if not family_members or member not in family_members:
            have = ", ".join(family_members or {}) or "no family built"
            raise InputError(f"models.{name}.family: {member!r} is not a member of the demo family ({have})")
        path = Path(family_members[member])
    path = Path(path).resolve()
    _check_checkpoint(name, path)
    if "gguf" not in info and (path / "alloy_source.json").is_file():  # a GGUF import made elsewhere (the family)
        try:
            src = json.loads((path / "alloy_source.json").read_text())
            info["gguf"] = {"sha256": src["source"]["sha256"], "quant_type": src["gguf"]["file_type"],
                            "package": src["source"].get("package"), "version": src["source"].get("version"),
                            "license": src.get("license"), "base_model": src.get("base_model")}  # fmt: skip
        except (ValueError, KeyError, TypeError):
            pass
    if spec.get("lora"):
        path, info["lora"] = _merge_adapter(name, path, spec, root, models_dir)
    digests = file_digests(path)
    for fname, want in (spec.get("sha256") or {}).items():
        if fname not in digests:
            raise InputError(f"models.{name}.sha256: {fname} is not in {path}")
        if digests[fname] != want.lower():
            raise InputError(f"models.{name}.sha256: {fname} is {digests[fname][:12]}..., params.yaml expects "
                             f"{want[:12]}... ({path / fname})")  # fmt: skip
    if kind == "hub":
        info["lfs_verified"] = _verify_lfs(name, path, digests)
    info.update(path=str(path), files=digests, digest=folder_digest(digests))
    return info


def _merge_adapter(name: str, base: Path, spec: dict, root: Path, models_dir: Path) -> tuple[Path, dict]:
    """The model with its LoRA adapter merged in, and where the adapter came from."""
    from merging.hub import fetch, looks_like_hub_id
    from merging.lora import materialize_lora

    src, rev = spec["lora"], spec.get("lora_revision")
    p = Path(src).expanduser()
    adapter, commit, warning = (p if p.is_absolute() else root / p), None, None
    if not adapter.exists():
        if not looks_like_hub_id(src):
            raise InputError(f"models.{name}.lora: {adapter} does not exist")
        try:
            adapter, commit = fetch(src, rev)
        except InputError as e:
            raise InputError(f"models.{name}.lora: {e}") from None
        if not rev or not COMMIT.match(rev):
            warning = f"models.{name}.lora: resolved to {commit} (pin it: lora_revision: {commit})"
    merged = materialize_lora(base, adapter, models_dir / "lora")
    files = file_digests(adapter)
    return merged, {"source": src, "revision": commit, "path": str(Path(adapter).resolve()), "files": files,
                    "digest": folder_digest(files), **({"warning": warning} if warning else {})}


@task(name="download", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def download(name: str, spec: dict, root: str, models_dir: str, family_members: dict[str, str] | None = None) -> dict:
    from prefect import get_run_logger

    info = resolve_model(name, spec, root=root, models_dir=models_dir, family_members=family_members)
    log = get_run_logger()
    for warning in (info.get("warning"), (info.get("lora") or {}).get("warning")):
        if warning:
            log.warning(warning)
    log.info(f"{name}: {info['path']} ({info['kind']}, digest {info['digest'][:12]})")
    return info
