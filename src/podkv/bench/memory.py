"""`podkv bench memory`: KV bytes held vs context length, measured from the cache tensors (paper §2.3).

For each length T a real prefill of T tokens plus ``decode`` greedy steps fills a DynamicCache
(dense) and a PodCache (PoD); the bytes their K/V tensors hold are compared with the analytic
formulas of :mod:`podkv.cache.memory`. Peak process memory above the start of each run is recorded
too (RSS on CPU, max allocated on CUDA): it includes activations, so it is reported, not compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from podkv.bench.common import PeakMemory, new_cache, prefill_decode, token_ids
from podkv.bench.report import md_table, plot_lines
from podkv.cache.memory import cache_bytes, dense_kv_bytes, pod_kv_bytes
from podkv.cache.quant import BITS
from podkv.cache.selection import kept_tokens_for_budget
from podkv.errors import PodError
from podkv.eval.generation import prefill
from podkv.eval.methods import make_method


@dataclass
class MemoryConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    batch: int = 1
    decode: int = 4
    selection_budget: float | None = 0.1  # pod+snapkv: dense KV fraction kept after prefill (paper: 8.1%)
    kv_bits: int | None = None  # 8, 4 or 2: PodCache in that many bits (the PoD columns), formula pod_kv_bytes
    key_quant: str = "token"  # with kv_bits: anchor keys per token, or per channel over 64 tokens (KIVI)
    keep_proximal: bool = False  # with kv_bits: the first ns and last nr tokens in the model's dtype

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise PodError(f"bench memory field 'lengths' must be positive integers, got {self.lengths}")
        if self.selection_budget is not None and not 0 < self.selection_budget <= 1:
            raise PodError(f"bench memory field 'selection_budget' must be a KV fraction in (0, 1], got {self.selection_budget}")
        if self.kv_bits is not None and self.kv_bits not in BITS:
            raise PodError(f"bench memory field 'kv_bits' = {self.kv_bits!r}: supported are None, "
                           f"{', '.join(map(str, BITS))}")
        if self.key_quant not in ("token", "channel"):
            raise PodError(f"bench memory field 'key_quant' = {self.key_quant!r}: choose from token, channel")
        if not self.kv_bits and (self.key_quant != "token" or self.keep_proximal):
            raise PodError("bench memory: --key-quant channel and --kv-keep-proximal need --kv-bits")
        if self.kv_bits and self.selection_budget:
            raise PodError(f"bench memory: --kv-bits {self.kv_bits} with --selection-budget is not supported "
                           "(pod+snapkv compaction needs a float PodCache); pass --selection-budget 0")
        if self.batch < 1 or self.decode < 0:
            raise PodError(f"bench memory needs batch >= 1 and decode >= 0, got {self.batch}, {self.decode}")


def pod_snapkv_row(model, plan, ids, budget: float) -> dict:
    """KV bytes of PoD + SnapKV after prefilling ``ids`` at ``budget``, measured and by formula."""
    B, T = ids.shape
    method = make_method("pod+snapkv", plan=plan, budget=budget)
    try:
        method.check(model.config, [T])
    except PodError as exc:
        return {"pod_snapkv_note": str(exc)}
    with method.attached(model):
        pre = prefill(model, method, ids)
    kept = kept_tokens_for_budget(model.config, plan, T, budget)
    formula = pod_kv_bytes(model.config, plan, kept, B, model.dtype)
    return {"pod_snapkv_bytes": pre.kv_bytes, "pod_snapkv_formula": formula, "pod_snapkv_tokens": kept,
            "pod_snapkv_saving": 1 - pre.kv_fraction, "pod_snapkv_matches_formula": pre.kv_bytes == formula}


def run_memory(model, tok, plan, cfg: MemoryConfig) -> dict:
    """Measure dense and PoD KV bytes at every length; returns the result dict (rows + checks)."""
    config, dtype = model.config, model.dtype
    from podkv.cache.pod_cache import storage  # startup: transformers

    bits = storage(config, cfg.kv_bits, cfg.key_quant, cfg.keep_proximal)
    rows = []
    for method in ("dense", "pod"):  # warm-up: the first run's allocator growth is not the cache's
        prefill_decode(model, token_ids(tok, config.vocab_size, cfg.batch, 64).to(model.device),
                       new_cache(model, method, plan), 1)
    for T in tqdm(cfg.lengths, desc="bench memory", leave=False):
        ids = token_ids(tok, config.vocab_size, cfg.batch, T).to(model.device)
        held = T + cfg.decode
        row = {"T": T, "tokens_held": held}
        for method in ("dense", "pod"):
            cache = new_cache(model, method, plan, **(bits if method == "pod" else {}))
            with PeakMemory(model.device) as peak:
                prefill_decode(model, ids, cache, cfg.decode)
            row[f"{method}_bytes"] = cache_bytes(cache)
            row[f"{method}_peak_bytes"] = peak.peak
            if hasattr(cache, "reserved_bytes"):  # growth room of PodCache's buffers (<= GROWTH tokens a tensor)
                row[f"{method}_reserved_bytes"] = cache.reserved_bytes()
            del cache
        row["dense_formula"] = dense_kv_bytes(config, held, cfg.batch, dtype)
        row["pod_formula"] = pod_kv_bytes(config, plan, held, cfg.batch, dtype, **bits)
        row["dense_bytes_per_token"] = row["dense_bytes"] / (held * cfg.batch)
        row["pod_bytes_per_token"] = row["pod_bytes"] / (held * cfg.batch)
        row["saving"] = 1 - row["pod_bytes"] / row["dense_bytes"]
        row["plan_saving"] = 1 - row["pod_formula"] / row["dense_formula"]
        row["matches_formula"] = row["dense_bytes"] == row["dense_formula"] and row["pod_bytes"] == row["pod_formula"]
        if cfg.selection_budget:
            row.update(pod_snapkv_row(model, plan, ids, cfg.selection_budget))
        rows.append(row)
    from podkv.models.enable import disable_pod  # startup: transformers

    disable_pod(model)
    return {"rows": rows, "all_match_formula": all(r["matches_formula"] for r in rows),
            "selection_budget": cfg.selection_budget, "kv_bits": cfg.kv_bits,
            "key_quant": cfg.key_quant if cfg.kv_bits else None,
            "keep_proximal": cfg.keep_proximal if cfg.kv_bits else None, "plan_summary": plan.summary(4096)}


def memory_markdown(result: dict) -> str:
    rows = [dict(r, dense_MB=r["dense_bytes"] / 2**20, pod_MB=r["pod_bytes"] / 2**20,
                 dense_peak_MB=_mb(r["dense_peak_bytes"]), pod_peak_MB=_mb(r["pod_peak_bytes"]),
                 saving_pct=100 * r["saving"], plan_pct=100 * r["plan_saving"]) for r in result["rows"]]
    cols = [("T", "context"), ("dense_bytes_per_token", "dense B/token"), ("pod_bytes_per_token", "PoD B/token"),
            ("dense_MB", "dense KV MiB"), ("pod_MB", "PoD KV MiB"), ("saving_pct", "saved %"),
            ("plan_pct", "plan's analytic saving %"), ("matches_formula", "measured == formula"),
            ("dense_peak_MB", "dense peak MiB"), ("pod_peak_MB", "PoD peak MiB")]
    out = md_table(rows, cols)
    budget = result.get("selection_budget")
    if budget:
        sel = [dict(T=r["T"], MB=_mb(r.get("pod_snapkv_bytes")), saving=_pct(r.get("pod_snapkv_saving")),
                    kept=r.get("pod_snapkv_tokens"), match=r.get("pod_snapkv_matches_formula"),
                    note=r.get("pod_snapkv_note", "")) for r in result["rows"]]
        out += (f"\n\n**PoD + SnapKV** (`pod+snapkv`, budget {budget} of the dense KV, after prefill; "
                "distant tokens evicted per (block, KV head)):\n\n" + md_table(sel, [
                    ("T", "context"), ("kept", "tokens kept"), ("MB", "KV MiB"), ("saving", "saved %"),
                    ("match", "measured == formula"), ("note", "note")]))
    return out


def _pct(x):
    return None if x is None else 100 * x


def _mb(x):
    return None if x is None else x / 2**20


def memory_plot(result: dict, path) -> None:
    Ts = [r["T"] for r in result["rows"]]
    plot_lines(path, {"dense (measured)": (Ts, [r["dense_bytes"] / 2**20 for r in result["rows"]]),
                      "PoD (measured)": (Ts, [r["pod_bytes"] / 2**20 for r in result["rows"]]),
                      "PoD (formula)": (Ts, [r["pod_formula"] / 2**20 for r in result["rows"]])},
               "context length (tokens)", "KV cache held (MiB)", "KV memory vs context", logx=True)
