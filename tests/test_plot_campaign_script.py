"""scripts/plot_campaign.py on two hand-made stages, as a user runs it (a subprocess)."""

import json


def _stage(path, steps, seconds, accuracies):
    path.mkdir()
    curve = [
        {
            "epoch": i,
            "meta_steps": m,
            "train_seconds": s,
            "cpu_seconds": s,
            "logs": {"val_sparse_categorical_accuracy": a},
        }
        for i, (m, s, a) in enumerate(zip(steps, seconds, accuracies, strict=True))
    ]
    (path / "curve.json").write_text(json.dumps(curve))


def test_stages_are_drawn_end_to_end_with_the_clock_carried_over(tmp_path, run_script):
    _stage(tmp_path / "one", [50, 100], [100.0, 200.0], [0.80, 0.90])
    _stage(tmp_path / "two", [150, 200], [40.0, 90.0], [0.92, 0.93])
    out = tmp_path / "out" / "curve"
    proc = run_script(
        "plot_campaign.py", f"--stages={tmp_path / 'one'},{tmp_path / 'two'}", f"--output={out}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = json.loads(out.with_suffix(".json").read_text())
    assert [e["stage"] for e in merged] == ["one", "one", "two", "two"]
    assert [e["campaign_seconds"] for e in merged] == [100.0, 200.0, 240.0, 290.0]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "93.00% at meta-step 200 after 0.08 training hours" in proc.stdout


def test_a_stage_that_does_not_continue_the_step_count_is_refused(tmp_path, run_script):
    _stage(tmp_path / "one", [50, 100], [100.0, 200.0], [0.80, 0.90])
    _stage(tmp_path / "restart", [50], [40.0], [0.85])
    out = tmp_path / "curve"
    proc = run_script(
        "plot_campaign.py", f"--stages={tmp_path / 'one'},{tmp_path / 'restart'}", f"--output={out}"
    )
    assert proc.returncode != 0
    assert "starts at meta-step 50, not after the previous stage's 100" in proc.stderr
    assert not out.with_suffix(".png").exists()
