"""RegMean (Jin et al. 2023): the closed-form least-squares merge the paper derives, and the engine reading each
model's Gram matrices beside its weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from merging.engine import run_merge
from merging.errors import ConfigError, InputError
from merging.methods.regmean import regmean, regression_mean, shrink_off_diagonal


def _inputs(g: torch.Generator, n: int, d: int, basis: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x if basis is None else x @ basis


def test_alpha_one_is_the_least_squares_solution_of_the_papers_objective():
    # The paper's objective: min_W sum_i ||X_i W^T - X_i W_i^T||^2; its minimiser solves the stacked system.
    g = torch.Generator().manual_seed(0)
    xs = [_inputs(g, 40, 8) for _ in range(3)]
    ws = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = regression_mean(ws, [x.T @ x for x in xs], [1.0, 1.0, 1.0])
    lhs = torch.cat(xs)
    rhs = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    expect = torch.linalg.lstsq(lhs, rhs).solution.T
    torch.testing.assert_close(merged, expect, rtol=1e-7, atol=1e-9)
    # and it beats the plain average on that objective
    loss = lambda w: sum(((x @ w.T - x @ wi.T) ** 2).sum() for x, wi in zip(xs, ws))  # noqa: E731
    assert loss(merged) < loss(sum(ws) / 3)


def test_models_on_disjoint_inputs_each_keep_their_outputs_exactly():
    # Inputs of model i span a subspace no other model's inputs touch: the merged layer reproduces every model on
    # its own inputs (what averaging cannot), the property that lets skills merge without interference.
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    bases = [q[:, 3 * i:3 * i + 3].T for i in range(3)]  # three orthogonal 3-d subspaces of R^9
    xs = [_inputs(g, 20, 3, b) for b in bases]
    ws = [torch.randn(4, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = regression_mean(ws, [x.T @ x for x in xs], [1.0] * 3)
    for x, w in zip(xs, ws):
        torch.testing.assert_close(x @ merged.T, x @ w.T, rtol=1e-6, atol=1e-8)
    avg = sum(ws) / 3
    assert not torch.allclose(xs[0] @ avg.T, xs[0] @ ws[0].T, atol=1e-3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_equal_grams_give_the_plain_average(alpha):
    g = torch.Generator().manual_seed(2)
    x = _inputs(g, 30, 6)
    gram = (x.T @ x).float()
    ts = [torch.randn(4, 6, generator=g) for _ in range(3)]
    base = torch.randn(4, 6, generator=g)
    out = regmean(ts, base, gram=[gram] * 3, alpha=alpha)
    torch.testing.assert_close(out, sum(ts) / 3, rtol=1e-5, atol=1e-6)
    out = regmean(ts, None, gram=[gram] * 3, alpha=alpha)
    torch.testing.assert_close(out, sum(ts) / 3, rtol=1e-5, atol=1e-6)


def test_alpha_zero_weighs_each_input_feature_by_its_energy():
    # alpha 0 keeps only the diagonals: column j of the result is the average of the models' columns j weighted by
    # each model's mean square of input feature j.
    g = torch.Generator().manual_seed(3)
    grams = [torch.diag(torch.rand(5, generator=g) + 0.1) + 0.3 for _ in range(2)]
    ts = [torch.randn(3, 5, generator=g) for _ in range(2)]
    out = regmean(ts, None, gram=grams, alpha=0.0)
    d = [torch.diagonal(gr) for gr in grams]
    torch.testing.assert_close(out, (ts[0] * d[0] + ts[1] * d[1]) / (d[0] + d[1]), rtol=1e-5, atol=1e-6)
    assert torch.equal(shrink_off_diagonal(grams[0], 1.0), grams[0])


def test_tensors_without_grams_are_the_weighted_average():
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(7, generator=g) for _ in range(2)]
    base = torch.randn(7, generator=g)
    torch.testing.assert_close(regmean(ts, base, gram=[None, None], weight=[1.0, 3.0]),
                               base + (ts[0] - base) * 0.25 + (ts[1] - base) * 0.75)
    with pytest.raises(InputError, match="missing"):
        regmean([torch.ones(2, 2)] * 2, None, gram=[torch.eye(2), None])


# ---------------------------------------------------------------------------------------- through the engine


def _write_grams(path: Path, model: Path, seed: int, skip: str | None = None) -> Path:
    """Random positive definite Gram matrices for every 2-D layer weight of `model` (q/k/v share one, aliased)."""
    g = torch.Generator().manual_seed(seed)
    sd = load_file(model / "model.safetensors")
    grams, aliases = {}, {}
    for name, t in sd.items():
        if ".layers." not in name or t.dim() != 2 or name == skip:
            continue
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            aliases[name] = name.rsplit(".", 2)[0] + ".q_proj.weight"
            continue
        x = torch.randn(3 * t.shape[1], t.shape[1], generator=g)
        grams[name] = (x.T @ x) / x.shape[0]
    save_file(grams, str(path), metadata={"alloy.aliases": json.dumps(aliases)})
    return path


def _config(fam: dict, grams: list[Path], alpha: float = 0.9) -> dict:
    return {"merge_method": "regmean", "base_model": str(fam["base"]), "parameters": {"alpha": alpha},
            "models": [{"model": str(fam[f"ft{i}"]), "parameters": {"gram": str(p)}} for i, p in enumerate(grams)]}


def _cfg_file(tmp: Path, cfg: dict) -> Path:
    p = tmp / "regmean.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_engine_merge_matches_the_method_on_each_tensor_and_records_the_grams(family_fp32, tmp_path):
    fam = family_fp32
    grams = [_write_grams(tmp_path / f"g{i}.safetensors", fam[f"ft{i}"], seed=i) for i in range(3)]
    run_merge(_cfg_file(tmp_path, _config(fam, grams)), tmp_path / "out", progress=False)
    out = load_file(tmp_path / "out" / "model.safetensors")
    base = load_file(fam["base"] / "model.safetensors")
    fts = [load_file(fam[f"ft{i}"] / "model.safetensors") for i in range(3)]
    gs = [load_file(p) for p in grams]
    k = "model.layers.1.self_attn.k_proj.weight"  # read through the alias: q_proj's Gram
    q = "model.layers.1.self_attn.q_proj.weight"
    for name, gram_name in [("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"), (k, q)]:
        expect = regmean([f[name] for f in fts], base[name], gram=[g[gram_name] for g in gs], alpha=0.9)
        assert torch.equal(out[name], expect), name
    norm = "model.layers.0.input_layernorm.weight"
    torch.testing.assert_close(out[norm], sum(f[norm] for f in fts) / 3)
    manifest = json.loads((tmp_path / "out" / "alloy_manifest.json").read_text())
    assert [s["file"] for s in manifest["side_inputs"]] == [str(p) for p in grams]
    assert all(len(s["sha256"]) == 64 and s["parameter"] == "gram" for s in manifest["side_inputs"])


def test_relative_gram_paths_resolve_beside_the_config(family_fp32, tmp_path):
    fam = family_fp32
    for i in range(3):
        _write_grams(tmp_path / f"g{i}.safetensors", fam[f"ft{i}"], seed=i)
    cfg = _config(fam, [Path(f"g{i}.safetensors") for i in range(3)])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        run_merge(_cfg_file(tmp_path, cfg), tmp_path / "out", progress=False)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bad_gram_inputs_get_one_line_errors_and_no_output(family_fp32, tmp_path):
    fam = family_fp32
    good = [_write_grams(tmp_path / f"g{i}.safetensors", fam[f"ft{i}"], seed=i) for i in range(3)]
    cases = []
    cfg = _config(fam, good)
    del cfg["models"][1]["parameters"]
    cases.append((cfg, ConfigError, "gram"))
    cases.append((_config(fam, [good[0], tmp_path / "nope.safetensors", good[2]]), InputError, "nope.safetensors"))
    partial = _write_grams(tmp_path / "partial.safetensors", fam["ft2"], seed=5, skip="model.layers.2.mlp.up_proj.weight")
    cases.append((_config(fam, [good[0], good[1], partial]), InputError, "model.layers.2.mlp.up_proj.weight"))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.layers.0.mlp.down_proj.weight": torch.eye(3)}, str(wrong))
    cases.append((_config(fam, [good[0], good[1], wrong]), InputError, r"shape \[3, 3\]"))
    cases.append((_config(fam, good, alpha=1.5), ConfigError, "alpha"))
    cfg = _config(fam, good)
    cfg["models"][0]["parameters"]["gram"] = 3
    cases.append((cfg, ConfigError, "not a file path"))
    for cfg, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as info:
            run_merge(_cfg_file(tmp_path, cfg), tmp_path / "out", progress=False)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "out").exists()
        assert not list(tmp_path.glob(".out*"))


def test_a_changed_gram_file_is_not_resumed_into(family_fp32, tmp_path):
    from merging.config import load_config
    from merging.engine import _layout_key
    from merging.io import ShardLayout
    from merging.plan import build_plan

    fam = family_fp32
    grams = [_write_grams(tmp_path / f"g{i}.safetensors", fam[f"ft{i}"], seed=i) for i in range(3)]
    cfg = _cfg_file(tmp_path, _config(fam, grams))

    def key() -> str:
        plan = build_plan(load_config(cfg))
        layout = ShardLayout.plan([(t.name, t.dtype, t.shape) for t in plan.tasks], 1 << 30)
        return _layout_key(layout, plan, 0)

    before = key()
    _write_grams(grams[1], fam["ft1"], seed=9)
    assert key() != before


def test_inspect_takes_a_regmean_config_before_its_gram_files_exist(family_fp32, tmp_path):
    from merging.inspect import inspect_merge

    cfg = _config(family_fp32, [tmp_path / f"not-yet-{i}.safetensors" for i in range(3)])
    report = inspect_merge(_cfg_file(tmp_path, cfg))
    assert len(report["models"]) == 3


def test_a_gram_file_holding_nan_is_refused_naming_it(family_fp32, tmp_path):
    """A NaN statistic would spread to every value of the layer it serves: side files are checked like models."""
    fam = family_fp32
    grams = [_write_grams(tmp_path / f"g{i}.safetensors", fam[f"ft{i}"], seed=i) for i in range(3)]
    from safetensors import safe_open

    with safe_open(grams[1], "pt") as f:
        meta = f.metadata()  # the q/k/v aliases
    sd = load_file(grams[1])
    name = sorted(sd)[0]
    sd[name][0, 0] = float("nan")
    save_file(sd, str(grams[1]), metadata=meta)
    with pytest.raises(InputError, match=f"g1.safetensors: tensor '{name}' has 1 NaN"):
        run_merge(_cfg_file(tmp_path, _config(fam, grams)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
