"""Scores: exact match of greedy answers, RULER's string_match_all, and perplexity from summed NLLs."""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"\d+")


def exact_match(generated: str, answer: str) -> bool:
    """Whether ``generated`` gives ``answer``.

    Numeric answers (passkeys, magic numbers) must be the *first* number in the output, exactly:
    ``"71432."`` matches 71432, ``"7143"`` or ``"12345 71432"`` do not. Other answers must start
    the output, ignoring case, surrounding spaces and punctuation.
    """
    if answer.isdigit():
        found = _NUMBER.search(generated.replace(",", ""))
        return found is not None and found.group(0) == answer
    norm = re.sub(r"^[\s\W]+", "", generated).lower()
    return bool(answer) and norm.startswith(answer.strip().lower())


def string_match_all(generated: str, references) -> float:
    """RULER's per-sample score: the fraction of ``references`` found, ignoring case, anywhere in ``generated``.

    Partial credit is the point: a method that recalls 3 of 4 values differs from one that recalls none.
    """
    references = [references] if isinstance(references, str) else list(references)
    if not references:
        raise ValueError("string_match_all needs at least one reference")
    text = generated.lower()
    return sum(r.lower() in text for r in references) / len(references)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood) over ``n_tokens`` scored tokens."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / n_tokens)

