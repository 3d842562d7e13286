"""Study 2: is MAML numerically unstable through long unrolls?

The iMAML paper attributes part of MAML's weaker results to numerical instability when
backpropagating through many inner steps. This study separates rounding from everything
else by running the same computation in float32 and in float64:

(a) Gradient precision. On real Omniglot 5-way 1-shot tasks and the conv net
    (`tf_imaml.models.conv4_classifier`), the meta-gradient of second-order MAML
    (backpropagation through `K` GD steps on the support loss, `tf_imaml.unrolled`) in
    float32 against the same computation in float64, as `K` grows; and for comparison
    iMAML's implicit meta-gradient (`K` proximal GD steps, `C` CG steps) in float32 against
    float64. Since both runs do the same arithmetic, their difference is rounding error (as
    amplified by the unrolled dynamics), not truncation.
(b) Training. `tf_imaml.MAML` meta-trained for the same short run in float32 and in float64
    (same initial weights, same episodes), then evaluated on the same held-out test tasks
    (mean +- 95% CI, and the paired difference), once per training seed (`--train_seeds`:
    a seed sets the random initial weights and the training episodes; the test tasks are
    the same for every seed). Over the seeds: each dtype's mean with its 95% t interval over
    seeds, the paired per-task test (`stats.paired_test`, each task averaged over seeds) and
    the t interval of the per-seed differences.

Usage:
  python scripts/studies/maml_precision.py --output_dir=docs/studies/maml_precision
  python scripts/studies/maml_precision.py --tiny --output_dir=/tmp/maml_precision
  python scripts/studies/maml_precision.py --output_dir=out --merge=a/maml_precision.json,...

`--merge` combines runs with the same training setting and test tasks, each with its own
training seeds (for example part (a) with seed 0 in one run, more seeds with `--weights=` in
another), into one report; part (a) is the first file's that has it.

It writes `maml_precision.md`, `maml_precision.json` and `maml_precision.png` into
`--output_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import fewshot
import harness
import keras
import numpy as np
import reporting
import stats
import tensorflow as tf
from harness import option

import tf_imaml

WEIGHTS = ("random", "pretrained")
DTYPES = ("float32", "float64")
NAME = "maml_precision"


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_maml_precision", "Where to write results.")
    inner_steps: tuple[int, ...] = option(
        (1, 2, 5, 10, 25, 50, 100), "Inner steps K of part (a).", tiny=(1, 4, 12)
    )
    learning_rates: tuple[float, ...] = option(
        (0.01, 0.1, 0.4), "Inner step sizes of part (a).", tiny=(0.4,)
    )
    weights: tuple[str, ...] = option(
        ("random",), "Part (a) weights: random and/or pretrained (or none).", choices=WEIGHTS
    )
    grad_tasks: int = option(4, "Tasks of part (a).", tiny=2, lower_bound=1)
    lam: float = option(2.0, "iMAML's proximal strength in part (a).")
    cg_steps: int = option(5, "iMAML's CG steps in part (a).", lower_bound=1)
    maml_task_chunk: int = option(
        2, "Tasks unrolled together in part (a) (MAML's memory grows with K).", lower_bound=1
    )
    train_meta_steps: int = option(
        200, "Meta-steps of part (b); 0 skips it.", tiny=6, lower_bound=0
    )
    meta_batch_size: int = option(4, "Tasks per meta-step in part (b).", tiny=2, lower_bound=1)
    train_inner_steps: int = option(5, "MAML's inner steps in part (b).", tiny=2, lower_bound=1)
    train_learning_rate: float = option(0.4, "MAML's inner step size in part (b).")
    outer_learning_rate: float = option(1e-3, "Adam step size in part (b).")
    test_tasks: int = option(200, "Test tasks of part (b).", tiny=8, lower_bound=1)
    queries: int = option(15, "Query examples per class.", tiny=2, lower_bound=1)
    image_size: int = option(28, "Image side.", tiny=14)
    filters: int = option(64, "Conv filters.", tiny=4, lower_bound=1)
    seed: int = option(0, "Seed of part (a)'s tasks and weights and of part (b)'s test tasks.")
    train_seeds: tuple[int, ...] = option(
        (0,), "Training seeds of part (b): each sets the initial weights and the episodes."
    )

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        if not self.inner_steps or min(self.inner_steps) < 1:
            raise ValueError(f"--inner_steps must be positive ints, got {self.inner_steps}")
        if list(self.inner_steps) != sorted(set(self.inner_steps)):
            raise ValueError(f"--inner_steps must be increasing, got {self.inner_steps}")
        if not all(lr > 0 for lr in self.learning_rates):
            raise ValueError(f"--learning_rates must be > 0, got {self.learning_rates}")
        for name in ("lam", "train_learning_rate", "outer_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if "pretrained" in self.weights and (self.image_size, self.filters) != (28, 64):
            raise ValueError("--weights=pretrained needs --image_size=28 and --filters=64")
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(
                f"--train_seeds must be distinct and non-empty, got {self.train_seeds}"
            )


TINY = harness.tiny_values(Config)


# --------------------------------------------------------------------------- the conv net


def conv_model(config: Config, dtype: str) -> keras.Model:
    """The Omniglot conv net with every layer computing in `dtype`.

    Every layer gets the dtype (`conv4_classifier(dtype=...)`): a Keras layer casts its
    inputs to its own compute dtype, so one float32 layer would round a float64 network.
    """
    return fewshot.learner(
        ways=5, image_size=config.image_size, filters=config.filters, dtype=dtype
    )


def initial_weights(config: Config, weights: str, seed: int | None = None) -> list[np.ndarray]:
    """The shipped iMAML model's weights, or a random init seeded by `seed` (default
    `config.seed`), as float32 values."""
    if weights == "pretrained":
        return fewshot.pretrained_weights(harness.PRETRAINED)
    keras.utils.set_random_seed(config.seed if seed is None else seed)
    return [v.numpy() for v in conv_model(config, "float32").trainable_variables]


def episodes(config: Config, data, *, seed: int, num_tasks: int | None, batch: int):
    """Seeded Omniglot 5-way 1-shot episodes (rotations as extra classes)."""
    return fewshot.episodes(
        data, ways=5, queries=config.queries, batch=batch, seed=seed, num_tasks=num_tasks
    )


# --------------------------------------------------------------------------- (a) gradients


class Gradients:
    """Compiled meta-gradients of one conv net in one dtype; data are arguments."""

    def __init__(self, model: keras.Model, *, lam: float, cg_steps: int):
        self.model = model
        self.lam = lam
        self.cg_steps = cg_steps
        self.maml = tf.function(self._maml)
        self.imaml = tf.function(self._imaml)

    def loss_fn(self, params, x, y):
        logits = tf_imaml.batched.apply(self.model, params, x)
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits), axis=1)

    def _maml(self, meta_params, num_steps, learning_rate, support, query):
        """Second-order MAML: backpropagation through `num_steps` GD steps (flattened)."""
        with tf.GradientTape() as tape:
            tape.watch(meta_params)
            inner = tf_imaml.unrolled.unrolled_gradient_descent(
                lambda p: self.loss_fn(p, *support),
                meta_params,
                num_steps=num_steps,
                learning_rate=learning_rate,
            )
            total = tf.reduce_sum(self.loss_fn(inner.adapted_params, *query))
        return tf_imaml.tree.flatten_tasks(tape.gradient(total, meta_params))

    def _imaml(self, meta_params, params, num_steps, learning_rate, support, query):
        """`num_steps` more proximal GD steps from `params`, then the implicit gradient."""
        support_loss_fn = lambda p: self.loss_fn(p, *support)  # noqa: E731
        inner = tf_imaml.inner_solvers.minimize_proximal(
            support_loss_fn,
            meta_params,
            lam=self.lam,
            num_steps=num_steps,
            optimizer=tf_imaml.inner_solvers.gradient_descent(learning_rate),
            init_params=params,
        )
        phi = inner.adapted_params
        v = tf_imaml.hvp.value_and_grad(lambda p: self.loss_fn(p, *query), phi)[1]
        result = tf_imaml.implicit.implicit_meta_gradient(
            support_loss_fn,
            phi,
            v,
            lam=self.lam,
            linear_solver=tf_imaml.linear_solve.solve_cg,
            max_iter=self.cg_steps,
            hvp_mode="linearized",
        )
        return phi, tf_imaml.tree.flatten_tasks(result.meta_grads), result.solve.negative_curvature


def compare(estimate, target) -> dict:
    """Per-task relative difference and 1 - cosine of `[T, N]` against `[T, N]`."""
    fields = ("relative_error", "one_minus_cosine", "target_norm", "finite")
    result = harness.compare(estimate, target, fields)
    result["norm_float64"] = result.pop("target_norm")
    return {
        name: result[name]
        for name in ("relative_error", "one_minus_cosine", "norm_float64", "finite")
    }


def gradient_precision(config: Config, tasks: tuple, weights: list, label: str) -> dict:
    """MAML and iMAML, float32 against float64, for every learning rate and K."""
    support_x, support_y, query_x, query_y = tasks
    grads, data, theta = {}, {}, {}
    for dtype in DTYPES:
        grads[dtype] = Gradients(
            conv_model(config, dtype), lam=config.lam, cg_steps=config.cg_steps
        )
        data[dtype] = (tf.cast(support_x, dtype), support_y), (tf.cast(query_x, dtype), query_y)
        theta[dtype] = tf_imaml.tree.broadcast_to_tasks(
            [tf.constant(w, dtype) for w in weights], config.grad_tasks
        )
    out = {}
    for lr in config.learning_rates:
        rows = {"maml": [], "imaml": [], "imaml_negative_curvature": []}
        phi = dict(theta)
        done = 0
        for k in config.inner_steps:
            start = time.time()
            maml, imaml = {}, {}
            for dtype in DTYPES:
                g = grads[dtype]
                support, query = data[dtype]
                lr_t = tf.constant(lr, dtype)
                chunks = []
                for s in range(0, config.grad_tasks, config.maml_task_chunk):
                    cut = slice(s, s + config.maml_task_chunk)
                    chunks.append(
                        g.maml(
                            [t[cut] for t in theta[dtype]],
                            tf.constant(k),
                            lr_t,
                            tuple(x[cut] for x in support),
                            tuple(x[cut] for x in query),
                        ).numpy()
                    )
                maml[dtype] = np.concatenate(chunks)
                phi[dtype], imaml[dtype], negative = g.imaml(
                    theta[dtype], phi[dtype], tf.constant(k - done), lr_t, support, query
                )
                if dtype == "float64":
                    rows["imaml_negative_curvature"].append(negative.numpy())
            done = k
            rows["maml"].append(compare(maml["float32"], maml["float64"]))
            rows["imaml"].append(compare(imaml["float32"], imaml["float64"]))
            print(
                f"[{label} lr={lr}] K={k}: float32 vs float64 rel. difference MAML "
                f"{np.mean(rows['maml'][-1]['relative_error']):.2e} (|g| "
                f"{np.mean(rows['maml'][-1]['norm_float64']):.2e}), iMAML "
                f"{np.mean(rows['imaml'][-1]['relative_error']):.2e} ({time.time() - start:.0f} s)",
                flush=True,
            )
        out[str(lr)] = rows
    return out


# --------------------------------------------------------------------------- (b) training


def train_and_evaluate(config: Config, dtype: str, weights: list, data: dict, seed: int) -> dict:
    """`tf_imaml.MAML` meta-trained in `dtype` from `weights` on the episodes of training
    seed `seed`; test accuracy per task on the test tasks of `config.seed`."""
    keras.utils.set_random_seed(seed)
    learner = conv_model(config, dtype)
    for variable, value in zip(learner.trainable_variables, weights, strict=True):
        variable.assign(value.astype(dtype))
    meta = tf_imaml.MAML(
        learner,
        inner_steps=config.train_inner_steps,
        inner_learning_rate=config.train_learning_rate,
    )
    fewshot.compile_meta(meta, learning_rate=config.outer_learning_rate)
    history, train_seconds = {}, 0.0
    if config.train_meta_steps:
        train_data = episodes(
            config, data["train"], seed=seed, num_tasks=None, batch=config.meta_batch_size
        )
        history, train_seconds = fewshot.meta_train(
            meta, train_data, meta_steps=config.train_meta_steps, verbose=2
        )
    eval_batch = min(20, config.test_tasks)
    test_data = episodes(
        config, data["test"], seed=config.seed + 2, num_tasks=config.test_tasks, batch=eval_batch
    )
    progress = keras.utils.Progbar(-(-config.test_tasks // eval_batch), verbose=1)
    accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, test_data, on_batch=progress.update)
    return {
        "dtype": dtype,
        "variable_dtype": learner.trainable_variables[0].dtype,
        "test_accuracy": accuracy.mean,
        "test_ci95": accuracy.ci95,
        "per_task": accuracy.per_task,
        "train_seconds": round(train_seconds, 1),
        "final_train": {k: float(v[-1]) for k, v in history.items()},
        "final_weights": [v.numpy().astype(np.float64) for v in learner.trainable_variables],
    }


# --------------------------------------------------------------------------- reporting


def precision_table(rows: dict, config: Config) -> str:
    headers = [
        "K",
        "MAML rel. diff.",
        "MAML 1 − cos",
        "MAML ‖g‖ (f64)",
        "iMAML rel. diff.",
        "iMAML 1 − cos",
        "iMAML ‖g‖ (f64)",
    ]
    table = []
    for i, k in enumerate(config.inner_steps):
        m, im = rows["maml"][i], rows["imaml"][i]
        table.append(
            [
                k,
                _finite_mean(m["relative_error"]),
                _finite_mean(m["one_minus_cosine"]),
                _finite_mean(m["norm_float64"]),
                _finite_mean(im["relative_error"]),
                _finite_mean(im["one_minus_cosine"]),
                _finite_mean(im["norm_float64"]),
            ]
        )
    return reporting.markdown_table(headers, table)


def _finite_mean(values) -> float:
    return harness.mean(values, nan_unless_finite=True)


def plot(precision: dict, training: dict | None, config: Config):
    plt = reporting.pyplot()
    ncols = 2 if training else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 3.8), squeeze=False)
    ax = axes[0][0]
    ks = np.array(config.inner_steps)
    markers = iter("osd^v<>")
    for weights, by_lr in precision.items():
        for lr, rows in by_lr.items():
            marker = next(markers, "o")
            for method, style in (("maml", "-"), ("imaml", "--")):
                ys = [_finite_mean(r["relative_error"]) for r in rows[method]]
                ax.plot(
                    ks,
                    ys,
                    style,
                    marker=marker,
                    ms=3,
                    label=f"{'MAML' if method == 'maml' else 'iMAML'} {weights} lr={lr}",
                )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("float32 vs float64 relative difference")
    ax.set_title("Rounding error of the meta-gradient", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)
    if training:
        ax = axes[0][1]
        summary = training["summary"]
        seeds = summary["float32"]["seeds"]
        for i, dtype in enumerate(DTYPES):
            interval = summary[dtype]["seed_interval"]
            ax.bar(
                i,
                100 * interval["mean"],
                yerr=100 * interval["half_width"],
                capsize=6,
                color=("tab:blue", "tab:orange")[i],
                alpha=0.6,
            )
            ax.plot([i] * len(seeds), 100 * np.asarray(summary[dtype]["per_seed_accuracy"]), "k.")
        for pair in zip(*(summary[d]["per_seed_accuracy"] for d in DTYPES), strict=True):
            ax.plot([0, 1], 100 * np.asarray(pair), "k-", lw=0.5, alpha=0.5)
        ax.set_xticks(range(len(DTYPES)), DTYPES)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(
            f"MAML after {config.train_meta_steps} meta-steps, K={config.train_inner_steps}: "
            f"{len(seeds)} seed(s) (dots, paired by lines),\nmean and 95% t interval over seeds "
            f"({config.test_tasks} test tasks)",
            fontsize=8,
        )
        values = [100 * v for d in DTYPES for v in summary[d]["per_seed_accuracy"]]
        ax.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 10))
    return fig


def _gradient_lines(config: Config, precision: dict) -> list[str]:
    """Part (a)'s Markdown (none when part (a) did not run)."""
    if not precision:
        return []
    lines = [
        "### (a) Rounding error of the meta-gradient: float32 against float64",
        "",
        f"{config.grad_tasks} Omniglot 5-way 1-shot test tasks ({config.queries} queries per "
        f"class), conv net ({config.image_size}x{config.image_size}, {config.filters} "
        "filters). MAML: backpropagation through K GD steps on the support loss. iMAML: K "
        f"proximal GD steps (lam = {config.lam}) and {config.cg_steps} CG steps. Same "
        "arithmetic in both dtypes, so the difference is rounding error as the computation "
        "amplifies it. Relative difference `‖g32 − g64‖/‖g64‖` and `1 − cos(g32, g64)`, "
        "means over tasks; ‖g‖ is the float64 meta-gradient's norm (mean over tasks).",
        "",
    ]
    for weights, by_lr in precision.items():
        for lr, rows in by_lr.items():
            neg = np.mean([np.mean(n) for n in rows["imaml_negative_curvature"]])
            lines += [
                f"{weights} weights, inner step size {lr} (iMAML's CG met non-positive "
                f"curvature in {100 * neg:.0f}% of the (task, K) solves):",
                "",
                precision_table(rows, config),
                "",
            ]
    return lines


def run(config: Config) -> dict:
    """Runs both parts, writes the Markdown, JSON and PNG; returns the JSON's content."""
    out_dir = harness.output_folder(config, deterministic=False)
    start = time.time()
    data = fewshot.load_omniglot_splits(config.image_size)
    results = {"config": dataclasses.asdict(config), "gradient_precision": {}}

    # (a) Gradient precision on test tasks.
    if config.weights:
        for (support_x, support_y, query_x), query_y in episodes(
            config,
            data["test"],
            seed=config.seed + 1,
            num_tasks=config.grad_tasks,
            batch=config.grad_tasks,
        ):
            tasks = (support_x, support_y, query_x, query_y)
    for weights in config.weights:
        results["gradient_precision"][weights] = gradient_precision(
            config, tasks, initial_weights(config, weights), weights
        )
    a_seconds = time.time() - start
    lines = _gradient_lines(config, results["gradient_precision"])

    # (b) Training in float32 and float64, once per training seed.
    runs = (
        [train_seed_pair(config, seed, data) for seed in config.train_seeds]
        if config.train_meta_steps
        else []
    )
    return _report(config, out_dir, results, lines, runs, start, a_seconds)


def train_seed_pair(config: Config, seed: int, data: dict) -> dict:
    """MAML trained in float32 and in float64 from training seed `seed`'s initial weights and
    episodes, both scored on the same test tasks; the JSON record of the pair."""
    init = initial_weights(config, "random", seed)
    training = {}
    for dtype in DTYPES:
        print(f"[training] seed {seed}: MAML in {dtype}", flush=True)
        training[dtype] = train_and_evaluate(config, dtype, init, data, seed)
    diff_mean, diff_ci = reporting.mean_ci95(
        training["float64"]["per_task"] - training["float32"]["per_task"]
    )
    w32, w64 = (np.concatenate([w.ravel() for w in training[d]["final_weights"]]) for d in DTYPES)
    init_flat = np.concatenate([w.ravel() for w in init]).astype(np.float64)
    return (
        {"seed": seed}
        | {d: {k: v for k, v in training[d].items() if k != "final_weights"} for d in DTYPES}
        | {
            "paired_difference_float64_minus_float32": {"mean": diff_mean, "ci95": diff_ci},
            "final_weights_relative_difference": float(
                np.linalg.norm(w32 - w64) / np.linalg.norm(w64)
            ),
            "float64_weights_moved_relative": float(
                np.linalg.norm(w64 - init_flat) / np.linalg.norm(init_flat)
            ),
        }
    )


def training_summary(runs: list[dict]) -> dict:
    """Over the seeds of `runs`: each dtype's `stats.arm_summary` and the paired comparison
    float64 - float32 (`stats.compare_arms`: per task, and per seed)."""
    arms = {d: stats.arm_summary({r["seed"]: r[d]["per_task"] for r in runs}) for d in DTYPES}
    return arms | {"float64_minus_float32": stats.compare_arms(arms["float64"], arms["float32"])}


def _report(config, out_dir, results, lines, runs, start, a_seconds) -> dict:
    """Adds part (b)'s `runs` to `results` and `lines`; writes the Markdown, JSON and PNG."""
    training = None
    if runs:
        summary = training_summary(runs)
        training = {"runs": runs, "summary": summary}
        results["training"] = training
        lines += [
            "### (b) MAML meta-trained in float32 and in float64",
            "",
            f"Second-order MAML (`tf_imaml.MAML`), K = {config.train_inner_steps} inner steps "
            f"of {config.train_learning_rate}, Adam {config.outer_learning_rate:g}, "
            f"{config.train_meta_steps} meta-steps of {config.meta_batch_size} tasks. Per "
            "training seed, both dtypes start from the same random initialisation and see the "
            f"same episodes; every model is scored on the same {config.test_tasks} test tasks "
            f"(Omniglot 5-way 1-shot, {config.queries} queries per class; mean ± 95% CI over "
            "tasks).",
            "",
            reporting.markdown_table(
                [
                    "seed",
                    "float32 (%)",
                    "float64 (%)",
                    "paired difference (points)",
                    "weights apart",
                    "train time f32 / f64 (s)",
                ],
                [
                    [
                        r["seed"],
                        f"{100 * r['float32']['test_accuracy']:.2f} ± "
                        f"{100 * r['float32']['test_ci95']:.2f}",
                        f"{100 * r['float64']['test_accuracy']:.2f} ± "
                        f"{100 * r['float64']['test_ci95']:.2f}",
                        f"{100 * r['paired_difference_float64_minus_float32']['mean']:+.2f} ± "
                        f"{100 * r['paired_difference_float64_minus_float32']['ci95']:.2f}",
                        r["final_weights_relative_difference"],
                        f"{r['float32']['train_seconds']:.0f} / "
                        f"{r['float64']['train_seconds']:.0f}",
                    ]
                    for r in runs
                ],
            ),
            "",
            "'weights apart': the relative distance of the two final weight vectors, against "
            "which training moved the float64 weights by "
            + ", ".join(f"{r['float64_weights_moved_relative']:.3g}" for r in runs)
            + " of their initial norm.",
            "",
            f"Over {len(runs)} seed(s): float32 {stats.percent(_interval(summary['float32']))}%, "
            f"float64 {stats.percent(_interval(summary['float64']))}% (mean ± 95% t interval "
            "over seeds).",
            "",
            reporting.markdown_table(
                ["comparison", *stats.comparison_headers()],
                [["float64 − float32", *stats.comparison_cells(summary["float64_minus_float32"])]],
            ),
            "",
        ]
    results["wall_seconds"] = round(time.time() - start, 1)
    results["gradient_part_seconds"] = round(a_seconds, 1)
    header = (
        "## MAML's numerical stability: float32 against float64\n\n"
        f"Produced by `scripts/studies/maml_precision.py` in {results['wall_seconds']:.0f} s.\n"
    )
    reporting.write(
        out_dir,
        NAME,
        markdown=header + "\n" + "\n".join(lines),
        data=harness.tolist(results),
        figures={f"{NAME}.png": plot(results["gradient_precision"], training, config)},
        dpi=90,
    )
    print(f"wrote {out_dir}/{NAME}.md, .json, .png in {results['wall_seconds']:.0f} s")
    return results


def _interval(arm: dict) -> stats.Interval:
    return stats.Interval(**arm["seed_interval"])


# Config fields that runs must share to be merged: the same training setting and test tasks.
_MERGE_FIELDS = (
    "train_meta_steps",
    "meta_batch_size",
    "train_inner_steps",
    "train_learning_rate",
    "outer_learning_rate",
    "test_tasks",
    "queries",
    "image_size",
    "filters",
    "seed",
)


def _runs(part: dict) -> list[dict]:
    """A JSON file's part (b) runs; a file written before `--train_seeds` holds one run, of
    its `seed`, as the whole of `training`."""
    training = part.get("training")
    if not training:
        return []
    if "runs" in training:
        return training["runs"]
    return [{"seed": part["config"]["seed"]} | training]


def merge(paths: list[str], output_dir: str) -> dict:
    """Combines runs' `maml_precision.json` (each with its own training seeds) into one
    report; part (a) is the first file's that has one.

    Raises:
      ValueError: If the files differ in a field of `_MERGE_FIELDS`, or two hold the same
        training seed.
    """
    start = time.time()
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    for path, part in zip(paths, parts, strict=True):
        harness.check_same(path, part["config"], parts[0]["config"], _MERGE_FIELDS)
    runs = [run for part in parts for run in _runs(part)]
    twice = harness.repeated([run["seed"] for run in runs])
    if twice:
        raise ValueError(f"training seeds met in more than one file: {twice}")
    runs.sort(key=lambda run: run["seed"])
    source = next((p for p in parts if p["gradient_precision"]), parts[0])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in source["config"].items()}
    values |= {"output_dir": output_dir, "train_seeds": tuple(r["seed"] for r in runs)}
    config = Config(**values)
    out_dir = harness.output_folder(config, deterministic=False)
    results = {
        "config": dataclasses.asdict(config),
        "gradient_precision": source["gradient_precision"],
        "merged_from": list(paths),
    }
    lines = _gradient_lines(config, source["gradient_precision"])
    for name, part in zip(paths, parts, strict=True):
        lines.append(
            f"Merged from `{name}` (training seeds {[r['seed'] for r in _runs(part)]}, "
            f"{part['wall_seconds']:.0f} s)."
        )
    lines.append("")
    results = _report(
        config, out_dir, results, lines, runs, start, source.get("gradient_part_seconds", 0.0)
    )
    return results


if __name__ == "__main__":
    harness.main(
        Config,
        run,
        tiny=TINY,
        merge=merge,
        merge_help="combine the maml_precision.json of runs with the same training setting "
        "and test tasks (each with its own --train_seeds) into one report in --output_dir.",
    )
