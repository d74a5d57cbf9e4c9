"""DARE's counter-based RNG: Philox4x32-10 in torch (known-answer vectors) and in the kernels (same words)."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from kernel_helpers import family, gen, same_bytes

from merging.kernels import KERNELS, reference
from merging.kernels._common import philox_word
from merging.kernels._host import keep_threshold


@triton.jit
def _probe(offs_ptr, out_ptr, seed_ptr, n, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    counter = tl.load(offs_ptr + offs, mask=m, other=0)
    word = philox_word(tl.load(seed_ptr), counter, STREAM)
    tl.store(out_ptr + offs, word.to(tl.int64), mask=m)


def kernel_words(seed: int, counters: torch.Tensor, stream: int) -> torch.Tensor:
    out = torch.empty_like(counters)
    _probe[(triton.cdiv(counters.numel(), 512),)](counters, out, torch.tensor([seed]), counters.numel(),
                                                 STREAM=stream, BLOCK=512)
    return out


# Random123's known-answer vectors for philox4x32-10 (kat_vectors): key, counter -> output
KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000, 0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("key,counter,expected", KAT)
def test_reference_philox_known_answers(key, counter, expected):
    words = reference.philox4x32(key, tuple(torch.tensor([c], dtype=torch.int64) for c in counter))
    assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("stream", [0, 1, 7])
def test_kernel_words_equal_reference(stream):
    g = gen(stream)
    small = torch.arange(0, 1500, dtype=torch.int64)
    big = torch.randint(0, 2**40, (1500,), generator=g)  # offsets past 2**32 use the counter's high word
    counters = torch.cat([small, big, torch.tensor([2**32 - 1, 2**32, 2**63 - 1])])
    for seed in (0, 42, 2**62 + 12345):
        assert torch.equal(kernel_words(seed, counters, stream), reference.philox_word(seed, counters, stream))


def test_keep_rate_matches_density():
    n = 40000
    for density in (0.1, 0.5, 0.9):
        keep = reference.random_keep(n, seed=99, stream=0, density=density)
        sigma = math.sqrt(density * (1 - density) / n)
        assert abs(float(keep.float().mean()) - density) < 5 * sigma
    assert keep_threshold(0.0) == 0 and keep_threshold(1.0) == 2**32


def test_streams_and_seeds_are_independent():
    n = 20000
    a = reference.random_keep(n, seed=5, stream=0, density=0.5).float()
    b = reference.random_keep(n, seed=5, stream=1, density=0.5).float()
    c = reference.random_keep(n, seed=6, stream=0, density=0.5).float()
    for other in (b, c):
        corr = float(((a - a.mean()) * (other - other.mean())).mean() / (a.std() * other.std()))
        assert abs(corr) < 5 / math.sqrt(n)


def test_dare_same_seed_same_bytes_other_seed_other_mask():
    xs, base = family(3001, torch.bfloat16)
    kw = dict(weight=[1.0, 1.0, 1.0], density=0.5)
    first = KERNELS["dare_ties"](xs, base, generator=gen(1), **kw)
    again = KERNELS["dare_ties"](xs, base, generator=gen(1), **kw)
    other = KERNELS["dare_ties"](xs, base, generator=gen(2), **kw)
    assert same_bytes(first, again)
    assert not torch.equal(first, other)
