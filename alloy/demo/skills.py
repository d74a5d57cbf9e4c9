"""Synthetic skills a pretrained base cannot already do, shared by both demo families.

Three skills, each asked as ``Q: <question>\\nA:`` with the answer after one space:

- ``facts``: the favourite colour of 40 made-up people (8 colours, 5 people each).
- ``words``: the word for 40 English words in a made-up language ("Velish").
- ``addition``: the sum of two 3-digit numbers.

What "held out" means here:

- ``addition``: train and eval use disjoint operand pairs. A pair is assigned to a split by a hash of the
  unordered pair, so ``a + b`` and ``b + a`` always land in the same split and eval never asks a sum seen in training.
- ``facts`` and ``words``: the skill *is* memorising a table, so eval asks about the same table entries as training
  (each entry has two wordings and both splits draw from the same 80 prompts). Eval examples are distinct prompts;
  train examples are drawn with replacement. The multiple-choice distractors are drawn independently per split.

A third split, ``tune`` (``<skill>.tune.jsonl``, written beside the eval files), is what a recipe search may tune on
while the eval ("held-out") files judge it: its prompts are never among the eval file's prompts. For ``facts`` and
``words`` those are the table prompts the eval file did not draw (20 of 80 at the default ``n_eval=60``); for
``addition``, other sums from the eval side of the pair split.

The tables (people, colours, words) are fixed constants of this module, independent of ``seed``, so every family
built from any seed is evaluated against the same truth; ``seed`` only chooses which examples are drawn.
Everything is deterministic: the same arguments give the same examples and the same bytes on disk.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from eval.texts import jsonl_rows
from merging.errors import ConfigError

SKILLS: tuple[str, ...] = ("facts", "words", "addition")
SPLITS: tuple[str, ...] = ("train", "eval")
N_CHOICES = 4
N_TUNE = 20  # tune examples per skill (at most: facts and words have only the prompts eval left over)
TUNE_SUFFIX = ".tune.jsonl"
LANGUAGE = "Velish"

COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")

ENGLISH_WORDS: tuple[str, ...] = (
    "water", "fire", "house", "tree", "dog", "cat", "bread", "stone", "river", "moon",
    "sun", "star", "bird", "fish", "horse", "apple", "salt", "milk", "door", "road",
    "rain", "snow", "wind", "cloud", "mountain", "forest", "flower", "grass", "ship", "bridge",
    "king", "friend", "mother", "father", "child", "book", "song", "night", "morning", "winter",
)  # fmt: skip

FACT_TEMPLATES: tuple[str, ...] = (
    "What is the favourite colour of {name}?",
    "Which colour does {name} like best?",
)
WORD_TEMPLATES: tuple[str, ...] = (
    "What is the " + LANGUAGE + " word for {word}?",
    "How do you say {word} in " + LANGUAGE + "?",
)
ADDITION_TEMPLATE = "What is {a} + {b}?"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "n", "r", "l", "s")


def format_prompt(question: str) -> str:
    """The prompt both families are trained and evaluated on; the answer follows after one space."""
    return f"Q: {question}\nA:"


def _made_up_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return word + rng.choice(_CODAS)


def _unique_words(rng: random.Random, n: int, syllables: tuple[int, ...], avoid: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(avoid)
    while len(out) < n:
        w = _made_up_word(rng, rng.choice(syllables))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _build_tables() -> tuple[dict[str, str], dict[str, str]]:
    # A fixed seed: the truth the specialists learn must not depend on the seed a family is built with.
    rng = random.Random("alloy-demo-skill-tables-v1")
    english = {w.lower() for w in ENGLISH_WORDS} | set(COLOURS)
    names = [w.capitalize() for w in _unique_words(rng, 40, (2, 3), english)]
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(names))]
    rng.shuffle(colours)
    velish = _unique_words(rng, len(ENGLISH_WORDS), (2,), english | {n.lower() for n in names})
    return dict(zip(names, colours)), dict(zip(ENGLISH_WORDS, velish))


FACTS, WORDS = _build_tables()


def _addition_split(a: int, b: int) -> str:
    # Hash of the unordered pair: about 1 pair in 10 is held out for eval, the same on every machine.
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.sha256(f"{lo}+{hi}".encode()).digest()
    return "eval" if digest[0] % 10 == 0 else "train"


def _shuffled_choices(rng: random.Random, answer: str, distractors: list[str]) -> tuple[list[str], int]:
    choices = [answer, *distractors[: N_CHOICES - 1]]
    rng.shuffle(choices)
    return choices, choices.index(answer)


def _example(rng: random.Random, question: str, answer: str, pool: list[str]) -> dict:
    others = [p for p in pool if p != answer]
    choices, label = _shuffled_choices(rng, answer, rng.sample(others, N_CHOICES - 1))
    prompt = format_prompt(question)
    return {
        "question": question,
        "answer": answer,
        "choices": choices,
        "label": label,
        "prompt": prompt,
        "text": f"{prompt} {answer}",
    }


def _table_prompts(skill: str) -> list[tuple[str, str]]:
    if skill == "facts":
        return [(t.format(name=n), c) for n, c in FACTS.items() for t in FACT_TEMPLATES]
    return [(t.format(word=w), v) for w, v in WORDS.items() for t in WORD_TEMPLATES]


def _addition_examples(rng: random.Random, split: str, n: int) -> list[dict]:
    out: list[dict] = []
    seen: set[tuple[int, int]] = set()
    while len(out) < n:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        if _addition_split(a, b) != split:
            continue
        if split == "eval":
            # Distinct eval prompts, so a limit of k means k different sums.
            if (a, b) in seen:
                continue
            seen.add((a, b))
        s = a + b
        # Near misses (one digit off, a lost carry) make the choice a test of arithmetic, not of number shape.
        near = [str(s + d) for d in (-100, -10, -1, 1, 10, 100)]
        choices, label = _shuffled_choices(rng, str(s), rng.sample(near, N_CHOICES - 1))
        question = ADDITION_TEMPLATE.format(a=a, b=b)
        prompt = format_prompt(question)
        out.append(
            {
                "question": question,
                "answer": str(s),
                "choices": choices,
                "label": label,
                "prompt": prompt,
                "text": f"{prompt} {s}",
            }
        )
    return out


def make_examples(skill: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` examples of ``skill`` from ``split`` ("train" or "eval").

    Each is a dict with ``question``, ``answer``, ``choices`` (4 options, the answer among them), ``label`` (the
    answer's index), plus ``prompt`` (``Q: ...\\nA:``) and ``text`` (prompt, a space, the answer) for training.
    """
    if skill not in SKILLS:
        raise ConfigError(f"skill {skill!r}: unknown, expected one of {', '.join(SKILLS)}")
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: unknown, expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise ConfigError(f"n={n}: the number of examples must be >= 0")
    rng = random.Random(f"alloy-demo/{skill}/{split}/{seed}")
    if skill == "addition":
        return _addition_examples(rng, split, n)
    prompts = _table_prompts(skill)
    pool = list(COLOURS) if skill == "facts" else list(WORDS.values())
    if split == "eval":
        if n > len(prompts):
            raise ConfigError(f"n_eval={n}: skill {skill!r} has only {len(prompts)} distinct prompts")
        picked = rng.sample(prompts, n)
    else:
        picked = [rng.choice(prompts) for _ in range(n)]
    return [_example(rng, q, a, pool) for q, a in picked]


def make_tune_examples(skill: str, heldout: list[dict], n: int = N_TUNE, seed: int = 0) -> list[dict]:
    """Up to ``n`` examples of ``skill`` whose prompts are not among ``heldout``'s (the eval file's rows).

    A sum counts as asked when either order was: ``a + b`` held out keeps ``b + a`` out of the tune split too.
    """
    if skill not in SKILLS:
        raise ConfigError(f"skill {skill!r}: unknown, expected one of {', '.join(SKILLS)}")
    rng = random.Random(f"alloy-demo/{skill}/tune/{seed}")
    asked = {r["question"] for r in heldout}
    if skill == "addition":
        def key(q: str) -> tuple[int, int]:
            a, b = (int(x) for x in q.removeprefix("What is ").removesuffix("?").split(" + "))
            return min(a, b), max(a, b)

        seen = {key(q) for q in asked}
        out = []
        while len(out) < n:
            # Same generator as eval (the eval side of the pair split); repeats and held-out sums are skipped.
            ex = _addition_examples(rng, "eval", 1)[0]
            k = key(ex["question"])
            if k not in seen:
                seen.add(k)
                out.append(ex)
        return out
    prompts = [(q, a) for q, a in _table_prompts(skill) if q not in asked]
    picked = rng.sample(prompts, min(n, len(prompts)))
    pool = list(COLOURS) if skill == "facts" else list(WORDS.values())
    return [_example(rng, q, a, pool) for q, a in picked]


def write_tune_data(out_dir: str | Path, heldout_dir: str | Path | None = None, seed: int = 0,
                    n: int = N_TUNE) -> dict[str, Path]:
    """Write ``<skill>.tune.jsonl`` into ``out_dir``, disjoint from ``heldout_dir/<skill>.jsonl`` (default: out_dir).

    Returns ``{skill: path}``; a skill whose eval file already uses every prompt gets no file (and no key).
    """
    out = Path(out_dir)
    src = Path(heldout_dir) if heldout_dir is not None else out
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for skill in SKILLS:
        f = src / f"{skill}.jsonl"
        try:
            heldout = [row for _, row in jsonl_rows(f)]
        except FileNotFoundError:
            raise ConfigError(f"{f}: no held-out file to keep the tune split apart from") from None
        rows = make_tune_examples(skill, heldout, n, seed=seed)
        if rows:
            paths[skill] = out / f"{skill}{TUNE_SUFFIX}"
            _write_jsonl(paths[skill], rows)
    return paths


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # Fixed key order and separators: the file bytes depend on the rows only.
    text = "".join(json.dumps(r, ensure_ascii=True, sort_keys=True) + "\n" for r in rows)
    path.write_bytes(text.encode())


def heldout_documents(seed: int = 0, n_docs: int = 48, per_doc: int = 1) -> list[str]:
    """Documents of answered eval prompts from every skill, interleaved, for perplexity.

    One answered prompt per document by default: short enough for the tiny family's 64-token context, so the
    perplexity measures the model rather than how lm-eval cuts long texts into windows.
    """
    n_lines = n_docs * per_doc
    per_skill = {s: make_examples(s, "eval", n_lines // len(SKILLS) + 1, seed=seed + 1000) for s in SKILLS}
    lines = [per_skill[s][i]["text"] for i in range(n_lines // len(SKILLS) + 1) for s in SKILLS]
    return ["\n".join(lines[i * per_doc : (i + 1) * per_doc]) for i in range(n_docs)]


def write_skill_data(out_dir: str | Path, seed: int = 0, n_eval: int = 60) -> dict[str, Path]:
    """Write ``<skill>.jsonl`` (eval split) for every skill, its tune split, plus held-out text for perplexity.

    Returns paths keyed by skill name, ``<skill>_tune`` (``<skill>.tune.jsonl``), ``heldout`` (plain text, documents
    separated by a blank line) and ``heldout_jsonl`` (one ``{"text": ...}`` document per line, what lm-eval's
    perplexity task reads).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for skill in SKILLS:
        p = out / f"{skill}.jsonl"
        _write_jsonl(p, make_examples(skill, "eval", n_eval, seed=seed))
        paths[skill] = p
    paths.update({f"{s}_tune": p for s, p in write_tune_data(out, seed=seed).items()})
    docs = heldout_documents(seed=seed)
    paths["heldout"] = out / "heldout.txt"
    paths["heldout"].write_bytes(("\n\n".join(docs) + "\n").encode())
    paths["heldout_jsonl"] = out / "heldout.jsonl"
    _write_jsonl(paths["heldout_jsonl"], [{"text": d} for d in docs])
    return paths
