"""Host input throughput: images/s that the train and eval input give at 224 px, on real JPEGs.

Writes JPEGs of ImageNet-like size (random crops of scikit-learn's two sample photos, 500x375
or 375x500, quality 90), prepares them as a `folder:` dataset through TFDS, the path a run
reads, then times lbsgd's host-level readers batch after batch: `read_train_rows`
(random-size crop + flip, Sec. 5.1) and `read_eval_rows` (resize 256, center 224), with one
decoding thread and with every core. These are what the global batch iterators run on their
background thread, less the copy to the devices, so the rate is what the host can decode for a
train step. Prints one JSON object.

    python -m benchmarks.input_pipeline [--images 1024] [--batch_size 128] [--batches 8]
"""

import functools
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import PIL

from benchmarks import common
from lbsgd import input_pipeline
from lbsgd.config import default_config
from lbsgd.datasets import load_dataset

CLASSES = 8
SIZES = ((500, 375),) * 3 + ((375, 500),)  # (width, height): 3 in 4 landscape


def rates(batches, batch_size: int, count: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process): the second is
    what one core gives when the machine is shared, the first what this machine gave now."""
    next(batches)  # the first batch starts the decoding threads; not timed
    cpu = time.process_time()
    wall = sum(common.time_each(lambda: next(batches), count))
    images = count * batch_size
    return round(images / wall, 1), round(images / (time.process_time() - cpu), 1)


def measure(root: Path, data_dir: Path, *, threads: int, batch_size: int, batches: int) -> dict:
    config = default_config()
    config.dataset, config.data_dir = f"folder:{root}", str(data_dir)
    config.num_classes, config.image_size, config.input_threads = CLASSES, 224, threads
    dataset = load_dataset(config)
    rows = slice(0, batch_size)
    train = map(functools.partial(input_pipeline.read_train_rows, dataset,
                                  global_batch_size=batch_size, seed=0, rows=rows),
                itertools.count())
    evaluate = map(functools.partial(input_pipeline.read_eval_rows, dataset,
                                     batch_size=batch_size, rows=rows),
                   range(0, len(dataset.eval), batch_size))
    eval_count = min(batches, len(dataset.eval) // batch_size - 1)
    (train_wall, train_cpu), (eval_wall, eval_cpu) = (rates(train, batch_size, batches),
                                                      rates(evaluate, batch_size, eval_count))
    return {"threads": threads,
            "train_images_per_sec": train_wall, "train_images_per_cpu_sec": train_cpu,
            "eval_images_per_sec": eval_wall, "eval_images_per_cpu_sec": eval_cpu}


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--images", type=int, default=1024, help="JPEG files per split")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    args = parser.parse_args()
    load_before, cores = common.load_average(), len(os.sched_getaffinity(0))
    per_class = args.images // CLASSES
    with tempfile.TemporaryDirectory(prefix="lbsgd-input-bench-") as tmp:
        root, data_dir = Path(tmp) / "photos", Path(tmp) / "tfds"
        common.write_photo_folder(root, classes=CLASSES, sizes=SIZES,
                                  per_class={"train": per_class, "val": per_class})
        # The first measurement prepares the TFDS dataset; the second reuses it.
        results = [measure(root, data_dir, threads=t, batch_size=args.batch_size,
                           batches=args.batches) for t in sorted({1, cores})]
        mean_bytes = np.mean([f.stat().st_size for f in root.glob("train/*/*.jpg")])
    print(json.dumps({
        "benchmark": "input_pipeline", "image_size": 224, "jpeg": "500x375 or 375x500, q90",
        "jpeg_kib_mean": round(mean_bytes / 1024, 1), "images_per_split": per_class * CLASSES,
        "batch_size": args.batch_size, "timed_batches": args.batches, "cores": cores,
        "pillow": PIL.__version__, "python": platform.python_version(), "results": results,
        **common.environment(jax.devices(), load_before),
    }, indent=2))


if __name__ == "__main__":
    main()
