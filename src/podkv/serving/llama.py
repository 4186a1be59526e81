"""``PodLlamaForCausalLM``: vLLM's Llama with PoD attention (layer-granularity plans).

Only the attention layer changes: each decoder layer's ``vllm.Attention`` is built with
:class:`~podkv.serving.attention.PodTorchBackend` and told its anchor layer. Weights, RoPE, MLP
and sampling are vLLM's own, so a checkpoint loads unchanged.
"""

from __future__ import annotations

from dataclasses import replace

from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from podkv.serving.attention import PodSharedKVBackend, PodTorchBackend
from podkv.serving.checks import anchor_layer_name, kv_layout, layer_anchors, plan_for_serving


class PodAttention(Attention):
    """``vllm.Attention`` whose KV-cache spec follows the PoD plan (stage 2, ``pod_kv_layout="shared"``).

    An anchor of a block of B layers declares one page for [K | V x B]; another layer declares a
    :class:`~podkv.serving.kv_specs.PodProximalSpec` (its keys, sinks + recent window only).
    """

    def __init__(self, *args, pod_spec: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pod_spec = pod_spec

    def get_kv_cache_spec(self, vllm_config):
        spec = super().get_kv_cache_spec(vllm_config)
        if self.pod_spec is None or spec is None:
            return spec
        if self.pod_spec["anchor"]:
            return replace(spec, head_size_v=self.pod_spec["block_len"] * self.head_size)
        from podkv.serving.kv_specs import PodProximalSpec

        return PodProximalSpec(block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                               head_size_v=0, dtype=spec.dtype, kv_quant_mode=spec.kv_quant_mode,
                               sliding_window=self.pod_spec["nr"], sink_len=self.pod_spec["ns"])


class PodLlamaAttention(LlamaAttention):
    """LlamaAttention whose ``self.attn`` runs PoD attention (anchor from ``config.pod_plan``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config, prefix = kwargs["config"], kwargs.get("prefix", "")
        plan = plan_for_serving(config)
        layer = extract_layer_index(prefix)
        anchors = layer_anchors(plan)
        anchor = anchors[layer]
        shared = kv_layout(config) == "shared"
        pod_spec = None
        if shared:
            pod_spec = dict(anchor=anchor == layer, block_len=anchors.count(anchor), ns=plan.ns, nr=plan.nr)
        # LlamaAttention builds its Attention inline; rebuild it with our backend. The old one
        # registered its name in the static forward context, which must stay unique.
        context = get_current_vllm_config().compilation_config.static_forward_context
        context.pop(self.attn.layer_name, None)
        self.attn = PodAttention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
            cache_config=kwargs.get("cache_config"), quant_config=kwargs.get("quant_config"),
            prefix=f"{prefix}.attn", attn_backend=PodSharedKVBackend if shared else PodTorchBackend,
            pod_anchor_layer=None if anchor == layer else anchor_layer_name(prefix, layer, anchor),
            pod_ns=plan.ns, pod_nr=plan.nr, pod_shared_kv=shared, pod_block_pos=layer - anchor, pod_spec=pod_spec,
        )


class PodLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=PodLlamaAttention)


class PodLlamaForCausalLM(LlamaForCausalLM):
    """Llama family (Llama 2/3, SmolLM2) served with a PoD-L plan from ``config.pod_plan``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        plan_for_serving(vllm_config.model_config.hf_config)  # fail before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PodLlamaDecoderLayer)
