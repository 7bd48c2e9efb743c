"""python -m lbsgd.report on real run directories, and on damaged ones."""

import json
import shutil
import statistics
import subprocess
import sys

import pytest

from lbsgd import report, train
from tests.helpers import REPO, metrics_rows, tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real short runs: two seeds of kn = 64 and one run of kn = 128."""
    root = tmp_path_factory.mktemp("runs")
    settings = {"kn64-seed0": dict(seed=0), "kn64-seed1": dict(seed=1),
                "kn128-seed0": dict(seed=0, global_batch_size=128)}
    for name, overrides in settings.items():
        config = tiny_config(max_steps=4, log_every_steps=1, warmup="none", **overrides)
        train.train_and_evaluate(config, str(root / name))
    return root


def test_seeds_are_grouped_as_mean_and_std_of_the_runs_own_rows(runs, tmp_path):
    result = report.write_report([runs / "kn64-seed0", runs / "kn64-seed1", runs / "kn128-seed0"],
                                 tmp_path)
    assert result["problems"] == []
    by_kn = {row[1]: row for row in result["rows"]}
    assert set(by_kn) == {"64", "128"}
    assert by_kn["64"][5] == "2" and by_kn["128"][5] == "1"  # seeds per setting
    assert by_kn["64"][2] == "0.025" and by_kn["128"][2] == "0.05"  # 0.1 x kn / 256
    final = [100 * (1 - metrics_rows(runs / f"kn64-seed{s}")[-1]["eval_top1"]) for s in (0, 1)]
    assert by_kn["64"][6] == f"{statistics.fmean(final):.2f} ± {statistics.stdev(final):.2f}"
    assert set(result["plots"]) == {"training_error.png", "learning_rate.png",
                                    "error_vs_batch.png"}
    for name in result["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert "| global_batch_size=64 | 64 |" in markdown
    assert "<table>" in (tmp_path / "report.html").read_text()


def test_damaged_and_partial_runs_are_reported_not_fatal(runs, tmp_path):
    torn = tmp_path / "torn"  # killed mid-write: the torn last line is skipped
    shutil.copytree(runs / "kn64-seed0", torn)
    with open(torn / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    garbled = tmp_path / "garbled"  # damage inside the file
    shutil.copytree(runs / "kn64-seed1", garbled)
    lines = (garbled / "metrics.jsonl").read_text().splitlines()
    (garbled / "metrics.jsonl").write_text("\n".join(lines[:1] + ["{oops"] + lines[1:]))
    partial = tmp_path / "partial"  # stopped before its first evaluation
    shutil.copytree(runs / "kn128-seed0", partial)
    rows = [json.loads(line) for line in lines if "eval_top1" not in line]
    (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    missing = tmp_path / "missing"

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "lbsgd.report", str(torn), str(garbled), str(partial),
         str(missing), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "1 settings, 3 runs left out" in result.stdout
    markdown = (out / "report.md").read_text()
    assert f"`{garbled}`: metrics.jsonl line 2 is not JSON" in markdown
    assert f"`{partial}`: partial run: 4 training rows, 0 eval rows" in markdown
    assert f"`{missing}`: cannot read config.json" in markdown
