"""scripts/studies/assumptions.py at a tiny size: files, table rows and real properties."""

import dataclasses
import json

import numpy as np
import pytest

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

    shipped = str(study.PRETRAINED)
    with pytest.raises(ValueError, match="is an Omniglot model"):
        dataclasses.replace(config, pretrained=shipped).validate()
    with pytest.raises(ValueError, match="does not fit the omniglot net"):
        study.run(study.Config(output_dir=str(tmp_path / "x"), filters=8, verbose=False))
    assert not (tmp_path / "x" / "study_assumptions.json").exists()
