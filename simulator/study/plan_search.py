"""The best deployment plans for a model under TTFT/TPOT SLOs, confirmed in the serving engine.

1. **Candidates.** Every configuration of the search space (per system: tp and pp powers of two
   whose product fits its devices, batch powers of two up to 256, weights bf16, fp8 where the
   device has fp8 units, int8; KV cache in the activation dtype and fp8 where the device has fp8;
   or the values given) is costed by ``sweep`` at the workload's mean prompt and output lengths,
   with ``cost.add_cost``'s cost per million output tokens.
2. **Ranking.** ``pareto.best_plan`` keeps the configurations that fit and meet the SLOs in the
   estimate and ranks them by the objective: ``cost`` (USD per million output tokens), ``throughput``
   (output tokens/s of one replica) or ``gpus`` (devices of all replicas, ties to the cheaper).
   Replicas: enough to carry the arrival rate with each replica loaded to ``load`` of its estimated
   capacity, ``replicas = ceil(rate / (load x batch / e2e_s))``.
3. **Confirmation.** Down the ranking, each configuration not yet confirmed is served by the
   engine (``engine.serve.serve``; chunked prefill unless another scheduler is named): one
   replica with the plan's batch as its most sequences, under
   its share of the workload (Poisson at ``rate / replicas`` with fixed lengths, or every
   ``replicas``-th request of the trace, as a round-robin router deals them; without a rate, Poisson
   at ``load`` of its capacity). It is kept when every request completes and its p90 TTFT and p90
   gap between tokens (TBT) are within the SLOs; otherwise it is dropped, with why, and the next
   candidate (possibly the same configuration at a smaller batch) is tried, until ``confirm`` plans
   pass.

The estimate prefills a whole batch at once, so its TTFT is a worst case of serving, where
prompts arrive spread out, and its TPOT leaves out the prefills that share iterations with
decodes in serving, which the engine's TBT counts. The engine runs a pipeline one micro-batch at
a time (it does not interleave them), a conservative check of pp plans, and has no expert
parallelism yet (ep plans are dropped with the engine's reason).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.engine.workload import Workload, clip_lengths, read_trace, synthetic
from simulator.errors import InferSimError
from simulator.specs.hardware import System
from simulator.specs.loader import load_model, load_system
from simulator.specs.model import ModelSpec
from simulator.study.pareto import best_plan, slo_margin, slo_violations

OBJECTIVES = ("cost", "throughput", "gpus")
GROUP = ("hardware", "tp", "pp", "ep", "weight_dtype", "kv_dtype")
"""What makes a configuration, apart from its batch."""
MAX_BATCH = 256
DEFAULT_REQUESTS = 300
DEFAULT_LOAD = 0.8
PLAN_COLUMNS = ("model", "hardware", "tp", "pp", "ep", "batch", "weight_dtype", "kv_dtype", "strategy",
                "input_len", "output_len", "ttft_s", "tpot_s", "throughput_tokens_per_s",
                "memory_bytes_total", "memory_bytes_capacity", "usd_per_device_hour",
                "cost_usd_per_million_tokens", "capacity_requests_per_s", "devices_per_replica",
                "replicas", "devices", "cost_usd_per_hour", "binding", "binding_devices")
ENGINE_KEYS = ("ttft_p90_s", "tbt_p90_s", "meets_slo", "requests", "completed", "rate_requests_per_s",
               "throughput_tokens_per_s", "preemptions")


class NoPlanError(InferSimError):
    """No configuration meets the SLOs (in the estimate, or in the engine); ``result`` holds what
    was tried when the engine dropped every candidate."""

    def __init__(self, message: str, result: PlanSearchResult | None = None):
        self.result = result
        super().__init__(message)


@dataclass(frozen=True)
class PlanSearchResult:
    """What ``plan_search`` found: the plans, what the engine dropped, and the study behind them."""

    plans: pd.DataFrame
    """Plans that meet the SLOs in the estimate and in the engine, best first (``PLAN_COLUMNS``
    and ``engine_*``); with ``confirm=0``, the best by the estimate, unconfirmed."""
    dropped: list[dict[str, Any]]
    """Candidates the engine rejected, in the order tried, each with ``why``."""
    candidates: pd.DataFrame
    """The ``top`` best configurations by the estimate, one row each (its best batch)."""
    study: pd.DataFrame
    """Every configuration costed (the sweep's rows, with replicas and devices)."""
    objective: str
    slo: dict[str, float]
    workload: dict[str, Any]
    why: str
    """``best_plan``'s account of the ranking: the winner's margin, what excludes better rows."""
    engine_runs: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    """The search-space values given (the rest were the defaults)."""
    notes: list[str] = field(default_factory=list)
    """Systems left out of the ranking (no price for the cost objective)."""

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "slo": self.slo, "workload": self.workload,
                "configurations": len(self.study), "engine_runs": self.engine_runs,
                "plans": [plan_record(row) for _, row in self.plans.iterrows()],
                "dropped": self.dropped,
                "candidates": [plan_record(row, engine=False) for _, row in self.candidates.iterrows()],
                "why": self.why, "notes": self.notes}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plan_record(row: pd.Series, engine: bool = True) -> dict[str, Any]:
    """One plan as JSON: ``PLAN_COLUMNS`` and, when confirmed, ``engine: {ttft_p90_s, ...}``."""
    record = {name: _plain(row[name]) for name in PLAN_COLUMNS if name in row}
    for name in ("replicas", "devices", "devices_per_replica"):
        if isinstance(record.get(name), float):
            record[name] = int(record[name])
    if engine:
        confirmed = "engine_meets_slo" in row.index and isinstance(row["engine_meets_slo"], (bool, np.bool_))
        record["engine"] = ({key: _plain(row[f"engine_{key}"]) for key in ENGINE_KEYS}
                            if confirmed else None)
    return record


# --- the search space ---------------------------------------------------------------------------

def _names(values: str | Sequence[Any] | None) -> list[Any] | None:
    if values is None:
        return None
    if isinstance(values, str):
        return [v.strip() for v in values.split(",") if v.strip()]
    return list(values)


def powers_of_two(limit: int) -> list[int]:
    return [1 << k for k in range(max(1, int(limit)).bit_length())]


def search_rows(spec: ModelSpec, systems: Mapping[str, System], input_len: int, output_len: int,
                tp: Sequence[int] | None = None, pp: Sequence[int] | None = None,
                ep: Sequence[int] | None = None, batch: Sequence[int] | None = None,
                weight_dtype: Sequence[str] | None = None,
                kv_dtype: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
    """The configurations searched (sweep rows): the given values, or the defaults per system. A
    configuration needing more devices than its system has is left out; a given degree that no
    system can take is an error."""
    rows = []
    for name, system in systems.items():
        devices, compute = system.num_devices, set(system.device.compute)
        fp8 = ["fp8"] if "fp8" in compute else []
        tps = tp or powers_of_two(devices)
        pps = pp or [p for p in powers_of_two(devices) if p <= spec.num_layers]
        eps = ep or [1]
        weights = weight_dtype or ["bf16", *fp8, "int8"]
        kvs = kv_dtype or [None, *fp8]
        for t in tps:
            for p in pps:
                for e in eps:
                    if (e if e > 1 else t) * p > devices:
                        continue
                    for w in weights:
                        for k in kvs:
                            for b in batch or powers_of_two(MAX_BATCH):
                                rows.append({"model": spec.name, "hardware": name, "tp": t, "pp": p, "ep": e,
                                             "batch": b, "input_len": input_len, "output_len": output_len,
                                             "weight_dtype": w, "kv_dtype": k})
    counts = ", ".join(f"{n} has {s.num_devices}" for n, s in systems.items())
    for flag, values, column in (("--tp", tp, "tp"), ("--pp", pp, "pp"), ("--ep", ep, "ep")):
        unused = sorted(set(values or ()) - {r[column] for r in rows})
        if unused:
            raise InferSimError(f"{flag} {','.join(map(str, unused))}: more devices than the systems hold "
                                f"({counts}); lower the degree or name a larger system")
    return rows


def _check_degrees(flag: str, values: list[Any] | None) -> list[int] | None:
    if values is None:
        return None
    try:
        numbers = [int(v) for v in values]
    except (TypeError, ValueError):
        raise InferSimError(f"{flag} {','.join(map(str, values))}: give whole numbers, "
                            f"e.g. {flag} 1,2,4") from None
    if not numbers or any(n < 1 for n in numbers):
        raise InferSimError(f"{flag}: give positive whole numbers, e.g. {flag} 1,2,4")
    return sorted(set(numbers))


# --- the workload -------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Load:
    """The workload the search plans for: a trace (its arrivals, rescaled to ``rate`` when given)
    or Poisson arrivals at ``rate`` with fixed lengths."""

    trace: Workload | None
    rate: float | None
    """Requests per second the deployment must carry (``None``: none given, no trace)."""
    input_len: int
    output_len: int
    requests: int
    source: str

    def replica_share(self, replicas: int, per_replica_rate: float, seed: int) -> Workload:
        if self.trace is None:
            return synthetic(self.requests, per_replica_rate, self.input_len, self.output_len, seed)
        picked = np.arange(0, min(len(self.trace), self.requests * replicas), replicas)
        if len(picked) < 2:
            raise InferSimError(f"{self.source}: too few requests for {replicas} replicas' shares; use a "
                                "longer trace or a lower --rate")
        t = self.trace
        return Workload(t.arrival_s[picked] - t.arrival_s[picked[0]], t.prompt_tokens[picked],
                        t.output_tokens[picked], source=f"{self.source}, every {replicas}th request")

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "rate_requests_per_s": self.rate, "input_len": self.input_len,
                "output_len": self.output_len, "requests_per_engine_run": self.requests}


def _load(spec: ModelSpec, workload: str | Path | Workload | None, rate: float | None, input_len: int,
          output_len: int, requests: int) -> _Load:
    if rate is not None and not rate > 0:
        raise InferSimError(f"--rate must be a positive number of requests per second, got {rate}")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 2:
        raise InferSimError(f"--requests must be a whole number of at least 2, got {requests!r}")
    if workload is None:
        for flag, value in (("--input-len", input_len), ("--output-len", output_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InferSimError(f"{flag} must be a positive whole number, got {value!r}")
        if input_len + output_len > spec.max_position_embeddings:
            raise InferSimError(f"--input-len + --output-len = {input_len + output_len} exceeds "
                                f"{spec.name}'s context of {spec.max_position_embeddings} tokens")
        return _Load(None, rate, input_len, output_len, requests, "Poisson arrivals, fixed lengths")
    trace = workload if isinstance(workload, Workload) else read_trace(workload)
    if len(trace) < 2:
        raise InferSimError(f"{trace.source or 'workload'}: a trace needs at least two requests")
    trace = clip_lengths(trace, max_total=spec.max_position_embeddings)
    span = float(trace.arrival_s[-1] - trace.arrival_s[0])
    if not span > 0:
        raise InferSimError(f"{trace.source or 'workload'}: every request arrives at once; give --rate with "
                            "fixed lengths instead")
    own_rate = (len(trace) - 1) / span
    if rate is not None:  # the trace's arrivals stretched or squeezed to the rate asked for
        trace = Workload(trace.arrival_s * own_rate / rate, trace.prompt_tokens, trace.output_tokens,
                         source=trace.source)
    source = Path(trace.source).name if trace.source else "workload"
    return _Load(trace, rate or own_rate, max(1, round(float(trace.prompt_tokens.mean()))),
                 max(1, round(float(trace.output_tokens.mean()))), requests,
                 source if rate is None else f"{source}, arrivals rescaled from {own_rate:.3g}/s")


# --- ranking ------------------------------------------------------------------------------------

def _with_replicas(study: pd.DataFrame, rate: float | None, load: float) -> pd.DataFrame:
    out = study.copy()
    throughput = pd.to_numeric(out["throughput_tokens_per_s"], errors="coerce").to_numpy(dtype=float)
    capacity = throughput / out["output_len"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        replicas = np.ceil(rate / (load * capacity)) if rate is not None else np.ones(len(out))
    replicas[~(capacity > 0)] = np.nan
    out["capacity_requests_per_s"] = capacity
    out["devices_per_replica"] = out["devices"].astype(np.int64)
    out["replicas"] = replicas
    out["devices"] = replicas * out["devices_per_replica"]
    out["throughput_per_device"] = throughput / out["devices_per_replica"]
    out["cost_usd_per_hour"] = out["devices"] * out["usd_per_device_hour"]
    return out


def _closest_miss(study: pd.DataFrame, slo: Mapping[str, float]) -> str:
    """Which SLO the configuration nearest to meeting them misses, and by how much."""
    fits = study[study["feasible"].astype(bool)]
    if fits.empty:
        used = pd.to_numeric(study.get("memory_bytes_total"), errors="coerce")
        capacity = pd.to_numeric(study.get("memory_bytes_capacity"), errors="coerce")
        ratio = (used / capacity).dropna()
        if ratio.empty:
            return f"no configuration could be costed: {study['reason'].dropna().iloc[0]}"
        row = study.loc[ratio.idxmin()]
        return (f"no configuration fits in device memory; the smallest, {describe(row)}, needs "
                f"{row['memory_bytes_total'] / 1e9:.1f} GB of {row['memory_bytes_capacity'] / 1e9:.1f} GB "
                "per device")
    ratios = pd.concat([pd.to_numeric(fits[name], errors="coerce") / bound for name, bound in slo.items()],
                       axis=1)
    worst = ratios.max(axis=1)
    row = fits.loc[worst.idxmin()]
    name = ratios.loc[worst.idxmin()].idxmax()
    label = "TTFT" if name == "ttft_s" else "TPOT"
    return (f"the closest, {describe(row)}, misses the {label} SLO by {row[name] - slo[name]:.3g} s "
            f"({label} {row[name]:.3g} s, {row[name] / slo[name]:.2f}x the {slo[name]:g} s SLO)")


def describe(row: Mapping[str, Any]) -> str:
    """``dgx-h100 tp 2 x pp 2, batch 32, weights fp8, KV bf16``."""
    degrees = " x ".join(f"{name} {row[name]}" for name in ("tp", "pp", "ep") if row.get(name, 1) > 1)
    return (f"{row['hardware']}{' ' + degrees if degrees else ''}, batch {row['batch']}, "
            f"weights {row['weight_dtype']}, KV {row['kv_dtype']}")


def _strategy(row: pd.Series, scheduler: str) -> str:
    degrees = " x ".join(f"{name} {row[name]}" for name in ("tp", "pp", "ep") if row[name] > 1)
    return f"{degrees or 'one device'}, {scheduler} batching"


def _binding(study: pd.DataFrame, row: pd.Series, slo: Mapping[str, float],
             dropped: Sequence[Mapping[str, Any]] = ()) -> tuple[str, str]:
    """What stops a bigger batch (in the estimate, or in the engine when it dropped that batch),
    and what stops fewer devices (in the estimate), for this configuration."""
    same = np.ones(len(study), dtype=bool)
    for name in GROUP:
        same &= (study[name] == row[name]).to_numpy()
    bigger = study[same & (study["batch"] > row["batch"]).to_numpy()].sort_values("batch")
    if bigger.empty:
        batch = f"largest batch searched ({row['batch']})"
    else:
        nxt = bigger.iloc[0]
        found = slo_violations(nxt, slo) or [f"in the engine, {d['why']}" for d in dropped
                                           if all(d[k] == nxt[k] for k in (*GROUP, "batch"))][:1]
        batch = (f"batch {nxt['batch']}: {'; '.join(found)}" if found
                 else f"batch {nxt['batch']} meets the SLOs but ranks lower")
    if row["devices_per_replica"] <= 1:
        return batch, "one device"
    peers = np.ones(len(study), dtype=bool)
    for name in ("hardware", "weight_dtype", "kv_dtype", "batch"):
        peers &= (study[name] == row[name]).to_numpy()
    fewer = study[peers & (study["devices_per_replica"] < row["devices_per_replica"]).to_numpy()]
    if fewer.empty:
        return batch, "no smaller plan searched"
    fewer = fewer[fewer["devices_per_replica"] == fewer["devices_per_replica"].max()]
    # The nearest of them: one that fits, closest to its SLOs.
    worst = pd.concat([pd.to_numeric(fewer[name], errors="coerce") / bound for name, bound in slo.items()],
                      axis=1).max(axis=1)
    closest = fewer.loc[worst.where(fewer["feasible"].astype(bool), np.inf).fillna(np.inf).idxmin()]
    problems = slo_violations(closest, slo)
    if not problems:
        return batch, f"{_degrees(closest)} meets the SLOs at batch {row['batch']} but ranks lower"
    return batch, f"{_degrees(closest)}: {'; '.join(problems)}"


def _degrees(row: pd.Series) -> str:
    devices = int(row["devices_per_replica"])
    text = " x ".join(f"{name} {row[name]}" for name in ("tp", "pp", "ep") if row[name] > 1)
    return f"{text} ({devices} devices)" if text else "one device"


# --- confirmation -------------------------------------------------------------------------------

def _misses(summary: Mapping[str, Any], slo: Mapping[str, float]) -> list[str]:
    found = []
    if summary["completed"] < summary["requests"]:
        found.append(f"{summary['requests'] - summary['completed']} of {summary['requests']} requests "
                     "did not complete")
    for key, name, label in (("ttft_s", "ttft_s", "TTFT"), ("tpot_s", "tbt_s", "TBT")):
        value = summary[name]["p90"]
        if key in slo and value is not None and value > slo[key]:
            found.append(f"p90 {label} {value:.3g} s > {slo[key]:g} s SLO")
    return found


def confirm_plan(model: str, row: pd.Series, load: _Load, slo: Mapping[str, float],
                 scheduler: str = "chunked", load_factor: float = DEFAULT_LOAD,
                 seed: int = 0) -> tuple[dict[str, Any], list[str]]:
    """Serve one replica of the plan under its share of the workload: the engine's numbers, and
    what misses the SLOs (empty when the plan meets them). Raises what the engine raises."""
    from simulator.engine.scheduler import SchedulerConfig
    from simulator.engine.serve import serve
    from simulator.strategies.parallel import ParallelPlan

    replicas = int(row["replicas"])
    per_replica_rate = (load.rate / replicas if load.rate is not None
                        else load_factor * float(row["capacity_requests_per_s"]))
    workload = load.replica_share(replicas, per_replica_rate, seed)
    longest_prompt = int(workload.prompt_tokens.max())
    config = SchedulerConfig(policy=scheduler, max_batch=int(row["batch"]),
                             max_batch_tokens=max(8192, longest_prompt))
    tp, pp, ep = int(row["tp"]), int(row["pp"]), int(row["ep"])
    plan = (ParallelPlan(tp=tp, pp=pp, ep=ep, micro_batches=1 if pp > 1 else None)
            if max(tp, pp, ep) > 1 else None)
    records = serve(model, row["hardware"], workload, config, weight_dtype=row["weight_dtype"],
                    kv_dtype=row["kv_dtype"], parallel=plan, seed=seed)
    summary = records.summary(slo.get("ttft_s"), slo.get("tpot_s"))
    misses = _misses(summary, slo)
    result = {"ttft_p90_s": summary["ttft_s"]["p90"], "tbt_p90_s": summary["tbt_s"]["p90"],
              "meets_slo": not misses, "requests": summary["requests"], "completed": summary["completed"],
              "rate_requests_per_s": per_replica_rate,
              "throughput_tokens_per_s": summary["throughput_tokens_per_s"],
              "preemptions": summary["preemptions"]}
    return result, misses


# --- the search ---------------------------------------------------------------------------------

def plan_search(model: str | Path, hardware: str | Sequence[str], slo_ttft_s: float | None,
                slo_tpot_s: float | None, workload: str | Path | Workload | None = None, *,
                input_len: int = 512, output_len: int = 128, rate: float | None = None,
                objective: str = "cost", top: int = 5, confirm: int = 3,
                prices: Mapping[str, Any] | str | Path | None = None,
                tp: Sequence[int] | str | None = None, pp: Sequence[int] | str | None = None,
                ep: Sequence[int] | str | None = None, batch: Sequence[int] | str | None = None,
                weight_dtype: Sequence[str] | str | None = None, kv_dtype: Sequence[str] | str | None = None,
                requests: int = DEFAULT_REQUESTS, load: float = DEFAULT_LOAD, scheduler: str = "chunked",
                seed: int = 0, max_engine_runs: int | None = None) -> PlanSearchResult:
    """The best plans for ``model`` on the systems ``hardware`` (names, or one comma-separated
    string) under the SLOs, by ``objective`` (``cost``, ``throughput`` or ``gpus``), each confirmed
    in the serving engine (module docstring). ``workload`` is a trace (CSV path or ``Workload``;
    lengths clipped to the model's context; rescaled to ``rate`` when given), else Poisson arrivals
    at ``rate`` of ``input_len`` / ``output_len`` tokens. ``tp``, ``pp``, ``ep``, ``batch``,
    ``weight_dtype``, ``kv_dtype`` (lists, or comma-separated) replace the default search space.
    ``load``: the share of a replica's estimated capacity it may carry. At most ``max_engine_runs``
    (default ``max(12, 4 x confirm)``) serving runs of ``requests`` requests each; ``confirm=0``
    returns the estimate's best ``top`` plans unconfirmed. Raises ``NoPlanError`` when no
    configuration meets the SLOs in the estimate, or none of those tried does in the engine."""
    if objective not in OBJECTIVES:
        raise InferSimError(f"--objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    slo = _check_slo(slo_ttft_s, slo_tpot_s)
    for flag, value, low in (("--top", top, 1), ("--confirm", confirm, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InferSimError(f"{flag} must be a whole number of at least {low}, got {value!r}")
    if not 0 < load <= 1:
        raise InferSimError(f"--load is the share of a replica's estimated capacity it carries, in (0, 1]; "
                            f"got {load}")
    from simulator.engine.scheduler import POLICIES

    if scheduler not in POLICIES:
        raise InferSimError(f"--scheduler {scheduler!r}: choose one of {', '.join(POLICIES)}")
    model = str(model)
    try:
        spec = load_model(model)
    except InferSimError as err:
        raise InferSimError(f"--model {model}: {getattr(err, 'message', err)}") from None
    systems: dict[str, System] = {}
    for name in _names(hardware) or []:
        try:
            systems[str(name)] = load_system(name)
        except InferSimError as err:
            raise InferSimError(f"--hardware {name}: {getattr(err, 'message', err)}") from None
    if not systems:
        raise InferSimError("--hardware: name at least one device or system, e.g. dgx-h100")
    plan_load = _load(spec, workload, rate, input_len, output_len, requests)
    space = {"tp": _check_degrees("--tp", _names(tp)), "pp": _check_degrees("--pp", _names(pp)),
             "ep": _check_degrees("--ep", _names(ep)), "batch": _check_degrees("--batch", _names(batch)),
             "weight_dtype": _names(weight_dtype), "kv_dtype": _names(kv_dtype)}
    rows = search_rows(spec, systems, plan_load.input_len, plan_load.output_len, **space)
    for row in rows:
        row["model"] = model

    from simulator.study.sweep import sweep

    study = _with_replicas(sweep(rows=rows, prices=prices, progress=False), plan_load.rate, load)
    notes = [f"{name}: {note}; its configurations are not ranked by cost" for name, note in
             study.groupby("hardware")["cost_note"].first().items()
             if objective == "cost" and isinstance(note, str) and note.startswith("no price")]
    best = best_plan(study, slo.get("ttft_s"), slo.get("tpot_s"), objective)
    if best.plan is None:
        limits = ", ".join(f"{'TTFT' if k == 'ttft_s' else 'TPOT'} <= {v:g} s" for k, v in slo.items())
        if objective == "cost" and study["cost_usd_per_million_tokens"].isna().all():
            reasons = "; ".join(str(n) for n in study["cost_note"].dropna().unique()[:3]) or "no throughput"
            raise NoPlanError(f"no configuration has a cost: {reasons}; or choose another --objective")
        raise NoPlanError(f"no plan meets {limits} for {spec.name} on {', '.join(systems)} "
                          f"({len(study):,} configurations): {_closest_miss(study, slo)}")
    ranked = best.ranked
    if objective == "gpus":  # ties to the cheaper plan, then (without prices) the faster
        ranked = ranked.sort_values(["devices", "cost_usd_per_million_tokens", "throughput_tokens_per_s"],
                                    ascending=[True, True, False], kind="stable")
    # best_plan's margin is its own winner's; name the first of this ranking's.
    why = best.why.replace(slo_margin(best.plan, slo), slo_margin(ranked.iloc[0], slo), 1)
    candidates = _annotate(study, ranked.drop_duplicates(list(GROUP)).head(top), slo, scheduler)
    plans, dropped, runs = _confirm(model, ranked, plan_load, slo, confirm, scheduler, load, seed,
                                    max(12, 4 * confirm) if max_engine_runs is None else max_engine_runs)
    if confirm == 0:
        frame = candidates
    elif plans:
        frame = _annotate(study, pd.DataFrame(plans), slo, scheduler, dropped)
    else:
        frame = pd.DataFrame(columns=list(PLAN_COLUMNS))
    result = PlanSearchResult(frame, dropped, candidates, study, objective, slo, plan_load.describe(),
                              why, runs, {k: v for k, v in space.items() if v is not None}, notes)
    if frame.empty:
        first = f"; the first, {describe(dropped[0])}: {dropped[0]['why']}" if dropped else ""
        raise NoPlanError(f"none of the {runs} candidates served meets the SLOs in the engine{first}", result)
    return result


def _check_slo(slo_ttft_s: float | None, slo_tpot_s: float | None) -> dict[str, float]:
    slo = {k: v for k, v in (("ttft_s", slo_ttft_s), ("tpot_s", slo_tpot_s)) if v is not None}
    if not slo:
        raise InferSimError("give at least one SLO: --slo-ttft S and/or --slo-tpot S")
    for name, value in slo.items():
        flag = "--slo-ttft" if name == "ttft_s" else "--slo-tpot"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InferSimError(f"{flag} must be a positive number of seconds, got {value!r}")
    return {k: float(v) for k, v in slo.items()}


def _confirm(model: str, ranked: pd.DataFrame, plan_load: _Load, slo: Mapping[str, float], confirm: int,
             scheduler: str, load: float, seed: int,
             limit: int) -> tuple[list[pd.Series], list[dict[str, Any]], int]:
    """Down the ranking: serve each configuration not yet confirmed, until ``confirm`` pass. A
    configuration the engine cannot run (it raises) is not tried again at another batch."""
    plans: list[pd.Series] = []
    dropped: list[dict[str, Any]] = []
    runs = 0
    settled: set[tuple] = set()
    for _, row in ranked.iterrows():
        if len(plans) >= confirm or runs >= limit:
            break
        key = tuple(row[name] for name in GROUP)
        if key in settled:
            continue
        runs += 1
        try:
            engine, misses = confirm_plan(model, row, plan_load, slo, scheduler, load, seed)
        except InferSimError as err:
            settled.add(key)
            dropped.append({**plan_record(row, engine=False), "engine": None,
                            "why": f"the engine raised: {err}"})
            continue
        if misses:
            dropped.append({**plan_record(row, engine=False), "engine": engine, "why": "; ".join(misses)})
            continue
        settled.add(key)
        plans.append(pd.concat([row, pd.Series({f"engine_{k}": v for k, v in engine.items()})]))
    return plans, dropped, runs


def _annotate(study: pd.DataFrame, rows: pd.DataFrame, slo: Mapping[str, float], scheduler: str,
              dropped: Sequence[Mapping[str, Any]] = ()) -> pd.DataFrame:
    """Plans with their strategy and binding constraints, replicas and devices as whole numbers."""
    out = rows.copy().reset_index(drop=True)
    bindings = [_binding(study, row, slo, dropped) for _, row in out.iterrows()]
    out["strategy"] = [_strategy(row, scheduler) for _, row in out.iterrows()]
    out["binding"] = [b for b, _ in bindings]
    out["binding_devices"] = [d for _, d in bindings]
    for name in ("replicas", "devices"):
        out[name] = out[name].astype(np.int64)
    return out
