"""`podkv bench batch`: the largest batch that fits a fixed KV memory budget, dense vs PoD (paper Table 2).

Each probe really prefills ``batch`` requests of ``length`` tokens and decodes ``new_tokens`` tokens;
it fits when the bytes held by the cache stay within budget. The search starts at the analytic guess
and then bisects, so it needs a handful of real runs per method; the formula only orders the probes.
The whole process's memory is another budget: :mod:`podkv.bench.batch_rss` (``--rss-budget``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from podkv.bench.common import PeakMemory, new_cache, prefill_decode, token_ids
from podkv.bench.report import md_table, plot_lines
from podkv.cache.memory import cache_bytes, dense_kv_bytes, pod_kv_bytes
from podkv.errors import PodError


@dataclass
class BatchConfig:
    length: int = 2048
    new_tokens: int = 16
    budget_requests: float = 4.5  # KV budget = this many dense requests of length + new_tokens tokens
    budget_mb: float | None = None  # explicit KV budget; overrides budget_requests
    max_batch: int = 64

    def __post_init__(self):
        if self.length < 1 or self.new_tokens < 0 or self.max_batch < 1:
            raise PodError(f"bench batch needs length >= 1, new_tokens >= 0, max_batch >= 1; got "
                           f"{self.length}, {self.new_tokens}, {self.max_batch}")
        if self.budget_mb is None and self.budget_requests <= 0:
            raise PodError(f"bench batch field 'budget_requests' must be > 0, got {self.budget_requests}")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise PodError(f"bench batch field 'budget_mb' must be > 0, got {self.budget_mb}")


def largest_fitting(fits, guess: int, max_batch: int) -> int:
    """Largest b in [0, max_batch] with fits(b), for a monotone ``fits``; probes guess, its neighbour, then bisects."""
    lo, hi = 0, max_batch + 1  # invariant: fits(lo) (or lo == 0), not fits(hi) (or hi past the range)
    probe, first = min(max(guess, 1), max_batch), True
    while hi - lo > 1:
        if fits(probe):
            lo, probe = probe, probe + 1
        else:
            hi, probe = probe, probe - 1
        probe = probe if first else (lo + hi) // 2  # the guess's neighbour first, then bisection
        first = False
    return lo


def run_batch(model, tok, plan, cfg: BatchConfig) -> dict:
    config, dtype = model.config, model.dtype
    held = cfg.length + cfg.new_tokens
    per_request = dense_kv_bytes(config, held, 1, dtype)
    budget = int(cfg.budget_mb * 2**20) if cfg.budget_mb is not None else int(cfg.budget_requests * per_request)
    result = {"budget_bytes": budget, "length": cfg.length,
              "new_tokens": cfg.new_tokens, "probes": [], "methods": {}}
    for method in ("dense", "pod"):
        one = per_request if method == "dense" else pod_kv_bytes(config, plan, held, 1, dtype)
        probes = []

        def fits(b, method=method):
            probe = _probe(model, tok, plan, method, b, cfg, budget)
            probes.append(probe)
            return probe["fits"]

        best = largest_fitting(fits, budget // one, cfg.max_batch)
        result["probes"] += [dict(p, method=method) for p in probes]
        fitting = [p for p in probes if p["fits"] and p["batch"] == best]
        result["methods"][method] = {"max_batch": best, "formula_max_batch": min(cfg.max_batch, budget // one),
                                     "runs": len(probes), "kv_bytes_at_max": fitting[0]["kv_bytes"] if fitting else 0,
                                     "peak_bytes_at_max": fitting[0]["peak_bytes"] if fitting else None}
    dense, pod = result["methods"]["dense"]["max_batch"], result["methods"]["pod"]["max_batch"]
    result["ratio"] = pod / dense if dense else None
    from podkv.models.enable import disable_pod  # startup: transformers

    disable_pod(model)
    return result


def _probe(model, tok, plan, method, batch, cfg, budget) -> dict:
    """One real prefill + decode of ``batch`` requests; stops after prefill once the KV budget is exceeded."""
    ids = token_ids(tok, model.config.vocab_size, batch, cfg.length).to(model.device)
    cache = new_cache(model, method, plan)
    with PeakMemory(model.device) as peak:
        prefill_decode(model, ids, cache, 0)
        over = cache_bytes(cache) > budget
        if not over:
            _decode_more(model, ids, cache, cfg.new_tokens)
    kv = cache_bytes(cache)
    return {"batch": batch, "kv_bytes": kv, "peak_bytes": peak.peak, "fits": kv <= budget,
            "stopped_after_prefill": over}


def _decode_more(model, ids, cache, n):
    nxt = ids[:, -1:]
    with torch.no_grad():
        for _ in range(n):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def batch_markdown(result: dict) -> str:
    rows = [{"method": m, **v, "kv_MB": v["kv_bytes_at_max"] / 2**20,
             "peak_MB": None if v["peak_bytes_at_max"] is None else v["peak_bytes_at_max"] / 2**20}
            for m, v in result["methods"].items()]
    head = (f"Budget {result['budget_bytes'] / 2**20:.1f} MiB of KV; requests of {result['length']} tokens + "
            f"{result['new_tokens']} decoded. PoD/dense max batch = **{_r(result['ratio'])}**.")
    cols = [("method", "method"), ("max_batch", "max batch (measured)"), ("formula_max_batch", "by formula"),
            ("runs", "real runs"), ("kv_MB", "KV MiB at max"), ("peak_MB", "peak process MiB at max")]
    return head + "\n\n" + md_table(rows, cols)


def _r(x):
    return "—" if x is None else f"{x:.2f}×"


def batch_plot(result: dict, path) -> None:
    series = {}
    for m in ("dense", "pod"):
        ps = sorted((p["batch"], p["kv_bytes"] / 2**20) for p in result["probes"] if p["method"] == m)
        series[f"{m} (probes)"] = ([b for b, _ in ps], [k for _, k in ps])
    xs = sorted({p["batch"] for p in result["probes"]})
    series["budget"] = (xs, [result["budget_bytes"] / 2**20] * len(xs))
    plot_lines(path, series, "batch size", "KV held (MiB)", "Max batch at a fixed KV budget")
