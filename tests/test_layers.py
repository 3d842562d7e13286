"""Tests for `tf_imaml.layers`: forward values, exact second derivatives, model checks."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import hvp as hvp_lib
from tf_imaml import layers
from tf_imaml import models
from tf_imaml import tree

# Central differences of the gradient in float64 with this step: truncation error about
# h^2 * |third derivative| ~ 1e-10 and rounding about 1e-16 * |grad| / h ~ 1e-11. Measured
# against exact HVPs here: 1.5e-10 to 4.2e-10 relative, so 1e-7 leaves a wide margin while
# any dropped Hessian term (percent-level) fails by orders of magnitude.
FD_STEP = 1e-5
FD_RTOL = 1e-7


def _rel_err(actual, expected) -> float:
    actual, expected = _flat(actual), _flat(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _flat(values) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v)) for v in tf.nest.flatten(values)])


def _random_like(params, seed: int):
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.standard_normal(p.shape), p.dtype) for p in params]


def _grad(loss_fn, params):
    return hvp_lib.value_and_grad(loss_fn, params)[1]


def _fd_hvp(loss_fn, params, vector):
    """Oracle: central differences of the gradient, `(g(p + h v) - g(p - h v)) / 2h`.

    Unlike a Hessian from automatic differentiation, it does not go through any
    `stop_gradient` inside the loss, so it exposes wrong second derivatives.
    """
    plus = _grad(loss_fn, tree.axpy(FD_STEP, vector, params))
    minus = _grad(loss_fn, tree.axpy(-FD_STEP, vector, params))
    return tree.scale(0.5 / FD_STEP, tree.sub(plus, minus))


def _dense_hessian_hvp(loss_fn, params, vector):
    """Oracle: the dense Hessian (`tape.jacobian` of the gradient of a flat vector) times v."""
    flat = tree.flatten_tasks(params)
    with tf.GradientTape() as tape:
        tape.watch(flat)
        grad = tree.flatten_tasks(_grad(loss_fn, tree.unflatten_tasks(flat, params)))[0]
    hessian = tape.jacobian(grad, flat)[:, 0, :]
    return hessian.numpy() @ tree.flatten_tasks(vector)[0].numpy()


def _task_loss_fn(model, x, y):
    """`loss_fn(params) -> [1]` over `model.stateless_call`; params have a task axis of 1."""
    non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]

    def loss_fn(params):
        out, _ = model.stateless_call([p[0] for p in params], non_trainable, x, training=True)
        return tf.stack([tf.reduce_mean(tf.square(out - y))])

    return loss_fn


def _task_params(model):
    return [tf.convert_to_tensor(v)[tf.newaxis] for v in model.trainable_variables]


def _dense_norm_net(norm_layer, *, seed: int = 0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, dtype="float64"),
            norm_layer,
            keras.layers.Activation("tanh", dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )


def _regression_data(seed: int = 1):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.standard_normal((6, 3))), tf.constant(rng.standard_normal((6, 1)))


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 6, 2)])
def test_batch_stat_normalization_forward_matches_numpy(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape) * 3.0 + 1.5
    layer = layers.BatchStatNormalization(epsilon=1e-2, dtype="float64")
    layer.build(shape)
    gamma, beta = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
    layer.set_weights([gamma, beta])
    axes = tuple(range(len(shape) - 1))
    expected = (x - x.mean(axes)) / np.sqrt(x.var(axes) + 1e-2) * gamma + beta
    # Oracle: the formula in numpy (float64). Same arithmetic with a different summation
    # order (measured 4.4e-16); 1e-12 absorbs that, while an epsilon rounded through float32
    # (a bug met while writing this) is off by 7e-11 and fails.
    for training in (True, False):
        np.testing.assert_allclose(layer(x, training=training), expected, rtol=1e-12, atol=1e-12)
    assert not layer.non_trainable_weights  # No moving statistics.


def test_batch_stat_normalization_float16_is_normalized_in_float32():
    x = np.random.default_rng(0).standard_normal((8, 4)) * 100.0 + 300.0
    layer = layers.BatchStatNormalization(dtype="mixed_float16")
    out = layer(x.astype(np.float16))
    assert out.dtype == tf.float16
    x16 = x.astype(np.float16).astype(np.float64)
    expected = (x16 - x16.mean(0)) / np.sqrt(x16.var(0) + 1e-3)
    # Oracle: numpy in float64 on the same float16 inputs. The float32 statistics are exact to
    # ~1e-6; rounding the output (|y| < 2.7) to float16 costs at most 2^-10 ~ 1e-3 (measured
    # 4.8e-4). Statistics taken in float16 itself miss by 5.6e-3 and fail this.
    np.testing.assert_allclose(out.numpy().astype(np.float64), expected, rtol=0, atol=1.5e-3)


def test_batch_stat_normalization_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon must be > 0, got 0"):
        layers.BatchStatNormalization(epsilon=0.0)


def test_batch_stat_normalization_config_round_trip():
    layer = layers.BatchStatNormalization(epsilon=1e-5, name="bsn")
    clone = layers.BatchStatNormalization.from_config(layer.get_config())
    assert (clone.epsilon, clone.name) == (1e-5, "bsn")


@pytest.mark.parametrize("use_tf_function", [False, True])
def test_hvp_through_batch_stat_normalization_matches_dense_hessian(use_tf_function):
    model = _dense_norm_net(layers.BatchStatNormalization(dtype="float64"))
    x, y = _regression_data()
    loss_fn = _task_loss_fn(model, x, y)
    params = _task_params(model)
    vector = _random_like(params, seed=2)
    dense = _dense_hessian_hvp(loss_fn, params, vector)
    finite_differences = _fd_hvp(loss_fn, params, vector)
    for mode in hvp_lib.HVP_MODES:
        hvp_fn = lambda p, v, mode=mode: hvp_lib.hvp(loss_fn, p, v, mode=mode)  # noqa: E731
        if use_tf_function:
            hvp_fn = tf.function(hvp_fn)
        got = hvp_fn(params, vector)
        # Oracle: the dense 29x29 Hessian. Both sides are exact autodiff in float64 and differ
        # only by rounding (measured 2.7e-16), so 1e-10 is a bound no real bug can hide under.
        assert _rel_err(got, dense) < 1e-10, mode
        # Oracle: finite differences of the gradient (no autodiff through the Hessian). See
        # FD_RTOL for the tolerance.
        assert _rel_err(got, finite_differences) < FD_RTOL, mode


def test_keras_batch_normalization_hvp_is_wrong_but_ours_is_right():
    """Documents why `BatchStatNormalization` exists (see `../shared/NOTES_TF.md`)."""
    x, y = _regression_data()
    ours = _dense_norm_net(layers.BatchStatNormalization(epsilon=1e-3, dtype="float64"))
    theirs = _dense_norm_net(keras.layers.BatchNormalization(epsilon=1e-3, dtype="float64"))
    params = _task_params(ours)  # Same order: kernel, bias, gamma, beta, kernel, bias.
    vector = _random_like(params, seed=2)
    loss_ours, loss_theirs = _task_loss_fn(ours, x, y), _task_loss_fn(theirs, x, y)

    # Oracle: our layer. Keras BatchNormalization in training mode computes the same function
    # with the same first derivatives; float64 rounding only, hence 1e-12.
    np.testing.assert_allclose(loss_theirs(params), loss_ours(params), rtol=1e-12)
    assert _rel_err(_grad(loss_theirs, params), _grad(loss_ours, params)) < 1e-12

    expected = _fd_hvp(loss_ours, params, vector)
    # Oracle: finite differences of the (correct) gradient; FD_RTOL explains the tolerance.
    # Both losses give the same gradients, so this one oracle serves both layers.
    assert _rel_err(hvp_lib.hvp(loss_ours, params, vector), expected) < FD_RTOL
    for mode in hvp_lib.HVP_MODES:
        wrong = hvp_lib.hvp(loss_theirs, params, vector, mode=mode)
        # The stop_gradient(mean) in tf.nn.moments drops a term of the Hessian: measured
        # 5.4% here, far above the ~1e-10 finite-difference error; 1e-3 flags the bug clearly.
        assert _rel_err(wrong, expected) > 1e-3
    # Why the oracle must be finite differences: a dense Hessian by autodiff goes through the
    # same stop_gradient and agrees with the wrong HVP to rounding (measured 2e-16).
    assert _rel_err(wrong, _dense_hessian_hvp(loss_theirs, params, vector)) < 1e-10


@pytest.mark.parametrize("shape", [(2, 6, 8, 3), (2, 7, 5, 3), (1, 9, 9, 2)])
@pytest.mark.parametrize("pool_size", [2, 3])
def test_exact_max_pool_matches_keras_max_pooling(shape, pool_size):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    got = layers.ExactMaxPool2D(pool_size=pool_size)(x)
    expected = keras.layers.MaxPooling2D(pool_size, padding="valid")(x)
    # Oracle: Keras' fused max pooling ("valid" crops odd sizes the same way). A maximum
    # selects one input, so the two are bitwise equal.
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_exact_max_pool_hvp_matches_finite_differences(jit_compile):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 2, 7, 6, 2))  # Task axis of 1; odd height is cropped.
    weights = tf.constant(rng.standard_normal((2, 3, 3, 2)))
    pool = layers.ExactMaxPool2D(pool_size=2, dtype="float64")

    def loss_fn(params):
        return tf.stack([tf.reduce_sum(weights * tf.tanh(pool(params[0][0])) ** 2)])

    params, vector = [tf.constant(x)], _random_like([x], seed=4)
    # Away from ties the finite-difference steps must not change which input is the maximum.
    assert _window_gaps(x[0, :, :6]).min() > 100 * FD_STEP * np.abs(_flat(vector)).max()
    hvp_fn = tf.function(
        lambda p, v: hvp_lib.hvp(loss_fn, p, v, mode="forward_over_reverse"),
        jit_compile=jit_compile,
    )
    # Oracle: finite differences of the gradient (FD_RTOL explains the tolerance). Under XLA
    # this is where MaxPool's own second derivative is wrong or has no float64 kernel.
    assert _rel_err(hvp_fn(params, vector), _fd_hvp(loss_fn, params, vector)) < FD_RTOL


def _window_gaps(x: np.ndarray) -> np.ndarray:
    """Per 2x2 window and channel of `[B, H, W, C]` (even H, W): largest minus second largest."""
    b, h, w, c = x.shape
    windows = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    top2 = np.sort(windows.reshape(b, h // 2, w // 2, c, 4), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def test_exact_max_pool_rejects_bad_pool_size():
    with pytest.raises(ValueError, match="pool_size must be an integer >= 1, got 0"):
        layers.ExactMaxPool2D(pool_size=0)


@pytest.mark.parametrize(
    "norm_cls", [keras.layers.BatchNormalization, keras.layers.LayerNormalization]
)
def test_check_second_order_safe_rejects_moments_layers(norm_cls):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), norm_cls(name="bad_norm")])
    with pytest.raises(ValueError, match="'bad_norm'.*second derivatives are wrong on TensorFlow"):
        layers.check_second_order_safe(model)


def test_check_second_order_safe_finds_nested_batch_normalization():
    inner = keras.Sequential(
        [keras.layers.Dense(4), keras.layers.BatchNormalization(name="deep_bn")], name="inner"
    )
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    with pytest.raises(ValueError, match="deep_bn") as info:
        layers.check_second_order_safe(model)
    assert "second derivatives are wrong on TensorFlow" in str(info.value)
    assert "use tf_imaml.layers.BatchStatNormalization instead" in str(info.value)


def test_check_second_order_safe_accepts_conv4_classifier():
    layers.check_second_order_safe(models.conv4_classifier(5, filters=4, pooling="max"))
