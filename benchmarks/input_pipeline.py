"""Input throughput: images/s of the train and eval pipelines at 224 px, on real JPEG files.

Writes JPEGs of ImageNet-like size (random crops of scikit-learn's two sample photos, resized
to 500x375 or 375x500, quality 90), prepares them as a `folder:` dataset through TFDS, exactly
the path a run reads, then times `train_batches` (random-size crop + flip, Sec. 5.1) and
`eval_batches` (resize 256, center 224) with one decoding thread and with every core. The
consumer does nothing but take batches, so the rate is what the host can feed a train step.
Prints one JSON object.

    python benchmarks/input_pipeline.py [--images=1024] [--batch_size=128] [--batches=8]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from sklearn.datasets import load_sample_images

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lbsgd and configs/
from configs import default  # noqa: E402
from lbsgd import input_pipeline  # noqa: E402


def write_photos(root: Path, count: int, classes: int = 8, seed: int = 0) -> None:
    """`count` JPEGs in root/{train,val}/class_C/: crops of the sample photos, ~ImageNet size."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(count):
            folder = root / split / f"class_{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            photo = photos[i % len(photos)]
            h = rng.integers(photo.shape[0] // 2, photo.shape[0] + 1)
            w = rng.integers(photo.shape[1] // 2, photo.shape[1] + 1)
            top = rng.integers(0, photo.shape[0] - h + 1)
            left = rng.integers(0, photo.shape[1] - w + 1)
            size = (500, 375) if rng.random() < 0.75 else (375, 500)
            crop = Image.fromarray(photo[top:top + h, left:left + w]).resize(size)
            crop.save(folder / f"{i:05d}.jpg", quality=90)


def rates(batches, batch_size: int, count: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process): the second is
    what one core gives when the machine is shared, the first what this machine gave now."""
    next(batches)  # the first batch starts the prefetching; not timed
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        next(batches)
    images = count * batch_size
    return (round(images / (time.perf_counter() - wall), 1),
            round(images / (time.process_time() - cpu), 1))


def measure(root: Path, data_dir: Path, *, threads: int, batch_size: int, batches: int) -> dict:
    config = default.get_config()
    config.dataset, config.data_dir = f"folder:{root}", str(data_dir)
    config.num_classes, config.image_size, config.input_threads = 8, 224, threads
    dataset = input_pipeline.load_dataset(config)
    rows = slice(0, batch_size)
    train = input_pipeline.train_batches(dataset, global_batch_size=batch_size, seed=0, rows=rows)
    evaluate = input_pipeline.eval_batches(dataset, batch_size=batch_size, rows=rows)
    eval_count = min(batches, len(dataset.eval) // batch_size - 1)
    train_rates, eval_rates = rates(train, batch_size, batches), rates(evaluate, batch_size,
                                                                        eval_count)
    return {"threads": threads,
            "train_images_per_sec": train_rates[0], "train_images_per_cpu_sec": train_rates[1],
            "eval_images_per_sec": eval_rates[0], "eval_images_per_cpu_sec": eval_rates[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="JPEG files per split")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="lbsgd-input-bench-") as tmp:
        root, data_dir = Path(tmp) / "photos", Path(tmp) / "tfds"
        write_photos(root, args.images)  # prepared as a TFDS dataset by the first measurement
        results = [measure(root, data_dir, threads=t, batch_size=args.batch_size,
                           batches=args.batches) for t in sorted({1, cores})]
        mean_bytes = np.mean([f.stat().st_size for f in root.glob("train/*/*.jpg")])
    print(json.dumps({
        "benchmark": "input_pipeline", "image_size": 224, "jpeg": "500x375 or 375x500, q90",
        "jpeg_kib_mean": round(mean_bytes / 1024, 1), "images_per_split": args.images,
        "batch_size": args.batch_size, "timed_batches": args.batches, "cores": cores,
        "pillow": PIL.__version__, "python": platform.python_version(),
        "load_average_1min": os.getloadavg()[0], "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
