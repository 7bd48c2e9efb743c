"""The console and the run's records: compile line, ETA, window means, end-of-run summary,
run.json provenance; from real launches of the public command on the demo config."""

import json
import re

import numpy as np
import pytest

from tests.helpers import metrics_rows, run_lbsgd

SMALL = ("--config.global_batch_size=64", "--config.bn_group_size=8", "--config.max_steps=12")


@pytest.mark.slow
def test_console_and_outputs_of_a_demo_run(tmp_path):
    every_step, windowed = tmp_path / "every_step", tmp_path / "windowed"
    per_step = run_lbsgd(every_step, *SMALL, "--config.log_every_steps=1")
    assert per_step.returncode == 0, per_step.stderr[-3000:]
    result = run_lbsgd(windowed, *SMALL, "--config.log_every_steps=4",
                       "--config.profile_steps=5:6")
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr

    # 1. Compilation is announced before it starts and timed, once, before the first step.
    compiling = err.index("compiling the train step for 8 devices ...")
    compiled = re.search(r"compiled the train step in (\d+\.\d) s", err)
    assert compiled and compiling < compiled.start() < err.index("step 4/12")
    assert err.count("compiling the train step") == 1
    # No warning a user would take for a fault: orbax's "overriding jax.Array" (our one-device
    # array handler, registered silently once per process).
    assert "overriding" not in err

    # 2. The ETA counts train steps only: at step 4 of 12, twice the 4 steps' time so far; were
    # the compile time included it would exceed that bound by twice the compile time (which
    # takes seconds even when the suite's compilation cache serves it).
    rows = metrics_rows(windowed)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [4, 8, 12]
    eta = re.search(r"step 4/12 .*ETA (\d+)m(\d\d)s", err)
    eta_seconds = int(eta[1]) * 60 + int(eta[2])
    seconds_for_4_steps = 4 * 64 / train[0]["images_per_sec"]
    assert eta_seconds <= 2 * seconds_for_4_steps + 1
    assert 2 * float(compiled[1]) > 1

    # 6. Data wait: the share of each window spent waiting for input, on the row and the line.
    assert all(0 <= r["data_wait"] <= 1 for r in train)
    shown = [int(x) for x in re.findall(r"step \d+/12 .*\| data wait (\d+)% \|", err)]
    assert shown == [round(100 * r["data_wait"]) for r in train]

    # 7. The profiler hook: a trace of steps 5-6 that TensorBoard's profile plugin reads.
    assert f"profile of train steps 5 to 6 written to {windowed / 'profile'}" in err
    assert list((windowed / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert not (every_step / "profile").exists()

    # 5. loss and train_top1 of a row are the means over its window of 4 steps, as the run
    # that logs every step shows them; lr and grad_norm are the row's own step's.
    steps = {r["step"]: r for r in metrics_rows(every_step) if "loss" in r}
    assert sorted(steps) == list(range(1, 13))
    for row in train:
        window = [steps[s] for s in range(row["step"] - 3, row["step"] + 1)]
        for key in ("loss", "train_top1"):
            np.testing.assert_allclose(row[key], np.mean([w[key] for w in window]), rtol=1e-5)
        for key in ("lr", "grad_norm"):
            np.testing.assert_allclose(row[key], steps[row["step"]][key], rtol=1e-5)
    assert train[0]["loss"] != pytest.approx(steps[4]["loss"], rel=1e-6)

    # 3. The end-of-run summary.
    evals = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in evals] == [12]
    summary = next(line for line in err.splitlines() if "done:" in line)
    assert f"final eval top1 {evals[-1]['eval_top1']:.4f} at step 12" in summary
    assert f"best {evals[-1]['eval_top1']:.4f} at step 12" in summary
    assert "trained steps 1 to 12 (12 steps)" in summary and "wall time" in summary
    rate = float(re.search(r"\| (\d+) img/s over train steps", summary)[1])
    assert rate > 0
    assert str(windowed) in summary and "metrics.jsonl" in summary and "checkpoints/" in summary

    # 4. Provenance in run.json; config.json stays the config alone.
    run = json.loads((windowed / "run.json").read_text())
    assert run["lbsgd_version"] and run["device_count"] == 8 and run["process_count"] == 1
    assert run["device_kind"] and "--config.log_every_steps=4" in run["argv"]
    assert all(run["versions"][name] for name in ("jax", "flax", "optax", "orbax-checkpoint"))
    assert run["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?",
                                                     run["git_commit"])
    config = json.loads((windowed / "config.json").read_text())
    assert "argv" not in config and config["log_every_steps"] == 4
