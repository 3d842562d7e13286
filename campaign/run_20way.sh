#!/usr/bin/env bash
# The Omniglot 20-way 1-shot campaign (issue #9) on the Lake split: meta-trained on the
# background alphabets only (25 for training, 5 held out for validation); the evaluation
# alphabets are the test set. The 5-way campaign's recipe (the authors' damped system,
# pull-back inner loop, test-time lam 0, Adam 3e-3), at meta-batch 8 and 5 queries per class
# (20-way tasks are four times larger), with the outer step decayed in stages as the 5-way's
# was. Each stage continues the previous stage's final model (Adam moments included) on the
# training stream where it left off, and validates on the same 200 tasks:
#   1 omniglot_20way_1shot_lake          random weights, Adam 3e-3, to 2500 meta-steps
#   2 omniglot_20way_1shot_lake_lr1e-3   Adam 1e-3 from 2500
# Run from the repository root; `campaign/run_20way.sh` resumes stage 2 from its committed
# checkpoint, `STAGE=1 campaign/run_20way.sh` stage 1. THREADS sets TensorFlow's threads (1).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
campaign=campaign/omniglot_20way_1shot_lake
init=()
case "${STAGE:-2}" in
  1) dir=$campaign lr=3e-3 ;;
  2) dir=${campaign}_lr1e-3
     init=(--init_model="$campaign/final.keras" --init_learning_rate=1e-3 --first_meta_batch=2500) ;;
  *) echo "STAGE must be 1 or 2, got '$STAGE'" >&2; exit 2 ;;
esac
mkdir -p "$dir"
TF_NUM_INTRAOP_THREADS=${THREADS:-1} TF_NUM_INTEROP_THREADS=${THREADS:-1} exec nice -n 15 \
  "$python" scripts/train.py --split=lake --ways=20 --shots=1 --queries=5 \
  --meta_batch_size=8 --inner_steps=16 --inner_learning_rate=0.1 --lam=2.0 --cg_steps=5 \
  --outer_learning_rate=3e-3 --meta_steps=${META_STEPS:-40000} --steps_per_epoch=50 \
  --val_tasks=200 --test_tasks=600 --seed=0 \
  --damping=1 --lam_damping=10 --inner_loop=pull_back --test_lam=0 ${init[@]+"${init[@]}"} \
  --logdir="$dir" >>"$dir/train.log" 2>&1
