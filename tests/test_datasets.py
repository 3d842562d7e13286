"""Omniglot loading and splits (the copy shipped in tf_imaml/data)."""

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import datasets


@pytest.mark.parametrize(
    "split, sizes",
    [
        ("vinyals", {"train": 1028, "val": 172, "test": 423}),
        ("lake", {"train": 813, "val": 151, "test": 659}),
    ],
)
def test_splits_are_disjoint_and_complete(split, sizes):
    subsets = datasets.omniglot_class_split(split=split)
    assert {k: len(v) for k, v in subsets.items()} == sizes
    every = np.concatenate(list(subsets.values()))
    assert len(np.unique(every)) == len(every) == 1623  # disjoint, and all characters used


def test_lake_split_keeps_alphabets_apart():
    with np.load(datasets.OMNIGLOT_PATH) as data:
        alphabet = data["class_alphabet"]
    subsets = datasets.omniglot_class_split(split="lake")
    sets = {k: set(alphabet[v]) for k, v in subsets.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"]
    assert (len(sets["train"]), len(sets["val"]), len(sets["test"])) == (25, 5, 20)


def test_load_val_subset():
    data = datasets.load_omniglot("val")
    assert data.images.shape == (172 * 20, 28, 28, 1) and data.images.dtype == np.float32
    assert data.labels.tolist() == np.repeat(np.arange(172), 20).tolist()
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    # Ink covers a small part of each character (a sanity check of polarity: ink = 1).
    assert 0.02 < data.images.mean() < 0.3
    assert all("/character" in name for name in data.class_names)


def test_resize_is_lanczos_of_the_original():
    full = datasets.load_omniglot("val", image_size=105)
    small = datasets.load_omniglot("val", image_size=28)
    assert full.images.shape[1:] == (105, 105, 1)
    assert set(np.unique(full.images)) <= {0.0, 1.0}  # lossless bit-packed masks
    want = tf.clip_by_value(
        tf.image.resize(full.images[:50], (28, 28), method="lanczos3", antialias=True), 0, 1
    )
    # Oracle: TensorFlow's own Lanczos resize of the original images, same call.
    np.testing.assert_allclose(small.images[:50], want.numpy(), atol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="subset must be one of"):
        datasets.load_omniglot("validation")
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.omniglot_class_split(split="random")
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        datasets.load_omniglot("val", image_size=0)
