"""Reading a compiled program from its HLO text: what a train step sends between devices and
which kernels it launches.

Used by the tests (the step's only collective is the gradient all-reduce; BatchNorm sends
nothing; on a GPU every convolution is a cuDNN call), by benchmarks/comm.py, which prints
every collective with its bytes, and by lbsgd/deviceless.py, which summarizes the GPU program.
"""

import collections
import dataclasses
import re

import jax
import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}
# Top-level instructions that launch no kernel: they name, alias or wait for buffers.
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier",
             "after-all", "add-dependency"}
# Instructions whose kernels are those of the computations they call.
CONTROL_FLOW = {"while", "conditional", "call", "async-start"}

_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*")
_OP = re.compile(r"\s*(?P<op>[\w\-]+)\(")
_TENSOR = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
_NAME = re.compile(r"%([\w.\-]+)")


def _tensors(type_text: str) -> list[dict]:
    """The arrays of an HLO type (an array or a tuple of them), with their bytes."""
    tensors = []
    for dtype, dims in _TENSOR.findall(type_text):
        shape = [int(d) for d in dims.split(",") if d]
        tensors.append({"dtype": dtype, "shape": shape,
                        "bytes": DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))})
    return tensors


def _closing(text: str, start: int) -> int:
    """The index of the parenthesis that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses: {text[start:start + 80]}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    op: str  # the opcode: fusion, custom-call, all-reduce-start, ...
    tensors: list[dict]  # of the result
    operands: list[str]  # names
    arguments: str  # the text between the parentheses: operands, or a parameter's number
    called: list[str]  # computations it calls (fusion bodies, reductions, loop bodies)
    attributes: str  # the rest of the line

    def attribute(self, key: str) -> str | None:
        """A quoted or bare attribute's value, e.g. custom_call_target, kind."""
        m = re.search(rf'\b{key}=(?:"([^"]*)"|([\w.\-]+))', self.attributes)
        return None if m is None else m.group(1) or m.group(2)


def _instruction(line: str) -> Instruction | None:
    head = _HEAD.match(line)
    if head is None:
        return None
    at = head.end()
    type_end = _closing(line, at) + 1 if line[at] == "(" else line.index(" ", at)
    op = _OP.match(line, type_end)
    if op is None:
        return None
    close = _closing(line, op.end() - 1)
    attributes = line[close + 1:]
    called = [n for group in _CALLED.findall(attributes) for n in _NAME.findall(group)]
    arguments = line[op.end():close]
    return Instruction(head.group("name"), op.group("op"), _tensors(line[at:type_end]),
                       _NAME.findall(arguments), arguments, called, attributes)


def parse_module(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """(every computation's instructions by computation name, the entry's name)."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):
            current = _NAME.search(line).group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and (instruction := _instruction(line)):
            computations[current].append(instruction)
    return computations, entry


def parse_collectives(hlo_text: str) -> list[dict]:
    """Every collective instruction of an HLO module: op, result tensors and their bytes.

    Bytes are those of the result. For an all-reduce (or its async -start) that is the data
    reduced; for the async -start of an all-gather or a permute, XLA's result tuple also holds
    the operand, so treat those byte counts as an upper bound. Where XLA concatenated several
    tensors into one buffer to reduce them at once (GPU), `parts` lists the pieces.
    """
    computations, _ = parse_module(hlo_text)
    by_name = {i.name: i for body in computations.values() for i in body}
    found = []
    for body in computations.values():
        for i in body:
            op = i.op.removesuffix("-start")
            if op not in COLLECTIVES:
                continue
            record = {"name": i.name, "op": op, "async": i.op.endswith("-start"),
                      "bytes": sum(t["bytes"] for t in i.tensors), "tensors": i.tensors}
            if parts := _concatenated(i, by_name, computations):
                record["parts"] = parts
            found.append(record)
    return found


def _concatenated(collective: Instruction, by_name: dict, computations: dict) -> list[dict]:
    """The tensors a collective's operand concatenates (a concatenate fusion), each traced back
    through bitcasts to the shape it had; [] for anything else."""
    if len(collective.operands) != 1 or collective.operands[0] not in by_name:
        return []
    source = by_name[collective.operands[0]]
    body = computations.get(source.called[0]) if source.called else None
    if not (source.op == "concatenate" or (source.op == "fusion" and body
                                           and body[-1].op == "concatenate")):
        return []
    parts = []
    for name in source.operands:
        while by_name[name].op == "bitcast":
            name = by_name[name].operands[0]
        parts.extend(by_name[name].tensors)
    return parts


def kernels(computations: dict[str, list[Instruction]], entry: str) -> list[Instruction]:
    """The instructions that launch work on the device, in program order: the entry's, and
    those of the computations its loops and calls run, except the ones that only name, alias
    or wait for buffers (NO_KERNEL, and every async -done). A fusion is one kernel; a custom
    call (cuDNN, cuBLAS) counts as one although a library may launch several; a collective's
    -start is its kernel (NCCL's)."""
    found = []
    for i in computations[entry]:
        if i.op in CONTROL_FLOW:
            for name in i.called:
                found.extend(kernels(computations, name))
        elif i.op not in NO_KERNEL and not i.op.endswith("-done"):
            found.append(i)
    return found


def _inside(kernel: Instruction, computations: dict) -> list[Instruction]:
    """Every instruction of the computations a kernel runs (a fusion's body, nested ones)."""
    found, stack = [], list(kernel.called)
    while stack:
        body = computations.get(stack.pop(), [])
        found.extend(body)
        stack.extend(name for i in body for name in i.called)
    return found


def _shape_key(shape) -> tuple:
    """A shape up to axis order and size-1 axes, as XLA may transpose or reshape a tensor."""
    return tuple(sorted(d for d in shape if d != 1))


def _read_bytes(kernel: Instruction, by_name: dict, computations: dict) -> int:
    """The bytes of a kernel's operands, except that an operand a fusion only slices counts
    with its slices' bytes: XLA slices a concatenated all-reduce buffer back into gradients,
    one kernel per gradient, each reading its own part."""
    body = computations.get(kernel.called[0], []) if kernel.op == "fusion" else []
    parameters = {i.name: int(i.arguments) for i in body if i.op == "parameter"}
    users = collections.defaultdict(list)
    for i in body:
        for position, name in enumerate(i.operands):
            if name in parameters:
                users[name].append((i, position))
    sliced = {parameters[name]: sum(i.tensors[0]["bytes"] for i, _ in uses)
              for name, uses in users.items()
              if all(i.op in ("slice", "dynamic-slice") and p == 0 for i, p in uses)}
    return sum(sliced.get(k, sum(t["bytes"] for t in by_name[name].tensors))
               for k, name in enumerate(kernel.operands))


def summarize(hlo_text: str, params=None, batch: int | None = None) -> dict:
    """What a compiled program runs on each device, for the tests and benchmarks/comm.py.

    - collectives: op, dtypes, bytes (and concatenated parts) of each (parse_collectives);
    - kernels: the launches of one step (`kernels`), by opcode, a fusion by its kind;
    - custom calls by target, and the dtypes of the cuDNN convolutions' rank-4 operands;
    - convolutions left outside a custom call (on a GPU: outside cuDNN), anywhere;
    - transposes: every transpose a kernel runs, counted and summed, and listed when it moves
      activations: a dimension is the per-device `batch` and the shape is no parameter's
      (`params`: a tree of arrays or shapes), so its bytes grow with the batch; the others
      are weights changing layout (cuDNN's filters are OHWI, Flax's HWIO);
    - kernel_bytes: operand + result bytes summed over the kernels, an upper bound on a step's
      memory traffic (a kernel may read part of an operand; caches are ignored).
    """
    computations, entry = parse_module(hlo_text)
    by_name = {i.name: i for body in computations.values() for i in body}
    launched = kernels(computations, entry)
    weights = {_shape_key(np.shape(x)) for x in jax.tree.leaves(params)}
    transposes, conv_dtypes = [], set()
    for kernel in launched:
        for i in [kernel, *_inside(kernel, computations)]:
            if i.op == "transpose":
                transposes.append({"kernel": kernel.name, **i.tensors[0]})
        if (kernel.attribute("custom_call_target") or "").startswith("__cudnn$conv"):
            conv_dtypes |= {t["dtype"] for o in kernel.operands for t in by_name[o].tensors
                            if len(t["shape"]) == 4}
    activations = [t for t in transposes
                   if batch in t["shape"] and _shape_key(t["shape"]) not in weights]
    return {
        "collectives": [{"op": c["op"], "dtypes": sorted({t["dtype"] for t in c["tensors"]}),
                         "bytes": c["bytes"], "parts": len(c.get("parts", []))}
                        for c in parse_collectives(hlo_text)],
        "kernels": len(launched),
        "kernels_by_op": dict(collections.Counter(
            k.attribute("kind") if k.op == "fusion" else k.op for k in launched)),
        "custom_calls": dict(collections.Counter(
            k.attribute("custom_call_target") for k in launched if k.op == "custom-call")),
        "cudnn_conv_operand_dtypes": sorted(conv_dtypes),
        "convolutions_outside_custom_calls": sum(
            i.op == "convolution" for body in computations.values() for i in body),
        "transposes": len(transposes),
        "transpose_bytes": sum(t["bytes"] for t in transposes),
        "activation_transposes": sorted(activations, key=lambda t: -t["bytes"]),
        "kernel_bytes": sum(sum(t["bytes"] for t in k.tensors) + _read_bytes(k, by_name,
                                                                            computations)
                            for k in launched),
    }
