"""Tests for tf_imaml.episodes: few-shot and sinusoid episode pipelines."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import episodes

NUM_CLASSES, PER_CLASS, SIDE = 6, 5, 3
STAMP = 100  # image n holds n * STAMP + (0..SIDE^2 - 1): its index and, by layout, its turn


def _stamped_images(num_classes=NUM_CLASSES, per_class=PER_CLASS):
    """`[N, SIDE, SIDE]` images that name their own index, with shuffled non-contiguous labels."""
    n = num_classes * per_class
    pattern = np.arange(SIDE * SIDE).reshape(SIDE, SIDE)
    images = np.arange(n)[:, None, None] * STAMP + pattern
    labels = np.random.default_rng(0).permutation(
        np.repeat(np.arange(num_classes) * 7 + 3, per_class)
    )
    return images.astype(np.int16), labels


def _identify(image, originals):
    """(index, quarter turns) with `image == rot90(originals[index], turns)`; exactly one fits."""
    index = int(image.min()) // STAMP
    fits = [k for k in range(4) if np.array_equal(np.rot90(originals[index], k), image)]
    assert len(fits) == 1, f"image is no rotation of original {index}"
    return index, fits[0]


def _batches(dataset, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in dataset.take(n)]


def _few_shot(seed=0, **overrides):
    images, labels = _stamped_images()
    kwargs = dict(ways=3, shots=2, queries=2, meta_batch_size=4, seed=seed, rotations=(0, 180))
    kwargs.update(overrides)
    return episodes.few_shot_episodes(images, labels, **kwargs)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_few_shot_shapes_dtypes_and_static_spec(dtype):
    dataset = _few_shot(dtype=dtype, num_batches=2)
    for spec in tf.nest.flatten(dataset.element_spec):
        assert spec.shape.is_fully_defined()  # Keras needs static shapes
    ((sx, sy, qx), qy), _ = _batches(dataset, 2)
    assert sx.shape == (4, 6, SIDE, SIDE, 1) and qx.shape == (4, 6, SIDE, SIDE, 1)
    assert sy.shape == (4, 6) and qy.shape == (4, 6)
    assert sx.dtype == qx.dtype == dtype.as_numpy_dtype
    assert sy.dtype == qy.dtype == np.int32


def test_few_shot_labels_are_balanced_and_in_range():
    for (_, sy, _), qy in _batches(_few_shot(), 3):
        for t in range(sy.shape[0]):
            np.testing.assert_array_equal(np.bincount(sy[t], minlength=3), [2, 2, 2])
            np.testing.assert_array_equal(np.bincount(qy[t], minlength=3), [2, 2, 2])


def test_few_shot_draws_are_distinct_and_each_label_is_one_class_and_rotation():
    images, labels = _stamped_images()
    seen_pairs, seen_examples, mappings, sorted_supports = set(), set(), set(), 0
    batches = _batches(_few_shot(), 25)
    for (sx, sy, qx), qy in batches:
        for t in range(sx.shape[0]):
            x = np.concatenate([sx[t], qx[t]])[..., 0].astype(np.int64)
            y = np.concatenate([sy[t], qy[t]])
            ids = [_identify(image, images) for image in x]
            indices = [i for i, _ in ids]
            # One example may serve two classes of a task, turned differently (class c at 0
            # and at 180 degrees are two classes), but no image appears twice.
            assert len(set(ids)) == len(ids), "an image drawn twice in one task"
            pairs = [(labels[i], k) for i, k in ids]
            per_label = [
                {p for p, label in zip(pairs, y, strict=True) if label == j} for j in range(3)
            ]
            assert all(len(s) == 1 for s in per_label), per_label
            assert len(set.union(*per_label)) == 3, "two episode labels share a class"
            mappings.add(tuple(next(iter(s)) for s in per_label))
            seen_pairs.update(pairs)
            seen_examples.update(indices[: len(sy[t])])
            sorted_supports += bool(np.all(np.diff(sy[t]) >= 0))
    # 6 classes x 2 rotations, each example of each class, several label assignments: a
    # sampler that skipped a class, a rotation or an example, or fixed the order, fails here.
    assert len(seen_pairs) == 2 * NUM_CLASSES
    assert seen_examples == set(range(NUM_CLASSES * PER_CLASS))
    assert len(mappings) > 50
    # Sorted support labels have probability 8/720 per task once shuffled: rare, not absent.
    assert sorted_supports < 10


def test_rotations_turn_the_images():
    images, _ = _stamped_images(num_classes=1, per_class=4)
    dataset = episodes.few_shot_episodes(
        images[..., None],
        np.zeros(4, np.int64),
        ways=4,
        shots=1,
        queries=1,
        meta_batch_size=3,
        seed=1,
        rotations=(0, 90, 180, 270),
        dtype=tf.float64,
    )
    for (sx, sy, qx), qy in _batches(dataset, 2):
        for t in range(sx.shape[0]):
            turns = {}
            for image, label in zip(
                np.concatenate([sx[t], qx[t]]), np.concatenate([sy[t], qy[t]]), strict=True
            ):
                index, k = _identify(image[..., 0], images)
                # Exact: a rotation only moves pixels, which are small integers in float64.
                np.testing.assert_array_equal(image[..., 0], np.rot90(images[index], k))
                turns.setdefault(label, set()).add(k)
            assert sorted(turns.values(), key=min) == [{0}, {1}, {2}, {3}]


def test_few_shot_is_a_pure_function_of_seed_and_index():
    first = _batches(_few_shot(seed=3), 3)
    again = _batches(_few_shot(seed=3), 3)
    skipped = _batches(_few_shot(seed=3).skip(2), 1)
    other = _batches(_few_shot(seed=4), 3)
    for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tf.nest.flatten(first[2]), tf.nest.flatten(skipped[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][0][0], other[0][0][0])


def test_cardinality_finite_and_infinite():
    endless = _few_shot()
    assert endless.cardinality().numpy() == tf.data.INFINITE_CARDINALITY
    assert len(_batches(endless, 5)) == 5
    finite = _few_shot(num_batches=3)
    assert finite.cardinality().numpy() == 3
    assert len(list(finite)) == 3


def _sinusoid(seed=0, **overrides):
    kwargs = dict(shots=10, queries=7, meta_batch_size=25, seed=seed)
    kwargs.update(overrides)
    return episodes.sinusoid_episodes(**kwargs)


def test_sinusoid_tasks_are_sinusoids_with_the_paper_ranges():
    dataset = _sinusoid(num_batches=4)
    for spec in tf.nest.flatten(dataset.element_spec):
        assert spec.shape.is_fully_defined() and spec.dtype == tf.float32
    amplitudes, phases, xs = [], [], []
    for (sx, sy, qx), qy in _batches(dataset, 4):
        assert sx.shape == sy.shape == (25, 10, 1) and qx.shape == qy.shape == (25, 7, 1)
        for t in range(25):
            # Oracle: A sin(x - p) = a sin x + b cos x with a = A cos p, b = -A sin p, fitted by
            # least squares on the support. Tolerance: float32 rounding of x (half-ulp <= 2.4e-7
            # for |x| <= 5) times |A| <= 5, plus rounding of y: about 1.5e-6.
            basis = np.concatenate([np.sin(sx[t]), np.cos(sx[t])], axis=1).astype(np.float64)
            (a, b), *_ = np.linalg.lstsq(basis, sy[t, :, 0].astype(np.float64), rcond=None)
            predicted = a * np.sin(qx[t, :, 0].astype(np.float64)) + b * np.cos(qx[t, :, 0])
            np.testing.assert_allclose(qy[t, :, 0], predicted, atol=1e-5)
            amplitudes.append(np.hypot(a, b))
            phases.append(np.arctan2(-b, a))
        xs.append(np.concatenate([sx, qx], axis=1))
    amplitudes, phases, xs = np.array(amplitudes), np.array(phases), np.concatenate(xs)
    # Ranges U[0.1, 5] and U[0, pi] (fitted, so 1e-4 slack); 100 tasks spread over them.
    assert amplitudes.min() > 0.1 - 1e-4 and amplitudes.max() < 5 + 1e-4
    assert phases.min() > -1e-4 and phases.max() < np.pi + 1e-4
    assert amplitudes.min() < 0.5 and amplitudes.max() > 4.5
    assert phases.min() < 0.3 and phases.max() > np.pi - 0.3
    assert xs.min() >= -5 and xs.max() <= 5 and xs.min() < -4.9 and xs.max() > 4.9


def test_sinusoid_is_a_pure_function_of_seed_and_index():
    first, again, other = (_batches(_sinusoid(seed=s), 3) for s in (5, 5, 6))
    skipped = _batches(_sinusoid(seed=5).skip(2), 1)
    for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(tf.nest.flatten(first[2]), tf.nest.flatten(skipped[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0][1], other[0][1])
    assert _sinusoid().cardinality().numpy() == tf.data.INFINITE_CARDINALITY
    assert len(list(_sinusoid(num_batches=2))) == 2


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(ways=0), "ways must be an integer >= 1, got 0"),
        (dict(shots=0), "shots must be"),
        (dict(queries=0), "queries must be"),
        (dict(meta_batch_size=0), "meta_batch_size must be"),
        (dict(num_batches=0), "num_batches must be"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(ways=13), r"ways = 13 .* 6 classes x 2 rotations = 12"),
        (dict(shots=3, queries=3), r"class 3 has 5 examples, fewer than shots \+ queries = 6"),
        (dict(rotations=(0, 45)), "rotations must be in"),
        (dict(rotations=(0, 0)), "distinct"),
        (dict(rotations=()), "non-empty"),
    ],
)
def test_few_shot_rejects_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        _few_shot(**overrides)


def test_few_shot_rejects_bad_arrays():
    images, labels = _stamped_images()
    kwargs = dict(ways=2, shots=1, queries=1, meta_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="differ in length: 30 != 29"):
        episodes.few_shot_episodes(images, labels[:-1], **kwargs)
    with pytest.raises(ValueError, match=r"images must be \[N, \.\.\.\] examples"):
        episodes.few_shot_episodes(images[:, 0, 0], labels, **kwargs)
    with pytest.raises(ValueError, match="rotations need images"):
        episodes.few_shot_episodes(images[:, 0], labels, **kwargs, rotations=(0, 90))
    with pytest.raises(ValueError, match="images must be numeric"):
        episodes.few_shot_episodes(images.astype(str), labels, **kwargs)
    with pytest.raises(ValueError, match="labels must be a 1-D integer array"):
        episodes.few_shot_episodes(images, labels.astype(float), **kwargs)
    with pytest.raises(ValueError, match="need square images"):
        episodes.few_shot_episodes(images[:, :2], labels, rotations=(0, 90), **kwargs)
    # Turning by 180 degrees keeps the shape, so non-square images are fine there.
    episodes.few_shot_episodes(images[:, :2], labels, rotations=(0, 180), **kwargs)


@pytest.mark.parametrize("name", ["shots", "queries", "meta_batch_size"])
def test_sinusoid_rejects_bad_counts(name):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got 0"):
        _sinusoid(**{name: 0})
