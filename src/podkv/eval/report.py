"""Results on disk: results.json (numbers + provenance), timings.json, results.md, and PNG figures.

Timings live apart from results.json so that a rerun with the same seed gives a byte-identical
results.json (wall-clock time is the only thing that changes).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from podkv.io import atomic_write_text, save_figure, write_json


def write_results(results: dict, out: Path, timings: dict | None = None) -> list[Path]:
    out = Path(out)
    if timings is None:
        results, timings = split_timings(results)
    paths = [write_json(out / "results.json", results), write_json(out / "timings.json", timings),
             atomic_write_text(out / "results.md", markdown(results))]
    paths += figures(results, out)
    return paths


def split_timings(results: dict) -> tuple[dict, dict]:
    results = copy.deepcopy(results)
    timings = {}
    for mname, entry in results["methods"].items():
        for tname, task in entry["tasks"].items():
            timings[f"{mname}/{tname}"] = [r.pop("prefill_s", None) for r in task["records"]]
    return results, timings


PERCENT = ("accuracy", "string_match_all")  # metrics on [0, 1], printed as percentages


def markdown(results: dict) -> str:
    """One table: a row per method, KV held and saved, then each task's score [95% CI] and n, overall and per length."""
    methods = results["methods"]
    first = next(iter(methods.values()))["tasks"]
    head = ["method", "KV held", "KV saved"]
    for t, task in first.items():
        s = task["summary"]
        head += [f"{t} {task['metric']}"] + [f"{t} @{n}" for n in s["by_length"]]
        head += [f"{t} {a}" for a in s.get("also", {})]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mname, entry in methods.items():
        fracs = [task["summary"]["kv_fraction"] for task in entry["tasks"].values()]
        held = sum(fracs) / len(fracs)
        row = [_label(entry, results), f"{held:.3f}", f"{100 * (1 - held):.1f}%"]
        for task in entry["tasks"].values():
            s, metric = task["summary"], task["metric"]
            row += [_cell(overall(s), metric)] + [_cell(v, metric) for v in s["by_length"].values()]
            row += [_cell(a, a["metric"]) for a in s.get("also", {}).values()]
        lines.append("| " + " | ".join(row) + " |")
    p = results
    info = (f"\nModel: {p['model']} ({p['model_type']}); plan: {p['plan_source']} — {p['plan_summary']}.  \n"
            f"Seed {p['seed']}; versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".  \n"
            "KV held = bytes in the cache after prefill / dense bytes (mean over prompts).  \n"
            "Cells: score [95% CI], n prompts (Wilson for 0/1 scores, seeded bootstrap otherwise).\n")
    return "\n".join(lines) + "\n" + info


def overall(summary: dict):
    """The task's overall stats ``{mean, ci95, n}``; a bare number for results written before intervals."""
    if "mean" in summary:
        return summary
    return summary["ppl"] if "ppl" in summary else summary["accuracy"]


def _label(entry: dict, results: dict) -> str:
    desc = entry["method"]
    b = desc.get("budget")
    label = desc["name"] + (f" (budget {b:g})" if b is not None else "")
    if entry.get("model", results["model"]) != results["model"]:  # merged runs: say which model
        label += f" [{entry['model']}]"
    return label


def _cell(stats, metric: str) -> str:
    if not isinstance(stats, dict):
        return _fmt(stats, metric)
    lo, hi = stats["ci95"]
    if metric in PERCENT:
        return f"{100 * stats['mean']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] n={stats['n']}"
    return f"{_fmt(stats['mean'], metric)} [{_fmt(lo, metric)}, {_fmt(hi, metric)}] n={stats['n']}"


def _fmt(v: float, metric: str) -> str:
    if metric in PERCENT:
        return f"{100 * v:.0f}%"
    return f"{v:.2f}" if metric == "ppl" else f"{v:.3f}"


def _mean(summary: dict) -> float:
    o = overall(summary)
    return o["mean"] if isinstance(o, dict) else o


def grid_matrix(summary: dict) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, acc[depth][length]) from a needle task summary; NaN where a cell was not run."""
    cells = {tuple(k.split("@")): v for k, v in summary["grid"].items()}
    lengths = sorted({int(n) for n, _ in cells})
    depths = sorted({float(d) for _, d in cells})
    nan = float("nan")
    return lengths, depths, [[cells.get((str(n), f"{d:g}"), nan) for n in lengths] for d in depths]


def figures(results: dict, out: Path) -> list[Path]:
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    methods = results["methods"]
    tasks = next(iter(methods.values()))["tasks"]
    paths = []
    for tname, task in tasks.items():
        if "grid" in task["summary"] and task["summary"]["n"] > 1:
            paths.append(save_figure(heatmaps(methods, tname), out / f"{tname}_heatmap.png"))
    if any(t["metric"] in PERCENT for t in tasks.values()):
        paths.append(save_figure(accuracy_vs_saving(methods), out / "accuracy_vs_kv_saving.png"))
    return paths


def heatmaps(methods: dict, tname: str):
    """Length x depth accuracy, one panel per method, like the paper's Figure 3."""
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, axes = plt.subplots(1, len(methods), figsize=(2.8 * len(methods) + 1.2, 3.4), squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("RdYlGn").copy()
    cmap.set_bad("0.9")  # cells not run (fewer depths at long contexts)
    for ax, (mname, entry) in zip(axes[0], methods.items()):
        s = entry["tasks"][tname]["summary"]
        lengths, depths, acc = grid_matrix(s)
        im = ax.imshow(np.ma.masked_invalid(np.array(acc)), cmap=cmap, vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("context length")
        ax.set_title(f"{mname}\nscore {100 * _mean(s):.0f}%, KV {100 * s['kv_fraction']:.0f}%", fontsize=9)
        for i, row in enumerate(acc):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="score")
    fig.suptitle(f"{tname}: score by context length and needle depth (grey: not run)", fontsize=10, y=1.06)
    return fig


def accuracy_vs_saving(methods: dict):
    """Mean score over the tasks scored on [0, 1] (accuracy, string_match_all) against the KV memory saved."""
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mname, entry in methods.items():
        sums = [t["summary"] for t in entry["tasks"].values() if t["metric"] in PERCENT]
        acc = sum(_mean(s) for s in sums) / len(sums)
        saved = 100 * (1 - sum(s["kv_fraction"] for s in sums) / len(sums))
        ax.scatter([saved], [100 * acc], s=60)
        ax.annotate(mname, (saved, 100 * acc), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_xlabel("KV cache saved (%)")
    ax.set_ylabel("score (%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("score vs KV saving (same prompts, same budget)", fontsize=10)
    return fig
