"""Everything in podkv that depends on the installed transformers version.

podkv supports transformers 5.2 up to 5.25 (``pyproject.toml``; CI runs the suite on both ends).
Within 5.x transformers changed the internals that podkv extends. The rest of podkv imports what
differs from here:

=======================================  ===================================  ===================================
what                                     5.2                                  5.24, 5.25
=======================================  ===================================  ===================================
a cache layer's abstract methods         ``get_mask_sizes(cache_position)``,  ``get_mask_sizes(query_length)``,
                                         ``get_max_cache_shape()``            ``get_max_length()``
``Cache.crop(n)``                        keep ``n`` tokens (< 0: drop -n)     drop -n tokens (n <= 0)
cache argument of ``forward`` and        ``past_key_values``                  ``cache`` (``past_key_values``
``generate``; model outputs                                                   still accepted, with a FutureWarning,
                                                                              until 5.40 / 6.0)
``tokenizer_class: CodeLlamaTokenizer``  ignored: ``tokenizer.json`` loads    applied: a SentencePiece-style
on a byte-level BPE (the 5.2 GGUF        as is                                tokenizer that puts
reader writes it for SmolLM2)                                                 ``<|endoftext|>`` between words
SmolLM2's GGUF tokenizer, read by the    BOS (``<|im_start|>``) first,        follows the GGUF: no BOS
GGUF reader                              although the GGUF's                  (5.19 too)
                                         ``add_bos_token`` is false
a model read with ``gguf_file=`` (the    plain float32 weights, saved as      a quantized ("gguf") model: blocks
default model's conversion)              any model                            kept where a kernel runs them;
                                                                              ``save_pretrained`` refuses it
                                                                              (read dequantized, then rebuilt:
                                                                              :func:`gguf_model_kwargs`)
=======================================  ===================================  ===================================

Two more differences need no shim, only a signature that fits both: ``Cache.update`` calls a layer's
``update(k, v, cache_kwargs)`` in 5.2 and ``update(k, v, kwargs=...)`` in 5.24 (take ``*args, **kwargs``),
and a mask function registered with ``AttentionMaskInterface`` gets ``cache_position=`` in 5.2 and
``q_length=, q_offset=`` in 5.24 (take its arguments by keyword, the rest as ``**kwargs``).

Each path is picked by what the installed transformers has (feature detection), not by its version
number, so a release between the tested ones takes whichever API it has. The rows did not change
together: 5.10 already tells layers the query length, 5.16 has the new ``crop``, 5.19 (vLLM 0.32's)
still names the cache ``past_key_values``. ``tests/test_compat.py`` checks the pick against the version
for the releases CI runs.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import sys
from abc import abstractmethod
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging as hf_logging


def parse_version(text: str) -> tuple[int, int]:
    """'5.24.0' -> (5, 24)."""
    major, minor = re.match(r"(\d+)\.(\d+)", text).groups()
    return int(major), int(minor)


TRANSFORMERS_VERSION = parse_version(transformers.__version__)

# A cache layer is told the query length (an int) rather than the query's cache positions (a tensor).
LAYER_TAKES_QUERY_LENGTH = "query_length" in inspect.signature(CacheLayerMixin.get_mask_sizes).parameters
# Cache.crop(n) keeps n tokens (5.2) rather than removing -n of them.
CROP_KEEPS_LENGTH = "max_length" in inspect.signature(Cache.crop).parameters
# The name under which models take and return their cache.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_ARGS = ("past_key_values", "cache")  # every name a caller may use, oldest first


class CacheLayer(CacheLayerMixin):
    """``CacheLayerMixin`` with both names of the max-length method.

    A subclass implements ``get_max_length()`` (the newest name) and ``get_mask_sizes(query)``, with
    ``query`` read through :func:`query_length`.
    """

    @abstractmethod
    def get_max_length(self) -> int:
        """Most tokens the layer holds; -1 for no limit."""

    def get_max_cache_shape(self) -> int:
        return self.get_max_length()


def query_length(query) -> int:
    """The number of new tokens from what ``get_mask_sizes`` receives: an int, or (Q,) cache positions."""
    return query if isinstance(query, int) else query.shape[0]


def layer_max_length(layer) -> int | None:
    """A cache layer's maximum length under either method name (-1: unbounded); None if it has neither."""
    for name in ("get_max_length", "get_max_cache_shape"):
        fn = getattr(layer, name, None)
        if fn is not None:
            return fn()
    return None


def given_cache(kwargs: dict):
    """The cache a caller passed to ``forward``/``generate`` under either name, or None."""
    return next((kwargs[k] for k in CACHE_ARGS if kwargs.get(k) is not None), None)


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for ``model(...)``/``model.generate(...)`` under this release's argument name."""
    return {CACHE_ARG: cache}


def output_cache(out):
    """The cache a model output carries, without a deprecation warning on any release."""
    return getattr(out, CACHE_ARG)


# The generic fast class loads tokenizer.json as is on every 5.x release.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
MISNAMED_TOKENIZER_CLASSES = ("CodeLlamaTokenizer", "CodeLlamaTokenizerFast")


def misnamed_tokenizer(path) -> bool:
    """True for a saved tokenizer whose config names a SentencePiece class over a byte-level BPE.

    transformers 5.2's GGUF reader writes ``"tokenizer_class": "CodeLlamaTokenizer"`` for SmolLM2 (the
    GGUF's arch is llama); 5.2 then loads ``tokenizer.json`` regardless, later releases build that class
    and tokenize wrongly. Such a tokenizer must be loaded as :data:`PORTABLE_TOKENIZER_CLASS`.
    """
    path = Path(path)
    cfg_path, tok_path = path / "tokenizer_config.json", path / "tokenizer.json"
    if not (cfg_path.is_file() and tok_path.is_file()):
        return False
    if json.loads(cfg_path.read_text()).get("tokenizer_class") not in MISNAMED_TOKENIZER_CLASSES:
        return False
    pre = (json.loads(tok_path.read_text()).get("pre_tokenizer") or {}).get("type")
    return pre == "ByteLevel"


def load_tokenizer(path, **kwargs):
    """``AutoTokenizer.from_pretrained(path)``, except a misnamed tokenizer (above) loads as the generic class."""
    if misnamed_tokenizer(path):
        return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    return AutoTokenizer.from_pretrained(path, **kwargs)


@contextlib.contextmanager
def weight_loading_bar(show: bool):
    """transformers 5.x prints a "Loading weights" bar per load (272 updates for SmolLM2); off unless asked.

    Off matters beyond looks: a parent reading a child's stderr through a pipe deadlocks once the
    bar fills the pipe while the child holds the first-run conversion lock.
    """
    show = show and sys.stderr.isatty()  # in a log, a redrawn bar is thousands of lines
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def gguf_model_kwargs() -> dict:
    """``from_pretrained(..., gguf_file=)`` arguments that read every weight dequantized, on every release.

    5.2 always dequantizes a GGUF. Newer releases read it as a quantized model (``GgufConfig``) that keeps
    the weights in GGUF blocks when a matmul kernel is available (``kernels`` installed, a GPU); asking for
    ``dequantize=True`` gives plain float tensors, as 5.2 does.
    """
    try:
        from transformers import GgufConfig  # optional: transformers.GgufConfig (absent in 5.2)
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def gguf_tokenizer(directory, gguf_file: str):
    """A GGUF file's tokenizer as transformers 5.2 reads it (BOS first), on every release.

    podkv's default model was converted with 5.2's reading, and every recorded result tokenized with it;
    keeping it makes the converted checkpoint the same whichever release converts it. Later releases
    follow the GGUF's ``add_bos_token`` (false for SmolLM2); this turns it back on.
    """
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    if tok.bos_token is not None and not getattr(tok, "add_bos_token", True):
        tok.add_bos_token = True  # the backend tokenizer's post-processor follows (and is saved with it)
    return tok
