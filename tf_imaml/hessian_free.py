"""The Hessian-free inner solver of iMAML-HF: truncated Newton on the proximal objective.

For every task, each step solves the Newton system of
`G(phi) = L_support(phi) + lam/2 ||phi - theta||^2`,

    (H(phi) + lam I) d = -grad G(phi),

approximately by a few conjugate-gradient iterations over Hessian-vector products (Martens
2010; the paper uses 5), then moves `phi <- phi + alpha d` with `alpha` from TensorFlow
Probability's Hager-Zhang line search (Wolfe conditions), run for all tasks at once, or
with a fixed `alpha = step_size` (1: the full Newton step). With `newton_damping = mu > 0`
the directions solve the damped system `(H(phi) + (lam + mu) I) d = -grad G(phi)` instead
(Tikhonov damping, Martens 2010, section 4.1): shorter steps, turned towards `-grad G`, and
positive definite wherever the Hessian's smallest eigenvalue is above `-(lam + mu)`; the
objective `G` keeps `lam`.

CG is `linear_solve.solve_cg`, which stops a task on curvature `p.Ap <= 0` and keeps its last
iterate; a task whose first direction already has non-positive curvature falls back to the
steepest-descent direction `-grad G`. A task whose line search fails takes no step.

`proximal_newton` returns a `NewtonSolveResult`: the adapted parameters with the objective,
gradient norm, step length and a status code of every step, and per-task counts of why a
step was not taken or did not lower `G`. Its `inner` field is the `InnerSolveResult` of
the other inner solvers (`tf_imaml.solvers.HessianFree` returns it).

Each step gets one status, the first that applies:

- `STEP_NON_DESCENT`: the direction has slope `grad G . d > 0` (or a non-finite one); no
  step length lowers `G` along it, so the search is not used (a zero slope, at a point with
  `grad G = 0`, is a step of length 0 with status `STEP_TAKEN`). CG directions are descent
  directions in exact arithmetic (each CG iterate lowers the quadratic model), so this
  flags non-finite values or rounding.
- `STEP_SEARCH_FAILED`: Hager-Zhang reported `failed` and not `converged` (the objective or
  its gradient was not finite at the points it tried).
- `STEP_SEARCH_NOT_CONVERGED`: Hager-Zhang stopped, neither failed nor converged, without a
  point that meets the (approximate) Wolfe conditions within its iteration limit.
- `STEP_NON_FINITE`: the step was taken and `G` or its gradient is not finite afterwards.
- `STEP_INCREASED`: the step was taken and `G` rose (full Newton steps can overshoot;
  Hager-Zhang's approximate Wolfe condition also allows a rise of up to `1e-6 |G|`).
- `STEP_UNBOUNDED`: the step was taken, but Hager-Zhang reported both `converged` and
  `failed`. TFP 0.25 does this when its bracket expansion (factor 5 per iteration) runs out
  of iterations along a line on which `G` keeps falling, i.e. `G` looks unbounded below;
  the step it returns can be enormous (about `1e34` on `-c/2 ||phi||^2`).
- `STEP_TAKEN`: the step was taken and `G` did not rise.

The first three take no step (`alpha = 0`); they and `STEP_UNBOUNDED` occur only with the
line search.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import tensorflow as tf
import tensorflow_probability as tfp

from tf_imaml import checks
from tf_imaml import hvp as hvp_lib
from tf_imaml import inner_solvers
from tf_imaml import linear_solve
from tf_imaml import tree

STEP_TAKEN = 0
STEP_NON_DESCENT = 1
STEP_SEARCH_FAILED = 2
STEP_SEARCH_NOT_CONVERGED = 3
STEP_NON_FINITE = 4
STEP_INCREASED = 5
STEP_UNBOUNDED = 6
STEP_STATUS_NAMES = (
    "taken",
    "non_descent",
    "search_failed",
    "search_not_converged",
    "non_finite",
    "increased",
    "unbounded",
)

_LineValue = collections.namedtuple("_LineValue", ["x", "f", "df"])


class NewtonSolveResult(NamedTuple):
    """A truncated-Newton solve with its per-step trace. `K` steps, `T` tasks."""

    inner: inner_solvers.InnerSolveResult  # phi and the end-point diagnostics.
    objectives: tf.Tensor  # [K + 1, T]: G before the first step and after each step.
    grad_norms: tf.Tensor  # [K + 1, T]: ||grad G|| at the same points.
    step_sizes: tf.Tensor  # [K, T]: alpha of each step (0 where no step was taken).
    step_status: tf.Tensor  # [K, T] int32: a `STEP_*` code per step (see module doc).
    num_negative_curvature: tf.Tensor  # [T] int32: directions whose CG met p.Ap <= 0.
    num_steepest_descent: tf.Tensor  # [T] int32: directions replaced by -grad G.
    num_non_descent: tf.Tensor  # [T] int32: steps with status STEP_NON_DESCENT.
    num_search_failed: tf.Tensor  # [T] int32: steps with status STEP_SEARCH_FAILED.
    num_search_not_converged: tf.Tensor  # [T] int32: status STEP_SEARCH_NOT_CONVERGED.
    num_non_finite: tf.Tensor  # [T] int32: steps with status STEP_NON_FINITE.
    num_increased: tf.Tensor  # [T] int32: steps with status STEP_INCREASED.
    num_unbounded: tf.Tensor  # [T] int32: steps with status STEP_UNBOUNDED.


def proximal_newton(
    support_loss_fn: hvp_lib.LossFn,
    meta_params: tree.Params,
    *,
    lam,
    num_steps,
    cg_steps: int = 5,
    use_line_search: bool = True,
    step_size=1.0,
    newton_damping=0.0,
    hvp_mode: str = "linearized",
    name: str | None = None,
) -> NewtonSolveResult:
    """Truncated-Newton steps on every task's proximal objective, with a per-step trace.

    Args:
      support_loss_fn: Task-batched parameters -> per-task support losses `[T]`.
      meta_params: `theta`, task-batched; the start point (no gradient flows to it).
      lam: Proximal strength, `> 0`.
      num_steps: Newton steps, a Python int or int32 tensor, `>= 0`.
      cg_steps: CG iterations per Newton direction, `>= 1`. Default value: `5`.
      use_line_search: Choose each step length by Hager-Zhang line search; otherwise take
        steps of length `step_size`. Default value: `True`.
      step_size: The step length `alpha` without the line search, `> 0` (unused with it).
        Default value: `1.0` (the full Newton step).
      newton_damping: `mu >= 0` added to `lam` in the Newton system only,
        `(H + (lam + mu) I) d = -grad G`. Default value: `0.0` (the Newton system itself).
      hvp_mode: See `tf_imaml.hvp`. Default value: `"linearized"` (as
        `solvers.DEFAULT_HVP_MODE`).
      name: Name scope. Default value: `None` (`"proximal_newton"`).

    Returns:
      A `NewtonSolveResult`.

    Raises:
      ValueError: If `lam <= 0`, `num_steps < 0`, `cg_steps < 1`, `step_size <= 0` or
        `newton_damping < 0`.
    """
    checks.check_positive("lam", lam)
    checks.check_non_negative("num_steps", num_steps)
    checks.check_positive("cg_steps", cg_steps)
    checks.check_positive("step_size", step_size)
    checks.check_non_negative("newton_damping", newton_damping)
    with tf.name_scope(name or "proximal_newton"):
        meta_params, lam = inner_solvers.constant_theta_and_lam(meta_params, lam)
        dtype = lam.dtype
        num_steps = tf.cast(num_steps, tf.int32)
        objective_fn = inner_solvers.proximal_objective_fn(support_loss_fn, meta_params, lam)
        system_lam = lam + _as(newton_damping, dtype)

        def value_and_grad(params):
            return hvp_lib.value_and_grad(objective_fn, params)

        def step(i, params, objective, grads, traces, counts):
            def matvec(v):
                hv = hvp_lib.hvp(support_loss_fn, params, v, mode=hvp_mode)
                return tree.axpy(system_lam, v, hv)

            minus_g = tree.scale(-1.0, grads)
            solve = linear_solve.solve_cg(matvec, minus_g, max_iter=cg_steps, tol=1e-10)
            stalled = tree.norm(solve.solution) == 0.0
            direction = tree.where_tasks(stalled, minus_g, solve.solution)
            if use_line_search:
                alpha, status = _line_search(value_and_grad, params, direction, grads)
            else:
                alpha = tf.fill(tf.shape(objective), _as(step_size, dtype))
                status = tf.fill(tf.shape(objective), STEP_TAKEN)
            # A step not taken keeps phi as it is (even where `direction` is not finite).
            moved = (status == STEP_TAKEN) | (status == STEP_UNBOUNDED)
            params = tree.where_tasks(moved, tree.axpy(alpha, direction, params), params)
            new_objective, grads = value_and_grad(params)
            grad_norm = tree.norm(grads)
            finite = tf.math.is_finite(new_objective) & tf.math.is_finite(grad_norm)
            status = tf.where(moved & ~finite, STEP_NON_FINITE, status)
            status = tf.where(moved & finite & (new_objective > objective), STEP_INCREASED, status)
            objectives, grad_norms, step_sizes, statuses = traces
            traces = (
                objectives.write(i + 1, new_objective),
                grad_norms.write(i + 1, grad_norm),
                step_sizes.write(i + 1, alpha),
                statuses.write(i + 1, status),
            )
            negative, steepest = counts
            counts = (
                negative + tf.cast(solve.negative_curvature, tf.int32),
                steepest + tf.cast(stalled, tf.int32),
            )
            return i + 1, params, new_objective, grads, traces, counts

        objective, grads = value_and_grad(meta_params)
        num_tasks = tf.shape(objective)[0]
        # Every trace has a row 0 (the per-step ones a dummy, dropped below), so that none
        # is empty when num_steps = 0 (an empty TensorArray of unknown shape cannot stack).
        traces = (
            tf.TensorArray(dtype, size=num_steps + 1).write(0, objective),
            tf.TensorArray(dtype, size=num_steps + 1).write(0, tree.norm(grads)),
            tf.TensorArray(dtype, size=num_steps + 1).write(0, tf.zeros_like(objective)),
            tf.TensorArray(tf.int32, size=num_steps + 1).write(0, tf.zeros([num_tasks], tf.int32)),
        )
        zeros = tf.zeros([num_tasks], tf.int32)
        _, params, objective, grads, traces, counts = tf.while_loop(
            lambda i, *_: i < num_steps,
            step,
            (tf.constant(0), meta_params, objective, grads, traces, (zeros, zeros)),
        )
        objectives, grad_norms, step_sizes, statuses = (t.stack() for t in traces)
        step_sizes, statuses = step_sizes[1:], statuses[1:]

        def count(code):
            return tf.reduce_sum(tf.cast(statuses == code, tf.int32), axis=0)

        inner = inner_solvers.InnerSolveResult(
            params, num_steps, objective, support_loss_fn(params), tree.norm(grads)
        )
        return NewtonSolveResult(
            inner=inner,
            objectives=objectives,
            grad_norms=grad_norms,
            step_sizes=step_sizes,
            step_status=statuses,
            num_negative_curvature=counts[0],
            num_steepest_descent=counts[1],
            num_non_descent=count(STEP_NON_DESCENT),
            num_search_failed=count(STEP_SEARCH_FAILED),
            num_search_not_converged=count(STEP_SEARCH_NOT_CONVERGED),
            num_non_finite=count(STEP_NON_FINITE),
            num_increased=count(STEP_INCREASED),
            num_unbounded=count(STEP_UNBOUNDED),
        )


def _as(value, dtype) -> tf.Tensor:
    """`value` in `dtype`; a Python float converted directly (not rounded through float32)."""
    return tf.cast(tf.convert_to_tensor(value, dtype_hint=dtype), dtype)


def _line_search(value_and_grad, params, direction, grads):
    """Per-task Hager-Zhang step lengths along `direction` (0 where none) and a status."""
    slope = tree.vdot(grads, direction)

    def line_fn(alpha):
        values, g = value_and_grad(tree.axpy(alpha, direction, params))
        return _LineValue(x=alpha, f=values, df=tree.vdot(g, direction))

    result = tfp.optimizer.linesearch.hager_zhang(line_fn, initial_step_size=tf.ones_like(slope))
    converged, failed = result.converged, result.failed
    status = tf.where(converged & failed, STEP_UNBOUNDED, STEP_TAKEN)
    status = tf.where(~converged & ~failed, STEP_SEARCH_NOT_CONVERGED, status)
    status = tf.where(~converged & failed, STEP_SEARCH_FAILED, status)
    # A zero slope means a zero direction (grad G = 0): a step of length 0, nothing wrong.
    status = tf.where(slope < 0, status, tf.where(slope == 0, STEP_TAKEN, STEP_NON_DESCENT))
    usable = (slope < 0) & ((status == STEP_TAKEN) | (status == STEP_UNBOUNDED))
    return tf.where(usable, result.left.x, tf.zeros_like(slope)), status
