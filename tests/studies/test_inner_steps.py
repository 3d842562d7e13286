"""scripts/studies/inner_steps.py at a tiny size: files, arms, seeds, paired tests, merging."""

import dataclasses
import json

import numpy as np
import pytest

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow

ARMS = [
    "iMAML-GD K_train=1 lr=0.1",
    "iMAML-GD K_train=1 lr=0.4",
    "MAML K_train=1 lr=0.1",
    "MAML K_train=1 lr=0.4",
]


def test_tiny_study_writes_tables_plot_and_consistent_numbers(
    study, tiny, tmp_path, omniglot_subset, assert_png
):
    config = tiny(pretrained="")
    assert config.seeds == (0, 1) and config.inner_learning_rates == (0.1, 0.4)
    results = study.run(config)
    assert_png(tmp_path / "inner_steps.png")
    saved = json.loads((tmp_path / "inner_steps.json").read_text())
    assert saved["models"] == json.loads(json.dumps(results["models"]))
    # Both algorithms at both step sizes, each for both seeds.
    assert [(m["label"], m["seed"]) for m in saved["models"]] == [
        (arm, seed) for arm in ARMS for seed in (0, 1)
    ]
    assert list(saved["arms"]) == ARMS
    table = (tmp_path / "inner_steps.md").read_text()
    assert (
        "| model | seeds | train time (s) | s / meta-step | failed fraction | K_test=0 | "
        "K_test=3 |" in table
    )
    for model in saved["models"]:
        assert f"| {model['label']} | 2 |" in table
        assert model["train_seconds"] > 0 and model["meta_steps"] == 2
        assert model["inner_learning_rate"] == float(model["label"].rsplit("=", 1)[1])
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

    # The seed-level interval, recomputed from the per-task numbers: the mean of the two
    # seeds' means, t_{0.975,1} = 12.706 (printed tables) times their std / sqrt(2).
    arm = saved["arms"]["MAML K_train=1 lr=0.4"]["test"]["3"]
    per_seed = [
        np.mean(m["rows"][1]["per_task"])
        for m in saved["models"]
        if m["label"] == "MAML K_train=1 lr=0.4"
    ]
    assert arm["seeds"] == [0, 1]
    assert arm["seed_interval"]["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    half = 12.706 * np.std(per_seed, ddof=1) / np.sqrt(2)
    assert arm["seed_interval"]["half_width"] == pytest.approx(half, rel=1e-4, abs=1e-12)

    # Paired tests between arms that differ in one thing only, at both K_test values.
    pairs = {(c["arm"], c["against"], c["differs_in"]) for c in saved["comparisons"]}
    assert pairs == {
        (ARMS[0], ARMS[2], "algorithm"),
        (ARMS[1], ARMS[3], "algorithm"),
        (ARMS[0], ARMS[1], "step size"),
        (ARMS[2], ARMS[3], "step size"),
    }
    assert len(saved["comparisons"]) == 8
    (paired,) = [
        c
        for c in saved["comparisons"]
        if c["arm"] == ARMS[1] and c["against"] == ARMS[3] and c["test_steps"] == 3
    ]

    def per_task(label):
        return np.mean(
            [m["rows"][1]["per_task"] for m in saved["models"] if m["label"] == label], axis=0
        )

    d = per_task(ARMS[1]) - per_task(ARMS[3])
    assert paired["per_task"]["mean_difference"] == pytest.approx(d.mean(), abs=1e-12)
    assert paired["per_task"]["losses"] == int(np.sum(d < 0))
    # The Markdown shows them at K_test = K_train, or (not tested here) the largest K_test.
    assert f"| {ARMS[1]} | {ARMS[3]} | algorithm | 3 | 2 | " in table

    # Runs made in parallel (each with its share of the seeds) merge into one table; the
    # same model twice, or a different test setting, is refused.
    other = tmp_path / "other"
    other.mkdir()
    for model in saved["models"]:
        model["seed"] += 10
    saved["config"]["seeds"] = [10, 11]
    (other / "inner_steps.json").write_text(json.dumps(saved))
    merged = study.merge(
        [str(tmp_path / "inner_steps.json"), str(other / "inner_steps.json")],
        str(tmp_path / "merged"),
    )
    assert len(merged["models"]) == 16
    assert merged["arms"][ARMS[0]]["test"]["0"]["seeds"] == [0, 1, 10, 11]
    assert f"| {ARMS[0]} | 4 |" in (tmp_path / "merged" / "inner_steps.md").read_text()
    with pytest.raises(ValueError, match="more than one run"):
        study.merge([str(tmp_path / "inner_steps.json")] * 2, str(tmp_path / "twice"))
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
        ({"inner_learning_rates": (0.1, 0.0)}, "--inner_learning_rates must be > 0"),
        ({"seeds": (1, 1)}, "--seeds must be distinct"),
    ],
)
def test_bad_config_is_refused_before_any_work(study, change, message, tmp_path):
    config = dataclasses.replace(study.Config(output_dir=str(tmp_path / "out")), **change)
    with pytest.raises(ValueError, match=message):
        study.run(config)
    assert not (tmp_path / "out").exists()


def test_shipped_model_row_says_which_model_it_is(study, tiny, tmp_path, omniglot_subset):
    """The shipped model's meta-steps and test-time lam come from the saved model itself."""
    import keras

    config = tiny(imaml_train_steps=(), maml_train_steps=())
    results = study.run(config)
    (model,) = results["models"]
    saved = keras.models.load_model(config.pretrained)
    assert model["pretrained"] == config.pretrained
    assert model["meta_steps"] == int(saved.optimizer.iterations.numpy()) > 1000
    assert model["test_lam"] == saved.test_lam
    table = (tmp_path / "inner_steps.md").read_text()
    assert (
        f"The shipped model's row is its own training run ({model['meta_steps']} meta-steps, "
        f"adapted with its own inner loop at test_lam = {saved.test_lam:g}" in table
    )


def test_diverged_cells_are_marked(study):
    """A K_test whose adaptations gave non-finite logits is flagged, summed over seeds."""
    rows = lambda bad: [{"test_steps": 16, "num_tasks": 200, "non_finite_tasks": bad}]  # noqa: E731
    models = [{"rows": rows(0)}, {"rows": rows(200)}, {"rows": rows(3)}]
    assert study._diverged(models, "16") == " (diverged on 203 of 600)"
    assert study._diverged(models[:1], "16") == ""
    # Runs recorded before the count existed are not marked.
    assert study._diverged([{"rows": [{"test_steps": 16, "num_tasks": 200}]}], "16") == ""
