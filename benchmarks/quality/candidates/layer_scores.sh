#!/usr/bin/env bash
# Issue 19 item 2's fallback: a layer-granular plan in mode scores (servable by the vLLM plugin), adapted with the
# shipped recipe of smollm2-pod, then scored on the prompts of benchmarks/quality (paired with dense's records) and
# served through vLLM's OpenAI server against the base weights.
#   benchmarks/quality/candidates/layer_scores.sh [STEP ...]   steps: plan train ppl ruler logprob serve
# RUN (default runs/pod-layer) holds the adapted model; records land in runs/layer-*/ and are copied here.
set -euo pipefail
cd "$(dirname "$0")/../../.."
RUN=${RUN:-runs/pod-layer}
HERE=benchmarks/quality/candidates
PLAN=$HERE/plan_layer_scores.json
EVAL="--model $RUN --methods pod --seed 0 --threads 1 --budget 0.8 --quiet --force"
step() {
  case $1 in
    plan)  # the similarity layer plan of benchmarks/quality/plans (31.2% saved at 4K), switched to mode scores
      python - "$PLAN" <<'PY'
import json, sys
p = json.load(open("benchmarks/quality/plans/similarity_layer.json"))
p["mode"] = "scores"
p["meta"]["note"] = "similarity_layer.json in mode scores: the layer-granular (servable) candidate of issue 19"
json.dump(p, open(sys.argv[1], "w"), indent=1)
PY
      ;;
    train)
      podkv train --plan "$PLAN" --seq-len 2048 --long-range 80 --long-range-kinds repeat,lookup,multilookup,chain \
        --max-steps 80 --lr 3e-3 --warmup-ratio 0.05 --objective distill --trainable all --lora-rank 16 \
        --eval-every 40 --eval-tokens 4096 --save-steps 20 --threads 1 --out "$RUN"
      cp "$RUN/train_result.json" "$HERE/layer_scores_train_result.json" ;;
    ppl)
      podkv eval compare $EVAL --tasks ppl --lengths 2048 --samples 16 --out runs/layer-ppl
      cp runs/layer-ppl/records.jsonl "$HERE/layer-scores-ppl.jsonl" ;;
    ruler)
      podkv eval compare $EVAL --tasks niah_single_prose,niah_single_noise,niah_multikey,niah_multivalue,vt \
        --lengths ${LENGTHS:-1024} --samples 50 --out runs/layer-ruler
      cp runs/layer-ruler/records.jsonl "$HERE/layer-scores-ruler.jsonl" ;;
    logprob)
      podkv eval compare $EVAL --tasks retrieval_logprob --lengths ${LENGTHS:-1024} --samples 50 --out runs/layer-logprob
      cp runs/layer-logprob/records.jsonl "$HERE/layer-scores-logprob.jsonl" ;;
    serve)  # in .venv-vllm (scripts/vllm_env.sh): the adapted checkpoint served with its plan vs the base weights dense
      podkv serve-check --model "$RUN" --plan "$RUN/pod_plan.json" --write-checkpoint runs/pod-layer-served --force
      VLLM_CPU_KVCACHE_SPACE=2 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 .venv-vllm/bin/python \
        benchmarks/serving/quality_server.py --model runs/pod-layer-served \
        --dense-model "$HOME/.cache/podkv/models/smollm2-135m-instruct" --plan "$RUN/pod_plan.json" --methods pod \
        --tasks niah_single_prose,vt --lengths 1k --samples 20 --nll-windows 8 --nll-length 2k \
        --parity 4 --out "$HERE/layer_scores_server.json" ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}
for s in ${*:-plan train ppl ruler logprob serve}; do step "$s"; done
