"""The authors' variant of iMAML: damped linear system, pull-back inner loop, test-time lam.

Oracles: closed forms on ridge regression (float64), where the proximal minimiser, the
Hessian and the plain gradient-descent iterates are known exactly.
"""

import keras
import numpy as np
import pytest

import tf_imaml
from tf_imaml import testing

LAM = 2.0
DIM = 4


def _learner():
    return testing.linear_learner(DIM)


def _episode(seed=0, num_tasks=3):
    return testing.ridge_episode(dim=DIM, seed=seed, num_tasks=num_tasks)


def _meta(learner, **kwargs):
    meta = tf_imaml.ImplicitMAML(learner, **kwargs)
    meta.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    return meta


def _query_grad(tasks, phi):
    qx, qy = np.asarray(tasks.query_x), np.asarray(tasks.query_y)
    residual = np.einsum("tnd,td->tn", qx, phi) - qy
    return 2.0 * np.einsum("tnd,tn->td", qx, residual) / qx.shape[1]


def _plain_gd(tasks, theta, *, steps, lr):
    """Exact iterates of gradient descent on the support loss ||X phi - y||^2 / n."""
    x, y = np.asarray(tasks.support_x), np.asarray(tasks.support_y)
    phi = np.array(theta, dtype=np.float64)
    for _ in range(steps):
        residual = np.einsum("tnd,td->tn", x, phi) - y
        phi = phi - lr * 2.0 * np.einsum("tnd,tn->td", x, residual) / x.shape[1]
    return phi


@pytest.mark.parametrize("damping, lam_damping", [(1.0, 10.0), (0.0, 3.0), (0.5, 0.0)])
def test_damped_system_step_matches_its_closed_form(damping, lam_damping):
    tasks, episode = _episode()
    learner = _learner()
    meta = _meta(
        learner,
        lam=LAM,
        inner_steps=1500,
        inner_learning_rate=0.05,
        cg_steps=DIM,
        damping=damping,
        lam_damping=lam_damping,
    )
    theta = learner.trainable_variables[0].numpy()[:, 0]
    meta.train_on_batch(*episode)
    moved = learner.trainable_variables[0].numpy()[:, 0] - theta
    thetas = np.broadcast_to(theta, (3, DIM))
    phi = testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, thetas, LAM)
    h = testing.ridge_hessian(tasks.support_x)
    system = (1.0 + damping) * np.eye(DIM) + h / (LAM + lam_damping)
    want = np.linalg.solve(system, _query_grad(tasks, phi)[..., None])[..., 0]
    # Oracle: a dense solve of ((1 + damping) I + H/(lam + lam_damping)) g = v at the exact
    # proximal minimiser for lam (not lam + lam_damping); GD converged to rounding and CG is
    # exact in DIM iterations, so only float64 rounding remains.
    np.testing.assert_allclose(moved, -want.mean(axis=0), rtol=1e-9, atol=1e-12)


def test_min_curvature_describes_the_damped_system():
    tasks, episode = _episode(seed=2)
    meta = _meta(
        _learner(),
        lam=LAM,
        inner_steps=3,
        inner_learning_rate=0.05,
        cg_steps=DIM,
        damping=1.0,
        lam_damping=10.0,
        curvature_iterations=DIM,
    )
    logs = meta.train_on_batch(*episode, return_dict=True)
    h = testing.ridge_hessian(tasks.support_x)
    want = np.linalg.eigvalsh(2.0 * np.eye(DIM) + h / 12.0)[:, 0].mean()
    # Oracle: the smallest eigenvalue of 2I + H/12 (ridge H does not depend on phi); DIM
    # Lanczos iterations span the whole space, so they are exact up to rounding.
    np.testing.assert_allclose(logs["min_curvature"], want, rtol=1e-6)
    assert logs["indefinite_fraction"] == 0.0


def test_pull_back_inner_loop_is_plain_steps_then_one_proximal_step():
    tasks, episode = _episode(seed=3, num_tasks=1)
    learner = _learner()
    meta = _meta(learner, lam=LAM, inner_steps=7, inner_learning_rate=0.1, inner_loop="pull_back")
    theta = learner.trainable_variables[0].numpy()[:, 0]
    adapted = meta.adapt(tasks.support_x[0], tasks.support_y[0][..., None])
    phi_k = _plain_gd(tasks, theta[None], steps=7, lr=0.1)
    want = phi_k - 0.1 * LAM * (phi_k - theta)
    # Oracle: 7 exact GD iterates on the plain ridge loss, then phi - lr lam (phi - theta).
    np.testing.assert_allclose(adapted.trainable_variables[0].numpy()[:, 0], want[0], rtol=1e-12)


@pytest.mark.parametrize("inner_loop", ["proximal", "pull_back"])
def test_test_lam_zero_adapts_by_plain_steps_and_training_keeps_lam(inner_loop):
    tasks, episode = _episode(seed=4)
    learner = _learner()
    meta = _meta(
        learner,
        lam=LAM,
        inner_steps=5,
        inner_learning_rate=0.1,
        test_lam=0.0,
        inner_loop=inner_loop,
    )
    theta = learner.trainable_variables[0].numpy()[:, 0]
    phi = _plain_gd(tasks, np.broadcast_to(theta, (3, DIM)), steps=5, lr=0.1)
    want = np.einsum("tnd,td->tn", np.asarray(tasks.query_x), phi)
    # Oracle: predict adapts with lam = 0, i.e. 5 exact plain GD steps, whatever the loop.
    # predict_on_batch takes its inputs through Keras's float32 conversion: 1e-5.
    np.testing.assert_allclose(meta.predict_on_batch(episode[0])[..., 0], want, rtol=1e-5)
    adapted = meta.adapt(tasks.support_x[0], tasks.support_y[0][..., None])
    np.testing.assert_allclose(adapted.trainable_variables[0].numpy()[:, 0], phi[0], rtol=1e-12)
    # Without test_lam, evaluation adapts with lam = 2 and fits the support set less closely.
    trained = _meta(
        _learner(), lam=LAM, inner_steps=5, inner_learning_rate=0.1, inner_loop=inner_loop
    )
    logs_lam0 = meta.test_on_batch(*episode, return_dict=True)
    logs_lam2 = trained.test_on_batch(*episode, return_dict=True)
    assert logs_lam0["support_loss"] < logs_lam2["support_loss"]


def test_new_options_round_trip_through_get_config():
    meta = _meta(_learner(), damping=1.0, lam_damping=10.0, inner_loop="pull_back", test_lam=0.0)
    config = meta.get_config()
    solver = config["linear_solver"]["config"]
    assert (solver["damping"], solver["lam_damping"]) == (1.0, 10.0)
    assert (config["inner_solver"]["config"]["loop"], config["test_lam"]) == ("pull_back", 0.0)
    clone = tf_imaml.ImplicitMAML.from_config(config)
    assert clone.system_lam == 12.0 and clone.test_lam == 0.0
    assert clone.inner_solver == tf_imaml.ProximalDescent(loop="pull_back")
    assert clone.linear_solver == tf_imaml.CG(damping=1.0, lam_damping=10.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam_damping=-1.0), "lam_damping must be >= 0"),
        (dict(inner_loop="unrolled"), "inner_loop"),
        (dict(test_lam=-0.5), "test_lam must be >= 0"),
        (dict(inner_loop="pull_back", inner_optimizer="hessian_free"), "pull_back"),
    ],
)
def test_bad_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_imaml.ImplicitMAML(_learner(), **kwargs)
