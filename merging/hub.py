"""Hugging Face hub ids as merge inputs: fetched (or found in the local cache when offline) at a pinned revision."""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from merging.errors import InputError

_CACHE: ContextVar[Path | None] = ContextVar("alloy_hub_cache", default=None)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
WEIGHT_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "README.md"]


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def snapshot_repo_id(folder: Path) -> str | None:
    """The hub id whose snapshot `folder` is, in huggingface_hub's cache layout (.../models--ORG--NAME/snapshots/
    COMMIT; hub ids cannot contain '--'); None for any other folder."""
    repo = folder.parent.parent.name if folder.parent.name == "snapshots" else ""
    return repo.removeprefix("models--").replace("--", "/", 1) if repo.startswith("models--") else None


@contextmanager
def hub_cache(folder: str | Path | None) -> Iterator[None]:
    """Within it, hub ids are downloaded to (and looked up in) `folder` instead of huggingface_hub's cache (HF_HOME):
    mergekit's --transformers-cache. None changes nothing."""
    token = _CACHE.set(Path(folder) if folder is not None else _CACHE.get())
    try:
        yield
    finally:
        _CACHE.reset(token)


def fetch(repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """Local snapshot folder and the commit it resolved to; offline, only what the cache holds. cache_dir: default
    the enclosing hub_cache's folder, else huggingface_hub's cache."""
    cache_dir = cache_dir if cache_dir is not None else _CACHE.get()
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise InputError(f"model {repo_id}{'@' + revision if revision else ''}: not in the local Hugging Face cache and "
                         "the hub cannot be reached (offline?)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise InputError(f"model {repo_id}: {type(e).__name__.replace('Error', '').lower()} on the hub ({revision or 'main'})") from None
    except OSError as e:
        raise InputError(f"model {repo_id}: download failed ({e})") from None
    return path, path.name  # snapshot folders are named by commit hash
