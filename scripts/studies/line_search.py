"""Study 6: iMAML-HF with and without its line search, and why a line search fails.

Part 1 (the inner solver alone): on real Omniglot test tasks, at the shipped model's weights
and at a random initialisation, for several `lam`, `tf_imaml.hessian_free.proximal_newton`
runs `--newton_steps` truncated-Newton steps on every task's proximal objective
`G(phi) = L_support(phi) + lam/2 ||phi - theta||^2`, once per step rule (`--step_rules`):

- `line_search`: the Hager-Zhang line search chooses each step length;
- `full`: full Newton steps (length 1);
- `fixed`: steps of length `--fixed_step` (0.3: the line search's accepted lengths had
  medians of 0.16 to 0.40);
- `damped`: full steps along the damped Newton direction `(H + (lam + mu) I) d = -grad G`,
  `mu = --newton_damping` (Tikhonov damping, Martens 2010; `G` keeps `lam`).

Reported: `G` and `||grad G||` after every step (mean and
median over tasks), how many steps raised `G`, and the status of every step: taken, no
descent direction, search failed (non-finite values), search not converged, step made `G`
non-finite, step raised `G`, or the search's "unbounded" case (converged and failed at once);
with the number of CG solves that met negative curvature and the query accuracy at the end.

Part 2 (training, optional): iMAML-HF meta-trained from the same random initialisation on
the same training episodes with each of `--train_step_rules` for `--train_meta_steps`
meta-steps, then tested on the same `--test_tasks` tasks (mean +- 95% CI; the per-task
accuracies are in the JSON).

Writes `<output_dir>/line_search.md`, `line_search.json` and `line_search.png`.

Usage:
  python scripts/studies/line_search.py --output_dir=runs/study_line_search
  python scripts/studies/line_search.py --tiny --output_dir=/tmp/line_search   # smoke run
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import fewshot
import harness
import keras
import numpy as np
import reporting
import tensorflow as tf
from harness import option

import tf_imaml
from tf_imaml import hessian_free

NAME = "line_search"
WEIGHTS = ("shipped", "random")
STEP_RULES = ("line_search", "full", "fixed", "damped")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_line_search", "Where results go.")
    weights: tuple[str, ...] = option(WEIGHTS, "Where theta is: shipped, random.", tiny=("random",))
    lams: tuple[float, ...] = option((0.5, 2.0, 10.0), "Proximal strengths lambda.", tiny=(2.0,))
    newton_steps: int = option(10, "Newton steps traced.", lower_bound=1, tiny=2)
    cg_steps: int = option(5, "CG iterations per Newton step.", lower_bound=1, tiny=2)
    tasks: int = option(40, "Test tasks for part 1.", lower_bound=1, tiny=4)
    train_meta_steps: int = option(
        40, "Meta-steps of each part-2 run (0: no training).", lower_bound=0, tiny=1
    )
    train_newton_steps: int = option(
        3, "Newton steps per task in part-2 training.", lower_bound=1, tiny=1
    )
    train_lam: float = option(2.0, "lambda of the part-2 training.")
    step_rules: tuple[str, ...] = option(
        STEP_RULES, "Step rules of part 1 (see the module docstring).", choices=STEP_RULES
    )
    train_step_rules: tuple[str, ...] = option(
        STEP_RULES, "Step rules of part 2.", choices=STEP_RULES, tiny=("line_search", "fixed")
    )
    fixed_step: float = option(0.3, "Step length of the 'fixed' rule.")
    newton_damping: float = option(
        10.0, "mu of the 'damped' rule: (H + (lam + mu) I) d = -grad G (the authors' 10)."
    )
    meta_batch_size: int = option(8, "Part-2 tasks per meta-step.", tiny=2)
    on_failure: str = option(
        "first_order",
        "Part 2: what a task whose meta-gradient solve failed contributes (see MetaLearner).",
        choices=("drop", "first_order", "zero"),
    )
    test_tasks: int = option(100, "Part-2 test tasks.", lower_bound=2, tiny=4)
    ways: int = option(5, "Classes per task.", lower_bound=2)
    shots: int = option(1, "Support examples per class.", lower_bound=1)
    queries: int = option(15, "Query examples per class.", lower_bound=1, tiny=2)
    image_size: int = option(28, "Image side (shipped weights: 28).", tiny=14)
    filters: int = option(64, "Channels of the random-init conv net.", tiny=8)
    pretrained: str = option(str(harness.PRETRAINED), "The shipped model.")
    seed: int = option(0, "Seed of the random init and of the episodes.")

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        if not self.weights or any(w not in WEIGHTS for w in self.weights):
            raise ValueError(f"--weights must be a non-empty subset of {WEIGHTS}: {self.weights}")
        if not self.lams or any(not lam > 0 for lam in self.lams):
            raise ValueError(f"--lams must be non-empty, each > 0: {self.lams}")
        if not self.train_lam > 0:
            raise ValueError(f"--train_lam must be > 0, got {self.train_lam}")
        if not self.step_rules:
            raise ValueError("--step_rules must name at least one rule")
        if not (self.fixed_step > 0 and self.newton_damping >= 0):
            raise ValueError(
                f"--fixed_step must be > 0 and --newton_damping >= 0, got {self.fixed_step}, "
                f"{self.newton_damping}"
            )
        if "shipped" in self.weights:
            if not pathlib.Path(self.pretrained).is_file():
                raise ValueError(f"--pretrained {self.pretrained} is not a file")
            if self.image_size != 28:
                raise ValueError("--weights=shipped needs --image_size=28 (the shipped net's)")


TINY = harness.tiny_values(Config)


_episodes = fewshot.config_episodes


def step_rule(config: Config, rule: str) -> dict:
    """The `proximal_newton` options of a step rule: `use_line_search`, `step_size`,
    `newton_damping`."""
    return {
        "line_search": dict(use_line_search=True, step_size=1.0, newton_damping=0.0),
        "full": dict(use_line_search=False, step_size=1.0, newton_damping=0.0),
        "fixed": dict(use_line_search=False, step_size=config.fixed_step, newton_damping=0.0),
        "damped": dict(use_line_search=False, step_size=1.0, newton_damping=config.newton_damping),
    }[rule]


def rule_label(config: Config, rule: str) -> str:
    """How tables and plots name a step rule."""
    return {
        "line_search": "line search",
        "full": "full steps",
        "fixed": f"fixed step {config.fixed_step:g}",
        "damped": f"damped (mu={config.newton_damping:g})",
    }[rule]


def _per_task_loss(logits, labels):
    losses = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    return tf.reduce_mean(losses, axis=1)


def make_trace_fn(
    learner: keras.Model,
    *,
    num_steps: int,
    cg_steps: int,
    use_line_search: bool,
    step_size: float = 1.0,
    newton_damping: float = 0.0,
):
    """A `tf.function`: (theta, lam, support, query) -> Newton trace and query accuracy.

    theta is broadcast to every task; the support loss is the learner's cross-entropy on each
    task's support set, evaluated for all tasks at once (`tf_imaml.batched`), as
    `ImplicitMAML` does; Hessian-vector products as `ImplicitMAML`'s default ("linearized").
    """

    @tf.function(reduce_retracing=True)
    def trace_fn(theta, lam, support_x, support_y, query_x, query_y):
        num_tasks = tf.shape(support_x)[0]
        meta_params = tf_imaml.tree.broadcast_to_tasks(theta, num_tasks)

        def support_loss_fn(params):
            return _per_task_loss(tf_imaml.batched.apply(learner, params, support_x), support_y)

        result = hessian_free.proximal_newton(
            support_loss_fn,
            meta_params,
            lam=lam,
            num_steps=num_steps,
            cg_steps=cg_steps,
            use_line_search=use_line_search,
            step_size=step_size,
            newton_damping=newton_damping,
            hvp_mode="linearized",
        )
        logits = tf_imaml.batched.apply(learner, result.inner.adapted_params, query_x)
        hits = tf.cast(tf.argmax(logits, axis=-1, output_type=query_y.dtype) == query_y, tf.float32)
        return result, tf.reduce_mean(hits, axis=1)

    return trace_fn


TRACE_FIELDS = (
    "objectives",
    "grad_norms",
    "step_sizes",
    "step_status",
    "num_negative_curvature",
    "num_steepest_descent",
)


def _summarise(trace: dict, query_accuracy: np.ndarray) -> dict:
    """Plain numbers of one (weights, lam, line search) cell, per step and in total."""
    objectives = trace["objectives"].astype(np.float64)  # [K + 1, T]
    grad_norms = trace["grad_norms"].astype(np.float64)
    status = trace["step_status"]  # [K, T]
    finite = np.isfinite(objectives)
    with np.errstate(invalid="ignore"):
        rises = np.diff(objectives, axis=0) > 0
    counts = {
        name: int((status == code).sum())
        for code, name in enumerate(hessian_free.STEP_STATUS_NAMES)
    }
    return {
        # Medians over the tasks whose value is not NaN (non-finite tasks are counted apart).
        "objective_median": np.nanmedian(objectives, axis=1).tolist(),
        "grad_norm_median": np.nanmedian(grad_norms, axis=1).tolist(),
        "objectives": objectives.tolist(),
        "grad_norms": grad_norms.tolist(),
        "step_sizes": trace["step_sizes"].tolist(),
        "step_status": status.tolist(),
        "status_counts": counts,
        "num_steps_total": int(status.size),
        "num_rises": int(rises.sum()),
        "tasks_with_a_rise": int(rises.any(axis=0).sum()),
        "tasks_non_finite_at_end": int((~finite[-1]).sum()),
        "negative_curvature_solves": int(trace["num_negative_curvature"].sum()),
        "steepest_descent_fallbacks": int(trace["num_steepest_descent"].sum()),
        "start_objective_median": float(np.nanmedian(objectives[0])),
        "final_objective_median": float(np.nanmedian(objectives[-1])),
        "final_grad_norm_median": float(np.nanmedian(grad_norms[-1])),
        "query_accuracy": float(np.mean(query_accuracy)),
        "query_accuracy_per_task": query_accuracy.tolist(),
        "query_accuracy_ci95": reporting.mean_ci95(query_accuracy)[1],
    }


def newton_traces(config: Config, learners: dict, test_data, *, on_row=None) -> list[dict]:
    """Part 1: one row per (step rule, weights, lam); `on_row(rows)` after each."""
    batch = min(config.tasks, 20)
    episodes = list(
        _episodes(config, test_data, seed=config.seed + 2, num_tasks=config.tasks, batch=batch)
    )
    rows = []
    # One traced function per line-search setting serves every theta: the learner only gives
    # the structure (tf_imaml.batched reads layer types and settings, not weights).
    structure = next(iter(learners.values()))
    for learner in learners.values():
        if [type(layer) for layer in learner.layers] != [
            type(layer) for layer in structure.layers
        ] or [v.shape for v in learner.trainable_variables] != [
            v.shape for v in structure.trainable_variables
        ]:
            raise ValueError("the shipped and random learners must have the same architecture")
    for rule in config.step_rules:
        options = step_rule(config, rule)
        trace_fn = make_trace_fn(
            structure, num_steps=config.newton_steps, cg_steps=config.cg_steps, **options
        )
        for weights, learner in learners.items():
            theta = [tf.convert_to_tensor(v) for v in learner.trainable_variables]
            for lam in config.lams:
                start = time.time()
                parts = [
                    trace_fn(theta, tf.constant(lam, tf.float32), sx, sy, qx, qy)
                    for (sx, sy, qx), qy in episodes
                ]
                # Every kept field has the task axis last; the last batch may overrun.
                trace = {
                    field: np.concatenate([getattr(p[0], field).numpy() for p in parts], axis=-1)[
                        ..., : config.tasks
                    ]
                    for field in TRACE_FIELDS
                }
                accuracy = np.concatenate([p[1].numpy() for p in parts])[: config.tasks]
                row = {
                    "weights": weights,
                    "lam": float(lam),
                    "step_rule": rule,
                    **options,
                    "line_search": options["use_line_search"],
                    "seconds": round(time.time() - start, 2),
                    **_summarise(trace, accuracy),
                }
                rows.append(row)
                counts = row["status_counts"]
                print(
                    f"  [{weights} lam={lam:g} {rule_label(config, rule)}] G "
                    f"{row['start_objective_median']:.3f} -> {row['final_objective_median']:.3f}, "
                    f"rises {row['num_rises']}, statuses {counts} ({row['seconds']:.0f} s)",
                    flush=True,
                )
                if on_row is not None:
                    on_row(rows)
    return rows


def train_comparison(config: Config, init_weights, train_data, test_data) -> list[dict]:
    """Part 2: iMAML-HF with each of `train_step_rules`, same init and episodes."""
    rows = []
    for rule in config.train_step_rules:
        options = step_rule(config, rule)
        label = f"iMAML-HF, {rule_label(config, rule)}"
        print(f"training {label} for {config.train_meta_steps} meta-steps", flush=True)
        keras.utils.set_random_seed(config.seed)
        learner = _random_learner(config)
        learner.set_weights(init_weights)
        meta = tf_imaml.ImplicitMAML(
            learner,
            lam=config.train_lam,
            inner_steps=config.train_newton_steps,
            inner_solver=tf_imaml.HessianFree(cg_steps=config.cg_steps, **options),
            on_failure=config.on_failure,
        )
        fewshot.compile_meta(meta)
        steps, batch = config.train_meta_steps, config.meta_batch_size
        episodes = _episodes(
            config, train_data, seed=config.seed, num_tasks=steps * batch, batch=batch
        )
        history, train_seconds = fewshot.meta_train(meta, episodes, meta_steps=steps)
        logs = {k: float(v[-1]) for k, v in history.items()}
        print(f"  [{label}] {train_seconds:.0f} s, final logs {logs}", flush=True)
        test_episodes = _episodes(
            config,
            test_data,
            seed=config.seed + 2,
            num_tasks=config.test_tasks,
            batch=min(20, config.test_tasks),
        )
        accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, test_episodes)
        print(
            f"  [{label}] test {100 * accuracy.mean:.2f} +- {100 * accuracy.ci95:.2f}%",
            flush=True,
        )
        rows.append(
            {
                "label": label,
                "step_rule": rule,
                **options,
                "line_search": options["use_line_search"],
                "meta_steps": config.train_meta_steps,
                "train_seconds": round(train_seconds, 1),
                "final_train_logs": logs,
                "test_accuracy": accuracy.mean,
                "test_ci95": accuracy.ci95,
                "test_tasks": accuracy.num_tasks,
                "test_accuracy_per_task": np.asarray(accuracy.per_task).tolist(),
            }
        )
    return rows


def _random_learner(config: Config) -> keras.Model:
    return fewshot.learner(ways=config.ways, image_size=config.image_size, filters=config.filters)


def run(config: Config) -> dict:
    """Runs both parts and writes the md/json/png; returns the results."""
    out = harness.output_folder(config, deterministic=True)
    test_data = tf_imaml.datasets.load_omniglot("test", image_size=config.image_size)
    keras.utils.set_random_seed(config.seed)
    random_learner = _random_learner(config)
    init_weights = random_learner.get_weights()
    learners = {}
    for weights in config.weights:
        if weights == "shipped":
            learners[weights] = keras.models.load_model(config.pretrained).learner
        else:
            learners[weights] = random_learner
    print("part 1: Newton traces on test tasks", flush=True)
    # Written after every cell, so that a stopped run keeps what it measured.
    traces = newton_traces(
        config, learners, test_data, on_row=lambda rows: _write(config, out, rows, [])
    )
    training = []
    if config.train_meta_steps:
        print("part 2: training by step rule", flush=True)
        train_data = tf_imaml.datasets.load_omniglot("train", image_size=config.image_size)
        training = train_comparison(config, init_weights, train_data, test_data)
    return _write(config, out, traces, training)


def _write(config: Config, out: pathlib.Path, traces: list, training: list) -> dict:
    results = {
        "config": dataclasses.asdict(config),
        "status_names": list(hessian_free.STEP_STATUS_NAMES),
        "traces": traces,
        "training": training,
    }
    reporting.write(
        out,
        NAME,
        markdown=_markdown(config, traces, training),
        data=results,
        figures={f"{NAME}.png": _plot(config, traces)},
    )
    return results


def _markdown(config: Config, traces: list[dict], training: list[dict]) -> str:
    setting = (
        f"Omniglot {config.ways}-way {config.shots}-shot test tasks ({config.tasks} tasks, "
        f"seed {config.seed + 2}, {config.queries} queries per class), "
        f"{config.image_size}x{config.image_size} images. `hessian_free.proximal_newton`: "
        f"{config.newton_steps} Newton steps of {config.cg_steps} CG iterations each, "
        "Hessian-vector products 'linearized'. G is the proximal objective "
        "L_support + lam/2 ||phi - theta||^2; medians over tasks. Step statuses are counts "
        f"over all {config.newton_steps} x {config.tasks} steps. Step rules: 'line search' "
        "(Hager-Zhang), 'full steps' (length 1), "
        f"'fixed step {config.fixed_step:g}', 'damped (mu={config.newton_damping:g})' (full "
        f"steps along (H + (lam + {config.newton_damping:g}) I) d = -grad G; G keeps lam). The "
        "JSON holds every task's G, gradient norm, step length, status and query accuracy."
    )
    status_names = hessian_free.STEP_STATUS_NAMES
    headers = [
        "theta",
        "lam",
        "step rule",
        "G start",
        "G end",
        "grad G end",
        "steps raising G",
        "tasks with a rise",
        "tasks non-finite",
        *status_names,
        "neg. curvature CG",
        "query acc. (%)",
    ]
    rows = [
        [
            r["weights"],
            r["lam"],
            rule_label(config, r["step_rule"]),
            r["start_objective_median"],
            r["final_objective_median"],
            r["final_grad_norm_median"],
            r["num_rises"],
            r["tasks_with_a_rise"],
            r["tasks_non_finite_at_end"],
            *[r["status_counts"][name] for name in status_names],
            r["negative_curvature_solves"],
            f"{100 * r['query_accuracy']:.1f} ± {100 * r['query_accuracy_ci95']:.1f}",
        ]
        for r in traces
    ]
    per_step_headers = ["theta", "lam", "step rule"] + [
        f"k={k}" for k in range(config.newton_steps + 1)
    ]
    per_step = [
        [r["weights"], r["lam"], rule_label(config, r["step_rule"])]
        + [float(v) for v in r["objective_median"]]
        for r in traces
    ]
    lines = [
        f"## iMAML-HF line search: the inner solve\n\n{setting}\n",
        reporting.markdown_table(headers, rows),
        "\n### Median G after each Newton step k\n",
        reporting.markdown_table(per_step_headers, per_step),
        "",
    ]
    if training:
        lines += [
            "## iMAML-HF training by step rule\n\n"
            f"Omniglot {config.ways}-way {config.shots}-shot, same random init and training "
            f"episodes (seed {config.seed}), {config.train_meta_steps} meta-steps at "
            f"meta-batch {config.meta_batch_size}, lam = {config.train_lam:g}, "
            f"{config.train_newton_steps} Newton steps of {config.cg_steps} CG iterations, "
            f"on_failure={config.on_failure!r}, Adam 1e-3; test on {config.test_tasks} tasks (seed {config.seed + 2}), mean ± "
            "95% CI. 'failed fraction' is the share of tasks whose meta-gradient solve "
            "failed in the last logs (running mean over training), 'skipped' the meta-steps "
            "with no usable task.\n",
            reporting.markdown_table(
                ["run", "train time (s)", "failed fraction", "skipped steps", "test acc. (%)"],
                [
                    [
                        r["label"],
                        r["train_seconds"],
                        r["final_train_logs"].get("failed_fraction"),
                        r["final_train_logs"].get("skipped_steps"),
                        f"{100 * r['test_accuracy']:.1f} ± {100 * r['test_ci95']:.1f}",
                    ]
                    for r in training
                ],
            ),
            "",
        ]
    return "\n".join(lines)


RULE_STYLES = {"line_search": "-", "full": "--", "fixed": ":", "damped": "-."}


def _plot(config: Config, traces: list[dict]):
    plt = reporting.pyplot()
    weights = list(dict.fromkeys(r["weights"] for r in traces))
    fig, axes = plt.subplots(
        2, len(weights), figsize=(4.2 * len(weights), 5.6), squeeze=False, sharex=True
    )
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {lam: palette[i % len(palette)] for i, lam in enumerate(config.lams)}
    steps = np.arange(config.newton_steps + 1)
    for col, w in enumerate(weights):
        for r in (r for r in traces if r["weights"] == w):
            style = RULE_STYLES[r["step_rule"]]
            label = f"lam={r['lam']:g}, {rule_label(config, r['step_rule'])}"
            axes[0, col].plot(
                steps, r["objective_median"], style, color=colors[r["lam"]], label=label
            )
            axes[1, col].plot(
                steps, r["grad_norm_median"], style, color=colors[r["lam"]], label=label
            )
        axes[0, col].set_title(f"theta: {w} weights", fontsize=10)
        axes[0, col].set_ylabel("median G(phi_k)")
        axes[1, col].set_ylabel("median ||grad G(phi_k)||")
        axes[1, col].set_yscale("log")
        axes[1, col].set_xlabel("Newton step k")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return fig


if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY)
