"""Tests for tf_imaml.tree: per-task reductions and flattening."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import tree


def _structure(seed=0, num_tasks=3):
    rng = np.random.default_rng(seed)
    return [
        tf.constant(rng.normal(size=(num_tasks, 2, 3))),
        tf.constant(rng.normal(size=(num_tasks, 4))),
    ]


def test_vdot_and_norm_are_per_task():
    a, b = _structure(0), _structure(1)
    got = tree.vdot(a, b).numpy()
    # Oracle: numpy dot of each task's concatenated slices; exact up to summation order.
    flat_a = np.concatenate([x.numpy().reshape(3, -1) for x in a], axis=1)
    flat_b = np.concatenate([x.numpy().reshape(3, -1) for x in b], axis=1)
    np.testing.assert_allclose(got, np.sum(flat_a * flat_b, axis=1), rtol=1e-14)
    np.testing.assert_allclose(tree.norm(a).numpy(), np.linalg.norm(flat_a, axis=1), rtol=1e-14)


def test_flatten_unflatten_round_trip(run):
    a = _structure()
    flat = run(lambda: tree.flatten_tasks(a))
    assert flat.shape == (3, 10)
    back = run(lambda: tree.unflatten_tasks(tree.flatten_tasks(a), a))
    for x, y in zip(a, back, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy())  # a pure reshuffle: exact


def test_scale_and_where_per_task():
    a = _structure()
    s = tf.constant([1.0, 0.0, -2.0], tf.float64)
    scaled = tree.scale(s, a)
    np.testing.assert_array_equal(scaled[1][2].numpy(), -2.0 * a[1][2].numpy())
    picked = tree.where_tasks(tf.constant([True, False, True]), a, tree.zeros_like(a))
    assert np.all(picked[0][1].numpy() == 0) and np.all(picked[0][0].numpy() == a[0][0].numpy())


def test_all_finite_flags_the_bad_task():
    a = _structure()
    bad = [tf.tensor_scatter_nd_update(a[0], [[1, 0, 2]], [np.nan]), a[1]]
    assert tree.all_finite(bad).numpy().tolist() == [True, False, True]


def test_mismatched_structures_raise():
    a = _structure()
    with pytest.raises(ValueError, match="shape"):
        tree.assert_same_structure(a, [a[0], a[0]], what="x and y")
    with pytest.raises(ValueError, match="do not match"):
        tree.assert_same_structure(a, [a[0]], what="x and y")
