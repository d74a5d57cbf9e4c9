"""A tiny Llama family trained from scratch on the CPU: one base and one specialist per synthetic skill.

Fast and deterministic, so tests can build it, merge it and evaluate it through lm-eval. What it is good for and
what not (measured, see the project's recipes notes): specialists learn their skill well, but merges of models this
small trained from scratch do not keep the skills, so the demo's merge-quality claim rests on the SmolLM2 family.

The base learns the prompt format and neighbouring skills that are *not* the specialists' skills: copying a string,
1-digit addition, the favourite colours of a *different* set of people and a *different* made-up language. Each
specialist is a full fine-tune of the base on one skill (loss on the answer only), replaying base data half the time.

Same arguments, same machine -> same bytes: fixed seeds, deterministic algorithms, a fixed number of threads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import string
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alloy.demo import skills as sk
from merging.errors import ConfigError, OutputError
from merging.folders import replace_folder

# Every character the prompts use; anything else maps to <unk>.
CHARSET = " \n" + string.ascii_letters + string.digits + ".,?!:;'+-=()"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
BASE_LANGUAGE = "Dravic"


@dataclass(frozen=True)
class TinySize:
    """Model and optimiser sizes; the defaults are the demo size (about 1 M parameters)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    max_len: int = 64
    batch_size: int = 64
    base_lr: float = 3e-3
    specialist_lr: float = 1e-3
    replay: float = 0.5  # fraction of each specialist batch drawn from the base corpus
    threads: int = 1  # more threads on a shared 2-core machine made steps up to 5x slower


# Small enough to build a base and three specialists in about a minute on two loaded cores.
TEST_SIZE = TinySize(hidden=64, layers=2, heads=4, intermediate=256, batch_size=32, base_lr=3e-3, specialist_lr=3e-3)


@dataclass
class TinyFamily:
    """Where a built family lies: base and specialist checkpoints, and the eval data folder."""

    root: Path
    base: Path
    specialists: dict[str, Path] = field(default_factory=dict)
    data_dir: Path | None = None
    data_files: dict[str, Path] = field(default_factory=dict)


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """Character-level tokenizer: a BPE with no merges, wrapped so AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in CHARSET:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # without it decode() joins characters with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TinySize.max_len,
    )


# ---- the base corpus: the format and neighbouring skills, none of the specialists' skills ----


def _other_tables() -> tuple[dict[str, str], dict[str, str]]:
    rng = random.Random("alloy-tiny-base-tables-v1")
    taken = {n.lower() for n in sk.FACTS} | set(sk.WORDS.values()) | set(sk.WORDS) | set(sk.COLOURS)
    names = [w.capitalize() for w in sk._unique_words(rng, 40, (2, 3), taken)]
    colours = [sk.COLOURS[i % len(sk.COLOURS)] for i in range(len(names))]
    rng.shuffle(colours)
    dravic = sk._unique_words(rng, len(sk.ENGLISH_WORDS), (2,), taken | {n.lower() for n in names})
    return dict(zip(names, colours)), dict(zip(sk.ENGLISH_WORDS, dravic))


def base_texts(n: int, seed: int) -> list[str]:
    """``n`` answered prompts of the base corpus (each ``Q: ...\\nA: answer``)."""
    rng = random.Random(f"alloy-tiny-base/{seed}")
    facts, words = _other_tables()
    names, english = list(facts), list(words)
    out = []
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            s = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(rng.randint(2, 6)))
            q, a = f"Say {s}.", s
        elif kind == 1:
            x, y = rng.randint(0, 9), rng.randint(0, 9)
            q, a = f"What is {x} + {y}?", str(x + y)
        elif kind == 2:
            name = rng.choice(names)
            q, a = rng.choice(sk.FACT_TEMPLATES).format(name=name), facts[name]
        else:
            w = rng.choice(english)
            q = rng.choice(sk.WORD_TEMPLATES).replace(sk.LANGUAGE, BASE_LANGUAGE).format(word=w)
            a = words[w]
        out.append(f"{sk.format_prompt(q)} {a}")
    return out


# ---- training ----


@contextlib.contextmanager
def _deterministic_torch(threads: int) -> Iterator[None]:
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


Row = tuple[str, bool, bool]  # text, loss on the answer only, starts with <s>


def _encode(tok, rows: Sequence[Row], max_len: int):
    """Token ids and labels, padded to the longest row. The loss covers the answer and its closing newline, or
    the whole text; a row may start with <s>, as lm-eval's perplexity windows do."""
    import torch

    # The tokenizer is character level, so a dict lookup is the tokenizer (and 50x faster than calling it).
    vocab, unk = tok.get_vocab(), tok.unk_token_id
    encoded, starts = [], []
    for text, ans_only, bos in rows:
        prefix = [tok.bos_token_id] if bos else []
        encoded.append((prefix + [vocab.get(c, unk) for c in text + "\n"])[:max_len])
        starts.append(len(prefix) + text.rindex("\nA:") + 3 if ans_only else 1)
    width = max(len(r) for r in encoded)
    ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (row, start) in enumerate(zip(encoded, starts)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, start : len(row)] = ids[i, start : len(row)]
    return ids, labels


def _train(model, tok, batches: Iterator[list[Row]], steps: int, lr: float, size: TinySize) -> list[float]:
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(1, steps))
    )
    model.train()
    losses = []
    for _ in range(steps):
        ids, labels = _encode(tok, next(batches), size.max_len)
        out = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def _base_batches(seed: int, size: TinySize) -> Iterator[list[Row]]:
    chunk = 0
    while True:
        texts = base_texts(size.batch_size * 50, seed * 1_000_003 + chunk)
        for i in range(0, len(texts), size.batch_size):
            yield [(t, False, j % 2 == 0) for j, t in enumerate(texts[i : i + size.batch_size])]
        chunk += 1


def _specialist_batches(skill: str, seed: int, size: TinySize) -> Iterator[list[Row]]:
    n_replay = round(size.batch_size * size.replay)
    n_skill = size.batch_size - n_replay
    chunk = 0
    while True:
        own = [e["text"] for e in sk.make_examples(skill, "train", n_skill * 50, seed=seed * 1_000_003 + chunk)]
        replay = base_texts(n_replay * 50, seed=10_000 + seed * 1_000_003 + chunk)
        for i in range(50):
            # Replay keeps the base's full-text loss; the skill's loss is on the answer only.
            yield [(t, True, False) for t in own[i * n_skill : (i + 1) * n_skill]] + [
                (t, False, j % 2 == 0) for j, t in enumerate(replay[i * n_replay : (i + 1) * n_replay])
            ]
        chunk += 1


def _new_model(tok, size: TinySize, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=size.max_len,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _save(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    # Greedy by default, stop at the end of an answer line; lm-eval passes its own settings anyway.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


def build_tiny_family(
    out_dir: str | Path,
    seed: int = 0,
    base_steps: int = 1000,
    specialist_steps: int = 600,
    skills: Sequence[str] = sk.SKILLS,
    *,
    size: TinySize | None = None,
    n_eval: int = 60,
    overwrite: bool = False,
    log=None,
) -> dict:
    """Train the base and one specialist per skill; write HF checkpoints and the eval data.

    Layout: ``out_dir/base``, ``out_dir/<skill>`` (safetensors, config, generation config, tokenizer),
    ``out_dir/data`` (``write_skill_data``) and ``out_dir/family.json`` (settings and training losses).
    Written in a temporary folder beside ``out_dir`` and renamed into place when complete.
    Returns ``{"root", "base", "specialists": {skill: path}, "data_dir", "data_files": {...}}``.
    """
    import torch

    size = size or TinySize()
    bad = [s for s in skills if s not in sk.SKILLS]
    if bad:
        raise ConfigError(f"skills: unknown skill {bad[0]!r}, expected some of {', '.join(sk.SKILLS)}")
    if base_steps < 0 or specialist_steps < 0:
        raise ConfigError("base_steps/specialist_steps: must be >= 0")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: exists and is not empty (pass overwrite=True to replace it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    say = log or (lambda msg: None)
    try:
        info: dict = {"seed": seed, "base_steps": base_steps, "specialist_steps": specialist_steps,
                      "skills": list(skills), "size": asdict(size), "seconds": {}, "final_loss": {}}  # fmt: skip
        with _deterministic_torch(size.threads):
            tok = build_tokenizer()
            t0 = time.perf_counter()
            base = _new_model(tok, size, seed)
            losses = _train(base, tok, _base_batches(seed, size), base_steps, size.base_lr, size)
            info["seconds"]["base"] = round(time.perf_counter() - t0, 1)
            info["final_loss"]["base"] = _tail_mean(losses)
            _save(base, tok, tmp / "base")
            say(f"base: {base_steps} steps, loss {info['final_loss']['base']}, {info['seconds']['base']} s")
            base_state = {k: v.clone() for k, v in base.state_dict().items()}
            for i, skill in enumerate(skills):
                t0 = time.perf_counter()
                base.load_state_dict(base_state)
                torch.manual_seed(seed * 7919 + i + 1)
                losses = _train(base, tok, _specialist_batches(skill, seed, size), specialist_steps,
                                size.specialist_lr, size)  # fmt: skip
                info["seconds"][skill] = round(time.perf_counter() - t0, 1)
                info["final_loss"][skill] = _tail_mean(losses)
                _save(base, tok, tmp / skill)
                say(f"{skill}: {specialist_steps} steps, loss {info['final_loss'][skill]}, {info['seconds'][skill]} s")
        data_paths = sk.write_skill_data(tmp / "data", seed=seed, n_eval=n_eval)
        # Timings vary run to run; keep them out of the deterministic bytes.
        (tmp / "family.json").write_text(json.dumps({k: v for k, v in info.items() if k != "seconds"}, indent=2) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {k: out / "data" / v.name for k, v in data_paths.items()}
    return {
        "root": out,
        "base": out / "base",
        "specialists": {s: out / s for s in skills},
        "data_dir": out / "data",
        "data_files": files,
        "seconds": info["seconds"],
        "final_loss": info["final_loss"],
    }


def _tail_mean(losses: list[float]) -> float | None:
    tail = losses[-20:]
    return round(sum(tail) / len(tail), 4) if tail else None


def family_from_dict(d: dict) -> TinyFamily:
    return TinyFamily(root=d["root"], base=d["base"], specialists=dict(d["specialists"]), data_dir=d["data_dir"],
                      data_files=dict(d["data_files"]))  # fmt: skip
