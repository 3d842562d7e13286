"""Tests for `tf_imaml.models`: shapes, parameter counts, serialization, exact HVPs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hvp as hvp_lib
from tf_imaml import layers
from tf_imaml import models
from tf_imaml import tree


def _conv4_param_count(num_classes, *, channels, filters, final_side):
    """By hand: bias-free 3x3 convs, a gamma and beta per channel, a dense read-out."""
    convs = 9 * channels * filters + 3 * 9 * filters * filters
    norms = 4 * 2 * filters
    readout = (final_side * final_side * filters + 1) * num_classes
    return convs + norms + readout


@pytest.mark.parametrize(
    "kwargs, batch_shape, final_side",
    [
        # Omniglot: 28 -> 14 -> 7 -> 4 -> 2 with stride-2 "same" convolutions.
        (dict(), (3, 28, 28, 1), 2),
        # mini-ImageNet: 84 -> 42 -> 21 -> 10 -> 5 with stride-1 convs and 2x2 max pooling.
        (dict(input_shape=(84, 84, 3), filters=32, pooling="max"), (2, 84, 84, 3), 5),
        # Average pooling, odd sizes cropped: 30 -> 15 -> 7 -> 3 -> 1.
        (dict(input_shape=(30, 30, 2), filters=8, pooling="avg"), (2, 30, 30, 2), 1),
    ],
)
def test_conv4_classifier_shapes_and_parameter_count(kwargs, batch_shape, final_side):
    model = models.conv4_classifier(5, **kwargs)
    x = np.random.default_rng(0).standard_normal(batch_shape).astype(np.float32)
    assert model(x).shape == (batch_shape[0], 5)
    expected = _conv4_param_count(
        5, channels=batch_shape[-1], filters=kwargs.get("filters", 64), final_side=final_side
    )
    # Oracle: the count by hand (exact integers).
    assert model.count_params() == expected
    assert not model.non_trainable_weights


def test_conv4_classifier_omniglot_parameter_count_by_hand():
    # Oracle: 576 + 3 * 36864 (bias-free 3x3 convs) + 4 * 128 (gamma, beta)
    # + (2 * 2 * 64 + 1) * 5 (read-out after 28 -> 14 -> 7 -> 4 -> 2).
    assert models.conv4_classifier(5).count_params() == 576 + 3 * 36864 + 4 * 128 + 257 * 5


def test_conv4_classifier_is_second_order_safe():
    for pooling in models.POOLINGS:
        layers.check_second_order_safe(models.conv4_classifier(3, filters=2, pooling=pooling))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
        (dict(num_classes=5, filters=0), "filters must be an integer >= 1, got 0"),
        (dict(num_classes=5, strides=0), "strides must be an integer >= 1, got 0"),
        (dict(num_classes=5, pooling="min"), "pooling must be one of .*got 'min'"),
        (dict(num_classes=5, input_shape=(28, 28)), r"input_shape .*got \(28, 28\)"),
        (dict(num_classes=5, input_shape=(8, 8, 1), pooling="max"), r"\(8, 8, 1\) is too small"),
    ],
)
def test_conv4_classifier_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.conv4_classifier(**kwargs)


def test_mlp_regressor_shapes_and_parameter_count():
    model = models.mlp_regressor()
    assert model(np.zeros((7, 1), np.float32)).shape == (7, 1)
    # Oracle: by hand, (1 + 1) * 40 + (40 + 1) * 40 + (40 + 1) * 1 (exact integers).
    assert model.count_params() == 80 + 1640 + 41
    model = models.mlp_regressor((5,), input_dim=3, output_dim=2, dtype="float64")
    assert model(np.zeros((4, 3))).dtype == tf.float64
    assert model.count_params() == 4 * 5 + 6 * 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden=(40, 0)), r"hidden\[1\] must be an integer >= 1, got 0"),
        (dict(input_dim=0), "input_dim must be an integer >= 1, got 0"),
        (dict(output_dim=-1), "output_dim must be an integer >= 1, got -1"),
    ],
)
def test_mlp_regressor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        models.mlp_regressor(**kwargs)


def test_conv4_classifier_save_and_load_round_trip(tmp_path):
    model = models.conv4_classifier(4, input_shape=(20, 20, 3), filters=4, pooling="max")
    x = np.random.default_rng(1).standard_normal((3, 20, 20, 3)).astype(np.float32)
    # Move the weights off their initial values so that loading them is tested too.
    model.set_weights([w + 0.1 for w in model.get_weights()])
    path = tmp_path / "conv4.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    kinds = [type(layer).__name__ for layer in loaded.layers]
    assert kinds.count("BatchStatNormalization") == 4 and kinds.count("ExactMaxPool2D") == 4
    # Oracle: the original model. Same weights, same ops, same inputs: bitwise equal.
    np.testing.assert_array_equal(loaded(x), model(x))


def _flat_hessian_vector_product(loss_fn, params, vector) -> np.ndarray:
    """Oracle: the dense Hessian (`tape.jacobian` of the gradient of a flat vector) times v."""
    flat = tree.flatten_tasks(params)
    with tf.GradientTape() as tape:
        tape.watch(flat)
        grads = hvp_lib.value_and_grad(loss_fn, tree.unflatten_tasks(flat, params))[1]
        grad = tree.flatten_tasks(grads)[0]
    hessian = tape.jacobian(grad, flat)[:, 0, :]
    return hessian.numpy() @ tree.flatten_tasks(vector)[0].numpy()


@pytest.mark.parametrize(
    "kwargs, side",
    [(dict(strides=2), 8), (dict(pooling="avg"), 16)],  # 8 -> 4 -> 2 -> 1 -> 1; 16 -> 1.
)
def test_conv4_classifier_hvp_matches_dense_hessian(kwargs, side):
    keras.utils.set_random_seed(0)
    model = models.conv4_classifier(
        3, input_shape=(side, side, 1), filters=3, activation="tanh", dtype="float64", **kwargs
    )
    rng = np.random.default_rng(1)
    x = tf.constant(rng.standard_normal((6, side, side, 1)))
    labels = tf.constant([0, 1, 2, 0, 1, 2])

    def loss_fn(params):
        logits, _ = model.stateless_call([p[0] for p in params], [], x, training=True)
        losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        return tf.stack([tf.reduce_mean(losses)])

    params = [tf.convert_to_tensor(v)[tf.newaxis] for v in model.trainable_variables]
    vector = [tf.constant(rng.standard_normal(p.shape)) for p in params]
    expected = _flat_hessian_vector_product(loss_fn, params, vector)
    for mode in hvp_lib.HVP_MODES:
        got = tree.flatten_tasks(hvp_lib.hvp(loss_fn, params, vector, mode=mode))[0].numpy()
        # Oracle: the dense 306x306 Hessian. Exact autodiff on both sides in float64,
        # so only rounding differs (measured 5e-16 to 1.1e-15); 1e-10 leaves room for summation
        # order while a missing Hessian term (percent-level) would fail by far.
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-10, mode
