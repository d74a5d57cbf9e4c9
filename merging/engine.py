"""Run a plan: read, compute and write overlapped, with a bounded number of bytes in flight.

Readers fetch the next tasks' inputs while the current one computes (torch and pread release the GIL), and one writer
thread streams finished tensors into their shard. The output lives in a temporary folder beside OUT_DIR with a
journal of finished shards; it is renamed into place only when complete, so a killed merge leaves OUT_DIR absent or
untouched, and `resume` picks up from the verified shards.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import fcntl
import hashlib
import logging
import json
import os
import queue
import re
import resource
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from merging.config import MergeConfig, load_config
from merging.checks import all_finite, current_nan_policy
from merging.errors import AlloyError, ConfigError, OutputError
from merging.folders import replace_folder
from merging.guard import check_output_folder
from merging.io import ShardFile, ShardLayout, encode_header, read_tensor
from merging.methods.registry import REGISTRY
from merging.plan import Plan, TensorTask, build_plan

log = logging.getLogger("alloy")

JOURNAL = "alloy_journal.json"
PREFETCH_BYTES = int(os.environ.get("ALLOY_PREFETCH_MB", 256)) * 1024**2  # inputs read ahead of the computing tasks
CHUNK = 1 << 22  # elements per slice for element-wise methods
# methods whose output element i depends on input elements i alone (no norms, thresholds or random streams)
ELEMENTWISE = frozenset({"linear", "task_arithmetic", "nearswap", "passthrough"})


@dataclass
class MergeResult:
    out_dir: Path | None
    n_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    manifest: dict = field(default_factory=dict)
    manifest_sha256: str = ""
    state_dict: dict[str, torch.Tensor] | None = None

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_in + self.bytes_out) / 1e9 / max(self.seconds, 1e-9)

    def summary(self) -> str:
        where = f" -> {self.out_dir}" if self.out_dir else ""
        return (f"merged {self.n_tensors} tensors: {self.bytes_in / 1e9:.2f} GB in, {self.bytes_out / 1e9:.2f} GB out, "
                f"{self.seconds:.1f} s, {self.gb_per_s:.2f} GB/s, peak RSS {self.peak_rss_bytes / 1e9:.2f} GB{where}")


@contextmanager
def compute_threads(n: int | None = None) -> Iterator[None]:
    """torch's intra-op threads for each compute worker (default 1: the workers, one per core, are the
    parallelism); restored afterwards. ALLOY_THREADS overrides. Measured on this 2-core machine under load: one
    intra-op thread ran a linear merge 2.4x faster than two."""
    n = n or int(os.environ.get("ALLOY_THREADS", 0)) or 1
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: nothing to trim
        return None


M_ARENA_MAX = -8  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1


@functools.cache
def one_heap_arena() -> None:
    """Let every thread allocate from one glibc heap arena. By default each new thread that allocates gets an arena
    of its own (up to 8 per core), and a block freed in one arena is not reused by the next tensor allocated in
    another; with one arena the merge threads reuse each other's freed blocks (they allocate a few large blocks per
    tensor, so they hardly contend for its lock). Measured with torch's huge-page allocation on (merging/__init__.py):
    a linear merge of two 1.3 GB models went from 8.9-10.0 to 6.8-8.4 s and 0.89-0.97 to 0.82-0.83 GB peak, ties
    from 26.1-26.4 to 23.6-25.5 s, dare_ties from 25.5-26.3 to 22.3-22.5 s (two runs each). Process-wide and harmless
    to other code; without glibc, nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, 1)
        # Blocks up to 32 MB (a 5632x2048 bf16 tensor is 23 MB) from the heap, not from mmap: glibc maps every block
        # above its threshold (128 KB, raised as blocks are freed) afresh and unmaps it on free, so each of a merge's
        # tensor-sized temporaries was faulted in and zeroed by the kernel again; from the heap, freed blocks are
        # reused and release_free_memory returns what is free after each tensor. Larger blocks (32000-row
        # embeddings) stay mapped: from the heap they fragmented it, ties peaked at 1.77 GB in one run of three.
        # Measured (three 1.3 GB models, merge to tmpfs): dare_ties 1.18 M page faults, 7.6 s of system time and
        # 10.8 s before; 0.70 M, 8.3-9.7 s wall after, peak RSS 1.30 GB; ties 11.1-11.5 s, 1.19 GB.
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        # Setting the mmap threshold freezes glibc's trim threshold at 128 KB: every free at the top of the heap
        # above that gave the pages back, and the next slice's temporaries (a 512K-element float32 accumulator is
        # 2 MB, a huge page) were faulted in and zeroed again, slice after slice. The heap is trimmed once per output
        # tensor instead (release_free_memory). Measured: one thread, a 32000x2048 bf16 linear of two 424 -> 68 ms;
        # in merges of the benchmark family (benchmarks/RESULTS.md) page faults ties 832K -> 473K, dare_ties 467K -> 336K.
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim) after each output tensor. Without it the heap keeps
    its high-water mark of fragments: 1.45-1.65 GB peak instead of 1.23-1.27 GB for ties on three 1.3 GB models
    (trimming only above 1 GB or 0.6 GB of RSS kept most of that). Its cost is the memory faulted in again by the next
    tensors, small with huge pages (merging/__init__.py)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensor_seed(seed: int, name: str) -> int:
    """Each tensor's random stream depends on the seed and its name only, never on execution order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def compute_tensor(task: TensorTask, inputs: list[torch.Tensor], base: torch.Tensor | None, *, seed: int,
                   device: str = "cpu", kernels: bool | None = None, consume: bool = False,
                   side: dict[str, list[torch.Tensor | None]] | None = None) -> torch.Tensor:
    """One output tensor from its inputs: cast to the compute dtype, run the method (or its kernel), cast out.

    consume: empty `inputs` once they are cast, so that (when the caller keeps no other reference) the read buffers are
    freed before the method makes its temporaries. It matters where the compute dtype differs from the stored one
    (linear and slerp compute bf16 inputs in fp32): two bf16 32000x2048 embeddings are 262 MB of read buffers.
    The method is then told it owns its inputs (MethodSpec.inplace: karcher, sce and the sparsifying task-arithmetic
    methods let each go once used)."""
    if kernels is None:
        kernels = device.startswith("cuda")

    compute_dtype = task.compute_dtype
    if compute_dtype is None:  # as mergekit: mixed inputs meet at their promoted dtype
        for t in inputs + ([base] if base is not None else []):
            compute_dtype = t.dtype if compute_dtype is None else torch.promote_types(compute_dtype, t.dtype)

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True).to(compute_dtype)

    xs = [prep(t) for t in inputs]
    b = prep(base) if base is not None else None
    if consume:
        inputs.clear()
        base = None
    if task.align is not None:  # a tokenizer policy: each input's vocabulary rows re-indexed (merging.tokenizer)
        xs, b = task.align.apply(xs, b)
    if task.method == "passthrough":
        scale = task.per_model["scale"][0]
        out = xs[0] * scale if scale is not None else xs[0]
    else:
        spec = REGISTRY[task.method]
        gen = None
        if spec.seeded:
            gen = torch.Generator(device=device)
            gen.manual_seed(tensor_seed(seed, task.name))
        fn = None
        if kernels:
            from merging.kernels import KERNELS  # triton is only imported when a kernel is wanted

            if xs[0].dtype in (torch.float32, torch.bfloat16, torch.float16):  # the kernels have no fp64 path
                fn = KERNELS.get(task.method)
        if fn is None and task.method in ELEMENTWISE and xs[0].numel() > 2 * CHUNK:
            out = _chunked(spec, xs, b, task)
        else:
            per_model = task.per_model
            if task.side:
                per_model = {**per_model, **{p: [None if t is None else t.to(device) for t in ts]
                                             for p, ts in (side or {}).items()}}
            out = spec.call(xs, b, per_model, task.global_params, generator=gen, fn=fn, owned=consume)
    if tuple(out.shape) != task.shape:
        raise AlloyError(f"tensor {task.name!r}: method {task.method} produced shape {tuple(out.shape)}, expected {task.shape}")
    out = out.to(task.dtype).cpu()
    # inputs were checked as they were read; what a finite merge can still lose is range, when written as float16
    # (|x| > 65504 becomes Inf). Other output dtypes hold every finite float32, so they are not scanned again.
    if task.dtype == torch.float16 and current_nan_policy() == "refuse" and not all_finite(out):
        n = out.numel() - int(torch.isfinite(out).sum())
        nan = int(out.isnan().sum())
        what = f"{n} merged value(s) overflow float16 (|x| > 65504)" if not nan else \
            f"{n} merged value(s) are not finite in float16 ({nan} NaN: an overflow, or 0 / 0 in the method)"
        raise ConfigError(f"tensor {task.name!r}: {what}; merge to bfloat16 or float32 (dtype / out_dtype / --dtype)")
    return out


def _chunked(spec, xs: list[torch.Tensor], b: torch.Tensor | None, task: TensorTask) -> torch.Tensor:
    """An element-wise method over slices of the flattened tensors: each element's arithmetic is unchanged (same
    bytes), while the method's float32 temporaries shrink from the whole tensor to one slice — less memory traffic
    and a lower peak RSS."""
    flat = [x.reshape(-1) for x in xs]
    fb = b.reshape(-1) if b is not None else None
    out = None
    for start in range(0, flat[0].numel(), CHUNK):
        sl = slice(start, start + CHUNK)
        piece = spec.call([x[sl] for x in flat], fb[sl] if fb is not None else None, task.per_model, task.global_params)
        # each piece is copied into the output as it comes and freed (its heap block serves the next piece): one
        # output-sized buffer faulted in, where a list of pieces and their torch.cat took two
        if out is None:
            out = piece.new_empty(flat[0].numel())
        out[sl] = piece
    return out.reshape(xs[0].shape)


def _load(plan: Plan, task: TensorTask) -> list:
    xs = [plan.checkpoints[m].read(n) for m, n in task.inputs]
    b = plan.checkpoints[task.base[0]].read(task.base[1]) if task.base else None
    side = {p: [None if e is None else plan.side_files[e[0]].checkpoint.read(e[1]) for e in entries]
            for p, entries in task.side.items()}
    return [xs, b, side]


def _task_bytes(plan: Plan, task: TensorTask) -> int:
    refs = task.inputs + ([task.base] if task.base else [])
    side = [e for entries in task.side.values() for e in entries if e is not None]
    return sum(plan.checkpoints[m].info(n).nbytes for m, n in refs) + \
        sum(plan.side_files[i].checkpoint.info(n).nbytes for i, n in side)


DEVICE_RE = re.compile(r"cpu|cuda(:\d+)?")  # the --device values every command takes


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N (a GPU that is there), refused in one line before anything is read or written."""
    if not DEVICE_RE.fullmatch(device):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AlloyError(f"--device {device}: no CUDA device is available")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AlloyError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")


def compute_workers() -> int:
    """Tensors computed side by side, each on one torch thread: element-wise passes over slices parallelise poorly
    inside an op, while whole tensors in separate threads (torch releases the GIL) keep every core busy.
    ALLOY_COMPUTE_WORKERS overrides."""
    return int(os.environ.get("ALLOY_COMPUTE_WORKERS", 0)) or max(1, os.cpu_count() or 1)


def iter_computed(plan: Plan, tasks: list[TensorTask], *, seed: int, device: str = "cpu",
                  kernels: bool | None = None, workers: int = 2,
                  compute: int | None = None) -> Iterator[tuple[TensorTask, torch.Tensor]]:
    """Yield (task, output) in order: inputs are read ahead within PREFETCH_BYTES and computed by `compute`
    threads (default compute_workers(); one on a GPU) while earlier outputs are consumed."""
    # one stream of kernels on a GPU; Triton's interpreter (kernels on the CPU, in tests) is not thread-safe either
    on_kernels = device.startswith("cuda") if kernels is None else kernels
    one_heap_arena()  # before the reader and compute threads exist (glibc gives each new thread an arena)
    compute = compute or (1 if on_kernels or device.startswith("cuda") else compute_workers())
    pending: deque[tuple[TensorTask, Future, int]] = deque()
    in_flight = 0
    nxt = 0

    def job(task: TensorTask, read: Future) -> torch.Tensor:
        loaded = read.result()  # [inputs, base, side]: popped, so that compute_tensor holds the only references
        return compute_tensor(task, loaded.pop(0), loaded.pop(0), seed=seed, device=device, kernels=kernels,
                              consume=True, side=loaded.pop(0))  # fmt: skip

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="alloy-read") as readers, \
            ThreadPoolExecutor(max_workers=compute, thread_name_prefix="alloy-compute",
                               initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as computers:
        try:
            while nxt < len(tasks) or pending:
                while nxt < len(tasks) and (not pending or in_flight + _task_bytes(plan, tasks[nxt]) <= PREFETCH_BYTES):
                    t = tasks[nxt]
                    size = _task_bytes(plan, t)
                    read = readers.submit(_load, plan, t)
                    # each job runs in a copy of this context: the tie rule and NaN policy are context variables
                    pending.append((t, computers.submit(contextvars.copy_context().run, job, t, read), size))
                    in_flight += size
                    nxt += 1
                task, fut, size = pending.popleft()
                out = fut.result()
                in_flight -= size
                yield task, out
        finally:  # an error or an abandoned generator: queued work is dropped, running jobs finish
            for _, fut, _ in pending:
                fut.cancel()


class _Writer:
    """One thread that streams tensors into shard files; errors surface on the next put or at close."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="alloy-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args = item
            if self.error is None:
                try:
                    fn(*args)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = e

    def put(self, fn: Callable, *args: Any) -> None:
        if self.error:
            raise self.error
        self.q.put((fn, args))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def _layout_key(layout: ShardLayout, plan: Plan, seed: int) -> str:
    from merging.tokenizer import TOKENIZER_FILES  # the files that decide a model's vocabulary

    h = hashlib.sha256()
    h.update(plan.config.to_yaml().encode())
    h.update(str(seed).encode())
    for ck in plan.checkpoints:  # a model re-fetched into the same folder must not reuse shards of the old one
        side = [f for f in (ck.path / n for n in TOKENIZER_FILES) if f.is_file()]
        for f in ck.files() + side:  # tokenizer files decide the embedding rows under a tokenizer policy
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for sf in plan.side_files:  # statistics a method reads (RegMean's Grams) decide the output as much
        st = sf.path.stat()
        h.update(f"{sf.parameter}|{sf.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for name, shard in zip(layout.file_names, layout.shards):
        h.update(name.encode())
        h.update(encode_header(shard, {"format": "pt"}))
    return h.hexdigest()


def _verify_shard(path: Path, expect: dict[str, str]) -> bool:
    from merging.io import read_header

    try:
        infos, _ = read_header(path)
    except AlloyError:
        return False
    if set(infos) != set(expect):
        return False
    return all(hashlib.sha256(read_tensor(i).view(torch.uint8).reshape(-1).numpy()).hexdigest() == expect[n]
               for n, i in infos.items())


def run_merge(config: MergeConfig | str | Path, out_dir: str | Path, *, seed: int | None = None, device: str = "cpu",
              shard_size: int = 2 * 1024**3, dtype: str | None = None, resume: bool = False, overwrite: bool = False,
              progress: bool = True, model_paths: dict[str, Path] | None = None, allow_pickle: bool = False,
              extra_card: dict | None = None, tie_break: str = "index", kernels: bool | None = None,
              nan_policy: str | None = None, lora_cache: str | Path | None = None,
              lora_dtype: str | None = None, allow_crimes: bool = False, copy_tokenizer: bool = True,
              model_card: bool = True, hub_cache: str | Path | None = None,
              search_paths: list[Path] | None = None) -> MergeResult:
    """Merge to a Hugging Face checkpoint folder, atomically. See docs/design.md.

    tie_break: which of several elements tied at a magnitude threshold are kept — "index" (the first by position:
    a function of the values alone) or "torch" (whatever torch's sort picks, as mergekit does: bit-identical to it
    on the same torch build, and slower).
    kernels: use the Triton kernels (default: on CUDA only; on CPU they need TRITON_INTERPRET=1, for tests).
    lora_cache: where `base+adapter` models are merged once and reused (default: merging.plan.default_lora_cache()).
    lora_dtype: the dtype they are merged in (mergekit's --lora-merge-dtype; default: the base's).
    allow_crimes, copy_tokenizer, model_card, hub_cache: mergekit's --allow-crimes (models of different
    architectures), --no-copy-tokenizer, --no-write-model-card and --transformers-cache (where hub ids download).
    search_paths: folders relative model paths are looked up in, after the config file's (and the working folder).
    """
    from merging.hub import hub_cache as hub_folder
    from merging.primitives import tie_break as tie_rule

    with tie_rule(tie_break), compute_threads(), hub_folder(hub_cache):
        return _run_merge(config, out_dir, seed=seed, device=device, shard_size=shard_size, dtype=dtype,
                          resume=resume, overwrite=overwrite, progress=progress, model_paths=model_paths,
                          allow_pickle=allow_pickle, extra_card=extra_card, kernels=kernels, nan_policy=nan_policy,
                          lora_cache=lora_cache, lora_dtype=lora_dtype, allow_crimes=allow_crimes,
                          copy_tokenizer=copy_tokenizer, model_card=model_card, search_paths=search_paths)


def _run_merge(config, out_dir, *, seed, device, shard_size, dtype, resume, overwrite, progress, model_paths,
               allow_pickle, extra_card, kernels, nan_policy, lora_cache, lora_dtype, allow_crimes, copy_tokenizer,
               model_card, search_paths) -> MergeResult:
    from merging.output import check_tokenizer_policy, finalize_output

    t0 = time.perf_counter()
    search, inputs = [], []
    if not isinstance(config, MergeConfig):
        search.append(Path(config).resolve().parent)
        inputs.append(Path(config))
        config = load_config(config)
    search += list(search_paths or [])
    seed = 0 if seed is None else int(seed)
    check_device(device)
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise OutputError(f"output folder {out_dir} already exists (use --overwrite to replace it)")
    plan = build_plan(config, search_paths=search, dtype=dtype, model_paths=model_paths, allow_pickle=allow_pickle,
                      nan_policy=nan_policy, lora_cache=lora_cache, lora_dtype=lora_dtype, allow_crimes=allow_crimes)
    check_tokenizer_policy(plan)
    # --overwrite replaces out_dir whole: never when it is, holds or lies in a model, the config or a side file
    check_output_folder(out_dir, inputs + [ck.path for ck in plan.checkpoints] + [sf.path for sf in plan.side_files]
                        + [p for pair in plan.adapters.values() for p in pair]
                        + ([plan.vocab.donor] if plan.vocab is not None else []))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.alloy-lock"
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OutputError(f"another merge is writing {out_dir} right now (lock {lock_path})") from None
    try:
        result = _merge_locked(plan, out_dir, seed=seed, device=device, shard_size=shard_size, resume=resume,
                               overwrite=overwrite, progress=progress, extra_card=extra_card, t0=t0,
                               finalize=functools.partial(finalize_output, tokenizer=copy_tokenizer, card=model_card),
                               kernels=kernels)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        lock_path.unlink(missing_ok=True)
    return result


def partial_folder(out_dir: Path) -> Path:
    """Where a merge into out_dir is built, and kept with its journal when interrupted (for --resume)."""
    return out_dir.parent / f".{out_dir.name}.alloy-partial"


def _merge_locked(plan: Plan, out_dir: Path, *, seed: int, device: str, shard_size: int, resume: bool,
                  overwrite: bool, progress: bool, extra_card: dict | None, t0: float, finalize,
                  kernels: bool | None) -> MergeResult:
    from tqdm import tqdm

    tmp = partial_folder(out_dir)
    layout = ShardLayout.plan([(t.name, t.dtype, t.shape) for t in plan.tasks], shard_size)
    key = _layout_key(layout, plan, seed)
    journal: dict = {"key": key, "shards": {}}
    if tmp.exists():
        old = _read_journal(tmp)
        if resume and old.get("key") == key:
            for fname, tensor_sha in old.get("shards", {}).items():
                if _verify_shard(tmp / fname, tensor_sha):
                    journal["shards"][fname] = tensor_sha
        else:
            if resume:
                log.warning(f"alloy: --resume: {tmp} holds a merge of another config, inputs, seed or shard size; "
                            "starting over")
            shutil.rmtree(tmp)
    elif resume:
        log.warning(f"alloy: --resume: no interrupted merge of {out_dir} to continue; starting it")
    tmp.mkdir(parents=True, exist_ok=True)
    _write_journal(tmp, journal)

    by_name = {t.name: t for t in plan.tasks}
    todo_shards = [i for i, f in enumerate(layout.file_names) if f not in journal["shards"]]
    todo = [by_name[n] for i in todo_shards for n, _, _ in layout.shards[i]]
    tensor_sha: dict[str, str] = {n: s for shas in journal["shards"].values() for n, s in shas.items()}
    bytes_out = layout.total_bytes()
    log.info(f"alloy: {plan.config.merge_method}: {len(todo)} of {len(plan.tasks)} tensors to merge from "
             f"{len(plan.checkpoints)} models into {len(todo_shards)} of {len(layout.file_names)} shards "
             f"({bytes_out / 1e9:.2f} GB) in {tmp}")
    try:
        writer = _Writer()
        shard_of = {n: i for i, s in enumerate(layout.shards) for n, _, _ in s}
        files: dict[int, ShardFile] = {}

        slow = float(os.environ.get("ALLOY_TEST_SLOW_WRITE", "0"))  # lets tests kill a merge mid-way
        hold = os.environ.get("ALLOY_TEST_HOLD_WRITE")  # ...or hold it while that file exists

        def write(task_name: str, tensor: torch.Tensor) -> None:
            if slow:
                time.sleep(slow)
            while hold and os.path.exists(hold):
                time.sleep(0.05)
            i = shard_of[task_name]
            if i not in files:
                files[i] = ShardFile(tmp / layout.file_names[i], layout.shards[i], {"format": "pt"})
            sf = files[i]
            sf.write(task_name, tensor)
            log.debug("alloy: %s %s %s", task_name, tuple(tensor.shape), tensor.dtype)
            if sf.complete:
                sf.close()
                log.info(f"alloy: wrote {layout.file_names[i]}")
                tensor_sha.update(sf.tensor_sha)
                journal["shards"][layout.file_names[i]] = sf.tensor_sha
                _write_journal(tmp, journal)
                del files[i]

        bar = tqdm(total=len(plan.tasks), initial=len(plan.tasks) - len(todo), unit="tensor", disable=not progress,
                   desc="merging", dynamic_ncols=True)
        try:
            for task, out in iter_computed(plan, todo, seed=seed, device=device, kernels=kernels):
                writer.put(write, task.name, out)
                bar.update(1)
                release_free_memory()
        finally:
            bar.close()
            writer.close()
        seconds = time.perf_counter() - t0
        from merging.primitives import current_tie_break

        run_info = {"device": device, "kernels": bool(device.startswith("cuda") if kernels is None else kernels),
                    "tie_break": current_tie_break()}
        manifest = finalize(plan, tmp, layout, tensor_sha, seed=seed, extra_card=extra_card, run_info=run_info)
        (tmp / JOURNAL).unlink()
        _fsync_dir(tmp)
        replace_folder(tmp, out_dir, aside="alloy-old")  # an existing out_dir only with overwrite=True
        _fsync_dir(out_dir.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing {out_dir} failed: {e.strerror or e}; nothing was left behind") from None
    except AlloyError:  # a bad input met mid-merge (NaN, say): nothing of it is worth resuming
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest_sha = hashlib.sha256((out_dir / "alloy_manifest.json").read_bytes()).hexdigest()
    return MergeResult(out_dir, len(plan.tasks), plan.bytes_in, bytes_out, time.perf_counter() - t0, peak_rss(),
                       manifest, manifest_sha)


def merge_to_state_dict(config: MergeConfig | str | Path, *, seed: int | None = None, device: str = "cpu",
                        dtype: str | None = None, model_paths: dict[str, Path] | None = None,
                        tie_break: str = "index", nan_policy: str | None = None,
                        lora_cache: str | Path | None = None, lora_dtype: str | None = None) -> MergeResult:
    """The same merge held in memory (for search loops that evaluate and discard)."""
    from merging.primitives import tie_break as tie_rule

    with tie_rule(tie_break), compute_threads():
        return _merge_to_state_dict(config, seed=seed, device=device, dtype=dtype, model_paths=model_paths,
                                    nan_policy=nan_policy, lora_cache=lora_cache, lora_dtype=lora_dtype)


def _merge_to_state_dict(config, *, seed, device, dtype, model_paths, nan_policy, lora_cache,
                         lora_dtype) -> MergeResult:
    t0 = time.perf_counter()
    search = []
    if not isinstance(config, MergeConfig):
        search.append(Path(config).resolve().parent)
        config = load_config(config)
    check_device(device)
    plan = build_plan(config, search_paths=search, dtype=dtype, model_paths=model_paths, nan_policy=nan_policy,
                      lora_cache=lora_cache, lora_dtype=lora_dtype)
    sd = {task.name: out for task, out in iter_computed(plan, plan.tasks, seed=0 if seed is None else seed, device=device)}
    return MergeResult(None, len(sd), plan.bytes_in, sum(t.numel() * t.element_size() for t in sd.values()),
                       time.perf_counter() - t0, peak_rss(), state_dict=sd)


def _read_journal(tmp: Path) -> dict:
    try:
        return json.loads((tmp / JOURNAL).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_journal(tmp: Path, journal: dict) -> None:
    part = tmp / (JOURNAL + ".tmp")
    with open(part, "w") as f:
        json.dump(journal, f)
        f.flush()
        os.fsync(f.fileno())
    part.replace(tmp / JOURNAL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
