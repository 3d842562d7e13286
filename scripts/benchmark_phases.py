"""The three phases of an iMAML meta-step, timed apart: inner loop, query gradient, solve.

Each phase is its own `tf.function`, built from the meta-model's public seams as its
training step composes them (`MetaLearner.meta_params`, `support_loss_fn`, `inner_solve`,
`query_loss_fn`; `tf_imaml.implicit.implicit_meta_gradient` with the model's `lam` and
`linear_solver`), on the whole meta-batch or one task at a time (`tf_imaml.tasks.map_tasks`)
as the model's `resolved_task_batching` says.
"""

from __future__ import annotations

import time

import numpy as np
import tensorflow as tf

from tf_imaml import implicit
from tf_imaml import tasks


def phase_times(meta, episode, *, repeats: int) -> dict:
    """Median seconds of each phase over `repeats` calls, after one untimed call each.

    Args:
      meta: A compiled `tf_imaml.ImplicitMAML` with a first-order inner solver.
      episode: `((support_x, support_y, query_x), query_y)`, task-batched.
      repeats: Timed calls of each phase.

    Returns:
      `{"inner_loop_s", "query_gradient_s", "linear_solve_s"}`: the inner loop from
      `theta`, the query gradient at the adapted weights, and the linear solve of the
      implicit meta-gradient, each given the previous phase's output.
    """
    (support_x, support_y, query_x), query_y = episode
    grad_spec = [tf.TensorSpec(v.shape, v.dtype) for v in meta.learner.trainable_variables]

    def over_tasks(fn, *elems):
        """`fn` on the whole meta-batch, or task by task like the model's own step."""
        if meta.resolved_task_batching != "per_task":
            return fn(*elems)
        return tasks.map_tasks(lambda e: fn(*e), elems, fn_output_signature=grad_spec)

    def inner_fn(sx, sy):
        support_loss_fn = meta.support_loss_fn(sx, sy, training=True)
        theta = meta.meta_params(tf.shape(sx)[0])
        return meta.inner_solve(theta, support_loss_fn, training=True).adapted_params

    def query_fn(phi, qx, qy):
        query_loss_fn = meta.query_loss_fn(qx, qy, training=True)
        return tasks.value_and_grad(lambda params: query_loss_fn(params)[0], list(phi))[1]

    def solve_fn(phi, v, sx, sy):
        return implicit.implicit_meta_gradient(
            meta.support_loss_fn(sx, sy, training=True),
            list(phi),
            list(v),
            lam=meta.lam,
            linear_solver=meta.linear_solver,
        ).meta_grads

    inner = tf.function(lambda sx, sy: over_tasks(inner_fn, sx, sy))
    query = tf.function(lambda phi, qx, qy: over_tasks(query_fn, phi, qx, qy))
    solve = tf.function(lambda phi, v, sx, sy: over_tasks(solve_fn, phi, v, sx, sy))
    phi = inner(support_x, support_y)
    v = query(phi, query_x, query_y)
    solve(phi, v, support_x, support_y)
    times = {"inner_loop_s": [], "query_gradient_s": [], "linear_solve_s": []}
    for _ in range(repeats):
        for key, fn in (
            ("inner_loop_s", lambda: inner(support_x, support_y)),
            ("query_gradient_s", lambda: query(phi, query_x, query_y)),
            ("linear_solve_s", lambda: solve(phi, v, support_x, support_y)),
        ):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn())
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(value)) for key, value in times.items()}
