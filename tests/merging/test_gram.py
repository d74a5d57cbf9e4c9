"""merging.gram and `alloy gram`: Gram matrices of the layer inputs, on the tiny family (real tokenizer, real data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alloy.cmd_gram import ensure_grams, load_texts
from merging.errors import InputError
from merging.gram import compute_grams, read_metadata, write_grams

ROOT = Path(__file__).resolve().parents[2]


def _layer_inputs(model_dir: Path, texts: list[str], module: str) -> torch.Tensor:
    """The inputs one module saw, texts run one at a time (no padding at all): the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    seen = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
    with torch.no_grad():
        for t in texts:
            model(input_ids=torch.tensor([tok(t)["input_ids"]]))
    handle.remove()
    return torch.cat(seen)


def test_grams_equal_the_mean_outer_product_of_each_layers_inputs(tiny_family):
    model = tiny_family.specialists["facts"]
    texts = [t for t, _ in [("Q: one\nA: two", 0), ("a longer text than the others, to pad the batch", 0), ("x", 0)]]
    grams, aliases, n = compute_grams(model, texts, batch_size=3)  # padded batch: padding must not count
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        x = _layer_inputs(model, texts, module)
        assert n == x.shape[0]
        torch.testing.assert_close(grams[module + ".weight"].double(), x.T @ x / n, rtol=1e-4, atol=1e-6)
    # q/k/v read one tensor, as do gate/up: stored once
    assert aliases["model.layers.0.self_attn.k_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert aliases["model.layers.1.self_attn.v_proj.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert "model.layers.1.self_attn.k_proj.weight" not in grams
    # layers of different depth never alias each other, even with inputs of one shape
    assert not any(k.split(".")[2] != v.split(".")[2] for k, v in aliases.items())


def test_write_ensure_and_the_cli(tiny_family, tmp_path):
    model = tiny_family.specialists["words"]
    out = tmp_path / "g.safetensors"
    res = ensure_grams(model, "skill:words", out, examples=8)
    assert not res["reused"] and res["tokens"] > 8
    meta = read_metadata(out)
    assert meta["data"] == "skill:words examples=8 seed=0" and json.loads(meta["model_files"])
    assert set(load_file(out)) >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert ensure_grams(model, "skill:words", out, examples=8)["reused"]
    assert not ensure_grams(model, "skill:words", out, examples=9)["reused"]  # other data: recomputed
    with pytest.raises(Exception, match="exists"):
        write_grams(model, ["x"], out)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"question": 1}\n')
    p = subprocess.run([sys.executable, "-m", "alloy", "gram", str(model), str(bad), str(tmp_path / "no.safetensors")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "bad.jsonl:2" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "no.safetensors").exists()

    # a command that loads a transformers model (which imports triton) ends quietly: no nanobind leak report
    p = subprocess.run([sys.executable, "-m", "alloy", "gram", str(model), "skill:words", str(tmp_path / "c.safetensors"),
                        "--examples", "4"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0 and "nanobind" not in p.stderr, p.stderr[-2000:]


def test_same_model_and_texts_give_the_same_bytes_in_any_clone(tiny_family, tmp_path):
    """dvc compares a stage's outputs by md5: two processes in two clones of a project must write one file."""
    files = []
    for clone in ("a", "b"):
        model = tmp_path / clone / "models" / "words"
        shutil.copytree(tiny_family.specialists["words"], model)
        out = tmp_path / clone / "grams" / "words.safetensors"
        p = subprocess.run([sys.executable, "-m", "alloy", "gram", str(model), "skill:words", str(out), "--examples", "4"],
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert p.returncode == 0, p.stderr[-2000:]
        files.append(out.read_bytes())
    assert files[0] == files[1]
    assert read_metadata(out)["model"] == "../models/words"
    assert list(load_file(out)) == sorted(load_file(out))


def test_text_sources(tmp_path):
    (tmp_path / "t.txt").write_text("one\n\ntwo\nthree\n")
    assert load_texts(str(tmp_path / "t.txt"), 2) == ["one", "two"]
    (tmp_path / "t.jsonl").write_text('{"prompt": "Q: a\\nA:", "answer": "b"}\n{"text": "c"}\n')
    assert load_texts(str(tmp_path / "t.jsonl"), 5) == [("Q: a\nA:", " b\n"), "c"]
    assert load_texts("skill:addition", 3)[0][0].startswith("Q: ")
    with pytest.raises(InputError, match="no such file"):
        load_texts(str(tmp_path / "missing.jsonl"), 2)


def test_loads_in_threads_take_turns_and_leave_transformers_sound(tiny_family, tmp_path):
    # Unserialised, two threads loading models at once left transformers' loading state changed: a tied model
    # loaded afterwards came out with an untied lm_head on the meta device (merging.loading).
    import threading

    from transformers import AutoModelForCausalLM

    from alloy.demo.smol import load_model
    from eval.quant import _load
    from tests.merging.family import llama_shapes, tiny_config, write_model

    def work(fn):
        for _ in range(3):
            fn()

    jobs = [lambda: load_model(tiny_family.specialists["words"]), lambda: _load(tiny_family.base),
            lambda: load_model(tiny_family.specialists["facts"])]
    threads = [threading.Thread(target=work, args=(fn,)) for fn in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cfg = tiny_config(tie=True)
    g = torch.Generator().manual_seed(0)
    tied = write_model(tmp_path / "tied", {n: torch.randn(s, generator=g) for n, s in llama_shapes(cfg).items()}, cfg)
    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.float32)
    assert model.lm_head.weight.device.type == "cpu"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("alloy: error:") and "\n" not in err, err
    return err


def test_cli_refuses_outputs_on_its_inputs_before_any_work(tiny_family, tmp_path, capsys, monkeypatch):
    import shutil

    import merging.gram as mg
    from alloy.cli import main as alloy

    model = tmp_path / "model"
    shutil.copytree(tiny_family.specialists["facts"], model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    data = tmp_path / "data.txt"
    data.write_text("one text\nanother text\n")

    def no_work(*a, **k):
        raise AssertionError("computed before the output was refused")

    monkeypatch.setattr(mg, "compute_grams", no_work)
    for out, said in [(model / "model.safetensors", "lies inside the input model folder"),
                      (model / "grams.safetensors", "lies inside the input model folder"),
                      (model, "is an input of this command"),
                      (data, "is an input of this command")]:  # fmt: skip
        assert alloy(["gram", str(model), str(data), str(out), "--overwrite"]) == 2
        assert said in _one_line_error(capsys)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before and data.read_text().startswith("one")
    # the library refuses the model's folder too
    with pytest.raises(Exception, match="lies inside the input model folder"):
        write_grams(model, ["x"], model / "g.safetensors", overwrite=True)


def test_cli_bad_arguments_data_and_models_in_one_line(tiny_family, tmp_path, capsys):
    import shutil

    from alloy.cli import main as alloy

    model = tiny_family.specialists["facts"]
    for bad in (["--max-tokens", "0"], ["--max-tokens", "-1"], ["--examples", "0"]):
        with pytest.raises(SystemExit) as e:
            alloy(["gram", str(model), "skill:facts", str(tmp_path / "g.safetensors"), *bad])
        assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    assert alloy(["gram", str(model), str(latin), str(tmp_path / "g.safetensors")]) == 2
    assert f"{latin}:2: not UTF-8 text (byte 8" in _one_line_error(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, bare / name)
    assert alloy(["gram", str(bare), "skill:facts", str(tmp_path / "g.safetensors"), "--examples", "2"]) == 2
    assert f"{bare}: no tokenizer files" in _one_line_error(capsys)
    assert not (tmp_path / "g.safetensors").exists()
