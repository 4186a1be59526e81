"""RULER-style synthetic tasks generated from code (NVIDIA RULER's ``niah.py`` and ``variable_tracking.py``).

Why: the older ``niah`` task puts one prompt in each (length, depth) cell, so every cell is 0 or 100%
and two KV methods cannot be told apart. Here every sample draws its own key, value, needle depth
(uniform in [0, 1] unless ``--depths`` is given) and stretch of haystack; scores are RULER's
``string_match_all`` (share of the expected strings in the greedy answer); a task refuses fewer than
:data:`~podkv.eval.stats.MIN_SAMPLES` prompts per length, and its summary carries a 95% interval.
Templates follow RULER (instruction, needle, question, answer prefix, and the one answered example
``vt`` opens with). Prompts are built to the token by :func:`podkv.eval.prompts.build_prompt`.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import ClassVar

from podkv.errors import PodError
from podkv.eval.haystack import FILLER, sentences
from podkv.eval.prompts import KEYS, Needle, build_prompt
from podkv.eval.scoring import string_match_all
from podkv.eval.stats import MIN_SAMPLES
from podkv.eval.task_base import Case, Task

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                    "I will quiz you about the numbers afterwards.\n")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
DEPTH_BINS = 5  # random depths are grouped into fifths for the length x depth heatmap


def magic_needle(key: str, value: str, values: int = 1) -> Needle:
    """RULER's needle ``One of the special magic numbers for <key> is: <value>.``, asking for ``values`` of them."""
    if values == 1:
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
    else:
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    return Needle(f" One of the special magic numbers for {key} is: {value}.", question, value, prefix)


@dataclass
class Draw:
    """What one sample gets: its keys (the asked one first), values, needle depth and first haystack sentence."""

    keys: list[str]
    values: list[str]
    depth: float
    start: int


class RulerTask(Task):
    """Base: a generation task over freshly drawn needles, scored by string_match_all."""

    metric, score_key, min_samples = "string_match_all", "score", MIN_SAMPLES
    max_new_tokens: ClassVar[int] = 16
    haystack: ClassVar[str] = "prose"
    instruction: ClassVar[str] = NIAH_INSTRUCTION
    keys_per_sample: ClassVar[int] = 1
    values_per_sample: ClassVar[int] = 1
    digits: ClassVar[int] = 7  # RULER's magic numbers
    prompt_family: ClassVar[str | None] = None  # tasks of one family are given the same prompts

    def placements(self, rng: random.Random, draw: Draw) -> tuple[list[tuple[Needle, float]], list[str]]:
        """(needles with depths, the strings a full answer contains); the first needle is the asked one."""
        raise NotImplementedError

    def score(self, text: str, answer) -> float:
        return string_match_all(text, answer)

    def instruction_for(self, rng: random.Random, draw: Draw) -> str:
        """The text before the haystack."""
        return self.instruction

    def cases(self, tok, cfg, plan) -> list[Case]:
        out = []
        for length in cfg.lengths:
            fixed = cfg.explicit_depths(length)
            slots = [d for d in (fixed or (None,)) for _ in range(cfg.samples)]
            rng = random.Random(f"{cfg.seed}-{self.prompt_family or self.name}-{length}")
            for i, draw in enumerate(self.draws(rng, slots)):
                placed, refs = self.placements(rng, draw)
                p = build_prompt(tok, length, placed, 0, haystack=self.haystack,
                                 instruction=self.instruction_for(rng, draw), start=draw.start)
                depth_bin = draw.depth if fixed else _bin_centre(draw.depth)
                info = {"length": length, "depth": round(draw.depth, 4), "depth_bin": depth_bin, "sample": i,
                        "actual_depth": round(p.actual_depth, 4), "hay_tokens": p.hay_tokens,
                        "needle_pos": p.needle_pos, "needle_positions": list(p.positions), "haystack": self.haystack,
                        "haystack_start": draw.start, "key": draw.keys[0], "value": draw.values[0]}
                out.append(Case(p.input_ids, info, refs))
        return out

    def draws(self, rng: random.Random, slots: list[float | None]) -> list[Draw]:
        """One draw per slot (a fixed depth, or None for a uniform one): no key or value is used twice,
        and the haystack starts are spread evenly over the text in a shuffled order."""
        count = len(slots)
        keys = self.unique_keys(rng, count * self.keys_per_sample)
        lo = 10 ** (self.digits - 1)
        values = [str(v) for v in rng.sample(range(lo, 10 * lo), count * self.values_per_sample)]
        n = len(sentences(self.haystack))
        phase = rng.randrange(n)
        starts = [(phase + i * n // count) % n for i in range(count)]
        rng.shuffle(starts)
        k, v = self.keys_per_sample, self.values_per_sample
        return [Draw(keys[i * k:(i + 1) * k], values[i * v:(i + 1) * v], rng.random() if d is None else d, starts[i])
                for i, d in enumerate(slots)]

    def unique_keys(self, rng: random.Random, total: int) -> list[str]:
        if total > len(KEYS):
            raise PodError(f"--samples too large for {self.name}: it has {len(KEYS)} distinct keys and "
                           f"{total} are needed per length")
        return rng.sample(KEYS, total)


class NiahSingleNoise(RulerTask):
    """RULER niah_single_1: one magic-number needle in repeated noise sentences."""

    name, haystack = "niah_single_noise", "filler"

    def placements(self, rng, draw):
        return [(magic_needle(draw.keys[0], draw.values[0]), draw.depth)], draw.values[:1]


class NiahSingleProse(NiahSingleNoise):
    """RULER niah_single_2: one magic-number needle in held-out prose (stdlib docstrings)."""

    name, haystack = "niah_single_prose", "prose"


class NiahMultikey(RulerTask):
    """RULER niah_multikey_1: the asked needle plus 3 needles with other keys, in held-out prose."""

    name, keys_per_sample, values_per_sample = "niah_multikey", 4, 4

    def placements(self, rng, draw):
        placed = [(magic_needle(k, v), draw.depth if i == 0 else rng.random())
                  for i, (k, v) in enumerate(zip(draw.keys, draw.values))]
        return placed, draw.values[:1]


class NiahMultivalue(RulerTask):
    """RULER niah_multivalue: one key with 4 values in held-out prose; all 4 must be returned."""

    name, values_per_sample, binary, max_new_tokens = "niah_multivalue", 4, False, 48

    def placements(self, rng, draw):
        key, values = draw.keys[0], draw.values
        placed = [(magic_needle(key, v, values=len(values)), draw.depth if i == 0 else rng.random())
                  for i, v in enumerate(values)]
        return placed, list(values)


class VariableTracking(RulerTask):
    """RULER vt: one chain of 4 hops (VAR A = 12345, VAR B = VAR A, ...) in noise; name all 5 variables."""

    name, haystack, instruction = "vt", "filler", VT_INSTRUCTION
    keys_per_sample, digits, binary, max_new_tokens = 5, 5, False, 32

    def placements(self, rng, draw):
        """The chain's first statement at the sample's depth, each hop later, at uniform depths after it."""
        names, value = draw.keys, draw.values[0]
        question, prefix = _vt_question(value), _vt_prefix(len(names), value)
        first = Needle(f"\nVAR {names[0]} = {value}\n", question, value, prefix)
        hops = sorted(draw.depth + (1 - draw.depth) * rng.random() for _ in names[1:])
        placed = [(first, draw.depth)]
        placed += [(Needle(f"\nVAR {b} = VAR {a}\n", question, b, prefix), d)
                   for a, b, d in zip(names, names[1:], hops)]
        return placed, list(names)

    def instruction_for(self, rng, draw):
        """RULER's in-context example first: a chain of 3-letter names among 5 noise lines, answered in full.

        Without it a small model continues the noise instead of listing variables.
        """
        names = rng.sample([a + b + c for a in "ABCDEFGHIJ" for b in "KLMNOPQRS" for c in "TUVWXYZ"],
                           self.keys_per_sample)
        value = draw.values[0]
        while value == draw.values[0]:
            value = str(rng.randint(10 ** (self.digits - 1), 10 ** self.digits - 1))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
        slots = set(rng.sample(range(5 + len(chain)), len(chain)))
        lines, links, noise = [], iter(chain), iter([FILLER] * 5)
        for i in range(5 + len(chain)):
            lines.append(next(links) if i in slots else next(noise))
        example = (self.instruction + "\n".join(lines) + f"\n{_vt_question(value)}\n"
                   f"{_vt_prefix(len(names), value)} {' '.join(names)}\n\n")
        return example + self.instruction

    def unique_keys(self, rng, total):
        """RULER's variable names: 5 random capital letters, all different."""
        seen: dict[str, None] = {}
        while len(seen) < total:
            seen.setdefault("".join(rng.choices(string.ascii_uppercase, k=5)))
        return list(seen)


def _bin_centre(depth: float) -> float:
    """The centre of the fifth of [0, 1] that ``depth`` falls in (0.1, 0.3, ..., 0.9)."""
    return (min(int(depth * DEPTH_BINS), DEPTH_BINS - 1) + 0.5) / DEPTH_BINS


def _vt_question(value: str) -> str:
    return f"Question: Find all variables that are assigned the value {value} in the text above."


def _vt_prefix(n: int, value: str) -> str:
    return (f"Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
            f"assigned the value {value}, they are:")


RULER_TASKS = (NiahSingleNoise, NiahSingleProse, NiahMultikey, NiahMultivalue, VariableTracking)
