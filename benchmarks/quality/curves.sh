#!/usr/bin/env bash
# Adaptation curves per objective and initialisation: short runs of the same budget on the shipped
# retrieval-aware plan (30.2% KV saved at 4K), in scores and keys mode.
#   benchmarks/quality/curves.sh [RUN ...]     runs: scores-distill scores-local keys-distill keys-distill-anchor-q keys-local
# Each run: T=1024, 16 steps (16K tokens), LoRA 16 on all linear layers, lr 3e-3, 60 long-range documents,
# held-out NLL (heldout split, 2048 tokens) every 4 steps, one thread. Its train_result.json is copied to
# benchmarks/quality/runs/curve-<run>.json; then curves.py redraws adaptation.{png,md,json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/curves}
mkdir -p "$OUT"
KEYS=src/podkv/assets/smollm2_plan_retrieval_30.json
SCORES=$OUT/plan_retrieval_scores.json
python - "$KEYS" "$SCORES" <<'PY'
import sys
from podkv.plan import SharingPlan
plan = SharingPlan.load(sys.argv[1])
plan.mode = "scores"
plan.save(sys.argv[2])
PY
COMMON="--seq-len 1024 --max-steps 16 --lr 3e-3 --warmup-ratio 0.05 --trainable all --lora-rank 16 --long-range 60
        --eval-every 4 --eval-tokens 2048 --save-steps 100 --threads 1"
args_of() {
  case $1 in
    scores-distill) echo "--plan $SCORES --objective distill";;
    scores-local) echo "--plan $SCORES --objective local";;
    keys-distill) echo "--plan $KEYS --objective distill";;
    keys-distill-anchor-q) echo "--plan $KEYS --objective distill --init anchor-q";;
    keys-local) echo "--plan $KEYS --objective local";;
    *) echo "unknown run $1" >&2; exit 2;;
  esac
}
runs=${*:-scores-distill scores-local keys-distill keys-distill-anchor-q keys-local}
for r in $runs; do
  rm -rf "$OUT/$r" "$OUT/$r.tmp-train"
  podkv train $(args_of "$r") $COMMON --out "$OUT/$r"
  cp "$OUT/$r/train_result.json" "benchmarks/quality/runs/curve-$r.json"
done
python benchmarks/quality/curves.py
