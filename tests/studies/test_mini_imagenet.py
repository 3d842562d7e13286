"""Smoke tests of scripts/studies/mini_imagenet.py on a tiny generated mini-ImageNet."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

# Slow: runs the study script in subprocesses (meta-training included).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUDIES = ROOT / "scripts" / "studies"
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")


def _run(*args):
    return subprocess.run(
        [sys.executable, str(STUDIES / "mini_imagenet.py"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
        check=False,
    )


def test_study_trains_tests_reports_and_reuses_finished_runs(tiny_mini_imagenet, tmp_path):
    args = [
        f"--data_dir={tiny_mini_imagenet}",
        f"--output_dir={tmp_path / 'out'}",
        "--algorithms=imaml",
        "--image_size=16",
        "--ways=3",
        "--queries=2",
        "--meta_batch_size=2",
        "--meta_steps=2",
        "--steps_per_epoch=1",
        "--inner_steps=1",
        "--val_tasks=2",
        "--test_tasks=4",
    ]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    table = (out / "mini_imagenet.md").read_text()
    assert "mini-ImageNet 3-way 1-shot" in table and "| iMAML-GD | " in table
    assert "| 2 x 2 |" in table
    (record,) = json.loads((out / "mini_imagenet.json").read_text())["records"]
    assert record["test_tasks"] == 4 and 0.0 <= record["test_accuracy"] <= 1.0
    # Two epochs: one validation accuracy and one failed fraction per epoch, from TensorBoard.
    assert len(record["val_accuracy"]) == 2 and len(record["failed_fraction"]) == 2
    assert record["reused"] is False
    assert (out / "mini_imagenet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train_config = json.loads((out / "runs" / "imaml" / "results.json").read_text())["config"]
    assert train_config["dataset"] == "mini_imagenet" and train_config["lam"] == 0.5
    recorded = json.loads((out / "runs" / "imaml" / "study_train_flags.json").read_text())
    assert "--algorithm=imaml" in recorded and "--meta_steps=2" in recorded

    # The same flags again: the finished run is read back, not trained again.
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = json.loads((out / "mini_imagenet.json").read_text())["records"]
    assert again["reused"] is True and again["test_accuracy"] == record["test_accuracy"]


def test_bad_flags_fail_before_any_work(tmp_path):
    proc = _run("--algorithms=imaml,sgd", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "--algorithms must be some of" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = _run("--meta_steps=10", "--steps_per_epoch=3", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "must be a multiple of --steps_per_epoch" in proc.stderr


_RESUMABLE_PROBE = """
import json, pathlib, sys
sys.path.insert(0, sys.argv[1])
import mini_imagenet as study
run, args = pathlib.Path(sys.argv[2]), ["--meta_steps=4", "--lam=0.5"]
seen = [study._interrupted_run_of(run, args)]
(run / "backup").mkdir(parents=True)
(run / "backup" / "training_metadata.json").write_text('{"epoch": 1}')
seen.append(study._interrupted_run_of(run, args))
(run / "study_train_flags.json").write_text(json.dumps(args))
seen.append(study._interrupted_run_of(run, args))
seen.append(study._interrupted_run_of(run, ["--meta_steps=8", "--lam=0.5"]))
(run / "results.json").write_text("{}")
seen.append(study._interrupted_run_of(run, args))
print(json.dumps(seen))
"""


def test_only_an_unfinished_checkpointed_run_of_the_same_flags_is_resumed(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _RESUMABLE_PROBE, str(STUDIES), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Empty folder; checkpoint but no flags file; resumable; other flags; finished.
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, False, True, False, False]
