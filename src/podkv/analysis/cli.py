"""`podkv analyze` (exploration + plan) and `podkv plan` (re-plan from an existing analysis.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from podkv.analysis.run import AnalysisConfig, analyze, replan
from podkv.cli_args import Int, Ints
from podkv.errors import PodError
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
    q.add_argument("--analysis", type=Path, required=True, help="analysis.json")
    q.add_argument("--base", type=Path, default=None, metavar="PLAN",
                   help="with --window-pairs N: add N window-only pairs to this plan (least needed block ends "
                        "first) and keep its other anchors, e.g. the plan an adapted model was trained on")
    _plan_flags(q, ns_nr=False)
    add_out_arguments(q, "plan JSON file to write (refused if it exists, unless --force)")
    q.set_defaults(func=run_plan)


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
    if not args.analysis.is_file():
        raise PodError(f"--analysis file {args.analysis} does not exist")
    try:
        data = json.loads(args.analysis.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PodError(f"--analysis file {args.analysis} is not an analysis.json from `podkv analyze` "
                       f"({exc})") from None
    if args.base is not None:
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


def _print_plan(plan, context: int) -> None:
    print(plan.grid())
    print(plan.summary(context))
