"""KV-head bookkeeping shared by the decode and prefill paths: address groups of heads as views.

A layer's heads may read keys from different anchor layers; running one attention call per group
of consecutive heads that read consecutive heads of one tensor keeps every operand a strided view.
"""

from __future__ import annotations

import torch


def head_runs(heads: list[int], index: list[int], owner: list | None = None):
    """Split positions of ``heads`` into runs whose heads are consecutive and whose ``index`` (into one
    ``owner`` tensor) is consecutive too, so each run is one strided view: yields (p0, p1), (j0, j1)."""
    owner = owner or [0] * len(heads)
    start = 0
    for n in range(1, len(heads) + 1):
        if n == len(heads) or heads[n] != heads[n - 1] + 1 or index[n] != index[n - 1] + 1 or owner[n] != owner[start]:
            yield (start, n), (index[start], index[n - 1] + 1)
            start = n


def _consecutive(heads: list[int]) -> bool:
    return heads == list(range(heads[0], heads[-1] + 1))


def select_heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """x[:, heads] as a view when the heads are consecutive (the common case), else a copy."""
    return x[:, heads[0]:heads[-1] + 1] if _consecutive(heads) else x[:, heads]


def put_heads(out: torch.Tensor, heads: list[int], value: torch.Tensor) -> None:
    """out[:, heads] = value, through a slice when the heads are consecutive."""
    if _consecutive(heads):
        out[:, heads[0]:heads[-1] + 1] = value
    else:
        out[:, heads] = value


def stacked_runs(order: list[int], first: int) -> list[tuple[int, int, int]]:
    """Head order of two stacked head sets, [first ``first`` heads | the rest], as runs (part, start, stop):
    ``order[h]`` is head h's position in the stack. Why: :func:`unstack` then puts heads back in order with
    one ``cat`` of slices, where stacking and an advanced index costs a copy more (batch-1 decode pays per op)."""
    runs: list[list[int]] = []
    for pos in order:
        part, i = (0, pos) if pos < first else (1, pos - first)
        if runs and runs[-1][0] == part and runs[-1][2] == i:
            runs[-1][2] = i + 1
        else:
            runs.append([part, i, i + 1])
    return [tuple(r) for r in runs]


def unstack(parts: tuple[torch.Tensor, torch.Tensor], runs) -> torch.Tensor:
    """The heads of ``parts`` (two tensors, heads on dim 1) in the order :func:`stacked_runs` describes."""
    if len(runs) == 1:
        part, a, b = runs[0]
        return parts[part][:, a:b]
    return torch.cat([parts[part][:, a:b] for part, a, b in runs], dim=1)
