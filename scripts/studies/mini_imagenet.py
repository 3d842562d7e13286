r"""Study 7: mini-ImageNet 5-way few-shot, iMAML against MAML and first-order MAML.

Each algorithm is meta-trained by `scripts/train.py` (a fresh process, the same flags, the
same seed, so the same initial weights and the same episodes) with the 4-layer conv net of
the MAML papers (32 filters, exact max pooling: `tf_imaml.layers.ExactMaxPool2D`, see
NOTES_TF.md), then scored on `--test_tasks` test episodes (mean +- 95% CI). The study reads
each run's `results.json` and its TensorBoard logs (validation accuracy and the fraction of
failed implicit-gradient solves per epoch) and writes `mini_imagenet.md`,
`mini_imagenet.json` and `mini_imagenet.png` (validation accuracy against meta-steps, and the
failed fraction) into `--output_dir`, beside the published figures.

    python scripts/studies/mini_imagenet.py --output_dir=docs/studies/mini_imagenet

Runs already finished under `--runs_dir` (a `results.json` from the same configuration) are
read instead of trained again, so a long study can be run one algorithm at a time; an
interrupted run of the same flags resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import harness
import reporting
from harness import option

TRAIN_SCRIPT = harness.ROOT / "scripts" / "train.py"
ALGORITHMS = ("imaml", "imaml_hf", "maml", "fomaml")
LABELS = {
    "imaml": "iMAML-GD",
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
    algorithms: tuple[str, ...] = option(("imaml", "maml", "fomaml"), "Algorithms to run.")
    data_dir: str | None = option(None, "mini-ImageNet folder (default: $TF_IMAML_MINI_IMAGENET).")
    image_size: int = option(84, "Image side after resizing.", lower_bound=8)
    ways: int = option(5, "Classes per task.", lower_bound=2)
    shots: int = option(1, "Support examples per class.", lower_bound=1)
    queries: int = option(15, "Query examples per class.", lower_bound=1)
    meta_batch_size: int = option(4, "Tasks per meta-step.", lower_bound=1)
    meta_steps: int = option(100, "Meta-steps per algorithm.", lower_bound=1)
    steps_per_epoch: int = option(25, "Meta-steps between validations.", lower_bound=1)
    inner_steps: int = option(5, "Inner steps (train and test).")
    inner_learning_rate: float = option(0.01, "Inner step size.")
    lam: float = option(0.5, "iMAML proximal strength.")
    cg_steps: int = option(5, "iMAML CG steps.", lower_bound=1)
    on_failure: str = option(
        "first_order", "iMAML failed-solve policy.", choices=("drop", "first_order", "zero")
    )
    outer_learning_rate: float = option(1e-3, "Adam step size.")
    val_tasks: int = option(40, "Validation tasks per epoch.", lower_bound=1)
    test_tasks: int = option(600, "Test tasks.", lower_bound=1)
    seed: int = option(0, "Seed of weights and episodes (shared by all runs).")

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

    def runs_path(self) -> pathlib.Path:
        return pathlib.Path(self.runs_dir or pathlib.Path(self.output_dir) / "runs")


def train_flags(config: Config, algorithm: str, logdir: pathlib.Path) -> list[str]:
    """The `scripts/train.py` command-line flags of one algorithm's run."""
    args = [
        "--dataset=mini_imagenet",
        f"--algorithm={algorithm}",
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
        f"--test_tasks={config.test_tasks}",
        f"--seed={config.seed}",
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


def run_one(config: Config, algorithm: str, *, verbose: bool = True) -> dict:
    """Trains and tests one algorithm (or reads its finished run); returns its record."""
    logdir = config.runs_path() / algorithm
    args = train_flags(config, algorithm, logdir)
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
            print(f"[mini_imagenet study] training {algorithm}: scripts/train.py {' '.join(args)}")
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
            record = {"algorithm": algorithm, "error": reason, "wall_seconds": round(seconds, 1)}
            record |= _curves(logdir)
            return record
        done = json.loads(results_file.read_text())
        done["wall_seconds"] = round(seconds, 1)
        results_file.write_text(json.dumps(done, indent=2))
    record = {
        "algorithm": algorithm,
        "test_accuracy": done["test_accuracy"],
        "test_ci95": done["test_ci95"],
        "test_tasks": done["test_tasks"],
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


def write_report(config: Config, records: list[dict]) -> str:
    """The Markdown table (with the published figures); returns it."""
    out = pathlib.Path(config.output_dir)
    rows = []
    for r in records:
        if "error" in r:
            ours = f"failed: {r['error']}"
            seconds = r["wall_seconds"]
        else:
            ours = f"{100 * r['test_accuracy']:.2f} +- {100 * r['test_ci95']:.2f}%"
            seconds = r["train_seconds"]
        failed = r["failed_fraction"]
        rows.append(
            [
                LABELS[r["algorithm"]],
                ours,
                PUBLISHED_1SHOT.get(r["algorithm"], "—") if config.shots == 1 else "—",
                ", ".join(f"{100 * v:.1f}" for v in r["val_accuracy"]) or "—",
                ", ".join(f"{100 * v:.0f}" for v in failed) if failed else "—",
                f"{config.meta_steps} x {config.meta_batch_size}",
                f"{seconds:.0f}",
            ]
        )
    headers = [
        "algorithm",
        f"test accuracy ({config.test_tasks} tasks)",
        "published (600 tasks, full training)",
        f"validation accuracy % every {config.steps_per_epoch} steps ({config.val_tasks} tasks)",
        "failed solves % per epoch",
        "meta-steps x tasks",
        "train s",
    ]
    text = "\n".join(
        [
            f"mini-ImageNet {config.ways}-way {config.shots}-shot, {config.queries} queries per "
            f"class, {config.image_size}x{config.image_size} RGB, 4-layer conv net (32 filters, "
            f"exact 2x2 max pooling, batch statistics); {config.inner_steps} inner steps of "
            f"{config.inner_learning_rate} in training and at test; iMAML lam = {config.lam}, "
            f"{config.cg_steps} CG steps, failed solves: `{config.on_failure}`; Adam "
            f"{config.outer_learning_rate}; seed {config.seed}; {os.cpu_count()} CPU cores.",
            "",
            reporting.markdown_table(headers, rows),
            "",
        ]
    )
    data = {"config": dataclasses.asdict(config), "records": records}
    reporting.write(out, "mini_imagenet", markdown=text, data=data)
    return text


def plot(config: Config, records: list[dict]) -> None:
    """Validation accuracy and failed-solve fraction against meta-steps."""
    plt = reporting.pyplot()
    fig, (ax_acc, ax_fail) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in records:
        steps = [config.steps_per_epoch * (i + 1) for i in range(len(r["val_accuracy"]))]
        if steps:
            ax_acc.plot(
                steps,
                [100 * v for v in r["val_accuracy"]],
                marker="o",
                label=LABELS[r["algorithm"]],
            )
        if r["failed_fraction"] and r["algorithm"].startswith("imaml"):
            steps = [config.steps_per_epoch * (i + 1) for i in range(len(r["failed_fraction"]))]
            ax_fail.plot(
                steps,
                [100 * v for v in r["failed_fraction"]],
                marker="o",
                label=LABELS[r["algorithm"]],
            )
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
        f"{config.meta_batch_size}, {config.inner_steps} inner steps"
    )
    reporting.write(
        pathlib.Path(config.output_dir), "mini_imagenet", figures={"mini_imagenet.png": fig}
    )


def run(config: Config, *, verbose: bool = True) -> list[dict]:
    """Runs the study; writes the table, JSON and plot; returns one record per algorithm."""
    config.validate()
    pathlib.Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for algorithm in config.algorithms:
        records.append(run_one(config, algorithm, verbose=verbose))
        # Rewritten after every algorithm, so a long study shows its progress.
        write_report(config, records)
        plot(config, records)
    text = write_report(config, records)
    if verbose:
        print(text)
    return records


if __name__ == "__main__":
    harness.main(Config, run)
