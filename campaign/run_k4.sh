#!/usr/bin/env bash
# Experiment beside the 5-way campaign's stage 4: the same continuation (stage 3's final model
# at 7700 meta-steps, Adam 1e-4, the training stream from meta-batch 7700 on, the same 200
# validation tasks) with 4 inner steps instead of 16. The shipped model adapts as well with 1
# test-time step as with 16, so most training steps may be wasted; this measures whether a
# 4-step continuation learns as well per meta-step, and how much faster each step is. Its
# validation adapts with its own 4 steps at lam 0; compare models with scripts/evaluate.py at
# the same adaptation. Run from the repository root; the same command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
previous=campaign/omniglot_5way_1shot/stage3_lr3e-4
dir=campaign/omniglot_5way_1shot/exp_k4_lr1e-4
mkdir -p "$dir"
exec nice -n 10 "$python" scripts/train.py --ways=5 --shots=1 --queries=15 \
  --meta_batch_size=16 --inner_steps=4 --inner_learning_rate=0.1 --lam=2.0 --cg_steps=5 \
  --outer_learning_rate=3e-3 --meta_steps=${META_STEPS:-20000} --steps_per_epoch=50 \
  --val_tasks=200 --test_tasks=600 --seed=0 \
  --damping=1 --lam_damping=10 --inner_loop=pull_back --test_lam=0 \
  --init_model="$previous/final.keras" --init_learning_rate=1e-4 --first_meta_batch=7700 \
  --logdir="$dir" >>"$dir/train.log" 2>&1
