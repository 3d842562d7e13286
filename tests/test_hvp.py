"""Hessian-vector products against the dense Hessian (`tape.jacobian` of the gradient)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hvp
from tf_imaml import testing
from tf_imaml import tree


@pytest.mark.parametrize("mode", hvp.HVP_MODES)
def test_hvp_matches_dense_hessian_on_tanh_mlp(mode, run):
    tasks = testing.linear_tasks(num_tasks=2, num_support=6, num_query=1, dim=3)
    loss_fn = testing.tanh_mlp_loss_fn(tasks.support_x, tasks.support_y)
    params = testing.tanh_mlp_init(num_tasks=2, dim=3, hidden=4, seed=1)
    rng = np.random.default_rng(2)
    vector = [tf.constant(rng.normal(size=p.shape)) for p in params]
    got = tree.flatten_tasks(run(lambda: hvp.hvp(loss_fn, params, vector, mode=mode))).numpy()
    dense = testing.dense_hessians(loss_fn, params)
    want = np.einsum("tij,tj->ti", dense, tree.flatten_tasks(vector).numpy())
    # Both are exact float64 derivatives; they differ only by rounding (~1e-15 relative).
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_hvp_of_ridge_is_closed_form():
    tasks = testing.linear_tasks(num_tasks=3, num_support=5, num_query=1, dim=4)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    phi = [tf.constant(np.random.default_rng(0).normal(size=(3, 4)))]
    v = [tf.constant(np.random.default_rng(1).normal(size=(3, 4)))]
    got = hvp.hvp(loss_fn, phi, v)[0].numpy()
    # Oracle: H_t = 2 X_t^T X_t / n exactly; rounding only.
    want = np.einsum("tij,tj->ti", testing.ridge_hessian(tasks.support_x), v[0].numpy())
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_proximal_matvec_adds_identity_and_damping():
    tasks = testing.linear_tasks(num_tasks=2, num_support=5, num_query=1, dim=3)
    loss_fn = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    phi = [tf.zeros([2, 3], tf.float64)]
    v = [tf.constant(np.random.default_rng(3).normal(size=(2, 3)))]
    matvec = hvp.make_proximal_matvec(loss_fn, phi, lam=2.0, damping=0.5)
    h = testing.ridge_hessian(tasks.support_x)
    # Oracle: ((1 + damping) I + H / lam) v with the closed-form H; rounding only.
    want = 1.5 * v[0].numpy() + np.einsum("tij,tj->ti", h, v[0].numpy()) / 2.0
    np.testing.assert_allclose(matvec(v)[0].numpy(), want, rtol=1e-12)


def test_bad_input_raises():
    params = [tf.zeros([2, 3], tf.float64)]
    loss_fn = testing.ridge_loss_fn(tf.zeros([2, 4, 3], tf.float64), tf.zeros([2, 4], tf.float64))
    with pytest.raises(ValueError, match="params and vector do not match"):
        hvp.hvp(loss_fn, params, [tf.zeros([2, 4], tf.float64)])
    with pytest.raises(ValueError, match="mode"):
        hvp.hvp(loss_fn, params, params, mode="finite_differences")
    with pytest.raises(ValueError, match="lam must be > 0"):
        hvp.make_proximal_matvec(loss_fn, params, lam=0.0)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        hvp.make_proximal_matvec(loss_fn, params, lam=1.0, damping=-1.0)
