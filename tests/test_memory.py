"""Peak memory: MAML's grows with the number of inner steps, ImplicitMAML's does not.

Each configuration runs in a fresh process and reports the growth of its peak resident set
(VmHWM in /proc/self/status) over two meta-steps; the figures for the paper's setting belong
to scripts/benchmark.py (issue #6), this test only checks the direction.
"""

import pathlib
import textwrap

import pytest

# Slow: four subprocesses, each tracing and running meta-steps of a conv net.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import sys
    import keras
    import numpy as np
    import tf_imaml

    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0

    algorithm, steps = sys.argv[1], int(sys.argv[2])
    keras.utils.set_random_seed(0)
    learner = tf_imaml.models.conv4_classifier(5, filters=32)
    if algorithm == "maml":
        meta = tf_imaml.MAML(learner, inner_steps=steps, inner_learning_rate=0.1)
    else:
        meta = tf_imaml.ImplicitMAML(learner, inner_steps=steps, cg_steps=3)
    meta.compile(optimizer="adam",
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    sx = rng.normal(size=(2, 10, 28, 28, 1)).astype("float32")
    sy = np.tile(np.arange(5, dtype="int32"), (2, 2))
    meta.train_on_batch((sx, sy, sx), sy)  # trace and warm up
    before = peak_mb()
    meta.train_on_batch((sx, sy, sx), sy)
    meta.train_on_batch((sx, sy, sx), sy)
    print("GROWTH", peak_mb() - before, "PEAK", peak_mb())
    """
)


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_maml_memory_grows_with_inner_steps_and_imaml_does_not(run_python):
    def growth(algorithm, steps):
        proc = run_python("-c", SCRIPT, algorithm, steps, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("GROWTH"))
        return float(line.split()[1]), float(line.split()[3])

    maml_small, maml_small_peak = growth("maml", 2)
    maml_large, maml_large_peak = growth("maml", 42)
    imaml_small, imaml_small_peak = growth("imaml", 2)
    imaml_large, imaml_large_peak = growth("imaml", 42)
    maml_extra = maml_large_peak - maml_small_peak
    imaml_extra = imaml_large_peak - imaml_small_peak
    # Backprop through 40 more unrolled steps of 2 tasks stores their activations: tens of
    # MB at least. The implicit gradient stores none of them: within allocator noise.
    assert maml_extra > 40.0, (maml_small_peak, maml_large_peak)
    assert imaml_extra < 0.25 * maml_extra, (imaml_small_peak, imaml_large_peak, maml_extra)
