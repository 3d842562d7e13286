"""Study 4: how often real few-shot tasks meet the assumptions of iMAML's theory, counted.

Theorem 1 of Rajeswaran et al. (2019) bounds the error of the implicit meta-gradient when
(a) the inner problem is solved to a delta-approximate stationary point, (b) `I + H/lam` is
positive definite at the inner solution (the proximal objective is strongly convex there),
and (c) the support-loss Hessian is Lipschitz. This script measures all three on the same
Omniglot 5-way 1-shot training tasks at several checkpoints of a training run and for
several `lam`, with the paper's inner loop (gradient descent from `theta` on
`G(phi) = L_support(phi) + lam/2 ||phi - theta||^2`):

- stationarity: `||grad G(phi_K)||`, and relative to `||grad G(theta)||` (the gradient the
  inner loop starts from); a task is *not delta-stationary* when the ratio exceeds `--delta`,
  and *diverged* when it exceeds 1 (or is not finite).
- positive definiteness: the smallest eigenvalue of `I + H/lam` at `phi_K`, from
  `tf_imaml.curvature.proximal_curvature` (Lanczos). Lanczos estimates it from above, so a
  negative estimate proves indefiniteness; the counted fraction is a lower bound, and a task
  not counted is not proven positive definite. The same estimate gives the smallest
  eigenvalue of the damped systems the authors' code solves, `(1 + damping) I + H/lam` and
  `(1 + damping) I + H/(lam + lam_damping)` (`2I + H/(lam + 10)` with their defaults), by
  `system_min_eigenvalue`; these are upper bounds too. Also the largest eigenvalue `L` of `H`
  (from below) and whether `lr (lam + L) > 2`, where gradient descent on `G` is unstable.
- Hessian Lipschitz constant along the inner path: `max_k ||H(phi_{k+1}) v - H(phi_k) v|| /
  ||phi_{k+1} - phi_k||` for one random unit `v` per task (a lower bound on the local
  constant in that direction).

Checkpoints: the random initialisation, the weights every `--checkpoint_every` meta-steps
of a short iMAML run done here (`--train_steps` meta-steps of `--train_meta_batch` tasks,
lam = 2, as the shipped model was trained), and the shipped model (`--pretrained`).

`--dataset=mini_imagenet` measures mini-ImageNet training tasks instead (read from
`--data_dir`, default `$TF_IMAML_MINI_IMAGENET`), with the 32-filter net with exact max
pooling on 84x84 RGB images that `scripts/train.py` trains there; `--pretrained` then names a
mini-ImageNet model saved by `scripts/train.py` (its `model.keras`), or is empty.

Writes `<output_dir>/study_assumptions.{md,json}` and PNG histograms.

Usage:
  python scripts/studies/assumptions.py --output_dir=docs/studies/assumptions
  python scripts/studies/assumptions.py --tiny --output_dir=/tmp/assumptions  # a smoke run
  python scripts/studies/assumptions.py --dataset=mini_imagenet --inner_steps=5 \
      --inner_learning_rate=0.01 --train_steps=0 --pretrained=runs/mini_imagenet/model.keras
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
from tf_imaml import tree

DATASETS = ("omniglot", "mini_imagenet")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_assumptions", "Where results go.")
    lams: tuple[float, ...] = option(
        (0.5, 1.0, 2.0, 5.0, 10.0), "Proximal strengths lam.", tiny=(0.5, 10.0)
    )
    num_tasks: int = option(64, "Tasks per checkpoint and lam.", lower_bound=1, tiny=2)
    task_batch: int = option(8, "Tasks evaluated together.", lower_bound=1, tiny=2)
    inner_steps: int = option(16, "Inner GD steps K.", lower_bound=1, tiny=3)
    inner_learning_rate: float = option(0.1, "Inner GD step size.")
    lanczos_iterations: int = option(20, "Lanczos iterations.", lower_bound=2, tiny=4)
    delta: float = option(0.1, "Not delta-stationary: ||grad G(phi_K)|| > delta ||grad G(theta)||.")
    damping: float = option(
        1.0, "The damped systems' extra identity term (the authors' cg_damping: 1)."
    )
    lam_damping: float = option(
        10.0, "Added to lam in the authors' system (their lam_damping: 10)."
    )
    train_steps: int = option(200, "Meta-steps of the short run.", tiny=1)
    checkpoint_every: int = option(100, "Meta-steps per checkpoint.", tiny=1)
    train_meta_batch: int = option(8, "Tasks per meta-step.", tiny=2)
    pretrained: str = option(str(harness.PRETRAINED), "Shipped model ('' = none).", tiny="")
    image_size: int | None = option(
        None, "Image side (default 28 for Omniglot, 84 for mini-ImageNet).", lower_bound=8, tiny=14
    )
    filters: int | None = option(
        None, "Conv filters (default 64, the shipped net; 32 on mini-ImageNet).", tiny=8
    )
    seed: int = option(0, "Seed for weights, tasks and Lanczos.")
    dataset: str = option("omniglot", "Which tasks to measure.", choices=DATASETS)
    data_dir: str | None = option(
        None, "Dataset folder (default: the bundled Omniglot, $TF_IMAML_MINI_IMAGENET)."
    )
    ways: int = option(5, "Classes per task.", lower_bound=2)
    verbose: bool = option(True, "Print progress.", flag=False)

    @property
    def size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return 84 if self.dataset == "mini_imagenet" else 28

    @property
    def num_filters(self) -> int:
        if self.filters is not None:
            return self.filters
        return 32 if self.dataset == "mini_imagenet" else 64

    def validate(self) -> None:
        if not self.lams or min(self.lams) <= 0:
            raise ValueError(f"--lams must be positive, got {self.lams}")
        if self.inner_learning_rate <= 0 or self.delta <= 0:
            raise ValueError("--inner_learning_rate and --delta must be > 0")
        if not (self.damping >= 0 and self.lam_damping >= 0):
            raise ValueError(
                f"--damping and --lam_damping must be >= 0, got {self.damping}, {self.lam_damping}"
            )
        if self.train_steps and (
            self.checkpoint_every < 1 or self.train_steps % self.checkpoint_every
        ):
            raise ValueError("--train_steps must be a multiple of --checkpoint_every")
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.pretrained and not pathlib.Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained {self.pretrained} is not a file")
        if self.dataset == "mini_imagenet" and self.pretrained == str(harness.PRETRAINED):
            raise ValueError(
                "the shipped model is an Omniglot model: with --dataset=mini_imagenet pass "
                "--pretrained=<a mini-ImageNet model.keras from scripts/train.py> or --pretrained="
            )
        if self.dataset == "mini_imagenet" and self.data_dir is None:
            if tf_imaml.mini_imagenet.default_path() is None:
                raise ValueError("--dataset=mini_imagenet needs --data_dir")


TINY = harness.tiny_values(Config)


def system_min_eigenvalue(min_eig, lam, *, damping: float = 0.0, lam_damping: float = 0.0):
    """The smallest-eigenvalue estimate of `(1 + damping) I + H/(lam + lam_damping)`.

    `min_eig` is the smallest Ritz value `r` of `I + H/lam` (Lanczos, as
    `proximal_curvature` returns it). A shift and positive scaling of a matrix leaves its
    Krylov spaces unchanged and moves its Ritz values by the same affine map, so the Ritz
    value of `H` from the same run is `mu = lam (r - 1)`, and that of the other system is

        1 + damping + mu / (lam + lam_damping).

    This is the value a Lanczos run on that system with the same start vector would return,
    and, like `r`, an upper bound on the true smallest eigenvalue (`mu >= lambda_min(H)` and
    the map increases with `mu`): a negative value proves the system indefinite, a positive
    one proves nothing.

    Args:
      min_eig: Estimates of `lambda_min(I + H/lam)`, any shape.
      lam: The proximal strength they were taken at, `> 0`.
      damping: The extra identity term, `>= 0`. Default value: `0.0`.
      lam_damping: Added to `lam` in the system, `>= 0`. Default value: `0.0`.

    Returns:
      The estimates for the damped system, an array shaped like `min_eig`.
    """
    hessian_min = lam * (np.asarray(min_eig, np.float64) - 1.0)
    return 1.0 + damping + hessian_min / (lam + lam_damping)


def systems(config: Config) -> dict[str, tuple[str, float, float]]:
    """`{per-task key: (label, damping, lam_damping)}` of the systems whose definiteness is counted."""
    d, ld = config.damping, config.lam_damping
    return {
        "min_eig": ("I+H/lam", 0.0, 0.0),
        "min_eig_damped": (f"{1 + d:g}I+H/lam", d, 0.0),
        "min_eig_authors": (f"{1 + d:g}I+H/(lam+{ld:g})", d, ld),
    }


def _learner(config: Config) -> keras.Model:
    mini = config.dataset == "mini_imagenet"  # as scripts/train.py builds it there
    return fewshot.learner(
        ways=config.ways,
        image_size=config.size,
        filters=config.num_filters,
        channels=3 if mini else 1,
        pooling="max" if mini else None,
        seed=config.seed,
    )


def _load_data(config: Config):
    if config.dataset == "mini_imagenet":
        return tf_imaml.mini_imagenet.load_mini_imagenet("train", path=config.data_dir)
    return tf_imaml.datasets.load_omniglot("train", image_size=config.size, path=config.data_dir)


def _load_pretrained(config: Config) -> list[np.ndarray] | None:
    """The `--pretrained` model's learner weights, checked against the configured net."""
    if not config.pretrained:
        return None
    weights = fewshot.pretrained_weights(config.pretrained)
    expected = [tuple(v.shape) for v in _learner(config).trainable_variables]
    if [w.shape for w in weights] != expected:
        raise ValueError(
            f"--pretrained {config.pretrained} does not fit the {config.dataset} net of this "
            f"study ({config.ways} ways, {config.num_filters} filters, {config.size}x"
            f"{config.size} images): weight shapes {[w.shape for w in weights]} vs {expected}"
        )
    return weights


def _episodes(config: Config, data, *, seed: int, batch: int, num_tasks: int | None, queries):
    return fewshot.episodes(
        data,
        ways=config.ways,
        queries=queries,
        batch=batch,
        seed=seed,
        num_tasks=num_tasks,
        dataset=config.dataset,
        image_size=None if config.size == 84 else config.size,
    )


def checkpoints(config: Config, data, pretrained=None) -> dict[str, list[np.ndarray]]:
    """Learner weights by name: init, every `checkpoint_every` meta-steps, the shipped model."""
    learner = _learner(config)
    weights = {"init": [v.numpy() for v in learner.trainable_variables]}
    if config.train_steps:
        meta = tf_imaml.ImplicitMAML(
            learner,
            lam=2.0,
            inner_steps=config.inner_steps,
            inner_learning_rate=config.inner_learning_rate,
        )
        fewshot.compile_meta(meta, metrics=None)
        episodes = _episodes(
            config,
            data,
            seed=config.seed,
            batch=config.train_meta_batch,
            num_tasks=None,
            queries=15,
        ).take(config.train_steps)
        start = time.time()
        for epoch in range(config.train_steps // config.checkpoint_every):
            logs = meta.fit(
                episodes.skip(epoch * config.checkpoint_every),
                epochs=1,
                steps_per_epoch=config.checkpoint_every,
                verbose=0,
            ).history
            step = (epoch + 1) * config.checkpoint_every
            weights[f"imaml_step{step}"] = [v.numpy() for v in learner.trainable_variables]
            harness.log(
                config.verbose,
                f"  short run: {step} meta-steps, {time.time() - start:.0f} s, "
                f"failed_fraction {logs['failed_fraction'][-1]:.2f}",
            )
    if pretrained is not None:
        weights["shipped" if config.dataset == "omniglot" else "pretrained"] = pretrained
    return weights


def make_measure_fn(learner: keras.Model, config: Config):
    """A `tf.function`: (theta, support_x, support_y, lam) -> per-task diagnostics `[T]`."""
    gd = tf_imaml.inner_solvers.gradient_descent(config.inner_learning_rate)

    @tf.function(reduce_retracing=True)
    def measure(theta, support_x, support_y, lam):
        num_tasks = tf.shape(support_x)[0]
        theta = tree.broadcast_to_tasks(theta, num_tasks)

        def loss_fn(params):
            logits = tf_imaml.batched.apply(learner, params, support_x)
            per_example = keras.losses.sparse_categorical_crossentropy(
                support_y, logits, from_logits=True
            )
            return tf.reduce_mean(per_example, axis=1)

        _, grad_theta = tf_imaml.hvp.value_and_grad(loss_fn, theta)  # grad G(theta)
        v = tf_imaml.tree.unflatten_tasks(
            tf.math.l2_normalize(
                tf.random.stateless_normal(
                    tf.shape(tree.flatten_tasks(theta)), seed=[config.seed, 1]
                ),
                axis=1,
            ),
            theta,
        )

        def body(k, phi, hv, lipschitz):  # the paper's loop, one library step at a time
            step = tf_imaml.inner_solvers.minimize_proximal(
                loss_fn, theta, lam=lam, num_steps=1, optimizer=gd, init_params=phi
            )
            hv_next = tf_imaml.hvp.hvp(loss_fn, step.adapted_params, v)
            moved = tree.norm(tree.sub(step.adapted_params, phi))
            ratio = tf.math.divide_no_nan(tree.norm(tree.sub(hv_next, hv)), moved)
            lipschitz = tf.maximum(lipschitz, tf.where(moved > 1e-7, ratio, 0.0))
            return k + 1, step.adapted_params, hv_next, lipschitz

        _, phi, _, lipschitz = tf.while_loop(
            lambda k, *_: k < config.inner_steps,
            body,
            (tf.constant(0), theta, tf_imaml.hvp.hvp(loss_fn, theta, v), tf.zeros([num_tasks])),
        )
        step = tf_imaml.inner_solvers.minimize_proximal(
            loss_fn, theta, lam=lam, num_steps=0, optimizer=gd, init_params=phi
        )  # no step: the diagnostics of phi_K
        lanczos = tf_imaml.curvature.proximal_curvature(
            loss_fn, phi, lam=lam, num_iter=config.lanczos_iterations, seed=config.seed
        )
        return {
            "grad_norm": step.grad_norm,
            "grad_norm_start": tree.norm(grad_theta),
            "support_loss": step.support_loss,
            "min_eig": lanczos.min_eigenvalue,  # of I + H/lam
            "hessian_max_eig": lam * (lanczos.max_eigenvalue - 1.0),
            "lipschitz": lipschitz,
        }

    return measure


def measure_all(config: Config, weights: dict, data) -> dict:
    """Per-task diagnostics: {checkpoint: {lam: {name: [num_tasks] list}}}."""
    learner = _learner(config)
    measure = make_measure_fn(learner, config)
    seed, batch = config.seed + 100, config.task_batch  # the same tasks at every checkpoint
    tasks = list(
        _episodes(config, data, seed=seed, batch=batch, num_tasks=config.num_tasks, queries=1)
    )
    results, start = {}, time.time()
    for name, theta in weights.items():
        theta = [tf.constant(w) for w in theta]
        results[name] = {}
        for lam in config.lams:
            parts = [
                measure(theta, sx, sy, tf.constant(lam, tf.float32)) for (sx, sy, _), _ in tasks
            ]
            values = fewshot.concat_tasks(parts, config.num_tasks)
            values["rel_grad_norm"] = values["grad_norm"] / values["grad_norm_start"]
            for key, (_, damping, lam_damping) in systems(config).items():
                if key != "min_eig":
                    values[key] = system_min_eigenvalue(
                        values["min_eig"], lam, damping=damping, lam_damping=lam_damping
                    )
            results[name][lam] = values
            harness.log(
                config.verbose,
                f"  {name} lam={lam:g}: indefinite {np.mean(values['min_eig'] < 0):.2f}, "
                f"median ||grad G|| ratio {np.median(values['rel_grad_norm']):.3g} "
                f"({time.time() - start:.0f} s)",
            )
    return results


def summarize(config: Config, results: dict) -> list[dict]:
    """One row per checkpoint and lam: violation fractions and medians."""
    rows = []
    for name, by_lam in results.items():
        for lam, v in by_lam.items():
            rel = v["rel_grad_norm"]
            diverged = ~np.isfinite(rel) | (rel > 1.0)
            # phi_K not finite counts as unstable too (its L is NaN).
            lr_unstable = ~(config.inner_learning_rate * (lam + v["hessian_max_eig"]) <= 2.0)
            rows.append(
                {
                    "checkpoint": name,
                    "lam": lam,
                    "num_tasks": int(rel.size),
                    "not_delta_stationary": float(np.mean(~(rel <= config.delta))),
                    "diverged": float(np.mean(diverged)),
                    **{
                        f"{prefix}{key.replace('min_eig', 'indefinite')}": value
                        for key in systems(config)
                        for prefix, value in (
                            ("", float(np.mean(~(v[key] > 0)))),
                            ("num_", int(np.sum(~(v[key] > 0)))),
                        )
                    },
                    "lr_unstable": float(np.mean(lr_unstable)),
                    "median_grad_norm": float(np.median(v["grad_norm"])),
                    "median_rel_grad_norm": float(np.median(rel)),
                    "median_min_eig": float(np.median(v["min_eig"])),
                    "median_hessian_min_eig": float(np.median(lam * (v["min_eig"] - 1.0))),
                    "median_hessian_max_eig": float(np.median(v["hessian_max_eig"])),
                    "median_lipschitz": float(np.median(v["lipschitz"])),
                    "max_lipschitz": float(np.max(v["lipschitz"])),
                }
            )
    return rows


def columns(config: Config) -> tuple[tuple[str, str], ...]:
    """`(row key, title)` of the table: COLUMNS with the indefinite counts of every system."""
    counts = tuple(
        (f"num_{key.replace('min_eig', 'indefinite')}", f"{label} indefinite (tasks)")
        for key, (label, _, _) in systems(config).items()
    )
    return COLUMNS[:5] + counts + COLUMNS[5:]


COLUMNS = (
    ("checkpoint", "checkpoint"),
    ("lam", "lam"),
    ("num_tasks", "tasks"),
    ("not_delta_stationary", "not delta-stationary"),
    ("diverged", "inner GD diverged"),
    ("indefinite", "I+H/lam indefinite"),
    ("lr_unstable", "lr (lam+L) > 2"),
    ("median_rel_grad_norm", "median ‖∇G(φ)‖/‖∇G(θ)‖"),
    ("median_grad_norm", "median ‖∇G(φ)‖"),
    ("median_min_eig", "median λmin(I+H/lam)"),
    ("median_hessian_min_eig", "median λmin(H)"),
    ("median_hessian_max_eig", "median L = λmax(H)"),
    ("median_lipschitz", "median Hessian-Lipschitz est."),
    ("max_lipschitz", "max Hessian-Lipschitz est."),
)


def plot(config: Config, results: dict) -> dict:
    """Histograms by checkpoint and lam: `{file name: figure}`."""
    plt = reporting.pyplot()
    names = list(results)
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(names)))
    figures = {}
    for key, title, log in (
        ("min_eig", "smallest eigenvalue of I + H/lam at phi_K (Lanczos)", False),
        ("rel_grad_norm", "||grad G(phi_K)|| / ||grad G(theta)||", True),
    ):
        fig, axes = plt.subplots(
            1, len(config.lams), figsize=(3.0 * len(config.lams), 2.8), squeeze=False
        )
        for ax, lam in zip(axes[0], config.lams, strict=True):
            for name, color in zip(names, colors, strict=True):
                x = results[name][lam][key]
                x = x[np.isfinite(x)]
                if log:
                    x = np.log10(np.maximum(x, 1e-12))
                ax.hist(x, bins=20, alpha=0.5, color=color, label=name)
            ax.axvline(np.log10(config.delta) if log else 0.0, color="red", lw=1)
            ax.set_title(f"lam = {lam:g}", fontsize=9)
            ax.set_xlabel("log10 ratio" if log else "eigenvalue", fontsize=8)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6)
        fig.suptitle(title + f" ({config.num_tasks} tasks; red: threshold)", fontsize=9)
        figures[f"study_assumptions_{key}.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3))
    lam = config.lams[len(config.lams) // 2]
    for name, color in zip(names, colors, strict=True):
        x = results[name][lam]["lipschitz"]
        ax.hist(np.log10(np.maximum(x[np.isfinite(x)], 1e-12)), bins=20, alpha=0.5, color=color)
        ax.plot([], [], color=color, label=name)
    ax.set_xlabel("log10 max_k ||H(phi_k+1)v - H(phi_k)v|| / ||phi_k+1 - phi_k||", fontsize=8)
    ax.set_title(f"Hessian-Lipschitz estimate along the inner path (lam = {lam:g})", fontsize=9)
    ax.legend(fontsize=7)
    figures["study_assumptions_lipschitz.png"] = fig
    return figures


def run(config: Config) -> dict:
    """Measures every checkpoint at every lam; writes the table, JSON and histograms."""
    out = harness.output_folder(config, deterministic=True)
    start = time.time()
    pretrained = _load_pretrained(config)  # before any work: a model that does not fit fails
    data = _load_data(config)
    harness.log(config.verbose, "checkpoints ...")
    weights = checkpoints(config, data, pretrained)
    train_seconds = time.time() - start
    harness.log(
        config.verbose, f"measuring {len(weights)} checkpoints x {len(config.lams)} lam ..."
    )
    results = measure_all(config, weights, data)
    rows = summarize(config, results)
    figures = plot(config, results)
    plots = list(figures)
    seconds = time.time() - start
    header = (
        f"{'mini-ImageNet' if config.dataset == 'mini_imagenet' else 'Omniglot'} "
        f"{config.ways}-way 1-shot training tasks ({config.num_tasks} per checkpoint, the same "
        f"tasks everywhere), conv net with {config.num_filters} filters on "
        f"{config.size}x{config.size} images; inner loop {config.inner_steps} GD "
        f"steps of {config.inner_learning_rate:g} from theta; Lanczos "
        f"{config.lanczos_iterations} iterations; delta = {config.delta:g} (relative). "
        f"Checkpoints: {', '.join(weights)}. Fractions of tasks; L is the Lanczos estimate of "
        "the support-loss Hessian's largest eigenvalue at phi_K.\n\n"
        "Counts of tasks whose system is provably indefinite (a negative smallest Ritz value) "
        "beside the paper's `I + H/lam`: the authors' code solves "
        f"`{1 + config.damping:g} I + H/(lam + {config.lam_damping:g})` "
        "(cg_damping and lam_damping), and `"
        f"{1 + config.damping:g} I + H/lam` shows the identity term alone. All three come from the "
        "same Lanczos run on `I + H/lam` (Ritz value `r`, Hessian Ritz value `lam (r - 1)`, "
        "mapped to each system). Lanczos bounds the smallest eigenvalue from above: a count is "
        "a lower bound, and a zero count is not a proof of positive definiteness."
    )
    cols = columns(config)
    table = reporting.markdown_table(
        [title for _, title in cols], [[row[k] for k, _ in cols] for row in rows]
    )
    markdown = (
        f"## Study 4: iMAML's assumptions on real tasks\n\n{header}\n\n{table}\n\n"
        + reporting.image_links(plots)
        + f"\nWall time {seconds:.0f} s (short training run {train_seconds:.0f} s).\n"
    )
    summary = {
        "config": dataclasses.asdict(config),
        "command": harness.command("assumptions"),
        "rows": rows,
        "per_task": {
            name: {str(lam): {k: v.tolist() for k, v in d.items()} for lam, d in by_lam.items()}
            for name, by_lam in results.items()
        },
        "plots": plots,
        "seconds": round(seconds, 1),
        "train_seconds": round(train_seconds, 1),
    }
    reporting.write(
        out, "study_assumptions", markdown=markdown, data=summary, figures=figures, dpi=80
    )
    harness.log(config.verbose, f"done in {seconds:.0f} s; results in {out}")
    return summary


if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY)
