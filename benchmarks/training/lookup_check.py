"""Teacher-forced lookup accuracy on held-out synthetic lookup documents (retrieval_mix.py, another seed).

    python benchmarks/training/lookup_check.py [MODEL ...] [--docs 4] [--seed 99]

MODEL: ``dense`` (the default model), ``smollm2-pod`` or a `podkv train` output directory. For every
question at the end of a document, the answer's digits count as correct when the greedy (argmax) token
at each answer position, given the true prefix, is the true token. Writes results/lookup_check.json.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

import torch

import podkv
from podkv.io import write_json

HERE = Path(__file__).parent


def answers_correct(model, tok, text: str) -> tuple[int, int]:
    """(exactly predicted answers, questions) of one lookup document."""
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pred = model(ids).logits[0].argmax(-1)
    tail = text.rindex("\n\n")
    ok = total = 0
    for m in re.finditer(r"\? (\d+)\.", text[tail:]):
        n0 = len(tok(text[:tail + m.start(1)], add_special_tokens=False)["input_ids"])
        ans = tok(text[:tail + m.end(1)], add_special_tokens=False)["input_ids"][n0:]
        ok += pred[n0 - 1:n0 - 1 + len(ans)].tolist() == ans
        total += 1
    return ok, total


def main() -> None:
    from retrieval_mix import lookup_documents, prose_paragraphs

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=["dense", "smollm2-pod"])
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, tok = podkv.load_model(progress=False)
    rng = random.Random(args.seed)
    paragraphs = prose_paragraphs()
    docs = lookup_documents(tok, paragraphs, rng, args.seq_len - 1, args.docs)
    rows = {}
    for name in args.models:
        model, _ = podkv.load_model(None if name == "dense" else name, progress=False)
        ok = total = 0
        for text in docs:
            a, b = answers_correct(model, tok, text)
            ok, total = ok + a, total + b
        rows[name] = {"correct": ok, "questions": total}
        print(f"{name}: {ok}/{total} answers exactly predicted", flush=True)
    write_json(HERE / "results" / "lookup_check.json", {"docs": args.docs, "seed": args.seed,
                                                         "seq_len": args.seq_len, "models": rows})


if __name__ == "__main__":
    main()
