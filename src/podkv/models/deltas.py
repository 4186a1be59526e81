"""The small artifact: only what training changed, as safetensors, applied onto base weights.

Two entry kinds, keyed by the base parameter name (``...q_proj.weight``):
  * ``<name>::delta`` — a full (out, in) difference (direct training);
  * ``<name>::lora_A`` (r, in) and ``<name>::lora_B`` (out, r), scale folded into B — a LoRA update.
Applying needs neither peft nor the training code, so ``load_model("smollm2-pod")`` stays light.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save

from podkv.errors import PodError
from podkv.io import atomic_write_bytes


def lora_factors(peft_model) -> dict[str, torch.Tensor]:
    """LoRA factors of a peft model, keyed by the *base* parameter names."""
    out = {}
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        base = name.removeprefix("base_model.model.") + ".weight"
        a = module.lora_A["default"].weight.detach()  # (r, in)
        b = module.lora_B["default"].weight.detach() * module.scaling["default"]  # (out, r)
        out[f"{base}::lora_A"], out[f"{base}::lora_B"] = a.float().contiguous(), b.float().contiguous()
    return out


def full_deltas(model, base_state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``W_trained - W_base`` for the parameters in ``names``."""
    params = dict(model.named_parameters())
    return {f"{n}::delta": (params[n].detach().float() - base_state[n].float()).contiguous() for n in names}


def compose_deltas(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``first`` then ``second`` as one set: applying it equals applying both in turn.

    Why: ``podkv train --model smollm2-pod`` adapts weights that already carry the shipped deltas; its own
    deltas are relative to those, so a model that ships (or reloads) from the base checkpoint needs both.
    Two LoRA updates of a parameter stack along the rank (B1 A1 + B2 A2 = [B1 B2] [A1; A2]); a full delta on
    either side makes the sum a full delta.
    """
    def parts(entries):
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in entries.items():
            name, kind = key.rsplit("::", 1)
            out.setdefault(name, {})[kind] = value.float()
        return out

    a, b = parts(first), parts(second)
    out = {}
    for name in {**a, **b}:
        pa, pb = a.get(name, {}), b.get(name, {})
        if not pa or not pb:
            out.update({f"{name}::{k}": v for k, v in (pa or pb).items()})
        elif "lora_A" in pa and "lora_A" in pb:
            out[f"{name}::lora_A"] = torch.cat([pa["lora_A"], pb["lora_A"]], dim=0)
            out[f"{name}::lora_B"] = torch.cat([pa["lora_B"], pb["lora_B"]], dim=1)
        else:
            out[f"{name}::delta"] = _dense(pa) + _dense(pb)
    return out


def _dense(entry: dict[str, torch.Tensor]) -> torch.Tensor:
    return entry["delta"] if "delta" in entry else entry["lora_B"] @ entry["lora_A"]


def save_deltas(tensors: dict[str, torch.Tensor], path: str | Path, dtype=torch.bfloat16) -> Path:
    """Write ``tensors`` as safetensors in ``dtype`` (bf16: the deltas are small updates), atomically."""
    return atomic_write_bytes(path, save({k: v.to(dtype) for k, v in tensors.items()}))


def apply_deltas(model, path: str | Path, scale: float = 1.0, modules: tuple[str, ...] | None = None) -> int:
    """Add the stored updates (times ``scale``: 1 is the trained model) to ``model``'s weights in place; with
    ``modules`` (module-name endings such as ``"q_proj"``) only the updates of those modules, to tell where a
    learned behaviour lives. Returns the number of tensors changed."""
    path = Path(path)
    if not path.is_file():
        raise PodError(f"delta file {path} does not exist")
    entries = load_file(str(path))
    params = dict(model.named_parameters())
    touched = set()
    with torch.no_grad():
        for key, value in entries.items():
            name, kind = key.rsplit("::", 1)
            if name not in params:
                raise PodError(f"delta file {path} updates {name}, which this model does not have")
            if modules is not None and not name.rsplit(".", 1)[0].endswith(modules):
                continue
            p = params[name]
            if kind == "delta":
                p.add_((scale * value.float()).to(p.dtype))
            elif kind == "lora_A":
                b = entries[f"{name}::lora_B"].float()
                p.add_((scale * (b @ value.float())).to(p.dtype))  # (out, r) @ (r, in)
            touched.add(name)
    return len(touched)
