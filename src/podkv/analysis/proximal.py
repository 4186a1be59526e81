"""Observation 1 of the paper: how often proximal tokens alone give the full model's next token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from podkv.analysis.probe import ProximalProbe, active


@dataclass
class ProximalTally:
    """Running sums for one proximal size over all evaluated positions."""

    agree: int = 0
    positions: int = 0
    nll: float = 0.0

    def as_dict(self, nll_full: float) -> dict:
        nll = self.nll / max(self.positions, 1)
        return {"agreement": self.agree / max(self.positions, 1), "nll": nll, "nll_delta": nll - nll_full,
                "positions": self.positions}


@dataclass
class ProximalStudy:
    """Greedy next-token agreement and NLL of proximal-only attention vs full attention.

    Every size is scored on the same positions ``[start, T - 1)`` with ``start`` = the largest size,
    so that every tested window really drops tokens there and the sizes compare like for like.
    """

    sizes: list[int]
    ns: int
    tallies: dict[int, ProximalTally] = field(default_factory=dict)
    full_nll: float = 0.0
    full_positions: int = 0

    @property
    def start(self) -> int:
        return max(self.sizes)

    def add_full(self, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """ids (1, T); logits (1, T - start, V) of the full model. Returns its greedy tokens (N,)."""
        logits, target = logits[0, :-1].float(), ids[0, self.start + 1:]
        self.full_nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        self.full_positions += target.numel()
        return logits.argmax(-1)

    def add_size(self, model, ids: torch.Tensor, size: int, full_greedy: torch.Tensor) -> None:
        """Run ``model`` (already probed) with proximal-only attention of ``size`` tokens on ids (1, T)."""
        T = ids.shape[1]
        with active(ProximalProbe(size=size, ns=self.ns)):
            logits = model(ids, use_cache=False, logits_to_keep=T - self.start).logits
        logits, target = logits[0, :-1].float(), ids[0, self.start + 1:]
        tally = self.tallies.setdefault(size, ProximalTally())
        tally.agree += int((logits.argmax(-1) == full_greedy).sum())
        tally.positions += target.numel()
        tally.nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))

    def result(self) -> dict:
        nll_full = self.full_nll / max(self.full_positions, 1)
        rows = [{"size": s, "ns": self.ns, "nr": s - self.ns, **self.tallies[s].as_dict(nll_full)}
                for s in self.sizes if s in self.tallies]
        return {"eval_positions_from": self.start, "nll_full": nll_full, "rows": rows}
