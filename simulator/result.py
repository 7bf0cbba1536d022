"""Results of an estimate: frozen records, a JSON-ready dict and a per-op DataFrame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from simulator.cost.roofline import OpCost
from simulator.graph.ops import avg
from simulator.graph.transformer import Precision


@dataclass(frozen=True)
class PhaseResult:
    """One step of a phase: prefill, or the mean decode step over the growing context."""

    phase: str
    time_s: float
    energy_j: float
    bound: str
    costs: list[OpCost]
    compute_s: float | None = None
    """Time on the device's (and host's) compute alone, where transfers add to it (offloading)."""
    transfers_s: dict[str, float] | None = None
    """Per link, the bytes moved in the step over its achievable rate."""
    communication_s: float | None = None
    """Under a parallel plan: the step's collectives and pipeline sends, before overlap."""
    collectives: list[dict[str, Any]] | None = None
    """Under a parallel plan: each kind of collective of the step, with count, bytes and time."""

    @property
    def power_w(self) -> float:
        return self.energy_j / self.time_s

    def op_rows(self) -> list[dict[str, Any]]:
        rows = []
        for c in self.costs:
            op = c.op
            flops, nbytes = avg(op.flops), avg(op.bytes)
            rows.append({
                "phase": self.phase,
                "op": op.name,
                "kind": op.kind,
                "count": op.count,
                "dtype": op.dtype,
                "flops": flops * op.count,
                "bytes": nbytes * op.count,
                "weight_bytes": avg(op.weight_bytes) * op.count,
                "kv_bytes": avg(op.kv_read_bytes + op.kv_write_bytes) * op.count,
                "intensity": flops / max(nbytes, 1.0),
                "compute_s": avg(c.compute_s) * op.count,
                "memory_s": avg(c.memory_s) * op.count,
                "overhead_s": avg(c.overhead_s) * op.count,
                "time_s": avg(c.total_s),
                "share": avg(c.total_s) / self.time_s,
                "bound": c.bound,
                "energy_j": avg(c.total_energy_j),
            })
        return rows


@dataclass(frozen=True)
class MemoryUse:
    weights: float
    kv_cache: float
    activations: float
    capacity: float
    tiers: dict[str, Any] | None = None
    """Under an offload plan, per tier (device, host, disk): ``TierUse`` with used and capacity."""

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations

    @property
    def device_used(self) -> float:
        return self.tiers["device"].used if self.tiers else self.total

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights": self.weights, "kv_cache": self.kv_cache,
                               "activations": self.activations, "total": self.total,
                               "capacity": self.capacity}
        if self.tiers:
            out["tiers"] = {name: tier.to_dict() for name, tier in self.tiers.items()}
        return out


@dataclass(frozen=True)
class EstimateResult:
    model: str
    hardware: str
    device: str
    batch: int
    input_len: int
    output_len: int
    precision: Precision
    attention: str
    prefill: PhaseResult
    decode: PhaseResult | None
    memory: MemoryUse
    warnings: tuple[str, ...] = ()
    strategy: dict[str, Any] | None = None
    """Offload plan and KV policy, as given (``None``: everything on the device, full KV)."""
    kv_transfer_s: float = 0.0
    """Disaggregated prefill and decode: the KV transfer's exposed time, before the second token."""

    @property
    def decode_steps(self) -> int:
        return self.output_len - 1

    @property
    def ttft_s(self) -> float:
        return self.prefill.time_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 when only one token is generated)."""
        return self.decode.time_s if self.decode else 0.0

    @property
    def e2e_s(self) -> float:
        return self.ttft_s + self.kv_transfer_s + self.decode_steps * self.tpot_s

    @property
    def output_tokens(self) -> int:
        return self.batch * self.output_len

    @property
    def throughput_tokens_per_s(self) -> float:
        return self.output_tokens / self.e2e_s

    @property
    def energy_j(self) -> float:
        decode = self.decode.energy_j * self.decode_steps if self.decode else 0.0
        return self.prefill.energy_j + decode

    @property
    def energy_j_per_token(self) -> float:
        return self.energy_j / self.output_tokens

    @property
    def power_w(self) -> float:
        return self.energy_j / self.e2e_s

    def ops_frame(self) -> pd.DataFrame:
        """One row per op and phase: FLOPs, bytes, roof times, bound, share of the step."""
        rows = self.prefill.op_rows() + (self.decode.op_rows() if self.decode else [])
        return pd.DataFrame(rows)

    def to_dict(self, ops: bool = True) -> dict[str, Any]:
        def phase(p: PhaseResult | None) -> dict[str, Any] | None:
            if p is None:
                return None
            out = {"time_s": p.time_s, "bound": p.bound, "energy_j": p.energy_j,
                   "power_w": p.power_w}
            if p.transfers_s is not None:
                compute = p.compute_s if p.compute_s is not None else p.time_s
                out.update({"compute_s": compute, "transfer_wait_s": max(0.0, p.time_s - compute),
                            "transfers_s": p.transfers_s})
            if p.communication_s is not None:
                compute = p.compute_s if p.compute_s is not None else p.time_s
                out.update({"compute_s": compute, "communication_s": p.communication_s,
                            "exposed_communication_s": max(0.0, p.time_s - compute),
                            "collectives": p.collectives})
            return out

        out: dict[str, Any] = {
            "model": self.model,
            "hardware": self.hardware,
            "batch": self.batch,
            "input_len": self.input_len,
            "output_len": self.output_len,
            "weight_dtype": self.precision.weight,
            "kv_dtype": self.precision.kv,
            "compute_dtype": self.precision.compute,
            "attention": self.attention,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "kv_transfer_s": self.kv_transfer_s,
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "energy_j": self.energy_j,
            "energy_j_per_token": self.energy_j_per_token,
            "power_w": self.power_w,
            "memory_bytes": self.memory.to_dict(),
            "prefill": phase(self.prefill),
            "decode": phase(self.decode),
            "warnings": list(self.warnings),
        }
        if self.strategy:
            out["strategy"] = self.strategy
        if ops:
            out["ops"] = self.ops_frame().to_dict(orient="records")
        return out
