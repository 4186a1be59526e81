"""Results of a benchmark: JSON, a section of benchmarks/RESULTS.md, and PNG plots.

RESULTS.md holds one section per command between ``<!-- bench:NAME -->`` markers, so each command
rewrites only its own section (atomically) and the other sections keep their last results.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from pathlib import Path

from filelock import FileLock

from podkv.io import atomic_write_text, save_figure, write_json

HEADER = "# podkv benchmarks\n\nWritten by `podkv bench memory|batch|speed|skip` (one section each, newest run).\n"


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table from ``rows``; ``columns`` = [(key, header)]; floats get 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    keys = ("date", "device", "cpu", "cpu_count", "threads", "load_avg_1m", "torch", "transformers", "podkv", "gpu")
    return "Machine: " + ", ".join(f"{k} {info[k]}" for k in keys if k in info)


def write_results(out_dir: str | Path, name: str, result: dict, section_md: str) -> Path:
    """Write ``<out_dir>/<name>.json`` and replace section ``name`` of ``<out_dir>/RESULTS.md``."""
    out_dir = Path(out_dir)
    path = write_json(out_dir / f"{name}.json", result)
    md = out_dir / "RESULTS.md"
    block = f"<!-- bench:{name} -->\n{section_md.strip()}\n<!-- /bench:{name} -->"
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    key = hashlib.sha1(str(md.resolve()).encode()).hexdigest()[:12]  # lock outside the results folder
    with FileLock(str(Path(tempfile.gettempdir()) / f"podkv-results-{key}.lock")):  # two benches may finish at once
        text = md.read_text() if md.exists() else HEADER
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
        atomic_write_text(md, text)
    return path


def plot_lines(path: str | Path, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> Path:
    """One line per series name -> (xs, ys)."""
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
