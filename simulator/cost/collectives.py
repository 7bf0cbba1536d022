"""Alpha-beta cost of collectives over a system's links.

Per link: ``alpha`` is its one-hop latency, ``beta`` its per-direction
bandwidth times its achievable fraction. Within a node (NVSwitch, PCIe
switch, shared memory) every device reaches every other at ``beta``; across
nodes each device has its own NIC (rail-optimised). For ``p`` devices and
``n`` bytes per device:

- ring all-reduce: ``2 (p-1) alpha + 2 (p-1)/p * n / beta``
- tree all-reduce (double binary tree): ``2 ceil(log2 p) alpha + 2 n / beta``
- direct all-reduce (one shot: each device reads the others' buffers, as the
  custom all-reduce kernels of vLLM and TensorRT-LLM do): ``alpha + (p-1) n / beta``
- in-switch all-reduce (NVLink SHARP, "nvls", H100 NVSwitch): ``2 alpha + n / beta``
- across nodes, hierarchical: reduce-scatter within the node, all-reduce of
  ``n / d`` across nodes, all-gather within the node (``d`` devices per node); when the node has
  fewer NICs than devices (``inter_node.ports_per_node``), its ``d`` devices share them
- send/recv: ``alpha + n / (e beta)`` over the link joining the two devices, ``e`` the
  system's ``collectives.efficiency.send_recv`` (1 unless fitted)
- all-to-all (expert dispatch and combine; ``n`` the bytes each device sends in all): every
  device exchanges with every other at once, ``alpha + (p-1)/p * n / beta`` on a switch; across
  nodes the share ``(nodes-1)/nodes`` of ``n`` crosses the NICs, one after the intra-node part
- reduce-scatter and all-gather (sequence parallelism): one ring phase,
  ``(p-1) alpha + (p-1)/p * n / beta``; across nodes hierarchical as all-reduce's halves

plus a fixed software cost per call (``collectives.launch``) and per algorithm
(``collectives.latency``; a reduce-scatter or all-gather pays half the ring's, an all-to-all
the send/recv's). The fastest available algorithm wins, as NCCL's tuner would choose.
Sources: Thakur, Rabenseifner and Gropp (2005), "Optimization of collective communication
operations in MPICH"; NCCL's documentation of ring and tree algorithms.

A collective the system's spec lists as ``measured`` for this many workers (a calibrated host,
where the executor's own shared-memory collectives were timed) is that line instead.
"""

from __future__ import annotations

import math

import numpy as np

from simulator.errors import InferSimError
from simulator.specs.hardware import CollectiveSpec, Link, System


def _all_reduce_flat(n: np.ndarray, p: int, link: Link, spec: CollectiveSpec) -> np.ndarray:
    if p == 1:
        return np.zeros_like(n)
    alpha, beta = link.latency, link.rate
    fixed = spec.latency
    formulas = {
        "ring": lambda: 2 * (p - 1) * alpha + 2 * (p - 1) / p * n / beta,
        "tree": lambda: 2 * math.ceil(math.log2(p)) * alpha + 2 * n / beta,
        "direct": lambda: alpha + (p - 1) * n / beta,
        # In-switch reduction (NVLink SHARP): each device sends and receives its buffer once.
        "nvls": lambda: 2 * alpha + n / beta,
    }
    options = [fixed.get(name, 0.0) + formulas[name]() for name in spec.algorithms if name in formulas]
    return np.min(options, axis=0)


def _ring_phase(n: np.ndarray, p: int, link: Link) -> np.ndarray:
    """Reduce-scatter or all-gather: ``(p-1) alpha + (p-1)/p * n / beta``."""
    if p == 1:
        return np.zeros_like(n)
    return (p - 1) * link.latency + (p - 1) / p * n / link.rate


def _per_device(link: Link, per_node: int) -> Link:
    """A link out of the node as one of ``per_node`` devices sending at once sees it: its rate
    times ``ports_per_node / per_node`` when the node has fewer ports than devices."""
    ports = link.ports_per_node
    if ports is None or ports >= per_node:
        return link
    return link.model_copy(update={"efficiency": link.efficiency * ports / per_node})


def _all_to_all(n: np.ndarray, p: int, per_node: int, intra: Link | None,
                inter: Link | None) -> np.ndarray:
    nodes = math.ceil(p / per_node)
    time = 0 * n
    if intra is not None:
        time = time + intra.latency + (per_node - 1) / p * n / intra.rate
    if inter is not None:
        inter = _per_device(inter, per_node)
        time = time + inter.latency + (nodes - 1) / nodes * n / inter.rate
    return time


def _links(system: System, workers: int, per_node: int) -> tuple[Link | None, Link | None]:
    nodes = math.ceil(workers / per_node)
    intra = system.links.intra_node if per_node > 1 else None
    inter = system.links.inter_node if nodes > 1 else None
    if per_node > 1 and intra is None:
        raise InferSimError(f"{system.name}: links.intra_node is needed for {per_node} devices per node")
    if nodes > 1 and inter is None:
        raise InferSimError(f"{system.name}: links.inter_node is needed across {nodes} nodes")
    if per_node > system.devices_per_node:
        raise InferSimError(
            f"{system.name} has {system.devices_per_node} devices per node, not {per_node}")
    return intra, inter


COLLECTIVES = ("all_reduce", "all_to_all", "reduce_scatter", "all_gather", "send_recv")


def collective_time_s(system: System, collective: str, size_bytes: np.ndarray | float,
                      workers: int, per_node: int | None = None) -> np.ndarray:
    """Time of one collective of ``size_bytes`` per device among ``workers`` devices."""
    n = np.asarray(size_bytes, dtype=float)
    if workers == 1:
        return np.zeros_like(n)
    measured = system.collectives.measured.get(collective)  # type: ignore[call-overload]
    if measured is not None and measured.workers == workers:
        return measured.latency + n / measured.bandwidth
    per_node = min(workers, system.devices_per_node) if per_node is None else per_node
    intra, inter = _links(system, workers, per_node)
    spec = system.collectives
    nodes = math.ceil(workers / per_node)
    if collective == "send_recv":
        link = inter if inter is not None else intra
        if link is None:
            return np.zeros_like(n)
        rate = link.rate * spec.efficiency.get("send_recv", 1.0)
        return spec.launch + spec.latency.get("send_recv", 0.0) + link.latency + n / rate
    if collective == "all_to_all":
        return spec.launch + spec.latency.get("send_recv", 0.0) + _all_to_all(n, workers, per_node,
                                                                              intra, inter)
    if collective in ("reduce_scatter", "all_gather"):
        # One of a ring all-reduce's two phases: half its fixed software cost.
        fixed = spec.launch + spec.latency.get("ring", 0.0) / 2
        if nodes == 1:
            assert intra is not None
            return fixed + _ring_phase(n, workers, intra)
        assert inter is not None
        inside = _ring_phase(n, per_node, intra) if intra is not None else 0 * n
        return fixed + inside + _ring_phase(n / per_node, nodes, _per_device(inter, per_node))
    if collective != "all_reduce":
        raise InferSimError(f"unknown collective {collective!r}; known: {', '.join(COLLECTIVES)}")
    if nodes == 1:
        assert intra is not None or workers == 1
        return spec.launch + (_all_reduce_flat(n, workers, intra, spec) if intra else 0 * n)
    assert inter is not None
    if per_node == 1:
        return spec.launch + _all_reduce_flat(n, nodes, inter, spec)
    assert intra is not None
    across = _all_reduce_flat(n / per_node, nodes, _per_device(inter, per_node), spec)
    return spec.launch + 2 * _ring_phase(n, per_node, intra) + across
