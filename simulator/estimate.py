"""One request shape on one device: prefill, decode, memory, energy.

``estimate`` builds the prefill step and the decode step (sampled over the
growing context), costs every op on the roofline, checks memory against the
device's capacity, and returns an ``EstimateResult``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
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
    embedding_bytes,
    held_tokens,
    kv_bytes_per_token,
    weight_bytes,
)
from simulator.result import EstimateResult, MemoryUse, PhaseResult
from simulator.specs.hardware import Device, System
from simulator.specs.loader import load_model, load_system
from simulator.specs.model import ModelSpec
from simulator.strategies.flash import FlashPlan
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan, cost_on_host, step_time, tier_memory
from simulator.strategies.parallel import ParallelPlan, workers_on_host
from simulator.strategies.parallel import step_time as parallel_step_time
from simulator.strategies.speculative import Speculation, break_even_alpha


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
               input_len: int, output_len: int, prefill_costs: list[OpCost],
               kept_model: ModelSpec | None = None, samples: int = 1) -> MemoryUse:
    """Weights, KV cache for the whole sequence, and the largest live activation set.

    With ``samples`` parallel samples per request the cache holds each prompt once and every
    sample's generated tokens (``held_tokens``).

    Activations: the residual stream of the prefill plus the largest transient
    traffic of any single op of the prefill (for naive attention this counts
    the score matrix's reads and writes, an upper bound on what is live).
    ``kept_model`` is the model as a KV eviction policy leaves it (a window of
    kept tokens): the cache holds that many tokens, and the prefill holds one
    layer's whole prompt before evicting.
    """
    kept = kept_model or model
    weights = weight_bytes(model, precision)
    kv_per_token = kv_bytes_per_token(model, precision.kv, precision.group_size, precision.kv_store)
    # The last generated token is sampled, never fed back: its K/V are never written.
    prompt, generated = held_tokens(kept, input_len, output_len)
    tokens = prompt + samples * generated
    kv = batch * tokens * kv_per_token
    if precision.kv_residual:  # KIVI's recent tokens of each sample in the activation dtype
        extra = model.kv_elements_per_token() * (precision.act_bytes - precision.kv_bytes)
        recent = min(prompt + generated, precision.kv_residual)
        own = min(recent, generated)
        kv += batch * (recent - own + samples * own) * max(extra, 0.0)
    residual = batch * input_len * model.hidden_size * precision.act_bytes
    transient = max(avg(c.op.activation_bytes) for c in prefill_costs)
    evicted = batch * max(0.0, input_len - kept.cached_tokens(input_len)) * kv_per_token / model.num_layers
    activations = residual + transient + evicted
    return MemoryUse(weights=weights, kv_cache=kv, activations=activations,
                     capacity=device.main_memory.capacity)


StepRunner = Callable[..., PhaseResult]
"""``(name, model, shape, extra_ops=None) -> PhaseResult``: one step under the estimate's plan."""


def _offloaded(phase: PhaseResult, plan: OffloadPlan, system: System, model: ModelSpec,
               ops: list) -> PhaseResult:
    """The phase under an offload plan (off-device layers costed on the host with host compute)."""
    host = cost_on_host(ops, system) if plan.host_compute and plan.weights_off > 0 else None
    step = step_time(plan, system, model, ops, phase.costs, host)
    # While the device waits on a transfer it idles.
    wait = max(0.0, step.time_s - phase.time_s - step.host_compute_s)
    energy = phase.energy_j + wait * system.device.power.idle
    return dataclasses.replace(phase, time_s=step.time_s, energy_j=energy, bound=step.bound,
                               compute_s=step.device_compute_s + step.host_compute_s,
                               transfers_s=step.transfers_s)


def _speculate(speculation: Speculation, spec: ModelSpec, kept_model: ModelSpec, system: System,
               precision: Precision, attention: AttentionImpl, batch: int, input_len: int, output_len: int,
               contexts: np.ndarray, plain: PhaseResult, run_step: StepRunner,
               dtypes_given: tuple, samples: int = 1) -> tuple[PhaseResult, dict, tuple[float, float]]:
    """The decode phase under speculation: (gamma draft steps + one verification) / expected tokens.
    ``batch`` prompts, each decoding ``samples`` streams (drafted and verified alike)."""
    draft = speculation.draft_model(spec)
    if draft.vocab_size != spec.vocab_size:
        raise InferSimError(f"the draft {draft.name} has a vocabulary of {draft.vocab_size} tokens and the "
                            f"target {spec.name} {spec.vocab_size}: speculative decoding needs the same one")
    draft_system = load_system(speculation.draft_hardware) if speculation.draft_hardware else system
    weight_dtype, kv_dtype, act_dtype, group_size = dtypes_given
    draft_precision = resolve_precision(draft_system.device, weight_dtype, kv_dtype, act_dtype, group_size)
    gamma = speculation.gamma
    streams = batch * samples
    draft_ops = build_step(draft, StepShape("decode", streams, 1, contexts), draft_precision, attention)
    draft_step = _phase("draft", cost_ops(draft_ops, draft_system.device))
    # A separate draft reads the prompt too before its first round; a self-draft uses the
    # target's cache.
    draft_prefill = 0.0 if speculation.self_draft else _phase("draft prefill", cost_ops(build_step(
        draft, StepShape("prefill", batch, input_len, float(input_len)), draft_precision, attention),
        draft_system.device)).time_s
    verify_shape = StepShape("decode", streams, gamma + 1, contexts + gamma, logits=gamma + 1)
    verify = run_step("decode", kept_model, verify_shape)
    tokens = speculation.expected_tokens()
    round_s = gamma * draft_step.time_s + verify.time_s
    per_token = round_s / tokens
    phase = dataclasses.replace(verify, time_s=per_token,
                                energy_j=(gamma * draft_step.energy_j + verify.energy_j) / tokens)
    info = {
        "draft_prefill_s": draft_prefill,
        "draft": draft.name, "draft_device": draft_system.device.name, "gamma": gamma,
        "alpha": speculation.alpha if speculation.profile is None else None,
        "profile": list(speculation.profile) if speculation.profile is not None else None,
        "expected_tokens_per_round": tokens, "draft_step_s": draft_step.time_s,
        "verify_step_s": verify.time_s, "round_s": round_s, "time_per_token_s": per_token,
        "plain_tpot_s": plain.time_s, "speedup": plain.time_s / per_token,
        "pays": per_token < plain.time_s,
        "break_even_alpha": break_even_alpha(gamma, round_s, plain.time_s),
    }
    same_device = draft_system.device == system.device and draft_system.name == system.name
    info["draft_device_shared"] = same_device
    memory = (0.0, 0.0)
    if same_device:
        prompt, generated = held_tokens(draft, input_len, output_len)
        kv = batch * (prompt + samples * generated) * kv_bytes_per_token(
            draft, draft_precision.kv, draft_precision.group_size)
        memory = (0.0 if speculation.self_draft else weight_bytes(draft, draft_precision), kv)
    return phase, info, memory


def _tier_does_not_fit(model: ModelSpec, system: System, tiers: dict, plan: OffloadPlan,
                       batch: int) -> DoesNotFitError | None:
    gb = 1e9
    advice = {
        "device": "Offload more weights (--offload-weights host=F) or KV (--offload-kv host=F), "
                  "lower the batch, or use a smaller dtype",
        "host": "Put part of the weights on disk (--offload-weights disk=F) or keep more on the device",
        "disk": "Keep more weights in memory or use a larger drive",
    }
    for name, tier in tiers.items():
        if not tier.fits:
            parts = ", ".join(f"{k} {v / gb:.1f} GB" for k, v in tier.parts.items() if v)
            return DoesNotFitError(
                f"{model.name} at batch {batch} under this offload plan needs {tier.used / gb:.1f} GB "
                f"of {name} memory on {system.name} ({tier.capacity / gb:.1f} GB): "
                f"{(tier.used - tier.capacity) / gb:.1f} GB over ({parts}). {advice[name]}",
                required_bytes=tier.used, capacity_bytes=tier.capacity)
    return None


def stage_weight_bytes(plan: ParallelPlan, model: ModelSpec, shard_weights: float,
                       precision: Precision) -> float:
    """Weights on one device of the busiest stage, from its shard's weights over all layers: the
    stage's share of the layers, plus the embedding and the head (the larger of the two when
    pipeline stages split them)."""
    frac = plan.stage_layers(model) / model.num_layers
    embed = model.embedding_params() * precision.act_bytes
    head = model.lm_head_params() * precision.act_bytes
    outside = embed + head if plan.pp == 1 else max(embed, head)
    return frac * (shard_weights - embed - head) + outside


def parallel_memory(plan: ParallelPlan, model: ModelSpec, kept_model: ModelSpec, device: Device,
                    precision: Precision, batch: int, input_len: int, output_len: int,
                    prefill_costs: list[OpCost], samples: int = 1) -> MemoryUse:
    """One device of the busiest stage: its shard of the stage's layers, the embedding or the head
    (the larger, or both without pipeline stages), and the KV cache of its attention group's
    sequences for the stage's layers."""
    shard, kept = plan.device_model(model), plan.device_model(kept_model)
    sequences = batch // (plan.dp * plan.attention_groups)
    use = memory_use(shard, device, precision, sequences, input_len, output_len, prefill_costs, kept, samples)
    frac = plan.stage_layers(model) / model.num_layers
    return dataclasses.replace(use, weights=stage_weight_bytes(plan, model, use.weights, precision),
                               kv_cache=frac * use.kv_cache)


def _flash_memory(memory: MemoryUse, flash: FlashPlan, model: ModelSpec, system: System,
                  precision: Precision, batch: int) -> MemoryUse:
    """Memory holds all but the FFN weights, plus the window's neurons (of a decode step of
    ``batch`` streams); the drive the FFNs."""
    ffn = flash.ffn_bytes(model, precision.weight_bytes)
    cached = min(1.0, flash.active_share(batch) * max(flash.window, 1)) * ffn
    assert system.storage is not None
    if ffn > system.storage.capacity:
        raise DoesNotFitError(f"{model.name}'s FFN weights ({ffn / 1e9:.1f} GB) exceed the drive of "
                              f"{system.name} ({system.storage.capacity / 1e9:.1f} GB)",
                              required_bytes=ffn, capacity_bytes=system.storage.capacity)
    return dataclasses.replace(memory, weights=memory.weights - ffn + cached)


def _parallel_does_not_fit(model: ModelSpec, device: Device, plan: ParallelPlan, batch: int,
                           memory: MemoryUse) -> DoesNotFitError:
    gb = 1e9
    return DoesNotFitError(
        f"{model.name} at batch {batch} with tp={plan.tp} pp={plan.pp} ep={plan.ep} dp={plan.dp} needs "
        f"{memory.total / gb:.1f} GB per device on {device.name} ({memory.capacity / gb:.1f} GB): weights "
        f"{memory.weights / gb:.1f} GB, KV cache {memory.kv_cache / gb:.1f} GB, activations "
        f"{memory.activations / gb:.1f} GB. Raise --tp or --pp (each device then holds less of the "
        f"weights and KV cache), lower the batch, or use a smaller dtype",
        required_bytes=memory.total, capacity_bytes=memory.capacity)


def smaller_weights(model: ModelSpec, precision: Precision) -> dict[str, float]:
    """Weight bytes in each dtype ``_does_not_fit`` may suggest (fewer bits than the current ones)."""
    # int8 is never smaller than fp8, so never the one that fits
    return {dtype: weight_bytes(model, Precision(weight=dtype, act=precision.act,
                                                 group_size=precision.group_size))
            for dtype in ("fp8", "int4") if dtypes.BITS[dtype] < dtypes.BITS[precision.weight]}


def _does_not_fit(model: ModelSpec, device: Device, precision: Precision, batch: int,
                  input_len: int, output_len: int, memory: MemoryUse,
                  smaller: dict[str, float] | None = None, samples: int = 1) -> DoesNotFitError:
    """The error and its hints; ``smaller`` is ``smaller_weights(model, precision)`` when the caller
    (a sweep, for many batches) has it already."""
    gb = 1e9
    over = memory.total - memory.capacity
    hints = []
    per_sequence = (memory.kv_cache + memory.activations) / batch
    room = memory.capacity - memory.weights
    if room > per_sequence:
        hints.append(f"batch <= {int(room // per_sequence)}")
    for dtype, size in (smaller_weights(model, precision) if smaller is None else smaller).items():
        if size + memory.kv_cache + memory.activations <= memory.capacity:
            hints.append(f"--weight-dtype {dtype}")
            break
    devices = math.ceil(memory.total / memory.capacity)
    hints.append(f"at least {devices} devices with tensor or pipeline parallelism")
    shape = f"batch {batch}" + (f" x {samples} samples" if samples > 1 else "")
    return DoesNotFitError(
        f"{model.name} at {shape}, {input_len}+{output_len} tokens needs "
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
    offload: OffloadPlan | None = None,
    kv_policy: KVPolicy | None = None,
    kv_residual: int = 0,
    kv_store: str = "kv",
    speculative: Speculation | None = None,
    parallel: ParallelPlan | None = None,
    prefill_hardware: str | Path | System | None = None,
    decode_hardware: str | Path | System | None = None,
    kv_link: str | None = None,
    flash: FlashPlan | None = None,
    samples: int = 1,
    weight_dequant: str = "fused",
) -> EstimateResult:
    """Predict latency, throughput, memory and energy of ``batch`` requests on one device.

    TTFT is the prefill step; TPOT the mean decode step over contexts
    ``input_len + 1 .. input_len + output_len - 1``; ``e2e = TTFT + (output_len - 1) * TPOT``;
    throughput is output tokens per second of e2e. ``samples`` parallel samples per request
    (best-of-N, self-consistency) share the prompt: one prefill per request, ``batch * samples``
    decode streams, each reading its whole context, and a KV cache holding each prompt once
    (``docs/model.md``, test-time compute). Raises ``DoesNotFitError``
    when the weights, KV cache and activations exceed device memory (unless
    ``check_memory`` is false, which still reports the overrun in ``memory``).

    ``offload`` spreads weights and KV cache over device, host and disk
    (``simulator.strategies.offload``); ``kv_policy`` evicts KV tokens beyond a
    budget (``simulator.strategies.kv``); ``kv_residual`` keeps that many recent
    tokens in the activation dtype when ``kv_dtype`` is quantized (KIVI); ``parallel``
    splits the model over the system's devices (``simulator.strategies.parallel``): times are
    then the whole step's, memory the busiest device's, and throughput all replicas'.
    ``prefill_hardware``/``decode_hardware`` run the two phases on separate pools (each defaults
    to ``hardware``) with the KV cache sent over ``kv_link``
    (``simulator.strategies.disaggregation``). ``flash`` keeps the FFN weights on the drive
    and reads only the neurons a step activates (LLM in a flash, ``simulator.strategies.flash``).
    ``weight_dequant="separate"`` dequantizes integer weights in a kernel of their own before
    each GEMM (FlexGen, eager frameworks) instead of inside it.
    """
    if prefill_hardware is not None or decode_hardware is not None:
        from simulator.strategies.disaggregation import estimate_disaggregated

        return estimate_disaggregated(
            model, prefill_hardware or hardware, decode_hardware or hardware, kv_link,
            batch=batch, input_len=input_len, output_len=output_len, weight_dtype=weight_dtype,
            kv_dtype=kv_dtype, act_dtype=act_dtype, attention=attention, group_size=group_size,
            decode_samples=decode_samples, check_memory=check_memory, offload=offload,
            kv_policy=kv_policy, kv_residual=kv_residual, kv_store=kv_store, speculative=speculative,
            parallel=parallel, flash=flash, samples=samples, weight_dequant=weight_dequant)
    if kv_link is not None:
        raise InferSimError("--kv-link names the link between prefill and decode pools; it needs "
                            "--prefill-hardware or --decode-hardware")
    spec = load_model(model)
    system = load_system(hardware)
    device = system.device
    batch = _positive_int(batch, "batch")
    input_len = _positive_int(input_len, "input_len")
    output_len = _positive_int(output_len, "output_len")
    _positive_int(group_size, "group_size")
    _positive_int(decode_samples, "decode_samples")
    samples = _positive_int(samples, "samples (--samples: parallel samples per prompt)")
    if attention not in ("flash", "naive"):
        raise InferSimError(f"attention must be 'flash' or 'naive', got {attention!r}")
    precision = resolve_precision(device, weight_dtype, kv_dtype, act_dtype, group_size)
    if isinstance(kv_residual, bool) or not isinstance(kv_residual, (int, np.integer)) or kv_residual < 0:
        raise InferSimError(f"kv_residual must be a whole number of tokens, at least 0; got {kv_residual!r}")
    if kv_residual:
        precision = dataclasses.replace(precision, kv_residual=int(kv_residual))
    if kv_store not in ("kv", "x"):
        raise InferSimError(f"kv_store must be 'kv' (cache K and V) or 'x' (XQuant: cache the layer "
                            f"input and recompute K and V), got {kv_store!r}")
    if weight_dequant not in ("fused", "separate"):
        raise InferSimError(f"weight_dequant must be 'fused' (inside the GEMM) or 'separate' (a kernel "
                            f"of its own before it), got {weight_dequant!r}")
    if weight_dequant == "separate":
        precision = dataclasses.replace(precision, weight_dequant="separate")
    if kv_store == "x":
        if spec.mla is not None:
            raise InferSimError(f"{spec.name} uses MLA, whose latent cache already is a compressed input; "
                                "XQuant (--kv-store x) applies to MHA/GQA models")
        precision = dataclasses.replace(precision, kv_store="x")
    policy = kv_policy or KVPolicy()
    plan = offload if offload is not None and (offload.active or offload.host_compute) else None
    warnings = []
    if input_len + output_len > spec.max_position_embeddings:
        warnings.append(
            f"context {input_len + output_len} exceeds {spec.name}'s max_position_embeddings "
            f"({spec.max_position_embeddings})"
        )

    par = parallel if parallel is not None and parallel.active else None
    if par is not None:
        if plan is not None:
            raise InferSimError("offloading under a parallel plan is not modelled; use one or the other")
        if system.num_devices == 1 and device.type == "cpu" and par.devices > 1:
            system = workers_on_host(system, par.devices, par.concurrent)
            device = system.device
        par.check(spec, system, batch)
    if flash is not None:
        if par is not None or plan is not None:
            raise InferSimError("flash-backed FFNs are modelled on one device without an offload or "
                                "parallel plan; use one strategy at a time")
        flash.check(spec, system)
    flash_reads: dict[str, dict] = {}

    def run_step(name: str, model: ModelSpec, shape: StepShape,
                 extra_ops: Callable[[ModelSpec, int], list] | None = None) -> PhaseResult:
        if par is None:
            ops = build_step(model, shape, precision, attention)
            if extra_ops is not None:
                ops += extra_ops(model, shape.batch)
            if flash is not None:
                return _flashed(name, flash, model, shape, ops)
            phase = _phase(name, cost_ops(ops, device))
            return _offloaded(phase, plan, system, spec, ops) if plan is not None else phase
        local = dataclasses.replace(shape, batch=par.batch_per_device(shape.batch))
        device_model = par.device_model(model)
        ops = build_step(device_model, local, precision, attention,
                         par.expert_shard(model, local.tokens * par.attention_groups))
        if extra_ops is not None:
            ops += extra_ops(device_model, local.batch)
        costs = cost_ops(ops, device)
        step = parallel_step_time(par, system, model, local.tokens, precision.act_bytes, costs, shape.phase)
        return PhaseResult(phase=name, time_s=step.time_s, energy_j=step.energy_j, bound=step.bound,
                           costs=costs, compute_s=step.compute_s, communication_s=step.communication_s,
                           collectives=step.collectives)

    def _flashed(name: str, flash: FlashPlan, model: ModelSpec, shape: StepShape, ops: list) -> PhaseResult:
        assert flash is not None
        ops = flash.apply(ops, model, shape.tokens, precision.weight_bytes, precision.act_bytes,
                          precision.compute)
        phase = _phase(name, cost_ops(ops, device))
        reads = flash.read_s(model, system, shape.tokens, precision.weight_bytes,
                             cold=shape.phase == "prefill")
        flash_reads[name] = reads
        bound = "flash read" if reads["time_s"] > phase.time_s else phase.bound
        return dataclasses.replace(phase, time_s=phase.time_s + reads["time_s"], bound=bound,
                                   compute_s=phase.time_s, transfers_s={"flash_read": reads["time_s"]},
                                   energy_j=phase.energy_j + reads["time_s"] * device.power.idle)

    prefill = run_step("prefill", spec, StepShape("prefill", batch, input_len, float(input_len)))
    kept_model = policy.decode_model(spec, input_len, output_len)
    decode = None
    if output_len > 1:
        contexts = decode_contexts(input_len, output_len, decode_samples)
        decode = run_step("decode", kept_model, StepShape("decode", batch * samples, 1, contexts),
                          lambda model, rows: policy.extra_ops(
                              model, rows, kept_model.cached_tokens(contexts), precision.act))

    spec_info, draft_memory = None, (0.0, 0.0)
    if speculative is not None and decode is not None:
        decode, spec_info, draft_memory = _speculate(
            speculative, spec, kept_model, system, precision, attention, batch, input_len, output_len,
            contexts, decode, run_step, (weight_dtype, kv_dtype, act_dtype, group_size), samples)
        # The draft's prefill follows the target's on a shared device, runs beside it on its own.
        ttft = (prefill.time_s + spec_info["draft_prefill_s"] if spec_info["draft_device_shared"]
                else max(prefill.time_s, spec_info["draft_prefill_s"]))
        prefill = dataclasses.replace(prefill, time_s=ttft)
        if not spec_info["pays"]:
            even = spec_info["break_even_alpha"]
            warnings.append(
                f"speculation is slower than plain decoding ({spec_info['time_per_token_s'] * 1e3:.3g} ms "
                f"vs {spec_info['plain_tpot_s'] * 1e3:.3g} ms per token); "
                + (f"it pays above alpha = {even:.2f}" if even is not None else
                   f"no acceptance rate makes gamma = {speculative.gamma} pay at batch {batch}"))

    if par is None:
        memory = memory_use(spec, device, precision, batch, input_len, output_len, prefill.costs, kept_model,
                            samples)
        if flash is not None:
            memory = _flash_memory(memory, flash, spec, system, precision, batch * samples)
    else:
        memory = parallel_memory(par, spec, kept_model, device, precision, batch, input_len, output_len,
                                 prefill.costs, samples)
    if draft_memory != (0.0, 0.0):
        memory = dataclasses.replace(memory, weights=memory.weights + draft_memory[0],
                                     kv_cache=memory.kv_cache + draft_memory[1])
    if plan is not None:
        embed = embedding_bytes(spec, precision)
        experts = 0.0
        if spec.moe is not None:
            experts = (spec.num_moe_layers * spec.moe.num_experts
                       * spec.ffn_params(spec.moe.expert_intermediate_size) * precision.weight_bytes)
        tiers = tier_memory(plan, system, spec, memory.weights - embed, embed, memory.kv_cache,
                            memory.activations, experts)
        memory = dataclasses.replace(memory, tiers=tiers)
        problem = _tier_does_not_fit(spec, system, tiers, plan, batch)
        if problem is not None and check_memory:
            raise problem
        if problem is not None:
            warnings.append(str(problem).split(":")[0])
    elif check_memory and memory.total > memory.capacity and par is not None:
        raise _parallel_does_not_fit(spec, device, par, batch, memory)
    elif check_memory and memory.total > memory.capacity:
        raise _does_not_fit(spec, device, precision, batch, input_len, output_len, memory, samples=samples)
    elif memory.total > memory.capacity:
        warnings.append(f"needs {memory.total / 1e9:.1f} GB of {memory.capacity / 1e9:.1f} GB")
    strategy: dict = {}
    if plan is not None:
        strategy["offload"] = plan.to_dict()
    if policy.evicts:
        strategy["kv_policy"] = {"kind": policy.kind, "budget_tokens": kept_model.sliding_window,
                                 "sinks": policy.sinks if policy.kind == "streaming" else 0}
    if kv_residual:
        strategy["kv_residual_tokens"] = int(kv_residual)
    if spec_info is not None:
        strategy["speculative"] = spec_info
    if par is not None:
        strategy["parallel"] = {**par.to_dict(), "system": system.name, "device": device.name,
                                "memory": "per device (the busiest stage's)"}
    if flash is not None:
        strategy["flash"] = {**flash.to_dict(), "reads_per_step": flash_reads}
    if kv_store == "x":
        strategy["kv_store"] = "x (XQuant: layer input cached, K and V recomputed)"
    if weight_dequant == "separate" and precision.weight.startswith("int"):
        strategy["weight_dequant"] = "separate (a dequantization kernel before each GEMM)"

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
        strategy=strategy or None,
        samples=samples,
    )
