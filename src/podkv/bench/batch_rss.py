"""`podkv bench batch --rss-budget GIB`: the largest batch whose whole process stays under a memory budget.

A server runs out of *process* memory, not of KV bytes: weights, the prefill's activations and the
allocator's slack come on top of the cache, so PoD's KV saving buys fewer extra requests than the
formula says. Here every try is a fresh child process (``python -m podkv.bench.batch_rss``) that
loads the model, prefills ``batch`` requests of ``length`` tokens, decodes ``new_tokens`` tokens and
reports its own peak RSS (``getrusage`` ``ru_maxrss``, the kernel's high-water mark: nothing sampled,
nothing missed). A try fits when that peak is within the budget; the search (:func:`largest_fitting`)
starts at the batch two measured points extrapolate to, then bisects.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from podkv.bench.batch import largest_fitting
from podkv.bench.common import new_cache, prefill_decode, token_ids
from podkv.bench.report import md_table, plot_lines
from podkv.cache.memory import cache_bytes, dense_kv_bytes, pod_kv_bytes
from podkv.errors import PodError
from podkv.models import loading
from podkv.plan import SharingPlan

GIB = 2**30
METHODS = ("dense", "pod")


@dataclass
class RssBatchConfig:
    rss_budget_gib: float
    length: int = 512
    new_tokens: int = 4
    max_batch: int = 64
    model: str | None = None  # what each child loads: a name or path for `podkv.load_model`
    threads: int | None = None
    timeout_s: float = 900  # per try

    def __post_init__(self):
        if not self.rss_budget_gib > 0:
            raise PodError(f"bench batch field 'rss_budget' must be > 0 GiB, got {self.rss_budget_gib}")
        if self.length < 1 or self.new_tokens < 0 or self.max_batch < 1:
            raise PodError(f"bench batch needs length >= 1, new_tokens >= 0, max_batch >= 1; got "
                           f"{self.length}, {self.new_tokens}, {self.max_batch}")


def run_batch_rss(model, tok, plan, cfg: RssBatchConfig) -> dict:
    """Largest batch under ``cfg.rss_budget_gib`` for dense and PoD, each try measured in its own process."""
    budget = int(cfg.rss_budget_gib * GIB)
    held = cfg.length + cfg.new_tokens
    per_request = {"dense": dense_kv_bytes(model.config, held, 1, model.dtype),
                   "pod": pod_kv_bytes(model.config, plan, held, 1, model.dtype)}
    result = {"rss_budget_bytes": budget, "length": cfg.length, "new_tokens": cfg.new_tokens, "probes": [],
              "methods": {}, "kv_bytes_per_request": per_request}
    with tempfile.TemporaryDirectory(prefix="podkv-rss-") as tmp:
        plan_path = plan.save(Path(tmp) / "plan.json")
        for method in METHODS:
            tries: dict[int, dict] = {}

            def measured(b, method=method):
                if b not in tries:
                    tries[b] = measure(cfg, plan_path, method, b)
                return tries[b]

            guess = _guess(measured, budget, per_request[method])
            best = largest_fitting(lambda b: _fits(measured(b), budget), guess, cfg.max_batch)
            result["probes"] += [dict(p, method=method) for _, p in sorted(tries.items())]
            at = tries.get(best, {})
            result["methods"][method] = {"max_batch": best, "runs": len(tries), "peak_rss_at_max": at.get("peak_rss"),
                                         "kv_bytes_at_max": at.get("kv_bytes"), "loaded_rss": tries[1]["loaded_rss"]}
    dense, pod = (result["methods"][m]["max_batch"] for m in METHODS)
    result["ratio"] = pod / dense if dense else None
    result["kv_ratio"] = per_request["dense"] / per_request["pod"]  # what the KV bytes alone would give
    return result


def _fits(probe: dict, budget: int) -> bool:
    return probe["peak_rss"] is not None and probe["peak_rss"] <= budget


def _guess(measured, budget: int, kv_per_request: int) -> int:
    """The batch where the line through the peaks at batch 1 and 2 meets the budget (at least 1). A request
    costs at least its KV bytes: that bounds the slope when batch 2 happens to peak no higher than batch 1."""
    if not _fits(measured(1), budget) or not _fits(measured(2), budget):
        return 1
    one = measured(1)["peak_rss"]
    step = max(measured(2)["peak_rss"] - one, kv_per_request, 1)
    return 1 + int((budget - one) // step)


def measure(cfg: RssBatchConfig, plan_path: Path, method: str, batch: int) -> dict:
    """One try in a fresh process: its peak RSS, RSS after loading the model, and the KV bytes it held.

    A child whose high-water mark passes the budget is stopped there (it cannot fit; a batch far above the
    boundary would otherwise spend minutes and gigabytes to say so) and reported with ``over_budget``.
    """
    spec = {"model": cfg.model, "plan": str(plan_path), "method": method, "batch": batch, "length": cfg.length,
            "new_tokens": cfg.new_tokens, "threads": cfg.threads}
    budget, deadline = int(cfg.rss_budget_gib * GIB), time.monotonic() + cfg.timeout_s
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # files: a full pipe would block
        proc = subprocess.Popen([sys.executable, "-m", "podkv.bench.batch_rss", json.dumps(spec)], stdout=out,
                                stderr=err, text=True)
        while proc.poll() is None:
            high = _high_water(proc.pid)
            if high is not None and high > budget:
                proc.kill()
                proc.wait()
                return {"batch": batch, "peak_rss": high, "loaded_rss": None, "kv_bytes": None, "over_budget": True}
            if time.monotonic() > deadline:  # counted as not fitting, and said so in the results
                proc.kill()
                proc.wait()
                return {"batch": batch, "peak_rss": None, "loaded_rss": None, "kv_bytes": None,
                        "error": f"ran past {cfg.timeout_s:.0f} s (high water {high} bytes)"}
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:  # killed or out of memory: this batch does not fit
            tail = (err.read().strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
            return {"batch": batch, "peak_rss": None, "loaded_rss": None, "kv_bytes": None, "error": tail}
        return {"batch": batch, **json.loads(out.read().strip().splitlines()[-1])}


def _high_water(pid: int) -> int | None:
    """Peak RSS so far of process ``pid`` in bytes (Linux ``VmHWM``, what ``ru_maxrss`` reports), else None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            line = next((ln for ln in fh if ln.startswith("VmHWM:")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024


def _child(spec: dict) -> dict:
    """Runs in the child process: load, prefill + decode, report. Prompts are random ids (memory does not
    depend on the text, and the child then needs no tokenizer work)."""
    import resource  # optional: resource (Unix only)

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit

    model, _ = loading.load_model(spec["model"], progress=False)
    loaded = peak()
    ids = token_ids(None, model.config.vocab_size, spec["batch"], spec["length"]).to(model.device)  # (B, T)
    cache = new_cache(model, spec["method"], SharingPlan.load(spec["plan"]))
    prefill_decode(model, ids, cache, spec["new_tokens"])
    return {"peak_rss": peak(), "loaded_rss": loaded, "kv_bytes": cache_bytes(cache)}


def batch_rss_markdown(result: dict) -> str:
    rows = [{"method": m, **v, "peak_MiB": _mib(v["peak_rss_at_max"]), "loaded_MiB": _mib(v["loaded_rss"]),
             "kv_MiB": _mib(v["kv_bytes_at_max"]), "peaks": _peaks(result, m)} for m, v in result["methods"].items()]
    ratio = "—" if result["ratio"] is None else f"{result['ratio']:.2f}×"
    head = (f"Budget {result['rss_budget_bytes'] / GIB:.2f} GiB of peak process RSS (one child process per try); "
            f"requests of {result['length']} tokens + {result['new_tokens']} decoded. PoD/dense max batch = "
            f"**{ratio}** (the KV bytes alone: {result['kv_ratio']:.2f}× per request).")
    cols = [("method", "method"), ("max_batch", "max batch (measured)"), ("runs", "tries"),
            ("peak_MiB", "peak RSS MiB at max"), ("loaded_MiB", "RSS MiB after loading the model"),
            ("kv_MiB", "KV MiB at max"), ("peaks", "tries: batch → peak MiB")]
    failed = [f"{p['method']} batch {p['batch']}: {p['error']}" for p in result["probes"] if p.get("error")]
    tail = f"\n\nTries that failed (counted as not fitting): {'; '.join(failed)}." if failed else ""
    return head + "\n\n" + md_table(rows, cols) + tail


def _mib(x):
    return None if x is None else round(x / 2**20)


def _peaks(result: dict, method: str) -> str:
    """Every try of ``method``: batch → peak RSS in MiB (">" where it was stopped at the budget)."""
    out = []
    for p in sorted((p for p in result["probes"] if p["method"] == method), key=lambda p: p["batch"]):
        peak = "failed" if p["peak_rss"] is None else (">" if p.get("over_budget") else "") + str(_mib(p["peak_rss"]))
        out.append(f"{p['batch']} → {peak}")
    return ", ".join(out)


def batch_rss_plot(result: dict, path) -> None:
    series = {}
    for m in METHODS:
        ps = [(p["batch"], p["peak_rss"] / GIB) for p in result["probes"] if p["method"] == m and p["kv_bytes"]]
        series[f"{m} (tries)"] = ([b for b, _ in ps], [r for _, r in ps])
    xs = sorted({p["batch"] for p in result["probes"]})
    series["budget"] = (xs, [result["rss_budget_bytes"] / GIB] * len(xs))
    plot_lines(path, series, "batch size", "peak process RSS (GiB)", "Max batch under a process-memory budget")


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
