#!/bin/bash
# Trains the same runs at two commits and compares every summary.json.
#
#   bash experiments/same_numbers/run.sh OLD_COMMIT NEW_COMMIT [ROOT]
#
# Each commit is checked out as a git worktree under ROOT (default
# /tmp/kd_jax_same_numbers), where it trains: the demo's three runs (teacher,
# student, distilled), a full-length DKD run from the demo's teacher
# (T = 4, lr 0.003), and the --tiny runs of experiments/logit_methods and
# experiments/feature_methods (every method of each, a few steps). Then
# compare.py reports, per run, whether every number of the two summaries is
# the same (timings left out).
set -u
OLD=$1; NEW=$2; ROOT=${3:-/tmp/kd_jax_same_numbers}
REPO=$(git rev-parse --show-toplevel)
for C in "$OLD" "$NEW"; do
  W=$ROOT/$C
  [ -d "$W" ] || git -C "$REPO" worktree add -f --detach "$W" "$C" > /dev/null
  (
    cd "$W" && export PYTHONPATH=$W
    python -m kd_jax.demo --workdir="$W/wd/demo" > "$W/demo.log" 2>&1
    python -m kd_jax.main --config=configs/mnist5k_distill.py:teacher_workdir=$W/wd/demo/teacher,distill.soft=dkd,distill.temperature=4.0,learning_rate=0.003 \
        --workdir="$W/wd/dkd" > "$W/dkd.log" 2>&1
    python experiments/logit_methods/run.py --tiny --workdir="$W/wd/logit_tiny" > "$W/logit_tiny.log" 2>&1
    python experiments/feature_methods/run.py --tiny --workdir="$W/wd/feature_tiny" > "$W/feature_tiny.log" 2>&1
  )
done
python "$REPO/experiments/same_numbers/compare.py" "$ROOT/$OLD/wd" "$ROOT/$NEW/wd"
