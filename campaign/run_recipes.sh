#!/usr/bin/env bash
# Time to accuracy, side by side (issue #9): five Omniglot 5-way 1-shot recipes trained at
# the same time on the same cores, one TensorFlow thread each, niced. Each writes
# campaign/omniglot_5way_1shot/<recipe>/curve.json (validation accuracy on 200 tasks against
# meta-steps and training seconds). Run from the repository root; running it again resumes
# every recipe from its committed checkpoint. Stop them with: pkill -f campaign/omniglot
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
common=(--ways=5 --shots=1 --queries=15 --meta_batch_size=16 --inner_steps=16
  --inner_learning_rate=0.1 --lam=2.0 --cg_steps=5 --outer_learning_rate=1e-3
  --meta_steps=20000 --steps_per_epoch=50 --val_tasks=200 --test_tasks=600 --seed=0)
authors=(--damping=1 --lam_damping=10 --inner_loop=pull_back --test_lam=0)
declare -A recipes=(
  [paper_drop]="--on_failure=drop"
  [paper_first_order]="--on_failure=first_order"
  [authors]="${authors[*]}"
  [authors_lr3e-3]="${authors[*]} --outer_learning_rate=3e-3"
  [authors_mb8]="${authors[*]} --meta_batch_size=8"
)
for name in "${!recipes[@]}"; do
  dir=campaign/omniglot_5way_1shot/$name
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 nice -n 10 \
    "$python" scripts/train.py "${common[@]}" ${recipes[$name]} --logdir="$dir" \
    >>"$dir/train.log" 2>&1 &
done
wait
