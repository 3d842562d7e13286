"""The implicit meta-gradient of iMAML and the `tf.custom_gradient` op that carries it.

At an (approximate) minimiser `phi_t` of `G_t(phi) = L_support_t(phi) + lam/2 ||phi - theta||^2`,
stationarity `grad L_support_t(phi_t) + lam (phi_t - theta) = 0` gives, by the implicit
function theorem, `d phi_t / d theta = (I + H_t / lam)^-1` with `H_t` the support-loss
Hessian at `phi_t` (Rajeswaran et al. 2019, Lemma 1). The meta-gradient of a query loss is
therefore

    g_t = (I + H_t / lam)^-1 grad L_query_t(phi_t),

one symmetric positive definite solve per task (when `H_t > -lam I`), done here by conjugate
gradient over Hessian-vector products: nothing is backpropagated through the inner loop.

`implicit_meta_gradient` is the plain function; `attach_implicit_gradient` wraps it as a
`tf.custom_gradient` op (as jaxopt's `custom_root` wraps `root_vjp`), and `proximal_adapt`
runs the inner solver and attaches the op, so that a tape over `theta` sees the implicit
gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf

from tf_imaml import checks
from tf_imaml import hvp as hvp_lib
from tf_imaml import inner_solvers
from tf_imaml import linear_solve
from tf_imaml import solvers
from tf_imaml import tree

# What a task whose meta-gradient failed contributes; one vocabulary for the op below and
# for `MetaLearner(on_failure=...)` (which also leaves "drop" tasks out of the mean's count).
ON_FAILURE = ("drop", "first_order", "zero", "keep")


class ImplicitGradientResult(NamedTuple):
    """Per-task implicit meta-gradients and how their linear solves went."""

    meta_grads: tree.Params  # g_t = (I + H_t/lam)^-1 v_t, task-batched (raw CG solution).
    solve: linear_solve.LinearSolveResult  # iterations, residual, curvature, failed ([T]).


def implicit_meta_gradient(
    support_loss_fn: hvp_lib.LossFn,
    adapted_params: tree.Params,
    query_grads: tree.Params,
    *,
    lam,
    linear_solver: solvers.CG | str = "cg",
    max_iter: int | None = None,
    tol: float | None = None,
    max_residual: float | None = None,
    damping: float | None = None,
    hvp_mode: str | None = None,
    name: str | None = None,
) -> ImplicitGradientResult:
    """Solves `((1 + damping) I + H_t / (lam + lam_damping)) g_t = v_t` for every task `t`.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      adapted_params: `phi`, the inner solution, with a leading task axis.
      query_grads: `v = grad L_query(phi)`, a structure like `adapted_params`.
      lam: Proximal strength, `> 0`.
      linear_solver: A configured `solvers.CG` (which holds `damping`, `lam_damping`, the
        iterations, tolerances and `hvp_mode`), or a name or function of
        `linear_solve.LINEAR_SOLVERS` configured by the shortcuts below.
        Default value: `"cg"` (`solvers.CG()`).
      max_iter, tol, max_residual, damping, hvp_mode: Shortcuts for the `CG` fields
        `steps`, `tol`, `max_residual`, `damping` and `hvp_mode` when `linear_solver` is a
        name (`solvers.linear_solver_from`). Default value: `None` (`CG`'s defaults).
      name: Name scope. Default value: `None` (`"implicit_meta_gradient"`).

    Returns:
      An `ImplicitGradientResult`. For a failed task `meta_grads` is whatever the solver
      returned (possibly NaN); `apply_failure_policy` chooses what to use instead.

    Raises:
      ValueError: On mismatched structures, `lam <= 0`, a bad solver configuration, or
        (eagerly) non-finite query gradients.
    """
    shortcuts = (max_iter, tol, max_residual, damping, hvp_mode)
    keywords = ("cg_steps", "cg_tol", "max_residual", "damping", "hvp_mode")
    cg = solvers.linear_solver_from(linear_solver, dict(zip(keywords, shortcuts, strict=True)))
    tree.assert_same_structure(adapted_params, query_grads, what="adapted_params and query_grads")
    with tf.name_scope(name or "implicit_meta_gradient"):
        adapted_params = tree.map_structure(tf.stop_gradient, tree.convert(adapted_params))
        query_grads = tree.convert(query_grads)
        checks.check_finite_per_task("query gradient norm", tree.norm(query_grads))
        solve = cg(cg.matvec_fn(support_loss_fn, adapted_params, lam=lam), query_grads)
        return ImplicitGradientResult(solve.solution, solve)


def apply_failure_policy(
    meta_grads: tree.Params, query_grads: tree.Params, failed: tf.Tensor, *, on_failure: str
) -> tree.Params:
    """Replaces the meta-gradients of failed tasks.

    Args:
      meta_grads: Per-task implicit meta-gradients.
      query_grads: Per-task query gradients at the adapted parameters.
      failed: `[T]` bool, from `LinearSolveResult.failed`.
      on_failure: `"first_order"`: use the query gradient (first-order MAML's meta-gradient,
        the limit of the implicit one as `lam -> infinity`); `"zero"` or `"drop"`: the task
        contributes a zero gradient (`aggregate_tasks` also leaves a dropped task out of the
        count it divides by); `"keep"`: leave the solver's answer (may be NaN).

    Returns:
      A structure like `meta_grads`.
    """
    checks.check_choice("on_failure", on_failure, ON_FAILURE)
    if on_failure == "keep":
        return meta_grads
    fallback = query_grads if on_failure == "first_order" else tree.zeros_like(query_grads)
    return tree.where_tasks(failed, fallback, meta_grads)


class TaskAggregate(NamedTuple):
    """The meta-gradients of a meta-batch, summed over the tasks that count."""

    grad_sums: list  # Sum over the counted tasks of each meta-gradient tensor.
    num_used: tf.Tensor  # Scalar: how many tasks count (the mean divides by it).


def aggregate_tasks(
    meta_grads: tree.Params,
    fallback_grads: tree.Params,
    failed: tf.Tensor,
    *,
    on_failure: str,
) -> TaskAggregate:
    """Sums per-task meta-gradients after the failure policy; counts the tasks that count.

    A failed task is treated by `apply_failure_policy`; with `"drop"` it does not count.
    A task whose gradient is still not finite never counts.

    Args:
      meta_grads: Per-task meta-gradients `[T, ...]`.
      fallback_grads: Per-task query gradients at the adapted parameters.
      failed: `[T]` bool.
      on_failure: One of `ON_FAILURE`.

    Returns:
      A `TaskAggregate`.
    """
    checks.check_choice("on_failure", on_failure, ON_FAILURE)
    grads = apply_failure_policy(meta_grads, fallback_grads, failed, on_failure=on_failure)
    usable = ~failed if on_failure == "drop" else tf.ones_like(failed)
    usable &= tree.all_finite(grads)
    grads = tree.where_tasks(usable, grads, tree.zeros_like(grads))
    num_used = tf.reduce_sum(tf.cast(usable, grads[0].dtype))
    return TaskAggregate([tf.reduce_sum(g, axis=0) for g in grads], num_used)


def attach_implicit_gradient(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    adapted_params: tree.Params,
    *,
    lam,
    linear_solver: solvers.CG | str = "cg",
    on_failure: str = "first_order",
) -> tree.Params:
    """Returns `adapted_params` with the implicit gradient `d phi / d theta` attached.

    A `tf.custom_gradient` op: its forward pass is the identity on `adapted_params` (computed
    beforehand, e.g. by `inner_solvers.minimize_proximal`); its backward pass maps an
    upstream gradient `v` (for task `t`, `v_t = dL/d phi_t`) to
    `dL/d theta_t = (I + H_t/lam)^-1 v_t` by `implicit_meta_gradient`, and gives
    `adapted_params` no gradient (nothing flows back through the inner loop). Failed solves
    are handled by `apply_failure_policy(..., on_failure=on_failure)`.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      meta_params: `theta` with a leading task axis; the gradient arrives here per task.
      adapted_params: `phi`, like `meta_params`.
      lam: Proximal strength, `> 0`.
      linear_solver: A configured `solvers.CG`, or the name of its implementation.
        Default value: `"cg"` (`solvers.CG()`).
      on_failure: As in `apply_failure_policy`. Default value: `"first_order"`.

    Returns:
      A structure like `adapted_params`, differentiable with respect to `meta_params`.
    """
    checks.check_choice("on_failure", on_failure, ON_FAILURE)
    linear_solver = solvers.linear_solver_from(linear_solver)
    tree.assert_same_structure(meta_params, adapted_params, what="meta_params and adapted_params")
    theta_leaves = tree.as_list(tree.convert(meta_params))
    phi_leaves = tree.as_list(tree.convert(adapted_params))
    num_leaves = len(theta_leaves)

    @tf.custom_gradient
    def op(*leaves):
        phi = [tf.identity(x) for x in leaves[num_leaves:]]

        def grad_fn(*upstream):
            v = [tf.zeros_like(p) if u is None else u for u, p in zip(upstream, phi, strict=True)]
            phi_tree = tf.nest.pack_sequence_as(adapted_params, phi)
            v_tree = tf.nest.pack_sequence_as(adapted_params, v)
            result = implicit_meta_gradient(
                support_loss_fn, phi_tree, v_tree, lam=lam, linear_solver=linear_solver
            )
            grads = apply_failure_policy(
                result.meta_grads, v_tree, result.solve.failed, on_failure=on_failure
            )
            return tree.as_list(grads) + [tf.zeros_like(p) for p in phi]

        return phi, grad_fn

    out = op(*theta_leaves, *phi_leaves)
    return tf.nest.pack_sequence_as(adapted_params, list(out))


def proximal_adapt(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    *,
    lam,
    num_steps,
    optimizer: inner_solvers.InnerOptimizer,
    linear_solver: solvers.CG | str = "cg",
    on_failure: str = "first_order",
    max_iter: int | None = None,
) -> tuple[tree.Params, inner_solvers.InnerSolveResult]:
    """Adapts to every task and returns `phi(theta)` with the implicit gradient attached.

    `minimize_proximal` followed by `attach_implicit_gradient`.

    Args:
      support_loss_fn, meta_params, lam, num_steps, optimizer: As in
        `inner_solvers.minimize_proximal`.
      linear_solver: As in `implicit_meta_gradient`. Default value: `"cg"`
        (`solvers.CG()`).
      on_failure: As in `apply_failure_policy`. Default value: `"first_order"`.
      max_iter: Shortcut for `CG(steps=...)` when `linear_solver` is a name.
        Default value: `None` (`CG`'s default).

    Returns:
      `(adapted_params, inner_result)`: the first differentiable with respect to
      `meta_params` by the implicit meta-gradient, the second the inner diagnostics.
    """
    cg = solvers.linear_solver_from(linear_solver, {"cg_steps": max_iter})
    inner = inner_solvers.minimize_proximal(
        support_loss_fn, meta_params, lam=lam, num_steps=num_steps, optimizer=optimizer
    )
    adapted = attach_implicit_gradient(
        support_loss_fn,
        meta_params,
        inner.adapted_params,
        lam=lam,
        linear_solver=cg,
        on_failure=on_failure,
    )
    return adapted, inner
