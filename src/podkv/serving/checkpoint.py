"""Servable checkpoints: a model folder whose ``config.json`` carries the PoD plan and architecture.

Two sources, one result (``python -m vllm.entrypoints.openai.api_server --model OUT`` serves it):

* a transformers checkpoint (the default model, a ``podkv train`` output, any Llama) plus a plan:
  :func:`write_pod_checkpoint` links the weights and rewrites ``config.json``;
* an adapted model stored as deltas (``pod_plan.json`` + ``pod_deltas.safetensors``, e.g. the shipped
  ``smollm2-pod``): :func:`write_adapted_checkpoint` merges the deltas into the base weights first,
  since vLLM loads plain weights only.

Both make the tokenizer portable (:func:`podkv.models.default_model.portable_tokenizer_config`): vLLM's
transformers would otherwise read the GGUF-converted default tokenizer as ``CodeLlamaTokenizer``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from podkv.errors import PodError
from podkv.io import atomic_write_text
from podkv.models.default_model import MANIFEST, portable_tokenizer_config
from podkv.plan import SharingPlan
from podkv.serving.checks import check_plan_servable, pod_architecture, unservable_features

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def load_hf_config(model_dir: str | Path):
    """The transformers config of a local checkpoint directory."""
    from transformers import AutoConfig  # startup: transformers

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise PodError(f"--model {path}: no config.json there (vLLM serving needs a local HF checkpoint directory)")
    return AutoConfig.from_pretrained(path)


def pod_hf_overrides(plan: SharingPlan, config) -> dict:
    """``hf_overrides`` for ``vllm.LLM``: the PoD architecture and the plan (checked here)."""
    check_plan_servable(plan, config)
    return {"architectures": [pod_architecture(config)], "pod_plan": plan.to_dict()}


def write_pod_checkpoint(model_dir: str | Path, plan: SharingPlan, out_dir: str | Path) -> Path:
    """Copy ``model_dir`` to ``out_dir`` with the plan and the PoD architecture in config.json.

    Weight files are hard-linked when possible (same file system), else copied. A ``podkv train`` folder also
    holds its deltas (``pod_deltas.safetensors``, already merged into its weights): they stay behind, since vLLM
    loads every ``*.safetensors`` of the folder as weights and refuses their LoRA names.
    """
    from podkv.models.adapted import DELTA_FILE  # startup: transformers

    src, out = Path(model_dir), Path(out_dir)
    config = load_hf_config(src)
    check_plan_servable(plan, config)
    check_new_dir(src, out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("config.json", DELTA_FILE):
            _link_or_copy(f, out / f.name)
    _write_config(src / "config.json", out, pod_hf_overrides(plan, config))
    return out


def write_dense_checkpoint(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy ``model_dir`` unchanged but for a portable tokenizer (the dense baseline served next to PoD)."""
    src, out = Path(model_dir), Path(out_dir)
    load_hf_config(src)
    check_new_dir(src, out)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            _link_or_copy(f, out / f.name)
    _write_config(src / "config.json", out, {})
    return out


def is_adapted_dir(path: Path) -> bool:
    """An adapted model stored as deltas on a base model (no weights of its own)."""
    from podkv.models.adapted import DELTA_FILE, PLAN_FILE  # startup: transformers

    return (path / DELTA_FILE).is_file() and (path / PLAN_FILE).is_file() and not (path / "config.json").is_file()


def write_adapted_checkpoint(asset_dir: str | Path, out_dir: str | Path, base_dir: str | Path) -> Path:
    """Merge an adapted model's deltas into ``base_dir``'s weights; write them with its plan to ``out_dir``.

    The plan is checked first (nothing is loaded for a plan vLLM cannot serve): the PoD plugin runs
    layer-granularity plans in ``keys`` mode only, and the deltas were trained for this plan, so another
    plan cannot be swapped in.
    """
    from transformers import AutoModelForCausalLM  # startup: transformers

    from podkv.models.adapted import adapt_weights  # startup: transformers

    asset_dir, base, out = Path(asset_dir), Path(base_dir), Path(out_dir)
    plan = check_adapted_servable(asset_dir, base)
    config = load_hf_config(base)
    overrides = pod_hf_overrides(plan, config)
    check_new_dir(base, out)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapt_weights(model, plan, asset_dir)
    dtype = getattr(config, "dtype", None) or torch.float32  # keep the base's dtype on disk
    model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():  # tokenizer, chat template, generation config: the base model's
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not (out / f.name).exists():
            _link_or_copy(f, out / f.name)
    _write_config(out / "config.json", out, overrides)
    return out


def check_adapted_servable(asset_dir: str | Path, base_dir: str | Path) -> SharingPlan:
    """The adapted model's plan, or a :class:`PodError` that says why vLLM cannot serve it and what it can."""
    from podkv.models.adapted import adapted_plan  # startup: transformers

    plan = adapted_plan(Path(asset_dir))
    plan.validate_for(load_hf_config(base_dir))
    problems = unservable_features(plan)
    if problems:
        raise PodError(f"the adapted model in {asset_dir} cannot be served with vLLM: " + "; ".join(problems) +
                       ". Its deltas were trained for that plan, so no other plan can replace it. Servable instead: "
                       "the base model with a layer plan (mode keys or scores), training-free (`podkv serve-check --plan "
                       "src/podkv/assets/smollm2_plan_layer_35.json --write-checkpoint OUT`), or a model adapted to "
                       "such a plan (`podkv train --plan LAYER_PLAN --out RUN`, then `podkv serve-check --model RUN "
                       "--write-checkpoint OUT`)")
    return plan


def _write_config(src_config: Path, out: Path, overrides: dict) -> None:
    data = json.loads(src_config.read_text())
    data.update(overrides)
    atomic_write_text(out / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    portable_tokenizer_config(out)
    (out / MANIFEST).unlink(missing_ok=True)  # the default model's manifest no longer describes this folder


def check_new_dir(src: Path, out: Path, flag: str = "--out") -> None:
    """Never write over (or, with --force, replace) the checkpoint being read."""
    if Path(out).resolve() == Path(src).resolve():
        raise PodError(f"{flag} {out} is the source checkpoint: choose a new directory")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
