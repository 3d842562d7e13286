"""Arithmetic on parameter structures with a leading task axis.

Every function in the functional core works on *parameter structures*: lists (or any
`tf.nest` structure) of tensors. Structures that belong to a meta-batch carry a leading
task axis: a tensor of a structure for `T` tasks has shape `[T, ...]`, and slice `t` belongs
to task `t` alone. Reductions here (`vdot`, `sq_norm`, `norm`) therefore reduce over every
axis but the first and return one value per task, shape `[T]`.

These are the small pure helpers the rest of the core is written in; none of them reads a
variable or keeps state.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

Params = Any  # A tf.nest structure of tensors (in practice a list).


def assert_same_structure(a: Params, b: Params, *, what: str = "structures") -> None:
    """Raises `ValueError` unless `a` and `b` have the same nesting and static shapes.

    Args:
      a: A structure of tensors.
      b: A structure of tensors.
      what: Words naming the two structures, used in the error message.

    Raises:
      ValueError: If the nesting, the number of leaves or a static shape differ.
    """
    try:
        tf.nest.assert_same_structure(a, b, check_types=False)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{what} do not match: {err}") from None
    for i, (x, y) in enumerate(zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True)):
        sx, sy = tf.TensorShape(x.shape), tf.TensorShape(y.shape)
        if not sx.is_compatible_with(sy):
            raise ValueError(f"{what} do not match: leaf {i} has shape {sx} against {sy}")


def map_structure(fn: Callable[..., tf.Tensor], *trees: Params) -> Params:
    """`tf.nest.map_structure` under a shorter name."""
    return tf.nest.map_structure(fn, *trees)


def add(a: Params, b: Params) -> Params:
    """Leafwise `a + b`."""
    return map_structure(lambda x, y: x + y, a, b)


def sub(a: Params, b: Params) -> Params:
    """Leafwise `a - b`."""
    return map_structure(lambda x, y: x - y, a, b)


def cast(value, dtype: tf.dtypes.DType) -> tf.Tensor:
    """`value` as a tensor of `dtype`; a Python number is converted at full precision.

    (`tf.cast` of a Python float goes through float32 first, losing digits in float64.)
    """
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, dtype)
    return tf.constant(value, dtype)


def _expand(per_task: tf.Tensor, rank: int) -> tf.Tensor:
    """Reshapes `[T]` (or a scalar) to broadcast against a rank-`rank` tensor `[T, ...]`."""
    if per_task.shape.rank == 0:
        return per_task
    return tf.reshape(per_task, tf.concat([tf.shape(per_task), tf.ones([rank - 1], tf.int32)], 0))


def _per_task(scale, leaf: tf.Tensor) -> tf.Tensor:
    return _expand(cast(scale, leaf.dtype), leaf.shape.rank)


def scale(s: tf.Tensor, a: Params) -> Params:
    """`s * a` with `s` a scalar or one value per task (shape `[T]`)."""
    return map_structure(lambda x: _per_task(s, x) * x, a)


def axpy(alpha: tf.Tensor, x: Params, y: Params) -> Params:
    """`alpha * x + y`, `alpha` a scalar or one value per task."""
    return map_structure(lambda u, v: _per_task(alpha, u) * u + v, x, y)


def zeros_like(a: Params) -> Params:
    return map_structure(tf.zeros_like, a)


def _task_sum(x: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(x, axis=list(range(1, x.shape.rank))) if x.shape.rank > 1 else x


def vdot(a: Params, b: Params) -> tf.Tensor:
    """Per-task inner product `sum_i <a_i[t], b_i[t]>`, shape `[T]`."""
    return tf.add_n(
        [_task_sum(x * y) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True)]
    )


def sq_norm(a: Params) -> tf.Tensor:
    """Per-task squared Euclidean norm, shape `[T]`."""
    return vdot(a, a)


def norm(a: Params) -> tf.Tensor:
    """Per-task Euclidean norm, shape `[T]`."""
    return tf.sqrt(sq_norm(a))


def all_finite(a: Params) -> tf.Tensor:
    """Per-task flag: every entry of the task's slice is finite. Shape `[T]`, bool."""
    flags = [
        tf.reduce_all(tf.math.is_finite(tf.reshape(x, [tf.shape(x)[0], -1])), axis=1)
        for x in tf.nest.flatten(a)
    ]
    return tf.reduce_all(tf.stack(flags, axis=0), axis=0)


def where_tasks(cond: tf.Tensor, a: Params, b: Params) -> Params:
    """Per task: `a`'s slice where `cond[t]` else `b`'s. `cond` has shape `[T]`."""
    return map_structure(lambda x, y: tf.where(_expand(cond, x.shape.rank), x, y), a, b)


def broadcast_to_tasks(a: Params, num_tasks: tf.Tensor | int) -> Params:
    """Adds a leading task axis of size `num_tasks`: every task gets a copy of `a`."""

    def tile(x):
        x = tf.convert_to_tensor(x)
        return tf.broadcast_to(x[tf.newaxis], tf.concat([[num_tasks], tf.shape(x)], 0))

    return map_structure(tile, a)


def flatten_tasks(a: Params) -> tf.Tensor:
    """Concatenates a task-batched structure into one `[T, N]` tensor."""
    leaves = tf.nest.flatten(a)
    num_tasks = tf.shape(leaves[0])[0]
    return tf.concat([tf.reshape(x, [num_tasks, -1]) for x in leaves], axis=1)


def unflatten_tasks(flat: tf.Tensor, like: Params) -> Params:
    """Inverse of `flatten_tasks`: splits `[T, N]` into a structure shaped like `like`."""
    leaves = tf.nest.flatten(like)
    sizes = [_static_size(x) for x in leaves]
    pieces = tf.split(flat, sizes, axis=1)
    out = [
        tf.reshape(p, tf.concat([tf.shape(flat)[:1], tf.shape(x)[1:]], 0))
        for p, x in zip(pieces, leaves, strict=True)
    ]
    return tf.nest.pack_sequence_as(like, out)


def _static_size(x: tf.Tensor) -> int:
    shape = x.shape[1:]
    if not shape.is_fully_defined():
        raise ValueError(f"parameter shapes must be static past the task axis, got {x.shape}")
    return int(shape.num_elements())


def task_count(a: Params) -> tf.Tensor:
    """The size of the leading task axis of a structure (a scalar tensor)."""
    return tf.shape(tf.nest.flatten(a)[0])[0]


def convert(a: Params, dtype: tf.dtypes.DType | None = None) -> Params:
    """`tf.convert_to_tensor` on every leaf."""
    return map_structure(lambda x: tf.convert_to_tensor(x, dtype=dtype), a)


def as_list(a: Params | Sequence[tf.Tensor]) -> list:
    """The leaves of a structure as a list."""
    return list(tf.nest.flatten(a))
