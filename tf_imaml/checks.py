"""Argument checks shared by the functional core.

Python numbers and eager tensors are checked at once and raise `ValueError`. Inside a
`tf.function` a value known only when the graph runs cannot raise a Python exception; there
the check becomes a `tf.debugging` assertion (an `InvalidArgumentError` when it runs).
"""

from __future__ import annotations

import numbers

import numpy as np
import tensorflow as tf


def _static_value(value):
    if isinstance(value, numbers.Number):
        return value
    if isinstance(value, tf.Tensor) and not tf.is_symbolic_tensor(value):
        return value.numpy()
    return tf.get_static_value(value)


def _check_real(name: str, static) -> None:
    """Raises `TypeError` unless `static` is a real number (bools and strings are not)."""
    if isinstance(static, (bool, np.bool_)) or not (
        isinstance(static, numbers.Real)
        or (isinstance(static, np.ndarray) and np.issubdtype(static.dtype, np.number))
    ):
        raise TypeError(f"{name} must be a real number, got {static!r} ({type(static).__name__})")


def check_positive(name: str, value) -> None:
    """Raises `ValueError` unless `value > 0` (a graph assertion when not known yet).

    A value that is not a real number (a string, a bool) raises `TypeError`.
    """
    _check_bound(name, value, "> 0", lambda v: v > 0, tf.debugging.assert_positive)


def check_non_negative(name: str, value) -> None:
    """Raises `ValueError` unless `value >= 0` (a graph assertion when not known yet).

    A value that is not a real number (a string, a bool) raises `TypeError`.
    """
    _check_bound(name, value, ">= 0", lambda v: v >= 0, tf.debugging.assert_non_negative)


def _check_bound(name: str, value, bound: str, holds, assert_fn) -> None:
    if isinstance(value, (str, bytes, bool)) or value is None:
        _check_real(name, value)
    static = _static_value(value)
    if static is None:
        assert_fn(value, message=f"{name} must be {bound}")
        return
    _check_real(name, static)
    if not holds(static):
        raise ValueError(f"{name} must be {bound}, got {static}")


def check_choice(name: str, value: str, choices) -> None:
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_finite_per_task(name: str, values: tf.Tensor) -> None:
    """Raises `ValueError` naming the tasks whose `values` are not finite (eager only).

    In a graph nothing is raised: the core reports non-finite values through its results'
    `failed` flags instead, so that one bad task does not stop a whole meta-batch.
    """
    if tf.is_symbolic_tensor(values) or not tf.executing_eagerly():
        return
    finite = tf.math.is_finite(values).numpy()
    if not finite.all():
        bad = [int(i) for i in (~finite).nonzero()[0]]
        raise ValueError(f"{name} is not finite for task(s) {bad}: {values.numpy()[bad]}")
