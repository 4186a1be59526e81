"""What vLLM can serve with PoD, checked before an engine starts (no vLLM import needed).

Every refusal is a :class:`~podkv.errors.PodError` naming the field and the bad value, so
``podkv serve-check`` and an engine start fail with the same one-line message.
"""

from __future__ import annotations

from podkv.errors import PodError
from podkv.plan import SharingPlan, plan_from_config

# HF architecture -> the PoD model class the plugin registers with vLLM's ModelRegistry.
POD_ARCHITECTURES = {"LlamaForCausalLM": "PodLlamaForCausalLM"}
SERVABLE_MODEL_TYPES = ("llama",)
DEFAULT_ARCHITECTURE = {"llama": "LlamaForCausalLM"}


def pod_architecture(config) -> str:
    """The PoD class name for ``config`` (raises for an architecture the plugin does not serve).

    A config without ``architectures`` (built in memory) is taken as its model type's causal LM.
    """
    archs = list(getattr(config, "architectures", None) or [])
    if archs and archs[0] in POD_ARCHITECTURES.values():
        return archs[0]
    model_type = getattr(config, "model_type", None)
    arch = archs[0] if archs else DEFAULT_ARCHITECTURE.get(model_type)
    if model_type not in SERVABLE_MODEL_TYPES or arch not in POD_ARCHITECTURES:
        raise PodError(
            f"unsupported architecture for PoD serving: model_type={model_type!r}, architectures={archs}; "
            f"podkv.serving supports {', '.join(POD_ARCHITECTURES)} (model_type {', '.join(SERVABLE_MODEL_TYPES)})"
        )
    return POD_ARCHITECTURES[arch]


def check_plan_servable(plan: SharingPlan, config) -> SharingPlan:
    """Raise a :class:`PodError` unless vLLM can serve ``plan`` on a model with ``config``.

    Checks, in order: the architecture, the plan's shape against the model (layers, KV heads,
    positions), layer granularity (PoD-L: one anchor per layer, every KV head alike) and the
    sharing mode (``"keys"``, paper §2.2, or ``"scores"``).
    """
    pod_architecture(config)
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        raise PodError(f"config.sliding_window={window}: PoD needs full attention (the window is PoD's own nr)")
    plan.validate_for(config)
    problems = unservable_features(plan)
    if problems:
        raise PodError("; ".join(problems))
    return plan


SERVABLE_MODES = ("keys", "scores")


def unservable_features(plan: SharingPlan) -> list[str]:
    """What keeps ``plan`` from vLLM beyond its shape: head-wise anchors (either mode: vLLM's KV cache groups
    need one page size, and a head-wise layer would need a page per KV head role, docs/serving.md), window-only
    pairs, a mode other than keys or scores."""
    problems = []
    if not plan.is_layer_granular:
        bad = next(l for l, row in enumerate(plan.anchors) if len(set(row)) > 1)
        problems.append(f"plan field 'anchors[{bad}]' = {plan.anchors[bad]} is head-wise (mode {plan.mode!r}): vLLM "
                        "serving needs a layer-granularity plan (every KV head of a layer shares one anchor); make "
                        "one with `podkv analyze --granularity layer`")
    if getattr(plan, "has_window", False):  # a window pair is its own anchor: served as full attention, wrongly
        layer, head = next((l, h) for l in range(plan.num_layers) for h in range(plan.num_kv_heads)
                           if plan.is_window(l, h))
        problems.append(f"plan field 'policies[{layer}][{head}]' = 'window': vLLM serving does not serve window-only "
                        "pairs (PoD pairs 'anchor' and 'shared' only)")
    if plan.mode not in SERVABLE_MODES:
        problems.append(f"plan field 'mode' = {plan.mode!r}: vLLM serving supports modes {SERVABLE_MODES}")
    return problems


def check_layout_servable(plan: SharingPlan, config) -> None:
    """Raise a :class:`PodError` for a plan the chosen KV layout cannot serve: mode "scores" needs the anchor's
    query next to the member layer's (the shared layout's torch path); stage 1 ("full") runs mode "keys" only."""
    if plan.mode == "scores" and kv_layout(config) != "shared":
        raise PodError(f"config field 'pod_kv_layout' = {kv_layout(config)!r}: a plan of mode 'scores' is served on "
                       "the shared layout only (drop pod_kv_layout, or use a plan of mode 'keys')")


def plan_for_serving(config) -> SharingPlan:
    """The plan in ``config.pod_plan``, checked for serving."""
    plan = plan_from_config(config)
    if plan is None:
        raise PodError(
            "the model config has no 'pod_plan': pass one with podkv.serving.engine.pod_hf_overrides(plan) "
            "or write it into config.json with `podkv serve-check --write-checkpoint`"
        )
    check_plan_servable(plan, config)
    check_layout_servable(plan, config)
    return plan


KV_LAYOUTS = ("shared", "full")


def kv_layout(config) -> str:
    """``config.pod_kv_layout``: "shared" (stage 2, default: anchors hold the block's values, other
    layers only proximal keys) or "full" (stage 1: every layer keeps a full paged K/V cache)."""
    layout = getattr(config, "pod_kv_layout", None) or "shared"
    if layout not in KV_LAYOUTS:
        raise PodError(f"config field 'pod_kv_layout' = {layout!r}: expected one of {KV_LAYOUTS}")
    return layout


def kernel_layout(config) -> bool:
    """``config.pod_kv_kernel``: the shared layout in vLLM's CPU kernel format (:mod:`podkv.serving.kernel_layout`).
    The plugin's config hook sets it where the plan's blocks are uniform, the dtype float32 and the block size a
    multiple of 32; ``hf_overrides={"pod_kv_kernel": False}`` keeps the gather path."""
    return kv_layout(config) == "shared" and bool(getattr(config, "pod_kv_kernel", False))


def layer_anchors(plan: SharingPlan) -> list[int]:
    """Anchor layer of every layer of a layer-granularity plan."""
    return [row[0] for row in plan.anchors]


def anchor_layer_name(prefix: str, layer: int, anchor: int) -> str:
    """'model.layers.5.self_attn' with anchor 4 -> 'model.layers.4.self_attn.attn' (vLLM's layer names)."""
    marker = f"layers.{layer}."
    head, _, tail = (prefix + ".").rpartition(marker)
    return f"{head}layers.{anchor}.{tail}attn"


def proximal_layer_name(prefix: str) -> str:
    """'model.layers.5.self_attn' -> 'model.layers.5.self_attn.pod_keys' (the cache of a shared layer's
    proximal keys, stage 2)."""
    return f"{prefix}.pod_keys"
