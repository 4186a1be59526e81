"""smollm2-pod batch-1 decode, dense vs PoD's distant-pass variants, in one run, alternating.

    python benchmarks/shipped/decode_split.py [--context 4096] [--steps 40] [--threads 2] [--out FILE]

Where the split-key figures in docs/bench.md come from (``block_pass.SPLIT``: each head's distant keys of a
batch-1 decode step cut into chunks, one batched product that uses both cores). Prefills one held-out prompt
per variant, then times ``--steps`` decode steps of each in turn (``--threads``, shipped model and plan, scores
mode). Prints medians and PoD ÷ dense; writes decode_split_<context>.json here (or ``--out``).
Variants: the compiled kernels (``podkv.attention.native``, where they build) for the distant pass and for the
proximal pass and merge, the compiled distant pass alone, the PyTorch split-key path, and unsplit products.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from podkv.attention import block_pass, native
from podkv.bench.common import machine_info, new_cache, shipped_and_dense, token_ids
from podkv.io import write_json

HERE = Path(__file__).parent
# name -> (block_pass.SPLIT_MIN_KEYS, block_pass.NATIVE, block_pass.NATIVE_PROXIMAL); None: dense
VARIANTS = {"dense": None, "pod, native kernels": (block_pass.SPLIT_MIN_KEYS, True, True),
            "pod, native distant pass": (block_pass.SPLIT_MIN_KEYS, True, False),
            "pod, split keys": (block_pass.SPLIT_MIN_KEYS, False, False), "pod, unsplit": (1 << 40, False, False)}


@torch.no_grad()
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results JSON (default: decode_split_<context>.json here)")
    args = ap.parse_args(argv)
    variants = {k: v for k, v in VARIANTS.items() if not (v and v[1]) or native.enabled()}
    pod, dense, tok, plan = shipped_and_dense(args.threads)
    ids = token_ids(tok, pod.config.vocab_size, 1, args.context)
    state = {}
    for name, setting in variants.items():
        model = dense if setting is None else pod
        cache = new_cache(model, "dense" if setting is None else "pod", plan)
        state[name] = [model, cache, model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)]
    times = {name: [] for name in variants}
    for step in range(args.steps + 2):  # the first two steps of each are warm-up
        for name, setting in variants.items():
            if setting is not None:
                block_pass.SPLIT_MIN_KEYS, block_pass.NATIVE, block_pass.NATIVE_PROXIMAL = setting
            model, cache, nxt = state[name]
            start = time.perf_counter()
            state[name][2] = model(nxt, past_key_values=cache).logits[:, -1:].argmax(-1)
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    block_pass.SPLIT_MIN_KEYS, block_pass.NATIVE, block_pass.NATIVE_PROXIMAL = VARIANTS["pod, native kernels"]
    dense_ms = statistics.median(times["dense"]) * 1e3
    rows = {name: {"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3,
                   "ratio_to_dense": statistics.median(t) * 1e3 / dense_ms} for name, t in times.items()}
    for name, row in rows.items():
        print(f"{name:18s} median {row['median_ms']:.1f} ms/step  PoD/dense {row['ratio_to_dense']:.3f}")
    command = f"python benchmarks/shipped/decode_split.py --context {args.context} --steps {args.steps}"
    if args.threads != 2:
        command += f" --threads {args.threads}"
    if args.out:
        command += f" --out {args.out}"
    write_json(args.out or HERE / f"decode_split_{args.context}.json",
               {"model": "smollm2-pod", "plan": "the model's own (scores mode)", "context": args.context, "batch": 1,
                "steps": args.steps, "split": block_pass.SPLIT, "native_chunk": native.CHUNK, "threads": args.threads,
                "machine": machine_info(), "variants": rows, "seconds": times, "command": command})


if __name__ == "__main__":
    main()
