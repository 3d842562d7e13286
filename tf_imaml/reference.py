"""Reference solutions for checking meta-gradients: the proximal point by L-BFGS.

The implicit meta-gradient is exact only at the exact minimiser of the proximal objective

    G(phi) = L_support(phi) + lam/2 ||phi - theta||^2,

which a few steps of gradient descent do not reach. This module computes that minimiser to
round-off level with `tfp.optimizer.lbfgs_minimize` (quasi-Newton with the Hager-Zhang line
search), so that approximations can be compared against it. It is an oracle, not an inner
solver for training: its cost is hundreds of gradients per task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from tf_imaml import tree


class ProximalMinimumResult(NamedTuple):
    """Where L-BFGS stopped on every task's proximal objective."""

    adapted_params: list  # phi, task-batched like the meta-parameters.
    grad_norm: tf.Tensor  # [T] the norm of grad G at phi.
    num_iterations: tf.Tensor  # Scalar int: L-BFGS iterations (the most any task took).


def lbfgs_proximal_minimum(
    loss_fn: Callable[[list], tf.Tensor],
    meta_params: list,
    *,
    lam: float,
    max_iterations: int,
    tolerance: float = 1e-12,
    num_correction_pairs: int = 20,
    init_params: list | None = None,
) -> ProximalMinimumResult:
    """Minimises every task's `G(phi) = loss_fn(phi) + lam/2 ||phi - theta||^2` by L-BFGS.

    The task-batched parameters are flattened to `[T, N]` and solved as a batch of
    independent problems from `phi = theta`, or from `init_params` (a warm start, e.g. the
    iterate of gradient descent, so that L-BFGS finds the minimiser that path approaches
    when `G` has several). A task stops when the largest entry of its
    gradient is below `tolerance` (or `G` stops changing); the relative tolerances on `phi`
    and `G` are off, so the solver runs until the gradient test or `max_iterations`.

    Args:
      loss_fn: Task-batched support loss: parameters with leading task axis -> losses `[T]`.
      meta_params: theta, a list of tensors with a leading task axis `T`.
      lam: Proximal strength, > 0 for a strongly convex `G` near theta.
      max_iterations: Most L-BFGS iterations.
      tolerance: Gradient tolerance (sup norm) at which a task stops.
        Default value: 1e-12 (round-off level in float64).
      num_correction_pairs: Curvature pairs L-BFGS keeps.
        Default value: 20.
      init_params: The start point, structured like `meta_params`.
        Default value: `None` (theta).

    Returns:
      A `ProximalMinimumResult`.

    Raises:
      ValueError: If `lam` is negative, `max_iterations` is below 1 or `init_params` is not
        shaped like `meta_params`.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
    theta = meta_params
    theta_flat = tree.flatten_tasks(theta)
    start = theta_flat
    if init_params is not None:
        start = tree.flatten_tasks(init_params)
        if start.shape != theta_flat.shape or start.dtype != theta_flat.dtype:
            raise ValueError(
                f"init_params must be shaped like meta_params: {start.dtype.name} "
                f"{start.shape} vs {theta_flat.dtype.name} {theta_flat.shape}"
            )

    @tf.function
    def value_and_gradients(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            params = tree.unflatten_tasks(x, theta)
            value = loss_fn(params) + lam / 2 * tf.reduce_sum(tf.square(x - theta_flat), axis=1)
        return value, tape.gradient(value, x)

    result = tfp.optimizer.lbfgs_minimize(
        value_and_gradients,
        initial_position=start,
        tolerance=tolerance,
        x_tolerance=0.0,
        f_relative_tolerance=0.0,
        num_correction_pairs=num_correction_pairs,
        max_iterations=max_iterations,
    )
    _, grads = value_and_gradients(result.position)
    return ProximalMinimumResult(
        tree.unflatten_tasks(result.position, theta),
        tf.norm(grads, axis=1),
        result.num_iterations,
    )
