"""round_to: float32 -> bf16 / fp16 round-to-nearest-even done on the bits, against torch's casts."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from merging.kernels._common import round_to


@triton.jit
def _round(x_ptr, out_ptr, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, round_to(tl.load(x_ptr + offs, mask=m, other=0.0), ROUND), mask=m)


def kernel_round(x: torch.Tensor, code: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _round[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), ROUND=code, BLOCK=4096)
    return out


def hard_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # every exponent from fp32 subnormals to overflow, random mantissas, both signs
    wide = torch.randn(6000, generator=g) * torch.exp2(torch.randint(-149, 128, (6000,), generator=g).float())
    bits = torch.randint(0, 2**31 - 1, (3000,), generator=g, dtype=torch.int64).to(torch.int32)
    any_bits = bits.view(torch.float32)  # arbitrary patterns, NaNs included
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                            -65520.0, 6.1035e-05, 6.0e-05, 5.96e-08, 2.98e-08, 2.99e-08, -1e-10, 3.0e38, 3.4e38])
    # exact halfway points between neighbouring bf16 / fp16 values: the ties-to-even cases
    base = torch.randn(2000, generator=g)
    half_bf16 = (base.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)
    half_fp16 = (base.view(torch.int32) & ~0x1FFF | 0x1000).view(torch.float32)
    return torch.cat([wide, any_bits, special, half_bf16, half_fp16, -half_bf16])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on the NaN inputs
@pytest.mark.parametrize("dtype,code", [(torch.bfloat16, 1), (torch.float16, 2)])
def test_round_to_matches_torch_cast(dtype, code):
    x = hard_values()
    ours = kernel_round(x, code)
    theirs = x.to(dtype).float()
    nan = torch.isnan(theirs)
    assert torch.equal(torch.isnan(ours), nan)
    assert torch.equal(ours[~nan].view(torch.int32), theirs[~nan].view(torch.int32))  # same bits, -0.0 included
    assert torch.equal(ours.to(dtype).float()[~nan], ours[~nan])  # representable: the later cast is exact


def test_round_to_float32_is_identity():
    x = hard_values()
    out = kernel_round(x, 0)
    assert torch.equal(out.view(torch.int32), x.view(torch.int32))
