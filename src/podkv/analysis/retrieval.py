"""Which (layer, KV head) pairs read far back: distant-attention mass and a retrieval score.

Heads differ (DuoAttention, RazorAttention): a few *retrieval heads* copy a fact from thousands
of tokens back, most heads barely look past the recent window. Sharing the keys of a retrieval
head costs retrieval; sharing the others costs little. Two measurements per (layer, KV head),
each the max over the KV head's query heads (a KV pair is needed if any of its queries needs it):

* ``distant_mass`` — attention mass the prompt's last queries put on distant tokens (neither the
  ``ns`` sinks nor the ``nr`` recent ones), averaged over prompts.
* ``retrieval`` — attention mass that the teacher-forced answer tokens put on the needle's value
  tokens, averaged over prompts and answer tokens.

The prompts are lookups written into the *plan* split (help topics): "the access code of <name>
is <digits>", asked at the end. They share no template with the evaluation tasks (RULER's
"special magic number" needles in held-out text), so a plan never sees an evaluation prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from podkv import texts
from podkv.analysis.probe import active, probed
from podkv.errors import PodError

NAMES = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lagoon", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra")


@dataclass
class LookupPrompt:
    input_ids: list[int]  # prompt + teacher-forced answer
    value_span: tuple[int, int]  # [start, end) of the needle's value tokens
    answer_span: tuple[int, int]  # [start, end) of the answer tokens (queries that retrieve)


def lookup_prompt(tok, length: int, depth: float, rng: random.Random, prose_ids: list[int]) -> LookupPrompt:
    """A plan-split lookup of ``length`` tokens (answer included) with the record at ``depth``."""
    name, code = rng.choice(NAMES), str(rng.randint(100000, 999999))
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    before, value = enc(f" Note: the access code of {name} is"), enc(f" {code}")
    after, question, answer = enc("."), enc(f"\n\nThe access code of {name} is"), enc(f" {code}")
    n_hay = length - len(before) - len(value) - len(after) - len(question) - len(answer)
    if n_hay < 16:
        raise PodError(f"lookup length {length} is too short for a needle and a question")
    start = rng.randrange(0, len(prose_ids) - n_hay)
    hay = prose_ids[start:start + n_hay]
    cut = int(depth * n_hay)
    ids = hay[:cut] + before
    v0 = len(ids)
    ids += value + after + hay[cut:] + question
    a0 = len(ids)
    ids += answer
    return LookupPrompt(ids, (v0, v0 + len(value)), (a0 - 1, len(ids) - 1))


@dataclass
class RowProbe:
    """Records, per layer, the attention rows (Hq, R, T) of chosen query positions."""

    rows: list[int]
    attn: dict[int, torch.Tensor] = field(default_factory=dict)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """query (1, Hq, T, D), key (1, Hkv, T, D) -> attn[layer] (Hq, R, T), causal."""
        hq, T = query.shape[1], key.shape[2]
        q = query[0, :, self.rows]  # (Hq, R, D)
        k = key[0].repeat_interleave(hq // key.shape[1], dim=0)  # (Hq, T, D)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        causal = torch.arange(T)[None, :] > torch.tensor(self.rows)[:, None]
        self.attn[layer] = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)


@torch.no_grad()
def head_scores(model, tok, samples: int = 16, length: int = 2048, ns: int = 16, nr: int = 240, last_q: int = 32,
                seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """``{"distant_mass", "retrieval"}``, each (layers, kv_heads), from ``samples`` lookup prompts."""
    cfg = model.config
    L, hq = cfg.num_hidden_layers, cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    if length <= ns + nr + last_q:
        raise PodError(f"--length {length} leaves no distant tokens: it must exceed ns + nr + last_q")
    prose = list(tok.encode(texts.text("plan"), add_special_tokens=False))
    rng = random.Random(seed)
    mass, retr = torch.zeros(L, hq), torch.zeros(L, hq)
    with probed(model):
        for s in tqdm(range(samples), desc="retrieval heads", disable=not progress):
            # the record sits beyond the recent window of every answer query: depth in [0.05, 0.8]
            p = lookup_prompt(tok, length, 0.05 + 0.75 * rng.random(), rng, prose)
            a0, a1 = p.answer_span
            T = len(p.input_ids)
            rows = list(range(a0 - last_q, a0)) + list(range(a0, a1))
            probe = RowProbe(rows)
            with active(probe):
                model(input_ids=torch.tensor([p.input_ids]), use_cache=False)
            v0, v1 = p.value_span
            for layer, attn in probe.attn.items():  # (Hq, R, T)
                ctx = attn[:, :last_q]
                t = torch.tensor(rows[:last_q])[:, None]
                j = torch.arange(T)[None, :]
                distant = (j >= ns) & (j <= t - nr)
                mass[layer] += (ctx * distant).sum(-1).mean(-1)
                retr[layer] += attn[:, last_q:, v0:v1].sum(-1).mean(-1)
    group = hq // hkv
    per_kv = lambda x: (x / samples).view(L, hkv, group).amax(-1)  # noqa: E731
    return {"distant_mass": per_kv(mass), "retrieval": per_kv(retr)}
