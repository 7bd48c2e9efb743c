"""Model zoo: ResNets with per-group ("virtual worker") BatchNorm, built by name."""

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


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    bn_group_size: int = 32,
    bn_num_groups: int = 1,
    bn_momentum: float = 0.9,
    dtype=jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Builds model `name` with float32 parameters and compute dtype `dtype`.

    `dtype` may be a string ("float32", "bfloat16") or a jnp dtype. `bn_group_size` is the
    number of examples each BN normalizes over (the paper's per-worker n = 32, Sec. 5.1);
    `bn_num_groups` the number of such workers in a training batch, kn / n, each keeping its
    own running statistics (models/norm.py).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](
        num_classes=num_classes,
        in_channels=in_channels,
        bn_group_size=bn_group_size,
        bn_num_groups=bn_num_groups,
        bn_momentum=bn_momentum,
        dtype=jnp.dtype(dtype),
        rngs=nnx.Rngs(seed),
    )


__all__ = ["MODEL_NAMES", "GroupedBatchNorm", "ResNet", "create_model", "grouped_moments"]
