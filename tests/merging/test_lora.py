"""merging.lora: `base+adapter` merged by streaming, checked bit for bit against peft's merge_and_unload."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging.config import parse_config
from merging.errors import InputError, OutputError
from merging.lora import MANIFEST, materialize_lora

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _hash_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path / "alloy-cache"))  # keep file_sha256's cache out of $HOME


def _load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))  # transformers 5: the checkpoint's dtype, as mergekit gets


def make_adapter(base: Path, out: Path, *, seed: int = 0, file_dtype: torch.dtype | None = None, **lora) -> Path:
    """A peft adapter for `base` with every factor random (peft starts B at zero, which would merge to nothing)."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"])
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_load_base(base), LoraConfig(lora_dropout=0.0, **lora))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        model.save_pretrained(str(out))
    if file_dtype is not None:  # adapters are often shipped in bf16: peft upcasts them on load
        f = out / "adapter_model.safetensors"
        save_file({k: v.to(file_dtype) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
    return out


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """What mergekit 0.1.5 does: PeftModel.from_pretrained(...).merge_and_unload()."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_load_base(base), str(adapter), is_trainable=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_bitwise(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> int:
    """Every output tensor equals peft's exactly (dtype, shape, bits); returns how many differ from the base."""
    assert set(ours) == set(base)  # the base's tensors, no more (a tied lm_head stays tied)
    changed = 0
    for name, t in ours.items():
        r = ref[name]
        assert t.dtype == r.dtype and t.shape == r.shape, name
        assert torch.equal(t.view(torch.uint8) if t.dtype.itemsize == 1 else t, r), f"{name} differs from peft"
        changed += not torch.equal(t, base[name])
    return changed


def tiny_model(path: Path, kind: str) -> Path:
    """Tiny models `family.py` does not make: Llama with attention biases (lora_bias), GPT-2 (Conv1D layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             attention_bias=True))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(str(path))
    return path


CASES = {
    # name: (family, adapter file dtype, LoraConfig arguments)
    "fp32": ("fp32", None, {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]}),
    "bf16-embed-modules_to_save": ("bf16", None, {"target_modules": ["q_proj", "v_proj", "embed_tokens"],
                                                  "modules_to_save": ["lm_head"]}),
    "bf16-adapter-rslora": ("bf16", torch.bfloat16, {"use_rslora": True, "r": 8, "lora_alpha": 16,
                                                     "target_modules": ["q_proj", "up_proj"]}),
    "fp32-patterns": ("fp32", None, {"target_modules": ["q_proj", "v_proj", "down_proj"], "lora_alpha": 16,
                                     "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                     "alpha_pattern": {"down_proj": 3, "q_proj": 5}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft_bit_for_bit(case, family_fp32, family_bf16, tmp_path):
    fam, file_dtype, lora = CASES[case]
    base = (family_fp32 if fam == "fp32" else family_bf16)["base"]
    adapter = make_adapter(base, tmp_path / "adapter", file_dtype=file_dtype, **lora)
    out = materialize_lora(base, adapter, tmp_path / "cache")
    changed = assert_bitwise(read_folder(out), peft_merged(base, adapter), read_folder(base))
    assert changed >= 6


def test_mirrors_shards_and_records_inputs(family_bf16, tmp_path):
    base = family_bf16["base"]  # two shards and an index
    adapter = make_adapter(base, tmp_path / "adapter")
    out = materialize_lora(base, adapter, tmp_path / "cache")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert (out / "model.safetensors.index.json").read_bytes() == (base / "model.safetensors.index.json").read_bytes()
    assert (out / "config.json").read_bytes() == (base / "config.json").read_bytes()
    for shard in base.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            assert list(a.keys()) == list(b.keys()) and a.metadata() == b.metadata()
    rec = json.loads((out / MANIFEST).read_text())
    import hashlib

    want = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert rec["adapter_weights_sha256"] == want and rec["base"] == str(base.resolve())
    assert rec["adapter"] == str(adapter.resolve()) and rec["tokenizer_from"] == "base"
    assert not list((tmp_path / "cache").glob(".*"))  # no temp folder left behind


def test_lora_bias_matches_peft(tmp_path):
    base = tiny_model(tmp_path / "base", "llama-bias")
    adapter = make_adapter(base, tmp_path / "adapter", lora_bias=True, target_modules=["q_proj", "v_proj"])
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("lora_B.bias") for k in f.keys())
    out = materialize_lora(base, adapter, tmp_path / "cache")
    assert assert_bitwise(read_folder(out), peft_merged(base, adapter), read_folder(base)) == 8  # 2 layers x q,v x w,b


def test_fan_in_fan_out_conv1d_matches_peft(tmp_path):
    """GPT-2 stores its projections (in, out); c_proj is square, so only the architecture tells the orientation."""
    base = tiny_model(tmp_path / "base", "gpt2")
    adapter = make_adapter(base, tmp_path / "adapter", fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
    out = materialize_lora(base, adapter, tmp_path / "cache")
    # per layer: attn.c_attn, attn.c_proj and mlp.c_proj (c_proj matches both)
    assert assert_bitwise(read_folder(out), peft_merged(base, adapter), read_folder(base)) == 6


def test_key_spellings(family_fp32, tmp_path):
    """Adapter names with the adapter-name component (`lora_A.default.weight`) or without `base_model.model.` merge
    the same."""
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    ref = read_folder(materialize_lora(base, adapter, tmp_path / "cache"))
    f = adapter / "adapter_model.safetensors"
    sd = load_file(str(f))
    for i, rename in enumerate((lambda k: k.replace(".weight", ".default.weight"),
                                lambda k: k.removeprefix("base_model.model."))):
        other = tmp_path / f"adapter{i}"
        shutil.copytree(adapter, other)
        save_file({rename(k): v for k, v in sd.items()}, str(other / f.name))
        got = read_folder(materialize_lora(base, other, tmp_path / "cache"))
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_cache_is_reused_and_keyed_by_content(family_fp32, tmp_path):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    (adapter / "tokenizer.json").write_text('{"adapter": true}')  # an adapter's tokenizer wins over the base's
    cache = tmp_path / "cache"
    first = materialize_lora(base, adapter, cache)
    assert json.loads((first / "tokenizer.json").read_text()) == {"adapter": True}
    stamps = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    again = materialize_lora(base, adapter, cache)
    assert again == first and {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == stamps
    # new adapter bytes (same file names, sizes): a new folder
    other = make_adapter(base, tmp_path / "adapter2", seed=5)
    shutil.copyfile(other / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    third = materialize_lora(base, adapter, cache)
    assert third != first and first.exists()


def test_interrupted_build_leaves_nothing_reusable(family_fp32, tmp_path, monkeypatch):
    import merging.lora as lora_mod

    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    cache = tmp_path / "cache"
    real, calls = lora_mod._merged, []

    def dying(name, *a):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(name, *a)

    monkeypatch.setattr(lora_mod, "_merged", dying)
    with pytest.raises(KeyboardInterrupt):
        materialize_lora(base, adapter, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(lora_mod, "_merged", real)
    out = materialize_lora(base, adapter, cache)
    assert (out / MANIFEST).exists()


def _refused(base: Path, adapter: Path, cache: Path, *needles: str) -> str:
    with pytest.raises(InputError) as e:
        materialize_lora(base, adapter, cache)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not cache.exists() or not any(cache.iterdir())  # nothing written
    return msg


def test_refuses_dora(family_fp32, tmp_path):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter", use_dora=True)
    _refused(base, adapter, tmp_path / "cache", "adapter_config.json", "DoRA")
    # a DoRA magnitude in the weights, whatever the config says, names the tensor
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    _refused(base, adapter, tmp_path / "cache", "adapter_model.safetensors", "lora_magnitude_vector", "DoRA")


def test_refuses_pickle_adapter_without_reading_it(family_fp32, tmp_path):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04 not unpickled")
    _refused(base, adapter, tmp_path / "cache", "adapter_model.bin", "pickle")


def test_refuses_target_missing_from_base(family_fp32, tmp_path):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    save_file({k.replace("layers.2.", "layers.9."): v for k, v in load_file(str(f)).items()}, str(f))
    _refused(base, adapter, tmp_path / "cache", str(f), "layers.9.self_attn", "lacks")


def test_refuses_shape_mismatch(family_fp32, tmp_path):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    sd[key] = sd[key][:, :32].contiguous()
    save_file(sd, str(f))
    _refused(base, adapter, tmp_path / "cache", str(f), key, "do not fit")


@pytest.mark.parametrize("change, needle", [({"peft_type": "IA3"}, "IA3"), ({"r": 8}, "rank 8"),
                                            ({"init_lora_weights": "pissa"}, "pissa")])
def test_refuses_config(family_fp32, tmp_path, change, needle):
    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    _refused(base, adapter, tmp_path / "cache", "adapter", needle)


def test_matches_mergekit_lora_merge_cache(family_fp32, tmp_path):
    """mergekit's own `base+adapter` (linear with another model, --lora-merge-cache): its cache folder holds the
    same tensors as ours, and the merge built on either is identical."""
    mergekit = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    base, other = family_fp32["base"], family_fp32["ft0"]
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "lm_head"])

    def run(model: str, out: Path) -> dict[str, torch.Tensor]:
        cfg = MergeConfiguration.model_validate({
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": model, "parameters": {"weight": 0.7}},
                       {"model": str(other), "parameters": {"weight": 0.3}}],
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mergekit.run_merge(cfg, str(out), MergeOptions(lora_merge_cache=str(tmp_path / "mk-cache"),
                                                           copy_tokenizer=False, lazy_unpickle=False))
        return read_folder(out)

    merged_mk = run(f"{base}+{adapter}", tmp_path / "mk-out")
    (mk_folder,) = [p for p in (tmp_path / "mk-cache").iterdir() if p.is_dir()]
    ours = materialize_lora(base, adapter, tmp_path / "cache")
    mk = read_folder(mk_folder)
    got = read_folder(ours)
    assert set(mk) == set(got) and all(torch.equal(mk[k], got[k]) for k in got)
    merged_ours = run(str(ours), tmp_path / "ours-out")
    assert set(merged_ours) == set(merged_mk) and all(torch.equal(merged_ours[k], merged_mk[k]) for k in merged_mk)

    # the same YAML through alloy end to end: `base+adapter` resolved, merged into --lora-merge-cache, then merged
    from merging.engine import run_merge

    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}},
                      {"model": str(other), "parameters": {"weight": 0.3}}]}
    alloy_out = tmp_path / "alloy-out"
    run_merge(parse_config(cfg), alloy_out, progress=False, lora_cache=tmp_path / "alloy-cache")
    got = read_folder(alloy_out)
    assert set(got) == set(merged_mk) and all(torch.equal(got[k], merged_mk[k]) for k in merged_mk)
    manifest = json.loads((alloy_out / "alloy_manifest.json").read_text())
    entry = manifest["inputs"][0]
    assert entry["model"] == f"{base}+{adapter}" and entry["lora"]["adapter"] == str(adapter.resolve())
    assert entry["lora"]["adapter_weights_sha256"] == hashlib.sha256(
        (adapter / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_lora_merge_dtype_matches_mergekit(family_fp32, tmp_path):
    """--lora-merge-dtype bfloat16 on a float32 base: mergekit loads the base in bf16 and merges there; alloy's cache
    folder holds the same bf16 tensors, its config says so, and the merge built on it equals mergekit's."""
    mergekit = pytest.importorskip("mergekit.merge")
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from merging.engine import run_merge

    base, other = family_fp32["base"], family_fp32["ft0"]
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "lm_head"])
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.7}},
                      {"model": str(other), "parameters": {"weight": 0.3}}]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mergekit.run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk-out"),
                           MergeOptions(lora_merge_cache=str(tmp_path / "mk-cache"), lora_merge_dtype="bfloat16",
                                        copy_tokenizer=False, lazy_unpickle=False))
    (mk_folder,) = [p for p in (tmp_path / "mk-cache").iterdir() if p.is_dir()]
    mk = read_folder(mk_folder)
    ours = materialize_lora(base, adapter, tmp_path / "cache", torch.bfloat16)
    got = read_folder(ours)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert set(mk) <= set(got) and all(torch.equal(mk[k], got[k]) for k in mk)
    config = json.loads((ours / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"
    assert json.loads((ours / MANIFEST).read_text())["dtype"] == "bfloat16"
    # each dtype has its own cache folder (mergekit would reuse one merged in another dtype)
    plain = materialize_lora(base, adapter, tmp_path / "cache")
    assert plain != ours and {t.dtype for t in read_folder(plain).values()} == {torch.float32}

    run_merge(parse_config(cfg), tmp_path / "alloy-out", progress=False, lora_cache=tmp_path / "alloy-cache",
              lora_dtype="torch.bfloat16")  # mergekit's spelling too
    want, got = read_folder(tmp_path / "mk-out"), read_folder(tmp_path / "alloy-out")
    assert set(want) <= set(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_lora_merge_dtype_rewrites_the_index_size(family_bf16, tmp_path):
    base = family_bf16["base"]  # two bf16 shards and an index
    out = materialize_lora(base, make_adapter(base, tmp_path / "adapter"), tmp_path / "cache", torch.float32)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in read_folder(out).values())


def test_cli_refuses_an_unknown_lora_merge_dtype(family_fp32, tmp_path, capsys):
    from alloy.cli import main

    base = family_fp32["base"]
    adapter = make_adapter(base, tmp_path / "adapter")
    cfg = _write_config(tmp_path, [f"{base}+{adapter}", str(family_fp32["ft0"])])
    capsys.readouterr()  # transformers' loading bars while the adapter was made
    rc = main(["merge", str(cfg), str(tmp_path / "out"), "--lora-merge-dtype", "int8",
               "--lora-merge-cache", str(tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "--lora-merge-dtype 'int8'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def _write_config(tmp_path: Path, models: list[str], name: str = "cfg.yml") -> Path:
    import yaml

    cfg = tmp_path / name
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "dtype": "float32",
                                   "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}))
    return cfg


def test_cli_merges_lora_reference_once_into_its_cache(family_fp32, tmp_path):
    """`alloy merge` with a `base+adapter` model and --lora-merge-cache: the adapter is merged once, a second merge
    reuses the cache folder untouched; the merge equals the one made from the merged folder given directly."""
    from alloy.cmd_merge import main

    base, other = family_fp32["base"], family_fp32["ft1"]
    adapter = make_adapter(base, tmp_path / "adapter")
    cache = tmp_path / "lora-cache"
    cfg = _write_config(tmp_path, [f"{base}+{adapter}", str(other)])
    assert main([str(cfg), str(tmp_path / "out1"), "--lora-merge-cache", str(cache), "--no-progress"]) == 0
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert main([str(cfg), str(tmp_path / "out2"), "--lora-merge-cache", str(cache), "--no-progress"]) == 0
    assert [p for p in cache.iterdir() if not p.name.startswith(".")] == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    direct = _write_config(tmp_path, [str(folder), str(other)], "direct.yml")
    assert main([str(direct), str(tmp_path / "out3"), "--no-progress"]) == 0
    a, b = read_folder(tmp_path / "out2"), read_folder(tmp_path / "out3")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"],
                           read_folder(_write_and_merge(tmp_path, base, other))["model.layers.0.self_attn.q_proj.weight"])


def _write_and_merge(tmp_path: Path, base: Path, other: Path) -> Path:
    """The same merge without the adapter (to show the adapter changed something)."""
    from merging.engine import run_merge

    out = tmp_path / "no-adapter"
    run_merge(_write_config(tmp_path, [str(base), str(other)], "plain.yml"), out, progress=False)
    return out


def test_missing_adapter_is_one_line_error_and_no_output(family_fp32, tmp_path, capsys):
    from alloy.cli import main as cli

    base, other = family_fp32["base"], family_fp32["ft1"]
    cfg = _write_config(tmp_path, [f"{base}+{tmp_path / 'no-such-adapter'}", str(other)])
    rc = cli(["merge", str(cfg), str(tmp_path / "out"), "--lora-merge-cache", str(tmp_path / "c"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "\n" not in err and "LoRA adapter" in err and "no-such-adapter" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_output_inside_the_adapter_is_refused(family_fp32, tmp_path):
    from merging.engine import run_merge

    base, other = family_fp32["base"], family_fp32["ft1"]
    adapter = make_adapter(base, tmp_path / "adapter")
    cfg = parse_config({"merge_method": "linear", "parameters": {"weight": 1.0},
                        "models": [{"model": f"{base}+{adapter}"}, {"model": str(other)}]})
    before = sorted(p.name for p in adapter.iterdir())
    with pytest.raises(OutputError, match="adapter"):
        run_merge(cfg, adapter, overwrite=True, progress=False, lora_cache=tmp_path / "c")
    assert sorted(p.name for p in adapter.iterdir()) == before
