"""The task contract every evaluation task implements, apart from the registry.

Why a module of its own: task modules (RULER-style, datasets, retrieval) subclass :class:`Task`
and :mod:`podkv.eval.tasks` imports them to build ``TASKS``; with the base in the registry module,
importing a task module first was a circular import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from podkv.eval.generation import eos_ids, greedy_answer
from podkv.eval.scoring import exact_match
from podkv.eval.stats import describe, weighted_mean


@dataclass
class Case:
    input_ids: list[int]
    info: dict  # length, depth, ... (goes into the record)
    answer: str | list[str] | None = None
    split: int | None = None  # ppl: tokens of context before the scored continuation


class Task:
    """Base for generation tasks scored by exact match.

    ``run_case`` records the per-prompt score under ``score_key``; ``summarize`` reports its mean with
    a 95% interval (Wilson when ``binary``, else bootstrap), overall and per length.
    """

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    default_haystack: ClassVar[str] = "prose"
    score_key: ClassVar[str] = "correct"
    binary: ClassVar[bool] = True  # every score is 0 or 1
    min_samples: ClassVar[int] = 1  # --samples below this is refused before any model loads
    max_new_tokens: ClassVar[int] = 12  # greedy tokens when --max-new-tokens is not given

    def cases(self, tok, cfg, plan) -> list[Case]:
        raise NotImplementedError

    def run_case(self, model, tok, method, case: Case, cfg) -> dict:
        ids = torch.tensor([case.input_ids])
        out, pre = greedy_answer(model, method, ids, cfg.max_new_tokens or self.max_new_tokens, eos_ids(tok))
        text = tok.decode(out, skip_special_tokens=True)
        return {**case.info, "answer": case.answer, "generated": text, self.score_key: self.score(text, case.answer),
                "kv_bytes": pre.kv_bytes, "kv_fraction": pre.kv_fraction, "prefill_s": round(pre.seconds, 3)}

    def score(self, text: str, answer) -> bool:
        return exact_match(text, answer)

    def summarize(self, records: list[dict]) -> dict:
        """Mean score with its 95% interval, overall and per length; mean score per (length, depth) cell."""
        out = per_length(records, lambda rs: describe([float(r[self.score_key]) for r in rs], self.binary))
        grid: dict[str, list] = {}
        for r in records:
            grid.setdefault(f"{r['length']}@{r.get('depth_bin', r.get('depth', 0)):g}", []).append(r[self.score_key])
        out["grid"] = {k: weighted_mean(v) for k, v in grid.items()}
        if self.metric == "accuracy":
            out["accuracy"] = out["mean"]
        return out


def by_length(records: list[dict], stat) -> dict:
    """``stat(records)`` (a dict with mean, ci95, n) overall, and under ``by_length`` per prompt length."""
    groups: dict[int, list] = {}
    for r in records:
        groups.setdefault(r["length"], []).append(r)
    return {**stat(records), "by_length": {str(k): stat(v) for k, v in sorted(groups.items())}}


def per_length(records: list[dict], stat) -> dict:
    """:func:`by_length` plus the mean KV fraction the method held."""
    return {**by_length(records, stat), "kv_fraction": weighted_mean(r["kv_fraction"] for r in records)}
