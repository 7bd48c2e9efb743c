"""python -m lbsgd.report on real run directories, on damaged ones, and on written ones
(duplicates of a seed, an unfinished run) that must not be averaged."""

import json
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from lbsgd import noise_scale, report, train
from lbsgd.optim import learning_rate_schedule
from tests.helpers import REPO, made_once, metrics_rows, tiny_config


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Three real short runs: two seeds of kn = 64 and one run of kn = 128."""
    def make(root):
        settings = {"kn64-seed0": dict(seed=0), "kn64-seed1": dict(seed=1),
                    "kn128-seed0": dict(seed=0, global_batch_size=128)}
        for name, overrides in settings.items():
            config = tiny_config(max_steps=4, log_every_steps=1, warmup="none", **overrides)
            train.train_and_evaluate(config, str(root / name))

    return made_once(tmp_path_factory, "report-runs", make)[0]


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
    assert set(result["plots"]) == {"training_error.png", "eval_error.png",
                                    "learning_rate.png", "error_vs_batch.png"}
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


STEPS_PER_EPOCH = 10  # the written runs' epoch = step / 10


def _write_run(path, *, seed, final_top1, last_step=40, **overrides):
    """A run directory as a real run writes it (config.json, metrics.jsonl), no training:
    4 epochs of 10 steps, rows every 3 steps and at the last, an evaluation per epoch."""
    config = tiny_config(**{"seed": seed, "global_batch_size": 512, "base_lr": 0.1,
                            "warmup": "gradual", "log_every_steps": 3, **overrides})
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    rows = []
    for step in range(1, last_step + 1):
        epoch = step / STEPS_PER_EPOCH
        if step % 3 == 0 or step == last_step:
            rows.append({"step": step, "epoch": epoch, "lr": 0.146, "loss": 1.0,
                         "train_top1": 0.5, "grad_norm": 1.0, "images_per_sec": 100.0,
                         "time": float(step)})
        if step % STEPS_PER_EPOCH == 0:  # eval top-1 rises linearly to final_top1
            rows.append({"step": step, "epoch": epoch, "eval_top1": final_top1 * epoch / 4,
                         "eval_top5": 1.0, "eval_loss": 1.0, "time": float(step)})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return config


@pytest.fixture
def written(tmp_path):
    runs = tmp_path / "runs"
    configs = {
        "seed0": _write_run(runs / "seed0", seed=0, final_top1=0.9),
        "seed1": _write_run(runs / "seed1", seed=1, final_top1=0.8),
        "seed0-again": _write_run(runs / "seed0-again", seed=0, final_top1=0.1),
        "seed2-unfinished": _write_run(runs / "seed2-unfinished", seed=2, final_top1=0.2,
                                       last_step=25),
        "kn256": _write_run(runs / "kn256", seed=0, final_top1=0.7, global_batch_size=256,
                            warmup="none"),
    }
    return runs, configs


def test_duplicates_and_unfinished_runs_are_not_averaged(written, tmp_path):
    runs, _ = written
    result = report.write_report(sorted(runs.iterdir()), tmp_path / "out")
    assert result["problems"] == []
    by_kn = {row[1]: row for row in result["rows"]}
    assert set(by_kn) == {"256", "512"}
    assert by_kn["512"][5] == "2"  # seeds 0 and 1; not the duplicate, not the unfinished run
    final = [10.0, 20.0]  # 1 - 0.9, 1 - 0.8
    assert by_kn["512"][6] == f"{statistics.fmean(final):.2f} ± {statistics.stdev(final):.2f}"
    assert by_kn["256"][5] == "1" and by_kn["256"][6] == "30.00"
    separate = dict(result["not_averaged"])
    assert set(separate) == {str(runs / "seed0-again"), str(runs / "seed2-unfinished")}
    assert f"duplicate of {runs / 'seed0'} (same config and seed 0)" in separate[
        str(runs / "seed0-again")]
    assert "final top-1 err. 90.00%" in separate[str(runs / "seed0-again")]
    assert "unfinished, seed 2, at step 25 of 40" in separate[str(runs / "seed2-unfinished")]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Not averaged (duplicates and unfinished runs):" in markdown
    assert f"- `{runs / 'seed0-again'}`: " in markdown


def test_learning_rate_curve_is_the_schedule_at_every_step(written):
    runs, configs = written
    settings = report.group_settings([report.load_run(runs / n) for n in configs])
    curves = report.learning_rate_curves(settings)
    assert set(curves) == {"global_batch_size=256, warmup=none, 1 seed",
                           "global_batch_size=512, warmup=gradual, 2 seeds"}
    for name, legend in (("kn256", "global_batch_size=256, warmup=none, 1 seed"),
                         ("seed0", "global_batch_size=512, warmup=gradual, 2 seeds")):
        steps, lrs = curves[legend]
        np.testing.assert_array_equal(steps, np.arange(1, 41))  # every step, not the logged
        schedule = learning_rate_schedule(ConfigDict(configs[name]), STEPS_PER_EPOCH)
        expected = [float(schedule(step - 1)) for step in steps]  # row `step` used lr(step-1)
        np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    _, lrs = curves["global_batch_size=512, warmup=gradual, 2 seeds"]
    # gradual warmup from base_lr 0.1 to 0.2 at the epoch's last update, x0.1 at epochs 2, 3
    np.testing.assert_allclose(lrs[[0, 9, 19, 20, 30]], [0.1, 0.2, 0.2, 0.02, 0.002],
                               rtol=1e-6)


def test_eval_error_curve_per_epoch_over_the_seeds(written, tmp_path):
    runs, configs = written
    result = report.write_report([runs / n for n in configs], tmp_path)
    assert "eval_error.png" in result["plots"]
    assert (tmp_path / "eval_error.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    epochs, errors = report.eval_error_curves(result["settings"])[
        "global_batch_size=512, warmup=gradual, 2 seeds"]
    assert epochs == [1, 2, 3, 4]
    expected = [100 * (1 - statistics.fmean(t * e / 4 for t in (0.9, 0.8))) for e in epochs]
    np.testing.assert_allclose(errors, expected)


def test_noise_scale_is_averaged_over_seeds_part_by_part_and_marks_each_kn(written, tmp_path):
    """Rows as a probing run writes them: |G|^2 = a / step and tr(Sigma) = b per seed. The
    setting's curve is mean(b) / mean(a / step) (McCandlish et al.: the parts are averaged,
    then divided; the mean of the seeds' ratios would be 175 x step, not 160 x step); a step
    whose averaged |G|^2 is not positive is left out; both settings' kn are marked."""
    runs, _ = written
    parts = {"seed0": (2.0, 300.0), "seed1": (0.5, 100.0), "kn256": (1.0, 50.0)}
    for name, (a, b) in parts.items():
        path = runs / name / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            if "loss" in row:
                row.update({noise_scale.GRAD_SQUARED: a / row["step"] if row["step"] > 3
                            else -1.0, noise_scale.TRACE: b, noise_scale.PROBES: row["step"]})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = report.write_report(sorted(runs.iterdir()), tmp_path / "out")
    assert "noise_scale.png" in result["plots"]
    assert (tmp_path / "out" / "noise_scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = report.noise_scale_curves(result["settings"])
    epochs, values = curves["global_batch_size=512, warmup=gradual, 2 seeds"]
    steps = [*range(6, 40, 3), 40]  # the rows (steps 3, 6, ..., 39 and 40) less step 3
    np.testing.assert_allclose(epochs, [s / STEPS_PER_EPOCH for s in steps])
    np.testing.assert_allclose(values, [160.0 * s for s in steps], rtol=1e-12)
    np.testing.assert_allclose(curves["global_batch_size=256, warmup=none, 1 seed"][1],
                               [50.0 * s for s in steps], rtol=1e-12)
    assert report.plot_noise_scale(result["settings"], tmp_path / "again.png") == [256, 512]


def test_a_run_from_before_a_config_field_existed_is_the_same_setting_as_its_default(runs,
                                                                                    tmp_path):
    """config.json of a run made before `grad_reduce_dtype` was added lacks the field; with the
    field at its default (the old behaviour) it is the same setting, so its seed is averaged
    with the new run's, and the legend does not call the two apart."""
    old = tmp_path / "old-seed1"
    shutil.copytree(runs / "kn64-seed1", old)
    config = json.loads((old / "config.json").read_text())
    del config["grad_reduce_dtype"]
    (old / "config.json").write_text(json.dumps(config))
    result = report.write_report([runs / "kn64-seed0", old], tmp_path / "report")
    assert [(row[0], row[5]) for row in result["rows"]] == [("all runs", "2")]
