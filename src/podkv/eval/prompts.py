"""Needle-in-a-haystack prompts built to the token: exact length, needle at a chosen depth.

The prompt is assembled from separately tokenised pieces
``[chat prefix + instruction] [haystack ... needle ... haystack] [question + chat suffix + answer prefix]``
so its length is exactly the requested one and the needle's token position is known.
Depth is measured like the paper's Figure 3: 0 = the needle opens the haystack, 1 = it closes it.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field

from podkv.errors import PodError
from podkv.eval.haystack import haystack_units, sentences

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.\n")
_SLOT = "\x00PODKV_CONTENT\x00"
WORDS = ("amber", "bison", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "iris", "jade", "kestrel",
         "lagoon", "maple", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber",
         "velvet", "willow", "yarrow", "zephyr")
KEYS = tuple(f"{a}-{b}" for a in WORDS for b in WORDS if a != b)  # RULER-style two-word needle keys


@dataclass(frozen=True)
class Needle:
    """A fact hidden in the haystack and the question that asks for it."""

    text: str  # inserted between two sentences, with a leading space
    question: str
    answer: str
    answer_prefix: str = ""  # starts the model's turn: small models then answer in the expected form


@dataclass
class NeedlePrompt:
    """A built prompt. ``input_ids`` has exactly ``length`` tokens."""

    input_ids: list[int]
    answer: str
    length: int
    depth: float
    needle_pos: int  # token index (in input_ids) where the asked needle starts
    hay_span: tuple[int, int]  # [start, end) of haystack + needles in input_ids
    needle_len: int
    hay_before: int  # haystack tokens (needles excluded) before the asked needle
    hay_tokens: int  # haystack tokens in all (needles excluded)
    meta: dict = field(default_factory=dict)
    positions: tuple[int, ...] = ()  # token index where each needle starts, in ``placements`` order

    @property
    def actual_depth(self) -> float:
        return self.hay_before / self.hay_tokens


def passkey_needle(rng: random.Random) -> Needle:
    key = str(rng.randint(10000, 99999))
    return Needle(f" The pass key is {key}. Remember it. {key} is the pass key.", "What is the pass key?", key,
                  "The pass key is")


def fact_needle(rng: random.Random, key: str | None = None) -> Needle:
    """RULER's key-value needle: 'The special magic number for <key> is: <7 digits>.'"""
    key = key or f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
    value = str(rng.randint(1000000, 9999999))
    return Needle(f" The special magic number for {key} is: {value}.",
                  f"What is the special magic number for {key}?", value,
                  f"The special magic number for {key} is:")


def build_prompt(tok, length: int, placements: list[tuple[Needle, float]], ask: int = 0, haystack: str = "filler",
                 seed: int = 0, chat: bool = True, instruction: str = INSTRUCTION,
                 start: int | None = None) -> NeedlePrompt:
    """Token ids of a haystack of ``length`` tokens holding each needle at its depth, asking for ``placements[ask]``.

    Parameters
    ----------
    placements : list of (Needle, depth)
        Depth in [0, 1] of each needle inside the haystack.
    instruction : str
        The line before the haystack (RULER tasks use RULER's own wording).
    start : int, optional
        Index of the haystack's first sentence; default: drawn from ``seed``. Tasks that must give every
        sample its own stretch of text pass it explicitly.
    """
    if not placements:
        raise PodError("a needle prompt needs at least one needle")
    for needle, depth in placements:
        if not 0.0 <= depth <= 1.0:
            raise PodError(f"needle depth {depth} is outside the haystack: depths are fractions in [0, 1]")
    asked = placements[ask][0]
    pre, post = _frame(tok, asked, chat, instruction)
    needles = [list(tok.encode(n.text, add_special_tokens=False)) for n, _ in placements]
    n_hay = length - len(pre) - len(post) - sum(map(len, needles))
    if n_hay < 1:
        raise PodError(f"--lengths {length} is too short: the question and needles alone take "
                       f"{length - n_hay} tokens")
    if start is None:
        start = random.Random(f"{seed}-{haystack}-{length}").randrange(len(sentences(haystack)))
    units = haystack_units(tok, haystack, n_hay, start=start)
    hay = [t for u in units for t in u][:n_hay]
    bounds = _boundaries(units, n_hay)
    cuts = [_nearest(bounds, depth * n_hay) for _, depth in placements]
    order = sorted(range(len(placements)), key=lambda i: (cuts[i], i))
    ids, prev, pos = list(pre), 0, {}
    for i in order:
        ids += hay[prev:cuts[i]]
        pos[i] = len(ids)
        ids += needles[i]
        prev = cuts[i]
    ids += hay[prev:]
    end = len(ids)
    ids += post
    assert len(ids) == length, (len(ids), length)
    return NeedlePrompt(ids, asked.answer, length, placements[ask][1], pos[ask], (len(pre), end), len(needles[ask]),
                        cuts[ask], n_hay,
                        meta={"haystack": haystack, "question": asked.question, "needles": len(placements)},
                        positions=tuple(pos[i] for i in range(len(placements))))


def _frame(tok, needle: Needle, chat: bool, instruction: str = INSTRUCTION) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack: chat template, instruction, question, answer prefix."""
    question = f"\n\n{needle.question}"
    if chat and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                           tokenize=False)
        before, after = rendered.split(_SLOT)
    else:
        before, after = "", "\n" if needle.answer_prefix.startswith("Answer:") else "\nAnswer: "
    pre = tok.encode(before + instruction, add_special_tokens=False)
    post = tok.encode(question + after + needle.answer_prefix, add_special_tokens=False)
    return list(pre), list(post)


def _boundaries(units: list[list[int]], n: int) -> list[int]:
    out, total = [0], 0
    for u in units:
        total += len(u)
        if total >= n:
            break
        out.append(total)
    out.append(n)
    return out


def _nearest(bounds: list[int], target: float) -> int:
    i = bisect.bisect_left(bounds, target)
    cands = bounds[max(0, i - 1):i + 1]
    return min(cands, key=lambda b: (abs(b - target), b))
