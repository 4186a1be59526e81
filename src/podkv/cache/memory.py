"""KV memory figures: analytic formulas and measurement from the tensors a cache holds."""

from __future__ import annotations

import torch

from podkv.plan import SharingPlan


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def dense_kv_bytes(config, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """What a DynamicCache holds: K and V of every token in every layer and KV head."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * kv_heads(config) * head_dim(config) * seq_len * batch * elem


def pod_kv_bytes(config, plan: SharingPlan, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                 crop_margin: int = 0, kv_bits: int | None = None, kv_group: int = 64, key_quant: str = "token",
                 kv_keep_proximal: bool = False) -> int:
    """What a PodCache holds for ``plan`` (paper §2.3): values everywhere, distant keys in anchors only.

    ``crop_margin`` M: each sharing or window-only head keeps M more recent keys, and a window-only head M more
    values (PodCache's exact-crop margin). ``kv_bits`` 8, 4 or 2: the token-long tensors (values of non-window heads,
    anchor keys) take ``kv_bits / 8`` bytes per element plus a scale and a zero in ``dtype`` per ``kv_group`` elements;
    with ``key_quant="channel"`` (KIVI) the anchor keys' last ``seq_len mod kv_group`` tokens stay in ``dtype``;
    ``kv_keep_proximal``: the first ``ns`` and last ``nr + M`` tokens of those tensors stay in ``dtype`` too.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    ring = sum(len(plan.shared_heads(layer)) + 2 * len(plan.window_heads(layer)) for layer in range(plan.num_layers))
    window = plan.ns + plan.nr
    margin = ring * (min(seq_len, window + crop_margin) - min(seq_len, window)) * head_dim(config) * batch
    total = plan.kv_elements(seq_len, head_dim(config), batch) + margin
    if kv_bits is None:
        return total * elem
    heads = {"keys": sum(len(plan.anchor_heads(l)) for l in range(plan.num_layers)),
             "values": sum(plan.num_kv_heads - len(plan.window_heads(l)) for l in range(plan.num_layers))}
    exact = min(seq_len, plan.ns + plan.nr + crop_margin) if kv_keep_proximal else 0  # tokens never coded
    codable = seq_len - exact
    coded = {kind: n * codable for kind, n in heads.items()}  # tokens x heads held as codes
    if key_quant == "channel":
        coded["keys"] = heads["keys"] * (codable // kv_group * kv_group)
    per_token = head_dim(config) * batch  # elements of one token of one head
    coded_elems = sum(coded.values()) * per_token
    return (total - coded_elems) * elem + coded_elems * kv_bits // 8 + coded_elems // kv_group * 2 * elem


def cache_bytes(cache) -> int:
    """Bytes of K/V tensors held by any transformers cache (PodCache, DynamicCache, ...)."""
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for held in ("keys", "values", "_quantized_keys", "_quantized_values"):  # quantized: packed data + scales
            total += sum(t.numel() * t.element_size() for t in _tensors(getattr(layer, held, None)))
    return total


def _tensors(obj):
    """Tensors inside a cache attribute: a tensor, or HQQ's (packed tensor, meta dict of scales and zeros)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
