"""The networks of the MAML and iMAML papers, as built `keras.Sequential` models.

- `conv4_classifier`: four 3x3 convolution blocks and a linear read-out (Vinyals et al.
  2016; Finn et al. 2017; Rajeswaran et al. 2019), with `BatchStatNormalization` so that the
  Hessian-vector products iMAML needs are exact.
- `mlp_regressor`: the sinusoid regression network of Finn et al. (2017).

Both return logits or raw outputs; the losses live with the training code.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from tf_imaml.layers import BatchStatNormalization
from tf_imaml.layers import ExactMaxPool2D

POOLINGS = (None, "max", "avg")


def conv4_classifier(
    num_classes: int,
    *,
    input_shape: Sequence[int] = (28, 28, 1),
    filters: int = 64,
    strides: int | None = None,
    pooling: str | None = None,
    activation: str = "relu",
    dtype=None,
    name: str = "conv4",
) -> keras.Sequential:
    """The four-block convolutional classifier of the MAML and iMAML papers.

    Each block is `Conv2D(filters, 3x3, strides, padding="same", no bias)`,
    `BatchStatNormalization`, the activation and, if `pooling` is set, a 2x2 pooling with
    stride 2 ("valid": odd sizes are cropped). `Flatten` and `Dense(num_classes)` follow and
    the model returns logits. The convolutions have no bias because the normalization
    removes any per-channel constant: a bias would get a zero gradient for ever.

    With the defaults this is the Omniglot network (strided convolutions, 28x28x1 inputs,
    64 filters). The mini-ImageNet network is
    `conv4_classifier(5, input_shape=(84, 84, 3), filters=32, pooling="max")`: stride-1
    convolutions followed by max pooling, done by `ExactMaxPool2D` (reshape + `reduce_max`)
    because the second derivative of XLA's max pooling is wrong. `pooling="avg"` is a
    smooth variant for gradient checks.

    Args:
      num_classes: Number of output logits (the `N` of N-way); must be >= 1.
      input_shape: Height, width and channels of one image.
        Default value: `(28, 28, 1)`.
      filters: Channels of every convolution; must be >= 1. Default value: `64`.
      strides: Stride of every convolution; must be >= 1. Default value: `None`, which is
        `2` without pooling and `1` with it.
      pooling: `None`, `"max"` or `"avg"`. Default value: `None`.
      activation: A Keras activation name. Default value: `"relu"`.
      dtype: A dtype or dtype policy for every layer. Default value: `None` (the global
        policy).
      name: The model's name. Default value: `"conv4"`.

    Returns:
      A built `keras.Sequential` mapping `[B, *input_shape]` images to `[B, num_classes]`
      logits.

    Raises:
      ValueError: If an argument is out of range, or the image is too small for four
        blocks (a spatial size would reach zero).
    """
    _check_at_least("num_classes", num_classes, 1)
    _check_at_least("filters", filters, 1)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if strides is None:
        strides = 2 if pooling is None else 1
    _check_at_least("strides", strides, 1)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(int(d) != d or d < 1 for d in input_shape):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints, got {input_shape}"
        )
    _check_spatial_size(input_shape, strides=strides, pooling=pooling)

    layers = [keras.Input(shape=input_shape, dtype=_input_dtype(dtype))]
    for i in range(1, 5):
        layers += [
            keras.layers.Conv2D(
                filters,
                3,
                strides=strides,
                padding="same",
                use_bias=False,
                dtype=dtype,
                name=f"conv{i}",
            ),
            BatchStatNormalization(dtype=dtype, name=f"norm{i}"),
            keras.layers.Activation(activation, dtype=dtype, name=f"act{i}"),
        ]
        if pooling == "max":
            layers.append(ExactMaxPool2D(pool_size=2, dtype=dtype, name=f"pool{i}"))
        elif pooling == "avg":
            layers.append(keras.layers.AveragePooling2D(2, dtype=dtype, name=f"pool{i}"))
    layers += [
        keras.layers.Flatten(dtype=dtype, name="flatten"),
        keras.layers.Dense(num_classes, dtype=dtype, name="logits"),
    ]
    return keras.Sequential(layers, name=name)


def mlp_regressor(
    hidden: Sequence[int] = (40, 40),
    *,
    input_dim: int = 1,
    output_dim: int = 1,
    activation: str = "relu",
    dtype=None,
    name: str = "mlp",
) -> keras.Sequential:
    """The sinusoid regression network of Finn et al. (2017): a small fully connected net.

    `Dense(h, activation)` for every `h` in `hidden`, then a linear `Dense(output_dim)`.

    Args:
      hidden: Widths of the hidden layers, each >= 1. Default value: `(40, 40)`.
      input_dim: Size of one input; must be >= 1. Default value: `1`.
      output_dim: Size of one output; must be >= 1. Default value: `1`.
      activation: A Keras activation name. Default value: `"relu"`.
      dtype: A dtype or dtype policy for every layer. Default value: `None` (the global
        policy).
      name: The model's name. Default value: `"mlp"`.

    Returns:
      A built `keras.Sequential` mapping `[B, input_dim]` to `[B, output_dim]`.

    Raises:
      ValueError: If a width or dimension is below 1.
    """
    hidden = tuple(hidden)
    for i, width in enumerate(hidden):
        _check_at_least(f"hidden[{i}]", width, 1)
    _check_at_least("input_dim", input_dim, 1)
    _check_at_least("output_dim", output_dim, 1)
    layers = [keras.Input(shape=(input_dim,), dtype=_input_dtype(dtype))]
    layers += [
        keras.layers.Dense(width, activation=activation, dtype=dtype, name=f"hidden{i}")
        for i, width in enumerate(hidden, start=1)
    ]
    layers.append(keras.layers.Dense(output_dim, dtype=dtype, name="output"))
    return keras.Sequential(layers, name=name)


def _check_at_least(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _input_dtype(dtype) -> str | None:
    """The compute dtype of a dtype or policy name, for `keras.Input`."""
    return None if dtype is None else keras.DTypePolicy(dtype).compute_dtype


def _check_spatial_size(input_shape: tuple, *, strides: int, pooling: str | None) -> None:
    sizes = list(input_shape[:2])
    for _ in range(4):
        sizes = [-(-s // strides) for s in sizes]  # "same" padding: ceil(size / strides).
        if pooling is not None:
            sizes = [s // 2 for s in sizes]  # "valid" 2x2 pooling.
        if min(sizes) < 1:
            raise ValueError(
                f"input_shape {input_shape} is too small for four blocks with strides={strides} "
                f"and pooling={pooling!r}: a spatial size reaches zero"
            )
