"""The public command, started as a user would: python -m lbsgd.main --config=... --workdir=..."""

import json

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from tests.helpers import metrics_rows, run_lbsgd


@pytest.mark.slow
def test_demo_gradual_warmup_reaches_the_scaled_rate_at_the_end_of_epoch_one(tmp_path):
    """The foundation's acceptance command: kn = 512, warmup 1 epoch, 2 epochs, every step."""
    result = run_lbsgd(tmp_path, "--config.global_batch_size=512", "--config.warmup=gradual",
                    "--config.warmup_epochs=1", "--config.num_epochs=2",
                    "--config.log_every_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics_rows(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    steps_per_epoch = 4000 // 512  # 7
    assert [r["step"] for r in train_rows] == list(range(1, 2 * steps_per_epoch + 1))
    for row in train_rows:
        assert {"step", "epoch", "lr", "loss", "train_top1", "images_per_sec"} <= set(row)
        assert np.isfinite(row["loss"]) and row["images_per_sec"] > 0
    lrs = np.array([r["lr"] for r in train_rows])
    warmup = lrs[:steps_per_epoch]
    np.testing.assert_allclose(warmup[0], 0.1, rtol=1e-6)
    np.testing.assert_allclose(np.diff(warmup), 0.1 / (steps_per_epoch - 1), rtol=1e-4)
    end_of_epoch_1 = next(r for r in train_rows if r["epoch"] == 1.0)
    np.testing.assert_allclose(end_of_epoch_1["lr"], 0.2, rtol=1e-6)  # 0.1 x 512 / 256
    np.testing.assert_allclose(lrs[steps_per_epoch:], 0.2, rtol=1e-6)

    eval_rows = [r for r in rows if "eval_top1" in r]
    assert [r["step"] for r in eval_rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 1 for r in eval_rows)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["global_batch_size"] == 512 and config["warmup_epochs"] == 1
    assert (tmp_path / "checkpoints" / str(2 * steps_per_epoch)).is_dir()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"loss", "lr", "eval_top1"} <= set(events.Tags()["tensors"])
    assert "ETA" in result.stderr  # the progress line


def test_bad_config_stops_with_the_fields_and_the_fix(tmp_path):
    result = run_lbsgd(tmp_path, "--config.global_batch_size=100", "--config.warmup=linear")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "global_batch_size 100 is not divisible by bn_group_size 32 x 8 devices" in result.stderr
    assert "warmup 'linear' is unknown" in result.stderr
