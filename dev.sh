#!/usr/bin/env bash
# One entry point for a fresh machine: sets up ./.venv, then runs the job asked for.
#   ./dev.sh demo [OUTDIR]   reconstruct the bundled example scan with the bundled MOL weights
#   ./dev.sh test [ARGS]     run the test suite (pytest ARGS)
#   ./dev.sh setup           only set up the environment
# Environment: PYTHON (interpreter, default python3), TORCH (pip requirement for torch,
# e.g. TORCH="torch==2.13.0" to force a CUDA build; default: the CPU wheel when no GPU is seen).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.molrecon-setup

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local want
  want="$(cat pyproject.toml; echo "${TORCH:-}")"
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    return 0
  fi
  local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null || [ -n "${TORCH:-}" ]; then
    if [ -n "${TORCH:-}" ]; then
      "${pip[@]}" "$TORCH"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" "torch>=2.2,<3"
    else
      # No GPU: the CPU build is ~200 MB instead of ~3 GB of CUDA libraries.
      "${pip[@]}" "torch==2.13.0+cpu" 2>/dev/null \
        || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
        || "${pip[@]}" "torch>=2.2,<3"
    fi
  fi
  "${pip[@]}" -e ".[test]"
  printf '%s' "$want" > "$STAMP"
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/molrecon" demo "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./dev.sh demo [OUTDIR] | test [PYTEST ARGS] | setup" >&2; exit 2 ;;
esac
