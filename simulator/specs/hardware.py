"""Hardware specs: devices, hosts, links, storage and the systems built from them.

All quantities are SI floats parsed from YAML with units (see ``fields``).
A device's first memory tier is its main memory (HBM, GDDR, or DRAM for a
CPU or unified-memory SoC); every op's bytes are costed against it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from simulator.specs.fields import (
    Bandwidth,
    Bytes,
    Efficiency,
    EfficiencyCurve,
    FlopRate,
    Fraction,
    Hertz,
    Joules,
    Seconds,
    Spec,
    Watts,
    _size,
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


class GemmTiling(Spec):
    """GEMM compute time from output tiles and waves over the compute units.

    The kernel covers the ``m x n`` output with ``tm x tn`` tiles (optionally
    splitting ``k`` into ``split`` slices); tiles run in waves of one tile per
    compute unit, and the last, partial wave costs a full one. A tile's time is
    the larger of its math at ``efficiency`` of one unit's share of the peak and
    its operand traffic (``(tm + tn) * k / split`` values) at one unit's share of the
    cache bandwidth, plus a fixed ``tile_overhead``. The fastest tiling wins,
    as a library's heuristic would pick. Every GEMM call also costs ``call_overhead``,
    added like ``DeviceEfficiency.kernel_overhead`` outside the roofs.
    """

    tiles: tuple[tuple[int, int], ...] = ((256, 128), (128, 256), (128, 128), (128, 64), (64, 128),
                                          (64, 64), (32, 128), (16, 128))
    split_k: tuple[int, ...] = (1, 2, 4, 8)
    efficiency: Fraction = 0.85
    tile_overhead: Seconds = 0.0
    """Fixed time per tile beyond its main loop: pipeline fill and writing the output tile."""
    operand_bandwidth: Bandwidth | None = None
    """Aggregate rate at which the cache feeds tiles their operands (L2 to SMs); none: unlimited."""
    call_overhead: Seconds = 0.0
    """Fixed time per GEMM call beyond a plain kernel's launch, whatever its size: the library's
    dispatch and the kernel's pipeline fill and drain, outside both roofs."""
    pack_pass: bool = False
    """The weight operand is read in a pass of its own before the math (a CPU BLAS packing its
    panels into cache-sized blocks): the GEMM's memory time adds to its compute time instead of
    overlapping it. One-row products (the ``gemv`` kernel) do not pack."""
    transposed_bandwidth: Fraction = 1.0
    """The fraction of its usual rate at which a GEMM reads a weight stored ``[n, k]`` (a tied LM
    head reading the embedding table) rather than ``[k, n]``: a CPU BLAS packs transposed panels
    slower; a GPU library reads either layout at one rate."""


KernelKind = Literal["gemm", "gemv", "attention", "softmax", "elementwise", "cache_write", "norm", "rope",
                     "activation", "embedding", "sampling", "unpack", "dequantize", "routing"]
"""The op kinds of ``simulator.graph.ops.OpKind``, plus ``gemv`` for one-row GEMMs."""


class KernelEfficiency(Spec):
    """How one kind of kernel uses the memory system on this device.

    Achieved bandwidth ramps as ``bandwidth * B / (B + half_size)`` times the
    main memory's, with the bytes ``B`` it moves (a fixed start-up cost of
    ``half_size`` bytes' worth of time), and no kernel of this kind takes less
    than ``floor``. ``bandwidth`` may exceed 1 where a kind's data stays in a
    cache faster than main memory (activations on a CPU with a large L3).
    """

    bandwidth: float = Field(gt=0, le=50)
    half_size: Annotated[float, BeforeValidator(_size)] = 0.0
    floor: Seconds = 0.0


class KernelVolume(Spec):
    """The kernels' efficiencies when ``volume`` bytes stream through the caches between two runs
    of the same kernel (see ``DeviceEfficiency.volumes``)."""

    volume: Bytes
    kernels: dict[KernelKind, KernelEfficiency]


class DeviceEfficiency(Spec):
    """Achievable fractions of the datasheet peaks, and the fixed cost of one kernel.

    ``compute`` is a curve over an op's FLOPs, ``memory`` over its bytes;
    either may be a single constant. ``gemm`` switches GEMMs to the tile and
    wave model. ``kernels`` replaces the ``memory`` curve for the kinds of
    kernel it names (gemm, gemv for one-row GEMMs, norm, rope, activation,
    embedding, elementwise, attention, sampling): properties of the kernel
    library on this device, not of any model.
    """

    compute: Efficiency = EfficiencyCurve(points=((1.0, 0.7),))
    memory: Efficiency = EfficiencyCurve(points=((1.0, 0.8),))
    kernel_overhead: Seconds = 5e-6
    gemm: GemmTiling | None = None
    kernels: dict[KernelKind, KernelEfficiency] = {}
    expert_loop: bool = False
    """The runtime runs an MoE layer's experts one after another (HF eager, the reference
    executor) instead of in one grouped kernel (vLLM's fused MoE): every touched expert pays its
    own GEMM calls and its own gather, activation and scatter-add kernels, so an op over
    ``groups`` experts costs ``groups`` kernel overheads and floors."""
    volumes: tuple[KernelVolume, ...] = ()
    """Where a kernel's cost depends on how much of the caches the rest of a step replaces between
    two of its runs (a CPU: a small kernel whose code and data were evicted by a layer's weights
    runs 2-4x slower than one called back to back): ``kernels`` measured at several such volumes,
    ascending. An op's kinds named there cost the time interpolated (in log volume, held beyond
    the ends) between the two volumes around its ``interval_bytes``; ``kernels`` serves the rest
    and ops whose interval is not known."""
    provenance: str = "default: round numbers, not fitted to any measurement"
    fit: dict[str, Any] | None = None
    """How fitted values were obtained: source files, method, residuals."""

    @model_validator(mode="after")
    def _volumes_ascend(self) -> DeviceEfficiency:
        sizes = [v.volume for v in self.volumes]
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError("volumes: list each volume once, smallest first")
        if len({frozenset(v.kernels) for v in self.volumes}) > 1:
            raise ValueError("volumes: every volume must name the same kernel kinds")
        return self


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

    @model_validator(mode="after")
    def _tiling_needs_units(self) -> Device:
        if self.efficiency.gemm is not None and self.compute_units is None:
            raise ValueError("efficiency.gemm needs compute_units (SMs or CUs)")
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
    """A point-to-point or switched link; ``bandwidth`` is per direction.

    ``latency`` is the cost of one hop (one step of a ring or tree);
    ``efficiency`` the achievable fraction of ``bandwidth`` in bulk transfers.
    """

    name: str
    bandwidth: Bandwidth
    latency: Seconds = 0.0
    efficiency: Fraction = 1.0
    ports_per_node: int | None = Field(None, gt=0)
    """For links out of a node: how many ports (NICs) a node has, shared by its devices; ``None``:
    one per device (rail-optimised)."""

    @property
    def rate(self) -> float:
        """Achievable bytes per second in bulk transfers: ``bandwidth * efficiency``."""
        return self.bandwidth * self.efficiency


CollectiveAlgorithm = Literal["ring", "tree", "direct", "nvls", "send_recv"]


class MeasuredCollective(Spec):
    """A collective timed directly among ``workers`` participants: ``latency + bytes / bandwidth``
    (``bytes`` as ``collective_time_s`` counts them: per device; for all-to-all, all it sends)."""

    workers: int = Field(gt=1)
    latency: Seconds
    bandwidth: Bandwidth


class CollectiveSpec(Spec):
    """Software costs of collectives, on top of the links' alpha-beta.

    ``algorithms`` lists the all-reduce algorithms the library may choose
    from (NCCL: ring, tree, and nvls on NVSwitch with SHARP; "direct" is the
    one-shot custom all-reduce of vLLM and TensorRT-LLM); the fastest for each
    message size is taken, as NCCL's tuner does. ``latency`` adds a fixed
    cost per algorithm (protocol set-up, synchronisation) to ``launch``.
    """

    launch: Seconds = 0.0
    algorithms: tuple[CollectiveAlgorithm, ...] = ("ring", "tree")
    latency: dict[CollectiveAlgorithm, Seconds] = {}
    efficiency: dict[Literal["send_recv"], float] = {}
    """Achieved share of the links' rate for a collective, relative to the reductions' (a
    point-to-point copy runs nearer the wire than a reduction's protocol); 1 when absent."""
    measured: dict[Literal["all_reduce", "all_to_all", "send_recv"], MeasuredCollective] = {}
    """Collectives timed on this system (a calibrated host's shared memory): used instead of the
    link model when the group has the measured number of workers."""
    provenance: str = "default: no software cost beyond the links"
    fit: dict[str, Any] | None = None


class Storage(Spec):
    """A drive. ``read_overlap`` is the share of a read that can run under compute on the
    device it feeds: 1 where a DMA engine moves the data (GPUs), what calibration measured where
    the reading cores also compute (a CPU device)."""

    name: str
    capacity: Bytes
    read_bandwidth: Bandwidth
    write_bandwidth: Bandwidth
    latency: Seconds = 0.0
    """Fixed cost of one read (a layer's or an expert's file), beside its bytes at the rate."""
    read_overlap: float = Field(1.0, ge=0.0, le=1.0)


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
    collectives: CollectiveSpec = CollectiveSpec()

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
        """A system of one device and nothing else, for estimates on a bare device spec.

        A host calibrated by ``infersim calibrate`` brings the drive it measured as storage:
        read into a buffer as an offloading runtime reads, written with fsync.
        """
        return cls(name=device.name, description="a single device", device=device,
                   storage=_calibrated_storage(device))


def _calibrated_storage(device: Device) -> Storage | None:
    """The drive a calibration measured. Where it timed whole files of several sizes
    (``read_per_file``), a read costs that fit's ``latency + bytes / bandwidth`` per file (open,
    drop the cached pages, start the readahead, stream); older files give the rate of 32 MiB
    files back to back and a 4 KiB read's latency."""
    disk = (device.efficiency.fit or {}).get("disk") if device.type == "cpu" else None
    if not isinstance(disk, dict):
        return None
    per_file = disk.get("read_per_file") or {}
    read = per_file.get("bandwidth") or (disk.get("read_into_buffer") or disk.get("read_16777216")
                                         or {}).get("bandwidth")
    if not read:
        return None
    latency = per_file.get("latency_s") if per_file.get("bandwidth") else disk.get("latency_4k_s", 0.0)
    overlap = (disk.get("read_overlap") or {}).get("overlap", 0.0)
    return Storage(name="calibrated local disk", capacity=float(disk.get("free_bytes", 0.0)) or 1e12,
                   read_bandwidth=float(read), write_bandwidth=float(disk.get("write_bandwidth", read)),
                   latency=float(latency or 0.0), read_overlap=float(overlap))
