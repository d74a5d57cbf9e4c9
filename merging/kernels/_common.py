"""What every kernel shares: input checks, the launch grid, rounding to bf16/fp16, the Philox stream.

The Triton helpers here are @triton.jit functions called from the kernels. The kernels use only Triton builtins
(no `tl.rand`, `tl.sum`, `tl.zeros` or `tl.cdiv`, which are themselves @triton.jit functions), so they also run under
TRITON_INTERPRET=1 when triton was imported before that variable was set: only this package must be imported after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from merging.errors import AlloyError
from merging.kernels._host import SUPPORTED

# One program handles BLOCK elements of every input. 1024 elements x 4 warps = 8 per thread: 16-byte bf16 loads.
BLOCK = 1024
NUM_WARPS = 4
# The interpreter pays per program, not per element: bigger blocks make the CPU tests faster. Results never depend
# on the block (the RNG is keyed by element index, reductions are summed in float64).
INTERPRET_BLOCK = 4096


def interpreted(kernel) -> bool:
    """True when `kernel` was built by the Triton interpreter (TRITON_INTERPRET=1 when this package was imported)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_inputs(what: str, tensors: list[torch.Tensor], base: torch.Tensor | None, kernel) -> torch.dtype:
    """Raise AlloyError unless all tensors share shape, dtype and device and the kernel can run there."""
    allt = list(tensors) + ([base] if base is not None else [])
    if not allt:
        raise AlloyError(f"kernel {what}: no input tensors")
    ref = allt[0]
    for t in allt[1:]:
        if t.shape != ref.shape:
            raise AlloyError(f"kernel {what}: input shapes differ ({tuple(ref.shape)} vs {tuple(t.shape)})")
        if t.dtype != ref.dtype:
            raise AlloyError(f"kernel {what}: input dtypes differ ({ref.dtype} vs {t.dtype})")
        if t.device != ref.device:
            raise AlloyError(f"kernel {what}: inputs on different devices ({ref.device} vs {t.device})")
    if ref.dtype not in SUPPORTED:
        raise AlloyError(f"kernel {what}: dtype {ref.dtype} not supported (float32, bfloat16, float16)")
    if ref.device.type != "cuda" and not interpreted(kernel):
        raise AlloyError(f"kernel {what}: tensors are on {ref.device}; the Triton kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 set before merging.kernels is imported)")
    return ref.dtype


def block_for(kernel) -> int:
    return INTERPRET_BLOCK if interpreted(kernel) else BLOCK


def grid(n: int, block: int) -> tuple[int]:
    return (max(1, triton.cdiv(n, block)),)


@triton.jit
def _add(a, b):
    return a + b


# tl.sum is itself a @triton.jit function: if triton was imported before TRITON_INTERPRET was set (peft imports it),
# an interpreted kernel cannot call it. tl.reduce is a builtin the interpreter patches, and with triton's own sum
# combiner it takes the interpreter's numpy fast path; on a GPU it is exactly tl.sum.
SUM_COMBINE = getattr(getattr(tl, "standard", None), "_sum_combine", None) or _add


@triton.jit
def block_sum(x):
    """Sum of a 1-D block (see SUM_COMBINE)."""
    return tl.reduce(x, 0, SUM_COMBINE)


@triton.jit
def round_to(x, ROUND: tl.constexpr):
    """float32 `x` rounded to nearest even in bf16 (ROUND=1) or fp16 (ROUND=2), returned as float32; ROUND=0: x.

    Done on the bits, so the interpreter (which truncates narrowing casts) and GPUs give the same values, and a
    later cast to the narrow dtype is exact.
    """
    if ROUND == 1:
        bits = x.to(tl.uint32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y = tl.where(x != x, x, r)  # a NaN stays NaN (the carry could make it an infinity)
    elif ROUND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        r = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        inf = ((bits & 0x80000000) | 0x7F800000).to(tl.float32, bitcast=True)
        r = tl.where(tl.abs(r) >= 65536.0, inf, r)  # past the largest half, 65504
        a = tl.abs(x)
        # below 2**-14 halves are subnormal, multiples of 2**-24: the ulp of 0.75 in float32, so the addition rounds
        sub = (a + 0.75) - 0.75
        sub = (sub.to(tl.uint32, bitcast=True) | (bits & 0x80000000)).to(tl.float32, bitcast=True)  # keeps -0.0
        y = tl.where(a < 6.103515625e-05, sub, r)
        y = tl.where(x != x, x, y)
    else:
        y = x
    return y


@triton.jit
def philox_word(seed, offs, stream):
    """First 32-bit word of Philox4x32-10 at counter (offs low, offs high, stream, 0) under key `seed` (int64 >= 0).

    Counter-based: the word depends on (seed, element offset, model index) only, never on the block or the order
    programs run in. For stream 0 this is the word `tl.randint(seed, offs)` returns for int64 offsets. The round
    and key constants are Philox's (named in merging.kernels._host; the torch twin is reference.philox4x32).
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((offs >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0 + stream
    c3 = c0 * 0
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.math.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.math.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = tl.mul(a2, 0xCD9E8D57, sanitize_overflow=False)
        c3 = tl.mul(a0, 0xD2511F53, sanitize_overflow=False)
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0
