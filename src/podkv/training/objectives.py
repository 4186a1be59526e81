"""Training objectives, as a registry of ``transformers.Trainer`` classes.

``lm``: the model's own next-token loss (the paper's post-training). ``distill``: KL divergence
from the same weights with dense attention (frozen, sdpa) to the PoD student, token by token:
it asks PoD to reproduce the dense model rather than to learn the data. ``local``: every layer's
attention output matched to the dense teacher's, each layer fed the teacher's own input — a
per-layer signal (30 targets per token instead of one distribution at the end) that does not
wait for errors to travel through the whole stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from podkv.models.enable import decoder_layers


class DistillTrainer(Trainer):
    """Trainer whose loss is mean-over-tokens KL(teacher || student) on the full vocabulary."""

    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher is None:
            raise ValueError("DistillTrainer needs a teacher model")
        self.teacher = teacher.eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]  # (B, T)
        if self.teacher.device != ids.device:
            self.teacher.to(ids.device)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=ids, use_cache=False).logits  # (B, T, V)
        outputs = model(input_ids=ids, use_cache=False)
        loss = kl_per_token(outputs.logits, t_logits, inputs.get("loss_weights"))
        return (loss, outputs) if return_outputs else loss


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, V) x2 -> scalar mean over B*T of KL(p_teacher || p_student), in fp32; with ``weights`` (B, T)
    the weighted mean (``--answer-weight``: answer positions count more)."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    if weights is None:
        return F.kl_div(s, t, log_target=True, reduction="batchmean")
    w = weights.flatten().to(s.dtype)
    return (F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * w).sum() / w.sum()


class LayerLocalTrainer(DistillTrainer):
    """Trainer whose loss is the mean over layers of the relative squared error of the attention
    output, with every student layer fed the teacher's input to that layer (teacher forcing per
    layer). Only attention weights get a gradient: MLP outputs never reach the loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        if self.teacher.device != ids.device:
            self.teacher.to(ids.device)
        with torch.no_grad(), LayerTaps(self.teacher) as teacher:
            self.teacher(input_ids=ids, use_cache=False, logits_to_keep=1)
        with LayerTaps(model, feed=teacher.inputs) as student:
            outputs = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        loss = relative_error(student.outputs, teacher.outputs)
        return (loss, outputs) if return_outputs else loss


class LayerTaps:
    """Forward hooks on every decoder layer: record each layer's input and its attention output;
    with ``feed``, replace each layer's input by the given tensor (detached) instead."""

    def __init__(self, model, feed: list[torch.Tensor] | None = None):
        self.layers = decoder_layers(model)
        self.feed = feed
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._pre(i), with_kwargs=True))
            self.handles.append(layer.self_attn.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _pre(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.feed is None:
                self.inputs[i] = hidden.detach()
                return None
            fed = self.feed[i].to(hidden.dtype)
            if args:
                return (fed, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fed}
        return hook

    def _post(self, i):
        def hook(module, args, output):
            self.outputs[i] = output[0] if isinstance(output, tuple) else output
        return hook


def relative_error(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of ||s - t||^2 / ||t||^2 (fp32): each layer counts the same whatever its scale."""
    terms = [(s.float() - t.float()).pow(2).sum() / t.float().pow(2).sum().clamp_min(1e-12)
             for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


# objective -> Trainer class; "distill" and "local" additionally receive teacher=...
TRAINERS = {"lm": Trainer, "distill": DistillTrainer, "local": LayerLocalTrainer}
