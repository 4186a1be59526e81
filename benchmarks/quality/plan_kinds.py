"""Training-free quality of each plan kind at equal KV saving (issue 12, item 2).

    python benchmarks/quality/plan_kinds.py [--target-saving 0.30] [--windows 8] [--prompts 16] [--threads 1]

One `podkv analyze --kind retrieval` run (similarity + retrieval heads of the default model) gives
every plan: the paper's greedy (the delta whose saving is the smallest >= the target), the most
similar plan, the retrieval-aware plan (head = PoD and layer = PoD-L granularity) and uniform blocks
(the smallest saving >= the target), plus the shipped uniform-4 plan of `smollm2-pod` (34.4%) as a
reference. Each plan runs training-free in both modes ("keys": the paper's shared keys, "scores": the
anchor's distant scores), dense once, on text no plan saw:

* held-out NLL: windows of --length tokens of `podkv.texts.text("heldout")`, positions whose query
  has distant tokens (>= ns + nr) only, one cache-less forward per window; 95% bootstrap CI over windows;
* answer log-prob: RULER's magic-number needle (`fact_needle`) in held-out prose (`build_prompt`,
  haystack "prose"), depth in [0, 0.8] so the needle is always beyond the recent window; the value
  teacher-forced after a prefill into the method's cache (`eval.retrieval.RetrievalLogprob.run_case`,
  mean log-prob per value token); 95% bootstrap CI over prompts.

Writes plan_kinds.json/.md/.png and plans/<kind>_<granularity>.json next to this file (atomic writes);
the analysis goes to plan_kinds_analysis/ (analysis.json, retrieval.png, ...). Results are rewritten
after every plan, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHIPPED_UNIFORM = "smollm2-pod/pod_plan.json"  # in podkv/assets: the uniform-4 plan of the adapted model


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-saving", type=float, default=0.30)
    p.add_argument("--context", type=int, default=4096, help="context the KV saving refers to")
    p.add_argument("--retrieval-weight", type=float, default=4.0)
    p.add_argument("--retrieval-samples", type=int, default=16)
    p.add_argument("--analysis-samples", type=int, default=8)
    p.add_argument("--analysis", type=Path, default=None,
                   help="reuse this analysis.json (with retrieval scores) instead of running analyze")
    p.add_argument("--length", type=int, default=2048, help="tokens per NLL window and per needle prompt")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--modes", default="keys,scores")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--report-only", action="store_true", help="rewrite .md and .png from an existing plan_kinds.json")
    return p.parse_args(argv)


def build_plans(data: dict, args) -> list[tuple[str, str, object]]:
    """(kind, granularity, plan) for every row of the table, all from one analysis."""
    from importlib.resources import files

    from podkv.analysis.run import replan
    from podkv.plan import SharingPlan

    src, ts, ctx = os.path.relpath(args.analysis), args.target_saving, args.context
    plans = []
    deltas = [round(0.01 * i, 2) for i in range(101)]
    greedy = [replan(data, src, kind="greedy", delta=d, target_saving=None, context=ctx)[0] for d in deltas]
    reach = [(p.kv_saving(ctx), -d, p) for d, p in zip(deltas, greedy) if p.kv_saving(ctx) >= ts]
    plans.append(("greedy", "head", min(reach, key=lambda r: r[:2])[2]))
    for kind in ("similarity", "retrieval"):
        for gran in ("head", "layer"):
            plan, _ = replan(data, src, kind=kind, target_saving=ts, granularity=gran, context=ctx,
                             retrieval_weight=args.retrieval_weight)
            plans.append((kind, gran, plan))
    layers = len(data["similarity"]["kv_heads"][0])
    uniform = [replan(data, src, kind="uniform", block_size=b, target_saving=None, context=ctx)[0]
               for b in range(2, layers + 1)]
    plans.append(("uniform", "layer", min((p for p in uniform if p.kv_saving(ctx) >= ts),
                                          key=lambda p: p.kv_saving(ctx))))
    shipped = SharingPlan.load(files("podkv") / "assets" / SHIPPED_UNIFORM)
    shipped.meta = {**shipped.meta, "kind": "uniform", "block_size": 4, "source": f"podkv/assets/{SHIPPED_UNIFORM}"}
    plans.append(("uniform (shipped smollm2-pod)", "layer", shipped))
    return plans


def heldout_windows(tok, n: int, length: int) -> list[torch.Tensor]:
    from podkv import texts

    ids = tok(texts.text("heldout"), add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        sys.exit(f"the held-out text has {len(ids)} tokens, fewer than {n} windows of {length}")
    step = len(ids) // n  # spread the windows over the whole split
    return [torch.tensor([ids[i * step:i * step + length]]) for i in range(n)]


def needle_cases(tok, n: int, length: int):
    from podkv.eval.prompts import build_prompt, fact_needle
    from podkv.eval.tasks import Case

    cases = []
    for i in range(n):
        rng = random.Random(1000 + i)
        needle, depth = fact_needle(rng), 0.8 * (i + 0.5) / n
        p = build_prompt(tok, length, [(needle, depth)], haystack="prose", seed=i)
        cases.append(Case(p.input_ids, {"length": length, "depth": round(depth, 3), "needle_pos": p.needle_pos},
                          [p.answer]))
    return cases


@torch.no_grad()
def measure(model, tok, method, windows, cases, skip: int) -> dict:
    from podkv.eval.retrieval import RetrievalLogprob
    from podkv.eval.scoring import window_nll
    from podkv.eval.stats import describe

    nll = []
    with method.attached(model):
        for w in windows:
            total, scored = window_nll(model, w[0], w.shape[1], skip=skip)
            nll.append(total / scored)
        task = RetrievalLogprob()
        lp = [task.run_case(model, tok, method, c, None)["logprob_per_token"] for c in cases]
    return {"nll": describe(nll, False), "answer_logprob": describe(lp, False), "nll_windows": nll,
            "answer_logprob_prompts": lp}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Plan kinds at equal KV saving (training-free, {result['model']})", "",
             f"Target saving {s['target_saving']} at {s['context']} tokens; retrieval weight "
             f"{s['retrieval_weight']}. NLL: {s['windows']} held-out windows of {s['length']} tokens, positions "
             f">= ns+nr; answer log-prob: {s['prompts']} magic-number needles in held-out prose (mean log-prob "
             "per value token). [95% bootstrap CI]. Command: `python benchmarks/quality/plan_kinds.py`.", "",
             "| kind | granularity | KV saving at 4K | shared pairs | retrieval shared | mode | NLL [CI] | "
             "answer logprob [CI] |", "|---|---|---:|---:|---:|---|---|---|"]
    for r in result["rows"]:
        ci = lambda d: f"{d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"  # noqa: E731
        retr = "" if r["retrieval_shared"] is None else f"{r['retrieval_shared']:.2f}"
        lines.append(f"| {r['kind']} | {r['granularity']} | {100 * r['kv_saving']:.1f}% | {r['shared_pairs']} | "
                     f"{retr} | {r['mode']} | {ci(r['nll'])} | {ci(r['answer_logprob'])} |")
    return "\n".join(lines + paired(result["rows"])) + "\n"


def paired(rows: list[dict]) -> list[str]:
    """Each plan minus the similarity head plan in the same mode, per window / prompt (same text for all)."""
    from podkv.eval.stats import bootstrap

    ref = {r["mode"]: r for r in rows if r["kind"] == "similarity" and r["granularity"] == "head"}
    out = ["", "Paired differences against the similarity head plan in the same mode (per window / per prompt, "
           "95% bootstrap CI; NLL: negative = better, answer log-prob: positive = better):", "",
           "| kind | granularity | mode | ΔNLL [CI] | Δanswer logprob [CI] |", "|---|---|---|---|---|"]
    for r in rows:
        base = ref.get(r["mode"])
        if base is None or base is r:
            continue
        cells = []
        for key in ("nll_windows", "answer_logprob_prompts"):
            d = [a - b for a, b in zip(r[key], base[key])]
            lo, hi = bootstrap(d)
            cells.append(f"{sum(d) / len(d):+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out.append(f"| {r['kind']} | {r['granularity']} | {r['mode']} | {cells[0]} | {cells[1]} |")
    return out


def figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from podkv.io import save_figure

    rows = result["rows"]
    labels = [f"{r['kind']} / {r['granularity']} / {r['mode']} ({100 * r['kv_saving']:.1f}%)" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(rows) + 1.5), sharey=True, layout="constrained")
    titles = ("held-out NLL (nats/token, lower is better)", "answer log-prob per token (higher is better)")
    for ax, key, title in zip(axes, ("nll", "answer_logprob"), titles):
        mean = [r[key]["mean"] for r in rows]
        err = [[m - r[key]["ci95"][0] for m, r in zip(mean, rows)], [r[key]["ci95"][1] - m for m, r in zip(mean, rows)]]
        colors = ["tab:gray" if r["mode"] == "dense" else "tab:blue" if r["mode"] == "keys" else "tab:orange"
                  for r in rows]
        ax.barh(range(len(rows)), mean, xerr=err, color=colors, capsize=3)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"Plan kinds, training-free, at ~{100 * result['settings']['target_saving']:.0f}% KV saving "
                 "(blue: shared keys, orange: shared scores)")
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    import podkv
    from podkv import texts
    from podkv.analysis import planner
    from podkv.analysis.run import DEFAULT_MODEL_NAME, AnalysisConfig, analyze
    from podkv.eval.haystack import prose_text
    from podkv.eval.methods import make_method
    from podkv.io import atomic_write_text, write_json

    if args.report_only:
        result = json.loads((args.out / "plan_kinds.json").read_text())
        atomic_write_text(args.out / "plan_kinds.md", markdown(result))
        figure(result, args.out / "plan_kinds.png")
        return 0

    if prose_text() != texts.text("heldout"):
        sys.exit("podkv.eval.haystack.prose_text() is not the held-out split: the needles would sit in seen text")
    modes = [m for m in args.modes.split(",") if m]
    started = time.perf_counter()
    model, tok = podkv.load_model(progress=False)
    if args.analysis is None:
        args.analysis = args.out / "plan_kinds_analysis" / "analysis.json"
        cfg = AnalysisConfig(kind="retrieval", target_saving=args.target_saving, context=args.context,
                             samples=args.analysis_samples, retrieval_samples=args.retrieval_samples,
                             retrieval_weight=args.retrieval_weight, proximal_samples=0)
        analyze(cfg, args.analysis.parent, model=model, tokenizer=tok, progress=False)
    data = json.loads(args.analysis.read_text())
    plans = build_plans(data, args)
    sim_kv = torch.tensor(data["similarity"]["kv_heads"], dtype=torch.float64)
    retrieval = torch.tensor(data["retrieval"]["retrieval"], dtype=torch.float64)
    for kind, gran, plan in plans:
        if not kind.startswith("uniform ("):
            plan.save(args.out / "plans" / f"{kind}_{gran}.json")
    windows, cases = heldout_windows(tok, args.windows, args.length), needle_cases(tok, args.prompts, args.length)
    skip = plans[0][2].ns + plans[0][2].nr
    result = {"model": DEFAULT_MODEL_NAME, "analysis": os.path.relpath(args.analysis), "rows": [],
              "settings": {k: (os.path.relpath(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "versions": {"podkv": podkv.__version__, "torch": torch.__version__}}
    todo = [("dense", "-", None, "dense")] + [(k, g, p, m) for k, g, p in plans for m in modes]
    for kind, gran, plan, mode in todo:
        t0 = time.perf_counter()
        method = make_method("dense" if plan is None else {"keys": "pod", "scores": "pod-scores"}[mode], plan)
        row = {"kind": kind, "granularity": gran, "mode": mode,
               "kv_saving": 0.0 if plan is None else round(plan.kv_saving(args.context), 6),
               "shared_pairs": 0 if plan is None else sum(len(plan.shared_heads(l)) for l in range(plan.num_layers)),
               "retrieval_shared": None if plan is None else round(planner.retrieval_shared(plan, retrieval), 4),
               "anchor_similarity_sum": None if plan is None else round(planner.plan_similarity(plan, sim_kv), 4),
               "plan_meta": None if plan is None else {k: plan.meta.get(k) for k in
                                                       ("kind", "delta", "block_size", "retrieval_weight", "source")},
               **measure(model, tok, method, windows, cases, skip)}
        if plan is not None and kind == "greedy":
            row["plan_meta"]["delta"] = plan.meta["settings"]["delta"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["rows"].append(row)
        result["runtime_s"] = round(time.perf_counter() - started, 1)
        write_json(args.out / "plan_kinds.json", result)
        atomic_write_text(args.out / "plan_kinds.md", markdown(result))
        figure(result, args.out / "plan_kinds.png")
        print(f"{kind:>12} {gran:>5} {mode:>6} {100 * row['kv_saving']:5.1f}%  NLL {row['nll']['mean']:.3f}  "
              f"answer {row['answer_logprob']['mean']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
