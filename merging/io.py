"""Safetensors in and out, a tensor at a time.

Reading maps each tensor's own byte range (private, copy-on-write) and lets it go with the tensor: the page cache's
pages are used in place, neither copied nor preceded by a zeroed buffer, and the resident set stays the tensors in
flight (a whole-file mapping would count every touched page, >2 GB for a merge of two 1 GB models). Reading three
1.3 GB models from a warm cache here: 0.06 s of system time mapped, 0.7-1.1 s with positioned reads into fresh
buffers, which the kernel must zero before the copy. Small tensors are still read (a mapping costs more than the copy).
The cost of mapping: an input truncated by another process while its tensor is in flight ends the merge with SIGBUS
instead of an error (a file already short of its header's extent is caught before mapping).
Writing lays out every shard up front (the plan knows every output shape), writes the header first and
then streams tensor bytes in order, so a shard is never held in memory either.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merging.checks import check_finite, check_nan_policy
from merging.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# torch's names for the floating dtypes, as config.json's dtype / torch_dtype spell them
DTYPE_NAME = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own bound


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors header; every inconsistency is an InputError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n + 8 > size:
                raise InputError(f"{path}: corrupt safetensors header (header length {n} for a file of {size} bytes)")
            blob = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: corrupt safetensors header (invalid JSON: {e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if any(d < 0 for d in shape):
            raise InputError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        numel = 1
        for d in shape:
            numel *= d
        if not (0 <= begin <= end <= data_len) or end - begin != numel * dtype_size(dtype):
            raise InputError(
                f"{path}: tensor {name!r} has offsets [{begin}, {end}) inconsistent with shape {list(shape)} "
                f"{entry['dtype']} and a data section of {data_len} bytes (truncated or corrupt file)"
            )
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, data_start + end)
    return infos, {str(k): str(v) for k, v in metadata.items()}


MAP_MIN_BYTES = 1 << 20
_MADV_POPULATE_READ = 22  # Linux 5.14+: map the range's cached pages now, reading any that are not, in this thread


def _map_tensor(info: TensorInfo) -> torch.Tensor | None:
    """The tensor over a private mapping of its bytes (unmapped when the tensor is freed), or None where the file
    cannot be mapped or is shorter than the header says (the positioned read then reports it)."""
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < info.end:
            return None
        mm = mmap.mmap(fd, info.end - start, offset=start, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    try:
        # fault the pages in here, in the reading thread, instead of one by one in the thread that computes on them
        mm.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError, AttributeError):
        pass
    # frombuffer keeps `mm` alive for as long as the tensor's storage; a write (an in-place op) copies the page
    return torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start - start)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    if info.nbytes >= MAP_MIN_BYTES and (mapped := _map_tensor(info)) is not None:
        return mapped.view(info.dtype).reshape(info.shape)
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        fd = os.open(info.file, os.O_RDONLY)
        try:
            view = memoryview(buf.numpy())
            got = 0
            while got < info.nbytes:
                k = os.preadv(fd, [view[got:]], info.start + got)
                if k == 0:
                    raise InputError(f"{info.file}: tensor {info.name!r} is truncated")
                got += k
        finally:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


class Checkpoint:
    """A Hugging Face model folder's safetensors weights, read lazily."""

    def __init__(self, path: str | Path, *, allow_pickle: bool = False, nan_policy: str | None = None):
        """nan_policy: None reads tensors as they are; "refuse" or "warn" checks each tensor read for NaN/Inf
        (merging.checks.check_finite) and `nonfinite` lists the tensors that were let through."""
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"model path {self.path} does not exist")
        self.allow_pickle = allow_pickle
        self.nan_policy = None if nan_policy is None else check_nan_policy(nan_policy)
        self.nonfinite: list[str] = []
        self._pickled: dict[str, torch.Tensor] = {}
        files = self._weight_files(allow_pickle)
        self.tensors: dict[str, TensorInfo] = {}
        if files and files[0].suffix in (".bin", ".pt"):
            self._load_pickles(files)
            return
        for file in files:
            infos, _ = read_header(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise InputError(f"{self.path}: tensor {name!r} appears in two shards")
                self.tensors[name] = info

    def _weight_files(self, allow_pickle: bool) -> list[Path]:
        p = self.path
        if p.is_file():
            if p.suffix != ".safetensors":
                raise InputError(f"{p}: not a safetensors file")
            return [p]
        index = p / "model.safetensors.index.json"
        if index.exists():
            index = model_file(p, index.name)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise InputError(f"{index}: invalid index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InputError(f"{index}: invalid index (weight_map must map tensor names to shard file names)")
            files = []
            for n in sorted(set(weight_map.values())):
                f = model_file(p, n, what=f"{index.name}: shard")
                if f is None:
                    raise InputError(f"{index}: shard {n} is missing")
                files.append(f)
            return files
        single = sorted(p.glob("*.safetensors"))
        if single:
            return [model_file(p, f.name) for f in single]
        pickles = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt"))
        if pickles:
            if allow_pickle:
                return [model_file(p, f.name) for f in pickles]
            raise InputError(f"{p}: has no safetensors weights, only {pickles[0].name} (pickle checkpoints can run "
                             "code and are refused; pass --allow-pickle to load them with weights_only=True)")
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            raise InputError(f"{p}: has no safetensors weights, only {ggufs[0].name} (convert it first: "
                             f"alloy import-gguf {ggufs[0]} OUT_DIR)")
        raise InputError(f"{p}: has no safetensors weights (expected model.safetensors, or shards listed in "
                         "model.safetensors.index.json)")

    def _load_pickles(self, files: list[Path]) -> None:
        """Pickle checkpoints, only when asked: torch's weights_only unpickler refuses anything but tensors."""
        for f in files:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise InputError(f"{f}: refused by the weights-only unpickler ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise InputError(f"{f}: not a state dict of tensors")
            for name, t in sd.items():
                self._pickled[name] = t
                self.tensors[name] = TensorInfo(name, f, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise InputError(f"{self.path}: tensor {name!r} is missing") from None

    def read(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            t = self._pickled[name].contiguous().clone()
        else:
            t = read_tensor(self.info(name))
        if self.nan_policy is not None and not check_finite(t, model=str(self.path), tensor=name,
                                                            policy=self.nan_policy):
            self.nonfinite.append(name)
        return t

    def files(self) -> list[Path]:
        return sorted({i.file for i in self.tensors.values()})

    @property
    def config(self) -> dict:
        f = model_file(self.path, "config.json") if self.path.is_dir() else None
        if f is None:
            return {}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{f}: invalid JSON ({e})") from None


def input_roots(folder: Path) -> list[Path]:
    """Where a model folder's files may resolve: inside the folder itself or, for a Hugging Face cache snapshot
    (models--org--name/snapshots/<commit>/, whose files are links to ../../blobs/), that repository's blobs/."""
    real = Path(folder).resolve()
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def model_file(folder: Path, name: str, *, what: str = "file") -> Path | None:
    """folder/name if it exists, None if not; InputError when the name or a symlink leads outside the model's
    input tree (`..`, an absolute path, a link to elsewhere) or to something that is not a regular file."""
    folder = Path(folder)
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise InputError(f"{folder}: {what} {name!r} is not a plain name inside the model folder; refused")
    target = folder / name
    if not target.exists() and not target.is_symlink():
        return None
    real = target.resolve()
    if not any(real == r or r in real.parents for r in input_roots(folder)):
        how = "a symlink" if target.is_symlink() else "a path"
        raise InputError(f"{folder}: {what} {name!r} is {how} to {real}, outside the model folder; refused "
                         "(copy the file into the folder, or point the config at the folder that holds it)")
    if not real.is_file():
        raise InputError(f"{folder}: {what} {name!r} is not a regular file")
    return target


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:  # uncached; see merging.hashing
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardLayout:
    """Which output tensor goes to which shard file, at what offset: fixed before anything is computed."""

    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]]
    file_names: list[str] = field(default_factory=list)

    @classmethod
    def plan(cls, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], shard_size: int) -> "ShardLayout":
        shards: list[list] = [[]]
        used = 0
        for name, dtype, shape in tensors:
            n = dtype_size(dtype)
            for d in shape:
                n *= d
            if shards[-1] and used + n > shard_size:
                shards.append([])
                used = 0
            shards[-1].append((name, dtype, shape))
            used += n
        layout = cls(shards)
        k = len(shards)
        layout.file_names = (
            ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        )
        return layout

    def weight_map(self) -> dict[str, str]:
        return {name: self.file_names[i] for i, s in enumerate(self.shards) for name, _, _ in s}

    def total_bytes(self) -> int:
        total = 0
        for s in self.shards:
            for _, dtype, shape in s:
                n = dtype_size(dtype)
                for d in shape:
                    n *= d
                total += n
        return total


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        n = dtype_size(dtype)
        for d in shape:
            n *= d
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class ShardFile:
    """One output shard written front to back: header, then each tensor's bytes in layout order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.path = path
        self.expected = [e[0] for e in entries]
        self.shapes = {e[0]: (e[1], e[2]) for e in entries}
        self.pos = 0
        self.f = open(path, "wb")
        head = encode_header(entries, metadata)
        self.f.write(head)
        self.written = len(head)
        # each tensor is hashed once (the manifest's per-tensor sha256, which resume verifies); a whole-file digest
        # would hash every byte a second time (sha256 runs at 0.3-0.7 GB/s here)
        self.tensor_sha: dict[str, str] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.expected[self.pos] != name:
            raise RuntimeError(f"shard {self.path.name}: expected {self.expected[self.pos]}, got {name}")
        dtype, shape = self.shapes[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"tensor {name}: planned {dtype} {shape}, computed {tensor.dtype} {tuple(tensor.shape)}")
        flat = tensor.detach().contiguous().cpu().reshape(-1)  # (an empty tensor's strides refuse a byte view)
        data = memoryview(flat.view(torch.uint8).numpy())
        self.f.write(data)
        if hasattr(os, "posix_fadvise"):
            # start the disk writing this tensor now (Linux begins writeback of the dirty range), so the fsync at
            # close waits for the last tensors only instead of the whole shard
            self.f.flush()
            os.posix_fadvise(self.f.fileno(), self.written, len(data), os.POSIX_FADV_DONTNEED)
        self.written += len(data)
        self.tensor_sha[name] = hashlib.sha256(data).hexdigest()
        self.pos += 1

    @property
    def complete(self) -> bool:
        return self.pos == len(self.expected)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
