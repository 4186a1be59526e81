"""Where a vt answer goes wrong first: the next-token choice at the end of the benchmark's vt prompts.

    python benchmarks/quality/candidates/first_token.py --samples 50 \
        --out benchmarks/quality/candidates/first_token_vt_1k.json [--model LABEL=DIR ...]

Why: adapted models answer vt far below dense, and most of their greedy answers open with a blank line where
dense lists the variables (benchmarks/quality/ruler/pod.jsonl at 1K: 33 of 50 answers open with a newline, dense 13).
A greedy answer that opens that way has lost (the model then continues the haystack). This measures, on the
same prompts (seed 0, the prompts of benchmarks/quality), the log-probability of a blank line ("\\n\\n") and of
the first name's first token at the answer position, and how often the top token is a newline, for

* dense: the base weights, dense attention;
* each model with its own PoD plan (smollm2-pod unless ``--model`` gives others), and the same weights with dense
  attention, which separates what the weights learned from what the attention costs.

Each figure is a mean over prompts with a bootstrap 95% interval; paired differences against dense on the same
prompts. Writes JSON and a markdown table next to it (``--out``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

import podkv
from podkv.eval.config import EvalConfig
from podkv.eval.ruler import VariableTracking
from podkv.io import atomic_write_text


def _mean_ci(xs: list[float], seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(2000))
    return [sum(xs) / len(xs), means[49], means[1949]]


def _measure(model, tok, cases) -> list[dict]:
    nl = tok.encode("\n\n", add_special_tokens=False)[0]
    out = []
    for case in cases:
        with torch.no_grad():
            lp = model(torch.tensor([case.input_ids]), use_cache=False).logits[0, -1].float().log_softmax(-1)
        first = tok.encode(" " + case.answer[0], add_special_tokens=False)[0]
        out.append({"sample": case.info["sample"], "lp_blank": lp[nl].item(), "lp_first_name": lp[first].item(),
                    "top_is_newline": tok.decode([lp.argmax().item()]).startswith("\n")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", default=[], help="LABEL=DIR of a PoD model (default: smollm2-pod)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = podkv.load_model()
    cfg = EvalConfig(tasks=("vt",), lengths=(args.length,), samples=args.samples, seed=0)
    cases = VariableTracking().cases(tok, cfg, None)
    rows = {"dense": _measure(base, tok, cases)}
    del base
    for spec in args.model or ["smollm2-pod=smollm2-pod"]:
        label, path = spec.split("=", 1)
        model, _ = podkv.load_model(path)
        rows[f"{label} (PoD)"] = _measure(model, tok, cases)
        podkv.disable_pod(model)
        rows[f"{label} weights, dense attention"] = _measure(model, tok, cases)
        del model
    dense = rows["dense"]
    summary = {}
    for name, recs in rows.items():
        summary[name] = {
            "lp_blank": _mean_ci([r["lp_blank"] for r in recs]),
            "lp_first_name": _mean_ci([r["lp_first_name"] for r in recs]),
            "top_is_newline": sum(r["top_is_newline"] for r in recs),
            "lp_blank_minus_dense": _mean_ci([r["lp_blank"] - d["lp_blank"] for r, d in zip(recs, dense)]),
            "lp_first_name_minus_dense": _mean_ci([r["lp_first_name"] - d["lp_first_name"]
                                                   for r, d in zip(recs, dense)]),
        }
    result = {"task": "vt", "length": args.length, "samples": len(cases), "seed": 0, "summary": summary,
              "records": rows}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=1))
    fmt = lambda v: f"{v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]"  # noqa: E731
    lines = [f"# Next token at the vt answer position ({args.length} tokens, {len(cases)} prompts, seed 0)", "",
             f"Command: `python benchmarks/quality/candidates/first_token.py {' '.join(sys.argv[1:])}`", "",
             "| model | top token a newline | log p(blank line) | − dense | log p(first name) | − dense |",
             "|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['top_is_newline']}/{len(cases)} | {s['lp_blank'][0]:.2f} | "
                     f"{fmt(s['lp_blank_minus_dense'])} | {s['lp_first_name'][0]:.2f} | "
                     f"{fmt(s['lp_first_name_minus_dense'])} |")
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
