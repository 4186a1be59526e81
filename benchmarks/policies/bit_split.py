"""Keys and values at different bit widths (2 and 4), KIVI's layout with the proximal tokens exact: held-out NLL on
the first windows of the sweep's held-out split, against dense's records of the same windows.

    python benchmarks/policies/bit_split.py [--windows 2]

Why: 2 bits for both (``kivi2r``) cost SmolLM2-135M +19% NLL; this checks whether either tensor alone tolerates
2 bits. PodCache holds one width for both, so the script sets the width per store class (keys are
``QuantChannels``, values ``QuantTokens`` in this layout). Writes bit_split.json here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from podkv.cache import quant
from podkv.eval.config import EvalConfig
from podkv.eval.methods import make_method
from podkv.eval.runner import load
from podkv.eval.tasks import make_task
from podkv.io import write_json
from podkv.plan import SharingPlan

HERE = Path(__file__).parent


def with_widths(key_bits: int, value_bits: int):
    """Patch the two store classes to ``key_bits`` / ``value_bits``; returns a function that undoes it."""
    saved = {}
    for cls, bits in ((quant.QuantChannels, key_bits), (quant.QuantTokens, value_bits)):
        saved[cls] = init = cls.__init__

        def patched(self, like, group, _ignored=8, keep_first=0, _init=init, _bits=bits):
            _init(self, like, group, _bits, keep_first)
        cls.__init__ = patched
    return lambda: [setattr(cls, "__init__", init) for cls, init in saved.items()]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = EvalConfig(methods=("pod+kivi4r",), tasks=("ppl",), lengths=(4096,), samples=8, seed=0)
    model, tok, _, _ = load(cfg)
    identity = SharingPlan.load(HERE / "plans" / "identity.json")  # every pair its own anchor: dense attention
    task = make_task("ppl")
    cases = task.cases(tok, cfg, identity)[:args.windows]
    dense = {r["sample"]: r["nll"] for r in map(json.loads, open(HERE / "ppl" / "dense.jsonl"))}
    rows = []
    for key_bits, value_bits in ((4, 2), (2, 4)):
        undo = with_widths(key_bits, value_bits)
        method = make_method("pod+kivi4r", plan=identity)
        with method.attached(model):
            for case in cases:
                r = task.run_case(model, tok, method, case, cfg)
                rows.append({"key_bits": key_bits, "value_bits": value_bits, "sample": r["sample"], "nll": r["nll"],
                             "dense_nll": dense[r["sample"]], "gap": r["nll"] / dense[r["sample"]] - 1,
                             "kv_fraction": r["kv_fraction"]})
                print(rows[-1], flush=True)
        undo()
    write_json(HERE / "bit_split.json", {"model": "smollm2-135m-instruct (original weights)",
                                         "plan": "plans/identity.json (dense attention)", "length": 4096,
                                         "layout": "KIVI: keys per channel, values per token, proximal tokens exact",
                                         "rows": rows})


if __name__ == "__main__":
    main()
