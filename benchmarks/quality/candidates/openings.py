"""How many greedy answers open with a newline, per records file, task and length (vt by default).

    python benchmarks/quality/candidates/openings.py benchmarks/quality/ruler/{dense,pod}.jsonl \
        benchmarks/quality/candidates/{chat-ruler,qk-deltas-vt,attention-deltas-vt}.jsonl \
        > benchmarks/quality/candidates/openings_vt.md

Why: an answer that opens with a blank line has lost — the model continues the haystack — and the adapted models
open that way far more often than dense (README, "Where vt goes wrong first"). Counts from the records as scored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--task", default="vt")
    args = ap.parse_args()
    print(f"| records | {args.task} length | prompts | answers opening with a newline | mean score |")
    print("|---|---|---|---|---|")
    for path in args.records:
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        for length in sorted({r["length"] for r in recs if r["task"] == args.task}):
            rs = [r for r in recs if r["task"] == args.task and r["length"] == length]
            opened = sum(r["generated"].startswith("\n") for r in rs)
            print(f"| `{path}` | {length} | {len(rs)} | {opened} | {sum(r['score'] for r in rs) / len(rs):.3f} |")


if __name__ == "__main__":
    main()
