"""Fuzzing, bounded in time: the config loader and the safetensors header reader either succeed or raise AlloyError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from merging.config import parse_config
from merging.errors import AlloyError
from merging.io import Checkpoint, read_header

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=12)
keys = st.sampled_from(["merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
                        "tokenizer_source", "tokenizer", "chat_template", "sources", "layer_range", "model",
                        "filter", "value", "weight", "density", "t"])
config_like = st.recursive(
    st.dictionaries(keys, values, max_size=6),
    lambda inner: st.dictionaries(keys, st.one_of(values, inner, st.lists(inner, max_size=3)), max_size=6),
    max_leaves=20)


@FUZZ
@given(config_like)
def test_config_loader_never_crashes(data):
    try:
        parse_config(data, "fuzz.yml")
    except AlloyError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.yml")


def _valid_file(tmp: Path) -> bytes:
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              str(tmp / "ok.safetensors"))
    return (tmp / "ok.safetensors").read_bytes()


@FUZZ
@given(data=st.data())
def test_header_reader_rejects_mutations_cleanly(tmp_path, data):
    raw = bytearray(_valid_file(tmp_path))
    kind = data.draw(st.sampled_from(["flip", "truncate", "length", "json"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "length":
        raw[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    else:
        header = {"a": {"dtype": data.draw(st.sampled_from(["F32", "BF16", "X9", 3])),
                        "shape": data.draw(st.lists(st.integers(-3, 10**12), max_size=3)),
                        "data_offsets": data.draw(st.lists(st.integers(-5, 10**12), max_size=3))}}
        blob = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(blob)) + blob + bytes(data.draw(st.integers(0, 64))))
    f = tmp_path / "m.safetensors"
    f.write_bytes(bytes(raw))
    try:
        infos, _ = read_header(f)
        ck = Checkpoint(f)
        for name in infos:
            t = ck.read(name)
            assert t.numel() * t.element_size() == infos[name].nbytes
    except AlloyError as e:
        assert str(f) in str(e) and "\n" not in str(e)


def test_huge_header_length_is_refused_without_allocating(tmp_path):
    f = tmp_path / "huge.safetensors"
    f.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    try:
        read_header(f)
    except AlloyError as e:
        assert "header length" in str(e)
    else:
        raise AssertionError("accepted a 4 EiB header")
