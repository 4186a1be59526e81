"""PoD attention inside vLLM: a CPU attention backend whose shared layers read their anchor
layer's paged keys for distant tokens (reference path: per-request PyTorch over gathered caches).

Two KV layouts (``config.pod_kv_layout``):

* ``"shared"`` (stage 2, default; :class:`PodSharedKVBackend`): the anchor of a block of B layers owns
  one page per token and KV head, ``[K_a | V_a | ... | V_a+B-1]`` (token-major, written and read
  here, never by vLLM's kernel); a non-anchor layer owns only a proximal-key cache (sinks + recent
  window, :mod:`podkv.serving.kv_specs`) and writes its values into its column of the anchor's page.
  Every layer (anchors too) runs :func:`podkv.attention.chunked.pod_attention_chunked`.
* ``"full"`` (stage 1; :class:`PodTorchBackend`): every layer keeps vLLM's full CPU cache
  (num_blocks, H_kv, block_size, 2*D), read as keys | values halves along the token axis; anchors
  run vLLM's CPU kernel, shared layers gather and run the same PoD function.

vLLM runs layers in order, so the anchor has already written the current step's keys when a shared
layer reads them. Written against vLLM 0.32 (``vllm.v1.attention.backends.cpu_attn``).
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.v1.attention.backend import MultipleOf
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


class PodSharedKVBackend(PodTorchBackend):
    """Stage 2 (shared KV layout): the PoD impl reads and writes every cache itself (never vLLM's CPU
    kernel), so any block size that is a multiple of 8 works; small blocks keep the proximal-key
    caches' block rounding small (their block is ``(1 + B) x`` the anchor's)."""

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(8)]


class PodTorchImpl(CPUAttentionBackendImpl):
    """CPU attention for anchors; PoD attention over paged caches for shared layers.

    Extra keyword arguments (passed through ``vllm.Attention(**extra_impl_args)``):
    pod_anchor_layer (str or None: None = this layer is an anchor), pod_ns, pod_nr, pod_chunk.
    """

    def __init__(self, *args, pod_anchor_layer: str | None = None, pod_ns: int = 16, pod_nr: int = 240,
                 pod_chunk: int = DEFAULT_CHUNK, pod_shared_kv: bool = False, pod_block_pos: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pod_anchor_layer = pod_anchor_layer
        self.pod_ns, self.pod_nr, self.pod_chunk = pod_ns, pod_nr, pod_chunk
        # Stage 2 (podkv.serving.kv_specs): the anchor's page holds [K | V of every layer of the block];
        # this layer's values sit at column block (1 + pod_block_pos); a non-anchor keeps proximal keys only.
        self.pod_shared_kv, self.pod_block_pos = pod_shared_kv, pod_block_pos

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self.pod_shared_kv:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        D = self.head_size
        if self.pod_anchor_layer is None:
            write_slots(kv_cache, slot_mapping, key, 0)
            write_slots(kv_cache, slot_mapping, value, D)
            return
        ctx = get_forward_context()
        write_slots(kv_cache, slot_mapping, key, 0)  # proximal-key cache: (blocks, H, bs, D)
        anchor_slots = ctx.slot_mapping.get(self.pod_anchor_layer)
        if anchor_slots is None:
            raise RuntimeError(f"PoD: no slot mapping for anchor {self.pod_anchor_layer} in this forward pass")
        write_slots(ctx.no_compile_layers[self.pod_anchor_layer].kv_cache, anchor_slots, value,
                    (1 + self.pod_block_pos) * D)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query (N, Hq, D), key/value (N, H_kv, D) of this step's N tokens -> output (N, Hq, D)."""
        if attn_metadata is not None and self.pod_shared_kv:
            return self._forward_shared(query, kv_cache, attn_metadata, output)
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

    def _forward_shared(self, query, kv_cache, attn_metadata, output):
        """Stage 2: every layer reads its block's page (anchor keys, its own values) and, if it is not
        the anchor, its proximal keys (sinks + recent window; freed blocks read as garbage, never used)."""
        D, j = self.head_size, self.pod_block_pos
        if self.pod_anchor_layer is None:
            anchor_cache, anchor_meta = kv_cache, attn_metadata
        else:
            ctx = get_forward_context()
            anchor_cache = ctx.no_compile_layers[self.pod_anchor_layer].kv_cache
            anchor_meta = ctx.attn_metadata[self.pod_anchor_layer]
        starts = attn_metadata.query_start_loc.tolist()
        for i, seq_len in enumerate(attn_metadata.seq_lens.tolist()):
            a, b = starts[i], starts[i + 1]
            if b <= a:
                continue
            anchor_keys = gather_columns(anchor_cache, anchor_meta.block_table[i], seq_len, 0, D)
            values = gather_columns(anchor_cache, anchor_meta.block_table[i], seq_len, (1 + j) * D, (2 + j) * D)
            keys = anchor_keys if self.pod_anchor_layer is None else \
                gather_columns(kv_cache, attn_metadata.block_table[i], seq_len, 0, D)
            q = query[a:b].transpose(0, 1).unsqueeze(0)
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
    # contiguous: podkv.attention.lse.attend_lse (aten's CPU flash kernel) is wrong on keys whose last dim
    # is strided, which a transposed (D, bs) tile gives for a single block
    k = kv[:, :, :bs].reshape(n, H, D, bs).permute(1, 0, 3, 2).reshape(H, n * bs, D)[:, :seq_len].contiguous()
    v = kv[:, :, bs:].permute(1, 0, 2, 3).reshape(H, n * bs, D)[:, :seq_len]
    return k.unsqueeze(0), v.unsqueeze(0)


def write_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, col: int) -> None:
    """Stage-2 layout: cache (num_blocks, H, bs, C) token-major; x (N, H, D) -> cache[slot, :, col:col+D]."""
    nb, H, bs, _ = cache.shape
    n = slots.shape[0]
    slots = slots.long()
    keep = slots >= 0  # padded tokens carry slot -1
    if not bool(keep.all()):
        slots, x = slots[keep], x[:n][keep]
    cache[slots // bs, :, slots % bs, col:col + x.shape[-1]] = x[:n].to(cache.dtype)


def gather_columns(cache: torch.Tensor, blocks: torch.Tensor, seq_len: int, c0: int, c1: int) -> torch.Tensor:
    """Columns [c0, c1) of one request's first ``seq_len`` tokens -> (1, H, seq_len, c1-c0)."""
    nb, H, bs, _ = cache.shape
    used = blocks[: -(-seq_len // bs)].long()
    x = cache[used, :, :, c0:c1]  # (n, H, bs, d)
    n = x.shape[0]
    return x.permute(1, 0, 2, 3).reshape(H, n * bs, c1 - c0)[:, :seq_len].unsqueeze(0)
