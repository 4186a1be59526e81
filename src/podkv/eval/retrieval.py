"""``retrieval_logprob``: how much probability a method leaves on the needle's value, teacher-forced.

Why: a greedy answer is right or wrong, so telling two methods apart takes many prompts. The
log-probability of the right value is continuous: it moves when a method blurs the needle even if the
greedy answer does not change, and its interval narrows with few samples. The prompts are exactly
those of ``niah_single_prose`` (same seed family); the value's tokens are scored by
:func:`podkv.eval.generation.continuation_nll` after the method prefilled (and compressed) the prompt.
"""

from __future__ import annotations

import math

import torch

from podkv.eval.generation import continuation_nll
from podkv.eval.ruler import NiahSingleProse
from podkv.eval.stats import describe
from podkv.eval.task_base import Case, by_length


class RetrievalLogprob(NiahSingleProse):
    """Teacher-forced log-probability of the needle's value on the niah_single_prose prompts."""

    name, metric, score_key, binary = "retrieval_logprob", "logprob_per_token", "logprob_per_token", False
    prompt_family = NiahSingleProse.name

    def run_case(self, model, tok, method, case: Case, cfg) -> dict:
        """Score the value's tokens; separator tokens before it (a lone space) join the context, unscored."""
        answer = case.answer[0]
        ids = list(tok.encode(" " + answer, add_special_tokens=False))
        k = 0
        while k < len(ids) - 1 and not tok.decode(ids[k:k + 1]).strip():
            k += 1
        context, target = torch.tensor([case.input_ids + ids[:k]]), torch.tensor([ids[k:]])
        nll, n, pre = continuation_nll(model, method, context, target)
        return {**case.info, "answer": case.answer, "answer_tokens": n, "logprob_per_token": -nll / n,
                "p_answer": math.exp(-nll), "kv_bytes": pre.kv_bytes, "kv_fraction": pre.kv_fraction,
                "prefill_s": round(pre.seconds, 3)}

    def summarize(self, records: list[dict]) -> dict:
        """Mean log-prob per answer token (bootstrap interval); the answer's mean probability under ``also``."""
        out = super().summarize(records)
        del out["grid"]  # log-probs are not on the [0, 1] scale of the heatmaps
        out["also"] = {"p(answer)": {"metric": "probability",
                                     **by_length(records, lambda rs: describe([r["p_answer"] for r in rs], False))}}
        return out
