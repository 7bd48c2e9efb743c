"""ResNet v1 (He et al. 2016) in NHWC, as trained by Goyal et al. (2017).

Variant and initialization follow Goyal et al. Sec. 5.1, which uses the fb.resnet.torch
ResNets (their reference [12]):
- bottleneck blocks put the stride on the 3x3 convolution, not on the first 1x1;
- shortcuts are the identity, or a 1x1 projection conv (carrying the stride) + BN when the
  shape changes;
- conv kernels are He/MSRA normal with fan_out, Var = 2 / (kh * kw * out_channels);
- the last BN gamma of every residual block is 0, so each block starts as the identity;
- the final FC layer is N(0, 0.01^2) with zero bias.

Every BN comes from one `norm` factory passed to the model once, as in Flax's ImageNet
example: lbsgd passes a `functools.partial` of `GroupedBatchNorm` (statistics over each
virtual worker's n = 32 images, Sec. 5.1; models/norm.py); a benchmark's baseline passes
plain BatchNorm. A factory is called as `norm(num_features, zero_init=bool)` and returns a
module called as `bn(x, train=bool)`; it carries its own settings (group size, momentum, dtype).
Parameters are float32; `dtype` is the compute dtype of the convolutions and the FC layer.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lbsgd.models import pooling

# Sec. 5.1: "MSRA" init with fan_out, a plain (not truncated) normal distribution.
CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# Sec. 5.1: the final fully-connected layer is drawn from N(0, 0.01^2).
FC_INIT = jax.nn.initializers.normal(stddev=0.01)

# Every stride of the network, read by ResNet and by `total_stride` alike. A stem is
# (conv kernel, conv stride, 3x3 max-pool stride; 1: no max pool); every stage after the
# first opens with a block of stride STAGE_STRIDE.
STEMS = {"imagenet": (7, 2, 2), "cifar": (3, 1, 1)}
STAGE_STRIDE = 2


@dataclasses.dataclass(frozen=True)
class _Layers:
    """Builds convs and BNs that share the network-wide settings."""

    norm: Callable[..., nnx.Module]
    dtype: jnp.dtype
    rngs: nnx.Rngs

    def conv(self, cin: int, cout: int, kernel: int, stride: int = 1) -> nnx.Conv:
        # Explicit symmetric padding, as in the Torch reference; "SAME" would pad a
        # stride-2 conv asymmetrically and shift the sampling grid.
        pad = (kernel - 1) // 2
        return nnx.Conv(
            cin,
            cout,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            kernel_init=CONV_INIT,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=self.rngs,
        )

    def bn(self, features: int, *, zero_init: bool = False) -> nnx.Module:
        return self.norm(features, zero_init=zero_init)


class Shortcut(nnx.Module):
    """Identity, or 1x1 conv (with the block's stride) + BN when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, layers: _Layers):
        self.project = stride != 1 or cin != cout
        if self.project:
            self.conv = layers.conv(cin, cout, 1, stride)
            self.bn = layers.bn(cout)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not self.project:
            return x
        return self.bn(self.conv(x), train=train)


class BasicBlock(nnx.Module):
    """Two 3x3 convs (stride on the first); output width == `width`."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, layers: _Layers):
        self.conv1 = layers.conv(cin, width, 3, stride)
        self.bn1 = layers.bn(width)
        self.conv2 = layers.conv(width, width, 3)
        self.bn2 = layers.bn(width, zero_init=True)  # Sec. 5.1: last BN gamma = 0
        self.shortcut = Shortcut(cin, width, stride, layers)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x), train=train))
        y = self.bn2(self.conv2(y), train=train)
        return nnx.relu(y + self.shortcut(x, train=train))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (with the stride, fb.resnet.torch), 1x1 expand to 4 * width."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, layers: _Layers):
        cout = width * self.expansion
        self.conv1 = layers.conv(cin, width, 1)
        self.bn1 = layers.bn(width)
        self.conv2 = layers.conv(width, width, 3, stride)
        self.bn2 = layers.bn(width)
        self.conv3 = layers.conv(width, cout, 1)
        self.bn3 = layers.bn(cout, zero_init=True)  # Sec. 5.1: last BN gamma = 0
        self.shortcut = Shortcut(cin, cout, stride, layers)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x), train=train))
        y = nnx.relu(self.bn2(self.conv2(y), train=train))
        y = self.bn3(self.conv3(y), train=train)
        return nnx.relu(y + self.shortcut(x, train=train))


class ResNet(nnx.Module):
    """ResNet v1: stem, stages of residual blocks, global average pool, FC.

    `stem="imagenet"`: 7x7/2 conv (padding 3), BN, ReLU, 3x3/2 max pool (padding 1).
    `stem="cifar"`: 3x3/1 conv, BN, ReLU, no pooling (He et al. 2016, Sec. 4.2).
    Stage i > 0 starts with a stride-2 block.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        *,
        stem: str,
        num_classes: int,
        in_channels: int,
        norm: Callable[..., nnx.Module],
        dtype,
        rngs: nnx.Rngs,
    ):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; expected 'imagenet' or 'cifar'")
        layers = _Layers(norm, jnp.dtype(dtype), rngs)
        self.dtype = jnp.dtype(dtype)
        stem_kernel, stem_stride, self.pool_stride = STEMS[stem]
        self.stem_conv = layers.conv(in_channels, widths[0], stem_kernel, stem_stride)
        self.stem_bn = layers.bn(widths[0])

        blocks = []
        cin = widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            for j in range(size):
                stride = STAGE_STRIDE if i > 0 and j == 0 else 1
                blocks.append(block(cin, width, stride, layers))
                cin = width * block.expansion
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(
            cin,
            num_classes,
            kernel_init=FC_INIT,
            bias_init=jax.nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: [B, H, W, in_channels] -> float32 logits [B, num_classes]."""
        x = x.astype(self.dtype)
        x = nnx.relu(self.stem_bn(self.stem_conv(x), train=train))
        if self.pool_stride > 1:
            x = pooling.max_pool(x, self.pool_stride)
        for block in self.blocks:
            x = block(x, train=train)
        # Average in float32 so a bf16 model does not lose precision over H*W values.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        return self.fc(x).astype(jnp.float32)


def total_stride(stem: str, num_stages: int) -> int:
    """How many times the network shrinks each side of its input: the stem's conv and max
    pool, then the stride-2 block opening each stage after the first (32 for the ImageNet
    ResNets, 4 for the CIFAR ones). It is the smallest sensible image side: below it, the
    last stride-2 layers have nothing left to downsample (their input is already 1x1)."""
    _, conv_stride, pool_stride = STEMS[stem]
    return conv_stride * pool_stride * STAGE_STRIDE ** (num_stages - 1)


IMAGENET_WIDTHS = (64, 128, 256, 512)
CIFAR_WIDTHS = (16, 32, 64)


def _imagenet(block, stage_sizes):
    def build(**kwargs) -> ResNet:
        return ResNet(block, stage_sizes, IMAGENET_WIDTHS, stem="imagenet", **kwargs)

    build.total_stride = total_stride("imagenet", len(stage_sizes))
    return build


def _cifar(blocks_per_stage: int):
    """6n+2 layers: n basic blocks in each of 3 stages (He et al. 2016, Sec. 4.2)."""
    stages = (blocks_per_stage,) * 3

    def build(**kwargs) -> ResNet:
        return ResNet(BasicBlock, stages, CIFAR_WIDTHS, stem="cifar", **kwargs)

    build.total_stride = total_stride("cifar", len(stages))
    return build


resnet18 = _imagenet(BasicBlock, (2, 2, 2, 2))
resnet34 = _imagenet(BasicBlock, (3, 4, 6, 3))
resnet50 = _imagenet(Bottleneck, (3, 4, 6, 3))
resnet101 = _imagenet(Bottleneck, (3, 4, 23, 3))
resnet152 = _imagenet(Bottleneck, (3, 8, 36, 3))

cifar_resnet8 = _cifar(1)
cifar_resnet20 = _cifar(3)
cifar_resnet32 = _cifar(5)
cifar_resnet56 = _cifar(9)
