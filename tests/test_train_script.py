"""Smoke tests of scripts/train.py, run as a user runs it (a subprocess)."""

import json
import re

import pytest

# Slow: runs scripts/train.py in subprocesses: meta-training, evaluation, resume.
pytestmark = pytest.mark.slow


@pytest.fixture
def train(run_script):
    """`train(*flags)`: scripts/train.py in a subprocess."""
    return lambda *flags: run_script("train.py", *flags)


@pytest.mark.parametrize("algorithm", ["imaml", "maml"])
def test_train_writes_model_results_split_and_logs(
    algorithm, tmp_path, train, tiny_train_flags, summary_tags
):
    proc = train(f"--algorithm={algorithm}", f"--logdir={tmp_path}", *tiny_train_flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"test accuracy \d+\.\d+ \+- \d+\.\d+% over 4 tasks", proc.stdout)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["test_tasks"] == 4 and 0.0 <= result["test_accuracy"] <= 1.0
    split = json.loads((tmp_path / "split.json").read_text())
    train, val, test = (set(split[s]) for s in ("train", "val", "test"))
    assert len(train) == 1028 and not train & val and not train & test and not val & test
    assert (tmp_path / "model.keras").is_file()
    # The files must hold the epoch scalars, not only exist (Keras 3.15 leaves them empty when
    # update_freq does not divide the steps per epoch).
    train_tags = summary_tags(tmp_path / "train")
    assert {"epoch_loss", "epoch_failed_fraction", "batch_loss"} <= train_tags, train_tags
    assert "epoch_sparse_categorical_accuracy" in summary_tags(tmp_path / "validation")
    assert list((tmp_path / "hparams").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ways=1"], "ways"),
        (["--lam=0"], "--lam must be > 0"),
        (["--meta_steps=5", "--steps_per_epoch=2"], "multiple of --steps_per_epoch"),
        (["--algorithm=protonet"], "algorithm"),
        (["--init_learning_rate=1e-4"], "--init_learning_rate needs --init_model"),
    ],
)
def test_bad_flags_fail_before_any_work(args, message, tmp_path, train):
    proc = train(f"--logdir={tmp_path / 'run'}", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing was written


def test_train_on_mini_imagenet_from_a_folder(
    tiny_mini_imagenet, tmp_path, train, tiny_train_flags
):
    data = tiny_mini_imagenet
    proc = train(
        "--dataset=mini_imagenet",
        f"--data_dir={data}",
        "--image_size=16",
        "--ways=3",
        f"--logdir={tmp_path / 'run'}",
        "--algorithm=fomaml",
        *[a for a in tiny_train_flags if not a.startswith("--image_size")],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"fomaml mini_imagenet 3-way 1-shot: test accuracy", proc.stdout)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["dataset"] == "mini_imagenet" and len(split["train"]) == 3


def test_campaign_resume_refuses_other_flags_and_survives_a_corrupt_checkpoint(
    small_omniglot, tmp_path, train, tiny_train_flags
):
    run = tmp_path / "run"
    flags = [f"--logdir={run}", f"--data_dir={small_omniglot}", *tiny_train_flags]
    proc = train(*flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    curve = json.loads((run / "curve.json").read_text())
    assert [e["meta_steps"] for e in curve] == [1, 2]
    assert curve[1]["train_seconds"] > curve[0]["train_seconds"] > 0
    assert "val_sparse_categorical_accuracy" in curve[1]["logs"]
    assert (run / "curve.png").is_file()
    assert list((run / "time_to_accuracy").glob("events.out.tfevents.*"))

    # Another --lam on the same logdir: refused, the differing flag named, nothing changed.
    before = (run / "backup" / "latest.weights.h5").read_bytes()
    proc = train(*flags, "--lam=3.0")
    assert proc.returncode != 0
    assert "--lam: 2.0" in proc.stderr and "3.0 now" in proc.stderr
    assert (run / "backup" / "latest.weights.h5").read_bytes() == before

    # Extend the run by two meta-steps with a corrupt latest checkpoint: it says so, resumes
    # from the previous one (after meta-step 1) and continues the clock from there.
    (run / "backup" / "latest.weights.h5").write_bytes(b"not a checkpoint")
    proc = train(*[f for f in flags if not f.startswith("--meta_steps")], "--meta_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unreadable" in proc.stdout and "resuming from the previous one" in proc.stdout
    resumed = json.loads((run / "curve.json").read_text())
    assert [e["meta_steps"] for e in resumed] == [1, 2, 3, 4]
    assert resumed[0] == curve[0]  # kept; epoch 1 was redone from the previous checkpoint
    assert resumed[1]["train_seconds"] > resumed[0]["train_seconds"]
    assert json.loads((run / "results.json").read_text())["meta_steps"] == 4


def test_a_continued_run_takes_a_new_step_size_and_starts_later_in_the_stream(
    small_omniglot, tmp_path, train, tiny_train_flags
):
    flags = [f"--data_dir={small_omniglot}", *tiny_train_flags]
    proc = train(f"--logdir={tmp_path / 'first'}", "--outer_learning_rate=3e-3", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = train(
        f"--logdir={tmp_path / 'second'}",
        f"--init_model={tmp_path / 'first' / 'model.keras'}",
        "--init_learning_rate=1e-4",
        "--first_meta_batch=2",
        *flags,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import keras

    for run, rate in (("first", 3e-3), ("second", 1e-4)):
        model = keras.models.load_model(tmp_path / run / "model.keras")
        assert float(model.optimizer.learning_rate) == pytest.approx(rate), run
    recorded = json.loads((tmp_path / "second" / "flags.json").read_text())
    assert recorded["first_meta_batch"] == 2 and recorded["init_learning_rate"] == 1e-4


def test_a_continued_run_applies_or_refuses_the_meta_learners_flags(
    small_omniglot, tmp_path, train, tiny_train_flags
):
    """With --init_model a meta-learner flag is applied or refused, never silently ignored."""
    flags = [f"--data_dir={small_omniglot}", *tiny_train_flags]  # --inner_steps=2
    proc = train(f"--logdir={tmp_path / 'first'}", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = tmp_path / "first" / "model.keras"
    # A setting the model can change after training is applied, and said so.
    proc = train(
        f"--logdir={tmp_path / 'second'}",
        f"--init_model={first}",
        *[f for f in flags if not f.startswith("--inner_steps")],
        "--inner_steps=3",
        "--test_lam=0.5",
        "--cg_implementation=cg_tf",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--init_model: inner_steps: 2 -> 3 (from the command line)" in proc.stdout
    assert "--init_model: test_lam: None -> 0.5 (from the command line)" in proc.stdout
    assert "--init_model: cg_implementation: cg -> cg_tf (from the command line)" in proc.stdout
    import keras

    model = keras.models.load_model(tmp_path / "second" / "model.keras")
    assert model.inner_steps == 3 and model.test_lam == 0.5
    assert model.linear_solver.implementation == "cg_tf"  # trained, and saved, with it
    assert keras.models.load_model(first).linear_solver.implementation == "cg"  # the default
    # A setting fixed by the trained model is refused, naming it, before any training.
    proc = train(f"--logdir={tmp_path / 'third'}", f"--init_model={first}", *flags, "--damping=1")
    assert proc.returncode != 0
    assert "--damping=1.0 (the model's: 0.0)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "third" / "model.keras").exists()
    # Flags left at their defaults are not compared: the model's own values hold.
    proc = train(f"--logdir={tmp_path / 'fourth'}", f"--init_model={first}", *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
