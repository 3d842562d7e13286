#!/usr/bin/env bash
# The Omniglot 5-way 1-shot training campaign (issue #9), stage 2: the fastest recipe of
# run_recipes.sh ("authors_lr3e-3": the authors' damped system 2I + H/12, plain inner steps
# with one pull-back, test-time adaptation at lam 0, meta-batch 16) trained with Adam 3e-3
# for 3850 meta-steps (stage 1, campaign/omniglot_5way_1shot/authors_lr3e-3, whose validation
# accuracy stayed at 94.2 to 94.8% from 2850 steps on), then continued from stage 1's final
# model with Adam 1e-3 (a decayed step; the Adam moments carry over) on the training stream
# where stage 1 left it (no task seen twice): stage 2, campaign/omniglot_5way_1shot/stage2_lr1e-3,
# whose validation accuracy stayed at 94.7 to 95.7% from 4000 to 5250 steps. Stage 3 continued
# stage 2's final model (5250 steps) with Adam 3e-4, again on the stream where stage 2 left it
# (validation 95.3 to 96.0% from 5300 to 7700). Stage 4 continues stage 3's final model
# (7700 steps) with Adam 1e-4, on the stream from meta-batch 7700 on.
# Run from the repository root on any machine: the same command resumes where the last
# commit left it.
# Progress: campaign/omniglot_5way_1shot/stage4_lr1e-4/{train.log,curve.json,curve.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
previous=campaign/omniglot_5way_1shot/stage3_lr3e-4
dir=campaign/omniglot_5way_1shot/stage4_lr1e-4
mkdir -p "$dir"
exec nice -n 10 "$python" scripts/train.py --ways=5 --shots=1 --queries=15 \
  --meta_batch_size=16 --inner_steps=16 --inner_learning_rate=0.1 --lam=2.0 --cg_steps=5 \
  --outer_learning_rate=3e-3 --meta_steps=${META_STEPS:-20000} --steps_per_epoch=50 \
  --val_tasks=200 --test_tasks=600 --seed=0 \
  --damping=1 --lam_damping=10 --inner_loop=pull_back --test_lam=0 \
  --init_model="$previous/final.keras" --init_learning_rate=1e-4 --first_meta_batch=7700 \
  --logdir="$dir" >>"$dir/train.log" 2>&1
