"""A meta-learner's computation on a meta-batch, apart from Keras's training loop.

- `AdaptResult`: what an algorithm computes for task-batched tasks, the one result type of
  `MetaLearner.meta_gradient`, of a test-time adaptation and of a whole meta-batch.
- `query_value_and_grad`: per-task query losses, predictions and gradients.
- `check_learner`: what a learner allows (second derivatives, batching over tasks).
- `run_tasks`: a task function on the whole meta-batch, or task by task (`tf.map_fn`).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from tf_imaml import batched as batched_lib
from tf_imaml import checks
from tf_imaml import inner_solvers
from tf_imaml import layers as layers_lib
from tf_imaml import tree

TASK_BATCHING = ("auto", "batched", "support", "per_task")


class AdaptResult(NamedTuple):
    """An algorithm's results for task-batched tasks, each with a leading task axis `[T, ...]`."""

    meta_grads: list  # Per-task meta-gradients, like the learner's trainable variables.
    fallback_grads: list  # What a failed task may use instead (query gradient at phi).
    query_loss: tf.Tensor  # [T] query loss after adaptation.
    query_pred: tf.Tensor  # Query predictions after adaptation.
    inner: inner_solvers.InnerSolveResult  # The adaptation and its diagnostics.
    solver_residual: tf.Tensor  # [T] relative residual of a linear solve, else zeros.
    solver_iterations: tf.Tensor  # [T] float iterations of a linear solve, else zeros.
    failed: tf.Tensor  # [T] bool: the task's meta-gradient is not to be trusted.
    min_curvature: tf.Tensor | None = None  # [T] min eigenvalue of the system, if estimated.
    query_loss_before: tf.Tensor | None = None  # [T] query loss at theta (filled by the model).
    query_pred_before: tf.Tensor | None = None  # Query predictions at theta (likewise).

    @classmethod
    def without_gradients(cls, inner, query_loss, query_pred) -> AdaptResult:
        """An adaptation alone (evaluation, prediction): zero gradients, nothing failed."""
        zeros = tf.zeros_like(query_loss)
        no_grads = tree.zeros_like(inner.adapted_params)
        failed = tf.zeros_like(query_loss, tf.bool)
        return cls(no_grads, no_grads, query_loss, query_pred, inner, zeros, zeros, failed)

    @classmethod
    def signature(cls, learner: keras.Model) -> AdaptResult:
        """The `tf.TensorSpec`s of one task's complete result, for `tf.map_fn`."""
        grads = [tf.TensorSpec(v.shape, v.dtype) for v in learner.trainable_variables]
        dtype = learner.trainable_variables[0].dtype
        scalar, outputs = tf.TensorSpec([], dtype), tf.TensorSpec(None, dtype)
        inner = inner_solvers.InnerSolveResult(
            grads, tf.TensorSpec([], tf.int32), scalar, scalar, scalar
        )
        return cls(grads, grads, scalar, outputs, inner, scalar, scalar, tf.TensorSpec([], tf.bool),
                   scalar, scalar, outputs)  # fmt: skip


def query_value_and_grad(query_loss_fn, params):
    """Query losses `[T]`, predictions and per-task gradients at `params`."""
    with tf.GradientTape() as tape:
        tape.watch(params)
        losses, pred = query_loss_fn(params)
        total = tf.reduce_sum(losses)
    return losses, pred, tape.gradient(total, params, unconnected_gradients="zero")


def check_learner(learner: keras.Model, *, second_order: bool, task_batching: str) -> list:
    """Raises `ValueError` for a learner the meta-learner cannot use; returns batching problems.

    Args:
      learner: A built Keras model with trainable weights.
      second_order: Whether second derivatives are taken through it (then Keras
        normalization layers, whose second derivatives are wrong on TensorFlow, are refused).
      task_batching: One of `TASK_BATCHING`; `"batched"` and `"support"` need a learner that
        `tf_imaml.batched` supports.

    Returns:
      Why `tf_imaml.batched` cannot evaluate the learner for all tasks at once (empty if it
      can).
    """
    if not isinstance(learner, keras.Model):
        raise ValueError(f"learner must be a keras.Model, got {type(learner).__name__}")
    if not learner.built or not learner.trainable_variables:
        raise ValueError("learner must be built and have trainable weights")
    if second_order:
        layers_lib.check_second_order_safe(learner)
    random_layers = layers_lib.random_layers(learner)
    if layers_lib.has_keras_batch_normalization(learner) and random_layers:
        raise ValueError(
            f"{learner.name!r} has Keras BatchNormalization and random layers "
            f"({', '.join(random_layers)}): BatchNormalization runs in training mode at every "
            "step (per-task statistics), which would leave the random layers on at test "
            "time; use tf_imaml.layers.BatchStatNormalization"
        )
    checks.check_choice("task_batching", task_batching, TASK_BATCHING)
    problems = batched_lib.unsupported_layers(learner)
    if task_batching in ("batched", "support") and problems:
        raise ValueError(
            f"task_batching={task_batching!r} needs a learner that tf_imaml.batched "
            "supports: " + "; ".join(problems)
        )
    return problems


def run_tasks(task_fn, episode, *, per_task: bool, signature: AdaptResult) -> AdaptResult:
    """`task_fn(*episode, task_offset=...)` on task-batched tensors, all at once or one by one.

    Args:
      task_fn: `(support_x, support_y, query_x, query_y, *, task_offset) -> AdaptResult`
        over task-batched tensors; `task_offset` is the index of the first task given.
      episode: The four task-batched tensors.
      per_task: Run `task_fn` on one task at a time with `tf.map_fn` (each task its own
        ops, up to 10 at once), else on the whole meta-batch.
      signature: One task's result specs (`AdaptResult.signature`).

    Returns:
      An `AdaptResult` with a leading task axis.
    """
    if not per_task:
        return task_fn(*episode, task_offset=0)

    def one(elems):
        index, *task = elems
        result = task_fn(*[t[tf.newaxis] for t in task], task_offset=index)
        # Per-task fields lose their task axis; a scalar (the inner step count) stays.
        return tf.nest.map_structure(lambda t: t[0] if t.shape.rank else t, result)

    index = tf.range(tf.shape(episode[0])[0])
    return tf.map_fn(one, (index, *episode), fn_output_signature=signature)
