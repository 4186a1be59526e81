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
# --fast: the subset CI runs (about 2.5 min on 2 cores): plugin registration, paged-KV reads, greedy + log-prob
# parity of every plan kind on the kernel layout, a scores-mode plan with 8-token prefill chunks (its block
# passes, gather layout), the KV specs, and the kernel-layout decode oracle.
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -k "plugin_entry or paged_kv or greedy_and_logprob_parity or group_tags or proximal_spec or kernel_layout_decode or (scores_plan_parity and scores-8)" "$@"
fi
exec "$VVENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_serving_vllm.py "$@"
