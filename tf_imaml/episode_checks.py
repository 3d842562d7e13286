"""Checks of few-shot episodes `((support_x, support_y, query_x), query_y)`.

`check_episode` checks an episode given as arrays, eagerly and before anything runs, with
messages that name the problem; `check_example_shape` and `check_labels` are the checks
that also run inside a traced step (for episodes from a `tf.data.Dataset`), as static shape
checks and graph assertions. `tf_imaml.meta_model.MetaLearner` calls them.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np
import tensorflow as tf


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


def is_concrete(t) -> bool:
    """An array or eager tensor (not a symbolic tensor, dataset or generator)."""
    return isinstance(t, (np.ndarray, list, numbers.Number)) or (
        isinstance(t, tf.Tensor) and not tf.is_symbolic_tensor(t)
    )


def check_episode(learner: keras.Model, inputs, query_y=None) -> None:
    """Checks an episode given as arrays; raises `ValueError` or `TypeError` naming the problem.

    `inputs = (support_x, support_y, query_x)` and `query_y`, each `[tasks, examples, ...]`.
    Inputs must be numeric and finite with the learner's example shape; labels numeric;
    task and example counts must agree; the support and query sets must not be empty.
    Integer class labels (rank 2, learner with several outputs) must lie in
    `[0, num_outputs)`, and each task's query classes must all have support examples.

    `MetaLearner.fit`/`evaluate`/`predict`/`*_on_batch` call it on array inputs, before
    anything runs; data from a `tf.data.Dataset` is checked inside the step instead
    (shapes as `ValueError`, values as `InvalidArgumentError`).
    """
    if not (isinstance(inputs, (tuple, list)) and len(inputs) == 3):
        raise ValueError(
            "inputs must be (support_x, support_y, query_x), each with a leading task axis"
        )
    names = ("support_x", "support_y", "query_x", "query_y")
    arrays = {
        name: np.asarray(value)
        for name, value in zip(names, (*inputs, query_y), strict=True)
        if value is not None
    }
    for name, array in arrays.items():
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
        if array.ndim < 2:
            raise ValueError(f"{name} must be [tasks, examples, ...], got shape {array.shape}")
    num_tasks = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(num_tasks.values())) > 1:
        raise ValueError(f"the parts of the episode have different numbers of tasks: {num_tasks}")
    for x_name, y_name in (("support_x", "support_y"), ("query_x", "query_y")):
        if y_name in arrays and arrays[x_name].shape[1] != arrays[y_name].shape[1]:
            raise ValueError(
                f"{x_name} has shape {arrays[x_name].shape} but {y_name} has shape "
                f"{arrays[y_name].shape}: the task and example axes must agree"
            )
    for name, split in (("support_x", "support"), ("query_x", "query")):
        if arrays[name].shape[1] == 0:
            raise ValueError(f"the {split} set is empty: {name} has shape {arrays[name].shape}")
    for name in ("support_x", "query_x"):
        check_example_shape(learner, name, arrays[name].shape)
    for name in ("support_x", "query_x"):
        finite = np.isfinite(arrays[name].astype(np.float64)).reshape(num_tasks[name], -1)
        if not finite.all():
            bad = np.flatnonzero(~finite.all(axis=1)).tolist()
            raise ValueError(f"{name} has non-finite values (NaN or Inf) in task(s) {bad}")
    outputs = getattr(learner, "outputs", None)
    num_outputs = outputs[0].shape[-1] if outputs else None
    labels = {n: arrays[n] for n in ("support_y", "query_y") if n in arrays}
    if (
        num_outputs
        and num_outputs > 1
        and all(np.issubdtype(a.dtype, np.integer) and a.ndim == 2 for a in labels.values())
    ):
        for name, y in labels.items():
            if y.size and (y.min() < 0 or y.max() >= num_outputs):
                raise ValueError(
                    f"{name} has class labels outside [0, {num_outputs}) (the learner's "
                    f"number of outputs): min {y.min()}, max {y.max()}"
                )
        if "query_y" in labels:
            for t, (s_y, q_y) in enumerate(
                zip(labels["support_y"], labels["query_y"], strict=True)
            ):
                missing = sorted(set(q_y.tolist()) - set(s_y.tolist()))
                if missing:
                    raise ValueError(
                        f"task {t}: query classes {missing} have no support examples (the "
                        "support and query sets must have the same ways)"
                    )


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


def check_labels(learner: keras.Model, loss, split: str, x: tf.Tensor, y) -> tf.Tensor:
    """In-graph label checks of an episode's `split` ("support" or "query").

    Static shape agreement of `x` and `y`, one-hot labels with a sparse `loss` refused, and
    integer class labels made to wait for their range checks (in `[0, num_outputs)`).
    Returns `y`.
    """
    y = tf.convert_to_tensor(y)
    if y.shape.rank is not None and y.shape.rank < 2:
        raise ValueError(f"{split}_y must be [tasks, examples, ...], got shape {y.shape}")
    if not x.shape[:2].is_compatible_with(y.shape[:2]):
        raise ValueError(
            f"{split}_x has shape {x.shape} but {split}_y has shape {y.shape}: the task and "
            "example axes must agree"
        )
    num_outputs = learner.outputs[0].shape[-1] if getattr(learner, "outputs", None) else None
    if (
        is_sparse_loss(loss)
        and y.shape.rank == 3
        and num_outputs is not None
        and num_outputs > 1
        and y.shape[-1] == num_outputs
    ):
        raise ValueError(
            f"{split}_y has shape {y.shape}: one-hot labels, but the loss takes integer class "
            "labels; use CategoricalCrossentropy for one-hot labels, or integer labels "
            "[tasks, examples]"
        )
    if y.dtype.is_integer and num_outputs is not None and y.shape.rank == 2:
        label_checks = [
            tf.debugging.assert_non_negative(y, f"{split}_y has negative class labels"),
            tf.debugging.assert_less(
                y,
                tf.cast(num_outputs, y.dtype),
                f"{split}_y has class labels >= {num_outputs}, the learner's number of outputs",
            ),
        ]
        with tf.control_dependencies(label_checks):
            y = tf.identity(y)
    return y


def is_sparse_loss(loss) -> bool:
    """A loss that takes integer class labels (sparse categorical cross-entropy)."""
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True
    name = getattr(loss, "__name__", None) or getattr(loss, "name", None) or str(loss)
    return "sparse_categorical" in str(name)
