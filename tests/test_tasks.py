"""The task layer (`tf_imaml.tasks`) and the public task seams of `MetaLearner`.

Oracles: the learner called on its own with one task's weights assigned (Keras's own forward
pass), a loss written out in numpy, and the meta-model's own `adapt` and training step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import tasks

TASKS, WAYS, N = 3, 4, 6


def _conv_learner():
    keras.utils.set_random_seed(0)
    return tf_imaml.models.conv4_classifier(WAYS, input_shape=(8, 8, 1), filters=4)


def _per_task_weights(learner, seed=1):
    rng = np.random.default_rng(seed)
    theta = tasks.meta_params(learner, TASKS)
    return [t + 0.05 * rng.normal(size=t.shape).astype("float32") for t in theta]


def _images(seed=2):
    return tf.constant(np.random.default_rng(seed).normal(size=(TASKS, N, 8, 8, 1)), tf.float32)


def test_meta_params_repeat_the_weights_per_task():
    learner = _conv_learner()
    theta = tasks.meta_params(learner, TASKS)
    assert [t.shape for t in theta] == [(TASKS, *v.shape) for v in learner.trainable_variables]
    np.testing.assert_array_equal(theta[0][2], learner.trainable_variables[0].numpy())


@pytest.mark.parametrize("batched", [True, False])
def test_apply_equals_the_learner_called_with_each_tasks_weights(batched):
    learner = _conv_learner()
    params, x = _per_task_weights(learner), _images()
    assert tasks.can_batch(learner)
    out = tasks.apply(learner, params, x, batched=batched)
    clone = keras.models.clone_model(learner)
    for t in range(TASKS):
        for variable, value in zip(clone.trainable_variables, params, strict=True):
            variable.assign(value[t])
        # Oracle: Keras's own forward pass of a model holding task t's weights. Batched
        # convolutions differ from Keras's in summation order: float32 rounding.
        np.testing.assert_allclose(out[t], clone(x[t]), rtol=2e-5, atol=2e-5)


def test_loss_fn_is_the_per_task_mean_of_the_loss():
    learner = _conv_learner()
    params, x = _per_task_weights(learner), _images()
    y = tf.constant(np.random.default_rng(3).integers(0, WAYS, (TASKS, N)), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    losses = tasks.loss_fn(learner, loss, x, y, batched=True)(params)
    logits = tasks.apply(learner, params, x, batched=True).numpy()
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_softmax, y.numpy()[..., None], -1)[..., 0].mean(axis=1)
    # Oracle: cross-entropy written out in numpy from the same logits.
    np.testing.assert_allclose(losses, want, rtol=1e-5)
    value, grads = tasks.value_and_grad(tasks.loss_fn(learner, loss, x, y, batched=False), params)
    np.testing.assert_allclose(value, want, rtol=1e-4)
    assert [g.shape for g in grads] == [p.shape for p in params]


def test_random_layers_follow_the_seed_shift_and_the_task_index():
    keras.utils.set_random_seed(0)
    learner = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2),
        ]
    )
    params = tasks.meta_params(learner, 2)
    x = tf.ones([2, 3, 5])

    def run(shift, training=True):
        return tasks.apply(learner, params, x, batched=False, training=training, seed_shift=shift)

    first = run(tf.constant([0, 7], tf.int64))
    np.testing.assert_array_equal(run(tf.constant([0, 7], tf.int64)), first)
    assert not np.allclose(run(tf.constant([0, 8], tf.int64)), first)
    assert not np.allclose(first[0], first[1])  # each task its own mask, same weights and inputs
    inference = run(None, training=False)
    np.testing.assert_array_equal(inference[0], inference[1])


def test_meta_model_seams_agree_with_adapt_and_with_the_training_step():
    keras.utils.set_random_seed(0)
    learner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(2)]
    )
    meta = tf_imaml.ImplicitMAML(learner, inner_steps=4, inner_learning_rate=0.1, cg_steps=3)
    meta.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    sx, qx = (
        rng.normal(size=(2, 4, 4)).astype("float32"),
        rng.normal(size=(2, 6, 4)).astype("float32"),
    )
    sy, qy = np.tile([0, 1, 0, 1], (2, 1)), np.tile([0, 1, 1, 0, 0, 1], (2, 1))
    theta = meta.meta_params(2)
    inner = meta.inner_solve(theta, meta.support_loss_fn(sx, sy))
    adapted = meta.adapt(sx[1], sy[1])
    # Oracle: adapt, which runs the same inner solve in its own tf.function.
    for got, want in zip(inner.adapted_params, adapted.trainable_variables, strict=True):
        np.testing.assert_allclose(got[1], want.numpy(), rtol=1e-5, atol=1e-6)
    result = meta.meta_gradient(
        theta,
        meta.support_loss_fn(sx, sy, training=True),
        meta.query_loss_fn(qx, qy, training=True),
    )
    before = [v.numpy() for v in learner.trainable_variables]
    meta.train_on_batch((sx, sy, qx), qy)
    # Oracle: the training step with SGD(1) moves theta by minus the mean meta-gradient.
    for g, b, v in zip(result.meta_grads, before, learner.trainable_variables, strict=True):
        np.testing.assert_allclose(b - v.numpy(), np.mean(g, axis=0), rtol=1e-4, atol=1e-6)
    assert meta.resolved_task_batching == "support"


def test_map_tasks_runs_each_task_alone():
    learner = _conv_learner()
    params, x = _per_task_weights(learner), _images()
    y = tf.constant(np.random.default_rng(4).integers(0, WAYS, (TASKS, N)), tf.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    seen = []

    def one_task(task):
        task_params, task_x, task_y = task
        seen.append(task_x.shape[0])
        return tasks.loss_fn(learner, loss, task_x, task_y, batched=True)(task_params)

    got = tasks.map_tasks(
        one_task, (params, x, y), fn_output_signature=tf.TensorSpec([], tf.float32)
    )
    assert seen and set(seen) == {1}  # every call saw one task, with its task axis
    # Oracle: the same per-task losses computed on the whole meta-batch in one call; each
    # task's loss depends on its own slices only. Tolerance: float32 summation order.
    np.testing.assert_allclose(
        got, tasks.loss_fn(learner, loss, x, y, batched=True)(params), rtol=1e-5
    )
