"""JSON Lines as the project's text inputs use them (held-out documents, Gram-matrix examples, tune splits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from merging.errors import InputError


def jsonl_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded row) for each non-blank line; a line that is not JSON is an InputError naming
    file:line. A missing file raises FileNotFoundError (callers word that for their own input)."""
    path = Path(path)
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{i}: not JSON ({e.msg})") from None
