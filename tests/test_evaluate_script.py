"""scripts/evaluate.py on the shipped pretrained model, run as a user runs it."""

import importlib.util
import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRETRAINED = ROOT / "tf_imaml" / "pretrained" / "omniglot_5way_1shot.keras"


@pytest.mark.slow
def test_shipped_model_is_far_above_chance(tmp_path, run_script):
    assert PRETRAINED.is_file(), "the pretrained model must ship with the repository"
    out = tmp_path / "result.json"
    proc = run_script("evaluate.py", "--tasks=40", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"5-way 1-shot test accuracy \d+\.\d+ \+- \d+\.\d+% over 40 tasks of the vinyals split",
        proc.stdout,
    ), proc.stdout
    # Not a terminal: one progress line, not a bar redrawn in place for every batch.
    assert "\x08" not in proc.stdout and "\r" not in proc.stdout, proc.stdout[:500]
    result = json.loads(out.read_text())
    # Chance is 20% for 5 ways; a meta-trained model is far above it on unseen characters.
    assert result["accuracy"] > 0.7 and result["tasks"] == 40 and result["split"] == "vinyals"
    assert result["queries"] == 1 and "(1 query per class, 16 inner steps)" in proc.stdout
    assert result["non_finite_tasks"] == 0 and "WARNING" not in proc.stdout


@pytest.mark.slow
def test_diverged_adaptation_is_reported(tmp_path, run_script):
    import keras

    import tf_imaml

    meta = tf_imaml.pretrained.load("omniglot_5way_1shot")
    diverging = keras.models.clone_model(meta)
    diverging.set_weights(meta.get_weights())
    diverging.inner_learning_rate = 1e6  # saved in the model's config
    diverging.save(tmp_path / "diverging.keras")
    out = tmp_path / "result.json"
    proc = run_script(
        "evaluate.py", f"--model={tmp_path / 'diverging.keras'}", "--tasks=20", f"--output={out}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["non_finite_tasks"] == 20
    assert "WARNING: the adaptation diverged (non-finite logits) on 20 of 20 tasks" in proc.stdout


@pytest.mark.slow
def test_missing_model_is_a_clear_error(tmp_path, run_script):
    proc = run_script("evaluate.py", f"--model={tmp_path / 'nope.keras'}", timeout=300)
    assert proc.returncode != 0 and "is not a file nor a shipped model" in proc.stderr
    assert "omniglot_5way_1shot" in proc.stderr


def _load_evaluate(monkeypatch):
    spec = importlib.util.spec_from_file_location("evaluate", ROOT / "scripts" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, evaluate)  # dataclasses look it up there
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # as when run: its folder is on the path
    spec.loader.exec_module(evaluate)
    return evaluate


def test_model_is_a_file_or_a_shipped_name(tmp_path, monkeypatch):
    evaluate = _load_evaluate(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert evaluate.model_file("omniglot_5way_1shot").samefile(PRETRAINED)
    assert evaluate.model_file(str(PRETRAINED)) == PRETRAINED
    # A file of the same name, given as a path, wins over the shipped model.
    (tmp_path / "omniglot_5way_1shot").write_bytes(b"")
    assert evaluate.model_file("omniglot_5way_1shot") == pathlib.Path("omniglot_5way_1shot")
    with pytest.raises(ValueError, match=r"omniglot_5way is not a file nor .*omniglot_5way_1shot"):
        evaluate.model_file("omniglot_5way")


@pytest.mark.slow
def test_adaptation_flags_change_the_adaptation_and_are_recorded(tmp_path, run_script):
    # The shipped model was trained with the authors' loop (plain steps, one pull-back); the
    # proximal loop at lam 2 keeps it near theta, whose predictions are poor. Measured on
    # these 20 tasks: 95.6% against 84.9%, the same tasks for both (seed 2).
    results = {}
    for loop in ("pull_back", "proximal"):
        out = tmp_path / f"{loop}.json"
        proc = run_script(
            "evaluate.py",
            "--tasks=20",
            "--test_lam=2",
            f"--inner_loop={loop}",
            "--inner_learning_rate=0.1",
            "--inner_steps=4",
            f"--output={out}",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[loop] = json.loads(out.read_text())
    for loop, result in results.items():
        assert result["inner_loop"] == loop and result["test_lam"] == 2.0
        assert result["inner_steps"] == 4 and result["inner_learning_rate"] == 0.1
    assert results["pull_back"]["accuracy"] > results["proximal"]["accuracy"] + 0.05, results


@pytest.mark.slow
def test_adaptation_flags_the_model_cannot_take_are_clear_errors(tmp_path, run_script):
    import keras

    import tf_imaml

    learner = tf_imaml.models.conv4_classifier(5, input_shape=(28, 28, 1), filters=4)
    maml = tf_imaml.MAML(learner, inner_steps=1, inner_learning_rate=0.1)
    maml.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    maml.save(tmp_path / "maml.keras")
    for flag, message in [
        ("--inner_loop=proximal", "--inner_loop: a MAML has no proximal inner loop"),
        ("--test_lam=1", "--test_lam: a MAML has no proximal term"),
        ("--inner_learning_rate=0", "--inner_learning_rate must be > 0, got 0.0"),
    ]:
        proc = run_script("evaluate.py", f"--model={tmp_path / 'maml.keras'}", flag, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, (flag, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_shipped_model_is_scored_on_its_own_split_by_default(tmp_path, monkeypatch):
    evaluate = _load_evaluate(monkeypatch)
    split = lambda **kw: evaluate.class_split(evaluate.EvalConfig(**kw))  # noqa: E731
    assert split(model="omniglot_20way_1shot_lake") == "lake"
    assert split(model="omniglot_5way_1shot") == "vinyals"
    # A file is not a shipped model: --split as given, vinyals by default.
    model = tmp_path / "omniglot_20way_1shot_lake"
    model.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert split(model="omniglot_20way_1shot_lake") == "vinyals"
    assert split(model="omniglot_20way_1shot_lake", split="lake") == "lake"


def test_another_split_is_refused_when_its_classes_were_seen_in_training(monkeypatch):
    evaluate = _load_evaluate(monkeypatch)
    split = lambda **kw: evaluate.class_split(evaluate.EvalConfig(**kw))  # noqa: E731
    # Oracle: the class names of the two splits (tests/test_datasets.py). The Vinyals test
    # characters all belong to the Lake evaluation alphabets, so the Lake model may be scored
    # on them; 236 of the 659 Lake test characters are Vinyals training or validation ones.
    from tf_imaml.datasets import load_omniglot

    names = lambda subset, s: set(load_omniglot(subset, split=s).class_names)  # noqa: E731
    seen = names("train", "vinyals") | names("val", "vinyals")
    overlap = len(names("test", "lake") & seen)
    assert not names("test", "vinyals") & (names("train", "lake") | names("val", "lake"))
    assert split(model="omniglot_20way_1shot_lake", split="vinyals") == "vinyals"
    with pytest.raises(
        ValueError,
        match=rf"--split=lake: {overlap} of the test classes .* "
        r"omniglot_5way_1shot was meta-trained or validated on",
    ):
        split(model="omniglot_5way_1shot", split="lake")
    assert overlap == 236
