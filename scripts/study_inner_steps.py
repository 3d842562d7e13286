"""Study 3: accuracy against the number of inner steps, in training and at test time.

iMAML-GD and MAML are meta-trained on Omniglot N-way K-shot from the same initial weights on
the same stream of training episodes, for the same number of meta-steps, each with its own
number of training inner steps `K_train`. Every trained model (and, optionally, the shipped
pretrained iMAML model) is then adapted with each test-time `K_test` to the same held-out
test tasks; the query accuracy is reported as mean +- 95% CI over tasks. `K_test = 0` is the
unadapted meta-initialisation; the script also scores it directly with the learner (no
meta-learner code in between) as a check.

Writes `<output_dir>/inner_steps.md` (the tables), `inner_steps.json` (every number, the
per-task accuracies included) and `inner_steps.png` (accuracy against `K_test`).

Usage:
  python scripts/study_inner_steps.py --output_dir=runs/study_inner_steps
  python scripts/study_inner_steps.py --tiny --output_dir=/tmp/inner_steps   # smoke run
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import tf_imaml  # noqa: E402
from tf_imaml import reporting  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "tf_imaml" / "pretrained" / "omniglot_5way_1shot.keras"
NAME = "inner_steps"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    output_dir: str = "runs/study_inner_steps"
    imaml_train_steps: tuple[int, ...] = (1, 5, 16)
    maml_train_steps: tuple[int, ...] = (1, 5)
    fomaml_train_steps: tuple[int, ...] = ()
    test_steps: tuple[int, ...] = (0, 1, 2, 5, 10, 16, 25, 50)
    meta_steps: int = 150
    meta_batch_size: int = 8
    test_tasks: int = 200
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 28
    filters: int = 64
    lam: float = 2.0
    imaml_inner_learning_rate: float = 0.1
    maml_inner_learning_rate: float = 0.4
    cg_steps: int = 5
    outer_learning_rate: float = 1e-3
    on_failure: str = "first_order"
    pretrained: str = str(PRETRAINED)
    seed: int = 0
    log_every: int = 25

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        for name in ("imaml_train_steps", "maml_train_steps", "fomaml_train_steps"):
            if any(k < 0 for k in getattr(self, name)):
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not (
            self.imaml_train_steps
            or self.maml_train_steps
            or self.fomaml_train_steps
            or self.pretrained
        ):
            raise ValueError("no model: all --*_train_steps and --pretrained are empty")
        if not self.test_steps or any(k < 0 for k in self.test_steps):
            raise ValueError(f"--test_steps must be non-empty, each >= 0: {self.test_steps}")
        for name in ("lam", "imaml_inner_learning_rate", "maml_inner_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.pretrained and not pathlib.Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained {self.pretrained} is not a file")


def tiny_config(output_dir: str) -> StudyConfig:
    """The smoke-run configuration (also what `--tiny` uses)."""
    return StudyConfig(
        output_dir=output_dir,
        imaml_train_steps=(1,),
        maml_train_steps=(1,),
        test_steps=(0, 3),
        meta_steps=2,
        meta_batch_size=2,
        test_tasks=4,
        queries=3,
        image_size=14,
        filters=8,
        log_every=1,
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    algorithm: str  # "imaml", "maml" or "fomaml".
    train_steps: int

    @property
    def label(self) -> str:
        name = {"imaml": "iMAML-GD", "maml": "MAML", "fomaml": "FO-MAML"}[self.algorithm]
        return f"{name} K_train={self.train_steps}"


class _Progress(keras.callbacks.Callback):
    """Prints the running training metrics every `every` meta-steps."""

    def __init__(self, label: str, total: int, every: int):
        super().__init__()
        self.label, self.total, self.every = label, total, every
        self.start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        done = batch + 1
        if done % self.every and done != self.total:
            return
        logs = logs or {}
        parts = [
            f"{k} {float(logs[k]):.3f}"
            for k in ("loss", "sparse_categorical_accuracy", "failed_fraction")
            if k in logs
        ]
        print(
            f"  [{self.label}] step {done}/{self.total} ({time.time() - self.start:.0f} s) "
            + ", ".join(parts),
            flush=True,
        )


def _episodes(config: StudyConfig, data, *, seed: int, num_tasks: int | None, batch: int):
    return tf_imaml.episodes.few_shot_episodes(
        data.images,
        data.labels,
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        meta_batch_size=batch,
        seed=seed,
        rotations=(0, 90, 180, 270),
        num_batches=None if num_tasks is None else -(-num_tasks // batch),
    )


def _build(config: StudyConfig, spec: ModelSpec, learner: keras.Model):
    if spec.algorithm == "imaml":
        meta = tf_imaml.ImplicitMAML(
            learner,
            lam=config.lam,
            inner_steps=spec.train_steps,
            inner_learning_rate=config.imaml_inner_learning_rate,
            cg_steps=config.cg_steps,
            on_failure=config.on_failure,
        )
    else:
        meta = tf_imaml.MAML(
            learner,
            inner_steps=spec.train_steps,
            inner_learning_rate=config.maml_inner_learning_rate,
            first_order=spec.algorithm == "fomaml",
        )
    meta.compile(
        optimizer=keras.optimizers.Adam(config.outer_learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )
    return meta


def unadapted_accuracy(learner: keras.Model, episodes) -> np.ndarray:
    """Per-task query accuracy of the learner's own weights, called task by task.

    The learner normalizes each task's query set by its own statistics, as the meta-learner
    does, so this must equal the meta-learner's accuracy with 0 inner steps.
    """
    accuracies = []
    for (_, _, query_x), query_y in episodes:
        for t in range(query_x.shape[0]):
            logits = learner(query_x[t], training=True)
            hits = np.argmax(logits.numpy(), axis=-1) == query_y[t].numpy()
            accuracies.append(hits.mean())
    return np.asarray(accuracies)


def sweep_test_steps(meta, episodes, test_steps, *, label: str) -> list[dict]:
    """Adapts `meta` with every `K_test` to the same episodes: one row per `K_test`."""
    rows = []
    for k in test_steps:
        meta.inner_steps = int(k)
        meta.make_predict_function(force=True)
        start = time.time()
        accuracy = tf_imaml.evaluation.few_shot_accuracy(meta, episodes)
        rows.append(
            {
                "test_steps": int(k),
                "accuracy": accuracy.mean,
                "ci95": accuracy.ci95,
                "num_tasks": accuracy.num_tasks,
                "eval_seconds": round(time.time() - start, 2),
                "per_task": accuracy.per_task.tolist(),
            }
        )
        print(
            f"  [{label}] K_test={k}: {100 * accuracy.mean:.2f} +- {100 * accuracy.ci95:.2f}%",
            flush=True,
        )
    return rows


def run(config: StudyConfig, *, verbose: bool = True) -> dict:
    """Trains every model, sweeps K_test, writes the md/json/png; returns the results."""
    del verbose  # Progress always goes to stdout; the tests capture it.
    config.validate()
    out = pathlib.Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf.config.experimental.enable_op_determinism()
    specs = (
        [ModelSpec("imaml", k) for k in config.imaml_train_steps]
        + [ModelSpec("maml", k) for k in config.maml_train_steps]
        + [ModelSpec("fomaml", k) for k in config.fomaml_train_steps]
    )
    load = dict(image_size=config.image_size)
    train_data = tf_imaml.datasets.load_omniglot("train", **load) if specs else None
    test_data = tf_imaml.datasets.load_omniglot("test", **load)
    eval_batch = min(20, config.test_tasks)
    test_episodes = _episodes(
        config, test_data, seed=config.seed + 2, num_tasks=config.test_tasks, batch=eval_batch
    ).cache()
    keras.utils.set_random_seed(config.seed)
    base = tf_imaml.models.conv4_classifier(
        config.ways, input_shape=(config.image_size,) * 2 + (1,), filters=config.filters
    )
    init_weights = base.get_weights()
    models = []
    for spec in specs:
        print(f"training {spec.label} for {config.meta_steps} meta-steps", flush=True)
        keras.utils.set_random_seed(config.seed)
        learner = keras.models.clone_model(base)
        learner.set_weights(init_weights)
        meta = _build(config, spec, learner)
        train_episodes = _episodes(
            config,
            train_data,
            seed=config.seed,
            num_tasks=config.meta_steps * config.meta_batch_size,
            batch=config.meta_batch_size,
        )
        start = time.time()
        history = meta.fit(
            train_episodes,
            epochs=1,
            steps_per_epoch=config.meta_steps,
            verbose=0,
            callbacks=[_Progress(spec.label, config.meta_steps, config.log_every)],
        )
        train_seconds = time.time() - start
        unadapted = unadapted_accuracy(meta.learner, test_episodes)
        rows = sweep_test_steps(meta, test_episodes, config.test_steps, label=spec.label)
        models.append(
            {
                "label": spec.label,
                "algorithm": spec.algorithm,
                "train_steps": spec.train_steps,
                "meta_steps": config.meta_steps,
                "train_seconds": round(train_seconds, 1),
                "seconds_per_meta_step": train_seconds / config.meta_steps,
                "final_train_logs": {k: float(v[-1]) for k, v in history.history.items()},
                "unadapted_accuracy": float(unadapted.mean()),
                "unadapted_per_task": unadapted.tolist(),
                "rows": rows,
            }
        )
        _write(config, out, models)  # After every model, so a stopped run keeps its part.
    if config.pretrained:
        meta = keras.models.load_model(config.pretrained)
        size = int(meta.learner.inputs[0].shape[1])
        episodes = test_episodes
        if size != config.image_size:
            data = tf_imaml.datasets.load_omniglot("test", image_size=size)
            episodes = _episodes(
                config, data, seed=config.seed + 2, num_tasks=config.test_tasks, batch=eval_batch
            ).cache()
        label = f"shipped iMAML-GD K_train={meta.inner_steps}"
        print(f"sweeping K_test for {label} ({config.pretrained})", flush=True)
        train_k = meta.inner_steps
        unadapted = unadapted_accuracy(meta.learner, episodes)
        models.append(
            {
                "label": label,
                "algorithm": "imaml",
                "train_steps": train_k,
                "meta_steps": 1000,
                "train_seconds": None,
                "seconds_per_meta_step": None,
                "pretrained": str(config.pretrained),
                "image_size": size,
                "unadapted_accuracy": float(unadapted.mean()),
                "unadapted_per_task": unadapted.tolist(),
                "rows": sweep_test_steps(meta, episodes, config.test_steps, label=label),
            }
        )
    return _write(config, out, models)


def _write(config: StudyConfig, out: pathlib.Path, models: list[dict]) -> dict:
    results = {"config": dataclasses.asdict(config), "models": models}
    reporting.write_json(out / f"{NAME}.json", results)
    (out / f"{NAME}.md").write_text(_markdown(config, models))
    _plot(config, models, out / f"{NAME}.png")
    return results


# Config fields that must agree for runs to be merged: the same test tasks and K_test values
# for every run; the same training setting (init, episodes, meta-steps) for runs that train.
_TEST_FIELDS = ("test_steps", "test_tasks", "ways", "shots", "queries", "seed")
_TRAIN_FIELDS = (
    "meta_steps",
    "meta_batch_size",
    "image_size",
    "filters",
    "lam",
    "imaml_inner_learning_rate",
    "maml_inner_learning_rate",
    "cg_steps",
    "outer_learning_rate",
    "on_failure",
)


def _trains(config: dict) -> bool:
    keys = ("imaml_train_steps", "maml_train_steps", "fomaml_train_steps")
    return any(config[k] for k in keys)


def merge(paths: list[str], output_dir: str) -> dict:
    """Combines several runs' `inner_steps.json` (same setting) into one md/json/png.

    Raises:
      ValueError: If the runs differ in a field of `_TEST_FIELDS`, or two runs that train
        differ in one of `_TRAIN_FIELDS`.
    """
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    training_runs = [r for r in runs if _trains(r["config"])] or runs
    first = training_runs[0]["config"]
    for path, r in zip(paths, runs, strict=True):
        shared = _TEST_FIELDS + (_TRAIN_FIELDS if _trains(r["config"]) else ())
        for field in shared:
            if r["config"][field] != first[field]:
                raise ValueError(
                    f"{path} has {field}={r['config'][field]!r}, another run has {first[field]!r}"
                )
    models = [m for r in runs for m in r["models"]]
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    combined = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items() if k in fields}
    for key in ("imaml_train_steps", "maml_train_steps", "fomaml_train_steps"):
        combined[key] = tuple(k for r in runs for k in r["config"][key])
    combined["pretrained"] = next(
        (r["config"]["pretrained"] for r in runs if r["config"]["pretrained"]), ""
    )
    combined["output_dir"] = output_dir
    config = StudyConfig(**combined)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _write(config, out, models)
    results["merged_from"] = [str(p) for p in paths]
    reporting.write_json(out / f"{NAME}.json", results)
    return results


def _pct(row) -> str:
    return f"{100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f}"


def _markdown(config: StudyConfig, models: list[dict]) -> str:
    setting = (
        f"Omniglot {config.ways}-way {config.shots}-shot, {config.queries} queries per class, "
        f"{config.image_size}x{config.image_size} images, conv4 with {config.filters} filters. "
        f"Trained models: {config.meta_steps} meta-steps at meta-batch "
        f"{config.meta_batch_size}, Adam {config.outer_learning_rate:g}, same initial weights "
        f"and training episodes (seed {config.seed}); iMAML-GD lam = {config.lam:g}, inner "
        f"step {config.imaml_inner_learning_rate:g}, {config.cg_steps} CG steps, a task whose "
        f"solve failed handled by on_failure={config.on_failure!r}; MAML inner "
        f"step {config.maml_inner_learning_rate:g}. Test: the same {config.test_tasks} tasks "
        f"(seed {config.seed + 2}) for every model and K_test; query accuracy in %, mean ± "
        "95% CI over tasks."
    )
    headers = ["model", "train time (s)", "s / meta-step", "failed fraction"] + [
        f"K_test={k}" for k in config.test_steps
    ]
    rows = []
    for m in models:
        per_step = m["seconds_per_meta_step"]
        rows.append(
            [
                m["label"],
                m["train_seconds"],
                None if per_step is None else round(per_step, 2),
                m.get("final_train_logs", {}).get("failed_fraction"),
            ]
            + [_pct(r) for r in m["rows"]]
        )
    best_rows = []
    for m in models:
        best = max(m["rows"], key=lambda r: r["accuracy"])
        at_train = [r for r in m["rows"] if r["test_steps"] == m["train_steps"]]
        best_rows.append(
            [
                m["label"],
                f"{100 * m['unadapted_accuracy']:.1f}",
                _pct(at_train[0]) if at_train else None,
                f"{best['test_steps']}",
                _pct(best),
            ]
        )
    lines = [
        f"## Accuracy against inner steps (K_train, K_test)\n\n{setting}\n",
        reporting.markdown_table(headers, rows),
        "\n'failed fraction': share of training tasks whose iMAML linear solve failed "
        "(running mean over the whole run; MAML tasks fail only on non-finite values). The "
        "shipped model's row is its own training run (1000 meta-steps, on_failure='drop', "
        "tf_imaml/pretrained/README.md), not part of this command's training.\n",
        "### Best K_test per model\n",
        reporting.markdown_table(
            [
                "model",
                "unadapted (learner called directly)",
                "at K_test = K_train",
                "best K_test",
                "accuracy there",
            ],
            best_rows,
        ),
        "",
    ]
    return "\n".join(lines)


def _plot(config: StudyConfig, models: list[dict], path: pathlib.Path) -> None:
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m in models:
        ks = [r["test_steps"] for r in m["rows"]]
        acc = [100 * r["accuracy"] for r in m["rows"]]
        ci = [100 * r["ci95"] for r in m["rows"]]
        style = "-" if m["algorithm"] == "imaml" else "--"
        line = ax.errorbar(ks, acc, yerr=ci, fmt=style + "o", ms=3, capsize=2, label=m["label"])
        if m["train_steps"] in ks:
            i = ks.index(m["train_steps"])
            ax.plot(ks[i], acc[i], "*", ms=12, color=line[0].get_color())
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(list(config.test_steps))
    ax.set_xticklabels([str(k) for k in config.test_steps])
    ax.axhline(100 / config.ways, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("inner steps at test time K_test (star: K_train)")
    ax.set_ylabel("test query accuracy (%)")
    ax.set_title(
        f"Omniglot {config.ways}-way {config.shots}-shot, {config.test_tasks} test tasks, "
        f"{config.meta_steps} meta-steps",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    reporting.save_figure(fig, path)


def define_flags() -> None:
    """Defines the command-line flags (only when run as a script: tests import this file)."""
    flags.DEFINE_string("output_dir", "runs/study_inner_steps", "Where results go.")
    flags.DEFINE_list("imaml_train_steps", ["1", "5", "16"], "iMAML-GD K_train values.")
    flags.DEFINE_list("maml_train_steps", ["1", "5"], "Second-order MAML K_train values.")
    flags.DEFINE_list("fomaml_train_steps", [], "First-order MAML K_train values.")
    flags.DEFINE_list("test_steps", ["0", "1", "2", "5", "10", "16", "25", "50"], "K_test values.")
    flags.DEFINE_integer("meta_steps", 150, "Meta-steps per model.", lower_bound=1)
    flags.DEFINE_integer("meta_batch_size", 8, "Tasks per meta-step.", lower_bound=1)
    flags.DEFINE_integer("test_tasks", 200, "Test tasks.", lower_bound=2)
    flags.DEFINE_integer("ways", 5, "Classes per task.", lower_bound=2)
    flags.DEFINE_integer("shots", 1, "Support examples per class.", lower_bound=1)
    flags.DEFINE_integer("queries", 15, "Query examples per class.", lower_bound=1)
    flags.DEFINE_integer("image_size", 28, "Image side.", lower_bound=8)
    flags.DEFINE_integer("filters", 64, "Channels of the conv net.", lower_bound=1)
    flags.DEFINE_float("lam", 2.0, "iMAML proximal strength lambda.")
    flags.DEFINE_float("imaml_inner_learning_rate", 0.1, "iMAML inner GD step size.")
    flags.DEFINE_float(
        "maml_inner_learning_rate", 0.4, "MAML inner step size (0.4: Finn et al. on Omniglot)."
    )
    flags.DEFINE_integer("cg_steps", 5, "iMAML CG steps.", lower_bound=1)
    flags.DEFINE_float("outer_learning_rate", 1e-3, "Adam step size.")
    flags.DEFINE_enum(
        "on_failure",
        "first_order",
        ["drop", "first_order", "zero"],
        "What an iMAML task whose linear solve failed contributes (see tf_imaml.MetaLearner); "
        "at a random init with lam = 2 nearly every task meets negative curvature, and 'drop' "
        "then skips most meta-steps.",
    )
    flags.DEFINE_string(
        "pretrained", str(PRETRAINED), "Also sweep K_test for this saved model ('' for none)."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the initial weights and training episodes.")
    flags.DEFINE_integer("log_every", 25, "Print progress every this many steps.")
    flags.DEFINE_list(
        "merge",
        [],
        "Instead of running: combine the inner_steps.json of runs with the same test setting "
        "(run in parallel, one model each) into one table and plot in --output_dir.",
    )
    flags.DEFINE_bool(
        "tiny", False, "A smoke run: 14x14 images, 8 filters, 2 meta-steps, 4 test tasks."
    )


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def ints(values):
        return tuple(int(v) for v in values)

    if FLAGS.merge:
        merge(FLAGS.merge, FLAGS.output_dir)
        print(f"merged {len(FLAGS.merge)} runs into {FLAGS.output_dir}/{NAME}.md")
        return
    if FLAGS.tiny:
        config = tiny_config(FLAGS.output_dir)
    else:
        config = StudyConfig(
            output_dir=FLAGS.output_dir,
            imaml_train_steps=ints(FLAGS.imaml_train_steps),
            maml_train_steps=ints(FLAGS.maml_train_steps),
            fomaml_train_steps=ints(FLAGS.fomaml_train_steps),
            test_steps=ints(FLAGS.test_steps),
            meta_steps=FLAGS.meta_steps,
            meta_batch_size=FLAGS.meta_batch_size,
            test_tasks=FLAGS.test_tasks,
            ways=FLAGS.ways,
            shots=FLAGS.shots,
            queries=FLAGS.queries,
            image_size=FLAGS.image_size,
            filters=FLAGS.filters,
            lam=FLAGS.lam,
            imaml_inner_learning_rate=FLAGS.imaml_inner_learning_rate,
            maml_inner_learning_rate=FLAGS.maml_inner_learning_rate,
            cg_steps=FLAGS.cg_steps,
            outer_learning_rate=FLAGS.outer_learning_rate,
            on_failure=FLAGS.on_failure,
            pretrained=FLAGS.pretrained,
            seed=FLAGS.seed,
            log_every=FLAGS.log_every,
        )
    try:
        config.validate()
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    start = time.time()
    run(config)
    print(f"done in {time.time() - start:.0f} s; results in {config.output_dir}/{NAME}.md")


if __name__ == "__main__":
    define_flags()
    app.run(main)
