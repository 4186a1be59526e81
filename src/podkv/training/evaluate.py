"""Held-out perplexity and passkey accuracy for training curves and the training table.

Thin callers of the evaluation package, so "perplexity" and "passkey" mean one thing in podkv:
the NLL is :func:`podkv.eval.scoring.window_nll`, the passkey prompts and their scoring are the
``passkey`` task's (:func:`podkv.eval.tasks.passkey_cases`). Both run the model exactly as users
do: perplexity through the cache-less forward (exact PoD attention), passkey through
``model.generate`` (a :class:`~podkv.PodCache` when PoD is on).
"""

from __future__ import annotations

import torch

from podkv.eval import tasks
from podkv.eval.scoring import window_nll


def heldout_nll(model, heldout: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> float:
    """Mean next-token NLL over ``heldout`` (N,) cut into ``seq_len`` windows (the last partial one kept)."""
    total, count = window_nll(model, heldout, seq_len, max_tokens=max_tokens)
    return total / max(count, 1)


@torch.no_grad()
def passkey_accuracy(model, tok, length: int, n: int = 4, seed: int = 0, max_new_tokens: int = 8) -> dict:
    """Fraction of ``n`` passkey prompts of ``length`` tokens (depths spread over (0, 1)) answered exactly."""
    task, hits, answers = tasks.Passkey(), 0, []
    for case in tasks.passkey_cases(tok, length, [(i + 0.5) / n for i in range(n)], seed):
        ids = torch.tensor([case.input_ids], device=model.device)  # (1, length)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += task.score(answer, case.answer)
        answers.append({"key": case.answer, "answer": answer.strip(), "tokens": ids.shape[1]})
    return {"length": length, "n": n, "accuracy": hits / n, "answers": answers}
