"""Host-side pieces shared by the kernels and their torch references (no triton import here)."""

from __future__ import annotations

import torch

from merging.errors import AlloyError

SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)
_ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Philox4x32-10 constants (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3").
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10


def seed_from(generator: torch.Generator | None) -> int:
    """One non-negative 63-bit Philox key drawn from the caller's generator (the engine seeds it per tensor)."""
    if generator is None:
        generator = torch.default_generator
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())


def keep_threshold(density: float) -> int:
    """Random pruning keeps element e iff its 32-bit Philox word is below this: P(keep) = density to 2**-32."""
    if density >= 1.0:
        return 1 << 32
    if density <= 0.0:
        return 0
    return min((1 << 32) - 1, int(round(density * 4294967296.0)))


def per_model(name: str, value, n: int) -> list[float]:
    """A PerModel parameter as one float per model (a scalar broadcasts)."""
    if value is None:
        raise AlloyError(f"kernel parameter {name!r} is missing")
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) != n:
        raise AlloyError(f"kernel parameter {name!r}: {len(values)} values for {n} models")
    return values


def round_code(dtype: torch.dtype) -> int:
    """The kernels' code for rounding float32 to `dtype` (0: none)."""
    return _ROUND_CODES[dtype]


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype DARE draws and rescales in (merging.primitives, after mergekit): torch.bernoulli has no fp16 CPU
    kernel, so fp16 on the CPU works in float32; everything else in its own dtype."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


RESCALE_EPS = 1e-7  # below this L1 norm (before or after pruning) the pruned delta is left unscaled, as mergekit does


def rescale_factor(before: float, after: float, dtype: torch.dtype) -> float:
    """mergekit's L1 rescale factor from the two norms, held and divided in `dtype` as the torch method does."""
    bt = torch.tensor(before, dtype=torch.float64).to(dtype)
    at = torch.tensor(after, dtype=torch.float64).to(dtype)
    if bt < RESCALE_EPS or at < RESCALE_EPS:
        return 1.0
    return float((bt / at).float())
