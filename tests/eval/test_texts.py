"""eval.texts: the JSON Lines reader behind held-out texts, Gram-matrix examples and tune splits."""

from __future__ import annotations

import pytest

from eval.texts import jsonl_rows
from merging.errors import InputError


def test_rows_with_their_line_numbers_skipping_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "x"}\n\n  \n[1, 2]\n"s"\n')
    assert list(jsonl_rows(f)) == [(1, {"text": "x"}), (4, [1, 2]), (5, "s")]


def test_a_bad_line_is_named(tmp_path):
    f = tmp_path / "b.jsonl"
    f.write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(InputError, match=r"b\.jsonl:2: not JSON"):
        list(jsonl_rows(f))
    with pytest.raises(FileNotFoundError):
        list(jsonl_rows(tmp_path / "missing.jsonl"))
