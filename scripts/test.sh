#!/usr/bin/env bash
# The test suite: fast unit tests on tiny in-memory models plus integration tests on the default model.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
