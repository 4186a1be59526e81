"""Generation throughput through vLLM: a PoD model vs the same model dense, back to back.

    python benchmarks/serving/throughput.py --model DIR --block-layers 3 --requests 16 --prompt-len 256 \
        --max-tokens 64 --rounds 3 --out benchmarks/serving/throughput.json

Each round starts one engine per process (vLLM keeps process-wide state), dense then PoD, with the same
``VLLM_CPU_KVCACHE_SPACE``, the same random prompts (token ids) and greedy sampling. In each engine:
one warm-up pass, then ``--passes`` timed passes of all requests at once (``LLM.generate``; the whole
batch is in flight together, as in a server under load). Reported: generated tokens per second (best
pass of each engine, median over rounds) and dense / PoD. On a shared CPU the rounds interleave the two
engines so that load drifts hit both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from podkv.cli_args import Int
from podkv.serving.capacity import add_plan_args, plan_from_args, run_child


def prompts(n: int, length: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, min(vocab, 40000), (length,), generator=g).tolist() for _ in range(n)]


def _child(args) -> int:
    from vllm import LLM, SamplingParams

    from podkv.serving.engine import make_llm

    kw = dict(dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True, enable_prefix_caching=False,
              enable_chunked_prefill=True, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=max(args.requests, 16), seed=0)
    if args.child == "dense":
        llm = LLM(model=str(args.model), block_size=args.dense_block_size, **kw)
    else:
        pod_kw = {} if args.block_size is None else {"block_size": args.block_size}
        if args.gather_path:
            pod_kw["hf_overrides"] = {"pod_kv_kernel": False}
        llm = make_llm(args.model, plan_from_args(args), **pod_kw, **kw)
    reqs = [{"prompt_token_ids": p} for p in prompts(args.requests, args.prompt_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    llm.generate(reqs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    passes = []
    for _ in range(args.passes):
        t0 = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        wall = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        passes.append({"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall})
    cfg = llm.llm_engine.vllm_config
    print("PODKV_THROUGHPUT " + json.dumps({"passes": passes, "kv_cache_size_tokens": cfg.cache_config.kv_cache_size_tokens,
                                             "block_size": cfg.cache_config.block_size,
                                             "pod_kv_kernel": getattr(cfg.model_config.hf_config, "pod_kv_kernel", None)}),
          flush=True)
    return 0


CHILD_FLAGS = ("model", "plan", "block_layers", "ns", "nr", "requests", "prompt_len", "max_tokens", "passes",
               "max_model_len", "block_size", "dense_block_size", "max_num_batched_tokens", "dtype", "gather_path")


def run_engine(args, which: str) -> dict:
    flags = []
    for name in CHILD_FLAGS:
        value = getattr(args, name)
        if isinstance(value, bool):
            flags += ["--" + name.replace("_", "-")] if value else []
        elif value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return run_child(__file__, "PODKV_THROUGHPUT", which, flags)


def measure(args) -> dict:
    rounds = []
    for r in range(args.rounds):
        dense, pod = run_engine(args, "dense"), run_engine(args, "shared")
        best = {k: max(p["tokens_per_s"] for p in v["passes"]) for k, v in (("dense", dense), ("pod", pod))}
        rounds.append({"dense": dense, "pod": pod, "dense_tokens_per_s": best["dense"],
                       "pod_tokens_per_s": best["pod"], "dense_over_pod": best["dense"] / best["pod"]})
        print(f"round {r}: dense {best['dense']:.1f} tok/s, PoD {best['pod']:.1f} tok/s, "
              f"dense/PoD x{best['dense'] / best['pod']:.2f}", file=sys.stderr, flush=True)
    plan = plan_from_args(args)
    return {"model": str(args.model), "plan": plan.summary(args.max_model_len),
            "settings": {k: getattr(args, k) for k in CHILD_FLAGS if k != "model"},
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"), "rounds": rounds,
            "dense_tokens_per_s": statistics.median(r["dense_tokens_per_s"] for r in rounds),
            "pod_tokens_per_s": statistics.median(r["pod_tokens_per_s"] for r in rounds),
            "dense_over_pod": statistics.median(r["dense_over_pod"] for r in rounds)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_args(ap)
    ap.add_argument("--requests", type=int, default=16, help="requests in flight together")
    ap.add_argument("--prompt-len", action=Int, default=256)
    ap.add_argument("--max-tokens", action=Int, default=64, help="greedy tokens per request")
    ap.add_argument("--passes", type=int, default=2, help="timed passes per engine (the best counts)")
    ap.add_argument("--rounds", type=int, default=2, help="dense-then-PoD engine pairs (median reported)")
    ap.add_argument("--max-model-len", action=Int, default=2048)
    ap.add_argument("--block-size", type=int, default=None,
                    help="PoD engine's KV block size (default: the plugin's, 32 on vLLM's kernel, else 16)")
    ap.add_argument("--gather-path", action="store_true", help="PoD on gathered copies, not vLLM's CPU kernel")
    ap.add_argument("--dense-block-size", type=int, default=32, help="dense engine's (its CPU kernel: multiples of 32)")
    ap.add_argument("--max-num-batched-tokens", action=Int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", choices=["dense", "shared"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    result = measure(args)
    result["command"] = "python benchmarks/serving/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=1))
    if args.out is not None:
        from podkv.io import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
