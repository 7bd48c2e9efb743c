"""The public command, started as a user would: python -m lbsgd.main --config=... --workdir=..."""

import ast
import datetime
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lbsgd.datasets import imagenet, load_dataset
from tests.helpers import (
    REPO,
    lbsgd_command,
    lbsgd_env,
    metrics_rows,
    run_lbsgd,
    sparse_archives,
    tiny_config,
    write_image_folder,
)

# bs256.py at a resolution and size a CPU trains in seconds.
SMALL_BS256 = ("--config.image_size=32", "--config.model=resnet18", "--config.max_steps=2",
               "--config.log_every_steps=1")


def _time_of_day(timestamp: float) -> float:
    """Seconds since local midnight: what the console's log lines show."""
    moment = datetime.datetime.fromtimestamp(timestamp)
    return moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6


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
    # Evaluation and saving (the epoch's checkpoint, then the new best) are not train time:
    # the throughput of the step after them counts from after the console says the best was
    # saved. Counted from the eval row, its window would hold the saves' seconds as well.
    after = next(r for r in train_rows if r["step"] == steps_per_epoch + 1)
    window_start = _time_of_day(after["time"]) - 512 / after["images_per_sec"]
    best_saved = re.search(rf"^I\d{{4}} (\d\d):(\d\d):(\d\d\.\d+) .*new best eval top-1 "
                           rf"[\d.]+ at step {steps_per_epoch}:", result.stderr, re.MULTILINE)
    hours, minutes, seconds = best_saved.groups()
    assert window_start >= int(hours) * 3600 + int(minutes) * 60 + float(seconds) - 0.005
    assert all(0 <= r["eval_top1"] <= r["eval_top5"] <= 1 for r in eval_rows)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["global_batch_size"] == 512 and config["warmup_epochs"] == 1
    assert (tmp_path / "checkpoints" / str(2 * steps_per_epoch)).is_dir()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"train/loss", "train/lr", "perf/data_wait", "eval/top1", "eval/top5"} <= tags
    assert not {"epoch", "train/epoch", "loss"} & tags
    # The config, once, through TensorBoard's hparams plugin.
    session = plugin_data_pb2.HParamsPluginData.FromString(events.SummaryMetadata(
        "_hparams_/session_start_info").plugin_data.content).session_start_info
    assert session.hparams["global_batch_size"].number_value == 512
    assert session.hparams["warmup"].string_value == "gradual"
    assert "ETA" in result.stderr  # the progress line


def test_bad_config_stops_with_the_fields_and_the_fix(tmp_path):
    result = run_lbsgd(tmp_path, "--config.global_batch_size=100", "--config.warmup=linear")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "global_batch_size 100 is not divisible by bn_group_size 32 x 8 devices" in result.stderr
    assert "warmup 'linear' is unknown" in result.stderr


# Mistakes a user makes, each answered by one short message naming the field and the fix.
USER_MISTAKES = {
    "misspelled field": (("--config.base_lrr=0.2",), "--config.base_lrr: no such config field; "
                         "did you mean --config.base_lr?"),
    "negative seed": (("--config.seed=-1",), "lbsgd: invalid config: seed -1 must be >= 0"),
    "negative noise-scale cadence": (
        ("--config.noise_scale_every_steps=-5",),
        "lbsgd: invalid config: noise_scale_every_steps -5 must be >= 0 (0: off; K: measure "
        "the gradient noise scale every K-th step, e.g. 20)"),
    "batch larger than the training set": (
        ("--config.global_batch_size=8192",),
        "global_batch_size 8192 is larger than the 4000 training images"),
    "missing config file": (("--config=configs/nope.py",), "--config=configs/nope.py: no such "
                            "file"),
    "unparsable value": (("--config.seed=abc",), "flag --config.seed=abc: invalid literal"),
    "data_dir that is a file": (("--config.data_dir=README.md",),
                                "lbsgd: --config.data_dir README.md is a file, not a directory"),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", sorted(USER_MISTAKES))
def test_user_mistakes_stop_in_at_most_three_lines_without_a_traceback(tmp_path, mistake):
    overrides, expected = USER_MISTAKES[mistake]
    config = next((o.split("=", 1)[1] for o in overrides if o.startswith("--config=")),
                  "configs/demo.py")
    overrides = [o for o in overrides if not o.startswith("--config=")]
    load_dataset(tiny_config())  # prepared beforehand: its first-use progress bars aside
    env = lbsgd_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # what a user's shell has: nothing set
    result = run_lbsgd(tmp_path / "run", *overrides, config=config, env=env)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


@pytest.mark.slow
def test_configs_load_from_outside_the_repository_root(tmp_path):
    """configs/*.py import the defaults from the installed package, not from the cwd."""
    command = lbsgd_command(tmp_path / "run", "--config.seed=-1",
                            config=str(REPO / "configs" / "demo.py"))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=lbsgd_env())
    assert result.returncode != 0
    assert "lbsgd: invalid config: seed -1 must be >= 0" in result.stderr, result.stderr
    # A config of the user's own that imports a package the cwd does not hold: one line too.
    own = tmp_path / "mine.py"
    own.write_text("from configs import default\n\ndef get_config():\n    return None\n")
    result = subprocess.run(lbsgd_command(tmp_path / "run", config=str(own)), cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, env=lbsgd_env())
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (f"lbsgd: --config={own} cannot be loaded: ModuleNotFoundError: No module named "
            "'configs'") in result.stderr


def _finite_training(workdir, steps):
    rows = metrics_rows(workdir)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == steps and np.isfinite(losses).all()
    assert any("eval_top1" in r for r in rows)


# The command, with TFDS's mock_data patching ImageNet's records in that process.
MOCKED_COMMAND = """
import sys
import tensorflow_datasets as tfds
from absl import app
from lbsgd import main
with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
    app.run(main.main, argv=["lbsgd", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_bs256_runs_through_the_command_on_mock_imagenet(tmp_path):
    sparse_archives(tmp_path / "downloads" / "manual", imagenet.ARCHIVES)
    result = subprocess.run(
        [sys.executable, "-c", MOCKED_COMMAND, "--config=configs/bs256.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data_dir={tmp_path}",
         "--config.global_batch_size=16", "--config.bn_group_size=2",
         "--config.eval_batch_size=16", *SMALL_BS256],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=lbsgd_env())
    assert result.returncode == 0, result.stderr[-3000:]
    _finite_training(tmp_path / "run", steps=2)


@pytest.mark.slow
def test_bs256_runs_through_the_command_on_a_folder_of_jpegs(tmp_path):
    root = write_image_folder(tmp_path / "photos")  # 3 classes x 8 train / 3 val JPEGs
    result = run_lbsgd(tmp_path / "run", f"--config.dataset=folder:{root}",
                       f"--config.data_dir={tmp_path / 'tfds'}", "--config.num_classes=3",
                       "--config.global_batch_size=16", "--config.bn_group_size=2",
                       "--config.eval_batch_size=16", *SMALL_BS256,
                       config="configs/bs256.py")
    assert result.returncode == 0, result.stderr[-3000:]
    _finite_training(tmp_path / "run", steps=2)


def test_print_config_shows_the_resolved_values_with_their_comments():
    """--print_config: every field of the resolved config (file + overrides), each value
    readable back as Python, beside its comment from lbsgd/config.py; no workdir needed."""
    from configs import demo

    result = subprocess.run(
        [sys.executable, "-m", "lbsgd.main", "--config=configs/demo.py", "--print_config",
         "--config.seed=7"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = demo.get_config()
    expected.seed = 7
    printed = {}
    for line in result.stdout.splitlines():
        if " = " in line and not line.startswith("#"):
            name, value = line.split(" = ", 1)
            printed[name] = ast.literal_eval(value.split("  #")[0])
    assert printed == expected.to_dict()
    assert ("global_batch_size = 512  # kn: the learning rate follows it (linear scaling rule)"
            in result.stdout)
