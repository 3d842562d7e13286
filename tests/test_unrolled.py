"""Unrolled gradient descent (the MAML adaptation) against its closed form on ridge tasks."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import testing
from tf_imaml import tree
from tf_imaml import unrolled

ALPHA, STEPS = 0.05, 7


@pytest.mark.parametrize("first_order", [False, True])
def test_jacobian_is_product_of_step_matrices(first_order, run):
    tasks = testing.linear_tasks(num_tasks=2, num_support=5, num_query=1, dim=3, seed=0)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = tree.broadcast_to_tasks([tf.constant([0.3, -0.2, 0.5], tf.float64)], 2)

    def jacobian():
        with tf.GradientTape() as tape:
            tape.watch(theta)
            result = unrolled.unrolled_gradient_descent(
                loss_fn, theta, num_steps=STEPS, learning_rate=ALPHA, first_order=first_order
            )
        return result.adapted_params[0], tape.batch_jacobian(result.adapted_params[0], theta[0])

    phi, jac = run(jacobian)
    h = testing.ridge_hessian(tasks.support_x)
    step = np.eye(3) - ALPHA * h
    want_jac = np.linalg.matrix_power(step, STEPS) if not first_order else np.eye(3)[None]
    # Oracle: (I - alpha H)^K for the quadratic loss (identity when first-order).
    np.testing.assert_allclose(jac.numpy(), np.broadcast_to(want_jac, (2, 3, 3)), atol=1e-13)
    b = 2 * np.einsum("tnd,tn->td", tasks.support_x.numpy(), tasks.support_y.numpy()) / 5
    want_phi = theta[0].numpy()
    for _ in range(STEPS):
        want_phi = np.einsum("tij,tj->ti", step, want_phi) + ALPHA * b
    np.testing.assert_allclose(phi.numpy(), want_phi, rtol=1e-12)


def test_bad_values_raise():
    loss_fn = testing.ridge_loss_fn(tf.zeros([1, 2, 2], tf.float64), tf.zeros([1, 2], tf.float64))
    params = [tf.zeros([1, 2], tf.float64)]
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        unrolled.unrolled_gradient_descent(loss_fn, params, num_steps=-1, learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        unrolled.unrolled_gradient_descent(loss_fn, params, num_steps=1, learning_rate=0.0)
