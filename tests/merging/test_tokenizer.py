"""Tokenizer policies (`tokenizer_source`, `tokenizer:`): the output vocabulary, each model's rows re-indexed to it,
and parity with mergekit 0.1.5 on the same YAML (rows compared token by token: mergekit numbers a union's new tokens
in hash order, alloy in config order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from family import llama_shapes, tiny_config, write_model
from merging.config import parse_config
from merging.engine import merge_to_state_dict, run_merge
from merging.errors import ConfigError, InputError

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = [f"w{i}" for i in range(60)]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def save_tokenizer(path: Path, vocab: list[str], added: list[tuple[str, bool]] = ()) -> None:
    """A BPE tokenizer (no merges) with `vocab` at ids 0.. and then `added` tokens (content, special)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    for content, special in added:
        fast.add_tokens([AddedToken(content, special=special, normalized=not special)], special_tokens=special)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))


def make_model(path: Path, tokens: list[str], base_rows: dict[str, dict[str, torch.Tensor]] | None,
               base_sd: dict[str, torch.Tensor] | None, seed: int, *, tie: bool = False, hidden: int = 32,
               extra_rows: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny Llama whose vocabulary tensors hold one row per token: a token the base has keeps the base's row plus
    a small delta; a new token gets a fresh row. `extra_rows` adds padding rows past the tokenizer."""
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_config(layers=2, hidden=hidden, vocab=len(tokens) + extra_rows, tie=tie)
    sd = {}
    for n, s in llama_shapes(cfg).items():
        if n in (EMBED, HEAD):
            rows = []
            for t in tokens + [f"<pad{i}>" for i in range(extra_rows)]:
                fresh = 0.05 * torch.randn(s[1], generator=g)
                if base_rows is not None and t in base_rows[n]:
                    rows.append(base_rows[n][t] + 0.02 * torch.randn(s[1], generator=g))
                else:
                    rows.append(fresh)
            sd[n] = torch.stack(rows)
        elif base_sd is not None:
            sd[n] = base_sd[n] + 0.02 * torch.randn(s, generator=g) * (torch.rand(s, generator=g) < 0.6)
        else:
            sd[n] = (torch.ones(s) + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.05 * torch.randn(s, generator=g)
    write_model(path, {k: v.to(dtype) for k, v in sd.items()}, cfg)
    return sd


def rows_by_token(sd: dict[str, torch.Tensor], tokens: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {t: sd[n][i] for i, t in enumerate(tokens)} for n in (EMBED, HEAD) if n in sd}


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory) -> dict[str, Path]:
    """base: 64 tokens. ext: the base's + 5 new words + an added special token. shuf: the base's words in another
    order, less two, + 2 new words + two added special tokens (one shared with ext). twin: the base's tokenizer.
    pad: the base's tokenizer and 4 padding rows. over: a tokenizer with 2 tokens past its rows. bare: no tokenizer
    files, the base's row count; bare70: none, 70 rows."""
    root = tmp_path_factory.mktemp("vocab")
    base_tokens = SPECIALS + WORDS
    base_sd = make_model(root / "base", base_tokens, None, None, seed=0)
    save_tokenizer(root / "base", base_tokens)
    base_rows = rows_by_token(base_sd, base_tokens)

    ext_vocab = base_tokens + [f"a{i}" for i in range(5)]
    ext_added = [("<|im_start|>", True)]
    make_model(root / "ext", ext_vocab + [t for t, _ in ext_added], base_rows, base_sd, seed=1)
    save_tokenizer(root / "ext", ext_vocab, ext_added)

    words = WORDS[:-2]
    perm = torch.randperm(len(words), generator=torch.Generator().manual_seed(5)).tolist()
    shuf_vocab = SPECIALS + [words[i] for i in perm] + ["b0", "b1"]
    shuf_added = [("<|im_end|>", True), ("<|im_start|>", True)]
    make_model(root / "shuf", shuf_vocab + [t for t, _ in shuf_added], base_rows, base_sd, seed=2)
    save_tokenizer(root / "shuf", shuf_vocab, shuf_added)

    make_model(root / "twin", base_tokens, base_rows, base_sd, seed=3)
    save_tokenizer(root / "twin", base_tokens)
    make_model(root / "pad", base_tokens, base_rows, base_sd, seed=4, extra_rows=4)
    save_tokenizer(root / "pad", base_tokens)
    make_model(root / "over", base_tokens + ["c0"], base_rows, base_sd, seed=5)
    save_tokenizer(root / "over", base_tokens + ["c0"], [("<|x|>", True), ("<|y|>", False)])
    make_model(root / "bare", base_tokens, base_rows, base_sd, seed=6)
    make_model(root / "bare70", base_tokens + [f"d{i}" for i in range(6)], base_rows, base_sd, seed=7)
    tied = make_model(root / "tbase", base_tokens, None, None, seed=8, tie=True)
    save_tokenizer(root / "tbase", base_tokens)
    make_model(root / "text", base_tokens + ["z0", "z1"], rows_by_token(tied, base_tokens), tied, seed=9, tie=True)
    save_tokenizer(root / "text", base_tokens + ["z0", "z1"])
    return {p.name: p for p in root.iterdir()}


def plan_of(cfg: dict):
    from merging.plan import build_plan

    return build_plan(parse_config(cfg))


def vocab_of(path: Path) -> dict[str, int]:
    return json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]


def M(fam, *names) -> list[str]:
    return [str(fam[n]) for n in names]


# ------------------------------------------------------------------------------------------- vocabulary and maps


def test_union_vocabulary_and_permutations(vocab_family):
    base, ext, shuf = M(vocab_family, "base", "ext", "shuf")
    plan = plan_of({"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union",
                    "models": [{"model": ext, "parameters": {"weight": 1.0}}, {"model": shuf, "parameters": {"weight": 1.0}}]})
    v = plan.vocab
    order = sorted(v.vocab, key=v.vocab.get)
    # the base's vocabulary in place, then ext's new words, shuf's, then the added tokens: config order, by id
    assert order == SPECIALS + WORDS + ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "<|im_start|>", "<|im_end|>"]
    assert v.size == v.rows == 73
    assert torch.equal(v.perms[base][:64], torch.arange(64)) and (v.perms[base][64:] == -1).all()
    sv, ev = vocab_of(vocab_family["shuf"]), vocab_of(vocab_family["ext"])
    for tok, i in v.vocab.items():
        assert int(v.perms[shuf][i]) == sv.get(tok, {"<|im_end|>": 64, "<|im_start|>": 65}.get(tok, -1)), tok
        assert int(v.perms[ext][i]) == ev.get(tok, {"<|im_start|>": 69}.get(tok, -1)), tok
    tasks = {t.name: t for t in plan.tasks}
    assert tasks[EMBED].shape == tasks[HEAD].shape == (73, 32)
    assert tasks[EMBED].align is not None and all(t.align is None for n, t in tasks.items() if n not in (EMBED, HEAD))


def tagged(rows: int, model: int, width: int = 3) -> torch.Tensor:
    """Row r of model m holds 1000*m + r: where each aligned row came from can be read off it."""
    return (1000.0 * model + torch.arange(rows, dtype=torch.float32)).unsqueeze(1).repeat(1, width)


def test_fill_rules(vocab_family):
    base, ext, shuf = M(vocab_family, "base", "ext", "shuf")
    cfg = {"merge_method": "task_arithmetic", "base_model": base, "models": [
        {"model": ext, "parameters": {"weight": 1.0}}, {"model": shuf, "parameters": {"weight": 1.0}}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 16, "tokens": {
            "w3": {"source": shuf, "force": True},
            "a1": {"source": {"kind": "model_token", "model": base, "token": "w1"}},
            "a2": {"source": {"kind": "zero"}},
            "<new>": {"source": {"kind": "model_token", "model": ext, "token_id": 5}}}}}
    v = plan_of(cfg).vocab
    assert v.size == 74 and v.rows == 80 and v.vocab["<new>"] == 73
    sv, ev = vocab_of(vocab_family["shuf"]), vocab_of(vocab_family["ext"])
    models = [ext, shuf, base]
    xs = [tagged(70, 1), tagged(66, 2), tagged(64, 3)]

    def rows(align):
        out, b = align.apply(xs[:2], xs[2])
        return [o[:, 0].tolist() for o in out + [b]]

    e, s, b = rows(v.alignment(EMBED, models, base, [0, 1, 2]))
    at = v.vocab
    assert (e[at["w0"]], s[at["w0"]], b[at["w0"]]) == (1000 + ev["w0"], 2000 + sv["w0"], 3000 + 0 + 4)
    # w58: shuf lacks it, the base has it -> the base's row
    assert s[at["w58"]] == 3000 + 62 and e[at["w58"]] == 1000 + 62
    # a0: only ext has it -> ext's row everywhere
    assert e[at["a0"]] == s[at["a0"]] == b[at["a0"]] == 1000 + 64
    # forced w3: shuf's row in every model, its own included
    assert e[at["w3"]] == s[at["w3"]] == b[at["w3"]] == 2000 + sv["w3"]
    # a1: ext keeps its own; the others take the base's w1
    assert e[at["a1"]] == 1000 + 65 and s[at["a1"]] == b[at["a1"]] == 3000 + 5
    assert e[at["a2"]] == 1000 + 66 and s[at["a2"]] == b[at["a2"]] == 0.0  # zero for those that lack it
    assert e[at["<new>"]] == s[at["<new>"]] == b[at["<new>"]] == 1000 + 5  # no model has it: ext's row 5
    for r in (e, s, b):  # padding rows: the mean of the model's aligned rows
        assert r[74:] == [pytest.approx(sum(r[:74]) / 74, rel=1e-6)] * 6

    # without the base's rule, a token two models have and one lacks takes their mean
    cfg["tokenizer"] = {"source": "union"}
    v = plan_of(cfg).vocab
    e, s, b = rows(v.alignment(EMBED, models, None, [0, 1, 2]))
    assert s[at["w58"]] == pytest.approx((1000 + 62 + 3000 + 62) / 2)
    e, s = rows(v.alignment(EMBED, [ext, shuf], None, [0, 1]))[:2]  # ...or the one model that has it
    assert s[at["w58"]] == e[at["w58"]] == 1000 + 62
    # a pass-through input alone: the tokens it lacks, which no input has, are zero
    (b,), _ = v.alignment(EMBED, [base], None, [0]).apply([xs[2]], None)
    assert b[at["b0"], 0] == 0.0 and b[at["w5"], 0] == 3000 + 9


def test_a_shared_tokenizer_keeps_plain_tasks_and_the_files(vocab_family, tmp_path):
    base, twin = M(vocab_family, "base", "twin")
    cfg = {"merge_method": "linear", "tokenizer_source": "base", "base_model": base,
           "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": twin, "parameters": {"weight": 0.5}}]}
    plan = plan_of(cfg)
    assert plan.vocab is not None and all(t.align is None for t in plan.tasks) and plan.vocab.tokenizer is None
    run_merge(parse_config(cfg), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (vocab_family["base"] / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 64


def test_union_runs_in_memory_too(vocab_family, tmp_path):
    base, ext, shuf = M(vocab_family, "base", "ext", "shuf")
    cfg = parse_config({"merge_method": "ties", "base_model": base, "tokenizer_source": "union", "models": [
        {"model": ext, "parameters": {"weight": 1.0, "density": 0.5}}, {"model": shuf, "parameters": {"weight": 1.0, "density": 0.5}}]})
    mem = merge_to_state_dict(cfg).state_dict
    run_merge(cfg, tmp_path / "out", progress=False)
    disk = load_file(tmp_path / "out" / "model.safetensors")
    assert mem.keys() == disk.keys() and all(torch.equal(mem[k], disk[k]) for k in mem)
    assert mem[EMBED].shape == (73, 32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == 73 and tok.convert_tokens_to_ids("b1") == 70
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 73
    assert "tokenizer.json" in json.loads((tmp_path / "out" / "alloy_manifest.json").read_text())["tokenizer_files"]


# ------------------------------------------------------------------------------------------------------ errors


def _ta(fam, *models, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
            "models": [{"model": str(fam[m]), "parameters": {"weight": 1.0}} for m in models], **extra}


@pytest.mark.parametrize("make, error, words", [
    (lambda f: _ta(f, "bare", tokenizer_source="union"), ConfigError,
     "tokenizer_source: 'union' needs the tokenizer of model {bare}, which has no tokenizer files"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"b0": {"source": str(f["ext"]), "force": True}}}), ConfigError,
     "tokenizer.tokens.b0.source: model {ext} has no token 'b0'"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"<q>": {"source": {"kind": "model_token", "model": str(f["ext"]),
                                                                       "token": "zz"}}}}), ConfigError,
     "tokenizer.tokens.<q>.source.token: model {ext} has no token 'zz'"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"<q>": {"source": {"kind": "model_token", "model": str(f["ext"]),
                                                                       "token_id": 70}}}}), ConfigError,
     "tokenizer.tokens.<q>.source.token_id: 70 is out of range for model {ext} (70 rows)"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"a0": {"force": True}}}), ConfigError,
     "tokenizer.tokens.a0: no source for a token that is forced"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"a0": {"source": str(f["shuf"])}}}), ConfigError,
     "tokenizer.tokens.a0.source: model {shuf} is not among the inputs"),
    (lambda f: _ta(f, "bare70", tokenizer_source="base"), InputError,
     "model {bare70} has no tokenizer files and a vocabulary of 70 rows where {base} has 64"),
    (lambda f: _ta(f, "ext", tokenizer={"source": "union", "pad_to_multiple_of": 0}), ConfigError,
     "tokenizer.pad_to_multiple_of: pad_to_multiple_of must be a positive integer"),
    (lambda f: _ta(f, "ext", tokenizer={"source": "union", "padd_to_multiple_of": 8}), ConfigError,
     "tokenizer.padd_to_multiple_of"),
    (lambda f: _ta(f, "ext", tokenizer={"tokens": {"x": {"source": {"kind": "zero", "model": "m"}}}}), ConfigError,
     "kind: zero takes no model"),
    (lambda f: _ta(f, "ext"), InputError, "vocabulary sizes differ (70 rows in {ext}, 64 in {base}); re-align them"),
])
def test_vocabularies_that_cannot_be_reconciled_fail_in_one_line(vocab_family, tmp_path, make, error, words):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(make(vocab_family)))
    with pytest.raises(error) as info:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(info.value)
    assert words.format(**{k: str(v) for k, v in vocab_family.items()}) in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()


def test_bare_model_with_the_base_vocabulary_is_taken_to_share_it(vocab_family):
    plan = plan_of(_ta(vocab_family, "bare", "ext", tokenizer_source="base"))
    assert plan.notes == [f"model {vocab_family['bare']} has no tokenizer files: taken to share the vocabulary of "
                          f"{vocab_family['base']}"]
    assert torch.equal(plan.vocab.perms[str(vocab_family["bare"])], torch.arange(64))


# ------------------------------------------------------------------------------------------ parity with mergekit


def run_mergekit(cfg: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run_merge
    from mergekit.options import MergeOptions

    mk_run_merge(MergeConfiguration.model_validate(cfg), str(out),
                 options=MergeOptions(write_model_card=False, quiet=True))


def parity_configs(f: dict[str, Path]) -> dict[str, dict]:
    base, ext, shuf, pad, over, tbase, text = M(f, "base", "ext", "shuf", "pad", "over", "tbase", "text")

    def ties(**kw):
        return {"merge_method": "ties", "base_model": base, "models": [
            {"model": ext, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": shuf, "parameters": {"weight": 0.7, "density": 0.6}}], **kw}

    def task_arithmetic(b=base, **kw):
        return {"merge_method": "task_arithmetic", "base_model": b, "models": [
            {"model": ext, "parameters": {"weight": 0.6}}, {"model": shuf, "parameters": {"weight": 0.5}}], **kw}

    linear = {"merge_method": "linear", "base_model": base, "models": [
        {"model": base, "parameters": {"weight": 0.3}}, {"model": ext, "parameters": {"weight": 0.4}},
        {"model": shuf, "parameters": {"weight": 0.3}}]}
    return {
        "ties_union": ties(tokenizer_source="union"),
        # bf16 with an element-wise method: TIES's top-k in bf16 has tied magnitudes, and which of them survive
        # depends on row order, which for mergekit's union changes from run to run
        "task_arithmetic_union_bf16": task_arithmetic(tokenizer_source="union", dtype="bfloat16"),
        "linear_union": {**linear, "tokenizer_source": "union"},
        "linear_model_vocab": {**linear, "tokenizer_source": shuf},
        # a tokenizer source that is not merged: only its vocabulary is taken; its words no merged model has
        # (b0, b1 and an added token) get zero rows
        "task_arithmetic_outside_vocab": task_arithmetic(tokenizer_source=shuf) | {
            "models": [{"model": ext, "parameters": {"weight": 0.6}}]},
        "task_arithmetic_base": task_arithmetic(tokenizer={"source": "base"}),
        "task_arithmetic_pad": task_arithmetic(tokenizer={"source": "union", "pad_to_multiple_of": 32}),
        "ties_tokens": ties(tokenizer={"source": "union", "tokens": {
            "<|im_start|>": {"source": ext, "force": True},
            "<|im_end|>": {"source": {"kind": "zero"}},
            "a0": {"source": {"kind": "model_token", "model": base, "token": "w1"}},
            "b1": {"source": {"kind": "model_token", "model": shuf, "token_id": 7}, "force": True},
            "<new>": {"source": {"kind": "model_token", "model": ext, "token": "a2"}},
            "w3": {"source": shuf, "force": True}}}),
        # a base with padding rows (cut to its tokenizer), and one whose tokenizer runs past its rows (trimmed)
        "padded_base": {"merge_method": "ties", "base_model": pad, "tokenizer_source": "base",
                        "models": [{"model": ext, "parameters": {"weight": 1.0, "density": 0.5}}]},
        "overlong_base_union": task_arithmetic(b=over, tokenizer_source="union"),
        "tied_union": {"merge_method": "task_arithmetic", "base_model": tbase, "tokenizer_source": "union",
                       "models": [{"model": text, "parameters": {"weight": 1.0}}]},
        # base_model only names the reference vocabulary here (without it mergekit picks one at random)
        "slices_union": {"merge_method": "passthrough", "base_model": base, "tokenizer_source": "union", "slices": [
            {"sources": [{"model": base, "layer_range": [0, 1]}]}, {"sources": [{"model": shuf, "layer_range": [1, 2]}]}]},
    }


PARITY = list(parity_configs({k: Path(k) for k in ("base", "ext", "shuf", "pad", "over", "tbase", "text")}))


@pytest.mark.parametrize("case", PARITY)
def test_matches_mergekit(vocab_family, tmp_path, case):
    from transformers import AutoTokenizer

    cfg = parity_configs(vocab_family)[case]
    run_mergekit(cfg, tmp_path / "mk")
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    run_merge(tmp_path / "c.yml", tmp_path / "ours", progress=False, tie_break="torch")
    theirs_tok, ours_tok = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("mk", "ours"))
    tv, ov = theirs_tok.get_vocab(), ours_tok.get_vocab()
    assert tv.keys() == ov.keys()
    if "union" not in json.dumps(cfg):
        assert tv == ov  # one model's vocabulary: the same ids
    added = [{a.content: (a.special, a.normalized) for a in t.added_tokens_decoder.values()} for t in (theirs_tok, ours_tok)]
    assert added[0] == added[1]
    cfgs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "ours")]
    assert cfgs[0]["vocab_size"] == cfgs[1]["vocab_size"]

    theirs, ours = (load_file(tmp_path / d / "model.safetensors") for d in ("mk", "ours"))
    assert theirs.keys() == ours.keys()
    for name, t in theirs.items():
        o = ours[name]
        assert t.shape == o.shape and t.dtype == o.dtype, (name, t.shape, o.shape)
        if name in (EMBED, HEAD):  # token by token, then the padding rows
            ids_t = torch.tensor([tv[k] for k in tv])
            ids_o = torch.tensor([ov[k] for k in tv])
            torch.testing.assert_close(o[ids_o], t[ids_t], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(o[len(tv):], t[len(tv):], rtol=1e-5, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------- chat templates

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}, {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
]


@pytest.mark.parametrize("name", ["chatml", "llama3", "mistral", "alpaca", "exaone"])
def test_builtin_chat_templates_render_as_mergekit_does(vocab_family, name):
    import importlib.resources
    import re

    from mergekit._data import chat_templates
    from transformers import AutoTokenizer

    from merging.tokenizer import CHAT_TEMPLATES

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    tok = AutoTokenizer.from_pretrained(vocab_family["base"])
    for conv in CONVERSATIONS:
        for gen in (False, True):
            a, b = (tok.apply_chat_template(conv, chat_template=t, tokenize=False, add_generation_prompt=gen)
                    for t in (theirs, CHAT_TEMPLATES[name]))
            if name in ("alpaca", "exaone"):  # mergekit's files leak their own indentation into the prompt
                a, b = re.sub(r"\s+", "", a), re.sub(r"\s+", "", b)
            assert a == b, (name, conv, gen)


def test_union_output_carries_the_chosen_chat_template(vocab_family, tmp_path):
    from transformers import AutoTokenizer

    base, ext, shuf = M(vocab_family, "base", "ext", "shuf")
    (vocab_family["shuf"] / "chat_template.jinja").write_text("{{ 'shuf template' }}\n")
    try:
        for choice, expect in (("llama3", "<|start_header_id|>user"), ("auto", "shuf template")):
            cfg = {"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "union",
                   "chat_template": choice, "models": [{"model": ext, "parameters": {"weight": 1.0}},
                                                       {"model": shuf, "parameters": {"weight": 1.0}}]}
            run_merge(parse_config(cfg), tmp_path / choice, progress=False)
            tok = AutoTokenizer.from_pretrained(tmp_path / choice)
            assert len(tok) == 73
            assert expect in tok.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    finally:
        (vocab_family["shuf"] / "chat_template.jinja").unlink()


# ------------------------------------------------------------------------------------------------------ safety


def test_tokenizer_files_are_read_safely(vocab_family, tmp_path):
    """A tokenizer file linking out of the model folder is refused; a tokenizer that names custom code is loaded
    without running it (or refused), never executed."""
    import os
    import shutil

    base, shuf = M(vocab_family, "base", "shuf")
    linked = tmp_path / "linked"
    shutil.copytree(vocab_family["ext"], linked)
    (tmp_path / "secret.json").write_text((linked / "tokenizer.json").read_text())
    (linked / "tokenizer.json").unlink()
    os.symlink(tmp_path / "secret.json", linked / "tokenizer.json")
    cfg = _ta(vocab_family, "shuf", tokenizer_source="union")
    cfg["models"].append({"model": str(linked), "parameters": {"weight": 1.0}})
    with pytest.raises(InputError, match="'tokenizer.json' is a symlink"):
        run_merge(parse_config(cfg), tmp_path / "out1", progress=False)

    evil = tmp_path / "evil"
    shutil.copytree(vocab_family["ext"], evil)
    sentinel = tmp_path / "code-ran"
    tc = json.loads((evil / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    (evil / "tokenizer_config.json").write_text(json.dumps(tc))
    (evil / "tokenization_evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n")
    cfg["models"][-1]["model"] = str(evil)
    try:
        run_merge(parse_config(cfg), tmp_path / "out2", progress=False)
    except InputError as e:
        assert str(evil) in str(e) and "\n" not in str(e)
    assert not sentinel.exists()


def test_inspect_reads_realigned_embeddings(vocab_family):
    from merging.inspect import inspect_merge

    report = inspect_merge(parse_config(_ta(vocab_family, "ext", "shuf", tokenizer_source="union")))
    assert len(report["models"]) == 2 and report["overall"]["params"] > 0


def test_outside_tokenizer_source_needs_tokenizer_files(vocab_family, tmp_path):
    from merging.errors import ConfigError

    cfg = _ta(vocab_family, "ext") | {"tokenizer_source": str(vocab_family["bare"])}
    with pytest.raises(ConfigError, match=f"tokenizer_source: {vocab_family['bare']} has no tokenizer files"):
        plan_of(cfg)
    with pytest.raises(InputError, match="tokenizer_source: model nowhere/at-all: not in the local Hugging Face cache"):
        plan_of(_ta(vocab_family, "ext") | {"tokenizer_source": "nowhere/at-all"})
