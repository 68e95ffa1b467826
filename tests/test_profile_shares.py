"""benchmarks.profile_shares: stage and tracking shares of a py-spy raw profile, counted by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.profile_shares import shares

MAIN = 'process 1:"python -m steps.main";<module> (steps/main.py:234);run (steps/main.py:105)'


def test_shares_count_stages_and_mlflow_frames(tmp_path: Path) -> None:
    prof = tmp_path / "p.txt"
    prof.write_text(
        "\n".join(
            [
                f"{MAIN};run (steps/finetune.py:89);train (imgsearch/train/loop.py:10);conv (torch/x.py:3) 6",
                f"{MAIN};run (steps/finetune.py:89);log_metric (mlflow/tracking/fluent.py:5) 2",
                f"{MAIN};run (steps/register.py:9);log_model (mlflow/pyfunc/__init__.py:7) 2",
                "",
            ]
        )
    )
    text = shares(prof)
    assert text.startswith("10 samples; frames in mlflow/: 4 (40.00%)")
    lines = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines() if ln.startswith("steps/")}
    assert lines["steps/finetune"] == ["8", "80.0%", "25.0%"]
    assert lines["steps/register"] == ["2", "20.0%", "100.0%"]
    assert "60.0%  conv (torch/x.py)" in text  # own time, line numbers folded
    assert "60.0%  train (imgsearch/train/loop.py)" in text


def test_an_empty_profile_is_refused(tmp_path: Path) -> None:
    prof = tmp_path / "p.txt"
    prof.write_text("")
    with pytest.raises(SystemExit, match="no samples"):
        shares(prof)
