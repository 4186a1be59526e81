"""Freeze the held-out evaluation text: docstrings of the standard library -> assets/texts/heldout_docstrings.txt.gz.

    python scripts/make_heldout_text.py [--max-chars 700000]

Why a frozen file: docstrings change between Python versions, and a figure must be recomputable on
any machine. Why docstrings: long English text on every Python, written by module authors rather than
taken from the reference manual that `pydoc_data.topics` (the train/plan text) comes from. A docstring
sharing any 12-word run with the help topics is dropped, so the two splits are disjoint (tested).
Modules are visited in sorted path order; test suites, IDLE, tkinter and lib2to3 are skipped.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from podkv import texts  # noqa: E402
from podkv.io import atomic_write_bytes  # noqa: E402

SKIP = {"site-packages", "test", "tests", "idlelib", "pydoc_data", "lib2to3", "tkinter", "turtledemo", "ensurepip"}


def stdlib_docstrings(min_chars: int = 300) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if SKIP & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    out.append(doc.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-chars", type=int, default=700_000)
    args = ap.parse_args()
    reference = texts.shingles(texts.text("train"))
    kept, total, dropped = [], 0, 0
    for doc in stdlib_docstrings():
        if texts.overlap(doc, reference) is not None:
            dropped += 1
            continue
        kept.append(doc)
        total += len(doc)
        if total >= args.max_chars:
            break
    out = Path(__file__).resolve().parents[1] / "src/podkv/assets/texts" / texts.HELDOUT_ASSET
    atomic_write_bytes(out, gzip.compress(texts.DOC_SEPARATOR.join(kept).encode("utf-8"), mtime=0))
    print(f"{len(kept)} docstrings, {total} characters ({dropped} dropped for overlap) -> {out}")


if __name__ == "__main__":
    main()
