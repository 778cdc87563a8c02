#!/usr/bin/env bash
# Set up .venv for this checkout: the pinned CPU torch only where no torch is importable (a GPU user's own
# torch is kept: the venv sees the system's packages), then the project and its test extras with torch held
# at the installed version. Idempotent: a second run installs nothing new.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv --system-site-packages .venv
vpy=.venv/bin/python
if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  "$vpy" -m pip install -q --disable-pip-version-check torch==2.13.0
fi
stamp=.venv/.async-grpo-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  cons=$(mktemp)
  "$vpy" -c "import torch; print('torch==' + torch.__version__)" > "$cons"
  "$vpy" -m pip install -q --disable-pip-version-check -c "$cons" -e ".[test,plots,triton]" 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  rm -f "$cons"
  touch "$stamp"
fi
