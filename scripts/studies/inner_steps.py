"""Study 3: accuracy against the number of inner steps, in training and at test time.

iMAML-GD and MAML are meta-trained on Omniglot N-way K-shot, for the same number of
meta-steps, each with its own number of training inner steps `K_train` and at each inner
step size of `--inner_learning_rates` (both algorithms at every step size, so that a
difference in step size cannot pass for a difference in algorithm; the same step size
adapts at test time). Every arm (algorithm, `K_train`, step size) is trained once per
training seed (`--seeds`: the initial weights and the training episodes; for a seed, every
arm starts from the same weights and meets the same episodes). Every trained model (and,
optionally, the shipped pretrained iMAML model) is then adapted with each test-time `K_test`
to the same held-out test tasks (`--test_seed`, the same for every seed). Reported per arm
and `K_test`: the mean over seeds with its 95% t interval over seeds (`stats`; with one seed,
the normal interval over tasks), and paired tests on the same tasks between arms that differ
in the algorithm or in the step size only. `K_test = 0` is the unadapted
meta-initialisation; the script also scores it directly with the learner (no meta-learner
code in between) as a check.

Writes `<output_dir>/inner_steps.md` (the tables), `inner_steps.json` (every number, the
per-task accuracies of every seed included) and `inner_steps.png` (accuracy against
`K_test`).

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
import stats
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
    imaml_inner_learning_rate: float = option(
        0.1, "iMAML inner GD step size when --inner_learning_rates is empty."
    )
    maml_inner_learning_rate: float = option(
        0.4,
        "MAML inner step size when --inner_learning_rates is empty (0.4: Finn et al. on Omniglot).",
    )
    inner_learning_rates: tuple[float, ...] = option(
        (0.1, 0.4),
        "Every algorithm is trained and adapted at each of these inner step sizes (0.1: the "
        "iMAML paper's; 0.4: Finn et al.'s MAML); empty: iMAML at "
        "--imaml_inner_learning_rate, MAML at --maml_inner_learning_rate.",
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
    seeds: tuple[int, ...] = option(
        (0, 1, 2, 3, 4),
        "Training seeds: each arm is trained once per seed (initial weights and episodes).",
        tiny=(0, 1),
    )
    test_seed: int = option(2, "Seed of the test tasks (the same for every model and seed).")
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
        if any(not lr > 0 for lr in self.inner_learning_rates):
            raise ValueError(f"--inner_learning_rates must be > 0, got {self.inner_learning_rates}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if self.pretrained and not pathlib.Path(self.pretrained).is_file():
            raise ValueError(f"--pretrained {self.pretrained} is not a file")


TINY = harness.tiny_values(Config)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    algorithm: str  # "imaml", "maml" or "fomaml".
    train_steps: int
    learning_rate: float  # Inner step size, in training and at test time.
    seed: int  # Training seed: initial weights and episodes.
    show_learning_rate: bool = True  # Whether the label names the step size.

    @property
    def label(self) -> str:
        """The arm's label (the same for every seed)."""
        name = {"imaml": "iMAML-GD", "maml": "MAML", "fomaml": "FO-MAML"}[self.algorithm]
        lr = f" lr={self.learning_rate:g}" if self.show_learning_rate else ""
        return f"{name} K_train={self.train_steps}{lr}"


def model_specs(config: Config) -> list[ModelSpec]:
    """Every model to train: arm by arm, each for every seed."""
    arms = (
        [("imaml", k) for k in config.imaml_train_steps]
        + [("maml", k) for k in config.maml_train_steps]
        + [("fomaml", k) for k in config.fomaml_train_steps]
    )
    specs = []
    for algorithm, k in arms:
        default = config.imaml_inner_learning_rate
        if algorithm != "imaml":
            default = config.maml_inner_learning_rate
        for lr in config.inner_learning_rates or (default,):
            for seed in config.seeds:
                specs.append(ModelSpec(algorithm, k, lr, seed, bool(config.inner_learning_rates)))
    return specs


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
            inner_learning_rate=spec.learning_rate,
            cg_steps=config.cg_steps,
            on_failure=config.on_failure,
        )
    else:
        meta = tf_imaml.MAML(
            learner,
            inner_steps=spec.train_steps,
            inner_learning_rate=spec.learning_rate,
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
                # Tasks whose adaptation diverged (non-finite logits): scored as class 0.
                "non_finite_tasks": accuracy.non_finite,
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
    specs = model_specs(config)
    load = dict(image_size=config.image_size)
    train_data = tf_imaml.datasets.load_omniglot("train", **load) if specs else None
    test_data = tf_imaml.datasets.load_omniglot("test", **load)
    eval_batch = min(20, config.test_tasks)
    test_episodes = _episodes(
        config, test_data, seed=config.test_seed, num_tasks=config.test_tasks, batch=eval_batch
    ).cache()
    models = []
    for spec in specs:
        print(
            f"training {spec.label} (seed {spec.seed}) for {config.meta_steps} meta-steps",
            flush=True,
        )
        # The same initial weights and episodes for every arm of a seed.
        learner = fewshot.learner(
            ways=config.ways, image_size=config.image_size, filters=config.filters, seed=spec.seed
        )
        keras.utils.set_random_seed(spec.seed)
        meta = _build(config, spec, learner)
        steps, batch = config.meta_steps, config.meta_batch_size
        episodes = _episodes(
            config, train_data, seed=spec.seed, num_tasks=steps * batch, batch=batch
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
                "inner_learning_rate": spec.learning_rate,
                "seed": spec.seed,
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
                config, data, seed=config.test_seed, num_tasks=config.test_tasks, batch=eval_batch
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
                "inner_learning_rate": float(meta.inner_learning_rate),
                "seed": None,
                # The optimizer's step count, saved with the model (not this run's flag).
                "meta_steps": int(meta.optimizer.iterations.numpy()) if meta.optimizer else None,
                "test_lam": getattr(meta, "test_lam", None),
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


def _shipped_note(models: list[dict]) -> str:
    """The sentence saying where the shipped model's row comes from ('' without one)."""
    shipped = [m for m in models if m.get("pretrained")]
    if not shipped:
        return ""
    m = shipped[0]
    steps = f"{m['meta_steps']} meta-steps" if m.get("meta_steps") else "its own meta-steps"
    lam = (
        f", adapted with its own inner loop at test_lam = {m['test_lam']:g}"
        if m.get("test_lam") is not None
        else ""
    )
    return (
        f"The shipped model's row is its own training run ({steps}{lam}; "
        "tf_imaml/pretrained/README.md), not part of this command's training."
    )


def summarize(config: Config, models: list[dict]) -> tuple[dict, list[dict]]:
    """Seed-level summaries per arm and `K_test`, and paired tests between arms.

    Returns `(arms, comparisons)`. `arms[label]` holds the arm's algorithm, `K_train`, step
    size and, per `K_test` (a string key), a `stats.arm_summary` record. Comparisons pair
    two arms of the same `K_train` that differ only in the algorithm (iMAML-GD against
    MAML or first-order MAML, at the same step size) or only in the step size (the same
    algorithm), at every `K_test`, on the same test tasks and their common seeds.
    """
    grouped = {}
    for m in models:
        arm = grouped.setdefault(
            m["label"],
            {
                "algorithm": m["algorithm"],
                "train_steps": m["train_steps"],
                "inner_learning_rate": m.get("inner_learning_rate"),
                "pretrained": "pretrained" in m,
                "by_k": {},
            },
        )
        for row in m["rows"]:
            arm["by_k"].setdefault(str(row["test_steps"]), {})[m.get("seed")] = row["per_task"]
    arms = {
        label: {
            **{k: v for k, v in arm.items() if k != "by_k"},
            "test": {k: stats.arm_summary(by_seed) for k, by_seed in arm["by_k"].items()},
        }
        for label, arm in grouped.items()
    }
    comparisons = []
    labels = [label for label, arm in arms.items() if not arm["pretrained"]]
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            arm_a, arm_b = arms[a], arms[b]
            if arm_a["train_steps"] != arm_b["train_steps"]:
                continue
            same_lr = arm_a["inner_learning_rate"] == arm_b["inner_learning_rate"]
            same_algorithm = arm_a["algorithm"] == arm_b["algorithm"]
            if same_lr == same_algorithm:  # both differ, or neither
                continue
            if same_lr and arm_b["algorithm"] == "imaml":
                a, b, arm_a, arm_b = b, a, arm_b, arm_a  # iMAML first
            for k, summary in arm_a["test"].items():
                if k not in arm_b["test"]:
                    continue
                try:
                    result = stats.compare_arms(summary, arm_b["test"][k])
                except ValueError:  # no common seed
                    continue
                comparisons.append(
                    {
                        "arm": a,
                        "against": b,
                        "differs_in": "step size" if same_algorithm else "algorithm",
                        "test_steps": int(k),
                        **result,
                    }
                )
    return arms, comparisons


def _write(config: Config, out: pathlib.Path, models: list[dict]) -> dict:
    arms, comparisons = summarize(config, models)
    results = {
        "config": dataclasses.asdict(config),
        "models": models,
        "arms": arms,
        "comparisons": comparisons,
    }
    reporting.write(
        out,
        NAME,
        markdown=_markdown(config, models, arms, comparisons),
        data=results,
        figures={f"{NAME}.png": _plot(config, arms)},
    )
    return results


# Config fields that must agree for runs to be merged: the same test tasks and K_test values
# for every run; the same training setting (episodes' shape, meta-steps) for runs that train.
_TEST_FIELDS = ("test_steps", "test_tasks", "ways", "shots", "queries", "test_seed")
_TRAIN_FIELDS = (
    "meta_steps",
    "meta_batch_size",
    "image_size",
    "filters",
    "lam",
    "cg_steps",
    "outer_learning_rate",
    "on_failure",
)
# Tuple fields that merged runs add up (each run trains its own share of the arms and seeds).
_UNION_FIELDS = (
    "imaml_train_steps",
    "maml_train_steps",
    "fomaml_train_steps",
    "inner_learning_rates",
    "seeds",
)


def _trains(config: dict) -> bool:
    keys = ("imaml_train_steps", "maml_train_steps", "fomaml_train_steps")
    return any(config[k] for k in keys)


def merge(paths: list[str], output_dir: str) -> dict:
    """Combines several runs' `inner_steps.json` (same setting) into one md/json/png.

    Runs may split the arms or the seeds between them; a model (label and seed) met twice
    is refused.

    Raises:
      ValueError: If the runs differ in a field of `_TEST_FIELDS`, two runs that train
        differ in one of `_TRAIN_FIELDS`, or two runs hold the same model.
    """
    runs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    training_runs = [r for r in runs if _trains(r["config"])] or runs
    first = training_runs[0]["config"]
    for path, r in zip(paths, runs, strict=True):
        shared = _TEST_FIELDS + (_TRAIN_FIELDS if _trains(r["config"]) else ())
        harness.check_same(path, r["config"], first, shared)
    models = [m for r in runs for m in r["models"]]
    twice = harness.repeated([(m["label"], m.get("seed")) for m in models])
    if twice:
        raise ValueError(f"models met in more than one run: {twice}")
    fields = {f.name for f in dataclasses.fields(Config)}
    combined = {k: tuple(v) if isinstance(v, list) else v for k, v in first.items() if k in fields}
    for key in _UNION_FIELDS:
        # A run that trains nothing (the shipped model only) has no seeds of its own.
        values = [v for r in training_runs for v in r["config"].get(key, ())]
        combined[key] = tuple(dict.fromkeys(values))
    combined["seeds"] = combined["seeds"] or tuple(first.get("seeds", (0,)))
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


def _interval(summary: dict) -> stats.Interval:
    """The seed-level interval, or with one seed the normal interval over tasks."""
    if len(summary["seeds"]) > 1:
        return stats.Interval(**summary["seed_interval"])
    mean, half = reporting.mean_ci95(summary["per_task"][0])
    return stats.Interval(mean, half, mean - half, mean + half, 1)


def _pct(summary: dict) -> str:
    interval = _interval(summary)
    return f"{100 * interval.mean:.1f} ± {100 * interval.half_width:.1f}"


def _shown_test_steps(config: Config, train_steps: int) -> int:
    """The K_test of an arm's paired tests in the Markdown: K_train if tested, else the largest."""
    return train_steps if train_steps in config.test_steps else max(config.test_steps)


def _diverged(models: list[dict], k: str) -> str:
    """' (diverged on n of N)' if some of `models`' test tasks at `K_test = k` diverged."""
    rows = [r for m in models for r in m["rows"] if str(r["test_steps"]) == k]
    bad = sum(r.get("non_finite_tasks", 0) for r in rows)
    return f" (diverged on {bad} of {sum(r['num_tasks'] for r in rows)})" if bad else ""


def _markdown(config: Config, models: list[dict], arms: dict, comparisons: list[dict]) -> str:
    rates = (
        ", ".join(f"{lr:g}" for lr in config.inner_learning_rates) + " (every algorithm at each)"
        if config.inner_learning_rates
        else f"iMAML {config.imaml_inner_learning_rate:g}, MAML {config.maml_inner_learning_rate:g}"
    )
    setting = (
        f"Omniglot {config.ways}-way {config.shots}-shot, {config.queries} queries per class, "
        f"{config.image_size}x{config.image_size} images, conv4 with {config.filters} filters. "
        f"Trained models: {config.meta_steps} meta-steps at meta-batch "
        f"{config.meta_batch_size}, Adam {config.outer_learning_rate:g}; training seeds "
        f"{', '.join(str(s) for s in config.seeds)} (for a seed, every arm starts from the same "
        f"weights and meets the same episodes); inner step sizes {rates}, the same in training "
        f"and at test; iMAML-GD lam = {config.lam:g}, {config.cg_steps} CG steps, a task whose "
        f"solve failed handled by on_failure={config.on_failure!r}. Test: the same "
        f"{config.test_tasks} tasks (seed {config.test_seed}) for every model and K_test; query "
        "accuracy in %, mean over seeds ± 95% t interval over seeds (an arm with one seed: ± "
        "the normal 95% interval over tasks)."
    )
    headers = ["model", "seeds", "train time (s)", "s / meta-step", "failed fraction"] + [
        f"K_test={k}" for k in config.test_steps
    ]
    rows, best_rows = [], []
    for label, arm in arms.items():
        mine = [m for m in models if m["label"] == label]
        seconds = [m["train_seconds"] for m in mine if m["train_seconds"] is not None]
        per_step = [m["seconds_per_meta_step"] for m in mine if m["seconds_per_meta_step"]]
        failed = [m.get("final_train_logs", {}).get("failed_fraction") for m in mine]
        failed = [f for f in failed if f is not None]
        ks = [k for k in map(str, config.test_steps) if k in arm["test"]]
        rows.append(
            [
                label,
                len(mine),
                float(np.mean(seconds)) if seconds else None,
                round(float(np.mean(per_step)), 2) if per_step else None,
                float(np.mean(failed)) if failed else None,
            ]
            + [
                _pct(arm["test"][k]) + _diverged(mine, k) if k in arm["test"] else None
                for k in map(str, config.test_steps)
            ]
        )
        best = max(ks, key=lambda k: arm["test"][k]["seed_interval"]["mean"])
        at_train = arm["test"].get(str(arm["train_steps"]))
        unadapted = np.mean([m["unadapted_accuracy"] for m in mine])
        best_rows.append(
            [
                label,
                f"{100 * unadapted:.1f}",
                _pct(at_train) + _diverged(mine, str(arm["train_steps"])) if at_train else None,
                best,
                _pct(arm["test"][best]),
            ]
        )
    test_rows = [
        [
            c["arm"],
            c["against"],
            c["differs_in"],
            c["test_steps"],
            *stats.comparison_cells(c, tally=False),
        ]
        for c in comparisons
        if c["test_steps"] == _shown_test_steps(config, arms[c["arm"]]["train_steps"])
    ]
    lines = [
        f"## Accuracy against inner steps (K_train, K_test)\n\n{setting}\n",
        reporting.markdown_table(headers, rows),
        "\n'failed fraction': share of training tasks whose iMAML linear solve failed "
        "(running mean over the whole run, averaged over seeds; MAML tasks fail only on "
        "non-finite values). 'diverged on n of N': test tasks (over all seeds) whose "
        "adaptation gave non-finite logits; their predictions are arbitrary (argmax of NaN is "
        "class 0, which balanced query classes score as chance), so such a cell is not a score "
        "of the model. " + _shipped_note(models) + "\n",
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
        "\n### Paired tests on the same test tasks, at K_test = K_train\n\n"
        "(or the largest K_test when K_train is not among them) "
        "Arms of the same K_train that differ in the algorithm only (same step size) or in "
        "the step size only. Per task: each task's accuracy averaged over the common seeds, "
        "the difference's mean ± 95% t interval (points), t-test and exact sign-test "
        "p-values; per seed: the t interval of the per-seed mean differences. Every K_test "
        "is in the JSON (`comparisons`).\n",
        reporting.markdown_table(
            [
                "arm",
                "against",
                "differs in",
                "K_test",
                "seeds",
                "per task: difference",
                "t-test p",
                "sign test p",
                "per seed: difference",
            ],
            test_rows,
        ),
        "",
    ]
    return "\n".join(lines)


def _plot(config: Config, arms: dict):
    plt = reporting.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, arm in arms.items():
        ks = [k for k in config.test_steps if str(k) in arm["test"]]
        intervals = [_interval(arm["test"][str(k)]) for k in ks]
        acc = [100 * v.mean for v in intervals]
        ci = [100 * v.half_width for v in intervals]
        style = "-" if arm["algorithm"] == "imaml" else "--"
        line = ax.errorbar(ks, acc, yerr=ci, fmt=style + "o", ms=3, capsize=2, label=label)
        if arm["train_steps"] in ks:
            i = ks.index(arm["train_steps"])
            ax.plot(ks[i], acc[i], "*", ms=12, color=line[0].get_color())
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(list(config.test_steps))
    ax.set_xticklabels([str(k) for k in config.test_steps])
    ax.axhline(100 / config.ways, color="gray", lw=0.8, ls=":", label="chance")
    ax.set_xlabel("inner steps at test time K_test (star: K_train)")
    ax.set_ylabel("test query accuracy (%)")
    ax.set_title(
        f"Omniglot {config.ways}-way {config.shots}-shot, {config.test_tasks} test tasks, "
        f"{config.meta_steps} meta-steps, {len(config.seeds)} seeds",
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


MERGE_HELP = (
    "combine the inner_steps.json of runs with the same test setting (run in parallel, each "
    "with its share of the arms or seeds) into one table and plot in --output_dir."
)

if __name__ == "__main__":
    harness.main(Config, run, tiny=TINY, merge=merge, merge_help=MERGE_HELP)
