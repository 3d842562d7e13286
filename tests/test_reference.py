"""tf_imaml.reference: the L-BFGS proximal point against the ridge closed form."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import reference
from tf_imaml import testing


def _ridge(lam):
    tasks = testing.linear_tasks(num_tasks=4, num_support=3, num_query=5, dim=6, seed=0)
    theta = np.random.default_rng(1).normal(size=(4, 6))
    result = reference.lbfgs_proximal_minimum(
        testing.ridge_loss_fn(tasks.support_x, tasks.support_y),
        [tf.constant(theta)],
        lam=lam,
        max_iterations=200,
    )
    return tasks, theta, result


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_lbfgs_reaches_the_closed_form_proximal_point(lam):
    tasks, theta, result = _ridge(lam)
    # Oracle: (H + lam I)^-1 (2 X^T y / n + lam theta), solved by np.linalg.solve. Three
    # support points in six dimensions: the support loss alone has no unique minimiser, the
    # proximal term makes G strongly convex with condition number below 1e3 here, so a
    # gradient at round-off level (tolerance 1e-12) puts phi within ~1e-11 of the minimiser.
    exact = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, theta, lam)
    (phi,) = result.adapted_params
    np.testing.assert_allclose(phi.numpy(), exact, rtol=1e-9, atol=1e-10)
    assert np.all(result.grad_norm.numpy() < 1e-9)
    assert 0 < int(result.num_iterations) <= 200


def test_bad_arguments_are_refused():
    tasks = testing.linear_tasks(num_tasks=1, num_support=2, num_query=2, dim=2)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = [tf.zeros([1, 2], tf.float64)]
    with pytest.raises(ValueError, match="lam must be >= 0"):
        reference.lbfgs_proximal_minimum(loss_fn, theta, lam=-1.0, max_iterations=5)
    with pytest.raises(ValueError, match="max_iterations"):
        reference.lbfgs_proximal_minimum(loss_fn, theta, lam=1.0, max_iterations=0)
