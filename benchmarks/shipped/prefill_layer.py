"""One layer's one-shot prefill attention on smollm2-pod's shapes (3 KV heads, 9 query heads, D 64, ns 16,
nr 240), dense causal SDPA vs PoD's two-pass path (``attention/prefill.py``) with the heads that are their own
anchor in one causal call (``chunked.OWN_ANCHORS_CAUSAL``) or in the two passes too, and the band pass alone; and
the compiled one-shot kernel (``attention/native/pod_prefill.c``) on the same inputs, including plain causal attention
(every head its own anchor), which says how much of its gain is the kernel rather than PoD.

    python benchmarks/shipped/prefill_layer.py [--context 1024] [--reps 15] [--threads 1] [--out FILE]

Random inputs, one process, the variants taking turns; medians in ms. Where docs/bench.md's per-layer figures on
the own-anchor shortcut and on the band pass come from. Writes prefill_layer_<context>.json here (or ``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from podkv.attention import chunked, prefill
from podkv.attention.chunked import KeySources, pod_attention_chunked
from podkv.attention.prefill import _proximal
from podkv.bench.common import machine_info
from podkv.io import write_json

HERE = Path(__file__).parent
H, G, D, NS, NR, CHUNK = 3, 3, 64, 16, 240, 128


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, scale = args.context, D ** -0.5
    q, qa = torch.randn(1, H * G, T, D), torch.randn(1, H * G, T, D)
    k, ka, v = torch.randn(1, H, T, D), torch.randn(1, H, T, D), torch.randn(1, H, T, D)
    pad = torch.zeros(1, dtype=torch.long)

    def pod(own: tuple[int, ...], shortcut: bool, compiled: bool = False):
        sources = [(k, h) if h in own else (ka, h) for h in range(H)]
        anchor_q = q.clone()
        for h in range(H):
            if h not in own:
                anchor_q[:, h * G:(h + 1) * G] = qa[:, h * G:(h + 1) * G]
        src = KeySources(own_keys=k, own_start=0, values=v, anchor_keys=sources, own_anchor_heads=own)

        def run():
            chunked.OWN_ANCHORS_CAUSAL, prefill.NATIVE = shortcut, compiled
            pod_attention_chunked(q, 0, src, pad=pad, ns=NS, nr=NR, scale=scale, chunk=CHUNK, anchor_query=anchor_q)
        return run

    def band():
        prefill.NATIVE = False
        src = KeySources(own_keys=k, own_start=0, values=v, anchor_keys=[])
        qg = q.reshape(1, H, G, T, D)
        for c0 in range(0, T, CHUNK):
            _proximal(qg[:, :, :, c0:c0 + CHUNK], c0, min(T, c0 + CHUNK), src, NS, NR, scale)

    variants = {
        "dense (causal SDPA)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "pod, 3 anchor heads, one causal call": pod((0, 1, 2), True),
        "pod, 3 anchor heads, two passes": pod((0, 1, 2), False),
        "pod, 1 anchor head of 3, one causal call": pod((0,), True),
        "pod, 1 anchor head of 3, two passes": pod((0,), False),
        "pod, no anchor head": pod((), True),
        "band pass alone (128-row chunks, masked)": band,
        "compiled: causal (3 anchor heads)": pod((0, 1, 2), True, compiled=True),
        "compiled: pod, 1 anchor head of 3": pod((0,), True, compiled=True),
        "compiled: pod, no anchor head": pod((), True, compiled=True),
    }
    times = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    chunked.OWN_ANCHORS_CAUSAL, prefill.NATIVE = True, True
    rows = {name: {"median_ms": statistics.median(t) * 1e3} for name, t in times.items()}
    for name, row in rows.items():
        print(f"{name:44s} {row['median_ms']:7.2f} ms")
    command = f"python benchmarks/shipped/prefill_layer.py --context {T} --reps {args.reps} --threads {args.threads}"
    write_json(args.out or HERE / f"prefill_layer_{T}.json",
               {"model": "smollm2-pod's attention shapes (random inputs)", "plan": "per variant",
                "mode": "scores", "context": T, "threads": args.threads, "machine": machine_info(),
                "variants": rows, "command": command})


if __name__ == "__main__":
    main()
