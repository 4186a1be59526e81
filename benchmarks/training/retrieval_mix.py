"""Write the training text of the shipped adaptation: synthetic long-range lookups + pydoc help topics.

    python benchmarks/training/retrieval_mix.py OUT_DIR [--docs 80] [--seq-len 2048] [--seed 0]

Why: the help topics alone rarely make a token look far back for an exact string, so 150K tokens of
them taught the shared-key layers to model text (held-out ppl within 6% of dense) but not to retrieve
a distant fact (passkey 0/4 beyond 1K). These documents are lookups in prose: records
``"Entry <n>: the access code of <word> is <digits>."`` hidden among help-topic paragraphs, and at the
end questions ``"Which access code belongs to <word>? <digits>."`` for several of them. The dense teacher
answers them, so distillation teaches the PoD student to retrieve through the anchor's keys.

They are deliberately unlike the evaluation prompts (no "pass key", no "special magic number", no
repetitive filler, different question form), so passkey/NIAH stay held-out tasks.

Every lookup document is exactly ``seq_len`` tokens with its EOS, and they come first in the data, so
packing never splits one across two sequences. The help topics follow, in podkv's default order: the
held-out tail of this stream (its last 10%, about the last quarter of the help topics) contains the
slice every table in benchmarks/training is scored on (the last 10% of the help topics alone), so
training never sees it.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

WORDS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel",
         "lagoon", "meadow", "nickel", "orchid", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet",
         "walnut", "xenon", "yarrow", "zephyr", "basalt", "cedar", "delta", "falcon", "glacier", "hazel")


def lookup_document(tok, paragraphs: list[str], rng: random.Random, n_tokens: int) -> str:
    """One document of exactly ``n_tokens`` tokens (EOS excluded): records hidden in prose, questions at the end."""
    names = rng.sample(WORDS, 6)
    codes = {w: str(rng.randint(1000, 999999)) for w in names}
    asked = rng.sample(names, 3)
    tail = "\n\n" + " ".join(f"Which access code belongs to {w}? {codes[w]}." for w in asked)
    body: list[str] = []
    while len(tok.encode("\n\n".join(body) + tail, add_special_tokens=False)) < n_tokens - 60:
        body.append(rng.choice(paragraphs))
    for i, w in enumerate(names):  # records at random depths, never before the first paragraph
        body.insert(rng.randint(1, len(body)), f"Entry {i + 1}: the access code of {w} is {codes[w]}.")
    first, rest = body[0].split(), "\n\n" + "\n\n".join(body[1:])

    def count(words):
        return len(tok.encode(" ".join(words) + rest + tail, add_special_tokens=False))

    pads = ["so", "and", "then", "well"]
    for step in range(400):  # trim the first paragraph from its front, or pad it, to the exact count
        n = count(first)
        if n == n_tokens:
            break
        first = first[1:] if n > n_tokens and len(first) > 1 else [pads[step // 50 % len(pads)]] + first
    else:
        raise RuntimeError("could not hit the exact token count")
    text = " ".join(first) + rest
    return text + tail


def lookup_documents(tok, paragraphs: list[str], rng: random.Random, n_tokens: int, count: int) -> list[str]:
    """``count`` lookup documents; a rare paragraph cannot be cut to the exact count: draw again."""
    docs = []
    while len(docs) < count:
        for _ in range(10):
            try:
                docs.append(lookup_document(tok, paragraphs, rng, n_tokens))
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("10 draws in a row missed the exact token count")
    return docs


def prose_paragraphs() -> list[str]:
    """Help-topic paragraphs from the head of the topics: far from the held-out tail."""
    from podkv.training.data import default_documents

    topics = default_documents()
    return [p.strip() for t in topics[: int(len(topics) * 0.8)] for p in t.split("\n\n") if 200 < len(p.strip()) < 1200]


def main() -> None:
    import podkv
    from podkv.training.data import default_documents

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--docs", type=int, default=80)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    _, tok = podkv.load_model(progress=False)
    topics = default_documents()
    paragraphs = prose_paragraphs()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(lookup_documents(tok, paragraphs, rng, args.seq_len - 1, args.docs)):
        (out / f"a_lookup_{i:04d}.txt").write_text(text)
    for i, text in enumerate(topics):  # then the help topics, in podkv's default order
        if text.strip():
            (out / f"b_topic_{i:04d}.txt").write_text(text)
    print(f"wrote {args.docs} lookup documents and {len(topics)} help topics to {out}")


if __name__ == "__main__":
    main()
