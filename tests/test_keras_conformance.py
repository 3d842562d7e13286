"""Keras conformance, written as Keras users write programs: the public API only.

Each test is a small program of the kind a Keras user writes (a Functional or Sequential
learner, numpy episodes, compile/fit/evaluate/predict, adapt) and checks that the meta-model
behaves as Keras defines it.
"""

import logging

import keras
import numpy as np
import pytest

import tf_imaml

# Slow: meta-steps of every algorithm through fit/evaluate/predict (minutes).
pytestmark = pytest.mark.slow

WAYS, SHOTS, QUERIES, TASKS, FEATURES = 3, 2, 3, 4, 8
ALGORITHMS = {
    "imaml": lambda learner: tf_imaml.ImplicitMAML(learner, inner_steps=3, inner_learning_rate=0.1),
    "maml": lambda learner: tf_imaml.MAML(learner, inner_steps=2, inner_learning_rate=0.1),
    "fomaml": lambda learner: tf_imaml.MAML(
        learner, inner_steps=2, inner_learning_rate=0.1, first_order=True
    ),
    "reptile": lambda learner: tf_imaml.Reptile(learner, inner_steps=2, inner_learning_rate=0.1),
}


def _episode(seed=0, tasks=TASKS):
    rng = np.random.default_rng(seed)
    support_y = np.tile(np.repeat(np.arange(WAYS), SHOTS), (tasks, 1))
    query_y = np.tile(np.repeat(np.arange(WAYS), QUERIES), (tasks, 1))
    centers = rng.normal(size=(tasks, WAYS, FEATURES)).astype("float32")
    support_x = np.take_along_axis(centers, support_y[..., None], 1) + 0.3 * rng.normal(
        size=(tasks, WAYS * SHOTS, FEATURES)
    ).astype("float32")
    query_x = np.take_along_axis(centers, query_y[..., None], 1) + 0.3 * rng.normal(
        size=(tasks, WAYS * QUERIES, FEATURES)
    ).astype("float32")
    return (support_x, support_y, query_x), query_y


def _mlp(*middle, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURES,))
    x = keras.layers.Dense(16, activation="tanh")(inputs)
    for layer in middle:
        x = layer(x)
    return keras.Model(inputs, keras.layers.Dense(WAYS)(x))


def _compile(meta, **kwargs):
    options = dict(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    options.update(kwargs)
    meta.compile(**options)
    return meta


# ------------------------------------------------------------------ 1. Dropout and friends


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize(
    "layer", [lambda: keras.layers.Dropout(0.5), lambda: keras.layers.GaussianNoise(1.0)]
)
def test_random_layers_are_off_at_inference_and_redrawn_in_training(algorithm, layer):
    inputs, query_y = _episode()
    meta = _compile(ALGORITHMS[algorithm](_mlp(layer())))
    first = meta.predict(inputs, verbose=0)
    # Inference is deterministic and equals the adapted learner used on its own.
    np.testing.assert_array_equal(meta.predict(inputs, verbose=0), first)
    adapted = meta.adapt(inputs[0][1], inputs[1][1])
    np.testing.assert_allclose(adapted.predict(inputs[2][1], verbose=0), first[1], atol=1e-5)
    before = meta.evaluate(inputs, query_y, verbose=0, return_dict=True)
    again = meta.evaluate(inputs, query_y, verbose=0, return_dict=True)
    assert before == again
    # Training draws new masks each step: with a learning rate of 0 the weights stay, yet the
    # training loss changes from step to step.
    frozen = _compile(ALGORITHMS[algorithm](_mlp(layer())), optimizer=keras.optimizers.SGD(0.0))
    losses = [frozen.train_on_batch(inputs, query_y, return_dict=True)["loss"] for _ in range(3)]
    assert len(set(np.round(losses, 6))) == 3, losses


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_without_random_layers_training_is_repeatable(algorithm):
    # The control for the test above: no random layer, frozen weights, the same loss.
    inputs, query_y = _episode()
    frozen = _compile(ALGORITHMS[algorithm](_mlp()), optimizer=keras.optimizers.SGD(0.0))
    losses = [frozen.train_on_batch(inputs, query_y, return_dict=True)["loss"] for _ in range(3)]
    assert len(set(np.round(losses, 6))) == 1, losses


# ------------------------------------------------------------------ 3. use before compile


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_use_before_compile_says_call_compile_first(algorithm):
    inputs, query_y = _episode()
    meta = ALGORITHMS[algorithm](_mlp())
    for call in (
        lambda: meta.fit(inputs, query_y, verbose=0),
        lambda: meta.evaluate(inputs, query_y, verbose=0),
        lambda: meta.train_on_batch(inputs, query_y),
    ):
        with pytest.raises(ValueError, match=r"You must call `compile\(\)`.*optimizer"):
            call()
    for call in (
        lambda: meta.predict(inputs, verbose=0),
        lambda: meta.adapt(inputs[0][0], inputs[1][0]),
    ):
        with pytest.raises(ValueError, match=r"You must call `compile\(\)`.*need only the loss"):
            call()
    # A loss is enough for predict and adapt.
    meta.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert meta.predict(inputs, verbose=0).shape == (TASKS, WAYS * QUERIES, WAYS)
    assert meta.adapt(inputs[0][0], inputs[1][0]).predict(inputs[2][0], verbose=0).shape == (
        WAYS * QUERIES,
        WAYS,
    )


# ------------------------------------------------------------------ 4. metric names


def test_every_metric_name_keras_accepts_is_resolved_and_named_as_keras_names_it():
    inputs, query_y = _episode()
    meta = _compile(
        ALGORITHMS["imaml"](_mlp()),
        metrics=[
            "acc",
            "accuracy",
            "sparse_categorical_accuracy",
            keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2"),
        ],
    )
    history = meta.fit(inputs, query_y, epochs=1, verbose=0)
    for name in ("acc", "accuracy", "sparse_categorical_accuracy", "top2"):
        assert name in history.history and "pre_adaptation_" + name in history.history
    regression = tf_imaml.MAML(_mlp(), inner_steps=1, inner_learning_rate=0.1)
    regression.compile(optimizer="adam", loss="mse", metrics=["mae", "mse"])
    targets = np.random.default_rng(0).normal(size=(TASKS, WAYS * QUERIES, WAYS))
    support = np.random.default_rng(1).normal(size=(TASKS, WAYS * SHOTS, WAYS))
    stop = keras.callbacks.EarlyStopping(monitor="pre_adaptation_mae", mode="min", patience=5)
    history = regression.fit(
        (inputs[0], support, inputs[2]), targets, epochs=2, verbose=0, callbacks=[stop]
    )
    assert {"mae", "mse", "pre_adaptation_mae", "pre_adaptation_mse"} <= set(history.history)
    assert len(history.history["pre_adaptation_mae"]) == 2


# ------------------------------------------------------------------ 5. BatchNormalization


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile"])
def test_first_order_algorithms_take_keras_batch_normalization_with_task_statistics(algorithm):
    inputs, query_y = _episode()
    meta = _compile(ALGORITHMS[algorithm](_mlp(keras.layers.BatchNormalization())))
    meta.fit(inputs, query_y, epochs=2, verbose=0)
    # Per-task statistics: a task's predictions do not depend on the other tasks, and the
    # moving statistics stay at their initial values (never used).
    together = meta.predict(inputs, verbose=0)
    alone = meta.predict(tuple(x[2:3] for x in inputs), verbose=0)
    np.testing.assert_allclose(alone[0], together[2], atol=1e-5)
    bn = [v for v in meta.learner.non_trainable_variables if "moving_mean" in v.path]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(bn[0]), 0.0)


@pytest.mark.parametrize("algorithm", ["imaml", "maml"])
def test_second_order_algorithms_still_refuse_keras_batch_normalization(algorithm):
    with pytest.raises(ValueError, match="not safe for Hessian-vector products"):
        ALGORITHMS[algorithm](_mlp(keras.layers.BatchNormalization()))


def test_keras_batch_normalization_with_dropout_is_refused_with_the_reason():
    learner = _mlp(keras.layers.BatchNormalization(), keras.layers.Dropout(0.5))
    with pytest.raises(ValueError, match="BatchNormalization and random layers"):
        ALGORITHMS["fomaml"](learner)


# ------------------------------------------------------------------ smaller ones


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_only_algorithms_with_a_linear_solve_log_solver_metrics(algorithm):
    inputs, query_y = _episode()
    meta = _compile(ALGORITHMS[algorithm](_mlp()))
    logs = meta.train_on_batch(inputs, query_y, return_dict=True)
    has_solver = {"solver_residual", "solver_iterations"} <= set(logs)
    assert has_solver == (algorithm == "imaml"), sorted(logs)


def test_one_hot_labels_with_a_sparse_loss_say_use_categorical_crossentropy():
    inputs, query_y = _episode()
    meta = _compile(ALGORITHMS["imaml"](_mlp()))
    one_hot = np.eye(WAYS)[inputs[1]]
    with pytest.raises(ValueError, match="one-hot labels.*CategoricalCrossentropy"):
        meta.fit((inputs[0], one_hot, inputs[2]), np.eye(WAYS)[query_y], verbose=0)
    meta = _compile(
        ALGORITHMS["imaml"](_mlp()), loss=keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    meta.fit((inputs[0], one_hot, inputs[2]), np.eye(WAYS)[query_y], verbose=0)


def test_class_weight_is_named_in_the_error():
    inputs, query_y = _episode()
    meta = _compile(ALGORITHMS["imaml"](_mlp()))
    with pytest.raises(ValueError, match="class_weight is not supported"):
        meta.fit(inputs, query_y, class_weight={0: 1.0, 1: 2.0, 2: 1.0}, verbose=0)


def test_few_shot_episodes_take_feature_vectors():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, FEATURES)).astype("float32")
    labels = np.repeat(np.arange(10), 6)
    episodes = tf_imaml.episodes.few_shot_episodes(
        features,
        labels,
        ways=WAYS,
        shots=SHOTS,
        queries=QUERIES,
        meta_batch_size=TASKS,
        seed=0,
        num_batches=2,
    )
    meta = _compile(ALGORITHMS["imaml"](_mlp()))
    history = meta.fit(episodes, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_several_meta_models_in_one_process_trace_without_retracing_warnings(caplog):
    # TensorFlow reports retracing through the "tensorflow" logger ("triggered tf.function
    # retracing"), not through the warnings module.
    inputs, query_y = _episode()
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for algorithm in ("imaml", "fomaml", "imaml", "reptile", "imaml", "imaml"):
            meta = _compile(ALGORITHMS[algorithm](_mlp()))
            meta.fit(inputs, query_y, epochs=2, verbose=0)
            meta.evaluate(inputs, query_y, verbose=0)
            meta.predict(inputs, verbose=0)
            meta.adapt(inputs[0][0], inputs[1][0])
    retracing = [r.getMessage() for r in caplog.records if "retracing" in r.getMessage()]
    assert not retracing, retracing[:1]


# ------------------------------------------------------------------ 2. mixed precision


def _meta_gradient_under(policy, algorithm, inputs, query_y):
    """The meta-gradient of one step, read off an SGD(1) step, under a dtype policy."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        meta = ALGORITHMS[algorithm](_mlp())
        meta.compile(
            optimizer=keras.optimizers.SGD(1.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = [keras.ops.convert_to_numpy(v) for v in meta.learner.trainable_variables]
        meta.train_on_batch(inputs, query_y)
        after = [keras.ops.convert_to_numpy(v) for v in meta.learner.trainable_variables]
        assert all(v.dtype == "float32" for v in meta.learner.trainable_variables)
        prediction = meta.predict(inputs, verbose=0)
        adapted = meta.adapt(inputs[0][0], inputs[1][0]).predict(inputs[2][0], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    grad = np.concatenate([(b - a).ravel() for a, b in zip(after, before, strict=True)])
    return grad, prediction, adapted


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 2e-3), ("mixed_bfloat16", 4e-2)])
def test_mixed_precision_meta_step_agrees_with_float32(algorithm, policy, tolerance):
    inputs, query_y = _episode()
    want, want_prediction, _ = _meta_gradient_under("float32", algorithm, inputs, query_y)
    grad, prediction, adapted = _meta_gradient_under(policy, algorithm, inputs, query_y)
    # Oracle: the same step in float32 from the same weights. Tolerance: float16 keeps 11
    # significant bits (4.9e-4 relative rounding; measured 3.4e-4 to 5.8e-4 here), bfloat16
    # 8 bits (3.9e-3); the inner steps, the query pass and the solve amplify it a little.
    error = np.linalg.norm(grad - want) / np.linalg.norm(want)
    assert error < tolerance, error
    np.testing.assert_allclose(prediction, want_prediction, atol=30 * tolerance)
    np.testing.assert_allclose(adapted, prediction[0], atol=30 * tolerance)
