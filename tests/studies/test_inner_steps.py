"""scripts/studies/inner_steps.py at a tiny size: files, rows, and K_test = 0 = no adaptation."""

import dataclasses
import json

import numpy as np
import pytest

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow


def test_tiny_study_writes_tables_plot_and_consistent_numbers(
    study, tiny, tmp_path, omniglot_subset, assert_png
):
    config = tiny(pretrained="")
    results = study.run(config)
    assert_png(tmp_path / "inner_steps.png")
    saved = json.loads((tmp_path / "inner_steps.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    labels = [m["label"] for m in saved["models"]]
    assert labels == ["iMAML-GD K_train=1", "MAML K_train=1"]
    table = (tmp_path / "inner_steps.md").read_text()
    assert (
        "| model | train time (s) | s / meta-step | failed fraction | K_test=0 | K_test=3 |"
        in table
    )
    for model in saved["models"]:
        assert f"| {model['label']} |" in table
        assert model["train_seconds"] > 0 and model["meta_steps"] == 2
        assert [r["test_steps"] for r in model["rows"]] == [0, 3]
        for row in model["rows"]:
            assert row["num_tasks"] == 4 and 0.0 <= row["accuracy"] <= 1.0
            assert len(row["per_task"]) == 4
        # Oracle: the learner called directly on each query set with its own weights. With
        # no inner step the meta-learner must predict exactly that (phi = theta).
        np.testing.assert_allclose(
            model["rows"][0]["per_task"], model["unadapted_per_task"], atol=1e-12
        )
    # Adaptation changes the predictions: some task's accuracy moves with 3 inner steps.
    assert any(m["rows"][0]["per_task"] != m["rows"][1]["per_task"] for m in saved["models"])

    # Runs made in parallel (one model each) merge into one table; a different test setting
    # is refused.
    other = tmp_path / "other"
    other.mkdir()
    saved["config"]["maml_train_steps"] = [3]
    saved["models"][1]["label"] = "MAML K_train=3"
    (other / "inner_steps.json").write_text(json.dumps(saved))
    merged = study.merge(
        [str(tmp_path / "inner_steps.json"), str(other / "inner_steps.json")],
        str(tmp_path / "merged"),
    )
    assert len(merged["models"]) == 4
    assert "| MAML K_train=3 |" in (tmp_path / "merged" / "inner_steps.md").read_text()
    saved["config"]["test_tasks"] = 8
    (other / "inner_steps.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="test_tasks"):
        study.merge([str(tmp_path / "inner_steps.json"), str(other / "inner_steps.json")], "x")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"test_steps": (0, -1)}, "--test_steps"),
        ({"imaml_train_steps": (), "maml_train_steps": (), "pretrained": ""}, "no model"),
        ({"lam": 0.0}, "--lam must be > 0"),
        ({"pretrained": "/nonexistent.keras"}, "is not a file"),
    ],
)
def test_bad_config_is_refused_before_any_work(study, change, message, tmp_path):
    config = dataclasses.replace(study.Config(output_dir=str(tmp_path / "out")), **change)
    with pytest.raises(ValueError, match=message):
        study.run(config)
    assert not (tmp_path / "out").exists()
