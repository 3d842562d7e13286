"""What the studies build the same way: episodes, the conv learner, compiled meta-learners.

Episodes are seeded N-way K-shot `tf.data` pipelines over Omniglot (rotations by 0, 90, 180
and 270 degrees as extra classes) or mini-ImageNet (JPEG bytes decoded per episode); the
learner is `tf_imaml.models.conv4_classifier`; meta-learners are compiled with Adam and the
from-logits cross-entropy every study trains with. The studies that rank trained models
score each one under its own test-time adaptation and under identical ones
(`adapted_accuracies`), so that a difference in adaptation cannot pass for one in training.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from collections.abc import Sequence
from typing import NamedTuple

import harness  # noqa: F401  (sets TensorFlow's log level and data paths first)
import keras
import numpy as np
import stats

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


def proximal_evaluator(
    learner: keras.Model, *, lam: float, inner_steps: int, inner_learning_rate: float
) -> tf_imaml.ImplicitMAML:
    """A meta-learner that adapts `learner` by `inner_steps` gradient steps of
    `inner_learning_rate` from theta on `support loss + lam/2 ||phi - theta||^2` (lam 0: plain
    GD fine-tuning), whatever the algorithm that trained it; compiled, for prediction only."""
    meta = tf_imaml.ImplicitMAML(
        learner,
        lam=lam or 1.0,  # the training lam is unused: this model only predicts
        test_lam=lam,
        inner_steps=inner_steps,
        inner_learning_rate=inner_learning_rate,
    )
    return compile_meta(meta)


def adapted_accuracies(
    meta,
    test_episodes,
    *,
    eval_lams: Sequence[float],
    inner_steps: int,
    inner_learning_rate: float,
    skip: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """`{adaptation: per-task query accuracies}` of one trained meta-learner on the same tasks.

    `"own"` is `meta`'s own test-time adaptation; `"lam=<x>"` adapts `meta.learner` by the
    `proximal_evaluator` at each lam of `eval_lams`, the same for every model scored with the
    same arguments (names from `stats.adaptation_names`).

    Args:
      meta: A trained, compiled `tf_imaml.meta_model.MetaLearner`.
      test_episodes: A finite episode dataset that yields the same tasks on every pass.
      eval_lams: The lams of the identical adaptations (each >= 0).
      inner_steps, inner_learning_rate: Their number of steps and step size.
      skip: Adaptation names left out (e.g. already scored). Default value: `()`.

    Returns:
      `{name: [num_tasks] accuracies}` for `own` and each `lam=<x>` not in `skip`, in that
      order (`num_tasks`: every task of `test_episodes`).
    """
    per_task = {}
    for lam, name in zip((None, *eval_lams), stats.adaptation_names(eval_lams), strict=True):
        if name in skip:
            continue
        model = meta
        if lam is not None:
            model = proximal_evaluator(
                meta.learner,
                lam=lam,
                inner_steps=inner_steps,
                inner_learning_rate=inner_learning_rate,
            )
        per_task[name] = tf_imaml.evaluation.few_shot_accuracy(model, test_episodes).per_task
    return per_task
