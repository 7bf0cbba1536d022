"""Set up and run a serving simulation: replicas sized from the memory model, then the loop.

``serve(model, hardware, workload, ...)`` builds each replica's ``ReplicaCost`` and KV block
pool and runs ``loop.Simulation``. A replica's KV blocks are what its busiest device has left
of ``memory_fraction`` of its memory (vLLM's ``gpu_memory_utilization``) after its share of the
weights and the activations of the largest iteration, divided by that device's KV bytes per
token (its shard of the heads, its stage's layers).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path

from simulator.engine.blocks import BlockManager
from simulator.engine.loop import Replica, Simulation
from simulator.engine.records import ServeRecords
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.stepcost import ReplicaCost, power_capped
from simulator.engine.workload import Workload
from simulator.errors import DoesNotFitError, InferSimError
from simulator.estimate import resolve_precision, stage_weight_bytes
from simulator.graph.ops import avg
from simulator.graph.transformer import (
    AttentionImpl,
    Precision,
    StepShape,
    build_step,
    kv_bytes_per_token,
    weight_bytes,
)
from simulator.specs.hardware import System
from simulator.specs.loader import load_model, load_system
from simulator.specs.model import ModelSpec
from simulator.strategies.disaggregation import transfer_link
from simulator.strategies.parallel import ParallelPlan, workers_on_host
from simulator.strategies.speculative import Speculation


@dataclasses.dataclass(frozen=True)
class ReplicaMemory:
    capacity_bytes: float
    weight_bytes: float
    activation_bytes: float
    kv_bytes_per_token: float
    """Per device of the busiest stage."""
    kv_tokens: int


def replica_memory(model: ModelSpec, system: System, precision: Precision, plan: ParallelPlan | None,
                   max_tokens: int, memory_fraction: float) -> ReplicaMemory:
    device = system.device
    shard = plan.device_model(model) if plan is not None else model
    frac = plan.stage_layers(model) / model.num_layers if plan is not None else 1.0
    weights = weight_bytes(shard, precision)
    if plan is not None:
        weights = stage_weight_bytes(plan, model, weights, precision)
    ops = build_step(shard, StepShape("prefill", 1, max_tokens, float(max_tokens)), precision)
    activations = (max_tokens * model.hidden_size * precision.act_bytes
                   + max(avg(op.activation_bytes) for op in ops if not op.name.startswith("attention")))
    per_token = frac * kv_bytes_per_token(shard, precision.kv, precision.group_size, precision.kv_store)
    capacity = device.main_memory.capacity * memory_fraction
    free = capacity - weights - activations
    tokens = int(free // per_token) if free > 0 else 0
    return ReplicaMemory(capacity, weights, activations, per_token, tokens)


def _replica(index: int, pool: str, model: ModelSpec, system: System, precision: Precision,
             attention: AttentionImpl, plan: ParallelPlan | None, config: SchedulerConfig,
             max_context: int, memory_fraction: float, power_cap_w: float | None,
             step_overhead_s: float, requests: int, speculation: Speculation | None = None) -> Replica:
    if power_cap_w is not None:
        system = system.model_copy(update={"device": power_capped(system.device, power_cap_w)})
    if plan is not None and plan.devices > 1 and system.num_devices == 1 and system.device.type == "cpu":
        system = workers_on_host(system, plan.devices // plan.dp, plan.concurrent)
    if plan is not None:
        # Each iteration's batch goes through the stages as one micro-batch (the stages take
        # turns): an iteration's sequences change every step and need not split evenly.
        if plan.micro_batches not in (None, 1):
            raise InferSimError(f"the serving engine runs each iteration through the {plan.pp} pipeline "
                                "stages as one micro-batch; drop --micro-batches")
        single = dataclasses.replace(plan, dp=1, micro_batches=1)
        single.check(model, system, 1)
        plan = single
    gamma = speculation.gamma if speculation is not None else 0
    max_tokens = config.max_batch_tokens + config.max_batch * gamma
    memory = replica_memory(model, system, precision, plan, max_tokens, memory_fraction)
    draft = None
    if speculation is not None:
        if speculation.draft_hardware is not None:
            raise InferSimError("the serving engine runs the draft on the target's devices; drop "
                                "--draft-hardware")
        draft_spec = speculation.draft_model(model)
        if draft_spec.vocab_size != model.vocab_size:
            raise InferSimError(f"draft {draft_spec.name} has a vocabulary of {draft_spec.vocab_size}, "
                                f"the target {model.vocab_size}: they must share a tokenizer")
        draft = ReplicaCost(draft_spec, system, precision, attention, plan, max_tokens=max_tokens,
                            max_context=max_context + gamma + 1)
        if not speculation.self_draft:
            memory = dataclasses.replace(
                memory, weight_bytes=memory.weight_bytes + weight_bytes(draft_spec, precision),
                kv_tokens=int(max(0.0, memory.kv_tokens * memory.kv_bytes_per_token
                                  - weight_bytes(draft_spec, precision))
                              // (memory.kv_bytes_per_token + kv_bytes_per_token(
                                  draft_spec, precision.kv, precision.group_size))))
    blocks = memory.kv_tokens // config.block_size
    if blocks * config.block_size < max_context:
        raise DoesNotFitError(
            f"{model.name} on {system.name}: after {memory.weight_bytes / 1e9:.1f} GB of weights and "
            f"{memory.activation_bytes / 1e9:.2f} GB of activations per device, the KV cache holds "
            f"{memory.kv_tokens} tokens, fewer than the longest request ({max_context}); use more "
            "tensor parallelism (--tp), a smaller KV dtype (--kv-dtype), or shorter requests",
            memory.weight_bytes + memory.activation_bytes + max_context * memory.kv_bytes_per_token,
            memory.capacity_bytes)
    cost = ReplicaCost(model, system, precision, attention, plan, max_tokens=max_tokens,
                       max_context=max_context + gamma + 1, step_overhead_s=step_overhead_s)
    devices = plan.devices if plan is not None else 1
    link = system.links.host_device
    return Replica(index=index, pool=pool, cost=cost,
                   blocks=BlockManager(blocks, config.block_size, requests),
                   devices=devices, kv_bytes_per_token=memory.kv_bytes_per_token,
                   idle_power_w=system.device.power.idle * devices,
                   swap_rate=link.rate if link is not None else None, draft=draft)


def serve(
    model: str | Path | ModelSpec,
    hardware: str | Path | System,
    workload: Workload,
    scheduler: SchedulerConfig | None = None,
    weight_dtype: str = "bf16",
    kv_dtype: str | None = None,
    act_dtype: str = "bf16",
    attention: AttentionImpl = "flash",
    parallel: ParallelPlan | None = None,
    router: str = "least-tokens",
    prefill_hardware: str | Path | System | None = None,
    decode_hardware: str | Path | System | None = None,
    prefill_replicas: int = 1,
    decode_replicas: int = 1,
    kv_link: str | None = None,
    power_cap_w: float | None = None,
    memory_fraction: float = 0.9,
    step_overhead_s: float = 0.0,
    speculative: Speculation | None = None,
    seed: int = 0,
    fast_forward: bool = True,
    workers: int = 1,
) -> ServeRecords:
    """Simulate serving ``workload``; per-request and per-iteration records.

    ``parallel.dp`` replicas of the plan's other degrees (one replica without a plan) serve
    mixed batches; with ``prefill_hardware`` or ``decode_hardware`` the prefill and decode pools
    (``prefill_replicas`` and ``decode_replicas`` replicas, each of the plan) run on their
    own systems and each request's KV cache crosses ``kv_link`` (a link name of the prefill
    system or a bandwidth) from the prefill replica that computed it to a decode replica.
    ``speculative``: every decode iteration drafts ``gamma`` tokens per request on the draft
    model and verifies them on the target; the accepted count is drawn from ``seed``.
    ``fast_forward=False`` steps through decode-only stretches one iteration at a time and every
    replica in one event loop (the same records, slower; for checking). ``workers > 1``: mixed
    replicas under round-robin (which share nothing) run in that many forked processes (the
    same records; one after another where processes cannot fork).
    """
    scheduler = scheduler or SchedulerConfig()
    spec = load_model(model)
    system = load_system(hardware)
    if not 0 < memory_fraction <= 1:
        raise InferSimError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    if len(workload) == 0:
        raise InferSimError("the workload has no requests")
    plan = parallel if parallel is not None and parallel.active else None
    longest = int((workload.prompt_tokens + workload.output_tokens).max())
    if longest > spec.max_position_embeddings:
        raise InferSimError(f"a request of {longest} tokens exceeds {spec.name}'s "
                            f"max_position_embeddings ({spec.max_position_embeddings}); clip the "
                            "workload's lengths (--max-input-len/--max-output-len)")
    if scheduler.policy != "chunked" and int(workload.prompt_tokens.max()) > scheduler.max_batch_tokens:
        raise InferSimError(f"a prompt of {int(workload.prompt_tokens.max())} tokens exceeds "
                            f"--max-batch-tokens {scheduler.max_batch_tokens}; raise it or use "
                            "--scheduler chunked")
    max_context = longest + 1
    precision = resolve_precision(system.device, weight_dtype, kv_dtype, act_dtype, 128)

    def build(pool: str, target: System, count: int, first: int) -> list[Replica]:
        one = _replica(first, pool, spec, target, precision, attention, plan, scheduler, max_context,
                       memory_fraction, power_cap_w, step_overhead_s, len(workload), speculative)
        # The pool's replicas are alike: they share the cost tables (read only), not the state.
        return [one] + [dataclasses.replace(one, index=first + i, running=[], waiting=deque(),
                                            blocks=BlockManager(one.blocks.total, one.blocks.block_size,
                                                                len(workload)))
                        for i in range(1, count)]

    if prefill_hardware is None and decode_hardware is None:
        if kv_link is not None:
            raise InferSimError("--kv-link names the link between prefill and decode pools; it needs "
                                "--prefill-hardware or --decode-hardware")
        replicas = build("mixed", system, plan.dp if plan is not None else 1, 0)
        return Simulation(workload, replicas, scheduler, router, speculation=speculative, seed=seed,
                          fast_forward=fast_forward, workers=workers).run()
    pre = load_system(prefill_hardware or system)
    dec = load_system(decode_hardware or system)
    for name, count in (("prefill replicas", prefill_replicas), ("decode replicas", decode_replicas)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InferSimError(f"{name} must be a positive integer, got {count!r}")
    link = transfer_link(pre, kv_link)
    replicas = build("prefill", pre, prefill_replicas, 0) + build("decode", dec, decode_replicas,
                                                                  prefill_replicas)
    return Simulation(workload, replicas, scheduler, router, kv_link_rate=link.rate,
                      kv_link_latency=link.latency, speculation=speculative, seed=seed,
                      fast_forward=fast_forward, workers=workers).run()
