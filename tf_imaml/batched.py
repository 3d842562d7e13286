"""A Keras learner evaluated for a whole meta-batch at once, with per-task weights.

`apply(model, params, x)` computes what `model.stateless_call(params[t], ..., x[t])` gives for
every task `t`, in one pass: `params` are the model's trainable weights with a leading task
axis `[T, ...]` and `x` is `[T, n, ...]`. Each op then serves all `T` tasks, instead of `T`
sequential passes over tiny batches (5 support images per task) whose cost is mostly
per-op overhead on a CPU.

How each layer is evaluated with per-task weights:

- `Dense`: one batched matmul, `[T, n, d] @ [T, d, k]`.
- `Conv2D`: TensorFlow's grouped convolution has no filter gradient on CPU, and an
  im2col (patches + batched matmul) is slower than plain convolutions. So with a static
  number of tasks each task gets its own `tf.nn.conv2d` in the same graph (independent ops
  that TensorFlow runs in parallel); with a dynamic number the patches + matmul form is
  used.
- `BatchStatNormalization`: moments per task over its own examples and positions.
- Layers without weights that act on each example alone (activations, pooling, flatten,
  reshape): the task axis is folded into the batch axis and the layer itself is called.

Models made of other layers are reported by `unsupported_layers`; `MetaLearner` then falls
back to evaluating task by task with `tf.map_fn`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_imaml import layers as layers_lib

# Layers without weights that transform each example independently.
_PER_EXAMPLE_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Softmax,
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    layers_lib.ExactMaxPool2D,
)

# Largest static number of tasks evaluated with one `tf.nn.conv2d` per task.
_MAX_UNSTACKED_TASKS = 256


def unsupported_layers(model: keras.Model) -> list[str]:
    """Why `model` cannot be evaluated batched over tasks: an empty list if it can.

    Supported: a `keras.Sequential` of `Dense`, `Conv2D` (channels last, no groups),
    `BatchStatNormalization` and per-example layers without weights (activations,
    pooling, flatten, reshape), whose trainable weights are exactly the layers' weights in
    order.
    """
    if not isinstance(model, keras.Sequential):
        return [f"{model.name!r} is a {type(model).__name__}, not a keras.Sequential"]
    problems = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D) and type(layer) is keras.layers.Conv2D:
            if layer.data_format != "channels_last" or layer.groups != 1:
                problems.append(f"{layer.name!r}: Conv2D must be channels_last with groups=1")
        elif isinstance(layer, keras.layers.Dense) and type(layer) is keras.layers.Dense:
            if getattr(layer, "lora_enabled", False):
                problems.append(f"{layer.name!r}: Dense with LoRA")
        elif isinstance(layer, layers_lib.BatchStatNormalization):
            pass
        elif isinstance(layer, _PER_EXAMPLE_LAYERS):
            if layer.weights:
                problems.append(f"{layer.name!r}: has weights")
        else:
            problems.append(f"{layer.name!r}: {type(layer).__name__} is not supported")
    if not problems:
        layer_weights = [id(w) for layer in model.layers for w in layer.trainable_weights]
        if layer_weights != [id(w) for w in model.trainable_variables]:
            problems.append("the trainable weights are not the layers' weights in order")
        if model.non_trainable_variables:
            problems.append("the model has non-trainable weights")
    return problems


def apply(model: keras.Sequential, params: list, x: tf.Tensor) -> tf.Tensor:
    """Outputs of `model` for every task: `[T, n, ...]`, like a per-task `stateless_call`.

    Args:
      model: A model for which `unsupported_layers(model)` is empty.
      params: Its trainable weights with a leading task axis, in
        `model.trainable_variables` order.
      x: Inputs `[T, n, ...]`.

    Returns:
      The outputs, `[T, n, ...]`.

    Raises:
      ValueError: If the model is not supported or `params` has the wrong length.
    """
    problems = unsupported_layers(model)
    if problems:
        raise ValueError("model cannot be evaluated batched over tasks: " + "; ".join(problems))
    if len(params) != len(model.trainable_variables):
        raise ValueError(
            f"params has {len(params)} tensors, the model {len(model.trainable_variables)}"
        )
    params = list(params)
    for layer in model.layers:
        weights = [params.pop(0) for _ in layer.trainable_weights]
        x = _apply_layer(layer, weights, x)
    return x


def _apply_layer(layer, weights, x):
    # Under a mixed dtype policy the weights are float32 and the layer computes in its
    # compute dtype, as a Keras layer's own call does (autocast).
    dtype = layer.compute_dtype
    weights = [tf.cast(w, dtype) for w in weights]
    x = tf.cast(x, dtype)
    if isinstance(layer, keras.layers.Conv2D):
        y = _conv2d(layer, weights[0], x)
        if layer.use_bias:
            y += weights[1][:, tf.newaxis, tf.newaxis, tf.newaxis, :]
        return layer.activation(y)
    if isinstance(layer, keras.layers.Dense):
        y = _dense(weights[0], x)
        if layer.use_bias:
            y += tf.reshape(weights[1], _broadcast_shape(weights[1], y))
        return layer.activation(y)
    if isinstance(layer, layers_lib.BatchStatNormalization):
        gamma, beta = (tf.reshape(w, _broadcast_shape(w, x)) for w in weights)
        axes = tuple(range(1, len(x.shape) - 1))  # Each task's examples and positions.
        return layers_lib.batch_stat_normalize(x, gamma, beta, axes=axes, epsilon=layer.epsilon)
    # A per-example layer: fold the task axis into the batch axis.
    shape = tf.shape(x)
    y = layer(tf.reshape(x, tf.concat([[-1], shape[2:]], 0)))
    return tf.reshape(y, tf.concat([shape[:2], tf.shape(y)[1:]], 0))


def _broadcast_shape(weight, x):
    """`[T, 1, ..., 1, C]`: a per-task channel vector against `x` of rank r."""
    return [-1] + [1] * (len(x.shape) - 2) + [weight.shape[-1]]


def _dense(kernel, x):
    shape = tf.shape(x)
    flat = tf.reshape(x, [shape[0], -1, kernel.shape[-2]])
    y = tf.matmul(flat, kernel)
    return tf.reshape(y, tf.concat([shape[:-1], [kernel.shape[-1]]], 0))


def _conv2d(layer, kernel, x):
    strides = list(layer.strides)
    dilations = list(layer.dilation_rate)
    padding = layer.padding.upper()
    num_tasks = x.shape[0]
    if num_tasks is not None and num_tasks <= _MAX_UNSTACKED_TASKS:
        return tf.stack(
            [
                tf.nn.conv2d(xt, kt, strides, padding, dilations=dilations)
                for xt, kt in zip(tf.unstack(x), tf.unstack(kernel), strict=True)
            ]
        )
    return _conv2d_patches(kernel, x, strides, dilations, padding)


def _conv2d_patches(kernel, x, strides, dilations, padding):
    """Per-task convolution as shifted slices (im2col) and one batched matmul."""
    kh, kw, channels, filters = kernel.shape[1:]
    shape = tf.shape(x)
    sizes = []
    pads = []
    for axis, k, s, d in ((2, kh, strides[0], dilations[0]), (3, kw, strides[1], dilations[1])):
        size = shape[axis]
        span = (k - 1) * d + 1
        if padding == "SAME":
            out = (size + s - 1) // s
            total = tf.maximum((out - 1) * s + span - size, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (size - span) // s + 1
            pads.append([0, 0])
        sizes.append(out)
    x = tf.pad(x, [[0, 0], [0, 0], pads[0], pads[1], [0, 0]])
    oh, ow = sizes
    columns = [
        x[
            :,
            :,
            i * dilations[0] : i * dilations[0] + (oh - 1) * strides[0] + 1 : strides[0],
            j * dilations[1] : j * dilations[1] + (ow - 1) * strides[1] + 1 : strides[1],
            :,
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = tf.reshape(tf.stack(columns, axis=-2), [shape[0], -1, kh * kw * channels])
    y = tf.matmul(patches, tf.reshape(kernel, [-1, kh * kw * channels, filters]))
    return tf.reshape(y, [shape[0], shape[1], oh, ow, filters])
