"""Tasks: each builds its cases once (same prompts for every method) and scores one case per call.

A task knows nothing about methods: ``run_case(model, tok, method, case)`` only calls the
method-agnostic helpers of :mod:`podkv.eval.generation`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from podkv.errors import PodError
from podkv.eval import prompts
from podkv.eval.generation import continuation_nll, eos_ids, greedy_answer
from podkv.eval.scoring import accuracy, exact_match, perplexity


@dataclass
class Case:
    input_ids: list[int]
    info: dict  # length, depth, ... (goes into the record)
    answer: str | list[str] | None = None
    split: int | None = None  # ppl: tokens of context before the scored continuation


class Task:
    """Base for generation tasks scored by exact match."""

    name: ClassVar[str]
    metric: ClassVar[str] = "accuracy"
    default_haystack: ClassVar[str] = "prose"

    def cases(self, tok, cfg, plan) -> list[Case]:
        raise NotImplementedError

    def run_case(self, model, tok, method, case: Case, cfg) -> dict:
        ids = torch.tensor([case.input_ids])
        out, pre = greedy_answer(model, method, ids, cfg.max_new_tokens, eos_ids(tok))
        text = tok.decode(out, skip_special_tokens=True)
        return {**case.info, "answer": case.answer, "generated": text, "correct": self.score(text, case.answer),
                "kv_bytes": pre.kv_bytes, "kv_fraction": pre.kv_fraction, "prefill_s": round(pre.seconds, 3)}

    def score(self, text: str, answer) -> bool:
        return exact_match(text, answer)

    def summarize(self, records: list[dict]) -> dict:
        by_len: dict[int, list] = {}
        grid: dict[str, list] = {}
        for r in records:
            by_len.setdefault(r["length"], []).append(r["correct"])
            grid.setdefault(f"{r['length']}@{r.get('depth', 0):g}", []).append(r["correct"])
        return {"accuracy": accuracy(r["correct"] for r in records),
                "by_length": {str(k): accuracy(v) for k, v in sorted(by_len.items())},
                "grid": {k: accuracy(v) for k, v in grid.items()},
                "kv_fraction": _mean(r["kv_fraction"] for r in records), "n": len(records)}


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


class Niah(NeedleTask):
    """Key-value fact needle; the runner draws the length x depth heatmap (paper Figure 3)."""

    name = "niah"


class MultiKey(NeedleTask):
    """RULER multikey: --needles facts with distinct keys; the asked one sits at the cell's depth."""

    name = "multikey"

    def placements(self, rng, depth, cfg):
        keys = rng.sample([f"{a}-{b}" for a in prompts.WORDS for b in prompts.WORDS if a != b], cfg.needles)
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
        text = _read_files(cfg.files) if cfg.files else prompts_prose()
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
        by_len: dict[int, list] = {}
        for r in records:
            by_len.setdefault(r["length"], []).append(r)
        ppl = lambda rs: perplexity(sum(r["nll"] for r in rs), sum(r["tokens"] for r in rs))  # noqa: E731
        return {"ppl": ppl(records), "by_length": {str(k): ppl(v) for k, v in sorted(by_len.items())},
                "kv_fraction": _mean(r["kv_fraction"] for r in records), "n": len(records)}


def prompts_prose() -> str:
    from podkv.eval.haystack import prose_text

    return prose_text()


def _read_files(paths) -> str:
    from pathlib import Path

    texts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise PodError(f"--files {p} does not exist")
        texts.append(p.read_text(errors="replace"))
    return "\n\n".join(texts)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _dataset_tasks() -> dict:
    from podkv.eval.datasets import LongBench, Ruler

    return {LongBench.name: LongBench, Ruler.name: Ruler}


TASKS: dict[str, type[Task]] = {t.name: t for t in (Perplexity, Passkey, Niah, MultiKey)} | _dataset_tasks()


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise PodError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
