"""Gate skipping during decode (paper §2.3): skip a shared head's distant pass when its gate is predictable.

PoD's output for one query is ``o = g·oP + (1−g)·oD`` with ``g`` the proximal share of the attention
mass. When ``g`` is close to 1 the distant pass (the O(T) part of a decode step) barely moves ``o``.
For a head that borrows distant keys from its block's anchor layer, the anchor has already attended
earlier in the same step, so its gate is known before this layer runs. If the predicted gate is
``>= tau``, the layer attends over its proximal keys only.

Predictors (``GateSkipState.predictor``):
  * ``"anchor_gate"``: ĝ = the anchor layer's own gate for the same KV head and query head;
  * ``"anchor_lse"``: ĝ = σ(lseP_own − lseD_anchor): this layer's proximal log-mass against the
    anchor's distant log-mass (uses the fresh proximal pass, so it tracks this layer's query better).

The decode step is computed as two passes merged by their logsumexp, which is exactly the single
softmax of the chunked path (up to float rounding): ``tau > 1`` never skips and equals PoD;
``tau = 0`` skips every shared head's distant pass (proximal-only attention in shared heads).
Anchor heads always attend in full. Only the ``"keys"`` mode with a :class:`PodCache` is covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from podkv.attention.decode import decode_applies, pod_decode
from podkv.errors import PodError

PREDICTORS = ("anchor_gate", "anchor_lse")


@dataclass
class GateSkipState:
    """Counters and the anchor gates of the current decode step (one per model, in ``PodRuntime``)."""

    predictor: str = "anchor_gate"
    shared_passes: int = 0  # (layer, shared KV head, step) distant passes that could be skipped
    skipped_passes: int = 0  # ... that were skipped entirely (no distant keys read)
    anchor_passes: int = 0  # distant passes of anchor heads (never skipped)
    rows: int = 0  # (batch row, query head) decisions in shared heads
    rows_skipped: int = 0
    anchors: dict = field(default_factory=dict)  # (layer, head) -> (gate (B, G), distant lse (B, G))

    def __post_init__(self):
        if self.predictor not in PREDICTORS:
            raise PodError(f"gate-skip field 'predictor' must be one of {PREDICTORS}, got {self.predictor!r}")

    def reset(self) -> None:
        self.shared_passes = self.skipped_passes = self.anchor_passes = self.rows = self.rows_skipped = 0
        self.anchors.clear()

    def summary(self) -> dict:
        """Share of shared-head distant passes skipped, and of all distant passes (anchors included)."""
        total = self.shared_passes + self.anchor_passes
        return {"shared_passes": self.shared_passes, "skipped_passes": self.skipped_passes,
                "anchor_passes": self.anchor_passes,
                "skip_share_shared": self.skipped_passes / max(1, self.shared_passes),
                "skip_share_all": self.skipped_passes / max(1, total),
                "row_skip_share": self.rows_skipped / max(1, self.rows)}


def applies(runtime, step, query: torch.Tensor, anchor_query) -> bool:
    """Whether this attention call is a decode step that gate skipping handles."""
    return runtime.skip_tau is not None and decode_applies(step, query, anchor_query)


def decode_attention(step, query: torch.Tensor, key: torch.Tensor, scale: float, runtime) -> torch.Tensor:
    """One decode step of PoD attention with gate skipping (the LSE-merged step of decode.py).

    query (B, Hq, 1, D), key (B, Hkv, 1, D) the new token's keys (after ``PodCache.update``)
    -> (B, Hq, 1, D).
    """
    return pod_decode(step, query, key, scale, policy=_Policy(runtime.skip, runtime.skip_tau))


class _Policy:
    """Skip a shared head's distant pass where the predicted gate is >= tau; keeps the counters."""

    def __init__(self, state: GateSkipState, tau: float):
        self.state, self.tau = state, tau

    def skip(self, layer, head, anchor, lse_prox):
        s = self.state
        decision = _predict(s, anchor, head, lse_prox) >= self.tau
        s.shared_passes += 1
        s.rows, s.rows_skipped = s.rows + decision.numel(), s.rows_skipped + int(decision.sum())
        return decision

    def anchor_gate(self, layer, head, gate, lse_dist):
        self.state.anchor_passes += 1
        self.state.anchors[(layer, head)] = (gate, lse_dist)

    def skipped(self, passes):
        self.state.skipped_passes += passes


def _predict(state: GateSkipState, anchor: int, head: int, lse_p: torch.Tensor) -> torch.Tensor:
    """Predicted gate (B, G) of a shared head from its anchor's pass of this step; lse_p (B, G) own proximal."""
    known = state.anchors.get((anchor, head))
    if known is None:
        raise PodError(f"gate skipping found no gate of anchor layer {anchor} head {head} for this step; "
                       "the anchor must attend in the same decode step (use PodCache)")
    gate, lse_d = known
    if state.predictor == "anchor_gate":
        return gate
    return torch.sigmoid(lse_p - lse_d)
