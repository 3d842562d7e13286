"""scripts/studies/maml_precision.py at a tiny size: float32 against float64 MAML."""

import json

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hvp as hvp_lib
from tf_imaml import tree

# Slow: runs the study at a tiny size (meta-training included).
pytestmark = pytest.mark.slow


SIZES = dict(grad_tasks=2, meta_batch_size=2, test_tasks=4, queries=1, image_size=14, filters=4)
SMALL = dict(
    SIZES, inner_steps=(1, 3), learning_rates=(0.4,), train_meta_steps=2, train_inner_steps=1
)


@pytest.fixture(scope="module")
def results(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("maml_precision")
    return study.run(study.Config(output_dir=str(out), **SMALL)), out


def test_float32_and_float64_differ_by_rounding_only(results):
    rows = results[0]["gradient_precision"]["random"]["0.4"]
    for method in ("maml", "imaml"):
        for row in rows[method]:
            diff = np.asarray(row["relative_error"])
            assert np.all(np.asarray(row["finite"]))
            # > 1e-10: the float32 run really rounds to float32 (a float32 layer in the
            # float64 net, or a float64 cast in the float32 one, would show as 0 or 1e-16).
            # < 1e-2: at K <= 3 the same arithmetic cannot drift further apart.
            assert np.all((diff > 1e-10) & (diff < 1e-2)), (method, diff)


def test_training_runs_in_each_dtype_on_the_same_test_tasks(results):
    (training,) = results[0]["training"]["runs"]
    assert training["seed"] == 0
    assert training["float32"]["variable_dtype"] == "float32"
    assert training["float64"]["variable_dtype"] == "float64"
    for dtype in ("float32", "float64"):
        per_task = np.asarray(training[dtype]["per_task"])
        assert per_task.shape == (4,) and np.all((per_task >= 0) & (per_task <= 1))
        assert training[dtype]["test_accuracy"] == pytest.approx(per_task.mean())
    # Same start, same episodes, two meta-steps: the weights may differ only by rounding.
    assert 0 < training["final_weights_relative_difference"] < 1e-3
    assert training["float64_weights_moved_relative"] > 1e-4


def test_writes_markdown_json_and_plot(results, assert_png):
    _, out = results
    text = (out / "maml_precision.md").read_text()
    assert "### (a) Rounding error of the meta-gradient" in text
    assert "| K | MAML rel. diff. | MAML 1 − cos |" in text and "\n| 3 | " in text
    assert "### (b) MAML meta-trained in float32 and in float64" in text
    assert "| seed | float32 (%) | float64 (%) | paired difference (points) |" in text
    assert "\n| 0 | " in text and "| float64 − float32 | 1 | " in text
    saved = json.loads((out / "maml_precision.json").read_text())
    assert saved["config"]["inner_steps"] == [1, 3]
    assert_png(out / "maml_precision.png")


@pytest.fixture(scope="module")
def merged(study, results, tmp_path_factory):
    """The tiny run (part (a), training seed 0) merged with a run of seeds 3 and 1 alone."""
    more = tmp_path_factory.mktemp("maml_precision_more")
    study.run(study.Config(output_dir=str(more), **(SMALL | dict(weights=(), train_seeds=(3, 1)))))
    out = tmp_path_factory.mktemp("maml_precision_merged")
    paths = [str(results[1] / "maml_precision.json"), str(more / "maml_precision.json")]
    return study.merge(paths, str(out)), out


def test_merge_pools_the_seeds_and_recomputes_the_summary(merged, results):
    merged_results, out = merged
    training = merged_results["training"]
    assert [r["seed"] for r in training["runs"]] == [0, 1, 3]
    assert merged_results["config"]["train_seeds"] == (0, 1, 3)
    # Part (a) is the first file's; seed 0's run is the first file's, unchanged.
    first = json.loads((results[1] / "maml_precision.json").read_text())
    assert merged_results["gradient_precision"] == first["gradient_precision"]
    assert training["runs"][0] == first["training"]["runs"][0]
    # Recomputed by hand: the seed means and the per-task difference of seed-averaged tasks.
    acc = {
        d: np.array([r[d]["per_task"] for r in training["runs"]]) for d in ("float32", "float64")
    }
    summary = training["summary"]
    for d in ("float32", "float64"):
        assert summary[d]["per_seed_accuracy"] == pytest.approx(acc[d].mean(axis=1).tolist())
        assert summary[d]["seed_interval"]["mean"] == pytest.approx(acc[d].mean())
        assert summary[d]["seed_interval"]["num"] == 3
    paired = summary["float64_minus_float32"]["per_task"]
    d = (acc["float64"] - acc["float32"]).mean(axis=0)
    assert paired["mean_difference"] == pytest.approx(d.mean())
    assert paired["wins"] == int((d > 0).sum()) and paired["losses"] == int((d < 0).sum())
    text = (out / "maml_precision.md").read_text()
    assert "### (a) Rounding error" in text and "| 3 | " in text and "float64 − float32" in text
    saved = json.loads((out / "maml_precision.json").read_text())
    assert saved["training"]["summary"]["float32"]["seeds"] == [0, 1, 3]


def test_merge_refuses_a_seed_twice_and_another_setting(study, results, tmp_path):
    path = str(results[1] / "maml_precision.json")
    with pytest.raises(ValueError, match=r"training seeds met in more than one file: \[0\]"):
        study.merge([path, path], str(tmp_path / "twice"))
    other = json.loads((results[1] / "maml_precision.json").read_text())
    other["config"]["train_meta_steps"] += 1
    other_path = tmp_path / "other.json"
    other_path.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="train_meta_steps"):
        study.merge([path, str(other_path)], str(tmp_path / "other"))


def test_merge_reads_a_file_written_before_train_seeds(study, results, tmp_path):
    # Before --train_seeds, `training` was the one run of the config's `seed`, without "seed".
    old = json.loads((results[1] / "maml_precision.json").read_text())
    (run,) = old["training"].pop("runs")
    old["training"] = {k: v for k, v in run.items() if k != "seed"}
    old["config"].pop("train_seeds")
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    merged = study.merge([str(old_path)], str(tmp_path / "out"))
    assert merged["training"]["runs"] == [run]


def test_maml_with_a_vanishing_step_is_the_query_gradient(study):
    # Oracle: with learning rate -> 0, phi_K -> theta and d phi_K / d theta -> I, so the
    # unrolled meta-gradient is the query gradient at theta, to relative O(K * lr * |H|).
    config = study.Config(image_size=14, filters=4, queries=1)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(size=(1, 5, 14, 14, 1)), tf.float64)
    y = tf.constant([[0, 1, 2, 3, 4]], tf.int32)
    grads = study.Gradients(study.conv_model(config, "float64"), lam=2.0, cg_steps=2)
    theta = tree.broadcast_to_tasks(
        [tf.constant(w, tf.float64) for w in study.initial_weights(config, "random")], 1
    )
    maml = grads.maml(theta, tf.constant(3), tf.constant(1e-9, tf.float64), (x, y), (x, y))
    direct = tree.flatten_tasks(hvp_lib.value_and_grad(lambda p: grads.loss_fn(p, x, y), theta)[1])
    # K * lr * |H| ~ 3 * 1e-9 * 1e3 = 3e-6 at most (random-init curvature is ~400).
    error = np.linalg.norm(maml.numpy() - direct.numpy()) / np.linalg.norm(direct.numpy())
    assert error < 1e-5
    # ...and a real step is not: the oracle can tell the two apart.
    moved = grads.maml(theta, tf.constant(3), tf.constant(0.4, tf.float64), (x, y), (x, y))
    assert np.linalg.norm(moved.numpy() - direct.numpy()) / np.linalg.norm(direct.numpy()) > 1e-2
