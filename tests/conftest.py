"""Shared pytest setup: CPU only, quiet TensorFlow, an eager/graph fixture, data fixtures, and
fixtures that run Python (a script as a user runs it, or a snippet) in a subprocess."""

import os
import pathlib
import subprocess
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The project's copy of mini-ImageNet beside the repository, for the tests on real data.
_SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mini_imagenet")
if os.path.isdir(_SHARED):
    os.environ.setdefault("TF_IMAML_MINI_IMAGENET", os.path.abspath(_SHARED))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a subprocess sees: this environment on the CPU only, with TensorFlow's C++ logs quiet.
SUBPROCESS_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
# scripts/train.py at a size that runs in seconds (add --logdir; later flags win).
TINY_TRAIN_FLAGS = (
    "--meta_steps=2",
    "--steps_per_epoch=1",
    "--meta_batch_size=2",
    "--val_tasks=2",
    "--test_tasks=4",
    "--image_size=14",
    "--inner_steps=2",
    "--queries=2",
    # Two tiny tasks often both meet negative curvature; with the default "drop" every step
    # of an epoch would be skipped and DivergenceGuard would stop the run.
    "--on_failure=first_order",
)


@pytest.fixture(params=["eager", "function"])
def run(request):
    """Calls a zero-argument function eagerly or inside `tf.function`, by parameter."""

    def call(fn):
        if request.param == "eager":
            return fn()
        return tf.function(fn)()

    call.mode = request.param
    return call


@pytest.fixture
def tiny_mini_imagenet(tmp_path):
    """A folder holding a tiny mini-ImageNet in the JPEG-bytes .npz form.

    3 classes per subset (train, val, test), 4 random 16x16 RGB images per class.
    """
    import numpy as np

    folder = tmp_path / "mini_imagenet"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wnids = np.array([f"n{i:08d}" for i in range(9)])
    for s, subset in enumerate(("train", "val", "test")):
        encoded, labels = [], []
        for c in range(3 * s, 3 * s + 3):
            for _ in range(4):
                image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                encoded.append(tf.io.encode_jpeg(image).numpy())
                labels.append(c)
        np.savez(
            folder / f"mini_imagenet_84x84_jpeg_{subset}.npz",
            jpeg_bytes=np.frombuffer(b"".join(encoded), np.uint8),
            offsets=np.concatenate([[0], np.cumsum([len(e) for e in encoded])]),
            labels=np.array(labels, np.int16),
            class_wnids=wnids,
        )
    return folder


@pytest.fixture(scope="session")
def small_omniglot(tmp_path_factory):
    """The shipped Omniglot file cut to its first 12 train, 6 val and 6 test characters.

    Same format, real drawings, same Vinyals split codes: for tests whose assertions do not
    depend on how many classes there are (loading and resizing all 1623 costs seconds).
    """
    import numpy as np

    from tf_imaml import datasets

    path = tmp_path_factory.mktemp("omniglot") / "omniglot_small.npz"
    with np.load(datasets.OMNIGLOT_PATH) as data:
        arrays = {key: data[key] for key in data.files}
    codes = arrays["class_vinyals_split"]
    keep = np.sort(
        np.concatenate([np.flatnonzero(codes == i)[:n] for i, n in enumerate((12, 6, 6))])
    )
    for key in arrays:
        if key.startswith("class_") or key == "images_packed":
            arrays[key] = arrays[key][keep]
    np.savez(path, **arrays)
    return path


@pytest.fixture
def run_python():
    """`run(*args, timeout=900, cwd=None)`: `python *args` in a subprocess (see SUBPROCESS_ENV).

    Returns the `subprocess.CompletedProcess`, with its output as text; a non-zero exit
    status is the caller's to check.
    """

    def run(*args, timeout: float = 900, cwd=None) -> subprocess.CompletedProcess:
        command = [sys.executable, *map(str, args)]
        output = dict(capture_output=True, text=True)
        return subprocess.run(
            command, env=SUBPROCESS_ENV, timeout=timeout, cwd=cwd, check=False, **output
        )

    return run


@pytest.fixture
def run_script(run_python):
    """`run(name, *flags, timeout=900)`: `scripts/<name>` run as a user runs it."""

    def run(name: str, *flags, timeout: float = 900) -> subprocess.CompletedProcess:
        return run_python(ROOT / "scripts" / name, *flags, timeout=timeout)

    return run


@pytest.fixture
def start_script():
    """`start(name, *flags)`: `scripts/<name>` started in the background, its output dropped.

    Returns the `subprocess.Popen`; the caller waits for it (or kills it).
    """

    def start(name: str, *flags) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / name), *map(str, flags)],
            env=SUBPROCESS_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    return start


@pytest.fixture
def tiny_train_flags() -> list:
    """scripts/train.py's flags for a seconds-long run (see TINY_TRAIN_FLAGS)."""
    return list(TINY_TRAIN_FLAGS)


@pytest.fixture
def summary_tags():
    """`tags(folder)`: the set of summary tags in a folder's TensorBoard event files."""

    def tags(folder: pathlib.Path) -> set:
        return {
            value.tag
            for path in pathlib.Path(folder).glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value
        }

    return tags
