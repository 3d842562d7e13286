"""The task layer: a Keras learner and a loss as per-task closures over task-batched weights.

The functional core (`tf_imaml.inner_solvers`, `tf_imaml.implicit`, `tf_imaml.hvp`) takes
loss closures `params -> [T]` over task-batched parameters (every tensor with a leading task
axis `T`). This module builds them from a Keras learner:

- `meta_params(learner, num_tasks)`: the learner's trainable weights, one copy per task
  (`theta`).
- `apply(learner, params, x, ...)`: the learner's outputs `[T, n, ...]` with per-task weights,
  all tasks in one pass (`tf_imaml.batched`) or task by task (`stateless_call`).
- `per_task_loss(loss, y, pred)`: the mean over each task's examples, `[T]`.
- `loss_fn(learner, loss, x, y, ...)`: `params -> [T]`, e.g. the support loss of the inner
  loop; `loss_and_outputs_fn` also returns the outputs (the query pass).
- `value_and_grad(loss_fn, params)`: per-task losses and gradients (`tf_imaml.hvp`).
- `map_tasks(fn, elems, ...)`: a task-batched function run on one task at a time.

`tf_imaml.meta_model.MetaLearner` is built on these, and so are the studies and the
benchmark: nothing outside the library reaches into a meta-model's private members.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import keras
import tensorflow as tf

from tf_imaml import batched as batched_lib
from tf_imaml import hvp as hvp_lib
from tf_imaml import tree

value_and_grad = hvp_lib.value_and_grad


def meta_params(learner: keras.Model, num_tasks) -> list[tf.Tensor]:
    """`theta`: the learner's trainable weights with a leading task axis of `num_tasks`."""
    return tree.broadcast_to_tasks(
        [tf.convert_to_tensor(v) for v in learner.trainable_variables], num_tasks
    )


def can_batch(learner: keras.Model) -> bool:
    """Whether `apply(..., batched=True)` supports `learner` (see `tf_imaml.batched`)."""
    return not batched_lib.unsupported_layers(learner)


def apply(
    learner: keras.Model,
    params: Sequence[tf.Tensor],
    x: tf.Tensor,
    *,
    batched: bool,
    training: bool = False,
    seed_shift=None,
    task_offset=0,
) -> tf.Tensor:
    """The learner's outputs for task-batched `params` and inputs `x` (`[T, n, ...]`).

    All tasks in one pass (`batched=True`, `tf_imaml.batched`) or task by task with the
    learner's `stateless_call` (`tf.map_fn` over tasks). Normalization statistics come from
    each task's own batch. Outputs are cast to the parameters' dtype (float32 under a mixed
    dtype policy, whose layers compute in float16 or bfloat16).

    Args:
      learner: A built Keras model.
      params: Task-batched trainable weights, in `learner.trainable_variables` order.
      x: Inputs `[T, n, ...]`.
      batched: One pass for all tasks (needs `can_batch(learner)`), or task by task.
      training: The learner's training mode. Default value: `False`.
      seed_shift: With `training`, an int `[2]` tensor added to every random layer's seed
        state (Dropout, noise), plus the task's index (`task_offset + t`) times 1,000,003
        in its first entry: each task draws its own masks, the same at every call with the
        same shift. Default value: `None` (the layers' own seed states).
      task_offset: Index of the first task of `x` in its meta-batch. Default value: `0`.

    Returns:
      Outputs `[T, n, ...]` in the dtype of `params`.
    """
    dtype = params[0].dtype
    if batched:
        return tf.cast(batched_lib.apply(learner, params, x), dtype)
    variables = learner.non_trainable_variables
    non_trainable = [tf.convert_to_tensor(v) for v in variables]
    seed_slots = [i for i, v in enumerate(variables) if is_seed_state(v)] if training else []

    def one(t):
        state = list(non_trainable)
        for i in seed_slots:
            seed_dtype = state[i].dtype
            index = tf.cast(task_offset, seed_dtype) + tf.cast(t, seed_dtype)
            shift = tf.stack([index * 1_000_003, tf.constant(0, seed_dtype)])
            if seed_shift is not None:
                shift += tf.cast(seed_shift, seed_dtype)
            state[i] = state[i] + shift
        out, _ = learner.stateless_call([p[t] for p in params], state, x[t], training=training)
        return tf.cast(out, dtype)

    if params[0].shape[0] == 1:
        return one(0)[tf.newaxis]
    return tf.map_fn(one, tf.range(tf.shape(x)[0]), fn_output_signature=dtype)


def per_task_loss(loss, y: tf.Tensor, pred: tf.Tensor) -> tf.Tensor:
    """The mean of `loss` over each task's examples, `[T]`, in the dtype of `pred`.

    Args:
      loss: A `keras.losses.Loss` or a function `(y_true, y_pred) -> per-example losses`.
      y: Targets `[T, n, ...]`.
      pred: Outputs `[T, n, ...]`.
    """
    per_example = loss.call(y, pred) if isinstance(loss, keras.losses.Loss) else loss(y, pred)
    per_example = tf.cast(per_example, pred.dtype)
    return tf.reduce_mean(tf.reshape(per_example, [tf.shape(pred)[0], -1]), axis=1)


def loss_and_outputs_fn(
    learner: keras.Model, loss, x: tf.Tensor, y: tf.Tensor, **apply_options
) -> Callable[[Sequence[tf.Tensor]], tuple[tf.Tensor, tf.Tensor]]:
    """`params -> (per-task losses [T], outputs [T, n, ...])` on the examples `(x, y)`.

    `apply_options` are those of `apply` (`batched` is required).
    """

    def fn(params):
        pred = apply(learner, params, x, **apply_options)
        return per_task_loss(loss, y, pred), pred

    return fn


def loss_fn(
    learner: keras.Model, loss, x: tf.Tensor, y: tf.Tensor, **apply_options
) -> Callable[[Sequence[tf.Tensor]], tf.Tensor]:
    """`params -> per-task losses [T]` on the examples `(x, y)`: a closure for the core.

    For example the support loss of the inner loop:
    `tasks.loss_fn(learner, loss, support_x, support_y, batched=True)`.
    `apply_options` are those of `apply` (`batched` is required).
    """
    with_outputs = loss_and_outputs_fn(learner, loss, x, y, **apply_options)
    return lambda params: with_outputs(params)[0]


def map_tasks(fn: Callable, elems, *, fn_output_signature):
    """`fn` on each task alone, by `tf.map_fn` over the leading task axis of `elems`.

    `fn` takes and returns task-batched structures: each call gets one task's slices of
    `elems` with a task axis of length 1 (`[1, ...]`), and the outputs' task axes are
    stacked back into `[T, ...]`. This is how a learner that `apply` cannot batch runs a
    per-task computation (`task_batching="per_task"` of `tf_imaml.MetaLearner`).

    Args:
      fn: `task-batched elems of one task -> task-batched outputs of one task`.
      elems: A structure of tensors `[T, ...]`.
      fn_output_signature: The structure of `tf.TensorSpec`s of one task's outputs,
        without the task axis (as `tf.map_fn` takes it).

    Returns:
      `fn`'s outputs for all tasks, `[T, ...]`.
    """

    def one(task):
        outputs = fn(tf.nest.map_structure(lambda x: x[tf.newaxis], task))
        return tf.nest.map_structure(lambda t: t[0], outputs)

    return tf.map_fn(one, elems, fn_output_signature=fn_output_signature)


def is_seed_state(variable) -> bool:
    """The state variable of a `keras.random.SeedGenerator` (Dropout, GaussianNoise, ...)."""
    return variable.name == "seed_generator_state" and tuple(variable.shape) == (2,)
