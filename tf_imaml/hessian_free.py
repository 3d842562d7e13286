"""The Hessian-free inner solver of iMAML-HF: truncated Newton on the proximal objective.

For every task, each step solves the Newton system of
`G(phi) = L_support(phi) + lam/2 ||phi - theta||^2`,

    (H(phi) + lam I) d = -grad G(phi),

approximately by a few conjugate-gradient iterations over Hessian-vector products (Martens
2010; the paper uses 5), then moves `phi <- phi + alpha d` with `alpha` from TensorFlow
Probability's Hager-Zhang line search (Wolfe conditions), run for all tasks at once.

CG is `linear_solve.solve_cg`, which stops a task on curvature `p.Ap <= 0` and keeps its last
iterate; a task whose first direction already has non-positive curvature falls back to the
steepest-descent direction `-grad G`. A task whose line search fails takes no step.
"""

from __future__ import annotations

import collections

import tensorflow as tf
import tensorflow_probability as tfp

from tf_imaml import checks
from tf_imaml import hvp as hvp_lib
from tf_imaml import inner_solvers
from tf_imaml import linear_solve
from tf_imaml import tree

_LineValue = collections.namedtuple("_LineValue", ["x", "f", "df"])


def minimize_proximal_newton(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    *,
    lam,
    num_steps,
    cg_steps: int = 5,
    use_line_search: bool = True,
    hvp_mode: str = "reverse_over_reverse",
    name: str | None = None,
) -> inner_solvers.InnerSolveResult:
    """Runs `num_steps` truncated-Newton steps on every task's proximal objective.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      meta_params: `theta`, task-batched; the start point (no gradient flows to it).
      lam: Proximal strength, `> 0`.
      num_steps: Newton steps, a Python int or int32 tensor, `>= 0`.
      cg_steps: CG iterations per Newton direction, `>= 1`. Default value: `5`.
      use_line_search: Choose each step length by Hager-Zhang line search; otherwise take
        the full Newton step (`alpha = 1`). Default value: `True`.
      hvp_mode: See `hvp.hvp`. Default value: `"reverse_over_reverse"`.
      name: Name scope. Default value: `None` (`"minimize_proximal_newton"`).

    Returns:
      An `InnerSolveResult`, as `inner_solvers.minimize_proximal`.

    Raises:
      ValueError: If `lam <= 0`, `num_steps < 0` or `cg_steps < 1`.
    """
    checks.check_positive("lam", lam)
    checks.check_non_negative("num_steps", num_steps)
    checks.check_positive("cg_steps", cg_steps)
    with tf.name_scope(name or "minimize_proximal_newton"):
        meta_params = tree.map_structure(tf.stop_gradient, tree.convert(meta_params))
        dtype = tree.as_list(meta_params)[0].dtype
        lam = tree.cast(lam, dtype)
        objective_fn = inner_solvers.proximal_objective_fn(support_loss_fn, meta_params, lam)

        def value_and_grad(params):
            return hvp_lib.value_and_grad(objective_fn, params)

        def step(i, params):
            _, grads = value_and_grad(params)

            def matvec(v):
                hv = hvp_lib.hvp(support_loss_fn, params, v, mode=hvp_mode)
                return tree.axpy(lam, v, hv)

            minus_g = tree.scale(-1.0, grads)
            solve = linear_solve.solve_cg(matvec, minus_g, max_iter=cg_steps, tol=1e-10)
            stalled = tree.norm(solve.solution) == 0.0
            direction = tree.where_tasks(stalled, minus_g, solve.solution)
            if use_line_search:
                alpha = _line_search(value_and_grad, params, direction, grads)
            else:
                alpha = tf.ones_like(stalled, dtype)
            return i + 1, tree.axpy(alpha, direction, params)

        _, params = tf.while_loop(
            lambda i, _: i < tf.cast(num_steps, tf.int32), step, (tf.constant(0), meta_params)
        )
        losses = support_loss_fn(params)
        objective, grads = value_and_grad(params)
        return inner_solvers.InnerSolveResult(
            params, tf.cast(num_steps, tf.int32), objective, losses, tree.norm(grads)
        )


def _line_search(value_and_grad, params, direction, grads):
    """Per-task Hager-Zhang step lengths along `direction`; 0 where the search fails."""
    slope = tree.vdot(grads, direction)

    def line_fn(alpha):
        values, g = value_and_grad(tree.axpy(alpha, direction, params))
        return _LineValue(x=alpha, f=values, df=tree.vdot(g, direction))

    result = tfp.optimizer.linesearch.hager_zhang(line_fn, initial_step_size=tf.ones_like(slope))
    usable = result.converged & (slope < 0)
    return tf.where(usable, result.left.x, tf.zeros_like(slope))
