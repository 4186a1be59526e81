"""A registered attention function that observes a forward pass without changing it (paper §2.1).

Two probes share one function, ``"podkv_probe"``:
  * :class:`DistantProbe` records, per layer, the attention of the last ``Q`` queries over
    *distant* tokens (neither the ``ns`` sinks nor the ``nr`` most recent), renormalised over the
    distant positions. Only a (Hq, Q, T) score block is formed per layer; the layer output is
    still the stock SDPA, so memory stays O(Q·T) instead of O(T²).
  * :class:`ProximalProbe` makes every query attend to proximal tokens only (sinks + recent
    window) through a boolean mask: observation 1 of the paper.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

PROBE_NAME = "podkv_probe"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("podkv_probe", default=None)


@dataclass
class DistantProbe:
    """Collects ``attn[layer]`` = (Hq, Q, T - nr - ns) distant-token distributions of the last Q queries."""

    last_q: int
    ns: int
    nr: int
    attn: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query (1, Hq, T, D), key (1, Hkv, T, D) -> stores (Hq, Q, T - nr - ns)."""
        T, hq = key.shape[2], query.shape[1]
        q = query[0, :, -self.last_q:]  # (Hq, Q, D)
        # Distant keys of query t are j in [ns, t - nr]; the widest range is the last query's.
        k = key[0].repeat_interleave(hq // key.shape[1], dim=0)[:, self.ns:T - self.nr]  # (Hq, Dd, D)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # (Hq, Q, Dd)
        t = torch.arange(T - self.last_q, T, device=q.device)[:, None]  # absolute query positions
        j = torch.arange(self.ns, T - self.nr, device=q.device)[None, :]
        scores = scores.masked_fill(j > t - self.nr, float("-inf"))
        # softmax over the distant subset == full softmax renormalised over it (and never 0/0).
        self.attn[layer] = torch.softmax(scores, dim=-1)


@dataclass
class ProximalProbe:
    """Restrict every query to ``ns`` sinks + a recent window of ``size - ns`` tokens (query included)."""

    size: int
    ns: int
    _mask: torch.Tensor | None = None

    def mask(self, T: int, device) -> torch.Tensor:
        """(1, 1, T, T) boolean, True = may attend."""
        if self._mask is None or self._mask.shape[-1] != T:
            t = torch.arange(T, device=device)[:, None]
            j = torch.arange(T, device=device)[None, :]
            keep = (j <= t) & ((j < self.ns) | (j > t - (self.size - self.ns)))
            self._mask = keep[None, None]
        return self._mask


def probe_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention signature; observes (DistantProbe) or masks (ProximalProbe), then runs SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # startup: transformers

    probe = _ACTIVE.get()
    scale = module.scaling if scaling is None else scaling
    if hasattr(probe, "observe"):  # DistantProbe, analysis.retrieval.RowProbe
        probe.observe(module.layer_idx, query, key, scale)
    elif isinstance(probe, ProximalProbe):
        attention_mask = probe.mask(key.shape[2], key.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scale, **kwargs)


@contextmanager
def probed(model):
    """Switch ``model`` to the probe attention for the duration of the block (undone on exit)."""
    from transformers import AttentionInterface  # startup: transformers

    AttentionInterface.register(PROBE_NAME, probe_attention_forward)
    saved = model.config._attn_implementation
    model.set_attn_implementation(PROBE_NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(saved)


@contextmanager
def active(probe):
    """Make ``probe`` the one the probe attention uses inside the block."""
    token = _ACTIVE.set(probe)
    try:
        yield probe
    finally:
        _ACTIVE.reset(token)
