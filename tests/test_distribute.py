"""fit under MirroredStrategy over two logical CPU devices equals fit on one device.

Logical devices must be configured before TensorFlow initialises, so the comparison runs in
a fresh subprocess.
"""

import json
import pathlib
import textwrap

import pytest

# Slow: subprocesses, each meta-training under MirroredStrategy.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import tf_imaml
    from tf_imaml import testing

    tasks = testing.linear_tasks(num_tasks=4, num_support=5, num_query=7, dim=4, seed=0)
    ridge = tf.data.Dataset.from_tensors(
        ((tasks.support_x, tasks.support_y[..., None], tasks.query_x),
         tasks.query_y[..., None]))
    rng = np.random.default_rng(0)
    images = tf.data.Dataset.from_tensors(
        ((rng.normal(size=(4, 3, 8, 8, 1)).astype("float32"),
          np.tile(np.arange(3, dtype="int32"), (4, 1)),
          rng.normal(size=(4, 6, 8, 8, 1)).astype("float32")),
         np.tile(np.arange(3, dtype="int32"), (4, 2))))

    def ridge_meta():
        keras.utils.set_random_seed(0)
        learner = keras.Sequential([keras.Input((4,), dtype="float64"),
                                    keras.layers.Dense(1, use_bias=False, dtype="float64")])
        meta = tf_imaml.ImplicitMAML(learner, lam=2.0, inner_steps=16,
                                     inner_learning_rate=0.05, cg_steps=4)
        meta.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        return meta

    def conv_meta():
        keras.utils.set_random_seed(1)
        learner = tf_imaml.models.conv4_classifier(3, input_shape=(8, 8, 1), filters=4)
        meta = tf_imaml.ImplicitMAML(learner, lam=2.0, inner_steps=3,
                                     inner_learning_rate=0.1, cg_steps=2, linear_solver="cg")
        meta.compile(optimizer=keras.optimizers.Adam(1e-2),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return meta

    result = {}
    # One configuration per process: collective-op keys of two strategies in one process
    # collide when their dtypes differ.
    cases = {"ridge": (ridge_meta, ridge), "conv": (conv_meta, images)}
    for name in sys.argv[1:]:
        make, data = cases[name]
        single = make()
        before = [v.numpy() for v in single.learner.trainable_variables]
        single.fit(data, epochs=1, verbose=0)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            mirrored = make()
        start = [v.numpy() for v in mirrored.learner.trainable_variables]
        logs = mirrored.fit(data, epochs=1, verbose=0).history
        result[name] = {
            "replicas": strategy.num_replicas_in_sync,
            "same_start": max(float(np.max(np.abs(a - b))) for a, b in zip(before, start)),
            "moved": max(float(np.max(np.abs(v.numpy() - b)))
                         for v, b in zip(single.learner.trainable_variables, before)),
            "diff": max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(
                single.learner.trainable_variables, mirrored.learner.trainable_variables)),
            "failed_fraction": logs["failed_fraction"][0],
        }
    print("RESULT " + json.dumps(result))
    """
)


@pytest.mark.parametrize("name, tol", [("ridge", 1e-12), ("conv", 1e-5)])
def test_mirrored_strategy_step_equals_single_device_step(name, tol, run_python):
    proc = run_python("-c", SCRIPT, name, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    r = result[name]
    assert r["replicas"] == 2
    assert r["same_start"] == 0.0
    assert r["moved"] > 1e-3  # the step did something
    # Oracle: the single-device step. Each replica averages its 2 tasks and the
    # optimizer sums the halved means: the same mean over 4 tasks up to rounding
    # (float64 ridge: 1e-12; float32 conv net with Adam: 1e-5).
    assert r["diff"] < tol, result
