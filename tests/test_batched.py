"""All tasks in one pass (`tf_imaml.batched`) against task-by-task `stateless_call`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import batched
from tf_imaml import layers
from tf_imaml import models

NUM_TASKS = 3


def _learners():
    keras.utils.set_random_seed(0)
    yield (
        "conv_strided",
        models.conv4_classifier(3, input_shape=(16, 16, 1), filters=4, dtype="float64"),
    )
    yield (
        "conv_maxpool",
        models.conv4_classifier(
            3, input_shape=(16, 16, 2), filters=3, pooling="max", dtype="float64"
        ),
    )
    yield (
        "conv_avgpool",
        models.conv4_classifier(
            3, input_shape=(16, 16, 1), filters=3, pooling="avg", activation="tanh", dtype="float64"
        ),
    )
    yield "mlp", models.mlp_regressor((5, 4), input_dim=2, dtype="float64")
    yield (
        "conv_bias_valid_dilated",
        keras.Sequential(
            [
                keras.Input((9, 8, 2), dtype="float64"),
                keras.layers.Conv2D(3, (3, 2), strides=(2, 1), padding="valid", dtype="float64"),
                keras.layers.Conv2D(
                    2, 3, padding="same", dilation_rate=2, activation="tanh", dtype="float64"
                ),
                keras.layers.Flatten(dtype="float64"),
                keras.layers.Dense(2, dtype="float64"),
            ]
        ),
    )


LEARNERS = dict(_learners())


def _task_params(learner, rng):
    return [
        tf.constant(v.numpy() + 0.3 * rng.standard_normal((NUM_TASKS, *v.shape)))
        for v in learner.trainable_variables
    ]


def _per_task(learner, params, x):
    return np.stack(
        [
            learner.stateless_call([p[t] for p in params], [], x[t], training=True)[0]
            for t in range(x.shape[0])
        ]
    )


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("static_tasks", [True, False])
def test_apply_equals_stateless_call_per_task(name, static_tasks):
    learner = LEARNERS[name]
    rng = np.random.default_rng(1)
    params = _task_params(learner, rng)
    x = tf.constant(rng.standard_normal((NUM_TASKS, 5, *learner.inputs[0].shape[1:])))
    if static_tasks:  # One tf.nn.conv2d per task.
        got = batched.apply(learner, params, x)
    else:  # An unknown number of tasks: the im2col form.
        spec = [tf.TensorSpec([None, *p.shape[1:]], p.dtype) for p in params]
        fn = tf.function(
            lambda p, x: batched.apply(learner, p, x),
            input_signature=[spec, tf.TensorSpec([None, *x.shape[1:]], x.dtype)],
        )
        got = fn(params, x)
    # Oracle: the learner's own call, task by task; same math in another op order.
    np.testing.assert_allclose(got, _per_task(learner, params, x), rtol=1e-11, atol=1e-12)


def test_unsupported_learners_are_named_and_fall_back():
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    dropout = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)]
    )
    assert "not a keras.Sequential" in batched.unsupported_layers(functional)[0]
    assert "Dropout" in batched.unsupported_layers(dropout)[0]
    assert batched.unsupported_layers(LEARNERS["conv_strided"]) == []
    with pytest.raises(ValueError, match="Dropout is not supported"):
        tf_imaml.ImplicitMAML(dropout, task_batching="batched")
    meta = tf_imaml.ImplicitMAML(dropout)  # "auto" falls back to one task at a time.
    assert not meta._batch_support
    with pytest.raises(ValueError, match="task_batching"):
        tf_imaml.ImplicitMAML(dropout, task_batching="vectorized")


def _episode(rng, input_shape, num_classes=3):
    return (
        (
            rng.standard_normal((NUM_TASKS, 6, *input_shape)),
            np.stack([rng.permutation(np.arange(6) % num_classes) for _ in range(NUM_TASKS)]),
            rng.standard_normal((NUM_TASKS, 9, *input_shape)),
        ),
        rng.integers(0, num_classes, (NUM_TASKS, 9)),
    )


IMAML_COMMON = dict(lam=1.0, cg_steps=3, on_failure="first_order")
ALGORITHMS = {
    "imaml_gd_cg_tf": lambda learner, b: tf_imaml.ImplicitMAML(
        learner, lam=1.0, inner_steps=4, cg_steps=3, task_batching=b, on_failure="first_order"
    ),
    "imaml_adam_cg": lambda learner, b: tf_imaml.ImplicitMAML(
        learner,
        **IMAML_COMMON,
        inner_steps=4,
        inner_optimizer="adam",
        inner_learning_rate=0.01,
        linear_solver="cg",
        task_batching=b,
    ),
    "imaml_hf": lambda learner, b: tf_imaml.ImplicitMAML(
        learner, **IMAML_COMMON, inner_steps=2, inner_optimizer="hessian_free", task_batching=b
    ),
    "maml": lambda learner, b: tf_imaml.MAML(
        learner, inner_steps=3, inner_learning_rate=0.1, task_batching=b
    ),
    "fomaml": lambda learner, b: tf_imaml.MAML(
        learner, inner_steps=3, inner_learning_rate=0.1, first_order=True, task_batching=b
    ),
    "reptile": lambda learner, b: tf_imaml.Reptile(
        learner, inner_steps=3, inner_learning_rate=0.1, task_batching=b
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_batched_and_per_task_meta_steps_agree(algorithm):
    """One SGD(1) meta-step moves the weights by minus the mean meta-gradient: same both ways."""
    rng = np.random.default_rng(2)
    episode = _episode(rng, (16, 16, 1))
    moved = {}
    # The query sets go through the same batched code as the support sets: "batched" is
    # checked for two algorithms, "support" (the default) for all.
    modes = ("batched", "support") if algorithm in ("imaml_gd_cg_tf", "maml") else ("support",)
    for mode in (*modes, "per_task"):
        keras.utils.set_random_seed(3)
        if algorithm == "imaml_hf":
            # One block of conv4 (conv, batch statistics, tanh) and its head: tracing the
            # Hager-Zhang search costs about 35 s per mode with four blocks, 15 s with one,
            # and the other algorithms check the four-block net both ways already.
            learner = keras.Sequential(
                [
                    keras.Input((16, 16, 1), dtype="float64"),
                    keras.layers.Conv2D(
                        4, 3, strides=2, padding="same", use_bias=False, dtype="float64"
                    ),
                    layers.BatchStatNormalization(dtype="float64"),
                    keras.layers.Activation("tanh", dtype="float64"),
                    keras.layers.Flatten(dtype="float64"),
                    keras.layers.Dense(3, dtype="float64"),
                ]
            )
        else:
            learner = models.conv4_classifier(
                3, input_shape=(16, 16, 1), filters=4, activation="tanh", dtype="float64"
            )
        meta = ALGORITHMS[algorithm](learner, mode)
        assert meta._batch_support == (mode != "per_task")
        meta.compile(
            optimizer=keras.optimizers.SGD(learning_rate=1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [v.numpy() for v in learner.trainable_variables]
        logs = meta.train_on_batch(*episode, return_dict=True)
        moved[mode] = [
            v.numpy() - b for v, b in zip(learner.trainable_variables, before, strict=True)
        ]
        moved[mode + "_logs"] = logs
    assert any(np.abs(m).max() > 1e-3 for m in moved["support"])
    # Oracle: the task-by-task path (tf.map_fn over stateless_call), float64.
    for mode in modes:
        for got, want in zip(moved[mode], moved["per_task"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-11)
        for key in ("loss", "support_loss", "failed_fraction"):
            np.testing.assert_allclose(
                moved[mode + "_logs"][key], moved["per_task_logs"][key], rtol=1e-9
            )
