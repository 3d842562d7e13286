"""Episode samplers: seeded `tf.data` pipelines of task-batched few-shot episodes.

Every element is `((support_x, support_y, query_x), query_y)` with a leading task axis `T`
(the meta-batch), the form a meta-learning `keras.Model.fit` consumes: the model adapts on
`(support_x, support_y)` and is scored on `query_x` against `query_y`.

Batch `i` is a pure function of `(seed, i)`: it is drawn from `np.random.default_rng([seed,
i])`, so the pipeline can run its map in parallel, be restarted or skipped into (`.skip(i)`)
and still give the same episodes.

Batches are drawn in Python (`tf.numpy_function`), so an iterator must not outlive the
interpreter: one still alive at exit (a module-level `it = iter(dataset)`) can hang the
exit while a prefetched batch waits for the GIL. Iterate inside a function, or `del` it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow as tf

_ROTATIONS = (0, 90, 180, 270)


class _ClassTable(NamedTuple):
    """The examples of each class, classes in ascending label order."""

    order: np.ndarray  # [N] example indices, grouped by class
    starts: np.ndarray  # [num_labels] offset of each class's first example in `order`
    counts: np.ndarray  # [num_labels] number of examples of each class


def _check_count(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_num_batches(num_batches) -> None:
    if num_batches is not None:
        _check_count("num_batches", num_batches)


def _batch_dataset(
    batch_fn: Callable[[np.ndarray], tuple],
    *,
    shapes: Sequence[tuple],
    dtypes: Sequence[tf.dtypes.DType],
    num_batches: int | None,
    first_batch: int = 0,
) -> tf.data.Dataset:
    """`batch_fn(i)` for `i = first_batch, first_batch + 1, ...` as a dataset of `((sx, sy, qx), qy)` with static shapes."""
    indices = _indices(num_batches, first_batch)

    def map_fn(index):
        arrays = tf.numpy_function(batch_fn, [index], list(dtypes))
        support_x, support_y, query_x, query_y = (
            tf.ensure_shape(a, s) for a, s in zip(arrays, shapes, strict=True)
        )
        return (support_x, support_y, query_x), query_y

    dataset = indices.map(map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _indices(num_batches: int | None, first_batch: int) -> tf.data.Dataset:
    """Batch indices `first_batch, first_batch + 1, ...` (`num_batches` of them, or endless)."""
    _check_count("first_batch", first_batch, minimum=0)
    if num_batches is None:
        return tf.data.Dataset.counter(start=first_batch)
    return tf.data.Dataset.range(first_batch, first_batch + num_batches)


def _class_table(labels: np.ndarray) -> tuple[np.ndarray, _ClassTable]:
    """Distinct labels (sorted) and where each class's examples are."""
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return classes, _ClassTable(np.argsort(inverse, kind="stable"), starts, counts)


def _check_counts_and_labels(labels, ways, shots, queries, meta_batch_size, seed):
    for name, value in [
        ("ways", ways),
        ("shots", shots),
        ("queries", queries),
        ("meta_batch_size", meta_batch_size),
    ]:
        _check_count(name, value)
    _check_count("seed", seed, minimum=0)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")


def _check_few_shot_inputs(images, labels, ways, shots, queries, meta_batch_size, seed, rotations):
    _check_counts_and_labels(labels, ways, shots, queries, meta_batch_size, seed)
    if images.ndim < 2:
        raise ValueError(
            f"images must be [N, ...] examples (feature vectors [N, D], images [N, H, W] or "
            f"[N, H, W, C], or any other shape), got shape {images.shape}"
        )
    if images.ndim not in (3, 4) and tuple(rotations) != (0,):
        raise ValueError(
            f"rotations need images [N, H, W] or [N, H, W, C], got shape {images.shape}; "
            "use rotations=(0,)"
        )
    if not (np.issubdtype(images.dtype, np.number) or images.dtype == np.bool_):
        raise ValueError(f"images must be numeric, got dtype {images.dtype}")
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
    if not rotations or len(set(rotations)) != len(rotations):
        raise ValueError(f"rotations must be distinct and non-empty, got {rotations}")
    for rotation in rotations:
        if rotation not in _ROTATIONS:
            raise ValueError(f"rotations must be in {_ROTATIONS}, got {rotation!r}")
    if any(r % 180 for r in rotations) and images.shape[1] != images.shape[2]:
        raise ValueError(
            f"rotations by 90 or 270 degrees need square images, got H, W = {images.shape[1:3]}"
        )


def _draw_without_replacement(rng: np.random.Generator, counts: np.ndarray, n: int):
    """`n` distinct positions in `[0, count)` per entry of `counts`, uniform, in random order.

    Random keys: each of the `count` positions gets a `U[0, 1)` key (positions past `count`
    get 2), and the positions of the `n` smallest keys, by increasing key, are a uniform
    ordered draw without replacement. Returns shape `counts.shape + (n,)`.
    """
    keys = rng.random(counts.shape + (int(counts.max()),))
    keys[np.arange(keys.shape[-1]) >= counts[..., np.newaxis]] = 2.0
    smallest = np.argpartition(keys, n - 1, axis=-1)[..., :n]
    order = np.argsort(np.take_along_axis(keys, smallest, axis=-1), axis=-1)
    return np.take_along_axis(smallest, order, axis=-1)


def _gather_rotated(images: np.ndarray, examples: np.ndarray, turns: np.ndarray, np_dtype):
    """`images[examples]` cast to `np_dtype`, each turned `turns` quarter turns over H, W."""
    x = images[examples].astype(np_dtype)
    for k in np.unique(turns[turns > 0]):
        x[turns == k] = np.rot90(x[turns == k], k, axes=(-3, -2))
    return x


def _episode_sampler(labels, *, ways, shots, queries, meta_batch_size, seed, rotations):
    """`sample(i)`: batch `i`'s support and query `(examples, quarter turns, labels)`.

    Each array is `[T, ways * shots]` (support) or `[T, ways * queries]` (query); see
    `few_shot_episodes` for the draw. Raises `ValueError` if there are fewer (class,
    rotation) pairs than `ways` or a class has fewer than `shots + queries` examples.
    """
    classes, table = _class_table(labels)
    num_pairs = len(classes) * len(rotations)
    if num_pairs < ways:
        raise ValueError(
            f"ways = {ways} needs as many classes, but there are {len(classes)} classes x "
            f"{len(rotations)} rotations = {num_pairs}"
        )
    per_class = shots + queries
    short = np.flatnonzero(table.counts < per_class)
    if short.size:
        first = short[0]
        raise ValueError(
            f"class {classes[first]} has {table.counts[first]} examples, fewer than "
            f"shots + queries = {per_class} ({short.size} class(es) too small)"
        )
    turns = np.array(rotations) // 90

    def sample(index):
        rng = np.random.default_rng([seed, int(index)])
        picked = np.stack(
            [rng.choice(num_pairs, ways, replace=False) for _ in range(meta_batch_size)]
        )
        base = picked // len(rotations)  # [T, ways] index into `classes`
        shape = (meta_batch_size, ways, per_class)
        draws = _draw_without_replacement(rng, table.counts[base], per_class)
        examples = table.order[table.starts[base][..., np.newaxis] + draws]
        turn = np.broadcast_to(turns[picked % len(rotations)][..., np.newaxis], shape)
        label = np.broadcast_to(np.arange(ways, dtype=np.int32)[:, np.newaxis], shape)
        rows = np.arange(meta_batch_size)[:, np.newaxis]
        parts = []
        for part in (slice(0, shots), slice(shots, per_class)):
            n = ways * (part.stop - part.start)
            perm = rng.permuted(np.tile(np.arange(n), (meta_batch_size, 1)), axis=1)
            parts.append(
                tuple(
                    a[:, :, part].reshape(meta_batch_size, n)[rows, perm]
                    for a in (examples, turn, label)
                )
            )
        return parts

    return sample


def few_shot_episodes(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch_size: int,
    seed: int,
    rotations: Sequence[int] = (0,),
    num_batches: int | None = None,
    first_batch: int = 0,
    dtype: tf.dtypes.DType = tf.float32,
) -> tf.data.Dataset:
    """N-way K-shot classification episodes from a labelled array of examples.

    Each (class, rotation) pair is a class of its own, the Omniglot augmentation of Santoro
    et al. (2016) and Finn et al. (2017): rotating by `r` degrees applies `np.rot90` `r / 90`
    times over the H, W axes. A task picks `ways` such classes in random order (episode label
    `j` is the `j`-th picked), and from each class `shots + queries` distinct examples without
    replacement: the first `shots` go to the support set, the others to the query set. Both
    sets are then shuffled, so labels are not sorted. Pixel values are cast, not rescaled.
    Two classes of a task may share an original class at different rotations, so one example
    can appear in a task twice, turned differently; within a (class, rotation) pair it cannot.

    Args:
      images: `[N, ...]` numeric array of examples: feature vectors `[N, D]`, images
        `[N, H, W, C]` or `[N, H, W]` (a channel axis is added), or any other shape.
      labels: `[N]` integer class labels; the classes are the distinct values.
      ways: Classes per task.
      shots: Support examples per class.
      queries: Query examples per class.
      meta_batch_size: Tasks per element (`T`).
      seed: Non-negative integer; batch `i` is drawn from `np.random.default_rng([seed, i])`.
      rotations: Distinct angles from {0, 90, 180, 270}; other than `(0,)` they need
        images of rank 3 or 4, and 90 and 270 need `H == W`.
        Default value: `(0,)` (no augmentation).
      num_batches: Number of elements, or `None` for an endless dataset.
        Default value: `None`.
      first_batch: Index of the first element: a run resumed after `n` meta-steps starts
        at `n` and sees the episodes an uninterrupted run would. Default value: `0`.
      dtype: Dtype of `support_x` and `query_x`.
        Default value: `tf.float32`.

    Returns:
      A `tf.data.Dataset` of `((support_x, support_y, query_x), query_y)`: `support_x`
      `[T, ways * shots, H, W, C]` (for images; `[T, ways * shots, ...]` in general), `support_y` `[T, ways * shots]` int32 in `[0, ways)`,
      `query_x` `[T, ways * queries, H, W, C]`, `query_y` `[T, ways * queries]` int32.

    Raises:
      ValueError: If a count is not a positive integer, the arrays have the wrong rank,
        dtype or lengths, a rotation is invalid, there are fewer (class, rotation) pairs
        than `ways`, or a class has fewer than `shots + queries` examples.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    rotations = tuple(rotations)
    _check_few_shot_inputs(images, labels, ways, shots, queries, meta_batch_size, seed, rotations)
    _check_num_batches(num_batches)
    sample = _episode_sampler(
        labels,
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch_size=meta_batch_size,
        seed=seed,
        rotations=rotations,
    )
    if images.ndim == 3:
        images = images[..., np.newaxis]
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype

    def batch_fn(index):
        (se, sk, sy), (qe, qk, qy) = sample(index)
        return (
            _gather_rotated(images, se, sk, np_dtype),
            sy,
            _gather_rotated(images, qe, qk, np_dtype),
            qy,
        )

    image_shape = images.shape[1:]
    return _batch_dataset(
        batch_fn,
        shapes=[
            (meta_batch_size, ways * shots, *image_shape),
            (meta_batch_size, ways * shots),
            (meta_batch_size, ways * queries, *image_shape),
            (meta_batch_size, ways * queries),
        ],
        dtypes=[dtype, tf.int32, dtype, tf.int32],
        num_batches=num_batches,
        first_batch=first_batch,
    )


def sinusoid_episodes(
    *,
    shots: int,
    queries: int,
    meta_batch_size: int,
    seed: int,
    num_batches: int | None = None,
    first_batch: int = 0,
    dtype: tf.dtypes.DType = tf.float32,
) -> tf.data.Dataset:
    """Sinusoid regression episodes of Finn et al. (2017).

    Task `t` is `y = A_t sin(x - phase_t)` with `A_t ~ U[0.1, 5]`, `phase_t ~ U[0, pi]`, and
    inputs `x ~ U[-5, 5]` (the distribution of `tf_imaml.testing.sinusoid_tasks`). Targets keep a
    trailing axis of size 1, matching a `Dense(1)` output under mean squared error.

    Args:
      shots: Support points per task.
      queries: Query points per task.
      meta_batch_size: Tasks per element (`T`).
      seed: Non-negative integer; batch `i` is drawn from `np.random.default_rng([seed, i])`.
      num_batches: Number of elements, or `None` for an endless dataset.
        Default value: `None`.
      first_batch: Index of the first element: a run resumed after `n` meta-steps starts
        at `n` and sees the episodes an uninterrupted run would. Default value: `0`.
      dtype: Dtype of every array.
        Default value: `tf.float32`.

    Returns:
      A `tf.data.Dataset` of `((support_x, support_y, query_x), query_y)`: `support_x` and
      `support_y` `[T, shots, 1]`, `query_x` and `query_y` `[T, queries, 1]`.

    Raises:
      ValueError: If a count is not a positive integer or `seed` is negative.
    """
    for name, value in [
        ("shots", shots),
        ("queries", queries),
        ("meta_batch_size", meta_batch_size),
    ]:
        _check_count(name, value)
    _check_count("seed", seed, minimum=0)
    _check_num_batches(num_batches)
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype

    def batch_fn(index):
        rng = np.random.default_rng([seed, int(index)])
        amplitude = rng.uniform(0.1, 5.0, size=(meta_batch_size, 1, 1))
        phase = rng.uniform(0.0, np.pi, size=(meta_batch_size, 1, 1))
        arrays = []
        for n in (shots, queries):
            x = rng.uniform(-5.0, 5.0, size=(meta_batch_size, n, 1))
            arrays += [x.astype(np_dtype), (amplitude * np.sin(x - phase)).astype(np_dtype)]
        return tuple(arrays)

    return _batch_dataset(
        batch_fn,
        shapes=[(meta_batch_size, n, 1) for n in (shots, shots, queries, queries)],
        dtypes=[dtype] * 4,
        num_batches=num_batches,
        first_batch=first_batch,
    )


def jpeg_few_shot_episodes(
    images,
    labels: np.ndarray,
    *,
    ways: int,
    shots: int,
    queries: int,
    meta_batch_size: int,
    seed: int,
    image_size: int | None = None,
    num_batches: int | None = None,
    first_batch: int = 0,
    dtype: tf.dtypes.DType = tf.float32,
) -> tf.data.Dataset:
    """N-way K-shot episodes of JPEG-encoded images, decoded inside the `tf.data` pipeline.

    The draw is that of `few_shot_episodes` (same seeds, same tasks for the same labels,
    without rotations). Only the sampled images are read: `images.get(indices)` returns
    their encoded bytes, and `tf.io.decode_jpeg` decodes them in parallel `map` calls. Pixel
    values are scaled to `[0, 1]`.

    Args:
      images: A source of encoded images with `len(images)` and `images.get(indices)`
        (a NumPy array of indices to an object array of bytes), e.g.
        `tf_imaml.mini_imagenet.JpegImages`.
      labels: `[N]` integer class labels.
      ways, shots, queries, meta_batch_size, seed, num_batches, first_batch, dtype: As in
        `few_shot_episodes`.
      image_size: Resize (bilinear, with antialiasing) to `image_size x image_size`, or
        `None` to keep the decoded size (all images must then have the same size).
        Default value: `None`.

    Returns:
      A `tf.data.Dataset` of `((support_x, support_y, query_x), query_y)` as in
      `few_shot_episodes`, with 3-channel images.

    Raises:
      ValueError: As `few_shot_episodes`, or if `images` and `labels` differ in length.
    """
    labels = np.asarray(labels)
    _check_counts_and_labels(labels, ways, shots, queries, meta_batch_size, seed)
    _check_num_batches(num_batches)
    if image_size is not None:
        _check_count("image_size", image_size)
    if len(images) != len(labels):
        raise ValueError(f"images and labels differ in length: {len(images)} != {len(labels)}")
    sample = _episode_sampler(
        labels,
        ways=ways,
        shots=shots,
        queries=queries,
        meta_batch_size=meta_batch_size,
        seed=seed,
        rotations=(0,),
    )
    num_support, num_query = ways * shots, ways * queries

    def bytes_fn(index):
        (se, _, sy), (qe, _, qy) = sample(index)
        encoded = images.get(np.concatenate([se.ravel(), qe.ravel()]))
        return encoded.astype(object), sy, qy

    def decode(encoded):
        image = tf.io.decode_jpeg(encoded, channels=3)
        if image_size is not None:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
        return tf.cast(image, dtype) / tf.cast(255.0, dtype)

    def map_fn(index):
        encoded, support_y, query_y = tf.numpy_function(
            bytes_fn, [index], [tf.string, tf.int32, tf.int32]
        )
        encoded = tf.ensure_shape(encoded, [meta_batch_size * (num_support + num_query)])
        x = tf.map_fn(decode, encoded, fn_output_signature=tf.TensorSpec(None, dtype))
        if image_size is not None:
            x = tf.ensure_shape(x, [None, image_size, image_size, 3])
        support_x = tf.reshape(
            x[: meta_batch_size * num_support],
            tf.concat([[meta_batch_size, num_support], tf.shape(x)[1:]], 0),
        )
        query_x = tf.reshape(
            x[meta_batch_size * num_support :],
            tf.concat([[meta_batch_size, num_query], tf.shape(x)[1:]], 0),
        )
        support_y = tf.ensure_shape(support_y, [meta_batch_size, num_support])
        query_y = tf.ensure_shape(query_y, [meta_batch_size, num_query])
        return (support_x, support_y, query_x), query_y

    dataset = _indices(num_batches, first_batch).map(
        map_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
