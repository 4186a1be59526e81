"""Evaluation harness: tasks (ppl, passkey, niah, multikey, RULER-style niah_*/vt, retrieval_logprob,
longbench, ruler) x KV methods (dense, PoD, kvpress baselines) on the same prompts, with the KV bytes each
method held and a 95% interval on every score (``podkv eval``, ``podkv demo``).

Flow: :class:`~podkv.eval.config.EvalConfig` -> :func:`podkv.eval.runner.run` (builds each task's cases
once, runs every method from :data:`~podkv.eval.methods.METHODS`) -> :mod:`podkv.eval.report`.
Synthetic tasks: :mod:`~podkv.eval.ruler`, :mod:`~podkv.eval.retrieval`; intervals: :mod:`~podkv.eval.stats`.
"""
