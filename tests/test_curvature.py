"""Lanczos eigenvalue estimates against dense `np.linalg.eigvalsh` (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import curvature
from tf_imaml import inner_solvers
from tf_imaml import testing
from tf_imaml import tree


def _matrix_operator(matrices, like):
    """`v -> A_t v_t` over a structure like `like`, for dense per-task matrices `[T, n, n]`."""
    a = tf.constant(matrices)

    def matvec(v):
        flat = tree.flatten_tasks(v)
        return tree.unflatten_tasks(tf.einsum("tij,tj->ti", a, flat), like)

    return matvec


def _random_symmetric(num_tasks, n, seed):
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(num_tasks, n, n))
    return (m + np.transpose(m, (0, 2, 1))) / 2.0


def _like(num_tasks):
    # 12 numbers per task in two leaves of different rank.
    return [tf.zeros([num_tasks, 4], tf.float64), tf.zeros([num_tasks, 2, 4], tf.float64)]


def test_full_lanczos_gives_every_eigenvalue_of_a_random_symmetric_matrix(run):
    like = _like(3)
    matrices = _random_symmetric(3, 12, seed=0)
    result = run(
        lambda: curvature.lanczos_extreme_eigenvalues(
            _matrix_operator(matrices, like), like, num_iter=12, seed=1
        )
    )
    want = np.linalg.eigvalsh(matrices)
    # With m = n and full reorthogonalisation, T_m = Q^T A Q is A in another orthonormal
    # basis: the same spectrum up to float64 rounding (entries are O(1), n = 12).
    np.testing.assert_allclose(result.ritz_values.numpy(), want, atol=1e-10)
    np.testing.assert_allclose(result.min_eigenvalue.numpy(), want[:, 0], atol=1e-10)
    np.testing.assert_allclose(result.max_eigenvalue.numpy(), want[:, -1], atol=1e-10)
    assert int(result.num_iterations) == 12


def test_few_iterations_bracket_and_converge_to_separated_extremes():
    # Per task: eigenvalues -5 and 10 (separated) and 38 more in [0, 1], in a random basis.
    rng = np.random.default_rng(3)
    num_tasks, n = 2, 40
    matrices = []
    for _ in range(num_tasks):
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        eig = np.concatenate([[-5.0, 10.0], rng.uniform(0.0, 1.0, n - 2)])
        matrices.append(q @ np.diag(eig) @ q.T)
    matrices = np.stack(matrices)
    like = [tf.zeros([num_tasks, n], tf.float64)]
    operator = _matrix_operator(matrices, like)
    want = np.linalg.eigvalsh(matrices)
    for num_iter in (3, 6):
        result = curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=num_iter, seed=0)
        # Cauchy interlacing (T_m = Q^T A Q with orthonormal Q): the Ritz values lie inside
        # [lambda_min, lambda_max] for every m; 1e-12 allows for rounding.
        assert np.all(result.min_eigenvalue.numpy() >= want[:, 0] - 1e-12)
        assert np.all(result.max_eigenvalue.numpy() <= want[:, -1] + 1e-12)
    result = curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=14, seed=0)
    # Kaniel-Paige: the error of an extreme Ritz value falls like a Chebyshev polynomial in
    # the gap ratio; with gaps of 5 and 9 against a spread of 15, 14 iterations leave an
    # error far below 1e-8 (measured: about 1e-13). A broken recurrence misses by O(1).
    np.testing.assert_allclose(result.min_eigenvalue.numpy(), want[:, 0], atol=1e-8)
    np.testing.assert_allclose(result.max_eigenvalue.numpy(), want[:, -1], atol=1e-8)


def test_an_exhausted_krylov_space_restarts_with_the_right_spectrum():
    # Two distinct eigenvalues (2 and -1, multiplicities 5 and 3): the Krylov space of any
    # start vector has dimension 2, so Lanczos breaks down after two steps; the restarts
    # must still produce T = Q^T A Q with all eight eigenvalues.
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    matrix = q @ np.diag([2.0] * 5 + [-1.0] * 3) @ q.T
    like = [tf.zeros([1, 8], tf.float64)]
    result = curvature.lanczos_extreme_eigenvalues(
        _matrix_operator(matrix[np.newaxis], like), like, num_iter=8, seed=2
    )
    # The restart threshold is sqrt(eps) times the operator's scale: a true breakdown here
    # leaves |beta| ~ 1e-15, so the spectrum is exact up to rounding.
    np.testing.assert_allclose(result.ritz_values.numpy()[0], [-1.0] * 3 + [2.0] * 5, atol=1e-10)


def test_proximal_curvature_matches_the_dense_hessian_of_a_tanh_net(run):
    tasks = testing.linear_tasks(num_tasks=2, num_support=6, num_query=1, dim=3)
    loss_fn = testing.tanh_mlp_loss_fn(tasks.support_x, tasks.support_y)
    params = testing.tanh_mlp_init(num_tasks=2, dim=3, hidden=4, seed=1)
    dim = int(tree.flatten_tasks(params).shape[1])
    hessian_eig = np.linalg.eigvalsh(testing.dense_hessians(loss_fn, params))
    # The eigenvalues of I + H / lam at lam = 2 and lam = 10.
    want_2, want_10 = 1.0 + hessian_eig / 2.0, 1.0 + hessian_eig / 10.0
    full, few = run(
        lambda: (
            curvature.proximal_curvature(loss_fn, params, lam=2.0, num_iter=dim, seed=0),
            curvature.proximal_curvature(loss_fn, params, lam=10.0, num_iter=5, seed=0),
        )
    )
    # Full Lanczos on exact float64 Hessian-vector products: rounding only (entries O(1)).
    np.testing.assert_allclose(full.ritz_values.numpy(), want_2, atol=1e-9)
    # The Hessians' smallest eigenvalues (-8.1 and -4.0) are below -lam at lam = 2: I + H/lam
    # is indefinite for both tasks and the estimate says so.
    assert np.all(want_2[:, 0] < 0) and np.all(full.min_eigenvalue.numpy() < 0)
    # At lam = 10 it is positive definite; five iterations give an upper bound (interlacing).
    assert np.all(want_10[:, 0] > 0)
    assert np.all(few.min_eigenvalue.numpy() >= want_10[:, 0] - 1e-12)
    assert np.all(few.max_eigenvalue.numpy() <= want_10[:, -1] + 1e-12)


def test_same_seed_same_estimate_and_bad_num_iter():
    like = _like(2)
    operator = _matrix_operator(_random_symmetric(2, 12, seed=4), like)
    a = curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=4, seed=7)
    b = curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=4, seed=7)
    c = curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=4, seed=8)
    np.testing.assert_array_equal(a.ritz_values.numpy(), b.ritz_values.numpy())
    assert not np.allclose(a.ritz_values.numpy(), c.ritz_values.numpy())
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_iter must be an int >= 1"):
            curvature.lanczos_extreme_eigenvalues(operator, like, num_iter=bad)


def _classification_meta(**kwargs):
    keras.utils.set_random_seed(1)
    learner = tf_imaml.models.conv4_classifier(3, input_shape=(8, 8, 1), filters=4)
    meta = tf_imaml.ImplicitMAML(
        learner, inner_steps=3, inner_learning_rate=0.1, cg_steps=2, **kwargs
    )
    meta.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return meta


def _classification_episode(num_tasks=3):
    rng = np.random.default_rng(0)
    sx = rng.normal(size=(num_tasks, 3, 8, 8, 1)).astype("float32")
    qx = rng.normal(size=(num_tasks, 6, 8, 8, 1)).astype("float32")
    sy = np.tile(np.arange(3, dtype="int32"), (num_tasks, 1))
    qy = np.tile(np.arange(3, dtype="int32"), (num_tasks, 2))
    return (sx, sy, qx), qy


@pytest.mark.slow
def test_imaml_logs_the_curvature_of_a_direct_call_and_nothing_when_off():
    (sx, sy, qx), qy = _classification_episode()
    lam = 0.3
    meta = _classification_meta(lam=lam, curvature_iterations=6)
    learner = meta.learner
    # The direct call of the core, at the weights before the step.
    theta = tree.broadcast_to_tasks([tf.identity(v) for v in learner.trainable_variables], 3)

    def support_loss_fn(params):
        logits = tf_imaml.batched.apply(learner, params, tf.constant(sx))
        per_example = keras.losses.sparse_categorical_crossentropy(sy, logits, from_logits=True)
        return tf.reduce_mean(per_example, axis=1)

    phi = inner_solvers.minimize_proximal(
        support_loss_fn,
        theta,
        lam=lam,
        num_steps=3,
        optimizer=inner_solvers.gradient_descent(0.1),
    ).adapted_params
    direct = curvature.proximal_curvature(support_loss_fn, phi, lam=lam, num_iter=6).min_eigenvalue
    direct = direct.numpy()
    logs = meta.train_on_batch((sx, sy, qx), qy, return_dict=True)
    # The same float32 computation in a graph instead of eagerly: op order and rounding
    # differ (about 1e-6 relative per op), amplified a little by 6 Lanczos steps.
    np.testing.assert_allclose(logs["min_curvature"], direct.mean(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(logs["indefinite_fraction"], np.mean(direct < 0))
    assert meta.get_config()["curvature_iterations"] == 6
    assert "min_curvature" in [m.name for m in meta.metrics]  # so that fit() resets it

    off = _classification_meta(lam=lam)
    logs = off.train_on_batch((sx, sy, qx), qy, return_dict=True)
    assert "min_curvature" not in logs and "indefinite_fraction" not in logs
    assert off.get_config()["curvature_iterations"] == 0
    with pytest.raises(ValueError, match="curvature_iterations must be an int >= 0"):
        _classification_meta(curvature_iterations=-1)
