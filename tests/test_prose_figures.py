"""Measured figures quoted in the prose and hand-written tables of README.md and docs/*.md (outside the blocks
scripts/figures.py generates) are the figures of the results files they come from.

Each check below reads its results files, formats what they hold the way the doc quotes it, and asserts that the
doc contains that text, in a section (the lines under one heading) that names each file: its path, its path
without the suffix, its folder (``benchmarks/eval/ppl/``; for a glob the folder before the first wildcard), or,
except for a generic ``results.json``, its file name. Rerun a benchmark and the check fails until the prose
follows; a measured figure that no check here covers does not belong in the docs (issue 20).
Comparison ignores ``**`` (bold), treats ``−`` as ``-`` and collapses whitespace, so a quote may wrap lines.

Code defaults the docs quote (query chunk, default plan, CLI defaults) are checked against the code at the end.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from podkv.plan import SharingPlan

ROOT = Path(__file__).resolve().parent.parent


def _load_figures():
    """scripts/figures.py, for the number formats the docs share with the generated tables."""
    spec = importlib.util.spec_from_file_location("figures_formats", ROOT / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_FIGURES = _load_figures()
pct = _FIGURES.pct
CHECKS: list[tuple[str, tuple[str, ...], object]] = []


def quotes(doc: str, *sources: str):
    """Register a check: ``fn(*loaded sources)`` returns the texts ``doc`` must contain."""
    def register(fn):
        CHECKS.append((doc, sources, fn))
        return fn
    return register


def load(source: str):
    """A results file (JSON or text), or, for a glob, ``{relative path: data}`` of every match."""
    if any(c in source for c in "*?["):
        paths = sorted(ROOT.glob(source))
        assert paths, f"no results file matches {source}"
        return {str(p.relative_to(ROOT)): load(str(p.relative_to(ROOT))) for p in paths}
    path = ROOT / source
    assert path.is_file(), f"missing results file {source}"
    return json.loads(path.read_text()) if path.suffix == ".json" else path.read_text()


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("**", "").replace("−", "-"))


def sections(text: str) -> list[str]:
    return re.split(r"(?m)^(?=#)", text)


def citations(source: str) -> set[str]:
    cut = min((source.index(c) for c in "*?[" if c in source), default=None)
    if cut is not None:
        return {source, source[:cut].rsplit("/", 1)[0] + "/"}
    p = Path(source)
    forms = {source, str(p.with_suffix("")), f"{p.parent}/"}
    return forms if p.name == "results.json" else forms | {p.name}


def kilo(tokens: int) -> str:
    return f"{tokens // 1024}K"


def thousands(tokens: int) -> str:
    """Training-token counts as the docs write them: 61,440 -> 61K."""
    return f"{round(tokens / 1000)}K"


def row(*cells) -> str:
    return _FIGURES._md(map(str, cells))


def spans(values: list[int]) -> str:
    """[0, 3, 4, 5] -> '0 and 3–5'."""
    groups: list[list[int]] = []
    for v in values:
        if groups and v == groups[-1][-1] + 1:
            groups[-1].append(v)
        else:
            groups.append([v])
    parts = [str(g[0]) if len(g) == 1 else f"{g[0]}–{g[-1]}" for g in groups]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# --- README.md ----------------------------------------------------------------------------------------------

@quotes("README.md", "benchmarks/quality/quality.json")
def readme_needle_prompts(q):
    ns = {v["n"] for m in q["needles"].values() for v in m["by_length"].values()}
    assert len(ns) == 1
    return [f"The needles are RULER templates in that text, {ns.pop()} prompts per length"]


@quotes("README.md", "benchmarks/serving/plan_blocks3.json")
def readme_blocks3_saving(_):
    plan = SharingPlan.load(ROOT / "benchmarks/serving/plan_blocks3.json")
    return [f"against {pct(plan.kv_saving(4096))} for blocks of 3"]


# --- docs/eval.md -------------------------------------------------------------------------------------------

PREVIOUS_197K = "the previous `smollm2-pod` (uniform-4 plan, keys mode, 197K-token distillation)"
PREVIOUS_28K = "the previous `smollm2-pod` (uniform-4 plan, keys mode, q/k LoRA, 28K tokens)"


def _niah_rows(r, labels):
    out = []
    for method, label in labels.items():
        s = r["methods"][method]["tasks"]["niah"]["summary"]
        out.append(row(label, f"{s['kv_fraction']:.0%}", f"{s['accuracy']:.0%}",
                       *(f"{v:.0%}" for v in s["by_length"].values())))
    return out


@quotes("docs/eval.md", "benchmarks/eval/results.json", "src/podkv/assets/smollm2_plan_35.json")
def eval_niah(r, _):
    plan = SharingPlan.load(ROOT / "src/podkv/assets/smollm2_plan_35.json")
    rows = _niah_rows(r, {"dense": "dense", "pod": "pod (shipped plan, original weights)",
                          "pod-scores": "pod-scores (training-free, same plan)", "pod [smollm2-pod]": f"pod on {PREVIOUS_197K}",
                          "streaming": "streaming", "snapkv": "snapkv", "h2o": "h2o"})
    held = defaultdict(list)
    for rec in r["methods"]["pod"]["tasks"]["niah"]["records"]:
        held[rec["length"]].append(rec["kv_fraction"])
    kvpress = {r["methods"][m]["tasks"]["niah"]["summary"]["kv_fraction"] for m in ("snapkv", "h2o")}
    assert len(kvpress) == 1
    return rows + [
        f"{_shared(plan)}/{plan.num_layers * plan.num_kv_heads} "
        f"(layer, head) pairs share keys: {pct(plan.kv_saving(1024), 0)} KV saved at 1K, {pct(plan.kv_saving(8192), 0)} at 8K",
        f"PoD held {' / '.join(pct(sum(v) / len(v)) for v in held.values())} of the dense KV at "
        f"{' / '.join(kilo(t) for t in held)}",
        f"the kvpress methods {pct(kvpress.pop())}",
    ]


def _shared(plan) -> int:
    return sum(not plan.is_anchor(layer, h) for layer in range(plan.num_layers) for h in range(plan.num_kv_heads))


@quotes("docs/eval.md", "benchmarks/eval/results.json", "benchmarks/eval/timings.json")
def eval_cost(r, timings):
    def per_length(method, key):
        by = defaultdict(list)
        for rec, sec in zip(r["methods"][method]["tasks"]["niah"]["records"], timings[f"{key}/niah"], strict=True):
            by[rec["length"]].append(sec)
        return " / ".join(f"{sum(v) / len(v):.0f}" for v in by.values())

    return [f"seconds per prompt: dense {per_length('dense', 'dense')} at 1K / 2K / 4K / 8K",
            f"H2O (eager attention) {per_length('h2o', 'h2o')}; PoD {per_length('pod', 'pod')}"]


@quotes("docs/eval.md", "benchmarks/eval/budget25/results.json")
def eval_budget25(r):
    assert r["methods"]["pod+snapkv"]["model"] == "smollm2-pod"
    return _niah_rows(r, {"streaming": "streaming", "snapkv": "snapkv",
                          "pod+snapkv": f"pod+snapkv on {PREVIOUS_197K}"})


@quotes("docs/eval.md", "benchmarks/eval/ppl/results.json")
def eval_ppl(r):
    labels = {"dense": "dense", "streaming": "streaming", "snapkv": "snapkv",
              "pod": "pod (shipped plan, original weights)", "pod-scores": "pod-scores",
              "dense [smollm2-pod]": f"dense on the weights of {PREVIOUS_28K}", "pod [smollm2-pod]": f"pod on {PREVIOUS_28K}"}
    out = []
    for method, label in labels.items():
        s = r["methods"][method]["tasks"]["ppl"]["summary"]
        out.append(row(label, pct(s["kv_fraction"]), f"{s['ppl']:.2f}"))
    return out


@quotes("docs/eval.md", "benchmarks/eval/granularity/*/results.json", "benchmarks/eval/ppl/results.json")
def eval_granularity(runs, ppl):
    def summary(name):
        run = runs[f"benchmarks/eval/granularity/{name}/results.json"]
        (method,) = run["methods"].values()
        return method["tasks"]["ppl"]["summary"]

    out = []
    for label, prefix in (("head-wise (`smollm2_plan_35.json`)", "head"),
                          ("layer-wise, PoD-L (`smollm2_plan_layer_35.json`)", "layer")):
        keys, scores = summary(f"{prefix}-pod"), summary(f"{prefix}-pod-scores")
        assert keys["kv_fraction"] == scores["kv_fraction"]
        out.append(row(label, pct(keys["kv_fraction"]), f"{keys['ppl']:.2f}", f"{scores['ppl']:.2f}"))
    worse = summary("layer-pod-scores")["ppl"] / summary("head-pod-scores")["ppl"] - 1
    dense = ppl["methods"]["dense"]["tasks"]["ppl"]["summary"]["ppl"]
    return out + [f"(dense on the same windows: {dense:.2f}", f"PoD-L's perplexity is {pct(worse)} higher"]


@quotes("docs/eval.md", "benchmarks/quality/quality.json")
def eval_demo_needles(q):
    (n,) = {v["n"] for m in q["needles"].values() for v in m["by_length"].values()}
    return [f"is the measurement with {n} needles per length"]


# --- docs/analysis.md ---------------------------------------------------------------------------------------

@quotes("docs/analysis.md", "benchmarks/analysis/analysis.json")
def analysis_default_run(a):
    s, p, sim, plan = a["settings"], a["proximal"], a["similarity"], a["plan"]
    rows = [row(r["size"], pct(r["agreement"]), f"{r['nll_delta']:+.3f}") for r in p["rows"]]
    at256 = next(r for r in p["rows"] if r["size"] == 256)
    kv = np.array(sim["kv_heads"]).mean(axis=0)
    lo, hi = 3, 10  # the block the doc describes
    block = kv[lo:hi + 1, lo:hi + 1]
    n = hi - lo + 1
    adjacent = [kv[i, i + 1] for i in range(lo, hi)]
    return rows + [
        f"defaults: {s['samples']} samples × {s['length']} tokens of `pydoc_data.topics`, last {s['last_q']} queries, "
        f"ns = {s['ns']}, nr = {s['nr']}, seed {s['seed']}",
        f"({s['proximal_samples']} samples, positions {p['eval_positions_from']}–{p['rows'][0]['positions']}; "
        f"full-attention NLL {p['nll_full']:.3f})",
        f"At 256 proximal tokens {at256['agreement']:.0%} of next tokens are unchanged",
        f"mean over adjacent layers {sim['adjacent_mean']:.2f}, over all layer pairs {sim['offdiag_mean']:.2f}",
        f"layers {lo}–{hi} form one highly similar block (mean pairwise similarity "
        f"{(block.sum() - np.trace(block)) / (n * n - n):.2f}, adjacent pairs {min(adjacent):.2f}–{max(adjacent):.2f}",
        f"shares only {plan['shared_pairs']} of {plan['pairs']} (layer, head) pairs — {pct(plan['kv_saving'])} KV saving "
        f"at {plan['context']} tokens",
        f"the default run took {a['runtime']['seconds'] / 60:.0f} min wall with {a['runtime']['threads']} threads",
    ]


@quotes("docs/analysis.md", "benchmarks/analysis/analysis.json", "src/podkv/assets/smollm2_plan_35.json",
        "src/podkv/assets/smollm2_plan_layer_35.json", "benchmarks/memory.json")
def analysis_shipped_plans(a, _head, _layer, memory):
    kv = np.array(a["similarity"]["kv_heads"])
    out = []
    for name, label in (("smollm2_plan_35.json", "head (PoD)"), ("smollm2_plan_layer_35.json", "layer (PoD-L)")):
        path = f"src/podkv/assets/{name}"
        plan = SharingPlan.load(ROOT / path)
        shared = [(layer, h) for layer in range(plan.num_layers) for h in range(plan.num_kv_heads)
                  if not plan.is_anchor(layer, h)]
        sim = np.mean([kv[h][layer][plan.anchors[layer][h]] for layer, h in shared])
        pairs = f"{len(shared)} / {plan.num_layers * plan.num_kv_heads}"
        if all(len(set(heads)) == 1 for heads in plan.anchors):  # layer-granular
            pairs += f" ({len(shared) // plan.num_kv_heads} layers)"
        out.append(row(f"`{path}`", label, pairs, pct(plan.kv_saving(4096)), f"{sim:.2f}"))
    at4k = next(r for r in memory["rows"] if r["T"] == 4096)
    assert memory["plan"] == "smollm2_plan_35.json"
    return out + [f"`podkv bench memory` measures {pct(at4k['saving'])} for the head-wise plan"]


def _plan_kinds_row(rows, kind, granularity, mode):
    return next(r for r in rows if r["kind"] == kind and r["granularity"] == granularity and r["mode"] == mode)


def _paired(rows, kind, granularity, mode, key):
    from podkv.eval.stats import bootstrap

    a, b = _plan_kinds_row(rows, kind, granularity, mode), _plan_kinds_row(rows, "similarity", "head", mode)
    d = [x - y for x, y in zip(a[key], b[key], strict=True)]
    lo, hi = bootstrap(d)
    return sum(d) / len(d), f"{sum(d) / len(d):+.2f} [{lo:+.2f}, {hi:+.2f}]"


@quotes("docs/analysis.md", "benchmarks/quality/plan_kinds.json")
def analysis_plan_kinds(pk):
    rows, s = pk["rows"], pk["settings"]
    greedy = _plan_kinds_row(rows, "greedy", "head", "keys")
    previous = _plan_kinds_row(rows, "uniform (shipped smollm2-pod)", "layer", "keys")
    dense = _plan_kinds_row(rows, "dense", "-", "dense")
    labels = {("greedy", "head"): f"greedy (δ {greedy['plan_meta']['delta']})", ("similarity", "head"): "similarity",
              ("similarity", "layer"): "similarity", ("retrieval", "head"): "retrieval", ("retrieval", "layer"): "retrieval",
              ("uniform", "layer"): f"uniform ({_plan_kinds_row(rows, 'uniform', 'layer', 'keys')['plan_meta']['block_size']})",
              ("uniform (shipped smollm2-pod)", "layer"): "uniform (4, previous `smollm2-pod`)"}
    out = [row("dense", "–", "0%", "–", f"{dense['nll']['mean']:.2f}", "", f"{dense['answer_logprob']['mean']:.2f}", "")]
    for (kind, gran), label in labels.items():
        k, sc = _plan_kinds_row(rows, kind, gran, "keys"), _plan_kinds_row(rows, kind, gran, "scores")
        out.append(row(label, gran, pct(k["kv_saving"]), f"{k['retrieval_shared']:.2f}", f"{k['nll']['mean']:.2f}",
                       f"{sc['nll']['mean']:.2f}", f"{k['answer_logprob']['mean']:.2f}",
                       f"{sc['answer_logprob']['mean']:.2f}"))
    nll, lp = "nll_windows", "answer_logprob_prompts"
    head_plans = [("greedy", "head"), ("similarity", "head"), ("retrieval", "head")]
    span = {m: [_plan_kinds_row(rows, k, g, m)["nll"]["mean"] for k, g in head_plans] for m in ("keys", "scores")}
    uniform = [_paired(rows, "uniform", "layer", m, nll)[0] for m in ("keys", "scores")]
    return out + [
        f"{pk['runtime_s'] / 60:.0f} min on one shared core",
        f"One analysis ({s['analysis_samples']} × {s['length']} similarity samples, {s['retrieval_samples']} lookup "
        f"prompts) gives every plan at ≈{s['target_saving']:.0%} KV saving at {kilo(s['context'])}: greedy "
        f"(δ = {greedy['plan_meta']['delta']}",
        f"the previous `smollm2-pod`'s uniform-4 plan ({pct(previous['kv_saving'])})",
        f"NLL: {s['windows']} windows of {s['length']} held-out tokens",
        f"in held-out prose, {s['prompts']} prompts",
        f"raises the answer log-prob by {_paired(rows, 'retrieval', 'head', 'keys', lp)[1]} (keys) and "
        f"{_paired(rows, 'retrieval', 'head', 'scores', lp)[1]} (scores) per token",
        f"In scores mode its NLL is unchanged ({_paired(rows, 'retrieval', 'head', 'scores', nll)[1]}); in keys mode "
        f"it costs {_paired(rows, 'retrieval', 'head', 'keys', nll)[1]} nats of NLL",
        f"on both NLL ({_paired(rows, 'greedy', 'head', 'keys', nll)[1]} keys) and answer "
        f"({_paired(rows, 'greedy', 'head', 'keys', lp)[1]} keys)",
        f"uniform blocks lose {min(uniform):.1f}–{max(uniform):.1f} nats of NLL against the head plans",
        f"(NLL {min(span['scores']):.1f}–{max(span['scores']):.1f} vs {min(span['keys']):.1f}–{max(span['keys']):.1f} "
        "for the head plans)",
        f"(dense NLL {dense['nll']['mean']:.2f}, answer {dense['answer_logprob']['mean']:.2f})",
    ]


@quotes("docs/analysis.md", "benchmarks/quality/plan_kinds_analysis/analysis.json")
def analysis_retrieval_heads(a):
    score, mass = np.array(a["retrieval"]["retrieval"]), np.array(a["retrieval"]["distant_mass"])
    heads = [(layer, h) for layer in range(score.shape[0]) for h in range(score.shape[1]) if score[layer, h] > 0.4]
    far = [layer for layer in range(mass.shape[0]) if mass[layer].max() > 0.6]
    return [f"the retrieval heads sit in layers {heads[0][0]}–{heads[-1][0]} (score > 0.4: layer "
            + ", ".join(f"{layer} h{h}" for layer, h in heads) + ")",
            f"the distant mass (max over a layer's heads) is above 0.6 in layers {spans(far)}"]


# --- docs/training.md ---------------------------------------------------------------------------------------

@quotes("docs/training.md", "src/podkv/assets/smollm2_plan_retrieval_30.json", "benchmarks/quality/plan_kinds.json",
        "benchmarks/quality/quality.json")
def training_recipe_choices(_, pk, q):
    plan = SharingPlan.load(ROOT / "src/podkv/assets/smollm2_plan_retrieval_30.json")
    rows = pk["rows"]
    ret = {m: _plan_kinds_row(rows, "retrieval", g, m) for g, m in (("head", "keys"), ("head", "scores"))}
    layer = _plan_kinds_row(rows, "retrieval", "layer", "scores")
    dense = _plan_kinds_row(rows, "dense", "-", "dense")
    loss = {t: -100 * q["ruler"][t]["pod"]["vs_dense"]["1024"]["diff"] for t in ("niah_multivalue", "vt")}
    return [
        f"{_shared(plan)} of {plan.num_layers * plan.num_kv_heads} pairs share, {pct(plan.kv_saving(4096))} KV saving at 4K",
        f"(held-out NLL {ret['scores']['nll']['mean']:.2f} vs {ret['keys']['nll']['mean']:.2f} for this plan; dense "
        f"{dense['nll']['mean']:.2f})",
        f"with them the losses are {loss['niah_multivalue']:.1f} and {loss['vt']:.1f}",
        f"(NLL {layer['nll']['mean']:.2f} vs {ret['scores']['nll']['mean']:.2f}, answer log-prob "
        f"{layer['answer_logprob']['mean']:.2f} vs {ret['scores']['answer_logprob']['mean']:.2f}",
    ]


@quotes("docs/training.md", "src/podkv/assets/smollm2-pod/recipe.json")
def training_shipped_run(recipe):
    assert "lr 1.3e-6" in recipe["command"]
    size = sum(p.stat().st_size for p in (ROOT / "src/podkv/assets/smollm2-pod").iterdir())
    gap = math.log(recipe["heldout_ppl"]["pod_adapted"]) - math.log(recipe["heldout_ppl"]["dense"])
    return [f"{recipe['wall_s'] / 60:.0f} min wall on one CPU core",
            "ran one more optimizer step at lr 1.3e-6",
            f"records {recipe['steps']} steps and {recipe['tokens']:,} tokens",
            f"is {size / 1e6:.1f} MB",
            f"perplexity on the first {recipe['heldout_tokens']} held-out tokens, stdlib docstrings): {gap:+.4f} nats"]


@quotes("docs/training.md", "benchmarks/quality/adaptation.json")
def training_previous_recipe_curve(curves):
    long = curves["retrieval-scores-longrange"]
    gap = dict(zip(long["tokens"], (n - long["dense_nll"] for n in long["nll"])))
    return [f"NLL gap to dense {gap[0]:+.3f} nats at step 0 (training-free), {gap[20480]:+.3f} after "
            f"{thousands(20480)} tokens, {gap[61440]:+.3f} after {thousands(61440)}, {gap[long['tokens'][-1]]:+.3f} at "
            f"the end ({thousands(long['tokens'][-1])})"]


@quotes("docs/training.md", "benchmarks/quality/adaptation.json", "benchmarks/quality/runs/curve-scores-distill.json")
def training_curves(curves, run):
    long = curves["retrieval-scores-longrange"]
    out = [f"({pct(run['kv_saving_4096'])} KV saved at 4K): T={run['config']['seq_len']}, {run['steps']} steps = "
           f"{run['tokens']:,} tokens"]
    labels = {"curve-scores-distill": "scores mode, `distill`", "curve-scores-local": "scores mode, `local`",
              "curve-keys-distill": "keys mode, `distill`", "curve-keys-local": "keys mode, `local`",
              "curve-keys-distill-anchor-q": "keys mode, `distill`, `--init anchor-q`"}

    def g(name, i):
        c = curves[name]
        return c["nll"][i] - c["dense_nll"]

    for name, label in labels.items():
        c = curves[name]
        at = [c["tokens"].index(t) for t in (0, 4096, 8192, 16384)]
        out.append(row(label, *(f"{g(name, i):+.3f}" for i in at), f"{c['seconds'][-1]:.0f}"))
    sd, sl, kd, kl = (curves[n] for n in ("curve-scores-distill", "curve-scores-local", "curve-keys-distill",
                                          "curve-keys-local"))
    saved = {f"{1 - local['seconds'][-1] / distill['seconds'][-1]:.0%}" for local, distill in ((sl, sd), (kl, kd))}
    assert len(saved) == 1
    return out + [
        f"Scores mode starts {g('curve-keys-distill', 0) / g('curve-scores-distill', 0):.0f}x closer to dense and reaches "
        f"{g('curve-scores-distill', -1):+.3f} nats ({sd['nll_gap_pct'][-1]:+.1f}%) after {thousands(sd['tokens'][-1])} "
        f"tokens; keys mode is still at {g('curve-keys-distill', -1):+.2f} ({kd['nll_gap_pct'][-1]:+.0f}%)",
        f"`local` costs {saved.pop()} less CPU per step",
        f"({g('curve-scores-local', 3):+.3f} at {sl['seconds'][3]:.0f} s against {g('curve-scores-distill', 2):+.3f} at "
        f"{sd['seconds'][2]:.0f} s)",
        f"it starts {g('curve-keys-distill-anchor-q', 0) - g('curve-keys-distill', 0):.1f} nats further from dense",
        f"(T=2048, {thousands(long['tokens'][-1])} tokens",
    ]


@quotes("docs/training.md", "benchmarks/training/results/table_*.json")
def training_previous_model(tables):
    def t(name):
        return tables[f"benchmarks/training/results/table_{name}.json"]

    def cells(r, plan_free=False):
        plan = SharingPlan.from_dict(r["plan"]) if r.get("plan") and not plan_free else None
        passkey = {p["length"]: f"{round(p['accuracy'] * p['n'])}/{p['n']}" for p in r["passkey"]}
        return ["0%" if plan is None else pct(plan.kv_saving(4096)), f"{r['heldout_ppl']:.2f}",
                *(passkey.get(n, "-") for n in (1024, 2048, 4096, 8192))]

    dense, free, best = t("dense"), t("free"), t("adapted_all197k")
    gap = best["heldout_ppl"] / dense["heldout_ppl"] - 1
    best_cells = cells(best)
    best_cells[1] += f" ({gap:+.1%})"
    return [row("dense (no PoD)", *cells(dense, plan_free=True)),
            row("PoD, training-free", *cells(free)),
            row("PoD, q/k LoRA, 28K tokens", *cells(t("adapted_qk28k"))),
            row("PoD, attention LoRA, 147K tokens", *cells(t("adapted_attn147k"))),
            row("PoD, all-linear LoRA, 197K tokens (the `smollm2-pod` before the current one)", *best_cells),
            f"(ppl {dense['heldout_ppl']:.1f} → {free['heldout_ppl']:.0f})",
            f"bring perplexity within {pct(gap)} of dense"]


# --- docs/bench.md ------------------------------------------------------------------------------------------

@quotes("docs/bench.md", "benchmarks/memory.json", "benchmarks/batch.json")
def bench_memory_batch(m, b):
    at4k = next(r for r in m["rows"] if r["T"] == 4096)
    plan = SharingPlan.load(ROOT / "src/podkv/assets" / m["plan"])
    return [f"shipped plan saves {pct(at4k['saving'])} of the KV cache at 4K",
            f"shared heads keep only ns + nr = {plan.ns + plan.nr} keys",
            f"under the same KV budget PoD fits {b['ratio']:.1f}× the dense batch"]


@quotes("docs/bench.md", "benchmarks/batch_rss.json")
def bench_batch_rss(b):
    mib = 2**20
    d, p = b["methods"]["dense"], b["methods"]["pod"]
    probes = {(r["method"], r["batch"]): r for r in b["probes"] if not r.get("over_budget")}

    def per_request(method, top):
        return (probes[(method, top)]["peak_rss"] - probes[(method, 2)]["peak_rss"]) / (top - 2) / mib

    assert d["loaded_rss"] == p["loaded_rss"]
    return [f"{b['length']}-token requests, {b['config']['rss_budget_gib']} GiB): dense {d['max_batch']}, PoD "
            f"{p['max_batch']} ({b['ratio']:.2f}×), where the KV bytes alone would give {b['kv_ratio']:.2f}×",
            f"The process is {d['loaded_rss'] / mib:.0f} MiB after loading and {probes[('dense', 1)]['peak_rss'] / mib:.0f} "
            f"MiB at batch 1",
            f"a request then adds ~{per_request('dense', d['max_batch']):.0f} MiB dense and "
            f"~{per_request('pod', p['max_batch']):.0f} MiB PoD (batch 2 to {p['max_batch']}), of which the KV cache is "
            f"{b['kv_bytes_per_request']['dense'] / mib:.0f} and {b['kv_bytes_per_request']['pod'] / mib:.0f} MiB",
            f"At batch {p['max_batch']} PoD peaks {(d['peak_rss_at_max'] - p['peak_rss_at_max']) / mib:.0f} MiB lower "
            f"({p['peak_rss_at_max'] / mib:.0f} vs {d['peak_rss_at_max'] / mib:.0f} MiB)",
            f"Measured under load average {b['machine']['load_avg_1m']:.1f}"]


@quotes("docs/bench.md", "benchmarks/speed.json")
def bench_speed_prose(s):
    pre, dec, attn = s["prefill"], s["decode"], s["attention_decode"]
    longest = dec[-1]
    fixed = attn[0]["pod"]["median"] - attn[0]["dense"]["median"]
    cheaper = next(r["T"] for r in attn if r["ratio"] < 1)
    return [f"run of {s['machine']['date'].split()[1]} UTC, load average {s['machine']['load_avg_1m']:.1f}, "
            f"`--threads {s['machine']['threads']}`): decode at {kilo(longest['T'])} is {longest['ratio']:.2f}× dense",
            f"prefill is {min(r['ratio'] for r in pre):.2f}–{max(r['ratio'] for r in pre):.2f}× dense",
            f"Decode at {kilo(dec[0]['T'])} is still {dec[0]['ratio']:.2f}×",
            f"~{1e3 * fixed:.1f} ms per layer on this CPU",
            f"from {kilo(cheaper)} on, one layer's PoD step is cheaper than dense"]


# --- docs/serving.md ----------------------------------------------------------------------------------------

@quotes("docs/serving.md", "benchmarks/serving/capacity_*.json")
def serving_capacity(runs):
    runs = {Path(k).stem.removeprefix("capacity_"): v for k, v in runs.items()}
    diffs = [abs(r["difference_points"]) for r in runs.values()]
    gather = [abs(r["difference_points"]) for r in runs.values() if not r["pod"]["pod_kv_kernel"]]
    kernel = {r["max_model_len"]: abs(r["difference_points"]) for r in runs.values() if r["pod"]["pod_kv_kernel"]}
    layer = [abs(runs[k]["difference_points"]) for k in runs if k.startswith("smollm2_layer35")]
    b3 = runs["smollm2_b3_T4096"]
    dense = {r["dense"]["kv_cache_size_tokens"] for k, r in runs.items() if k.startswith("smollm2")}
    assert len(dense) == 1 and all(r["VLLM_CPU_KVCACHE_SPACE"] == "1" for r in runs.values())
    return [
        f"grows by the plan's saving (within {min(diffs):.1f}–{max(diffs):.1f} points",
        f"the shipped layer plan's capacity is within {max(layer):.1f} points of the formula",
        f"stage 2 at T={b3['max_model_len']} (blocks of {b3['block_layers']}, gather layout): "
        f"{b3['pod']['kv_cache_size_tokens']:,} vs {b3['dense']['kv_cache_size_tokens']:,} dense tokens",
        f"The 1 GiB holds {dense.pop():,} dense SmolLM2 tokens at fp32.",
        f"Every gather-layout row, uneven plans included, is within {max(gather):.1f} points of the analytic saving",
        f"The kernel layout's rows are {kernel[8192]:.1f} (8K) to {kernel[4096]:.1f} (4K) points below",
        f"(blocks of 3, gather layout: {abs(b3['difference_points']):.1f} points at {b3['max_model_len']}, "
        f"{abs(runs['smollm2_b3_T8192']['difference_points']):.1f} at 8192)",
    ]


@quotes("docs/serving.md", "benchmarks/serving/throughput_p*.json")
def serving_throughput_settings(runs):
    settings = {(r["settings"]["requests"], r["settings"]["max_tokens"], len(r["rounds"])) for r in runs.values()}
    assert len(settings) == 1
    requests, tokens, rounds = settings.pop()
    return [f"### Throughput: PoD vs dense at {requests} concurrent requests",
            f"sends the same {requests} random prompts at once (greedy, {tokens} tokens each) and reports generated "
            f"tokens per second (median of {rounds} rounds"]


@quotes("docs/serving.md", "benchmarks/serving/profile_p1024.json")
def serving_profile(prof):
    runs = {r["engine"]: r for r in prof["runs"]}
    k, g = runs["kernel"]["pod_attention"], runs["gather"]["pod_attention"]
    s = prof["settings"]
    return [f"on the same {s['requests']} × {s['prompt_len']}-token prompts",
            f"was {runs['dense']['decode_step_ms_median_last16']:.1f} ms dense, "
            f"{runs['kernel']['decode_step_ms_median_last16']:.1f} ms on the kernel layout and "
            f"{runs['gather']['decode_step_ms_median_last16']:.1f} ms on the gather layout",
            f"took {k['_prefill_kernel_s']:.1f} s of the {runs['kernel']['wall_s']:.1f} s batch "
            f"({1e3 * k['_prefill_kernel_s'] / k['_prefill_kernel_calls']:.1f} ms per "
            f"{s['max_num_batched_tokens']}-token chunk and layer",
            f"their decode {k['_decode_kernel_s']:.1f} s ({1e3 * k['_decode_kernel_s'] / k['_decode_kernel_calls']:.1f} ms "
            "per layer and step",
            f"The gather layout spends {g['_decode_s']:.1f} s in decode"]


# --- the test ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc, sources, fn", CHECKS, ids=[f"{d}:{fn.__name__}" for d, _, fn in CHECKS])
def test_prose_figure_is_its_results_file(doc, sources, fn):
    text = norm((ROOT / doc).read_text())
    found = fn(*[load(s) for s in sources])
    assert found
    for quote in found:
        quote = norm(quote)
        assert quote in text, f"{doc} should quote {quote!r} (from {', '.join(sources)}); rerun or fix the prose"
        for section in (s for s in sections(text) if quote in s):
            for source in sources:
                assert any(c in section for c in citations(source)), \
                    f"{doc}: the section quoting {quote!r} does not name its results file {source}"


def test_every_doc_with_measured_prose_is_checked():
    docs = {d for d, _, _ in CHECKS}
    assert docs >= {"README.md", "docs/eval.md", "docs/analysis.md", "docs/training.md", "docs/bench.md",
                    "docs/serving.md"}


# --- code defaults the docs quote ---------------------------------------------------------------------------

def _defaults(*command: str) -> dict:
    import argparse

    from podkv.cli import build_parser

    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.dest: a.default for a in parser._actions}


def test_code_defaults_quoted_in_docs():
    import dataclasses
    import inspect

    from podkv.attention.chunked import DEFAULT_CHUNK
    from podkv.bench.common import PeakMemory
    from podkv.eval.methods import METHODS
    from podkv.eval.stats import MIN_SAMPLES
    from podkv.eval.tasks import TASKS
    from podkv.models.default_plan import UNIFORM_BLOCK, uniform_plan
    from podkv.training.config import TrainConfig

    docs = {name: norm((ROOT / name).read_text()) for name in ("docs/analysis.md", "docs/training.md",
                                                                "docs/eval.md", "docs/bench.md")}
    plan, _ = uniform_plan(SimpleNamespace(num_key_value_heads=3, num_attention_heads=9, num_hidden_layers=30,
                                           max_position_embeddings=8192))
    an, demo = _defaults("analyze"), _defaults("demo")
    memory, batch = _defaults("bench", "memory"), _defaults("bench", "batch")
    sizes = ",".join(map(str, an["proximal_sizes"]))
    held_out = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "eval_fraction")
    answer_tokens = [task.max_new_tokens for task in TASKS.values()]
    rss_period = inspect.signature(PeakMemory).parameters["period"].default
    expected = {
        "docs/training.md": [f"one query chunk (default {DEFAULT_CHUNK}, `podkv.attention.chunked.DEFAULT_CHUNK`)",
                             f"The last {held_out:.0%} of the token stream"],
        "docs/eval.md": [f"uniform blocks of {UNIFORM_BLOCK} layers with ns={plan.ns}, nr={plan.nr}",
                         f"then {demo['samples']} needles in {kilo(demo['length'])}-token prose",
                         f"`--length` tokens, default {demo['length']}; `--samples` needles, default and minimum "
                         f"{MIN_SAMPLES}",
                         f"every layer records its last {METHODS['pod+snapkv'].window} queries",
                         f"(default: the task's own, {min(answer_tokens)}–{max(answer_tokens)})"],
        "docs/bench.md": [f"uniform blocks of {UNIFORM_BLOCK} layers (ns = {plan.ns}, nr = {plan.nr})",
                          f"RSS sampled every {1e3 * rss_period:.0f} ms on CPU",
                          f"`--selection-budget B` (default {memory['selection_budget']})",
                          f"`--budget-requests` dense requests (default {batch['budget_requests']})"],
        "docs/analysis.md": [row("`--samples`, `--length`", f"{an['samples']}, {an['length']}"),
                             row("`--last-q`", an["last_q"]), row("`--ns`, `--nr`", f"{an['ns']}, {an['nr']}"),
                             row("`--proximal-sizes`, `--proximal-samples`", f"{sizes}; {an['proximal_samples']}"),
                             row("`--delta`", an["delta"]), row("`--context`", an["context"]),
                             row("`--retrieval-weight`", an["retrieval_weight"])],
    }
    assert demo["samples"] == MIN_SAMPLES
    for doc, texts in expected.items():
        for text in texts:
            assert norm(text) in docs[doc], f"{doc} should say {text!r} (the code's default)"
