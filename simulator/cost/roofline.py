"""Roofline time and energy of one op on one device.

``time = max(flops / (peak[dtype] * eff_c(flops)), bytes / (bw * eff_m(bytes)), floor) + kernel_overhead``
(``+ gemm.call_overhead`` for a GEMM on a device with the tile model; the first two terms
summed instead of maxed for a GEMM on a device whose BLAS packs its weights, ``gemm.pack_pass``)

where a device's per-kind ``kernels`` entry, when present, gives
``bytes / (bw * eff_m(bytes)) = (bytes + half_size) / (bw * bandwidth)`` and the floor.

Matrix ops (GEMMs, attention) run on the matrix units at the op's compute
dtype (GEMMs through the tile and wave model of ``gemm.py`` when the device
has one); vector ops (norms, activations, adds) on the fp32 vector units where
the device lists them. Power follows ``PowerSpec``: idle plus energy per FLOP
and per byte, capped at the device's maximum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.cost.gemm import gemm_compute_s
from simulator.dtypes import bytes_per_value
from simulator.errors import UnsupportedError
from simulator.graph.ops import Op, Quantity, avg, with_intervals
from simulator.specs.hardware import Device, KernelEfficiency


@dataclass(frozen=True, slots=True)
class OpCost:
    """Per-instance times of an op (multiply by ``op.count`` for the step)."""

    op: Op
    compute_s: Quantity
    memory_s: Quantity
    overhead_s: float
    time_s: Quantity
    energy_j: Quantity
    peak_flops: float

    @property
    def total_s(self) -> Quantity:
        return self.time_s * self.op.count

    @property
    def total_energy_j(self) -> Quantity:
        return self.energy_j * self.op.count

    @property
    def bound(self) -> str:
        return "compute" if avg(self.compute_s) >= avg(self.memory_s) else "memory"


def _peak(device: Device, op: Op) -> float:
    dtype = op.dtype if op.unit == "matrix" else ("fp32" if "fp32" in device.compute else op.dtype)
    peak = device.compute.get(dtype)  # type: ignore[call-overload]
    if peak is None:
        raise UnsupportedError(
            f"{device.name} has no {dtype} compute rate (op {op.name}); "
            f"it lists {', '.join(device.compute)}"
        )
    return peak


def _maximum(a: Quantity, b: Quantity) -> Quantity:
    """``np.maximum`` without its overhead when both are scalars (the common case)."""
    return max(a, b) if isinstance(a, float) and isinstance(b, float) else np.maximum(a, b)


def _minimum(a: Quantity, b: Quantity) -> Quantity:
    return min(a, b) if isinstance(a, float) and isinstance(b, float) else np.minimum(a, b)


def op_power_w(device: Device, flops: Quantity, nbytes: Quantity, peak_flops: float,
               time_s: Quantity) -> Quantity:
    """``min(max, idle + e_flop * FLOP/s + e_byte * byte/s)`` with the spec's or derived energies."""
    power = device.power
    dynamic = power.max - power.idle
    t = _maximum(time_s, 1e-30)
    if power.energy_per_flop is not None:
        compute_w = power.energy_per_flop * flops / t
    else:
        compute_w = power.compute_share * dynamic * (flops / t) / peak_flops
    if power.energy_per_byte is not None:
        memory_w = power.energy_per_byte * nbytes / t
    else:
        memory_w = power.memory_share * dynamic * (nbytes / t) / device.main_memory.bandwidth
    return _minimum(power.max, power.idle + compute_w + memory_w)


FALLBACK_KINDS = {"routing": "elementwise"}
"""A kind a device's kernels may not name yet (calibrated before it was timed) and the kind it
was priced as until then."""


def _memory_s(op: Op, device: Device, nbytes: Quantity, kind: str | None = None,
              kernels: dict[str, KernelEfficiency] | None = None) -> tuple[Quantity, float]:
    """Memory time and floor of an op: its kind's kernel entry (in ``kernels``, by default the
    device's), or the device's memory curve."""
    eff = device.efficiency
    table = eff.kernels if kernels is None else kernels
    kind = kind or op.kind
    kernel = table.get(kind, table.get(FALLBACK_KINDS.get(kind, "")))
    bandwidth = device.main_memory.bandwidth
    if kernel is None:
        return nbytes / (bandwidth * _maximum(eff.memory.at(nbytes), 1e-12)), 0.0
    return (nbytes + kernel.half_size) / (bandwidth * kernel.bandwidth), kernel.floor


def _at_volumes(op: Op, device: Device, nbytes: Quantity, compute_s: Quantity,
                calls: Quantity) -> tuple[Quantity, Quantity] | None:
    """(busy, memory) time of a kernel interpolated between the device's ``volumes`` around the
    bytes its step moves between two of its runs; None where the device has no volumes for its
    kind or the interval is not known."""
    volumes = device.efficiency.volumes
    interval = op.interval_bytes
    if not volumes or op.kind not in volumes[0].kernels or not np.all(np.asarray(interval) > 0):
        return None
    x = np.log(interval)
    xs = np.log([v.volume for v in volumes])
    busy: Quantity = 0.0
    memory: Quantity = 0.0
    for j, volume in enumerate(volumes):
        weight = np.interp(x, xs, np.arange(len(volumes)) == j)
        memory_j, floor_j = _memory_s(op, device, nbytes, kernels=volume.kernels)
        busy = busy + weight * _maximum(_maximum(compute_s, memory_j), floor_j * calls)
        memory = memory + weight * memory_j
    if not np.ndim(busy):
        return float(busy), float(memory)
    return busy, memory


def cost_op(op: Op, device: Device) -> OpCost:
    eff = device.efficiency
    peak = _peak(device, op)
    nbytes = op.bytes
    if op.kind == "gemm" and eff.gemm is not None and op.shape is not None:
        m, n, k = op.shape
        if eff.expert_loop:  # one call per expert, one after another: no wave holds two experts' tiles
            compute_s = op.groups * gemm_compute_s(m, n, k, peak, device, eff.gemm, bytes_per_value(op.dtype))
        else:
            compute_s = gemm_compute_s(m, n, k, peak, device, eff.gemm, bytes_per_value(op.dtype), op.groups)
    else:
        compute_s = op.flops / (peak * _maximum(eff.compute.at(op.flops), 1e-12))
    memory_s, floor = _memory_s(op, device, nbytes)
    # A weight stored [n, k] (a tied LM head) is read at the library's rate for that layout.
    layout_rate = eff.gemm.transposed_bandwidth if op.transposed_weight and eff.gemm is not None else 1.0
    memory_s = memory_s / layout_rate
    calls: Quantity = 1.0
    if eff.expert_loop and not (isinstance(op.groups, float) and op.groups == 1.0):
        calls = _maximum(op.groups, 1.0)  # one kernel per touched expert, each with its launch and floor
    # A packing BLAS reads the weights in a pass before the math: their sum, not the larger.
    packed = op.kind == "gemm" and eff.gemm is not None and eff.gemm.pack_pass
    busy_s: Quantity | None = _maximum(compute_s + memory_s, floor * calls) if packed else None
    if op.kind == "gemm" and "gemv" in eff.kernels and op.shape is not None:
        # Matrix-vector products (one row per group) run a different kernel than GEMMs
        # (no packing, no tiles; the weights stream under the math). A grouped GEMM whose groups
        # are partly single-row (experts hit by one token) costs that share of its work at the
        # matrix-vector rate.
        gemv_s, gemv_floor = _memory_s(op, device, nbytes, "gemv")
        gemv_s = gemv_s / layout_rate
        one_row = np.asarray(op.shape[0]) <= 1
        share = np.where(one_row, 1.0, np.clip(op.single_groups / np.maximum(op.groups, 1e-12), 0, 1))
        gemv_compute_s = op.flops / peak
        if busy_s is not None:
            busy_s = (share * np.maximum(np.maximum(gemv_compute_s, gemv_s), gemv_floor * calls)
                      + (1 - share) * busy_s)
        memory_s = share * gemv_s + (1 - share) * memory_s
        floor = share * gemv_floor + (1 - share) * floor
        compute_s = share * gemv_compute_s + (1 - share) * compute_s
        if not np.ndim(memory_s):
            memory_s, floor, compute_s = float(memory_s), float(floor), float(compute_s)
            busy_s = None if busy_s is None else float(busy_s)
    overhead_s: Quantity = eff.kernel_overhead
    if op.kind == "gemm" and eff.gemm is not None:
        overhead_s += eff.gemm.call_overhead
    overhead_s = overhead_s * calls
    if busy_s is None and op.kind != "gemm":
        at_volumes = _at_volumes(op, device, nbytes, compute_s, calls)
        if at_volumes is not None:
            busy_s, memory_s = at_volumes
    if busy_s is None:
        busy_s = _maximum(_maximum(compute_s, memory_s), floor * calls)
    time_s = busy_s + overhead_s
    energy = op_power_w(device, op.flops, nbytes, peak, time_s) * time_s
    return OpCost(op, compute_s, memory_s, overhead_s, time_s, energy, peak)


def cost_ops(ops: list[Op], device: Device) -> list[OpCost]:
    """Every op of one step (``ops`` all of it: where the device's kernels depend on the bytes
    between two runs, ``with_intervals`` measures them on this list)."""
    if device.efficiency.volumes:
        ops = with_intervals(ops)
    return [cost_op(op, device) for op in ops]
