#!/usr/bin/env bash
# Main job on the embedded default model (downloads and converts it on first run).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if podkv --help | grep -q " demo "; then
  exec podkv demo "$@"
fi
exec podkv generate "$@"
