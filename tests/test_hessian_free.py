"""The truncated-Newton (Hessian-free) inner solver against closed forms and GD."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hessian_free
from tf_imaml import problems
from tf_imaml import tree


@pytest.mark.parametrize("use_line_search", [True, False])
def test_one_newton_step_solves_ridge(use_line_search, run):
    tasks = problems.linear_tasks(num_tasks=3, num_support=5, num_query=1, dim=4, seed=0)
    loss_fn = problems.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = tree.broadcast_to_tasks([tf.constant(np.linspace(-1.0, 1.0, 4))], 3)
    result = run(
        lambda: hessian_free.minimize_proximal_newton(
            loss_fn, theta, lam=2.0, num_steps=1, cg_steps=4, use_line_search=use_line_search
        )
    )
    exact = problems.ridge_proximal_solution(tasks.support_x, tasks.support_y, theta[0], 2.0)
    # Oracle: the closed-form proximal solution; CG is exact in 4 iterations on 4 unknowns,
    # so one Newton step lands on it up to rounding.
    np.testing.assert_allclose(result.adapted_params[0].numpy(), exact, atol=1e-12)
    assert (result.grad_norm.numpy() < 1e-12).all()


def test_line_search_decreases_monotonically_and_converges_on_tanh_network():
    tasks = problems.linear_tasks(num_tasks=2, num_support=8, num_query=1, dim=2, seed=3)
    loss_fn = problems.tanh_mlp_loss_fn(tasks.support_x, tasks.support_y)
    params = problems.tanh_mlp_init(num_tasks=2, dim=2, hidden=5, seed=4)
    solve = tf.function(
        lambda steps, line_search: hessian_free.minimize_proximal_newton(
            loss_fn, params, lam=1.0, num_steps=steps, use_line_search=line_search
        )
    )
    objectives = np.stack([solve(tf.constant(k), True).objective.numpy() for k in range(6)])
    # Wolfe line search: every step lowers every task's objective.
    assert (np.diff(objectives, axis=0) < 0).all()
    # Truncated Newton reaches stationarity (property of the method on this smooth problem).
    assert (solve(tf.constant(25), True).grad_norm.numpy() < 1e-6).all()
    # Full Newton steps from this start overshoot: the line search is what makes it work.
    assert solve(tf.constant(1), False).objective.numpy()[0] > objectives[0, 0]


def test_negative_curvature_falls_back_to_steepest_descent_and_stays_finite():
    # L(phi) = -c/2 ||phi||^2 with c > lam: the proximal objective is unbounded below and
    # every CG direction has negative curvature at once.
    c, lam = 3.0, 1.0
    theta = [tf.constant([[1.0, 2.0]], tf.float64)]
    result = hessian_free.minimize_proximal_newton(
        lambda p: -0.5 * c * tree.sq_norm(p), theta, lam=lam, num_steps=2, cg_steps=3
    )
    assert np.isfinite(result.adapted_params[0].numpy()).all()
    # Steepest descent on an unbounded objective moves away from theta and lowers G.
    assert float(result.objective[0]) < -0.5 * c * 5.0


def test_bad_values_raise():
    params = [tf.zeros([1, 2], tf.float64)]
    with pytest.raises(ValueError, match="cg_steps must be > 0"):
        hessian_free.minimize_proximal_newton(
            tree.sq_norm, params, lam=1.0, num_steps=1, cg_steps=0
        )
    with pytest.raises(ValueError, match="lam must be > 0"):
        hessian_free.minimize_proximal_newton(tree.sq_norm, params, lam=0.0, num_steps=1)
