"""Offload-policy search (FlexGen's policy search as a linear program).

For a batch size, the steady-state step of an offloaded plan is bound by its
slowest stage: ``t >= compute``, ``t >= bytes over the host link / its rate``,
``t >= bytes from disk / its rate``, each linear in the placement fractions
(weights on host ``h``, on disk ``d``, KV on host ``k``), and every tier's
bytes are linear in them too. So for each batch

    minimise  t_prefill + (G - 1) t_decode  (+ a tie-break preferring the device)
    subject to the stage bounds of both steps and each tier's capacity

is a small LP (scipy's HiGHS). ``objective="throughput"`` also searches the
batch (powers of two up to ``max_batch``) for the most tokens per second;
``"latency"`` keeps the given batch and minimises end-to-end time. The chosen
plan is then costed by ``estimate`` itself (pipeline fill and link latency
included), and the LP's tight constraints say what binds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linprog

from simulator.errors import DoesNotFitError, InferSimError
from simulator.estimate import estimate
from simulator.graph.ops import avg
from simulator.graph.transformer import embedding_bytes
from simulator.result import EstimateResult
from simulator.specs.hardware import System
from simulator.specs.loader import load_model, load_system
from simulator.specs.model import ModelSpec
from simulator.strategies.offload import OffloadPlan, disk_rate, layer_bytes

TIE_BREAK = 1e-9  # seconds per unit fraction: among equal plans keep the most on the device
MARGIN = 1.0 - 1e-5  # of each capacity, so that rounding the fractions cannot overflow a tier


@dataclass(frozen=True)
class PlanChoice:
    plan: OffloadPlan
    batch: int
    result: EstimateResult
    binding: tuple[str, ...]
    objective: str
    candidates: int

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "batch": self.batch, "plan": self.plan.to_dict(),
                "binding": list(self.binding), "batches_searched": self.candidates,
                "estimate": self.result.to_dict(ops=False)}


def _layer_sums(result: EstimateResult, phase: str) -> dict[str, float]:
    step = result.prefill if phase == "prefill" else result.decode
    if step is None:
        return {"compute": 0.0, "weights": 0.0, "kv_read": 0.0, "kv_write": 0.0}
    ops = [c.op for c in step.costs]
    return {"compute": step.time_s, "weights": avg(layer_bytes(ops, "weight_bytes")),
            "kv_read": avg(layer_bytes(ops, "kv_read_bytes")),
            "kv_write": avg(layer_bytes(ops, "kv_write_bytes"))}


def _solve(model: ModelSpec, system: System, base: EstimateResult, output_len: int
           ) -> tuple[np.ndarray, list[str]] | None:
    """LP over x = [h, d, k, t_prefill, t_decode]; ``None`` when no placement fits."""
    link = system.links.host_device
    rate = link.rate if link else None
    storage = system.storage
    from_disk = disk_rate(system)
    p, d = _layer_sums(base, "prefill"), _layer_sums(base, "decode")
    mem = base.memory
    embed = embedding_bytes(model, base.precision)
    layer_w = mem.weights - embed
    L = model.num_layers
    decode_weight = output_len - 1
    A, b, names = [], [], []

    def bound(row: list[float], rhs: float, name: str) -> None:
        A.append(row)
        b.append(rhs)
        names.append(name)

    # Stage bounds (steady state: the slowest stage binds).
    bound([0, 0, 0, -1, 0], -p["compute"], "prefill compute")
    bound([0, 0, 0, 0, -1], -d["compute"], "decode compute")
    if rate:
        bound([p["weights"] / rate, p["weights"] / rate, 0, -1, 0], 0.0, "prefill host-to-device link")
        bound([0, 0, p["kv_write"] / rate, -1, 0], 0.0, "prefill device-to-host link")
        bound([d["weights"] / rate, d["weights"] / rate, d["kv_read"] / rate, 0, -1], 0.0,
              "decode host-to-device link")
        bound([0, 0, d["kv_write"] / rate, 0, -1], 0.0, "decode device-to-host link")
    if from_disk:
        bound([0, p["weights"] / from_disk, 0, -1, 0], 0.0, "prefill disk read")
        bound([0, d["weights"] / from_disk, 0, 0, -1], 0.0, "decode disk read")
    # Capacities: device holds the rest plus two layers of moved weights (double buffer).
    shrink = layer_w * (1.0 - 2.0 / L)
    bound([-shrink, -shrink, -mem.kv_cache, 0, 0],
          system.device.main_memory.capacity * MARGIN - embed - layer_w - mem.kv_cache - mem.activations,
          "device memory")
    if system.host is not None:
        # Host: its weights and KV, plus one layer staged from disk (counted for h too: conservative).
        bound([layer_w * (1 + 1 / L), layer_w * (1 + 1 / L) - layer_w, mem.kv_cache, 0, 0],
              system.host.memory.capacity * MARGIN, "host memory")
    if storage is not None:
        bound([0, layer_w, 0, 0, 0], storage.capacity * MARGIN, "disk capacity")
    bound([1, 1, 0, 0, 0], 1.0, "weights fractions")
    upper_h = 1.0 if (rate and system.host is not None) else 0.0
    upper_d = 1.0 if (rate and from_disk and system.host is not None) else 0.0
    upper_k = upper_h
    cost = [TIE_BREAK, 2 * TIE_BREAK, TIE_BREAK, 1.0, float(decode_weight)]
    solved = linprog(cost, A_ub=np.array(A), b_ub=np.array(b),
                     bounds=[(0, upper_h), (0, upper_d), (0, upper_k), (0, None), (0, None)],
                     method="highs")
    if not solved.success:
        return None
    x = solved.x
    slack = np.array(b) - np.array(A) @ x
    scale = np.maximum(np.abs(np.array(b)), 1e-9)
    tight = [n for n, s, sc in zip(names, slack, scale, strict=True)
             if s <= 1e-6 * sc + 1e-12 and n != "weights fractions"]
    return x, tight


def search(model: str | Path | ModelSpec, hardware: str | Path | System, input_len: int = 512,
           output_len: int = 128, objective: str = "throughput", batch: int | None = None,
           max_batch: int = 1024, **precision: Any) -> PlanChoice:
    """The placement (and, for throughput, the batch) that the objective prefers."""
    if objective not in ("throughput", "latency"):
        raise InferSimError(f"--objective must be throughput or latency, got {objective!r}")
    spec = load_model(model)
    system = load_system(hardware)
    if batch is not None:
        batches = [batch]
    elif objective == "latency":
        batches = [1]
    else:
        if max_batch < 1:
            raise InferSimError(f"--max-batch must be at least 1, got {max_batch}")
        batches = [2**i for i in range(int(np.log2(max_batch)) + 1)]
    best: tuple[float, int, np.ndarray, list[str]] | None = None
    for b in batches:
        base = estimate(spec, system, batch=b, input_len=input_len, output_len=output_len,
                        check_memory=False, **precision)
        solved = _solve(spec, system, base, output_len)
        if solved is None:
            break  # larger batches need more memory still
        x, tight = solved
        e2e = x[3] + (output_len - 1) * x[4]
        score = -b * output_len / e2e if objective == "throughput" else e2e
        if best is None or score < best[0]:
            best = (score, b, x, tight)
    if best is None:
        needed = estimate(spec, system, batch=batches[0], input_len=input_len, output_len=output_len,
                          check_memory=False, **precision).memory
        total_needed = needed.total
        total_capacity = system.device.main_memory.capacity + sum(
            tier.capacity for tier in (system.host.memory if system.host else None,
                                       system.storage) if tier is not None)
        raise DoesNotFitError(
            f"{spec.name} at batch {batches[0]}, {input_len}+{output_len} tokens fits no placement on "
            f"{system.name}: device, host and disk together are too small (or the system has no host "
            "link to offload over); use a smaller dtype or more devices",
            required_bytes=total_needed, capacity_bytes=total_capacity)
    _, b, x, tight = best
    clip = lambda v: float(min(max(np.ceil(v * 1e6) / 1e6, 0.0), 1.0))  # noqa: E731
    h, d = clip(x[0]), clip(x[1])
    plan = OffloadPlan(weights_host=min(h, 1.0 - d), weights_disk=d, kv_host=clip(x[2]))
    result = estimate(spec, system, batch=b, input_len=input_len, output_len=output_len,
                      offload=plan, **precision)
    return PlanChoice(plan=plan, batch=b, result=result, binding=tuple(tight), objective=objective,
                      candidates=len(batches))
