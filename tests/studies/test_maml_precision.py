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
    training = results[0]["training"]
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
    assert "| float64 | " in text and "Paired difference" in text
    saved = json.loads((out / "maml_precision.json").read_text())
    assert saved["config"]["inner_steps"] == [1, 3]
    assert_png(out / "maml_precision.png")


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
