"""Initialisations for adaptation: start a shared (layer, KV head) from its anchor's projections.

In ``keys`` mode a shared layer scores distant tokens with its own query against the anchor's
keys. Its untrained query lives in another layer's space, so the distant scores start as noise
(training-free perplexity explodes). Copying the anchor's query projection into the shared heads
makes ``q_l · k_anchor ≈ q_anchor · k_anchor`` — score sharing, the training-free variant — at
step 0, since consecutive layers read nearly the same residual stream. Copying the anchor's key
projection too makes the proximal scores consistent with that query (the whole pattern starts
as the anchor's, over the layer's own input). The RMSNorm gains differ per layer, so the copied
columns are rescaled by ``g_anchor / g_layer``.
"""

from __future__ import annotations

import torch

from podkv.errors import PodError
from podkv.models.enable import attention_modules, decoder_layers
from podkv.plan import SharingPlan

INITS = ("none", "anchor-q", "anchor-qk")


@torch.no_grad()
def init_from_anchor(model, plan: SharingPlan, init: str) -> int:
    """Overwrite the q (and k) rows of every shared (layer, KV head) by its anchor's. Returns heads changed."""
    if init not in INITS:
        raise PodError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if init == "none":
        return 0
    attn = attention_modules(model)
    layers = decoder_layers(model)
    d = attn[0].head_dim
    group = model.config.num_attention_heads // plan.num_kv_heads
    changed = 0
    for layer in range(plan.num_layers):
        for h in plan.shared_heads(layer):
            a = plan.anchors[layer][h]
            ratio = _gain(layers[a]) / _gain(layers[layer]).clamp_min(1e-3)  # (hidden,)
            q = slice(h * group * d, (h + 1) * group * d)
            attn[layer].q_proj.weight[q] = attn[a].q_proj.weight[q] * ratio
            if init == "anchor-qk":
                k = slice(h * d, (h + 1) * d)
                attn[layer].k_proj.weight[k] = attn[a].k_proj.weight[k] * ratio
            changed += 1
    return changed


def _gain(layer) -> torch.Tensor:
    return layer.input_layernorm.weight.float()
