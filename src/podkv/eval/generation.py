"""One prompt through one method: prefill into the method's cache, measure it, then greedy-decode.

Decoding passes explicit positions because an evicting cache (kvpress) holds fewer tokens than
the prompt had, so the cache length no longer equals the next position (as kvpress's pipeline does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from podkv.cache.memory import cache_bytes, dense_kv_bytes
from podkv.eval.scoring import token_nll


@dataclass
class Prefilled:
    cache: object
    next_logits: torch.Tensor  # (B, V) logits for the token after the prompt
    kv_bytes: int  # measured from the cache right after prefill
    dense_bytes: int  # what a dense cache would hold for the same prompt
    seconds: float

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / self.dense_bytes


@torch.no_grad()
def prefill(model, method, input_ids: torch.Tensor) -> Prefilled:
    """Prefill ``input_ids`` (B, T) through ``method`` (already attached to ``model``)."""
    cache = method.new_cache(model)
    start = time.perf_counter()
    with method.prefill(model):
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    dense = dense_kv_bytes(model.config, input_ids.shape[1], input_ids.shape[0], model.dtype)
    return Prefilled(out.past_key_values, out.logits[:, -1].float(), cache_bytes(out.past_key_values), dense, seconds)


@torch.no_grad()
def greedy_answer(model, method, input_ids: torch.Tensor, max_new_tokens: int, eos_ids=()) -> tuple[list[int], Prefilled]:
    """Greedy continuation of one prompt (1, T): the generated ids and the prefill record."""
    pre = prefill(model, method, input_ids)
    T = input_ids.shape[1]
    token = pre.next_logits.argmax(-1)  # (1,)
    out = []
    for i in range(max_new_tokens):
        out.append(int(token))
        if out[-1] in eos_ids or i == max_new_tokens - 1:
            break
        pos = torch.tensor([[T + i]], device=input_ids.device)
        step = model(input_ids=token[:, None], past_key_values=pre.cache, position_ids=pos, cache_position=pos[0],
                     use_cache=True, logits_to_keep=1)
        token = step.logits[:, -1].argmax(-1)
    return out, pre


@torch.no_grad()
def continuation_nll(model, method, context: torch.Tensor, target: torch.Tensor) -> tuple[float, int, Prefilled]:
    """Summed NLL of ``target`` (1, S) given ``context`` (1, C) prefilled (and compressed) by ``method``.

    The first target token is scored from the prefill's last logits, the rest by one forward of
    the target over the method's cache.
    """
    pre = prefill(model, method, context)
    C = context.shape[1]
    pos = torch.arange(C, C + target.shape[1] - 1, device=context.device)[None]
    held = {layer.get_seq_length() for layer in getattr(pre.cache, "layers", [])} or {C}  # tokens each layer holds
    if len(held) > 1:  # per-layer budgets (PyramidKV): no one causal mask fits every layer: a token at a time
        logits = torch.cat([model(input_ids=target[:, i:i + 1], past_key_values=pre.cache, position_ids=pos[:, i:i + 1],
                                  cache_position=pos[0, i:i + 1], use_cache=True).logits.float()
                            for i in range(target.shape[1] - 1)], dim=1)
    else:
        # RoPE at the true positions, the causal mask over the cache's own slots: an evicting cache holds fewer
        # tokens than C, and a mask built from positions would let each target token see the ones after it
        slots = pos[0] - C + held.pop()
        logits = model(input_ids=target[:, :-1], past_key_values=pre.cache, position_ids=pos, cache_position=slots,
                       use_cache=True).logits.float()
    logits = torch.cat([pre.next_logits[:, None], logits], dim=1)  # (1, S, V)
    return token_nll(logits[0], target[0]), int(target.shape[1]), pre


def eos_ids(tok) -> tuple[int, ...]:
    ids = getattr(tok, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
