#!/usr/bin/env bash
# The test command: set up (scripts/setup.sh), then run the whole suite on CPU. Extra args go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# One cache for DeepSpeed's JIT-compiled ops, shared by every test process (the first build takes ~1 min).
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$root/.torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -rs "$@" tests
