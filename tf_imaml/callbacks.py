"""Keras callbacks for meta-training runs: stop a diverging run before it overwrites anything.

A meta-learner never applies a non-finite meta-gradient: failed tasks are dropped (or
replaced, see `MetaLearner(on_failure=...)`) and a step with no usable task is skipped and
counted in `skipped_steps`. A run in which most steps are skipped has diverged even though
its weights are still finite. `DivergenceGuard` detects that at the end of an epoch and
raises `TrainingDiverged`; placed before `BackupAndRestore` and `ModelCheckpoint` in the
callback list, it runs first, so the last good checkpoint is not overwritten.
"""

from __future__ import annotations

import keras
import numpy as np


class TrainingDiverged(RuntimeError):
    """Raised by `DivergenceGuard`; the message says what was seen and in which epoch."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops `fit` when an epoch skipped too many meta-steps or the weights are not finite.

    Args:
      max_skipped_fraction: Largest tolerated fraction of skipped meta-steps in an epoch
        (the `skipped_steps` metric over the epoch's steps). Default value: `0.5`.
    """

    def __init__(self, *, max_skipped_fraction: float = 0.5):
        super().__init__()
        if not 0.0 <= max_skipped_fraction < 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1), got {max_skipped_fraction}")
        self.max_skipped_fraction = float(max_skipped_fraction)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        steps = self.params.get("steps") if self.params else None
        skipped = logs.get("skipped_steps")
        if steps and skipped is not None and float(skipped) / steps > self.max_skipped_fraction:
            raise TrainingDiverged(
                f"epoch {epoch + 1}: {float(skipped):.0f} of {steps} meta-steps were skipped "
                "(every task failed: non-finite values, or an indefinite or unsolved linear "
                "system); training stopped, the last checkpoint is from the epoch before. Lower "
                "the inner learning rate, raise lam, or use on_failure='first_order'."
            )
        bad = [
            v.path
            for v in self.model.trainable_variables
            if not np.all(np.isfinite(keras.ops.convert_to_numpy(v)))
        ]
        if bad:
            raise TrainingDiverged(
                f"epoch {epoch + 1}: non-finite weights in {', '.join(bad)}; training stopped, "
                "the last checkpoint is from the epoch before."
            )
