"""Text sources with a declared split: what plans and training read, and what evaluation scores.

A quality figure counts only on text no plan or training run has seen, so every consumer asks
this module for a *split* instead of opening a corpus itself:

* ``train`` and ``plan`` — the standard library's help topics (``pydoc_data.topics``, ~113K
  SmolLM2 tokens), values joined in sorted key order. `podkv analyze` and `podkv train` read them.
* ``heldout`` — docstrings of the standard library's modules, classes and functions (another
  source: written in the code by module authors, not the reference manual), frozen into
  ``assets/texts/heldout_docstrings.txt.gz`` by ``scripts/make_heldout_text.py`` so every Python
  scores the same text. Any docstring sharing a 12-word run with the help topics was dropped
  there, and :func:`check_disjoint` (run by the tests and before every evaluation) proves it.

Evaluation (perplexity, needle haystacks, RULER-style prose) reads ``heldout`` only.
"""

from __future__ import annotations

import gzip
import re
from functools import lru_cache
from importlib import resources

from podkv.errors import PodError

SPLITS = ("train", "plan", "heldout")
HELDOUT_ASSET = "heldout_docstrings.txt.gz"
DOC_SEPARATOR = "\n\n\x1e\n\n"  # between documents in the held-out asset (record separator)
SHINGLE = 12  # words: a shared run this long means copied text, not a common phrase


def documents(split: str) -> list[str]:
    """The documents of ``split`` in a fixed order."""
    if split in ("train", "plan"):
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if split == "heldout":
        return list(_heldout_documents())
    raise PodError(f"unknown text split {split!r}; choose from {', '.join(SPLITS)}")


def text(split: str) -> str:
    """All documents of ``split`` joined by blank lines."""
    return "\n\n".join(documents(split))


def describe(split: str) -> str:
    """One line for provenance records and tables."""
    return {"train": "pydoc_data.topics (stdlib help topics)", "plan": "pydoc_data.topics (stdlib help topics)",
            "heldout": f"stdlib docstrings (podkv/assets/texts/{HELDOUT_ASSET})"}[_checked(split)]


@lru_cache(maxsize=1)
def _heldout_documents() -> tuple[str, ...]:
    path = resources.files("podkv").joinpath("assets", "texts", HELDOUT_ASSET)
    try:
        raw = gzip.decompress(path.read_bytes()).decode("utf-8")
    except FileNotFoundError:
        raise PodError(f"the held-out text {HELDOUT_ASSET} is missing from this install: reinstall podkv") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PodError(f"the held-out text {HELDOUT_ASSET} is corrupt ({exc}): reinstall podkv") from None
    return tuple(d for d in raw.split(DOC_SEPARATOR) if d.strip())


def _checked(split: str) -> str:
    if split not in SPLITS:
        raise PodError(f"unknown text split {split!r}; choose from {', '.join(SPLITS)}")
    return split


# ------------------------------------------------------------------------------ disjointness
def words(text_: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text_.lower())


def shingles(text_: str, n: int = SHINGLE) -> set[int]:
    """Hashes of every run of ``n`` consecutive words."""
    w = words(text_)
    return {hash(tuple(w[i:i + n])) for i in range(len(w) - n + 1)}


def overlap(text_: str, reference: set[int], n: int = SHINGLE) -> str | None:
    """The first ``n``-word run of ``text_`` that also occurs in ``reference`` (shingle hashes), or None."""
    w = words(text_)
    for i in range(len(w) - n + 1):
        if hash(tuple(w[i:i + n])) in reference:
            return " ".join(w[i:i + n])
    return None


@lru_cache(maxsize=2)
def _reference_shingles(split: str) -> frozenset[int]:
    return frozenset(shingles(text(split)))


def check_disjoint(eval_text: str, against: tuple[str, ...] = ("train", "plan"), what: str = "the eval text") -> None:
    """Raise a one-line :class:`PodError` when ``eval_text`` repeats a 12-word run of a training/plan split."""
    for split in against:
        hit = overlap(eval_text, _reference_shingles(_checked(split)))
        if hit is not None:
            raise PodError(f"{what} overlaps the {split!r} text ({describe(split)}): it repeats \"{hit}\"; "
                           "a quality figure must be measured on text no plan or training run has seen")
