"""Model zoo: ResNets built by name around one injected normalization layer (models/resnet.py)."""

import functools
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from lbsgd.models import resnet
from lbsgd.models.norm import GroupedBatchNorm, grouped_moments
from lbsgd.models.resnet import ResNet

_BUILDERS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
    "cifar_resnet8": resnet.cifar_resnet8,
    "cifar_resnet20": resnet.cifar_resnet20,
    "cifar_resnet32": resnet.cifar_resnet32,
    "cifar_resnet56": resnet.cifar_resnet56,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def min_image_size(name: str) -> int:
    """The smallest image side model `name` is meant for: its total stride
    (`resnet.total_stride`: 32 for the ImageNet ResNets, 4 for the CIFAR ones)."""
    return _BUILDERS[name].total_stride


def grouped_norm(*, group_size: int, num_groups: int = 1, momentum: float = 0.9,
                 dtype=jnp.float32) -> Callable[..., GroupedBatchNorm]:
    """The paper's BatchNorm as a factory: statistics per worker of `group_size` images
    (n = 32, Sec. 5.1), one row of running statistics for each of `num_groups` workers."""
    return functools.partial(GroupedBatchNorm, group_size=group_size, num_groups=num_groups,
                             momentum=momentum, dtype=jnp.dtype(dtype))


def create_model(name: str, *, num_classes: int, in_channels: int = 3,
                 norm: Callable[..., nnx.Module] | None = None, dtype=jnp.float32,
                 seed: int = 0) -> nnx.Module:
    """Model `name` with float32 parameters and compute dtype `dtype` ("float32", "bfloat16").

    `norm` builds every normalization layer (`grouped_norm(...)`, or any factory with its
    signature); by default one worker of 32 images.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    norm = grouped_norm(group_size=32, dtype=dtype) if norm is None else norm
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels, norm=norm,
                           dtype=jnp.dtype(dtype), rngs=nnx.Rngs(seed))


__all__ = ["MODEL_NAMES", "GroupedBatchNorm", "ResNet", "create_model", "grouped_moments",
           "grouped_norm", "min_image_size"]
