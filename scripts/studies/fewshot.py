"""What the studies build the same way: episodes, the conv learner, compiled meta-learners.

Episodes are seeded N-way K-shot `tf.data` pipelines over Omniglot (rotations by 0, 90, 180
and 270 degrees as extra classes) or mini-ImageNet (JPEG bytes decoded per episode); the
learner is `tf_imaml.models.conv4_classifier`; meta-learners are compiled with Adam and the
from-logits cross-entropy every study trains with.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import harness  # noqa: F401  (sets TensorFlow's log level and data paths first)
import keras
import numpy as np

import tf_imaml

ROTATIONS = (0, 90, 180, 270)


def episodes(
    data,
    *,
    ways: int,
    queries: int,
    batch: int,
    seed: int,
    num_tasks: int | None,
    shots: int = 1,
    dataset: str = "omniglot",
    image_size: int | None = None,
):
    """`ceil(num_tasks / batch)` meta-batches of `batch` tasks (endless when `num_tasks` is None).

    `image_size` resizes mini-ImageNet's images (None keeps 84x84); Omniglot's size is the
    loaded one.
    """
    common = dict(
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch_size=batch,
        seed=seed,
        num_batches=None if num_tasks is None else -(-num_tasks // batch),
    )
    if dataset == "mini_imagenet":
        return tf_imaml.episodes.jpeg_few_shot_episodes(
            data.images, data.labels, image_size=image_size, **common
        )
    return tf_imaml.episodes.few_shot_episodes(
        data.images, data.labels, rotations=ROTATIONS, **common
    )


def config_episodes(config, data, *, seed: int, num_tasks: int | None, batch: int):
    """`episodes` of Omniglot tasks shaped as `config.ways`, `config.shots`, `config.queries` say."""
    return episodes(
        data,
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        batch=batch,
        seed=seed,
        num_tasks=num_tasks,
    )


def learner(
    *,
    ways: int,
    image_size: int,
    filters: int,
    channels: int = 1,
    pooling: str | None = None,
    activation: str = "relu",
    dtype=None,
    seed: int | None = None,
) -> keras.Model:
    """The conv4 classifier on `image_size` square images; seeded first when `seed` is given."""
    if seed is not None:
        keras.utils.set_random_seed(seed)
    return tf_imaml.models.conv4_classifier(
        ways,
        input_shape=(image_size, image_size, channels),
        filters=filters,
        pooling=pooling,
        activation=activation,
        dtype=dtype,
    )


def compile_meta(meta, *, learning_rate: float = 1e-3, metrics=("sparse_categorical_accuracy",)):
    """Compiles `meta` with Adam and cross-entropy on logits; returns it."""
    meta.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=None if metrics is None else list(metrics),
    )
    return meta


class TrainResult(NamedTuple):
    """What one meta-training run returns."""

    history: dict  # Keras history: metric name -> value per epoch.
    seconds: float  # Wall-clock seconds of the run.


def meta_train(meta, episodes, *, meta_steps: int, callbacks=None, verbose=0) -> TrainResult:
    """`meta.fit` for `meta_steps` meta-steps in one epoch, timed."""
    start = time.time()
    history = meta.fit(
        episodes, epochs=1, steps_per_epoch=meta_steps, verbose=verbose, callbacks=callbacks
    )
    return TrainResult(history.history, time.time() - start)


def load_omniglot_splits(image_size: int, splits=("train", "test")) -> dict:
    """`{split: Omniglot images at image_size}` for each split."""
    return {s: tf_imaml.datasets.load_omniglot(s, image_size=image_size) for s in splits}


def pretrained_weights(path) -> list[np.ndarray]:
    """The trainable weights of a saved meta-learner's learner (a `model.keras`)."""
    return [v.numpy() for v in keras.models.load_model(path).learner.trainable_variables]


def concat_tasks(parts: list[dict], num_tasks: int) -> dict:
    """Per-task values of several meta-batches joined, cut to `num_tasks` (the last may overrun)."""
    return {k: np.concatenate([p[k].numpy() for p in parts])[:num_tasks] for k in parts[0]}
