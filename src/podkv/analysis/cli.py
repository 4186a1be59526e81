"""`podkv analyze` (exploration + plan) and `podkv plan` (re-plan from an existing analysis.json)."""

from __future__ import annotations

from pathlib import Path

import torch

from podkv.analysis.run import AnalysisConfig, analyze, replan
from podkv.cli_args import Int, Ints
from podkv.errors import PodError
from podkv.io import read_json
from podkv.outputs import add_out_arguments, refuse_existing, staged_dir
from podkv.plan import SharingPlan


def register(sub) -> None:
    p = sub.add_parser("analyze", help="offline exploration (paper §2.1): proximal-token importance, inter-layer "
                                       "attention similarity and a sharing plan")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help=".txt or .jsonl (field 'text') files; default: Python's pydoc_data.topics text")
    p.add_argument("--samples", type=int, default=8, help="samples of --length tokens (default 8)")
    p.add_argument("--length", action=Int, default=2048, help="tokens per sample (default 2048)")
    p.add_argument("--last-q", type=int, default=64, help="last queries whose distant attention is compared")
    p.add_argument("--proximal-sizes", action=Ints, default=(64, 128, 256, 512, 1024),
                   help="comma-separated proximal sizes (ns sinks + recent) for observation 1")
    p.add_argument("--proximal-samples", type=int, default=2, help="samples used for observation 1 (default 2)")
    p.add_argument("--retrieval-samples", type=int, default=None,
                   help="lookup prompts scoring retrieval heads (default 16 with --kind retrieval, else 0)")
    _plan_flags(p)
    p.add_argument("--seed", type=int, default=0)
    add_out_arguments(p, "output directory (refused if it exists, unless --force)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)

    q = sub.add_parser("plan", help="make a sharing plan from an analysis.json written by `podkv analyze`")
    q.add_argument("--analysis", type=Path, default=None, help="analysis.json (every way but --ablation)")
    q.add_argument("--base", type=Path, default=None, metavar="PLAN",
                   help="with --window-pairs N: add N window-only pairs to this plan (least needed block ends "
                        "first) and keep its other anchors, e.g. the plan an adapted model was trained on")
    q.add_argument("--ablation", type=Path, default=None, metavar="JSON",
                   help="with --base and --add-anchors K: split the base plan's blocks at the K pairs whose own keys "
                        "helped answers most in this ablation.json from `podkv ablate`")
    q.add_argument("--add-anchors", type=int, default=0, metavar="K", help="with --ablation: anchors to add")
    _plan_flags(q, ns_nr=False)
    add_out_arguments(q, "plan JSON file to write (refused if it exists, unless --force)")
    q.set_defaults(func=run_plan)

    a = sub.add_parser("ablate", help="per-pair ablation: the answer log-prob gained when each shared (layer, KV head) "
                                      "pair of a plan gets its own keys, on multi-hop and multi-value prompts")
    a.add_argument("--model", default=None, help="default: smollm2-pod (the shipped adapted model)")
    a.add_argument("--plan", type=Path, default=None, help="plan JSON (default: the model's own plan)")
    a.add_argument("--prompts", type=int, default=16, help="prompts, half track and half multilookup (default 16)")
    a.add_argument("--length", action=Int, default=1024, help="tokens per prompt (default 1024)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_out_arguments(a, "output directory: ablation.json, ablation.md, ablation.png")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=run_ablate)


def _plan_flags(p, ns_nr: bool = True) -> None:
    p.add_argument("--kind", default=None, metavar="KIND",
                   help="greedy (paper, --delta), similarity (most similar plan at --target-saving), retrieval "
                        "(same, sharing priced by retrieval scores), uniform (blocks of --block-size); "
                        "default: similarity with --target-saving, else greedy")
    p.add_argument("--delta", type=float, default=0.5, help="similarity threshold of the greedy (default 0.5)")
    p.add_argument("--target-saving", type=float, default=None,
                   help="instead of --delta: the most similar plan reaching this KV saving (0-1) at --context")
    p.add_argument("--retrieval-weight", type=float, default=4.0,
                   help="--kind retrieval: price of sharing a pair = weight x its retrieval score (default 4)")
    p.add_argument("--block-size", type=int, default=None, help="--kind uniform: layers per block")
    p.add_argument("--window-pairs", type=int, default=0, metavar="N",
                   help="with --target-saving: N (layer, KV head) pairs of least measured distant need (distant "
                        "attention mass + retrieval score) keep only sinks + recent window, no distant K or V; "
                        "sharing supplies the rest of the saving (default 0)")
    p.add_argument("--granularity", choices=("head", "layer"), default="head",
                   help="head: PoD (per KV head); layer: PoD-L (all heads of a layer share one anchor)")
    p.add_argument("--context", action=Int, default=4096, help="context length the KV saving refers to")
    if ns_nr:
        p.add_argument("--ns", type=int, default=16, help="attention sinks (default 16)")
        p.add_argument("--nr", type=int, default=240, help="recent window incl. the query (default 240)")


def run(args) -> int:
    cfg = AnalysisConfig(model=args.model, data=list(args.data or []), samples=args.samples, length=args.length,
                         last_q=args.last_q, delta=args.delta, target_saving=args.target_saving,
                         granularity=args.granularity, ns=args.ns, nr=args.nr, seed=args.seed, context=args.context,
                         proximal_sizes=args.proximal_sizes, proximal_samples=args.proximal_samples,
                         kind=args.kind, retrieval_weight=args.retrieval_weight,
                         retrieval_samples=args.retrieval_samples, block_size=args.block_size,
                         window_pairs=args.window_pairs)
    with staged_dir(args.out, args.force) as stage:
        result = analyze(cfg, stage, progress=not args.no_progress)
    _print_plan(result["plan_object"], cfg.context)
    extra = ", retrieval.png" if result["retrieval"] else ""
    print(f"wrote {args.out}/plan.json, analysis.json, analysis.md, proximal.png, similarity.png{extra} "
          f"({result['runtime']['seconds']:.0f} s)")
    return 0


def run_plan(args) -> int:
    refuse_existing(args.out, args.force)
    if args.ablation is not None or args.add_anchors:
        return _add_anchors(args)
    if args.analysis is None:
        raise PodError("podkv plan needs --analysis analysis.json (from `podkv analyze`), or --base, --ablation and "
                       "--add-anchors")
    data = read_json(args.analysis, "--analysis", "an analysis.json from `podkv analyze`")
    if args.base is not None and args.ablation is None:
        return _add_windows(args, data)
    plan, cfg = replan(data, str(args.analysis), kind=args.kind, delta=args.delta,
                       target_saving=args.target_saving, granularity=args.granularity, context=args.context,
                       retrieval_weight=args.retrieval_weight, block_size=args.block_size,
                       window_pairs=args.window_pairs)
    plan.save(args.out)
    _print_plan(plan, cfg.context)
    print(f"wrote {args.out}")
    return 0


def _add_windows(args, data: dict) -> int:
    """``podkv plan --base PLAN --window-pairs N``: the base plan plus N window-only pairs."""
    from podkv.analysis.planner import add_windows

    if args.window_pairs < 1:
        raise PodError("--base needs --window-pairs N (N >= 1): the window-only pairs to add")
    scores = data.get("retrieval")
    if not scores:
        raise PodError(f"{args.analysis} has no retrieval scores: re-run `podkv analyze` with --retrieval-samples N")
    base = SharingPlan.load(args.base)
    need = torch.tensor(scores["distant_mass"], dtype=torch.float64) + torch.tensor(scores["retrieval"], dtype=torch.float64)
    plan = add_windows(base, need, args.window_pairs)
    plan.meta["window_pairs"].update(base=str(args.base), importance="distant_mass + retrieval", analysis=str(args.analysis))
    plan.save(args.out)
    _print_plan(plan, args.context)
    print(f"wrote {args.out}")
    return 0


def _add_anchors(args) -> int:
    """``podkv plan --base PLAN --ablation ablation.json --add-anchors K``."""
    from podkv.analysis.ablation import add_anchors

    if args.base is None or args.ablation is None or args.add_anchors < 1:
        raise PodError("--ablation needs --base PLAN and --add-anchors K (K >= 1): the plan the ablation was made on "
                       "and the anchors to add")
    data = read_json(args.ablation, "--ablation", "an ablation.json from `podkv ablate`")
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), list):
        raise PodError(f"--ablation file {args.ablation} has no 'pairs' list: it is not an ablation.json from `podkv ablate`")
    base = SharingPlan.load(args.base)
    plan = add_anchors(base, data["pairs"], args.add_anchors)
    plan.meta["added_anchors_from"] = {"base": str(args.base), "ablation": str(args.ablation)}
    plan.save(args.out)
    _print_plan(plan, args.context)
    print(f"wrote {args.out}")
    return 0


def run_ablate(args) -> int:
    from podkv import load_model, texts
    from podkv.analysis import ablation
    from podkv.io import atomic_write_text, write_json
    from podkv.plan import plan_from_config

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or "smollm2-pod"
    plan = SharingPlan.load(args.plan) if args.plan is not None else None
    refuse_existing(args.out, args.force)
    ablation.check_prompt_count(args.prompts)
    model, tok = load_model(name, progress=not args.no_progress)
    if plan is None:
        plan = plan_from_config(model.config)
        if plan is None:
            raise PodError(f"model {name} carries no PoD plan: pass --plan")
    plan.validate_for(model.config)
    prompts = ablation.answer_prompts(tok, args.prompts, args.length, args.seed)
    with staged_dir(args.out, args.force) as stage:
        result = ablation.pair_ablation(model, plan, prompts, progress=not args.no_progress)
        result.update(model=name, plan_name=str(args.plan or f"{name}'s own"), plan_json=plan.to_dict(),
                      length=args.length, seed=args.seed, text=texts.describe("plan"))
        write_json(stage / "ablation.json", result)
        atomic_write_text(stage / "ablation.md", ablation.markdown(result))
        ablation.figure(result, plan.num_layers, plan.num_kv_heads, stage / "ablation.png")
    best = max(result["pairs"], key=lambda r: r["delta"], default=None)
    if best is not None:
        print(f"most helpful split: layer {best['layer']}, head {best['head']} ({best['delta']:+.4f} nats/answer token)")
    print(f"wrote {args.out}/ablation.json, ablation.md, ablation.png")
    return 0


def _print_plan(plan, context: int) -> None:
    print(plan.grid())
    print(plan.summary(context))
