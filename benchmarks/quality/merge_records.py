"""Fold a finished run's records into the committed ones: ``python merge_records.py RUN/records.jsonl DEST.jsonl``.

Why not concatenate: runs are made one length at a time, in different sessions, and runs/ is not kept. A run
replaces the committed records of the (task, length) pairs it covers and leaves every other pair as it was, so
re-running a length never duplicates prompts and the other lengths' records survive. Written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from podkv.io import atomic_write_text


def merge(run: Path, dest: Path) -> tuple[int, int]:
    new = [json.loads(line) for line in run.read_text().splitlines() if line.strip()]
    covered = {(r["task"], r["length"]) for r in new}
    old = [json.loads(line) for line in dest.read_text().splitlines() if line.strip()] if dest.exists() else []
    kept = [r for r in old if (r["task"], r["length"]) not in covered]
    atomic_write_text(dest, "".join(json.dumps(r) + "\n" for r in kept + new))
    return len(kept), len(new)


if __name__ == "__main__":
    kept, added = merge(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{sys.argv[2]}: kept {kept} records, added {added} from {sys.argv[1]}")
