"""Small tensors and comparisons shared by the kernel tests."""

from __future__ import annotations

import torch

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def family(n: int | tuple[int, ...], dtype: torch.dtype, models: int = 3, seed: int = 0,
           tie_share: float = 0.2) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A base like a weight matrix and `models` fine-tunes of it. A share of each delta is snapped to a coarse
    grid so magnitudes tie at selection thresholds, as bf16 deltas do."""
    shape = (n,) if isinstance(n, int) else n
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.05
    xs = []
    for _ in range(models):
        delta = torch.randn(shape, generator=g) * 0.005
        snap = torch.rand(shape, generator=g) < tie_share
        delta = torch.where(snap, torch.round(delta / 0.002) * 0.002, delta)
        xs.append((base + delta).to(dtype))
    return xs, base.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per element, how many representable values of the dtype lie between a and b (0 = same; +0 and -0 are 0)."""
    width = 32 if a.dtype == torch.float32 else 16
    low = -(1 << (width - 1))

    def line(t: torch.Tensor) -> torch.Tensor:
        i = bits(t).to(torch.int64)
        return torch.where(i < 0, low - i, i)  # sign-magnitude onto a monotone integer line

    return (line(a) - line(b)).abs()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
