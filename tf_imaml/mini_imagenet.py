"""mini-ImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle (2017), read from a path.

100 ImageNet classes, 600 84x84 RGB images each: 64 train, 16 val, 20 test classes. The
images fall under ImageNet's terms of access, so the project never ships them: the loader
reads a user's copy in either of two standard forms, kept as encoded JPEG bytes (about 200 MB
for all 60,000 images instead of 5 GB decoded); `episodes.jpeg_few_shot_episodes` decodes
only the sampled images, inside the `tf.data` pipeline.

- JPEG-bytes `.npz` files, `mini_imagenet_84x84_jpeg_{train,val,test}.npz` (`val100` is
  accepted for val): `jpeg_bytes` (concatenated files), `offsets` (`N + 1`), `labels`,
  `class_wnids`, `filenames`.
- A folder of images with the split CSVs of Ravi & Larochelle: `images/<filename>` and
  `{train,val,test}.csv` (`filename,label` rows, `label` the WordNet id) at the top or in
  `splits_ravi/`.

The default path is `$TF_IMAML_MINI_IMAGENET`; otherwise pass `path`.
"""

from __future__ import annotations

import csv
import os
import pathlib
from typing import NamedTuple

import numpy as np

SUBSETS = ("train", "val", "test")


class JpegImages:
    """Encoded images with random access: `get(indices)` returns their bytes.

    Built from concatenated bytes and offsets (image `i` is `data[offsets[i]:offsets[i+1]]`)
    or from a list of files, which are read when sampled.
    """

    def __init__(
        self,
        *,
        data: np.ndarray | None = None,
        offsets: np.ndarray | None = None,
        files: list | None = None,
    ):
        if (files is None) == (data is None or offsets is None):
            raise ValueError("give either data and offsets, or files")
        self._data, self._offsets = data, None if offsets is None else np.asarray(offsets)
        self._files = None if files is None else [str(f) for f in files]
        if self._offsets is not None:
            if (
                self._offsets.ndim != 1
                or len(self._offsets) < 1
                or np.any(np.diff(self._offsets) <= 0)
                or self._offsets[-1] > len(data)
            ):
                raise ValueError("offsets must increase strictly and end within data")

    def __len__(self) -> int:
        return len(self._files) if self._files is not None else len(self._offsets) - 1

    def get(self, indices) -> np.ndarray:
        """The encoded bytes of `indices`, as an object array of `bytes`."""
        out = np.empty(len(indices), dtype=object)
        for j, i in enumerate(np.asarray(indices).ravel()):
            if self._files is not None:
                out[j] = pathlib.Path(self._files[i]).read_bytes()
            else:
                out[j] = self._data[self._offsets[i] : self._offsets[i + 1]].tobytes()
        return out


class JpegFewShotData(NamedTuple):
    """Encoded images of some classes, ready for `episodes.jpeg_few_shot_episodes`."""

    images: JpegImages
    labels: np.ndarray  # [N] int32: class index into `class_names`
    class_names: np.ndarray  # [num_classes] str (WordNet ids)


def default_path() -> pathlib.Path | None:
    """`$TF_IMAML_MINI_IMAGENET` if it names a folder, else `None`."""
    candidate = os.environ.get("TF_IMAML_MINI_IMAGENET")
    if candidate and pathlib.Path(candidate).is_dir():
        return pathlib.Path(candidate).resolve()
    return None


def load_mini_imagenet(subset: str, *, path=None) -> JpegFewShotData:
    """One subset of mini-ImageNet, as encoded JPEGs with labels `0..num_classes-1`.

    Args:
      subset: `"train"`, `"val"` or `"test"`.
      path: A folder in one of the two forms of the module docstring.
        Default value: `None` (`default_path()`).

    Returns:
      A `JpegFewShotData`; classes are numbered in sorted WordNet-id order.

    Raises:
      ValueError: For an unknown subset, or no data found in a known form (the message says
        what was looked for).
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
    if path is None:
        path = default_path()
        if path is None:
            raise ValueError(
                "no mini-ImageNet found: pass path (a script's --data_dir) or set "
                "$TF_IMAML_MINI_IMAGENET to the folder"
            )
    path = pathlib.Path(path)
    names = [f"mini_imagenet_84x84_jpeg_{subset}.npz"]
    if subset == "val":
        names.append("mini_imagenet_84x84_jpeg_val100.npz")
    for name in names:
        if (path / name).is_file():
            return _from_npz(path / name)
    for csv_path in (path / f"{subset}.csv", path / "splits_ravi" / f"{subset}.csv"):
        if csv_path.is_file() and (path / "images").is_dir():
            return _from_folder(csv_path, path / "images")
    raise ValueError(
        f"{path} has neither {' nor '.join(names)} nor images/ with {subset}.csv "
        "(at the top or in splits_ravi/)"
    )


def _from_npz(path: pathlib.Path) -> JpegFewShotData:
    with np.load(path) as data:
        jpeg, offsets = data["jpeg_bytes"], data["offsets"]
        global_labels, wnids = data["labels"], data["class_wnids"]
    used = np.unique(global_labels)
    names = wnids[used]
    order = np.argsort(names)
    remap = np.empty(used.max() + 1, np.int32)
    remap[used[order]] = np.arange(len(used), dtype=np.int32)
    return JpegFewShotData(
        JpegImages(data=jpeg, offsets=offsets), remap[global_labels], names[order]
    )


def _from_folder(csv_path: pathlib.Path, images: pathlib.Path) -> JpegFewShotData:
    with open(csv_path, newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    if not rows or any(len(row) != 2 for row in rows):
        raise ValueError(f"{csv_path}: expected 'filename,label' rows")
    files = [images / name for name, _ in rows]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{len(missing)} images of {csv_path} are missing, e.g. {missing[0]}")
    names, labels = np.unique([label for _, label in rows], return_inverse=True)
    return JpegFewShotData(JpegImages(files=files), labels.astype(np.int32), names)
