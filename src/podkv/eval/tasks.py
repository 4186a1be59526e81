"""Tasks: each builds its cases once (same prompts for every method) and scores one case per call.

A task knows nothing about methods: ``run_case(model, tok, method, case)`` only calls the
method-agnostic helpers of :mod:`podkv.eval.generation`.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from podkv.errors import PodError
from podkv.eval import prompts
from podkv.eval.datasets import LongBench, Ruler
from podkv.eval.generation import continuation_nll
from podkv.eval.haystack import prose_text
from podkv.eval.retrieval import RetrievalLogprob
from podkv.eval.ruler import RULER_TASKS
from podkv.eval.scoring import perplexity
from podkv.eval.stats import describe, mapped
from podkv.eval.task_base import Case, Task, by_length, per_length  # noqa: F401  (re-exported)
from podkv.texts import check_disjoint


class NeedleTask(Task):
    """Needles at ``cfg.depths`` in haystacks of ``cfg.lengths``; ``cfg.samples`` prompts per cell."""

    def placements(self, rng: random.Random, depth: float, cfg) -> tuple[list, int]:
        return [(prompts.fact_needle(rng), depth)], 0

    def cases(self, tok, cfg, plan) -> list[Case]:
        haystack = cfg.haystack or self.default_haystack
        out = []
        for length in cfg.lengths:
            for depth in cfg.depths_for(length):
                for s in range(cfg.samples):
                    rng = random.Random(f"{cfg.seed}-{self.name}-{length}-{depth}-{s}")
                    placed, ask = self.placements(rng, depth, cfg)
                    p = prompts.build_prompt(tok, length, placed, ask, haystack=haystack, seed=cfg.seed + s)
                    info = {"length": length, "depth": depth, "sample": s, "actual_depth": round(p.actual_depth, 4),
                            "needle_pos": p.needle_pos, "haystack": haystack}
                    out.append(Case(p.input_ids, info, p.answer))
        return out


class Passkey(NeedleTask):
    """Passkey retrieval: a 5-digit key in repetitive filler (Mohtashami & Jaggi, 2023)."""

    name, default_haystack = "passkey", "filler"

    def placements(self, rng, depth, cfg):
        return [(prompts.passkey_needle(rng), depth)], 0


def passkey_cases(tok, length: int, depths, seed: int = 0) -> list[Case]:
    """The passkey task's own prompts (``length`` tokens, one per depth) for callers outside the harness.

    Why one source: the training table (:func:`podkv.training.evaluate.passkey_accuracy`) and
    `podkv bench skip` score the same prompts, with :meth:`Passkey.score`, as `podkv eval passkey`.
    """
    from podkv.eval.config import EvalConfig  # cycle: podkv.eval.config

    cfg = EvalConfig(tasks=("passkey",), lengths=(length,), depths=tuple(depths), seed=seed)
    return Passkey().cases(tok, cfg, None)


class Niah(NeedleTask):
    """Key-value fact needle; the runner draws the length x depth heatmap (paper Figure 3)."""

    name = "niah"


class MultiKey(NeedleTask):
    """RULER multikey: --needles facts with distinct keys; the asked one sits at the cell's depth."""

    name = "multikey"

    def placements(self, rng, depth, cfg):
        keys = rng.sample(prompts.KEYS, cfg.needles)
        placed = [(prompts.fact_needle(rng, key=keys[0]), depth)]
        placed += [(prompts.fact_needle(rng, key=k), rng.random()) for k in keys[1:]]
        return placed, 0


class Perplexity(Task):
    """Perplexity of a document's second part given its first part prefilled (and compressed) by the method.

    Only positions beyond the proximal window (``ns + nr``) are scored: there PoD and the
    eviction methods differ from dense; inside it every method is exact.
    """

    name, metric = "ppl", "ppl"

    def cases(self, tok, cfg, plan) -> list[Case]:
        text = user_text(cfg.files) if cfg.files else prompts_prose()
        ids = list(tok.encode(text, add_special_tokens=False))
        proximal = plan.ns + plan.nr if plan is not None else 256
        out = []
        for length in cfg.lengths:
            split = max(length // 2, proximal)
            if split >= length:
                raise PodError(f"--lengths {length} is too short for ppl: positions beyond ns+nr={proximal} "
                               "are scored, so a window needs more tokens than that")
            if len(ids) < cfg.samples * length:
                raise PodError(f"the ppl text has {len(ids)} tokens; {cfg.samples} windows of {length} need more")
            for s in range(cfg.samples):
                window = ids[s * length:(s + 1) * length]
                out.append(Case(window, {"length": length, "sample": s, "scored_from": split}, split=split))
        return out

    def run_case(self, model, tok, method, case: Case, cfg) -> dict:
        ids = torch.tensor([case.input_ids])
        nll, n, pre = continuation_nll(model, method, ids[:, :case.split], ids[:, case.split:])
        return {**case.info, "nll": nll, "tokens": n, "ppl": perplexity(nll, n), "kv_bytes": pre.kv_bytes,
                "kv_fraction": pre.kv_fraction, "prefill_s": round(pre.seconds, 3)}

    def summarize(self, records: list[dict]) -> dict:
        """Token-weighted perplexity; its interval is exp of a bootstrap (over windows) of the mean NLL per token."""
        def stat(rs):
            nll = describe([r["nll"] / r["tokens"] for r in rs], binary=False, weights=[r["tokens"] for r in rs])
            return mapped(nll, math.exp)

        out = per_length(records, stat)
        out["ppl"] = perplexity(sum(r["nll"] for r in records), sum(r["tokens"] for r in records))
        return out


def prompts_prose() -> str:
    """The default ``ppl`` text: the held-out split (stdlib docstrings), never the train/plan help topics."""
    return prose_text()


def user_text(paths) -> str:
    """The text of ``--files``, refused (one-line :class:`PodError`) if it repeats the train/plan text."""
    texts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PodError(f"--files {p} does not exist")
        texts.append(p.read_text(errors="replace"))
    text = "\n\n".join(texts)
    check_disjoint(text, what="--files")
    return text


def _dataset_tasks() -> dict:
    return {LongBench.name: LongBench, Ruler.name: Ruler}


def _synthetic_tasks() -> dict:
    return {t.name: t for t in (*RULER_TASKS, RetrievalLogprob)}


TASKS: dict[str, type[Task]] = ({t.name: t for t in (Perplexity, Passkey, Niah, MultiKey)} | _dataset_tasks()
                                | _synthetic_tasks())


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise PodError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
