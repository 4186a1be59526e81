#!/usr/bin/env bash
# Generation throughput through vLLM (CPU): PoD (uniform blocks of 3 layers, ns=16, nr=240) vs dense, 16 requests
# in flight, the same VLLM_CPU_KVCACHE_SPACE; dense and PoD engines alternate (2 rounds, median).
#   throughput_p256.json   256-token prompts (every prompt key is proximal; distant keys appear while decoding)
#   throughput_p1024.json  1024-token prompts, on vLLM's kernel (podkv.serving.kernel_layout)
#   throughput_p1024_gather.json  with WITH_GATHER=1: the same on the gather path (pod_kv_kernel=False), for comparison
# Run in .venv-vllm (scripts/vllm_env.sh); ~20 min on 2 cores. README's row: python scripts/figures.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv-vllm/bin/python}"
MODEL="${MODEL:-$HOME/.cache/podkv/models/smollm2-135m-instruct}"
OUT="$ROOT/benchmarks/serving"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" TOKENIZERS_PARALLELISM=false
common=(--model "$MODEL" --block-layers 3 --requests 16 --max-tokens 64 --passes 1 --rounds 2)
"$PY" "$ROOT/benchmarks/serving/throughput.py" "${common[@]}" --prompt-len 1024 --out "$OUT/throughput_p1024.json"
"$PY" "$ROOT/benchmarks/serving/throughput.py" "${common[@]}" --prompt-len 256 --out "$OUT/throughput_p256.json"
if [ -n "${WITH_GATHER:-}" ]; then
  "$PY" "$ROOT/benchmarks/serving/throughput.py" "${common[@]}" --prompt-len 1024 --gather-path --out "$OUT/throughput_p1024_gather.json"
fi
