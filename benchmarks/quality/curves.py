"""Adaptation curves on the held-out split: NLL gap to dense per training token and per training CPU-second.

    python benchmarks/quality/curves.py      # reads benchmarks/quality/runs/*.json (train_result.json copies)

Writes adaptation.png, adaptation.md and adaptation.json next to this file. Step 0 of every curve is
the training-free starting point of that run's plan, mode and initialisation; the held-out text is
the ``heldout`` split (stdlib docstrings), which no plan or training run reads. Runs made by
``curves.sh`` record process CPU seconds without the held-out measurements; older runs only wall
seconds on one thread (used as they are).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from podkv.io import atomic_write_text, save_figure, write_json

HERE = Path(__file__).resolve().parent


def label(result: dict) -> str:
    c = result["config"]
    mode = result.get("plan_mode") or ("scores" if "scores" in Path(c["plan"]).stem else "keys")  # older runs
    return (f"{mode} mode, {c['objective']}, {c['trainable']} LoRA{c['lora_rank']}, lr {c['lr']:g}, "
            f"init {c.get('init', 'none')}, long-range {c.get('long_range', 0)}, T {c['seq_len']}")


def load_runs() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "runs").glob("*.json"))}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    rows, out = [], {}
    for name, r in runs.items():
        curve = r["heldout"]
        secs = [p.get("cpu_seconds", p.get("seconds", p["step"] * r["wall_s"] / max(r["steps"], 1))) for p in curve]
        gap = [100 * p["nll_gap"] / r["dense_heldout_nll"] for p in curve]
        a.plot([p["tokens"] for p in curve], gap, marker="o", label=name)
        b.plot(secs, gap, marker="o", label=name)
        out[name] = {"label": label(r), "dense_nll": r["dense_heldout_nll"], "tokens": [p["tokens"] for p in curve],
                     "seconds": secs, "nll": [p["nll"] for p in curve], "nll_gap_pct": gap}
        rows.append(f"| {name} | {label(r)} | {r['tokens']} | {secs[-1] / 60:.0f} | {math.exp(r['dense_heldout_nll']):.2f} "
                    f"| {math.exp(curve[0]['nll']):.2f} ({gap[0]:+.1f}%) | {math.exp(curve[-1]['nll']):.2f} ({gap[-1]:+.1f}%) |")
    for ax, xl in ((a, "training tokens"), (b, "training CPU-seconds (1 thread, evaluation excluded)")):
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
        ax.set_yscale("symlog", linthresh=5)
    a.set_ylabel("held-out NLL gap to dense (%)")
    a.legend(fontsize=7)
    fig.suptitle("PoD adaptation on held-out text (stdlib docstrings)", fontsize=10)
    save_figure(fig, HERE / "adaptation.png")
    write_json(HERE / "adaptation.json", out)
    md = ["| run | recipe | tokens | CPU minutes | dense ppl | PoD ppl at step 0 | PoD ppl at the end |",
          "|---|---|---|---|---|---|---|", *rows]
    atomic_write_text(HERE / "adaptation.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
