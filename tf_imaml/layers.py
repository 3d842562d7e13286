"""Keras layers whose second derivatives are exact on TensorFlow.

iMAML needs Hessian-vector products of the support loss, and two stock Keras layers get them
silently wrong on the TensorFlow backend (`tests/test_layers.py` measures it):

- `keras.layers.BatchNormalization` (and `LayerNormalization`, `GroupNormalization`) take
  their moments from `tf.nn.moments`, which computes the variance around
  `stop_gradient(mean)`. First derivatives are unaffected (the derivative of the variance
  with respect to the mean is zero at the mean), but second derivatives lose the term that
  flows through the mean: Hessian-vector products come out a few to ~14% off.
- `keras.layers.MaxPooling2D` under XLA has a wrong second derivative, and none at all in
  float64.

`BatchStatNormalization` and `ExactMaxPool2D` are the replacements, and
`check_second_order_safe` rejects models that still contain an affected normalization layer.
"""

from __future__ import annotations

import keras
from keras import ops

# Keras layers whose moments go through `tf.nn.moments` on TensorFlow, with what to do instead.
_UNSAFE_LAYERS = (
    (keras.layers.BatchNormalization, "use tf_imaml.layers.BatchStatNormalization instead"),
    (keras.layers.LayerNormalization, "compute its moments without a stop_gradient"),
    (keras.layers.GroupNormalization, "compute its moments without a stop_gradient"),
)


@keras.saving.register_keras_serializable(package="tf_imaml")
class BatchStatNormalization(keras.layers.Layer):
    """Batch normalization with the current batch's statistics, always, and exact Hessians.

    `y = (x - mean) / sqrt(var + epsilon) * gamma + beta`, with `mean` and `var` taken over
    every axis but the last (channel) axis of the current batch, in training and in inference
    alike. This is the transductive setting of MAML and iMAML (Finn et al. 2017; Rajeswaran
    et al. 2019): a task's support or query set is normalized by its own statistics, so the
    layer keeps no moving averages and has no non-trainable weights.

    It exists because `keras.layers.BatchNormalization` on TensorFlow computes the variance
    around `stop_gradient(mean)` (through `tf.nn.moments`), which makes its second
    derivatives, and so iMAML's Hessian-vector products, wrong. Here
    `mean = mean(x)` and `var = mean((x - mean)^2)` are plain differentiable ops, so
    derivatives of every order are exact.

    float16 and bfloat16 inputs are normalized in float32 and cast back.

    Args:
      epsilon: Added to the variance before the square root; must be > 0.
        Default value: `1e-3` (as `keras.layers.BatchNormalization`).
      **kwargs: The base `keras.layers.Layer` arguments (`name`, `dtype`, `trainable`).

    Raises:
      ValueError: If `epsilon <= 0`.
    """

    def __init__(self, *, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                f"BatchStatNormalization needs rank >= 2 and a known channel axis, "
                f"got input shape {input_shape}"
            )
        channels = int(input_shape[-1])
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")

    def call(self, inputs, training=None):
        del training  # The current batch's statistics are used in every mode.
        axes = tuple(range(len(inputs.shape) - 1))
        return batch_stat_normalize(inputs, self.gamma, self.beta, axes=axes, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "epsilon": self.epsilon}


def batch_stat_normalize(x, gamma, beta, *, axes, epsilon: float):
    """`(x - mean) / sqrt(var + epsilon) * gamma + beta`, moments over `axes` of `x` itself.

    The moments are plain differentiable ops (no `stop_gradient`), so derivatives of every
    order are exact. float16 and bfloat16 are normalized in float32 and cast back.
    `gamma` and `beta` must broadcast against `x`.
    """
    dtype = x.dtype
    low_precision = keras.backend.standardize_dtype(dtype) in ("float16", "bfloat16")
    if low_precision:
        x = ops.cast(x, "float32")
    mean = ops.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    var = ops.mean(ops.square(centered), axis=axes, keepdims=True)
    y = centered * ops.rsqrt(var + epsilon) * ops.cast(gamma, x.dtype) + ops.cast(beta, x.dtype)
    return ops.cast(y, dtype) if low_precision else y


@keras.saving.register_keras_serializable(package="tf_imaml")
class ExactMaxPool2D(keras.layers.Layer):
    """Non-overlapping max pooling (channels last) as a reshape and a `reduce_max`.

    Equal to `keras.layers.MaxPooling2D(pool_size, padding="valid")`: trailing rows and
    columns that do not fill a window are cropped. Unlike the fused pooling kernel, its
    second derivative is exact (zero away from ties, as for any piecewise-linear function)
    under XLA and in float64, where XLA's `MaxPoolGrad` derivative is wrong or missing. At
    ties the gradient is shared equally among the tied inputs (`reduce_max`'s convention)
    instead of going to one of them.

    Args:
      pool_size: The side of the square window, which is also the stride; must be >= 1.
        Default value: `2`.
      **kwargs: The base `keras.layers.Layer` arguments (`name`, `dtype`, `trainable`).

    Raises:
      ValueError: If `pool_size < 1`.
    """

    def __init__(self, *, pool_size: int = 2, **kwargs):
        super().__init__(**kwargs)
        if int(pool_size) != pool_size or pool_size < 1:
            raise ValueError(f"pool_size must be an integer >= 1, got {pool_size}")
        self.pool_size = int(pool_size)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"ExactMaxPool2D needs a 4-D input, got shape {input_shape}")

    def call(self, inputs):
        k = self.pool_size
        shape = ops.shape(inputs)
        height, width = shape[1] // k, shape[2] // k
        x = inputs[:, : height * k, : width * k, :]
        x = ops.reshape(x, (-1, height, k, width, k, shape[3]))
        return ops.max(x, axis=(2, 4))

    def compute_output_shape(self, input_shape):
        k = self.pool_size
        batch, height, width, channels = input_shape
        return (
            batch,
            None if height is None else height // k,
            None if width is None else width // k,
            channels,
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "pool_size": self.pool_size}


def check_second_order_safe(model: keras.layers.Layer) -> None:
    """Raises `ValueError` if `model` holds a layer with wrong second derivatives on TF.

    Walks every layer recursively (nested models included) and rejects
    `keras.layers.BatchNormalization`, `LayerNormalization` and `GroupNormalization` and
    their subclasses: on TensorFlow all three take their variance around
    `stop_gradient(mean)`, so Hessian-vector products through them are wrong.

    Args:
      model: A Keras model or layer.

    Raises:
      ValueError: Naming every offending layer and what to use instead.
    """
    problems = []
    for layer in _all_layers(model):
        for cls, remedy in _UNSAFE_LAYERS:
            if isinstance(layer, cls):
                problems.append(
                    f"layer {layer.name!r} ({type(layer).__name__}): its second derivatives are "
                    f"wrong on TensorFlow; {remedy}"
                )
                break
    if problems:
        raise ValueError(
            f"{model.name!r} is not safe for Hessian-vector products (the variance is taken "
            "around stop_gradient(mean) by tf.nn.moments): " + "; ".join(problems)
        )


def has_keras_batch_normalization(model: keras.layers.Layer) -> bool:
    """Whether `model` holds a `keras.layers.BatchNormalization` (or subclass)."""
    return any(isinstance(layer, keras.layers.BatchNormalization) for layer in _all_layers(model))


_RANDOM_LAYERS = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def random_layers(model: keras.layers.Layer) -> list[str]:
    """Names of the layers of `model` that are random in training mode (Dropout, noise)."""
    return [layer.name for layer in _all_layers(model) if isinstance(layer, _RANDOM_LAYERS)]


def _all_layers(model: keras.layers.Layer) -> list:
    if hasattr(model, "_flatten_layers"):
        return list(model._flatten_layers(include_self=True, recursive=True))
    layers, stack = [], [model]
    while stack:
        layer = stack.pop()
        layers.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return layers
