"""KV capacity that vLLM reports for a PoD model vs the same model dense, at the same KV memory.

    python -m podkv.serving.capacity --model DIR --block-layers 3 --ns 16 --nr 240 \
        --max-model-len 8192 --out benchmarks/serving/capacity_smollm2.json

starts two engines, one per process (vLLM keeps process-wide state), with the same
``VLLM_CPU_KVCACHE_SPACE``: stock vLLM on the checkpoint, then ``PodLlamaForCausalLM`` with the
plan (stage-2 shared KV layout). Each reports vLLM's own numbers: ``cache_config.kv_cache_size_tokens``
(the "CPU KV cache size: N tokens" log line: max concurrency x max_model_len, group-aware),
``num_gpu_blocks`` and the KV cache groups. The measured saving is ``1 - dense_tokens / pod_tokens``
(same bytes, so bytes per token scale by that); the analytic one is ``plan.kv_saving(max_model_len)``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from podkv.cli_args import Int
from podkv.io import write_json
from podkv.plan import SharingPlan
from podkv.serving.checks import layer_anchors
from podkv.serving.engine import load_hf_config, make_llm


def engine_numbers(llm) -> dict:
    """vLLM's KV numbers of a started ``vllm.LLM`` (in-process engine core)."""
    cfg = llm.llm_engine.vllm_config
    out = {"kv_cache_size_tokens": cfg.cache_config.kv_cache_size_tokens,
           "max_concurrency": cfg.cache_config.kv_cache_max_concurrency,
           "num_blocks": cfg.cache_config.num_gpu_blocks,
           "max_model_len": cfg.model_config.max_model_len,
           "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
           "pod_kv_kernel": getattr(cfg.model_config.hf_config, "pod_kv_kernel", None)}
    try:
        core = llm.llm_engine.engine_core.engine_core
        groups = core.scheduler.kv_cache_config.kv_cache_groups
        out["groups"] = [{"spec": type(g.kv_cache_spec).__name__, "layers": len(g.layer_names),
                          "block_size": g.kv_cache_spec.block_size,
                          "page_size_bytes": g.kv_cache_spec.page_size_bytes,
                          "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None)} for g in groups]
    except AttributeError:  # multiprocess engine: the groups live in another process
        pass
    return out


def _child(args) -> int:
    from vllm import LLM  # optional: vllm

    block_size = args.dense_block_size if args.child == "dense" else args.block_size
    kw = dict(dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True, enable_prefix_caching=False,
              block_size=block_size, enable_chunked_prefill=True,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0)
    if args.child == "dense":
        llm = LLM(model=str(args.model), **kw)
    else:
        llm = make_llm(args.model, plan_from_args(args), kv_layout=args.child, **kw)
    print("PODKV_CAPACITY " + json.dumps(engine_numbers(llm)), flush=True)
    return 0


def add_plan_args(ap) -> None:
    """The model and plan flags :func:`plan_from_args` reads (the capacity and throughput commands)."""
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--plan", type=Path, default=None, help="plan JSON (default: uniform blocks, see --block-layers)")
    ap.add_argument("--block-layers", type=int, default=3)
    ap.add_argument("--ns", type=int, default=16)
    ap.add_argument("--nr", type=int, default=240)


def plan_from_args(args) -> SharingPlan:
    """--plan, or uniform blocks of --block-layers with --ns/--nr (the capacity and throughput commands)."""
    if args.plan is not None:
        return SharingPlan.load(args.plan)
    config = load_hf_config(args.model)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return SharingPlan.uniform(config.num_hidden_layers, kv_heads, args.block_layers, ns=args.ns, nr=args.nr)


def run_engine(args, which: str) -> dict:
    flags = ["--model", str(args.model), "--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size),
             "--dense-block-size", str(args.dense_block_size),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--dtype", args.dtype,
             "--block-layers", str(args.block_layers), "--ns", str(args.ns), "--nr", str(args.nr)]
    if args.plan is not None:
        flags += ["--plan", str(args.plan)]
    return run_child("podkv.serving.capacity", "PODKV_CAPACITY", which, flags)


def run_child(target: str, tag: str, which: str, flags: list[str]) -> dict:
    """``python -m MODULE --child WHICH FLAGS`` (or ``python SCRIPT.py ...``): one fresh vLLM engine per
    measurement (an engine's memory is not given back in-process); returns the JSON of its ``TAG`` line."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    entry = [target] if target.endswith(".py") else ["-m", target]
    proc = subprocess.run([sys.executable, *entry, "--child", which, *flags], env=env, capture_output=True,
                          text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith(tag + " ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{which} engine failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(line[len(tag) + 1:])


def measure(args) -> dict:
    plan = plan_from_args(args)
    dense = run_engine(args, "dense")
    pod = run_engine(args, "shared")
    T = args.max_model_len
    analytic = plan.kv_saving(T)
    measured = 1.0 - dense["kv_cache_size_tokens"] / pod["kv_cache_size_tokens"]
    anchors = layer_anchors(plan)
    lengths = [anchors.count(a) for a in dict.fromkeys(anchors)]
    blocks = f"blocks of {lengths[0]}" if len(set(lengths)) == 1 else "blocks " + "+".join(map(str, lengths))
    return {"model": str(args.model), "plan": plan.summary(T), "blocks": blocks, "block_layers": args.block_layers,
            "ns": plan.ns, "nr": plan.nr, "max_model_len": T, "block_size": args.block_size, "dense_block_size": args.dense_block_size,
            "max_num_batched_tokens": args.max_num_batched_tokens, "dtype": args.dtype,
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
            "dense": dense, "pod": pod,
            "capacity_ratio": pod["kv_cache_size_tokens"] / dense["kv_cache_size_tokens"],
            "measured_saving": measured, "analytic_saving": analytic,
            "analytic_capacity_ratio": 1.0 / (1.0 - analytic),
            "difference_points": 100 * (measured - analytic)}


def markdown_row(r: dict) -> str:
    path = "vLLM kernel" if r["pod"].get("pod_kv_kernel") else "gather"
    return (f"| {Path(r['model']).name} | {r.get('blocks', 'blocks of %d' % r['block_layers'])}, ns={r['ns']}, nr={r['nr']} "
            f"| {r['block_size']} ({path}) | {r['max_model_len']} "
            f"| {r['dense']['kv_cache_size_tokens']:,} | {r['pod']['kv_cache_size_tokens']:,} "
            f"| x{r['capacity_ratio']:.3f} | {100 * r['measured_saving']:.1f}% | {100 * r['analytic_saving']:.1f}% "
            f"| {r['difference_points']:+.2f} |")


MARKDOWN_HEADER = ("| model | plan | PoD block size (layout) | max_model_len (T) | dense KV tokens | PoD KV tokens | ratio "
                   "| measured saving | analytic `kv_saving(T)` | diff (points) |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_plan_args(ap)
    ap.add_argument("--max-model-len", action=Int, default=8192)
    ap.add_argument("--block-size", type=int, default=16,
                    help="PoD engine's block size (the shared layout takes multiples of 8)")
    ap.add_argument("--dense-block-size", type=int, default=32,
                    help="dense engine's block size (vLLM's CPU kernel takes multiples of 32; dense capacity "
                         "does not depend on it when max_model_len is a multiple)")
    ap.add_argument("--max-num-batched-tokens", action=Int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (results appended by model/plan/T)")
    ap.add_argument("--child", choices=["dense", "shared", "full"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    result = measure(args)
    result["command"] = "python -m podkv.serving.capacity " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(result, indent=1))
    print(MARKDOWN_HEADER)
    print(markdown_row(result))
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
