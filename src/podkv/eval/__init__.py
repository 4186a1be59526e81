"""Evaluation harness: tasks (ppl, passkey, niah, multikey, longbench, ruler) x KV methods (dense, PoD,
kvpress baselines) on the same prompts, with the KV bytes each method held (``podkv eval``, ``podkv demo``).

Flow: :class:`~podkv.eval.config.EvalConfig` -> :func:`podkv.eval.runner.run` (builds each task's cases
once, runs every method from :data:`~podkv.eval.methods.METHODS`) -> :mod:`podkv.eval.report`.
"""
