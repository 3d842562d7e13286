"""Checks of few-shot episodes `((support_x, support_y, query_x), query_y)`.

One set of rules, `check_episode`, serves both places an episode is checked:

- eagerly, on arrays given to `fit`/`evaluate`/`predict`/`*_on_batch`, before anything
  runs: every problem raises `ValueError` (or `TypeError` for a non-numeric part) naming
  it, with the values and tasks at fault;
- inside a traced step, on data from a `tf.data.Dataset`: what the static shapes show
  raises `ValueError` while tracing; what depends on values (non-finite inputs, labels out
  of range, query classes without support examples) becomes a graph assertion, an
  `InvalidArgumentError` with the same message when the step runs.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

_NAMES = ("support_x", "support_y", "query_x", "query_y")


class Episode(NamedTuple):
    """A checked episode; every tensor `[tasks, examples, ...]`."""

    support_x: tf.Tensor
    support_y: tf.Tensor
    query_x: tf.Tensor
    query_y: tf.Tensor | None  # None where only inputs are given (prediction).


def is_concrete(t) -> bool:
    """An array or eager tensor (not a symbolic tensor, dataset or generator)."""
    return isinstance(t, (np.ndarray, list, numbers.Number)) or (
        isinstance(t, tf.Tensor) and not tf.is_symbolic_tensor(t)
    )


def check_episode(learner: keras.Model, inputs, query_y=None, *, loss=None, dtype=None) -> Episode:
    """Checks an episode; raises `ValueError` or `TypeError` naming the problem.

    `inputs = (support_x, support_y, query_x)` and `query_y`, each `[tasks, examples, ...]`.
    The parts must be numeric; inputs finite with the learner's example shape; task counts
    equal and example counts equal between inputs and their labels; the support and query
    sets not empty. Integer class labels (rank 2, learner with several outputs) must lie in
    `[0, num_outputs)`, and each task's query classes must all have support examples.
    With a sparse `loss`, one-hot labels are refused.

    Args:
      learner: The Keras model the episode is for.
      inputs: `(support_x, support_y, query_x)`.
      query_y: The query labels, or `None`.
      loss: The compiled loss, or `None` (then the one-hot check is skipped).
        Default value: `None`.
      dtype: Cast the inputs to this dtype. Default value: `None` (as given).

    Returns:
      An `Episode` of tensors; inside a graph they carry the value checks as control
      dependencies.
    """
    if not (isinstance(inputs, (tuple, list)) and len(inputs) == 3):
        raise ValueError(
            "inputs must be (support_x, support_y, query_x), each with a leading task "
            f"axis; got {type(inputs).__name__}"
        )
    parts = {
        name: _numeric_tensor(name, value)
        for name, value in zip(_NAMES, (*inputs, query_y), strict=True)
        if value is not None
    }
    assertions = _check_shapes(learner, parts)
    num_outputs = _num_outputs(learner)
    for name in ("support_x", "query_x"):
        x = parts[name]
        finite = tf.math.is_finite(_as_float(x))
        finite = tf.reduce_all(tf.reshape(finite, [tf.shape(x)[0], -1]), axis=1)
        message = f"{name} has non-finite values (NaN or Inf)"
        assertions += _require(
            finite,
            message,
            lambda ok, m=message: f"{m} in task(s) {np.flatnonzero(~ok).tolist()}",
            after=assertions,
        )
    labels = {name: parts[name] for name in ("support_y", "query_y") if name in parts}
    for name, y in labels.items():
        _check_one_hot(name, y, loss, num_outputs)
    if _are_class_labels(labels.values(), num_outputs):
        for name, y in labels.items():
            message = (
                f"{name} has class labels outside [0, {num_outputs}) (the learner's number of "
                "outputs)"
            )
            assertions += _require(
                (y >= 0) & (y < num_outputs),
                message,
                lambda ok, m=message, y=y: f"{m}: min {int(tf.reduce_min(y))}, max "
                f"{int(tf.reduce_max(y))}",
                after=assertions,
            )
        if "query_y" in labels:
            support_y, query_y = (tf.cast(labels[n], tf.int64) for n in ("support_y", "query_y"))
            in_support = tf.reduce_any(query_y[:, :, None] == support_y[:, None, :], axis=2)
            assertions += _require(
                tf.reduce_all(in_support, axis=1),
                "query classes have no support examples (the support and query sets must "
                "have the same ways)",
                lambda ok: _missing_classes(ok, support_y, query_y),
                after=assertions,
            )
    if dtype is not None:
        parts["support_x"] = tf.cast(parts["support_x"], dtype)
        parts["query_x"] = tf.cast(parts["query_x"], dtype)
    if assertions:
        with tf.control_dependencies(assertions):
            parts = {name: tf.identity(t) for name, t in parts.items()}
    return Episode(parts["support_x"], parts["support_y"], parts["query_x"], parts.get("query_y"))


def _numeric_tensor(name: str, value) -> tf.Tensor:
    dtype = value.dtype if isinstance(value, tf.Tensor) else np.asarray(value).dtype
    numeric = (
        (dtype.is_floating or dtype.is_integer or dtype.is_bool)
        if isinstance(dtype, tf.DType)
        else np.issubdtype(dtype, np.number) or dtype == np.bool_
    )
    if not numeric:
        raise TypeError(f"{name} must be numeric, got dtype {dtype}")
    return tf.convert_to_tensor(value)


def _check_shapes(learner, parts: dict) -> list:
    """The shape checks: ranks, task and example counts, empty sets, example shapes.

    Returns assertions for what the static shapes do not tell (an unknown example count).
    """
    for name, t in parts.items():
        if t.shape.rank is not None and t.shape.rank < 2:
            raise ValueError(f"{name} must be [tasks, examples, ...], got shape {t.shape}")
    num_tasks = {name: t.shape[0] for name, t in parts.items() if t.shape.rank}
    if len({n for n in num_tasks.values() if n is not None}) > 1:
        raise ValueError(f"the parts of the episode have different numbers of tasks: {num_tasks}")
    for split in ("support", "query"):
        x, y = parts[f"{split}_x"], parts.get(f"{split}_y")
        if y is not None and not x.shape[:2].is_compatible_with(y.shape[:2]):
            raise ValueError(
                f"{split}_x has shape {x.shape} but {split}_y has shape {y.shape}: the task and "
                "example axes must agree"
            )
        if x.shape.rank and x.shape[1] == 0:
            raise ValueError(f"the {split} set is empty: {split}_x has shape {x.shape}")
        check_example_shape(learner, f"{split}_x", x.shape)
    return [
        tf.debugging.assert_positive(tf.shape(parts[f"{split}_x"])[1], f"the {split} set is empty")
        for split in ("support", "query")
        if not tf.executing_eagerly()
        and tf.compat.dimension_value(parts[f"{split}_x"].shape[1:2].num_elements()) is None
    ]


def check_example_shape(learner, name: str, shape) -> None:
    """`ValueError` unless `shape` is `[tasks, examples, *learner's example shape]`."""
    learner_inputs = getattr(learner, "inputs", None)
    if not learner_inputs:
        return
    want = learner_inputs[0].shape[1:]
    shape = tf.TensorShape(shape)
    if shape.rank != len(want) + 2 or not shape[2:].is_compatible_with(want):
        raise ValueError(
            f"{name} has shape {tuple(shape)}; the learner takes examples of shape "
            f"{tuple(want)}, so {name} must be [tasks, examples, "
            f"{', '.join(str(d) for d in want)}]"
        )


def _require(ok: tf.Tensor, message: str, eager_message_fn, *, after: list) -> list:
    """A value check: all of `ok`, else `message`.

    Eagerly a `ValueError` at once, its message `eager_message_fn(ok)` (naming the values
    and tasks at fault); in a graph an assertion that runs after the assertions `after`
    (so that the first failing check reports, as eagerly), returned for the caller to run
    before the episode is used.
    """
    if tf.executing_eagerly():
        ok = np.asarray(ok)
        if not ok.all():
            raise ValueError(eager_message_fn(ok))
        return []
    with tf.control_dependencies(after):
        return [tf.debugging.Assert(tf.reduce_all(ok), [message])]


def _num_outputs(learner) -> int | None:
    outputs = getattr(learner, "outputs", None)
    return outputs[0].shape[-1] if outputs else None


def _are_class_labels(labels, num_outputs) -> bool:
    """Integer labels `[tasks, examples]` for a learner with several outputs."""
    return bool(num_outputs and num_outputs > 1) and all(
        y.dtype.is_integer and y.shape.rank == 2 for y in labels
    )


def _check_one_hot(name: str, y: tf.Tensor, loss, num_outputs) -> None:
    if (
        loss is not None
        and is_sparse_loss(loss)
        and y.shape.rank == 3
        and num_outputs is not None
        and num_outputs > 1
        and y.shape[-1] == num_outputs
    ):
        raise ValueError(
            f"{name} has shape {y.shape}: one-hot labels, but the loss takes integer class "
            "labels; use CategoricalCrossentropy for one-hot labels, or integer labels "
            "[tasks, examples]"
        )


def _missing_classes(ok, support_y, query_y) -> str:
    t = int(np.flatnonzero(~ok)[0])
    missing = sorted(set(query_y[t].numpy().tolist()) - set(support_y[t].numpy().tolist()))
    return (
        f"task {t}: query classes {missing} have no support examples (the support and query "
        "sets must have the same ways)"
    )


def _as_float(x: tf.Tensor) -> tf.Tensor:
    return x if x.dtype.is_floating else tf.cast(x, tf.float32)


def query_label_spec(x, y) -> tf.TensorSpec | None:
    """The query labels' `TensorSpec` `[tasks, examples, ...]` when known without reading data."""
    if isinstance(x, tf.data.Dataset):
        spec = x.element_spec
        if not (isinstance(spec, (tuple, list)) and len(spec) >= 2):
            return None
        spec = spec[1]
    elif y is not None and is_concrete(y):
        y = tf.convert_to_tensor(y)
        spec = tf.TensorSpec(y.shape, y.dtype)
    else:
        return None
    if not isinstance(spec, tf.TensorSpec) or spec.shape.rank is None or spec.shape.rank < 2:
        return None
    if not spec.shape[2:].is_fully_defined():
        return None
    return spec


def is_sparse_loss(loss) -> bool:
    """A loss that takes integer class labels (sparse categorical cross-entropy)."""
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True
    name = getattr(loss, "__name__", None) or getattr(loss, "name", None) or str(loss)
    return "sparse_categorical" in str(name)
