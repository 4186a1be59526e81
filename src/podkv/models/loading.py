"""`load_model`: one entry point for the default model, local checkpoints, GGUF files and hub ids."""

from __future__ import annotations

from pathlib import Path

import torch

from podkv.errors import PodError
from podkv.models import default_model
from podkv.plan import plan_from_config


def load_model(name_or_path: str | None = None, dtype: torch.dtype | str = torch.float32, progress: bool = True):
    """Load a causal LM and its tokenizer.

    ``None`` (or ``"smollm2"``) is the embedded default model; ``"smollm2-pod"`` is the default
    model adapted to its shipped PoD plan. A directory saved by ``podkv train`` (or any
    checkpoint whose config carries ``pod_plan``) comes back with PoD enabled.

    Returns
    -------
    (model, tokenizer)
        The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer  # startup: transformers

    dtype = _parse_dtype(dtype)
    if name_or_path in default_model.DEFAULT_ALIASES:
        path = default_model.ensure_default_model(progress=progress)
        default_model.verify_default_model(path)
        return _load_dir(path, dtype, progress)
    if name_or_path == "smollm2-pod":
        from podkv.models.adapted import load_adapted_default  # startup: transformers

        return load_adapted_default(dtype=dtype, progress=progress)

    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PodError(f"model file {path} does not exist")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = _from_pretrained(AutoModelForCausalLM, path.parent, dtype, progress, gguf_file=path.name)
        return model.eval(), tok
    if path.exists():
        if not (path / "config.json").is_file():
            raise PodError(f"model directory {path} has no config.json: it is not a transformers checkpoint")
        return _load_dir(path, dtype, progress)
    if str(name_or_path).startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise PodError(f"model path {name_or_path} does not exist")
    return _load_dir(name_or_path, dtype, progress)  # a hub id: works when the user has network access


def _load_dir(path, dtype, progress: bool = False):
    from transformers import AutoModelForCausalLM  # startup: transformers

    from podkv.compat import load_tokenizer  # startup: transformers

    model = _from_pretrained(AutoModelForCausalLM, path, dtype, progress)
    try:
        tok = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise PodError(f"could not load a tokenizer from {path}: {exc}") from None
    if getattr(model.config, "pod_plan", None) is not None:
        from podkv.models.enable import enable_pod  # startup: transformers

        enable_pod(model, plan_from_config(model.config))
    return model.eval(), tok


def _from_pretrained(auto_cls, path, dtype, progress: bool = False, **kw):
    from podkv.compat import weight_loading_bar  # startup: transformers

    try:
        with weight_loading_bar(progress):
            return auto_cls.from_pretrained(path, dtype=dtype, **kw)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "does not appear to have" in str(exc):
            raise PodError(f"{path} is not a causal language model checkpoint ({str(exc).splitlines()[0]})") from None
        raise
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PodError(f"could not load model {path}: {first}. If it is the cached default model, "
                       f"delete {default_model.default_model_dir()} and rerun") from None
    except Exception as exc:  # safetensors raises its own error type for truncated files
        if type(exc).__name__ == "SafetensorError":
            raise PodError(f"model weights in {path} are damaged ({exc}); delete the directory and rerun") from None
        raise


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise PodError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]
