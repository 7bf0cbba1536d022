"""The operator record every graph builder emits and every cost model reads.

An ``Op`` is one kernel of one layer: its FLOPs and the bytes it moves
through device memory, split so the memory model can tell weights and KV
cache from transient activations. ``count`` says how many identical copies
the step runs (usually once per layer). Quantities may be numpy arrays when
the graph is built for several context lengths at once (decode sampling);
every field then has the same shape or is a scalar.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import numpy as np

Quantity = float | np.ndarray
OpKind = Literal["gemm", "attention", "softmax", "elementwise", "cache_write", "norm", "rope", "activation",
                 "embedding", "sampling", "unpack", "dequantize", "routing"]
"""What kind of kernel an op is: devices may reach different fractions of bandwidth per kind."""
Unit = Literal["matrix", "vector"]


def avg(value: Quantity) -> float:
    """Mean of a quantity over its sampled contexts (a scalar is its own mean)."""
    return float(value.mean()) if isinstance(value, np.ndarray) else float(value)


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    kind: OpKind
    flops: Quantity
    read_bytes: Quantity
    write_bytes: Quantity
    dtype: str
    count: int = 1
    unit: Unit = "vector"
    weight_bytes: Quantity = 0.0
    """Part of ``read_bytes`` that is model weights."""
    kv_read_bytes: Quantity = 0.0
    """Part of ``read_bytes`` that is KV cache."""
    kv_write_bytes: Quantity = 0.0
    """Part of ``write_bytes`` that is KV cache."""
    shape: tuple[Quantity, float, float] | None = None
    """(m, n, k) of a GEMM: m tokens, n output features, k input features (of one group)."""
    groups: Quantity = 1.0
    """Independent GEMMs of that shape in one grouped GEMM (the experts an MoE layer touches)."""
    single_groups: Quantity = 0.0
    """Of ``groups``, how many have a single row (experts hit by one token): matrix-vector work."""
    transposed_weight: bool = False
    """A GEMM whose weight is stored ``[n, k]`` where the others are ``[k, n]``: a tied LM head
    reads the embedding table, one row per vocabulary entry."""
    interval_bytes: Quantity = 0.0
    """Bytes the step moves between two runs of this op (a layer's for an op of every layer, the
    whole step's for one that runs once): how much of the caches the rest of the step has
    replaced when it runs again. 0: not known."""

    @property
    def bytes(self) -> Quantity:
        return self.read_bytes + self.write_bytes

    @property
    def activation_bytes(self) -> Quantity:
        """Transient bytes this op reads and writes (not weights, not KV cache)."""
        return self.bytes - self.weight_bytes - self.kv_read_bytes - self.kv_write_bytes

    @property
    def intensity(self) -> Quantity:
        """Arithmetic intensity, FLOPs per byte of device memory traffic."""
        return self.flops / np.maximum(self.bytes, 1.0)


def gemm(
    name: str,
    m: Quantity,
    n: float,
    k: float,
    *,
    weight_bytes_per_value: float,
    act_bytes: float,
    dtype: str,
    count: int = 1,
    weight_values: float | None = None,
    groups: Quantity = 1.0,
    single_groups: Quantity = 0.0,
) -> Op:
    """``[m, k] @ [k, n]``: 2mnk FLOPs; reads the weights once and the input once, writes the output.

    ``weight_values`` overrides ``n * k`` when fewer (or more) weights are read
    than one matrix holds, as for the distinct experts of an MoE layer. With
    ``groups`` the ``m`` rows are split evenly over that many GEMMs (one per
    expert), each of ``m / groups`` rows: the shape records one group.
    """
    values = n * k if weight_values is None else weight_values
    weights = values * weight_bytes_per_value
    return Op(
        name=name,
        kind="gemm",
        unit="matrix",
        flops=2.0 * m * n * k,
        read_bytes=weights + m * k * act_bytes,
        write_bytes=m * n * act_bytes,
        weight_bytes=weights,
        dtype=dtype,
        count=count,
        shape=(m / groups, n, k),
        groups=groups,
        single_groups=single_groups,
    )


def elementwise(
    name: str,
    elements_in: Quantity,
    elements_out: Quantity,
    flops_per_element: float,
    *,
    act_bytes: float,
    dtype: str,
    count: int = 1,
    kind: OpKind = "elementwise",
    weight_bytes: float = 0.0,
) -> Op:
    """A streaming op: reads its inputs once, writes its outputs once."""
    return Op(
        name=name,
        kind=kind,
        flops=flops_per_element * elements_out,
        read_bytes=elements_in * act_bytes + weight_bytes,
        write_bytes=elements_out * act_bytes,
        weight_bytes=weight_bytes,
        dtype=dtype,
        count=count,
    )


def with_intervals(ops: list[Op]) -> list[Op]:
    """The ops of one step with ``interval_bytes`` set where it is not yet: between two runs of an
    op of every layer the rest of a layer moves its bytes (weights, KV cache, activations),
    between two runs of an op that runs once a step the whole step does. Layers: the count most
    ops that repeat share (a few repeat several times a layer)."""
    if all(_known(op.interval_bytes) for op in ops):
        return ops
    step = sum(op.bytes * op.count for op in ops)
    counts = [op.count for op in ops if op.count > 1]
    layers = max(set(counts), key=counts.count) if counts else 1
    layer = sum(op.bytes * op.count for op in ops if op.count > 1) / layers
    return [op if _known(op.interval_bytes) else
            dataclasses.replace(op, interval_bytes=layer if op.count > 1 else step) for op in ops]


def _known(interval: Quantity) -> bool:
    return not (isinstance(interval, float) and interval == 0.0)
