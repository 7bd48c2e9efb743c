"""Classify images with a model exported by `python -m lbsgd.export`:

    from lbsgd import inference
    model = inference.load("exported/")
    probabilities = model.classify(images)  # uint8 [H, W, C] -> [K]; [B, H, W, C] -> [B, K]

Each image goes through the run's evaluation transform (datasets/augment.py: the center crop
of Sec. 5.1, the whole image, or the pixels as stored for in-memory datasets) and the
dataset's normalization, then the network in eval mode, with BatchNorm's running statistics
averaged over the virtual workers as the run's evaluation did: the probabilities' argmax
agrees with `python -m lbsgd.evaluate` on the same checkpoint. An image is uint8 pixels
[H, W, C] or [H, W], or an encoded file (a path or its bytes); pass the files themselves to
decode them exactly as training's evaluation did (JPEGs are decoded at a reduced scale there,
datasets/augment.py). This module needs neither the workdir nor the dataset.
"""

import functools
import io
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from PIL import Image

from lbsgd import models
from lbsgd.datasets import augment
from lbsgd.errors import CheckpointError, DataError

FORMAT = "lbsgd-inference-1"  # model.json's "format"; changes when its meaning does
INFO_FILE = "model.json"  # what inference needs, written last: an export without it is partial
ARRAYS_DIR = "model"  # orbax: {"params", "batch_stats"}, no optimizer state
AS_STORED = "as_stored"  # in-memory datasets: evaluation feeds the stored pixels


def _probabilities(graphdef: nnx.GraphDef, params: dict, batch_stats: dict, pixels: jax.Array,
                   *, mean: jax.Array, std: jax.Array, dtype) -> jax.Array:
    model = nnx.merge(graphdef, params, batch_stats)
    # train.normalize's formula (not imported: it would load the whole training stack).
    inputs = ((pixels.astype(jnp.float32) - mean) / std).astype(dtype)
    return jax.nn.softmax(model(inputs, train=False).astype(jnp.float32), axis=-1)


class Preprocess:
    """One image -> uint8 [S, S, C], as training's evaluation fed it to the network, from
    model.json's `image_size`, `in_channels`, `augment` and `eval_transform`."""

    def __init__(self, info: dict):
        self.input_shape = (info["image_size"], info["image_size"], info["in_channels"])
        self.eval_transform = (None if info["eval_transform"] == AS_STORED else
                               augment.record_transforms(info["augment"], info["image_size"])[1])

    def __call__(self, image) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            image = Path(image).read_bytes()
        if not isinstance(image, bytes):
            pixels = np.asarray(image)
            if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
                raise DataError(f"an image of dtype {pixels.dtype} and shape {pixels.shape}: "
                                "give uint8 pixels [H, W, C] or [H, W], or an image file")
            pixels = pixels[..., None] if pixels.ndim == 2 else pixels
            if self.eval_transform is None and pixels.shape == self.input_shape:
                return pixels
            image = _png(pixels)  # lossless: the transforms below read encoded images
        if self.eval_transform is not None:
            return self.eval_transform({"image": image}, None)
        return self._as_stored(image)

    def _as_stored(self, encoded: bytes) -> np.ndarray:
        """An in-memory dataset's images are fed as stored; another size or channel count is
        brought to the stored ones as datasets/augment.py's whole_image does."""
        size, channels = self.input_shape[0], self.input_shape[2]
        with Image.open(io.BytesIO(encoded)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
        return pixels[..., None] if channels == 1 else pixels


class Classifier:
    """An exported model: `classify(images)` -> class probabilities; `class_names` when the
    dataset has them; `info` is the export's model.json; `preprocess(image)` what the network
    sees of an image."""

    def __init__(self, info: dict, graphdef: nnx.GraphDef, params: dict, batch_stats: dict):
        self.info = info
        self.class_names = info.get("class_names")
        self.preprocess = Preprocess(info)
        self._params, self._batch_stats = params, batch_stats
        self._forward = jax.jit(functools.partial(
            _probabilities, graphdef, mean=jnp.asarray(info["mean"], jnp.float32),
            std=jnp.asarray(info["std"], jnp.float32), dtype=jnp.dtype(info["dtype"])))

    def classify(self, images, *, batch_size: int = 256) -> np.ndarray:
        """Probabilities [K] of one image (uint8 [H, W, C] or [H, W], a path, bytes), or
        [B, K] of a batch (uint8 [B, H, W, C], or a list of images)."""
        single = (isinstance(images, (str, bytes, os.PathLike))
                  or (isinstance(images, np.ndarray) and images.ndim in (2, 3)))
        pixels = np.stack([self.preprocess(image) for image in ([images] if single else images)])
        size = min(batch_size, len(pixels))
        out = []
        for start in range(0, len(pixels), size):
            chunk = pixels[start:start + size]
            # Padded to one shape, compiled once; eval-mode BatchNorm treats images apart.
            padding = np.zeros((size - len(chunk), *chunk.shape[1:]), np.uint8)
            probabilities = self._forward(self._params, self._batch_stats,
                                          np.concatenate([chunk, padding]))
            out.append(np.asarray(probabilities)[:len(chunk)])
        probabilities = np.concatenate(out)
        return probabilities[0] if single else probabilities


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()


def read_info(path: str | os.PathLike) -> dict:
    """An export's model.json, checked to be one this version reads."""
    info_path = Path(path) / INFO_FILE
    if not info_path.is_file():
        raise CheckpointError(f"{path} is not a complete export (no {INFO_FILE}): export it "
                              "with python -m lbsgd.export --workdir=RUN --out=DIR")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{info_path} is of format {info.get('format')!r}, this lbsgd "
                              f"reads {FORMAT!r}: export the run again with this version")
    return info


def load(path: str | os.PathLike) -> Classifier:
    """The model exported to `path` (python -m lbsgd.export), on JAX's default device."""
    info = read_info(path)
    norm = models.grouped_norm(group_size=info["bn_group_size"], num_groups=1,
                               dtype=info["dtype"])
    model = models.create_model(info["model"], num_classes=info["num_classes"],
                                in_channels=info["in_channels"], norm=norm, dtype=info["dtype"])
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    target = {"params": nnx.to_pure_dict(params), "batch_stats": nnx.to_pure_dict(batch_stats)}
    arrays = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
        Path(path).absolute() / ARRAYS_DIR, args=ocp.args.StandardRestore(target))
    return Classifier(info, graphdef, arrays["params"], arrays["batch_stats"])
