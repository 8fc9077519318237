#!/usr/bin/env bash
# Set up the venv of the opt-in "peers" test group (tests/peers): sapo-ref with torch and the test
# tools, plus the real, pinned packages of other projects whose SAPO/GRPO/GSPO losses the group
# runs the conformance suite on. Idempotent. Usage: bash tools/setup_peers.sh [VENV_DIR]
# (default .venv-peers), then: VENV_DIR/bin/python -m pytest -m peers tests/peers
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv-peers}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
pip=("$py" -m pip install -q --constraint tools/peers-constraints.txt)
"$py" -m pip install -q --upgrade pip
# PyTorch first and pinned (the constraints file keeps it there for every later step).
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[torch,test]"
# The peers, pinned, without their declared dependencies (see tools/peers-requirements.txt).
"${pip[@]}" --no-deps "verl==0.9.1" "liger-kernel==0.8.5" "areal==1.0.4" "trinity-rft==0.6.0" \
  "trl==1.16.0"
# pip then reports the peers' other declared requirements as unmet ("dependency conflicts"):
# expected, nothing imported by the loss modules needs them.
"${pip[@]}" -r tools/peers-requirements.txt
# What AReaL's actor module (areal.trainer.ppo.actor, driven by tests/peers/test_shims.py) imports
# beyond its loss module: its logging and stats stack, without dependencies (with them, pip pulls
# gradio and more); about 100 MB.
"${pip[@]}" --no-deps swanlab==0.10.3 trackio==0.43.0 wandb==0.31.0 tensorboardX==2.6.5 \
  tabulate==0.10.0 pybase64==1.5.1 pyroaring==1.2.0 watchdog==7.1.0 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 pyecharts==2.1.0 simplejson==4.3.0 prettytable==3.18.0 \
  gradio_client==2.7.2 uvicorn==0.54.0 starlette==1.10.0 platformdirs==4.14.9 \
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
"$py" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
# Which peers import (a peer that does not is skipped by the tests with this same error).
PYTHONPATH=tests "$py" - <<'PY'
import importlib
for name in ("verl", "trl", "liger", "areal", "trinity"):
    try:
        importlib.import_module(f"peers.wrappers.{name}")
        print(f"  {name}: imports")
    except Exception as err:  # report and go on: the tests skip this peer with the reason
        print(f"  {name}: does not import: {type(err).__name__}: {err}")
PY
echo "peers venv ready in $venv (torch $("$py" -c 'import torch; print(torch.__version__)'))"
