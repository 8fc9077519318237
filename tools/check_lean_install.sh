#!/usr/bin/env bash
# Lean installs stay lean: build the wheel and sdist, install the wheel into a fresh venv with
# ONE extra ([torch], [jax] or [mlx]), check that nothing of the other backends, the test tools
# or the docs tools came with it, import the adapter, and certify it with one quick conformance
# run. Usage: bash tools/check_lean_install.sh [WORK_DIR] [EXTRA ...]   (default: torch jax mlx)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work="${1:-build/lean}"
shift || true
extras=("$@")
[ ${#extras[@]} -gt 0 ] || extras=(torch jax mlx)
rm -rf "$work" && mkdir -p "$work"
work=$(cd "$work" && pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1

python3 -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install -q "build>=1.2"
"$work/build-venv/bin/python" -m build -q --sdist --wheel --outdir "$work/dist" "$root" >/dev/null
wheel=$(ls "$work"/dist/sapo_ref-*.whl)
sdist=$(ls "$work"/dist/sapo_ref-*.tar.gz)
# The sdist carries the spec data and golden vectors (a rebuild from it must be complete).
tar -tzf "$sdist" > "$work/sdist.txt"  # (grep -q on a pipe would SIGPIPE tar under pipefail)
for member in spec/clauses.toml spec/vectors/0.1.0/methods.json spec/vectors/0.2.0/terms.json conformance_tests/report.schema.json; do
  grep -q "/$member\$" "$work/sdist.txt" || { echo "sdist lacks $member" >&2; exit 1; }
done
echo "built $(basename "$wheel") and $(basename "$sdist")"

for extra in "${extras[@]}"; do
  venv="$work/venv-$extra"
  python3 -m venv "$venv"
  # The CPU wheel of torch first: an open range would pull a several-GB CUDA build here.
  [ "$extra" = torch ] && "$venv/bin/pip" install -q "torch==2.13.0"
  "$venv/bin/pip" install -q "$wheel[$extra]"
  case "$extra" in
    torch) allowed=torch ;;
    jax) allowed="jax jaxlib" ;;
    mlx) allowed="mlx mlx-cpu mlx-metal" ;;
    *) echo "unknown extra $extra" >&2; exit 2 ;;
  esac
  ALLOWED="$allowed" "$venv/bin/python" - <<'PY'
import importlib.metadata as md
import os

# (mpmath is not listed: torch needs it through sympy.)
installed = {d.metadata["Name"].lower().replace("_", "-") for d in md.distributions()}
backends = {"torch", "jax", "jaxlib", "mlx", "mlx-cpu", "mlx-metal"}
tools = {"pytest", "hypothesis", "array-api-strict", "jsonschema", "mkdocs",
         "mkdocs-material", "mkdocstrings", "matplotlib", "ruff"}
allowed = set(os.environ["ALLOWED"].split())
extra = sorted((backends - allowed) & installed) + sorted(tools & installed)
if extra:
    raise SystemExit(f"lean install pulled in {extra}")
print(f"  only {sorted(allowed & installed)} of the backends; no test or docs tools")
PY
  # From a directory outside the checkout, so the installed wheel is what gets imported.
  (cd "$work" && "$venv/bin/python" -c "import sapo_$extra, sapo_ref; print('  import sapo_$extra ok, spec', sapo_ref.SPEC_VERSION)")
  (cd "$work" && "$venv/bin/sapo-conformance" --target "$extra" --quick --dtypes float32 --no-progress \
      --json "$work/conformance-$extra.json" > "$work/conformance-$extra.txt") \
    || { cat "$work/conformance-$extra.txt"; echo "lean [$extra]: conformance failed" >&2; exit 1; }
  echo "  sapo-conformance --target $extra --quick: $(tail -n 1 "$work/conformance-$extra.txt")"
  echo "lean [$extra] install: $(du -sh "$venv" | cut -f1)"
done
