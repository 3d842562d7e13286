"""MultiWorkerMirroredStrategy: two worker processes on localhost against one process.

Each worker gets `TF_CONFIG` with the same two-worker cluster and its own index; the
strategy must exist before TensorFlow runs any op, so each configuration is its own process.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

# Slow: three processes, each starting TensorFlow and meta-training.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent

WORKER = textwrap.dedent(
    """
    import json
    import sys

    import tensorflow as tf

    multi = sys.argv[1] == "multi"
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else tf.distribute.get_strategy()

    import keras
    import tf_imaml
    from tf_imaml import testing

    tasks = testing.linear_tasks(num_tasks=4, num_support=5, num_query=7, dim=4, seed=0)
    data = tf.data.Dataset.from_tensors(
        ((tasks.support_x, tasks.support_y[..., None], tasks.query_x), tasks.query_y[..., None])
    )
    options = tf.data.Options()
    # Each worker takes its share of every meta-batch (what scripts/train.py does).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    with strategy.scope():
        keras.utils.set_random_seed(0)
        learner = keras.Sequential(
            [keras.Input((4,), dtype="float64"),
             keras.layers.Dense(1, use_bias=False, dtype="float64")]
        )
        meta = tf_imaml.ImplicitMAML(
            learner, lam=2.0, inner_steps=16, inner_learning_rate=0.05, cg_steps=4
        )
        meta.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    before = learner.trainable_variables[0].numpy()
    meta.fit(data.with_options(options).repeat(), epochs=1, steps_per_epoch=1, verbose=0)
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "before": before.tolist(),
        "after": learner.trainable_variables[0].numpy().tolist(),
    }))
    """
)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _result(stdout):
    line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def test_two_workers_step_equals_one_process_step():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    cluster = {"worker": [f"localhost:{_free_port()}" for _ in range(2)]}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, "multi"],
            env=dict(
                env,
                TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    single = subprocess.run(
        [sys.executable, "-c", WORKER, "single"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    outputs = [w.communicate(timeout=600) for w in workers]
    assert single.returncode == 0, single.stderr[-3000:]
    want = _result(single.stdout)
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-4000:]
        got = _result(stdout)
        assert got["replicas"] == 2 and want["replicas"] == 1
        assert got["before"] == want["before"]
        assert np.abs(np.subtract(want["after"], want["before"])).max() > 1e-3
        # Oracle: the single-process step over the same 4 tasks. Each worker takes 2 tasks;
        # the usable-task counts are all-reduced, so the mean is over all 4 (float64).
        np.testing.assert_allclose(got["after"], want["after"], rtol=1e-12, atol=1e-14)
