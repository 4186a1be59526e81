"""Training objectives, as a registry of ``transformers.Trainer`` classes.

``lm``: the model's own next-token loss (the paper's post-training). ``distill``: KL divergence
from the same weights with dense attention (frozen, sdpa) to the PoD student, token by token:
it asks PoD to reproduce the dense model rather than to learn the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer


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
        loss = kl_per_token(outputs.logits, t_logits)
        return (loss, outputs) if return_outputs else loss


def kl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(B, T, V) x2 -> scalar mean over B*T of KL(p_teacher || p_student), in fp32."""
    s = F.log_softmax(student_logits.float(), dim=-1).flatten(0, 1)
    t = F.log_softmax(teacher_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


# objective -> Trainer class; "distill" additionally receives teacher=...
TRAINERS = {"lm": Trainer, "distill": DistillTrainer}
