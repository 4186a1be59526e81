#!/usr/bin/env bash
# The quality benchmark of the shipped smollm2-pod: RULER needles (50 prompts per length), the teacher-forced
# answer log-prob (20 per length, optional steps) and held-out perplexity, for dense, smollm2-pod, StreamingLLM and SnapKV.
#   benchmarks/quality/run.sh [STEP ...]     steps: needles-<method> ruler-<method> logprob-<method> ppl-<method> merge
# ruler-<method> runs the other four RULER-style tasks (noise haystack, multi-key, multi-value, variable tracking);
# LENGTHS=1024 benchmarks/quality/run.sh ruler-dense runs one length (prompts depend only on seed, task, length
# and sample index, so per-length runs merge into the joint run's records).
# Every method sees the same prompts (same seed and settings). The eviction baselines run on the original
# weights at --budget 0.76 = the KV fraction smollm2-pod holds at 1K (its largest); at 2K/4K PoD holds
# less (0.72 / 0.70), so the baselines get at least PoD's memory everywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/quality}
LENGTHS=${LENGTHS:-1024,2048,4096}
NEEDLES="--tasks niah_single_prose --lengths $LENGTHS --samples 50 --seed 0 --threads 1 --budget 0.76 --quiet"
RULER="--tasks niah_single_noise,niah_multikey,niah_multivalue,vt --lengths $LENGTHS --samples 50 --seed 0 --threads 1 --budget 0.76 --quiet"
LOGPROB="--tasks retrieval_logprob --lengths $LENGTHS --samples 50 --seed 0 --threads 1 --budget 0.76 --quiet"
PPL="--tasks ppl --lengths 2048 --samples 16 --seed 0 --threads 1 --budget 0.76 --quiet"
model_of() {  # smollm2-pod = the adapted model with PoD; control = its weights with dense attention
  case $1 in smollm2-pod) echo "--model smollm2-pod --methods pod";; control) echo "--model smollm2-pod --methods dense";;
    *) echo "--methods $1";; esac
}
run() {  # run STEP: what-method
  local what=${1%%-*} method=${1#*-} args
  case $what in needles) args=$NEEDLES;; ruler) args=$RULER;; logprob) args=$LOGPROB;; ppl) args=$PPL;; *) echo "unknown step $1" >&2; exit 2;; esac
  podkv eval compare $(model_of "$method") $args --out "$OUT/$what/$method-${LENGTHS//,/_}"
}
merge() {  # each finished run's records replace the committed records of the (task, length) pairs it covers
  for what in needles ruler logprob ppl; do
    ls "$OUT/$what"/*/records.jsonl > /dev/null 2>&1 || continue  # no finished run (unfinished ones are .partial)
    mkdir -p "benchmarks/quality/$what"
    for d in "$OUT/$what"/*/; do
      name=$(basename "$d"); name=${name%%-[0-9]*}; [ "$name" = smollm2-pod ] && name=pod
      python benchmarks/quality/merge_records.py "$d/records.jsonl" "benchmarks/quality/$what/$name.jsonl"
    done
  done
  python benchmarks/quality/report.py
}
steps=${*:-needles-dense needles-smollm2-pod needles-streaming needles-snapkv ppl-dense ppl-smollm2-pod ppl-control merge}
for s in $steps; do if [ "$s" = merge ]; then merge; else run "$s"; fi; done
