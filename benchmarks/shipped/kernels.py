"""Where smollm2-pod's attention time goes on this CPU: the kernels of one layer, PoD's against dense's.

    python benchmarks/shipped/kernels.py [--context 4096]

Times the operations of one layer's attention at SmolLM2's shape (3 KV heads, 3 query heads each, head dim 64)
with 1 and 2 threads, and writes kernels.md and kernels.json here:

* decode (batch 1): the block pass's two products, over prefix views of growth buffers as the cache holds them — scores of the anchor's keys (q · K) and one member's values
  (p · V) — against dense's fused flash-attention call over the same keys and values;
* prefill (a 240-token step): the block pass's distant part for a block of three layers (scores once, softmax
  passes, three value products) with the score matrix whole or cut into the cache-sized tiles that
  ``block_pass.TILE`` sets, against three flash-attention calls (what dense and the general path do).

Why: the speed goals of issue 19 that stay missed are bounded by these kernels, not by the bytes PoD saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from podkv.attention.block_pass import TILE
from podkv.bench.common import machine_info
from podkv.io import atomic_write_text, write_json

HERE = Path(__file__).parent
FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
H, G, D, STEP = 3, 3, 64, 240


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def block_distant(q, k, values, rows: int) -> None:
    """The block pass's distant part: scores once, unnormalised softmax, one product per member; ``rows`` per tile."""
    for h in range(q.shape[1]) if rows < q.shape[2] else [None]:
        heads = slice(None) if h is None else slice(h, h + 1)
        for r in range(0, q.shape[2], rows):
            s = torch.matmul(q[:, heads, r:r + rows], k[:, heads].transpose(-1, -2))
            s.sub_(s.amax(-1, keepdim=True)).exp_()
            s.sum(-1, keepdim=True)
            for v in values:
                torch.matmul(s, v[:, heads])


def measure(T: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    # keys and values as the PodCache holds them: prefix views of buffers with room to grow (see pod_cache._append)
    k, v = (torch.randn(1, H, T + 128, D, generator=gen)[:, :, :T] for _ in range(2))
    members = [torch.randn(1, H, T + 128, D, generator=gen)[:, :, :T] for _ in range(3)]
    v_dense = v.contiguous()
    q1, s1 = torch.randn(1, H, G, D, generator=gen), torch.randn(1, H, G, T, generator=gen)
    qd = torch.randn(1, H * G, 1, D, generator=gen)
    qp = torch.randn(1, H, G * STEP, D, generator=gen)
    tile_rows = max(1, TILE // T)
    cases = {
        "decode: scores q·K (one anchor, 3 heads)": (lambda: torch.matmul(q1, k.transpose(-1, -2)), 200),
        "decode: values p·V (one member, 3 heads)": (lambda: torch.matmul(s1, v), 200),
        "decode: values p·V, the same values contiguous": (lambda: torch.matmul(s1, v_dense), 200),
        "decode: dense flash attention (9 query heads)": (lambda: FLASH(qd, k, v, 0.0, False, scale=0.125), 200),
        "prefill step: block distant part, 3 members, untiled": (lambda: block_distant(qp, k, members, qp.shape[2]), 10),
        f"prefill step: block distant part, 3 members, tiles of {tile_rows} rows x 1 head":
            (lambda: block_distant(qp, k, members, tile_rows), 10),
        "prefill step: 3 flash-attention calls (dense, or the general path)":
            (lambda: [FLASH(qp, k, m, 0.0, False, scale=0.125) for m in members], 10),
    }
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (fn, reps) in cases.items():
            out.setdefault(name, {})[f"{threads} threads"] = timed(fn, reps)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args(argv)
    res = measure(args.context)
    info = machine_info()
    lines = [f"# One layer's attention kernels at {args.context} tokens (SmolLM2 shape), ms, median", "",
             f"Command: `python benchmarks/shipped/kernels.py --context {args.context}`; {info['date']}, "
             f"load average {info.get('load_avg_1m')} (other jobs on the 2 cores shrink the 2-thread speed-ups)", "",
             "| kernel | 1 thread | 2 threads | 2-thread speed-up |", "|---|---|---|---|"]
    for name, t in res.items():
        lines.append(f"| {name} | {t['1 threads']:.3f} | {t['2 threads']:.3f} | {t['1 threads'] / t['2 threads']:.2f}× |")
    write_json(HERE / f"kernels_{args.context}.json", {"context": args.context, "ms": res, "machine": info})
    atomic_write_text(HERE / f"kernels_{args.context}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
