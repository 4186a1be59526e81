"""`podkv bench memory|batch|speed|skip`: each builds a config, runs one library function, writes results."""

from __future__ import annotations

from pathlib import Path

import torch

from podkv.bench.batch import BatchConfig
from podkv.bench.batch_rss import RssBatchConfig
from podkv.bench.memory import MemoryConfig
from podkv.bench.runner import run_bench
from podkv.bench.skip import SkipConfig
from podkv.bench.speed import SpeedConfig
from podkv.cache.quant import BITS
from podkv.cli_args import Floats, Int, Ints
from podkv.models import loading
from podkv.outputs import refuse_existing

DEFAULT_OUT = Path("benchmarks")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks: KV memory, max batch, speed, gate skipping")
    cmds = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    common = dict(model=None, plan=None, out=DEFAULT_OUT)

    p = cmds.add_parser("memory", help="KV bytes held vs context length, measured and by formula")
    p.add_argument("--lengths", action=Ints, default=(1024, 2048, 4096, 8192))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode", type=int, default=4, help="greedy tokens decoded after the prefill")
    p.add_argument("--selection-budget", type=float, default=0.1,
                   help="also measure pod+snapkv holding this fraction of the dense KV (0: skip)")
    p.add_argument("--kv-bits", type=int, default=None, choices=BITS,
                   help="8, 4 or 2: the PodCache holds its token-long values and anchor keys in that many bits "
                        "(podkv.cache.quant)")
    p.add_argument("--key-quant", choices=("token", "channel"), default="token",
                   help="with --kv-bits: anchor keys per token as the values, or per channel over 64 tokens (KIVI)")
    p.add_argument("--kv-keep-proximal", action="store_true",
                   help="with --kv-bits: keep the first ns and last nr tokens in the model's dtype (KIVI's residual)")
    _common(p, "memory")

    p = cmds.add_parser("batch", help="largest batch under a fixed KV budget, or (--rss-budget) a process-memory "
                                      "budget, dense vs PoD (real runs)")
    p.add_argument("--length", action=Int, default=2048)
    p.add_argument("--new-tokens", action=Int, default=16)
    p.add_argument("--budget-requests", type=float, default=4.5, help="KV budget in dense requests (default 4.5)")
    p.add_argument("--budget-mb", type=float, default=None, help="KV budget in MiB (overrides --budget-requests)")
    p.add_argument("--rss-budget", type=float, default=None, metavar="GIB",
                   help="measure instead: the largest batch whose whole process (peak RSS, one child process per "
                        "try) stays under GIB GiB; writes batch_rss.json")
    p.add_argument("--max-batch", type=int, default=64)
    _common(p, "batch")

    p = cmds.add_parser("speed", help="prefill/decode latency and one layer's attention, dense vs PoD")
    p.add_argument("--prefill-lengths", action=Ints, default=(512, 1024, 2048))
    p.add_argument("--decode-lengths", action=Ints, default=(1024, 4096))
    p.add_argument("--decode-steps", type=int, default=12)
    p.add_argument("--batches", action=Ints, default=(1,), help="decode batch sizes (default 1)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--attn-lengths", action=Ints, default=(1024, 2048, 4096, 8192))
    p.add_argument("--attn-reps", type=int, default=5)
    p.add_argument("--chunk", action=Int, default=128, help="PoD prefill query chunk (enable_pod's chunk)")
    _common(p, "speed")

    p = cmds.add_parser("skip", help="gate skipping swept over tau: skipped share, time, perplexity, passkey")
    p.add_argument("--taus", action=Floats, default=None, help="default 1.01,0.95,...,0")
    p.add_argument("--context", action=Int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ppl-prefix", type=int, default=1024)
    p.add_argument("--ppl-tokens", action=Int, default=48)
    p.add_argument("--passkeys", type=int, default=3)
    p.add_argument("--predictor", choices=("anchor_gate", "anchor_lse"), default="anchor_gate")
    _common(p, "skip")
    bench.set_defaults(**common)


def _common(p, name: str) -> None:
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--plan", type=Path, default=None,
                   help="sharing plan JSON (default: the shipped SmolLM2 plan, else uniform blocks of 4)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="folder for <name>.json, RESULTS.md and PNGs (an existing <name>.json is refused unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing <out>/<name>.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives steadier timings on a CPU shared with other jobs)")
    p.set_defaults(func=run, bench_name=name)


def run(args) -> int:
    refuse_existing(Path(args.out) / f"{bench_name(args)}.json", args.force, flag="--out: results file")
    config = build_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tok = loading.load_model(args.model)
    path = run_bench(bench_name(args), model, tok, config, out_dir=args.out, plan_path=args.plan)
    print(f"wrote {path} and {Path(args.out) / 'RESULTS.md'}")
    return 0


def bench_name(args) -> str:
    """The benchmark (and results file) a command runs: `batch --rss-budget` is the measured-memory one."""
    return "batch_rss" if args.bench_name == "batch" and args.rss_budget is not None else args.bench_name


def build_config(args):
    name = args.bench_name
    if name == "memory":
        return MemoryConfig(lengths=args.lengths, batch=args.batch, decode=args.decode,
                            selection_budget=args.selection_budget or None, kv_bits=args.kv_bits,
                            key_quant=args.key_quant, keep_proximal=args.kv_keep_proximal)
    if bench_name(args) == "batch_rss":
        return RssBatchConfig(rss_budget_gib=args.rss_budget, length=args.length, new_tokens=args.new_tokens,
                              max_batch=args.max_batch, model=args.model, threads=args.threads)
    if name == "batch":
        return BatchConfig(length=args.length, new_tokens=args.new_tokens, budget_requests=args.budget_requests,
                           budget_mb=args.budget_mb, max_batch=args.max_batch)
    if name == "speed":
        return SpeedConfig(prefill_lengths=args.prefill_lengths, decode_lengths=args.decode_lengths,
                           decode_steps=args.decode_steps, batches=args.batches, reps=args.reps, attn_lengths=args.attn_lengths,
                           attn_reps=args.attn_reps, chunk=args.chunk)
    kw = {} if args.taus is None else {"taus": args.taus}
    return SkipConfig(context=args.context, steps=args.steps, ppl_prefix=args.ppl_prefix, ppl_tokens=args.ppl_tokens,
                      passkeys=args.passkeys, predictor=args.predictor, **kw)
