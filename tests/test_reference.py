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


def test_warm_start_reaches_the_same_point_on_a_convex_objective():
    tasks, theta, _ = _ridge(2.0)
    exact = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, theta, 2.0)
    near = exact + 1e-3 * np.random.default_rng(2).normal(size=exact.shape)
    warm = reference.lbfgs_proximal_minimum(
        testing.ridge_loss_fn(tasks.support_x, tasks.support_y),
        [tf.constant(theta)],
        lam=2.0,
        max_iterations=200,
        init_params=[tf.constant(near)],
    )
    # Oracle: the closed form, as above. G is strongly convex: every start reaches the one
    # minimiser.
    np.testing.assert_allclose(warm.adapted_params[0].numpy(), exact, rtol=1e-9, atol=1e-10)


def test_a_nonconvex_objective_ends_at_the_minimiser_near_its_start():
    # G(phi) = (phi^2 - 1)^2 + lam/2 (phi - theta)^2 at theta = 0, lam = 0.1 has two minima,
    # near -1 and +1 (G'(phi) = 4 phi^3 - 3.9 phi, roots +-sqrt(3.9/4)): L-BFGS from a warm
    # start at 0.9 ends at the positive one, from -0.9 at the negative one. From theta
    # itself (G'(0) = 0, a maximum) it would not move.
    def loss_fn(params):
        (phi,) = params
        return tf.reduce_sum(tf.square(tf.square(phi) - 1.0), axis=1)

    theta = [tf.zeros([2, 1], tf.float64)]
    start = [tf.constant([[0.9], [-0.9]], tf.float64)]
    result = reference.lbfgs_proximal_minimum(
        loss_fn, theta, lam=0.1, max_iterations=100, init_params=start
    )
    root = np.sqrt(3.9 / 4.0)
    np.testing.assert_allclose(result.adapted_params[0].numpy(), [[root], [-root]], atol=1e-9)


def test_bad_arguments_are_refused():
    tasks = testing.linear_tasks(num_tasks=1, num_support=2, num_query=2, dim=2)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    theta = [tf.zeros([1, 2], tf.float64)]
    with pytest.raises(ValueError, match="lam must be >= 0"):
        reference.lbfgs_proximal_minimum(loss_fn, theta, lam=-1.0, max_iterations=5)
    with pytest.raises(ValueError, match="max_iterations"):
        reference.lbfgs_proximal_minimum(loss_fn, theta, lam=1.0, max_iterations=0)
    with pytest.raises(ValueError, match="init_params must be shaped like meta_params"):
        reference.lbfgs_proximal_minimum(
            loss_fn, theta, lam=1.0, max_iterations=5, init_params=[tf.zeros([1, 3], tf.float64)]
        )
