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
    (same initial weights, same episodes, op determinism on), then evaluated on the same
    held-out test tasks (mean +- 95% CI, and the paired difference).

Usage:
  python scripts/studies/maml_precision.py --output_dir=docs/studies/maml_precision
  python scripts/studies/maml_precision.py --tiny --output_dir=/tmp/maml_precision

It writes `maml_precision.md`, `maml_precision.json` and `maml_precision.png` into
`--output_dir`.
"""

from __future__ import annotations

import dataclasses
import time

import fewshot
import harness
import keras
import numpy as np
import reporting
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
    seed: int = option(0, "Seed of tasks, weights and episodes.")

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


def initial_weights(config: Config, weights: str) -> list[np.ndarray]:
    """The shipped iMAML model's weights, or a seeded random init (float32 values)."""
    if weights == "pretrained":
        return fewshot.pretrained_weights(harness.PRETRAINED)
    keras.utils.set_random_seed(config.seed)
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


def train_and_evaluate(config: Config, dtype: str, weights: list, data: dict) -> dict:
    """`tf_imaml.MAML` meta-trained in `dtype` from `weights`; test accuracy per task."""
    keras.utils.set_random_seed(config.seed)
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
            config, data["train"], seed=config.seed, num_tasks=None, batch=config.meta_batch_size
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
        names = list(training)
        means = [100 * training[d]["test_accuracy"] for d in names]
        cis = [100 * training[d]["test_ci95"] for d in names]
        ax.bar(names, means, yerr=cis, capsize=6, color=["tab:blue", "tab:orange"])
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(
            f"MAML after {config.train_meta_steps} meta-steps, K={config.train_inner_steps} "
            f"({config.test_tasks} test tasks, 95% CI)",
            fontsize=9,
        )
        low = min(m - c for m, c in zip(means, cis, strict=True))
        ax.set_ylim(max(0.0, low - 10), min(100.0, max(means) + 10))
    return fig


def run(config: Config) -> dict:
    """Runs both parts, writes the Markdown, JSON and PNG; returns the JSON's content."""
    out_dir = harness.output_folder(config, deterministic=False)
    start = time.time()
    data = fewshot.load_omniglot_splits(config.image_size)
    results = {"config": dataclasses.asdict(config), "gradient_precision": {}}
    lines = []

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
    lines += [
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
    for weights, by_lr in results["gradient_precision"].items():
        for lr, rows in by_lr.items():
            neg = np.mean([np.mean(n) for n in rows["imaml_negative_curvature"]])
            lines += [
                f"{weights} weights, inner step size {lr} (iMAML's CG met non-positive "
                f"curvature in {100 * neg:.0f}% of the (task, K) solves):",
                "",
                precision_table(rows, config),
                "",
            ]

    # (b) Training in float32 and float64.
    training = None
    if config.train_meta_steps:
        init = initial_weights(config, "random")
        training = {}
        for dtype in DTYPES:
            print(f"[training] MAML in {dtype}", flush=True)
            training[dtype] = train_and_evaluate(config, dtype, init, data)
        acc = {d: training[d]["per_task"] for d in DTYPES}
        diff_mean, diff_ci = reporting.mean_ci95(acc["float64"] - acc["float32"])
        w32, w64 = (
            np.concatenate([w.ravel() for w in training[d]["final_weights"]]) for d in DTYPES
        )
        drift = float(np.linalg.norm(w32 - w64) / np.linalg.norm(w64))
        init_flat = np.concatenate([w.ravel() for w in init]).astype(np.float64)
        moved = float(np.linalg.norm(w64 - init_flat) / np.linalg.norm(init_flat))
        results["training"] = {
            d: {k: v for k, v in training[d].items() if k != "final_weights"} for d in DTYPES
        } | {
            "paired_difference_float64_minus_float32": {"mean": diff_mean, "ci95": diff_ci},
            "final_weights_relative_difference": drift,
            "float64_weights_moved_relative": moved,
        }
        lines += [
            "### (b) MAML meta-trained in float32 and in float64",
            "",
            f"Second-order MAML (`tf_imaml.MAML`), K = {config.train_inner_steps} inner steps "
            f"of {config.train_learning_rate}, Adam {config.outer_learning_rate:g}, "
            f"{config.train_meta_steps} meta-steps of {config.meta_batch_size} tasks from the "
            "same random initialisation and the same episodes (op determinism on), evaluated "
            f"on the same {config.test_tasks} test tasks (Omniglot 5-way 1-shot, "
            f"{config.queries} queries per class; mean ± 95% CI).",
            "",
            reporting.markdown_table(
                ["dtype", "test accuracy (%)", "± 95% CI", "final train loss", "train time (s)"],
                [
                    [
                        d,
                        100 * training[d]["test_accuracy"],
                        100 * training[d]["test_ci95"],
                        training[d]["final_train"].get("loss"),
                        training[d]["train_seconds"],
                    ]
                    for d in DTYPES
                ],
            ),
            "",
            f"Paired difference (float64 − float32) over the same test tasks: "
            f"{100 * diff_mean:+.2f} ± {100 * diff_ci:.2f} percentage points. Final weights "
            f"differ by {drift:.3g} (relative norm); training moved the float64 weights by "
            f"{moved:.3g} of their initial norm.",
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


if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY)
