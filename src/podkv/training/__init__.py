"""Post-training adaptation to a PoD plan (paper §2.2): ``podkv train`` / :func:`train`.

Modules, in the order data flows: ``config`` (TrainConfig) -> ``data`` (packed text, held-out
tail) -> ``trainable`` (which weights, LoRA) -> ``objectives`` (lm / distill Trainers) ->
``runner`` (Trainer, atomic save) -> ``deltas`` (the small shipped artifact) and ``evaluate``
(held-out perplexity, passkey). Heavy imports stay inside the functions.
"""


def train(config, callbacks=None):
    """Run one adaptation described by a :class:`podkv.training.config.TrainConfig`."""
    from podkv.training.runner import train as _train  # startup: transformers

    return _train(config, callbacks=callbacks)
