"""The settings of one evaluation run, validated up front so a typo fails before any model loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from podkv.errors import PodError
from podkv.eval.methods import METHODS
from podkv.eval.tasks import TASKS, user_text

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the grid tasks (niah, passkey, multikey) use without --depths

@dataclass
class EvalConfig:
    """What to run. ``methods`` are names in :data:`podkv.eval.methods.METHODS`, ``tasks`` in ``TASKS``.

    Parameters
    ----------
    budget : float, optional
        KV fraction (held / dense) every budgeted method must meet. ``None``: the fraction the PoD
        plan holds at the shortest length, so eviction baselines get PoD's memory.
    lengths : tuple of int
        Prompt lengths in tokens (needle tasks) or window lengths (``ppl``).
    depths : tuple of float, optional
        Needle depths in [0, 1]. ``depths_long`` replaces them above ``long_from`` tokens (8K is slow on CPU).
        ``None``: the grid tasks use :data:`DEFAULT_DEPTHS`, the RULER tasks draw a depth per sample.
    samples : int
        Prompts per (length, depth) cell; RULER tasks without ``depths``: prompts per length.
    max_new_tokens : int, optional
        Greedy tokens per answer; ``None``: each task's own (more for multi-answer tasks).
    files : tuple of str
        ``ppl`` text; refused here, before any model loads, if it repeats the train/plan text.
    """

    tasks: tuple[str, ...] = ("niah",)
    methods: tuple[str, ...] = ("dense",)
    model: str | None = None
    plan: str | None = None
    budget: float | None = None
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] | None = None
    depths_long: tuple[float, ...] | None = None
    long_from: int = 8192
    haystack: str | None = None  # None: the task's default (passkey: filler, others: prose)
    samples: int = 1
    needles: int = 4  # multikey: needles per prompt
    seed: int = 0
    max_new_tokens: int | None = None
    files: tuple[str, ...] = ()
    data: str | None = None
    subset: str | None = None
    out: str = "eval_out"
    compare: bool = False  # a comparison: dense is the reference, not held to --budget
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for t in self.tasks:
            if t not in TASKS:
                raise PodError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        for m in self.methods:
            if m not in METHODS:
                raise PodError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.methods or not self.tasks:
            raise PodError("at least one --method and one task are needed")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise PodError(f"--budget must be a KV fraction in (0, 1], got {self.budget}")
        if not self.lengths or any(int(n) < 16 for n in self.lengths):
            raise PodError(f"--lengths must be token counts >= 16, got {list(self.lengths)}")
        for d in (*(self.depths or ()), *(self.depths_long or ())):
            if not 0.0 <= d <= 1.0:
                raise PodError(f"--depths {d} is deeper than the haystack: depths are fractions in [0, 1]")
        for name in ("samples", "needles", "max_new_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PodError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        per_length = self.samples * len(self.depths or (None,))  # --samples counts per depth when depths are given
        for t in self.tasks:
            if per_length < TASKS[t].min_samples:
                raise PodError(f"too few samples for a CI: task {t!r} needs >= {TASKS[t].min_samples} prompts "
                               f"per length (--samples x --depths), got {per_length}")
        self.lengths = tuple(sorted(int(n) for n in self.lengths))
        self.depths = None if self.depths is None else tuple(float(d) for d in self.depths)
        if self.files:
            user_text(self.files)

    def explicit_depths(self, length: int) -> tuple[float, ...] | None:
        """The depths asked for at ``length`` (``--depths`` / ``--depths-long``), or None."""
        if self.depths_long is not None and length >= self.long_from:
            return tuple(self.depths_long)
        return self.depths

    def depths_for(self, length: int) -> tuple[float, ...]:
        explicit = self.explicit_depths(length)
        return DEFAULT_DEPTHS if explicit is None else explicit

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.out)
