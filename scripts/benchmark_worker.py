"""One configuration in a fresh process: its meta-steps timed, its peak memory read.

The parent saves the episodes once (`make_episodes`) and runs each configuration by
`run_in_subprocess`, which starts scripts/benchmark.py with `--worker=<config JSON>` (and
the configuration's TF_ENABLE_ONEDNN_OPTS), watches its resident memory, kills it above
the limit, and returns what the worker's `run_worker` printed. A fresh process per
configuration makes its peak memory (VmHWM of `/proc/self/status`) its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import benchmark_config
import benchmark_precision
import numpy as np

SCRIPT = pathlib.Path(__file__).with_name("benchmark.py")


def _vm_hwm_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_worker(config: benchmark_config.Config) -> dict:
    """Builds the configuration, times its meta-steps; returns the measurements.

    Under a dtype policy (`config.policy`, set before anything is built), it then reads the
    meta-gradient of the first episode from the seed-0 weights
    (`benchmark_precision.read_meta_gradient`).
    """
    import benchmark_phases  # imports TensorFlow: in the worker only
    import keras

    if config.policy:
        keras.mixed_precision.set_global_policy(config.policy)
    batches = load_episodes(config)
    meta = benchmark_config.build(config)
    start = time.perf_counter()
    meta.train_on_batch(*batches[0])
    first_step_s = time.perf_counter() - start
    for i in range(1, config.warmup):
        meta.train_on_batch(*batches[i % len(batches)])
    times, cpu_times = [], []
    for i in range(config.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = meta.train_on_batch(*batches[(config.warmup + i) % len(batches)], return_dict=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    result = {
        "step_s": float(np.median(times)),
        "step_times_s": [round(x, 4) for x in times],
        # CPU seconds of this process (all its threads): the work of a step, which other
        # jobs on the same cores inflate far less than the wall-clock time.
        "step_cpu_s": float(np.median(cpu_times)),
        "first_step_s": first_step_s,
        "failed_fraction": float(logs.get("failed_fraction", 0.0)),
        "task_batching_used": meta.resolved_task_batching,
    }
    if config.split and config.algorithm.startswith("imaml") and config.algorithm != "imaml_hf":
        result.update(benchmark_phases.phase_times(meta, batches[0], repeats=config.repeats))
    result["peak_memory_mb"] = _vm_hwm_mb()  # before a second model is built
    result["onednn_enabled"] = _onednn_enabled()
    if config.policy:
        result.update(benchmark_precision.read_meta_gradient(config, batches[0]))
    return result


def _onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow uses oneDNN kernels (None if it cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # no public API says this
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def load_episodes(config: benchmark_config.Config) -> list:
    """The saved episodes as `((support_x, support_y, query_x), query_y)` tensors.

    Each keeps the first `config.meta_batch_size` tasks of a saved meta-batch.
    """
    import tensorflow as tf

    data = np.load(config.episodes)
    t = config.meta_batch_size
    return [
        (
            (
                tf.constant(data["support_x"][i, :t]),
                tf.constant(data["support_y"][i, :t]),
                tf.constant(data["query_x"][i, :t]),
            ),
            tf.constant(data["query_y"][i, :t]),
        )
        for i in range(data["support_x"].shape[0])
    ]


def make_episodes(path: pathlib.Path, config: benchmark_config.Config, num_batches: int) -> None:
    """Real training episodes, saved once and shared by every configuration."""
    import tf_imaml

    common = dict(
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        meta_batch_size=config.meta_batch_size,
        seed=0,
        num_batches=num_batches,
    )
    if benchmark_config.is_mini_imagenet(config):
        data = tf_imaml.mini_imagenet.load_mini_imagenet("train", path=config.data_dir)
        size = None if config.image_size == 84 else config.image_size
        dataset = tf_imaml.episodes.jpeg_few_shot_episodes(
            data.images, data.labels, image_size=size, **common
        )
    else:
        data = tf_imaml.datasets.load_omniglot("train", image_size=config.image_size)
        dataset = tf_imaml.episodes.few_shot_episodes(
            data.images, data.labels, rotations=(0, 90, 180, 270), **common
        )
    arrays = {"support_x": [], "support_y": [], "query_x": [], "query_y": []}
    for (sx, sy, qx), qy in dataset:
        for key, value in zip(arrays, (sx, sy, qx, qy), strict=True):
            arrays[key].append(value.numpy())
    np.savez(path, **{key: np.stack(value) for key, value in arrays.items()})


def run_in_subprocess(config: benchmark_config.Config, memory_limit_mb: float) -> dict:
    """Runs one configuration in a fresh Python; kills it above the memory limit."""
    command = [sys.executable, str(SCRIPT), "--worker", json.dumps(dataclasses.asdict(config))]
    env = dict(os.environ)
    if config.onednn:
        env["TF_ENABLE_ONEDNN_OPTS"] = config.onednn  # read when TensorFlow is imported
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak_rss = 0.0
    while process.poll() is None:
        try:
            status = pathlib.Path(f"/proc/{process.pid}/status").read_text()
            rss = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:"))
            peak_rss = max(peak_rss, rss / 1024)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        if peak_rss > memory_limit_mb:
            process.kill()
            process.wait()
            return {"error": f"stopped above the memory limit ({memory_limit_mb / 1024:.3g} GB)"}
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = stderr.strip().splitlines()[-3:]
    return {"error": f"exit code {process.returncode}: " + " | ".join(tail)}
