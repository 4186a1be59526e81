"""Compiled kernels for batch-1 decode steps (the distant pass, the proximal pass and merge) and for a one-shot
prefill (``pod_prefill.c``), built on first use, with a PyTorch fallback.

Why: a batch-1 decode step of ``smollm2-pod`` scores 3 query rows against each anchor's 4K distant keys and
weighs each member's values with them. As matrix products those are small-M GEMMs, which run at about 10 GB/s
on this CPU where a streaming loop reads 35 (docs/bench.md), so PoD's 0.68 of dense's KV bytes took as long as
dense's all. ``block_decode.c`` reads each key and value once per step in parallel chunks.

The C files are compiled once per machine with the system C compiler (``$CC``, else ``cc``) into
``$PODKV_HOME/native/<hash>/`` (or ``$PODKV_NATIVE_DIR/<hash>/``; the hash covers the source, the flags, the
compiler and the CPU, since the build is ``-march=native``), written atomically. No compiler, a failed build or ``PODKV_NATIVE=0``: the
PyTorch path of :mod:`podkv.attention.block_pass` runs instead (the same arithmetic; tests compare the two),
and a build failure warns once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCES = tuple(Path(__file__).with_name(name) for name in ("block_decode.c", "pod_prefill.c"))
LIBRARY = "podkv_native.so"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC")
CHUNK = 512  # keys per parallel task: a few tasks per pair at 4K, each (rows x 512) scores in L1


def enabled() -> bool:
    """True when the kernel is built (or builds now) and not switched off with ``PODKV_NATIVE=0``."""
    return os.environ.get("PODKV_NATIVE", "1") != "0" and library() is not None


@functools.lru_cache(maxsize=1)
def library():
    """The loaded kernel (ctypes), or None where it cannot be built here."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.system() != "Linux":
        return None
    try:
        so = _built(cc)
        lib = ctypes.CDLL(str(so))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"podkv: the native kernels did not build ({e}); using the PyTorch path", stacklevel=2)
        return None
    i64p, i32p = ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int32)
    lib.podkv_block_decode.argtypes = [ctypes.c_int] * 5 + [i64p, i64p, i64p, i32p, i64p, i64p, i64p, ctypes.c_int,
                                                             ctypes.c_void_p, ctypes.c_int]
    lib.podkv_block_decode.restype = ctypes.c_int
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.podkv_proximal_merge.argtypes = [ctypes.c_int] * 5 + [ptr] * 5 + [i64, i64, ctypes.c_float] + [ptr] * 4
    lib.podkv_proximal_merge.restype = None
    lib.podkv_pod_prefill.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ptr, ptr, ptr, ctypes.c_int]
    lib.podkv_pod_prefill.restype = ctypes.c_int
    lib.podkv_pod_prefill_work.argtypes = [ctypes.c_int] * 5
    lib.podkv_pod_prefill_work.restype = ctypes.c_int64
    return lib


def _built(cc: str) -> Path:
    """The shared object for this source, flags, compiler and CPU, compiled if missing."""
    from podkv.models.default_model import podkv_home  # startup: only when a decode step needs it

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\n".join([*texts, " ".join(FLAGS), version, _cpu()]).encode()).hexdigest()[:16]
    out = Path(os.environ.get("PODKV_NATIVE_DIR") or podkv_home() / "native") / key / LIBRARY
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(so), "-lm"], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else
                                             f"{cc} exited {done.returncode}")
        os.replace(so, out)  # atomic: a concurrent build writes the same bytes
    return out


def _cpu() -> str:
    """The CPU's model and flags (``-march=native`` code must not run on another CPU sharing PODKV_HOME)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def block_decode(pairs, rows: int, D: int, n: int, work_cache: dict | None = None) -> bool:
    """Run the kernel over ``pairs``: (query ptr, key ptr, key row stride, [(value ptr, value row stride,
    out ptr), ...]) per anchor (layer, KV head), every pointer to float32 rows of D (see block_decode.c).
    Returns False when the kernel declines (too many pairs or chunks): the caller computes the step itself."""
    import torch

    lib = library()
    members = [m for p in pairs for m in p[3]]
    max_members = max(len(p[3]) for p in pairs)
    chunk = min(CHUNK, n)
    size = len(pairs) * -(-n // chunk) * (rows * chunk + max_members * rows * D + 2 * rows)
    cache = work_cache if work_cache is not None else {}
    work = cache.get("work")
    if work is None or work.numel() < size:
        work = cache["work"] = torch.empty(size, dtype=torch.float32)
    i64 = ctypes.c_int64
    arr = lambda t, xs: (t * len(xs))(*xs)  # noqa: E731
    rc = lib.podkv_block_decode(
        len(pairs), rows, D, n, chunk, arr(i64, [p[0] for p in pairs]), arr(i64, [p[1] for p in pairs]),
        arr(i64, [p[2] for p in pairs]), arr(ctypes.c_int32, [len(p[3]) for p in pairs]),
        arr(i64, [m[0] for m in members]), arr(i64, [m[1] for m in members]), arr(i64, [m[2] for m in members]),
        max_members, work.data_ptr(), torch.get_num_threads())
    return rc == 0


def proximal_merge(q, runs, heads, n: int, keep, cells, scale: float, work_cache: dict):
    """The proximal pass and merge of one layer's batch-1 decode step (``podkv_proximal_merge``, see
    block_decode.c): q (H, R, D) contiguous float32; ``runs`` a ctypes int64 array of [a, b) pairs (cache rows of
    the held slots, then the step's tokens: n in all); ``heads`` a ctypes int64 array of 7 fields per head (key and
    value pointers and row strides, in float32 elements); ``keep`` (R, n) uint8 contiguous or None; ``cells`` the
    layer's (H, R, D + 2) view of the step's joined distant buffer, or None -> (1, H, R, D) float32.
    Why: as PyTorch it is two copies of the held rows and about twelve small operators a layer (0.3 ms at 1K on
    this CPU), for a few thousand multiply-adds."""
    import torch

    H, R, D = q.shape
    out = torch.empty(1, H, R, D, dtype=torch.float32)
    scratch = work_cache.get("proximal")
    if scratch is None or scratch[0] < n:
        size = max(n, 1024)
        scratch = work_cache["proximal"] = (size, torch.empty(size, dtype=torch.float32),
                                            (ctypes.c_void_p * size)(), (ctypes.c_void_p * size)())
    c = (None, 0, 0) if cells is None else (cells.data_ptr(), cells.stride(0), cells.stride(1))
    library().podkv_proximal_merge(H, R, D, n, len(runs) // 2, runs, heads, q.data_ptr(),
                                   None if keep is None else keep.data_ptr(), *c, scale, out.data_ptr(),
                                   scratch[1].data_ptr(), scratch[2], scratch[3])
    return out


PREFILL_FIELDS = 13  # int64 fields per KV head of podkv_pod_prefill (FIELDS in pod_prefill.c)


def pod_prefill(fields: list[int], H: int, G: int, T: int, D: int, ns: int, nr: int, scale: float):
    """A one-shot prefill of one layer's H KV heads (``podkv_pod_prefill``, see pod_prefill.c): ``fields`` holds
    ``PREFILL_FIELDS`` int64 per head (kind, then query, key and value pointers with their strides, in float32
    elements); ``scale`` the score scale in base 2 -> (1, H * G, T, D) float32, or None where the kernel declines
    (head dim not a multiple of 64, more than 16 query heads per KV head: callers check first).
    Its work memory (transposed key tiles, a buffer per thread) is one float32 tensor per Python thread, kept and
    grown across calls: fresh pages on every call cost more than the kernel saved at 1K."""
    import torch

    if len(fields) != H * PREFILL_FIELDS:
        raise ValueError(f"pod_prefill: {len(fields)} fields for {H} heads, expected {PREFILL_FIELDS} per head")
    lib, threads = library(), torch.get_num_threads()
    need = lib.podkv_pod_prefill_work(H, G, T, D, threads)
    work = getattr(_WORK, "buf", None)
    if work is None or work.numel() < need:
        work = _WORK.buf = torch.empty(need, dtype=torch.float32)
    out = torch.empty(1, H * G, T, D, dtype=torch.float32)
    rc = lib.podkv_pod_prefill(H, G, T, D, ns, nr, scale, (ctypes.c_int64 * len(fields))(*fields), out.data_ptr(),
                               work.data_ptr(), threads)
    return out if rc == 0 else None


_WORK = threading.local()  # pod_prefill's work tensor, per calling thread
