"""scripts/evaluate.py on the shipped pretrained model, run as a user runs it."""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
PRETRAINED = ROOT / "tf_imaml" / "pretrained" / "omniglot_5way_1shot.keras"


def test_shipped_model_is_far_above_chance(tmp_path):
    assert PRETRAINED.is_file(), "the pretrained model must ship with the repository"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--tasks=40", f"--output={out}"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"5-way 1-shot test accuracy \d+\.\d+ \+- \d+\.\d+% over 40 tasks", proc.stdout
    ), proc.stdout
    result = json.loads(out.read_text())
    # Chance is 20% for 5 ways; a meta-trained model is far above it on unseen characters.
    assert result["accuracy"] > 0.7 and result["tasks"] == 40


def test_missing_model_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "evaluate.py"),
            f"--model={tmp_path / 'nope.keras'}",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0 and "is not a file" in proc.stderr
