"""Bad input, tried systematically (hypothesis): a named ValueError or TypeError, no weight change."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import tf_imaml

WAYS = 3
SHAPE = (8, 8, 1)


def _meta():
    keras.utils.set_random_seed(1)
    learner = tf_imaml.models.conv4_classifier(WAYS, input_shape=SHAPE, filters=2)
    meta = tf_imaml.ImplicitMAML(learner, inner_steps=1, cg_steps=1)
    meta.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    return meta


META = _meta()
WEIGHTS = [v.numpy() for v in META.learner.trainable_variables]


def _good(rng, tasks, shots, queries):
    sy = np.tile(np.repeat(np.arange(WAYS), shots), (tasks, 1)).astype("int32")
    qy = np.tile(np.repeat(np.arange(WAYS), queries), (tasks, 1)).astype("int32")
    sx = rng.standard_normal((tasks, sy.shape[1], *SHAPE)).astype("float32")
    qx = rng.standard_normal((tasks, qy.shape[1], *SHAPE)).astype("float32")
    return [sx, sy, qx, qy]


def _corrupt(kind, parts, rng, value):
    sx, sy, qx, qy = parts
    t = int(rng.integers(sx.shape[0]))
    if kind == "image_shape":
        parts[0] = np.zeros((*sx.shape[:2], SHAPE[0] + 1, *SHAPE[1:]), "float32")
        return ValueError, "learner takes examples of shape"
    if kind == "image_rank":
        parts[2] = qx.reshape(qx.shape[0], qx.shape[1], -1)
        return ValueError, "learner takes examples of shape"
    if kind == "string_images":
        parts[0] = sx.astype(str)
        return TypeError, "support_x must be numeric"
    if kind == "string_labels":
        parts[3] = qy.astype(str)
        return TypeError, "query_y must be numeric"
    if kind == "label_too_large":
        parts[1] = sy.copy()
        parts[1][t, 0] = WAYS + value
        return ValueError, r"support_y has class labels outside \[0, 3\)"
    if kind == "label_negative":
        parts[3] = qy.copy()
        parts[3][t, -1] = -1 - value
        return ValueError, r"query_y has class labels outside \[0, 3\)"
    if kind == "empty_support":
        parts[0], parts[1] = sx[:, :0], sy[:, :0]
        return ValueError, "the support set is empty"
    if kind == "empty_query":
        parts[2], parts[3] = qx[:, :0], qy[:, :0]
        return ValueError, "the query set is empty"
    if kind == "ways_mismatch":  # The support set lacks a class that the query set has.
        parts[1] = sy.copy()
        parts[1][t] = np.where(sy[t] == WAYS - 1, 0, sy[t])
        return ValueError, f"task {t}: query classes \\[{WAYS - 1}\\] have no support examples"
    if kind == "task_count":
        parts[2], parts[3] = qx[:-1], qy[:-1]
        return ValueError, "different numbers of tasks"
    if kind == "example_count":
        parts[1] = sy[:, :-1]
        return ValueError, "the task and example axes must agree"
    if kind == "non_finite":
        parts[2] = qx.copy()
        parts[2][t, 0, 0, 0, 0] = [np.nan, np.inf, -np.inf][value % 3]
        return ValueError, rf"query_x has non-finite values \(NaN or Inf\) in task\(s\) \[{t}\]"
    raise AssertionError(kind)


KINDS = [
    "image_shape",
    "image_rank",
    "string_images",
    "string_labels",
    "label_too_large",
    "label_negative",
    "empty_support",
    "empty_query",
    "ways_mismatch",
    "task_count",
    "example_count",
    "non_finite",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    tasks=st.integers(2, 4),
    shots=st.integers(1, 3),
    queries=st.integers(1, 3),
    value=st.integers(0, 1000),
    seed=st.integers(0, 2**16),
    method=st.sampled_from(["train_on_batch", "fit", "test_on_batch", "evaluate"]),
)
def test_bad_episodes_raise_a_named_error_and_change_nothing(
    kind, tasks, shots, queries, value, seed, method
):
    rng = np.random.default_rng(seed)
    parts = _good(rng, tasks, shots, queries)
    error, message = _corrupt(kind, parts, rng, value)
    sx, sy, qx, qy = parts
    with pytest.raises(error, match=message):
        if method == "fit":
            META.fit((sx, sy, qx), qy, verbose=0)
        elif method == "evaluate":
            META.evaluate((sx, sy, qx), qy, verbose=0)
        else:
            getattr(META, method)((sx, sy, qx), qy)
    for variable, want in zip(META.learner.trainable_variables, WEIGHTS, strict=True):
        np.testing.assert_array_equal(variable.numpy(), want)
    assert int(META.optimizer.iterations.numpy()) == 0


def test_a_good_episode_passes_the_checks():
    parts = _good(np.random.default_rng(0), 2, 1, 2)
    tf_imaml.episode_checks.check_episode(META.learner, parts[:3], parts[3], loss=META.loss)
    assert META.predict_on_batch(tuple(parts[:3])).shape == (2, 6, WAYS)


BAD_VALUES = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.just(float("nan")),
    st.just(float("-inf")),
    st.text(max_size=3),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(
        ["lam", "inner_learning_rate", "cg_steps", "inner_steps", "inner_cg_steps", "max_residual"]
    ),
    value=BAD_VALUES,
)
def test_bad_constructor_values_raise_naming_the_argument(name, value):
    if name in ("cg_steps", "inner_steps") and isinstance(value, float) and value == 0.0:
        value = -1  # 0 steps are allowed.
    with pytest.raises((ValueError, TypeError), match=name):
        tf_imaml.ImplicitMAML(META.learner, **{name: value})


@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["inner_steps", "inner_learning_rate"]),
    value=BAD_VALUES,
    cls=st.sampled_from([tf_imaml.MAML, tf_imaml.Reptile]),
)
def test_bad_baseline_constructor_values_raise(name, value, cls):
    if name == "inner_steps" and isinstance(value, float) and value == 0.0:
        value = -1
    with pytest.raises((ValueError, TypeError), match=name):
        cls(META.learner, **{name: value})


def test_a_tensor_dataset_is_still_checked_inside_the_step():
    parts = _good(np.random.default_rng(0), 2, 1, 1)
    parts[1] = parts[1] + WAYS
    data = tf.data.Dataset.from_tensors(((parts[0], parts[1], parts[2]), parts[3]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"class labels outside \[0, 3\)"):
        META.fit(data, verbose=0)
    assert int(META.optimizer.iterations.numpy()) == 0
