"""Haystack text: repetitive filler (the classic passkey test, RULER's "noise") and real prose.

The prose is the *held-out* split (:func:`podkv.texts.text` ``("heldout")``: standard-library
docstrings that no plan or training run reads), never the help topics that ``podkv analyze`` and
``podkv train`` see, so a retrieval score is not helped by text the model was adapted on.

A haystack is a list of token-id *units* (sentences), so a needle can be dropped between two
sentences and the prompt length controlled to the token.
"""

from __future__ import annotations

import re
from functools import lru_cache

from podkv.errors import PodError
from podkv.texts import text

# Mohtashami & Jaggi (2023), "Landmark Attention": the passkey filler.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("filler", "prose")
MAX_UNIT_CHARS = 300  # docstrings hold long code runs without a full stop: cut them so depths stay exact


def prose_text() -> str:
    """The held-out evaluation text (stdlib docstrings, ~700K characters), in a fixed order."""
    return text("heldout")


@lru_cache(maxsize=4)
def sentences(kind: str) -> tuple[str, ...]:
    """The haystack's sentences, each with its leading space, in reading order."""
    if kind == "filler":
        return tuple(" " + s for s in re.split(r"(?<=\.)\s+", FILLER))
    if kind == "prose":
        out = []
        for para in re.split(r"\n\s*\n", prose_text()):
            for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", para).strip()):
                out += [" " + piece for piece in _pieces(s, MAX_UNIT_CHARS) if piece]
        return tuple(out)
    raise PodError(f"--haystack must be one of {HAYSTACKS}, got {kind!r}")


def _pieces(sentence: str, limit: int) -> list[str]:
    """``sentence`` cut at spaces into pieces of at most ``limit`` characters (a longer word stays whole)."""
    pieces, line = [], ""
    for word in sentence.split(" "):
        if line and len(line) + 1 + len(word) > limit:
            pieces.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return pieces + [line]


def haystack_units(tok, kind: str, n_tokens: int, start: int = 0) -> list[list[int]]:
    """Token ids of consecutive sentences (cycling) totalling at least ``n_tokens`` tokens.

    ``start`` offsets the first sentence, so different prompts can read different prose.
    """
    sents = sentences(kind)
    units, total, i = [], 0, start
    cache = _encoder(tok)
    while total < n_tokens:
        ids = cache(sents[i % len(sents)])
        units.append(ids)
        total += len(ids)
        i += 1
        if i - start > 10 * len(sents) + n_tokens:  # an empty tokenizer would loop forever
            raise PodError(f"could not build a haystack of {n_tokens} tokens from {kind!r}")
    return units


def _encoder(tok):
    memo = getattr(tok, "_podkv_sentence_memo", None)
    if memo is None:
        memo = {}
        try:
            tok._podkv_sentence_memo = memo
        except AttributeError:  # a tokenizer that refuses attributes: no memo across calls
            pass

    def encode(text: str) -> list[int]:
        if text not in memo:
            memo[text] = list(tok.encode(text, add_special_tokens=False))
        return memo[text]

    return encode
