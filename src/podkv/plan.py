"""The sharing plan: which layer's keys each (layer, KV head) uses for distant tokens.

A plan is the one artifact that travels from the offline exploration (`podkv analyze`,
paper §2.1) to attention, the cache, training and serving. It is a validated dataclass
saved as versioned JSON with its provenance.
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from podkv.errors import PodError
from podkv.io import atomic_write_text

SCHEMA_VERSION = 1
MODES = ("keys", "scores")
# What a (layer, KV head) pair holds (issue 21). "anchor": keys and values of every token; "shared": values of
# every token, own keys of proximal tokens, distant keys read from its anchor (PoD); "window": sinks + recent
# window only, keys and values, no distant tokens at all (a streaming head, as in DuoAttention).
POLICIES = ("anchor", "shared", "window")


@dataclass
class SharingPlan:
    """Per-(layer, KV head) anchor layers plus the proximal window.

    Parameters
    ----------
    anchors : list[list[int]]
        ``anchors[layer][kv_head]`` is the lowest layer of the block that ``(layer, kv_head)``
        belongs to. A pair with ``anchors[l][h] == l`` is an anchor: it stores keys of every token.
        Other pairs store only proximal keys and score distant tokens with the anchor's keys.
    ns : int
        Attention-sink tokens kept by every layer (paper: 16).
    nr : int
        Recent window, counting the query itself (paper: 4080 at 32K; 240 for an 8K model).
    mode : str
        ``"keys"`` (the paper: share distant *keys*, recompute scores with the layer's own query)
        or ``"scores"`` (training-free variant: reuse the anchor's distant *scores*).
    meta : dict
        Provenance: model, data hash, thresholds, podkv version. Not used by the math.
    policies : list[list[str]] or None
        ``policies[layer][kv_head]`` in :data:`POLICIES`; None (the default, and what is saved when no pair is
        "window") means every pair is "anchor" or "shared" as its anchor says. A "window" pair is its own
        anchor (``anchors[l][h] == l``) that no later layer reads, and attends to proximal tokens only.
    """

    anchors: list[list[int]]
    ns: int = 16
    nr: int = 240
    mode: str = "keys"
    meta: dict[str, Any] = field(default_factory=dict)
    policies: list[list[str]] | None = None

    def __post_init__(self):
        self.anchors = _layer_indices(self.anchors)
        if not isinstance(self.meta, dict):
            raise PodError(f"plan field 'meta' must be a JSON object, got {type(self.meta).__name__}")
        if not self.anchors or not self.anchors[0]:
            raise PodError("plan field 'anchors' is empty: it needs one row per layer and one entry per KV head")
        for name in ("ns", "nr"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PodError(f"plan field '{name}' must be a positive integer, got {value!r}")
        if self.mode not in MODES:
            raise PodError(f"plan field 'mode' must be one of {MODES}, got {self.mode!r}")
        heads = len(self.anchors[0])
        for layer, row in enumerate(self.anchors):
            if len(row) != heads:
                raise PodError(
                    f"plan field 'anchors[{layer}]' has {len(row)} heads, expected {heads} like anchors[0]"
                )
            for head, anchor in enumerate(row):
                if anchor < 0 or anchor > layer:
                    raise PodError(
                        f"plan field 'anchors[{layer}][{head}]' = {anchor}: an anchor must be a layer in [0, {layer}]"
                    )
                # Blocks are consecutive layers (paper §2.1): a shared anchor must also be the
                # previous layer's anchor, and the anchor must be its own anchor.
                if anchor < layer and self.anchors[layer - 1][head] != anchor:
                    raise PodError(
                        f"plan field 'anchors[{layer}][{head}]' = {anchor} does not form a consecutive block: "
                        f"anchors[{layer - 1}][{head}] is {self.anchors[layer - 1][head]}"
                    )
        self._window = self._check_policies()

    def _check_policies(self) -> set[tuple[int, int]]:
        """The (layer, head) pairs whose policy is "window"; a PodError for a grid that contradicts ``anchors``."""
        if self.policies is None:
            return set()
        grid = self.policies
        if not isinstance(grid, (list, tuple)) or len(grid) != self.num_layers or not all(
                isinstance(row, (list, tuple)) and len(row) == self.num_kv_heads for row in grid):
            raise PodError(f"plan field 'policies' must be a {self.num_layers} x {self.num_kv_heads} grid of policy "
                           f"names like 'anchors', got {str(grid)[:80]}")
        window = set()
        for layer, row in enumerate(grid):
            for head, policy in enumerate(row):
                where = f"plan field 'policies[{layer}][{head}]' = {policy!r}"
                if policy not in POLICIES:
                    raise PodError(f"{where}: not a policy; expected one of {POLICIES}")
                anchor = self.anchors[layer][head]
                if policy == "shared" and anchor == layer:
                    raise PodError(f"{where} but anchors[{layer}][{head}] = {layer}: a shared pair needs an earlier anchor")
                if policy in ("anchor", "window") and anchor != layer:
                    raise PodError(f"{where} but anchors[{layer}][{head}] = {anchor}: an {policy} pair is its own anchor")
                if policy == "window":
                    if layer + 1 < self.num_layers and self.anchors[layer + 1][head] == layer:
                        raise PodError(f"{where} leaves layer {layer + 1}'s block without an anchor: "
                                       f"anchors[{layer + 1}][{head}] = {layer} reads keys a window pair does not keep")
                    window.add((layer, head))
        self.policies = [list(row) for row in grid] if window else None  # all anchor/shared: say it once, in anchors
        return window

    # ------------------------------------------------------------------ shape
    @property
    def num_layers(self) -> int:
        return len(self.anchors)

    @property
    def num_kv_heads(self) -> int:
        return len(self.anchors[0])

    def is_anchor(self, layer: int, head: int) -> bool:
        """True when the pair keeps keys of every token (its own anchor, not a window pair)."""
        return self.anchors[layer][head] == layer and (layer, head) not in self._window

    def is_window(self, layer: int, head: int) -> bool:
        """True when the pair keeps sinks + recent window only (policy "window")."""
        return (layer, head) in self._window

    @property
    def has_window(self) -> bool:
        return bool(self._window)

    def policy(self, layer: int, head: int) -> str:
        if self.is_window(layer, head):
            return "window"
        return "anchor" if self.is_anchor(layer, head) else "shared"

    def anchor_heads(self, layer: int) -> list[int]:
        return [h for h in range(self.num_kv_heads) if self.is_anchor(layer, h)]

    def window_heads(self, layer: int) -> list[int]:
        return [h for h in range(self.num_kv_heads) if self.is_window(layer, h)]

    def shared_heads(self, layer: int) -> list[int]:
        return [h for h in range(self.num_kv_heads) if self.anchors[layer][h] != layer]

    def anchor_layers(self) -> set[int]:
        """Layers whose keys some other layer reads."""
        return {a for row in self.anchors for a in row}

    @property
    def is_identity(self) -> bool:
        """Every pair its own anchor with every token: PoD is then dense attention."""
        return all(self.is_anchor(l, h) for l in range(self.num_layers) for h in range(self.num_kv_heads))

    @property
    def is_layer_granular(self) -> bool:
        """True when every KV head of a layer shares the same anchor (PoD-L)."""
        return all(len(set(row)) == 1 for row in self.anchors)

    def blocks(self, head: int) -> list[tuple[int, int]]:
        """Blocks of head ``head`` as ``(first_layer, last_layer)`` inclusive."""
        out: list[tuple[int, int]] = []
        for layer in range(self.num_layers):
            if self.anchors[layer][head] == layer:
                out.append((layer, layer))
            else:
                out[-1] = (out[-1][0], layer)
        return out

    def split_block(self, layer: int, head: int) -> SharingPlan:
        """This plan with shared pair ``(layer, head)`` made an anchor: the rest of its block reads its keys.

        One more anchor and blocks stay consecutive (what the per-pair ablation, ``analysis/ablation.py``, tries).
        """
        if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
            raise PodError(f"pair (layer {layer}, head {head}) is outside the plan's "
                           f"{self.num_layers} x {self.num_kv_heads} grid")
        if self.policy(layer, head) != "shared":
            raise PodError(f"pair (layer {layer}, head {head}) is {self.policy(layer, head)!r}, not shared: "
                           "only a shared pair's block can be split there")
        anchors = [list(row) for row in self.anchors]
        old = anchors[layer][head]
        for l in range(layer, self.num_layers):
            if anchors[l][head] != old:
                break
            anchors[l][head] = layer
        policies = None if self.policies is None else [
            ["window" if self.is_window(l, h) else "anchor" if a == l else "shared" for h, a in enumerate(row)]
            for l, row in enumerate(anchors)]
        return SharingPlan(anchors, ns=self.ns, nr=self.nr, mode=self.mode, meta=dict(self.meta), policies=policies)

    # -------------------------------------------------------------- builders
    @classmethod
    def identity(cls, num_layers: int, num_kv_heads: int, **kw) -> SharingPlan:
        """Every layer its own anchor: PoD then equals dense attention."""
        return cls(anchors=[[l] * num_kv_heads for l in range(num_layers)], **kw)

    @classmethod
    def uniform(cls, num_layers: int, num_kv_heads: int, block_size: int, **kw) -> SharingPlan:
        """Blocks of ``block_size`` consecutive layers, the same for every head."""
        if block_size < 1:
            raise PodError(f"block_size must be >= 1, got {block_size}")
        return cls(anchors=[[l - l % block_size] * num_kv_heads for l in range(num_layers)], **kw)

    # ---------------------------------------------------------- validation
    def validate_for(self, config) -> None:
        """Raise a :class:`PodError` naming the field when this plan does not fit ``config``."""
        layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if self.num_layers != layers:
            raise PodError(
                f"plan has {self.num_layers} layers but the model ({config.model_type}) has {layers}: "
                "make a plan for this model with `podkv analyze`"
            )
        if self.num_kv_heads != heads:
            raise PodError(
                f"plan has {self.num_kv_heads} KV heads per layer but the model ({config.model_type}) has {heads}"
            )
        max_pos = getattr(config, "max_position_embeddings", None)
        if max_pos is not None and self.ns + self.nr > max_pos:
            raise PodError(f"plan ns+nr = {self.ns + self.nr} exceeds the model's {max_pos} positions")

    # ---------------------------------------------------------- memory math
    def kept_key_tokens(self, layer: int, head: int, seq_len: int) -> int:
        """Keys held by ``(layer, head)`` after ``seq_len`` tokens (paper §2.3)."""
        return seq_len if self.is_anchor(layer, head) else min(seq_len, self.ns + self.nr)

    def kept_value_tokens(self, layer: int, head: int, seq_len: int) -> int:
        """Values held by ``(layer, head)``: every token, except a window pair's sinks + window."""
        return min(seq_len, self.ns + self.nr) if self.is_window(layer, head) else seq_len

    def kv_elements(self, seq_len: int, head_dim: int, batch: int = 1) -> int:
        """Analytic number of K and V elements a :class:`~podkv.cache.PodCache` holds."""
        pairs = [(l, h) for l in range(self.num_layers) for h in range(self.num_kv_heads)]
        keys = sum(self.kept_key_tokens(l, h, seq_len) for l, h in pairs)
        values = sum(self.kept_value_tokens(l, h, seq_len) for l, h in pairs)
        return batch * head_dim * (keys + values)

    def kv_saving(self, seq_len: int) -> float:
        """Fraction of dense KV memory saved at ``seq_len`` tokens (independent of batch and dims)."""
        dense = 2 * self.num_layers * self.num_kv_heads * seq_len
        return 1.0 - self.kv_elements(seq_len, head_dim=1) / dense

    # ------------------------------------------------------------- display
    def grid(self) -> str:
        """Layer x head grid: 'A' marks an anchor, 'W' a window-only pair, a number the anchor layer used."""
        width = max(3, len(str(self.num_layers)) + 1)
        head_cols = "".join(f"h{h}".rjust(width) for h in range(self.num_kv_heads))
        lines = [f"layer{head_cols}"]
        for layer, row in enumerate(self.anchors):
            cells = "".join(("W" if self.is_window(layer, h) else "A" if a == layer else str(a)).rjust(width)
                            for h, a in enumerate(row))
            lines.append(f"{layer:5d}{cells}")
        return "\n".join(lines)

    def summary(self, seq_len: int = 4096) -> str:
        shared = sum(len(self.shared_heads(l)) for l in range(self.num_layers))
        total = self.num_layers * self.num_kv_heads
        window = f"{len(self._window)}/{total} window-only; " if self._window else ""
        return (
            f"PoD plan: {self.num_layers} layers x {self.num_kv_heads} KV heads, ns={self.ns}, nr={self.nr}, "
            f"mode={self.mode}; {shared}/{total} (layer, head) pairs share keys; {window}"
            f"KV saving at {seq_len} tokens: {100 * self.kv_saving(seq_len):.1f}%"
        )

    # ----------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["policies"] is None:  # plans without window pairs keep the JSON (and hash) they always had
            del data["policies"]
        data["schema_version"] = SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharingPlan:
        if not isinstance(data, dict):
            raise PodError(f"a plan must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PodError(f"plan field 'schema_version' = {version!r}; this podkv reads version {SCHEMA_VERSION}")
        if "anchors" not in data:
            raise PodError("plan field 'anchors' is missing")
        known = {"anchors", "ns", "nr", "mode", "meta", "policies"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> SharingPlan:
        path = Path(path)
        if not path.is_file():
            raise PodError(f"plan file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PodError(f"plan file {path} is not valid JSON ({exc}); regenerate it with `podkv analyze`") from None
        return cls.from_dict(data)


def _layer_indices(anchors) -> list[list[int]]:
    """``anchors`` as lists of Python ints; anything else (strings, floats, bools, a flat list) is a PodError."""
    if not isinstance(anchors, (list, tuple)) or not all(isinstance(row, (list, tuple)) for row in anchors):
        raise PodError(f"plan field 'anchors' must be a list of lists of layer indices, got {str(anchors)[:80]}")
    rows = []
    for layer, row in enumerate(anchors):
        rows.append([])
        for head, anchor in enumerate(row):
            try:
                if isinstance(anchor, bool):
                    raise TypeError
                rows[-1].append(operator.index(anchor))  # ints, numpy ints; not "3" or 3.0
            except TypeError:
                raise PodError(f"plan field 'anchors[{layer}][{head}]' must be an integer layer index, "
                               f"got {anchor!r}") from None
    return rows


def plan_from_config(config) -> SharingPlan | None:
    """The plan stored in ``config.pod_plan`` (a dict, so configs stay JSON), cached per dict."""
    raw = getattr(config, "pod_plan", None)
    if raw is None:
        return None
    if isinstance(raw, SharingPlan):
        return raw
    # Parsing on every attention call would be wasteful; configs must stay JSON, so cache here.
    cached = _PLAN_CACHE.get(id(raw))
    if cached is not None and cached[0] is raw:
        return cached[1]
    plan = SharingPlan.from_dict(raw)
    if len(_PLAN_CACHE) > 64:
        _PLAN_CACHE.clear()
    _PLAN_CACHE[id(raw)] = (raw, plan)
    return plan


_PLAN_CACHE: dict[int, tuple[dict, SharingPlan]] = {}
