"""Stage 2: KV-cache specs that give PoD-L its memory saving inside vLLM 0.32 (plugin-only).

What PoD keeps per token and KV head (paper §2.3): an anchor layer its key and value, a shared layer
its value, and its own key only while the token is a sink or in the recent window. Each of the three
lives in a cache vLLM manages and counts:

=================  ===================================  =========================  ==================
cache              spec                                 page per token and head    held for
=================  ===================================  =========================  ==================
anchor ``a``       :class:`PodAnchorSpec` (full)        ``[K_a | V_a]``, 2·D        every token
shared ``l``       :class:`PodValueSpec` (full)         ``V_l``, D                  every token
``l.pod_keys``     :class:`PodProximalSpec` (window)    ``K_l``, D                  sinks + window
=================  ===================================  =========================  ==================

``l.pod_keys`` is a second ``vllm.Attention`` of the shared layer that only declares a cache (it is never
called; :mod:`podkv.serving.llama` creates it): a layer declares one spec, and a shared layer needs two.

Page sizes are D or 2·D per token, so vLLM's hybrid manager (``kv_cache_utils.get_kv_cache_groups``)
unifies them by doubling the block size of the D-wide caches, without padding any page. It also wants
every cache group to hold the same number of layers, and pads a group with unused layers otherwise (an
uneven plan has, say, 7 anchors and 23 shared layers). :func:`group_tags` therefore splits each kind into
buckets of ``gcd(anchors, shared)`` layers; a spec's ``pod_group`` keeps buckets apart. So vLLM's reported
capacity follows ``plan.kv_saving`` for any layer plan, up to whole-block rounding of the windows.

:class:`PodProximalSpec` is a ``SlidingWindowSpec`` that also keeps the first ``ceil(ns / block_size)``
blocks; :class:`PodProximalManager` (a ``SlidingWindowManager``) frees only the blocks between the sinks
and the window. Both are registered through vLLM's own ``KVCacheSpecRegistry`` (no vLLM file is patched).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec


class _Tagged:
    """Merges (into one cache group) only specs of the same class and ``pod_group``."""

    @classmethod
    def merge(cls, specs):
        if any(type(s) is not cls or s.pod_group != specs[0].pod_group for s in specs):
            raise AssertionError("PoD caches of different kinds or groups stay in separate KV cache groups")
        return replace(super().merge(specs), pod_group=specs[0].pod_group)


@dataclass(frozen=True, kw_only=True)
class PodAnchorSpec(_Tagged, FullAttentionSpec):
    """An anchor layer: its keys and values for every token (token-major ``[K | V]`` pages)."""

    pod_group: int = 0


@dataclass(frozen=True, kw_only=True)
class PodValueSpec(_Tagged, FullAttentionSpec):
    """A shared layer: its values for every token (``head_size_v = 0``: the page holds D columns)."""

    pod_group: int = 0


@dataclass(frozen=True, kw_only=True)
class PodProximalSpec(SlidingWindowSpec):
    """A shared layer's proximal keys: ``sink_len`` first tokens + a ``sliding_window`` of recent ones."""

    sink_len: int = 0
    pod_group: int = 0

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


def group_tags(anchors: list[int]) -> list[int]:
    """``pod_group`` of every layer, for a plan's layer anchors: anchors and shared layers are numbered
    separately and cut into buckets of ``gcd(#anchors, #shared)``, so that every cache group vLLM makes
    (one per bucket and kind) has the same number of layers and none is padded."""
    is_anchor = [a == l for l, a in enumerate(anchors)]
    n_anchor = sum(is_anchor)
    size = gcd(n_anchor, len(anchors) - n_anchor)
    counts, tags = [0, 0], []
    for anchor in is_anchor:
        tags.append(counts[anchor] // size)
        counts[anchor] += 1
    return tags


def register_pod_kv_specs() -> None:
    """Register the proximal spec and its manager (idempotent; vLLM's built-in specs first). The two full
    specs are found through their base class (``FullAttentionSpec`` -> ``FullAttentionManager``)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    # The registry fills itself with vLLM's built-ins only while it is empty: fill it first.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(PodProximalSpec, PodProximalManager, uniform_type_base_spec=SlidingWindowSpec)
