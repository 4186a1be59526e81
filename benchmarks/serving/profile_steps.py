"""Where a PoD engine's time goes, against dense: engine step times and the time inside PoD's attention.

    .venv-vllm/bin/python benchmarks/serving/profile_steps.py --prompt-len 1024 --out benchmarks/serving/profile_p1024.json

One in-process engine at a time (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the timers see the model), the same
16 random prompts as ``benchmarks/serving/throughput.py``, greedy. Reported per engine: wall time of the batch, every
engine step (``execute_model``), the median of the last 16 (pure decode: every request has finished its
prefill) and, for PoD, the seconds and calls inside ``PodTorchImpl``'s shared-layer prefill and decode.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TIMED = ("forward", "do_kv_cache_update", "_decode_kernel", "_prefill_kernel", "_decode", "_prefill")


def _child(which: str, args) -> dict:
    from vllm import LLM, SamplingParams

    import podkv.serving.attention as attention
    from podkv.plan import SharingPlan
    from podkv.serving.engine import make_llm
    from throughput import prompts  # benchmarks/serving/throughput.py, beside this script

    spent = collections.Counter()
    for name in TIMED:
        fn = getattr(attention.PodTorchImpl, name)

        def timed(self, *a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(self, *a, **k)
            finally:
                spent[_name + "_s"] += time.perf_counter() - t0
                spent[_name + "_calls"] += 1
        setattr(attention.PodTorchImpl, name, timed)

    kw = dict(dtype="float32", max_model_len=args.max_model_len, enforce_eager=True, enable_prefix_caching=False,
              enable_chunked_prefill=True, max_num_batched_tokens=args.max_num_batched_tokens,
              max_num_seqs=args.requests, seed=0)
    if which == "dense":
        llm = LLM(model=str(args.model), block_size=32, **kw)
    else:
        plan = SharingPlan.uniform(30, 3, args.block_layers, ns=16, nr=240)
        overrides = {"hf_overrides": {"pod_kv_kernel": False}} if which == "gather" else {}
        llm = make_llm(args.model, plan, **overrides, **kw)
    reqs = [{"prompt_token_ids": p} for p in prompts(args.requests, args.prompt_len)]
    llm.generate(reqs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    spent.clear()
    steps = []
    executor = llm.llm_engine.engine_core.engine_core.model_executor
    execute = executor.execute_model

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        out = execute(*a, **k)
        steps.append(time.perf_counter() - t0)
        return out
    executor.execute_model = timed_step
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens)
    t0 = time.perf_counter()
    llm.generate(reqs, params, use_tqdm=False)
    return {"engine": which, "wall_s": time.perf_counter() - t0, "steps": len(steps),
            "step_ms": [round(s * 1e3, 2) for s in steps],
            "decode_step_ms_median_last16": statistics.median(steps[-16:]) * 1e3,
            "pod_attention": {k: round(v, 4) if isinstance(v, float) else v for k, v in sorted(spent.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path.home() / ".cache/podkv/models/smollm2-135m-instruct")
    ap.add_argument("--engines", default="dense,kernel,gather", help="comma list of dense, kernel, gather")
    ap.add_argument("--block-layers", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("PODKV_PROFILE " + json.dumps(_child(args.child, args)), flush=True)
        return 0
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    runs = []
    for which in args.engines.split(","):  # one process per engine: vLLM keeps process-wide state
        argv_child = [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run([sys.executable, __file__, *argv_child, "--child", which], env=env,
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PODKV_PROFILE ")), None)
        if line is None:
            raise SystemExit(f"{which} engine failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(line[len("PODKV_PROFILE "):]))
        r = runs[-1]
        print(f"{which}: wall {r['wall_s']:.1f} s, decode step {r['decode_step_ms_median_last16']:.1f} ms, "
              f"PoD attention {r['pod_attention']}", file=sys.stderr, flush=True)
    result = {"command": "python benchmarks/serving/profile_steps.py " + " ".join(argv or sys.argv[1:]),
              "settings": {k: str(v) for k, v in vars(args).items() if k != "child"}, "runs": runs}
    if args.out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
        from podkv.io import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
