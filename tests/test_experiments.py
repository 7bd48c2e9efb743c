"""The small-scale study's driver, end to end in its --quick mode: runs, then reports."""

import subprocess
import sys

import pytest

from tests.helpers import REPO, lbsgd_env, metrics_rows


@pytest.mark.slow
def test_quick_sweep_runs_every_setting_and_seed_then_reports(tmp_path):
    command = [sys.executable, "experiments/small_scale.py", "--quick", "--out", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=lbsgd_env())
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["kn128-seed0", "kn128-seed1", "kn64-seed0", "kn64-seed1"]
    for run in runs:
        rows = metrics_rows(tmp_path / "runs" / run)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    table = (tmp_path / "report-fig1" / "report.md").read_text()
    assert "| global_batch_size=64 | 64 | 0.025 | none | eq9 | 2 |" in table
    assert "| global_batch_size=128 | 128 | 0.05 | none | eq9 | 2 |" in table
    # A second call finds every run finished and only rewrites the reports.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=lbsgd_env())
    assert again.returncode == 0 and "+ " not in again.stdout
