#!/usr/bin/env bash
# The main job on the embedded default: set up, then train the tiny model on the synthetic task on CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}
exec .venv/bin/async-grpo train configs/local.yaml "$@"
