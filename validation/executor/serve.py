"""A real serving loop over the reference executor: the measured run the simulated engine
(``simulator.engine``) is validated against.

Requests (arrival time, prompt tokens, output tokens) arrive on the wall clock
(``time.perf_counter`` from the loop's start). One thread runs::

    while requests remain:
        waiting += requests whose arrival time has passed              # FCFS queue
        plan = scheduler(waiting, running, free KV tokens)             # admissions, chunks, decodes
        if the plan is empty: sleep until the next arrival             # nothing running or admissible
        logits = Transformer.forward_ragged(plan's new tokens)         # every request's tokens in one GEMM
        greedy argmax for each request that finished its prompt or decoded
        a request with all its output tokens completes; its KV cache is freed

Schedulers (``ServeConfig.scheduler``), both first come, first served, never skipping the head
of the queue:

* ``continuous`` (vLLM's default scheduler, prefill priority): if the head of the waiting
  queue can be admitted, the iteration is prefill only: it admits waiting requests while the
  running count stays within ``max_batch``, their prompts within ``max_batch_tokens`` and their
  KV reservations within ``kv_capacity_tokens``; a prompt goes in whole. Otherwise the
  iteration decodes one token of every running request.
* ``chunked`` (Sarathi-Serve): a budget of ``chunk_size`` tokens per iteration (or
  ``max_batch_tokens`` when given and smaller). Decodes go first (one token each, at most the
  budget), then the prompt chunks of partly prefilled requests in admission order, then new
  admissions (within ``max_batch`` and the KV capacity), each chunk ``min(prompt left, budget
  left)``.

KV memory: at admission a request gets its own cache of ``prompt + output`` positions (batch 1)
and reserves that many tokens against ``kv_capacity_tokens``, which delays admission when
full; the reservation is released at completion. There is no preemption (v1): a reservation
is never taken back, so ``preemptions`` is always 0. Tokens are greedy (argmax); a request
produces exactly its ``output_tokens`` (no EOS), the first at the end of the iteration that
finishes its prompt.

Records: a ``simulator.engine.records.ServeRecords``, replica 0, pool ``"mixed"``. Iterations
carry the KV tokens reserved during the iteration as ``kv_blocks_used`` (block size 1) and
their kernel time (``kernel_s``, from the profiler); requests carry ``tbt_max_s``, their
largest gap between consecutive tokens (NaN with one output token). Power is not measured:
``power_w`` and ``energy_j`` are 0.0 and ``meta["power_measured"]`` is False. One untimed
warm-up iteration (a prompt chunk and a decode) runs before the clock starts.

Workloads: ``poisson_requests`` (seeded Poisson arrivals, fixed or uniform lengths) and
``trace_requests`` (a CSV of ``arrived_at,num_prefill_tokens,num_decode_tokens``, the Azure
LLM inference trace's format, cut, time-scaled and length-scaled to what this CPU can run).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from simulator.engine.records import ITERATION_COLUMNS, REQUEST_COLUMNS, ServeRecords
from simulator.errors import DoesNotFitError, InferSimError
from simulator.specs.loader import load_model
from simulator.specs.model import ModelSpec
from validation.executor import machine
from validation.executor.harness import make_backend
from validation.executor.model import KVCache, Transformer
from validation.executor.weights import ModelWeights, check_supported, init_weights

SCHEDULERS = ("continuous", "chunked")
TRACE_COLUMNS = ("arrived_at", "num_prefill_tokens", "num_decode_tokens")
# vLLM's max_num_batched_tokens floor without chunked prefill (raised to the longest prompt).
DEFAULT_MAX_BATCH_TOKENS = 2048
# The default KV capacity: every request at once, or this share of the free memory if less.
DEFAULT_KV_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class Request:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class ServeConfig:
    """Scheduler limits; ``None`` limits are resolved against the requests by ``resolve``."""

    scheduler: str = "continuous"
    max_batch: int = 32
    max_batch_tokens: int | None = None  # continuous: default max(2048, longest prompt)
    chunk_size: int = 256  # chunked: the budget is min(chunk_size, max_batch_tokens)
    kv_capacity_tokens: int | None = None  # default: all requests at once, within free memory

    def resolve(self, spec: ModelSpec, requests: Sequence[Request]) -> ServeConfig:
        """The limits filled in and checked against ``requests`` (``InferSimError`` naming the flag)."""
        if self.scheduler not in SCHEDULERS:
            raise InferSimError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        for flag, value in (("--max-batch", self.max_batch), ("--chunk-size", self.chunk_size),
                            ("--max-batch-tokens", self.max_batch_tokens),
                            ("--kv-capacity-tokens", self.kv_capacity_tokens)):
            if value is not None and value < 1:
                raise InferSimError(f"{flag} must be at least 1 (got {value})")
        longest = max(r.prompt_tokens for r in requests)
        batch_tokens = self.max_batch_tokens  # chunked: a cap on chunk_size when given
        if self.scheduler == "continuous":
            batch_tokens = batch_tokens or max(DEFAULT_MAX_BATCH_TOKENS, longest)
            if longest > batch_tokens:
                raise InferSimError(f"a {longest}-token prompt exceeds --max-batch-tokens {batch_tokens}; "
                                    "the continuous scheduler admits prompts whole: raise it or use "
                                    "--scheduler chunked")
        token_bytes = spec.kv_elements_per_token() * 4  # float32 K and V
        free = machine.available_memory_bytes()
        capacity = self.kv_capacity_tokens
        if capacity is None:
            capacity = sum(r.prompt_tokens + r.output_tokens for r in requests)
            if free is not None:
                capacity = min(capacity, int(free * DEFAULT_KV_MEMORY_SHARE) // token_bytes)
        elif free is not None and capacity * token_bytes > free:
            need = capacity * token_bytes
            raise DoesNotFitError(f"--kv-capacity-tokens {capacity} needs {need / 2**30:.1f} GiB of KV, "
                                  f"more than the {free / 2**30:.1f} GiB free; lower it",
                                  required_bytes=need, capacity_bytes=free)
        biggest = max(r.prompt_tokens + r.output_tokens for r in requests)
        if biggest > capacity:
            raise InferSimError(f"a request of {biggest} tokens (prompt + output) exceeds the KV capacity of "
                                f"{capacity} tokens; raise --kv-capacity-tokens or shorten the requests")
        return ServeConfig(self.scheduler, self.max_batch, batch_tokens, self.chunk_size, capacity)


@dataclass(frozen=True)
class Plan:
    """One iteration: admit the first ``admit`` waiting requests, then run the prompt chunks
    ``prefill`` (request id, tokens) and one decode token of each of ``decode`` (request ids)."""

    admit: int
    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()


@dataclass
class _Live:
    """A request admitted to the loop: its cache, its progress and its token times."""

    request: Request
    prompt: np.ndarray
    cache: KVCache
    scheduled_s: float
    prefilled: int = 0
    last_token: int = 0
    token_times: list[float] = field(default_factory=list)


class _Work(NamedTuple):
    """One request's part of an iteration: new tokens ``ids`` at positions ``start ..``."""

    item: _Live
    ids: np.ndarray
    start: int
    emits: bool  # a decode, or the chunk that ends the prompt


def _reserve(request: Request) -> int:
    return request.prompt_tokens + request.output_tokens


def plan_continuous(waiting: Sequence[Request], running: Sequence[_Live], kv_free: int,
                    config: ServeConfig) -> Plan:
    """Prefill priority: admit whole prompts while they fit, else decode every running request."""
    assert config.max_batch_tokens is not None
    admit, tokens = 0, 0
    for request in waiting:
        if (len(running) + admit + 1 > config.max_batch
                or tokens + request.prompt_tokens > config.max_batch_tokens
                or _reserve(request) > kv_free):
            break
        admit, tokens, kv_free = admit + 1, tokens + request.prompt_tokens, kv_free - _reserve(request)
    if admit:
        return Plan(admit, tuple((r.request_id, r.prompt_tokens) for r in list(waiting)[:admit]))
    return Plan(0, decode=tuple(live.request.request_id for live in running))


def plan_chunked(waiting: Sequence[Request], running: Sequence[_Live], kv_free: int,
                 config: ServeConfig) -> Plan:
    """Sarathi-Serve: decodes first, then prompt chunks (running, then admitted) fill the budget."""
    budget = token_budget(config)
    decode = [live.request.request_id for live in running
              if live.prefilled == live.request.prompt_tokens][:budget]
    budget -= len(decode)
    prefill = []
    for live in running:
        left = live.request.prompt_tokens - live.prefilled
        if left and budget:
            prefill.append((live.request.request_id, min(left, budget)))
            budget -= prefill[-1][1]
    admit = 0
    for request in waiting:
        if not budget or len(running) + admit + 1 > config.max_batch or _reserve(request) > kv_free:
            break
        prefill.append((request.request_id, min(request.prompt_tokens, budget)))
        admit, budget, kv_free = admit + 1, budget - prefill[-1][1], kv_free - _reserve(request)
    return Plan(admit, tuple(prefill), tuple(decode))


def token_budget(config: ServeConfig) -> int:
    """New tokens one iteration may carry: ``chunk_size`` (capped by ``max_batch_tokens`` when
    given) when chunked, ``max_batch_tokens`` when continuous (resolved: never ``None``)."""
    if config.scheduler == "chunked":
        return min(config.chunk_size, config.max_batch_tokens or config.chunk_size)
    assert config.max_batch_tokens is not None
    return config.max_batch_tokens


SCHEDULE = {"continuous": plan_continuous, "chunked": plan_chunked}


def serve(model: str | ModelSpec, requests: Sequence[Request], config: ServeConfig | None = None,
          seed: int = 0, backend: str = "numpy", device: str = "cpu", dtype: str = "float32",
          weights: ModelWeights | None = None) -> ServeRecords:
    """Serve ``requests`` on the wall clock with random weights from ``seed`` (prompt ids from
    ``seed + 1``); the module docstring gives the loop and its policies."""
    spec = load_model(model)
    check_supported(spec)
    check_requests(spec, requests)
    config = (config or ServeConfig()).resolve(spec, requests)
    runtime = Transformer(spec, make_backend(backend, device, dtype), weights or init_weights(spec, seed))
    rng = np.random.default_rng(seed + 1)
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
    prompts = {r.request_id: rng.integers(0, spec.vocab_size, r.prompt_tokens) for r in ordered}
    meta = {"source": "validation.executor.serve", "model": spec.name, "backend": backend,
            "device": device, "dtype": dtype, "seed": seed, **asdict(config),
            "kv_accounting": "tokens reserved at admission (prompt + output), block size 1",
            "preemption": "none", "power_measured": False, "idle_energy_j": 0.0}
    try:
        with runtime.ops.context():
            meta["warmup_s"] = _warm_up(runtime, ordered, config)
            return _loop(runtime, ordered, prompts, config, meta)
    finally:
        runtime.close()


def check_requests(spec: ModelSpec, requests: Sequence[Request]) -> None:
    if not requests:
        raise InferSimError("no requests to serve: give --requests N >= 1 or a non-empty --trace")
    for r in requests:
        if r.prompt_tokens < 1 or r.output_tokens < 1:
            raise InferSimError(f"request {r.request_id} has {r.prompt_tokens} prompt and {r.output_tokens} "
                                "output tokens; each must be at least 1 (--input-len, --output-len)")
        if r.prompt_tokens + r.output_tokens - 1 > spec.max_position_embeddings:
            raise InferSimError(
                f"request {r.request_id} needs {r.prompt_tokens + r.output_tokens - 1} positions (prompt "
                f"{r.prompt_tokens} + output {r.output_tokens} - 1), more than {spec.name}'s "
                f"{spec.max_position_embeddings}; lower --input-len/--output-len or clip a trace with "
                "--max-input-len/--max-output-len")


def _warm_up(runtime: Transformer, requests: Sequence[Request], config: ServeConfig) -> float:
    """One untimed ragged iteration (a prompt chunk and a decode) so BLAS threads, the RoPE table
    and the allocator are ready when the clock starts; returns its seconds."""
    chunk = min(max(r.prompt_tokens for r in requests), token_budget(config))
    caches = [runtime.new_cache(1, chunk + 1), runtime.new_cache(1, 2)]
    begin = perf_counter()
    logits = runtime.forward_ragged([np.zeros(chunk, np.int64), np.zeros(1, np.int64)], [0, 1], caches)
    runtime.ops.argmax(logits)
    runtime.profiler.reset()
    runtime.take_counters()
    return perf_counter() - begin


def _loop(runtime: Transformer, requests: Sequence[Request], prompts: dict[int, np.ndarray],
          config: ServeConfig, meta: dict[str, Any]) -> ServeRecords:
    """The scheduler loop: the only place with mutable serving state."""
    assert config.kv_capacity_tokens is not None
    schedule, profiler, ops = SCHEDULE[config.scheduler], runtime.profiler, runtime.ops
    pending, waiting = deque(requests), deque[Request]()
    running: list[_Live] = []
    kv_used = 0
    iterations: list[dict[str, Any]] = []
    finished: list[dict[str, Any]] = []
    gaps: list[np.ndarray] = []
    clock = perf_counter()
    while pending or waiting or running:
        start = perf_counter() - clock
        while pending and pending[0].arrival_s <= start:
            waiting.append(pending.popleft())
        plan = schedule(waiting, running, config.kv_capacity_tokens - kv_used, config)
        if not (plan.prefill or plan.decode):
            if running or waiting or not pending:  # every scheduler admits the head into an idle loop
                raise RuntimeError(f"{config.scheduler} scheduler planned nothing with "
                                   f"{len(running)} running and {len(waiting)} waiting")
            time.sleep(max(0.0, pending[0].arrival_s - (perf_counter() - clock)))
            continue
        for _ in range(plan.admit):
            request = waiting.popleft()
            running.append(_Live(request, prompts[request.request_id],
                                 runtime.new_cache(1, _reserve(request)), start))
            kv_used += _reserve(request)
        live = {item.request.request_id: item for item in running}
        step = [_Work(item, np.array([item.last_token]),
                      item.request.prompt_tokens + len(item.token_times) - 1, True)
                for item in (live[rid] for rid in plan.decode)]
        for rid, count in plan.prefill:
            item = live[rid]
            end = item.prefilled + count
            step.append(_Work(item, item.prompt[item.prefilled:end], item.prefilled,
                              end == item.request.prompt_tokens))
            item.prefilled = end
        profiler.reset()
        logits = runtime.forward_ragged([w.ids for w in step], [w.start for w in step],
                                        [w.item.cache for w in step], [w.emits for w in step])
        tokens = profiler("sampling", ops.argmax, logits).tolist() if logits is not None else []
        end_s = perf_counter() - clock
        iterations.append({
            "iteration": len(iterations), "replica": 0, "pool": "mixed", "start_s": start, "end_s": end_s,
            "prefill_requests": len(plan.prefill), "prefill_tokens": sum(n for _, n in plan.prefill),
            "decode_requests": len(plan.decode), "decode_tokens": len(plan.decode),
            "kv_blocks_used": kv_used, "kv_blocks_total": config.kv_capacity_tokens, "power_w": 0.0,
            "kernel_s": profiler.kernel_s,
        })
        for item, token in zip([w.item for w in step if w.emits], tokens, strict=True):
            item.last_token = int(token)
            item.token_times.append(end_s)
            if len(item.token_times) == item.request.output_tokens:
                running.remove(item)
                kv_used -= _reserve(item.request)
                finished.append(_request_row(item))
                gaps.append(np.diff(item.token_times))
    meta["wall_s"] = perf_counter() - clock
    frame = pd.DataFrame(finished, columns=[*REQUEST_COLUMNS, "tbt_max_s"])
    return ServeRecords(
        requests=frame.sort_values("request_id", ignore_index=True),
        iterations=pd.DataFrame(iterations, columns=[*ITERATION_COLUMNS, "kernel_s"]),
        token_gaps_s=np.concatenate(gaps) if gaps else np.zeros(0), meta=meta,
    )


def _request_row(item: _Live) -> dict[str, Any]:
    r, times = item.request, item.token_times
    return {"request_id": r.request_id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens, "scheduled_s": item.scheduled_s, "first_token_s": times[0],
            "completion_s": times[-1], "preemptions": 0, "replica": 0, "pool": "mixed", "energy_j": 0.0,
            "tbt_max_s": float(np.diff(times).max()) if len(times) > 1 else float("nan")}


# --- workloads ----------------------------------------------------------------------------


def _lengths(rng: np.random.Generator, length: int | tuple[int, int], count: int, flag: str) -> np.ndarray:
    """``count`` lengths: all ``length``, or uniform integers in ``[lo, hi]``."""
    lo, hi = (length, length) if isinstance(length, int) else length
    if not 1 <= lo <= hi:
        shown = lo if lo == hi else f"{lo}:{hi}"
        raise InferSimError(f"{flag} {shown}: give N >= 1, or LO:HI with 1 <= LO <= HI")
    return rng.integers(lo, hi + 1, count)


def poisson_requests(rate_qps: float, count: int, input_len: int | tuple[int, int],
                     output_len: int | tuple[int, int], seed: int = 0) -> list[Request]:
    """``count`` requests, the first at 0 s, then exponential gaps of mean ``1 / rate_qps``; each
    length fixed or uniform in ``(lo, hi)``, all drawn from ``seed``."""
    if not rate_qps > 0:
        raise InferSimError(f"--rate must be above 0 requests per second (got {rate_qps:g})")
    if count < 1:
        raise InferSimError(f"--requests must be at least 1 (got {count})")
    rng = np.random.default_rng(seed)
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1.0 / rate_qps, count - 1))])
    prompts = _lengths(rng, input_len, count, "--input-len")
    outputs = _lengths(rng, output_len, count, "--output-len")
    return [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(count)]


def trace_requests(path: str | Path, max_requests: int | None = None, time_scale: float = 1.0,
                   length_scale: float = 1.0, max_input_len: int | None = None,
                   max_output_len: int | None = None) -> list[Request]:
    """The first ``max_requests`` rows of a trace CSV (``TRACE_COLUMNS``), arrivals shifted to
    start at 0 and multiplied by ``time_scale``, lengths multiplied by ``length_scale``, rounded,
    at least 1 and clipped to ``max_input_len`` / ``max_output_len``."""
    for flag, value in (("--time-scale", time_scale), ("--length-scale", length_scale)):
        if not value > 0:
            raise InferSimError(f"{flag} must be above 0 (got {value:g})")
    for flag, limit in (("--max-requests", max_requests), ("--max-input-len", max_input_len),
                        ("--max-output-len", max_output_len)):
        if limit is not None and limit < 1:
            raise InferSimError(f"{flag} must be at least 1 (got {limit})")
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InferSimError(f"--trace {path}: cannot read it as CSV ({err})") from None
    missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
    if missing or not len(frame):
        raise InferSimError(f"--trace {path}: needs rows with columns {', '.join(TRACE_COLUMNS)}"
                            + (f" (missing {', '.join(missing)})" if missing else ""))
    frame = frame.sort_values("arrived_at", kind="stable")
    if max_requests is not None:
        frame = frame.head(max_requests)
    arrivals = (frame["arrived_at"].to_numpy(float) - float(frame["arrived_at"].min())) * time_scale

    def scaled(column: str, limit: int | None) -> np.ndarray:
        values = np.maximum(np.rint(frame[column].to_numpy(float) * length_scale), 1).astype(int)
        return values if limit is None else np.minimum(values, limit)

    prompts = scaled("num_prefill_tokens", max_input_len)
    outputs = scaled("num_decode_tokens", max_output_len)
    return [Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i])) for i in range(len(frame))]
