"""mini-ImageNet loaders: both standard forms, on a generated fixture and on the real data."""

import csv

import numpy as np
import pytest
import tensorflow as tf

from tf_imaml import episodes
from tf_imaml import mini_imagenet

WNIDS = ["n02", "n01", "n03"]  # Deliberately unsorted: classes are numbered by sorted id.


def _fixture(tmp_path, per_class=4, size=12):
    """The same tiny JPEGs as a bytes .npz and as images/ + splits_ravi/train.csv."""
    rng = np.random.default_rng(0)
    encoded, labels, names = [], [], []
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            encoded.append(tf.io.encode_jpeg(image, quality=95).numpy())
            labels.append(c + 10)  # Global labels, as in the real files.
            names.append(f"{wnid}{i:08d}.jpg")
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
    class_wnids = np.array(["x"] * 10 + WNIDS)
    np.savez(
        tmp_path / "mini_imagenet_84x84_jpeg_train.npz",
        jpeg_bytes=np.frombuffer(b"".join(encoded), np.uint8),
        offsets=offsets,
        labels=np.array(labels, np.int16),
        filenames=np.array(names),
        class_wnids=class_wnids,
    )
    folder = tmp_path / "folder"
    (folder / "images").mkdir(parents=True)
    (folder / "splits_ravi").mkdir()
    for name, data in zip(names, encoded, strict=True):
        (folder / "images" / name).write_bytes(data)
    with open(folder / "splits_ravi" / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "label"])
        for name, label in zip(names, labels, strict=True):
            writer.writerow([name, WNIDS[label - 10]])
    return encoded, folder


def _one_episode(data, **kwargs):
    sampler = dict(ways=2, shots=1, queries=2, meta_batch_size=2, seed=3, num_batches=1)
    dataset = episodes.jpeg_few_shot_episodes(data.images, data.labels, **sampler, **kwargs)
    return next(iter(dataset))


def test_npz_and_folder_forms_give_the_same_episodes(tmp_path):
    encoded, folder = _fixture(tmp_path)
    from_npz = mini_imagenet.load_mini_imagenet("train", path=tmp_path)
    from_folder = mini_imagenet.load_mini_imagenet("train", path=folder)
    assert list(from_npz.class_names) == sorted(WNIDS) == list(from_folder.class_names)
    np.testing.assert_array_equal(from_npz.labels, from_folder.labels)
    # Classes by sorted WordNet id: n02 (first in the file) is class 1.
    np.testing.assert_array_equal(from_npz.labels[:4], [1, 1, 1, 1])
    assert from_npz.images.get([5])[0] == encoded[5] == from_folder.images.get([5])[0]
    (sx, sy, qx), qy = _one_episode(from_npz)
    (fx, fy, gx), gy = _one_episode(from_folder)
    assert sx.shape == (2, 2, 12, 12, 3) and qx.shape == (2, 4, 12, 12, 3)
    for a, b in ((sx, fx), (sy, fy), (qx, gx), (qy, gy)):
        np.testing.assert_array_equal(a, b)
    # Oracle: tf.io.decode_jpeg of the original bytes, scaled to [0, 1].
    decoded = np.stack([tf.io.decode_jpeg(e).numpy() / 255.0 for e in encoded])
    flat = sx.numpy().reshape(-1, 12, 12, 3)
    assert all(np.min(np.abs(decoded - x).max(axis=(1, 2, 3))) < 1e-6 for x in flat)


def test_resize_option(tmp_path):
    _fixture(tmp_path)
    data = mini_imagenet.load_mini_imagenet("train", path=tmp_path)
    (sx, _, qx), _ = _one_episode(data, image_size=8)
    assert sx.shape == (2, 2, 8, 8, 3) and qx.shape == (2, 4, 8, 8, 3)
    assert 0.0 <= float(tf.reduce_min(sx)) and float(tf.reduce_max(sx)) <= 1.0


def test_bad_paths_and_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        mini_imagenet.load_mini_imagenet("train", path=tmp_path)
    with pytest.raises(ValueError, match="subset"):
        mini_imagenet.load_mini_imagenet("training", path=tmp_path)
    _, folder = _fixture(tmp_path)
    next((folder / "images").iterdir()).unlink()
    with pytest.raises(ValueError, match="1 images of .* are missing"):
        mini_imagenet.load_mini_imagenet("train", path=folder)
    data = mini_imagenet.load_mini_imagenet("train", path=tmp_path)
    with pytest.raises(ValueError, match="differ in length"):
        episodes.jpeg_few_shot_episodes(
            data.images, data.labels[:-1], ways=2, shots=1, queries=1, meta_batch_size=1, seed=0
        )
    with pytest.raises(ValueError, match="fewer than shots"):
        episodes.jpeg_few_shot_episodes(
            data.images, data.labels, ways=2, shots=2, queries=3, meta_batch_size=1, seed=0
        )


@pytest.mark.skipif(mini_imagenet.default_path() is None, reason="no ../shared/data/mini_imagenet")
def test_real_mini_imagenet_splits():
    sizes = {}
    for subset in mini_imagenet.SUBSETS:
        data = mini_imagenet.load_mini_imagenet(subset)
        sizes[subset] = set(data.class_names)
        counts = np.bincount(data.labels)
        assert len(counts) == {"train": 64, "val": 16, "test": 20}[subset]
        assert counts.min() == counts.max() == (100 if len(data.labels) == 1600 else 600)
    assert not (
        sizes["train"] & sizes["val"]
        or sizes["train"] & sizes["test"]
        or sizes["val"] & sizes["test"]
    )
    (sx, _, qx), _ = _one_episode(mini_imagenet.load_mini_imagenet("test"))
    assert sx.shape == (2, 2, 84, 84, 3) and qx.shape == (2, 4, 84, 84, 3)
