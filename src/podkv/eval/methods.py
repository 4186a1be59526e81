"""KV-cache methods compared by the harness: one small class each, looked up in ``METHODS``.

A method says three things (kvpress style, but with no ``isinstance`` in the runner):
  * ``attached(model)``: a context that switches the model's attention for this method and undoes it;
  * ``new_cache(model)``: the cache one prompt is prefilled into;
  * ``prefill(model)``: a context around the prefill forward (kvpress presses compress there).
``check(config, lengths)`` refuses, with a :class:`PodError`, a KV budget the method cannot meet.

Budgets are fractions of the dense KV bytes held after prefill (1.0 = dense).
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch

from podkv.cache.selection import compact, kept_tokens_for_budget, snapkv_select
from podkv.errors import PodError
from podkv.plan import SharingPlan, plan_from_config


@contextmanager
def attention_mode(model, plan: SharingPlan | None = None, impl: str | None = None):
    """Run the block with PoD ``plan`` (or the stock ``impl`` attention), then restore the model as it was.

    A model loaded with PoD (e.g. ``smollm2-pod``) goes back to PoD with its own plan afterwards.
    """
    from podkv.models.enable import disable_pod, enable_pod  # startup: transformers

    own = plan_from_config(model.config) if hasattr(model, "_pod_saved") else None
    disable_pod(model)
    base = model.config._attn_implementation
    try:
        if plan is not None:
            enable_pod(model, plan)
        elif impl is not None and impl != base:
            model.set_attn_implementation(impl)
        yield model
    finally:
        disable_pod(model)
        if model.config._attn_implementation != base:
            model.set_attn_implementation(base)
        if own is not None:
            enable_pod(model, own)


@dataclass
class Method:
    """Base: dense attention and a DynamicCache. ``plan`` and ``budget`` are set by the runner."""

    plan: SharingPlan | None = None
    budget: float | None = None

    name: ClassVar[str] = "dense"
    budgeted: ClassVar[bool] = False  # dense is the reference: it holds everything
    attn: ClassVar[str] = "sdpa"

    def __post_init__(self):
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise PodError(f"--budget must be a KV fraction in (0, 1], got {self.budget}")

    def check(self, config, lengths) -> None:
        if self.budget is not None and self.budget < 1.0:
            raise PodError(f"method {self.name!r} holds the full KV cache and cannot meet --budget {self.budget}")

    def attached(self, model):
        return attention_mode(model, impl=self.attn)

    def new_cache(self, model):
        from transformers import DynamicCache  # startup: transformers

        return DynamicCache()

    def prefill(self, model):
        return nullcontext()

    def describe(self) -> dict:
        return {"name": self.name, "budget": self.budget}


class Dense(Method):
    """Full attention, full cache: the reference every method is scored against."""


class Pod(Method):
    """PoD (paper §2.3): distant keys held once per block of layers, values everywhere."""

    name = "pod"
    budgeted = True
    mode: ClassVar[str | None] = None  # None: the plan's own mode (an adapted model runs as it was trained)

    def sharing_plan(self) -> SharingPlan:
        if self.plan is None:
            raise PodError(f"method {self.name!r} needs a plan (--plan)")
        if self.mode is None or self.plan.mode == self.mode:
            return self.plan
        return SharingPlan(self.plan.anchors, ns=self.plan.ns, nr=self.plan.nr, mode=self.mode, meta=self.plan.meta,
                           policies=self.plan.policies)

    def check(self, config, lengths) -> None:
        plan = self.sharing_plan()
        plan.validate_for(config)
        if self.budget is None:
            return
        for T in lengths:
            held = self.held_fraction(config, plan, T)
            if held > self.budget + 1e-9:
                raise PodError(f"method {self.name!r} cannot meet --budget {self.budget}: its plan holds "
                               f"{held:.3f} of the dense KV at {T} tokens (saves {100 * (1 - held):.1f}%); "
                               f"raise --budget or use a plan with larger blocks")

    def held_fraction(self, config, plan, T: int) -> float:
        return 1.0 - plan.kv_saving(T)

    def attached(self, model):
        return attention_mode(model, plan=self.sharing_plan())

    def new_cache(self, model):
        from podkv.cache.pod_cache import PodCache  # startup: transformers

        return PodCache(model.config, self.sharing_plan())

    def describe(self) -> dict:
        plan = self.sharing_plan()
        return {"name": self.name, "budget": self.budget, "mode": plan.mode, "ns": plan.ns, "nr": plan.nr}


class PodKV8(Pod):
    """PoD over a quantized PodCache (issue 21): the plan's policies, and the token-long values and anchor keys in
    ``bits`` bits, groups of 64 channels or the head dim if smaller (:mod:`podkv.cache.quant`; at 8 bits the kv8
    peer's bit layout)."""

    name = "pod+kv8"
    bits: ClassVar[int] = 8
    key_quant: ClassVar[str] = "token"
    keep_proximal: ClassVar[bool] = False

    def group_for(self, config) -> int:
        from podkv.cache.pod_cache import storage  # startup: transformers

        return storage(config, self.bits)["kv_group"]

    def held_fraction(self, config, plan, T: int) -> float:
        from podkv.cache.memory import dense_kv_bytes, pod_kv_bytes
        from podkv.cache.pod_cache import storage  # startup: transformers

        kw = storage(config, self.bits, self.key_quant, self.keep_proximal)
        return pod_kv_bytes(config, plan, T, **kw) / dense_kv_bytes(config, T)

    def new_cache(self, model):
        from podkv.cache.pod_cache import pod_cache_for  # startup: transformers

        return pod_cache_for(model.config, self.sharing_plan(), self.bits, self.key_quant, self.keep_proximal)

    def describe(self) -> dict:
        from podkv.cache.quant import GROUP

        return {**super().describe(), "kv_bits": self.bits, "group": GROUP, "key_quant": self.key_quant,
                "keep_proximal": self.keep_proximal}


class PodKV4(PodKV8):
    """The same in 4 bits: 4 + 2·32/64 = 5 bits per fp32 element of the token-long tensors."""

    name = "pod+kv4"
    bits = 4


class PodKivi8(PodKV8):
    """KIVI's layout (Liu et al. 2024): anchor keys quantised per channel over groups of 64 tokens (the last
    unfilled group kept in the model's dtype), values per token as in ``pod+kv8``. Same bits per element."""

    name = "pod+kivi8"
    key_quant = "channel"


class PodKivi4(PodKivi8):
    """The same in 4 bits, where per-channel keys matter most (KIVI's 2-bit and 4-bit results)."""

    name = "pod+kivi4"
    bits = 4


class PodKivi8R(PodKivi8):
    """KIVI with its full-precision residual, which in PoD is the proximal set: the first ``ns`` and last ``nr``
    tokens of the quantised tensors stay in the model's dtype (``PodCache(kv_keep_proximal=True)``); a token is
    coded when it leaves the window."""

    name = "pod+kivi8r"
    keep_proximal = True


class PodKivi4R(PodKivi8R):
    """The same in 4 bits."""

    name = "pod+kivi4r"
    bits = 4


class PodKivi2R(PodKivi8R):
    """The same in 2 bits: KIVI's headline layout (2-bit keys per channel, values per token, recent tokens exact),
    2 + 2·32/64 = 3 bits per coded fp32 element."""

    name = "pod+kivi2r"
    bits = 2


class PodScores(Pod):
    """Training-free variant: reuse the anchor layer's distant attention *scores* (``mode="scores"``)."""

    name = "pod-scores"
    mode = "scores"


class KVPressMethod(Method):
    """A kvpress press compressing the prompt's cache at prefill, at ratio ``1 - budget``."""

    budgeted = True
    press_name: ClassVar[str] = ""
    press_kwargs: ClassVar[dict] = {}

    def check(self, config, lengths) -> None:
        _kvpress()  # fail early, with the install hint, when kvpress is absent

    def press(self):
        ratio = 0.0 if self.budget is None else 1.0 - self.budget
        return getattr(_kvpress(), self.press_name)(compression_ratio=ratio, **self.press_kwargs)

    def prefill(self, model):
        return self.press()(model)

    def describe(self) -> dict:
        return {"name": self.name, "budget": self.budget, "press": self.press_name, **self.press_kwargs}


class Streaming(Method):
    """StreamingLLM: attention sinks + the most recent tokens, podkv's own (no kvpress needed).

    The prompt is prefilled densely into a DynamicCache; then every layer keeps its first ``n_sink``
    tokens and the most recent ones, ``int(T * budget)`` in all: the tokens kvpress's
    ``StreamingLLMPress(n_sink=4)`` keeps, so results match the kvpress baseline. Kept keys keep their
    RoPE positions; decoding passes explicit positions (generation.py). ``podkv demo`` compares against
    it, so the demo runs wherever podkv does (kvpress needs transformers<5.3).
    """

    name = "streaming"
    budgeted = True
    n_sink: ClassVar[int] = 4

    def kept(self, length: int) -> int:
        """Tokens held after a ``length``-token prefill."""
        return length if self.budget is None else int(length * self.budget)

    def check(self, config, lengths) -> None:
        for T in lengths:
            if self.kept(T) <= self.n_sink < T:
                raise PodError(f"method 'streaming' cannot meet --budget {self.budget} at {T} tokens: it keeps "
                               f"{self.n_sink} sink tokens and at least one recent one; raise --budget")

    def new_cache(self, model):
        self._cache = super().new_cache(model)
        return self._cache

    @contextmanager
    def prefill(self, model):
        yield
        for layer in self._cache.layers:
            keep_sinks_and_recent(layer, self.n_sink, self.kept(layer.keys.shape[-2]))

    def describe(self) -> dict:
        return {"name": self.name, "budget": self.budget, "n_sink": self.n_sink}


class QuantizedKV(Method):
    """Dense attention over an 8-bit KV cache: transformers' ``QuantizedCache`` with the HQQ backend (groups of
    64 along the head dim, the last 128 tokens kept unquantized). The peer a user gets with one flag; no token is
    dropped, so its KV fraction is fixed by the bit width, not by ``--budget``.
    """

    name = "kv8"
    nbits: ClassVar[int] = 8
    group: ClassVar[int] = 64
    residual: ClassVar[int] = 128

    def check(self, config, lengths) -> None:
        if self.budget is not None and self.budget < 1.0:
            raise PodError(f"method 'kv8' keeps every token in {self.nbits} bits (its KV fraction is fixed by the "
                           f"bit width); it takes no --budget, got {self.budget}")
        if importlib.util.find_spec("hqq") is None:
            raise PodError("method 'kv8' needs the hqq package (transformers' HQQ cache backend): "
                           "pip install 'podkv[quant]'")

    def new_cache(self, model):
        from transformers import QuantizedCache  # startup: transformers

        return QuantizedCache(backend="hqq", config=model.config, nbits=self.nbits, axis_key=1, axis_value=1,
                              q_group_size=self.group, residual_length=self.residual)

    def describe(self) -> dict:
        return {"name": self.name, "budget": self.budget, "backend": "hqq", "nbits": self.nbits,
                "group": self.group, "residual": self.residual}


def keep_sinks_and_recent(layer, n_sink: int, keep: int) -> None:
    """Evict a cache layer's middle tokens in place: keep its first ``n_sink`` and last ``keep - n_sink``."""
    T = layer.keys.shape[-2]
    if keep >= T:
        return
    if keep <= n_sink:
        raise PodError(f"streaming: keep={keep} must exceed n_sink={n_sink} (the sinks plus a recent token)")
    idx = torch.cat([torch.arange(n_sink), torch.arange(T - (keep - n_sink), T)]).to(layer.keys.device)
    layer.keys = layer.keys.index_select(-2, idx)
    layer.values = layer.values.index_select(-2, idx)


class KVPressStreaming(KVPressMethod):
    """kvpress's StreamingLLMPress: the reference the own ``streaming`` is checked against (tests)."""

    name, press_name, press_kwargs = "kvpress-streaming", "StreamingLLMPress", {"n_sink": 4}


class SnapKV(KVPressMethod):
    """SnapKV: keep the tokens the prompt's last window attends to most."""

    name, press_name = "snapkv", "SnapKVPress"


class H2O(KVPressMethod):
    """H2O: keep heavy hitters by accumulated attention; needs eager attention for the weights."""

    name, press_name, attn = "h2o", "ObservedAttentionPress", "eager"


class PyramidKV(KVPressMethod):
    """PyramidKV: SnapKV scores with a budget that shrinks from lower to upper layers."""

    name, press_name = "pyramidkv", "PyramidKVPress"


class PodSnapKV(Pod):
    """PoD's cache + SnapKV selection of distant tokens after prefill (paper §3.4: 91.9% saved).

    ``--budget`` is the KV fraction kept; PoD's own saving comes first, SnapKV evicts distant tokens
    per (block, KV head) until the rest fits (cache/selection.py).
    """

    name = "pod+snapkv"
    window: ClassVar[int] = 32  # observation window: the prompt's last queries (SnapKV)

    def check(self, config, lengths) -> None:
        plan = self.sharing_plan()
        plan.validate_for(config)
        if self.budget is None:
            raise PodError("method 'pod+snapkv' needs --budget: the fraction of the dense KV to keep")
        for T in lengths:
            kept_tokens_for_budget(config, plan, T, self.budget)

    def new_cache(self, model):
        self._cache = super().new_cache(model)
        return self._cache

    @contextmanager
    def prefill(self, model):
        plan, runtime = self.sharing_plan(), model.pod_runtime
        runtime.observe_window, runtime.observed = min(self.window, plan.nr), {}
        try:
            yield
        finally:
            runtime.observe_window = None
        cache = self._cache
        T = cache.layers[0].seen
        keep = kept_tokens_for_budget(model.config, plan, T, self.budget) - min(T, plan.ns + plan.nr)
        compact(cache, snapkv_select(cache, runtime.observed, runtime.observed_scale, keep))
        runtime.observed = {}

    def describe(self) -> dict:
        return {**super().describe(), "selection": "snapkv", "window": self.window}


def _kvpress():
    try:
        import kvpress  # optional: kvpress
    except ImportError:
        raise PodError("the token-eviction baselines need kvpress: pip install 'podkv[peers]' "
                       "(kvpress==0.5.5)") from None
    _unwrap_pod_attention()
    return kvpress


def _unwrap_pod_attention() -> None:
    """Undo kvpress's import-time wrapping of PoD's attention functions.

    kvpress wraps every registered attention function on import (``ALL_ATTENTION_FUNCTIONS[name] =
    attention_patch(fn)``, a local override). PoD never uses kvpress's head-wise masking, so keep its
    wrapper out of PoD's hot path by putting ours back.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # startup: transformers

    from podkv.attention import interface  # startup: transformers

    for name, fn in ((interface.ATTN_NAME, interface.pod_attention_forward),
                     (interface.REFERENCE_ATTN_NAME, interface.pod_reference_attention_forward)):
        if name in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS[name] = fn


METHODS: dict[str, type[Method]] = {m.name: m for m in (Dense, Pod, PodScores, Streaming, SnapKV, H2O, PyramidKV,
                                                             PodSnapKV, KVPressStreaming, QuantizedKV, PodKV8,
                                                             PodKV4, PodKivi8, PodKivi4, PodKivi8R,
                                                             PodKivi4R, PodKivi2R)}


def kvpress_available() -> bool:
    """Whether the kvpress baselines can run here (kvpress 0.5.5 needs transformers<5.3)."""
    return importlib.util.find_spec("kvpress") is not None


def available_methods(names) -> tuple[str, ...]:
    """``names`` without the kvpress baselines when kvpress is not installed (defaults must run anywhere)."""
    if kvpress_available():
        return tuple(names)
    return tuple(n for n in names if not issubclass(METHODS[n], KVPressMethod))


def make_method(name: str, plan: SharingPlan | None = None, budget: float | None = None) -> Method:
    """Instantiate a registered method; an unknown name is a :class:`PodError` listing the choices."""
    if name not in METHODS:
        raise PodError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](plan=plan, budget=budget)
