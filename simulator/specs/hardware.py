"""Hardware specs: devices, hosts, links, storage and the systems built from them.

All quantities are SI floats parsed from YAML with units (see ``fields``).
A device's first memory tier is its main memory (HBM, GDDR, or DRAM for a
CPU or unified-memory SoC); the op graph's ``device`` tier maps onto it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from simulator.specs.fields import (
    Bandwidth,
    Bytes,
    Efficiency,
    EfficiencyCurve,
    FlopRate,
    Hertz,
    Joules,
    Seconds,
    Spec,
    Watts,
)

ComputeDType = Literal["fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "fp4", "int8", "int4"]


class MemoryTier(Spec):
    name: str
    capacity: Bytes
    bandwidth: Bandwidth
    latency: Seconds = 0.0


class PowerSpec(Spec):
    """Static power plus energy per FLOP and per byte moved, capped at ``max``.

    ``P = min(max, idle + energy_per_flop * FLOP/s + energy_per_byte * byte/s)``.
    Without explicit energies, they are derived from the dynamic range
    ``max - idle``: running at peak compute alone draws ``compute_share`` of
    it, streaming at peak bandwidth alone ``memory_share`` (see ``docs/model.md``).
    """

    idle: Watts
    max: Watts
    energy_per_flop: Joules | None = None
    energy_per_byte: Joules | None = None
    compute_share: float = Field(0.75, gt=0, le=1)
    memory_share: float = Field(0.5, gt=0, le=1)
    provenance: str = "default"

    @model_validator(mode="after")
    def _ordered(self) -> PowerSpec:
        if self.max <= self.idle:
            raise ValueError(f"max power ({self.max} W) must exceed idle power ({self.idle} W)")
        return self


class DeviceEfficiency(Spec):
    """Achievable fractions of the datasheet peaks, and the fixed cost of one kernel.

    ``compute`` is a curve over an op's FLOPs, ``memory`` over its bytes;
    either may be a single constant.
    """

    compute: Efficiency = EfficiencyCurve(points=((1.0, 0.7),))
    memory: Efficiency = EfficiencyCurve(points=((1.0, 0.8),))
    kernel_overhead: Seconds = 5e-6
    provenance: str = "default: round numbers, not fitted to any measurement"


class Device(Spec):
    kind: Literal["device"] = "device"
    name: str
    vendor: str
    type: Literal["gpu", "cpu", "npu", "soc"] = "gpu"
    compute: dict[ComputeDType, FlopRate]
    memory: tuple[MemoryTier, ...] = Field(min_length=1)
    cache: Bytes | None = None
    compute_units: int | None = Field(None, gt=0)
    clock: Hertz | None = None
    power: PowerSpec
    efficiency: DeviceEfficiency = DeviceEfficiency()

    @model_validator(mode="after")
    def _has_matrix_dtype(self) -> Device:
        if not self.compute:
            raise ValueError("compute needs at least one dtype, e.g. 'bf16: 312 TFLOPS'")
        return self

    @property
    def main_memory(self) -> MemoryTier:
        return self.memory[0]

    def peak_flops(self, dtype: str) -> float | None:
        return self.compute.get(dtype)  # type: ignore[call-overload]


class Host(Spec):
    name: str
    cpu: str
    cores: int = Field(gt=0)
    compute: dict[ComputeDType, FlopRate] = {}
    memory: MemoryTier


class Link(Spec):
    """A point-to-point or switched link; ``bandwidth`` is per direction."""

    name: str
    bandwidth: Bandwidth
    latency: Seconds = 0.0


class Storage(Spec):
    name: str
    capacity: Bytes
    read_bandwidth: Bandwidth
    write_bandwidth: Bandwidth
    latency: Seconds = 0.0


class SystemLinks(Spec):
    intra_node: Link | None = None
    inter_node: Link | None = None
    host_device: Link | None = None
    host_storage: Link | None = None


class System(Spec):
    """Devices per node times nodes, the links between them, a host and storage."""

    kind: Literal["system"] = "system"
    name: str
    description: str = ""
    device: Device
    devices_per_node: int = Field(1, gt=0)
    nodes: int = Field(1, gt=0)
    host: Host | None = None
    storage: Storage | None = None
    links: SystemLinks = SystemLinks()

    @model_validator(mode="after")
    def _links_for_size(self) -> System:
        if self.devices_per_node > 1 and self.links.intra_node is None:
            raise ValueError("a node with several devices needs links.intra_node")
        if self.nodes > 1 and self.links.inter_node is None:
            raise ValueError("several nodes need links.inter_node")
        return self

    @property
    def num_devices(self) -> int:
        return self.devices_per_node * self.nodes

    @classmethod
    def single(cls, device: Device) -> System:
        """A system of one device and nothing else, for estimates on a bare device spec."""
        return cls(name=device.name, description="a single device", device=device)
