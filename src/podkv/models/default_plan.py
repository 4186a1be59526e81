"""The plan a command runs when the user names none: one decision for `eval`, `demo` and `bench`.

Why one function: `podkv eval` and `podkv bench` once fell back to different uniform plans
(blocks of 3 vs 4), so "PoD" in an evaluation and in a benchmark of the same model could mean two
memory layouts. The order is the user's ``--plan``, then the model's own plan (an adapted model such
as ``smollm2-pod`` was trained for it), then the shipped SmolLM2 plan when it fits the model, then
uniform blocks of :data:`UNIFORM_BLOCK` layers.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from podkv.errors import PodError
from podkv.plan import SharingPlan, plan_from_config

SHIPPED_PLAN = "smollm2_plan_35.json"  # head-wise, 35.4% KV saving at 4K for the default model
UNIFORM_BLOCK = 4


def shipped_plan_path() -> Path:
    return Path(str(resources.files("podkv").joinpath("assets", SHIPPED_PLAN)))


def default_plan(config, path: str | Path | None = None) -> tuple[SharingPlan, str]:
    """The plan to run for a model with ``config`` and a label of where it came from.

    ``path`` (a plan JSON the user gave) wins and is validated for ``config``; a bad file is a
    one-line :class:`PodError`.
    """
    if path is not None:
        plan = SharingPlan.load(path)
        plan.validate_for(config)
        return plan, str(path)
    own = plan_from_config(config)
    if own is not None:
        return own, "the model's own plan (config.pod_plan)"
    shipped = shipped_plan_path()
    if shipped.is_file():
        plan = SharingPlan.load(shipped)
        try:
            plan.validate_for(config)
            return plan, f"podkv/assets/{SHIPPED_PLAN}"
        except PodError:
            pass  # a plan for another model: fall through to the uniform one
    return uniform_plan(config)


def uniform_plan(config) -> tuple[SharingPlan, str]:
    """Blocks of :data:`UNIFORM_BLOCK` layers; the paper's ns=16, nr=240, scaled down for short-context models
    (below 2048 positions), where 256 proximal tokens would leave nothing distant to share."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    ns, nr = (16, 240) if config.max_position_embeddings >= 2048 else (4, 28)
    plan = SharingPlan.uniform(config.num_hidden_layers, heads, UNIFORM_BLOCK, ns=ns, nr=nr)
    return plan, f"uniform(block={UNIFORM_BLOCK}, ns={ns}, nr={nr})"
