"""Both conjugate-gradient solvers against `np.linalg.solve` on seeded systems.

Also with the number of tasks unknown when traced: in a `tf.function` with a `None` task
axis, and in a meta-model whose Keras step is retraced for a second meta-batch size.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import linear_solve
from tf_imaml import tree

SOLVERS = [linear_solve.solve_cg, linear_solve.solve_cg_tf]


def _system(seed=0, num_tasks=3, sizes=(2, 5), indefinite_task=None):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    m = rng.normal(size=(num_tasks, n, n))
    a = m @ m.transpose(0, 2, 1) + 0.5 * np.eye(n)
    if indefinite_task is not None:
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        eig = np.linspace(-1.0, 3.0, n)
        a[indefinite_task] = q @ np.diag(eig) @ q.T
    b = [tf.constant(rng.normal(size=(num_tasks, s))) for s in sizes]
    a_t = tf.constant(a)

    def matvec(v):
        return tree.unflatten_tasks(tf.einsum("tij,tj->ti", a_t, tree.flatten_tasks(v)), v)

    return a, b, matvec


def _solution(a, b):
    return np.linalg.solve(a, np.concatenate([x.numpy() for x in b], axis=1)[..., None])[..., 0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_solves_spd_systems(solver, run):
    a, b, matvec = _system()
    result = run(lambda: solver(matvec, b, tol=1e-12, max_iter=50))
    x = tree.flatten_tasks(result.solution).numpy()
    # Oracle: dense LU solve. Condition numbers here are < 1e4, so 1e-9 leaves room.
    np.testing.assert_allclose(x, _solution(a, b), rtol=1e-9, atol=1e-10)
    assert not result.failed.numpy().any()
    assert (result.relative_residual.numpy() < 1e-12).all()
    # The reported (recursive) residual agrees with the true one ||b - A x|| / ||b||.
    flat_b = np.concatenate([v.numpy() for v in b], axis=1)
    true = np.linalg.norm(flat_b - np.einsum("tij,tj->ti", a, x), axis=1)
    np.testing.assert_allclose(
        result.relative_residual.numpy(), true / np.linalg.norm(flat_b, axis=1), atol=1e-12
    )


@pytest.mark.parametrize("solver", SOLVERS)
def test_indefinite_system_is_failed_not_answered(solver, run):
    a, b, matvec = _system(seed=4, indefinite_task=1)
    result = run(lambda: solver(matvec, b, tol=1e-12, max_iter=50))
    assert result.failed.numpy().tolist() == [False, True, False]
    assert result.negative_curvature.numpy().tolist() == [False, True, False]
    # The other tasks are still solved exactly (dense oracle as above).
    x = tree.flatten_tasks(result.solution).numpy()
    np.testing.assert_allclose(x[[0, 2]], _solution(a, b)[[0, 2]], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_too_few_iterations_is_failed_by_residual(solver):
    a, b, matvec = _system(seed=5)
    result = solver(matvec, b, tol=1e-12, max_iter=2, max_residual=1e-3)
    assert result.failed.numpy().all()
    assert not result.negative_curvature.numpy().any()
    assert (result.relative_residual.numpy() > 1e-3).all()
    assert (result.num_iterations.numpy() == 2).all()


@pytest.mark.parametrize("solver", SOLVERS)
def test_non_finite_rhs_is_failed(solver):
    a, b, matvec = _system(seed=6)
    b = [tf.tensor_scatter_nd_update(b[0], [[2, 1]], tf.constant([np.inf], tf.float64)), b[1]]
    result = solver(matvec, b, tol=1e-12, max_iter=20)
    assert result.failed.numpy().tolist() == [False, False, True]


@pytest.mark.parametrize("solver", SOLVERS)
def test_initial_guess_is_used(solver):
    a, b, matvec = _system(seed=7)
    exact = _solution(a, b)
    x0 = tree.unflatten_tasks(tf.constant(exact), b)
    result = solver(matvec, b, x0=x0, tol=1e-8, max_iter=20)
    # Starting at the dense solution, at most one iteration is needed.
    assert result.num_iterations.numpy().max() <= 1
    np.testing.assert_allclose(tree.flatten_tasks(result.solution).numpy(), exact, rtol=1e-9)


def test_our_cg_stops_converged_tasks_early():
    a, b, _ = _system(seed=8)
    # Task 0 gets the identity: one iteration solves it, the others need more.
    a[0] = np.eye(a.shape[-1])
    a_t = tf.constant(a)

    def matvec(v):
        return tree.unflatten_tasks(tf.einsum("tij,tj->ti", a_t, tree.flatten_tasks(v)), v)

    result = linear_solve.solve_cg(matvec, b, tol=1e-12, max_iter=50)
    iterations = result.num_iterations.numpy()
    assert iterations[0] == 1 and iterations[1] > 1


@pytest.mark.parametrize("solver", SOLVERS)
def test_bad_options_raise(solver):
    _, b, matvec = _system()
    with pytest.raises(ValueError, match="max_iter must be >= 0"):
        solver(matvec, b, max_iter=-1)
    with pytest.raises(ValueError, match="b and x0 do not match"):
        solver(matvec, b, x0=[b[0]])


@pytest.mark.parametrize("solver", SOLVERS)
def test_number_of_tasks_unknown_when_traced(solver):
    # A tf.function traced with a None task axis (as Keras retraces a step with relaxed
    # shapes): the flattened size is then unknown statically.
    a, b, matvec = _system(seed=9)
    spec = [tf.TensorSpec([None, x.shape[1]], x.dtype) for x in b]
    solve = tf.function(lambda *b: solver(matvec, list(b), tol=1e-12, max_iter=50).solution)
    x = tree.flatten_tasks(solve.get_concrete_function(*spec)(*b)).numpy()
    # Oracle: dense LU solve, tolerance as in test_solves_spd_systems.
    np.testing.assert_allclose(x, _solution(a, b), rtol=1e-9, atol=1e-10)


def test_meta_model_steps_at_a_second_meta_batch_size():
    keras.utils.set_random_seed(0)
    learner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)]
    )
    weights = [v.numpy() for v in learner.trainable_variables]
    rng = np.random.default_rng(0)
    support_x, query_x = rng.normal(size=(3, 4, 4)), rng.normal(size=(3, 6, 4))
    support_y, query_y = np.tile([0, 1, 0, 1], (3, 1)), np.tile([0, 1, 1, 0, 0, 1], (3, 1))

    def step(meta, t):
        """theta - theta' of an SGD(1) step on the first t tasks, from `weights`."""
        for variable, value in zip(learner.trainable_variables, weights, strict=True):
            variable.assign(value)
        meta.train_on_batch((support_x[:t], support_y[:t], query_x[:t]), query_y[:t])
        return np.concatenate(
            [
                (w - v.numpy()).ravel()
                for w, v in zip(weights, learner.trainable_variables, strict=True)
            ]
        )

    def build():
        meta = tf_imaml.ImplicitMAML(learner, inner_steps=2, inner_learning_rate=0.1)
        meta.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return meta

    meta = build()
    step(meta, 3)
    # Keras retraces the step for a new meta-batch size with the task axis relaxed to None.
    relaxed = [step(meta, t) for t in (1, 2)]
    # Oracle: fresh models (sharing the learner) traced at each size alone. The same float32
    # ops, but with dynamic shapes TensorFlow may pick other kernels: a few float32 ulps
    # (an ulp of the largest entries, about 0.3, is 3e-8; measured 1.5e-8).
    for t, got in zip((1, 2), relaxed, strict=True):
        np.testing.assert_allclose(got, step(build(), t), rtol=0, atol=1e-7)


def test_a_task_solved_exactly_in_one_step_does_not_fail_beside_a_slower_one():
    # Task 0's system is 2 I: CG solves it in one step with a residual of exactly 0 (as for
    # a support set a trained model has memorised, whose float32 Hessian is exactly 0 under
    # the authors' damping). Task 1's needs several steps. tf.linalg's CG keeps stepping
    # task 0 until task 1 converges and divides 0 by 0: it reads as failed. The default
    # solver stops task 0 and solves both; oracle np.linalg.solve.
    rng = np.random.default_rng(3)
    n = 6
    m = rng.normal(size=(n, n))
    a = np.stack([2.0 * np.eye(n), m @ m.T + 0.5 * np.eye(n)]).astype(np.float32)
    b = [tf.constant(rng.normal(size=(2, n)).astype(np.float32))]
    a_t = tf.constant(a)

    def matvec(v):
        return tree.unflatten_tasks(tf.einsum("tij,tj->ti", a_t, tree.flatten_tasks(v)), v)

    want = np.linalg.solve(a.astype(np.float64), b[0].numpy().astype(np.float64)[..., None])
    default = tf_imaml.CG(steps=10)
    assert default.implementation == "cg"
    result = linear_solve.LINEAR_SOLVERS[default.implementation](
        matvec, b, tol=1e-10, max_iter=default.steps
    )
    np.testing.assert_array_equal(result.failed.numpy(), [False, False])
    np.testing.assert_allclose(result.solution[0].numpy(), want[..., 0], rtol=1e-4, atol=1e-5)
    assert result.relative_residual.numpy()[0] == 0.0  # the exact one-step solve
    # tf.linalg's CG on the same systems: task 0 ends NaN and failed, task 1 is solved.
    with_tf = linear_solve.solve_cg_tf(matvec, b, tol=1e-10, max_iter=10)
    np.testing.assert_array_equal(with_tf.failed.numpy(), [True, False])
    assert not np.isfinite(with_tf.solution[0].numpy()[0]).all()
