"""Long-range training documents made from the *train* split, none of them an evaluation prompt.

The help topics are short: packed with EOS, almost no token depends on anything beyond the
256-token proximal window, so adaptation never learns to read distant tokens through an
anchor's keys. Generated kinds fix that, each exactly ``seq_len - 1`` tokens (+ EOS, so
packing never splits one):

* **repeat** — a passage, unrelated text, then the passage again. Every token of the second copy
  is predictable only by looking back more than the proximal window (the dense teacher does it
  with induction heads); distillation asks the PoD student to do the same through shared keys.
* **lookup** — records ``"Entry <n>: the access code of <name> is <digits>."`` scattered in
  prose, and at the end ``"Which access code belongs to <name>? <digits>."`` questions.
* **multilookup** — one name owns several numbers (and other names own some too), scattered in
  prose; the end lists *all* of that name's numbers in order. One wording per document, drawn from
  :data:`MULTI_WORDINGS`. Teaches that every distant occurrence matters, not only the strongest.
* **chain** — a value is assigned to one name, then copied name to name (``<b> takes the value of
  <a>``) at later points of the prose; the end names every holder of the value, in chain order.
  Teaches multi-hop reading of distant tokens. Wordings from :data:`CHAIN_WORDINGS`.
* **track** — two copy chains (2-5 hops each, different values) interleaved in either prose or a
  repetitive filler of our own (:data:`TRACK_FILLER`), identifiers in one of several styles, one of
  several statement syntaxes and question forms (:data:`TRACK_WORDINGS`, :data:`TRACK_QUESTIONS`); the
  end asks for the holders of one chain's value. Teaches following one chain past a distractor in
  repetitive text, in wordings, formats and haystacks unlike each other.

None uses RULER's "special magic number" needles, its ``VAR X = Y`` chains, the passkey filler,
or the held-out text: the evaluation's prompts stay unseen (wordings are checked in the tests).

**Chat framing** (``chat_share``): the shipped model is an instruct model, asked in its chat template (the
demo, every evaluation prompt). Plain documents put the question and its answer in running text, so the
student never sees the position where a user turn ends and the assistant's answer starts; after adaptation it
preferred a blank line to the answer there (smollm2-pod on vt: 33 of 50 greedy answers open with "\n\n",
dense 13). A chat-framed question document is the same haystack in a user turn, its questions as user turns
and its answers as the assistant's, rendered by the tokenizer's own template. Measured (stop 35): with 0.75 of
them framed, the blank line got *more* likely and vt fell 6 points (benchmarks/quality/candidates/README.md).
"""

from __future__ import annotations

import random

from podkv.errors import PodError


class Document(list):
    """Token ids of one generated document. ``answer_start``: the index of its first tail token (the questions
    and answers after the haystack, the only tokens that need distant ones to be predicted from a question);
    ``len(self)`` for a document without one (repeat). ``--answer-weight`` weighs the loss there."""

    def __init__(self, ids, answer_start: int | None = None):
        super().__init__(ids)
        self.answer_start = len(self) if answer_start is None else answer_start


_SLOT = "\x00PODKV_HAYSTACK\x00"

KINDS = ("repeat", "lookup", "multilookup", "chain", "track")
DEFAULT_KINDS = ("repeat", "lookup")
# (record, final line) templates; {name}, {value}, {values} (comma-joined, in order of appearance)
MULTI_WORDINGS = (
    ("Note: one of the shipment numbers of {name} is {value}.", "All shipment numbers of {name}, in order: {values}."),
    ("Log: {name} was also given locker {value}.", "Every locker given to {name}: {values}."),
    ("Ledger line: {name} paid invoice {value}.", "The invoices that {name} paid were {values}."),
    ("Aside: {name} once rented room {value}.", "Rooms {name} rented, listed: {values}."),
)
# the user's question of a chat-framed multilookup document, one per MULTI_WORDINGS entry; {name}
MULTI_QUESTIONS = ("Which shipment numbers does {name} have? List them in order.", "Which lockers was {name} given?",
                   "List the invoices {name} paid.", "What rooms did {name} rent?")
# (first assignment, copy, final line) templates; {a}, {b}, {value}, {names} (space-joined, chain order)
CHAIN_WORDINGS = (
    ("Setting: {a} holds {value}.", "Setting: {b} takes the value of {a}.", "Holders of {value}: {names}."),
    ("let {a} := {value}", "let {b} := {a}", "# every name bound to {value}: {names}"),
    ("The box {a} contains {value}.", "The box {b} contains whatever box {a} contains.",
     "Boxes containing {value}: {names}."),
)
# the user's question of a chat-framed chain document, one per CHAIN_WORDINGS entry; {value}
CHAIN_QUESTIONS = ("Who holds {value}, in the order it was passed on?", "Which names end up bound to {value}?",
                   "Which boxes contain {value}?")
# how a chat-framed document's user turn opens, before the haystack
CHAT_OPENINGS = ("", "Read the text below, then answer my questions.\n\n", "Here is a document.\n\n",
                 "Some notes are scattered in this text.\n\n")
# (first assignment, copy) statement syntaxes of a track document; {a}, {b}, {value}
TRACK_WORDINGS = (
    ("{a} = {value}", "{b} = {a}"),
    ("set {a} to {value}", "set {b} to {a}"),
    ("{a} <- {value}", "{b} <- {a}"),
    ("const {a} = {value};", "const {b} = {a};"),
    ("Register {a} is loaded with {value}.", "Register {b} is loaded from register {a}."),
    ("{a}: {value}", "{b}: ref {a}"),
)
# (question, answer) at the end of a track document; {value}, {names} (space-joined, chain order), {n}
TRACK_QUESTIONS = (
    ("Which names end up holding {value}?", "{names}"),
    ("List every identifier whose value is {value}, in order.", "In order: {names}"),
    ("Q: trace {value} through the text. A:", "{names}"),
    ("Who holds {value} after all the copies?", "The {n} holders are {names}"),
)
# Our own repetitive haystack: the evaluation's passkey filler is never used in training.
TRACK_FILLER = "The lake is still. The road is long. The wind is cold. On we walk. Up the hill and down again."
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
                    asked: int = 3, chat: str | None = None) -> list[int]:
    """``n`` token ids: prose with ``records`` access-code records, ``asked`` questions at the end.
    ``chat``: the user turn's opening (:func:`_chat_frame`); None = plain text."""
    names = rng.sample(NAMES, records)
    codes = {w: str(rng.randint(1000, 999999)) for w in names}
    recs = [f"Entry {i + 1}: the access code of {w} is {codes[w]}." for i, w in enumerate(names)]
    turns = [(f"Which access code belongs to {w}?", codes[w]) for w in rng.sample(names, asked)]
    return _questions(tok, stream, n, rng, recs, turns, " ".join(f"{q} {a}." for q, a in turns), chat)


def multilookup_document(tok, stream: list[int], n: int, rng: random.Random, values: int = 4,
                         others: int = 3, chat: str | None = None) -> list[int]:
    """``n`` token ids: ``values`` numbers of one name and ``others`` of other names in prose; all of the
    first name's numbers listed at the end, in order of appearance."""
    wording = rng.choice(MULTI_WORDINGS)
    record, final = wording
    name, *other_names = rng.sample(NAMES, 1 + others)
    numbers = [str(v) for v in rng.sample(range(10_000, 1_000_000), values + others)]
    owners = [name] * values + other_names
    order = rng.sample(range(len(owners)), len(owners))
    texts = [record.format(name=owners[i], value=numbers[i]) for i in order]
    mine = [numbers[i] for i in order if owners[i] == name]
    answer = final.format(name=name, values=", ".join(mine))
    question = MULTI_QUESTIONS[MULTI_WORDINGS.index(wording)].format(name=name)
    return _questions(tok, stream, n, rng, texts, [(question, answer)], answer, chat)


def chain_document(tok, stream: list[int], n: int, rng: random.Random, hops: int = 4,
                   chat: str | None = None) -> list[int]:
    """``n`` token ids: a value assigned to one name, copied along ``hops`` names at later points of the prose,
    and a final line naming every holder in chain order."""
    wording = rng.choice(CHAIN_WORDINGS)
    first, copy, final = wording
    names = rng.sample(NAMES, hops + 1)
    value = str(rng.randint(100, 99_999))
    texts = [first.format(a=names[0], value=value)] + [copy.format(a=a, b=b) for a, b in zip(names, names[1:])]
    answer = final.format(value=value, names=" ".join(names))
    question = CHAIN_QUESTIONS[CHAIN_WORDINGS.index(wording)].format(value=value)
    return _questions(tok, stream, n, rng, texts, [(question, answer)], answer, chat)


def track_document(tok, stream: list[int], n: int, rng: random.Random, chat: str | None = None) -> list[int]:
    """``n`` token ids: :func:`track_texts` scattered in prose or, half the time, in :data:`TRACK_FILLER`."""
    texts, (question, answer), _ = track_texts(rng)
    if rng.random() < 0.5:
        reps = 2 + n // max(1, len(tok.encode(TRACK_FILLER, add_special_tokens=False)))
        stream = list(tok.encode(" ".join([TRACK_FILLER] * reps), add_special_tokens=False))
    return _questions(tok, stream, n, rng, texts, [(question, answer)], f"{question} {answer}", chat)


def track_texts(rng: random.Random) -> tuple[list[str], tuple[str, str], list[str]]:
    """(statements of two interleaved copy chains with different values, the final (question, answer), the
    asked chain's names). Each chain's statements stay in chain order."""
    first, copy = rng.choice(TRACK_WORDINGS)
    question, answer = rng.choice(TRACK_QUESTIONS)
    hops = [rng.randint(2, 5), rng.randint(2, 5)]
    names = _track_names(rng, sum(hops) + 2)
    chains = [names[:hops[0] + 1], names[hops[0] + 1:]]
    values = [str(v) for v in rng.sample(range(100, 99_999), 2)]
    lines = [[first.format(a=c[0], value=v)] + [copy.format(a=a, b=b) for a, b in zip(c, c[1:])]
             for c, v in zip(chains, values)]
    order = rng.sample([0] * len(lines[0]) + [1] * len(lines[1]), len(lines[0]) + len(lines[1]))
    heads = [iter(lines[0]), iter(lines[1])]
    texts = [next(heads[i]) for i in order]
    asked = rng.randrange(2)
    qa = question.format(value=values[asked]), answer.format(names=" ".join(chains[asked]), n=len(chains[asked])) + "."
    return texts, qa, chains[asked]


def _track_names(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct identifiers in one style per document: lower-case words, capitals, or ``x_NN``."""
    style = rng.randrange(3)
    if style == 0:
        return rng.sample(NAMES, count)
    seen: dict[str, None] = {}
    while len(seen) < count:
        name = ("".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=rng.choice((3, 4, 6)))) if style == 1
                else f"{rng.choice('xyzuvw')}_{rng.randint(10, 99)}")
        seen.setdefault(name)
    return list(seen)


def _questions(tok, stream, n, rng, texts, turns, plain_tail: str, chat: str | None) -> list[int]:
    """A question document: ``texts`` scattered in prose, then in plain text ``"\n\n" + plain_tail``, or with
    ``chat`` (the user turn's opening) the chat frame of ``turns`` around the haystack."""
    if chat is None:
        return _scatter(tok, stream, n, rng, texts, "\n\n" + plain_tail)
    head, tail = _chat_frame(tok, turns, chat)
    return _scatter(tok, stream, n, rng, texts, tail, head)


def _chat_frame(tok, turns: list[tuple[str, str]], opening: str) -> tuple[str, str]:
    """The text before and after the haystack of a chat-framed document, rendered by the tokenizer's template:
    a user turn (``opening``, the haystack, the first question), the assistant's answer, then one user and one
    assistant turn per further question."""
    if not getattr(tok, "chat_template", None):
        raise PodError("--long-range-chat needs a tokenizer with a chat template; this one has none")
    (question, answer), rest = turns[0], turns[1:]
    messages = [{"role": "user", "content": f"{opening}{_SLOT}\n\n{question}"},
                {"role": "assistant", "content": answer}]
    for q, a in rest:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    before, after = tok.apply_chat_template(messages, tokenize=False).split(_SLOT)
    return before, after


def _scatter(tok, stream: list[int], n: int, rng: random.Random, texts: list[str], tail_text: str,
             head_text: str = "") -> list[int]:
    """``head_text``, then ``texts`` in order at random points of a stretch of prose, then ``tail_text``: exactly
    ``n`` ids."""
    enc = lambda s: list(tok.encode(s, add_special_tokens=False))  # noqa: E731
    recs = [enc(f"\n\n{t}\n\n") for t in texts]
    head, tail = enc(head_text) if head_text else [], enc(tail_text)
    n_prose = n - len(head) - len(tail) - sum(map(len, recs))
    if n_prose < len(recs):
        raise PodError(f"--seq-len {n + 1} is too short for a long-range document")
    start = rng.randrange(len(stream) - n_prose)
    prose = stream[start:start + n_prose]
    cuts = sorted(rng.sample(range(1, n_prose), len(recs)))
    out, prev = list(head), 0
    for cut, rec in zip(cuts, recs):
        out += prose[prev:cut] + rec
        prev = cut
    out += prose[prev:]
    return Document(out + tail, answer_start=len(out))


def check_kinds(kinds) -> tuple[str, ...]:
    """``kinds`` as a tuple, or a one-line error naming the flag and the first unknown kind."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise PodError(f"--long-range-kinds: unknown kind {unknown[0] if unknown else '(none)'!r}; "
                       f"choose from {', '.join(KINDS)}")
    return kinds


def check_chat_share(share: float) -> float:
    """``share`` if it is a fraction in [0, 1], else a one-line error naming the flag."""
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 <= share <= 1:
        raise PodError(f"--long-range-chat must be a share in [0, 1], got {share!r}")
    return float(share)


def long_range_blocks(tok, stream: list[int], seq_len: int, count: int, seed: int = 0, min_gap: int = 256,
                      kinds: tuple[str, ...] = DEFAULT_KINDS, chat_share: float = 0.0):
    """``count`` token rows (:class:`Document`, ``answer_start`` kept) of exactly ``seq_len`` (document + EOS),
    cycling through ``kinds``; about ``chat_share`` of the question documents (every kind but repeat) chat-framed.
    The chat draws come from a generator of their own, so ``chat_share=0`` gives the documents of earlier releases
    unchanged."""
    if seq_len < 4 * min_gap:
        raise PodError(f"--seq-len {seq_len} is too short for long-range documents: use >= {4 * min_gap}")
    kinds = check_kinds(kinds)
    check_chat_share(chat_share)
    rng, chat_rng = random.Random(seed), random.Random(f"{seed}-chat")
    eos = tok.eos_token_id
    n = seq_len - 1
    make = {"repeat": lambda chat: repeat_document(stream, n, rng, min_gap),
            "lookup": lambda chat: lookup_document(tok, stream, n, rng, chat=chat),
            "multilookup": lambda chat: multilookup_document(tok, stream, n, rng, chat=chat),
            "chain": lambda chat: chain_document(tok, stream, n, rng, chat=chat),
            "track": lambda chat: track_document(tok, stream, n, rng, chat=chat)}
    rows = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        framed = chat_share > 0 and kind != "repeat" and chat_rng.random() < chat_share
        doc = make[kind](chat_rng.choice(CHAT_OPENINGS) if framed else None)
        assert len(doc) == n, (len(doc), n)
        rows.append(Document(doc + [eos], answer_start=getattr(doc, "answer_start", n)))
    return rows
