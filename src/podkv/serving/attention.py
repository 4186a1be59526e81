"""PoD attention inside vLLM: a CPU attention backend whose shared layers read their anchor
layer's paged keys for distant tokens.

Two KV layouts (``config.pod_kv_layout``):

* ``"shared"`` (stage 2, default; :class:`PodSharedKVBackend`): an anchor keeps ``[K | V]`` pages, a shared
  layer keeps its values (full length) and, in a second cache ``<layer>.pod_keys``, its proximal keys
  (sinks + recent window) (:mod:`podkv.serving.kv_specs`). Pages are token-major and written and read
  here only, never by vLLM's kernel. Decoding requests of a step go through one batched call per layer
  (:func:`podkv.serving.batched.pod_decode`); prefill chunks run
  :func:`podkv.attention.chunked.pod_attention_chunked` one request at a time. Mode "scores": an anchor computes
  its block's distant softmax once per step for its decode rows and for prefill chunks of at most nr tokens, and
  each member merges it with its proximal pass; longer chunks take the general path with the anchor's query.
* ``"full"`` (stage 1; :class:`PodTorchBackend`): every layer keeps vLLM's full CPU cache
  (num_blocks, H_kv, block_size, 2*D), read as keys | values halves along the token axis; anchors
  run vLLM's CPU kernel, shared layers gather and run the same PoD function per request.

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
from podkv.serving.batched import (
    all_proximal,
    by_kv_head,
    causal_attention,
    chunk_masks,
    chunk_rows,
    decode_attention,
    decode_positions,
    distant_mask,
    distant_softmax,
    flat_positions,
    gather_rows,
    proximal_positions,
    proximal_unique,
    scores_chunk,
    scores_decode,
    token_index,
    token_rows,
    write_own_keys,
)
from podkv.serving.kernel_layout import (PageViews, check_isa, decode_metadata, kernel_attention, page_views,
                                         restore_keys, swap_keys)


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
    pod_anchor_layer (str or None: None = this layer is an anchor), pod_ns, pod_nr, pod_chunk,
    pod_shared_kv (stage 2), pod_keys_layer (stage 2, shared layers: the attention module holding the
    proximal-key cache), pod_scores (mode "scores", a block of more than one layer; gather layout only: an
    anchor shares its query and its decode rows' distant softmax with its block, a member reads them).
    """

    def __init__(self, *args, pod_anchor_layer: str | None = None, pod_ns: int = 16, pod_nr: int = 240,
                 pod_chunk: int = DEFAULT_CHUNK, pod_shared_kv: bool = False, pod_keys_layer: str | None = None,
                 pod_kernel: bool = False, pod_block_pos: int = 0, pod_scores: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if pod_scores and (pod_kernel or not pod_shared_kv):  # the config hook refuses these first
            raise RuntimeError("PoD scores mode runs on the shared KV layout's gather path only")
        self.pod_scores = pod_scores
        self.pod_anchor_layer = pod_anchor_layer
        self.pod_ns, self.pod_nr, self.pod_chunk = pod_ns, pod_nr, pod_chunk
        self.pod_shared_kv, self.pod_keys_layer = pod_shared_kv, pod_keys_layer
        # kernel layout (podkv.serving.kernel_layout): this layer's place in its block
        self.pod_kernel, self.pod_block_pos = pod_kernel, pod_block_pos
        # An anchor's keys of the current decode step (gathered once, read by its block's shared layers) and
        # the K_eff buffer those layers share: (step, anchor keys, K_eff or None).
        self.step_keys: tuple | None = None

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not self.pod_shared_kv:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        ctx = get_forward_context()
        meta = ctx.attn_metadata.get(layer.layer_name) if isinstance(ctx.attn_metadata, dict) else None
        # tokens of this pass; vLLM may pad the batch after them (slot -1)
        n = self._step(ctx, meta).n_tokens if meta is not None else int((slot_mapping >= 0).sum())
        if self.pod_kernel:
            return self._update_kernel_layout(layer, ctx, key[:n], value[:n], kv_cache, slot_mapping[:n])
        if self.pod_anchor_layer is None:  # [K | V] rows
            write_rows(kv_cache, slot_mapping[:n], key[:n], 0)
            write_rows(kv_cache, slot_mapping[:n], value[:n], self.head_size)
            return
        write_rows(kv_cache, slot_mapping[:n], value[:n], 0)  # values rows (.., H, D)
        keys_slots = ctx.slot_mapping.get(self.pod_keys_layer)
        if keys_slots is None:
            raise RuntimeError(f"PoD: no slot mapping for {self.pod_keys_layer} in this forward pass")
        write_rows(ctx.no_compile_layers[self.pod_keys_layer].kv_cache, keys_slots[:n], key[:n], 0)

    def _update_kernel_layout(self, layer, ctx, key, value, kv_cache, slots) -> None:
        """Anchor: K and V through vLLM's own writer (its key-tile format). Shared layer ``a + j``: values into
        tile ``1 + j`` of the anchor's page (anchor's slots), keys into its proximal cache (token rows)."""
        if self.pod_anchor_layer is None:
            from vllm import _custom_ops as ops

            check_isa(layer, KERNEL_PATH, KERNEL_FIX)
            page = page_views(layer, self.head_size)
            ops.cpu_attn_reshape_and_cache(key, value, page.key, page.values[0], slots, layer.isa)
            return
        anchor = ctx.no_compile_layers[self.pod_anchor_layer]
        page = page_views(anchor, self.head_size)
        page.write_values(self.pod_block_pos, ctx.slot_mapping[self.pod_anchor_layer][:key.shape[0]], value)
        write_rows(kv_cache, slots, key, 0)

    def _step(self, ctx, meta) -> Step:
        """This forward pass's :class:`Step`, made by its first PoD layer (a new ForwardContext every pass)."""
        step = getattr(ctx, "podkv_step", None)
        if step is None:
            step = ctx.podkv_step = Step(meta, self.pod_ns, self.pod_nr, kernel=self.pod_kernel)
        return step

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query (N, Hq, D), key/value (N, H_kv, D) of this step's N tokens -> output (N, Hq, D)."""
        if attn_metadata is not None and self.pod_kernel:
            return self._forward_kernel(layer, query, kv_cache, attn_metadata, output)
        if attn_metadata is not None and self.pod_shared_kv:
            return self._forward_shared(layer.layer_name, query, kv_cache, attn_metadata, output)
        if attn_metadata is None or self.pod_anchor_layer is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        check_isa(layer, "reference PoD path", "use dtype float32 or float16")
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

    def _forward_kernel(self, layer, query, kv_cache, meta, output):
        """Kernel layout: an anchor is one kernel call (PoD of an anchor is causal attention); a shared layer
        runs its prefill chunks on gathered copies and its decoding requests on the kernel, with its own keys
        swapped into the anchor's key tile at their proximal positions."""
        if self.pod_anchor_layer is None:
            n = meta.num_actual_tokens
            kernel_attention(query[:n], page_views(layer, self.head_size), 0, output[:n], meta.query_start_loc,
                             meta.seq_lens, meta.block_table, meta.scheduler_metadata, self.scale)
            return output
        ctx = get_forward_context()
        anchor = ctx.no_compile_layers[self.pod_anchor_layer]
        anchor_meta = ctx.attn_metadata[self.pod_anchor_layer]
        page = page_views(anchor, self.head_size)
        step = self._step(ctx, meta)
        for i, a, b in step.prefills:
            output[a:b] = self._prefill_kernel(query[a:b], i, page, kv_cache, meta, anchor_meta).to(output.dtype)
        if step.decode_tokens is not None:
            self._decode_kernel(step, query, output, page, anchor, kv_cache, meta, anchor_meta)
        return output

    def _decode_kernel(self, step: Step, query, output, page: PageViews, anchor, kv_cache, meta, anchor_meta):
        d = step.kernel_decode(anchor_meta, page.block_size, query.shape[1], self.num_kv_heads, self.head_size,
                               query.dtype, anchor.isa)
        own = gather_rows(token_rows(kv_cache), step.index(meta, kv_cache, proximal=True))  # (R, P, H, D)
        saved = swap_keys(page, d.blocks, d.offsets, d.touched, own.reshape(-1, *own.shape[2:]))
        try:
            q = query[step.decode_tokens]
            out = torch.empty_like(q)
            kernel_attention(q, page, self.pod_block_pos, out, d.query_start_loc, d.seq_lens, d.block_table,
                             d.scheduler_metadata, self.scale)
            output[step.decode_tokens] = out.to(output.dtype)
        finally:  # the anchor's keys back whatever happened: a failed step must not corrupt every later one
            restore_keys(page, d.touched, saved)

    def _prefill_kernel(self, q, i, page: PageViews, kv_cache, meta, anchor_meta):
        """Request ``i``'s query chunk q (Tq, Hq, D) of shared layer ``a + j`` -> (Tq, Hq, D); only chunks with
        distant keys come here (``seq_len > ns + nr``; :class:`Step` runs the others on the kernel)."""
        seq_len = int(meta.seq_lens[i])
        row = anchor_meta.block_table[i]
        own = gather(kv_cache, meta.block_table[i:i + 1], seq_len)  # (1, L, H, D); freed rows: never read
        values = page.gather(row, seq_len, self.pod_block_pos)  # (1, H, L, D)
        out = self._pod(q.transpose(0, 1).unsqueeze(0), seq_len - q.shape[0], own.transpose(1, 2), values,
                        page.gather(row, seq_len))
        return out[0].transpose(0, 1)

    def _forward_shared(self, name: str, query, kv_cache, meta, output):
        """Stage 2: decoding requests in one batched call, prefill chunks one request at a time. Scores mode: an
        anchor leaves its query (post-RoPE, this pass's N tokens) in the Step for its members' prefill chunks."""
        step = self._step(get_forward_context(), meta)
        if self.pod_scores and self.pod_anchor_layer is None:
            step.anchor_queries[name] = query
        if step.decode_tokens is not None:
            out = self._decode(name, step, query[step.decode_tokens], kv_cache, meta)
            output[step.decode_tokens] = out.to(output.dtype)
        for i, a, b in step.prefills:
            output[a:b] = self._prefill_chunk(name, step, query[a:b], i, a, kv_cache, meta).to(output.dtype)
        return output

    def _prefill_chunk(self, name: str, step: Step, q, i: int, a: int, kv_cache, meta):
        """Request ``i``'s prefill chunk q (Tq, Hq, D), its first token at ``a`` of this pass -> (Tq, Hq, D). Scores
        mode: a chunk of at most nr queries with distant keys takes the block pass (:meth:`_prefill_block`), a longer
        one the general path with the anchor's query of the same tokens (the distant probabilities of every query
        would be Tq x L per head, kept until the block's last layer)."""
        if not self.pod_scores:
            return self._prefill(q, i, kv_cache, meta)
        if q.shape[0] <= self.pod_nr and not all_proximal(int(meta.seq_lens[i]), self.pod_ns, self.pod_nr):
            return self._prefill_block(name, step, q, i, kv_cache, meta)
        anchor_query = None
        if self.pod_anchor_layer is not None:
            anchor_query = step.block_input(step.anchor_queries, self.pod_anchor_layer)[a:a + q.shape[0]]
        return self._prefill(q, i, kv_cache, meta, anchor_query)

    def _prefill_block(self, name: str, step: Step, q, i: int, kv_cache, meta):
        """Scores mode, a chunk of at most nr queries: its distant tokens come from earlier steps, so the anchor runs
        the chunk's distant softmax once for its block, and every layer of the block, the anchor included (its own
        keys are the anchor's: causal attention), merges it with its proximal pass. q (Tq, Hq, D) -> (Tq, Hq, D)."""
        D, H, seq_len = self.head_size, self.num_kv_heads, int(meta.seq_lens[i])
        pos, keep, distant_rows = chunk_masks(seq_len, q.shape[0], self.pod_ns, self.pod_nr, q.shape[1] // H, q.device)
        kv = gather(kv_cache, meta.block_table[i:i + 1], seq_len)[0]  # (L, H, C): [K_a | V_a] or V_m
        if self.pod_anchor_layer is None:
            step.block_distant[(name, i)] = distant_softmax(chunk_rows(q, H), kv[..., :D].transpose(0, 1)[None],
                                                            distant_rows, self.scale)
            own = kv[pos, :, :D]
        else:  # own keys at the sinks and the chunk's windows, from the proximal-key cache
            _, _, keys_cache, keys_meta = self._caches(kv_cache, meta)
            index = token_index(keys_meta.block_table[i:i + 1], pos[None], keys_cache.shape[2])
            own = gather_rows(token_rows(keys_cache), index)[0]  # (P, H, D)
        distant = step.block_input(step.block_distant, (self.pod_anchor_layer or name, i))
        return scores_chunk(q, own, kv[..., -D:], pos, keep, distant, self.scale)

    def _caches(self, kv_cache, meta):
        """(anchor [K | V] cache, its metadata, proximal-key cache, its metadata) for this layer."""
        if self.pod_anchor_layer is None:
            return kv_cache, meta, None, None
        ctx = get_forward_context()
        return (ctx.no_compile_layers[self.pod_anchor_layer].kv_cache, ctx.attn_metadata[self.pod_anchor_layer],
                ctx.no_compile_layers[self.pod_keys_layer].kv_cache, ctx.attn_metadata[self.pod_keys_layer])

    def _decode(self, name: str, step: Step, q, kv_cache, meta):
        """q (R, Hq, D) of the step's decoding requests -> (R, Hq, D). Scores mode: an anchor also runs its
        block's distant pass (:func:`~podkv.serving.batched.distant_softmax`), once for all its members."""
        D = self.head_size
        if self.pod_anchor_layer is None:
            kv = gather_rows(token_rows(kv_cache), step.index(meta, kv_cache))  # (R, T, H, 2D)
            self.step_keys = (step, kv[..., :D], None)
            if self.pod_scores:
                distant = step.scores_masks()[0][:, None, None, :]
                step.block_distant[name] = distant_softmax(by_kv_head(q, self.num_kv_heads),
                                                           kv[..., :D].transpose(1, 2), distant, self.scale)
            return decode_attention(q, kv[..., :D], kv[..., D:], step.visible, self.scale)
        if self.pod_scores:
            return self._decode_scores(step, q, kv_cache, meta)
        anchor_cache, anchor_meta, keys_cache, keys_meta = self._caches(kv_cache, meta)
        anchor = get_forward_context().no_compile_layers[self.pod_anchor_layer].impl
        if anchor.step_keys is None or anchor.step_keys[0] is not step:  # not expected: anchors run first
            rows = gather_rows(token_rows(anchor_cache), step.index(anchor_meta, anchor_cache))
            anchor.step_keys = (step, rows[..., :D], None)
        _, anchor_keys, keys = anchor.step_keys
        if keys is None:
            keys = anchor_keys.clone()
            anchor.step_keys = (step, anchor_keys, keys)
        own = gather_rows(token_rows(keys_cache), step.index(keys_meta, keys_cache, proximal=True))  # (R, P, H, D)
        write_own_keys(keys, own, step.proximal_rows)
        values = gather_rows(token_rows(kv_cache), step.index(meta, kv_cache))
        return decode_attention(q, keys, values, step.visible, self.scale)

    def _decode_scores(self, step: Step, q, kv_cache, meta):
        """Scores mode, member layer: its proximal pass (own keys at sinks + window) merged with its block's
        distant softmax, which weights this layer's values. q (R, Hq, D) -> (R, Hq, D)."""
        _, _, keys_cache, keys_meta = self._caches(kv_cache, meta)
        _, keep = step.scores_masks()
        own = gather_rows(token_rows(keys_cache), step.index(keys_meta, keys_cache, proximal=True))  # (R, P, H, D)
        values = gather_rows(token_rows(kv_cache), step.index(meta, kv_cache))  # (R, T, H, D)
        own_values = gather_rows(values.view(-1, *values.shape[2:]), step.proximal_rows.view(own.shape[:2]))
        distant = step.block_input(step.block_distant, self.pod_anchor_layer)
        return scores_decode(q, own, own_values, keep, values, distant, self.scale)

    def _prefill(self, q, i, kv_cache, meta, anchor_query=None):
        """Request ``i``'s query chunk q (Tq, Hq, D) -> (Tq, Hq, D), through podkv's own PoD function;
        ``anchor_query`` (Tq, Hq, D): scores mode (the general path, every chunk length)."""
        D = self.head_size
        seq_len = int(meta.seq_lens[i])
        anchor_cache, anchor_meta, keys_cache, keys_meta = self._caches(kv_cache, meta)
        if all_proximal(seq_len, self.pod_ns, self.pod_nr):  # every key proximal: causal attention over the layer's own
            if self.pod_anchor_layer is None:
                kv = gather(kv_cache, meta.block_table[i:i + 1], seq_len)[0]
                return causal_attention(q, kv[..., :D], kv[..., D:], self.scale)
            keys = gather(keys_cache, keys_meta.block_table[i:i + 1], seq_len)[0]
            return causal_attention(q, keys, gather(kv_cache, meta.block_table[i:i + 1], seq_len)[0], self.scale)
        anchor_kv = gather(anchor_cache, anchor_meta.block_table[i:i + 1], seq_len)  # (1, L, H, C)
        if self.pod_anchor_layer is None:
            keys, values = anchor_kv[..., :D], anchor_kv[..., D:]
        else:  # own keys outside the sinks and the window are freed blocks: PoD never reads them
            keys = gather(keys_cache, keys_meta.block_table[i:i + 1], seq_len)
            values = gather(kv_cache, meta.block_table[i:i + 1], seq_len)
        out = self._pod(q.transpose(0, 1).unsqueeze(0), seq_len - q.shape[0], keys.transpose(1, 2),
                        values.transpose(1, 2), anchor_kv[..., :D].transpose(1, 2), anchor_query)
        return out[0].transpose(0, 1)

    def _pod(self, q, q_start, keys, values, anchor_keys, anchor_query=None):
        """One request: q (1, Hq, Tq, D); keys, values, anchor_keys (1, H, L, D); anchor_query (Tq, Hq, D) or None."""
        H = keys.shape[1]
        src = KeySources(own_keys=keys, own_start=0, values=values,
                         anchor_keys=[(anchor_keys, h) for h in range(H)])
        pad = torch.zeros(1, dtype=torch.long, device=q.device)
        q_anchor = None if anchor_query is None else anchor_query.transpose(0, 1).unsqueeze(0)
        return pod_attention_chunked(q, q_start, src, pad=pad, ns=self.pod_ns, nr=self.pod_nr, scale=self.scale,
                                     anchor_query=q_anchor, chunk=self.pod_chunk)


KERNEL_PATH, KERNEL_FIX = "kernel layout", "serve in float32, or with hf_overrides pod_kv_kernel=False"


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


def write_rows(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, col: int) -> None:
    """Stage-2 layout (:func:`~podkv.serving.batched.token_rows`): x (N, H, d) -> rows ``slots`` (N,),
    columns [col, col + d)."""
    token_rows(cache)[:, :, col:col + x.shape[-1]].index_copy_(0, slots.long(), x.to(cache.dtype))


def gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` token rows of each request: block_table (R, max_blocks) -> (R, length, H, C)."""
    pos = torch.arange(length, device=cache.device)[None, :].expand(block_table.shape[0], -1)
    return gather_rows(token_rows(cache), token_index(block_table, pos, cache.shape[2]))


class Step:
    """What the PoD layers of one forward pass share (kept on vLLM's ForwardContext, new every pass): which
    requests run batched (``rows``: one query token each; with ``kernel=True`` also prefill chunks whose every
    key is proximal, ``seq_len <= ns + nr``) and which prefill one by one (``prefills``), the lengths and
    proximal positions of the batched rows, the visibility mask of decoding rows, and per cache group the
    token rows to gather. Scores mode: each anchor's query and its decode rows' distant softmax, by anchor layer
    name, read by the block's members (dropped with the pass)."""

    def __init__(self, meta, ns: int, nr: int, kernel: bool = False):
        self.ns, self.nr = ns, nr
        self.anchor_queries: dict[str, torch.Tensor] = {}  # (N, Hq, D)
        # distant_softmax by anchor: of the decode rows (name), of request i's prefill chunk ((name, i))
        self.block_distant: dict = {}
        starts = meta.query_start_loc
        self.n_tokens = int(starts[-1])  # tokens of this pass; vLLM may pad the batch after them
        q_lens = starts[1:] - starts[:-1]  # (R,); padded requests have 0
        batched = q_lens == 1
        if kernel:  # the key swap is exact for every query of a chunk whose keys are all proximal
            batched = batched | ((q_lens > 1) & all_proximal(meta.seq_lens, ns, nr))
        prefill = ((q_lens > 0) & ~batched).nonzero().squeeze(1).tolist()
        self.prefills = [(i, int(starts[i]), int(starts[i + 1])) for i in prefill]
        self.decode_tokens = self.rows = None
        self._index: dict[tuple, object] = {}
        if not bool(batched.any()):
            return
        if bool(batched.all()):
            self.rows, self.decode_tokens = slice(None), slice(0, self.n_tokens)
        else:
            self.rows = batched.nonzero().squeeze(1)
            self.decode_tokens = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1]))
                                            for i in self.rows.tolist()])
        self.q_lens = q_lens[self.rows]
        seq_lens = meta.seq_lens[self.rows].long()
        self.proximal = proximal_positions(seq_lens, ns, nr)  # (R, ns + nr)
        if kernel:
            return
        T = int(seq_lens.max())
        self.seq_lens = seq_lens
        self.visible = torch.arange(T, device=seq_lens.device)[None, :] < seq_lens[:, None]  # (R, T)
        self.positions = decode_positions(seq_lens, T)  # (R, T)
        self.proximal_rows = flat_positions(self.proximal, T)  # in the (R * T) rows of a gathered batch

    def scores_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores mode: the decode rows' distant keys (R, T) and which proximal positions are first named
        (R, ns + nr) (:func:`~podkv.serving.batched.proximal_unique`), made once per step."""
        if "scores" not in self._index:
            T = self.visible.shape[1]
            self._index["scores"] = (distant_mask(self.seq_lens, T, self.ns, self.nr),
                                     proximal_unique(self.seq_lens, self.ns, self.nr))
        return self._index["scores"]

    @staticmethod
    def block_input(table: dict, anchor):
        """What anchor ``anchor`` left for its members this pass (layers run in order: it ran first)."""
        if anchor not in table:
            raise RuntimeError(f"PoD scores mode: anchor {anchor} left nothing for its block in this forward pass")
        return table[anchor]

    def kernel_decode(self, anchor_meta, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                      isa: str) -> KernelDecode:
        """The kernel's inputs for the decoding requests, and their proximal (block, offset) pairs in the
        anchor's group (made once per step and anchor group)."""
        key = ("kernel", id(anchor_meta))
        if key not in self._index:
            self._index[key] = KernelDecode(self, anchor_meta, block_size, num_heads, num_kv_heads, head_dim, dtype,
                                            isa)
        return self._index[key]

    def index(self, meta, cache: torch.Tensor, proximal: bool = False) -> torch.Tensor:
        """Token rows of the decoding requests in a cache group (its block table, its block size)."""
        key = (id(meta), proximal)
        if key not in self._index:
            pos = self.proximal if proximal else self.positions
            self._index[key] = token_index(meta.block_table[self.rows], pos, cache.shape[2])
        return self._index[key]


class KernelDecode:
    """vLLM kernel inputs for a step's decoding requests: the anchor group's rows of them (or its own metadata
    when every request decodes) and the proximal positions as (block, offset) pairs of the anchor's page."""

    def __init__(self, step: Step, meta, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                 isa: str):
        if isinstance(step.rows, slice):  # every request decodes: the group's own metadata
            self.query_start_loc, self.seq_lens = meta.query_start_loc, meta.seq_lens
            self.block_table, self.scheduler_metadata = meta.block_table, meta.scheduler_metadata
        else:
            self.seq_lens, self.block_table = meta.seq_lens[step.rows], meta.block_table[step.rows]
            self.query_start_loc, self.scheduler_metadata = decode_metadata(self.seq_lens, step.q_lens, num_heads,
                                                                            num_kv_heads, head_dim, dtype, isa)
        blocks = self.block_table.long().gather(1, step.proximal // block_size)
        self.blocks, self.offsets = blocks.reshape(-1), (step.proximal % block_size).reshape(-1)
        self.touched = self.blocks.unique()
