#!/usr/bin/env bash
# Create or reuse a venv and install podkv into it. Sourced by demo.sh and test.sh.
#
# podkv supports transformers 5.2 to 5.25 (pyproject.toml); CI tests both ends, each in its own venv:
#   PODKV_TRANSFORMERS=oldest (default)  .venv                         transformers 5.2.0 + kvpress (the eval
#                                                                      baselines; kvpress 0.5.5 needs transformers<5.3)
#   PODKV_TRANSFORMERS=newest            .venv-transformers-5.25.0     transformers 5.25.0, no kvpress
#   PODKV_TRANSFORMERS=5.19.0            .venv-transformers-5.19.0     any other release, same rule for kvpress
# PODKV_VENV overrides the venv's path.
set -euo pipefail
ROOT="$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"  # physical: a linked copy (scripts/readme_commands.py) installs into the real one
TRANSFORMERS_OLDEST=5.2.0
TRANSFORMERS_NEWEST=5.25.0
TRANSFORMERS="${PODKV_TRANSFORMERS:-oldest}"
case "$TRANSFORMERS" in
  oldest) TRANSFORMERS=$TRANSFORMERS_OLDEST ;;
  newest) TRANSFORMERS=$TRANSFORMERS_NEWEST ;;
esac
if [ "$TRANSFORMERS" = "$TRANSFORMERS_OLDEST" ]; then
  VENV="${PODKV_VENV:-$ROOT/.venv}"
else
  VENV="${PODKV_VENV:-$ROOT/.venv-transformers-$TRANSFORMERS}"
fi
# kvpress 0.5.5 requires transformers<5.3: the baselines live only where that holds (their tests skip elsewhere).
EXTRAS="test,train,data,quant"
case "$TRANSFORMERS" in 5.0.*|5.1.*|5.2.*) EXTRAS="$EXTRAS,peers" ;; esac
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Reinstall only when the project's dependency list or this script's choices changed (the stamp holds their hash).
STAMP="$VENV/.podkv-install-stamp"
WANT="$( (cat "$ROOT/pyproject.toml" "$ROOT/scripts/env.sh"; echo "$TRANSFORMERS $EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "podkv: installing into $VENV (transformers $TRANSFORMERS, extras $EXTRAS)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # The CPU build of torch first (a plain 'torch' requirement would pull a multi-GB CUDA build).
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]" "transformers==$TRANSFORMERS"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
