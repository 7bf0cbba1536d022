"""Parallel plans: tensor, pipeline, expert and data parallelism over a system's devices.

Devices are laid out innermost first: ``tp`` shards of one attention group, ``ep / tp`` attention
groups sharing the experts of one pipeline stage, ``pp`` stages, ``dp`` replicas::

    devices = stage_devices * pp * dp,   stage_devices = ep if ep > 1 else tp

- **Tensor parallelism** (Megatron): a shard holds ``1/tp`` of the heads, KV heads (replicated
  when fewer than shards), FFN width and, without EP, expert width; two all-reduces of the
  hidden state per layer (after the output and down projections). With ``sequence_parallel``
  each is a reduce-scatter plus an all-gather, and the norms and residual adds between them
  run on ``1/tp`` of the tokens.
- **Expert parallelism**: a device of the stage holds ``E / ep`` whole experts; attention is
  data-parallel over ``ep / tp`` groups (the batch split between them). Per MoE layer an
  all-to-all dispatches each token's ``top_k`` rows to the experts' owners and another combines
  them back. Routing is uneven: the busiest device receives ``imbalance`` times the mean,
  by default the expected maximum of a balls-in-bins draw,
  ``1 + sqrt(2 ln(ep) / mean)`` for ``mean`` rows per device (at most ``ep``), and sets the time.
  MoE layers under EP keep one all-reduce (after attention) when ``tp > 1``.
- **Pipeline parallelism**: stages of ``ceil(L / pp)`` layers (the busiest), the embedding
  on the first and the head on the last; the batch runs as ``micro_batches`` micro-batches
  (default ``pp``), each stage sending the hidden state on. With a micro-batch's time through
  all stages ``S``, the longest stage ``s`` and one send ``c``, a prefill takes
  ``S + (m - 1) s + (pp - 1) c`` (GPipe's bubble) and a decode step ``max(m s, S + pp c)``:
  in steady state the micro-batches keep every stage busy, unless there are fewer of them than
  stages, when each token's round trip through the stages binds. With ``schedule="gpipe"``
  every decode step drains the pipeline as the prefill does: ``S + (m - 1) s + pp c``.
- **Data parallelism**: ``dp`` independent replicas, each with ``batch / dp`` sequences.

Communication overlaps compute by the plan's ``overlap`` (0 none, 0.5 partial as TokenWeave
and NanoFlow split batches to hide it, 1 full): a stage's time is
``compute + comm - overlap * min(comm, compute)``.

Equations in ``docs/model.md`` (Parallelism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.cost.collectives import collective_time_s
from simulator.cost.roofline import OpCost
from simulator.errors import InferSimError
from simulator.graph.ops import avg
from simulator.graph.transformer import ExpertShard
from simulator.specs.hardware import CollectiveSpec, Link, MeasuredCollective, System, SystemLinks
from simulator.specs.model import ModelSpec
from simulator.strategies.offload import NON_LAYER_OPS

OVERLAP_LEVELS = {"none": 0.0, "partial": 0.5, "full": 1.0}
WORKER_KINDS = ("gemm", "gemv")
FIRST_STAGE_OPS = frozenset({"embedding", "position_embedding"})
LAST_STAGE_OPS = frozenset({"final_norm", "lm_head", "sampling"})
assert FIRST_STAGE_OPS | LAST_STAGE_OPS == NON_LAYER_OPS  # the ops outside the repeated layers
# Under sequence parallelism these run on 1/tp of the tokens between the reduce-scatter and
# the all-gather.
SEQUENCE_SPLIT_OPS = frozenset({"input_norm", "post_attention_norm", "residual_add"})


def shard_for_tp(model: ModelSpec, tp: int, experts_whole: bool = False) -> ModelSpec:
    """The shape one of ``tp`` tensor-parallel shards computes (``experts_whole``: EP keeps
    each expert on one device, unsharded)."""
    if tp < 1:
        raise InferSimError(f"tensor-parallel degree must be >= 1, got {tp}")
    if tp == 1:
        return model
    heads = model.num_attention_heads
    if heads % tp:
        raise InferSimError(f"tp={tp} does not divide {model.name}'s {heads} attention heads; "
                            f"choose a divisor of {heads}")
    kv = model.kv_heads
    if kv % tp and tp % kv:
        raise InferSimError(f"tp={tp} neither divides nor is a multiple of {model.name}'s {kv} KV heads")
    inter = model.ffn.intermediate_size
    if inter % tp and model.num_dense_layers:
        raise InferSimError(f"tp={tp} does not divide {model.name}'s FFN width {inter}")
    update: dict = {
        "num_attention_heads": heads // tp,
        "num_kv_heads": max(kv // tp, 1),
        "head_dim": model.head_size if model.mla is None else None,
        "ffn": model.ffn.model_copy(update={"intermediate_size": inter // tp}),
    }
    if model.moe is not None:
        moe = model.moe
        width = moe.expert_intermediate_size
        if not experts_whole and width % tp:
            raise InferSimError(f"tp={tp} does not divide {model.name}'s expert width {width}")
        update["moe"] = moe.model_copy(update={
            "expert_intermediate_size": width if experts_whole else width // tp,
            "shared_expert_intermediate_size": (
                moe.shared_intermediate // tp if moe.num_shared_experts else None),
        })
    return model.model_copy(update=update)


def _degree(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InferSimError(f"--{name} must be a whole number of devices, at least 1; got {value!r}")
    return int(value)


def parse_overlap(value: float | str) -> float:
    """``none``/``partial``/``full`` or a share from 0 to 1."""
    if isinstance(value, str):
        if value in OVERLAP_LEVELS:
            return OVERLAP_LEVELS[value]
        try:
            value = float(value)
        except ValueError:
            raise InferSimError(f"--overlap must be none, partial, full or a share from 0 to 1; "
                                f"got {value!r}") from None
    if isinstance(value, bool) or not 0.0 <= float(value) <= 1.0:
        raise InferSimError(f"--overlap must be none, partial, full or a share from 0 to 1; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ParallelPlan:
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    micro_batches: int | None = None
    """Pipeline micro-batches per step; ``None``: one per stage."""
    overlap: float | str = "none"
    sequence_parallel: bool = False
    expert_imbalance: float | None = None
    """The busiest expert-parallel device's routed rows over the mean; ``None``: balls in bins."""
    schedule: str = "interleaved"
    """Pipeline decode: ``interleaved`` micro-batches run as independent streams, keeping every
    stage busy (serving engines); ``gpipe`` drains the pipeline every step (the executor)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep", "dp"):
            object.__setattr__(self, name, _degree(getattr(self, name), name))
        if self.micro_batches is not None:
            object.__setattr__(self, "micro_batches", _degree(self.micro_batches, "micro-batches"))
        object.__setattr__(self, "overlap", parse_overlap(self.overlap))
        if self.expert_imbalance is not None and not 1.0 <= self.expert_imbalance <= self.ep:
            raise InferSimError(f"expert imbalance is the busiest device's load over the mean: between 1 "
                                f"and ep = {self.ep}; got {self.expert_imbalance}")
        if self.schedule not in ("interleaved", "gpipe"):
            raise InferSimError(f"--pp-schedule must be interleaved or gpipe, got {self.schedule!r}")
        if self.ep > 1 and self.ep % self.tp:
            raise InferSimError(f"ep={self.ep} must be a multiple of tp={self.tp}: the experts of a stage "
                                "spread over its tensor-parallel groups")

    @property
    def stage_devices(self) -> int:
        return self.ep if self.ep > 1 else self.tp

    @property
    def attention_groups(self) -> int:
        """Data-parallel attention groups within a stage (expert parallelism beyond tp)."""
        return self.ep // self.tp if self.ep > 1 else 1

    @property
    def replica_devices(self) -> int:
        return self.stage_devices * self.pp

    @property
    def devices(self) -> int:
        return self.replica_devices * self.dp

    @property
    def micro(self) -> int:
        return self.micro_batches or self.pp

    @property
    def concurrent(self) -> int:
        """Devices of a replica computing at once: every stage when micro-batches fill them."""
        return self.stage_devices * min(self.micro, self.pp)

    @property
    def active(self) -> bool:
        return self.devices > 1 or self.micro > 1

    def stage_layers(self, model: ModelSpec) -> int:
        return math.ceil(model.num_layers / self.pp)

    def check(self, model: ModelSpec, system: System, batch: int) -> None:
        """Raise a clear error for a degree the model, the system or the batch cannot take."""
        if self.ep > 1:
            if model.moe is None:
                raise InferSimError(f"--ep {self.ep}: {model.name} is dense; expert parallelism needs an "
                                    "MoE model")
            experts = model.moe.num_experts
            if experts % self.ep:
                raise InferSimError(f"ep={self.ep} does not divide {model.name}'s {experts} experts")
        self.device_model(model)  # tensor-parallel divisibility
        if self.pp > model.num_layers:
            raise InferSimError(f"pp={self.pp} exceeds {model.name}'s {model.num_layers} layers")
        if self.devices > system.num_devices:
            raise InferSimError(
                f"the plan needs tp x pp x dp = {self.devices} devices "
                f"({self.stage_devices} per stage x {self.pp} stages x {self.dp} replicas); "
                f"{system.name} has {system.num_devices}. Use a system file with enough devices "
                "(e.g. --hardware dgx-h100) or lower the degrees")
        if batch % self.dp:
            raise InferSimError(f"batch {batch} does not split over dp={self.dp} replicas; use a multiple")
        per_replica = batch // self.dp
        if per_replica % self.micro:
            raise InferSimError(f"{per_replica} sequences per replica do not split into {self.micro} "
                                "micro-batches; use a batch that does")
        if (per_replica // self.micro) % self.attention_groups:
            raise InferSimError(f"{per_replica // self.micro} sequences per micro-batch do not split over "
                                f"ep/tp = {self.attention_groups} attention groups")

    def device_model(self, model: ModelSpec) -> ModelSpec:
        """The shape one device of the busiest stage holds (all layers; the stage's share is
        applied to the costs)."""
        shard = shard_for_tp(model, self.tp, experts_whole=self.ep > 1)
        if self.ep > 1 and shard.moe is not None:
            shard = shard.model_copy(update={"moe": shard.moe.model_copy(update={
                "num_experts": shard.moe.num_experts // self.ep})})
        return shard

    def batch_per_device(self, batch: int) -> int:
        """Sequences one attention group runs per micro-batch."""
        return batch // (self.dp * self.micro * self.attention_groups)

    def expert_shard(self, model: ModelSpec, group_tokens: float) -> ExpertShard | None:
        if self.ep == 1 or model.moe is None:
            return None
        mean_rows = group_tokens * model.moe.top_k / self.ep
        imbalance = self.expert_imbalance or balls_in_bins_imbalance(mean_rows, self.ep)
        return ExpertShard(experts=model.moe.num_experts, devices=self.ep, group_tokens=group_tokens,
                           imbalance=imbalance)

    def to_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp,
                "micro_batches": self.micro, "overlap": self.overlap,
                "sequence_parallel": self.sequence_parallel, "schedule": self.schedule,
                "devices": self.devices}


def balls_in_bins_imbalance(mean_rows: float, devices: int) -> float:
    """Expected busiest device's rows over the mean when rows land uniformly at random."""
    if devices == 1 or mean_rows <= 0:
        return 1.0
    return float(min(devices, 1.0 + math.sqrt(2.0 * math.log(devices) / mean_rows)))


# --- a calibrated CPU host as several worker processes --------------------------------

def workers_on_host(system: System, workers: int, concurrent: int | None = None) -> System:
    """A calibrated host CPU split into ``workers`` one-core processes linked by shared memory,
    ``concurrent`` of them computing at once (all, unless pipeline stages wait on each other).

    A worker is one core: its share of the peak and one compute unit, the host's kernel
    efficiencies, and GEMM parameters fitted to GEMMs timed inside a one-thread worker with
    that many workers running them at once (they contend for memory: one-row GEMMs ran 30-65%
    slower with two at once on the development machine). Collectives are the executor's own,
    as calibration timed them.
    """
    from simulator.calibrate.operators import device_params, device_with

    device = system.device
    shm = (device.efficiency.fit or {}).get("shared_memory")
    if not isinstance(shm, dict):
        raise InferSimError(f"{device.name}: a parallel plan on a CPU host needs its shared-memory link; "
                            "re-run `infersim calibrate` (it measures one)")
    units = device.compute_units or 1
    if workers > units:
        raise InferSimError(f"{device.name} has {units} cores; {workers} worker processes would share them")
    concurrent = min(workers, concurrent or workers)
    worker = device.model_copy(update={
        "name": f"{device.name} worker", "compute_units": 1,
        "compute": {k: v / units for k, v in device.compute.items()}})
    fits = shm.get("worker_gemms") or {}
    if fits:
        # The fit of the nearest concurrency measured (1 or all cores).
        chosen = min(fits, key=lambda c: abs(int(c) - concurrent))
        names = [p[0] for p in device_params(WORKER_KINDS)]
        values = np.array([fits[chosen]["parameters"][n] for n in names])
        gemms = device_with(worker, values, "worker", kinds=WORKER_KINDS)
        worker = worker.model_copy(update={"efficiency": device.efficiency.model_copy(update={
            "gemm": gemms.efficiency.gemm,
            "kernels": {**device.efficiency.kernels, **gemms.efficiency.kernels},
            "provenance": f"host kernels; GEMMs fitted in a worker with {chosen} running at once"})})
    link = Link(name="shared memory", bandwidth=float(shm["bandwidth_bytes_per_s"]),
                latency=float(shm.get("latency_s", 0.0)))
    measured = {name: MeasuredCollective(workers=int(fit.get("workers", 2)), latency=float(fit["latency_s"]),
                                         bandwidth=float(fit["bandwidth_bytes_per_s"]))
                for name, fit in (shm.get("collectives") or {}).items()}
    spec = CollectiveSpec(
        algorithms=("direct",), measured=measured,
        provenance="calibrated: the executor's shared-memory collectives" if measured else
        "calibrated shared-memory copies only (re-run `infersim calibrate --only workers`)")
    return system.model_copy(update={
        "name": f"{system.name} as {workers} workers", "device": worker, "devices_per_node": workers,
        "links": SystemLinks(intra_node=link), "collectives": spec})


# --- one step under a plan ------------------------------------------------------------

@dataclass(frozen=True)
class ParallelStep:
    time_s: float
    compute_s: float
    """The busiest device's compute over the step (all its micro-batches)."""
    communication_s: float
    """Collectives and pipeline sends of the step on that device, before overlap."""
    exposed_s: float
    """Step time beyond compute: communication not hidden, and pipeline bubbles."""
    bubble_s: float
    energy_j: float
    bound: str
    collectives: list[dict[str, Any]]


def _op_sum(costs: list[OpCost], names: frozenset[str] | None, layers: bool, scale: dict[str, float]) -> Any:
    total: Any = 0.0
    for c in costs:
        outside = c.op.name in NON_LAYER_OPS
        if layers == outside:
            continue
        if names is not None and c.op.name not in names:
            continue
        total = total + c.total_s * scale.get(c.op.name, 1.0)
    return total


def step_time(plan: ParallelPlan, system: System, model: ModelSpec, tokens: int, act_bytes: float,
              costs: list[OpCost], phase: str) -> ParallelStep:
    """Time, communication and energy of one step; ``costs`` are one device's ops for one
    micro-batch of ``tokens`` tokens (its attention group's)."""
    device = system.device
    frac = plan.stage_layers(model) / model.num_layers
    scale = {name: 1.0 / plan.tp for name in SEQUENCE_SPLIT_OPS} if plan.sequence_parallel else {}
    layer_s = avg(frac * _op_sum(costs, None, True, scale))
    first = avg(_op_sum(costs, FIRST_STAGE_OPS, False, {}))
    last = avg(_op_sum(costs, LAST_STAGE_OPS, False, {}))
    compute = layer_s + (first + last if plan.pp == 1 else max(first, last))  # the busiest stage

    hidden = tokens * model.hidden_size * act_bytes  # the hidden state of this device's tokens
    stage_layers = plan.stage_layers(model)
    moe_layers = min(stage_layers, math.ceil(model.num_moe_layers * frac)) if model.moe else 0
    collectives: list[dict[str, Any]] = []

    def add(name: str, kind: str, count: int, size: float, workers: int, per_node: int) -> None:
        if count == 0 or workers == 1:
            return
        each = avg(collective_time_s(system, kind, size, workers, per_node))
        collectives.append({"name": name, "collective": kind, "count": count * plan.micro,
                            "bytes": size, "workers": workers, "time_s": each,
                            "total_s": each * count * plan.micro})

    if plan.tp > 1:
        workers, per_node = plan.tp, min(plan.tp, system.devices_per_node)
        reduces = 2 * stage_layers - (moe_layers if plan.ep > 1 else 0)
        if plan.sequence_parallel:
            add("tp_reduce_scatter", "reduce_scatter", reduces, hidden, workers, per_node)
            add("tp_all_gather", "all_gather", reduces, hidden, workers, per_node)
        else:
            add("tp_all_reduce", "all_reduce", reduces, hidden, workers, per_node)
    if plan.ep > 1 and model.moe is not None:
        workers, per_node = plan.ep, min(plan.ep, system.devices_per_node)
        shard = plan.expert_shard(model, tokens * plan.attention_groups)
        assert shard is not None
        # The busiest device receives its routed rows in the dispatch and returns them in the combine.
        size = shard.rows_for(model.moe.top_k) * model.hidden_size * act_bytes
        add("ep_dispatch", "all_to_all", moe_layers, size, workers, per_node)
        add("ep_combine", "all_to_all", moe_layers, size, workers, per_node)
    per_mb_comm = sum(c["total_s"] for c in collectives) / plan.micro
    send = 0.0
    if plan.pp > 1:
        crosses = plan.replica_devices > system.devices_per_node
        send = avg(collective_time_s(system, "send_recv", hidden, 2, 1 if crosses else 2))
        hops = (plan.pp - 1) if phase == "prefill" else plan.pp
        collectives.append({"name": "pp_send", "collective": "send_recv", "count": hops * plan.micro,
                            "bytes": hidden, "workers": 2, "time_s": send,
                            "total_s": send * hops * plan.micro})

    # A stage's layers with their collectives (partly hidden under the layers' compute); the
    # first stage adds the embedding, the last the head.
    layers = layer_s + per_mb_comm - plan.overlap * min(per_mb_comm, layer_s)
    m, p = plan.micro, plan.pp
    longest = layers + (first + last if p == 1 else max(first, last))
    through = p * layers + first + last  # one micro-batch through every stage
    if phase == "prefill":  # GPipe: the first micro-batch through, then one longest stage per other
        time = through + (m - 1) * longest + (p - 1) * send
    elif plan.schedule == "gpipe":  # every step drains the pipeline; ids return to the first stage
        time = through + (m - 1) * longest + p * send
    else:
        time = max(m * longest, through + p * send)
    busy = m * compute
    communication = sum(c["total_s"] for c in collectives)
    bubble = max(0.0, time - m * longest - (p - 1) * send * (phase == "prefill")
                 - p * send * (phase != "prefill" and plan.schedule == "gpipe"))
    energy_busy = frac * sum(avg(c.total_energy_j) for c in costs
                             if c.op.name not in NON_LAYER_OPS)
    energy_busy += sum(avg(c.total_energy_j) for c in costs if c.op.name in NON_LAYER_OPS)
    per_device = m * energy_busy + max(0.0, time - busy) * device.power.idle
    parts = {"compute": busy, "communication": communication, "pipeline bubble": bubble}
    return ParallelStep(time_s=time, compute_s=busy, communication_s=communication,
                        exposed_s=max(0.0, time - busy), bubble_s=bubble,
                        energy_j=per_device * plan.devices, bound=max(parts, key=parts.__getitem__),
                        collectives=collectives)


