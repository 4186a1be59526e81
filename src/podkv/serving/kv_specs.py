"""Stage 2: KV-cache specs that give PoD-L its memory saving inside vLLM 0.32 (plugin-only).

For a block of B layers ``[a, a+B)`` of a layer-granularity plan:

* the anchor layer ``a`` declares ``FullAttentionSpec(head_size=D, head_size_v=B*D)``: one page
  holds, per token and KV head, ``[K_a | V_a | V_a+1 | ... | V_a+B-1]`` (every value of the block,
  one key);
* every other layer ``l`` of the block declares a :class:`PodProximalSpec`: its own keys only
  (``head_size_v=0``), for the ``ns`` sink tokens and the ``nr``-token recent window. Its values
  go into its slot of the anchor's page (:class:`podkv.serving.attention.PodTorchImpl` writes them).

vLLM's hybrid KV-cache manager (``vllm.v1.core.kv_cache_utils.get_kv_cache_groups``) then puts the
anchors into one full-attention group and the other layers into window groups of the same page
size (it scales their block size by ``1 + B``); all groups draw blocks from one pool, and the
capacity it logs ("KV cache size: N tokens") counts a window group's blocks per request as
``sink blocks + window blocks``, not ``max_model_len / block_size``.

:class:`PodProximalSpec` is a ``SlidingWindowSpec`` that also keeps the first
``ceil(ns / block_size)`` blocks; :class:`PodProximalManager` (a ``SlidingWindowManager``) frees
only the blocks between the sinks and the window. Both are registered through vLLM's own
``KVCacheSpecRegistry`` (no vLLM file is patched).
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import SlidingWindowSpec


@dataclass(frozen=True, kw_only=True)
class PodProximalSpec(SlidingWindowSpec):
    """A non-anchor layer's proximal keys: ``sink_len`` first tokens + a ``sliding_window`` of recent ones."""

    sink_len: int = 0

    @property
    def num_sink_blocks(self) -> int:
        return cdiv(self.sink_len, self.block_size)

    def max_admission_blocks_per_request(self, max_in_flight_tokens: int, max_model_len: int) -> int:
        window = super().max_admission_blocks_per_request(max_in_flight_tokens, max_model_len)
        return min(window + self.num_sink_blocks, cdiv(max_model_len, self.block_size))

    def is_uniform_with_collection(self, kv_cache_specs) -> bool:
        return all(isinstance(s, PodProximalSpec) and s.sliding_window == self.sliding_window
                   and s.sink_len == self.sink_len for s in kv_cache_specs.values())


class PodProximalManager(SlidingWindowManager):
    """SlidingWindowManager that never frees a request's first ``ceil(sink_len / block_size)`` blocks."""

    def __init__(self, kv_cache_spec: PodProximalSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_sink_blocks = kv_cache_spec.num_sink_blocks

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        skipped = self.get_num_skipped_tokens(processed_computed_tokens)
        if skipped <= 0 or request_id not in self.req_to_blocks:
            return
        last = min(skipped // self.block_size, len(self.req_to_blocks[request_id]))
        # Walks back from `last` and stops at the first freed block, so the sinks stay.
        self._remove_blocks_in_range(request_id, self.num_sink_blocks, last)


def register_pod_kv_specs() -> None:
    """Register the spec and its manager (idempotent; vLLM's built-in specs first)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # The registry fills itself with vLLM's built-ins only while it is empty: fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(PodProximalSpec, PodProximalManager, uniform_type_base_spec=SlidingWindowSpec)
