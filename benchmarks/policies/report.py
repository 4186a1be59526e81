"""Issue 21's Pareto chart: KV saved at 4K against held-out NLL, podkv's policies and the peers, paired vs dense.

    python benchmarks/policies/report.py     # reads ppl/<run>.jsonl and plans/*.json here (run.sh writes them)

Writes pareto.json, pareto.md and pareto.png next to this file. The NLL gap of a run is paired with dense on
the same held-out windows: the mean over windows of (NLL/token of the run − NLL/token of dense), in % of dense's,
with a seeded bootstrap 95% interval over windows. Runs on smollm2-pod's weights are also paired with
``control`` (those weights with dense attention), which separates what PoD costs from what the weights changed.

KV saved at 4K: a plan's analytic saving (``plan.kv_saving(4096)``; a PodCache holds exactly that, tested) and the
budget of an eviction method. 8- and 4-bit storage is counted against a 16-bit cache, the baseline a user compares it
with (the models run in fp32 here, which would make any 8-bit cache look 4x smaller): bytes of a bf16 deployment,
8 bits per element plus a bf16 scale and zero per 64 elements (8.5 bits), from the formula the fp32 runs check
(``pod_kv_bytes(..., kv_bits=8)`` = measured, tests/test_quant_cache.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from podkv.cache.memory import dense_kv_bytes, pod_kv_bytes
from podkv.eval.stats import bootstrap
from podkv.io import atomic_write_text, save_figure, write_json
from podkv.plan import SharingPlan

HERE = Path(__file__).resolve().parent
SHIPPED = HERE.parents[1] / "src/podkv/assets/smollm2-pod/pod_plan.json"
CONTEXT = 4096
ON_POD_WEIGHTS = ("control", "smollm2-pod", "pod+window-")  # runs whose weights are smollm2-pod's
ADAPTED = {"pod+window-30-adapted": "pod+window-30"}  # runs of a model adapted to a sweep plan (run.sh train-w30)
FAMILY = {"pod+window-30-adapted": "smollm2-pod + window-only pairs, adapted to them",
          "window-+kv8": "window-only pairs, 8-bit (original weights)", "window-+kv4": "window-only pairs, 4-bit (original weights)",
          "window-": "window-only pairs (original weights)", "pod+window-+kv8": "smollm2-pod + window-only, 8-bit",
          "pod+window-+kv4": "smollm2-pod + window-only, 4-bit", "pod+window-": "smollm2-pod + window-only pairs",
          "smollm2-pod": "smollm2-pod (shipped)", "kv8": "8-bit KV (HQQ)", "kv4": "4-bit KV (podkv round-to-nearest)",
          "smollm2-pod+kv8": "smollm2-pod, 8-bit", "smollm2-pod+kv4": "smollm2-pod, 4-bit", "streaming-": "StreamingLLM",
          "kivi4": "4-bit KV, KIVI keys (podkv)", "kivi8": "8-bit KV, KIVI keys (podkv)",
          "smollm2-pod+kivi4": "smollm2-pod, 4-bit KIVI keys", "smollm2-pod+kivi8": "smollm2-pod, 8-bit KIVI keys",
          "pod+window-+kivi4": "smollm2-pod + window-only, 4-bit KIVI keys",
          "kivi4r": "4-bit KV, KIVI keys, proximal tokens exact (podkv)",
          "kivi2r": "2-bit KV, KIVI keys, proximal tokens exact (podkv)",
          "smollm2-pod+kivi4r": "smollm2-pod, 4-bit KIVI keys, proximal tokens exact",
          "pod+window-+kivi4r": "smollm2-pod + window-only, 4-bit KIVI keys, proximal exact",
          "window-+kivi4": "window-only pairs, 4-bit KIVI keys (original weights)",
          "snapkv-": "SnapKV", "pyramidkv-": "PyramidKV", "control": "smollm2-pod weights, dense attention",
          "dense": "dense"}


# storage suffix of a run -> (bits, key grouping, proximal tokens exact); "kivi": keys per channel (KIVI), values per
# token; "r": KIVI's full-precision residual, which in PoD is the proximal set (first ns, last nr tokens)
QUANT = {"kv8": (8, "token", False), "kv4": (4, "token", False), "kivi8": (8, "channel", False),
         "kivi4": (4, "channel", False), "kivi4r": (4, "channel", True), "kivi8r": (8, "channel", True),
         "kivi2r": (2, "channel", True)}


def quant_of(name: str) -> str | None:
    """The storage suffix of a quantized run (``kv4``, ``<plan>+kivi4``, ...), None for the others."""
    return next((q for q in QUANT if name == q or name.endswith(f"+{q}")), None)


def family(name: str) -> str:
    quant = quant_of(name)
    if quant and name.startswith(("pod+window-", "window-")):
        return FAMILY[name.split("-")[0] + f"-+{quant}"]
    return next(v for k, v in FAMILY.items() if name == k or (k.endswith("-") and name.startswith(k)))


def plan_of(name: str) -> SharingPlan:
    quant = quant_of(name)
    base = name.removesuffix(f"+{quant}") if quant else name
    base = ADAPTED.get(base, base)
    return SharingPlan.load(SHIPPED if base == "smollm2-pod" else HERE / "plans" / f"{base}.json")


def quantized_saving(plan: SharingPlan | None, quant: str) -> float:
    """KV saved at 4K by ``plan`` (None: dense) held as ``quant`` says, against a bf16 cache (module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                  hidden_size=576)  # SmolLM2-135M's attention shape
    plan = plan or SharingPlan.identity(30, 3)
    bits, keys, prox = QUANT[quant]
    held = pod_kv_bytes(config, plan, CONTEXT, dtype=torch.bfloat16, kv_bits=bits, key_quant=keys,
                        kv_keep_proximal=prox)
    return 1.0 - held / dense_kv_bytes(config, CONTEXT, dtype=torch.bfloat16)


def load_runs() -> dict[str, list[dict]]:
    return {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            for f in sorted((HERE / "ppl").glob("*.jsonl"))}


def saving(name: str, recs: list[dict]) -> float:
    """KV saved at 4K (module docstring)."""
    if name in ("dense", "control"):
        return 0.0
    quant = quant_of(name)
    if quant:
        return quantized_saving(None if name == quant else plan_of(name), quant)
    if name.startswith(("smollm2-pod", "window-", "pod+window-")):
        return plan_of(name).kv_saving(CONTEXT)
    return 1.0 - float(name.rsplit("-", 1)[1])


def gap(recs: list[dict], base: list[dict]) -> dict:
    """Paired NLL/token gap in % of the base's, with its bootstrap interval over windows."""
    by = {r["sample"]: r["nll"] / r["tokens"] for r in base}
    pairs = [(r["nll"] / r["tokens"], by[r["sample"]]) for r in recs if r["sample"] in by]
    ref = sum(b for _, b in pairs) / len(pairs)
    diffs = [100.0 * (a - b) / ref for a, b in pairs]
    lo, hi = bootstrap(diffs)
    return {"gap_pct": sum(diffs) / len(diffs), "ci95": [lo, hi], "n": len(pairs)}


def ruler_section() -> dict:
    """RULER-style scores of runs in ruler/<run>.jsonl, paired with dense's records of the quality benchmark on the
    same prompts (prompts depend only on seed, task, length and sample; the needle is checked to be the same):
    per task and length, the score, dense's, and the paired difference in points with its bootstrap CI."""
    dense = {}
    for f in (HERE.parent / "quality/needles/dense.jsonl", HERE.parent / "quality/ruler/dense.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            dense[(r["task"], r["length"], r["sample"])] = r
    out = {}
    for f in sorted((HERE / "ruler").glob("*.jsonl")):
        cells: dict = {}
        for line in f.read_text().splitlines():
            r = json.loads(line)
            d = dense.get((r["task"], r["length"], r["sample"]))
            if d is None:
                continue
            if d.get("value") != r.get("value"):
                raise SystemExit(f"{f.name}: {r['task']} sample {r['sample']} at {r['length']} is not dense's prompt")
            cells.setdefault(f"{r['task']}@{r['length']}", []).append((100 * r["score"], 100 * d["score"]))
        out[f.stem] = {key: {"score": sum(a for a, _ in v) / len(v), "dense": sum(b for _, b in v) / len(v),
                             "diff": sum(a - b for a, b in v) / len(v),
                             "diff_ci95": list(bootstrap([a - b for a, b in v])), "n": len(v)}
                       for key, v in sorted(cells.items())}
    return out


def build() -> dict:
    runs = load_runs()
    if "dense" not in runs:
        raise SystemExit("no ppl/dense.jsonl: run benchmarks/policies/run.sh ppl-dense first")
    rows = []
    for name, recs in runs.items():
        nll = sum(r["nll"] for r in recs) / sum(r["tokens"] for r in recs)
        row = {"run": name, "family": family(name), "kv_saved_4k": round(saving(name, recs), 4), "nll": round(nll, 5),
               "vs_dense": gap(recs, runs["dense"]) if name != "dense" else None,
               "kv_fraction_measured": round(max(r["kv_fraction"] for r in recs), 4)}
        if name.startswith(ON_POD_WEIGHTS) and name not in ("control", *ADAPTED) and "control" in runs:
            row["vs_control"] = gap(recs, runs["control"])
        rows.append(row)
    rows.sort(key=lambda r: (r["kv_saved_4k"], r["run"]))
    front, best = [], float("inf")
    for r in sorted(rows, key=lambda r: -r["kv_saved_4k"]):  # Pareto: no run saves more at a lower gap
        g = r["vs_dense"]["gap_pct"] if r["vs_dense"] else 0.0
        if g < best:
            front.append(r["run"])
            best = g
    return {"context": CONTEXT, "quality": "held-out NLL/token, 8 windows x 4096 tokens, second half scored",
            "ruler": ruler_section(),
            "model": "SmolLM2-135M-Instruct (smollm2-pod: its adapted weights)", "rows": rows, "pareto_front": front,
            "goal": "issue 21: >= 50% KV saved at 4K (no quantization) with NLL within 2% of dense"}


def markdown(rep: dict) -> str:
    lines = ["# Pareto sweep: KV saved at 4K vs held-out NLL (issue 21)", "",
             f"{rep['model']}; quality: {rep['quality']}; gaps are paired with dense on the same windows, "
             "95% bootstrap intervals over windows. Training-free except smollm2-pod's own plan. "
             "`*` = on the Pareto front.", "",
             "| run | what | KV saved at 4K | NLL/token | gap vs dense % [95% CI] | gap vs control % |", "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        g = r["vs_dense"]
        gd = "—" if g is None else f"{g['gap_pct']:+.2f} [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}]"
        gc = r.get("vs_control")
        gc = "" if gc is None else f"{gc['gap_pct']:+.2f} [{gc['ci95'][0]:+.2f}, {gc['ci95'][1]:+.2f}]"
        star = "*" if r["run"] in rep["pareto_front"] else ""
        lines.append(f"| {r['run']}{star} | {r['family']} | {100 * r['kv_saved_4k']:.1f}% | {r['nll']:.4f} | {gd} | {gc} |")
    for run, cells in rep["ruler"].items():
        lines += ["", f"## RULER-style tasks: {run} − dense (points, paired 95% CI; dense records of benchmarks/quality)", "",
                  "| task @ length | score | dense | Δ [95% CI] | n |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {c['score']:.1f} | {c['dense']:.1f} | {c['diff']:+.1f} [{c['diff_ci95'][0]:+.1f}, "
                  f"{c['diff_ci95'][1]:+.1f}] | {c['n']} |" for k, c in cells.items()]
    return "\n".join(lines) + "\n"


def figure(rep: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    fams = sorted({r["family"] for r in rep["rows"]})
    for i, fam in enumerate(fams):
        rs = [r for r in rep["rows"] if r["family"] == fam]
        xs = [100 * r["kv_saved_4k"] for r in rs]
        ys = [r["vs_dense"]["gap_pct"] if r["vs_dense"] else 0.0 for r in rs]
        err = [[y - (r["vs_dense"]["ci95"][0] if r["vs_dense"] else 0) for y, r in zip(ys, rs)],
               [(r["vs_dense"]["ci95"][1] if r["vs_dense"] else 0) - y for y, r in zip(ys, rs)]]
        marker = "s" if "8-bit" in fam else "D" if "4-bit" in fam else "o"  # 8-bit storage: squares, 4-bit: diamonds
        ax.errorbar(xs, ys, yerr=err, fmt=marker + ("-" if len(rs) > 1 else ""), label=fam, capsize=3,
                    color=plt.cm.tab20(i % 20))
    ax.axhline(2.0, color="grey", ls="--", lw=0.8)
    ax.text(0.01, 2.0, "goal: within 2% of dense", va="bottom", fontsize=8, color="grey",
            transform=ax.get_yaxis_transform())
    ax.axvline(50, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("KV saved at 4K tokens (%)")
    ax.set_ylabel("held-out NLL gap vs dense (%)")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_title("SmolLM2-135M: KV policies and peers (paired 95% CI)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def main() -> None:
    rep = build()
    write_json(HERE / "pareto.json", rep)
    atomic_write_text(HERE / "pareto.md", markdown(rep))
    save_figure(figure(rep), HERE / "pareto.png")
    print(markdown(rep))


if __name__ == "__main__":
    main()
