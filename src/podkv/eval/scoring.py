"""Scores: exact match of greedy answers, RULER's string_match_all, and the one perplexity (NLL over windows).

Every perplexity in podkv comes from here: the ``ppl`` task and ``retrieval_logprob`` (a continuation
after a method's prefill), training's held-out curve (:func:`window_nll`), and `podkv bench skip`
(NLL of decode steps) all sum :func:`token_nll` and report :func:`perplexity`.
"""

from __future__ import annotations

import math
import re

import torch

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



def token_nll(logits, targets) -> float:
    """Summed negative log-likelihood of ``targets`` (T,) under ``logits`` (T, V), computed in fp32."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))


def window_nll(model, ids, length: int, skip: int = 0, max_tokens: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL and the count of scored tokens of ``ids`` (N,) cut into ``length``-token windows.

    One cache-less forward per window (exact attention of whatever the model runs, PoD included); the
    last partial window is kept. Only positions ``>= skip`` inside a window are scored: with ``skip =
    ns + nr`` the score counts only tokens where PoD differs from dense. ``max_tokens`` cuts ``ids`` first.
    """
    if length < 2 or skip < 0 or skip >= length - 1:
        raise ValueError(f"window_nll needs length >= 2 and 0 <= skip < length - 1, got length={length}, skip={skip}")
    ids = ids if max_tokens is None else ids[:max_tokens]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(ids) - 1, length):
                window = ids[start:start + length][None].to(device)  # (1, T)
                keep = window.shape[1] - 1 - skip  # scored positions: skip+1 .. T-1
                if keep < 1:
                    break
                logits = model(input_ids=window, use_cache=False, logits_to_keep=keep + 1).logits[0, :-1]
                total += token_nll(logits, window[0, skip + 1:])
                count += keep
    finally:
        model.train(was_training)
    return total, count
