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

This file is the app (flags, the plan of configurations, the run); beside it are
`benchmark_config.py` (a configuration and its meta-model), `benchmark_worker.py` (one
configuration timed in its own process, its memory watched), `benchmark_phases.py` (the
phases of an iMAML meta-step timed apart), `benchmark_precision.py` (meta-gradients under
dtype policies), `benchmark_machine.py` (the machine's throughput, a meta-step's FLOPs) and
`benchmark_report.py` (tables and figure).

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
import json
import os
import pathlib
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import benchmark_config  # noqa: E402
import benchmark_machine  # noqa: E402
import benchmark_precision  # noqa: E402
import benchmark_report  # noqa: E402
import benchmark_worker  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

ALGORITHMS = benchmark_config.ALGORITHMS
TASK_BATCHING = benchmark_config.TASK_BATCHING
POLICIES = benchmark_config.POLICIES
# The fields of the base configuration read from the flags of the same names.
CONFIG_FLAGS = (
    "meta_batch_size",
    "ways",
    "shots",
    "queries",
    "filters",
    "image_size",
    "repeats",
    "warmup",
    "dataset",
    "data_dir",
)

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


def plan(base: benchmark_config.Config) -> list[tuple[str, benchmark_config.Config]]:
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


def _resolve_flag_defaults() -> None:
    """`--tiny`'s and mini-ImageNet's defaults for the flags not given; checks the K lists."""
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


def measure(configs: list[tuple[str, benchmark_config.Config]]) -> list[dict]:
    """Runs every configuration in its own process; the rows of `results.json`, in order."""
    rows = []
    done = {}  # The reference configuration appears in several sweeps: measured once.
    started = time.time()
    for i, (sweep, config) in enumerate(configs, start=1):
        key = dataclasses.replace(config, split=False)
        if key not in done or (config.split and "inner_loop_s" not in done[key]):
            done[key] = benchmark_worker.run_in_subprocess(config, _MEMORY_LIMIT.value * 1024)
        result = done[key]
        row = {
            "sweep": sweep,
            "config": dataclasses.asdict(config),
            "result": result,
            "useful_gflop": benchmark_machine.useful_flops(config) / 1e9,
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
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _WORKER.value:
        config = benchmark_config.Config(**json.loads(_WORKER.value))
        print("RESULT " + json.dumps(benchmark_worker.run_worker(config)), flush=True)
        return
    _resolve_flag_defaults()
    output_dir = pathlib.Path(_OUTPUT_DIR.value)
    max_batch = max([_META_BATCH.value] + [int(t) for t in _BATCH_SIZES.value])
    base = benchmark_config.Config(
        algorithm="imaml_gd",
        inner_steps=_REFERENCE_K.value,
        **{field: flags.FLAGS[field].value for field in CONFIG_FLAGS},
    )
    configs = plan(base)  # Flag errors before anything is written (the temporary folder too).
    episodes = str(pathlib.Path(tempfile.mkdtemp(prefix="tf_imaml_benchmark_")) / "episodes.npz")
    base = dataclasses.replace(base, episodes=episodes)
    configs = [(sweep, dataclasses.replace(c, episodes=episodes)) for sweep, c in configs]
    output_dir.mkdir(parents=True, exist_ok=True)
    print(f"Sampling {base.dataset} episodes into {base.episodes} ...", flush=True)
    benchmark_worker.make_episodes(
        pathlib.Path(base.episodes),
        dataclasses.replace(base, meta_batch_size=max_batch),
        base.warmup + base.repeats,
    )
    # --tiny: a rough, quick measurement (see machine_throughput).
    throughput = dict(matmul_size=512, conv_batch=16, repeats=3) if _TINY.value else {}
    machine = {
        "processor": benchmark_machine.processor(),
        "start": benchmark_machine.machine_throughput(**throughput),
    }
    rows = measure(configs)
    machine["end"] = benchmark_machine.machine_throughput(**throughput)
    benchmark_precision.add_meta_gradient_errors(rows)
    shutil.rmtree(pathlib.Path(base.episodes).parent, ignore_errors=True)
    (output_dir / "results.json").write_text(
        json.dumps({"machine": machine, "rows": rows}, indent=1)
    )
    print(benchmark_report.write_report(output_dir, rows, machine))
    written = ["benchmark.md", "benchmark.png", "results.json"]
    if not benchmark_report.plot(output_dir, rows):
        written.remove("benchmark.png")
    print(f"Wrote {', '.join(written)} in {output_dir}")


if __name__ == "__main__":
    app.run(main)
