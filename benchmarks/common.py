"""What the benchmarks share: the fields every row records, the arguments that choose a train
step and lbsgd's run for them, and the folder of real JPEG photos (also the tests')."""

import argparse
import datetime
import os
import shlex
import sys
from pathlib import Path

import flax
import jax
import numpy as np
import optax

from lbsgd import models, parallel, train
from lbsgd.config import default_config

LOAD_AT_START = round(os.getloadavg()[0], 2)
STEP_FIELDS = ("model", "image_size", "per_device_batch", "dtype", "bn_group_size", "num_classes")


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the benchmark's docstring, with its example commands."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(sys.argv[0]).stem}",
                                   description=doc, formatter_class=argparse.RawTextHelpFormatter)


def environment(devices) -> dict:
    """The fields of every row: when, on what, with which versions, flags and command, and the
    1-minute load average at the start and now (CPU times move 2x with a neighbour's load)."""
    return {"date": datetime.date.today().isoformat(), "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "device_count": len(devices),
            "jax_version": jax.__version__, "flax_version": flax.__version__,
            "optax_version": optax.__version__, "xla_flags": os.environ.get("XLA_FLAGS"),
            "command": shlex.join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}",
                                   *sys.argv[1:]]),
            "load_average": [LOAD_AT_START, round(os.getloadavg()[0], 2)]}


def param_size(params) -> dict:
    """Parameter count and bytes of a tree of arrays (or of their shapes)."""
    leaves = jax.tree.leaves(params)
    return {"param_count": sum(x.size for x in leaves),
            "param_bytes": sum(x.size * x.dtype.itemsize for x in leaves)}


def add_step_arguments(parser, *, model: str, image_size: int, devices: int | None) -> None:
    """The arguments that choose the train step: STEP_FIELDS and --devices."""
    parser.add_argument("--model", default=model, choices=models.MODEL_NAMES)
    parser.add_argument("--image_size", type=int, default=image_size)
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--bn_group_size", type=int, default=32, help="lbsgd's n")
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=devices,
                        help=f"use the first N devices (default: {devices or 'all'})")


def experiment(args) -> tuple[train.Experiment, dict]:
    """lbsgd's run with the paper's recipe (lbsgd.config) for the step `args` choose, on
    synthetic data and the first --devices devices, and its first batch, on the devices."""
    devices = jax.devices()
    count = len(devices) if args.devices is None else args.devices
    if not 1 <= count <= len(devices):
        sys.exit(f"--devices {count}: this host has {len(devices)} devices (on CPU, simulate "
                 "more with XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    mesh = parallel.make_mesh(devices[:count])
    ex = train.setup(step_config(args, mesh.size), mesh)
    return ex, next(ex.train_batches())


def step_config(args, num_devices: int):
    """The paper's recipe (lbsgd.config) for the step `args` choose, on synthetic data."""
    config, kn = default_config(), args.per_device_batch * num_devices
    config.update(model=args.model, image_size=args.image_size, dtype=args.dtype,
                  bn_group_size=args.bn_group_size, num_classes=args.num_classes,
                  dataset="synthetic", global_batch_size=kn, eval_batch_size=kn)
    return config


def write_photo_folder(root, *, classes: int, per_class: dict[str, int], sizes, seed: int = 0):
    """root/SPLIT/class_C/III.jpg, per_class[SPLIT] JPEG files (quality 90) in each class: random
    crops (at least a third of each side) of scikit-learn's two sample photos, resized to a
    (width, height) drawn from `sizes`. Real content, so that decoding does real work."""
    from PIL import Image
    from sklearn.datasets import load_sample_images  # a test dependency: only imported here

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                photo = photos[(c + i) % len(photos)]
                height, width = photo.shape[:2]
                h, w = rng.integers(height // 3, height + 1), rng.integers(width // 3, width + 1)
                top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                crop = Image.fromarray(photo[top:top + h, left:left + w])
                crop.resize(sizes[rng.integers(len(sizes))]).save(folder / f"{i:03d}.jpg",
                                                                   quality=90)
    return Path(root)
