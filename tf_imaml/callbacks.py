"""Keras callbacks for meta-training runs: stop a diverging run before it overwrites anything.

A meta-learner never applies a non-finite meta-gradient: failed tasks are dropped (or
replaced, see `MetaLearner(on_failure=...)`) and a step with no usable task is skipped and
counted in `skipped_steps`. A run in which most steps are skipped has diverged even though
its weights are still finite. `DivergenceGuard` detects that at the end of an epoch and
raises `TrainingDiverged`; placed before `BackupAndRestore` and `ModelCheckpoint` in the
callback list, it runs first, so the last good checkpoint is not overwritten.

`TimeToAccuracy` records validation accuracy against meta-steps and training time, with one
clock across resumed runs.
"""

from __future__ import annotations

import json
import pathlib
import time

import keras
import numpy as np
import tensorflow as tf


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


class TimeToAccuracy(keras.callbacks.Callback):
    """Records validation results against meta-steps and training time, across resumes.

    At the end of every epoch it appends to the JSON file `path` one entry with the epoch,
    the meta-steps taken (the optimizer's iteration count), the training time so far in
    wall-clock and in process CPU seconds (validation excluded, summed over every resumed
    run, so that a campaign spread over several sittings has one clock), and the epoch's
    logs. With `log_dir` it also writes the `monitor` value to TensorBoard twice: against
    training seconds (`time_to_accuracy/<monitor>_by_seconds`) and against CPU seconds.

    A resumed run (`fit(initial_epoch=...)` or `BackupAndRestore`) drops the entries of
    epochs that are being redone and continues the clocks from the last entry it keeps.

    Args:
      path: The JSON file (a list of entries); read on resume, rewritten every epoch.
      monitor: The log to put on the time axis in TensorBoard.
        Default value: `"val_sparse_categorical_accuracy"`.
      log_dir: TensorBoard folder, or `None` for none. Default value: `None`.
    """

    def __init__(
        self,
        path,
        *,
        monitor: str = "val_sparse_categorical_accuracy",
        log_dir=None,
    ):
        super().__init__()
        self.path = pathlib.Path(path)
        self.monitor = monitor
        self.log_dir = None if log_dir is None else str(log_dir)
        self.entries: list[dict] = []
        self._writer = None
        self._started = False

    def on_train_begin(self, logs=None):
        self._started = False
        self.entries = json.loads(self.path.read_text()) if self.path.is_file() else []
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._started = True
            self.entries = [e for e in self.entries if e["epoch"] < epoch]
            last = self.entries[-1] if self.entries else {}
            self._wall_base = float(last.get("train_seconds", 0.0))
            self._cpu_base = float(last.get("cpu_seconds", 0.0))
            self._wall_total = 0.0
            self._cpu_total = 0.0
        self._wall_start = time.perf_counter()
        self._cpu_start = time.process_time()

    def on_test_begin(self, logs=None):
        # Validation inside fit: stop the clocks until it ends.
        if self._started:
            self._wall_total += time.perf_counter() - self._wall_start
            self._cpu_total += time.process_time() - self._cpu_start

    def on_test_end(self, logs=None):
        if self._started:
            self._wall_start = time.perf_counter()
            self._cpu_start = time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        if not any(k.startswith("val_") for k in logs):  # no validation ran: clocks run on
            self._wall_total += time.perf_counter() - self._wall_start
            self._cpu_total += time.process_time() - self._cpu_start
        entry = {
            "epoch": int(epoch),
            "meta_steps": int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
            "train_seconds": round(self._wall_base + self._wall_total, 2),
            "cpu_seconds": round(self._cpu_base + self._cpu_total, 2),
            "logs": {k: float(v) for k, v in logs.items()},
        }
        self.entries.append(entry)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1))
        tmp.replace(self.path)
        if self._writer is not None and self.monitor in logs:
            with self._writer.as_default():
                value = float(logs[self.monitor])
                name = f"time_to_accuracy/{self.monitor}"
                tf.summary.scalar(f"{name}_by_seconds", value, step=int(entry["train_seconds"]))
                tf.summary.scalar(f"{name}_by_cpu_seconds", value, step=int(entry["cpu_seconds"]))
            self._writer.flush()
        self._wall_total = self._cpu_total = 0.0
        self._wall_base = entry["train_seconds"]
        self._cpu_base = entry["cpu_seconds"]
