"""Haystack text: repetitive filler (the classic passkey test) and real prose (pydoc_data).

A haystack is a list of token-id *units* (sentences), so a needle can be dropped between two
sentences and the prompt length controlled to the token.
"""

from __future__ import annotations

import re
from functools import lru_cache

from podkv.errors import PodError

# Mohtashami & Jaggi (2023), "Landmark Attention": the passkey filler.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("filler", "prose")


@lru_cache(maxsize=1)
def prose_text() -> str:
    """The Python docs topics shipped with the standard library (~465K characters), in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@lru_cache(maxsize=4)
def sentences(kind: str) -> tuple[str, ...]:
    """The haystack's sentences, each with its leading space, in reading order."""
    if kind == "filler":
        return tuple(" " + s for s in re.split(r"(?<=\.)\s+", FILLER))
    if kind == "prose":
        text = re.sub(r"\s+", " ", prose_text())
        return tuple(" " + s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip())
    raise PodError(f"--haystack must be one of {HAYSTACKS}, got {kind!r}")


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
