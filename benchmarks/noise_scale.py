"""What the gradient-noise-scale probe costs: a probed train step against the plain step, in
the same process, steps alternating, as one JSON object.

Why: `--config.noise_scale_every_steps=K` runs the probed step (each BN worker's gradient on
its own, lbsgd/noise_scale.py) every K-th step and the plain step otherwise, so a run pays
(t_probe / t_plain - 1) / K of its step time for the measurement. benchmarks/README.md has
the results.

    python -m benchmarks.noise_scale              # CPU default: Fashion-MNIST's ResNet-8, kn = 256
    python -m benchmarks.noise_scale --model resnet50 --image_size 224 --per_device_batch 256 \\
        --num_classes 1000 --dtype bfloat16
"""

import json
import statistics

import jax

from benchmarks import common
from benchmarks.train_step import Stepper, time_alternately
from lbsgd import parallel, train


def measure(args) -> dict:
    devices = jax.devices()
    mesh = parallel.make_mesh(devices[:args.devices or len(devices)])
    config = common.step_config(args, mesh.size)
    config.noise_scale_every_steps = args.every
    ex = train.setup(config, mesh)
    batch = next(ex.train_batches())
    devices = list(mesh.devices.flat)
    plain = Stepper(ex.train_step, ex.init_state, batch, devices)
    probe = Stepper(ex.probe_step, ex.init_state, batch, devices)
    params = common.param_size(plain.state.params)  # counted now: a step donates the state
    for stepper in (plain, probe):
        stepper.compile()
        for _ in range(args.warmup_steps):
            stepper()
    time_alternately(plain, probe, repeats=args.repeats, steps=args.steps)
    kn = config.global_batch_size
    rows = {name: s.summary(kn, None) for name, s in (("plain", plain), ("probe", probe))}
    ratio = rows["probe"]["step_time_median_s"] / rows["plain"]["step_time_median_s"]
    # Median over adjacent step pairs of t_probe / t_plain: load that changes slower than a
    # step cancels.
    paired = statistics.median(b / a for a, b in zip(plain.times, probe.times, strict=True))
    return {
        "benchmark": "noise_scale", **{key: getattr(args, key) for key in common.STEP_FIELDS},
        "global_batch": kn, "workers": kn // config.bn_group_size, **params,
        "every_steps": args.every,
        "probe_slices_per_device": train.probe_microbatches(config, mesh.size,
                                                           params["param_count"]),
        **rows,
        "ratio_probe_to_plain": ratio, "paired_ratio_median": paired,
        # A run with the probe every K steps: (K - 1) plain steps and one probed step.
        "overhead_at_every_steps": (ratio - 1) / args.every,
        "paired_overhead_at_every_steps": (paired - 1) / args.every,
        **common.environment(devices),
    }


def main() -> None:
    parser = common.parser(__doc__)
    common.add_step_arguments(parser, model="cifar_resnet8", image_size=28, devices=1)
    parser.set_defaults(per_device_batch=256, num_classes=10)
    parser.add_argument("--every", type=int, default=20,
                        help="K of noise_scale_every_steps, for the overhead (default 20)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=2, help="who steps first flips in each")
    parser.add_argument("--warmup_steps", type=int, default=2)
    print(json.dumps(measure(parser.parse_args())), flush=True)


if __name__ == "__main__":
    main()
