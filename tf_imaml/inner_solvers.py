"""Proximal inner solvers: the per-task adaptation of iMAML.

For every task `t` they approximately minimise the proximal objective

    G_t(phi) = L_support_t(phi) + lam / 2 * ||phi - theta_t||^2

starting from `phi = theta_t` (Rajeswaran et al. 2019, eq. 3), for a number of steps given as
a tensor (a new number does not retrace a `tf.function`). The update rule is an
`InnerOptimizer`, a pair of pure functions in the style of optax's `GradientTransformation`:
`init_fn(params) -> state` and `update_fn(grads, state, step) -> (updates, state)`, applied as
`phi <- phi + updates`. `gradient_descent` is the paper's iMAML-GD; `momentum` and `adam` are
alternatives.

The result carries the diagnostics the theory asks about: the final proximal objective and
the norm of its gradient, `||grad G_t(phi)||`, which is the `delta` of the paper's
delta-approximate inner solution (Definition 1 and Theorem 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from tf_imaml import checks
from tf_imaml import hvp as hvp_lib
from tf_imaml import tree


class InnerOptimizer(NamedTuple):
    """An update rule for the inner loop, as two pure functions."""

    init_fn: Callable[[tree.Params], tuple]  # params -> optimizer state (tensors).
    update_fn: Callable  # (grads, state, step) -> (updates, new state); step counts from 0.


class InnerSolveResult(NamedTuple):
    """Adapted parameters and diagnostics. Every field but the first two is `[T]`."""

    adapted_params: tree.Params  # phi, task-batched like meta_params.
    num_steps: tf.Tensor  # int32 scalar: steps taken.
    objective: tf.Tensor  # G_t(phi): support loss plus proximal term, at the end.
    support_loss: tf.Tensor  # L_support_t(phi) at the end.
    grad_norm: tf.Tensor  # ||grad G_t(phi)|| at the end: the stationarity delta.


def gradient_descent(learning_rate: float) -> InnerOptimizer:
    """Plain gradient descent, `phi <- phi - learning_rate * grad` (iMAML-GD).

    Converges on the proximal objective when `learning_rate * (lam + L) < 2`, `L` the
    largest eigenvalue of the support-loss Hessian.
    """
    checks.check_positive("learning_rate", learning_rate)

    def init_fn(params):
        del params
        return ()

    def update_fn(grads, state, step):
        del step
        return tree.scale(-learning_rate, grads), state

    return InnerOptimizer(init_fn, update_fn)


def momentum(learning_rate: float, *, beta: float = 0.9, nesterov: bool = False) -> InnerOptimizer:
    """Heavy-ball momentum: `m <- beta m + g`, `phi <- phi - learning_rate * m`.

    Args:
      learning_rate: Step size.
      beta: Momentum decay in [0, 1). Default value: `0.9`.
      nesterov: Use Nesterov's look-ahead form `g + beta m`. Default value: `False`.
    """
    checks.check_positive("learning_rate", learning_rate)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")

    def init_fn(params):
        return (tree.zeros_like(params),)

    def update_fn(grads, state, step):
        del step
        (m,) = state
        m = tree.axpy(beta, m, grads)
        direction = tree.axpy(beta, m, grads) if nesterov else m
        return tree.scale(-learning_rate, direction), (m,)

    return InnerOptimizer(init_fn, update_fn)


def adam(
    learning_rate: float, *, beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-8
) -> InnerOptimizer:
    """Adam (Kingma & Ba 2015) with bias correction, state reset for every task.

    Args:
      learning_rate: Step size.
      beta_1: First-moment decay in [0, 1). Default value: `0.9`.
      beta_2: Second-moment decay in [0, 1). Default value: `0.999`.
      epsilon: Added to the root of the second moment. Default value: `1e-8`.
    """
    checks.check_positive("learning_rate", learning_rate)
    checks.check_positive("epsilon", epsilon)
    for name, beta in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")

    def init_fn(params):
        return (tree.zeros_like(params), tree.zeros_like(params))

    def update_fn(grads, state, step):
        m, v = state
        m = tree.map_structure(lambda a, g: beta_1 * a + (1.0 - beta_1) * g, m, grads)
        v = tree.map_structure(lambda a, g: beta_2 * a + (1.0 - beta_2) * g * g, v, grads)
        t = tf.cast(step + 1, tree.as_list(grads)[0].dtype)
        lr_t = learning_rate * tf.sqrt(1.0 - beta_2**t) / (1.0 - beta_1**t)
        updates = tree.map_structure(lambda a, b: -lr_t * a / (tf.sqrt(b) + epsilon), m, v)
        return updates, (m, v)

    return InnerOptimizer(init_fn, update_fn)


def proximal_objective_fn(support_loss_fn: hvp_lib.LossFn, meta_params: tree.Params, lam):
    """`phi -> L_support(phi) + lam/2 ||phi - theta||^2`, per task, as a loss closure."""

    def objective_fn(params):
        return support_loss_fn(params) + 0.5 * lam * tree.sq_norm(tree.sub(params, meta_params))

    return objective_fn


def constant_theta_and_lam(meta_params: tree.Params, lam) -> tuple[tree.Params, tf.Tensor]:
    """`theta` as a constant of the inner loop (no gradient flows back through it) and
    `lam` in its dtype: how every inner solver starts."""
    meta_params = tree.map_structure(tf.stop_gradient, tree.convert(meta_params))
    return meta_params, tree.cast(lam, tree.as_list(meta_params)[0].dtype)


def _proximal_value_and_grad(support_loss_fn, params, meta_params, lam):
    losses, grads = hvp_lib.value_and_grad(support_loss_fn, params)
    diff = tree.sub(params, meta_params)
    objective = losses + 0.5 * lam * tree.sq_norm(diff)
    return losses, objective, tree.axpy(lam, diff, grads)


def minimize_proximal(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    *,
    lam,
    num_steps,
    optimizer: InnerOptimizer,
    init_params: tree.Params | None = None,
    name: str | None = None,
) -> InnerSolveResult:
    """Runs `num_steps` of `optimizer` on every task's proximal objective.

    No gradient flows through this loop to `meta_params`: the implicit meta-gradient
    (`tf_imaml.implicit`) replaces backpropagation through it, so memory does not grow with
    `num_steps`.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      meta_params: `theta`, with a leading task axis (see `tree.broadcast_to_tasks`).
      lam: Proximal strength, `>= 0` (`0` is plain minimisation of the support loss, as
        in test-time fine-tuning without the proximal term).
      num_steps: Number of inner steps, a Python int or an int32 tensor, `>= 0`.
      optimizer: The update rule, e.g. `gradient_descent(0.1)`.
      init_params: Where to start. Default value: `None` (at `meta_params`, as the paper).
      name: Name scope. Default value: `None` (`"minimize_proximal"`).

    Returns:
      An `InnerSolveResult`.

    Raises:
      ValueError: If `lam < 0`, `num_steps < 0`, `init_params` does not match
        `meta_params`, or (eagerly) the support loss is not finite at the start.
    """
    checks.check_non_negative("lam", lam)
    checks.check_non_negative("num_steps", num_steps)
    with tf.name_scope(name or "minimize_proximal"):
        meta_params, lam = constant_theta_and_lam(meta_params, lam)
        dtype = lam.dtype
        if init_params is None:
            params = meta_params
        else:
            tree.assert_same_structure(meta_params, init_params, what="meta_params and init_params")
            params = tree.map_structure(tf.stop_gradient, tree.convert(init_params, dtype))
        if tf.executing_eagerly():
            checks.check_finite_per_task("support loss at the start", support_loss_fn(params))
        num_steps = tf.cast(num_steps, tf.int32)

        def body(step, params, state):
            _, _, grads = _proximal_value_and_grad(support_loss_fn, params, meta_params, lam)
            updates, state = optimizer.update_fn(grads, state, step)
            return step + 1, tree.add(params, updates), state

        _, params, _ = tf.while_loop(
            lambda step, *_: step < num_steps,
            body,
            (tf.constant(0), params, optimizer.init_fn(params)),
        )
        losses, objective, grads = _proximal_value_and_grad(
            support_loss_fn, params, meta_params, lam
        )
        return InnerSolveResult(params, num_steps, objective, losses, tree.norm(grads))


def minimize_then_pull_back(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    *,
    lam,
    num_steps,
    optimizer: InnerOptimizer,
    pull_back_rate: float,
    name: str | None = None,
) -> InnerSolveResult:
    """The inner loop of the authors' code: plain steps, then one proximal pull-back step.

    `num_steps` of `optimizer` on the support loss alone, from `phi = theta`, then one
    gradient step of size `pull_back_rate` on the proximal term `lam/2 ||phi - theta||^2`:

        phi <- phi - pull_back_rate * lam * (phi - theta)

    (Rajeswaran et al.'s `imaml_dev` Omniglot example: `learn_task`, then one inner-optimizer
    step on `regularization_loss`). With `lam = 0` this is plain fine-tuning. The
    diagnostics describe the proximal objective `G` at the returned `phi`.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      meta_params: `theta`, with a leading task axis.
      lam: Proximal strength of the pull-back, `>= 0`.
      num_steps: Plain inner steps, a Python int or an int32 tensor, `>= 0`.
      optimizer: The update rule of the plain steps, e.g. `gradient_descent(0.1)`.
      pull_back_rate: Step size of the pull-back, `> 0` (the authors use the inner step
        size).
      name: Name scope. Default value: `None` (`"minimize_then_pull_back"`).

    Returns:
      An `InnerSolveResult`; `num_steps` counts the plain steps.

    Raises:
      ValueError: If `lam < 0`, `pull_back_rate <= 0` or `num_steps < 0`.
    """
    checks.check_non_negative("lam", lam)
    checks.check_positive("pull_back_rate", pull_back_rate)
    with tf.name_scope(name or "minimize_then_pull_back"):
        meta_params, lam = constant_theta_and_lam(meta_params, lam)
        dtype = lam.dtype
        plain = minimize_proximal(
            support_loss_fn, meta_params, lam=0.0, num_steps=num_steps, optimizer=optimizer
        )
        shrink = tree.cast(pull_back_rate, dtype) * lam
        params = tree.axpy(
            -shrink, tree.sub(plain.adapted_params, meta_params), plain.adapted_params
        )
        losses, objective, grads = _proximal_value_and_grad(
            support_loss_fn, params, meta_params, lam
        )
        return InnerSolveResult(params, plain.num_steps, objective, losses, tree.norm(grads))


INNER_OPTIMIZERS = {"gd": gradient_descent, "momentum": momentum, "adam": adam}
