#!/usr/bin/env bash
# Set up the venv where ms-swift's GRPO trainer imports on CPU, for the ms-swift part of the opt-in
# peers group (sapo_torch.integrations.swift; tests/peers/test_shims.py -k "swift or torchforge").
# Separate from tools/setup_peers.sh: ms-swift 4.6.0 needs trl<1.0. Idempotent.
# Usage: bash tools/setup_swift.sh [VENV_DIR] (default .venv-swift)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-swift}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --constraint tools/swift-constraints.txt)
"$py" -m pip install -q --upgrade pip
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[torch,test]"
# ms-swift declares ~40 requirements (GPU, UI, hub tools): installed without them; what its GRPO
# trainer imports is installed next, with their own dependencies, under the constraints.
"${pip[@]}" --no-deps "ms-swift==4.6.0"
"${pip[@]}" transformers trl accelerate datasets peft pillow modelscope json_repair einops dacite msgspec
"$py" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
"$py" -c "import swift.rlhf_trainers.grpo_trainer" && echo "ms-swift GRPO trainer imports"
