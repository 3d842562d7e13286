"""scripts/studies/assumptions.py at a tiny size: files, table rows and real properties."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf

import tf_imaml

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow


def test_tiny_study_writes_tables_plots_and_consistent_counts(study, tiny, tmp_path, assert_png):
    config = tiny(verbose=False)
    summary = study.run(config)
    md = (tmp_path / "study_assumptions.md").read_text()
    assert "3 GD steps of 0.1" in md  # the header states the setting
    for checkpoint in ("init", "imaml_step1"):
        for lam in ("0.5", "10"):
            assert f"| {checkpoint} | {lam} | 2 |" in md
    for name in summary["plots"]:
        assert_png(tmp_path / name)
    saved = json.loads((tmp_path / "study_assumptions.json").read_text())
    assert len(saved["rows"]) == 4
    rows = {(r["checkpoint"], r["lam"]): r for r in saved["rows"]}
    for row in saved["rows"]:
        for key in ("not_delta_stationary", "diverged", "indefinite", "lr_unstable"):
            assert 0.0 <= row[key] <= 1.0
        # One random direction gives a finite, positive lower bound on the local constant.
        assert 0.0 < row["median_lipschitz"] <= row["max_lipschitz"] < np.inf
    for checkpoint in ("init", "imaml_step1"):
        small, large = rows[(checkpoint, 0.5)], rows[(checkpoint, 10.0)]
        # lambda_min(I + H/lam) = 1 + mu_min/lam rises with lam when mu_min < 0 (this net's
        # support loss has negative curvature): lam = 0.5 is indefinite for every task.
        assert small["indefinite"] == 1.0 and small["indefinite"] >= large["indefinite"]
        assert small["median_min_eig"] < large["median_min_eig"]
        # The fraction counted is the fraction of per-task estimates below zero.
        per_task = saved["per_task"][checkpoint]["0.5"]
        assert len(per_task["min_eig"]) == 2
        assert small["indefinite"] == np.mean(~(np.array(per_task["min_eig"]) > 0))
        rel = np.array(per_task["grad_norm"]) / np.array(per_task["grad_norm_start"])
        assert small["not_delta_stationary"] == np.mean(~(rel <= config.delta))
    # The damped systems' counts recompute from the per-task estimates of I + H/lam.
    for row in saved["rows"]:
        per_task = saved["per_task"][row["checkpoint"]][str(row["lam"])]
        for key, damping, lam_damping in (
            ("damped", 1.0, 0.0),
            ("authors", 1.0, 10.0),
        ):
            converted = study.system_min_eigenvalue(
                per_task["min_eig"], row["lam"], damping=damping, lam_damping=lam_damping
            )
            np.testing.assert_allclose(per_task[f"min_eig_{key}"], converted)
            assert row[f"num_indefinite_{key}"] == np.sum(~(converted > 0))
            # The identity term and the larger lam only raise the smallest eigenvalue.
            assert row[f"num_indefinite_{key}"] <= row["num_indefinite"]
    assert "| 2I+H/(lam+10) indefinite (tasks) |" in md
    assert "a zero count is not a proof of positive definiteness" in md


def test_tiny_mini_imagenet_study_and_models_that_do_not_fit(
    study, tiny, tiny_mini_imagenet, tmp_path
):
    # The --tiny sizes on 3-way mini-ImageNet tasks, without the short training run.
    mini = dict(dataset="mini_imagenet", data_dir=str(tiny_mini_imagenet), ways=3, image_size=16)
    config = tiny(**mini, inner_learning_rate=0.01, train_steps=0, verbose=False)
    summary = study.run(config)
    md = (tmp_path / "study_assumptions.md").read_text()
    assert "mini-ImageNet 3-way 1-shot training tasks" in md and "16x16 images" in md
    assert [(r["checkpoint"], r["lam"]) for r in summary["rows"]] == [
        ("init", 0.5),
        ("init", 10.0),
    ]
    for row in summary["rows"]:
        assert row["num_tasks"] == 2 and np.isfinite(row["median_min_eig"])
    # The 32-filter net on RGB images: 3 input channels in the first kernel.
    assert study._learner(config).trainable_variables[0].shape == (3, 3, 3, 8)

    shipped = str(study.harness.PRETRAINED)
    with pytest.raises(ValueError, match="is an Omniglot model"):
        dataclasses.replace(config, pretrained=shipped).validate()
    with pytest.raises(ValueError, match="does not fit the omniglot net"):
        study.run(study.Config(output_dir=str(tmp_path / "x"), filters=8, verbose=False))
    assert not (tmp_path / "x" / "study_assumptions.json").exists()


@pytest.mark.parametrize("lam, damping, lam_damping", [(2.0, 1.0, 10.0), (0.5, 1.0, 0.0)])
def test_system_min_eigenvalue_against_dense_eigenvalues(study, lam, damping, lam_damping):
    # Two tasks of an indefinite quadratic loss 1/2 x^T A_t x in float64 (N = 8): its Hessian
    # is A_t, so np.linalg.eigvalsh gives the true spectrum of every system (the oracle).
    rng = np.random.default_rng(3)
    dim = 8
    mats = rng.normal(size=(2, dim, dim))
    mats = 3.0 * (mats + np.transpose(mats, (0, 2, 1))) / 2  # eigenvalues about -10 to 10
    hessians = tf.constant(mats)

    def loss_fn(params):
        (x,) = params
        return 0.5 * tf.einsum("ti,tij,tj->t", x, hessians, x)

    phi = [tf.constant(rng.normal(size=(2, dim)))]
    eye = np.eye(dim)
    dense = np.linalg.eigvalsh((1 + damping) * eye + mats / (lam + lam_damping))[:, 0]
    full = tf_imaml.curvature.proximal_curvature(loss_fn, phi, lam=lam, num_iter=dim, seed=1)
    converted = study.system_min_eigenvalue(
        full.min_eigenvalue.numpy(), lam, damping=damping, lam_damping=lam_damping
    )
    # A full Krylov space (m = N): the Ritz values are the eigenvalues, to rounding (1e-10:
    # float64 Lanczos with full reorthogonalisation on a matrix of norm ~10).
    np.testing.assert_allclose(converted, dense, atol=1e-10)
    # Three iterations: the converted value equals Lanczos run on the damped system itself
    # from the same start vector (the same Krylov space), and bounds the truth from above.
    short = tf_imaml.curvature.proximal_curvature(loss_fn, phi, lam=lam, num_iter=3, seed=1)
    direct = tf_imaml.curvature.proximal_curvature(
        loss_fn, phi, lam=lam + lam_damping, damping=damping, num_iter=3, seed=1
    )
    converted = study.system_min_eigenvalue(
        short.min_eigenvalue.numpy(), lam, damping=damping, lam_damping=lam_damping
    )
    np.testing.assert_allclose(converted, direct.min_eigenvalue.numpy(), atol=1e-10)
    assert np.all(converted >= dense - 1e-10) and np.any(converted > dense + 1e-3)
