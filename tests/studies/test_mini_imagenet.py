"""Smoke tests of scripts/studies/mini_imagenet.py on a tiny generated mini-ImageNet."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Slow: runs the study script in subprocesses (meta-training included).
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUDIES = ROOT / "scripts" / "studies"
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
# The adaptations of every model under the default --eval_lams: its own, then proximal GD at
# lam 0 (plain GD) and at lam 0.5.
ADAPTATIONS = ["own", "lam=0", "lam=0.5"]


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
    # The --tiny sizes (two arms, iMAML-GD and the authors' system, two seeds, 3-way tasks
    # of 16x16 images, the default --eval_lams 0 and 0.5) on the generated data.
    args = ["--tiny", f"--data_dir={tiny_mini_imagenet}", f"--output_dir={tmp_path / 'out'}"]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    table = (out / "mini_imagenet.md").read_text()
    assert "mini-ImageNet 3-way 1-shot" in table and "| iMAML-GD | 0, 1 | " in table
    assert "| iMAML-GD, authors' system | 0, 1 | " in table and "| 2 x 2 |" in table
    assert "| adapted by lam=0 | adapted by lam=0.5 |" in table
    for adaptation in ADAPTATIONS:
        assert f"| iMAML-GD | iMAML-GD, authors' system | {adaptation} | 2 | " in table
    saved = json.loads((out / "mini_imagenet.json").read_text())
    records = saved["records"]
    assert [(r["algorithm"], r["seed"]) for r in records] == [
        ("imaml", 0),
        ("imaml_authors", 0),
        ("imaml", 1),
        ("imaml_authors", 1),
    ]
    for record in records:
        # Every model scored on the same 4 tasks in its own adaptation and in each identical one.
        assert list(record["per_task"]) == ADAPTATIONS and record["test_tasks"] == 4
        assert all(len(v) == 4 for v in record["per_task"].values())
        assert record["test_accuracy"] == pytest.approx(sum(record["per_task"]["own"]) / 4)
        # Oracle: the same adaptation by another code path (the saved model's own against the
        # study's proximal evaluator) gives the same predictions on every task. iMAML-GD adapts
        # by proximal GD at its training lam, 0.5; the authors' system at test_lam 0, where
        # its pull-back is the identity: plain GD.
        same = "lam=0.5" if record["algorithm"] == "imaml" else "lam=0"
        assert record["per_task"]["own"] == record["per_task"][same], record["algorithm"]
        # Two epochs: one validation accuracy and one failed fraction per epoch, from TensorBoard.
        assert len(record["val_accuracy"]) == 2 and len(record["failed_fraction"]) == 2
        assert record["reused"] is False
    assert (out / "mini_imagenet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = out / "runs" / "imaml_authors" / "seed1"
    train_config = json.loads((run / "results.json").read_text())["config"]
    assert train_config["dataset"] == "mini_imagenet" and train_config["lam"] == 0.5
    assert train_config["seed"] == 1 and train_config["inner_loop"] == "pull_back"
    assert (train_config["damping"], train_config["lam_damping"]) == (1.0, 10.0)
    assert train_config["test_lam"] == 0.0
    recorded = json.loads((run / "study_train_flags.json").read_text())
    assert "--algorithm=imaml" in recorded and "--meta_steps=2" in recorded

    # The seed intervals and the paired tests under every adaptation, recomputed from the
    # per-task numbers with numpy (t_{0.975,1} = 12.706 from the printed tables).
    assert {arm: list(saved["arms"][arm]) for arm in saved["arms"]} == {
        "imaml": ADAPTATIONS,
        "imaml_authors": ADAPTATIONS,
    }
    comparisons = saved["comparisons"]
    assert [c["adaptation"] for c in comparisons] == ADAPTATIONS
    for adaptation, paired in zip(ADAPTATIONS, comparisons, strict=True):
        ours = [r["per_task"][adaptation] for r in records if r["algorithm"] == "imaml"]
        theirs = [r["per_task"][adaptation] for r in records if r["algorithm"] == "imaml_authors"]
        interval = saved["arms"]["imaml"][adaptation]["seed_interval"]
        assert interval["mean"] == pytest.approx(np.mean(np.mean(ours, axis=1)), abs=1e-12)
        half = 12.706 * np.std(np.mean(ours, axis=1), ddof=1) / np.sqrt(2)
        assert interval["half_width"] == pytest.approx(half, rel=1e-4, abs=1e-12)
        d = np.mean(ours, axis=0) - np.mean(theirs, axis=0)
        assert (paired["arm"], paired["against"]) == ("imaml", "imaml_authors")
        assert paired["seeds"] == [0, 1]
        assert paired["per_task"]["mean_difference"] == pytest.approx(d.mean(), abs=1e-12)
        assert paired["per_task"]["wins"] == int(np.sum(d > 0))

    # The same flags again: the finished runs and their tests are read back, not redone.
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "mini_imagenet.json").read_text())["records"]
    assert all(r["reused"] for r in again)
    assert [r["per_task"] for r in again] == [r["per_task"] for r in records]
    assert [r["test_seconds"] for r in again] == [r["test_seconds"] for r in records]

    # One more eval lam: only that adaptation is tested. A test file as earlier versions wrote
    # it (the own adaptation's list) is read as the own scores, with made-up numbers that no
    # test would give, to show that they are read and not tested again.
    made_up = [1.0, 0.0, 1.0, 0.0]
    test_file = out / "runs" / "imaml" / "seed0" / "study_test.json"
    old = json.loads(test_file.read_text())
    test_file.write_text(json.dumps(dict(old, per_task=made_up)))
    proc = _run(*args, "--eval_lams=0,0.5,2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    more = json.loads((out / "mini_imagenet.json").read_text())["records"]
    assert all(r["reused"] and list(r["per_task"]) == [*ADAPTATIONS, "lam=2"] for r in more)
    first = more[0]["per_task"]
    assert first["own"] == made_up and len(first["lam=2"]) == 4
    assert (first["lam=0"], first["lam=0.5"]) == (
        old["per_task"]["lam=0"],
        old["per_task"]["lam=0.5"],
    )
    for before, after in zip(records[1:], more[1:], strict=True):
        assert {k: after["per_task"][k] for k in ADAPTATIONS} == before["per_task"]
        assert len(after["per_task"]["lam=2"]) == 4
    assert (
        "| adapted by lam=0 | adapted by lam=0.5 | adapted by lam=2 |"
        in (out / "mini_imagenet.md").read_text()
    )


def test_bad_flags_fail_before_any_work(tmp_path):
    proc = _run("--algorithms=imaml,sgd", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "--algorithms must be some of" in proc.stderr
    assert not (tmp_path / "o").exists()
    proc = _run("--meta_steps=10", "--steps_per_epoch=3", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "must be a multiple of --steps_per_epoch" in proc.stderr
    proc = _run("--seeds=1,1", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "--seeds must be distinct" in proc.stderr
    proc = _run("--eval_lams=0,-1", f"--output_dir={tmp_path / 'o'}")
    assert proc.returncode != 0 and "--eval_lams must be >= 0" in proc.stderr


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
