"""The implicit meta-gradient against closed form, finite differences and unrolled autodiff."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import solvers
from tf_imaml import testing
from tf_imaml import tree

LAM = 2.0
SOLVERS = ["cg", "cg_tf"]


def _ridge(seed=0, num_tasks=3, dim=4):
    tasks = testing.linear_tasks(
        num_tasks=num_tasks, num_support=5, num_query=7, dim=dim, seed=seed
    )
    theta = tf.constant(np.random.default_rng(seed + 1).normal(size=dim))
    return tasks, theta


def _meta_grad_via_tape(support_loss, query_loss, meta_params, *, lam, num_steps, lr, cg):
    """`d sum L_query(phi(theta)) / d theta` through `proximal_adapt`'s op, and the inner result."""
    with tf.GradientTape() as tape:
        tape.watch(meta_params)
        adapted, inner = implicit.proximal_adapt(
            support_loss,
            meta_params,
            lam=lam,
            num_steps=num_steps,
            optimizer=inner_solvers.gradient_descent(lr),
            linear_solver=cg,
        )
        total = tf.reduce_sum(query_loss(adapted))
    return tape.gradient(total, meta_params), inner


def _ridge_meta_grad_via_tape(tasks, theta, solver, run):
    support_loss = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    query_loss = testing.ridge_loss_fn(tasks.query_x, tasks.query_y)
    cg = solvers.CG(steps=theta.shape[0], implementation=solver)

    def meta_grad():
        meta_params = tree.broadcast_to_tasks([theta], tasks.support_x.shape[0])
        grads, _ = _meta_grad_via_tape(
            support_loss, query_loss, meta_params, lam=LAM, num_steps=1500, lr=0.05, cg=cg
        )
        return grads[0]

    return run(meta_grad)


@pytest.mark.parametrize("solver", SOLVERS)
def test_custom_gradient_op_matches_ridge_closed_form(solver, run):
    tasks, theta = _ridge()
    got = _ridge_meta_grad_via_tape(tasks, theta, solver, run).numpy()
    want = testing.ridge_meta_gradient(tasks, np.broadcast_to(theta.numpy(), (3, 4)), LAM)
    # Oracle: lam (H + lam I)^-1 grad L_query(phi*), all closed form. The inner loop has
    # converged to rounding and CG with d = 4 iterations is exact on a 4x4 system.
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_implicit_meta_gradient_function_at_exact_solution(solver, run):
    tasks, theta = _ridge(seed=3, num_tasks=4, dim=6)
    thetas = np.broadcast_to(theta.numpy(), (4, 6))
    phi = [
        tf.constant(testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, thetas, LAM))
    ]
    support_loss = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    query_loss = testing.ridge_loss_fn(tasks.query_x, tasks.query_y)
    _, v = problems_value_and_grad(query_loss, phi)
    result = run(
        lambda: implicit.implicit_meta_gradient(
            support_loss, phi, v, lam=LAM, linear_solver=solvers.CG(steps=6, implementation=solver)
        )
    )
    # Same closed-form oracle, with phi* given exactly: only CG's rounding remains.
    np.testing.assert_allclose(
        result.meta_grads[0].numpy(), testing.ridge_meta_gradient(tasks, thetas, LAM), rtol=1e-9
    )
    assert not result.solve.failed.numpy().any()
    assert (result.solve.relative_residual.numpy() < 1e-10).all()


def problems_value_and_grad(loss_fn, params):
    with tf.GradientTape() as tape:
        tape.watch(params)
        loss = tf.reduce_sum(loss_fn(params))
    return loss, tape.gradient(loss, params)


def _tanh_setup(num_tasks=2):
    tasks = testing.linear_tasks(num_tasks=num_tasks, num_support=8, num_query=8, dim=2, seed=11)
    params = testing.tanh_mlp_init(num_tasks=num_tasks, dim=2, hidden=3, seed=12)
    support_loss = testing.tanh_mlp_loss_fn(tasks.support_x, tasks.support_y)
    query_loss = testing.tanh_mlp_loss_fn(tasks.query_x, tasks.query_y)
    return params, support_loss, query_loss


def _implicit_grad(params, support_loss, query_loss, lam, num_steps, solver="cg", hvp_mode=None):
    options = {} if hvp_mode is None else {"hvp_mode": hvp_mode}
    num_params = int(tree.flatten_tasks(params).shape[1])
    cg = solvers.CG(steps=3 * num_params, tol=1e-14, implementation=solver, **options)
    return tf.function(
        lambda: _meta_grad_via_tape(
            support_loss, query_loss, params, lam=lam, num_steps=num_steps, lr=0.1, cg=cg
        )
    )()


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("hvp_mode", ["reverse_over_reverse", "linearized"])
def test_matches_finite_differences_on_tanh_network(solver, hvp_mode):
    params, support_loss, query_loss = _tanh_setup()
    lam = 1.0
    grads, inner = _implicit_grad(params, support_loss, query_loss, lam, 4000, solver, hvp_mode)
    assert (inner.grad_norm.numpy() < 1e-12).all()

    solve = tf.function(
        lambda p: inner_solvers.minimize_proximal(
            support_loss, p, lam=lam, num_steps=4000, optimizer=inner_solvers.gradient_descent(0.1)
        ).adapted_params
    )

    def meta_objective(p):
        return query_loss(solve(p)).numpy()

    flat = tree.flatten_tasks(params).numpy()
    direction = np.random.default_rng(5).normal(size=flat.shape)
    eps = 1e-5
    plus = meta_objective(tree.unflatten_tasks(tf.constant(flat + eps * direction), params))
    minus = meta_objective(tree.unflatten_tasks(tf.constant(flat - eps * direction), params))
    fd = (plus - minus) / (2 * eps)
    analytic = np.sum(tree.flatten_tasks(grads).numpy() * direction, axis=1)
    # Oracle: central differences in float64 of L_query(phi*(theta)) along a random
    # direction; truncation O(eps^2) ~ 1e-10 and inner-solve error / eps ~ 1e-12 / 1e-5,
    # so agreement to 1e-6 relative is what the method can show.
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_matches_unrolled_differentiation_through_converged_inner_loop():
    params, support_loss, query_loss = _tanh_setup()
    lam, num_steps, lr = 1.0, 1500, 0.1
    grads, inner = _implicit_grad(params, support_loss, query_loss, lam, num_steps)
    assert (inner.grad_norm.numpy() < 1e-12).all()

    @tf.function
    def unrolled():
        with tf.GradientTape() as tape:
            tape.watch(params)
            objective = inner_solvers.proximal_objective_fn(support_loss, params, lam)

            def step(i, phi):
                with tf.GradientTape() as inner_tape:
                    inner_tape.watch(phi)
                    total = tf.reduce_sum(objective(phi))
                return i + 1, tree.axpy(-lr, inner_tape.gradient(total, phi), phi)

            _, phi = tf.while_loop(lambda i, _: i < num_steps, step, (0, params))
            total = tf.reduce_sum(query_loss(phi))
        return tape.gradient(total, params)

    want = tree.flatten_tasks(unrolled()).numpy()
    got = tree.flatten_tasks(grads).numpy()
    # Oracle: second-order backpropagation through 1500 GD steps of a contraction: the
    # unrolled Jacobian converges to the implicit one geometrically, and at the stationarity
    # reached (< 1e-12) they agree to rounding; 1e-8 relative leaves room for it.
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def test_eager_and_function_agree():
    tasks, theta = _ridge(seed=7)
    eager = _ridge_meta_grad_via_tape(tasks, theta, "cg_tf", lambda f: f())
    graph = _ridge_meta_grad_via_tape(tasks, theta, "cg_tf", lambda f: tf.function(f)())
    # Same ops in the same order: identical up to kernel rounding.
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), rtol=1e-12)


@pytest.mark.parametrize("on_failure", ["first_order", "zero", "keep"])
def test_failure_policy_on_indefinite_system(on_failure):
    # A support loss with negative curvature: L(phi) = -c/2 ||phi||^2, with c > lam, so
    # I + H/lam = (1 - c/lam) I is negative definite and every solve must fail.
    c = 3.0
    phi = [tf.constant([[1.0, 2.0], [0.5, -1.0]], tf.float64)]
    v = [tf.constant([[1.0, 0.0], [0.0, 1.0]], tf.float64)]
    result = implicit.implicit_meta_gradient(
        lambda p: -0.5 * c * tree.sq_norm(p), phi, v, lam=1.0, max_iter=3
    )
    assert result.solve.failed.numpy().all()
    assert result.solve.negative_curvature.numpy().all()
    grads = implicit.apply_failure_policy(
        result.meta_grads, v, result.solve.failed, on_failure=on_failure
    )[0].numpy()
    if on_failure == "first_order":
        np.testing.assert_array_equal(grads, v[0].numpy())
    elif on_failure == "zero":
        np.testing.assert_array_equal(grads, 0.0)
    else:  # The solver's answer: the default CG stops at its first direction, at x0 = 0.
        np.testing.assert_array_equal(grads, result.meta_grads[0].numpy())
        np.testing.assert_array_equal(grads, 0.0)


def test_damping_matches_its_closed_form():
    tasks, theta = _ridge(seed=9)
    thetas = np.broadcast_to(theta.numpy(), (3, 4))
    phi = [
        tf.constant(testing.ridge_proximal_solution(tasks.support_x, tasks.support_y, thetas, LAM))
    ]
    v = [tf.constant(np.ones((3, 4)))]
    support_loss = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    result = implicit.implicit_meta_gradient(support_loss, phi, v, lam=LAM, damping=0.3, max_iter=4)
    h = testing.ridge_hessian(tasks.support_x)
    a = 1.3 * np.eye(4) + h / LAM
    # Oracle: dense solve of ((1 + damping) I + H / lam) g = v.
    np.testing.assert_allclose(
        result.meta_grads[0].numpy(), np.linalg.solve(a, v[0].numpy()[..., None])[..., 0], rtol=1e-9
    )


def test_bad_input_raises():
    tasks, theta = _ridge()
    support_loss = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    phi = [tf.zeros([3, 4], tf.float64)]
    with pytest.raises(ValueError, match="adapted_params and query_grads do not match"):
        implicit.implicit_meta_gradient(support_loss, phi, [tf.zeros([3, 5], tf.float64)], lam=1.0)
    with pytest.raises(ValueError, match="lam must be > 0"):
        implicit.implicit_meta_gradient(support_loss, phi, phi, lam=0.0)
    with pytest.raises(ValueError, match="on_failure"):
        implicit.apply_failure_policy(phi, phi, tf.constant([False] * 3), on_failure="skip")
    nan_v = [tf.fill([3, 4], tf.constant(np.nan, tf.float64))]
    with pytest.raises(ValueError, match="query gradient norm is not finite"):
        implicit.implicit_meta_gradient(support_loss, phi, nan_v, lam=1.0)
    with pytest.raises(ValueError, match="meta_params and adapted_params do not match"):
        implicit.attach_implicit_gradient(support_loss, phi, [phi[0], phi[0]], lam=1.0)


@pytest.mark.parametrize(
    "on_failure, want_sum, want_count",
    [
        # Task 0 fine, task 1 failed (finite answer 5), task 2 failed with NaN, task 3 fine
        # but with an infinite gradient: never counted.
        ("drop", 1.0, 1),
        ("first_order", 1.0 + 20.0 + 30.0, 3),
        ("zero", 1.0, 3),
        ("keep", 1.0 + 5.0, 2),
    ],
)
def test_aggregate_tasks_applies_the_failure_policy_and_counts(on_failure, want_sum, want_count):
    meta_grads = [tf.constant([[1.0], [5.0], [np.nan], [np.inf]])]
    fallback = [tf.constant([[10.0], [20.0], [30.0], [np.inf]])]
    failed = tf.constant([False, True, True, False])
    result = implicit.aggregate_tasks(meta_grads, fallback, failed, on_failure=on_failure)
    # Oracle: the sums and counts worked out by hand in the parametrization.
    np.testing.assert_allclose(result.grad_sums[0], [want_sum])
    assert float(result.num_used) == want_count
