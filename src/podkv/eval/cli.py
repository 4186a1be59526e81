"""`podkv eval <task>`, `podkv eval compare` and `podkv demo`: thin wrappers over the runner."""

from __future__ import annotations

from pathlib import Path

import torch

from podkv.cli_args import Floats, Int, Ints, Names
from podkv.errors import PodError
from podkv.eval.config import EvalConfig
from podkv.eval.demo import demo
from podkv.eval.merge import merge_runs
from podkv.eval.methods import available_methods
from podkv.eval.report import markdown, write_results
from podkv.eval.runner import run
from podkv.eval.tasks import TASKS
from podkv.outputs import add_out_arguments, staged_dir

COMPARE_METHODS = ("dense", "pod", "streaming", "snapkv", "h2o")


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate KV methods: ppl, passkey, niah, multikey, RULER-style niah_*/vt, "
                                    "retrieval_logprob, longbench, ruler, compare")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name in TASKS:
        t = tasks.add_parser(name, help=(TASKS[name].__doc__ or f"the {name} task").strip().splitlines()[0])
        _common(t)
        t.add_argument("--method", required=True, help="dense, pod, pod-scores, streaming, snapkv, h2o, pyramidkv")
        t.set_defaults(func=run_task, tasks_=(name,))
    c = tasks.add_parser("compare", help="several methods on the same tasks at one KV budget; one table + figures")
    _common(c)
    c.add_argument("--methods", action=Names, default=COMPARE_METHODS,
                   help=f"comma list (default {','.join(COMPARE_METHODS)}; the kvpress baselines snapkv, h2o only "
                        "where kvpress is installed)")
    c.add_argument("--tasks", action=Names, default=("niah",), help="comma list of tasks (default niah)")
    c.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="instead of running: merge the results.json of runs made separately (same prompts)")
    c.set_defaults(func=run_compare)

    d = sub.add_parser("demo", help="capital-of-France check through PoD, then needles at several depths: dense vs PoD vs StreamingLLM")
    d.add_argument("--model", default=None, help="default: smollm2-pod if available, else the default model + plan")
    d.add_argument("--length", action=Int, default=2048, help="prompt length in tokens (default 2048)")
    d.add_argument("--samples", type=int, default=10, help="needles, one prompt each, depths spread 5%%..95%% (>= 10)")
    add_out_arguments(d, "where the results and figure go (default demo_out/; refused if it exists, unless --force)",
                      required=False, default=Path("demo_out"))
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=run_demo)


def _common(p) -> None:
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct; or 'smollm2-pod', a path")
    p.add_argument("--plan", default=None, help="PoD plan JSON (default: the model's own, the shipped plan, or uniform)")
    p.add_argument("--budget", type=float, default=None,
                   help="KV fraction every compressed method must hold at most (default: what the PoD plan holds)")
    p.add_argument("--lengths", action=Ints, default=(1024, 2048, 4096), help="token lengths, e.g. 1k,2k,4k")
    p.add_argument("--depths", action=Floats, default=None,
                   help="needle depths in [0,1] (default: 0,0.25,0.5,0.75,1; RULER tasks draw one per sample)")
    p.add_argument("--depths-long", action=Floats, default=None, help="depths used at lengths >= --long-from")
    p.add_argument("--long-from", action=Int, default=8192)
    p.add_argument("--haystack", choices=("filler", "prose"), default=None,
                   help="passkey/niah/multikey only (RULER tasks name theirs); prose = held-out stdlib docstrings")
    p.add_argument("--samples", type=int, default=1,
                   help="prompts per (length, depth) cell; RULER tasks without --depths: per length, >= 10")
    p.add_argument("--needles", type=int, default=4, help="multikey: needles per prompt")
    p.add_argument("--max-new-tokens", action=Int, default=None, help="default: the task's own (12-48)")
    p.add_argument("--files", nargs="+", default=(),
                   help="ppl: text files to score, refused if they repeat the train/plan text "
                        "(default: the held-out stdlib docstrings)")
    p.add_argument("--data", default=None, help="longbench/ruler: local jsonl file or directory")
    p.add_argument("--subset", default=None, help="longbench: subset name (file <subset>.jsonl)")
    p.add_argument("--seed", type=int, default=0)
    add_out_arguments(p, "output directory (refused if it exists, unless --force)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")


def config_from(args, tasks, methods, compare=False, out=None):
    if args.threads is not None:
        if args.threads < 1:
            raise PodError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return EvalConfig(tasks=tuple(tasks), methods=tuple(methods), model=args.model, plan=args.plan, budget=args.budget,
                      lengths=args.lengths, depths=args.depths, depths_long=args.depths_long, long_from=args.long_from,
                      haystack=args.haystack, samples=args.samples, needles=args.needles,
                      max_new_tokens=args.max_new_tokens, files=tuple(args.files), data=args.data,
                      subset=args.subset, seed=args.seed, out=str(out or args.out), compare=compare)


def run_task(args) -> int:
    with staged_dir(args.out, args.force) as stage:
        results = run(config_from(args, args.tasks_, [args.method], out=stage), progress=not args.quiet)
    _print_table(results, args.out)
    return 0


def run_compare(args) -> int:
    if args.merge:
        results, timings = merge_runs(args.merge)
        with staged_dir(args.out, args.force) as stage:
            write_results(results, stage, timings)
        _print_table(results, args.out)
        return 0
    with staged_dir(args.out, args.force) as stage:
        results = run(config_from(args, args.tasks, compare_methods(args.methods), compare=True, out=stage),
                      progress=not args.quiet)
    _print_table(results, args.out)
    return 0


def compare_methods(asked) -> tuple[str, ...]:
    """The methods ``eval compare`` runs: those asked for, or (left at the default) the defaults that run here.

    kvpress needs transformers<5.3, so its baselines drop out of the default list where it is absent;
    asked for by name, they fail with the install hint.
    """
    return available_methods(COMPARE_METHODS) if asked is COMPARE_METHODS else tuple(asked)


def _print_table(results, out) -> None:
    print(markdown(results))
    print(f"results in {out}/ (results.json, results.md, figures)")


def run_demo(args) -> int:
    with staged_dir(args.out, args.force) as stage:
        return demo(model_name=args.model, length=args.length, samples=args.samples, out=stage, seed=args.seed,
                    shown=args.out)
