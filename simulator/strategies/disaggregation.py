"""Prefill/decode disaggregation: prompts on one pool of devices, generation on another (Splitwise).

The prefill pool runs the prompt and produces the first token; the request's KV cache then moves
to the decode pool over a named link, and the decode pool generates the rest. Each pool is
costed on its own hardware (the same parallel plan on both), and each must hold what it keeps:
the prefill pool the weights and the prompt's KV cache, the decode pool the weights and the
whole sequence's.

The transfer moves ``batch * prompt * kv_bytes_per_token`` bytes (the tokens an eviction policy
keeps); a replica spread over ``n`` devices sends from each over its own link at once (one NIC
per GPU, as in DGX nodes), so it takes ``latency + bytes / (n * rate)``. Splitwise sends each
layer's cache as soon as the layer is done, under the rest of the prefill: only
``max(transfer / L, transfer - prefill * (L - 1) / L)`` is exposed; ``layerwise=False`` sends
after the prefill and exposes all of it. The exposed part delays the second token: it adds to
e2e, not to TTFT. The per-request flow (queues, pools under load) is the serving engine's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from simulator.errors import InferSimError
from simulator.graph.transformer import kv_bytes_per_token
from simulator.result import EstimateResult
from simulator.specs import units
from simulator.specs.hardware import Link, System
from simulator.specs.loader import load_model, load_system

LINK_NAMES = ("inter_node", "intra_node", "host_device")


def transfer_link(system: System, link: str | Link | None) -> Link:
    """A link of the prefill system by name, a bandwidth (``"50 GB/s"``), or the system's
    fastest way out of a node: its inter-node link, else its intra-node one."""
    if isinstance(link, Link):
        return link
    if link is None:
        for name in LINK_NAMES:
            found = getattr(system.links, name)
            if found is not None:
                return found
        raise InferSimError(f"{system.name} has no link to send the KV cache over; give --kv-link "
                            "as a bandwidth, e.g. --kv-link '50 GB/s'")
    if link in LINK_NAMES:
        found = getattr(system.links, link)
        if found is None:
            raise InferSimError(f"{system.name} has no links.{link}; choose one it has or give a "
                                "bandwidth, e.g. --kv-link '50 GB/s'")
        return found
    try:
        rate = units.parse_quantity(link, units.BANDWIDTH)
    except (ValueError, InferSimError):
        raise InferSimError(f"--kv-link {link!r}: give one of {', '.join(LINK_NAMES)} or a bandwidth "
                            "such as '50 GB/s'") from None
    return Link(name=f"kv link {link}", bandwidth=rate)


def _in_pool(pool: str, run: Any) -> EstimateResult:
    """``run()``, with any error it raises prefixed by the pool it concerns."""
    try:
        return run()
    except InferSimError as err:
        err.args = (f"{pool} pool: {err}",) + err.args[1:]
        raise


def estimate_disaggregated(model: Any, prefill_hardware: str | Path | System,
                           decode_hardware: str | Path | System, kv_link: str | Link | None = None,
                           layerwise: bool = True,
                           **options: Any) -> EstimateResult:
    """``estimate`` with the prefill on one pool and decode on another (``options`` are
    ``estimate``'s, applied to both pools)."""
    from simulator.estimate import estimate

    output_len = options.pop("output_len", 128)
    prefill_system, decode_system = load_system(prefill_hardware), load_system(decode_hardware)
    first = _in_pool("prefill", lambda: estimate(model, prefill_system, output_len=1, **options))
    rest = _in_pool("decode", lambda: estimate(model, decode_system, output_len=output_len, **options))
    spec = load_model(model)
    link = transfer_link(prefill_system, kv_link)
    parallel = options.get("parallel")
    senders = parallel.replica_devices if parallel is not None and parallel.active else 1
    replicas = parallel.dp if parallel is not None and parallel.active else 1
    policy = options.get("kv_policy")
    input_len = options.get("input_len", 512)
    kept = policy.decode_model(spec, input_len, output_len) if policy is not None else spec
    precision = first.precision
    nbytes = (first.batch / replicas) * kept.cached_tokens(input_len) * kv_bytes_per_token(
        spec, precision.kv, precision.group_size, precision.kv_store)
    transfer = link.latency + nbytes / (senders * link.rate)
    layers = spec.num_layers
    exposed = transfer
    if layerwise:
        exposed = max(transfer / layers, transfer - first.ttft_s * (layers - 1) / layers)

    def pool(result: EstimateResult, phase: Any) -> dict[str, Any]:
        return {"hardware": result.hardware, "device": result.device, "time_s": phase.time_s,
                "energy_j": phase.energy_j, "memory_bytes": result.memory.to_dict()}

    assert rest.decode is not None or output_len == 1
    info = {
        "prefill": pool(first, first.prefill),
        "decode": pool(rest, rest.decode) if rest.decode is not None else None,
        "kv_transfer": {"bytes": nbytes * replicas, "link": link.name, "rate_bytes_per_s": link.rate,
                        "senders": senders, "time_s": transfer, "exposed_s": exposed,
                        "layerwise": layerwise},
    }
    return dataclasses.replace(
        rest, hardware=f"{first.hardware} -> {rest.hardware}", prefill=first.prefill,
        kv_transfer_s=exposed, warnings=tuple(dict.fromkeys(first.warnings + rest.warnings)),
        strategy={**(rest.strategy or {}), "disaggregation": info})
