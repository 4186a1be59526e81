"""The proximal store's slot layout: which cache index each slot holds, and how a step or a crop moves it.

A sharing head keeps its own keys only for proximal tokens (paper §2.3): ``ns`` sink slots (the
first ``ns`` real tokens of each row) and a ring of ``window`` slots for the most recent tokens,
token ``j`` in ring slot ``j % window``. ``window = nr + crop_margin``: attention reads the last
``nr``; the margin only lets :meth:`PodCache.crop` roll back exactly (see pod_cache.py).

Slots are matched to tokens by cache index, never by arithmetic on the previous layout, so a slot
whose token is not available (after a crop or a compaction) is simply marked empty (-1) and is
masked by attention like padding.
"""

from __future__ import annotations

import torch

from podkv.errors import PodError


def layout(after: int, pad: torch.Tensor, ns: int, window: int) -> torch.Tensor:
    """Cache index each slot should hold after ``after`` tokens: (B, min(after, ns + window)), -1 = none."""
    B, device = pad.shape[0], pad.device
    if after <= ns + window:  # still short: every token, in order
        return torch.arange(after, device=device).expand(B, -1)
    sinks = pad[:, None] + torch.arange(ns, device=device)[None]
    sinks = torch.where(sinks < after, sinks, -1)
    recent = torch.arange(after - window, after, device=device)
    ring = torch.empty_like(recent)
    ring[recent % window] = recent  # slot j % window, like a ring buffer: a step moves one slot
    ring = ring.expand(B, -1).clone()
    ring[(ring - pad[:, None]) < ns] = -1  # a sink (or padding) is held in its sink slot only
    return torch.cat([sinks, ring], dim=1)  # (B, ns + window)


def transition(old_idx, before: int, after: int, pad: torch.Tensor, ns: int, window: int):
    """Slots after a step that adds tokens [before, after), and where each one's key comes from.

    old_idx : (B, n) or None
        Slot indices before the step (None: empty store).
    Returns new_idx (B, n') and pos (B, n'): position of each slot's token in [old slots | new tokens].
    """
    new_idx = layout(after, pad, ns, window)
    if old_idx is None and after <= ns + window:
        return new_idx, torch.arange(after, device=pad.device).expand(pad.shape[0], -1)
    new_tokens = torch.arange(before, after, device=pad.device).expand(pad.shape[0], -1)
    cand = new_tokens if old_idx is None else torch.cat([old_idx, new_tokens], dim=1)
    return _match(new_idx, cand)


def crop(old_idx: torch.Tensor, length: int, pad: torch.Tensor, ns: int, nr: int, window: int):
    """Slots after keeping only tokens [0, length): new_idx (B, n') and pos (B, n') into ``old_idx``.

    Raises a PodError when a token that the next query reads as proximal is no longer held: its key
    was evicted from the ring, and no exact value can be restored.
    """
    want = layout(length, pad, ns, window)
    new_idx, pos = _match(want, old_idx)
    real = want >= pad[:, None]
    needed = real & (((want - pad[:, None]) < ns) | (want > length - nr))  # proximal for the query at `length`
    missing = needed & (new_idx < 0)
    if bool(missing.any()):
        first = int(want[missing].min())
        raise PodError(f"PodCache.crop({length}): the key of token {first}, proximal for the next token, was "
                       f"already evicted from the {window}-token window (nr={nr} + crop_margin={window - nr}); "
                       "build the cache with PodCache(config, crop_margin=M) to crop up to M+1 tokens back")
    return new_idx, pos


def _match(new_idx: torch.Tensor, cand: torch.Tensor):
    """For each wanted index, its position in ``cand`` (B, K); wanted indices not in ``cand`` become -1."""
    match = (new_idx[:, :, None] == cand[:, None, :]) & (new_idx[:, :, None] >= 0)
    pos = match.to(torch.int8).argmax(dim=-1)
    return torch.where(match.any(dim=-1), new_idx, -1), pos
