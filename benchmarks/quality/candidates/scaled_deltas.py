"""smollm2-pod with its trained deltas scaled by ALPHA, written as a folder `podkv eval` loads (pod_plan in config).

    python benchmarks/quality/candidates/scaled_deltas.py ALPHA OUT

Why: a probe of how vt moves along the line from the base weights (ALPHA 0, the plan training-free) through the
shipped adaptation (1) and past it, without training: is vt's gap a matter of too little adaptation, or too much?
"""

from __future__ import annotations

import argparse

from podkv.models.adapted import ASSET_DIR, DELTA_FILE, adapted_plan
from podkv.models.anchor_init import init_from_anchor
from podkv.models.deltas import apply_deltas
from podkv.models.enable import enable_pod
from podkv.models.loading import load_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("alpha", type=float)
    ap.add_argument("out")
    args = ap.parse_args(argv)
    plan = adapted_plan(ASSET_DIR)
    model, tok = load_model(None, progress=False)
    init_from_anchor(model, plan, plan.meta.get("init", "none"))
    apply_deltas(model, ASSET_DIR / DELTA_FILE, scale=args.alpha)
    enable_pod(model, plan)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    plan.save(f"{args.out}/pod_plan.json")


if __name__ == "__main__":
    main()
