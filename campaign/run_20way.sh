#!/usr/bin/env bash
# The Omniglot 20-way 1-shot campaign (issue #9) on the Lake split: meta-trained on the
# background alphabets only (25 for training, 5 held out for validation); the evaluation
# alphabets are the test set. The 5-way campaign's recipe (the authors' damped system,
# pull-back inner loop, test-time lam 0, Adam 3e-3), at meta-batch 8 and 5 queries per class
# (20-way tasks are four times larger). Run from the repository root; the same command
# resumes from the committed checkpoint in campaign/omniglot_20way_1shot_lake/.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
dir=campaign/omniglot_20way_1shot_lake
mkdir -p "$dir"
TF_NUM_INTRAOP_THREADS=${THREADS:-1} TF_NUM_INTEROP_THREADS=${THREADS:-1} exec nice -n 15 \
  "$python" scripts/train.py --split=lake --ways=20 --shots=1 --queries=5 \
  --meta_batch_size=8 --inner_steps=16 --inner_learning_rate=0.1 --lam=2.0 --cg_steps=5 \
  --outer_learning_rate=3e-3 --meta_steps=${META_STEPS:-40000} --steps_per_epoch=50 \
  --val_tasks=200 --test_tasks=600 --seed=0 \
  --damping=1 --lam_damping=10 --inner_loop=pull_back --test_lam=0 \
  --logdir="$dir" >>"$dir/train.log" 2>&1
