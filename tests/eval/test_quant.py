"""The quantisation check on a tiny trained Llama: passes when healthy, names the tensor when broken."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from eval import quant as Q  # noqa: E402
from merging.errors import ConfigError, InputError  # noqa: E402

TRAIN = (
    "the cat sat on the mat. the dog ran to the park. a bird sang in the tree. "
    "the sun is warm and the sky is blue. we like to read books by the sea. "
)
HELD_OUT = [
    "the dog sat on the mat. a cat ran to the tree. the sky is warm by the sea.",
    "we like to read by the park. the bird sang and the sun is blue. the cat ran to the sea.",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    for c in sorted(set(TRAIN + "".join(HELD_OUT))):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tensors this small gain nothing from a second thread, and on a loaded 2-core box torch's two threads spin
    # against each other (measured 7x slower than one).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread) -> Path:
    """Hidden 64, 2 layers; intermediate 176 so down_proj rows (176 columns) need int4 padding to 256."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.tensor(tok(TRAIN * 8)["input_ids"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    # Enough steps that next-token distributions are peaked (top-1 is then meaningful), few enough to be fast.
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 65, (16,), generator=g)
        batch = torch.stack([ids[s : s + 65] for s in starts])
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("quant") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def good_report(tiny):
    return Q.quant_check(tiny, HELD_OUT, max_tokens=256)


def _edit(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------------ quantisers


def test_int8_per_channel_symmetric_exact_on_its_grid():
    scale = torch.tensor([[0.5], [0.01], [3.0]])
    q = torch.randint(-127, 128, (3, 40)).float()
    q[:, 0] = 127  # the row maximum fixes the scale
    w = q * scale
    assert torch.allclose(Q.quantize_int8(w), w, rtol=0, atol=1e-6)
    zero = torch.zeros(2, 5)
    assert torch.equal(Q.quantize_int8(zero), zero)


def test_int4_groups_padding_and_zero():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 200, generator=g)  # 200 = 128 + 72: the last group is padded
    q = Q.quantize_int4(w)
    assert q.shape == w.shape
    # at most 16 distinct levels per group, and each group's error at most half a step
    for lo_col, hi_col in ((0, 128), (128, 200)):
        for r in range(6):
            grp, qg = w[r, lo_col:hi_col], q[r, lo_col:hi_col]
            assert len(torch.unique(qg)) <= 16
            step = (grp.max().clamp(min=0) - grp.min().clamp(max=0)) / 15
            assert (grp - qg).abs().max() <= step / 2 + 1e-6
    w[0, :] = 0.0
    w[1, 5] = 0.0
    q = Q.quantize_int4(w)
    assert torch.equal(q[0], torch.zeros(200))
    assert q[1, 5] == 0.0  # zero is always on the grid


def test_int4_asymmetric_uses_the_full_range():
    w = torch.linspace(0.1, 1.6, 128)[None]  # all positive: symmetric int4 would waste half its levels
    err4 = (Q.quantize_int4(w) - w).abs().max().item()
    assert err4 <= (1.6 / 15) / 2 + 1e-6


def test_relative_error():
    w = torch.tensor([[3.0, 4.0]])
    assert Q.relative_error(w, torch.tensor([[3.0, 3.0]])) == pytest.approx(0.2)
    assert Q.relative_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0


# --------------------------------------------------------------------------------------------- whole check


def test_healthy_model_passes(good_report):
    r = good_report
    assert r.passed, r.reasons
    m = r.metrics
    assert m["nonfinite_tensors"] == 0
    assert m["n_tokens"] > 100
    assert m["quantized_tensors"] == 14  # 7 Linear per layer; embeddings and lm_head stay fp by default
    assert 0 < m["int8_kl"] < m["int4_kl"]
    assert m["int8_top1"] >= m["int4_top1"] - 0.02
    assert m["int8_top1"] > 0.95
    assert m["fp16_nonfinite_positions"] == 0 and m["fp16_kl"] < 1e-3
    assert m["fp_ppl"] < 10  # trained: far below the ~30-character vocabulary of a uniform guess
    assert 0.5 < m["int8_ppl_ratio"] < 1.05
    for fmt in ("int8", "int4"):
        names = [n for n, _ in r.worst_tensors[fmt]]
        assert len(names) == 5 and all(n.endswith(".weight") for n in names)
        errs = [e for _, e in r.worst_tensors[fmt]]
        assert errs == sorted(errs, reverse=True)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["passed"] is True and d["metrics"]["int4_kl"] == m["int4_kl"]


def test_int8_errors_smaller_than_int4(good_report):
    errs = good_report.tensor_errors
    assert len(errs) == 14
    for name, e in errs.items():
        assert 0 < e["int8"] < e["int4"], name
        assert e["int8"] < 0.03 and e["int4"] < 0.3, (name, e)
    assert good_report.metrics["int8_max_weight_error"] < good_report.metrics["int4_mean_weight_error"]


def test_layer_scaled_by_1e4_fails_naming_it(tiny, tmp_path):
    bad = "model.layers.1.mlp.down_proj.weight"

    def scale(t):
        t[bad] = t[bad] * 1e4

    r = Q.quant_check(_edit(tiny, tmp_path / "scaled", scale), HELD_OUT, max_tokens=256)
    assert not r.passed
    assert any(bad in line and "scale_ratio_max" in line for line in r.reasons), r.reasons
    assert r.metrics["max_scale_ratio"] > 1e3
    # the trap: quantisation metrics computed in fp32 do not see it
    assert r.metrics["int8_kl"] < 1e-3


def test_nan_fails_naming_the_tensor(tiny, tmp_path):
    bad = "model.layers.0.self_attn.q_proj.weight"

    def plant(t):
        t[bad][3, 5] = float("nan")

    r = Q.quant_check(_edit(tiny, tmp_path / "nan", plant), HELD_OUT, max_tokens=64)
    assert not r.passed
    assert r.metrics["nonfinite_tensors"] == 1
    assert r.reasons[0].startswith(bad) and "NaN" in r.reasons[0], r.reasons
    assert "int8_kl" not in r.metrics  # forward passes would all be NaN: skipped


def test_fp16_overflow_fails_naming_the_module(tiny, tmp_path):
    bad = "model.layers.1.mlp.down_proj"

    def blow_up(t):
        t[bad + ".weight"] = t[bad + ".weight"] * 1e7

    # scale_ratio would catch this first; switch it off to see the fp16 pass catch it on its own
    big = _edit(tiny, tmp_path / "big", blow_up)
    for mode in ("native", "emulated"):
        r = Q.quant_check(big, HELD_OUT, {"scale_ratio_max": 1e12}, max_tokens=64, fp16=mode)
        assert not r.passed
        fp16 = [line for line in r.reasons if line.startswith("fp16")]
        assert fp16 and bad in fp16[0], (mode, r.reasons)
        assert r.metrics["max_activation"] > Q.FP16_MAX
        assert r.metrics["int8_kl"] < 0.02  # fp32 quantisation metrics stay healthy: only fp16 sees it
    with pytest.raises(ConfigError, match="fp16"):
        Q.quant_check(tiny, HELD_OUT, fp16="bf16")


def test_fp16_emulation_matches_native_fp16(tiny):
    from transformers import AutoModelForCausalLM

    model, tok = Q._load(tiny)
    windows = Q._windows(tok, HELD_OUT, 128, 64)
    ref_pass, ref = Q._run(model, windows, None, keep=True)
    emu, _ = Q._fp16_pass(model, windows, ref)
    native_model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    nat, _ = Q._fp16_pass(native_model, windows, ref, native=True)
    assert emu.n == nat.n == ref_pass.n
    kl_emu, kl_nat = emu.kl / emu.n, nat.kl / nat.n
    assert kl_emu > 0 and kl_nat > 0
    assert 0.1 < kl_emu / kl_nat < 10  # same order: native fp16 also rounds intermediates inside each module
    assert emu.agree == pytest.approx(nat.agree, abs=2)


def test_embeddings_optional_and_weights_restored(tiny):
    model, tok = Q._load(tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = Q._windows(tok, HELD_OUT, 64, 64)
    ref_pass, ref = Q._run(model, windows, None, keep=True)
    v = Q._Verdict(Q.resolve_thresholds(None))
    worst, errors = Q._quant_stage(v, model, windows, ref, ref_pass, None, True, 3)
    assert set(errors) >= {"model.embed_tokens.weight", "lm_head.weight"} and len(errors) == 16
    assert len(worst["int4"]) == 3
    for n, p in model.named_parameters():  # the check must hand back the model it was given
        assert torch.equal(p, before[n]), n
    assert Q._quant_targets(model, False) and len(Q._quant_targets(model, False)) == 14


def test_thresholds_override(tiny, good_report):
    # A healthy model fails when the bar is set above what int4 can do, and the reason names the metric.
    r = Q.quant_check(tiny, HELD_OUT, {"int4_kl_max": good_report.metrics["int4_kl"] / 2}, max_tokens=256)
    assert not r.passed
    assert len(r.reasons) == 1 and r.reasons[0].startswith("int4_kl:") and "int4_kl_max" in r.reasons[0]
    assert r.thresholds["int4_kl_max"] == pytest.approx(good_report.metrics["int4_kl"] / 2)
    th = Q.resolve_thresholds({"ppl_ratio_max": 3, "outlier_ratio_max": "7.5", "int8_kl_max": None})
    assert th["int8_ppl_ratio_max"] == th["int4_ppl_ratio_max"] == 3.0
    assert th["outlier_ratio_max"] == 7.5 and th["int8_kl_max"] == Q.DEFAULT_THRESHOLDS["int8_kl_max"]
    with pytest.raises(ConfigError, match="int8_kl_maxx"):
        Q.resolve_thresholds({"int8_kl_maxx": 1})
    with pytest.raises(ConfigError, match="int4_top1_min"):
        Q.resolve_thresholds({"int4_top1_min": "high"})


def test_baseline_comparison(tiny, tmp_path, good_report):
    # Against itself: ratios 1 and no drop.
    same = Q.quant_check(tiny, HELD_OUT, baseline=good_report, max_tokens=256)
    assert same.passed, same.reasons
    assert same.metrics["int4_kl_vs_baseline"] == pytest.approx(1.0)
    assert same.metrics["int4_top1_drop_vs_baseline"] == 0.0
    # A model made more fragile: one MLP layer's rows get a few huge weights, which coarsens int8 and int4 grids
    # of the whole row while barely changing the fp32 model.
    bad = "model.layers.0.mlp.down_proj.weight"

    def spike_rows(t):
        w = t[bad]
        w[:, 0] = w.abs().amax(dim=1) * 40

    fragile = _edit(tiny, tmp_path / "fragile", spike_rows)
    r = Q.quant_check(fragile, HELD_OUT, baseline=good_report.to_dict(), max_tokens=256)
    assert r.metrics["int4_kl_vs_baseline"] > 3
    assert any(line.startswith("int4_kl_vs_baseline") for line in r.reasons), r.reasons
    with pytest.raises(InputError, match="baseline was measured on"):
        Q.quant_check(tiny, HELD_OUT, baseline=good_report.metrics, max_tokens=64)


def test_outlier_tensor_fails(tiny, tmp_path):
    bad = "model.layers.0.mlp.up_proj.weight"

    def spike(t):
        t[bad][7, 11] = t[bad].abs().max() * 500

    r = Q.quant_check(_edit(tiny, tmp_path / "spike", spike), HELD_OUT, max_tokens=32)
    assert not r.passed
    assert any(line.startswith(bad) and "outlier_ratio_max" in line for line in r.reasons), r.reasons
    # the plain std saturates at sqrt(numel) = 106 here; the robust one does not
    assert r.metrics["max_outlier_ratio"] > 1000


def test_no_usable_text(tiny):
    with pytest.raises(InputError, match="no window"):
        Q.quant_check(tiny, ["", "t"], max_tokens=64)


def test_scale_ratios_peer_rules():
    S = Q.TensorStats
    stats = [
        S("model.layers.0.mlp.w.weight", (4, 4), 0, 1.0, 1.0, 2.0, 4.0),
        S("model.layers.1.mlp.w.weight", (4, 4), 0, 2.0, 2.0, 4.0, 8.0),
        S("model.layers.2.mlp.w.weight", (4, 4), 0, 300.0, 300.0, 600.0, 1200.0),
        S("model.embed.weight", (8, 4), 0, 3.0, 3.0, 6.0, 12.0),  # no peers: compared with every other 2-D tensor
        S("model.norm.weight", (4,), 0, 1.0, 0.1, 1.2, 2.0),  # no peers and 1-D: left out
    ]
    r = Q.scale_ratios(stats)
    assert r["model.layers.2.mlp.w.weight"] == pytest.approx(300 / 1.5)
    assert r["model.layers.0.mlp.w.weight"] == pytest.approx(1 / 151)
    assert r["model.embed.weight"] == pytest.approx(3 / 2)
    assert "model.norm.weight" not in r
    assert not math.isnan(sum(r.values()))


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_pass_fail_json(tiny, tmp_path, capsys):
    from alloy.cli import main as alloy

    text = tmp_path / "held.txt"
    text.write_text("\n".join(HELD_OUT))
    rows = tmp_path / "held.jsonl"
    rows.write_text("".join(json.dumps({"question": t[:30], "answer": t[30:]}) + "\n" for t in HELD_OUT))
    out = tmp_path / "r" / "quant.json"
    assert alloy(["quant-check", str(tiny), "--text", str(text), "--max-tokens", "128", "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "PASSED" in shown and "int4_kl" in shown and "<= 1" in shown
    d = json.loads(out.read_text())
    assert d["passed"] and d["model_dir"] == str(tiny) and d["metrics"]["n_tokens"] > 50

    code = alloy(["quant-check", str(tiny), "--text", str(text), "--max-tokens", "128",
                  "--thresholds", "int8_top1_min=1.01", "--baseline", str(out)])
    shown = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in shown and "int8_top1: top-1 agreement" in shown and "int8_top1_min 1.01" in shown
    assert "int4_kl_vs_baseline" in shown  # compared with the first run: same text, ratio 1

    # a .jsonl gives one text per row: a different token count, which a baseline must refuse
    assert alloy(["quant-check", str(tiny), "--text", str(rows), "--max-tokens", "128", "--baseline", str(out)]) == 2
    assert "baseline was measured on" in capsys.readouterr().err
    assert alloy(["quant-check", str(tiny), "--text", str(rows), "--max-tokens", "128"]) == 0
    capsys.readouterr()

    assert alloy(["quant-check", str(tiny), "--thresholds", "int8_kl=1"]) == 2
    assert "unknown key 'int8_kl'" in capsys.readouterr().err
    assert alloy(["quant-check", str(tiny), "--text", str(tmp_path / "missing.txt")]) == 2


def test_tied_embeddings_quantised_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in Q._quant_targets(model, True)]
    assert len(names) == 8 and sum(n in ("model.embed_tokens.weight", "lm_head.weight") for n in names) == 1
    assert len(Q._quant_targets(model, False)) == 7


def test_read_texts(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("one text\nover two lines")
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "first", "id": "x"}\n\n{"question": "Q: 2+2?", "answer": "4", "n": 3}\n')
    assert Q.read_texts([a, b]) == ["one text\nover two lines", "first", "Q: 2+2? 4"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        Q.read_texts([bad])
    assert "Paris" in Q.DEFAULT_TEXT


def test_rows_without_a_string_text_are_named(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "fine"}\n"a plain string row"\n{"text": 1}\n')
    with pytest.raises(InputError, match=r"rows\.jsonl:3: \"text\" is int 1, not a string"):
        Q.read_texts([f])
    f.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"rows\.jsonl:2: a row is an object"):
        Q.read_texts([f])
    f.write_text('{"text": "fine"}\n"a plain string row"\n')
    assert Q.read_texts([f]) == ["fine", "a plain string row"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"ok\n\xe9t\xe9\n")
    with pytest.raises(InputError, match=r"latin\.txt:2: not UTF-8 text \(byte 3"):
        Q.read_texts([latin])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("alloy: error:") and "\n" not in err, err
    return err


def test_cli_refuses_bad_arguments_and_outputs_before_any_work(tiny, tmp_path, capsys, monkeypatch):
    from alloy.cli import main as alloy

    for bad in (["--max-tokens", "-5"], ["--max-tokens", "0"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            alloy(["quant-check", str(tiny), *bad])
        assert e.value.code == 2 and "must be a positive integer" in capsys.readouterr().err

    def no_work(*a, **k):
        raise AssertionError("the check ran before the output was refused")

    monkeypatch.setattr(Q, "quant_check", no_work)
    before = (tiny / "config.json").read_bytes()
    text = tmp_path / "held.txt"
    text.write_text(HELD_OUT[0])
    (tmp_path / "a_file").write_text("x")
    cases = {
        str(tiny / "config.json"): "lies inside the input model folder",
        str(text): "is an input of this command",
        str(tmp_path): "is a folder",
        str(tmp_path / "a_file" / "r.json"): "is a file, not a folder",
    }
    for out, refusal in cases.items():
        assert alloy(["quant-check", str(tiny), "--text", str(text), "--json", out]) == 2
        assert refusal in _one_line_error(capsys)
    assert (tiny / "config.json").read_bytes() == before
    # the baseline report is an input too
    base = tmp_path / "base.json"
    base.write_text("{}")
    assert alloy(["quant-check", str(tiny), "--baseline", str(base), "--json", str(base)]) == 2
    assert "is an input" in _one_line_error(capsys) and base.read_text() == "{}"


def test_cli_model_without_tokenizer_and_quiet_stderr(tiny, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, bare / name)
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-m", "alloy", "quant-check", str(bare), "--max-tokens", "32"],
                       capture_output=True, text=True, cwd=tmp_path, env=env)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip() == (
        f"alloy: error: {bare}: no tokenizer files (tokenizer.json, tokenizer.model, spiece.model, ...); copy the "
        "tokenizer of the model it was made from into the folder")
    # a healthy run outside any git checkout: nothing on stderr (no "Loading weights" bar from transformers)
    p = subprocess.run([sys.executable, "-m", "alloy", "quant-check", str(tiny), "--max-tokens", "32",
                        "--fp16", "emulated", "--threads", "1"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert p.returncode == 0 and "PASSED" in p.stdout
    assert p.stderr.strip() == "", p.stderr
