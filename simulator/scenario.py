"""A scenario file: model, hardware, workload and strategy in one YAML, run by ``infersim run``.

```yaml
model: llama-2-13b                 # shipped name or a path (relative to this file)
hardware: workstation-4090
workload: {batch: 8, input_len: 512, output_len: 128}   # samples: 4 for best-of-4 per prompt
precision: {weight_dtype: bf16, kv_dtype: bf16}          # optional
strategy:                                                 # optional
  offload: {weights: {host: 0.5, disk: 0.1}, kv: {host: 0.0}, prefetch: true}
  kv: {policy: h2o, budget: 0.2}
  parallel: {tp: 4, pp: 2, micro_batches: 2, overlap: partial}
  disaggregation: {prefill_hardware: dgx-h100, decode_hardware: dgx-a100, kv_link: inter_node}
```

The strategy fields are the ``infersim estimate`` flags: ``offload.weights``
is ``--offload-weights``, ``offload.layers_on_device`` is
``--layers-on-device``, ``kv.policy``/``budget``/``sinks``/``residual`` are
``--kv-policy``/``--kv-budget``/``--kv-sinks``/``--kv-residual``; ``parallel.tp`` is ``--tp``
and so on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from simulator import dtypes
from simulator.errors import InferSimError, SpecError
from simulator.estimate import estimate
from simulator.result import EstimateResult
from simulator.specs.fields import Spec
from simulator.specs.loader import load_model, read_yaml, validate
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan


class Workload(Spec):
    batch: int = Field(1, gt=0)
    input_len: int = Field(512, gt=0)
    output_len: int = Field(128, gt=0)
    samples: int = Field(1, gt=0)
    """Parallel samples per prompt (``--samples``): best-of-N, self-consistency."""


class PrecisionChoice(Spec):
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    act_dtype: str = "bf16"
    attention: Literal["flash", "naive"] = "flash"
    group_size: int = Field(dtypes.DEFAULT_GROUP_SIZE, gt=0)
    weight_dequant: Literal["fused", "separate"] = "fused"


class OffloadChoice(Spec):
    weights: dict[Literal["host", "disk"], float] = {}
    kv: dict[Literal["host"], float] = {}
    layers_on_device: int | None = Field(None, ge=0)
    prefetch: bool = True
    host_compute: bool = False
    expert_cache: float | None = Field(None, ge=0, le=1)
    routing_skew: float = Field(0.0, ge=0)
    expert_prefetch: float = Field(0.0, ge=0, le=1)
    experts_on_host: bool = False


class KVChoice(Spec):
    policy: Literal["full", "window", "streaming", "h2o"] = "full"
    budget: float | None = Field(None, gt=0)
    sinks: int = Field(4, ge=0)
    residual: int = Field(0, ge=0)
    store: Literal["kv", "x"] = "kv"


class SpeculativeChoice(Spec):
    draft: str
    gamma: int = Field(4, ge=1, le=64)
    alpha: float | None = Field(0.8, ge=0, le=1)
    profile: tuple[float, ...] | None = None
    draft_hardware: str | None = None
    draft_kv_budget: int | None = Field(None, ge=1)


class ParallelChoice(Spec):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    micro_batches: int | None = Field(None, ge=1)
    overlap: float | Literal["none", "partial", "full"] = "none"
    sequence_parallel: bool = False
    expert_imbalance: float | None = Field(None, ge=1)
    schedule: Literal["interleaved", "gpipe"] = "interleaved"


class DisaggregationChoice(Spec):
    prefill_hardware: str | None = None
    decode_hardware: str | None = None
    kv_link: str | None = None


class FlashChoice(Spec):
    active: float = Field(0.05, gt=0, le=1)
    window: int = Field(5, ge=0)
    reuse: float | None = Field(None, ge=0, le=1)
    predictor_rank: int = Field(128, ge=1)
    queue_depth: int = Field(32, ge=1)
    bundle: bool = True


class StrategyChoice(Spec):
    offload: OffloadChoice | None = None
    parallel: ParallelChoice | None = None
    disaggregation: DisaggregationChoice | None = None
    flash: FlashChoice | None = None
    kv: KVChoice = KVChoice()
    speculative: SpeculativeChoice | None = None


class ServingChoice(Spec):
    """A serving run (``infersim serve``'s flags): a trace, or arrivals at a rate; the scheduler,
    KV cache, replicas and objectives."""

    trace: str | None = None
    max_requests: int | None = Field(None, gt=0)
    time_scale: float = Field(1.0, gt=0)
    rate: float | None = Field(None, gt=0)
    requests: int | None = Field(None, gt=0)
    duration: float | None = Field(None, gt=0)
    arrival_cv: float = Field(1.0, gt=0)
    input_len: str | int = "512"
    output_len: str | int = "128"
    max_input_len: int | None = Field(None, gt=0)
    max_output_len: int | None = Field(None, gt=0)
    prefix_groups: int = Field(0, ge=0)
    prefix_tokens: int = Field(0, ge=0)
    seed: int = 0
    scheduler: Literal["static", "continuous", "chunked", "decode-priority"] = "continuous"
    chunk_size: int = Field(512, gt=0)
    max_batch: int = Field(256, gt=0)
    max_batch_tokens: int = Field(8192, gt=0)
    block_size: int = Field(16, gt=0)
    preemption: Literal["recompute", "swap"] = "recompute"
    prefix_caching: bool = True
    memory_fraction: float = Field(0.9, gt=0, le=1)
    step_overhead: float = Field(0.0, ge=0)
    router: Literal["round-robin", "least-tokens"] = "least-tokens"
    prefill_replicas: int = Field(1, gt=0)
    decode_replicas: int = Field(1, gt=0)
    power_cap: float | None = Field(None, gt=0)
    slo_ttft: float | None = Field(None, gt=0)
    slo_tbt: float | None = Field(None, gt=0)


class Scenario(Spec):
    name: str | None = None
    description: str = ""
    model: str
    hardware: str
    workload: Workload = Workload()
    precision: PrecisionChoice = PrecisionChoice()
    strategy: StrategyChoice = StrategyChoice()
    serving: ServingChoice | None = None
    """When present, ``infersim run`` simulates serving (``simulator.engine``) instead of one
    request shape."""


def _local(reference: str, folder: Path) -> str:
    """A path relative to the scenario file, if one exists there; else the name as given."""
    candidate = folder / reference
    return str(candidate) if candidate.is_file() else reference


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), None, "no such scenario file")
    scenario = validate(Scenario, read_yaml(path), str(path))
    folder = path.parent
    split = scenario.strategy.disaggregation
    if split is not None:
        split = split.model_copy(update={k: _local(v, folder) for k, v in split.model_dump().items()
                                         if k.endswith("hardware") and v is not None})
        scenario = scenario.model_copy(update={
            "strategy": scenario.strategy.model_copy(update={"disaggregation": split})})
    if scenario.serving is not None and scenario.serving.trace is not None:
        serving = scenario.serving.model_copy(update={"trace": _local(scenario.serving.trace, folder)})
        scenario = scenario.model_copy(update={"serving": serving})
    return scenario.model_copy(update={"model": _local(scenario.model, folder),
                                       "hardware": _local(scenario.hardware, folder),
                                       "name": scenario.name or path.stem})


def estimate_options(scenario: Scenario) -> dict[str, Any]:
    """``estimate`` keyword arguments for the scenario's precision and strategy."""
    options: dict[str, Any] = scenario.precision.model_dump()
    kv = scenario.strategy.kv
    options["kv_residual"] = kv.residual
    options["kv_store"] = kv.store
    options["kv_policy"] = KVPolicy.chosen(kv.policy, kv.budget, kv.sinks)
    speculative = scenario.strategy.speculative
    if speculative is not None:
        from simulator.strategies.speculative import Speculation

        options["speculative"] = Speculation(speculative.draft, speculative.gamma, speculative.alpha,
                                             speculative.profile, speculative.draft_hardware,
                                             speculative.draft_kv_budget)
    parallel = scenario.strategy.parallel
    if parallel is not None:
        from simulator.strategies.parallel import ParallelPlan

        options["parallel"] = ParallelPlan(**parallel.model_dump())
    split = scenario.strategy.disaggregation
    if split is not None:
        options.update(split.model_dump())
    if scenario.strategy.flash is not None:
        from simulator.strategies.flash import FlashPlan

        options["flash"] = FlashPlan(**scenario.strategy.flash.model_dump())
    off = scenario.strategy.offload
    if off is not None:
        options["offload"] = OffloadPlan.build(
            load_model(scenario.model), weights=dict(off.weights) or None, kv=dict(off.kv) or None,
            prefetch=off.prefetch, host_compute=off.host_compute, layers_on_device=off.layers_on_device,
            expert_cache=off.expert_cache, routing_skew=off.routing_skew,
            expert_prefetch=off.expert_prefetch, experts_on_host=off.experts_on_host)
    return options


def serve_scenario(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A scenario with a ``serving`` section: the records and the summary ``infersim serve`` gives."""
    import argparse

    from simulator.engine.cli import run_from_args

    scenario = load_scenario(path)
    serving = scenario.serving
    if serving is None:
        raise InferSimError(f"{path}: no serving section; use run_scenario for one request shape")
    strategy = scenario.strategy
    if strategy.offload is not None or strategy.flash is not None or strategy.kv.policy != "full":
        raise InferSimError(f"{path}: strategy: the serving engine runs parallel plans, disaggregation "
                            "and speculative decoding; offloading, flash-backed FFNs and KV eviction are "
                            "modelled per request shape only (drop them or the serving section)")
    parallel = strategy.parallel or ParallelChoice()
    if parallel.ep != 1:
        raise InferSimError(f"{path}: strategy.parallel.ep: expert parallelism is not in the serving engine")
    if scenario.precision.weight_dequant != "fused":
        raise InferSimError(f"{path}: precision.weight_dequant: the serving engine dequantizes weights "
                            "inside the GEMM only; drop it or the serving section")
    split = strategy.disaggregation or DisaggregationChoice()
    spec = strategy.speculative
    args = argparse.Namespace(
        model=scenario.model, hardware=scenario.hardware, **serving.model_dump(exclude={"prefix_caching"}),
        no_prefix_caching=not serving.prefix_caching, weight_dtype=scenario.precision.weight_dtype,
        kv_dtype=scenario.precision.kv_dtype, act_dtype=scenario.precision.act_dtype,
        attention=scenario.precision.attention, tp=parallel.tp, pp=parallel.pp, dp=parallel.dp,
        micro_batches=parallel.micro_batches, overlap=parallel.overlap,
        prefill_hardware=split.prefill_hardware, decode_hardware=split.decode_hardware,
        kv_link=split.kv_link, draft_model=spec.draft if spec else None,
        draft_kv_budget=spec.draft_kv_budget if spec else None, spec_gamma=spec.gamma if spec else 4,
        spec_alpha=spec.alpha if spec else 0.8,
        spec_profile=",".join(str(a) for a in spec.profile) if spec and spec.profile else None)
    try:
        return run_from_args(args)
    except SpecError:
        raise
    except InferSimError as err:
        raise InferSimError(f"{path}: {err}") from None


def run_scenario(path: str | Path) -> EstimateResult:
    scenario = load_scenario(path)
    if scenario.serving is not None:
        raise InferSimError(f"{path}: has a serving section; run it with `infersim run` or serve_scenario")
    w = scenario.workload
    try:
        return estimate(scenario.model, scenario.hardware, batch=w.batch, input_len=w.input_len,
                        output_len=w.output_len, samples=w.samples, **estimate_options(scenario))
    except SpecError:
        raise
    except InferSimError as err:
        raise InferSimError(f"{path}: {err}") from None
