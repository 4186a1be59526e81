#!/usr/bin/env bash
# vLLM serving tests (tests/test_serving_vllm.py) in .venv-vllm; the podkv reference side runs in .venv.
# CPU only: VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache; engines run eager, in-process.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"           # podkv's venv (.venv), used for the reference outputs
source "$ROOT/scripts/vllm_env.sh"      # .venv-vllm
export PODKV_REF_PYTHON="${PODKV_REF_PYTHON:-$ROOT/.venv/bin/python}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec "$VVENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_serving_vllm.py "$@"
