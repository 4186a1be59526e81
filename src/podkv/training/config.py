"""`TrainConfig`: everything one `podkv train` run needs, validated before any compute starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from podkv.errors import PodError
from podkv.training.longrange import check_chat_share, check_kinds

OBJECTIVES = ("lm", "distill", "local")
TRAINABLE = ("qk", "attention", "all")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """One post-training adaptation run (paper §2.2: lr 1e-5, cosine schedule).

    Parameters
    ----------
    plan : path of the sharing plan (JSON).
    out : directory written at the end (atomically); checkpoints live in ``<out>.tmp-train``.
    model : model name or path for :func:`podkv.load_model` (None = the embedded default).
    data : text files; empty = the standard library's ``pydoc_data.topics`` (held-out slice excluded).
    seq_len : tokens per packed training sequence.
    max_steps / max_tokens : budget; exactly one may be set (tokens are rounded up to whole steps).
    objective : ``"lm"`` (next-token loss), ``"distill"`` (KL to the dense-attention teacher) or
        ``"local"`` (each layer's attention output matched to the teacher's, on the teacher's inputs).
    trainable : ``"qk"`` (q/k of layers that read anchor keys, k of anchors), ``"attention"`` or ``"all"``.
    lora_rank : 0 = train the selected weights directly; > 0 = LoRA adapters on them (peft).
    eval_fraction : share of the packed token stream held out for evaluation (the tail; never trained on).
        With the default text the held-out curve is measured on the ``heldout`` split instead.
    long_range : generated long-range documents (:mod:`podkv.training.longrange`) added to the
        training rows; 0 = none.
    long_range_kinds : the kinds those documents cycle through (repeat, lookup, multilookup, chain, track).
    long_range_chat : share of the question documents (every kind but repeat) framed in the tokenizer's chat
        template: haystack and question in a user turn, the answer in the assistant's; 0 = all plain text.
    answer_weight : ``distill`` only: loss weight of the positions that predict a question document's answer
        tail (questions and answers after the haystack), against 1 elsewhere; 1 = the plain mean.
    init : ``"none"``, ``"anchor-q"`` or ``"anchor-qk"`` — start shared heads from their anchor's
        projections (:mod:`podkv.models.anchor_init`); recorded in the saved plan's ``meta["init"]``.
    eval_every : optimizer steps between held-out perplexity measurements (0 = only at start and end).
    """

    plan: str
    out: str
    model: str | None = None
    data: list[str] = field(default_factory=list)
    seq_len: int = 1024
    max_steps: int | None = None
    max_tokens: int | None = None
    lr: float = 1e-5
    objective: str = "lm"
    trainable: str = "qk"
    lora_rank: int = 0
    lora_alpha: float | None = None
    batch_size: int = 1
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    gradient_checkpointing: bool = False
    save_steps: int = 50
    eval_fraction: float = 0.1
    eval_every: int = 0
    eval_tokens: int = 4096
    precision: str = "auto"
    seed: int = 0
    resume: bool = False
    force: bool = False  # replace an existing ``out`` (podkv.outputs: the rule of every command)
    threads: int | None = None
    long_range: int = 0
    long_range_kinds: tuple[str, ...] = ("repeat", "lookup")
    long_range_chat: float = 0.0
    answer_weight: float = 1.0
    init: str = "none"

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "save_steps", "eval_tokens"):
            _positive(name, getattr(self, name))
        if (self.max_steps is None) == (self.max_tokens is None):
            raise PodError("give exactly one budget: --max-steps N or --max-tokens N")
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        if self.max_tokens is not None:
            _positive("max_tokens", self.max_tokens)
        if not self.lr > 0:
            raise PodError(f"--lr must be > 0, got {self.lr}")
        _choice("objective", self.objective, OBJECTIVES)
        _choice("trainable", self.trainable, TRAINABLE)
        _choice("precision", self.precision, PRECISIONS)
        from podkv.models.anchor_init import INITS  # startup: transformers

        _choice("init", self.init, INITS)
        if self.lora_rank < 0:
            raise PodError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if not 0 < self.eval_fraction < 1:
            raise PodError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.warmup_ratio < 1:
            raise PodError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.long_range < 0:
            raise PodError(f"--long-range must be >= 0 documents, got {self.long_range}")
        self.long_range_kinds = check_kinds(self.long_range_kinds)
        self.long_range_chat = check_chat_share(self.long_range_chat)
        if isinstance(self.answer_weight, bool) or not isinstance(self.answer_weight, (int, float)) \
                or not 0 < self.answer_weight < float("inf"):
            raise PodError(f"--answer-weight must be a finite number > 0, got {self.answer_weight!r}")
        if self.answer_weight != 1 and (self.objective != "distill" or not self.long_range):
            raise PodError(f"--answer-weight {self.answer_weight} needs --objective distill and --long-range "
                           f"documents (got --objective {self.objective}, --long-range {self.long_range})")
        if self.eval_every < 0:
            raise PodError(f"eval_every must be >= 0, got {self.eval_every}")
        self.data = [str(p) for p in self.data]

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process."""
        return self.seq_len * self.batch_size * self.grad_accum

    def steps(self, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.tokens_per_step * world_size
        return max(1, -(-self.max_tokens // per_step))

    @property
    def work_dir(self) -> Path:
        """Where checkpoints and the not-yet-renamed output live (fixed, so --resume finds it)."""
        out = Path(self.out)
        return out.parent / f"{out.name}.tmp-train"

    def to_dict(self) -> dict:
        return asdict(self)


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise PodError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")


def _choice(name, value, choices):
    if value not in choices:
        raise PodError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
