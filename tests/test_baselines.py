"""MAML, first-order MAML, Reptile and iMAML-HF through train_on_batch, against closed forms.

Linear-regression tasks in float64, `L(phi) = ||X phi - y||^2 / n`, so `H = 2 X^T X / n` and
gradient descent with step `alpha` is affine: `phi_{k+1} = (I - alpha H) phi_k + alpha b`.
"""

import keras
import numpy as np
import pytest

import tf_imaml
from tf_imaml import testing

DIM = 4
ALPHA = 0.05
STEPS = 5


def _learner():
    return testing.linear_learner(DIM)


def _episode(seed=0):
    return testing.ridge_episode(dim=DIM, seed=seed)


def _step(meta, episode):
    """One train_on_batch with SGD(1.0); returns how far the weights moved."""
    meta.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    theta = meta.learner.trainable_variables[0].numpy()[:, 0].copy()
    meta.train_on_batch(*episode)
    return meta.learner.trainable_variables[0].numpy()[:, 0] - theta, theta


def _gd_closed_form(tasks, theta):
    """phi_K and the Jacobian (I - alpha H)^K per task, by the affine recursion."""
    x, y = tasks.support_x.numpy(), tasks.support_y.numpy()
    h = testing.ridge_hessian(x)
    b = 2 * np.einsum("tnd,tn->td", x, y) / x.shape[1]
    phi = np.broadcast_to(theta, (3, DIM)).copy()
    jac = np.broadcast_to(np.eye(DIM), (3, DIM, DIM)).copy()
    step = np.eye(DIM) - ALPHA * h
    for _ in range(STEPS):
        phi = np.einsum("tij,tj->ti", step, phi) + ALPHA * b
        jac = step @ jac
    return phi, jac


def _query_grad(tasks, phi):
    qx, qy = tasks.query_x.numpy(), tasks.query_y.numpy()
    return 2 * np.einsum("tnd,tn->td", qx, np.einsum("tnd,td->tn", qx, phi) - qy) / qx.shape[1]


def test_maml_is_unrolled_second_order_gradient():
    tasks, episode = _episode()
    moved, theta = _step(
        tf_imaml.MAML(_learner(), inner_steps=STEPS, inner_learning_rate=ALPHA), episode
    )
    phi, jac = _gd_closed_form(tasks, theta)
    want = np.einsum("tji,tj->ti", jac, _query_grad(tasks, phi)).mean(axis=0)
    # Oracle: ((I - alpha H)^K)^T grad L_query(phi_K), exact for quadratics; rounding only.
    np.testing.assert_allclose(moved, -want, rtol=1e-10, atol=1e-13)


def test_first_order_maml_is_query_gradient_at_phi():
    tasks, episode = _episode(seed=1)
    moved, theta = _step(
        tf_imaml.MAML(_learner(), inner_steps=STEPS, inner_learning_rate=ALPHA, first_order=True),
        episode,
    )
    phi, _ = _gd_closed_form(tasks, theta)
    # Oracle: grad L_query(phi_K) with phi_K from the affine recursion.
    np.testing.assert_allclose(moved, -_query_grad(tasks, phi).mean(axis=0), rtol=1e-10)


def test_reptile_outer_gradient_is_theta_minus_phi():
    tasks, episode = _episode(seed=2)
    moved, theta = _step(
        tf_imaml.Reptile(_learner(), inner_steps=STEPS, inner_learning_rate=ALPHA), episode
    )
    phi, _ = _gd_closed_form(tasks, theta)
    # Oracle: theta - phi_K averaged over tasks (SGD(1) moves by minus that).
    np.testing.assert_allclose(moved, -(theta - phi).mean(axis=0), rtol=1e-10)


@pytest.mark.parametrize("use_line_search", [True, False])
def test_imaml_hf_reaches_proximal_solution_and_exact_meta_gradient(use_line_search):
    tasks, episode = _episode(seed=3)
    meta = tf_imaml.ImplicitMAML(
        _learner(),
        lam=2.0,
        inner_steps=2,
        inner_optimizer="hessian_free",
        inner_cg_steps=DIM,
        use_line_search=use_line_search,
        cg_steps=DIM,
    )
    moved, theta = _step(meta, episode)
    want = testing.ridge_meta_gradient(tasks, np.broadcast_to(theta, (3, DIM)), 2.0)
    # Oracle: closed-form ridge meta-gradient. Newton with exact CG (DIM iterations on a
    # quadratic) is at phi* after one step; the second only confirms it.
    np.testing.assert_allclose(moved, -want.mean(axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda: tf_imaml.MAML(_learner(), inner_steps=2, first_order=True),
        lambda: tf_imaml.Reptile(_learner(), inner_steps=2),
        lambda: tf_imaml.ImplicitMAML(_learner(), inner_steps=1, inner_optimizer="hessian_free"),
    ],
    ids=["fomaml", "reptile", "imaml_hf"],
)
def test_same_api_save_load_and_metrics(make, tmp_path):
    _, episode = _episode(seed=4)
    meta = make()
    meta.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    logs = meta.train_on_batch(*episode, return_dict=True)
    for name in (
        "loss",
        "pre_adaptation_loss",
        "support_loss",
        "inner_grad_norm",
        "meta_grad_norm",
        "failed_fraction",
        "skipped_steps",
    ):
        assert np.isfinite(logs[name]), name
    meta.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded) is type(meta)
    np.testing.assert_array_equal(
        loaded.predict(episode[0], verbose=0), meta.predict(episode[0], verbose=0)
    )
    assert meta.adapt(episode[0][0][0], episode[0][1][0]).count_params() == DIM


def test_bad_values_raise():
    with pytest.raises(ValueError, match="inner_learning_rate must be > 0"):
        tf_imaml.MAML(_learner(), inner_learning_rate=-1.0)
    with pytest.raises(ValueError, match="inner_steps must be an int >= 0"):
        tf_imaml.Reptile(_learner(), inner_steps=-3)
    with pytest.raises(ValueError, match="inner_cg_steps must be an int >= 1"):
        tf_imaml.ImplicitMAML(_learner(), inner_optimizer="hessian_free", inner_cg_steps=0)
