"""The output vocabulary of a merge, and each model's vocabulary rows re-indexed to it (mergekit's tokenizer policy).

The policy is `tokenizer_source: union | base | <model>` or a `tokenizer:` section (`source`, per-token `tokens:`,
`pad_to_multiple_of`), with the semantics mergekit 0.1.5 documents:

- `base`: the base model's vocabulary, less any token whose id is at or past the base's config `vocab_size`;
  `<model>`: that model's vocabulary as its tokenizer has it.
- `union`: the reference's vocabulary (the base, else the first model), then each other model's regular tokens it
  lacks (as added tokens), then every model's added tokens (the first model's settings win). mergekit walks the
  models in set order and vocabularies in hash order, so its ids for new tokens vary from run to run; alloy takes
  the models in config order and each vocabulary by id, so its ids are reproducible (each token's row matches).
- keys of `tokens:` missing from the vocabulary are added.

Every vocabulary-indexed tensor (embeddings, lm_head, output biases) of every model is re-indexed to the output
vocabulary before the method runs. A token that a model lacks, or one marked `force`, takes a fill row, by the
first rule that applies:
  1. its `tokens:` entry: a model's row for it, another token's row (`kind: model_token`), or `kind: zero`;
  2. the only model that has it; zero when no model has it;
  3. the base's row when the base is among the inputs and has it;
  4. the mean of the rows of the models that have it (summed in input order).
Rows added by `pad_to_multiple_of` take the mean of the model's aligned rows. config.json's vocab_size becomes
the number of rows.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from merging.config import MergeConfig, ModelRef, TokenSetting
from merging.errors import ConfigError, InputError
from merging.io import Checkpoint, model_file

# a folder has a tokenizer when it has one of these (tokenizer_config.json alone names a class, not a vocabulary)
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "spiece.model")
# what a copied tokenizer takes: its files and a chat template kept beside them
TOKENIZER_COPY = tuple(dict.fromkeys(TOKENIZER_FILES + ("chat_template.jinja", "chat_template.json")))
# name parts of vocabulary-indexed tensors across Hugging Face decoders (Llama/Qwen/Mistral/Gemma, GPT-2, GPT-NeoX,
# Phi, Falcon); the row count must also equal the model's vocab_size, which leaves out position embeddings
VOCAB_PARTS = frozenset({"embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in", "lm_head",
                         "embed_out", "output"})


def has_tokenizer(path: Path) -> bool:
    return Path(path).is_dir() and any(model_file(path, n) is not None for n in VOCAB_FILES)


def load_tokenizer(path: Path, label: str):
    """A model's tokenizer, loaded as mergekit loads it (AutoTokenizer, fast), never running code from the folder."""
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES + ("chat_template.jinja",):
        model_file(path, name)  # a tokenizer file that links out of the folder is refused before anything reads it
    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unreadable tokenizers
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model {label}: cannot load its tokenizer from {path} ({first})") from None


def config_vocab_size(cfg: dict) -> Optional[int]:
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def strip_tokenizer(tok, vocab_size: int, label: str):
    """The tokenizer less the tokens at ids >= vocab_size (rows the model does not have), by rewriting its files."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="alloy-tok-") as d:
        tok.save_pretrained(d)
        spec = json.loads((Path(d) / "tokenizer.json").read_text())
        kind = spec["model"]["type"]
        if kind not in ("BPE", "WordLevel", "WordPiece"):
            raise InputError(f"model {label}: its tokenizer ({kind}) has {len(unused)} tokens at ids >= its vocab_size "
                             f"{vocab_size}; only BPE/WordLevel/WordPiece vocabularies can be trimmed")
        spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < vocab_size]
        spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if t not in unused}
        if kind == "BPE":
            spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                                       if not set(m.split(" ") if isinstance(m, str) else m) & unused]
        (Path(d) / "tokenizer.json").write_text(json.dumps(spec))
        tc = Path(d) / "tokenizer_config.json"
        if tc.exists():
            data = json.loads(tc.read_text())
            if isinstance(data.get("added_tokens_decoder"), dict):
                data["added_tokens_decoder"] = {k: v for k, v in data["added_tokens_decoder"].items()
                                                if int(k) < vocab_size}
            tc.write_text(json.dumps(data))
        return AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)


@dataclass
class OutputVocab:
    """The merge's output vocabulary and, per model (by str(ModelRef)), where each output token's row comes from."""

    size: int  # tokens in the output tokenizer
    rows: int  # rows of the output's vocabulary tensors: size padded up to pad_to_multiple_of
    tokenizer: Any  # the transformers tokenizer to save; None when `donor`'s files are it, unchanged
    donor: Path
    perms: dict[str, torch.Tensor]  # model -> int64 [size]: its row for each output id, -1 where it lacks the token
    vocab_sizes: dict[str, int]  # model -> rows of its vocabulary tensors
    originals: dict[str, dict[str, int]]  # model -> its own vocabulary (for `kind: model_token`)
    tokens: dict[str, TokenSetting]  # the `tokens:` section
    vocab: dict[str, int]
    key: str  # the config key, for messages
    notes: list[str] = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)

    def is_vocab_tensor(self, name: str, shapes: dict[str, tuple[int, ...]]) -> bool:
        """A vocabulary-indexed tensor: named like one, with as many rows as each model's vocab_size."""
        if not VOCAB_PARTS & set(name.split(".")):
            return False
        return all(len(s) >= 1 and s[0] == self.vocab_sizes.get(m) for m, s in shapes.items())

    def alignment(self, tensor: str, models: list[str], base: Optional[str], slots: list[int]) -> Optional["Alignment"]:
        """How to re-index one tensor's inputs (`models` in input order; slots[g] is where input g sits in the
        task's list: its inputs, then its base); None when every input already is the output vocabulary."""
        key = (tuple(models), base, tuple(slots))
        if key not in self._cache:  # embeddings and lm_head usually share their inputs: one plan for both
            self._cache[key] = self._alignment(tensor, models, base, slots)
        return self._cache[key]

    def _alignment(self, tensor: str, models: list[str], base: Optional[str], slots: list[int]) -> Optional["Alignment"]:
        perms = torch.stack([self.perms[m] for m in models])  # [G, size]
        present = perms >= 0
        forced = torch.zeros(self.size, dtype=torch.bool)
        for tok, setting in self.tokens.items():
            if setting.force:
                forced[self.vocab[tok]] = True
        special = (~present).any(0) | forced
        identity = torch.arange(self.size)
        if not special.any() and self.rows == self.size and all(
                self.vocab_sizes[m] == self.size and torch.equal(self.perms[m], identity) for m in models):
            return None

        id_to_tok = {i: t for t, i in self.vocab.items()}
        gpos = {m: g for g, m in enumerate(models)}
        fill_of: dict[int, int] = {}  # output id -> its row in the fill matrix (zero unless set below)
        copies: list[list[tuple[int, int]]] = [[] for _ in models]  # per input: (fill row, its row copied there)
        means: list[int] = []  # output ids whose fill is the mean of the inputs that have the token
        special_ids = torch.nonzero(special).flatten()
        for i, col in zip(special_ids.tolist(), perms[:, special_ids].T.tolist()):  # col: each input's row or -1
            tok = id_to_tok[i]
            has = [r >= 0 for r in col]
            setting = self.tokens.get(tok)
            if setting is not None and not setting.force and all(has):
                continue  # every input has it and it is not forced: each keeps its own row
            k = fill_of[i] = len(fill_of)
            if setting is not None:
                g, row = self._explicit(tensor, tok, i, setting, gpos)
                if g is not None:
                    copies[g].append((k, row))
            elif sum(has) == 1:
                g = has.index(True)
                copies[g].append((k, col[g]))
            elif not any(has):
                pass  # no input has it: a zero row
            elif base is not None and base in gpos and has[gpos[base]]:
                copies[gpos[base]].append((k, col[gpos[base]]))
            else:
                means.append(i)

        long = dict(dtype=torch.long)
        mean_ids = torch.tensor(means, **long)
        mean_from = []
        for g in range(len(models)):
            sel = torch.nonzero(present[g, mean_ids]).flatten() if means else torch.zeros(0, **long)
            mean_from.append((sel, perms[g, mean_ids[sel]] if means else sel))
        fill_ids = torch.tensor(list(fill_of), **long)
        fill_k = torch.tensor(list(fill_of.values()), **long)
        keep, fill = [], []
        for g in range(len(models)):
            own = present[g] & ~forced  # a forced token takes its fill row in every input
            dst = torch.nonzero(own).flatten()
            keep.append((dst, perms[g, dst]))
            lack = ~own[fill_ids]
            fill.append((fill_ids[lack], fill_k[lack]))
        return Alignment(rows=self.rows, size=self.size, slots=slots, n_fills=len(fill_of),
                         copies=[(torch.tensor([k for k, _ in c], **long), torch.tensor([r for _, r in c], **long))
                                 for c in copies],
                         mean_idx=torch.tensor([fill_of[i] for i in means], **long), mean_from=mean_from,
                         keep=keep, fill=fill)

    def _explicit(self, tensor: str, tok: str, i: int, setting: TokenSetting,
                  gpos: dict[str, int]) -> tuple[Optional[int], int]:
        """(input, row) that a `tokens:` entry takes its row from; (None, 0) for a zero row."""
        src = setting.source
        where = f"{self.key}.tokens.{tok}"
        if src is None:
            why = "is forced" if setting.force else "some models lack"
            raise ConfigError(f"{where}: no source for a token that {why} (give source: a model, "
                              "{kind: model_token, model, token} or {kind: zero})")
        if src.kind == "zero":
            return None, 0
        m = str(src.model)
        if m not in gpos:
            raise ConfigError(f"{where}.source: model {m} is not among the inputs of tensor {tensor!r}")
        if src.kind == "model_token":
            row = src.token_id
            if row is None:
                row = self.originals.get(m, {}).get(src.token)
                if row is None:
                    raise ConfigError(f"{where}.source.token: model {m} has no token {src.token!r}")
            if not 0 <= row < self.vocab_sizes[m]:
                raise ConfigError(f"{where}.source.token_id: {row} is out of range for model {m} "
                                  f"({self.vocab_sizes[m]} rows)")
            return gpos[m], row
        row = int(self.perms[m][i])
        if row < 0:
            raise ConfigError(f"{where}.source: model {m} has no token {tok!r} to take its row from")
        return gpos[m], row


@dataclass
class Alignment:
    """One tensor's re-indexing: built at plan time from ids alone, applied to the inputs as they stream through."""

    rows: int
    size: int
    slots: list[int]
    n_fills: int
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # per input: (fill indices, its rows copied into them)
    mean_idx: torch.Tensor  # fill indices that are means
    mean_from: list[tuple[torch.Tensor, torch.Tensor]]  # per input: (positions in mean_idx it has, its rows)
    keep: list[tuple[torch.Tensor, torch.Tensor]]  # per input: (output ids that keep its own row, its rows)
    fill: list[tuple[torch.Tensor, torch.Tensor]]  # per input: (output ids filled, fill indices)

    def apply(self, xs: list[torch.Tensor], base: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], Optional[torch.Tensor]]:
        slot_list = xs + ([base] if base is not None else [])
        ins = [slot_list[s] for s in self.slots]
        ref = ins[0]
        shape = tuple(ref.shape[1:])
        fills = ref.new_zeros((self.n_fills, *shape))
        for g, x in enumerate(ins):
            k, r = self.copies[g]
            if k.numel():
                fills[k] = x[r]
        if self.mean_idx.numel():
            acc = ref.new_zeros((self.mean_idx.numel(), *shape))
            count = torch.zeros(self.mean_idx.numel(), dtype=torch.long)
            for g, x in enumerate(ins):  # summed in input order, as mergekit does, then divided once
                j, r = self.mean_from[g]
                if j.numel():
                    acc[j] = acc[j] + x[r]
                    count[j] += 1
            fills[self.mean_idx] = acc / count.to(acc.dtype).reshape(-1, *([1] * len(shape)))
        out = []
        for g, x in enumerate(ins):
            new = x.new_zeros((self.rows, *shape))
            dst, src = self.keep[g]
            new[dst] = x[src]
            fdst, fk = self.fill[g]
            if fdst.numel():
                new[fdst] = fills[fk]
            if self.rows > self.size:  # pad_to_multiple_of: the padding rows are the mean of the real ones
                new[self.size:] = torch.mean(new[: self.size], dim=0)
            out.append(new)
        result = list(slot_list)
        for g, s in enumerate(self.slots):
            result[s] = out[g]
        return result[: len(xs)], (result[len(xs)] if base is not None else None)


def policy_of(config: MergeConfig) -> tuple[Any, str]:
    """(source, config key) of the tokenizer policy; source None when the config sets none."""
    if config.tokenizer is not None:
        return config.tokenizer.source, "tokenizer"
    return config.tokenizer_source, "tokenizer_source"


def build_vocab(config: MergeConfig, models: list[ModelRef], checkpoints: list[Checkpoint],
                external: Optional[Path] = None) -> Optional[OutputVocab]:
    """The output vocabulary and each model's permutation; None when no policy is set, or when `base` / a model
    is asked for and no model ships a tokenizer (the tokenizer files are then only copied, as before).

    external: the folder of a tokenizer source that is not one of the merged models (as mergekit allows: only its
    tokenizer is used; a token no merged model has gets a zero row)."""
    source, key = policy_of(config)
    if source is None:
        return None
    section = config.tokenizer
    tokens = dict(section.tokens or {}) if section is not None else {}
    pad = section.pad_to_multiple_of if section is not None else None
    names = [str(m) for m in models]
    paths = {str(m): ck.path for m, ck in zip(models, checkpoints)}
    cfgs = {str(m): ck.config for m, ck in zip(models, checkpoints)}
    where = f"{key}.source" if key == "tokenizer" else key
    ref = str(config.base_model) if config.base_model is not None else names[0]
    if source == "base" and config.base_model is None:
        raise ConfigError(f"{where}: 'base' needs a base_model")
    outside = source not in ("union", "base") and str(source) not in names
    if outside and external is None:
        raise ConfigError(f"{where}: {source} is not one of the merged models")
    donor = ref if source in ("union", "base") else str(source)
    if outside:
        if not has_tokenizer(external):
            raise ConfigError(f"{where}: {source} has no tokenizer files ({', '.join(VOCAB_FILES[:2])}) in {external}")
        paths[donor] = external

    with_tok = {m for m in names if has_tokenizer(paths[m])}
    if not with_tok and source != "union" and not tokens and not pad and not outside:
        return None  # nothing to align by: the legacy path copies whatever files there are
    for m in names:
        if m in with_tok:
            continue
        if source == "union" or m in (ref, donor):
            what = "'union'" if source == "union" else f"{source!r}" if source == "base" else "its vocabulary"
            raise ConfigError(f"{where}: {what} needs the tokenizer of model {m}, which has no tokenizer files "
                              f"({', '.join(VOCAB_FILES[:2])}) in {paths[m]}")

    toks: dict[str, Any] = {}
    vocab_sizes: dict[str, int] = {}
    for m in names:
        if m in with_tok:
            toks[m] = load_tokenizer(paths[m], m)
    if outside:
        toks[donor] = load_tokenizer(external, donor)
    ref_size = config_vocab_size(cfgs[ref]) or len(toks[ref].get_vocab())
    ref_tok = strip_tokenizer(toks[ref], ref_size, ref)
    vocabs: dict[str, dict[str, int]] = {}
    notes = []
    ref_vocab = ref_tok.get_vocab()  # each get_vocab() builds a new dict: 0.3 s for 150k tokens
    for m in names:
        if m in toks and m != ref:
            vocabs[m] = toks[m].get_vocab()
        else:  # the reference, or as mergekit: a model without tokenizer files shares the reference's vocabulary
            vocabs[m] = ref_vocab
            if m not in toks:
                notes.append(f"model {m} has no tokenizer files: taken to share the vocabulary of {ref}")
        vocab_sizes[m] = config_vocab_size(cfgs[m]) or len(vocabs[m])
        if m not in toks and vocab_sizes[m] != ref_size:
            raise InputError(f"model {m} has no tokenizer files and a vocabulary of {vocab_sizes[m]} rows where {ref} "
                             f"has {ref_size}: its embedding rows cannot be matched to tokens")

    if source == "union":
        out_tok = _union(ref, names, toks, ref_tok, vocab_sizes, vocabs)
    elif source == "base":
        out_tok = ref_tok
    else:
        out_tok = toks[donor]
    existing = set(out_tok.get_vocab())
    for tok in tokens:
        if tok not in existing:
            out_tok.add_tokens(tok)
            existing.add(tok)
    vocab = out_tok.get_vocab()
    size = len(vocab)
    if sorted(vocab.values()) != list(range(size)):
        raise InputError(f"{where}: the output tokenizer's ids are not 0..{size - 1} (gaps in the vocabulary of "
                         f"{paths[donor]}); alloy cannot lay out embedding rows for it")
    rows = size if not pad or size % pad == 0 else (size // pad + 1) * pad
    perms = {}
    by_id = sorted(vocab, key=vocab.get)
    for m in names:
        v, limit = vocabs[m], vocab_sizes[m]
        rows_of = [v.get(tok, -1) for tok in by_id]
        perms[m] = torch.tensor([j if j < limit else -1 for j in rows_of], dtype=torch.long)
    unchanged = source != "union" and not tokens and out_tok is toks.get(donor)
    if source == "union" and not tokens and ref_tok is toks[ref] and vocab == ref_vocab and \
            _added(out_tok) == _added(toks[ref]):
        unchanged = True  # every model's vocabulary is the reference's: its files are the output tokenizer
    return OutputVocab(size=size, rows=rows, tokenizer=None if unchanged else out_tok, donor=paths[donor],
                       perms=perms, vocab_sizes=vocab_sizes, originals=vocabs, tokens=tokens, vocab=vocab,
                       key=key, notes=notes)


def _added(tok) -> dict[int, tuple]:
    return {i: (a.content, a.special, a.normalized, a.lstrip, a.rstrip, a.single_word)
            for i, a in tok.added_tokens_decoder.items()}


def _union(ref: str, names: list[str], toks: dict[str, Any], ref_tok, vocab_sizes: dict[str, int],
           vocabs: dict[str, dict[str, int]]):
    """The reference tokenizer grown by every other model's tokens (see the module docstring)."""
    from transformers import AutoTokenizer

    order = [ref] + [m for m in names if m != ref and m in toks]
    new_regular: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m in order:
        tok = ref_tok if m == ref else toks[m]
        limit = vocab_sizes[m]
        decoder = tok.added_tokens_decoder
        for t, i in sorted(vocabs[m].items(), key=lambda kv: kv[1]):
            if i < limit:
                new_regular.setdefault(t)
        for i in sorted(decoder):
            if i < limit:
                added.setdefault(decoder[i].content, decoder[i])
    with tempfile.TemporaryDirectory(prefix="alloy-tok-") as d:  # a fresh copy: ref_tok stays as it was
        ref_tok.save_pretrained(d)
        out = AutoTokenizer.from_pretrained(d, use_fast=True, trust_remote_code=False)
    ref_vocab = vocabs[ref]
    # one call each: ids as adding them one by one would give, but the tokenizers library rebuilds its added-token
    # matcher per call, so one by one is quadratic (83 s for 6,700 tokens)
    new = [t for t in new_regular if t not in added and t not in ref_vocab]
    if new:
        out.add_tokens(new)
    if added:
        out.add_tokens(list(added.values()))
    return out


def save_tokenizer(vocab: OutputVocab, out: Path) -> list[str]:
    """Write the output tokenizer into `out`; the names of the files written."""
    before = {p.name for p in out.iterdir()}
    vocab.tokenizer.save_pretrained(str(out))
    return sorted({p.name for p in out.iterdir()} - before)


# Built-in chat templates by name (`chat_template: chatml`), the names mergekit documents. chatml, llama3 and mistral
# render exactly what mergekit 0.1.5's templates render (llama3 there puts a newline after each <|eot_id|>, which
# Meta's own template does not); alpaca and exaone render the formats' text without the stray whitespace that
# mergekit's template files leak into the prompt (identical once whitespace is ignored; tests check both).
CHAT_TEMPLATES = {
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}",
    "llama3": "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}{{ '<|start_header_id|>' + "
              "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
              "{% endif %}",
    "mistral": "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
               "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}{{ bos_token }}"
               "{% for message in turns %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('After the optional system message, roles must alternate user/assistant') }}"
               "{% endif %}{% if message['role'] == 'user' %}{{ ' [INST] ' }}{% if loop.first and system is defined %}"
               "{{ system + '\\n\\n' }}{% endif %}{{ message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
               "{% else %}{{ raise_exception('Only user and assistant roles (and a first system message) are supported') }}"
               "{% endif %}{% endfor %}",
    "alpaca": "{% set ns = namespace(parts=[]) %}{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
              "{% if system %}{% set ns.parts = ns.parts + [system[-1]['content'] | trim] %}{% endif %}"
              "{% for message in messages %}{% set head = {'user': '### Instruction:', 'assistant': '### Response:', "
              "'user_context': '### Input:'}.get(message['role']) %}{% if head %}"
              "{% set ns.parts = ns.parts + [head + '\\n' + message['content'] | trim] %}{% endif %}{% endfor %}"
              "{{ ns.parts | join('\\n\\n') }}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
              "{{ '\\n\\n### Response:\\n' }}{% endif %}",
    "exaone": "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
              "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
              "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}",
}
