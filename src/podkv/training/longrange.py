"""Long-range training documents made from the *train* split, none of them an evaluation prompt.

The help topics are short: packed with EOS, almost no token depends on anything beyond the
256-token proximal window, so adaptation never learns to read distant tokens through an
anchor's keys. Two generated kinds fix that, each exactly ``seq_len - 1`` tokens (+ EOS, so
packing never splits one):

* **repeat** — a passage, unrelated text, then the passage again. Every token of the second copy
  is predictable only by looking back more than the proximal window (the dense teacher does it
  with induction heads); distillation asks the PoD student to do the same through shared keys.
* **lookup** — records ``"Entry <n>: the access code of <name> is <digits>."`` scattered in
  prose, and at the end ``"Which access code belongs to <name>? <digits>."`` questions.

Neither uses RULER's "special magic number" needles, the passkey filler, or the held-out text.
"""

from __future__ import annotations

import random

from podkv.errors import PodError

KINDS = ("repeat", "lookup")
NAMES = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lagoon", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "walnut", "xenon", "yarrow", "zephyr", "basalt", "cedar", "delta", "falcon", "glacier", "hazel")


def repeat_document(stream: list[int], n: int, rng: random.Random, min_gap: int) -> list[int]:
    """``n`` token ids: passage P, a gap of other text (>= ``min_gap``), then P again (cut to fit)."""
    p = rng.randint(n // 8, (n - min_gap) // 2)
    gap = n - 2 * p
    a, b = rng.randrange(len(stream) - p), rng.randrange(len(stream) - gap)
    passage = stream[a:a + p]
    return passage + stream[b:b + gap] + passage


def lookup_document(tok, stream: list[int], n: int, rng: random.Random, records: int = 6,
                    asked: int = 3) -> list[int]:
    """``n`` token ids: prose with ``records`` access-code records, ``asked`` questions at the end."""
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    names = rng.sample(NAMES, records)
    codes = {w: str(rng.randint(1000, 999999)) for w in names}
    recs = [enc(f"\n\nEntry {i + 1}: the access code of {w} is {codes[w]}.\n\n") for i, w in enumerate(names)]
    tail = enc("\n\n" + " ".join(f"Which access code belongs to {w}? {codes[w]}." for w in rng.sample(names, asked)))
    n_prose = n - len(tail) - sum(map(len, recs))
    if n_prose < records:
        raise PodError(f"--seq-len {n + 1} is too short for a lookup document")
    start = rng.randrange(len(stream) - n_prose)
    prose = stream[start:start + n_prose]
    cuts = sorted(rng.sample(range(1, n_prose), records))
    out, prev = [], 0
    for cut, rec in zip(cuts, recs):
        out += prose[prev:cut] + rec
        prev = cut
    return out + prose[prev:] + tail


def long_range_blocks(tok, stream: list[int], seq_len: int, count: int, seed: int = 0, min_gap: int = 256):
    """``count`` token rows of exactly ``seq_len`` (document + EOS), alternating repeat and lookup."""
    if seq_len < 4 * min_gap:
        raise PodError(f"--seq-len {seq_len} is too short for long-range documents: use >= {4 * min_gap}")
    rng = random.Random(seed)
    eos = tok.eos_token_id
    n = seq_len - 1
    rows = []
    for i in range(count):
        doc = repeat_document(stream, n, rng, min_gap) if i % 2 == 0 else lookup_document(tok, stream, n, rng)
        assert len(doc) == n, (len(doc), n)
        rows.append(doc + [eos])
    return rows
