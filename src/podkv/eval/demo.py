"""`podkv demo`: the README's first command.

1. The classic check: "What is the capital of France?" answered through PoD (must say Paris).
2. A long passkey prompt prefilled with dense, PoD and StreamingLLM at PoD's KV budget: answers,
   correctness and KV MB held, plus a PNG.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from podkv.errors import PodError

QUESTION = "What is the capital of France?"


def load_demo_model(name: str | None):
    """The adapted model ``smollm2-pod`` when it loads, else the default model (with the shipped plan)."""
    from podkv.eval.config import EvalConfig
    from podkv.eval.runner import load

    if name is None:
        try:
            return (*load(EvalConfig(model="smollm2-pod")), "smollm2-pod")
        except (PodError, ImportError, OSError) as exc:
            print(f"[demo] smollm2-pod not available ({str(exc).splitlines()[0][:120]}); "
                  "using the default model with the PoD plan", file=sys.stderr)
    return (*load(EvalConfig(model=name)), name or "smollm2 (default)")


def capital_check(model, tok, plan) -> str:
    import torch

    from podkv.eval.methods import attention_mode
    from podkv.generate_cli import encode_prompt

    with attention_mode(model, plan=plan), torch.no_grad():
        ids = encode_prompt(tok, QUESTION, chat=True)
        out = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def passkey_compare(model, tok, plan, length: int, depth: float, seed: int, base=None) -> list[dict]:
    """Dense, PoD and StreamingLLM on one passkey prompt; ``base`` (if given) runs dense and StreamingLLM.

    With an adapted PoD model, the baselines run on the original weights, as in the paper.
    """
    import torch

    from podkv.eval import prompts
    from podkv.eval.generation import eos_ids, greedy_answer
    from podkv.eval.methods import make_method
    from podkv.eval.runner import default_budget
    from podkv.eval.scoring import exact_match

    needle = prompts.passkey_needle(random.Random(f"demo-{seed}"))
    p = prompts.build_prompt(tok, length, [(needle, depth)], haystack="filler", seed=seed)
    budget = default_budget(plan, [length])
    rows = []
    for name in ("dense", "pod", "streaming"):
        method = make_method(name, plan=plan, budget=None if name == "dense" else budget)
        try:
            method.check(model.config, [length])
        except PodError as exc:
            print(f"[demo] skipping {name}: {exc}", file=sys.stderr)
            continue
        runner = model if base is None or name == "pod" else base
        with method.attached(runner):
            out, pre = greedy_answer(runner, method, torch.tensor([p.input_ids]), 12, eos_ids(tok))
        text = tok.decode(out, skip_special_tokens=True).strip()
        rows.append({"method": name, "answer": text, "correct": exact_match(text, p.answer), "kv_mb": pre.kv_bytes / 2**20,
                     "kv_fraction": pre.kv_fraction, "prefill_s": pre.seconds})
    for r in rows:
        r.update(passkey=p.answer, length=length, needle_pos=p.needle_pos, budget=budget)
    return rows


def demo(model_name: str | None = None, length: int = 3500, depth: float = 0.2, out: str = "demo_out",
         seed: int = 0) -> int:
    from podkv.io import save_figure, write_json

    if not 0.0 <= depth <= 1.0:
        raise PodError(f"--depth {depth} is outside the haystack: use a fraction in [0, 1]")
    model, tok, plan, source, name = load_demo_model(model_name)
    print(f"model: {name}; PoD plan: {source}\n{plan.summary(length)}\n")
    answer = capital_check(model, tok, plan)
    print(f"Q: {QUESTION}\nA (PoD): {answer}\n")
    print(f"Passkey at depth {depth:.0%} of a {length}-token prompt (greedy):")
    base = None
    if name == "smollm2-pod":  # baselines on the original weights, PoD on the adapted ones
        from podkv.models.loading import load_model

        base, _ = load_model(None, progress=False)
    rows = passkey_compare(model, tok, plan, length, depth, seed, base=base)
    if base is not None:
        print("(dense and streaming run on the original weights, pod on smollm2-pod)")
    print(f"{'method':<10} {'answer':<28} {'correct':<8} {'KV MB':>7} {'KV held':>8}")
    for r in rows:
        print(f"{r['method']:<10} {r['answer'][:28]!s:<28} {str(r['correct']):<8} {r['kv_mb']:7.1f} "
              f"{r['kv_fraction']:8.1%}")
    print(f"(passkey {rows[0]['passkey']}; needle at token {rows[0]['needle_pos']})")
    out = Path(out)
    write_json(out / "demo.json", {"model": name, "plan_source": source, "capital_answer": answer, "passkey": rows})
    path = save_figure(_figure(rows, length), out / "demo.png")
    print(f"figure: {path}")
    return 0


def _figure(rows: list[dict], length: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = [r["method"] for r in rows]
    colors = ["tab:green" if r["correct"] else "tab:red" for r in rows]
    ax.bar(names, [r["kv_mb"] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax.text(i, r["kv_mb"], f"{'found' if r['correct'] else 'missed'}\n{r['kv_fraction']:.0%} KV",
                ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("KV cache held after prefill (MB)")
    ax.set_title(f"passkey in a {length}-token prompt (green = answered correctly)", fontsize=9)
    ax.set_ylim(0, max(r["kv_mb"] for r in rows) * 1.3)
    return fig
