"""Weights and KV cache spread over device memory, host DRAM and disk.

A plan puts a fraction of every layer's weights on each tier (device, host,
disk) and a fraction of the KV cache on the host. Each step then moves the
offloaded part over the links: host to device over ``links.host_device``,
disk to host at the storage's read bandwidth (and over ``links.host_storage``
where the system has one), KV written back device to host. FlexGen's
"zig-zag" schedule and llama.cpp's layer split are both this with different
fractions; ``layers_on_device`` turns a layer count into the fraction.

With ``prefetch`` the transfers of layer ``i + 1`` overlap the compute of
layer ``i``: the step is a pipeline of per-layer stages (compute, each link)
and takes ``sum(S) / L + (L - 1) / L * max(S)`` for stage totals ``S`` over
``L`` layers: the slowest stage binds, plus one layer of the others to fill
the pipeline. Without it every layer waits for its weights: ``sum(S)``.

With ``host_compute`` the layers whose weights live off the device run on the
host CPU instead of being moved (llama.cpp's ``-ngl``, CPU-GPU hybrid): the
device's layers and the host's layers run one after the other, with the
hidden state crossing the link twice per step, and each layer's KV cache
stays where its layer runs.

When the device is the host CPU itself (a calibrated host, no host-device
link), only disk is a lower tier, and its reads are partly copies the CPU's
cores make: prefetch hides only the share ``storage.read_overlap`` that
calibration measured (a reader thread under GEMMs), interpolating between no
overlap and the full pipeline. An expert cache there keeps the other experts
on the drive, each missed one read when the router has chosen it.

Equations in ``docs/model.md`` (Offloading).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.cost.roofline import OpCost, cost_ops
from simulator.errors import InferSimError
from simulator.graph.ops import Op, avg
from simulator.specs.hardware import Device, DeviceEfficiency, EfficiencyCurve, Link, PowerSpec, System
from simulator.specs.model import ModelSpec

# Ops outside the repeated layers: they stay on the device whatever the plan.
NON_LAYER_OPS = frozenset({"embedding", "position_embedding", "final_norm", "lm_head", "sampling"})
WEIGHT_TIERS = ("host", "disk")
KV_TIERS = ("host",)


def parse_fractions(text: str | Mapping[str, float] | None, tiers: tuple[str, ...],
                    flag: str) -> dict[str, float]:
    """``"host=0.5,disk=0.2"`` (or a mapping) to fractions; the device keeps the rest."""
    if text is None:
        return {}
    example = ",".join(f"{t}=0.25" for t in tiers)
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in str(text).split(","))):
            if "=" not in part:
                raise InferSimError(f"{flag}: {part!r} is not TIER=FRACTION; e.g. {flag} {example} "
                                    "(the device keeps the rest)")
            name, _, value = part.partition("=")
            items.append((name.strip(), value.strip()))
    out: dict[str, float] = {}
    for name, value in items:
        if name not in tiers:
            raise InferSimError(f"{flag}: unknown tier {name!r}; choose from {', '.join(tiers)} "
                                f"(the device keeps the rest), e.g. {flag} {example}")
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            raise InferSimError(f"{flag}: {name}={value!r} is not a number between 0 and 1") from None
        if not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
            raise InferSimError(f"{flag}: {name}={fraction:g} must be between 0 and 1 (a fraction, "
                                "not a percentage)")
        out[name] = fraction
    if sum(out.values()) > 1.0 + 1e-9:
        raise InferSimError(f"{flag}: fractions add up to {sum(out.values()):g}, more than 1")
    return out


@dataclass(frozen=True)
class OffloadPlan:
    """Where weights and KV cache live, and how transfers are scheduled."""

    weights_host: float = 0.0
    weights_disk: float = 0.0
    kv_host: float = 0.0
    prefetch: bool = True
    host_compute: bool = False
    expert_cache: float | None = None
    """MoE: fraction of each layer's routed experts held on the device (the most popular);
    the rest live on the host and are fetched when a step routes to them. ``None``: experts
    are placed like the other weights."""
    routing_skew: float = 0.0
    """Zipf exponent of expert popularity (0: uniform routing)."""
    expert_prefetch: float = 0.0
    """Share of missed experts predicted a layer ahead and fetched under the previous layer."""
    experts_on_host: bool = False
    """Compute missed experts on the host CPU instead of fetching them (HybriMoE, Fiddler)."""

    def __post_init__(self) -> None:
        for name in ("weights_host", "weights_disk", "kv_host", "expert_prefetch"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InferSimError(f"offload plan: {name} = {value:g} must be between 0 and 1")
        if self.weights_host + self.weights_disk > 1.0 + 1e-9:
            raise InferSimError(f"offload plan: weights on host ({self.weights_host:g}) and disk "
                                f"({self.weights_disk:g}) add up to more than 1")
        if self.expert_cache is not None and not 0.0 <= self.expert_cache <= 1.0:
            raise InferSimError(f"offload plan: expert_cache = {self.expert_cache:g} must be between 0 and 1")
        if self.routing_skew < 0:
            raise InferSimError(f"offload plan: routing_skew = {self.routing_skew:g} must be at least 0 "
                                "(0 is uniform routing)")
        if self.host_compute and self.kv_host:
            raise InferSimError("offload plan: with host compute each layer's KV cache stays where the "
                                "layer runs; drop the KV offload fraction")

    @classmethod
    def build(cls, model: ModelSpec, weights: str | Mapping[str, float] | None = None,
              kv: str | Mapping[str, float] | None = None, prefetch: bool = True,
              host_compute: bool = False, layers_on_device: int | None = None,
              **experts: Any) -> OffloadPlan:
        """From CLI-style strings; ``layers_on_device`` (llama.cpp ``-ngl``) puts the other
        layers on the host."""
        w = parse_fractions(weights, WEIGHT_TIERS, "--offload-weights")
        k = parse_fractions(kv, KV_TIERS, "--offload-kv")
        if layers_on_device is not None:
            if w:
                raise InferSimError("give either --layers-on-device or --offload-weights, not both")
            if isinstance(layers_on_device, bool) or not 0 <= layers_on_device <= model.num_layers:
                raise InferSimError(f"--layers-on-device must be between 0 and {model.num_layers} "
                                    f"({model.name} has {model.num_layers} layers), got {layers_on_device}")
            w = {"host": 1.0 - layers_on_device / model.num_layers}
        if experts.get("expert_cache") is not None and model.moe is None:
            raise InferSimError(f"--expert-cache needs a mixture-of-experts model; {model.name} is dense")
        return cls(weights_host=w.get("host", 0.0), weights_disk=w.get("disk", 0.0),
                   kv_host=k.get("host", 0.0), prefetch=prefetch, host_compute=host_compute, **experts)

    @property
    def weights_device(self) -> float:
        return max(0.0, 1.0 - self.weights_host - self.weights_disk)

    @property
    def weights_off(self) -> float:
        return self.weights_host + self.weights_disk

    @property
    def active(self) -> bool:
        return self.weights_off > 0 or self.kv_host > 0 or self.expert_cache is not None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": {"device": self.weights_device, "host": self.weights_host, "disk": self.weights_disk},
            "kv_cache": {"device": 1.0 - self.kv_host, "host": self.kv_host},
            "prefetch": self.prefetch, "host_compute": self.host_compute}
        if self.expert_cache is not None:
            out["experts"] = {"cache": self.expert_cache, "routing_skew": self.routing_skew,
                              "prefetch": self.expert_prefetch, "misses_on_host": self.experts_on_host}
        return out


EXPERT_OPS = frozenset({"experts_up_proj", "experts_act", "experts_down_proj",
                        "experts_up_proj_dequantize", "experts_down_proj_dequantize"})


def expert_popularity(num_experts: int, skew: float) -> np.ndarray:
    """Routing share of each expert, most popular first: Zipf with exponent ``skew``."""
    ranks = np.arange(1, num_experts + 1, dtype=float)
    weights = ranks ** -skew
    return weights / weights.sum()


def expert_misses(num_experts: int, top_k: int, tokens: Any, cached: int, skew: float) -> tuple[Any, Any]:
    """Expected (touched, missed) experts of one layer for ``tokens`` tokens routing top-k.

    Each token picks expert ``i`` with probability ``p_i = min(1, k w_i)`` (``w``: popularity);
    ``P(i touched) = 1 - (1 - p_i)^T``. The cache holds the ``cached`` most popular experts
    (a frequency-ordered cache at steady state); the others are misses. Uniform routing gives
    the graph's ``E (1 - (1 - k/E)^T)`` touched experts.
    """
    p = np.minimum(1.0, top_k * expert_popularity(num_experts, skew))
    t = np.asarray(tokens, float)[..., None]
    touched_each = 1.0 - (1.0 - p) ** t
    touched = touched_each.sum(axis=-1)
    missed = touched_each[..., cached:].sum(axis=-1)
    return touched, missed


def _expert_terms(plan: OffloadPlan, model: ModelSpec, ops: list[Op], costs: list[OpCost]) -> dict[str, Any]:
    """Bytes and device time of the routed experts this step, and the share that misses the cache."""
    moe = model.moe
    weights: Any = 0.0
    device: Any = 0.0
    tokens: Any = 1.0
    for op, cost in zip(ops, costs, strict=True):
        if op.name in EXPERT_OPS:
            weights = weights + op.weight_bytes * op.count
            device = device + cost.total_s
        if op.name == "router" and op.shape is not None:
            tokens = op.shape[0]
    if moe is None or plan.expert_cache is None:
        return {"weights": weights, "device_s": device, "miss_share": 0.0, "missed_experts": 0.0}
    cached = int(round(plan.expert_cache * moe.num_experts))
    touched, missed = expert_misses(moe.num_experts, moe.top_k, tokens, cached, plan.routing_skew)
    return {"weights": weights, "device_s": device, "miss_share": missed / np.maximum(touched, 1e-12),
            "missed_experts": missed * model.num_moe_layers}


@dataclass(frozen=True)
class StepTime:
    """One step under a plan: stage totals (arrays over sampled decode contexts) and the result."""

    time_s: float
    device_compute_s: float
    host_compute_s: float = 0.0
    transfers_s: dict[str, float] = field(default_factory=dict)  # per link, total over the step
    bound: str = "compute"


def device_is_host(system: System) -> bool:
    """The device is the host CPU (a calibrated host): no separate host tier or link."""
    return system.device.type == "cpu" and system.links.host_device is None


def _link(system: System, name: str, purpose: str) -> Link:
    link = getattr(system.links, name)
    if link is None:
        raise InferSimError(f"system {system.name!r} has no links.{name}, which {purpose} needs; "
                            f"add it to the system YAML (bandwidth per direction, latency) or choose a "
                            f"system that has one (e.g. workstation-4090)")
    return link


def disk_rate(system: System) -> float | None:
    """Bytes per second from the drive into host memory: the drive's read rate, or the link
    between them where that is slower; ``None`` without a drive."""
    if system.storage is None:
        return None
    link = system.links.host_storage
    return system.storage.read_bandwidth if link is None else min(system.storage.read_bandwidth, link.rate)


def host_device(system: System) -> Device:
    """The host CPU as a device for costing the layers it runs (default efficiencies)."""
    host = system.host
    if host is None:
        raise InferSimError(f"system {system.name!r} has no host, which host compute and host memory "
                            "need; add a host block (cpu, cores, compute, memory) to the system YAML")
    if not host.compute:
        raise InferSimError(f"system {system.name!r}: host.compute is empty; give the CPU's FLOP rate "
                            "per dtype (e.g. 'fp32: 2.3 TFLOPS') to compute layers on it")
    # A CPU without a dtype's instructions converts it to fp32 and runs at the fp32 rate.
    compute = dict(host.compute)
    fallback = compute.get("fp32") or max(compute.values())
    for dtype in ("fp32", "bf16", "fp16", "fp8", "int8", "int4"):
        compute.setdefault(dtype, fallback)  # type: ignore[call-overload]
    return Device(name=host.name, vendor="host", type="cpu", compute=compute,
                  memory=(host.memory,), compute_units=host.cores,
                  power=PowerSpec(idle=0.0, max=1.0, provenance="not modelled for the host"),
                  efficiency=DeviceEfficiency(
                      compute=EfficiencyCurve(points=((1.0, 0.5),)),
                      memory=EfficiencyCurve(points=((1.0, 0.7),)), kernel_overhead=2e-6,
                      provenance="default: CPU round numbers, not fitted"))


def _sum(costs: list[OpCost], layers: bool) -> Any:
    total: Any = 0.0
    for c in costs:
        if (c.op.name not in NON_LAYER_OPS) == layers:
            total = total + c.total_s
    return total


def layer_bytes(ops: list[Op], attr: str) -> Any:
    """Sum of ``attr`` (weight, KV-read or KV-write bytes) over the repeated layers' ops."""
    total: Any = 0.0
    for op in ops:
        if op.name not in NON_LAYER_OPS:
            total = total + getattr(op, attr) * op.count
    return total


def pipeline(stages: list[Any], layers: int, prefetch: bool) -> Any:
    """Step time of per-layer stages with totals ``stages`` over ``layers`` equal layers."""
    total = sum(stages)
    if not prefetch or layers <= 1:
        return total
    longest = functools.reduce(np.maximum, stages)
    return total / layers + (layers - 1) / layers * longest


def step_time(plan: OffloadPlan, system: System, model: ModelSpec, ops: list[Op],
              costs: list[OpCost], host_costs: list[OpCost] | None = None) -> StepTime:
    """Time of one step (prefill, or decode at each sampled context) under ``plan``."""
    layers = model.num_layers
    outside = _sum(costs, layers=False)
    inside = _sum(costs, layers=True)
    weights = layer_bytes(ops, "weight_bytes")
    kv_read, kv_write = layer_bytes(ops, "kv_read_bytes"), layer_bytes(ops, "kv_write_bytes")
    transfers: dict[str, Any] = {}
    from_disk = disk_rate(system)
    if plan.weights_disk > 0:
        if from_disk is None:
            raise InferSimError(f"system {system.name!r} has no storage, which weights on disk need; "
                                "add a storage block (capacity, read_bandwidth) to the system YAML")
        transfers["disk_read"] = plan.weights_disk * weights / from_disk

    if plan.host_compute:
        off = plan.weights_off
        if off > 0:
            if host_costs is None:
                raise ValueError("host compute needs the step's ops costed on the host")
            link = _link(system, "host_device", "moving the hidden state between device and host")
            tokens_bytes = 2 * _hidden_bytes(ops)
            transfers["host_to_device"] = tokens_bytes / link.rate + 2 * link.latency
            host_inside = off * _sum(host_costs, layers=True)
            host_part = pipeline([host_inside] + ([transfers["disk_read"]] if "disk_read" in transfers
                                                  else []), max(1, round(off * layers)), plan.prefetch)
        else:
            host_inside, host_part = 0.0, 0.0
        device_part = outside + plan.weights_device * inside
        time = device_part + host_part + transfers.get("host_to_device", 0.0)
        result = {"compute": avg(device_part), "host compute": avg(host_inside)}
        bound = max(result, key=result.__getitem__)
        if "disk_read" in transfers and avg(transfers["disk_read"]) > avg(host_inside):
            bound = "disk read"
        return StepTime(time_s=avg(time), device_compute_s=avg(device_part),
                        host_compute_s=avg(host_inside),
                        transfers_s={k: avg(v) for k, v in transfers.items()}, bound=bound)

    if device_is_host(system):
        if plan.weights_host or plan.kv_host or plan.host_compute:
            raise InferSimError(f"{system.name!r} is a CPU: its memory is the host's, so only disk is a "
                                "lower tier; use --offload-weights disk=F")
        on_demand = 0.0
        # Each layer on disk is a file of its own, each missed expert too (the executor's layout,
        # as an offloading runtime keeps them): every read pays the drive's fixed cost per read
        # (calibrated per file: open, drop the cached pages, start the readahead) beside its bytes.
        per_read = system.storage.latency if system.storage is not None else 0.0
        if "disk_read" in transfers:
            transfers["disk_read"] = transfers["disk_read"] + round(plan.weights_disk * layers) * per_read
        if plan.expert_cache is not None:
            # Experts outside the cache live on the drive; a missed one is read when the router
            # has chosen it, before its layer can go on: not overlapped.
            if from_disk is None or system.storage is None:
                raise InferSimError(f"{system.name!r} has no drive to hold the experts outside the cache; "
                                    "calibrate the host with `infersim calibrate` (it measures one)")
            experts = _expert_terms(plan, model, ops, costs)
            if "disk_read" in transfers:
                transfers["disk_read"] = (plan.weights_disk * (weights - experts["weights"]) / from_disk
                                          + round(plan.weights_disk * layers) * per_read)
            missed = experts["weights"] * experts["miss_share"]
            on_demand = missed / from_disk + experts["missed_experts"] * per_read
        stages = [inside] + list(transfers.values())
        # A read is partly a copy by the cores that compute: prefetch hides the calibrated
        # share of it (storage.read_overlap), between no overlap and the full pipeline.
        share = system.storage.read_overlap if (plan.prefetch and system.storage is not None) else 0.0
        time = outside + (1.0 - share) * sum(stages) + share * pipeline(stages, layers, True) + on_demand
        bound = "disk read" if avg(transfers.get("disk_read", 0.0)) > avg(inside) else "compute"
        if plan.expert_cache is not None:
            transfers["expert_fetch_on_demand"] = on_demand
            if avg(on_demand) > avg(inside):
                bound = "expert fetch"
        return StepTime(time_s=avg(time), device_compute_s=avg(outside + inside),
                        transfers_s={k: avg(v) for k, v in transfers.items()}, bound=bound)
    on_demand: Any = 0.0  # missed experts fetched when the router has chosen them: not overlapped
    host_experts: Any = 0.0
    if plan.expert_cache is not None:
        # Experts follow the cache, not the weight fractions; their disk share stays on the host.
        experts = _expert_terms(plan, model, ops, costs)
        weights = weights - experts["weights"]
        if "disk_read" in transfers:
            transfers["disk_read"] = plan.weights_disk * weights / from_disk
    if plan.weights_off > 0 or plan.kv_host > 0 or plan.expert_cache is not None:
        link = _link(system, "host_device", "offloading weights, experts or KV cache to the host")
        moved = plan.weights_off * weights + plan.kv_host * kv_read
        if plan.expert_cache is not None:
            missed = experts["weights"] * experts["miss_share"]
            if plan.experts_on_host:
                # Missed experts run on the CPU while the device runs the cached ones.
                host_share = cost_on_host([op for op in ops if op.name in EXPERT_OPS], system)
                host_experts = sum(c.total_s for c in host_share) * experts["miss_share"]
                device_hits = experts["device_s"] * (1.0 - experts["miss_share"])
                on_demand = np.maximum(0.0, host_experts - device_hits)
                inside = inside - experts["device_s"] * experts["miss_share"]
            else:
                moved = moved + plan.expert_prefetch * missed
                fetched = (1.0 - plan.expert_prefetch) * missed
                on_demand = fetched / link.rate + model.num_moe_layers * link.latency * (fetched > 0)
        transfers["host_to_device"] = moved / link.rate + layers * link.latency
        if plan.kv_host > 0:
            transfers["device_to_host"] = plan.kv_host * kv_write / link.rate + layers * link.latency
    stages = [inside] + list(transfers.values())
    time = outside + pipeline(stages, layers, plan.prefetch) + on_demand
    if plan.expert_cache is not None and not plan.experts_on_host:
        transfers["expert_fetch_on_demand"] = on_demand
    names = ["compute"] + [k.replace("_", " ") for k in transfers if k != "expert_fetch_on_demand"]
    bound = names[int(np.argmax([avg(s) for s in stages]))]
    if avg(on_demand) > max(avg(s) for s in stages):
        bound = "host experts" if plan.experts_on_host else "expert fetch"
    return StepTime(time_s=avg(time), device_compute_s=avg(outside + inside),
                    host_compute_s=avg(host_experts),
                    transfers_s={k: avg(v) for k, v in transfers.items()}, bound=bound)


def _hidden_bytes(ops: list[Op]) -> Any:
    """Bytes of the hidden state entering the layers: what the embedding op writes."""
    for op in ops:
        if op.name == "embedding":
            return op.write_bytes
    return 0.0


@dataclass(frozen=True)
class TierUse:
    used: float
    capacity: float
    parts: dict[str, float]

    @property
    def fits(self) -> bool:
        return self.used <= self.capacity

    def to_dict(self) -> dict[str, Any]:
        return {"used": self.used, "capacity": self.capacity, **self.parts}


def tier_memory(plan: OffloadPlan, system: System, model: ModelSpec, layer_weights: float,
                other_weights: float, kv_cache: float, activations: float,
                expert_weights: float = 0.0) -> dict[str, TierUse]:
    """Bytes held on each tier under ``plan``; prefetch double-buffers one layer's moved weights.

    With an expert cache, ``expert_weights`` (all routed experts, all layers) are split by the
    cache fraction instead of the weight fractions, plus one layer's worth of fetched experts.
    """
    device = system.device.main_memory.capacity
    expert_device = expert_host = expert_buffer = 0.0
    if plan.expert_cache is not None and expert_weights:
        layer_weights -= expert_weights
        expert_device = plan.expert_cache * expert_weights
        expert_host = expert_weights - expert_device
        expert_buffer = 0.0 if plan.experts_on_host else expert_host / max(model.num_moe_layers, 1)
        other_weights += expert_device + expert_buffer
    per_layer_off = plan.weights_off * layer_weights / model.num_layers
    buffers = 0.0 if plan.host_compute else (2.0 if plan.prefetch else 1.0) * per_layer_off
    kv_device = kv_cache * (plan.weights_device if plan.host_compute else 1.0 - plan.kv_host)
    tiers = {"device": TierUse(
        used=other_weights + plan.weights_device * layer_weights + buffers + kv_device + activations,
        capacity=device,
        parts={"weights": other_weights + plan.weights_device * layer_weights,
               "transfer_buffers": buffers, "kv_cache": kv_device, "activations": activations})}
    kv_on_host = kv_cache - kv_device
    if device_is_host(system):
        # The device's memory is the host's; disk reads land in the buffers counted above, and
        # the experts outside the cache stay on the drive.
        if expert_host > 0:
            assert system.storage is not None
            tiers["disk"] = TierUse(used=expert_host + plan.weights_disk * layer_weights,
                                    capacity=system.storage.capacity,
                                    parts={"weights": plan.weights_disk * layer_weights,
                                           "experts": expert_host})
            return tiers
    elif plan.weights_host > 0 or kv_on_host > 0 or plan.weights_disk > 0 or expert_host > 0:
        if system.host is None:
            raise InferSimError(f"system {system.name!r} has no host, which offloading needs; add a host "
                                "block to the system YAML or choose a system that has one")
        staging = per_layer_off if plan.weights_disk > 0 else 0.0
        tiers["host"] = TierUse(
            used=plan.weights_host * layer_weights + expert_host + kv_on_host + staging,
            capacity=system.host.memory.capacity,
            parts={"weights": plan.weights_host * layer_weights + expert_host, "kv_cache": kv_on_host,
                   "disk_staging": staging})
    if plan.weights_disk > 0:
        assert system.storage is not None
        tiers["disk"] = TierUse(used=plan.weights_disk * layer_weights,
                                capacity=system.storage.capacity,
                                parts={"weights": plan.weights_disk * layer_weights})
    return tiers


def cost_on_host(ops: list[Op], system: System) -> list[OpCost]:
    return cost_ops(ops, host_device(system))
