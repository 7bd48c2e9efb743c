"""The Fashion-MNIST study's driver, end to end in its --quick mode: runs, then reports."""

import json
import runpy
import subprocess
import sys

import pytest

from tests.helpers import REPO, lbsgd_env, metrics_rows, write_fashion


@pytest.mark.slow
def test_quick_study_runs_every_kind_of_run_then_reports(tmp_path):
    write_fashion(tmp_path / "raw", per_class=(20, 10))  # 200 train / 100 test images
    command = [sys.executable, "experiments/fashion_mnist.py", "--quick", "--out",
               str(tmp_path / "study"), f"--config.manual_dir={tmp_path / 'raw'}",
               f"--config.data_dir={tmp_path / 'tfds'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env=lbsgd_env())
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in (tmp_path / "study" / "runs").iterdir())
    assert runs == ["kn128-constant-seed0", "kn128-none-seed0", "kn128-seed0", "kn64-seed0"]
    for run in runs:  # each run's console, kept
        assert "done: final eval top1" in (tmp_path / "study" / "logs" / f"{run}.log").read_text()
    for run in runs:
        rows = metrics_rows(tmp_path / "study" / "runs" / run)
        assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    lrs = {run: [r["lr"] for r in metrics_rows(tmp_path / "study" / "runs" / run) if "lr" in r]
           for run in runs}
    assert lrs["kn128-none-seed0"] == pytest.approx([0.05] * 3)  # 0.1 x 128 / 256
    assert lrs["kn128-constant-seed0"] == pytest.approx([0.05] * 3)  # min(base_lr, target)
    table = (tmp_path / "study" / "report-warmup" / "report.md").read_text()
    for warmup in ("gradual", "constant", "none"):
        assert f"| 128 | 0.05 | {warmup} | eq9 | 1 |" in table
    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert summary["large_kn"] == 128 and summary["base_kn"] == 64
    assert set(summary["final_error"]) == {"64", "128"}
    assert set(summary["readings"]["fig1"]) == {"128"}
    assert summary["readings"]["warmup_matters"] is None  # one seed: no std
    # A second call finds every run finished and only rewrites the reports.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                           env=lbsgd_env())
    assert again.returncode == 0 and "+ " not in again.stdout


def test_a_failed_run_stops_the_study_with_the_end_of_its_console(tmp_path):
    command = [sys.executable, "experiments/fashion_mnist.py", "--quick", "--out",
               str(tmp_path / "study"), "--config.model=resnet7"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=lbsgd_env())
    assert result.returncode == 1
    log = tmp_path / "study" / "logs" / "kn64-seed0.log"
    assert f"kn64-seed0 failed (exit status 1); the end of {log}:" in result.stderr
    assert "lbsgd: invalid config: model" in result.stderr  # the run's own one-line error
    assert "Traceback" not in result.stderr


def test_the_pre_registered_readings_follow_the_rules_written_in_results_md():
    study = runpy.run_path(str(REPO / "experiments" / "fashion_mnist.py"))
    reading, warmup_matters = study["reading"], study["warmup_matters"]
    base = 0.0821  # kn = 256's mean final error
    assert reading(base + 0.0050, base) == "flat"  # within 0.5 points, either side
    assert reading(base - 0.0049, base) == "flat"
    assert reading(base + 0.0051, base) == "degrades slightly"
    assert reading(base + 0.0100, base) == "degrades slightly"  # "more than 1 point": not 1
    assert reading(base + 0.0101, base) == "breaks"
    assert reading(base - 0.0060, base) == "better by more than 0.5 points"
    # Gradual 10.0 +- 0.1; the others' means 0.5 points higher: more than 2 x the larger std
    # (0.1 or 0.2) only against the setting whose std is 0.1.
    gradual = [0.099, 0.100, 0.101]
    tight, loose = [0.104, 0.105, 0.106], [0.103, 0.105, 0.107]
    assert warmup_matters({"gradual": gradual, "none": tight, "constant": tight}) is True
    assert warmup_matters({"gradual": gradual, "none": tight, "constant": loose}) is True
    wider = [0.101, 0.105, 0.109]  # std 0.4 points: 0.5 < 2 x 0.4
    assert warmup_matters({"gradual": gradual, "none": tight, "constant": wider}) is False
    assert warmup_matters({"gradual": [0.1], "none": [0.2], "constant": [0.2]}) is None
