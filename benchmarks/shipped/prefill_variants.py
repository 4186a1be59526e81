"""smollm2-pod prefill, dense vs PoD variants in one run, alternating: score tiles on/off, prefill step sizes,
and the whole prompt in one step on the two-pass path (``attention/prefill.py``: no block pass, each layer
scores its distant keys with its anchor's queries in the fused causal kernel), with its distant rows in one
call per head run or, as before, one call per query chunk; heads that are their own anchor in one causal call or,
as before, in two passes; or the whole prompt in one call per layer of the compiled kernel (``native/pod_prefill.c``).

    python benchmarks/shipped/prefill_variants.py [--context 4096] [--reps 3]

Where the figures in docs/architecture.md and docs/bench.md on tiles (``block_pass.TILE``) and on prefill steps
longer than nr come from. Prints medians and PoD ÷ dense per variant (2 threads, shipped model and plan,
scores mode); writes prefill_variants_<context>.json here.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from podkv.attention import block_pass, chunked, prefill
from podkv.bench.common import machine_info, new_cache, shipped_and_dense, token_ids
from podkv.io import write_json

HERE = Path(__file__).parent
ONE_SHOT = 1 << 30
VARIANTS = {"tiles, steps of 240": (block_pass.TILE, 240), "untiled, steps of 240": (1 << 30, 240),
            "tiles, steps of 480": (block_pass.TILE, 480), "tiles, steps of 720": (block_pass.TILE, 720),
            "one step, two-pass": (block_pass.TILE, ONE_SHOT),
            "one step, two-pass, distant rows per chunk": (block_pass.TILE, ONE_SHOT),
            "one step, two-pass, own anchors too": (block_pass.TILE, ONE_SHOT),
            "one step, compiled": (block_pass.TILE, ONE_SHOT)}
CHUNKED_DISTANT = {"one step, two-pass, distant rows per chunk"}  # what prefill.py did before 2026-12-07 (s34)
OWN_TWO_PASS = {"one step, two-pass, own anchors too"}  # before stop 37: own-anchor heads took the two passes too
COMPILED = {"one step, compiled"}  # stop 38: the one-shot prefill in native/pod_prefill.c; the others in PyTorch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: prefill_variants_<context>.json here)")
    ap.add_argument("--variants", default=None, help="semicolon-separated subset of the variants (default: all)")
    args = ap.parse_args(argv)
    variants = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(";")]
    limit, fused = block_pass.STEP_LIMIT, prefill.fused
    pod, dense, tok, plan = shipped_and_dense(args.threads or 2)
    ids = token_ids(tok, pod.config.vocab_size, 1, args.context)

    @torch.no_grad()
    def run(name: str) -> float:
        model, method = (dense, "dense") if name == "dense" else (pod, "pod")
        if name != "dense":
            block_pass.TILE, pod.pod_runtime.prefill_chunk = VARIANTS[name]
            block_pass.STEP_LIMIT = 0 if VARIANTS[name][1] == ONE_SHOT else limit  # one step: not the block pass
            prefill.fused = (lambda q: False) if name in CHUNKED_DISTANT else fused  # distant rows: per chunk or all
            chunked.OWN_ANCHORS_CAUSAL = name not in OWN_TWO_PASS
            prefill.NATIVE = name in COMPILED
        cache = new_cache(model, method, plan)
        t0 = time.perf_counter()
        model(ids, past_key_values=cache, logits_to_keep=1)
        return time.perf_counter() - t0

    names = ["dense", *variants]
    for name in names:  # warm-up
        run(name)
    times = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            times[name].append(run(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in names:
        print(f"{name:24s} {med[name]:7.2f} s  PoD/dense {med[name] / med['dense']:.3f}")
    write_json(args.out or HERE / f"prefill_variants_{args.context}.json",
               {"model": "smollm2-pod", "plan": "the model's own (scores mode)", "context": args.context,
                "threads": torch.get_num_threads(),
                "seconds": times, "ratio": {n: med[n] / med["dense"] for n in variants}, "machine": machine_info()})


if __name__ == "__main__":
    main()
