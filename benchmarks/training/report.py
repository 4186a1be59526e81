"""Adaptation curves (PNG + JSON) and the dense / training-free / adapted table from saved results.

    python benchmarks/training/report.py

Reads results/run_<name>.json (copies of ``<out>/train_result.json`` from ``podkv train``) and
results/table_<variant>.json (from table.py); writes curves.png, curves.json and table.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from podkv.io import atomic_write_text, save_figure, write_json

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def load_runs() -> dict[str, dict]:
    return {p.stem.removeprefix("run_"): json.loads(p.read_text()) for p in sorted(RESULTS.glob("run_*.json"))}


def curves(runs: dict[str, dict]) -> dict:
    out = {}
    for name, r in runs.items():
        c = r["config"]
        out[name] = {
            "objective": c["objective"], "trainable": c["trainable"], "lora_rank": c["lora_rank"], "lr": c["lr"],
            "seq_len": c["seq_len"], "tokens": r["tokens"], "wall_s": r["wall_s"], "data": c.get("data") or [],
            "tokens_per_s": round(r["tokens"] / r["wall_s"], 2) if r["wall_s"] else None,
            "dense_ppl": math.exp(r["dense_heldout_nll"]),
            "heldout": [{**p, "ppl": math.exp(p["nll"]), "ppl_gap": math.exp(p["nll"]) - math.exp(r["dense_heldout_nll"])}
                        for p in sorted(r["heldout"], key=lambda p: p["step"])],
            "train_loss": r["train_loss"],
        }
    return out


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in data.items():
        label = f"{d['objective']}, {d['trainable']}" + (f", LoRA r{d['lora_rank']}" if d["lora_rank"] else "") \
            + f", lr {d['lr']:g}, T {d['seq_len']}, {d['tokens'] // 1024}K tok" \
            + (" (lookup mix; its own held-out slice)" if d["data"] else "")
        ax1.plot([p["tokens"] / 1024 for p in d["heldout"]], [p["ppl_gap"] for p in d["heldout"]], "o-", label=label)
        per_step = d["tokens"] / max(1, len(d["train_loss"])) / 1024
        ax2.plot([h["step"] * per_step for h in d["train_loss"]], [h["loss"] for h in d["train_loss"]], label=label)
    ax1.set_yscale("log")  # the gap falls from ~100 to <1: a log axis shows both ends
    ax1.set(xlabel="training tokens (K)", ylabel="held-out perplexity - dense perplexity",
            title="PoD adaptation: gap to dense (SmolLM2-135M, 34% KV saved)")
    ax2.set(xlabel="training tokens (K)", ylabel="training loss (own objective)", title="training loss")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    save_figure(fig, HERE / "curves.png")


NAMES = {"dense": "dense (no PoD)", "free": "PoD, training-free",
         "adapted_qk16k": "PoD, adapted: distill, q/k LoRA, 16K tokens (T 1024)",
         "adapted_qk28k": "PoD, adapted: distill, q/k LoRA, 28K tokens (T 1024)",
         "adapted_attn147k": "PoD, adapted: distill, attention LoRA, 147K tokens (T 1024)",
         "adapted_all197k": "**PoD, adapted: distill, all-linear LoRA, 197K tokens (T 1024) = shipped `smollm2-pod`**",
         "adapted_lookup": "PoD, adapted: distill, attention LoRA, 246K tokens of lookup mix (T 2048)"}


def table() -> str:
    """One row per results/table_<name>.json, in the order of NAMES (unknown names last)."""
    from podkv.plan import SharingPlan

    files = {p.stem.removeprefix("table_"): p for p in RESULTS.glob("table_*.json")}
    order = [n for n in NAMES if n in files] + sorted(n for n in files if n not in NAMES)
    rows = {n: json.loads(files[n].read_text()) for n in order}
    if not rows:
        return ""
    lengths = sorted({p["length"] for r in rows.values() for p in r["passkey"]})
    head = "| model | KV saved @4K | held-out ppl | " + " | ".join(f"passkey {l // 1024}K" for l in lengths) + " |"
    lines = [head, "|" + "---|" * (3 + len(lengths))]
    for n, r in rows.items():
        saved = f"{100 * SharingPlan.from_dict(r['plan']).kv_saving(4096):.1f}%" if r.get("plan") else "0%"
        acc = {p["length"]: p for p in r["passkey"]}
        cells = [f"{acc[l]['accuracy'] * acc[l]['n']:.0f}/{acc[l]['n']}" if l in acc else "-" for l in lengths]
        lines.append(f"| {NAMES.get(n, n)} | {saved} | {r['heldout_ppl']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    data = curves(load_runs())
    write_json(HERE / "curves.json", data)
    if data:
        plot(data)
    md = table()
    if md:
        atomic_write_text(RESULTS / "table.md", md)
    print(md)
    for name, d in data.items():
        last = d["heldout"][-1]
        print(f"{name}: {d['tokens']} tokens, {d['tokens_per_s']} tok/s, ppl gap {d['heldout'][0]['ppl_gap']:+.3f} "
              f"-> {last['ppl_gap']:+.3f}")


if __name__ == "__main__":
    main()
