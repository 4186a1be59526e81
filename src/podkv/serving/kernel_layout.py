"""The "kernel" KV layout: PoD on vLLM's own CPU attention kernel, for plans whose blocks all have B layers.

Why: the gather path (:mod:`podkv.serving.batched`) copies every request's keys and values out of the paged
caches in every layer and every step; on CPU that copy costs more than vLLM's kernel reads in place (1K
tokens x 16 requests: ~5 ms gather + SDPA against ~0.6 ms kernel per layer). Here an anchor's page holds
its whole block in the kernel's own format, so the kernel reads it in place:

* anchor page per (block, KV head): ``[K_a tile | V_a tile | V_a+1 tile | ... | V_a+B-1 tile]``, each tile
  ``block_size x D`` elements. ``cpu_attn_reshape_and_cache`` writes the key tile (the "vec"/"vec16"
  kernels store it transposed, ``(D, block_size)``) and the anchor's value tile; a shared layer ``a + j``
  writes its values into tile ``1 + j`` through the anchor's slot mapping. The kernel takes its key and
  value caches as separate strided views, so ``(key tile, value tile j)`` is layer ``a + j``'s cache.
* a shared layer keeps its own keys only for sinks and the recent window (a ``PodProximalSpec`` cache).

Decode of a shared layer is then exact PoD on the kernel: PoD attention is attention over ``K_eff``, the
anchor's keys with the layer's own keys at the proximal positions (sinks + window of each query). With one
query per request the proximal positions are fixed for the call, so the layer writes its own keys into the
anchor's key tile there (``(R, ns + nr)`` keys, not ``(R, T)``), runs the kernel, and writes the anchor's
saved keys back in a ``finally`` (:func:`swap_keys`), so an exception never leaves them swapped (one more
tile copy per shared layer and step than restoring once per block). The same holds for a prefill chunk of
a request with ``seq_len <= ns + nr`` (every key proximal for every query). Longer prefill chunks (queries with
different windows) run :func:`podkv.attention.chunked.pod_attention_chunked` on gathered copies.

Capacity is the wide layout's: the proximal caches' blocks are ``(1 + B)`` anchor blocks, so the kernel's
block size (a multiple of 32) makes their per-request reservation larger than with 16-token blocks.
"""

from __future__ import annotations

import torch

# CPU kernels whose key tile is stored transposed, (D, block_size), and value tile (block_size, D).
KERNEL_ISAS = ("vec", "vec16")
KERNEL_BLOCK_MULTIPLE = 32


def uniform_block_length(anchors: list[int]) -> int | None:
    """B when every block of the layer plan has B layers (anchors ``[0]*B + [B]*B + ...``), else None."""
    starts = [l for l, a in enumerate(anchors) if a == l]
    lengths = {b - a for a, b in zip(starts, starts[1:] + [len(anchors)])}
    return lengths.pop() if len(lengths) == 1 else None


class PageViews:
    """Views of one anchor's page tensor (num_blocks, H, block_size, (1 + B) * D) as vLLM allocates it."""

    def __init__(self, cache: torch.Tensor, head_size: int):
        self.cache = cache
        nb, H, bs, width = cache.shape
        self.block_size, self.D = bs, head_size
        self.tiles = width // head_size  # 1 + B
        tiles = cache.view(nb, H, self.tiles * bs, head_size)
        self.key = tiles[:, :, :bs]  # what the kernel calls key_cache (its memory: (D, bs) per block and head)
        self.values = [tiles[:, :, (1 + j) * bs:(2 + j) * bs] for j in range(self.tiles - 1)]
        # the key tile read as what it holds: (nb, H, D, bs)
        self.key_t = cache.view(nb, H, self.tiles * bs * head_size)[:, :, :bs * head_size].view(nb, H, head_size, bs)

    def write_values(self, j: int, slots: torch.Tensor, value: torch.Tensor) -> None:
        """Layer ``a + j``'s values (N, H, D) at slots (N,) of the anchor's group."""
        slots = slots.long()
        self.values[j][slots // self.block_size, :, slots % self.block_size] = value.to(self.values[j].dtype)

    def put_keys(self, blocks: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor) -> None:
        """Overwrite the key tile at (block, offset) pairs (N,) with keys (N, H, D)."""
        self.key_t[blocks, :, :, offsets] = keys.to(self.key_t.dtype)

    def gather(self, block_row: torch.Tensor, length: int, j: int | None = None) -> torch.Tensor:
        """One request's first ``length`` anchor keys (j None) or layer ``a + j``'s values -> (1, H, length, D)."""
        used = block_row[: -(-length // self.block_size)].long()
        if j is None:
            x = self.key_t[used].permute(1, 0, 3, 2)  # (H, n, bs, D)
        else:
            x = self.values[j][used].permute(1, 0, 2, 3)
        return x.reshape(x.shape[0], -1, self.D)[:, :length].unsqueeze(0)


def page_views(layer, head_size: int) -> PageViews:
    """The :class:`PageViews` of an anchor attention module's cache, made once per cache tensor: every layer
    asks for its anchor's page twice a step (write, attend), and a view costs a few microseconds."""
    page = getattr(layer, "_podkv_page", None)
    if page is None or page.cache is not layer.kv_cache:
        page = layer._podkv_page = PageViews(layer.kv_cache, head_size)
    return page


def check_isa(layer, path: str, fix: str) -> None:
    """podkv's readers of vLLM's CPU pages (stage 1, the kernel layout) assume the "vec"/"vec16" tile format."""
    isa = getattr(layer, "isa", None)
    if isa not in KERNEL_ISAS:
        raise NotImplementedError(f"podkv's {path} reads CPU caches of ISA {KERNEL_ISAS}, not {isa!r} ({fix})")


def swap_keys(page: PageViews, blocks: torch.Tensor, offsets: torch.Tensor, touched: torch.Tensor,
              own: torch.Tensor) -> torch.Tensor:
    """Put a shared layer's own keys (N, H, D) at the proximal (block, offset) pairs of the anchor's key tile.

    Returns the anchor's key tiles of the ``touched`` blocks (``blocks.unique()``), ``(n, H, D, block_size)``,
    for :func:`restore_keys` to write back. Whole tiles, not single keys: a tile is one contiguous copy, a key
    D scattered ones.
    """
    saved = page.key_t.index_select(0, touched)
    page.put_keys(blocks, offsets, own)
    return saved


def restore_keys(page: PageViews, touched: torch.Tensor, saved: torch.Tensor) -> None:
    """Write back the anchor key tiles :func:`swap_keys` returned."""
    page.key_t.index_copy_(0, touched, saved)


def kernel_attention(query, page: PageViews, j: int, out, query_start_loc, seq_lens, block_table, scheduler_metadata,
                     scale: float) -> None:
    """vLLM's CPU paged attention (causal) of layer ``a + j`` over the anchor's page, into ``out``."""
    from vllm import _custom_ops as ops

    ops.cpu_attention_with_kv_cache(query=query, key_cache=page.key, value_cache=page.values[j], output=out,
                                    query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
                                    alibi_slopes=None, sliding_window=-1, block_table=block_table, softcap=0.0,
                                    scheduler_metadata=scheduler_metadata, s_aux=None)


def decode_metadata(seq_lens: torch.Tensor, q_lens: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                    head_dim: int, dtype, isa: str):
    """(query_start_loc, scheduler metadata) for a subset of a step's requests, ``q_lens`` query tokens each
    (None: one each, decoding), at the end of sequences of ``seq_lens`` tokens."""
    from vllm import _custom_ops as ops
    from vllm import envs

    starts = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32)
    starts[1:] = 1 if q_lens is None else q_lens
    starts = torch.cumsum(starts, 0, dtype=torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=int(seq_lens.shape[0]), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        seq_lens=seq_lens, dtype=dtype, query_start_loc=starts, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
    return starts, meta
