"""Torch twins of the Triton kernels: the same arithmetic in the same order and dtypes, so kernel and reference
agree bit for bit (torch rounds each operation to nearest even, as the kernels do by hand).

Written as plain torch, the way the torch methods compute (in the inputs' dtype for the task-arithmetic family, in
float32 for linear and slerp), and independently of the kernels where it matters: magnitude selections here sort
(stable) instead of the kernels' histogram/kthvalue + tie cut, and Philox runs on int64 tensors with 16-bit limbs.
What the kernels do differently from merging.methods is done the same way here: sums over models accumulate in
float32 in model order, L1 norms are float64 sums, DARE's mask comes from Philox.
Each public function has the signature of the kernel of the same name in merging.kernels.ops.
"""

from __future__ import annotations

import torch

from merging.errors import ConfigError
from merging.kernels._host import (
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    keep_threshold,
    per_model,
    rescale_factor,
    seed_from,
    work_dtype,
)

M32 = 0xFFFFFFFF


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b (a: int64 tensor in [0, 2**32), b < 2**32) without int64 overflow."""
    t = a * (b & 0xFFFF)
    u = a * (b >> 16)
    hi = (u + (t >> 16)) >> 16
    lo = (((u & 0xFFFF) << 16) + t) & M32
    return hi, lo


def philox4x32(key: tuple[int, int], counter: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011): the four 32-bit output words for counters (int64 tensors of values in
    [0, 2**32)) under a two-word key."""
    k0, k1 = key[0] & M32, key[1] & M32
    c0, c1, c2, c3 = counter
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND_A)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = (k0 + PHILOX_KEY_A) & M32
        k1 = (k1 + PHILOX_KEY_B) & M32
    return c0, c1, c2, c3


def philox_word(seed: int, offs: torch.Tensor, stream: int) -> torch.Tensor:
    """First word at counter (offs lo, offs hi, stream, 0) under key (seed lo, seed hi): the kernels' draw."""
    zero = torch.zeros_like(offs)
    return philox4x32((seed, seed >> 32), (offs & M32, (offs >> 32) & M32, zero + (stream & M32), zero))[0]


def random_keep(n: int, seed: int, stream: int, density: float, device=None) -> torch.Tensor:
    """DARE's keep mask for model `stream` of a tensor of n elements."""
    offs = torch.arange(n, dtype=torch.int64, device=device)
    return philox_word(seed, offs, stream) < keep_threshold(density)


def _stable_order(delta: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.sort(delta.reshape(-1).abs().float(), descending=descending, stable=True).indices


def magnitude_keep(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |delta|; ties go to the lower flat index (a stable sort)."""
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[_stable_order(delta, True)[:max(0, k)]] = True
    return keep


def band_keep(delta: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Ranks [start, stop) of ascending |delta|; ties by ascending flat index."""
    keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    keep[_stable_order(delta, False)[max(0, start):max(0, stop)]] = True
    return keep


def _seq_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sum over models in float32, in model order (what torch's sum over a stacked model axis does)."""
    acc = torch.full_like(parts[0], -0.0, dtype=torch.float32)  # the identity of IEEE addition, as the kernels
    for p in parts:
        acc = acc + p.float()
    return acc


def gta_reference(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weights: list[float],
                  sparsify: str | None = None, densities: list[float] | None = None,
                  gammas: list[float] | None = None, consensus: str | None = None, normalize: bool = False,
                  rescale: bool = False, lambda_: float = 1.0, seed: int = 0, stepwise: bool = True,
                  fma: bool = False, zero_divisor_eps: float = 1e-8) -> torch.Tensor:
    """merging.kernels.gta.gta_merge in torch. sparsify: None, "magnitude", "band" or "random"; consensus: None,
    "sum" or "count"."""
    if not tensors:
        return base.clone()
    like = tensors[0]
    dtype = like.dtype
    cdt = dtype if stepwise else torch.float32
    n = like.numel()
    densities = densities if densities is not None else [1.0] * len(tensors)
    sdt = (work_dtype(like) if stepwise else torch.float32) if sparsify == "random" else cdt
    b = base.reshape(-1).to(cdt) if base is not None else None
    w = torch.tensor(weights, dtype=cdt, device=like.device)
    if fma:
        acc = torch.zeros(n, dtype=torch.float32, device=like.device)
        for x, wi in zip(tensors, w):
            acc.addcmul_(x.reshape(-1), wi)
        if normalize:
            acc = acc / w.sum()
        return acc.to(dtype).reshape(like.shape)

    weighted = []
    for i, (x, dens) in enumerate(zip(tensors, densities)):
        d = x.reshape(-1).to(cdt)
        if b is not None:
            d = d - b
        if sparsify is not None and dens < 1.0:
            if sparsify == "magnitude":
                keep = magnitude_keep(d, 0 if dens <= 0 else max(1, int(dens * n)))
            elif sparsify == "band":
                k = int(dens * n)
                start = max(0, n - k - int(gammas[i] * n))
                keep = band_keep(d, start, start + k)
            else:
                keep = random_keep(n, seed, i, float(torch.tensor(dens, dtype=sdt)), device=like.device)
            masked = d.to(sdt) * keep.to(sdt)
            if rescale:
                before = float(d.abs().double().sum())
                after = float(masked.abs().double().sum())
                factor = torch.tensor(rescale_factor(before, after, sdt), dtype=sdt)
                masked = masked * factor
            d = masked.to(cdt)
        weighted.append(w[i] * d)

    if consensus is not None:
        if consensus == "sum":
            total = _seq_sum(weighted)
        else:
            total = _seq_sum([wd.sign() for wd in weighted])
        up = total.to(cdt) >= 0
        agree = [torch.where(up, wd > 0, wd < 0) for wd in weighted]
        mixed = _seq_sum([torch.where(a, wd, 0.0) for a, wd in zip(agree, weighted)]).to(cdt)
        div = _seq_sum([torch.where(a, w[i], 0.0) for i, a in enumerate(agree)]).to(cdt)
        div = torch.where(div == 0, 1.0, div)
    else:
        mixed = _seq_sum(weighted).to(cdt)
        div = w.sum()
        if abs(float(div)) < zero_divisor_eps:
            div = torch.ones((), dtype=cdt)
    if normalize:
        mixed = mixed / div
    if lambda_ != 1:
        mixed = mixed * lambda_
    if b is not None:
        mixed = b + mixed
    return mixed.to(dtype).reshape(like.shape)


def slerp_reference(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's SLERP with float64 statistics and a float32 interpolation."""
    x = base.reshape(-1).double()
    y = other.reshape(-1).double()
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = torch.where(na > 1e-8, na, 1.0)
    nb = torch.where(nb > 1e-8, nb, 1.0)
    dot = ((x * y).sum() / (na * nb)).clamp(-1.0, 1.0)
    if float(dot.abs()) > 0.9995:
        ca, cb = 1.0 - t, t
    else:
        theta = torch.acos(dot)
        ca = float(torch.sin((1.0 - t) * theta) / torch.sin(theta))
        cb = float(torch.sin(t * theta) / torch.sin(theta))
    return gta_reference([base, other], None, weights=[ca, cb], stepwise=False)


# --- the signatures of merging.kernels.ops -----------------------------------------------------------------------


def _consensus(method: str) -> str:
    if method not in ("sum", "count"):
        raise ConfigError(f"consensus_method must be 'sum' or 'count', got {method!r}")
    return method


def linear(tensors: list[torch.Tensor], *, weight, normalize: bool = True) -> torch.Tensor:
    return gta_reference(tensors, None, weights=per_model("weight", weight, len(tensors)), normalize=normalize,
                         stepwise=False, fma=True)


def task_arithmetic(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0,
                    normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                    lambda_: float = 1.0) -> torch.Tensor:
    return gta_reference(tensors, base, weights=per_model("weight", weight, len(tensors)), normalize=normalize,
                         lambda_=lambda_)


def ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0, normalize: bool = True,
         rescale: bool = False, int8_mask: bool = False, lambda_: float = 1.0,
         consensus_method: str = "sum") -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="magnitude",
                         densities=per_model("density", density, k), consensus=_consensus(consensus_method),
                         normalize=normalize, rescale=rescale, lambda_=lambda_)


def dare_linear(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0, normalize: bool = False,
                rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="random",
                         densities=per_model("density", density, k), normalize=normalize, rescale=rescale,
                         lambda_=lambda_, seed=seed_from(generator))


def dare_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0, normalize: bool = False,
              rescale: bool = True, int8_mask: bool = False, lambda_: float = 1.0, consensus_method: str = "sum",
              generator: torch.Generator | None = None) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="random",
                         densities=per_model("density", density, k), consensus=_consensus(consensus_method),
                         normalize=normalize, rescale=rescale, lambda_=lambda_, seed=seed_from(generator))


def breadcrumbs(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0, gamma=0.01,
                normalize: bool = False, rescale: bool = False, int8_mask: bool = False,
                lambda_: float = 1.0) -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="band",
                         densities=per_model("density", density, k), gammas=per_model("gamma", gamma, k),
                         normalize=normalize, rescale=rescale, lambda_=lambda_)


def breadcrumbs_ties(tensors: list[torch.Tensor], base: torch.Tensor, *, weight, density=1.0, gamma=0.01,
                     normalize: bool = False, rescale: bool = False, int8_mask: bool = False, lambda_: float = 1.0,
                     consensus_method: str = "sum") -> torch.Tensor:
    k = len(tensors)
    return gta_reference(tensors, base, weights=per_model("weight", weight, k), sparsify="band",
                         densities=per_model("density", density, k), gammas=per_model("gamma", gamma, k),
                         consensus=_consensus(consensus_method), normalize=normalize, rescale=rescale,
                         lambda_=lambda_)


def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    return slerp_reference(base, tensors[0], float(t))


def magnitude_prune(delta: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    return gta_reference([delta], None, weights=[1.0], sparsify="magnitude", densities=[float(density)],
                         rescale=rescale)


def dare_drop(delta: torch.Tensor, density: float, *, rescale: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    return gta_reference([delta], None, weights=[1.0], sparsify="random", densities=[float(density)],
                         rescale=rescale, seed=seed_from(generator))
