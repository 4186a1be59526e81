"""``PodLlamaForCausalLM``: vLLM's Llama with PoD attention (layer-granularity plans).

Only the attention layer changes: each decoder layer's ``vllm.Attention`` is built with
:class:`~podkv.serving.attention.PodTorchBackend` and told its anchor layer. Weights, RoPE, MLP
and sampling are vLLM's own, so a checkpoint loads unchanged.
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from podkv.serving.attention import PodSharedKVBackend, PodTorchBackend
from podkv.serving.checks import (
    anchor_layer_name,
    kernel_layout,
    kv_layout,
    layer_anchors,
    plan_for_serving,
    proximal_layer_name,
)
from podkv.serving.kernel_layout import uniform_block_length
from podkv.serving.kv_specs import group_tags


class PodAttention(Attention):
    """``vllm.Attention`` whose KV-cache spec follows the PoD plan (stage 2, ``pod_kv_layout="shared"``).

    ``pod_spec``: None (stage 1: vLLM's own spec) or {"role": "anchor" | "values" | "proximal",
    "group": int, "ns": int, "nr": int} (:mod:`podkv.serving.kv_specs`).
    """

    def __init__(self, *args, pod_spec: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pod_spec = pod_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        if self.pod_spec is None or spec is None:
            return spec
        from podkv.serving.kv_specs import PodAnchorSpec, PodProximalSpec, PodValueSpec

        common = dict(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                      dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode, pod_group=self.pod_spec["group"])
        role = self.pod_spec["role"]
        if role == "anchor":  # [K | V] or, in the kernel layout, [K | V_a | ... | V_a+B-1]
            return PodAnchorSpec(head_size_v=self.head_size * self.pod_spec.get("value_tiles", 1), **common)
        if role == "values":
            return PodValueSpec(head_size_v=0, **common)
        return PodProximalSpec(head_size_v=0, sliding_window=self.pod_spec["nr"], sink_len=self.pod_spec["ns"],
                               **common)


class PodLlamaAttention(LlamaAttention):
    """LlamaAttention whose ``self.attn`` runs PoD attention (anchor from ``config.pod_plan``).

    Stage 2: a shared layer also owns ``self.pod_keys``, an attention module that is never called and
    only declares (and is bound to) the cache of the layer's proximal keys.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config, prefix = kwargs["config"], kwargs.get("prefix", "")
        plan = plan_for_serving(config)
        layer = extract_layer_index(prefix)
        anchors = layer_anchors(plan)
        anchor = anchors[layer]
        shared = kv_layout(config) == "shared"
        is_anchor = anchor == layer
        group = group_tags(anchors)[layer]
        spec = dict(group=group, ns=plan.ns, nr=plan.nr)
        kernel = shared and kernel_layout(config)
        block_len = uniform_block_length(anchors) if kernel else 1
        # LlamaAttention builds its Attention inline; rebuild it with our backend. The old one
        # registered its name in the static forward context, which must stay unique.
        context = get_current_vllm_config().compilation_config.static_forward_context
        context.pop(self.attn.layer_name, None)
        common = dict(num_kv_heads=self.num_kv_heads, cache_config=kwargs.get("cache_config"),
                      quant_config=kwargs.get("quant_config"),
                      attn_backend=PodSharedKVBackend if shared else PodTorchBackend,
                      pod_ns=plan.ns, pod_nr=plan.nr, pod_shared_kv=shared)
        if kernel:  # an anchor's page holds its block's values; a shared layer's own cache is its proximal keys
            common.update(pod_kernel=True, pod_block_pos=layer - anchor)
            role = {"role": "anchor", "value_tiles": block_len} if is_anchor else {"role": "proximal"}
        else:
            role = {"role": "anchor" if is_anchor else "values"}
        keys_name = proximal_layer_name(prefix) if shared and not is_anchor and not kernel else None
        # scores mode: an anchor with members runs its block's distant pass, a member uses it
        scores = plan.mode == "scores" and anchors.count(anchor) > 1
        self.attn = PodAttention(
            self.num_heads, self.head_dim, self.scaling, prefix=f"{prefix}.attn",
            pod_anchor_layer=None if is_anchor else anchor_layer_name(prefix, layer, anchor),
            pod_keys_layer=keys_name, pod_spec={**spec, **role} if shared else None, pod_scores=scores, **common)
        if keys_name is not None:
            self.pod_keys = PodAttention(self.num_heads, self.head_dim, self.scaling, prefix=keys_name,
                                         pod_spec={**spec, "role": "proximal"}, **common)


class PodLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=PodLlamaAttention)


class PodLlamaForCausalLM(LlamaForCausalLM):
    """Llama family (Llama 2/3, SmolLM2) served with a PoD-L plan from ``config.pod_plan``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        plan_for_serving(vllm_config.model_config.hf_config)  # fail before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PodLlamaDecoderLayer)
