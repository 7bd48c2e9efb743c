"""What a train step sends between devices: every collective of the compiled 8-device program.

Why: the paper's data parallelism communicates one thing per step, the all-reduce of the
gradients (Goyal et al. 2017, Sec. 4), and its BatchNorm communicates nothing, because every
worker normalizes its own n = 32 images (Sec. 2.3). lbsgd claims the same of its one-`jax.jit`
step: XLA inserts the gradient all-reduce and nothing else. This script compiles the step for
8 devices, reads the optimized HLO and lists each collective with its dtype, shape and bytes,
then totals them: gradient all-reduce bytes against parameter bytes (ResNet-50 in float32:
25,557,032 x 4 = 102,228,128 bytes), and bytes from BatchNorm (expected 0).

It does the same for two baselines built in benchmarks/train_step.py from the same ResNet with
Flax's plain `nnx.BatchNorm`:
- `baseline`: per-device BN in `shard_map`, running statistics kept replicated, which needs
  their `pmean` every step (the cost lbsgd avoids by keeping one row of statistics per worker,
  sharded with the batch);
- `baseline_global_bn`: the same model under plain `jax.jit` on the sharded global batch, where
  BN statistics are reduced over all devices inside every BN layer (synchronized BN).

Attribution. The gradient is found by shape: the all-reduced tensors that match the parameter
shapes (size-1 axes dropped), one for one. Rank-0 tensors are the metrics (loss, accuracy).
Everything else is charged to BatchNorm: in these steps BN is the only other state or
computation that spans devices. (XLA reduces identical gradients once: in a block with a
projection shortcut, the last BN's beta and the shortcut BN's beta get the same gradient. A
same-shaped running statistic then takes that gradient's place in the matching, so the
baseline's BatchNorm bytes come out smaller than its statistics by those betas; the sum of all
bytes is exact.)

Only CPU is needed: the script simulates 8 devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set here before JAX starts, unless XLA_FLAGS
already names a device count). On a machine with 8 accelerators it compiles for them instead.
Bytes do not depend on image size or batch, so the default compiles at 64 px. Output: JSON
lines, one per collective (`"record": "collective"`) and one total per step
(`"record": "totals"`).

    python benchmarks/comm.py                         # ResNet-50, float32, all three steps
    python benchmarks/comm.py --dtype bfloat16        # gradients are still float32
    python benchmarks/comm.py --model cifar_resnet8 --image_size 16 --per_device_batch 8 \\
        --bn_group_size 8 --num_classes 10            # seconds
"""

import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lbsgd, configs, benchmarks

import jax  # noqa: E402

from benchmarks import train_step as ts  # noqa: E402
from lbsgd import input_pipeline, parallel, train  # noqa: E402
from lbsgd.hlo import parse_collectives  # noqa: E402

VARIANTS = ("lbsgd", "baseline", "baseline_global_bn")
HLO_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def _key(dtype: str, shape) -> tuple:
    """Shape identity up to size-1 axes and axis order: XLA may reduce a [C] gradient as
    [1, 1, 1, C], or an FC kernel's [in, out] gradient transposed."""
    return dtype, tuple(sorted(int(d) for d in shape if d != 1))


def attribute(collectives: list[dict], params) -> dict:
    """Split the collective bytes into gradient, metric scalars and BatchNorm (the rest)."""
    wanted = collections.Counter(_key(HLO_DTYPE[x.dtype.name], x.shape)
                                 for x in jax.tree.leaves(params))
    gradient = scalars = other = 0
    for c in collectives:
        for t in c["tensors"]:
            key = _key(t["dtype"], t["shape"])
            if not t["shape"]:
                scalars += t["bytes"]
            elif c["op"] == "all-reduce" and wanted[key] > 0:
                wanted[key] -= 1
                gradient += t["bytes"]
            else:
                other += t["bytes"]
    return {"gradient_allreduce_bytes": gradient, "scalar_bytes": scalars,
            "batchnorm_bytes": other,
            "unmatched_params": sum(wanted.values())}


def compile_variant(variant: str, args, mesh):
    """(compiled step, params, per-device batch-stat bytes) of one variant on `mesh`.

    lbsgd's state comes from `train.setup`, as a run builds it; the baselines' is abstract
    (shapes and shardings only), which is all that compiling needs.
    """
    global_batch = args.per_device_batch * mesh.size
    config = ts.lbsgd_config(args.model, args.image_size, global_batch, args.bn_group_size,
                             args.dtype, args.num_classes)
    batch = ts.synthetic_batch(mesh, global_batch, args.image_size, args.num_classes)
    if variant == "lbsgd":
        ex = train.setup(config, mesh)
        state, step = ex.state, ex.train_step
    else:
        bn = "per_device" if variant == "baseline" else "global"
        dataset = input_pipeline.load_dataset(config)
        state, step = ts.make_baseline(args.model, args.num_classes, args.dtype, global_batch,
                                       mesh, dataset, bn=bn, abstract=True)
    compiled = step.lower(state, batch).compile()
    stat_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in jax.tree.leaves(state.batch_stats))
    return compiled, state.params, stat_bytes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--image_size", type=int, default=64,
                        help="does not change the bytes; small compiles faster")
    parser.add_argument("--per_device_batch", type=int, default=32)
    parser.add_argument("--bn_group_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=8, help="use the first N devices")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--no_list", action="store_true",
                        help="print only the totals, not every collective")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    devices = jax.devices()
    if len(devices) < args.devices:
        sys.exit(f"--devices {args.devices}, but only {len(devices)} devices are visible")
    mesh = parallel.make_mesh(devices[:args.devices])
    for variant in args.variants:
        compiled, params, stat_bytes = compile_variant(variant, args, mesh)
        collectives = parse_collectives(compiled.as_text())
        if not args.no_list:
            for c in collectives:
                print(json.dumps({"record": "collective", "variant": variant, **c}), flush=True)
        leaves = jax.tree.leaves(params)
        param_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
        totals = attribute(collectives, params)
        row = {
            "record": "totals",
            "variant": variant,
            "date": datetime.date.today().isoformat(),
            "model": args.model,
            "dtype": args.dtype,
            "image_size": args.image_size,
            "per_device_batch": args.per_device_batch,
            "bn_group_size": args.bn_group_size,
            "platform": devices[0].platform,
            "device_kind": devices[0].device_kind,
            "device_count": mesh.size,
            "jax_version": jax.__version__,
            "param_count": sum(x.size for x in leaves),
            "param_bytes": param_bytes,
            "param_dtypes": sorted({x.dtype.name for x in leaves}),
            "batch_stats_bytes_per_device": stat_bytes,
            "collective_instructions": len(collectives),
            "collective_ops": dict(collections.Counter(c["op"] for c in collectives)),
            "collective_bytes": sum(c["bytes"] for c in collectives),
            "collective_dtypes": sorted({t["dtype"] for c in collectives for t in c["tensors"]
                                       if t["shape"]}),
            **totals,
            "gradient_equals_param_bytes": totals["gradient_allreduce_bytes"] == param_bytes,
            "xla_flags": os.environ.get("XLA_FLAGS"),
            "command": " ".join(["python", *sys.argv]),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
