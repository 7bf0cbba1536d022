"""Many configurations of one deployment at once: every op costed over arrays of batch sizes,
prompt lengths and output lengths.

A *group* is everything ``estimate`` takes except those three numbers: one model on one system,
one precision and attention kernel, and no plan or a tensor/pipeline/data-parallel one. Within a
group the op graph has the same ops in the same order whatever the numbers, and every op's
FLOPs and bytes are arithmetic on them, so ``build_step`` and ``cost_op`` take arrays:

- the prefill step is built once, over the group's distinct (batch, prompt) pairs;
- the decode step's ops split in two. Those that do not read the context (projections, MLP or
  experts, norms, the head) depend on the batch alone and are costed once per distinct batch;
  those that do (attention and whatever reads the cache) are costed for every configuration at
  each of its sampled contexts (``decode_contexts``), a [configurations, samples] array;
- phase sums, bounds, energy, memory and the fit check are ``estimate``'s expressions on those
  arrays, in the same order, so the numbers are ``estimate``'s to floating-point rounding
  (``tests/test_sweep.py`` compares them on random configurations).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.cost.collectives import collective_time_s
from simulator.cost.roofline import OpCost, cost_op
from simulator.graph.ops import Op
from simulator.graph.transformer import (
    Precision,
    StepShape,
    build_step,
    held_tokens,
    kv_bytes_per_token,
    weight_bytes,
)
from simulator.specs.hardware import System
from simulator.specs.model import ModelSpec
from simulator.strategies.offload import NON_LAYER_OPS
from simulator.strategies.parallel import FIRST_STAGE_OPS, LAST_STAGE_OPS, SEQUENCE_SPLIT_OPS, ParallelPlan

_QUANTITIES = ("flops", "read_bytes", "write_bytes", "weight_bytes", "kv_read_bytes", "kv_write_bytes",
               "groups", "single_groups")
CHUNK = 32768
"""Configurations costed at once in the decode's context ops (16 samples each: about 4 MB an array)."""


@dataclass(frozen=True)
class Group:
    """What a group's configurations share; ``system`` as ``estimate`` runs it (a calibrated CPU host
    under a plan becomes its worker processes); ``samples`` parallel samples per request (each
    request's prefill once, ``batch * samples`` decode streams)."""

    model: ModelSpec
    system: System
    precision: Precision
    attention: str
    plan: ParallelPlan | None = None
    decode_samples: int = 16
    samples: int = 1


@dataclass
class _Costs:
    """One phase's ops over configurations, in graph order: each op's total time and energy per
    sample (``[n, samples]``; one sample for the prefill and for ops that do not read the context)
    and whether its bound is compute (``[n]``)."""

    names: list[str]
    total_s: list[np.ndarray]
    energy_j: list[np.ndarray]
    compute_bound: list[np.ndarray]

    def take(self, index: np.ndarray) -> _Costs:
        return _Costs(self.names, [t[index] for t in self.total_s], [e[index] for e in self.energy_j],
                      [b[index] for b in self.compute_bound])


def _column(value: Any, size: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=float), (size,))


def _one_sample(costs: list[OpCost], size: int) -> _Costs:
    """Costs over ``size`` configurations with scalar shapes (one sample each)."""
    return _Costs(
        [c.op.name for c in costs],
        [_column(c.total_s, size)[:, None] for c in costs],
        [_column(c.total_energy_j, size)[:, None] for c in costs],
        [_column(c.compute_s, size) >= _column(c.memory_s, size) for c in costs])


def _context_dependent(model: ModelSpec, precision: Precision, attention: str) -> list[bool]:
    """Which decode ops read the context: those whose fields are arrays when only it is one."""
    probe = build_step(model, StepShape("decode", 1, 1, np.array([2.0, 3.0])), precision,
                       attention)  # type: ignore[arg-type]
    return [any(isinstance(getattr(op, f), np.ndarray) for f in _QUANTITIES)
            or (op.shape is not None and isinstance(op.shape[0], np.ndarray)) for op in probe]


def _flattened(op: Op, shape: tuple[int, int]) -> Op:
    """The op with every quantity broadcast to ``shape`` and raveled (the GEMM tile model takes
    one axis of rows)."""
    changes: dict[str, Any] = {f: np.broadcast_to(np.asarray(getattr(op, f), dtype=float), shape).ravel()
                               for f in _QUANTITIES}
    if op.shape is not None:
        m = np.broadcast_to(np.asarray(op.shape[0], dtype=float), shape).ravel()
        changes["shape"] = (m, op.shape[1], op.shape[2])
    return dataclasses.replace(op, **changes)


def decode_contexts(input_len: np.ndarray, output_len: np.ndarray, samples: int) -> np.ndarray:
    """``graph.transformer.decode_contexts`` for configurations sharing one number of samples
    (``min(samples, output_len - 1)``): ``[n, samples]``, row by row the same numbers."""
    steps = output_len - 1
    bins = max(1, min(samples, int(steps[0])))
    edges = np.linspace(1, steps + 1, bins + 1, axis=1)
    return input_len[:, None] + (edges[:, :-1] + edges[:, 1:] - 1) / 2.0


def _decode_costs(model: ModelSpec, group: Group, batch: np.ndarray, contexts: np.ndarray,
                  token_costs: tuple[np.ndarray, list[OpCost]], dependent: list[bool]) -> _Costs:
    """The decode step of ``n`` configurations at ``contexts`` (``[n, samples]``)."""
    n, samples = contexts.shape
    distinct, costs = token_costs
    position = np.searchsorted(distinct, batch)
    ops = build_step(model, StepShape("decode", batch[:, None], 1, contexts), group.precision,
                     group.attention)  # type: ignore[arg-type]
    names, totals, energies, bounds = [], [], [], []
    for k, op in enumerate(ops):
        names.append(op.name)
        if not dependent[k]:
            c, size = costs[k], len(distinct)
            totals.append(_column(c.total_s, size)[position][:, None])
            energies.append(_column(c.total_energy_j, size)[position][:, None])
            bounds.append((_column(c.compute_s, size) >= _column(c.memory_s, size))[position])
            continue
        c = cost_op(_flattened(op, (n, samples)), group.system.device)
        totals.append(_column(c.total_s, n * samples).reshape(n, samples))
        energies.append(_column(c.total_energy_j, n * samples).reshape(n, samples))
        compute = _column(c.compute_s, n * samples).reshape(n, samples).mean(axis=1)
        memory = _column(c.memory_s, n * samples).reshape(n, samples).mean(axis=1)
        bounds.append(compute >= memory)
    return _Costs(names, totals, energies, bounds)


# --- a phase's time: one device, or a parallel plan's step -------------------------------------

def _plain_phase(costs: _Costs) -> dict[str, np.ndarray]:
    """``estimate._phase``: each op's mean time added to its bound's sum, in graph order."""
    compute: Any = 0.0
    memory: Any = 0.0
    energy: Any = 0
    for total, joules, is_compute in zip(costs.total_s, costs.energy_j, costs.compute_bound, strict=True):
        mean = total.mean(axis=1)
        compute = compute + np.where(is_compute, mean, 0.0)
        memory = memory + np.where(is_compute, 0.0, mean)
        energy = energy + joules.mean(axis=1)
    time = compute + memory
    return {"time_s": time, "energy_j": energy, "bound": np.where(compute >= memory, "compute", "memory")}


def _mean(value: Any, size: int) -> np.ndarray:
    value = np.asarray(value, dtype=float)
    return np.broadcast_to(value.mean(axis=1) if value.ndim == 2 else value, (size,))


def _parallel_phase(plan: ParallelPlan, system: System, model: ModelSpec, tokens: np.ndarray,
                    act_bytes: float, costs: _Costs, phase: str) -> dict[str, np.ndarray]:
    """``strategies.parallel.step_time`` over configurations (no expert parallelism)."""
    n = len(tokens)
    frac = plan.stage_layers(model) / model.num_layers
    scale = {name: 1.0 / plan.tp for name in SEQUENCE_SPLIT_OPS} if plan.sequence_parallel else {}

    def op_sum(names: frozenset[str] | None, layers: bool, scale: dict[str, float]) -> Any:
        total: Any = 0.0
        for name, op_total in zip(costs.names, costs.total_s, strict=True):
            if layers == (name in NON_LAYER_OPS) or (names is not None and name not in names):
                continue
            total = total + op_total * scale.get(name, 1.0)
        return total

    layer_s = _mean(frac * op_sum(None, True, scale), n)
    first = _mean(op_sum(FIRST_STAGE_OPS, False, {}), n)
    last = _mean(op_sum(LAST_STAGE_OPS, False, {}), n)
    compute = layer_s + (first + last if plan.pp == 1 else np.maximum(first, last))
    hidden = tokens * model.hidden_size * act_bytes
    stage_layers = plan.stage_layers(model)
    collectives: list[np.ndarray] = []

    def add(kind: str, count: int, workers: int, per_node: int) -> None:
        if count == 0 or workers == 1:
            return
        each = collective_time_s(system, kind, hidden, workers, per_node)
        collectives.append(each * count * plan.micro)

    if plan.tp > 1:
        workers, per_node = plan.tp, min(plan.tp, system.devices_per_node)
        reduces = 2 * stage_layers
        if plan.sequence_parallel:
            add("reduce_scatter", reduces, workers, per_node)
            add("all_gather", reduces, workers, per_node)
        else:
            add("all_reduce", reduces, workers, per_node)
    per_mb_comm: Any = sum(collectives) / plan.micro
    send: Any = 0.0
    if plan.pp > 1:
        crosses = plan.replica_devices > system.devices_per_node
        send = collective_time_s(system, "send_recv", hidden, 2, 1 if crosses else 2)
        hops = (plan.pp - 1) if phase == "prefill" else plan.pp
        collectives.append(send * hops * plan.micro)
    layers = layer_s + per_mb_comm - plan.overlap * np.minimum(per_mb_comm, layer_s)
    m, p = plan.micro, plan.pp
    longest = layers + (first + last if p == 1 else np.maximum(first, last))
    through = p * layers + first + last
    if phase == "prefill":
        time = through + (m - 1) * longest + (p - 1) * send
    elif plan.schedule == "gpipe":
        time = through + (m - 1) * longest + p * send
    else:
        time = np.maximum(m * longest, through + p * send)
    busy = m * compute
    communication = _column(sum(collectives), n)
    bubble = np.maximum(0.0, time - m * longest - (p - 1) * send * (phase == "prefill")
                        - p * send * (phase != "prefill" and plan.schedule == "gpipe"))
    layer_energy: Any = 0
    outside_energy: Any = 0
    for name, joules in zip(costs.names, costs.energy_j, strict=True):
        if name in NON_LAYER_OPS:
            outside_energy = outside_energy + joules.mean(axis=1)
        else:
            layer_energy = layer_energy + joules.mean(axis=1)
    energy_busy = frac * layer_energy
    energy_busy = energy_busy + outside_energy
    per_device = m * energy_busy + np.maximum(0.0, time - busy) * system.device.power.idle
    bound = np.where((busy >= communication) & (busy >= bubble), "compute",
                     np.where(communication >= bubble, "communication", "pipeline bubble"))
    return {"time_s": time, "energy_j": per_device * plan.devices, "bound": bound, "compute_s": busy,
            "communication_s": communication, "exposed_communication_s": np.maximum(0.0, time - busy)}


# --- one group -----------------------------------------------------------------------------------

def _distinct(*columns: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The distinct rows of integer columns and, per row, its index among them."""
    stacked = np.stack(columns, axis=1)
    rows, inverse = np.unique(stacked, axis=0, return_inverse=True)
    return [rows[:, k] for k in range(rows.shape[1])], inverse.ravel()


def _memory(model: ModelSpec, group: Group, sequences: np.ndarray, input_len: np.ndarray,
            output_len: np.ndarray, transient: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """``estimate.memory_use`` (full KV cache) over configurations: weights, KV cache, activations."""
    p = group.precision
    weights = weight_bytes(model, p)
    per_token = kv_bytes_per_token(model, p.kv, p.group_size, p.kv_store)
    prompt, generated = held_tokens(model, input_len, output_len)
    tokens = prompt + group.samples * generated
    kv = sequences * tokens * per_token
    residual = sequences * input_len * model.hidden_size * p.act_bytes
    evicted = (sequences * np.maximum(0.0, input_len - model.cached_tokens(input_len)) * per_token
               / model.num_layers)
    return weights, kv, residual + transient + evicted


def evaluate(group: Group, batch: np.ndarray, input_len: np.ndarray,
             output_len: np.ndarray) -> dict[str, np.ndarray]:
    """Every number of ``estimate(...).to_dict()`` for each configuration (flattened names, as a
    sweep's columns), memory over capacity included; the caller decides what fits."""
    batch, input_len, output_len = (np.asarray(a, dtype=np.int64) for a in (batch, input_len, output_len))
    n = len(batch)
    spec, plan, p, device = group.model, group.plan, group.precision, group.system.device
    model = plan.device_model(spec) if plan is not None else spec
    local = batch // (plan.dp * plan.micro) if plan is not None else batch
    streams = local * group.samples  # decode rows: every sample of every request

    # Prefill: once per distinct (batch, prompt).
    (pair_batch, pair_input), pair_of = _distinct(local, input_len)
    ops = build_step(model, StepShape("prefill", pair_batch, pair_input, pair_input.astype(float)), p,
                     group.attention)  # type: ignore[arg-type]
    costs = [cost_op(op, device) for op in ops]
    size = len(pair_batch)
    transient: Any = None
    for c in costs:
        activation = _column(c.op.activation_bytes, size)
        transient = activation if transient is None else np.maximum(transient, activation)
    prefill_costs = _one_sample(costs, size)
    if plan is None:
        prefill = _plain_phase(prefill_costs)
    else:
        prefill = _parallel_phase(plan, group.system, spec, pair_batch * pair_input, p.act_bytes,
                                  prefill_costs, "prefill")
    prefill = {k: v[pair_of] for k, v in prefill.items()}

    # Decode: ops that do not read the context once per distinct batch; the others per
    # configuration and sample, in chunks of configurations sharing a number of samples.
    decode: dict[str, np.ndarray] = {}
    has_decode = output_len > 1
    if has_decode.any():
        dependent = _context_dependent(model, p, group.attention)
        distinct = np.unique(streams[has_decode])
        token_ops = build_step(model, StepShape("decode", distinct, 1, 1.0), p,
                               group.attention)  # type: ignore[arg-type]
        token_costs = (distinct, [None if dependent[k] else cost_op(op, device)
                                  for k, op in enumerate(token_ops)])
        samples = np.minimum(group.decode_samples, np.maximum(output_len - 1, 1))
        for count in np.unique(samples[has_decode]):
            rows = np.flatnonzero(has_decode & (samples == count))
            for start in range(0, len(rows), CHUNK):
                part = rows[start:start + CHUNK]
                contexts = decode_contexts(input_len[part], output_len[part], group.decode_samples)
                step = _decode_costs(model, group, streams[part], contexts, token_costs, dependent)
                if plan is None:
                    values = _plain_phase(step)
                else:
                    values = _parallel_phase(plan, group.system, spec, streams[part], p.act_bytes, step,
                                             "decode")
                for key, value in values.items():
                    if key not in decode:
                        decode[key] = (np.full(n, None, dtype=object) if value.dtype.kind in "UO"
                                       else np.full(n, np.nan))
                    decode[key][part] = value

    # Memory: the whole model on one device, or the busiest stage's device.
    sequences = batch // plan.dp if plan is not None else batch
    weights, kv, activations = _memory(model, group, sequences, input_len, output_len, transient[pair_of])
    if plan is not None:
        frac = plan.stage_layers(spec) / spec.num_layers
        embed = spec.embedding_params() * p.act_bytes
        head = spec.lm_head_params() * p.act_bytes
        outside = embed + head if plan.pp == 1 else max(embed, head)
        weights = frac * (weights - embed - head) + outside
        kv = frac * kv
    total = weights + kv + activations

    steps = output_len - 1
    ttft = prefill["time_s"]
    tpot = np.where(has_decode, decode.get("time_s", np.zeros(n)), 0.0) if decode else np.zeros(n)
    e2e = ttft + 0.0 + steps * tpot
    decode_energy = np.where(has_decode, decode.get("energy_j", np.zeros(n)), 0.0) if decode else 0.0
    energy = prefill["energy_j"] + decode_energy * steps
    tokens = batch * group.samples * output_len
    out: dict[str, Any] = {
        "kv_dtype": p.kv, "compute_dtype": p.compute,
        "ttft_s": ttft, "tpot_s": tpot, "e2e_s": e2e, "kv_transfer_s": 0.0,
        "throughput_tokens_per_s": tokens / e2e, "energy_j": energy, "energy_j_per_token": energy / tokens,
        "energy_j_per_request": energy / batch, "power_w": energy / e2e,
        "memory_bytes_weights": weights, "memory_bytes_kv_cache": kv,
        "memory_bytes_activations": activations, "memory_bytes_total": total,
        "memory_bytes_capacity": device.main_memory.capacity,
    }
    for name, phase in (("prefill", prefill), ("decode", decode)):
        if not phase:
            continue
        out[f"{name}_time_s"] = phase["time_s"]
        out[f"{name}_bound"] = phase["bound"]
        out[f"{name}_energy_j"] = phase["energy_j"]
        out[f"{name}_power_w"] = phase["energy_j"] / phase["time_s"]
        if plan is not None:
            out[f"{name}_compute_s"] = phase["compute_s"]
            out[f"{name}_communication_s"] = phase["communication_s"]
            out[f"{name}_exposed_communication_s"] = np.maximum(0.0, phase["time_s"] - phase["compute_s"])
    return {key: value if isinstance(value, np.ndarray) and value.shape == (n,) else _broadcast(value, n)
            for key, value in out.items()}


def _broadcast(value: Any, n: int) -> np.ndarray:
    if isinstance(value, str):
        return np.full(n, value, dtype=object)
    return np.full(n, float(value))


def batch_errors(plan: ParallelPlan, batch: np.ndarray) -> list[tuple[np.ndarray, Any]]:
    """``ParallelPlan.check``'s batch conditions (no expert parallelism): for each, the rows that
    fail it and a function of a batch giving the message."""
    per_replica = batch // plan.dp
    uneven = batch % plan.dp != 0
    micro = ~uneven & (per_replica % plan.micro != 0)
    return [
        (uneven, lambda b: f"batch {b} does not split over dp={plan.dp} replicas; use a multiple"),
        (micro, lambda b: f"{b // plan.dp} sequences per replica do not split into {plan.micro} "
                          "micro-batches; use a batch that does"),
    ]

