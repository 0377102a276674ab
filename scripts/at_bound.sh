#!/usr/bin/env bash
# Put a MOL-LR checkpoint at the bound and re-tune its λ, the step between a training
# stage and bundle_weights.py:
#
#   scripts/at_bound.sh CKPT VALDIR OUT [LAMS] [MASK] [RS]
#
# 1. `molrecon check-lipschitz` at the MOL fixed points of up to 6 files of VALDIR
#    (Lanczos 30): the largest local estimate L;
# 2. the prior's output is scaled by c = 0.99 / L when L > 0.99 (H → cH scales every
#    Lipschitz constant by c), and λ re-tuned over LAMS (default 30,60,100) on VALDIR
#    with MASK (default equispaced,random) at RS (default 4,6), 3 files per mask
#    (`scripts/tune_lambda.py`), written to OUT;
# 3. check-lipschitz again on OUT: the bound it now reads.
# THREADS (default 2) sets the torch threads; NFILES (default 6) how many validation files
# the estimates are measured at; SCALE skips step 1 with a scale already measured (a
# 2D+time series costs about 12 s a Lanczos step on one core: there, the training's own
# val_lipschitz, measured at every validation, is the cheaper source). Logs and JSON
# beside OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=$1 VALDIR=$2 OUT=$3 LAMS=${4:-30,60,100} MASK=${5:-equispaced,random} RS=${6:-4,6}
THREADS=${THREADS:-2}
MOL=${MOL:-.venv/bin/molrecon}
PY=${PY:-.venv/bin/python}
mapfile -t FILES < <(ls "$VALDIR"/*.h5 | head -"${NFILES:-6}")
DATA=()
for f in "${FILES[@]}"; do DATA+=(--data "$f"); done

lipschitz() {  # CKPT JSON -> prints the largest local estimate
  OMP_NUM_THREADS=$THREADS "$MOL" check-lipschitz "$1" "${DATA[@]}" --points 1 --power-iters 10 \
    --power-tol 0 --lanczos-steps 30 --json > "$2"
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['local']['max'])" "$2"
}

if [ -n "${SCALE:-}" ]; then
  before="(not measured)" scale=$SCALE
else
  before=$(lipschitz "$CKPT" "$OUT.lipschitz_before.json")
  scale=$("$PY" -c "import sys; L=float(sys.argv[1]); print(f'{min(1.0, 0.99 / L):.4f}')" "$before")
fi
echo "largest local estimate at the validation fixed points: $before; output scale $scale"
"$PY" scripts/tune_lambda.py "$CKPT" --val-data "$VALDIR" --lams "$LAMS" -R "$RS" --mask "$MASK" \
  --samples 3 --threads "$THREADS" --output-scale "$scale" --out "$OUT" --json "$OUT.lambda.json"
after=$(lipschitz "$OUT" "$OUT.lipschitz_after.json")
echo "at the bound: largest local estimate $after (was $before; scale $scale)"
