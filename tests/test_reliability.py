"""Faults: SIGKILL and resume, diverging runs, determinism."""

import signal
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_imaml
from tf_imaml import callbacks
from tf_imaml import models

# Slow: meta-training, in process and in killed and resumed subprocesses.
pytestmark = pytest.mark.slow


def _weights(path):
    return [v.numpy() for v in keras.models.load_model(path).learner.trainable_variables]


def test_sigkill_and_resume_reaches_the_uninterrupted_weights_bit_for_bit(
    tmp_path, small_omniglot, run_script, start_script, tiny_train_flags
):
    # A few real Omniglot characters: resuming does not depend on how many there are, and
    # each of the three runs would otherwise spend seconds resizing all 1623 of them.
    # Six meta-steps of one epoch each, so that the kill after the second leaves work to do.
    flags = [f"--data_dir={small_omniglot}", *tiny_train_flags, "--meta_steps=6", "--test_tasks=2"]
    whole = run_script("train.py", f"--logdir={tmp_path / 'whole'}", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    metadata = killed_dir / "backup" / "training_metadata.json"
    process = start_script("train.py", f"--logdir={killed_dir}", *flags)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if metadata.is_file() and '"epoch": 2' in metadata.read_text():
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "results.json").exists()

    resumed = run_script("train.py", f"--logdir={killed_dir}", *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Oracle: the uninterrupted run. Same seed, episodes continued from the checkpoint's
    # batch, optimizer state restored, deterministic CPU ops: equal to the last bit.
    for got, want in zip(
        _weights(killed_dir / "model.keras"),
        _weights(tmp_path / "whole" / "model.keras"),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)


def _episodes(num_batches, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)

    def images(shape):  # Finite float32 values, up to 3e38 in magnitude.
        return np.clip(scale * rng.standard_normal(shape), -3e38, 3e38).astype("float32")

    for _ in range(num_batches):
        yield (
            (
                images((2, 3, 8, 8, 1)),
                np.tile(np.arange(3, dtype="int32"), (2, 1)),
                images((2, 6, 8, 8, 1)),
            ),
            np.tile(np.arange(3, dtype="int32"), (2, 2)),
        )


def _meta(seed=0):
    keras.utils.set_random_seed(seed)
    learner = models.conv4_classifier(3, input_shape=(8, 8, 1), filters=4)
    meta = tf_imaml.ImplicitMAML(
        learner, lam=1.0, inner_steps=2, cg_steps=2, on_failure="first_order"
    )
    meta.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return meta


def _dataset(batches):
    first = batches[0]
    spec = tf.nest.map_structure(lambda a: tf.TensorSpec(a.shape, a.dtype), first)
    return tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=spec)


def test_divergence_guard_stops_before_the_good_checkpoint_is_overwritten(tmp_path):
    # Epoch 1 is healthy; epoch 2's inputs overflow float32 in the forward pass, so every
    # task's meta-gradient is non-finite and every step is skipped.
    batches = list(_episodes(2)) + list(_episodes(2, scale=1e39))
    meta = _meta()
    after_epoch_1 = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: after_epoch_1.append(meta.learner.get_weights())
        if epoch == 0
        else None
    )
    checkpoint = tmp_path / "model.keras"
    with pytest.raises(callbacks.TrainingDiverged, match="epoch 2: 2 of 2 meta-steps were skipped"):
        meta.fit(
            _dataset(batches),
            epochs=2,
            steps_per_epoch=2,
            verbose=0,
            callbacks=[
                record,
                callbacks.DivergenceGuard(),
                keras.callbacks.ModelCheckpoint(str(checkpoint)),
            ],
        )
    # The weights never left the last good values, and the checkpoint holds epoch 1.
    for got, want in zip(meta.learner.get_weights(), after_epoch_1[0], strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        keras.models.load_model(checkpoint).learner.get_weights(), after_epoch_1[0], strict=True
    ):
        np.testing.assert_array_equal(got, want)


def test_divergence_guard_rejects_a_bad_threshold():
    with pytest.raises(ValueError, match="max_skipped_fraction"):
        callbacks.DivergenceGuard(max_skipped_fraction=1.0)


def test_same_seed_same_episodes_same_metrics_and_weights():
    runs = []
    for _ in range(2):
        meta = _meta(seed=3)
        history = meta.fit(_dataset(list(_episodes(3, seed=5))), epochs=1, verbose=0)
        runs.append((meta.learner.get_weights(), history.history))
    for got, want in zip(runs[0][0], runs[1][0], strict=True):
        np.testing.assert_array_equal(got, want)
    assert runs[0][1] == runs[1][1]
    data = tf_imaml.datasets.load_omniglot("val", image_size=14)
    sampler = dict(ways=5, shots=1, queries=2, meta_batch_size=2, seed=7)

    def stream(num_batches, first_batch=0):
        dataset = tf_imaml.episodes.few_shot_episodes(
            data.images, data.labels, num_batches=num_batches, first_batch=first_batch, **sampler
        )
        return list(dataset.as_numpy_iterator())

    episodes = [stream(3) for _ in range(2)]
    for a, b in zip(*episodes, strict=True):
        for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True):
            np.testing.assert_array_equal(x, y)
    # A stream resumed at batch 2 is the uninterrupted stream's third element.
    (resumed,) = stream(1, first_batch=2)
    for x, y in zip(tf.nest.flatten(resumed), tf.nest.flatten(episodes[0][2]), strict=True):
        np.testing.assert_array_equal(x, y)
