#!/usr/bin/env bash
# The OpenAI-client check through vLLM's OpenAI server (benchmarks/serving/openai_check.py): the default model served
# with uniform blocks of 3 layers (benchmarks/serving/plan_blocks3.json: vLLM's kernel layout) and dense, one
# after the other with the same VLLM_CPU_KVCACHE_SPACE. Writes openai_check.json and openai_check.md.
# Run in .venv-vllm (scripts/vllm_env.sh); ~15 min on 2 cores. README's row: python scripts/figures.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="${MODEL:-$HOME/.cache/podkv/models/smollm2-135m-instruct}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" TOKENIZERS_PARALLELISM=false
# podkv's own tokenizer ids, from podkv's venv (the server's /tokenize must equal them)
.venv/bin/python benchmarks/serving/openai_check.py --reference-ids-of "$MODEL" > benchmarks/serving/openai_reference_ids.json
.venv-vllm/bin/python benchmarks/serving/openai_check.py --model "$MODEL" --plan benchmarks/serving/plan_blocks3.json \
    --max-model-len 4096 --concurrency 16 --prompt-len 1024 --throughput-tokens 64 --passes 2 \
    --reference-ids benchmarks/serving/openai_reference_ids.json --out benchmarks/serving/openai_check.json
