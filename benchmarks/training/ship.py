"""Copy the small artifact of a `podkv train` run into src/podkv/assets/smollm2-pod/ with its recipe.

    python benchmarks/training/ship.py RUN_DIR "exact podkv train command"

Copies pod_deltas.safetensors and pod_plan.json, writes recipe.json (command, tokens, wall time,
held-out numbers, machine and versions: podkv.provenance) and results/run_<name>.json for the report.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import podkv
from podkv.io import write_json
from podkv.models.adapted import ASSET_DIR, DELTA_FILE, PLAN_FILE, RECIPE_FILE
from podkv import texts
from podkv.provenance import machine, versions


def main(run_dir: str, command: str) -> None:
    run = Path(run_dir)
    result = json.loads((run / "train_result.json").read_text())
    ASSET_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / DELTA_FILE, ASSET_DIR / DELTA_FILE)
    plan = podkv.SharingPlan.load(run / "pod_plan.json")
    plan.save(ASSET_DIR / PLAN_FILE)
    first, last = result["heldout"][0], result["heldout"][-1]
    write_json(ASSET_DIR / RECIPE_FILE, {
        "base_model": "SmolLM2-135M-Instruct (podkv embedded default)", "command": command,
        "podkv_version": podkv.__version__, "tokens": result["tokens"], "steps": result["steps"],
        "wall_s": result["wall_s"], "trainable_params": result.get("trainable_params"),
        "kv_saving_4096": plan.kv_saving(4096), "plan_summary": plan.summary(4096),
        "heldout_tokens": result["config"]["eval_tokens"],
        "heldout_text": (texts.describe("heldout") if not result["config"].get("data")
                         else "the tail of the --data stream"),
        "heldout_ppl": {"dense": math.exp(result["dense_heldout_nll"]), "pod_training_free": math.exp(first["nll"]),
                        "pod_adapted": math.exp(last["nll"])},
        # the training run's machine when it recorded one, else this process's (ship on the machine that trained)
        "hardware": {**(result.get("machine") or machine()), "dtype": "float32"},  # podkv train loads fp32
        "versions": result.get("versions") or versions(),
    })
    print(f"shipped {run} -> {ASSET_DIR}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
