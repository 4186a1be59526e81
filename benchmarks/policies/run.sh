#!/usr/bin/env bash
# Issue 21's Pareto sweep: KV saved at 4K against held-out NLL, for podkv's policies (window-only pairs alone,
# the shipped smollm2-pod, smollm2-pod + window-only pairs) and the peers (8-bit KV, StreamingLLM, SnapKV,
# PyramidKV) on the same held-out windows. Training-free (smollm2-pod's own plan was adapted to), except the
# step train-w30, which adapts smollm2-pod to pod+window-30 (runs ppl-/ruler-pod+window-30-adapted score it).
#   benchmarks/policies/run.sh [STEP ...]     steps: analysis plans train-w30 ppl-<name> ruler-<plan> gather report
#                                              (default: analysis, plans, every ppl run, ruler-window-48,
#                                              ruler-pod+window-30, report)
# Held-out NLL: 8 windows of 4096 held-out tokens (stdlib docstrings), the second half scored given the first.
# The head scores (distant attention mass + retrieval score per (layer, KV head)) come from `podkv analyze` on
# plan-split lookups (help topics): no evaluation prompt is seen by a plan.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/policies}
HERE=benchmarks/policies
SHIPPED=src/podkv/assets/smollm2-pod/pod_plan.json
PPL="--tasks ppl --lengths 4096 --samples 8 --seed 0 --threads 1 --quiet"
WINDOWS=${WINDOWS:-23 45 48 60}          # window-only pairs on the original weights (about 1.04% of KV at 4K each)
ADDED=${ADDED:-10 20 30}              # window-only pairs added to smollm2-pod's plan (block ends)
W30_MODEL=${W30_MODEL:-$OUT/pod-w30}   # smollm2-pod adapted to pod+window-30 (step train-w30)
BUDGETS=${BUDGETS:-0.5 0.3}           # eviction peers' KV budgets
per_pair=$(python -c "print((4096 - 256) / (2 * 30 * 3 * 4096))")  # one shared pair's saving at 4K, SmolLM2

analysis() {  # head scores + similarity of the original model (12 min on the loaded 2 cores)
  podkv analyze --kind retrieval --target-saving 0.3 --retrieval-samples 16 --proximal-samples 0 \
    --out "$OUT/analysis" --no-progress
  cp "$OUT/analysis/analysis.json" "$HERE/analysis.json"
}
plans() {
  mkdir -p "$HERE/plans"
  python -c "from podkv.plan import SharingPlan; SharingPlan.identity(30, 3, ns=16, nr=240).save('$HERE/plans/identity.json')"
  for n in $WINDOWS; do  # windows only: the target is exactly n window pairs' saving, so no pair is shared
    podkv plan --analysis "$HERE/analysis.json" --kind similarity --window-pairs "$n" --force \
      --target-saving "$(python -c "print(2 * $n * $per_pair - 1e-6)")" --out "$HERE/plans/window-$n.json"
  done
  for n in $ADDED; do
    podkv plan --analysis "$HERE/analysis.json" --base "$SHIPPED" --window-pairs "$n" --force \
      --out "$HERE/plans/pod+window-$n.json"
  done
}
run() {  # run NAME: one `podkv eval compare` of held-out NLL
  local name=$1 args
  case $name in
    dense|kv8) args="--methods $name";;
    kv4|kivi[48]|kivi[248]r) args="--methods pod+$name --plan $HERE/plans/identity.json";;  # every pair its own anchor: dense attention
    control) args="--model smollm2-pod --methods dense";;
    smollm2-pod) args="--model smollm2-pod --methods pod";;
    smollm2-pod+kv[48]|smollm2-pod+kivi[48]*) args="--model smollm2-pod --methods pod+${name##*+}";;
    pod+window-*+kv[48]|pod+window-*+kivi[48]*) args="--model smollm2-pod --methods pod+${name##*+} --plan $HERE/plans/${name%+*}.json";;
    window-*+kv[48]|window-*+kivi[48]*) args="--methods pod+${name##*+} --plan $HERE/plans/${name%+*}.json";;
    window-*) args="--methods pod --plan $HERE/plans/$name.json";;
    pod+window-30-adapted) args="--model $W30_MODEL --methods pod";;  # the model's own plan: pod+window-30
    pod+window-*) args="--model smollm2-pod --methods pod --plan $HERE/plans/$name.json";;
    streaming-*|snapkv-*|pyramidkv-*) args="--methods ${name%-*} --budget ${name##*-}";;
    *) echo "unknown run $name" >&2; exit 2;;
  esac
  podkv eval compare $args $PPL --out "$OUT/ppl/$name" --force
  mkdir -p "$HERE/ppl"; cp "$OUT/ppl/$name/records.jsonl" "$HERE/ppl/$name.jsonl"
}
ruler() {  # ruler NAME: the five RULER-style tasks on a plan of plans/, 50 prompts per length, seed 0: the prompts of
  # benchmarks/quality, so report.py pairs them with its dense records (no dense rerun)
  local name=$1 lengths=${RULER_LENGTHS:-1024} model="" method=pod plan="--plan $HERE/plans/$1.json"
  case $name in
    *-adapted) model="--model $W30_MODEL" plan="";;  # its own plan
    pod+window-*|smollm2-pod*) model="--model smollm2-pod";;  # runs on smollm2-pod's weights
  esac
  case $name in  # storage suffix: the quantized method; kv4/kivi4 alone are dense attention (the identity plan)
    kv4|kivi[48]|kivi[248]r) method=pod+$name plan="--plan $HERE/plans/identity.json";;  # (kv8 is the HQQ peer: not run here)
    smollm2-pod+*) method=pod+${name##*+} plan="";;
    *+kv[48]|*+kivi[48]*) method=pod+${name##*+} plan="--plan $HERE/plans/${name%+*}.json";;
  esac
  podkv eval compare $model --methods $method $plan --lengths "$lengths" --samples 50 --seed 0 \
    --tasks niah_single_prose,niah_single_noise,niah_multikey,niah_multivalue,vt --threads 1 --budget 0.76 --quiet \
    --out "$OUT/ruler/$name-${lengths//,/_}" --force
  mkdir -p "$HERE/ruler"; cat "$OUT/ruler/$name"-[0-9]*/records.jsonl > "$HERE/ruler/$name.jsonl"
}
train_w30() {  # smollm2-pod adapted to pod+window-30 (50.0% saved at 4K): 40 steps of 2048 tokens, one core
  podkv train --model smollm2-pod --plan "$HERE/plans/pod+window-30.json" --seq-len 2048 --long-range 60 \
    --long-range-kinds lookup,multilookup,chain,track,repeat --max-steps 40 --lr 1e-3 --warmup-ratio 0.05 \
    --objective distill --trainable all --lora-rank 16 --eval-every 20 --eval-tokens 4096 --save-steps 20 \
    --threads 1 --seed 3 --out "$W30_MODEL"
  cp "$W30_MODEL/train_result.json" "$HERE/w30_train_result.json"
}
gather() {  # records of runs made elsewhere (other worktrees, same OUT) -> ppl/ here
  mkdir -p "$HERE/ppl"
  for d in "$OUT"/ppl/*/; do cp "$d/records.jsonl" "$HERE/ppl/$(basename "$d").jsonl"; done
  for n in $(ls "$OUT/ruler" 2>/dev/null | sed 's/-[0-9_]*$//' | sort -u); do
    mkdir -p "$HERE/ruler"; cat "$OUT/ruler/$n"-[0-9]*/records.jsonl > "$HERE/ruler/$n.jsonl"
  done
}
all_runs="dense control kv8 smollm2-pod smollm2-pod+kv8"
for n in $WINDOWS; do all_runs="$all_runs window-$n"; done
all_runs="$all_runs window-48+kv8 kv4 smollm2-pod+kv4"
for n in $ADDED; do all_runs="$all_runs pod+window-$n pod+window-$n+kv8"; done
all_runs="$all_runs pod+window-30+kv4 kivi4 smollm2-pod+kivi4 pod+window-30+kivi4"
for b in $BUDGETS; do all_runs="$all_runs streaming-$b snapkv-$b pyramidkv-$b"; done
steps=${*:-analysis plans $(for r in $all_runs; do echo ppl-$r; done) ruler-window-48 ruler-pod+window-30 report}
for s in $steps; do
  case $s in
    analysis|plans|gather) $s;;
    train-w30) train_w30;;
    ppl-*) run "${s#ppl-}";;
    ruler-*) ruler "${s#ruler-}";;
    report) python "$HERE/report.py";;
    *) echo "unknown step $s" >&2; exit 2;;
  esac
done
