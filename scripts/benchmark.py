"""Time and memory of a meta-step: iMAML against MAML, side by side, in one run.

Every configuration runs in a fresh process (so that its peak memory, VmHWM from
`/proc/self/status`, is its own) on the same real episodes (Omniglot by default, with the
paper's Omniglot net; `--dataset=mini_imagenet` times the 32-filter max-pooling net on 84x84
RGB with the mini-ImageNet inner settings: 5-way, steps of 0.01, lam 0.5); the parent kills a
configuration whose memory passes `--memory_limit_gb` and reports where MAML stops. Each
time is the median of `--repeats` meta-steps after `--warmup` steps. The run also measures
the machine's dense throughput (a matmul and a convolution) at its start and end, so that
the meta-steps read as a fraction of what the machine can do.

`--precision=float32,mixed_bfloat16,...` times iMAML-GD at the reference K under Keras dtype
policies with oneDNN on (each policy in its own process, since both are global), and reads
each policy's meta-gradient off `SGD(1.0)` steps from the same seed-0 weights on the same
episode, for the whole meta-batch and task by task; the table gives its relative L2 error
against float32's, next to float32 with oneDNN off (the round-off reference). The report
names the processor and whether it has AVX512_BF16 and AMX.

Writes `<output_dir>/results.json`, `<output_dir>/benchmark.md` (the tables) and
`<output_dir>/benchmark.png` (time and peak memory against inner steps: Figure 2b of
Rajeswaran et al. 2019, for several inner optimizers).

Usage:
  python scripts/benchmark.py --output_dir=runs/benchmark
  python scripts/benchmark.py --tiny --output_dir=/tmp/bench   # a smoke run in a minute
  python scripts/benchmark.py --dataset=mini_imagenet --meta_batch_size=4 --reference_inner_steps=5 \
      --algorithms= --task_batching= --batch_sizes= --cg_steps= --onednn=imaml_gd,fomaml,maml
  python scripts/benchmark.py --algorithms= --task_batching= --batch_sizes= --cg_steps= \
      --onednn= --precision=float32,mixed_bfloat16,mixed_float16   # dtype policies
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

ALGORITHMS = ("imaml_gd", "imaml_momentum", "imaml_adam", "imaml_hf", "maml", "fomaml")
TASK_BATCHING = ("per_task", "support", "batched")
POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
# CPU flags of the low-precision instructions, reported with the machine.
CPU_FLAGS = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/benchmark", "Where results go.")
_DATASET = flags.DEFINE_enum(
    "dataset",
    "omniglot",
    ["omniglot", "mini_imagenet"],
    "Episodes and net: Omniglot's 64-filter strided net on 28x28, or mini-ImageNet's 32-filter "
    "max-pooling net on 84x84 RGB (then --image_size and --filters default to 84 and 32).",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "mini-ImageNet folder (default: $TF_IMAML_MINI_IMAGENET or ../shared)."
)
_ALGORITHMS = flags.DEFINE_list("algorithms", list(ALGORITHMS), "Algorithms against K.")
_INNER_STEPS = flags.DEFINE_list("inner_steps", ["5", "16", "50", "100"], "Inner steps K.")
_META_BATCH = flags.DEFINE_integer("meta_batch_size", 32, "Tasks per meta-step.", lower_bound=1)
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Meta-batch scaling.")
_CG_STEPS = flags.DEFINE_list("cg_steps", ["1", "5", "10", "20"], "CG-steps scaling.")
_BATCHING = flags.DEFINE_list("task_batching", list(TASK_BATCHING), "Batching modes compared.")
_ONEDNN = flags.DEFINE_list(
    "onednn",
    ["imaml_gd"],
    "Algorithms timed at the reference K with TensorFlow's oneDNN kernels off and on "
    "(TF_ENABLE_ONEDNN_OPTS=0 and 1; TensorFlow turns them on only on some Intel CPUs).",
)
_PRECISION = flags.DEFINE_list(
    "precision",
    [],
    f"Keras dtype policies ({', '.join(POLICIES)}; float32 among them) under which iMAML-GD "
    "is timed at the reference K with oneDNN on, side by side, each with the relative L2 "
    "error of its meta-gradient (same initial weights, same episode) against float32's. "
    "float32 with oneDNN off is added as a round-off reference: its sums run in another "
    "order, so its error is what float32 rounding alone does to the meta-gradient.",
)
_REFERENCE_K = flags.DEFINE_integer("reference_inner_steps", 16, "K of the scaling runs.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed meta-steps per configuration.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed meta-steps first.", lower_bound=1)
_MAX_HF_STEPS = flags.DEFINE_integer(
    "max_hf_inner_steps", 16, "iMAML-HF only up to this K (each step is a Newton-CG solve)."
)
_WAYS = flags.DEFINE_integer("ways", 5, "Classes per task.", lower_bound=2)
_SHOTS = flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
_QUERIES = flags.DEFINE_integer("queries", 15, "Query examples per class.", lower_bound=1)
_FILTERS = flags.DEFINE_integer("filters", 64, "Channels of the conv net.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 28, "Image side.", lower_bound=16)
_MEMORY_LIMIT = flags.DEFINE_float("memory_limit_gb", 12.0, "Kill a configuration above this.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "A small, fast run for smoke tests (defaults of the other flags shrink)."
)
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one configuration (JSON).")


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration."""

    algorithm: str
    inner_steps: int
    meta_batch_size: int
    cg_steps: int = 5
    task_batching: str = "auto"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    filters: int = 64
    image_size: int = 28
    repeats: int = 5
    warmup: int = 2
    episodes: str = ""
    split: bool = False  # Also time the inner loop, query gradient and solve apart.
    onednn: str = ""  # TF_ENABLE_ONEDNN_OPTS for the worker: "0", "1" or "" (inherited).
    dataset: str = "omniglot"
    data_dir: str | None = None  # mini-ImageNet only
    policy: str = ""  # Keras dtype policy of the worker; set, it also reads the meta-gradient.


def _mini_imagenet(config: Config) -> bool:
    return config.dataset == "mini_imagenet"


# ------------------------------------------------------------------ worker (one process)


def _vm_hwm_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _build(config: Config, *, optimizer=None):
    import keras

    import tf_imaml

    keras.utils.set_random_seed(0)
    mini = _mini_imagenet(config)
    learner = tf_imaml.models.conv4_classifier(
        config.ways,
        input_shape=(config.image_size, config.image_size, 3 if mini else 1),
        filters=config.filters,
        pooling="max" if mini else None,
    )
    # The inner settings of scripts/train.py's runs (study 7's on mini-ImageNet).
    inner_lr = 0.01 if mini else 0.1 if config.algorithm.startswith("imaml") else 0.4
    common = dict(
        inner_steps=config.inner_steps,
        inner_learning_rate=inner_lr,
        task_batching=config.task_batching,
    )
    if config.algorithm.startswith("imaml"):
        inner = config.algorithm.split("_", 1)[1]
        meta = tf_imaml.ImplicitMAML(
            learner,
            lam=0.5 if mini else 2.0,
            cg_steps=config.cg_steps,
            inner_optimizer={"gd": "gd", "hf": "hessian_free"}.get(inner, inner),
            **common,
        )
    else:
        meta = tf_imaml.MAML(learner, first_order=config.algorithm == "fomaml", **common)
    meta.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return meta


def _meta_gradient_file(config: Config) -> pathlib.Path:
    """Where the worker of a dtype policy leaves its meta-gradients, next to the episodes."""
    name = f"meta_grad_{config.policy}_onednn{config.onednn}.npz"
    return pathlib.Path(config.episodes).parent / name


def _meta_gradient(config: Config, episode) -> dict:
    """The meta-gradient of one step from the seed-0 weights, read off `SGD(1.0)` steps.

    With the public API, as `tests/test_keras_conformance.py` reads it: `theta - theta'`
    after `train_on_batch` on a fresh model built under the process's dtype policy, with
    `theta` restored before each step. Read for the whole meta-batch (the meta-step's
    gradient: the mean over the tasks whose solve did not fail) and for each task alone
    (its gradient and whether its solve failed), so that policies can be compared on the
    tasks solved under both. The single tasks go through a second model (given the same
    `theta`): a model traced for one meta-batch size fails on another (in
    `linear_solve.solve_cg_tf`, whose flattened size is then unknown). The difference is
    taken in float64: its only error is the rounding of the float32 `theta'`, at most
    `2**-24 * |theta'|` per weight, which `readoff_bound` states relative to the meta-step
    gradient's norm. Saves the vectors to `_meta_gradient_file(config)`.
    """
    import keras

    meta = _build(config, optimizer=keras.optimizers.SGD(learning_rate=1.0))
    initial = [v.numpy() for v in meta.learner.trainable_variables]
    theta = np.concatenate([np.ravel(w) for w in initial]).astype(np.float64)

    def read_step(model, inputs, labels):
        variables = model.learner.trainable_variables
        for variable, value in zip(variables, initial, strict=True):
            variable.assign(value)
        logs = model.train_on_batch(inputs, labels, return_dict=True)
        after = np.concatenate([np.ravel(v.numpy()) for v in variables]).astype(np.float64)
        return theta - after, after, float(logs.get("failed_fraction", 0.0))

    (support_x, support_y, query_x), query_y = episode
    grad, after, failed_fraction = read_step(meta, (support_x, support_y, query_x), query_y)
    one_task_meta = _build(config, optimizer=keras.optimizers.SGD(learning_rate=1.0))
    task_grads, task_failed = [], []
    for t in range(int(query_y.shape[0])):
        one = slice(t, t + 1)
        g, _, failed = read_step(
            one_task_meta, (support_x[one], support_y[one], query_x[one]), query_y[one]
        )
        task_grads.append(g)
        task_failed.append(failed > 0)
    task_grads, task_failed = np.stack(task_grads), np.array(task_failed)
    np.savez(
        _meta_gradient_file(config), meta_grad=grad, task_grads=task_grads, task_failed=task_failed
    )
    norm = float(np.linalg.norm(grad))
    # The meta-step's gradient rebuilt from the tasks alone: the mean over the solved ones.
    rebuilt = task_grads[~task_failed].mean(axis=0) if (~task_failed).any() else 0.0 * grad
    return {
        "compute_dtype": meta.learner.dtype_policy.compute_dtype,
        "variable_dtype": str(meta.learner.trainable_variables[0].dtype),
        "initial_weights_sha1": hashlib.sha1(theta.tobytes()).hexdigest(),
        "meta_grad_norm": norm,
        # None when every task's solve failed (the step was skipped: no gradient to read).
        "readoff_bound": float(2.0**-24 * np.linalg.norm(after) / norm) if norm else None,
        "meta_grad_failed_fraction": failed_fraction,
        "failed_tasks": [int(t) for t in np.flatnonzero(task_failed)],
        "rebuilt_from_tasks_error": (
            float(np.linalg.norm(rebuilt - grad) / norm) if norm else None
        ),
    }


def _split_times(meta, episode, config: Config) -> dict:
    """Inner loop, query gradient and linear solve of iMAML, each its own `tf.function`."""
    import tensorflow as tf

    from tf_imaml import implicit
    from tf_imaml import linear_solve
    from tf_imaml import meta_model
    from tf_imaml import tree

    (support_x, support_y, query_x), query_y = episode

    def over_tasks(fn, elems, spec):
        """`fn` on the whole meta-batch, or task by task like the learner's own path."""
        if meta._batch_support:
            return fn(*elems)

        def one(e):
            return tf.nest.map_structure(
                lambda t: t[0], fn(*tf.nest.map_structure(lambda x: x[tf.newaxis], e))
            )

        return tf.map_fn(one, elems, fn_output_signature=spec)

    grad_spec = [tf.TensorSpec(v.shape, v.dtype) for v in meta.learner.trainable_variables]

    def inner_fn(sx, sy):
        theta = tree.broadcast_to_tasks(meta._theta(), tf.shape(sx)[0])
        return meta._inner_solve(theta, meta._support_loss_fn(sx, sy, training=True)).adapted_params

    def query_fn(phi, qx, qy):
        def loss_fn(params):
            pred = meta._apply(params, qx, batched=meta._batch_query, training=True)
            return meta._per_task_loss(qy, pred), pred

        return meta_model.query_value_and_grad(loss_fn, phi)[2]

    def solve_fn(phi, v, sx, sy):
        return implicit.implicit_meta_gradient(
            meta._support_loss_fn(sx, sy, training=True),
            phi,
            v,
            lam=meta.lam,
            linear_solver=linear_solve.LINEAR_SOLVERS[meta.linear_solver],
            max_iter=meta.cg_steps,
            tol=meta.cg_tol,
            hvp_mode=meta.hvp_mode,
        ).meta_grads

    inner = tf.function(lambda sx, sy: over_tasks(inner_fn, (sx, sy), grad_spec))
    query = tf.function(lambda phi, qx, qy: over_tasks(query_fn, (phi, qx, qy), grad_spec))
    solve = tf.function(
        lambda phi, v, sx, sy: over_tasks(
            lambda p, g, x, y: solve_fn(list(p), list(g), x, y), (phi, v, sx, sy), grad_spec
        )
    )
    phi = inner(support_x, support_y)
    v = query(phi, query_x, query_y)
    solve(phi, v, support_x, support_y)
    times = {"inner_loop_s": [], "query_gradient_s": [], "linear_solve_s": []}
    for _ in range(config.repeats):
        for key, fn in (
            ("inner_loop_s", lambda: inner(support_x, support_y)),
            ("query_gradient_s", lambda: query(phi, query_x, query_y)),
            ("linear_solve_s", lambda: solve(phi, v, support_x, support_y)),
        ):
            start = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), fn())
            times[key].append(time.perf_counter() - start)
    return {key: float(np.median(value)) for key, value in times.items()}


def run_worker(config: Config) -> dict:
    """Builds the configuration, times its meta-steps; returns the measurements.

    Under a dtype policy (`config.policy`, set before anything is built), it then reads the
    meta-gradient of the first episode from the seed-0 weights (`_meta_gradient`).
    """
    import keras
    import tensorflow as tf

    if config.policy:
        keras.mixed_precision.set_global_policy(config.policy)
    data = np.load(config.episodes)
    t = config.meta_batch_size
    batches = [
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
    meta = _build(config)
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
        "task_batching_used": (
            "batched" if meta._batch_query else "support" if meta._batch_support else "per_task"
        ),
    }
    if config.split and config.algorithm.startswith("imaml") and config.algorithm != "imaml_hf":
        result.update(_split_times(meta, batches[0], config))
    result["peak_memory_mb"] = _vm_hwm_mb()  # before a second model is built
    result["onednn_enabled"] = _onednn_enabled()
    if config.policy:
        result.update(_meta_gradient(config, batches[0]))
    return result


def _onednn_enabled() -> bool | None:
    """Whether this process's TensorFlow uses oneDNN kernels (None if it cannot tell)."""
    try:
        from tensorflow.python.util import _pywrap_util_port  # no public API says this
    except ImportError:
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


# ------------------------------------------------------------------ parent


def _forward_flops(config: Config) -> float:
    """FLOPs of one image through the conv net (multiply-adds count 2)."""
    mini = _mini_imagenet(config)
    size, channels, flops = config.image_size, 3 if mini else 1, 0.0
    for _ in range(4):
        if not mini:  # a stride-2 convolution
            size = -(-size // 2)
        flops += 2.0 * size * size * 9 * channels * config.filters
        if mini:  # a stride-1 convolution, then 2x2 max pooling (its compares not counted)
            size //= 2
        channels = config.filters
    return flops + 2.0 * size * size * config.filters * config.ways


def useful_flops(config: Config) -> float:
    """FLOPs a meta-step needs, counting a gradient as 3 and an HVP as 6 forward passes.

    Per task: the inner loop's `K` support gradients (MAML: plus `K` HVPs to backpropagate
    through them; iMAML-HF: `inner_cg_steps = 5` HVPs and one gradient per Newton step),
    one query gradient at the adapted weights, one query forward pass at theta (the
    pre-adaptation metrics) and, for iMAML, `cg_steps` HVPs.
    """
    forward = _forward_flops(config)
    support = config.ways * config.shots * forward
    query = config.ways * config.queries * forward
    k = config.inner_steps
    inner = {
        "maml": k * (3 + 6) * support,
        "fomaml": k * 3 * support,
        "imaml_hf": k * (5 * 6 + 3) * support,
    }.get(config.algorithm, k * 3 * support)
    solve = config.cg_steps * 6 * support if config.algorithm.startswith("imaml") else 0.0
    return config.meta_batch_size * (inner + solve + 3 * query + query)


def machine_throughput(
    *, matmul_size: int = 2048, conv_batch: int = 256, repeats: int = 10
) -> dict:
    """Dense float32 GFLOP/s of this machine: a square matmul and a 3x3 64->64 convolution.

    The defaults (a 2048^2 matmul, 256 images of 14x14x64, median of 10) are the measured
    run's; `--tiny` shrinks them (the numbers are then rough, but the smoke run is fast).
    """
    import tensorflow as tf

    n = matmul_size
    a = tf.random.normal([n, n])
    x = tf.random.normal([conv_batch, 14, 14, 64])
    k = tf.random.normal([3, 3, 64, 64])
    result = {}
    for name, fn, flops in (
        ("matmul_gflops", tf.function(lambda: tf.matmul(a, a)), 2 * n**3),
        (
            "conv_gflops",
            tf.function(lambda: tf.nn.conv2d(x, k, 1, "SAME")),
            2 * conv_batch * 14 * 14 * 9 * 64 * 64,
        ),
    ):
        fn().numpy()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn().numpy()
            times.append(time.perf_counter() - start)
        result[name] = flops / np.median(times) / 1e9
    return result


def processor() -> dict:
    """The CPU: its model name (the one `lscpu` prints), cores and low-precision flags."""
    model_name, cpu_flags = "unknown", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model_name == "unknown":
                model_name = value.strip()
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = set(value.split())
    except OSError:
        pass
    return {
        "model_name": model_name,
        "num_cpus": os.cpu_count(),
        "flags": {flag: flag in cpu_flags for flag in CPU_FLAGS},
    }


def add_meta_gradient_errors(rows: list[dict]) -> None:
    """Each dtype-policy row's meta-gradient errors against float32's, in place.

    All relative L2 errors `||g - g_float32|| / ||g_float32||`, with both gradients read
    off from the same weights and episode (`_meta_gradient`):

    - `meta_grad_error_vs_float32`: the meta-step's gradient, as the library takes it (the
      mean over the tasks whose solve did not fail, which can differ between policies);
    - `common_tasks_error_vs_float32`: the mean over the `solved_in_both` tasks solved under
      both policies, each task's gradient read alone: free of the tasks that one policy
      drops and the other keeps;
    - `median_task_error_vs_float32`: the median over those tasks of each task's error;
    - `failure_flips_vs_float32`: tasks whose solve failed under one policy only.

    `None` where either run failed or float32's gradient is zero (every solve failed).
    """
    section = [r for r in rows if r["sweep"] == "precision"]
    reference = next(
        (
            _meta_gradient_file(Config(**r["config"]))
            for r in section
            if (r["config"]["policy"], r["config"]["onednn"]) == ("float32", "1")
        ),
        None,
    )
    want = dict(np.load(reference)) if reference and reference.exists() else None
    for row in section:
        path = _meta_gradient_file(Config(**row["config"]))
        errors = dict.fromkeys(
            (
                "meta_grad_error_vs_float32",
                "common_tasks_error_vs_float32",
                "median_task_error_vs_float32",
                "solved_in_both",
                "failure_flips_vs_float32",
            )
        )
        if want is not None and "error" not in row["result"] and path.exists():
            got = dict(np.load(path))
            both = ~got["task_failed"] & ~want["task_failed"]
            errors["solved_in_both"] = int(both.sum())
            errors["failure_flips_vs_float32"] = int(
                (got["task_failed"] != want["task_failed"]).sum()
            )
            errors["meta_grad_error_vs_float32"] = _relative_error(
                got["meta_grad"], want["meta_grad"]
            )
            if both.any():
                errors["common_tasks_error_vs_float32"] = _relative_error(
                    got["task_grads"][both].sum(axis=0), want["task_grads"][both].sum(axis=0)
                )
                per_task = [
                    _relative_error(g, w)
                    for g, w in zip(got["task_grads"][both], want["task_grads"][both], strict=True)
                ]
                errors["median_task_error_vs_float32"] = float(np.median(per_task))
        row.update(errors)


def _relative_error(got: np.ndarray, want: np.ndarray) -> float | None:
    norm = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / norm) if norm > 0 else None


def make_episodes(path: pathlib.Path, config: Config, num_batches: int) -> None:
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
    if _mini_imagenet(config):
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


def run_in_subprocess(config: Config, memory_limit_mb: float) -> dict:
    """Runs one configuration in a fresh Python; kills it above the memory limit."""
    command = [sys.executable, __file__, "--worker", json.dumps(dataclasses.asdict(config))]
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


def _cell(result: dict, key: str, fmt: str) -> str:
    return "—" if result.get(key) is None else format(result[key], fmt)


def write_report(output_dir: pathlib.Path, rows: list[dict], machine: dict) -> str:
    """The Markdown tables; returns them."""
    cpu = machine["processor"]
    lines = [
        f"Machine: matmul {machine['start']['matmul_gflops']:.0f} / conv "
        f"{machine['start']['conv_gflops']:.0f} GFLOP/s at the start, "
        f"{machine['end']['matmul_gflops']:.0f} / {machine['end']['conv_gflops']:.0f} at the end "
        "(float32).",
        "",
        f"Processor: {cpu['model_name']}, {cpu['num_cpus']} CPUs; flags: "
        + ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in cpu["flags"].items())
        + ".",
        "",
    ]
    sections = (
        ("inner_steps", "Time and peak memory against inner steps K"),
        ("task_batching", "Task batching (iMAML-GD)"),
        ("batch_size", "Scaling with meta-batch size (iMAML-GD)"),
        ("cg_steps", "Scaling with CG steps (iMAML-GD)"),
        ("onednn", "TensorFlow's oneDNN kernels off and on (batching column: oneDNN)"),
    )
    for sweep, title in sections:
        section = [r for r in rows if r["sweep"] == sweep]
        if not section:
            continue
        lines += [
            f"### {title}",
            "",
            "| algorithm | K | tasks | CG | batching | s / meta-step | inner loop s | "
            "query grad s | solve s | peak MB | useful GFLOP | GFLOP/s | % of conv peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in section:
            c, m = r["config"], r["result"]
            if "error" in m:
                rate = pct = "—"
                step = m["error"] if len(m["error"]) < 80 else m["error"][:77] + "..."
            else:
                rate_value = r["useful_gflop"] / m["step_s"]
                rate = f"{rate_value:.1f}"
                pct = f"{100 * rate_value / machine['start']['conv_gflops']:.0f}%"
                step = f"{m['step_s']:.3f}"
            lines.append(
                f"| {c['algorithm']} | {c['inner_steps']} | {c['meta_batch_size']} | "
                f"{c['cg_steps'] if c['algorithm'].startswith('imaml') else '—'} | "
                f"{_batching_cell(sweep, c, m)} | {step} | "
                f"{_cell(m, 'inner_loop_s', '.3f')} | {_cell(m, 'query_gradient_s', '.3f')} | "
                f"{_cell(m, 'linear_solve_s', '.3f')} | {_cell(m, 'peak_memory_mb', '.0f')} | "
                f"{r['useful_gflop']:.1f} | {rate} | {pct} |"
            )
        lines.append("")
    lines += _onednn_ratios(rows)
    lines += _precision_table(rows)
    text = "\n".join(lines)
    (output_dir / "benchmark.md").write_text(text)
    return text


def _batching_cell(sweep: str, config: dict, result: dict) -> str:
    batching = result.get("task_batching_used", config["task_batching"])
    if sweep != "onednn":
        return batching
    return f"{batching}, oneDNN {'on' if config['onednn'] == '1' else 'off'}"


def _onednn_ratios(rows: list[dict]) -> list[str]:
    """One line per algorithm: its meta-step time with oneDNN off over the time with it on."""
    times = {}
    for r in rows:
        if r["sweep"] == "onednn" and "error" not in r["result"]:
            times[(r["config"]["algorithm"], r["config"]["onednn"])] = r["result"]["step_s"]
    lines = [
        f"- {algorithm}: oneDNN on is {times[(algorithm, '0')] / times[(algorithm, '1')]:.2f} "
        f"times as fast ({times[(algorithm, '0')]:.3f} s against {times[(algorithm, '1')]:.3f} s)"
        for algorithm in dict.fromkeys(a for a, _ in times)
        if (algorithm, "0") in times and (algorithm, "1") in times
    ]
    return lines + [""] if lines else []


def _precision_table(rows: list[dict]) -> list[str]:
    """Dtype policies side by side: meta-step time and meta-gradient errors against float32."""
    section = [r for r in rows if r["sweep"] == "precision"]
    if not section:
        return []
    reference = next(
        (
            r["result"]
            for r in section
            if (r["config"]["policy"], r["config"]["onednn"]) == ("float32", "1")
        ),
        {"error": ""},
    )
    c = section[0]["config"]
    lines = [
        "### Dtype policies with oneDNN on: meta-step time and meta-gradient error against float32",
        "",
        f"{c['algorithm']}, K = {c['inner_steps']}, meta-batch {c['meta_batch_size']}, "
        f"{c['cg_steps']} CG steps, {c['filters']} filters. Time: median of {c['repeats']} "
        "meta-steps (Adam) after warm-up, wall-clock and CPU seconds of the process (which "
        "other jobs on the same cores inflate less). Errors: `||g - g_float32|| / ||g_float32||` of "
        "`SGD(1.0)` steps from the same seed-0 weights on the same episode: the meta-step's "
        "gradient (the mean over the tasks whose solve did not fail), then the tasks solved "
        "under both policies, each read alone (their sum, and the median task). float32 "
        "with oneDNN off is the round-off reference: the same float32 arithmetic, summed in "
        "another order.",
        "",
        "| policy | compute dtype | oneDNN | s / meta-step | CPU s / meta-step | "
        "speed vs float32 (wall, CPU) | "
        "meta-step error | error, tasks solved in both | median task error | "
        "failed solves (differ from float32) | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bounds = []
    for r in section:
        m, policy = r["result"], r["config"]["policy"]
        if r["config"]["onednn"] == "0":
            policy += " (round-off reference)"
        if "error" in m:
            lines.append(f"| {policy} | — | — | {m['error'][:77]} |" + " — |" * 7)
            continue
        speed = "—"
        if "error" not in reference:
            speed = (
                f"{reference['step_s'] / m['step_s']:.2f}x, "
                f"{reference['step_cpu_s'] / m['step_cpu_s']:.2f}x"
            )
        failed = f"{len(m['failed_tasks'])} / {c['meta_batch_size']}"
        if r.get("failure_flips_vs_float32") is not None:
            failed += f" ({r['failure_flips_vs_float32']})"
        both = "" if r.get("solved_in_both") is None else f" ({r['solved_in_both']} tasks)"
        lines.append(
            f"| {policy} | {m['compute_dtype']} | {'on' if m['onednn_enabled'] else 'off'} | "
            f"{m['step_s']:.3f} | {m['step_cpu_s']:.3f} | {speed} | "
            f"{_cell(r, 'meta_grad_error_vs_float32', '.2e')} | "
            f"{_cell(r, 'common_tasks_error_vs_float32', '.2e')}"
            f"{both} | "
            f"{_cell(r, 'median_task_error_vs_float32', '.2e')} | {failed} | "
            f"{m['peak_memory_mb']:.0f} |"
        )
        bounds.append(m["readoff_bound"])
    hashes = {
        r["result"].get("initial_weights_sha1") for r in section if "error" not in r["result"]
    }
    lines += [
        "",
        "Initial weights: "
        + ("the same in every run" if len(hashes) == 1 else f"DIFFERENT ({len(hashes)} hashes)")
        + " (SHA-1 of the float32 values). Read-off resolution (float32 rounding of the "
        "stepped weights, relative to the meta-step gradient): at most "
        + (f"{max(bounds):.1e}." if bounds and None not in bounds else "— (a zero meta-gradient)."),
        "",
    ]
    return lines


def plot(output_dir: pathlib.Path, rows: list[dict]) -> bool:
    """Time and peak memory against K, one line per algorithm (Figure 2b of the paper)."""
    if not any(r["sweep"] == "inner_steps" for r in rows):
        return False  # nothing to plot (e.g. a run of the oneDNN comparison only)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for algorithm in ALGORITHMS:
        points = [
            (r["config"]["inner_steps"], r["result"])
            for r in rows
            if r["sweep"] == "inner_steps" and r["config"]["algorithm"] == algorithm
        ]
        points = [(k, m) for k, m in points if "error" not in m]
        if not points:
            continue
        ks = [k for k, _ in points]
        style = "--" if "maml" in algorithm and not algorithm.startswith("imaml") else "-"
        ax_time.plot(ks, [m["step_s"] for _, m in points], style, marker="o", label=algorithm)
        ax_mem.plot(
            ks,
            [m["peak_memory_mb"] / 1024 for _, m in points],
            style,
            marker="o",
            label=algorithm,
        )
    ax_time.set(xlabel="inner steps K", ylabel="seconds per meta-step", title="Compute")
    ax_mem.set(xlabel="inner steps K", ylabel="peak memory (GB, VmHWM)", title="Memory")
    for ax in (ax_time, ax_mem):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    c = next(r["config"] for r in rows)
    fig.suptitle(
        f"Meta-step on {'mini-ImageNet' if c['dataset'] == 'mini_imagenet' else 'Omniglot'} "
        f"{c['ways']}-way {c['shots']}-shot, {c['queries']} queries per "
        f"class, conv net ({c['filters']} filters), meta-batch {c['meta_batch_size']}, "
        f"{os.cpu_count()} CPU cores"
    )
    fig.tight_layout()
    fig.savefig(output_dir / "benchmark.png", dpi=110)
    plt.close(fig)
    return True


def plan(base: Config) -> list[tuple[str, Config]]:
    """Every (sweep, configuration) of the run, in order."""
    inner_steps = [int(k) for k in _INNER_STEPS.value]
    configs = []
    reference = dataclasses.replace(base, algorithm="imaml_gd", inner_steps=_REFERENCE_K.value)
    for mode in _BATCHING.value:
        if mode not in TASK_BATCHING:
            raise app.UsageError(f"--task_batching: unknown {mode!r}; known: {TASK_BATCHING}")
        configs.append(
            ("task_batching", dataclasses.replace(reference, task_batching=mode, split=True))
        )
    for algorithm in _ALGORITHMS.value:
        if algorithm not in ALGORITHMS:
            raise app.UsageError(f"--algorithms: unknown {algorithm!r}; known: {ALGORITHMS}")
        for k in inner_steps:
            if algorithm == "imaml_hf" and k > _MAX_HF_STEPS.value:
                continue
            configs.append(
                ("inner_steps", dataclasses.replace(base, algorithm=algorithm, inner_steps=k))
            )
    for t in _BATCH_SIZES.value:
        configs.append(("batch_size", dataclasses.replace(reference, meta_batch_size=int(t))))
    for c in _CG_STEPS.value:
        configs.append(("cg_steps", dataclasses.replace(reference, cg_steps=int(c))))
    for algorithm in _ONEDNN.value:
        if algorithm not in ALGORITHMS:
            raise app.UsageError(f"--onednn: unknown {algorithm!r}; known: {ALGORITHMS}")
        for value in ("0", "1"):  # side by side, in one run
            configs.append(
                ("onednn", dataclasses.replace(reference, algorithm=algorithm, onednn=value))
            )
    for policy in _PRECISION.value:
        if policy not in POLICIES:
            raise app.UsageError(f"--precision: unknown {policy!r}; known: {POLICIES}")
        configs.append(("precision", dataclasses.replace(reference, onednn="1", policy=policy)))
    if _PRECISION.value and "float32" not in _PRECISION.value:
        raise app.UsageError("--precision: float32 must be one of the policies (the reference)")
    if _PRECISION.value:  # the round-off reference
        configs.append(("precision", dataclasses.replace(reference, onednn="0", policy="float32")))
    return configs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        result = run_worker(Config(**json.loads(_WORKER.value)))
        print("RESULT " + json.dumps(result), flush=True)
        return
    if _TINY.value:
        for flag, value in (
            (_INNER_STEPS, ["1", "2"]),
            (_BATCH_SIZES, ["1", "2"]),
            (_CG_STEPS, ["1", "2"]),
            (_META_BATCH, 2),
            (_REPEATS, 1),
            (_WARMUP, 1),
            (_FILTERS, 4),
            (_QUERIES, 2),
            (_IMAGE_SIZE, 16),
            (_REFERENCE_K, 1),
        ):
            if not flags.FLAGS[flag.name].present:  # Flags given explicitly win.
                setattr(flags.FLAGS, flag.name, value)
    if _DATASET.value == "mini_imagenet":
        for flag, value in ((_IMAGE_SIZE, 84), (_FILTERS, 32)):
            if not flags.FLAGS[flag.name].present and not _TINY.value:
                setattr(flags.FLAGS, flag.name, value)
    for name, values in (
        ("inner_steps", _INNER_STEPS),
        ("batch_sizes", _BATCH_SIZES),
        ("cg_steps", _CG_STEPS),
    ):
        if not all(
            v.isdigit() and int(v) >= (0 if name == "inner_steps" else 1) for v in values.value
        ):
            raise app.UsageError(f"--{name} must be non-negative integers, got {values.value}")
    output_dir = pathlib.Path(_OUTPUT_DIR.value)
    max_batch = max([_META_BATCH.value] + [int(t) for t in _BATCH_SIZES.value])
    base = Config(
        algorithm="imaml_gd",
        inner_steps=_REFERENCE_K.value,
        meta_batch_size=_META_BATCH.value,
        ways=_WAYS.value,
        shots=_SHOTS.value,
        queries=_QUERIES.value,
        filters=_FILTERS.value,
        image_size=_IMAGE_SIZE.value,
        repeats=_REPEATS.value,
        dataset=_DATASET.value,
        data_dir=_DATA_DIR.value,
        warmup=_WARMUP.value,
    )
    configs = plan(base)  # Flag errors before anything is written (the temporary folder too).
    episodes = str(pathlib.Path(tempfile.mkdtemp(prefix="tf_imaml_benchmark_")) / "episodes.npz")
    base = dataclasses.replace(base, episodes=episodes)
    configs = [(sweep, dataclasses.replace(c, episodes=episodes)) for sweep, c in configs]
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"Sampling {base.dataset} episodes into {base.episodes} ...", flush=True)
    make_episodes(
        pathlib.Path(base.episodes),
        dataclasses.replace(base, meta_batch_size=max_batch),
        base.warmup + base.repeats,
    )
    # --tiny: a rough, quick measurement (see machine_throughput).
    throughput = dict(matmul_size=512, conv_batch=16, repeats=3) if _TINY.value else {}
    machine = {"processor": processor(), "start": machine_throughput(**throughput)}
    rows = []
    done = {}  # The reference configuration appears in several sweeps: measured once.
    started = time.time()
    for i, (sweep, config) in enumerate(configs, start=1):
        key = dataclasses.replace(config, split=False)
        if key not in done or (config.split and "inner_loop_s" not in done[key]):
            done[key] = run_in_subprocess(config, _MEMORY_LIMIT.value * 1024)
        result = done[key]
        row = {
            "sweep": sweep,
            "config": dataclasses.asdict(config),
            "result": result,
            "useful_gflop": useful_flops(config) / 1e9,
        }
        rows.append(row)
        summary = result.get("error") or (
            f"{result['step_s']:.3f} s/step, peak {result['peak_memory_mb']:.0f} MB"
        )
        print(
            f"[{i}/{len(configs)} {time.time() - started:5.0f} s] {sweep}: {config.algorithm} "
            f"K={config.inner_steps} T={config.meta_batch_size} CG={config.cg_steps} "
            f"{config.task_batching}{' ' + config.policy if config.policy else ''}"
            f"{' oneDNN ' + {'0': 'off', '1': 'on'}[config.onednn] if config.onednn else ''}: "
            f"{summary}",
            flush=True,
        )
    machine["end"] = machine_throughput(**throughput)
    add_meta_gradient_errors(rows)
    shutil.rmtree(pathlib.Path(base.episodes).parent, ignore_errors=True)
    (output_dir / "results.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1)
    )
    print(write_report(output_dir, rows, machine))
    written = ["benchmark.md", "benchmark.png", "results.json"]
    if not plot(output_dir, rows):
        written.remove("benchmark.png")
    print(f"Wrote {', '.join(written)} in {output_dir}")


if __name__ == "__main__":
    app.run(main)
