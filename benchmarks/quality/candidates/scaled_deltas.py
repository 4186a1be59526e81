"""smollm2-pod with its trained deltas scaled by ALPHA, written as a folder `podkv eval` loads (pod_plan in config).

    python benchmarks/quality/candidates/scaled_deltas.py ALPHA OUT [--modules q_proj,k_proj] [--force]

Why: a probe of how vt moves along the line from the base weights (ALPHA 0, the plan training-free) through the
shipped adaptation (1) and past it, without training: is vt's gap a matter of too little adaptation, or too much?
``--modules``: only the deltas of those modules (name endings), the others stay at the base weights: where in the
model a learned behaviour lives.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from podkv.errors import PodError
from podkv.models.adapted import ASSET_DIR, adapt_weights, adapted_plan
from podkv.models.enable import enable_pod
from podkv.models.loading import load_model
from podkv.outputs import staged_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("alpha", type=float)
    ap.add_argument("out", type=Path)
    ap.add_argument("--modules", default=None, help="comma-separated module-name endings whose deltas to apply "
                                                    "(default: all), e.g. q_proj,k_proj")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT (default: refuse it)")
    args = ap.parse_args(argv)
    with staged_dir(args.out, args.force, flag="OUT") as stage:  # OUT appears whole or not at all
        plan = adapted_plan(ASSET_DIR)
        model, tok = load_model(None, progress=False)
        modules = tuple(m.strip() for m in args.modules.split(",") if m.strip()) if args.modules else None
        adapt_weights(model, plan, ASSET_DIR, scale=args.alpha, modules=modules)
        enable_pod(model, plan)
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        plan.save(stage / "pod_plan.json")


if __name__ == "__main__":
    try:
        main()
    except PodError as e:  # bad input: one line, not a traceback
        raise SystemExit(f"scaled_deltas.py: {e}")
