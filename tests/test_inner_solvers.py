"""Proximal inner solvers against the closed-form proximal ridge solution."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import inner_solvers
from tf_imaml import testing
from tf_imaml import tree

LAM = 2.0


def _ridge(seed=0):
    tasks = testing.linear_tasks(num_tasks=3, num_support=5, num_query=5, dim=4, seed=seed)
    theta = tree.broadcast_to_tasks([tf.constant(np.linspace(-1.0, 1.0, 4))], 3)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    exact = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, theta[0], LAM)
    return loss_fn, theta, exact


@pytest.mark.parametrize(
    "optimizer",
    [
        inner_solvers.gradient_descent(0.05),
        inner_solvers.momentum(0.02, beta=0.8),
        inner_solvers.momentum(0.02, beta=0.8, nesterov=True),
        inner_solvers.adam(0.05),
    ],
    ids=["gd", "momentum", "nesterov", "adam"],
)
def test_converges_to_closed_form(optimizer, run):
    loss_fn, theta, exact = _ridge()
    result = run(
        lambda: inner_solvers.minimize_proximal(
            loss_fn, theta, lam=LAM, num_steps=3000, optimizer=optimizer
        )
    )
    # Oracle: phi* = (H + lam I)^-1 (2 X^T y / n + lam theta). Strongly convex objective,
    # 3000 steps converge to rounding (GD's contraction is <= 1 - 0.05 * 2 = 0.9 per step).
    np.testing.assert_allclose(result.adapted_params[0].numpy(), exact, atol=1e-8)
    assert (result.grad_norm.numpy() < 1e-7).all()
    # The loss at the end is the loss at phi*, up to the parameter error above (< 1e-8).
    np.testing.assert_allclose(
        result.support_loss.numpy(), loss_fn([tf.constant(exact)]).numpy(), rtol=1e-7
    )


def test_one_gd_step_by_hand():
    loss_fn, theta, _ = _ridge()
    result = inner_solvers.minimize_proximal(
        loss_fn, theta, lam=LAM, num_steps=1, optimizer=inner_solvers.gradient_descent(0.1)
    )
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loss = tf.reduce_sum(loss_fn(theta))
    grad = tape.gradient(loss, theta)[0]
    # Oracle: phi_1 = theta - lr * grad L(theta) (the proximal term's gradient is 0 there).
    np.testing.assert_allclose(
        result.adapted_params[0].numpy(), (theta[0] - 0.1 * grad).numpy(), rtol=1e-14
    )


def test_step_count_is_a_tensor_and_does_not_retrace():
    loss_fn, theta, _ = _ridge()
    traces = []

    @tf.function
    def solve(num_steps):
        traces.append(1)
        return inner_solvers.minimize_proximal(
            loss_fn,
            theta,
            lam=LAM,
            num_steps=num_steps,
            optimizer=inner_solvers.gradient_descent(0.05),
        )

    first = solve(tf.constant(5))
    second = solve(tf.constant(50))
    assert len(traces) == 1
    assert int(first.num_steps) == 5 and int(second.num_steps) == 50
    assert (second.grad_norm.numpy() < first.grad_norm.numpy()).all()
    zero = solve(tf.constant(0))
    np.testing.assert_array_equal(zero.adapted_params[0].numpy(), theta[0].numpy())


def test_no_gradient_flows_through_the_loop():
    loss_fn, theta, _ = _ridge()
    with tf.GradientTape() as tape:
        tape.watch(theta)
        result = inner_solvers.minimize_proximal(
            loss_fn, theta, lam=LAM, num_steps=3, optimizer=inner_solvers.gradient_descent(0.1)
        )
        total = tf.reduce_sum(result.adapted_params[0])
    assert tape.gradient(total, theta)[0] is None


def test_bad_input_raises():
    loss_fn, theta, _ = _ridge()
    gd = inner_solvers.gradient_descent(0.1)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        inner_solvers.minimize_proximal(loss_fn, theta, lam=-1.0, num_steps=3, optimizer=gd)
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        inner_solvers.minimize_proximal(loss_fn, theta, lam=1.0, num_steps=-2, optimizer=gd)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        inner_solvers.gradient_descent(0.0)
    with pytest.raises(ValueError, match="beta must be in"):
        inner_solvers.momentum(0.1, beta=1.0)
    with pytest.raises(ValueError, match="meta_params and init_params do not match"):
        inner_solvers.minimize_proximal(
            loss_fn, theta, lam=1.0, num_steps=1, optimizer=gd, init_params=[theta[0][:, :2]]
        )
    nan_loss = testing.ridge_loss_fn(
        tf.fill([3, 5, 4], tf.constant(np.nan, tf.float64)), tf.zeros([3, 5], tf.float64)
    )
    with pytest.raises(ValueError, match=r"support loss at the start is not finite for task\(s\)"):
        inner_solvers.minimize_proximal(nan_loss, theta, lam=1.0, num_steps=1, optimizer=gd)


def test_minimize_then_pull_back_with_lam_zero_is_plain_gradient_descent():
    loss_fn, theta, _ = _ridge()
    gd = inner_solvers.gradient_descent(0.1)
    plain = inner_solvers.minimize_proximal(loss_fn, theta, lam=0.0, num_steps=4, optimizer=gd)
    pulled = inner_solvers.minimize_then_pull_back(
        loss_fn, theta, lam=0.0, num_steps=4, optimizer=gd, pull_back_rate=0.1
    )
    # Oracle: with lam = 0 the pull-back step is the identity and the objective is the loss.
    for a, b in zip(plain.adapted_params, pulled.adapted_params, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(pulled.objective, pulled.support_loss)
    with pytest.raises(ValueError, match="pull_back_rate must be > 0"):
        inner_solvers.minimize_then_pull_back(
            loss_fn, theta, lam=1.0, num_steps=1, optimizer=gd, pull_back_rate=0.0
        )
