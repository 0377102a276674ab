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
