"""Conjugate-gradient solvers for task-batched symmetric positive definite systems.

Both solvers share one shape, `solve(matvec_fn, b, *, x0=None, tol, max_iter, max_residual)`,
so the solver is an argument of whatever needs one (`tf_imaml.implicit`). `matvec_fn` maps a
task-batched structure to one like it; it must act on each task's slice separately (the
system is block diagonal, one block per task), so every task gets its own step sizes,
iterations and residual.

- `solve_cg_tf`: `tf.linalg.experimental.conjugate_gradient` over a `tf.linalg.LinearOperator`
  whose matmul is `matvec_fn` on flattened parameters. TensorFlow's loop cannot report
  curvature, so the operator *poisons* a task whose direction has `p.Ap <= 0`: it returns NaN
  for that task, which makes the task's iterate NaN, stops it (TensorFlow's stopping test
  treats NaN as converged) and flags it as failed.
- `solve_cg`: our own CG over parameter lists. A task stops on convergence or on non-positive
  curvature, keeping its last good iterate; converged tasks are frozen while others go on
  (TensorFlow's loop keeps stepping them, which can divide 0 by 0 in float32 once a residual
  vanishes).

A solve *fails* when its final relative residual `||A x - b|| / ||b||` exceeds
`max_residual`, when it met curvature `p.Ap <= 0`, or when its solution is not finite.
The reported residual is CG's recursive one, `r_k = r_{k-1} - alpha A p`, which equals
`b - A x_k` in exact arithmetic; the tests check that they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import tensorflow as tf

from tf_imaml import checks
from tf_imaml import tree

MatvecFn = Callable[[tree.Params], tree.Params]


class LinearSolveResult(NamedTuple):
    """The outcome of a task-batched linear solve. Every field but `solution` is `[T]`."""

    solution: tree.Params  # x, a structure like b.
    num_iterations: tf.Tensor  # int32: CG iterations taken by each task.
    relative_residual: tf.Tensor  # ||b - A x|| / ||b|| (0 where b = 0).
    negative_curvature: tf.Tensor  # bool: a direction with p.Ap <= 0 stopped the task.
    failed: tf.Tensor  # bool: residual > max_residual, negative curvature, or non-finite x.


def _finish(
    solution, num_iterations, residual_norm, b_norm, negative_curvature, breakdown, max_residual
):
    relative = tf.math.divide_no_nan(residual_norm, b_norm)
    finite = tree.all_finite(solution) & tf.math.is_finite(relative)
    too_large = relative > tree.cast(max_residual, relative.dtype)
    failed = negative_curvature | breakdown | ~finite | too_large
    return LinearSolveResult(solution, num_iterations, relative, negative_curvature, failed)


def _linear_solver(default_name: str):
    """Gives a solver core the shared signature, with its defaults in this one place.

    The returned `solve(matvec_fn, b, *, x0=None, tol=1e-5, max_iter=20, max_residual=1.0,
    name=None)` checks the options, opens the name scope (`default_name` unless `name` is
    given), converts `b` to tensors and `x0` to `b`'s dtype after checking that it matches
    `b`, then returns `core(matvec_fn, b, x0, tol, max_iter, max_residual)`. It carries
    the core's docstring.
    """

    def decorate(core):
        def solve(
            matvec_fn: MatvecFn,
            b: tree.Params,
            *,
            x0: tree.Params | None = None,
            tol: float = 1e-5,
            max_iter: int = 20,
            max_residual: float = 1.0,
            name: str | None = None,
        ) -> LinearSolveResult:
            checks.check_non_negative("tol", tol)
            checks.check_non_negative("max_iter", max_iter)
            checks.check_positive("max_residual", max_residual)
            with tf.name_scope(name or default_name):
                b = tree.convert(b)
                if x0 is not None:
                    tree.assert_same_structure(b, x0, what="b and x0")
                    x0 = tree.convert(x0, tree.as_list(b)[0].dtype)
                return core(matvec_fn, b, x0, tol, max_iter, max_residual)

        solve.__name__ = solve.__qualname__ = default_name
        solve.__module__ = core.__module__
        solve.__doc__ = core.__doc__
        return solve

    return decorate


@_linear_solver("solve_cg")
def solve_cg(matvec_fn, b, x0, tol, max_iter, max_residual) -> LinearSolveResult:
    """Conjugate gradient over parameter structures, stopping on non-positive curvature.

    Solves `A x_t = b_t` for every task `t` (Hestenes & Stiefel 1952). A task stops when
    `||r|| <= tol ||b||`, after `max_iter` iterations, or when a search direction has
    `p.Ap <= 0` (then `A` is not positive definite and CG's answer would be meaningless:
    the task keeps its last iterate and is reported as failed).

    Args:
      matvec_fn: `v -> A v`, acting on each task separately.
      b: Right-hand side, a task-batched structure.
      x0: Initial guess like `b`. Default value: `None` (zeros).
      tol: Relative residual at which a task stops. Default value: `1e-5`.
      max_iter: Most iterations (a Python int or an int tensor). Default value: `20`.
      max_residual: A final relative residual above this counts as failure. `1.0` is
        the residual of `x = 0`: no better than doing nothing. Default value: `1.0`.
      name: Name scope. Default value: `None` (`"solve_cg"`).

    Returns:
      A `LinearSolveResult`.

    Raises:
      ValueError: If `x0` does not match `b`, or an option is out of range.
    """
    dtype = tree.as_list(b)[0].dtype
    if x0 is None:
        x, r = tree.zeros_like(b), b
    else:
        x, r = x0, tree.sub(b, matvec_fn(x0))
    b_norm = tree.norm(b)
    threshold = tree.cast(tol, dtype) * b_norm
    gamma = tree.sq_norm(r)
    active = (tf.sqrt(gamma) > threshold) & tf.math.is_finite(gamma)
    num_tasks = tf.shape(gamma)[0]
    iterations = tf.zeros([num_tasks], tf.int32)
    negative = tf.zeros([num_tasks], tf.bool)
    breakdown = tf.zeros([num_tasks], tf.bool)
    zero, one = tf.zeros_like(gamma), tf.ones_like(gamma)

    def cond(i, x, r, p, gamma, active, iterations, negative, breakdown):
        return (i < max_iter) & tf.reduce_any(active)

    def body(i, x, r, p, gamma, active, iterations, negative, breakdown):
        ap = matvec_fn(p)
        curvature = tree.vdot(p, ap)
        bad = active & ~(curvature > 0)  # catches NaN curvature too
        step = active & ~bad
        alpha = tf.where(step, gamma / tf.where(step, curvature, one), zero)
        x = tree.axpy(alpha, p, x)
        r = tree.axpy(-alpha, ap, r)
        gamma_new = tree.sq_norm(r)
        beta = tf.where(step, gamma_new / tf.where(step, gamma, one), zero)
        p = tree.where_tasks(step, tree.axpy(beta, p, r), p)
        gamma = tf.where(step, gamma_new, gamma)
        iterations += tf.cast(step, tf.int32)
        negative |= bad & tf.math.is_finite(curvature)
        breakdown |= bad | (step & ~tf.math.is_finite(gamma_new))
        active = step & (tf.sqrt(gamma_new) > threshold)
        return i + 1, x, r, p, gamma, active, iterations, negative, breakdown

    state = (tf.constant(0), x, r, r, gamma, active, iterations, negative, breakdown)
    _, x, r, _, gamma, _, iterations, negative, breakdown = tf.while_loop(cond, body, state)
    breakdown |= ~tf.math.is_finite(gamma)
    return _finish(x, iterations, tf.sqrt(gamma), b_norm, negative, breakdown, max_residual)


class _FlatOperator(tf.linalg.LinearOperator):
    """`[T, N, N]` block operator whose matvec is `matvec_fn` on unflattened parameters.

    `num_tasks` and `size` are ints or scalar int tensors (where unknown when traced). A
    task whose direction has curvature `p.Ap <= 0` gets NaN back (see module docstring).
    """

    def __init__(self, matvec_fn, like, num_tasks, size, dtype):
        self._matvec_fn = matvec_fn
        self._like = like
        self._num_tasks = num_tasks
        self._size = size
        super().__init__(
            dtype=dtype,
            is_self_adjoint=True,
            is_positive_definite=True,
            is_square=True,
            name="proximal_hessian_operator",
        )

    def _shape(self):
        size = tf.get_static_value(self._size)
        return tf.TensorShape([tf.get_static_value(self._num_tasks), size, size])

    def _shape_tensor(self):
        return tf.stack([self._num_tasks, self._size, self._size])

    def _matvec(self, x, adjoint=False):
        del adjoint  # Self-adjoint.
        ax = tree.flatten_tasks(self._matvec_fn(tree.unflatten_tasks(x, self._like)))
        curvature = tf.reduce_sum(x * ax, axis=-1, keepdims=True)
        return tf.where(curvature > 0, ax, tf.constant(float("nan"), ax.dtype))

    def _matmul(self, x, adjoint=False, adjoint_arg=False):
        if adjoint_arg:
            x = tf.linalg.adjoint(x)
        columns = tf.map_fn(self._matvec, tf.transpose(x, [2, 0, 1]))
        return tf.transpose(columns, [1, 2, 0])


@_linear_solver("solve_cg_tf")
def solve_cg_tf(matvec_fn, b, x0, tol, max_iter, max_residual) -> LinearSolveResult:
    """Conjugate gradient by `tf.linalg.experimental.conjugate_gradient`.

    Same arguments and result as `solve_cg`. Differences: all tasks iterate until every
    task has converged (so `num_iterations` is the same for all), and a task that meets
    curvature `p.Ap <= 0` ends with a NaN solution (flagged `negative_curvature` and
    `failed`) instead of its last good iterate. The number of tasks may be unknown when
    traced (a `tf.function` with a `None` task axis): the operator's sizes are then
    tensors.
    """
    flat_b = tree.flatten_tasks(b)
    num_tasks = tf.shape(flat_b)[0]
    # Unknown when the number of tasks is: flatten_tasks reshapes to [T, -1].
    size = flat_b.shape[-1] if flat_b.shape[-1] is not None else tf.shape(flat_b)[-1]
    operator = _FlatOperator(matvec_fn, b, num_tasks, size, flat_b.dtype)
    if x0 is not None:
        x0 = tree.flatten_tasks(x0)
    state = tf.linalg.experimental.conjugate_gradient(
        operator, flat_b, x=x0, tol=tol, max_iter=max_iter
    )
    solution = tree.unflatten_tasks(state.x, b)
    b_finite = tf.reduce_all(tf.math.is_finite(flat_b), axis=-1)
    x_finite = tf.reduce_all(tf.math.is_finite(state.x), axis=-1)
    # NaN can only enter from the poisoned operator once b is finite, unless the
    # matvec itself overflowed; both mean the operator is unusable for this task.
    negative = b_finite & ~x_finite
    iterations = tf.fill([num_tasks], state.i)
    residual = tf.norm(state.r, axis=-1)
    b_norm = tf.norm(flat_b, axis=-1)
    return _finish(solution, iterations, residual, b_norm, negative, ~b_finite, max_residual)


LINEAR_SOLVERS = {"cg": solve_cg, "cg_tf": solve_cg_tf}
