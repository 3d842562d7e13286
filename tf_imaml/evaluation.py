"""Few-shot accuracy over many test episodes, with a 95% confidence interval."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf


class AccuracyResult(NamedTuple):
    """Per-task query accuracy after adaptation, summarised."""

    mean: float  # Mean accuracy over tasks, in [0, 1].
    ci95: float  # Half-width of the normal 95% confidence interval: 1.96 std / sqrt(n).
    num_tasks: int  # Number of tasks evaluated.
    per_task: np.ndarray  # [num_tasks] accuracy of each task.
    # Tasks whose adapted logits were not all finite (a diverged adaptation): their
    # predictions are arbitrary (argmax of NaN is class 0), so their accuracy is not a score.
    non_finite: int = 0


def few_shot_accuracy(
    meta, episodes: tf.data.Dataset, *, on_batch: Callable[[int], None] | None = None
) -> AccuracyResult:
    """Adapts `meta` to every task of a finite episode dataset and scores its query set.

    Args:
      meta: A `tf_imaml.meta_model.MetaLearner` (e.g. `ImplicitMAML`).
      episodes: Finite dataset of `((support_x, support_y, query_x), query_y)` batches with
        integer class labels.
      on_batch: Called with the number of batches done after each one (for progress
        display). Default value: `None`.

    Returns:
      An `AccuracyResult` over all tasks of all batches; `non_finite` counts the tasks whose
      adapted logits hold a NaN or an infinity (the adaptation diverged).
    """
    accuracies, non_finite = [], 0
    for inputs, query_y in episodes:
        logits = np.asarray(meta.predict_on_batch(inputs))
        hits = np.argmax(logits, axis=-1) == query_y.numpy()
        accuracies.append(hits.mean(axis=1))
        non_finite += int(np.sum(~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)))
        if on_batch is not None:
            on_batch(len(accuracies))
    per_task = np.concatenate(accuracies)
    if per_task.size == 0:
        raise ValueError("the episode dataset is empty")
    ci95 = 1.96 * per_task.std(ddof=1) / np.sqrt(per_task.size) if per_task.size > 1 else 0.0
    return AccuracyResult(
        float(per_task.mean()), float(ci95), int(per_task.size), per_task, non_finite
    )
