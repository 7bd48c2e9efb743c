"""Pixels from a stored record: Sec. 5.1's training crop and flip, and its evaluation resize.

Each transform is `transform(record, rng) -> uint8 [H, W, C]` with `rng` seeded by (seed,
epoch, index) (datasets/sources.py), so augmentation is a pure function of those three.
"""

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Sec. 5.1, after Szegedy et al. [36]: a crop of 8% to 100% of the image area with aspect
# ratio in [3/4, 4/3], resized to image_size x image_size; eval resizes the shorter side to
# 256/224 of image_size and takes the center.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_RESIZE = 256 / 224


def random_size_crop(height: int, width: int,
                     rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop of 8%-100% of the area, aspect ratio 3/4-4/3 (Sec. 5.1).

    Up to 10 draws; when none fits in the image, the largest centered crop whose aspect ratio
    is within range, as in the usual Inception-style implementations.
    """
    log_aspect = (math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))
    for _ in range(CROP_ATTEMPTS):
        area = height * width * rng.uniform(*CROP_AREA)
        aspect = math.exp(rng.uniform(*log_aspect))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < CROP_ASPECT[0]:
        w, h = width, round(width / CROP_ASPECT[0])
    elif aspect > CROP_ASPECT[1]:
        w, h = round(height * CROP_ASPECT[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: Sequence[float], size: int) -> np.ndarray:
    """The `box` (top, left, h, w) of `image` resampled to size x size RGB, as uint8 HWC.

    The JPEG is decoded at the smallest power-of-two scale that keeps the box at least `size`
    pixels (Pillow's draft mode); the box is then cropped and resized in one pass.
    """
    top, left, h, w = box
    full_width, full_height = image.size
    image.draft("RGB", (math.ceil(full_width * size / w), math.ceil(full_height * size / h)))
    sx, sy = image.width / full_width, image.height / full_height
    if image.mode != "RGB":  # grayscale, CMYK, palette or RGBA files
        image = image.convert("RGB")
    crop = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=crop))


def train_image(record: dict, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Sec. 5.1 training input: random-size crop with aspect-ratio jitter, random h-flip."""
    with Image.open(io.BytesIO(record["image"])) as image:
        box = random_size_crop(image.height, image.width, rng)
        pixels = resized_crop(image, box, size)
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


def eval_image(record: dict, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """Sec. 5.1 evaluation input: the shorter side resized to round(size * 256 / 224), then
    the central size x size; no randomness.

    Computed as one resampling of the central box of the original image, on the same sampling
    grid as resizing the whole image and cropping, at ~half the cost.
    """
    with Image.open(io.BytesIO(record["image"])) as image:
        scale = round(size * EVAL_RESIZE) / min(image.size)
        width, height = round(image.width * scale), round(image.height * scale)
        top, left = (height - size) // 2, (width - size) // 2  # in the resized image
        sx, sy = image.width / width, image.height / height  # resized -> original pixels
        return resized_crop(image, (top * sy, left * sx, size * sy, size * sx), size)
