"""Held-out perplexity and a small passkey-retrieval check, used by training curves and the README table.

Both run a PoD-enabled model exactly as users do: perplexity through the cache-less forward
(exact PoD attention), passkey through ``model.generate`` (a :class:`~podkv.PodCache` by default).
"""

from __future__ import annotations

import math
import random

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


@torch.no_grad()
def heldout_nll(model, heldout: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> float:
    """Mean next-token NLL over ``heldout`` (N,) cut into ``seq_len`` blocks (the last partial block kept)."""
    ids = heldout if max_tokens is None else heldout[:max_tokens]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(ids) - 1, seq_len):
        block = ids[start:start + seq_len][None].to(device)  # (1, T)
        if block.shape[1] < 2:
            break
        out = model(input_ids=block, labels=block, use_cache=False)
        n = block.shape[1] - 1
        total += out.loss.float().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def perplexity(nll: float) -> float:
    return math.exp(nll)


def passkey_prompt(tok, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids (1, ~length) of filler text with the key sentence at relative ``depth`` in [0, 1]."""
    fixed = len(tok(INTRO + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tok(FILLER * 8, add_special_tokens=False)["input_ids"]) / 8
    n_fill = max(1, int((length - fixed) / per_filler))
    before = int(n_fill * depth)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_fill - before) + QUESTION
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def passkey_accuracy(model, tok, length: int, n: int = 4, seed: int = 0, max_new_tokens: int = 8) -> dict:
    """Fraction of ``n`` prompts (depths spread over (0, 1)) whose greedy answer contains the key."""
    rng = random.Random(seed + length)
    hits, answers = 0, []
    for i in range(n):
        key = rng.randint(10000, 99999)
        ids = passkey_prompt(tok, length, depth=(i + 0.5) / n, key=key)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits += str(key) in answer
        answers.append({"key": key, "answer": answer.strip(), "tokens": ids.shape[1]})
    return {"length": length, "n": n, "accuracy": hits / n, "answers": answers}
