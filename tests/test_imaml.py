"""ImplicitMAML as a Keras model: the step against the core and closed forms, and the API."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import implicit
from tf_imaml import inner_solvers
from tf_imaml import testing
from tf_imaml import tree

LAM = 2.0
DIM = 4


def _linear_learner(dim=DIM):
    return testing.linear_learner(dim)


def _ridge_episode(seed=0, num_tasks=3):
    return testing.ridge_episode(dim=DIM, seed=seed, num_tasks=num_tasks)


def _ridge_meta(learner, **kwargs):
    options = dict(lam=LAM, inner_steps=1500, inner_learning_rate=0.05, cg_steps=DIM)
    options.update(kwargs)
    meta = tf_imaml.ImplicitMAML(learner, **options)
    meta.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss="mse")
    return meta


def test_sgd_step_is_minus_mean_ridge_meta_gradient():
    tasks, episode = _ridge_episode()
    learner = _linear_learner()
    meta = _ridge_meta(learner)
    theta = learner.trainable_variables[0].numpy()[:, 0]
    meta.train_on_batch(*episode)
    moved = learner.trainable_variables[0].numpy()[:, 0] - theta
    want = testing.ridge_meta_gradient(tasks, np.broadcast_to(theta, (3, DIM)), LAM)
    # Oracle: the closed-form ridge meta-gradient lam (H + lam I)^-1 grad L_query(phi*),
    # averaged over tasks. Inner GD converged to rounding, CG exact in DIM iterations.
    np.testing.assert_allclose(moved, -want.mean(axis=0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver", ["cg_tf", "cg"])
def test_sgd_step_matches_direct_call_of_the_core(solver):
    tasks, episode = _ridge_episode(seed=1)
    learner = _linear_learner()
    meta = _ridge_meta(
        learner, inner_steps=16, inner_learning_rate=0.1, cg_steps=2, linear_solver=solver
    )
    theta = learner.trainable_variables[0].numpy()
    meta_params = tree.broadcast_to_tasks([tf.constant(theta)], 3)
    support = testing.ridge_loss_fn(tasks.support_x, tasks.support_y)
    query = testing.ridge_loss_fn(tasks.query_x, tasks.query_y)
    with tf.GradientTape() as tape:
        tape.watch(meta_params)
        adapted, _ = implicit.proximal_adapt(
            lambda p: support([p[0][..., 0]]),
            meta_params,
            lam=LAM,
            num_steps=16,
            optimizer=inner_solvers.gradient_descent(0.1),
            max_iter=2,
            linear_solver=tf_imaml.linear_solve.LINEAR_SOLVERS[solver],
        )
        total = tf.reduce_sum(query([adapted[0][..., 0]]))
    want = tf.reduce_mean(tape.gradient(total, meta_params)[0], axis=0).numpy()
    meta.train_on_batch(*episode)
    # Oracle: the core called directly (same inner steps, same 2 CG steps: neither is
    # converged, so this checks the glue, not the math). Same float64 ops up to order.
    np.testing.assert_allclose(
        learner.trainable_variables[0].numpy() - theta, -want, rtol=1e-10, atol=1e-13
    )


def test_failed_solves_are_dropped_and_an_empty_step_is_skipped():
    _, episode = _ridge_episode(seed=2)
    learner = _linear_learner()
    # One CG step cannot reach a relative residual of 1e-12: every solve fails.
    meta = _ridge_meta(learner, inner_steps=16, cg_steps=1, max_residual=1e-12)
    before = learner.trainable_variables[0].numpy()
    logs = meta.train_on_batch(*episode, return_dict=True)
    np.testing.assert_array_equal(learner.trainable_variables[0].numpy(), before)
    assert logs["failed_fraction"] == 1.0 and logs["skipped_steps"] == 1.0
    assert int(meta.optimizer.iterations) == 0


def test_first_order_fallback_uses_the_query_gradient():
    tasks, episode = _ridge_episode(seed=3)
    learner = _linear_learner()
    meta = _ridge_meta(learner, cg_steps=1, max_residual=1e-12, on_failure="first_order")
    theta = learner.trainable_variables[0].numpy()[:, 0]
    meta.train_on_batch(*episode)
    phi = testing.ridge_proximal_solution(
        tasks.support_x, tasks.support_y, np.broadcast_to(theta, (3, DIM)), LAM
    )
    qx, qy = tasks.query_x.numpy(), tasks.query_y.numpy()
    grad = 2 * np.einsum("tnd,tn->td", qx, np.einsum("tnd,td->tn", qx, phi) - qy) / qx.shape[1]
    # Oracle: first-order MAML's gradient, grad L_query at the closed-form phi*.
    np.testing.assert_allclose(
        learner.trainable_variables[0].numpy()[:, 0] - theta, -grad.mean(axis=0), rtol=1e-9
    )


def test_non_finite_inputs_raise_before_any_weight_changes():
    _, ((sx, sy, qx), qy) = _ridge_episode(seed=4)
    learner = _linear_learner()
    meta = _ridge_meta(learner, inner_steps=4)
    before = learner.trainable_variables[0].numpy()
    bad = tf.tensor_scatter_nd_update(sx, [[1, 2, 0]], tf.constant([np.nan], tf.float64))
    # Arrays are checked before anything runs; a dataset's values inside the step.
    with pytest.raises(ValueError, match=r"support_x has non-finite values .* task\(s\) \[1\]"):
        meta.train_on_batch((bad, sy, qx), qy)
    dataset = tf.data.Dataset.from_tensors(((bad, sy, qx), qy))
    with pytest.raises(tf.errors.InvalidArgumentError, match="support_x has non-finite"):
        meta.fit(dataset, verbose=0)
    np.testing.assert_array_equal(learner.trainable_variables[0].numpy(), before)


@pytest.mark.slow
def test_bad_episodes_raise_clear_errors():
    learner = models_classifier()
    meta = tf_imaml.ImplicitMAML(learner, inner_steps=1, cg_steps=1)
    meta.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    before = [v.numpy() for v in learner.trainable_variables]
    sx = np.zeros((2, 5, 8, 8, 1), "float32")
    sy = np.zeros((2, 5), "int32")
    with pytest.raises(ValueError, match=r"learner takes examples of shape \(8, 8, 1\)"):
        meta.train_on_batch((np.zeros((2, 5, 9, 8, 1), "float32"), sy, sx), sy)
    with pytest.raises(ValueError, match="support_x has shape .* but support_y has shape"):
        meta.train_on_batch((sx, np.zeros((2, 4), "int32"), sx), sy)
    with pytest.raises(ValueError, match="different numbers of tasks"):
        meta.train_on_batch((sx, sy, sx[:1]), sy[:1])
    with pytest.raises(ValueError, match=r"query_y has class labels outside \[0, 3\)"):
        meta.train_on_batch((sx, sy, sx), sy + 3)
    with pytest.raises(ValueError, match=r"support_y has class labels outside \[0, 3\)"):
        meta.train_on_batch((sx, sy - 1, sx), sy)
    # The same episodes from a dataset fail inside the step, before the weights move.
    for episode, message in (
        (((sx, sy, sx), sy + 3), r"query_y has class labels outside \[0, 3\)"),
        (((sx, sy - 1, sx), sy), r"support_y has class labels outside \[0, 3\)"),
    ):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            meta.fit(tf.data.Dataset.from_tensors(episode), verbose=0)
    for variable, value in zip(learner.trainable_variables, before, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)


def models_classifier():
    keras.utils.set_random_seed(1)
    return tf_imaml.models.conv4_classifier(3, input_shape=(8, 8, 1), filters=4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=0.0), "lam must be > 0"),
        (dict(inner_steps=-1), "inner_steps must be an int >= 0"),
        (dict(cg_steps=2.5), "cg_steps must be an int >= 0"),
        (dict(inner_learning_rate=0.0), "inner_learning_rate must be > 0"),
        (dict(linear_solver="lu"), "linear_solver must be one of"),
        (dict(inner_optimizer="rmsprop"), "inner_optimizer must be one of"),
        (dict(on_failure="ignore"), "on_failure must be one of"),
        (dict(damping=-0.1), "damping must be >= 0"),
        (dict(hvp_mode="fd"), "hvp_mode must be one of"),
    ],
)
def test_bad_constructor_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tf_imaml.ImplicitMAML(_linear_learner(), **kwargs)


def test_keras_batch_normalization_is_refused():
    learner = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="BatchStatNormalization"):
        tf_imaml.ImplicitMAML(learner)


def _classification_episode(seed=0, num_tasks=2):
    rng = np.random.default_rng(seed)
    sx = rng.normal(size=(num_tasks, 3, 8, 8, 1)).astype("float32")
    qx = rng.normal(size=(num_tasks, 6, 8, 8, 1)).astype("float32")
    sy = np.tile(np.arange(3, dtype="int32"), (num_tasks, 1))
    qy = np.tile(np.arange(3, dtype="int32"), (num_tasks, 2))
    return (sx, sy, qx), qy


def _classifier_meta(**kwargs):
    meta = tf_imaml.ImplicitMAML(
        models_classifier(), inner_steps=3, inner_learning_rate=0.1, cg_steps=2, **kwargs
    )
    meta.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )
    return meta


@pytest.mark.slow
def test_save_load_round_trip_evaluates_identically(tmp_path):
    episode = _classification_episode()
    meta = _classifier_meta(lam=1.5, inner_optimizer="momentum", linear_solver="cg")
    meta.train_on_batch(*episode)
    path = tmp_path / "meta.keras"
    meta.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, tf_imaml.ImplicitMAML)
    config, loaded_config = meta.get_config(), loaded.get_config()
    layers = [layer["class_name"] for layer in config.pop("learner")["config"]["layers"]]
    loaded_layers = loaded_config.pop("learner")["config"]["layers"]
    assert layers == [layer["class_name"] for layer in loaded_layers]
    assert config == loaded_config
    # Same weights, same deterministic computation: identical results.
    np.testing.assert_array_equal(
        loaded.predict(episode[0], verbose=0), meta.predict(episode[0], verbose=0)
    )
    assert loaded.evaluate(*episode, verbose=0, return_dict=True) == meta.evaluate(
        *episode, verbose=0, return_dict=True
    )
    # The meta-trained learner on its own.
    meta.learner.save(tmp_path / "learner.keras")
    learner = keras.models.load_model(tmp_path / "learner.keras")
    np.testing.assert_array_equal(
        learner(episode[0][0][0]).numpy(), meta.learner(episode[0][0][0]).numpy()
    )


@pytest.mark.slow
def test_predict_and_adapt_agree_and_adaptation_helps():
    (sx, sy, _), _ = _classification_episode(seed=5)
    # Query examples are noisy copies of the support examples: adapting must help.
    noise = np.random.default_rng(6).normal(scale=0.1, size=(2, 6, 8, 8, 1))
    qx = (np.concatenate([sx, sx], axis=1) + noise).astype("float32")
    episode = ((sx, sy, qx), np.concatenate([sy, sy], axis=1))
    meta = _classifier_meta(lam=0.5)
    logs = meta.evaluate(*episode, verbose=0, return_dict=True)
    assert logs["loss"] < logs["pre_adaptation_loss"]  # adapting on the support helps
    predictions = meta.predict(episode[0], verbose=0)
    assert predictions.shape == (2, 6, 3)
    task_model = meta.adapt(sx[1], sy[1])
    assert isinstance(task_model, keras.Model) and task_model is not meta.learner
    # Same adapted weights, same query set: the same predictions up to float32 rounding.
    np.testing.assert_allclose(task_model(qx[1]).numpy(), predictions[1], rtol=1e-5, atol=1e-5)


def _read_scalars(folder):
    """Oracle: the event files as TensorBoard reads them, {tag: [values by step]}."""
    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars


@pytest.mark.slow
def test_metrics_reach_tensorboard_event_files(tmp_path):
    episode = _classification_episode()
    data = tf.data.Dataset.from_tensors(episode).repeat()
    meta = _classifier_meta()
    meta.fit(
        data,
        epochs=2,
        steps_per_epoch=2,
        validation_data=data,
        validation_steps=1,
        callbacks=[keras.callbacks.TensorBoard(str(tmp_path), update_freq=1)],
        verbose=0,
    )
    train = _read_scalars(tmp_path / "train")
    for name in (
        "loss",
        "sparse_categorical_accuracy",
        "pre_adaptation_loss",
        "pre_adaptation_sparse_categorical_accuracy",
        "support_loss",
        "solver_residual",
        "solver_iterations",
        "inner_grad_norm",
        "meta_grad_norm",
        "failed_fraction",
        "skipped_steps",
    ):
        assert len(train.get(f"epoch_{name}", [])) == 2, (name, sorted(train))
        assert len(train.get(f"batch_{name}", [])) == 4, (name, sorted(train))
    # cg_steps=2 at most; a task may stop after one on reaching tol (per-task CG).
    assert all(1.0 <= x <= 2.0 for x in train["epoch_solver_iterations"])
    # This tiny random net has negative curvature below -lam on some tasks: 0 <= f <= 1.
    assert all(0.0 <= f <= 1.0 for f in train["epoch_failed_fraction"])
    validation = _read_scalars(tmp_path / "validation")
    assert len(validation["epoch_loss"]) == 2
    assert "epoch_pre_adaptation_loss" in validation


def _count_calls(meta, name):
    calls = [0]
    step = getattr(meta, name)

    def counted(data):
        calls[0] += 1  # Python runs once per trace of the step
        return step(data)

    setattr(meta, name, counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("data_kind", ["dataset", "arrays"])
def test_fit_and_evaluate_trace_their_step_once(data_kind):
    # Keras creates the optimizer slots and compile metrics lazily inside the first traced
    # step, and tf.function then traces it again; MetaLearner builds them beforehand.
    episode = _classification_episode()
    meta = _classifier_meta(lam=2.0)
    train_traces, test_traces = _count_calls(meta, "train_step"), _count_calls(meta, "test_step")
    if data_kind == "dataset":
        data = tf.data.Dataset.from_tensors(episode).repeat(3)
        meta.fit(data, epochs=2, verbose=0)
        meta.evaluate(data, verbose=0)
    else:
        meta.fit(*episode, batch_size=2, epochs=2, verbose=0)
        meta.evaluate(*episode, batch_size=2, verbose=0)
    assert train_traces == [1] and test_traces == [1]
    assert meta.optimizer.iterations.numpy() == (6 if data_kind == "dataset" else 2)


@pytest.mark.slow
def test_accuracy_by_name_is_resolved_from_the_labels_before_and_after_adaptation():
    # Keras picks sparse categorical accuracy for "accuracy" from the label shapes; the
    # pre-adaptation copy must follow, or its update fails on integer labels.
    episode = _classification_episode()
    logs = {}
    for name in ("accuracy", "sparse_categorical_accuracy"):
        keras.utils.set_random_seed(0)
        meta = tf_imaml.ImplicitMAML(
            models_classifier(), lam=2.0, inner_steps=3, inner_learning_rate=0.1, cg_steps=2
        )
        meta.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[name],
        )
        history = meta.fit(tf.data.Dataset.from_tensors(episode).repeat(2), verbose=0).history
        logs[name] = (history[name][-1], history[f"pre_adaptation_{name}"][-1])
    assert logs["accuracy"] == logs["sparse_categorical_accuracy"]
    assert all(0.0 <= value <= 1.0 for value in logs["accuracy"])
