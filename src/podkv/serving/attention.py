"""PoD attention inside vLLM (stage 1, reference path): a CPU attention backend whose shared layers
read their anchor layer's paged keys for distant tokens.

Every layer keeps a full paged cache (no memory saved yet). An anchor layer's PoD attention is
plain causal attention (its own keys are its anchor's keys), so it runs vLLM's CPU kernel. A shared
layer gathers, per request, its own keys and values and its anchor's keys from the paged caches
and runs :func:`podkv.attention.chunked.pod_attention_chunked` -- the same math as
``podkv.enable_pod`` (paper §2.2). vLLM runs layers in order, so the anchor has already written
the current step's keys when a shared layer reads them.

Written against vLLM 0.32 (``vllm.v1.attention.backends.cpu_attn``); the CPU cache of one layer is
(num_blocks, H_kv, block_size, 2*D) and is read as keys | values halves along the token axis.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from podkv.attention.chunked import DEFAULT_CHUNK, KeySources, pod_attention_chunked
from podkv.serving.attention_names import BACKEND_NAME


class PodTorchBackend(CPUAttentionBackend):
    """vLLM's CPU attention backend with a PoD impl; same cache layout and metadata builder."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[PodTorchImpl]:
        return PodTorchImpl


class PodTorchImpl(CPUAttentionBackendImpl):
    """CPU attention for anchors; PoD attention over paged caches for shared layers.

    Extra keyword arguments (passed through ``vllm.Attention(**extra_impl_args)``):
    pod_anchor_layer (str or None: None = this layer is an anchor), pod_ns, pod_nr, pod_chunk.
    """

    def __init__(self, *args, pod_anchor_layer: str | None = None, pod_ns: int = 16, pod_nr: int = 240,
                 pod_chunk: int = DEFAULT_CHUNK, **kwargs):
        super().__init__(*args, **kwargs)
        self.pod_anchor_layer = pod_anchor_layer
        self.pod_ns, self.pod_nr, self.pod_chunk = pod_ns, pod_nr, pod_chunk

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query (N, Hq, D), key/value (N, H_kv, D) of this step's N tokens -> output (N, Hq, D)."""
        if attn_metadata is None or self.pod_anchor_layer is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        if getattr(layer, "isa", None) not in KEY_TRANSPOSED_ISAS:
            raise NotImplementedError(f"podkv's reference PoD path reads CPU caches of ISA {KEY_TRANSPOSED_ISAS}, "
                                      f"not {getattr(layer, 'isa', None)!r} (use dtype float32 or float16)")
        anchor_cache = get_forward_context().no_compile_layers[self.pod_anchor_layer].kv_cache
        if anchor_cache.shape != kv_cache.shape:
            raise RuntimeError(f"PoD anchor {self.pod_anchor_layer} has cache {tuple(anchor_cache.shape)}, "
                               f"this layer {tuple(kv_cache.shape)}: they must share one KV cache group")
        starts = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        for i, seq_len in enumerate(seq_lens):
            a, b = starts[i], starts[i + 1]
            if b <= a:
                continue
            blocks = attn_metadata.block_table[i]
            keys, values = paged_kv(kv_cache, blocks, seq_len)  # (1, H, T, D) each
            anchor_keys, _ = paged_kv(anchor_cache, blocks, seq_len)
            q = query[a:b].transpose(0, 1).unsqueeze(0)  # (1, Hq, Tq, D)
            out = self._pod(q, seq_len - (b - a), keys, values, anchor_keys)
            output[a:b] = out[0].transpose(0, 1).to(output.dtype)
        return output

    def _pod(self, q, q_start, keys, values, anchor_keys):
        H = keys.shape[1]
        src = KeySources(own_keys=keys, own_start=0, values=values,
                         anchor_keys=[(anchor_keys, h) for h in range(H)])
        pad = torch.zeros(1, dtype=torch.long, device=q.device)
        return pod_attention_chunked(q, q_start, src, pad=pad, ns=self.pod_ns, nr=self.pod_nr, scale=self.scale,
                                     chunk=self.pod_chunk)


# CPU kernels whose block layout paged_kv() reads (checked in tests/test_serving_vllm.py).
KEY_TRANSPOSED_ISAS = ("vec", "vec16")


def paged_kv(kv_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one request from a CPU paged cache.

    kv_cache (num_blocks, H, bs, 2D): per block and head, ``CPUAttentionBackendImpl`` keeps a key
    half then a value half; the "vec"/"vec16" kernels store the key half transposed, (D, bs), and
    the value half as (bs, D). blocks (max_blocks,) block ids -> two (1, H, seq_len, D).
    """
    nb, H, bs, _ = kv_cache.shape
    used = blocks[: -(-seq_len // bs)].long()
    kv = kv_cache.view(nb, H, 2 * bs, -1)[used]  # (n, H, 2bs, D)
    n, D = kv.shape[0], kv.shape[-1]
    k = kv[:, :, :bs].reshape(n, H, D, bs).permute(1, 0, 3, 2).reshape(H, n * bs, D)[:, :seq_len]
    v = kv[:, :, bs:].permute(1, 0, 2, 3).reshape(H, n * bs, D)[:, :seq_len]
    return k.unsqueeze(0), v.unsqueeze(0)
