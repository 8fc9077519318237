#!/usr/bin/env bash
# Set up a virtual environment with sapo-ref, every backend it can test, and the test and docs
# tools. Idempotent; needs only Python >= 3.11 and pip. Usage: bash tools/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
# PyTorch first and pinned: an open range resolves to a several-GB CUDA build on Linux, while
# torch==2.13.0 has a CPU wheel. The project's own range (torch>=2.4) is then already satisfied.
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0"
fi
"$py" -m pip install -q -e ".[all,test,docs]"
echo "sapo-ref set up in $venv"
