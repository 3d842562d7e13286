"""scripts/studies/gradient_accuracy.py at a tiny size: the ridge part against its closed form."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hvp
from tf_imaml import reference
from tf_imaml import testing
from tf_imaml import tree

# Slow: runs the study at a tiny size.
pytestmark = pytest.mark.slow


# d = 6 parameters, 4 support points: GD contracts the slowest direction (a null direction
# of the support Hessian) by 1 - 0.1 * lam = 0.9 per step, so after 300 steps the inner
# error is ~0.9^300 ~ 2e-14 of the initial one, and CG is exact after d = 6 steps.
SIZES = dict(ridge_tasks=8, ridge_dim=6, ridge_support=4, ridge_query=8, ridge_lam=1.0)
RIDGE = dict(
    SIZES, ridge_learning_rate=0.1, inner_steps=(1, 5, 300), cg_steps=(1, 3, 20), weights=()
)


@pytest.fixture(scope="module")
def results(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("gradient_accuracy")
    return study.run(study.Config(**RIDGE, output_dir=str(out))), out


def _mean(values):
    return float(np.mean(values))


def test_converged_imaml_and_maml_match_the_closed_form_in_float64(results):
    ridge = results[0]["problems"]["ridge"]["result"]["float64"]
    # Oracle: tf_imaml.testing.ridge_meta_gradient. K = 300 leaves ~1e-14 of inner error.
    imaml = ridge["imaml"][-1][-1]
    assert _mean(imaml["relative_error"]) < 1e-8
    assert _mean(imaml["residual"]) < 1e-10
    # Oracle relationship: backpropagation through a converged inner loop on the same
    # proximal objective gives the implicit gradient (jaxopt's unrolled-vs-implicit test).
    assert _mean(ridge["maml"][-1]["relative_error"]) < 1e-8
    # First-order MAML ignores d phi / d theta: biased however many steps it takes.
    assert _mean(ridge["fomaml"][-1]["relative_error"]) > 0.1


def test_errors_shrink_with_inner_steps_and_with_cg_steps(results):
    ridge = results[0]["problems"]["ridge"]["result"]
    for dtype in ("float32", "float64"):
        res = ridge[dtype]
        imaml = [_mean(row[-1]["relative_error"]) for row in res["imaml"]]
        maml = [_mean(row["relative_error"]) for row in res["maml"]]
        grad_norm = [_mean(g) for g in res["inner_grad_norm"]]
        assert imaml[0] > imaml[1] > imaml[2], imaml
        assert maml[0] > maml[1] > maml[2], maml
        assert grad_norm[0] > grad_norm[1] > grad_norm[2]
    by_cg = [_mean(c["relative_error"]) for c in ridge["float64"]["imaml"][-1]]
    assert by_cg[0] > by_cg[1] > by_cg[2], by_cg


def test_float32_runs_carry_float32_rounding(results):
    ridge = results[0]["problems"]["ridge"]["result"]
    err32 = _mean(ridge["float32"]["imaml"][-1][-1]["relative_error"])
    # float32's unit roundoff is 6e-8: a converged float32 gradient is off by about that
    # much (not more than 1e-4 on this well-conditioned problem, not less than 1e-10,
    # which would mean the "float32" run was computed in float64).
    assert 1e-10 < err32 < 1e-4
    for method in ("imaml", "imaml_damped", "maml", "fomaml"):
        diffs = [_mean(row["relative_error"]) for row in ridge["precision"][method]]
        assert all(1e-10 < d < 1e-4 for d in diffs), (method, diffs)


def test_damped_imaml_at_convergence_is_the_dense_damped_solution(results, study):
    config = study.Config(**RIDGE)
    by_dtype, target = study.ridge_problems(config)
    tasks = study.ridge_tasks(config)
    # Oracle: np.linalg.solve of the damped system at the exact proximal point, its
    # right-hand side grad L_query(phi*) = (H + lam I) g* / lam recovered from the closed-form
    # target g* (tf_imaml.testing.ridge_meta_gradient).
    lam, damping, lam_damping = config.ridge_lam, config.damping, config.lam_damping
    hessian = testing.ridge_hessian(tasks.support_x)
    eye = np.eye(config.ridge_dim)
    query_grad = np.einsum("tij,tj->ti", hessian + lam * eye, target) / lam
    system = (1 + damping) * eye + hessian / (lam + lam_damping)
    damped = np.linalg.solve(system, query_grad[..., None])[..., 0]
    bias = np.linalg.norm(damped - target, axis=1) / np.linalg.norm(target, axis=1)
    # K = 300 leaves ~1e-14 of inner error and C = 20 CG steps solve the 6 unknowns exactly.
    got = results[0]["problems"]["ridge"]["result"]["float64"]["imaml_damped"][-1]
    np.testing.assert_allclose(got["relative_error"], bias, rtol=1e-6)
    # Damping changes the gradient: a bias of order one here (the damped system halves it).
    assert np.all(bias > 0.1)
    assert (
        "| K | ‖∇G(φ_K)‖ (f64) | iMAML f32 | iMAML f64 | damped f32 | damped f64 |"
        in (results[1] / "gradient_accuracy.md").read_text()
    )


def test_writes_markdown_json_and_plot(results, assert_png):
    data, out = results
    table = (out / "gradient_accuracy.md").read_text()
    assert "### Ridge regression (closed form)" in table
    assert "\n| 300 | " in table and "| K | C=1 | C=3 | C=20 |" in table
    saved = json.loads((out / "gradient_accuracy.json").read_text())
    assert saved["config"]["inner_steps"] == [1, 5, 300]
    assert len(saved["problems"]["ridge"]["result"]["float32"]["maml"]) == 3
    assert_png(out / "gradient_accuracy.png")


def test_conv_problems_compute_in_their_own_dtype(study):
    config = study.Config(
        conv_tasks=2, queries=1, image_size=14, filters=4, weights=("random",), activation="tanh"
    )
    rng = np.random.default_rng(0)
    tasks = (
        tf.constant(rng.uniform(size=(2, 5, 14, 14, 1)), tf.float32),
        tf.constant([[0, 1, 2, 3, 4]] * 2, tf.int32),
        tf.constant(rng.uniform(size=(2, 5, 14, 14, 1)), tf.float32),
        tf.constant([[4, 3, 2, 1, 0]] * 2, tf.int32),
    )
    by_dtype = study.conv_problems(config, tasks, "random")
    losses = {d: p.loss_fn(p.meta_params, *p.support).numpy() for d, p in by_dtype.items()}
    assert losses["float64"].dtype == np.float64 and losses["float32"].dtype == np.float32
    # Same weights and data: equal up to float32 rounding, but not bit for bit (a float32
    # layer inside the float64 net would make them identical).
    np.testing.assert_allclose(losses["float32"], losses["float64"], rtol=1e-5)
    assert np.any(losses["float32"].astype(np.float64) != losses["float64"])


def test_lbfgs_reference_reaches_the_closed_form_target(study):
    config = study.Config(
        **RIDGE | {"inner_steps": (1, 5), "reference_solver": "lbfgs", "reference_inner_steps": 100}
    )
    by_dtype, target = study.ridge_problems(config)
    problem = by_dtype["float64"]
    est = study.Estimators(problem.loss_fn, lam=config.ridge_lam, learning_rate=0.1)
    ref = study.reference_gradient(problem, est, config)
    # Oracle: tf_imaml.testing.ridge_meta_gradient, the closed form at the exact minimiser.
    assert ref["ok"].all() and np.all(ref["inner_grad_norm"] < 1e-8)
    np.testing.assert_allclose(ref["target"], target, rtol=1e-7, atol=1e-10)
    labels = [row["inner_steps"] for row in ref["trajectory"]]
    assert labels[:2] == [1, 5] and labels[2].startswith("L-BFGS ")
    assert "inner steps (GD, or L-BFGS iterations)" in study.trajectory_table(ref["trajectory"])


def test_lbfgs_keeps_the_conv_net_parameter_shapes_and_lowers_the_gradient(study):
    config = study.Config(
        conv_tasks=2, queries=1, image_size=14, filters=4, weights=("random",), activation="tanh"
    )
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(size=(2, 5, 14, 14, 1)), tf.float32)
    labels = tf.constant([[0, 1, 2, 3, 4]] * 2, tf.int32)
    problem = study.conv_problems(config, (images, labels, images, labels), "random")["float64"]
    result = reference.lbfgs_proximal_minimum(
        lambda p: problem.loss_fn(p, *problem.support),
        problem.meta_params,
        lam=2.0,
        max_iterations=15,
    )
    phi, grad_norm, iterations = (
        result.adapted_params,
        result.grad_norm.numpy(),
        int(result.num_iterations),
    )
    assert [p.shape for p in phi] == [p.shape for p in problem.meta_params]
    assert 0 < iterations <= 15
    # At theta, grad G = grad L_support; fifteen iterations cut it by far more than 10x.
    start = tree.norm(
        hvp.value_and_grad(lambda p: problem.loss_fn(p, *problem.support), problem.meta_params)[1]
    ).numpy()
    assert np.all(grad_norm < start / 10), (grad_norm, start)


def test_bad_config_is_refused(study):
    with pytest.raises(ValueError, match="reference_solver"):
        study.Config(reference_solver="newton").validate()
    with pytest.raises(ValueError, match="activation"):
        study.Config(activation="no_such_activation").validate()
    with pytest.raises(ValueError, match="inner_steps"):
        study.Config(inner_steps=(5, 1)).validate()
    with pytest.raises(ValueError, match="pretrained needs"):
        study.Config(weights=("pretrained",), filters=8).validate()


def test_warm_started_lbfgs_reference_on_the_tanh_net(study):
    config = study.Config(
        conv_tasks=2,
        queries=1,
        image_size=14,
        filters=4,
        weights=("random",),
        activation="tanh",
        inner_steps=(1, 5),
        reference_solver="lbfgs",
        reference_init="phi_K",
        reference_inner_steps=60,
        reference_cg_steps=100,
    )
    rng = np.random.default_rng(1)
    images = tf.constant(rng.uniform(size=(2, 5, 14, 14, 1)), tf.float32)
    labels = tf.constant([[0, 1, 2, 3, 4]] * 2, tf.int32)
    problem = study.conv_problems(config, (images, labels, images, labels), "random")["float64"]
    est = study.Estimators(problem.loss_fn, lam=2.0, learning_rate=0.1)
    ref = study.reference_gradient(problem, est, config)
    gd_k, lbfgs_row = ref["trajectory"][-2], ref["trajectory"][-1]
    assert gd_k["inner_steps"] == 5 and lbfgs_row["inner_steps"].startswith("L-BFGS ")
    # L-BFGS started at GD's phi_5 and lowered its proximal gradient norm a hundredfold.
    assert np.all(ref["inner_grad_norm"] < gd_k["inner_grad_norm"] / 100), (
        ref["inner_grad_norm"],
        gd_k["inner_grad_norm"],
    )
    # ||phi_K - phi*|| recomputed: 5 GD steps from theta again, against the reference point
    # (whose own distance is 0).
    phi_star = study.reference.lbfgs_proximal_minimum(
        lambda p: problem.loss_fn(p, *problem.support),
        problem.meta_params,
        lam=2.0,
        max_iterations=60,
        init_params=est.inner(
            problem.meta_params, problem.meta_params, tf.constant(5), problem.support
        ).adapted_params,
    ).adapted_params
    phi_5 = est.inner(problem.meta_params, problem.meta_params, tf.constant(5), problem.support)
    want = np.linalg.norm(
        tree.flatten_tasks(phi_5.adapted_params).numpy() - tree.flatten_tasks(phi_star).numpy(),
        axis=1,
    )
    np.testing.assert_allclose(gd_k["distance_to_reference"], want, rtol=1e-6)
    np.testing.assert_array_equal(lbfgs_row["distance_to_reference"], 0.0)
    assert np.all(gd_k["distance_to_reference"] > 0) and np.all(ref["theta_distance"] > 0)
    # The damped system at phi*: finite, solved, and a different gradient from the target.
    bias = ref["damped_bias"]
    assert np.all(bias["residual"] < 1e-8) and np.all(bias["relative_error"] > 1e-3)
    assert np.all(bias["cosine"] > 0)


def test_warm_start_needs_the_lbfgs_reference(study):
    with pytest.raises(ValueError, match="reference_init=phi_K needs --reference_solver=lbfgs"):
        study.Config(reference_init="phi_K").validate()


def test_no_damped_bias_is_reported_without_a_trusted_reference(study, tmp_path):
    # Two GD steps cannot reach the ReLU net's inner minimiser: no task's reference is
    # trusted, so there is no exact implicit gradient to measure the damped system against,
    # and the report says so instead of averaging over untrusted tasks.
    config = study.Config(
        **SIZES,
        inner_steps=(1, 2),
        cg_steps=(1,),
        weights=("random",),
        conv_tasks=1,
        queries=1,
        image_size=14,
        filters=4,
        reference_inner_steps=2,
        reference_cg_steps=3,
        output_dir=str(tmp_path),
    )
    results = study.run(config)
    assert not np.any(results["problems"]["conv_random"]["reference"]["ok"])
    text = (tmp_path / "gradient_accuracy.md").read_text()
    assert "(its bias alone): not measured, no task's reference is trusted." in text
    assert "mean over trusted tasks" not in text
