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
  python scripts/studies/inner_steps.py --output_dir=runs/study_inner_steps
  python scripts/studies/inner_steps.py --tiny --output_dir=/tmp/inner_steps   # smoke run
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
from absl import app
from absl import flags
from harness import option

import tf_imaml

NAME = "inner_steps"
FAILURE_POLICIES = ("drop", "first_order", "zero")


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_inner_steps", "Where results go.")
    imaml_train_steps: tuple[int, ...] = option((1, 5, 16), "iMAML-GD K_train values.", tiny=(1,))
    maml_train_steps: tuple[int, ...] = option(
        (1, 5), "Second-order MAML K_train values.", tiny=(1,)
    )
    fomaml_train_steps: tuple[int, ...] = option((), "First-order MAML K_train values.")
    test_steps: tuple[int, ...] = option(
        (0, 1, 2, 5, 10, 16, 25, 50), "K_test values.", tiny=(0, 3)
    )
    meta_steps: int = option(150, "Meta-steps per model.", lower_bound=1, tiny=2)
    meta_batch_size: int = option(8, "Tasks per meta-step.", lower_bound=1, tiny=2)
    test_tasks: int = option(200, "Test tasks.", lower_bound=2, tiny=4)
    ways: int = option(5, "Classes per task.", lower_bound=2)
    shots: int = option(1, "Support examples per class.", lower_bound=1)
    queries: int = option(15, "Query examples per class.", lower_bound=1, tiny=3)
    image_size: int = option(28, "Image side.", lower_bound=8, tiny=14)
    filters: int = option(64, "Channels of the conv net.", lower_bound=1, tiny=8)
    lam: float = option(2.0, "iMAML proximal strength lambda.")
    imaml_inner_learning_rate: float = option(0.1, "iMAML inner GD step size.")
    maml_inner_learning_rate: float = option(
        0.4, "MAML inner step size (0.4: Finn et al. on Omniglot)."
    )
    cg_steps: int = option(5, "iMAML CG steps.", lower_bound=1)
    outer_learning_rate: float = option(1e-3, "Adam step size.")
    on_failure: str = option(
        "first_order",
        "What an iMAML task whose linear solve failed contributes (see tf_imaml.MetaLearner); "
        "at a random init with lam = 2 nearly every task meets negative curvature, and 'drop' "
        "then skips most meta-steps.",
        choices=FAILURE_POLICIES,
    )
    pretrained: str = option(
        str(harness.PRETRAINED), "Also sweep K_test for this saved model ('' for none)."
    )
    seed: int = option(0, "Seed of the initial weights and training episodes.")
    log_every: int = option(25, "Print progress every this many steps.", tiny=1)

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


TINY = harness.tiny_values(Config)


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


_episodes = fewshot.config_episodes


def _build(config: Config, spec: ModelSpec, learner: keras.Model):
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
    return fewshot.compile_meta(meta, learning_rate=config.outer_learning_rate)


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


def run(config: Config, *, verbose: bool = True) -> dict:
    """Trains every model, sweeps K_test, writes the md/json/png; returns the results."""
    del verbose  # Progress always goes to stdout; the tests capture it.
    out = harness.output_folder(config, deterministic=True)
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
    base = fewshot.learner(
        ways=config.ways, image_size=config.image_size, filters=config.filters, seed=config.seed
    )
    init_weights = base.get_weights()
    models = []
    for spec in specs:
        print(f"training {spec.label} for {config.meta_steps} meta-steps", flush=True)
        keras.utils.set_random_seed(config.seed)
        learner = keras.models.clone_model(base)
        learner.set_weights(init_weights)
        meta = _build(config, spec, learner)
        steps, batch = config.meta_steps, config.meta_batch_size
        episodes = _episodes(
            config, train_data, seed=config.seed, num_tasks=steps * batch, batch=batch
        )
        progress = _Progress(spec.label, config.meta_steps, config.log_every)
        history, train_seconds = fewshot.meta_train(
            meta, episodes, meta_steps=steps, callbacks=[progress]
        )
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
                "final_train_logs": {k: float(v[-1]) for k, v in history.items()},
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


def _write(config: Config, out: pathlib.Path, models: list[dict]) -> dict:
    results = {"config": dataclasses.asdict(config), "models": models}
    reporting.write(
        out,
        NAME,
        markdown=_markdown(config, models),
        data=results,
        figures={f"{NAME}.png": _plot(config, models)},
    )
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
    fields = {f.name for f in dataclasses.fields(Config)}
    combined = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items() if k in fields}
    for key in ("imaml_train_steps", "maml_train_steps", "fomaml_train_steps"):
        combined[key] = tuple(k for r in runs for k in r["config"][key])
    combined["pretrained"] = next(
        (r["config"]["pretrained"] for r in runs if r["config"]["pretrained"]), ""
    )
    combined["output_dir"] = output_dir
    config = Config(**combined)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = _write(config, out, models)
    results["merged_from"] = [str(p) for p in paths]
    reporting.write_json(out / f"{NAME}.json", results)
    return results


def _pct(row) -> str:
    return f"{100 * row['accuracy']:.1f} ± {100 * row['ci95']:.1f}"


def _markdown(config: Config, models: list[dict]) -> str:
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


def _plot(config: Config, models: list[dict]):
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
    return fig


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.merge:
        merge(flags.FLAGS.merge, flags.FLAGS.output_dir)
        print(f"merged {len(flags.FLAGS.merge)} runs into {flags.FLAGS.output_dir}/{NAME}.md")
        return
    try:
        config = harness.config_from_flags(Config, tiny=TINY)
        config.validate()
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    start = time.time()
    run(config)
    print(f"done in {time.time() - start:.0f} s; results in {config.output_dir}/{NAME}.md")


if __name__ == "__main__":
    harness.define_flags(Config, tiny=TINY)
    flags.DEFINE_list(
        "merge",
        [],
        "Instead of running: combine the inner_steps.json of runs with the same test setting "
        "(run in parallel, one model each) into one table and plot in --output_dir.",
    )
    app.run(main)
