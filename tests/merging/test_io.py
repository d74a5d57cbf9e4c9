"""merging.io's reader: tensors over private mappings of their bytes, released with the tensor; small ones read."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import io as IO
from merging.errors import InputError


def mapped_ranges(path: Path) -> int:
    with open("/proc/self/maps") as f:  # Linux: the mappings this process holds
        return sum(str(path) in line for line in f)


@pytest.fixture
def shard(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big.bf16": torch.randn(1100, 700, generator=g).bfloat16(),  # 1.5 MB: mapped
        "big.f32": torch.randn(400, 700, generator=g),  # 1.1 MB: mapped
        "odd": torch.randn(3, generator=g).half(),  # small: read; shifts the next tensor off a page boundary
        "big.after_odd": torch.randn(600, 1000, generator=g).half(),
        "small": torch.randn(10, generator=g),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_reads_the_same_tensors_as_safetensors(shard):
    infos, _ = IO.read_header(shard)
    expected = load_file(str(shard))
    for name, info in infos.items():
        t = IO.read_tensor(info)
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name
    assert any(i.nbytes >= IO.MAP_MIN_BYTES and i.start % 4096 for i in infos.values())  # an unaligned mapped one


def test_mapping_lives_and_dies_with_the_tensor(shard):
    infos, _ = IO.read_header(shard)
    before = mapped_ranges(shard)
    t = IO.read_tensor(infos["big.bf16"])
    view = t[5:10]
    del t
    gc.collect()
    assert mapped_ranges(shard) == before + 1  # a view keeps the mapping
    assert torch.equal(view, load_file(str(shard))["big.bf16"][5:10])
    del view
    gc.collect()
    assert mapped_ranges(shard) == before
    IO.read_tensor(infos["small"])
    assert mapped_ranges(shard) == before  # small tensors are read, not mapped


def test_writes_to_a_mapped_tensor_stay_private(shard):
    infos, _ = IO.read_header(shard)
    data = shard.read_bytes()
    t = IO.read_tensor(infos["big.after_odd"])
    t.mul_(0).add_(7)  # an in-place op, as a merge method may do on its inputs
    assert bool((t == 7).all())
    assert shard.read_bytes() == data
    assert not torch.equal(IO.read_tensor(infos["big.after_odd"]), t)


def test_truncated_file_is_a_clear_error_not_a_crash(shard, tmp_path):
    infos, _ = IO.read_header(shard)
    info = infos["big.bf16"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(shard.read_bytes()[:info.end - 100])
    with pytest.raises(InputError, match="truncated"):
        IO.read_tensor(IO.TensorInfo(info.name, cut, info.dtype, info.shape, info.start, info.end))


def test_shard_file_writes_an_empty_tensor(tmp_path):
    from safetensors.torch import load_file

    from merging.io import ShardFile

    # an empty slice of an SVD's factors has stride 0 in its last dimension, which contiguous() keeps
    empty = torch.ones(0)[:, None] * torch.linalg.svd(torch.randn(6, 4), full_matrices=False)[2][:0]
    assert empty.stride()[-1] == 0
    tensors = {"empty": empty, "x": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    shard = ShardFile(tmp_path / "s.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], {})
    for n, t in tensors.items():
        shard.write(n, t)
    shard.close()
    back = load_file(tmp_path / "s.safetensors")
    assert back["empty"].shape == (0, 4) and torch.equal(back["x"], tensors["x"])
