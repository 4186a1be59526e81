"""A candidate model's records against dense and the shipped smollm2-pod on the same prompts of benchmarks/quality.

    python benchmarks/quality/candidates/compare.py benchmarks/quality/candidates/layer-scores-{ruler,ppl,logprob}.jsonl

Why a separate table: a candidate is not the shipped model, so it stays out of quality.md, but it must be read
the same way — paired differences over the same prompts (the needle values are checked equal) with bootstrap
95% intervals (benchmarks/quality/report.py's ``paired``). Prints a markdown table; ``--out`` also writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
from pathlib import Path

QUALITY = Path(__file__).resolve().parents[1]
FOLDERS = {"ppl": ("ppl",), "retrieval_logprob": ("logprob",)}  # other tasks: ruler/ and needles/


@functools.cache
def _report():
    """benchmarks/quality/report.py, loaded once (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("quality_report", QUALITY / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def baseline(method: str, task: str) -> list[dict]:
    """Committed records of ``method`` (dense, pod) for ``task``."""
    recs = []
    for folder in FOLDERS.get(task, ("ruler", "needles")):
        recs += [r for r in _read(QUALITY / folder / f"{method}.jsonl") if r.get("task") == task]
    return recs


def value_of(task: str):
    if task == "ppl":
        return lambda r: r["nll"] / r["tokens"]
    if task == "retrieval_logprob":
        return _report()._lp
    return lambda r: r["score"]


def compare(candidate: list[dict]) -> list[dict]:
    paired = _report().paired
    rows = []
    for task in sorted({r["task"] for r in candidate}):
        mine = [r for r in candidate if r["task"] == task]
        value = value_of(task)
        for ref in ("dense", "pod"):
            base = baseline(ref, task)
            if not base:
                continue
            got = paired({"methods": {"dense": base, "cand": mine}}, "cand", value)
            for length, p in got.items():
                rows.append({"task": task, "length": int(length), "against": ref, "candidate": p["mean"],
                             "reference": p["dense"], "diff": p["diff"], "diff_ci95": p["diff_ci95"], "n": p["n"]})
    return rows


def markdown(rows: list[dict]) -> str:
    scale = {"ppl": 1.0, "retrieval_logprob": 1.0}  # nats; task scores in points
    lines = ["| task @ length | against | candidate | reference | Δ [95% CI] | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        k = scale.get(r["task"], 100.0)
        fmt = "{:+.3f}" if k == 1.0 else "{:+.1f}"
        lo, hi = (fmt.format(k * x) for x in r["diff_ci95"])
        lines.append(f"| {r['task']}@{r['length']} | {r['against']} | {k * r['candidate']:.3f} | "
                     f"{k * r['reference']:.3f} | {fmt.format(k * r['diff'])} [{lo}, {hi}] | {r['n']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("records", nargs="+", type=Path, help="the candidate's records.jsonl files")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    missing = [p for p in args.records if not p.is_file()]
    if missing:
        ap.error(f"records file {missing[0]} does not exist")
    rows = compare([r for p in args.records for r in _read(p)])
    print(markdown(rows), end="")
    if args.out:
        from podkv.io import write_json

        write_json(args.out, {"records": [str(p) for p in args.records], "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
