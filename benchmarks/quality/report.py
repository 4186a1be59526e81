"""The headline quality table of the shipped smollm2-pod, from the merged results files.

    python benchmarks/quality/report.py      # reads needles/ logprob/ ppl/ <method>.jsonl here (records)

Writes quality.json, quality.md and quality.png next to this file (``ruler/``: the other four RULER-style
tasks; with ``needles/`` they make the five-task table). Differences to dense are
*paired* (the same prompts for every method): the 95% interval is a seeded bootstrap over prompts
(over windows for perplexity) of the per-prompt difference, so it is much tighter than comparing
two independent intervals. Goals checked (issue 12): held-out NLL within 2% of dense, needle
accuracy within 5 points of dense at every length, ahead of StreamingLLM and SnapKV at the same
or a larger KV budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from podkv.eval.stats import bootstrap, describe, wilson
from podkv.io import atomic_write_text, save_figure, write_json

HERE = Path(__file__).resolve().parent
POD = "pod"  # method name of smollm2-pod in the merged files (it is the only pod run)
ORDER = ("dense", POD, "streaming", "snapkv")


def load(what: str) -> dict | None:
    """``{method: records}`` from ``<what>/<method>.jsonl`` (records as `podkv eval` logs them), or None."""
    files = sorted((HERE / what).glob("*.jsonl"))
    if not files:
        return None
    return {"methods": {f.stem: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
                        for f in files}}


def records(results: dict, method: str) -> list[dict]:
    return results["methods"][method]


def paired(results: dict, method: str, value, task: str | None = None) -> dict:
    """Per length: mean of ``value(rec)`` for ``method`` and for dense, and the paired difference with its CI
    (records of ``task`` only, when given)."""
    def mine(m):
        return [r for r in records(results, m) if task is None or r.get("task") == task]

    base = {(r["length"], r["sample"]): r for r in mine("dense")}
    out = {}
    for length in sorted({r["length"] for r in base.values()}):
        pairs = [(value(r), value(base[(r["length"], r["sample"])])) for r in mine(method)
                 if r["length"] == length and (r["length"], r["sample"]) in base]
        if not pairs:
            continue
        for r in mine(method):  # the same prompt for both, or the pairing is meaningless
            b = base.get((r["length"], r["sample"]))
            if b is not None and "value" in r and r["value"] != b["value"]:
                raise SystemExit(f"{method} sample {r['sample']} at {r['length']} is not dense's prompt")
        diffs = [a - b for a, b in pairs]
        out[str(length)] = {"mean": sum(a for a, _ in pairs) / len(pairs), "dense": sum(b for _, b in pairs) / len(pairs),
                            "diff": sum(diffs) / len(diffs), "diff_ci95": list(bootstrap(diffs)), "n": len(pairs)}
    return out


def needles_section(res: dict) -> dict:
    rows = {}
    for m in ORDER:
        if m not in res["methods"]:
            continue
        recs = records(res, m)
        by_len = {}
        for length in sorted({r["length"] for r in recs}):
            scores = [r["score"] for r in recs if r["length"] == length]
            by_len[str(length)] = {"mean": sum(scores) / len(scores), "ci95": list(wilson(int(sum(scores)), len(scores))),
                                   "n": len(scores)}
        rows[m] = {"kv_fraction": sum(r["kv_fraction"] for r in recs) / len(recs), "by_length": by_len,
                   "vs_dense": paired(res, m, lambda r: r["score"]) if m != "dense" else None}
    return rows


def ruler_section(res: dict, needles: dict | None) -> dict:
    """Every RULER-style task (the four of ``ruler/`` plus ``niah_single_prose`` of ``needles/``), per method and
    length: score with its 95% CI (Wilson for 0/1 scores, bootstrap for partial credit) and the paired Δ vs dense."""
    merged = {"methods": {m: list(recs) for m, recs in res["methods"].items()}}
    for m, recs in (needles or {"methods": {}})["methods"].items():
        if m in merged["methods"]:
            merged["methods"][m] += recs
    out = {}
    tasks = sorted({r["task"] for recs in merged["methods"].values() for r in recs})
    for task in tasks:
        out[task] = {}
        for m in ORDER:
            recs = [r for r in merged["methods"].get(m, []) if r["task"] == task]
            if not recs:
                continue
            by_len = {}
            for length in sorted({r["length"] for r in recs}):
                scores = [r["score"] for r in recs if r["length"] == length]
                binary = all(x in (0.0, 1.0) for x in scores)
                by_len[str(length)] = {**describe(scores, binary=binary), "n": len(scores)}
            out[task][m] = {"by_length": by_len,
                            "vs_dense": None if m == "dense" else paired(merged, m, lambda r: r["score"], task)}
    return out


def logprob_section(res: dict) -> dict:
    return {m: {"by_length": paired(res, m, _lp)} for m in ORDER if m in res["methods"]}


def _lp(r: dict) -> float:
    if "logprob_per_token" in r:  # retrieval_logprob records
        return r["logprob_per_token"]
    return r["logprob"] / r["tokens"] if "tokens" in r else r["logprob"]


def ppl_section(res: dict) -> dict:
    """Every method of the ppl run, including the control ``dense [smollm2-pod]`` (adapted weights, dense attention)."""
    out = {}
    for m in [*[m for m in ORDER if m in res["methods"]], *[m for m in res["methods"] if m not in ORDER]]:
        recs = records(res, m)
        nll = describe([r["nll"] / r["tokens"] for r in recs], binary=False, weights=[r["tokens"] for r in recs])
        out[m] = {"nll": nll, "ppl": math.exp(nll["mean"]), "n": len(recs)}
        if m != "dense":
            p = paired(res, m, lambda r: r["nll"] / r["tokens"])
            out[m]["nll_vs_dense"] = next(iter(p.values()))
            out[m]["nll_gap_pct"] = 100 * out[m]["nll_vs_dense"]["diff"] / out[m]["nll_vs_dense"]["dense"]
    return out


def goals(report: dict) -> dict:
    g = {}
    ppl = report.get("ppl", {})
    if POD in ppl:
        g["heldout NLL within 2% of dense"] = ppl[POD]["nll_gap_pct"] <= 2.0
    ru = report.get("ruler", {})
    if ru and all(POD in rows for rows in ru.values()):
        g[f"accuracy within 5 points of dense on every RULER-style task ({len(ru)}) and length"] = all(
            v["diff"] >= -0.05 for rows in ru.values() for v in (rows[POD]["vs_dense"] or {}).values())
    lp = report.get("logprob", {})
    if POD in lp:
        g["answer log-prob within 0.03 nats per answer token of dense at every length"] = all(
            v["diff"] >= -0.03 for v in lp[POD]["by_length"].values())
    nd = report.get("needles", {})
    if POD in nd and nd[POD]["vs_dense"]:
        g["needle accuracy within 5 points of dense at every length"] = all(
            v["diff"] >= -0.05 for v in nd[POD]["vs_dense"].values())
        for base in ("streaming", "snapkv"):
            if base in nd:
                common = [L for L in nd[POD]["by_length"] if L in nd[base]["by_length"]]
                g[f"ahead of {base} at every length it ran ({', '.join(common)})"] = all(
                    nd[POD]["by_length"][L]["mean"] > nd[base]["by_length"][L]["mean"] for L in common)
    return g


def markdown(report: dict) -> str:
    lines = ["# Quality of the shipped `smollm2-pod` on held-out text and prompts", ""]
    nd = report.get("needles")
    if nd:
        lengths = list(nd["dense"]["by_length"])
        lines += ["## RULER needle in held-out prose (`niah_single_prose`), accuracy [95% CI]", "",
                  "| method | KV held | " + " | ".join(f"{L} tokens" for L in lengths) + " | " +
                  " | ".join(f"Δ vs dense @{L} [paired CI]" for L in lengths) + " |",
                  "|---|---|" + "---|" * (2 * len(lengths))]
        for m, row in nd.items():
            cells = [f"{100 * row['by_length'][L]['mean']:.0f}% [{100 * row['by_length'][L]['ci95'][0]:.0f}, "
                     f"{100 * row['by_length'][L]['ci95'][1]:.0f}] n={row['by_length'][L]['n']}"
                     if L in row["by_length"] else "not run" for L in lengths]
            deltas = ["—"] * len(lengths) if row["vs_dense"] is None else [
                f"{100 * row['vs_dense'][L]['diff']:+.0f} [{100 * row['vs_dense'][L]['diff_ci95'][0]:+.0f}, "
                f"{100 * row['vs_dense'][L]['diff_ci95'][1]:+.0f}]" if L in row["vs_dense"] else "—" for L in lengths]
            lines.append(f"| {_name(m)} | {row['kv_fraction']:.2f} | " + " | ".join(cells + deltas) + " |")
        lines.append("")
    ru = report.get("ruler")
    if ru:
        lines += ["## All five RULER-style tasks: score [95% CI] and paired Δ vs dense (points)", "",
                  "| task | method | " + " | ".join(f"{L} tokens" for L in _lengths(ru)) + " |",
                  "|---|---|" + "---|" * len(_lengths(ru))]
        for task, rows in ru.items():
            for m, row in rows.items():
                cells = []
                for L in _lengths(ru):
                    v = row["by_length"].get(L)
                    if v is None:
                        cells.append("not run")
                        continue
                    cell = f"{100 * v['mean']:.0f} [{100 * v['ci95'][0]:.0f}, {100 * v['ci95'][1]:.0f}] n={v['n']}"
                    d = (row["vs_dense"] or {}).get(L)
                    if d is not None:
                        cell += f"; Δ {100 * d['diff']:+.1f} [{100 * d['diff_ci95'][0]:+.1f}, {100 * d['diff_ci95'][1]:+.1f}]"
                    cells.append(cell)
                lines.append(f"| `{task}` | {_name(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    lp = report.get("logprob")
    if lp:
        lengths = list(next(iter(lp.values()))["by_length"])
        lines += ["## Teacher-forced answer log-prob per value token (`retrieval_logprob`), mean [paired Δ vs dense]",
                  "", "| method | " + " | ".join(f"{L} tokens" for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for m, row in lp.items():
            cells = [f"{v['mean']:.3f}" + ("" if m == "dense" else
                                           f" [Δ {v['diff']:+.3f} ({v['diff_ci95'][0]:+.3f}, {v['diff_ci95'][1]:+.3f})]")
                     for v in row["by_length"].values()]
            lines.append(f"| {_name(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    pp = report.get("ppl")
    if pp:
        lines += ["## Held-out perplexity (stdlib docstrings; second half of 2048-token windows, given the first)", "",
                  "| method | NLL/token [95% CI] | ppl | NLL gap vs dense [paired CI] | windows |", "|---|---|---|---|---|"]
        for m, row in pp.items():
            gap = "—" if m == "dense" else (f"{row['nll_gap_pct']:+.1f}% ({row['nll_vs_dense']['diff']:+.4f} "
                                            f"[{row['nll_vs_dense']['diff_ci95'][0]:+.4f}, "
                                            f"{row['nll_vs_dense']['diff_ci95'][1]:+.4f}])")
            lines.append(f"| {_name(m)} | {row['nll']['mean']:.4f} [{row['nll']['ci95'][0]:.4f}, "
                         f"{row['nll']['ci95'][1]:.4f}] | {row['ppl']:.2f} | {gap} | {row['n']} |")
        lines.append("")
    lines += ["## Goals (issues 12 and 19)", ""] + [f"- {'met' if ok else '**not met**'}: {k}" for k, ok in
                                            report["goals"].items()]
    lines += ["", "Made by `benchmarks/quality/run.sh` then `python benchmarks/quality/report.py`; "
              "the baselines run on the original weights at a KV budget of 0.76 (what smollm2-pod holds at 1K, "
              "its largest fraction)."]
    return "\n".join(lines) + "\n"


def _lengths(ruler: dict) -> list[str]:
    return sorted({L for rows in ruler.values() for row in rows.values() for L in row["by_length"]}, key=int)


def _name(m: str) -> str:
    if m == POD:
        return "smollm2-pod (PoD)"
    return "smollm2-pod weights, dense attention (control)" if m == "control" else m


def figure(report: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nd = report["needles"]
    lengths = list(nd["dense"]["by_length"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(nd)
    for i, (m, row) in enumerate(nd.items()):
        have = [L for L in lengths if L in row["by_length"]]
        xs = [lengths.index(L) + (i - (len(nd) - 1) / 2) * width for L in have]
        means = [100 * row["by_length"][L]["mean"] for L in have]
        err = [[means[j] - 100 * row["by_length"][L]["ci95"][0] for j, L in enumerate(have)],
               [100 * row["by_length"][L]["ci95"][1] - means[j] for j, L in enumerate(have)]]
        ax.bar(xs, means, width, yerr=err, capsize=3, label=f"{_name(m)} (KV {row['kv_fraction']:.2f})")
    ax.set_xticks(range(len(lengths)), [f"{int(L) // 1024}K" for L in lengths])
    ax.set_ylabel("needles found (%), 95% CI")
    ax.set_ylim(0, 115)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("RULER niah_single_prose on held-out prose (n per bar in quality.md)", fontsize=9)
    return fig


def main() -> None:
    report = {}
    for what, section in (("needles", needles_section), ("logprob", logprob_section), ("ppl", ppl_section)):
        res = load(what)
        if res is not None:
            report[what] = section(res)
    if load("ruler") is not None:
        report["ruler"] = ruler_section(load("ruler"), load("needles"))
    report["goals"] = goals(report)
    write_json(HERE / "quality.json", report)
    atomic_write_text(HERE / "quality.md", markdown(report))
    if "needles" in report:
        save_figure(figure(report), HERE / "quality.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
