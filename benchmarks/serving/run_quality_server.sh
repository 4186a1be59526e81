#!/usr/bin/env bash
# Quality through vLLM's OpenAI server (benchmarks/serving/quality_server.py): the default model served dense, then
# with the shipped layer plan (src/podkv/assets/smollm2_plan_layer_35.json, not adapted) in mode keys (`pod`) and in
# mode scores (`pod-scores`), on the same RULER-style prompts and held-out windows; paired differences to dense;
# greedy parity with podkv's own decoding (.venv). Writes quality_server.{json,md,png} and the records next to it.
# Run in .venv-vllm (scripts/vllm_env.sh); the size committed here took about 15 min on 2 busy cores.
# FULL=1: the issue's size (>= 50 prompts per length at 1K/2K/4K, all five tasks) -- not run here (hours on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-$HOME/.cache/podkv/models/smollm2-135m-instruct}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
if [ "${FULL:-0}" = 1 ]; then
  SIZE=(--tasks niah_single_noise,niah_single_prose,niah_multikey,niah_multivalue,vt --lengths 1k,2k,4k --samples 50
        --nll-windows 8 --nll-length 2k --parity 8 --max-model-len 8192 --out benchmarks/serving/quality_server_full.json)
else
  SIZE=(--tasks niah_single_prose,niah_multikey,vt --lengths 1k --samples 20 --nll-windows 8 --nll-length 2k --parity 4
        --out benchmarks/serving/quality_server.json)
fi
.venv-vllm/bin/python benchmarks/serving/quality_server.py --model "$MODEL" \
    --plan src/podkv/assets/smollm2_plan_layer_35.json --methods pod,pod-scores "${SIZE[@]}"
