#!/usr/bin/env bash
# Build and certify the two worked ports of examples/ (what CI runs):
#   1. examples/c_port: C99, through the file protocol (export, the port's program, judge);
#   2. examples/autograd_driver: a driver plugin for HIPS autograd and a loss written in it,
#      through a live run (sapo-conformance --impl ... --framework autograd).
# Usage: tools/certify_examples.sh [VENV]   (default: $XDG_CACHE_HOME/sapo-ref/venv-ports)
# The venv is created if missing with sapo-ref[test], autograd and the plugin (never torch,
# jax or mlx: neither example needs them). Reports go to $CERTIFY_OUT (default: a temp dir).
# Exit status: 0 iff both ports pass; prints the wall time of each certification.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/sapo-ref/venv-ports}
OUT=${CERTIFY_OUT:-$(mktemp -d)}
PY="$VENV/bin/python"
CLI="$VENV/bin/sapo-conformance"
mkdir -p "$OUT"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# --- environment ------------------------------------------------------------------------
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
fi
if ! "$PY" -c "import sapo_conformance.protocol, jsonschema" 2>/dev/null; then
    "$PY" -m pip install -q -e "$ROOT[test]"
fi
if ! "$PY" -c "import autograd, sapo_autograd" 2>/dev/null; then
    "$PY" -m pip install -q autograd -e "$ROOT/examples/autograd_driver"
fi

# --- 1. the C port through the file protocol ----------------------------------------------
t0=$(now)
CC=${CC:-cc} make -s -C "$ROOT/examples/c_port" OUT="$OUT/run_cases"
EXPORT="$OUT/c_port"
DTYPES=float64,float32,bfloat16,float16
"$CLI" export "$EXPORT" --dtypes "$DTYPES"
"$OUT/run_cases" "$EXPORT"
c_status=0
"$CLI" judge "$EXPORT" --json "$OUT/c_port.json" --no-progress || c_status=$?
t1=$(now)

# --- 2. the autograd port through its driver plugin ----------------------------------------
a_status=0
"$CLI" --impl sapo_autograd.loss:policy_loss --framework autograd --no-progress \
    --json "$OUT/autograd.json" || a_status=$?
t2=$(now)

echo "certify c_port (build, export, run, judge): $(secs "$t0" "$t1") s, exit $c_status"
echo "certify autograd (live run through the plugin): $(secs "$t1" "$t2") s, exit $a_status"
echo "reports: $OUT/c_port.json $OUT/autograd.json"
[ "$c_status" -eq 0 ] && [ "$a_status" -eq 0 ]
