"""Few-shot benchmark data: Omniglot (shipped with the package).

Omniglot (Lake, Salakhutdinov & Tenenbaum 2015; MIT license, Copyright 2015 Brenden Lake):
1623 characters from 50 alphabets, 20 drawings each, stored losslessly at 105x105 as bit-packed
ink masks in `tf_imaml/data/omniglot_105x105_bitpacked.npz` (4.3 MB). Splits:

- `"vinyals"` (default): the character-level split of Vinyals et al. (2016), 1028 train /
  172 validation / 423 test characters, as stored in the file.
- `"lake"`: the alphabet-level background (964 characters, 30 alphabets) / evaluation (659,
  20 alphabets) split of Lake et al.; the evaluation set is `"test"`, and the background
  alphabets' last 5 (in the file's alphabetical order) are held out as `"val"`.

Images are resized with a Lanczos filter (the usual 28x28 by default) and scaled to [0, 1]
with ink = 1. Rotations by multiples of 90 degrees as extra classes are applied by the episode
sampler (`tf_imaml.episodes.few_shot_episodes(rotations=...)`).
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import numpy as np
import tensorflow as tf

OMNIGLOT_PATH = pathlib.Path(__file__).resolve().parent / "data" / "omniglot_105x105_bitpacked.npz"
SPLITS = ("vinyals", "lake")
SUBSETS = ("train", "val", "test")
_LAKE_VAL_ALPHABETS = 5


class FewShotData(NamedTuple):
    """Images of some classes, ready for `episodes.few_shot_episodes`."""

    images: np.ndarray  # [N, H, W, C] float32
    labels: np.ndarray  # [N] int32: class index into `class_names`
    class_names: np.ndarray  # [num_classes] str


def omniglot_class_split(*, split: str = "vinyals", path=None) -> dict[str, np.ndarray]:
    """The characters (indices into the file's 1623 classes) of each subset of a split.

    Returns:
      `{"train": ..., "val": ..., "test": ...}`, disjoint sorted int arrays.

    Raises:
      ValueError: For an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with np.load(path or OMNIGLOT_PATH) as data:
        if split == "vinyals":
            codes = data["class_vinyals_split"]
            return {name: np.flatnonzero(codes == i) for i, name in enumerate(SUBSETS)}
        lake, alphabet = data["class_lake_split"], data["class_alphabet"]
    background_alphabets = np.unique(alphabet[lake == 0])
    val_alphabets = background_alphabets[-_LAKE_VAL_ALPHABETS:]
    is_val = np.isin(alphabet, val_alphabets) & (lake == 0)
    return {
        "train": np.flatnonzero((lake == 0) & ~is_val),
        "val": np.flatnonzero(is_val),
        "test": np.flatnonzero(lake == 1),
    }


def load_omniglot(
    subset: str, *, split: str = "vinyals", image_size: int = 28, path=None
) -> FewShotData:
    """Loads one subset of Omniglot, resized, as float32 images in [0, 1] (ink = 1).

    Args:
      subset: `"train"`, `"val"` or `"test"`.
      split: `"vinyals"` or `"lake"`. Default value: `"vinyals"`.
      image_size: Side of the square output images (Lanczos resize; 105 keeps the
        original). Default value: `28`.
      path: The `.npz` file. Default value: `None` (the copy shipped in the package).

    Returns:
      A `FewShotData` with `labels` indexing `class_names` (`"Alphabet/characterNN"`).

    Raises:
      ValueError: For an unknown subset or split, or `image_size < 1`.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    classes = omniglot_class_split(split=split, path=path)[subset]
    with np.load(path or OMNIGLOT_PATH) as data:
        packed = data["images_packed"][classes]
        names = data["class_names"][classes]
        width = int(data["image_width"])
    num_classes, drawers = packed.shape[:2]
    ink = np.unpackbits(packed, axis=-1, count=width).astype(np.float32)
    images = ink.reshape(-1, width, width, 1)
    if image_size != width:
        images = _resize(images, image_size)
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), drawers)
    return FewShotData(images, labels, names)


def _resize(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
    out = [
        tf.clip_by_value(
            tf.image.resize(images[i : i + chunk], (size, size), method="lanczos3", antialias=True),
            0.0,
            1.0,
        ).numpy()
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(out, axis=0)
