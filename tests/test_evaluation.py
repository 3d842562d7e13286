"""tf_imaml.evaluation.few_shot_accuracy against its definition, and diverged adaptations."""

import keras
import numpy as np
import pytest

import tf_imaml


@pytest.fixture(scope="module")
def shipped_and_episodes():
    meta = tf_imaml.pretrained.load("omniglot_5way_1shot")
    data = tf_imaml.datasets.load_omniglot("test")
    episodes = tf_imaml.episodes.few_shot_episodes(
        data.images,
        data.labels,
        ways=5,
        shots=1,
        queries=2,
        meta_batch_size=4,
        seed=0,
        rotations=(0,),
        num_batches=2,
    )
    return meta, episodes


def test_per_task_accuracy_is_the_share_of_right_argmaxes(shipped_and_episodes):
    meta, episodes = shipped_and_episodes
    result = tf_imaml.evaluation.few_shot_accuracy(meta, episodes)
    # Oracle: the adapted predictions of each batch, scored by hand.
    expected = []
    for inputs, query_y in episodes:
        logits = np.asarray(meta.predict_on_batch(inputs))
        expected += [
            np.mean(np.argmax(t, -1) == y) for t, y in zip(logits, query_y.numpy(), strict=True)
        ]
    np.testing.assert_allclose(result.per_task, expected)
    assert result.num_tasks == 8 and result.non_finite == 0
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.ci95 == pytest.approx(1.96 * np.std(expected, ddof=1) / np.sqrt(8))
    assert result.mean > 0.5  # the shipped model, adapted as it was trained


def test_diverged_adaptation_is_counted_not_scored_as_chance(shipped_and_episodes):
    meta, episodes = shipped_and_episodes
    diverging = keras.models.clone_model(meta)  # same config, fresh copy
    diverging.set_weights(meta.get_weights())
    diverging.inner_learning_rate = 1e6  # plain GD steps of 1e6 blow the weights up
    diverging.make_predict_function(force=True)
    result = tf_imaml.evaluation.few_shot_accuracy(diverging, episodes)
    assert result.non_finite == result.num_tasks == 8
    # What the count is for: every diverged task "scores" chance (argmax of NaN is class 0
    # and the query classes are balanced), which alone would read as an untrained model.
    np.testing.assert_allclose(result.per_task, 0.2)
