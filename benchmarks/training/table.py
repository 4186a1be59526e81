"""One row of the README table: held-out perplexity and passkey accuracy for one model variant.

    python benchmarks/training/table.py dense|free|adapted [--plan P] [--model DIR] [--lengths 1024 2048 4096]

``dense``: the default model; ``free``: the default model with the plan, no training;
``adapted``: ``podkv.load_model("smollm2-pod")`` (or ``--model DIR`` from ``podkv train``).
Writes benchmarks/training/results/table_<variant>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import podkv
from podkv.io import write_json
from podkv.training.data import load_split
from podkv.eval.scoring import perplexity, window_nll
from podkv.training.evaluate import passkey_accuracy

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant", choices=("dense", "free", "adapted"))
    ap.add_argument("--plan", default=None)
    ap.add_argument("--model", default="smollm2-pod")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--n", type=int, default=4, help="passkey prompts per length")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default=None, help="write results/table_<name>.json (default: the variant)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tok = podkv.load_model(args.model if args.variant == "adapted" else None, progress=False)
    if args.variant == "free":
        podkv.enable_pod(model, podkv.SharingPlan.load(args.plan))
    plan = getattr(model.config, "pod_plan", None)
    heldout = load_split(tok, [], 1024, 0.1).heldout  # the same fixed slice `podkv train` never sees
    total, n = window_nll(model, heldout, 1024, max_tokens=args.eval_tokens)
    row = {"variant": args.variant, "model": args.model if args.variant == "adapted" else "smollm2",
           "plan": plan, "heldout_tokens": min(args.eval_tokens, len(heldout)), "heldout_nll": total / n,
           "heldout_ppl": perplexity(total, n), "passkey": []}
    for length in args.lengths:
        row["passkey"].append(passkey_accuracy(model, tok, length, n=args.n))
        print(args.variant, length, row["passkey"][-1]["accuracy"], flush=True)
    row["wall_s"] = round(time.time() - t0, 1)
    write_json(HERE / "results" / f"table_{args.name or args.variant}.json", row)
    print(row["variant"], "ppl", row["heldout_ppl"], "wall", row["wall_s"])


if __name__ == "__main__":
    main()
