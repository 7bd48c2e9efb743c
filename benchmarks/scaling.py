"""Predicted step time and scaling efficiency of data-parallel SGD on 8 ... 1024 devices.

Why: the paper's large minibatch scales (~90% from 8 to 256 P100s) as long as the gradient
all-reduce, which grows with the devices, stays small against the compute per step, constant
at n = 32 images per device. This puts the two together under an explicit all-reduce model
(benchmarks/README.md, section 3): JSON lines, the README's table and a plot.

    python -m benchmarks.scaling --comm_json comm.jsonl --train_step_json h100.jsonl
    python -m benchmarks.scaling --grad_bytes 102228128 --step_time_s 0.1 --plot ''
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

from flax import nnx
from matplotlib.figure import Figure

from benchmarks import common
from lbsgd import models

GB = 1e9
PAPER_STEPS = 90 * (1_281_167 // 8192)  # the paper's hour: 90 epochs of kn = 8192
PAPER_STEP_S = 3600 / PAPER_STEPS  # ~0.256 s, everything included
PAPER_EFFICIENCY_8_TO_256 = 0.90  # "~90% scaling efficiency when moving from 8 to 256 GPUs"


@dataclasses.dataclass(frozen=True)
class Setting:  # nominal bandwidths, assumed latencies: sources in benchmarks/README.md
    name: str
    description: str
    devices_per_node: int  # g; 0 for the TPU torus, which has no nodes in this sense
    intra_bw: float  # bytes/s per device for the ring in a node (TPU: all-reduce bw per chip)
    intra_latency: float  # s per ring step (TPU: per torus hop)
    inter_bw: float = 0.0  # bytes/s of network per node, shared by its g devices
    inter_latency: float = 0.0


SETTINGS = (
    Setting("paper_p100_50gbe", "Goyal et al.: 8 P100 per server (NVLink 1.0), 50 Gbit/s "
            "Ethernet between servers", 8, 40 * GB, 5e-6, 50e9 / 8, 25e-6),
    Setting("h100_nvlink_ib", "8 H100 per node (NVLink 4), InfiniBand NDR 400 Gbit/s per GPU "
            "between nodes", 8, 450 * GB, 5e-6, 8 * 50 * GB, 5e-6),
    Setting("tpu_v4_ici", "TPU v4, ICI 3D torus", 0, 1.1e15 / 4096, 1e-6),
)


def ring_allreduce_s(nbytes: float, p: int, bw: float, latency: float) -> float:
    """Reduce-scatter + all-gather: 2 (p - 1) steps of B / p bytes."""
    return 0.0 if p <= 1 else 2 * (p - 1) / p * nbytes / bw + 2 * (p - 1) * latency


def allreduce_s(setting: Setting, nbytes: float, p: int) -> float:
    g = setting.devices_per_node
    if g == 0:  # TPU: a ring's bytes, latency 2 * sum(d - 1) hops on a near-cubic torus
        dims = [1, 1, 1]
        while math.prod(dims) < p:
            dims[dims.index(min(dims))] *= 2
        if math.prod(dims) != p:
            raise ValueError(f"{p} devices: the TPU model needs a power of two")
        return (ring_allreduce_s(nbytes, p, setting.intra_bw, 0.0)
                + 2 * sum(d - 1 for d in dims) * setting.intra_latency)
    if p <= g:
        return ring_allreduce_s(nbytes, p, setting.intra_bw, setting.intra_latency)
    if p % g:
        raise ValueError(f"{p} devices is not a whole number of {g}-device nodes")
    # The node's ring, then g rings across the nodes, each with B / g over its share W / g of
    # the node's network: the time of the whole B over W.
    return (ring_allreduce_s(nbytes, g, setting.intra_bw, setting.intra_latency)
            + ring_allreduce_s(nbytes, p // g, setting.inter_bw, setting.inter_latency))


def step_s(compute_s: float, comm_s: float, overlap: bool) -> float:
    """Compute is 1/3 forward, 2/3 backward; overlap hides the all-reduce behind backward only."""
    return compute_s / 3 + max(2 * compute_s / 3, comm_s) if overlap else compute_s + comm_s


def predict(setting: Setting, nbytes: float, devices: list[int], compute_s: float | None,
            compute_source: str) -> list[dict]:
    rows = []
    for p in devices:
        comm = allreduce_s(setting, nbytes, p)
        row = {"record": "prediction", "setting": setting.name, "devices": p,
               "grad_bytes": nbytes, "allreduce_s": comm,
               "min_compute_s_for_90pct_no_overlap": 9 * comm,
               "compute_s": compute_s, "compute_source": compute_source}
        for overlap, tag in ((False, "no_overlap"), (True, "overlap")):
            t = None if compute_s is None else step_s(compute_s, comm, overlap)
            first = rows[0][f"step_s_{tag}"] if rows else t  # on devices[0]
            row[f"step_s_{tag}"] = t
            row[f"efficiency_{tag}"] = None if t is None else compute_s / t
            row[f"efficiency_from_{devices[0]}_{tag}"] = None if t is None else first / t
        rows.append(row)
    return rows


def paper_comparison(rows: list[dict]) -> dict:
    """The paper's own figures against the model's."""
    paper = {r["devices"]: r for r in rows if r["setting"].startswith("paper")}
    row = {"record": "paper_comparison"}
    for tag in ("no_overlap", "overlap"):
        t8, t256 = paper[8][f"step_s_{tag}"], paper[256][f"step_s_{tag}"]
        row[f"predicted_step_s_256_{tag}"] = t256
        row[f"predicted_efficiency_8_to_256_{tag}"] = t8 / t256
        row[f"predicted_hours_90_epochs_{tag}"] = PAPER_STEPS * t256 / 3600
    return {**row, "paper_step_s_from_one_hour": PAPER_STEP_S,
            "paper_efficiency_8_to_256": PAPER_EFFICIENCY_8_TO_256}


def table(rows: list[dict], first: int) -> str:
    """The README's table: one line per (setting, devices), "-" without a compute time."""

    def both(r, key, scale, unit=""):  # "no overlap / overlap"
        a, b = r[f"{key}_no_overlap"], r[f"{key}_overlap"]
        return "-" if a is None else f"{scale * a:.1f}{unit} / {scale * b:.1f}{unit}"

    lines = ["| setting | devices | all-reduce ms | compute ms | step ms, no overlap / overlap "
             f"| efficiency, no overlap / overlap | from {first} devices "
             "| compute ms needed for 90% without overlap |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        compute = "not yet measured" if r["compute_s"] is None else f"{1e3 * r['compute_s']:.1f}"
        lines.append(f"| {r['setting']} | {r['devices']} | {1e3 * r['allreduce_s']:.1f} "
                     f"| {compute} | {both(r, 'step_s', 1e3)} | {both(r, 'efficiency', 100, '%')} "
                     f"| {both(r, f'efficiency_from_{first}', 100, '%')} "
                     f"| {1e3 * r['min_compute_s_for_90pct_no_overlap']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], devices: list[int], path: str, nbytes: float) -> None:
    """All-reduce time (left) and efficiency from the smallest device count (right)."""
    fig = Figure(figsize=(11, 4.2), layout="tight")
    left, right = fig.subplots(1, 2)
    for s in SETTINGS:
        rs = [r for r in rows if r["setting"] == s.name]
        left.plot(devices, [1e3 * r["allreduce_s"] for r in rs], "o-", label=s.name)
        for tag, style in (("no_overlap", "o-"), ("overlap", "s--")):
            if rs[0]["compute_s"] is not None:
                right.plot(devices, [100 * r[f"efficiency_from_{devices[0]}_{tag}"] for r in rs],
                           style, label=f"{s.name}, {tag.replace('_', ' ')}")
    right.plot([256], [90], "k*", markersize=12, label="paper: ~90% from 8 to 256 GPUs")
    left.set(yscale="log", ylabel="all-reduce time (ms)",
             title=f"Gradient all-reduce, {nbytes / 1e6:.1f} MB (model)")
    right.set(ylabel=f"efficiency from {devices[0]} devices (%)", ylim=(50, 102),
              title="Predicted scaling efficiency")
    for ax in (left, right):
        ax.set(xscale="log", xlabel="devices", xticks=devices, xticklabels=devices)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def first_json(path: str, **match) -> dict:
    """The first JSON line in `path` whose fields have the values in `match`."""
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.lstrip().startswith("{") else {}
            if row and all(row.get(k) == v for k, v in match.items()):
                return row
    sys.exit(f"{path}: no JSON line with {match}")


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--devices", nargs="+", type=int, default=[8, 32, 256, 1024])
    parser.add_argument("--grad_bytes", type=float, help="default: --comm_json's, else --model's")
    parser.add_argument("--comm_json", help="benchmarks.comm's output: its lbsgd totals")
    parser.add_argument("--model", default="resnet50", help="4 x its parameters: --grad_bytes")
    parser.add_argument("--step_time_s", type=float, help="compute per step but for the paper's")
    parser.add_argument("--train_step_json", help="benchmarks.train_step's output: its lbsgd "
                        "median step time is --step_time_s")
    parser.add_argument("--paper_backward_s", type=float, default=0.120,
                        help="P100, 32 images (paper, Sec. 4); forward: assumed half")
    parser.add_argument("--plot", default=str(Path(__file__).with_name("scaling.png")),
                        help="PNG to write ('' for none)")
    args = parser.parse_args()
    if args.grad_bytes is not None:
        nbytes, bytes_source = args.grad_bytes, "--grad_bytes"
    elif args.comm_json:
        row = first_json(args.comm_json, record="totals", variant="lbsgd")
        nbytes, bytes_source = row["gradient_allreduce_bytes"], (
            f"comm.py: {row['model']} {row['dtype']}")
    else:  # float32 gradients: the parameter bytes (of shapes only, no memory)
        model = nnx.eval_shape(lambda: models.create_model(args.model, num_classes=1000))
        nbytes = common.param_size(nnx.state(model, nnx.Param))["param_bytes"]
        bytes_source = f"4 x parameters of {args.model}"
    # Compute time per step: the paper's for its setting, a measured one for the others.
    if args.train_step_json:
        row = first_json(args.train_step_json)
        compute_s, compute_source = row["lbsgd"]["step_time_median_s"], (
            f"train_step.py: {row['model']} {row['image_size']}px "
            f"{row['per_device_batch']}/device on {row['device_kind']}")
    else:
        compute_s = args.step_time_s
        compute_source = "not yet measured" if compute_s is None else "--step_time_s"
    backward_ms = 1e3 * args.paper_backward_s
    paper = (1.5 * args.paper_backward_s,
             f"paper Sec. 4: P100 backward {backward_ms:.0f} ms + forward {backward_ms / 2:.0f} "
             "ms (assumed)")
    devices, rows = sorted(args.devices), []
    for s in SETTINGS:
        compute = paper if s.name.startswith("paper") else (compute_s, compute_source)
        rows += predict(s, nbytes, devices, *compute)
    print(json.dumps({"record": "model", "grad_bytes": nbytes, "grad_bytes_source": bytes_source,
                      "settings": [dataclasses.asdict(s) for s in SETTINGS],
                      "paper_step_s_from_one_hour": PAPER_STEP_S, "paper_steps": PAPER_STEPS,
                      "paper_efficiency_8_to_256": PAPER_EFFICIENCY_8_TO_256}))
    for row in rows + ([paper_comparison(rows)] if {8, 256} <= set(devices) else []):
        print(json.dumps(row))
    print(f"\nGradient bytes per step: {nbytes:,.0f} ({bytes_source})\n\n{table(rows, devices[0])}")
    if args.plot:
        plot(rows, devices, args.plot, nbytes)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
