"""Shared pieces of the benchmarks: machine facts, timing statistics, memory probes.

Timing follows gpt-fast: warm-up excluded, CUDA synchronised around timers, and (because the CPU is
shared) repetitions of the compared methods are interleaved and summarised by median and spread.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import statistics
import threading
import time
from datetime import datetime, timezone

import torch

from podkv.plan import SharingPlan
from podkv.provenance import machine, versions
from podkv.texts import text


def machine_info(device: str = "cpu") -> dict:
    """Date, versions, the machine (:mod:`podkv.provenance`) and the load average of this run."""
    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **versions(("torch", "transformers")),
            **machine(device), "device": device}
    with contextlib.suppress(OSError, AttributeError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other users of the CPU make timings noisy
    return info


def stats(xs: list[float]) -> dict:
    """Median and spread (min, max, IQR) of repeated measurements."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "iqr": q[2] - q[0], "n": len(xs),
            "values": xs}


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def rss_bytes() -> int | None:
    try:
        import psutil  # optional: psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak process memory over a ``with`` block, above its start: RSS sampled every ``period`` s on
    CPU (psutil), ``torch.cuda.max_memory_allocated`` on CUDA. ``.peak`` is None if not measurable."""

    def __init__(self, device="cpu", period: float = 0.002):
        self.device, self.period, self.peak = str(device), period, None
        self._stop = threading.Event()

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _malloc_trim()  # hand freed heap pages back, so RSS growth is this block's own allocations
        self._base = rss_bytes()
        self._max = self._base
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            self._stop.wait(self.period)

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        elif self._base is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, rss_bytes()) - self._base
        return False


def _malloc_trim() -> None:
    """glibc keeps freed memory in its heap, where later allocations reuse it without growing RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def new_cache(model, method: str, plan: SharingPlan, **pod_cache_kw):
    """An empty cache for ``method`` ("dense" or "pod"; ``pod_cache_kw`` go to PodCache, e.g. kv_bits=8); switches
    the model's attention to match."""
    from transformers import DynamicCache  # startup: transformers

    from podkv.cache.pod_cache import PodCache  # startup: transformers
    from podkv.models.enable import disable_pod, enable_pod  # startup: transformers

    if method == "dense":
        disable_pod(model)
        return DynamicCache(config=model.config)
    if getattr(model, "pod_runtime", None) is None or model.pod_runtime.plan is not plan:
        disable_pod(model)
        enable_pod(model, plan)
    return PodCache(model.config, plan, **pod_cache_kw)


@torch.no_grad()
def prefill_decode(model, ids: torch.Tensor, cache, new_tokens: int, step_times: list | None = None):
    """Prefill ``ids`` (B, T) into ``cache`` then decode ``new_tokens`` greedy tokens. Only the last
    position's logits are computed (a (B, T, vocab) tensor would dwarf the KV cache)."""
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(new_tokens):
        t, out = timed(lambda: model(nxt, past_key_values=cache, use_cache=True), ids.device)
        if step_times is not None:
            step_times.append(t)
        nxt = out.logits[:, -1:].argmax(-1)
    return cache


def token_ids(tok, vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Prompt ids (B, T): the held-out text (:mod:`podkv.texts`) when a tokenizer is given, else random ids."""
    if tok is None:
        return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids = _text_ids(tok)
    reps = -(-(length * batch) // len(ids))
    ids = ids.repeat(reps)[: length * batch]
    return ids.view(batch, length)


@functools.lru_cache(maxsize=2)
def _text_ids(tok) -> torch.Tensor:
    """Why held-out: `bench skip` scores perplexity on these ids, and an adapted model trained on the plan/train
    split (help topics) would be flattered there."""
    return tok(text("heldout"), return_tensors="pt").input_ids[0]


def shipped_and_dense(threads: int = 2):
    """The shipped ``smollm2-pod`` (PoD on) and a dense copy of the same weights, for the A/B scripts in
    benchmarks/shipped/ that time both in one process -> (pod, dense, tokenizer, plan)."""
    import copy

    from podkv.models.enable import disable_pod  # startup: transformers
    from podkv.models.loading import load_model  # startup: transformers

    torch.set_num_threads(threads)
    pod, tok = load_model("smollm2-pod", progress=False)
    dense = disable_pod(copy.deepcopy(pod))
    return pod, dense, tok, pod.pod_runtime.plan
