#!/usr/bin/env bash
# The GPU check of a bare machine, in under 8 minutes: find (or set up) a Python with a CUDA
# build of torch and molrecon's dependencies, run the gpu-marked tests, then
# benchmarks/gpu.py. Everything goes to the output folder (first argument, else $OUT, else
# ./device-check): env.txt, pytest_gpu.txt, gpu.md, gpu.json, gpu_stdout.txt.
#
#   scripts/device_check.sh [OUTDIR]
#
# Time limits (seconds; override through the environment): SETUP_S=120 for ./dev.sh setup
# when no usable Python is found (it needs the package index), TEST_S=150 for the tests,
# BENCH_S=180 for the benchmark (it writes gpu.json after each section, so a run that hits the
# limit keeps the sections it finished). Exit status: that of the tests, else the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-./device-check}}
mkdir -p "$OUTDIR"
SETUP_S=${SETUP_S:-120}
TEST_S=${TEST_S:-150}
BENCH_S=${BENCH_S:-180}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUTDIR/env.txt"; }

usable() {  # $1: a python; usable = CUDA torch and the project's imports
  [ -x "$(command -v "$1" 2>/dev/null)" ] || return 1
  "$1" - <<'PY' >/dev/null 2>&1
import torch, h5py, nibabel, typer, rich, pytest  # noqa: F401
import molrecon.cli  # noqa: F401
assert torch.cuda.is_available()
PY
}

PY=""
for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
  [ -n "$cand" ] && usable "$cand" && { PY=$cand; break; }
done
if [ -z "$PY" ]; then
  log "no Python with CUDA torch and the project's dependencies: ./dev.sh setup"
  # dev.sh installs the CUDA wheel when nvidia-smi sees a GPU (TORCH forces one)
  timeout -k 10 "$SETUP_S" ./dev.sh setup >>"$OUTDIR/env.txt" 2>&1 || log "setup failed (see above)"
  usable .venv/bin/python && PY=.venv/bin/python
fi
if [ -z "$PY" ]; then
  log "no usable Python (CUDA torch and molrecon's dependencies); nothing run"
  nvidia-smi >>"$OUTDIR/env.txt" 2>&1 || true
  exit 3
fi
{
  log "python: $PY"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} >>"$OUTDIR/env.txt" 2>&1

log "pytest -m gpu (limit ${TEST_S} s)"
timeout -k 10 "$TEST_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests \
  >"$OUTDIR/pytest_gpu.txt" 2>&1
test_rc=$?
tail -n 5 "$OUTDIR/pytest_gpu.txt"
log "pytest exit status $test_rc"

log "benchmarks/gpu.py (limit ${BENCH_S} s)"
timeout -k 10 "$BENCH_S" "$PY" benchmarks/gpu.py --device cuda --out "$OUTDIR" \
  --memory-timeout 60 >"$OUTDIR/gpu_stdout.txt" 2>&1
bench_rc=$?
cat "$OUTDIR/gpu.md" 2>/dev/null || tail -n 20 "$OUTDIR/gpu_stdout.txt"
log "benchmark exit status $bench_rc"
[ "$test_rc" -ne 0 ] && exit "$test_rc"
exit "$bench_rc"
