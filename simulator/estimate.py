"""One request shape on one device: prefill, decode, memory, energy.

``estimate`` builds the prefill step and the decode step (sampled over the
growing context), costs every op on the roofline, checks memory against the
device's capacity, and returns an ``EstimateResult``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from simulator import dtypes
from simulator.cost.roofline import OpCost, cost_ops
from simulator.errors import DoesNotFitError, InferSimError
from simulator.graph.ops import avg
from simulator.graph.transformer import (
    AttentionImpl,
    Precision,
    StepShape,
    build_step,
    decode_contexts,
    kv_bytes_per_token,
    weight_bytes,
)
from simulator.result import EstimateResult, MemoryUse, PhaseResult
from simulator.specs.hardware import Device, System
from simulator.specs.loader import load_model, load_system
from simulator.specs.model import ModelSpec


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InferSimError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def resolve_precision(device: Device, weight_dtype: str, kv_dtype: str | None, act_dtype: str,
                      group_size: int) -> Precision:
    dtypes.check_choice(weight_dtype, dtypes.WEIGHT_DTYPES, "weight dtype")
    dtypes.check_choice(act_dtype, dtypes.ACT_DTYPES, "activation dtype")
    # A device without the requested activation dtype (bf16 on a T4) runs its fallback.
    act = dtypes.compute_dtype("none", act_dtype, set(device.compute))
    kv = dtypes.check_choice(kv_dtype or act, dtypes.KV_DTYPES, "KV dtype")
    compute = dtypes.compute_dtype(weight_dtype, act, set(device.compute))
    return Precision(weight=weight_dtype, kv=kv, act=act, compute=compute, group_size=group_size)


def _phase(name: str, costs: list[OpCost]) -> PhaseResult:
    by_bound = {"compute": 0.0, "memory": 0.0}
    for c in costs:
        by_bound[c.bound] += avg(c.total_s)
    time_s = by_bound["compute"] + by_bound["memory"]
    energy = sum(avg(c.total_energy_j) for c in costs)
    bound = max(by_bound, key=by_bound.__getitem__)
    return PhaseResult(phase=name, time_s=time_s, energy_j=energy, bound=bound, costs=costs)


def memory_use(model: ModelSpec, device: Device, precision: Precision, batch: int,
               input_len: int, output_len: int, prefill_costs: list[OpCost]) -> MemoryUse:
    """Weights, KV cache for the whole sequence, and the largest live activation set.

    Activations: the residual stream of the prefill plus the largest transient
    traffic of any single op of the prefill (for naive attention this counts
    the score matrix's reads and writes, an upper bound on what is live).
    """
    weights = weight_bytes(model, precision)
    kv_per_token = kv_bytes_per_token(model, precision.kv, precision.group_size)
    # The last generated token is sampled, never fed back: its K/V are never written.
    kv = batch * model.cached_tokens(input_len + output_len - 1) * kv_per_token
    residual = batch * input_len * model.hidden_size * precision.act_bytes
    transient = max(avg(c.op.activation_bytes) for c in prefill_costs)
    activations = residual + transient
    return MemoryUse(weights=weights, kv_cache=kv, activations=activations,
                     capacity=device.main_memory.capacity)


def _does_not_fit(model: ModelSpec, device: Device, precision: Precision, batch: int,
                  input_len: int, output_len: int, memory: MemoryUse) -> DoesNotFitError:
    gb = 1e9
    over = memory.total - memory.capacity
    hints = []
    per_sequence = (memory.kv_cache + memory.activations) / batch
    room = memory.capacity - memory.weights
    if room > per_sequence:
        hints.append(f"batch <= {int(room // per_sequence)}")
    for dtype in ("fp8", "int4"):  # int8 is never smaller than fp8, so never the one that fits
        if dtypes.BITS[dtype] >= dtypes.BITS[precision.weight]:
            continue
        smaller = weight_bytes(model, Precision(weight=dtype, act=precision.act,
                                                group_size=precision.group_size))
        if smaller + memory.kv_cache + memory.activations <= memory.capacity:
            hints.append(f"--weight-dtype {dtype}")
            break
    devices = math.ceil(memory.total / memory.capacity)
    hints.append(f"at least {devices} devices with tensor or pipeline parallelism")
    return DoesNotFitError(
        f"{model.name} at batch {batch}, {input_len}+{output_len} tokens needs "
        f"{memory.total / gb:.1f} GB on {device.name} ({memory.capacity / gb:.1f} GB): "
        f"{over / gb:.1f} GB over (weights {memory.weights / gb:.1f} GB, "
        f"KV cache {memory.kv_cache / gb:.1f} GB, activations {memory.activations / gb:.1f} GB). "
        f"Would fit: {'; or '.join(hints)}",
        required_bytes=memory.total,
        capacity_bytes=memory.capacity,
    )


def estimate(
    model: str | Path | ModelSpec,
    hardware: str | Path | System | Device,
    batch: int = 1,
    input_len: int = 512,
    output_len: int = 128,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    act_dtype: str = "bf16",
    attention: AttentionImpl = "flash",
    group_size: int = dtypes.DEFAULT_GROUP_SIZE,
    decode_samples: int = 16,
    check_memory: bool = True,
) -> EstimateResult:
    """Predict latency, throughput, memory and energy of ``batch`` requests on one device.

    TTFT is the prefill step; TPOT the mean decode step over contexts
    ``input_len + 1 .. input_len + output_len - 1``; ``e2e = TTFT + (output_len - 1) * TPOT``;
    throughput is output tokens per second of e2e. Raises ``DoesNotFitError``
    when the weights, KV cache and activations exceed device memory (unless
    ``check_memory`` is false, which still reports the overrun in ``memory``).
    """
    spec = load_model(model)
    system = load_system(hardware)
    device = system.device
    batch = _positive_int(batch, "batch")
    input_len = _positive_int(input_len, "input_len")
    output_len = _positive_int(output_len, "output_len")
    _positive_int(group_size, "group_size")
    _positive_int(decode_samples, "decode_samples")
    if attention not in ("flash", "naive"):
        raise InferSimError(f"attention must be 'flash' or 'naive', got {attention!r}")
    precision = resolve_precision(device, weight_dtype, kv_dtype, act_dtype, group_size)
    warnings = []
    if input_len + output_len > spec.max_position_embeddings:
        warnings.append(
            f"context {input_len + output_len} exceeds {spec.name}'s max_position_embeddings "
            f"({spec.max_position_embeddings})"
        )

    prefill_ops = build_step(spec, StepShape("prefill", batch, input_len, float(input_len)),
                             precision, attention)
    prefill = _phase("prefill", cost_ops(prefill_ops, device))
    decode = None
    if output_len > 1:
        contexts = decode_contexts(input_len, output_len, decode_samples)
        decode_ops = build_step(spec, StepShape("decode", batch, 1, contexts), precision, attention)
        decode = _phase("decode", cost_ops(decode_ops, device))

    memory = memory_use(spec, device, precision, batch, input_len, output_len, prefill.costs)
    if check_memory and memory.total > memory.capacity:
        raise _does_not_fit(spec, device, precision, batch, input_len, output_len, memory)
    if memory.total > memory.capacity:
        warnings.append(f"needs {memory.total / 1e9:.1f} GB of {memory.capacity / 1e9:.1f} GB")

    return EstimateResult(
        model=spec.name,
        hardware=system.name,
        device=device.name,
        batch=batch,
        input_len=input_len,
        output_len=output_len,
        precision=precision,
        attention=attention,
        prefill=prefill,
        decode=decode,
        memory=memory,
        warnings=tuple(warnings),
    )
