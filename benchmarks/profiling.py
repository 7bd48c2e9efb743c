"""The kernels a profiled run spent its time in, read back from the trace jax.profiler wrote.

jax.profiler.trace(DIR) writes DIR/plugins/profile/RUN/HOST.xplane.pb (an XSpace protobuf), which
jax.profiler.ProfileData reads offline with nothing else installed. What counts as a kernel
depends on the platform:

- GPU: every event on a device plane's CUPTI stream lines ("Stream #..."), i.e. each launched
  kernel, memcpy and memset as the GPU ran it;
- TPU (and GPU traces that only carry XLA's op line): the "XLA Ops" line of the device plane;
- CPU: XLA's thunks on the host's threads, the events that carry an `hlo_op` statistic
  (fusions, convolutions, copies: what XLA's CPU runtime executes in place of kernels).

While the profiler runs, XLA's GPU runtime launches each kernel on its own instead of
replaying CUDA graphs (its flag xla_enable_command_buffers_during_profiling is false by
default): each kernel's time is its own, but a profiled step is not the timed step, whose
launch gaps the graphs shorten.
"""

import collections
from pathlib import Path

from jax.profiler import ProfileData


def xplane_file(directory) -> Path:
    """The newest .xplane.pb under `directory` (each jax.profiler.trace adds a RUN folder)."""
    files = sorted(Path(directory).glob("plugins/profile/*/*.xplane.pb"),
                   key=lambda path: path.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no plugins/profile/*/*.xplane.pb under {directory}")
    return files[-1]


def _device_lines(plane) -> list:
    lines = list(plane.lines)
    return ([line for line in lines if line.name.startswith("Stream")]
            or [line for line in lines if line.name == "XLA Ops"])


def kernel_events(path) -> tuple[str, list[tuple[str, float, str | None]]]:
    """(what was read, [(name, duration ns, hlo_op or None)]) of the kernels in one XSpace."""
    planes = list(ProfileData.from_file(str(path)).planes)
    devices = [p for p in planes if p.name.startswith("/device:") and _device_lines(p)]
    if devices:
        events = [(e.name, e.duration_ns, dict(e.stats).get("hlo_op"))
                  for p in devices for line in _device_lines(p) for e in line.events]
        return f"xplane device lines: {_device_lines(devices[0])[0].name} ...", events
    events = []
    for plane in planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                for e in line.events:
                    if "hlo_op" in (stats := dict(e.stats)):
                        events.append((e.name, e.duration_ns, stats["hlo_op"]))
    return "xplane host threads: XLA CPU thunks (events with an hlo_op)", events


def top_kernels(path, *, steps: int, count: int = 10) -> dict:
    """The `count` kernels of most total time in the trace at `path`, which ran `steps` steps:
    name, calls, time per step and share of all kernel time (summed over devices/threads, so
    kernels that ran side by side each count in full)."""
    source, events = kernel_events(path)
    total_ns = collections.Counter()
    calls = collections.Counter()
    hlo_ops = {}
    for name, duration_ns, hlo_op in events:
        total_ns[name] += duration_ns
        calls[name] += 1
        hlo_ops.setdefault(name, hlo_op)
    all_ns = sum(total_ns.values())
    return {
        "trace_file": str(path), "kernel_source": source, "profiled_steps": steps,
        "kernels_per_step": len(events) / steps, "kernel_ms_per_step": all_ns / steps / 1e6,
        "top_kernels": [{"name": name, "hlo_op": hlo_ops[name], "calls": calls[name],
                         "ms_per_step": ns / steps / 1e6, "share": ns / all_ns}
                        for name, ns in total_ns.most_common(count)],
    }
