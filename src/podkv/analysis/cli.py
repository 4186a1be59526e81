"""`podkv analyze` (exploration + plan) and `podkv plan` (re-plan from an existing analysis.json)."""

from __future__ import annotations

import json
from pathlib import Path

from podkv.errors import PodError


def register(sub) -> None:
    p = sub.add_parser("analyze", help="offline exploration (paper §2.1): proximal-token importance, inter-layer "
                                       "attention similarity and a sharing plan")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help=".txt or .jsonl (field 'text') files; default: Python's pydoc_data.topics text")
    p.add_argument("--samples", type=int, default=8, help="samples of --length tokens (default 8)")
    p.add_argument("--length", type=int, default=2048, help="tokens per sample (default 2048)")
    p.add_argument("--last-q", type=int, default=64, help="last queries whose distant attention is compared")
    p.add_argument("--proximal-sizes", type=_int_list, default="64,128,256,512,1024",
                   help="comma-separated proximal sizes (ns sinks + recent) for observation 1")
    p.add_argument("--proximal-samples", type=int, default=2, help="samples used for observation 1 (default 2)")
    _plan_flags(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)

    q = sub.add_parser("plan", help="make a sharing plan from an analysis.json written by `podkv analyze`")
    q.add_argument("--analysis", type=Path, required=True, help="analysis.json")
    _plan_flags(q, ns_nr=False)
    q.add_argument("--out", type=Path, required=True, help="plan JSON file to write")
    q.set_defaults(func=run_plan)


def _plan_flags(p, ns_nr: bool = True) -> None:
    p.add_argument("--delta", type=float, default=0.5, help="similarity threshold of the greedy (default 0.5)")
    p.add_argument("--target-saving", type=float, default=None,
                   help="instead of --delta: the most similar plan reaching this KV saving (0-1) at --context")
    p.add_argument("--granularity", choices=("head", "layer"), default="head",
                   help="head: PoD (per KV head); layer: PoD-L (all heads of a layer share one anchor)")
    p.add_argument("--context", type=int, default=4096, help="context length the KV saving refers to")
    if ns_nr:
        p.add_argument("--ns", type=int, default=16, help="attention sinks (default 16)")
        p.add_argument("--nr", type=int, default=240, help="recent window incl. the query (default 240)")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise PodError(f"--proximal-sizes must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from podkv.analysis.run import AnalysisConfig, analyze

    cfg = AnalysisConfig(model=args.model, data=list(args.data or []), samples=args.samples, length=args.length,
                         last_q=args.last_q, delta=args.delta, target_saving=args.target_saving,
                         granularity=args.granularity, ns=args.ns, nr=args.nr, seed=args.seed, context=args.context,
                         proximal_sizes=args.proximal_sizes, proximal_samples=args.proximal_samples)
    result = analyze(cfg, args.out, progress=not args.no_progress)
    _print_plan(result["plan_object"], cfg.context)
    print(f"wrote {args.out}/plan.json, analysis.json, analysis.md, proximal.png, similarity.png "
          f"({result['runtime']['seconds']:.0f} s)")
    return 0


def run_plan(args) -> int:
    import torch

    from podkv.analysis.run import AnalysisConfig, make_plan

    if not args.analysis.is_file():
        raise PodError(f"--analysis file {args.analysis} does not exist")
    try:
        data = json.loads(args.analysis.read_text())
        sim_kv = torch.tensor(data["similarity"]["kv_heads"], dtype=torch.float64)
        settings = dict(data["settings"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PodError(f"--analysis file {args.analysis} is not an analysis.json from `podkv analyze` ({exc})") from None
    settings.update(delta=args.delta, target_saving=args.target_saving, granularity=args.granularity,
                    context=args.context)
    cfg = AnalysisConfig(**settings)
    meta = {k: data[k] for k in ("model", "model_type", "data_sha256", "seed", "podkv_version", "versions")
            if k in data}
    meta["settings"] = {**settings, "proximal_sizes": list(cfg.proximal_sizes), "from_analysis": str(args.analysis)}
    plan = make_plan(cfg, sim_kv, meta=meta)
    plan.save(args.out)
    _print_plan(plan, cfg.context)
    print(f"wrote {args.out}")
    return 0


def _print_plan(plan, context: int) -> None:
    print(plan.grid())
    print(plan.summary(context))
