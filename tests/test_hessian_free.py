"""The truncated-Newton (Hessian-free) inner solver against closed forms and GD."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hessian_free
from tf_imaml import testing
from tf_imaml import tree


@pytest.mark.parametrize("use_line_search", [True, False])
def test_one_newton_step_solves_ridge(use_line_search, run):
    tasks = testing.linear_tasks(num_tasks=3, num_support=5, num_query=1, dim=4, seed=0)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = tree.broadcast_to_tasks([tf.constant(np.linspace(-1.0, 1.0, 4))], 3)
    result = run(
        lambda: hessian_free.proximal_newton(
            loss_fn, theta, lam=2.0, num_steps=1, cg_steps=4, use_line_search=use_line_search
        ).inner
    )
    exact = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, theta[0], 2.0)
    # Oracle: the closed-form proximal solution; CG is exact in 4 iterations on 4 unknowns,
    # so one Newton step lands on it up to rounding.
    np.testing.assert_allclose(result.adapted_params[0].numpy(), exact, atol=1e-12)
    assert (result.grad_norm.numpy() < 1e-12).all()


def _tanh_newton_fn():
    """`(steps, line_search) -> NewtonSolveResult` on a two-task tanh network, traced."""
    tasks = testing.linear_tasks(num_tasks=2, num_support=8, num_query=1, dim=2, seed=3)
    loss_fn = testing.tanh_mlp_loss_fn(tasks.support_x, tasks.support_y)
    params = testing.tanh_mlp_init(num_tasks=2, dim=2, hidden=5, seed=4)
    return tf.function(
        lambda steps, line_search: hessian_free.proximal_newton(
            loss_fn, params, lam=1.0, num_steps=steps, use_line_search=line_search
        )
    )


def test_line_search_decreases_monotonically_and_converges_on_tanh_network():
    newton = _tanh_newton_fn()

    def solve(steps, line_search):
        return newton(tf.constant(steps), line_search).inner

    objectives = np.stack([solve(k, True).objective.numpy() for k in range(6)])
    # Wolfe line search: every step lowers every task's objective.
    assert (np.diff(objectives, axis=0) < 0).all()
    # Truncated Newton reaches stationarity (property of the method on this smooth problem).
    assert (solve(25, True).grad_norm.numpy() < 1e-6).all()
    # Full Newton steps from this start overshoot: the line search is what makes it work.
    assert solve(1, False).objective.numpy()[0] > objectives[0, 0]


def test_negative_curvature_falls_back_to_steepest_descent_and_stays_finite():
    # L(phi) = -c/2 ||phi||^2 with c > lam: the proximal objective is unbounded below and
    # every CG direction has negative curvature at once.
    c, lam = 3.0, 1.0
    theta = [tf.constant([[1.0, 2.0]], tf.float64)]
    traced = hessian_free.proximal_newton(
        lambda p: -0.5 * c * tree.sq_norm(p), theta, lam=lam, num_steps=2, cg_steps=3
    )
    result = traced.inner
    assert np.isfinite(result.adapted_params[0].numpy()).all()
    # Steepest descent on an unbounded objective moves away from theta and lowers G.
    assert float(result.objective[0]) < -0.5 * c * 5.0
    # Both directions met negative curvature at once; Hager-Zhang's bracket ran out of
    # expansions along a line where G keeps falling: "converged" and "failed" together.
    assert int(traced.num_negative_curvature[0]) == 2 and int(traced.num_steepest_descent[0]) == 2
    np.testing.assert_array_equal(traced.step_status.numpy(), hessian_free.STEP_UNBOUNDED)


def test_bad_values_raise():
    params = [tf.zeros([1, 2], tf.float64)]
    with pytest.raises(ValueError, match="cg_steps must be > 0"):
        hessian_free.proximal_newton(tree.sq_norm, params, lam=1.0, num_steps=1, cg_steps=0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        hessian_free.proximal_newton(tree.sq_norm, params, lam=0.0, num_steps=1)


def _barrier_loss_fn(theta):
    """A support loss that is finite only within 0.03 of `theta` (NaN beyond).

    `L = 1/2 ||phi||^2 + log(1 - 1000 ||phi - theta||^2)`: finite with a finite gradient at
    `theta`, strongly negative curvature there (so CG falls back to `-grad G`), and NaN at
    every step of length above 0.03: no line search can find a point that lowers `G`.
    """

    def loss_fn(params):
        radius = tree.sq_norm(tree.sub(params, theta))
        return 0.5 * tree.sq_norm(params) + tf.math.log(1.0 - 1e3 * radius)

    return loss_fn


def test_a_line_search_that_must_fail_is_reported_and_takes_no_step(run):
    theta = [tf.constant([[1.0, 2.0], [-3.0, 0.5]], tf.float64)]
    result = run(
        lambda: hessian_free.proximal_newton(
            _barrier_loss_fn(theta), theta, lam=1.0, num_steps=3, cg_steps=2
        )
    )
    # Oracle: the construction. Every point the search tries beyond 0.03 is NaN, so
    # Hager-Zhang reports failure; the task keeps theta and G stays at 1/2 ||theta||^2.
    np.testing.assert_array_equal(result.step_status.numpy(), hessian_free.STEP_SEARCH_FAILED)
    np.testing.assert_array_equal(result.num_search_failed.numpy(), [3, 3])
    np.testing.assert_array_equal(result.step_sizes.numpy(), 0.0)
    np.testing.assert_array_equal(result.inner.adapted_params[0].numpy(), theta[0].numpy())
    np.testing.assert_allclose(result.objectives.numpy(), [[2.5, 4.625]] * 4, rtol=1e-15)
    np.testing.assert_array_equal(result.num_steepest_descent.numpy(), [3, 3])
    for field in ("num_non_descent", "num_search_not_converged", "num_non_finite"):
        np.testing.assert_array_equal(getattr(result, field).numpy(), [0, 0], err_msg=field)


def test_without_line_search_the_same_step_is_taken_and_reported_non_finite(run):
    theta = [tf.constant([[1.0, 2.0]], tf.float64)]
    result = run(
        lambda: hessian_free.proximal_newton(
            _barrier_loss_fn(theta), theta, lam=1.0, num_steps=1, use_line_search=False
        )
    )
    assert int(result.step_status[0, 0]) == hessian_free.STEP_NON_FINITE
    assert int(result.num_non_finite[0]) == 1 and float(result.step_sizes[0, 0]) == 1.0
    assert np.isnan(result.objectives.numpy()[1, 0])


def test_a_non_finite_gradient_is_a_non_descent_direction_and_phi_stays_finite():
    # ||phi|| at phi = 0: its gradient is 0/0 = NaN, so the slope grad G . d is NaN.
    theta = [tf.zeros([1, 2], tf.float64)]
    result = hessian_free.proximal_newton(
        lambda p: tf.sqrt(tree.sq_norm(p)), theta, lam=1.0, num_steps=2
    )
    np.testing.assert_array_equal(result.step_status.numpy(), hessian_free.STEP_NON_DESCENT)
    assert int(result.num_non_descent[0]) == 2
    np.testing.assert_array_equal(result.inner.adapted_params[0].numpy(), [[0.0, 0.0]])


def test_trace_matches_separate_solves_and_counts_overshoots_on_tanh_network():
    solve = _tanh_newton_fn()
    traced = solve(tf.constant(5), True)
    # Oracle: the end point of a separate k-step solve (same deterministic computation).
    for k in range(6):
        np.testing.assert_allclose(
            traced.objectives[k].numpy(), solve(tf.constant(k), True).inner.objective.numpy()
        )
    assert (np.diff(traced.objectives.numpy(), axis=0) < 0).all()
    np.testing.assert_array_equal(traced.step_status.numpy(), hessian_free.STEP_TAKEN)
    assert (traced.step_sizes.numpy() > 0).all()
    # The full Newton step overshoots on task 0 (see the monotone test above) and is counted.
    full = solve(tf.constant(1), False)
    assert int(full.step_status[0, 0]) == hessian_free.STEP_INCREASED
    assert int(full.num_increased[0]) == 1
    assert float(full.objectives[1, 0]) > float(full.objectives[0, 0])


def test_zero_steps_under_tf_function_with_unknown_task_count():
    solve = tf.function(
        lambda x, k: hessian_free.proximal_newton(tree.sq_norm, [x], lam=1.0, num_steps=k),
        input_signature=[tf.TensorSpec([None, 2], tf.float64), tf.TensorSpec([], tf.int32)],
    )
    result = solve(tf.ones([3, 2], tf.float64), tf.constant(0))
    assert result.step_status.shape == (0, 3) and result.objectives.shape == (1, 3)
    np.testing.assert_array_equal(result.inner.adapted_params[0].numpy(), np.ones([3, 2]))


@pytest.mark.parametrize("step_size, newton_damping", [(0.3, 0.0), (1.0, 10.0), (0.3, 10.0)])
def test_fixed_step_and_damped_newton_step_on_ridge(step_size, newton_damping, run):
    tasks = testing.linear_tasks(num_tasks=3, num_support=5, num_query=1, dim=4, seed=0)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = tree.broadcast_to_tasks([tf.constant(np.linspace(-1.0, 1.0, 4))], 3)
    lam = 2.0
    traced = run(
        lambda: hessian_free.proximal_newton(
            loss_fn,
            theta,
            lam=lam,
            num_steps=1,
            cg_steps=4,
            use_line_search=False,
            step_size=step_size,
            newton_damping=newton_damping,
        )
    )
    # Oracle: the dense step theta - alpha (H + (lam + mu) I)^-1 grad L(theta) (grad G =
    # grad L at theta), H = 2 X^T X / n (testing.ridge_hessian), solved by np.linalg.solve;
    # CG is exact in 4 iterations on 4 unknowns, so only rounding separates them.
    hessian = testing.ridge_hessian(tasks.support_x)
    x, y, t = tasks.support_x.numpy(), tasks.support_y.numpy(), theta[0].numpy()
    grad = 2.0 * np.einsum("tni,tn->ti", x, np.einsum("tni,ti->tn", x, t) - y) / x.shape[1]
    system = hessian + (lam + newton_damping) * np.eye(4)
    expected = t - step_size * np.linalg.solve(system, grad[..., None])[..., 0]
    np.testing.assert_allclose(traced.inner.adapted_params[0].numpy(), expected, atol=1e-12)
    np.testing.assert_array_equal(traced.step_sizes.numpy(), step_size)
    # The objective keeps lam: G at the new point, not a damped G.
    exact = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, t, lam)
    if (step_size, newton_damping) != (1.0, 0.0):
        assert np.all(np.abs(traced.inner.adapted_params[0].numpy() - exact).max(axis=1) > 1e-3)


def test_hessian_free_solver_passes_step_size_and_damping():
    import tf_imaml

    tasks = testing.linear_tasks(num_tasks=2, num_support=5, num_query=1, dim=3, seed=1)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = tree.broadcast_to_tasks([tf.constant([0.5, -0.5, 1.0], tf.float64)], 2)
    options = dict(use_line_search=False, step_size=0.3, newton_damping=10.0)
    solver = tf_imaml.HessianFree(cg_steps=3, **options)
    got = solver(loss_fn, theta, lam=1.0, num_steps=2, learning_rate=0.1)
    want = hessian_free.proximal_newton(loss_fn, theta, lam=1.0, num_steps=2, cg_steps=3, **options)
    np.testing.assert_array_equal(got.adapted_params[0].numpy(), want.inner.adapted_params[0])
    assert tf_imaml.HessianFree.from_config(solver.get_config()) == solver
    with pytest.raises(ValueError, match="step_size must be > 0"):
        tf_imaml.HessianFree(step_size=0.0)
    with pytest.raises(ValueError, match="newton_damping must be >= 0"):
        hessian_free.proximal_newton(loss_fn, theta, lam=1.0, num_steps=1, newton_damping=-1.0)
