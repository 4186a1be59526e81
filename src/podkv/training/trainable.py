"""Which weights adapt to PoD: a registry of selections, applied directly or through LoRA (peft)."""

from __future__ import annotations

from podkv.errors import PodError
from podkv.models.enable import attention_modules
from podkv.plan import SharingPlan

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def _qk_modules(model, plan: SharingPlan) -> list[str]:
    """q/k of every layer with a head that reads anchor keys (its distant scores change), plus k of
    the anchors that are read (their keys now serve other layers' queries, paper §2.2)."""
    shared_layers = {l for l in range(plan.num_layers) if plan.shared_heads(l) or plan.window_heads(l)}
    read_anchors = {a for l, row in enumerate(plan.anchors) for a in row if a != l}
    names = []
    for layer in range(plan.num_layers):
        if layer in shared_layers:
            names += [_proj(model, layer, "q_proj"), _proj(model, layer, "k_proj")]
        elif layer in read_anchors:
            names.append(_proj(model, layer, "k_proj"))
    return names


def _attention_modules(model, plan: SharingPlan) -> list[str]:
    return [_proj(model, l, p) for l in range(plan.num_layers) for p in ATTN_PROJ]


def _all_modules(model, plan: SharingPlan) -> list[str]:
    return _attention_modules(model, plan) + [n for n, _ in model.named_modules() if n.endswith(MLP_PROJ)]


# name -> function(model, plan) -> names of nn.Linear modules to train
SELECTIONS = {"qk": _qk_modules, "attention": _attention_modules, "all": _all_modules}


def _proj(model, layer: int, proj: str) -> str:
    mods = attention_modules(model)
    for name, module in model.named_modules():
        if module is mods[layer]:
            return f"{name}.{proj}"
    raise PodError(f"layer {layer} has no attention module")


def select_modules(model, plan: SharingPlan, trainable: str) -> list[str]:
    if trainable not in SELECTIONS:
        raise PodError(f"--trainable must be one of {', '.join(SELECTIONS)}, got {trainable!r}")
    names = SELECTIONS[trainable](model, plan)
    if not names:
        raise PodError(f"--trainable {trainable} selects nothing for this plan (no layer shares keys)")
    return names


def mark_trainable(model, plan: SharingPlan, trainable: str) -> list[str]:
    """Freeze everything but the selected modules' weights (``all``: every parameter). Returns param names."""
    modules = set(select_modules(model, plan, trainable))
    names = []
    for name, p in model.named_parameters():
        keep = trainable == "all" or name.rsplit(".", 1)[0] in modules
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    return names


def add_lora(model, plan: SharingPlan, trainable: str, rank: int, alpha: float | None = None):
    """Wrap ``model`` in a peft LoRA model on the selected modules (base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model  # optional: peft
    except ImportError:
        raise PodError("--lora-rank needs peft: pip install 'podkv[train]'") from None
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=select_modules(model, plan, trainable), bias="none")
    return get_peft_model(model, config)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
