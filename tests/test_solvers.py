"""Configured solvers: one argument each, the same numbers as the keyword shortcuts."""

import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import curvature
from tf_imaml import hessian_free
from tf_imaml import implicit
from tf_imaml import solvers
from tf_imaml import testing

DIM = 4


def _sgd_step(**options):
    """`theta - theta'` after one `SGD(1.0)` step of ImplicitMAML: the mean meta-gradient."""
    learner = testing.linear_learner(DIM)
    meta = tf_imaml.ImplicitMAML(learner, lam=2.0, inner_steps=6, **options)
    meta.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    _, episode = testing.ridge_episode(dim=DIM, seed=5)
    before = learner.trainable_variables[0].numpy()
    meta.train_on_batch(*episode)
    return before - learner.trainable_variables[0].numpy(), meta


@pytest.mark.parametrize(
    "configured, shortcuts",
    [
        (
            dict(
                linear_solver=tf_imaml.CG(
                    steps=2, damping=1.0, lam_damping=3.0, implementation="cg"
                ),
                inner_solver=tf_imaml.ProximalDescent(optimizer="momentum", loop="pull_back"),
            ),
            dict(
                linear_solver="cg",
                cg_steps=2,
                damping=1.0,
                lam_damping=3.0,
                inner_optimizer="momentum",
                inner_loop="pull_back",
            ),
        ),
        (
            dict(
                linear_solver=tf_imaml.CG(tol=1e-3, hvp_mode="forward_over_reverse"),
                inner_solver=tf_imaml.HessianFree(cg_steps=2, hvp_mode="forward_over_reverse"),
            ),
            dict(
                cg_tol=1e-3,
                inner_optimizer="hessian_free",
                inner_cg_steps=2,
                hvp_mode="forward_over_reverse",
            ),
        ),
    ],
    ids=["authors_system", "hessian_free"],
)
def test_configured_solvers_and_shortcuts_give_identical_meta_gradients(configured, shortcuts):
    got, meta = _sgd_step(**configured)
    want, shortcut_meta = _sgd_step(**shortcuts)
    # Oracle: the shortcut form; both resolve to equal solver objects, so the same ops run.
    np.testing.assert_array_equal(got, want)
    assert np.abs(got).max() > 0
    assert meta.linear_solver == shortcut_meta.linear_solver
    assert meta.inner_solver == shortcut_meta.inner_solver


def test_core_configured_solver_equals_shortcuts_and_the_default():
    tasks = testing.linear_tasks(num_tasks=3, num_support=5, num_query=7, dim=DIM, seed=2)
    support = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    phi = [tf.constant(np.random.default_rng(0).normal(size=(3, DIM)))]
    v = [tf.constant(np.random.default_rng(1).normal(size=(3, DIM)))]
    configured = implicit.implicit_meta_gradient(
        support, phi, v, lam=2.0, linear_solver=tf_imaml.CG(steps=3, damping=0.5)
    )
    shortcut = implicit.implicit_meta_gradient(
        support, phi, v, lam=2.0, linear_solver=tf_imaml.solve_cg, max_iter=3, damping=0.5
    )
    # Oracle: the same solve by keywords, bit for bit.
    np.testing.assert_array_equal(configured.meta_grads[0], shortcut.meta_grads[0])
    default = implicit.implicit_meta_gradient(support, phi, v, lam=2.0)
    explicit = implicit.implicit_meta_gradient(
        support, phi, v, lam=2.0, linear_solver=tf_imaml.CG()
    )
    np.testing.assert_array_equal(default.meta_grads[0], explicit.meta_grads[0])


def test_defaults_live_in_the_solver_classes():
    meta = tf_imaml.ImplicitMAML(testing.linear_learner(DIM))
    assert meta.linear_solver == tf_imaml.CG()
    assert meta.inner_solver == tf_imaml.ProximalDescent()
    assert tf_imaml.CG().hvp_mode == solvers.DEFAULT_HVP_MODE == "linearized"
    assert tf_imaml.CG().tol == 1e-10 and tf_imaml.CG().steps == 5
    assert tf_imaml.HessianFree().hvp_mode == solvers.DEFAULT_HVP_MODE
    for fn in (hessian_free.proximal_newton, curvature.proximal_curvature):
        assert inspect.signature(fn).parameters["hvp_mode"].default == solvers.DEFAULT_HVP_MODE


def test_keyword_config_of_older_versions_loads():
    # The flat form the shipped model's config holds (tf_imaml/pretrained).
    old = dict(
        learner=keras.saving.serialize_keras_object(testing.linear_learner(DIM)),
        inner_steps=16,
        inner_learning_rate=0.1,
        on_failure="drop",
        task_batching="auto",
        name="implicit_maml",
        lam=2.0,
        cg_steps=5,
        inner_optimizer="gd",
        inner_momentum=0.9,
        inner_cg_steps=5,
        use_line_search=True,
        linear_solver="cg_tf",
        damping=1.0,
        lam_damping=10.0,
        inner_loop="pull_back",
        test_lam=2.0,
        cg_tol=1e-10,
        max_residual=1.0,
        hvp_mode="linearized",
        curvature_iterations=0,
    )
    meta = tf_imaml.ImplicitMAML.from_config(old)
    # A saved model keeps the solver it was saved with (the default was tf.linalg's CG then).
    assert meta.linear_solver == tf_imaml.CG(damping=1.0, lam_damping=10.0, implementation="cg_tf")
    assert meta.inner_solver == tf_imaml.ProximalDescent(loop="pull_back")
    clone = tf_imaml.ImplicitMAML.from_config(meta.get_config())
    assert (clone.linear_solver, clone.inner_solver) == (meta.linear_solver, meta.inner_solver)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: tf_imaml.CG(steps=-1), ValueError, "steps must be an int >= 0, got -1"),
        (lambda: tf_imaml.CG(steps=2.5), ValueError, "steps must be an int >= 0"),
        (lambda: tf_imaml.CG(tol=-1.0), ValueError, "tol must be >= 0"),
        (lambda: tf_imaml.CG(max_residual=0.0), ValueError, "max_residual must be > 0"),
        (lambda: tf_imaml.CG(hvp_mode="fd"), ValueError, "hvp_mode must be one of"),
        (lambda: tf_imaml.CG(implementation="lu"), ValueError, "implementation must be one of"),
        (lambda: tf_imaml.CG(damping="big"), TypeError, "damping must be a real number"),
        (lambda: tf_imaml.ProximalDescent(optimizer="sgd"), ValueError, "optimizer must be"),
        (lambda: tf_imaml.ProximalDescent(momentum=1.0), ValueError, r"in \[0, 1\)"),
        (lambda: tf_imaml.ProximalDescent(loop="unrolled"), ValueError, "loop must be one of"),
        (lambda: tf_imaml.HessianFree(cg_steps=0), ValueError, "cg_steps must be an int >= 1"),
        (lambda: tf_imaml.HessianFree(use_line_search=1), ValueError, "must be a bool"),
        (lambda: solvers.deserialize({"type": "LU"}), ValueError, "not a serialized solver"),
    ],
)
def test_bad_solver_configs_raise_naming_the_field(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(linear_solver=tf_imaml.CG(), cg_steps=3), "cg_steps: keyword shortcuts"),
        (dict(linear_solver="lu"), "linear_solver must be one of"),
        (dict(linear_solver=np.linalg.solve), "linear_solver must be a tf_imaml.CG"),
        (dict(inner_solver=tf_imaml.HessianFree(), inner_cg_steps=3), "inner_cg_steps: keyword"),
        (dict(inner_solver="gd", inner_optimizer="adam"), "not both"),
        (dict(inner_optimizer="gd", use_line_search=False), "use_line_search: not an option"),
        (dict(inner_optimizer="hessian_free", inner_momentum=0.5), "inner_momentum: not an"),
        (dict(inner_optimizer="rmsprop"), "inner_optimizer must be one of"),
        (dict(cg_steps=-2), "cg_steps must be an int >= 0"),
    ],
)
def test_bad_imaml_solver_arguments_raise(options, match):
    with pytest.raises(ValueError, match=match):
        tf_imaml.ImplicitMAML(testing.linear_learner(DIM), **options)
