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

from podkv.serving.attention import PodTorchBackend
from podkv.serving.checks import anchor_layer_name, layer_anchors, plan_for_serving


class PodLlamaAttention(LlamaAttention):
    """LlamaAttention whose ``self.attn`` runs PoD attention (anchor from ``config.pod_plan``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config, prefix = kwargs["config"], kwargs.get("prefix", "")
        plan = plan_for_serving(config)
        layer = extract_layer_index(prefix)
        anchor = layer_anchors(plan)[layer]
        # LlamaAttention builds its Attention inline; rebuild it with our backend. The old one
        # registered its name in the static forward context, which must stay unique.
        context = get_current_vllm_config().compilation_config.static_forward_context
        context.pop(self.attn.layer_name, None)
        self.attn = Attention(
            self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
            cache_config=kwargs.get("cache_config"), quant_config=kwargs.get("quant_config"),
            prefix=f"{prefix}.attn", attn_backend=PodTorchBackend,
            pod_anchor_layer=None if anchor == layer else anchor_layer_name(prefix, layer, anchor),
            pod_ns=plan.ns, pod_nr=plan.nr,
        )


class PodLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None):
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config, attn_layer_type=PodLlamaAttention)


class PodLlamaForCausalLM(LlamaForCausalLM):
    """Llama family (Llama 2/3, SmolLM2) served with a PoD-L plan from ``config.pod_plan``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        plan_for_serving(vllm_config.model_config.hf_config)  # fail before any weight is allocated
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PodLlamaDecoderLayer)
