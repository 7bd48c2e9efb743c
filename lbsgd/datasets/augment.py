"""Augmentation, a choice per dataset (`config.augment`), as pure functions of (seed, epoch, index).

- `inception_crop`: Sec. 5.1's ImageNet recipe, a random crop of 8-100% of the area with aspect
  ratio 3/4-4/3 resized to image_size, and a flip; evaluation resizes the shorter side to
  256/224 of image_size and takes the center. For photos much larger than image_size.
- `pad_crop`: the CIFAR standard for small images: pad 4 pixels (zeros), crop image_size at a
  random offset, flip; evaluation sees the whole image.
- `none`: the stored pixels (resized to image_size if they differ), in training and evaluation.

A transform of encoded records is `transform(record, rng) -> uint8 [H, W, C]`; one of
in-memory pixels is `transform(pixels, rng)`. `rng` is seeded by (seed, epoch, index)
(datasets/sources.py), so a resumed run sees the same pixels.
"""

import functools
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

# Sec. 5.1, after Szegedy et al. [36]: a crop of 8% to 100% of the image area with aspect
# ratio in [3/4, 4/3], resized to image_size x image_size; eval resizes the shorter side to
# 256/224 of image_size and takes the center.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_RESIZE = 256 / 224
PAD = 4  # pad_crop: the CIFAR-10 recipe of He et al. 2016, Sec. 4.2
AUGMENTATIONS = ("inception_crop", "pad_crop", "none")

Transform = Callable[[dict, np.random.Generator], np.ndarray]
PixelTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


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


def whole_image(record: dict, rng: np.random.Generator, *, size: int) -> np.ndarray:
    """The decoded image as RGB, resized to size x size when it is not that size already."""
    with Image.open(io.BytesIO(record["image"])) as image:
        image = image.convert("RGB") if image.mode != "RGB" else image
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image)


def pad_crop(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad PAD pixels on every side, crop the original size at a random offset, flip."""
    height, width = pixels.shape[:2]
    padded = np.pad(pixels, ((PAD, PAD), (PAD, PAD), (0, 0)))
    top, left = rng.integers(0, 2 * PAD + 1, size=2)
    crop = padded[top:top + height, left:left + width]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def record_transforms(augment: str, size: int) -> tuple[Transform, Transform]:
    """(train, eval) transforms of encoded images for `augment`."""
    whole = functools.partial(whole_image, size=size)
    if augment == "inception_crop":
        return (functools.partial(train_image, size=size),
                functools.partial(eval_image, size=size))
    if augment == "pad_crop":
        return (lambda record, rng: pad_crop(whole(record, rng), rng)), whole
    return whole, whole


def pixel_transform(augment: str) -> PixelTransform | None:
    """The training transform of in-memory pixels for `augment` (None: as stored)."""
    return pad_crop if augment == "pad_crop" else None
