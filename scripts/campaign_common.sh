# Sourced by the campaign scripts (scripts/campaign_*.sh) after they set KEEP (the committed
# folder of the campaign's small state) and STAGES (its stage names): the tools, and the
# save / restore of every stage's resumable state between runs/ and KEEP.
PY=${PY:-.venv/bin/python}
MOL=${MOL:-.venv/bin/molrecon}
THREADS=${THREADS:-2}
RUNS=runs

# Copy each stage's state, log and best model from runs/STAGE/ into KEEP.
save() {
  mkdir -p "$KEEP"
  for stage in $STAGES; do
    for f in "$RUNS/$stage/$stage.state.pt" "$RUNS/$stage/$stage.log.jsonl" \
             "$RUNS/$stage/$stage.pt"; do
      [ -f "$f" ] && cp "$f" "$KEEP/"
    done
  done
  ls -la "$KEEP"
}

# Put KEEP's files back under runs/STAGE/, so that a stage resumes where it was saved.
restore() {
  for stage in $STAGES; do
    mkdir -p "$RUNS/$stage"
    for f in "$KEEP/$stage".*; do
      [ -f "$f" ] && cp "$f" "$RUNS/$stage/"
    done
  done
  return 0
}

# Make runs/NAME and print --resume when the stage's state is there (nothing otherwise).
resume_flag() {
  mkdir -p "$RUNS/$1"
  if [ -f "$RUNS/$1/$1.state.pt" ]; then echo --resume; fi
}

# The stage-0 recipe of the priors with 3×3×3 kernels (2D+time and 3D): denoising blocks of
# 8 frames or partitions of 64² with an identity path, the Lipschitz penalty (Lanczos) at
# the clean block and at a whole clean block every 8th step, the best model only at the
# bound. Resumes when the stage's state exists.
#   block_stage0 NAME SECS INIT [more train options: λ, validation cadence, seed]
block_stage0() {
  local name=$1 secs=$2 init=$3 resume
  shift 3
  resume=$(resume_flag "$name")
  OMP_NUM_THREADS=$THREADS "$MOL" train $DATA $MASKS --out "$RUNS/$name/$name.pt" \
    --stage denoise --batch-size 8 --patch 64 --patch-depth 8 --sigma 0.01,0.12 \
    --sense-fraction 0.25 --skip --init "$init" \
    --constraint lr --cg-iters 10 --lr 1e-4 --penalty-estimator lanczos \
    --penalty-steps 10 --penalty-top 1 --penalty-weight 2e-4 --penalty-threshold 0.995 \
    --penalty-at clean,image --penalty-every 8 --best-max-lipschitz 1.01 \
    --max-steps 100000 --time-budget "$secs" --quiet "$@" $resume
}

# The deep-equilibrium stage of the priors with 3×3×3 kernels (the recipe's stage 1): MOL
# solved to its fixed point on blocks of 16 readout positions (exact: the readout is fully
# sampled, so the block is a hybrid-space problem of its own), the implicit gradient, λ fixed,
# and the penalty on what the guarantees need, the top μ of ½(J + Jᵀ) at every training
# sample's fixed point (Lanczos, every 2nd step), where the stage-0 penalty read the norm.
# The best model is held by μ ≤ 1 at the validation fixed points. Resumes when the stage's
# state exists.
#   deq_block_stage NAME SECS INIT [more train options: λ, validation cadence, seed]
deq_block_stage() {
  local name=$1 secs=$2 init=$3 resume
  shift 3
  resume=$(resume_flag "$name")
  OMP_NUM_THREADS=$THREADS "$MOL" train $DATA $MASKS --out "$RUNS/$name/$name.pt" \
    --stage deq --skip --init "$init" --constraint lr --cg-iters 10 --lr 1e-5 --lam-lr 0 \
    --readout-block 16 --batch-size 2 --penalty-estimator monotone --penalty-steps 10 \
    --penalty-top 1 --penalty-weight 1e-4 --penalty-threshold 0.995 --penalty-every 2 \
    --bound-measure monotone --best-max-lipschitz 1.0 --max-steps 100000 \
    --time-budget "$secs" --quiet "$@" $resume
}
