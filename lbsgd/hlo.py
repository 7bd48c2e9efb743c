"""Reading a compiled program's collectives: what a train step really sends between devices.

Used by the tests (the step's only collective is the gradient all-reduce; BatchNorm sends
nothing) and by benchmarks/comm.py, which prints every collective with its bytes.
"""

import re

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}

# `%name = <result type> op(` or `op-start(`; the result type may be a tuple.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.+?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_TENSOR = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")


def parse_collectives(hlo_text: str) -> list[dict]:
    """Every collective instruction of an HLO module: op, result tensors and their bytes.

    Bytes are those of the result. For an all-reduce (or its async -start) that is the data
    reduced; for the async -start of an all-gather or a permute, XLA's result tuple also holds
    the operand, so treat those byte counts as an upper bound.
    """
    found = []
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.search(line)
        if not m:
            continue
        tensors = []
        for dtype, dims in _TENSOR.findall(m.group("type")):
            shape = [int(d) for d in dims.split(",") if d]
            tensors.append({"dtype": dtype, "shape": shape,
                            "bytes": DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))})
        found.append({"name": m.group("name"), "op": m.group("op"),
                      "async": bool(m.group("start")),
                      "bytes": sum(t["bytes"] for t in tensors), "tensors": tensors})
    return found
