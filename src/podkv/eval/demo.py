"""`podkv demo`: the README's first command.

1. The classic check: "What is the capital of France?" answered through PoD (must say Paris).
2. Several RULER needles at depths spread over held-out prose, prefilled with dense, PoD and
   StreamingLLM at PoD's KV budget: how many each finds, with a 95% interval (one prompt says
   nothing), and a PNG.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.methods import attention_mode
from podkv.eval.runner import check_lengths, default_budget, evaluate, load
from podkv.generate_cli import encode_prompt
from podkv.io import save_figure, write_json
from podkv.models import loading

QUESTION = "What is the capital of France?"


def load_demo_model(name: str | None):
    """The adapted model ``smollm2-pod`` when it loads, else the default model (with the shipped plan)."""
    if name is None:
        try:
            return (*load(EvalConfig(model="smollm2-pod")), "smollm2-pod")
        except (PodError, ImportError, OSError) as exc:
            print(f"[demo] smollm2-pod not available ({str(exc).splitlines()[0][:120]}); "
                  "using the default model with the PoD plan", file=sys.stderr)
    return (*load(EvalConfig(model=name)), name or "smollm2 (default)")


def capital_check(model, tok, plan) -> str:
    with attention_mode(model, plan=plan), torch.no_grad():
        ids = encode_prompt(tok, QUESTION, chat=True)
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def needle_compare(model, tok, plan, length: int, samples: int, seed: int, base=None) -> dict:
    """Dense, PoD and StreamingLLM on the same ``samples`` needle prompts (held-out prose, depths
    spread evenly over the haystack); ``base`` (if given) runs dense and StreamingLLM.

    With an adapted PoD model the baselines run on the original weights, as in the paper. The methods take
    turns prompt by prompt, so their times (``seconds``: prefill and greedy answer) come from the same spell of
    the machine. Returns the runner's per-method entries (summaries carry a 95% interval).
    """
    depths = tuple(round((i + 0.5) / samples, 4) for i in range(samples))
    cfg = EvalConfig(methods=("dense", "pod", "streaming"), tasks=("niah_single_prose",), lengths=(length,),
                     depths=depths, samples=1, seed=seed, budget=default_budget(plan, [length]), compare=True)
    models = {} if base is None else {"dense": base, "streaming": base}
    return evaluate(model, tok, cfg, plan, progress=True, models=models, interleave=True)


def demo(model_name: str | None = None, length: int = 2048, samples: int = 10, out: str = "demo_out",
         seed: int = 0, shown: str | None = None) -> int:
    """``out``: where the files are written; ``shown``: the folder they end up in, when the caller stages
    them (:func:`podkv.outputs.staged_dir`)."""
    model, tok, plan, source, name = load_demo_model(model_name)
    check_lengths(model.config, [length], flag="--length")
    print(f"model: {name}; PoD plan: {source}\n{plan.summary(length)}\n")
    answer = capital_check(model, tok, plan)
    print(f"Q: {QUESTION}\nA (PoD): {answer}\n")
    print(f"{samples} needles (RULER magic numbers) in {length}-token held-out prose, depths 5%..95%, greedy:")
    base = None
    if name == "smollm2-pod":  # baselines on the original weights, PoD on the adapted ones
        base, _ = loading.load_model(None, progress=False)
    entries = needle_compare(model, tok, plan, length, samples, seed, base=base)
    rows = [_row(m, e) for m, e in entries.items()]
    if base is not None:
        print("(dense and streaming run on the original weights, pod on smollm2-pod)")
    print(f"{'method':<10} {'found':>7} {'95% CI':>13} {'KV held':>8} {'s/prompt':>9}   by depth (o found, . missed)")
    for r in rows:
        print(f"{r['method']:<10} {r['found']:>3}/{r['n']:<3} [{r['ci95'][0]:4.0%}, {r['ci95'][1]:4.0%}] "
              f"{r['kv_fraction']:8.1%} {r['seconds_per_prompt']:9.2f}   {''.join('o' if c else '.' for c in r['by_depth'])}")
    by = {r["method"]: r for r in rows}
    pod_over_dense = by["pod"]["seconds_per_prompt"] / by["dense"]["seconds_per_prompt"]
    print(f"time per prompt, PoD ÷ dense: {pod_over_dense:.2f}x (same prompts, the methods taking turns; "
          "`podkv bench speed` times prefill and decode apart)")
    out = Path(out)
    write_json(out / "demo.json", {"model": name, "plan_source": source, "capital_answer": answer,
                                   "length": length, "needles": rows, "pod_over_dense_time": pod_over_dense})
    save_figure(_figure(rows, length), out / "demo.png")
    print(f"figure: {Path(shown or out) / 'demo.png'}")
    return 0


def _row(method: str, entry: dict) -> dict:
    task = entry["tasks"]["niah_single_prose"]
    recs = sorted(task["records"], key=lambda r: r["depth"])
    s = task["summary"]
    return {"method": method, "found": sum(r["score"] == 1.0 for r in recs), "n": len(recs), "ci95": s["ci95"],
            "kv_fraction": s["kv_fraction"], "by_depth": [r["score"] == 1.0 for r in recs],
            "depths": [r["depth"] for r in recs], "budget": entry["method"].get("budget"),
            "seconds_per_prompt": entry["seconds"] / len(recs)}


def _figure(rows: list[dict], length: int):
    import matplotlib  # startup: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # startup: matplotlib

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for i, r in enumerate(rows):
        acc = r["found"] / r["n"]
        lo, hi = r["ci95"]
        ax.bar(i, 100 * acc, color=f"C{i}")
        ax.errorbar(i, 100 * acc, yerr=[[100 * (acc - lo)], [100 * (hi - acc)]], color="k", capsize=4)
        ax.text(i, 100 * hi + 2, f"{r['found']}/{r['n']}\n{r['kv_fraction']:.0%} KV", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_ylabel("needles found (%), 95% CI")
    ax.set_ylim(0, 125)
    ax.set_title(f"{rows[0]['n']} needles in {length}-token held-out prose", fontsize=9)
    return fig
