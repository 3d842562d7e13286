"""Work-arounds and adapters between `MetaLearner` and Keras / TensorFlow internals.

Each exists for a reason stated in its docstring; they are kept here, out of the meta-model's
logic, so that a Keras or TensorFlow upgrade has one place to look.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def scale_gradient(x, factor):
    """Identity whose gradient is multiplied by `factor` (twice differentiable)."""

    @tf.custom_gradient
    def op(x):
        def grad(dy):
            return dy * tf.cast(factor, dy.dtype)

        return tf.identity(x), grad

    return op(x)


def trace_once_per_model(function) -> None:
    """Silences TensorFlow's frequent-retracing warning for one model's step function.

    TensorFlow counts traces per Python code object, not per `tf.function`: N meta-models
    in one process, each tracing its own step once, look like one function retraced N
    times and log "triggered tf.function retracing". Each model traces each step once
    (`tests/test_imaml.py` counts it), so for these functions the warning is wrong.
    Keras wraps its `tf.function`s in a plain Python closure (`TensorFlowTrainer.
    _make_function`), so the closure's cells are searched too (two levels deep).
    """
    _silence_retracing_warning(function, depth=2)


def _silence_retracing_warning(function, *, depth: int) -> None:
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    if depth and getattr(function, "__closure__", None):
        for cell in function.__closure__:
            try:
                contents = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if callable(contents) and contents is not function:
                _silence_retracing_warning(contents, depth=depth - 1)


def metric_name(metric) -> str:
    """The name Keras gives a compiled metric: the string itself, else the object's name."""
    if isinstance(metric, str):
        return metric
    return getattr(metric, "name", None) or metric.__name__


def pre_adaptation_copy(metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """A fresh copy of a built compile metric, named `pre_adaptation_<its name>`."""
    config = metric.get_config()
    config["name"] = "pre_adaptation_" + metric.name
    return metric.__class__.from_config(config)
