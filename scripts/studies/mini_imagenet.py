r"""Study 7: mini-ImageNet 5-way few-shot, iMAML against MAML and first-order MAML.

Each arm (an algorithm with its settings: `imaml` is iMAML-GD as the paper states it,
`imaml_authors` the system the authors' code solves, `imaml_hf`, `maml`, `fomaml`) is
meta-trained by `scripts/train.py` once per training seed (`--seeds`; a fresh process per
run; for a seed every arm starts from the same initial weights and meets the same episodes)
with the 4-layer conv net of the MAML papers (32 filters, exact max pooling:
`tf_imaml.layers.ExactMaxPool2D`, see NOTES_TF.md). The study then scores every trained
model on the same `--test_tasks` test episodes (`--test_seed`, the same for every arm and
seed), under its own test-time adaptation (`own`: proximal GD at the training lam for
iMAML-GD, plain GD for MAML, first-order MAML and the authors' system, truncated Newton for
iMAML-HF) and under identical adaptations (`--eval_lams`: `lam=<x>` is --inner_steps
proximal GD steps of --inner_learning_rate from theta at lam x, lam 0 being plain GD
fine-tuning; `fewshot.adapted_accuracies`), so that a difference in test-time adaptation
cannot pass for a difference in training. It reports per arm and adaptation the mean over
seeds with its 95% t interval over seeds, and between every two arms, adaptation by
adaptation, paired tests on those tasks (`stats.compare_adaptations`); the per-task
accuracies of every model under every adaptation go into the JSON. It reads
each run's TensorBoard logs (validation accuracy and the fraction of failed
implicit-gradient solves per epoch) and writes `mini_imagenet.md`, `mini_imagenet.json` and
`mini_imagenet.png` (validation accuracy against meta-steps, and the failed fraction) into
`--output_dir`, beside the published figures.

    python scripts/studies/mini_imagenet.py --output_dir=docs/studies/mini_imagenet

Runs already finished under `--runs_dir` (a `results.json` from the same configuration, and
the study's test of it, `study_test.json`) are read instead of trained and tested again, so a
long study can be run one arm or seed at a time; only adaptations not yet scored on these test
tasks are tested (e.g. after adding a lam to `--eval_lams`). An interrupted run of the same
flags resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Collection

import harness
import numpy as np
import reporting
import stats
from harness import option

TRAIN_SCRIPT = harness.ROOT / "scripts" / "train.py"
ALGORITHMS = ("imaml", "imaml_authors", "imaml_hf", "maml", "fomaml")
# scripts/train.py flags of each arm beyond the shared ones. The authors' system (imaml_dev):
# plain inner steps and one proximal pull-back, the system (1 + 1) I + H / (lam + 10), test-time
# adaptation with lam 0.
ARM_FLAGS = {
    "imaml": ["--algorithm=imaml"],
    "imaml_authors": [
        "--algorithm=imaml",
        "--damping=1.0",
        "--lam_damping=10.0",
        "--inner_loop=pull_back",
        "--test_lam=0.0",
    ],
    "imaml_hf": ["--algorithm=imaml_hf"],
    "maml": ["--algorithm=maml"],
    "fomaml": ["--algorithm=fomaml"],
}
LABELS = {
    "imaml": "iMAML-GD",
    "imaml_authors": "iMAML-GD, authors' system",
    "imaml_hf": "iMAML-HF",
    "maml": "MAML",
    "fomaml": "first-order MAML",
}
# 5-way 1-shot, mean +- 95% CI over 600 test tasks, as the iMAML paper's Table 3 reports them.
PUBLISHED_1SHOT = {
    "maml": "48.70 +- 1.84",
    "fomaml": "48.07 +- 1.75",
    "imaml_hf": "49.30 +- 1.88",
}


@dataclasses.dataclass(frozen=True)
class Config:
    output_dir: str = option("runs/study_mini_imagenet", "Where the table, JSON and plot go.")
    runs_dir: str | None = option(
        None, "Where each algorithm's training run goes (default: <output_dir>/runs)."
    )
    algorithms: tuple[str, ...] = option(
        ("imaml", "imaml_authors", "maml", "fomaml"),
        "Arms to run: " + ", ".join(ALGORITHMS) + ".",
        tiny=("imaml", "imaml_authors"),
    )
    seeds: tuple[int, ...] = option(
        (0, 1, 2, 3, 4),
        "Training seeds (initial weights and episodes); every arm is trained once per seed.",
        tiny=(0, 1),
    )
    data_dir: str | None = option(None, "mini-ImageNet folder (default: $TF_IMAML_MINI_IMAGENET).")
    image_size: int = option(84, "Image side after resizing.", lower_bound=8, tiny=16)
    ways: int = option(5, "Classes per task.", lower_bound=2, tiny=3)
    shots: int = option(1, "Support examples per class.", lower_bound=1)
    queries: int = option(15, "Query examples per class.", lower_bound=1, tiny=2)
    meta_batch_size: int = option(4, "Tasks per meta-step.", lower_bound=1, tiny=2)
    meta_steps: int = option(250, "Meta-steps per run.", lower_bound=1, tiny=2)
    steps_per_epoch: int = option(25, "Meta-steps between validations.", lower_bound=1, tiny=1)
    inner_steps: int = option(5, "Inner steps (train and test).", tiny=1)
    inner_learning_rate: float = option(0.01, "Inner step size.")
    lam: float = option(0.5, "iMAML proximal strength.")
    cg_steps: int = option(5, "iMAML CG steps.", lower_bound=1)
    on_failure: str = option(
        "first_order", "iMAML failed-solve policy.", choices=("drop", "first_order", "zero")
    )
    outer_learning_rate: float = option(1e-3, "Adam step size.")
    val_tasks: int = option(40, "Validation tasks per epoch.", lower_bound=1, tiny=2)
    test_tasks: int = option(
        600, "Test tasks (the same for every arm and seed).", lower_bound=2, tiny=4
    )
    test_seed: int = option(2, "Seed of the test tasks.")
    eval_lams: tuple[float, ...] = option(
        (0.0, 0.5),
        "Besides its own test-time adaptation, every trained model is also adapted the same "
        "way, whatever its training: --inner_steps proximal GD steps of --inner_learning_rate "
        "from theta at each lam here (0: plain GD fine-tuning of the support loss; 0.5: "
        "iMAML-GD's own at the default --lam), so that a difference in adaptation cannot pass "
        "for a difference in training. Scored and compared like the own adaptation.",
    )

    def validate(self) -> None:
        """Raises `ValueError` naming the first bad value."""
        unknown = sorted(set(self.algorithms) - set(ALGORITHMS))
        if unknown or not self.algorithms:
            raise ValueError(f"--algorithms must be some of {ALGORITHMS}, got {self.algorithms}")
        if self.meta_steps % self.steps_per_epoch:
            raise ValueError(
                f"--meta_steps ({self.meta_steps}) must be a multiple of --steps_per_epoch "
                f"({self.steps_per_epoch})"
            )
        for name in ("inner_learning_rate", "lam", "outer_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.data_dir and not pathlib.Path(self.data_dir).is_dir():
            raise ValueError(f"--data_dir {self.data_dir} is not a folder")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct and non-empty, got {self.seeds}")
        if any(not lam >= 0 for lam in self.eval_lams):
            raise ValueError(f"--eval_lams must be >= 0, got {self.eval_lams}")
        if len(set(self.eval_lams)) != len(self.eval_lams):
            raise ValueError(f"--eval_lams must be distinct, got {self.eval_lams}")

    def runs_path(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir or pathlib.Path(self.output_dir) / "runs")


def train_flags(config: Config, algorithm: str, seed: int, logdir: pathlib.Path) -> list[str]:
    """The `scripts/train.py` command-line flags of one arm's run with training seed `seed`.

    `scripts/train.py` tests on 1 task only: the study tests every model itself, on tasks
    shared by all seeds (`evaluate`).
    """
    args = [
        "--dataset=mini_imagenet",
        *ARM_FLAGS[algorithm],
        f"--image_size={config.image_size}",
        f"--ways={config.ways}",
        f"--shots={config.shots}",
        f"--queries={config.queries}",
        f"--meta_batch_size={config.meta_batch_size}",
        f"--meta_steps={config.meta_steps}",
        f"--steps_per_epoch={config.steps_per_epoch}",
        f"--inner_steps={config.inner_steps}",
        f"--inner_learning_rate={config.inner_learning_rate}",
        f"--lam={config.lam}",
        f"--cg_steps={config.cg_steps}",
        f"--on_failure={config.on_failure if algorithm.startswith('imaml') else 'drop'}",
        f"--outer_learning_rate={config.outer_learning_rate}",
        f"--val_tasks={config.val_tasks}",
        "--test_tasks=1",
        f"--seed={seed}",
        f"--logdir={logdir}",
    ]
    if config.data_dir:
        args.append(f"--data_dir={config.data_dir}")
    return args


def _epoch_scalars(folder: pathlib.Path, tag: str) -> list[float]:
    """The per-epoch values of one Keras TensorBoard scalar, in step order."""
    from tensorboard.backend.event_processing import event_accumulator

    if not folder.is_dir():
        return []
    acc = event_accumulator.EventAccumulator(
        str(folder), size_guidance={event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    if tag not in acc.Tags()["tensors"]:
        return []
    import tensorflow as tf

    events = sorted(acc.Tensors(tag), key=lambda e: e.step)
    return [float(tf.make_ndarray(e.tensor_proto)) for e in events]


def evaluate(
    config: Config, model_path: pathlib.Path, *, skip: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """`{adaptation: per-task query accuracies}` of a saved meta-learner on the study's test
    tasks (`--test_seed`; the same for every arm and seed), in its own test-time adaptation
    (`own`) and in the identical ones of `--eval_lams` (`fewshot.adapted_accuracies`), leaving
    out the adaptations named in `skip`."""
    import fewshot
    import keras

    import tf_imaml

    meta = keras.models.load_model(model_path)
    data = tf_imaml.mini_imagenet.load_mini_imagenet("test", path=config.data_dir)
    episodes = fewshot.episodes(
        data,
        ways=config.ways,
        shots=config.shots,
        queries=config.queries,
        batch=min(config.meta_batch_size, 20),
        seed=config.test_seed,
        num_tasks=config.test_tasks,
        dataset="mini_imagenet",
        image_size=None if config.image_size == 84 else config.image_size,
    )
    per_task = fewshot.adapted_accuracies(
        meta,
        episodes,
        eval_lams=config.eval_lams,
        inner_steps=config.inner_steps,
        inner_learning_rate=config.inner_learning_rate,
        skip=skip,
    )
    return {name: values[: config.test_tasks] for name, values in per_task.items()}


def _study_test(config: Config, logdir: pathlib.Path, *, reuse: bool) -> tuple[dict, float]:
    """The run's model's per-task accuracies `{adaptation: [test_tasks]}` and the seconds its
    testing took; adaptations already scored on these tasks are read back (with `reuse`).

    `study_test.json` keeps every adaptation scored so far (a list instead of a dict, as
    earlier versions wrote: the own adaptation's).
    """
    test_file = logdir / "study_test.json"
    key = {"test_seed": config.test_seed, "test_tasks": config.test_tasks}
    saved, seconds = {}, 0.0
    if reuse and test_file.is_file():
        done = json.loads(test_file.read_text())
        if done["key"] == key:
            saved = done["per_task"]
            saved = saved if isinstance(saved, dict) else {stats.OWN: saved}
            seconds = done["seconds"]
    wanted = stats.adaptation_names(config.eval_lams)
    if any(name not in saved for name in wanted):
        start = time.time()
        new = evaluate(config, logdir / "model.keras", skip=set(saved))
        saved = saved | {name: values.tolist() for name, values in new.items()}
        seconds = round(seconds + time.time() - start, 1)
        test_file.write_text(json.dumps({"key": key, "per_task": saved, "seconds": seconds}))
    return {name: saved[name] for name in wanted}, seconds


def run_one(config: Config, algorithm: str, seed: int, *, verbose: bool = True) -> dict:
    """Trains and tests one arm for one seed (or reads its finished run); returns its record."""
    logdir = config.runs_path() / algorithm / f"seed{seed}"
    args = train_flags(config, algorithm, seed, logdir)
    results_file = logdir / "results.json"
    reused = False
    if results_file.is_file():
        done = json.loads(results_file.read_text())
        reused = _same_flags(done["config"], args)
    flags_file = logdir / "study_train_flags.json"
    if not reused:
        if logdir.exists() and not _interrupted_run_of(logdir, args):
            import shutil

            shutil.rmtree(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        flags_file.write_text(json.dumps(args))
        if verbose:
            print(
                f"[mini_imagenet study] training {algorithm} seed {seed}: "
                f"scripts/train.py {' '.join(args)}",
                flush=True,
            )
        start = time.time()
        proc = subprocess.run(
            [sys.executable, str(TRAIN_SCRIPT), *args],
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
            stdout=None if verbose else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        seconds = time.time() - start
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] if proc.stderr else []
            reason = tail[0] if tail else f"exit status {proc.returncode}"
            record = {
                "algorithm": algorithm,
                "seed": seed,
                "error": reason,
                "wall_seconds": round(seconds, 1),
            }
            return record | _curves(logdir)
        done = json.loads(results_file.read_text())
        done["wall_seconds"] = round(seconds, 1)
        results_file.write_text(json.dumps(done, indent=2))
    per_task, test_seconds = _study_test(config, logdir, reuse=reused)
    own = per_task[stats.OWN]
    record = {
        "algorithm": algorithm,
        "seed": seed,
        "test_accuracy": float(np.mean(own)),
        "test_ci95": reporting.mean_ci95(own)[1],
        "test_tasks": len(own),
        "accuracy": {name: float(np.mean(v)) for name, v in per_task.items()},
        "per_task": per_task,
        "test_seconds": test_seconds,
        "train_seconds": done["train_seconds"],
        "wall_seconds": done.get("wall_seconds"),
        "reused": reused,
    }
    return record | _curves(logdir)


def _interrupted_run_of(logdir: pathlib.Path, args: list[str]) -> bool:
    """Whether `logdir` holds an unfinished run of these flags, with a checkpoint to resume.

    `scripts/train.py` resumes such a run from `backup/` (its `BackupAndRestore`) when started
    again with the same `--logdir`, so a study killed mid-way (or split over sessions) goes
    on where it stopped instead of starting again.
    """
    flags_file = logdir / "study_train_flags.json"
    return (
        not (logdir / "results.json").exists()
        and flags_file.is_file()
        and json.loads(flags_file.read_text()) == args
        and (logdir / "backup" / "training_metadata.json").is_file()
    )


def _same_flags(train_config: dict, args: list[str]) -> bool:
    """Whether a finished run's config (its `results.json`) was made by these flags."""
    for arg in args:
        name, value = arg[2:].split("=", 1)
        if str(train_config.get(name)) != value:
            return False
    return True


def _curves(logdir: pathlib.Path) -> dict:
    return {
        "val_accuracy": _epoch_scalars(logdir / "validation", "epoch_sparse_categorical_accuracy"),
        "train_accuracy": _epoch_scalars(logdir / "train", "epoch_sparse_categorical_accuracy"),
        "failed_fraction": _epoch_scalars(logdir / "train", "epoch_failed_fraction"),
    }


def summarize(records: list[dict]) -> tuple[dict, list[dict]]:
    """Seed-level summaries per arm and adaptation, and paired tests between every two arms.

    Returns `(arms, comparisons)`: `arms[algorithm][adaptation]` is a `stats.arm_summary`
    record of its finished seeds (`stats.adaptation_summaries`); each comparison is
    `stats.compare_arms` of two arms under the same adaptation (`own`: each in its own), on
    the same test tasks and their common seeds (pairs without a common seed are left out).
    """
    arms = stats.adaptation_summaries(records, arm_key="algorithm")
    comparisons = []
    names = list(arms)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            try:
                tests = stats.compare_adaptations(arms[a], arms[b])
            except ValueError:
                continue
            comparisons += [{"arm": a, "against": b, **test} for test in tests]
    return arms, comparisons


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """The epoch-by-epoch mean of several runs' curves, over the epochs all of them have."""
    length = min((len(c) for c in curves), default=0)
    return [float(np.mean([c[i] for c in curves])) for i in range(length)]


def write_report(config: Config, records: list[dict]) -> str:
    """The Markdown tables (with the published figures) and the JSON; returns the Markdown."""
    out = pathlib.Path(config.output_dir)
    arms, comparisons = summarize(records)
    adaptations = stats.adaptation_names(config.eval_lams)
    rows = []
    for algorithm in config.algorithms:
        mine = [r for r in records if r["algorithm"] == algorithm]
        if not mine:
            continue
        errors = [f"seed {r['seed']}: {r['error']}" for r in mine if "error" in r]
        ours = stats.adaptation_cells(arms.get(algorithm, {}), adaptations)
        if errors:
            ours[0] += " (failed: " + "; ".join(errors) + ")"
        failed = _mean_curve([r["failed_fraction"] for r in mine if r["failed_fraction"]])
        seconds = [r["train_seconds"] for r in mine if "train_seconds" in r]
        rows.append(
            [
                LABELS[algorithm],
                ", ".join(str(r["seed"]) for r in mine if "per_task" in r),
                *ours,
                PUBLISHED_1SHOT.get(algorithm, "—") if config.shots == 1 else "—",
                ", ".join(f"{100 * v:.1f}" for v in _mean_curve([r["val_accuracy"] for r in mine]))
                or "—",
                ", ".join(f"{100 * v:.0f}" for v in failed) if failed else "—",
                f"{config.meta_steps} x {config.meta_batch_size}",
                f"{np.mean(seconds):.0f}" if seconds else "—",
            ]
        )
    headers = [
        "arm",
        "seeds",
        f"test accuracy % ({config.test_tasks} tasks), own adaptation, mean ± 95% t "
        "interval over seeds",
        *[f"adapted by {a}" for a in adaptations[1:]],
        "published (600 tasks, full training)",
        f"validation accuracy % every {config.steps_per_epoch} steps ({config.val_tasks} "
        "tasks), mean over seeds",
        "failed solves % per epoch, mean over seeds",
        "meta-steps x tasks",
        "train s (mean)",
    ]
    tests = reporting.markdown_table(
        ["arm", "against", "adaptation", *stats.comparison_headers()],
        [
            [LABELS[c["arm"]], LABELS[c["against"]], c["adaptation"], *stats.comparison_cells(c)]
            for c in comparisons
        ],
    )
    identical = ", ".join(f"{lam:g}" for lam in config.eval_lams)
    text = "\n".join(
        [
            f"mini-ImageNet {config.ways}-way {config.shots}-shot, {config.queries} queries per "
            f"class, {config.image_size}x{config.image_size} RGB, 4-layer conv net (32 filters, "
            f"exact 2x2 max pooling, batch statistics); {config.inner_steps} inner steps of "
            f"{config.inner_learning_rate} in training and at test; iMAML lam = {config.lam}, "
            f"{config.cg_steps} CG steps, failed solves: `{config.on_failure}`; the authors' "
            "system: plain inner steps and one proximal pull-back, the linear system "
            "`2I + H/(lam + 10)`, test-time adaptation with lam 0; Adam "
            f"{config.outer_learning_rate}; training seeds "
            f"{', '.join(str(s) for s in config.seeds)} (for a seed, every arm starts from the "
            "same weights and meets the same episodes); every model tested on the same "
            f"{config.test_tasks} test tasks (seed {config.test_seed}) in its own test-time "
            "adaptation (`own`: proximal GD at the training lam for iMAML-GD, plain GD for "
            "MAML, first-order MAML and the authors' system, truncated Newton for iMAML-HF)"
            + (
                " and in the same adaptation whatever its training (`lam=<x>`: "
                f"{config.inner_steps} proximal GD steps of {config.inner_learning_rate} from "
                f"theta at lam = {identical}; lam 0 is plain GD fine-tuning), so that a "
                "difference in adaptation cannot pass for a difference in training"
                if config.eval_lams
                else ""
            )
            + f"; {os.cpu_count()} CPU cores.",
            "",
            reporting.markdown_table(headers, rows),
            "",
            "Paired tests on the same test tasks, both arms adapted the same way (`own`: each in "
            "its own adaptation). Per task: each task's accuracy averaged over "
            "the common seeds, the difference's mean ± 95% t interval, two-sided t-test and "
            "exact sign-test p-values; per seed: the t interval of the per-seed mean "
            "differences.",
            "",
            tests,
            "",
        ]
    )
    data = {
        "config": dataclasses.asdict(config),
        "records": records,
        "arms": arms,
        "comparisons": comparisons,
    }
    reporting.write(out, "mini_imagenet", markdown=text, data=data)
    return text


def plot(config: Config, records: list[dict]) -> None:
    """Validation accuracy and failed-solve fraction against meta-steps, means over seeds."""
    plt = reporting.pyplot()
    fig, (ax_acc, ax_fail) = plt.subplots(1, 2, figsize=(10, 3.8))
    for algorithm in config.algorithms:
        mine = [r for r in records if r["algorithm"] == algorithm]
        val = _mean_curve([r["val_accuracy"] for r in mine]) if mine else []
        steps = [config.steps_per_epoch * (i + 1) for i in range(len(val))]
        if steps:
            ax_acc.plot(steps, [100 * v for v in val], marker="o", label=LABELS[algorithm])
        failed = _mean_curve([r["failed_fraction"] for r in mine if r["failed_fraction"]])
        if failed and algorithm.startswith("imaml"):
            steps = [config.steps_per_epoch * (i + 1) for i in range(len(failed))]
            ax_fail.plot(steps, [100 * v for v in failed], marker="o", label=LABELS[algorithm])
    ax_acc.axhline(100 / config.ways, color="gray", linestyle=":", label="chance")
    ax_acc.set(xlabel="meta-steps", ylabel="validation accuracy (%)", title="Validation")
    ax_fail.set(
        xlabel="meta-steps",
        ylabel="% of tasks",
        title=f"iMAML: failed linear solves (lam = {config.lam})",
        ylim=(-2, 102),
    )
    for ax in (ax_acc, ax_fail):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"mini-ImageNet {config.ways}-way {config.shots}-shot, meta-batch "
        f"{config.meta_batch_size}, {config.inner_steps} inner steps, "
        f"mean over {len(config.seeds)} seeds"
    )
    reporting.write(
        pathlib.Path(config.output_dir), "mini_imagenet", figures={"mini_imagenet.png": fig}
    )


def run(config: Config, *, verbose: bool = True) -> list[dict]:
    """Runs the study; writes the tables, JSON and plot; returns one record per arm and seed."""
    harness.check_fields(config)
    config.validate()
    pathlib.Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for seed in config.seeds:
        for algorithm in config.algorithms:
            records.append(run_one(config, algorithm, seed, verbose=verbose))
            # Rewritten after every run, so a long study shows its progress.
            write_report(config, records)
            plot(config, records)
    text = write_report(config, records)
    if verbose:
        print(text)
    return records


if __name__ == "__main__":
    harness.main(Config, run, tiny=harness.tiny_values(Config))
