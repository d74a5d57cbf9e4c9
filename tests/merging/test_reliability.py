"""Bad inputs get one clear line before anything is written; NaN/Inf inputs are refused or let through on request;
a killed merge can be rerun. (The cases of issue 7 not here are in test_engine.py, test_config.py, test_fuzz.py.)"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging.checks import all_finite, check_finite, nan_policy
from merging.engine import merge_to_state_dict, run_merge
from merging.errors import AlloyError, ConfigError, InputError
from merging.io import Checkpoint
from family import linear_of, write_cfg

ROOT = Path(__file__).resolve().parents[2]
ALLOY = [sys.executable, "-m", "alloy"]
EMBED = "model.embed_tokens.weight"


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def copy_model(src: Path, dst: Path, change=None) -> Path:
    """A copy of a single-file model, its tensors passed through `change(dict)` first."""
    shutil.copytree(src, dst)
    if change is not None:
        sd = load_file(dst / "model.safetensors")
        change(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fail the test if anything reads tensor data: plan-time errors must come from headers and the config."""
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the error")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def run_and_fail(tmp: Path, cfg: dict, error: type[AlloyError] = AlloyError) -> str:
    with pytest.raises(error) as info:
        run_merge(write_cfg(tmp, cfg), tmp / "out", progress=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert listing(tmp) in (["c.yml"], ["c.yml", "inputs"]), "something was written"
    return msg


# ------------------------------------------------------------------------------- parameter values out of range


def ties(f, **model_params) -> dict:
    return {"merge_method": "ties", "base_model": str(f["base"]),
            "models": [{"model": str(f["ft0"]), "parameters": {"weight": 1.0, "density": 0.5, **model_params}},
                       {"model": str(f["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}]}


def slerp(f, t) -> dict:
    return {"merge_method": "slerp", "base_model": str(f["base"]), "parameters": {"t": t},
            "models": [{"model": str(f["base"])}, {"model": str(f["ft0"])}]}


def with_method(cfg: dict, method: str, **top) -> dict:
    cfg = dict(cfg, merge_method=method)
    cfg["parameters"] = {**cfg.get("parameters", {}), **top}
    return cfg


@pytest.mark.parametrize("make, where, words", [
    (lambda f: ties(f, density=1.5), "models[0].parameters.density", "1.5 is out of range: method 'ties' needs a number in (0, 1]"),
    (lambda f: ties(f, density=0), "models[0].parameters.density", "(0, 1]"),
    (lambda f: ties(f, density=[0.5, -0.1, 0.5]), "models[0].parameters.density[1]", "-0.1 is out of range"),
    (lambda f: ties(f, density=[{"filter": "mlp", "value": 0.5}, {"value": 2}]), "models[0].parameters.density[1].value", "2"),
    (lambda f: ties(f, density="half"), "models[0].parameters.density", "'half' is not a number"),
    (lambda f: ties(f, density=float("nan")), "models[0].parameters.density", "nan"),
    (lambda f: with_method(ties(f), "dare_ties", density=1.01), "parameters.density", "method 'dare_ties'"),
    (lambda f: {**slerp(f, 0.5), "merge_method": "nearswap"} | {"parameters": {"t": [0.1, 0.5, -0.2]}},
     "parameters.t[2]", "method 'nearswap' needs a number > 0"),
    (lambda f: {**slerp(f, 0.5), "merge_method": "nearswap"} | {"parameters": {"t": 0}},
     "parameters.t", "method 'nearswap' needs a number > 0"),  # 0 / 0 wherever the models agree
    (lambda f: {"merge_method": "nuslerp", "models": [{"model": str(f["base"]), "parameters": {"weight": -1.0}},
                                                      {"model": str(f["ft0"]), "parameters": {"weight": 1.0}}]},
     "models[0].parameters.weight", "method 'nuslerp' needs a number >= 0"),
    (lambda f: {"merge_method": "multislerp", "models": [{"model": str(f["ft0"]), "parameters": {"weight": 1.0}},
                                                         {"model": str(f["ft1"]), "parameters": {"weight": -0.5}}]},
     "models[1].parameters.weight", ">= 0"),
    (lambda f: with_method(ties(f), "ties", normalize="maybe"), "parameters.normalize", "is not true or false"),
    (lambda f: ties(f, weight=[]), "models[0].parameters.weight", "an empty list"),
    (lambda f: ties(f, density="5e1"), "models[0].parameters.density", "50.0 is out of range"),  # a number, as mergekit reads it
    (lambda f: with_method(ties(f), "ties", consensus_method="max"), "parameters.consensus_method", "sum, count"),
    (lambda f: with_method(ties(f), "breadcrumbs", gamma=1.5), "parameters.gamma", "[0, 1]"),
    (lambda f: with_method(ties(f), "consensus_ties", k=1.5), "parameters.k", "an integer"),
    (lambda f: {"merge_method": "sce", "base_model": str(f["base"]), "parameters": {"select_topk": 0},
                "models": [{"model": str(f["ft0"])}, {"model": str(f["ft1"])}]}, "parameters.select_topk", "(0, 1]"),
])
def test_out_of_range_values_fail_at_plan_time_naming_the_key(family_fp32, tmp_path, no_tensor_reads, make, where, words):
    msg = run_and_fail(tmp_path, make(family_fp32), ConfigError)
    assert msg.startswith(where + ":"), msg
    assert words in msg


def test_negative_weight_is_task_negation_where_allowed(family_fp32, tmp_path):
    """Negative weights stay legal in task arithmetic: base - 0.5 * (ft0 - base)."""
    f = family_fp32
    cfg = {"merge_method": "task_arithmetic", "base_model": str(f["base"]),
           "models": [{"model": str(f["ft0"]), "parameters": {"weight": -0.5}}]}
    run_merge(write_cfg(tmp_path, cfg), tmp_path / "out", progress=False)
    out, base, ft = (load_file(p / "model.safetensors") for p in (tmp_path / "out", f["base"], f["ft0"]))
    torch.testing.assert_close(out[EMBED], base[EMBED] - 0.5 * (ft[EMBED] - base[EMBED]))


@pytest.mark.parametrize("make, words", [
    (lambda f: with_method(ties(f, epsilon=0.6), "della"), "parameters.epsilon: 0.6 with density 0.5"),
    (lambda f: {"merge_method": "linear", "models": [{"model": str(f["ft0"]), "parameters": {"weight": 1.0}},
                                                     {"model": str(f["ft1"]), "parameters": {"weight": -1.0}}]},
     "sum to 0"),
    (lambda f: {"merge_method": "tsv_m", "base_model": str(f["base"]), "parameters": {"sv_reduction": 0.8},
                "models": [{"model": str(f["ft0"])}, {"model": str(f["ft1"])}]}, "parameters.sv_reduction: 0.8 x 2 models"),
])
def test_rules_between_parameters_fail_at_plan_time(family_fp32, tmp_path, no_tensor_reads, make, words):
    """These used to fail in the middle of the merge, leaving a partial folder behind."""
    msg = run_and_fail(tmp_path, make(family_fp32), ConfigError)
    assert words in msg and "tensor 'model.embed_tokens.weight'" in msg


@pytest.mark.parametrize("make, where, words", [
    # mergekit refuses both ("Duplicate merge inputs"; an integer parameter's gradient giving 3.5)
    (lambda f: {"merge_method": "linear", "models": [{"model": str(f["ft0"]), "parameters": {"weight": 1.0}},
                                                     {"model": str(f["ft1"]), "parameters": {"weight": 1.0}},
                                                     {"model": str(f["ft0"]), "parameters": {"weight": 3.0}}]},
     "models[2].model", "is already models[0]"),
    (lambda f: {"merge_method": "ties", "slices": [{"sources": [
        {"model": str(f["base"]), "layer_range": [0, 3]}, {"model": str(f["ft0"]), "layer_range": [0, 3]},
        {"model": str(f["ft0"]), "layer_range": [0, 3], "parameters": {"weight": 1.0}}], "base_model": str(f["base"])}],
        "parameters": {"weight": 1.0, "density": 0.5}}, "slices[0].sources[2].model", "is already slices[0].sources[1]"),
    (lambda f: {"merge_method": "karcher", "parameters": {"max_iter": [2, 5]},
                "models": [{"model": str(f["ft0"])}, {"model": str(f["ft1"])}]},
     "parameters.max_iter", "the gradient gives 3.5 at tensor 'model.layers.1."),
    (lambda f: {"merge_method": "ties", "parameters": {"weight": 1.0}, "slices": [
        {"base_model": str(f["base"]), "sources": [{"model": str(f["base"]), "layer_range": [0, 2]},
                                                   {"model": str(f["ft0"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(f["base"]), "layer_range": [2, 3]}, {"model": str(f["ft0"]), "layer_range": [2, 3]}]}]},
     "slices[1].base_model", "needs a base_model"),
])
def test_what_mergekit_also_refuses_fails_at_plan_time(family_fp32, tmp_path, no_tensor_reads, make, where, words):
    msg = run_and_fail(tmp_path, make(family_fp32), ConfigError)
    assert msg.startswith(where + ":"), msg
    assert words in msg, msg


def test_shared_parameter_set_on_one_model_is_refused(family_fp32, tmp_path, no_tensor_reads):
    msg = run_and_fail(tmp_path, ties(family_fp32, normalize=False), ConfigError)
    assert msg.startswith("models[0].parameters.normalize:") and "top-level 'parameters'" in msg


# ------------------------------------------------------------------------------------------- mismatched inputs


def gpt2_like(path: Path, layers: int = 3) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                  "n_layer": layers, "n_embd": 64, "vocab_size": 96}))
    sd = {"transformer.wte.weight": torch.zeros(96, 64), "transformer.wpe.weight": torch.zeros(128, 64),
          "transformer.ln_f.weight": torch.ones(64)}
    for i in range(layers):
        sd[f"transformer.h.{i}.attn.c_attn.weight"] = torch.zeros(64, 192)
    save_file(sd, str(path / "model.safetensors"))
    return path


def test_mismatched_architectures_name_both_models(family_fp32, tmp_path, no_tensor_reads):
    gpt2 = gpt2_like(tmp_path / "gpt2")
    cfg = write_cfg(tmp_path, linear_of(family_fp32["base"], gpt2))
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.count("\n") == 0
    assert "LlamaForCausalLM" in line and "GPT2LMHeadModel" in line and str(gpt2) in line and "same family" in line
    assert not (tmp_path / "out").exists()


def test_other_architecture_without_config_is_caught_by_its_tensors(family_fp32, tmp_path, no_tensor_reads):
    gpt2 = gpt2_like(tmp_path / "inputs" / "gpt2")
    (gpt2 / "config.json").unlink()
    msg = run_and_fail(tmp_path, linear_of(family_fp32["base"], gpt2), InputError)
    assert "transformer." in msg and str(gpt2) in msg


GONE = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("lacking_first", [False, True], ids=["other-lacks", "template-lacks"])
def test_missing_tensor_names_model_and_tensor(family_fp32, tmp_path, no_tensor_reads, lacking_first):
    """Either way round: a tensor one model lacks is an error, never silently dropped from the output."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    lacking = copy_model(family_fp32["ft0"], inputs / "lacking", lambda sd: sd.pop(GONE))
    full = family_fp32["ft1"]
    cfg = linear_of(lacking, full) if lacking_first else linear_of(full, lacking)
    with pytest.raises(InputError) as info:
        run_merge(write_cfg(tmp_path, cfg), tmp_path / "out", progress=False)
    msg = str(info.value)
    assert GONE in msg and str(lacking) in msg and str(full) in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_untied_model_merged_into_tied_template_is_refused(family_fp32, tmp_path, no_tensor_reads):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    tied = copy_model(family_fp32["ft0"], inputs / "tied", lambda sd: sd.pop("lm_head.weight"))
    msg = run_and_fail(tmp_path, linear_of(tied, family_fp32["ft1"]), InputError)
    assert "'lm_head.weight'" in msg and str(family_fp32["ft1"]) in msg and "tie_word_embeddings" in msg


def test_model_without_safetensors_says_what_to_do(family_fp32, tmp_path):
    empty = tmp_path / "inputs" / "m"
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    msg = run_and_fail(tmp_path, linear_of(family_fp32["base"], empty), InputError)
    assert msg.startswith(f"{empty}: has no safetensors weights") and "model.safetensors" in msg
    (empty / "model.Q4_0.gguf").write_bytes(b"GGUF")
    msg = run_and_fail(tmp_path, linear_of(family_fp32["base"], empty), InputError)
    assert "alloy import-gguf" in msg and "model.Q4_0.gguf" in msg


@pytest.mark.parametrize("policy", [None, "base"])
def test_vocabulary_size_difference_names_tensor_sizes_and_remedy(family_fp32, tmp_path, no_tensor_reads, policy):
    def grow(sd):
        for n in (EMBED, "lm_head.weight"):
            sd[n] = torch.cat([sd[n], torch.zeros(4, sd[n].shape[1])])

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    big = copy_model(family_fp32["ft0"], inputs / "vocab100", grow)
    cfg = linear_of(family_fp32["base"], big)
    if policy:
        cfg.update(base_model=str(family_fp32["base"]), tokenizer_source=policy)
    with pytest.raises(InputError) as info:
        run_merge(write_cfg(tmp_path, cfg), tmp_path / "out", progress=False)
    msg = str(info.value)
    assert f"tensor '{EMBED}': vocabulary sizes differ (96 rows in {family_fp32['base']}, 100 in {big})" in msg
    assert "share one tokenizer" in msg


def test_debug_shows_the_traceback_that_the_one_line_error_hides(family_fp32, tmp_path):
    cfg = write_cfg(tmp_path, ties(family_fp32, density=7))
    quiet = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    loud = subprocess.run(ALLOY + ["--debug", "merge", str(cfg), str(tmp_path / "out")], capture_output=True,
                          text=True, cwd=ROOT)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and "density" in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "merging.errors.ConfigError" in loud.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    for pos in (0, 1, 4097, 9999):
        t = torch.randn(10_000).to(dtype)
        assert all_finite(t)
        t[pos] = bad
        assert not all_finite(t), (dtype, bad, pos)


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0)) and all_finite(torch.tensor(3.0)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor(float("nan")))
    t = torch.zeros(3, 4)
    t[2, 3] = float("inf")
    with pytest.raises(InputError, match=r"model m: tensor 'x' has 0 NaN and 1 Inf value\(s\) of 12.*--nan-policy warn"):
        check_finite(t, model="m", tensor="x")
    assert check_finite(t, model="m", tensor="x", policy="warn") is False
    with pytest.raises(ConfigError, match="nan_policy"):
        check_finite(t, model="m", tensor="x", policy="ignore")


NAN_TENSOR = "model.layers.2.self_attn.v_proj.weight"


@pytest.fixture
def nan_family(family_fp32, tmp_path):
    """base, ft0 and a copy of ft1 with NaN and Inf in one tensor; the config beside them."""
    def poison(sd):
        sd[NAN_TENSOR][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = copy_model(family_fp32["ft1"], inputs / "poisoned", poison)
    cfg = {"merge_method": "ties", "base_model": str(family_fp32["base"]), "parameters": {"density": 0.5},
           "models": [{"model": str(family_fp32["ft0"]), "parameters": {"weight": 1.0}},
                      {"model": str(bad), "parameters": {"weight": 1.0}}]}
    return bad, write_cfg(tmp_path, cfg)


def test_nan_input_is_refused_by_default_naming_model_and_tensor(nan_family, tmp_path):
    bad, cfg = nan_family
    with pytest.raises(InputError) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    assert str(info.value).startswith(f"model {bad}: tensor '{NAN_TENSOR}' has 2 NaN and 1 Inf value(s)")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match=NAN_TENSOR):
        merge_to_state_dict(cfg)


def test_nan_policy_warn_merges_and_records_it(nan_family, tmp_path, caplog):
    bad, cfg = nan_family
    with caplog.at_level(logging.WARNING, logger="alloy"), nan_policy("warn"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert any(NAN_TENSOR in r.getMessage() and "merged anyway" in r.getMessage() for r in caplog.records)
    manifest = json.loads((tmp_path / "out" / "alloy_manifest.json").read_text())
    assert manifest["nonfinite_inputs"] == {str(bad): [NAN_TENSOR]}
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert not torch.isfinite(out[NAN_TENSOR]).all() and torch.isfinite(out[EMBED]).all()


def test_nan_policy_on_the_command_line(nan_family, tmp_path):
    bad, cfg = nan_family
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "a")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert NAN_TENSOR in r.stderr and str(bad) in r.stderr and "--nan-policy warn" in r.stderr
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "b"), "--nan-policy", "warn"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"alloy: warning: model {bad}: tensor '{NAN_TENSOR}'" in r.stderr
    assert (tmp_path / "b" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------ faults


def _kill_after_shards(cmd: list[str], partial: Path, n: int) -> None:
    env = dict(os.environ, ALLOY_TEST_SLOW_WRITE="0.05")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = partial / "alloy_journal.json"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if len(json.loads(journal.read_text())["shards"]) >= n:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_rerun_after_kill_without_resume_starts_over_and_matches(family_fp32, tmp_path):
    """kill -9 mid-merge, then a plain rerun (no --resume, as a user would): it finishes, byte-identical to an
    uninterrupted merge, and the stale lock and temporary folder are gone."""
    cfg = write_cfg(tmp_path, ties(family_fp32))
    run_merge(cfg, tmp_path / "ref", progress=False, shard_size=20_000)
    cmd = ALLOY + ["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "20KB"]
    _kill_after_shards(cmd, tmp_path / ".out.alloy-partial", 2)
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.alloy-partial").exists()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert listing(tmp_path / "ref") == listing(tmp_path / "out")
    for f in listing(tmp_path / "ref"):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f
    assert listing(tmp_path) == ["c.yml", "out", "ref"]


def test_resume_with_a_changed_config_does_not_reuse_old_shards(family_fp32, tmp_path):
    """A partial merge of one config is never resumed into another: the journal is keyed by config and seed."""
    first = write_cfg(tmp_path, ties(family_fp32), "a.yml")
    _kill_after_shards(ALLOY + ["merge", str(first), str(tmp_path / "out"), "--shard-size", "20KB"],
                       tmp_path / ".out.alloy-partial", 2)
    second = write_cfg(tmp_path, ties(family_fp32, density=0.3), "b.yml")
    run_merge(second, tmp_path / "out", progress=False, shard_size=20_000, resume=True)
    run_merge(second, tmp_path / "ref", progress=False, shard_size=20_000)
    for f in listing(tmp_path / "ref"):
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "out" / f).read_bytes(), f


# ------------------------------------------------------------------------------------------------ hub inputs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_snapshot(cache: Path, repo: str, model: Path) -> None:
    """The layout huggingface_hub writes: files in blobs/, the snapshot made of links to them."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = root / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)


def test_hub_ids_merge_from_the_offline_cache_or_fail_in_one_line(family_bf16, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    fake_hub_snapshot(tmp_path / "hf", "org/tiny", family_bf16["ft0"])
    hub = {"merge_method": "linear", "models": [{"model": f"org/tiny@{COMMIT}", "parameters": {"weight": 1.0}},
                                                {"model": str(family_bf16["ft1"]), "parameters": {"weight": 1.0}}]}
    run_merge(write_cfg(tmp_path, hub), tmp_path / "hub", progress=False)
    local = {"merge_method": "linear", "models": [{"model": str(family_bf16["ft0"]), "parameters": {"weight": 1.0}},
                                                  {"model": str(family_bf16["ft1"]), "parameters": {"weight": 1.0}}]}
    run_merge(write_cfg(tmp_path, local, "local.yml"), tmp_path / "local", progress=False)
    for f in sorted((tmp_path / "local").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "hub" / f.name).read_bytes()
    hub["models"][0]["model"] = f"org/absent@{COMMIT}"
    with pytest.raises(InputError) as info:
        run_merge(write_cfg(tmp_path, hub), tmp_path / "out", progress=False)
    assert "org/absent" in str(info.value) and "not in the local Hugging Face cache" in str(info.value)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- outputs never destroy inputs


def _models_in(tmp: Path, fam: dict) -> dict[str, Path]:
    root = tmp / "models"
    return {k: copy_model(fam[k], root / k) for k in ("ft0", "ft1")}


def _linear(models: dict[str, Path]) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 0.5}}
                                                 for p in models.values()]}


@pytest.mark.parametrize("out, words", [
    ("models/ft0", "is the input"),  # replacing the output would replace the model
    ("models", "holds the input"),  # ... or every model under it
    (".", "holds the input"),  # ... or the config and the models
    ("models/ft1/merged", "inside the input model folder"),
])
def test_overwrite_never_replaces_an_input(family_fp32, tmp_path, out, words):
    models = _models_in(tmp_path, family_fp32)
    cfg = write_cfg(tmp_path, _linear(models))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = subprocess.run(ALLOY + ["merge", str(cfg), out, "--overwrite"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_overwrite_of_a_file_is_refused_and_the_file_kept(family_fp32, tmp_path):
    models = _models_in(tmp_path, family_fp32)
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(AlloyError, match="is a file, not a folder"):
        run_merge(write_cfg(tmp_path, _linear(models)), tmp_path / "afile", overwrite=True, progress=False)
    assert (tmp_path / "afile").read_text() == "mine" and listing(tmp_path) == ["afile", "c.yml", "models"]


def test_overwrite_leaves_a_users_hidden_folder_of_a_similar_name_alone(family_fp32, tmp_path):
    models = _models_in(tmp_path, family_fp32)
    cfg = write_cfg(tmp_path, _linear(models))
    run_merge(cfg, tmp_path / "out", progress=False)
    (tmp_path / ".out.alloy-old").mkdir()  # alloy's old name for the replaced folder, here the user's own
    (tmp_path / ".out.alloy-old" / "notes").write_text("keep")
    run_merge(cfg, tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / ".out.alloy-old" / "notes").read_text() == "keep"
    assert listing(tmp_path) == [".out.alloy-old", "c.yml", "models", "out"]


@pytest.mark.parametrize("device", ["foo", "CPU", "meta", "cuda:x"])
def test_unknown_device_is_one_line_and_leaves_nothing(family_fp32, tmp_path, device):
    cfg = write_cfg(tmp_path, _linear({k: family_fp32[k] for k in ("ft0", "ft1")}))
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "o"), "--device", device], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and f"--device {device!r}: expected cpu, cuda or cuda:N" in r.stderr, r.stderr
    assert listing(tmp_path) == ["c.yml"]


def test_float16_overflow_is_refused_naming_the_tensor(family_fp32, tmp_path):
    big = copy_model(family_fp32["ft0"], tmp_path / "inputs" / "big", lambda sd: sd["model.norm.weight"].fill_(1e5))
    cfg = {"merge_method": "linear", "dtype": "float16",
           "models": [{"model": str(big), "parameters": {"weight": 0.5}},
                      {"model": str(family_fp32["ft1"]), "parameters": {"weight": 0.5}}]}
    msg = run_and_fail(tmp_path, cfg, ConfigError)
    assert "tensor 'model.norm.weight'" in msg and "overflow float16" in msg


def test_float16_nan_from_opposite_overflows_is_refused_naming_the_tensor(family_fp32, tmp_path):
    up = copy_model(family_fp32["ft0"], tmp_path / "inputs" / "up", lambda sd: sd["model.norm.weight"].fill_(6e4))
    down = copy_model(family_fp32["ft1"], tmp_path / "inputs" / "down", lambda sd: sd["model.norm.weight"].fill_(-6e4))
    cfg = {"merge_method": "task_arithmetic", "dtype": "float16", "base_model": str(family_fp32["base"]),
           "models": [{"model": str(up), "parameters": {"weight": 2.0}},  # 2 x 6e4 is inf, 2 x -6e4 is -inf
                      {"model": str(down), "parameters": {"weight": 2.0}}]}
    msg = run_and_fail(tmp_path, cfg, ConfigError)
    assert "tensor 'model.norm.weight'" in msg and "not finite in float16" in msg and "NaN" in msg, msg


def test_models_of_different_depths_name_each_depth(family_fp32, tmp_path, no_tensor_reads):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from family import make_family

    deep = make_family(tmp_path / "inputs", n_finetunes=0, layers=4)["base"]
    msg = run_and_fail(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(family_fp32["ft0"]), "parameters": {"weight": 0.5}},
        {"model": str(deep), "parameters": {"weight": 0.5}}]}, InputError)
    assert f"{family_fp32['ft0']}: 3, {deep}: 4" in msg and "slices[" not in msg


def test_sigterm_keeps_finished_shards_and_says_how_to_resume(family_fp32, tmp_path):
    cfg = write_cfg(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(family_fp32["base"]), "layer_range": [0, 3]}]}]})
    proc = subprocess.Popen(ALLOY + ["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "20KB"], cwd=ROOT,
                            env=dict(os.environ, ALLOY_TEST_SLOW_WRITE="0.05"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    journal = tmp_path / ".out.alloy-partial" / "alloy_journal.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (journal.exists() and json.loads(journal.read_text())["shards"]):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "--resume continues" in err, err
    assert not (tmp_path / ".out.alloy-lock").exists() and not (tmp_path / "out").exists()
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "out"), "--shard-size", "20KB", "--resume"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "starting" not in r.stderr, r.stderr
    r = subprocess.run(ALLOY + ["merge", str(cfg), str(tmp_path / "o2"), "--resume"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "no interrupted merge" in r.stderr, r.stderr
