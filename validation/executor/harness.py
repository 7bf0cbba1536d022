"""Run a greedy generation and measure it: step times, kernel times, peak memory.

``execute`` builds the model from a seed, allocates the KV cache once
(``B x (P + G - 1)`` positions, reused by every run, as a server preallocates
it), runs one warm-up generation with memory tracking, then ``repeats`` timed
generations without it.

Peak memory = weights + KV cache + the activation high-water mark of the
warm-up run. The activation peak is measured as

* numpy: ``tracemalloc`` peak (numpy reports its buffers to it) — kept out of the
  timed runs because it slows every allocation;
* torch CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before;
* torch CPU: growth of the resident set (``VmHWM - VmRSS`` before), coarser.

``contention`` gives the load average before and after the timed runs and the
share of CPU time the hypervisor stole during them: a noisy neighbour shows there.

``rss_peak_bytes`` is the process's resident high-water mark over the warm-up
(reset first where Linux allows), interpreter and libraries included.
"""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Callable
from time import perf_counter
from typing import Any

import numpy as np

from simulator.errors import DoesNotFitError, InferSimError
from simulator.specs.loader import load_model
from simulator.specs.model import ModelSpec
from validation.executor import machine
from validation.executor.model import Backend, KVCache, Transformer
from validation.executor.numpy_backend import NumpyBackend
from validation.executor.results import (
    ExecutionResult,
    Generation,
    MemoryRecord,
    RepeatResult,
    StepRecord,
    counter_breakdown,
    op_breakdown,
)
from validation.executor.weights import ModelWeights, check_supported, init_weights

BACKENDS = ("numpy", "torch")


def make_backend(name: str, device: str = "cpu", dtype: str = "float32") -> Backend:
    """The named backend on ``device``; torch is imported only when asked for."""
    if name == "numpy":
        if device != "cpu":
            raise InferSimError(f"the numpy backend runs on the CPU only (got device {device!r})")
        return NumpyBackend(dtype)
    if name == "torch":
        from validation.executor.torch_backend import load_torch_backend

        return load_torch_backend(device, dtype)
    raise InferSimError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def prompt_tokens(vocab_size: int, batch: int, input_len: int, seed: int) -> np.ndarray:
    """Random prompt ids ``[B, P]`` from ``seed + 1`` (the weights use ``seed``)."""
    return np.random.default_rng(seed + 1).integers(0, vocab_size, size=(batch, input_len))


def generate(runtime: Transformer, prompt: np.ndarray, output_len: int, cache: KVCache,
             collectives: Callable[[], dict[str, tuple[int, int, float]]] | None = None) -> Generation:
    """Prefill the prompt, then ``output_len - 1`` greedy decode steps, timing each step.

    ``collectives`` (a parallel worker's ``ShmGroup.take_stats``) gives each step's calls, bytes and
    seconds per collective when the step is done.
    """
    profiler, ops = runtime.profiler, runtime.ops
    ids, start = prompt, 0
    tokens, steps = [], []
    with ops.context():
        ops.synchronize()
        begin = perf_counter()
        for index in range(output_len):
            profiler.reset()
            runtime.counters.clear()
            step_start = perf_counter()
            logits = runtime.forward(ids, start, cache)
            next_ids = profiler("sampling", ops.argmax, logits)  # a host copy: waits for the device
            wall = perf_counter() - step_start
            steps.append(StepRecord(
                phase="prefill" if index == 0 else "decode", wall_s=wall,
                kernel_s=profiler.kernel_s, kernels=profiler.kernels,
                ops={name: (total.count, total.time_s) for name, total in profiler.ops.items()},
                collectives=collectives() if collectives is not None else {},
                counters=runtime.take_counters(),
            ))
            tokens.append(next_ids)
            start += ids.shape[1]
            ids = next_ids[:, None]
        e2e = perf_counter() - begin
    return Generation(np.stack(tokens, axis=1), steps, e2e)


def check_shape(spec: ModelSpec, batch: int, input_len: int, output_len: int, repeats: int) -> None:
    for name, value in (("batch", batch), ("input_len", input_len), ("output_len", output_len),
                        ("repeats", repeats)):
        if value < 1:
            raise InferSimError(f"{name} must be at least 1 (got {value})")
    if spec.position_encoding == "learned" and input_len + output_len - 1 > spec.max_position_embeddings:
        raise InferSimError(
            f"input_len + output_len - 1 = {input_len + output_len - 1} exceeds the model's "
            f"{spec.max_position_embeddings} learned positions"
        )


def estimate_bytes(spec: ModelSpec, batch: int, input_len: int, output_len: int, bytes_per: int) -> int:
    """Rough footprint: weights + KV cache + prefill scores (``B H P^2``, float32) + 8 wide activations."""
    cache = spec.kv_elements_per_token() * batch * (input_len + output_len - 1) * bytes_per
    scores = batch * spec.num_attention_heads * input_len * input_len * 4
    widest = max(spec.hidden_size, 2 * spec.ffn.intermediate_size,
                 (spec.num_attention_heads + 2 * spec.kv_heads) * spec.head_size)
    return spec.params() * bytes_per + cache + scores + 8 * batch * input_len * widest * 4


def check_fits(spec: ModelSpec, backend: Backend, batch: int, input_len: int, output_len: int,
               extra_bytes: int = 0) -> None:
    """``estimate_bytes`` plus ``extra_bytes`` (a draft model, worker processes' copies) against
    the memory free on the backend's device."""
    bytes_per = 4 if backend.dtype == "float32" else 2
    need = estimate_bytes(spec, batch, input_len, output_len, bytes_per) + extra_bytes
    if backend.device == "cpu":
        have = machine.available_memory_bytes()
    else:
        import torch

        have = torch.cuda.mem_get_info(torch.device(backend.device))[0]
    if have is not None and need > have:
        raise DoesNotFitError(
            f"{spec.name} at batch {batch}, {input_len} + {output_len} tokens needs about "
            f"{need / 2**30:.1f} GiB on {backend.device}, {(need - have) / 2**30:.1f} GiB more than "
            f"the {have / 2**30:.1f} GiB available; lower the batch or input length",
            required_bytes=need, capacity_bytes=have,
        )


def measure_memory(backend: Backend, weights_bytes: int, kv_cache_bytes: int,
                   run: Callable[[], object]) -> MemoryRecord:
    """Run ``run`` (a warm-up generation) measuring the activation peak as the module docstring says."""
    cuda = backend.device.startswith("cuda")
    machine.reset_peak_rss()
    rss_before = machine.current_rss_bytes() or 0
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(backend.device)
        allocated = torch.cuda.memory_allocated(backend.device)
        run()
        activations = torch.cuda.max_memory_allocated(backend.device) - allocated
        method = "torch.cuda.max_memory_allocated"
    elif backend.name == "numpy":
        tracemalloc.start()
        try:
            run()
            activations = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        method = "tracemalloc"
    else:
        run()
        activations = max(machine.peak_rss_bytes() - rss_before, 0)
        method = "rss growth"
    return MemoryRecord(
        weights_bytes=weights_bytes, kv_cache_bytes=kv_cache_bytes,
        activations_peak_bytes=int(activations), rss_peak_bytes=machine.peak_rss_bytes(),
        method=f"weights + kv cache + activation peak ({method})",
    )


def execute(
    model: str | ModelSpec,
    batch: int = 1,
    input_len: int = 128,
    output_len: int = 32,
    backend: str = "numpy",
    device: str = "cpu",
    dtype: str = "float32",
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    weights: ModelWeights | None = None,
    offload_layers: int = 0,
    prefetch: bool = True,
    kv_window: int | None = None,
    kv_policy: str = "full",
    kv_budget: float | None = None,
    kv_sinks: int = 4,
    kv_bits: int | None = None,
    kv_residual: int = 0,
    expert_cache: float | None = None,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    micro_batches: int = 1,
    draft_model: str | ModelSpec | None = None,
    spec_gamma: int = 4,
    spec_alpha: float = 0.8,
) -> ExecutionResult:
    """Run ``warmup`` + ``repeats`` greedy generations of ``batch`` random prompts; medians and noise.

    ``weights`` (from ``init_weights(spec, seed)``) saves building them again when one model
    runs many cases. A parallel plan (``tp``, ``ep``, ``pp``, ``micro_batches``) runs in worker
    processes (``validation.executor.parallel``), which draw their own weights; ``draft_model``
    turns on speculative decoding (``validation.executor.speculative``), ``weights`` being the
    target's. Neither combines with the memory-hierarchy strategies below.

    Memory-hierarchy strategies (numpy backend, except the window): ``offload_layers`` (the last
    layers' weights on disk, ``validation.executor.offload``); ``kv_policy`` ``"window"``,
    ``"streaming"`` or ``"h2o"`` keeping ``kv_budget`` tokens (a count, or a fraction of
    ``input_len + output_len`` when at most 1, as ``infersim estimate --kv-budget``), ``kv_sinks``
    of them sinks for streaming (``validation.executor.kv``); ``kv_window=N`` is
    ``kv_policy="window", kv_budget=N``; ``kv_bits`` 8, 4 or 2 quantizes the KV cache as KIVI
    does with ``kv_residual`` recent tokens in float32; ``expert_cache`` keeps that fraction of
    each MoE layer's experts in memory and the rest on disk (``validation.executor.experts``).
    """
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    parallel = (tp, ep, pp, micro_batches) != (1, 1, 1, 1)
    if parallel or draft_model is not None:
        if (offload_layers or kv_window is not None or kv_policy != "full" or kv_budget is not None
                or kv_bits is not None or kv_residual or expert_cache is not None):
            raise InferSimError("parallel plans and speculative decoding run without offloaded layers, "
                                "KV eviction or quantization, or an expert cache; drop --offload-weights "
                                "/ --kv-policy / --kv-dtype / --expert-cache")
        if parallel and draft_model is not None:
            raise InferSimError("speculative decoding runs in one process; drop --tp/--ep/--pp/"
                                "--micro-batches or --draft-model")
        if backend != "numpy" or device != "cpu":
            raise InferSimError("parallel plans and speculative decoding run on the numpy backend "
                                f"on the CPU only (got {backend}/{device})")
        if parallel:
            from validation.executor.parallel import execute_parallel

            return execute_parallel(spec, batch, input_len, output_len, tp=tp, ep=ep, pp=pp,
                                    micro_batches=micro_batches, repeats=repeats, warmup=warmup,
                                    seed=seed, dtype=dtype)
        from validation.executor.speculative import execute_speculative

        return execute_speculative(spec, draft_model, batch, input_len, output_len, spec_gamma,
                                   spec_alpha, repeats=repeats, warmup=warmup, seed=seed,
                                   weights=weights)
    check_supported(spec)
    check_shape(spec, batch, input_len, output_len, repeats)
    window, kv_strategy = memory_strategies(spec, backend, input_len, output_len, kv_window, kv_policy,
                                            kv_budget, kv_sinks, kv_bits, kv_residual, expert_cache,
                                            offload_layers)
    runtime_backend = make_backend(backend, device, dtype)
    check_fits(spec, runtime_backend, batch, input_len, output_len)
    if not 0 <= offload_layers <= spec.num_layers:
        raise InferSimError(f"offloaded layers must be between 0 and {spec.num_layers} "
                            f"({spec.name} has {spec.num_layers}), got {offload_layers}")
    runtime = Transformer(spec, runtime_backend, weights or init_weights(spec, seed))
    try:
        if offload_layers:
            runtime.offload_layers(offload_layers, prefetch)
        if expert_cache is not None:
            runtime.cache_experts(expert_cache)
        runtime.kv_window = window
        runtime.kv_strategy = kv_strategy
        return _run(runtime, spec, runtime_backend, batch, input_len, output_len, repeats, warmup, seed)
    finally:
        runtime.close()


def memory_strategies(spec: ModelSpec, backend: str, input_len: int, output_len: int,
                      kv_window: int | None, kv_policy: str, kv_budget: float | None, kv_sinks: int,
                      kv_bits: int | None, kv_residual: int, expert_cache: float | None,
                      offload_layers: int) -> tuple[int | None, Any]:
    """The KV window (tokens) and the evicting or quantized cache the options ask for
    (``validation.executor.kv``); a combination the executor does not run raises ``InferSimError``."""
    from simulator.dtypes import DEFAULT_GROUP_SIZE
    from simulator.strategies.kv import KVPolicy
    from validation.executor.kv import Eviction, Quantization

    policy = KVPolicy.chosen(kv_policy, kv_budget, kv_sinks)  # checked as `infersim estimate` checks it
    window = kv_window
    if kv_window is not None:
        if policy is not None:
            raise InferSimError("kv_window is kv_policy='window' with kv_budget; give one or the other")
        if kv_window < 1:
            raise InferSimError(f"the KV window must be at least 1 token, got {kv_window}")
    strategy: Any = None
    if policy is not None:
        budget = policy.budget_tokens(input_len, output_len)
        if policy.kind == "window":
            window = budget
        else:
            strategy = Eviction(policy.kind, budget, policy.sinks if policy.kind == "streaming" else 0)
    if kv_bits is not None:
        if policy is not None or kv_window is not None:
            raise InferSimError("the executor quantizes a cache that keeps every token; drop --kv-policy "
                                "or --kv-dtype")
        strategy = Quantization(kv_bits, kv_residual, DEFAULT_GROUP_SIZE)
        strategy.check(spec.kv_heads, spec.head_size)
    elif kv_residual:
        raise InferSimError("--kv-residual keeps recent tokens in float32 beside a quantized cache; it "
                            "needs --kv-dtype int8, int4 or int2")
    if (strategy is not None or expert_cache is not None) and backend != "numpy":
        raise InferSimError(f"streaming and h2o eviction, KV quantization and experts on disk run on the "
                            f"numpy backend only (got {backend}); use --backend numpy")
    if strategy is not None and spec.sliding_window is not None:
        raise InferSimError(f"{spec.name} has a sliding window of {spec.sliding_window}; the executor's "
                            "evicting and quantized caches run models without one")
    if expert_cache is not None:
        if spec.moe is None:
            raise InferSimError(f"--expert-cache needs a mixture-of-experts model; {spec.name} is dense")
        if not 0.0 <= expert_cache <= 1.0:
            raise InferSimError(f"--expert-cache must be a fraction between 0 and 1, got {expert_cache:g}")
        if offload_layers:
            raise InferSimError("the executor runs experts on disk or layers on disk, not both; drop "
                                "--offload-weights or --expert-cache")
    return window, strategy


def describe_strategies(runtime: Transformer, cache: KVCache) -> dict[str, Any] | None:
    """The result's ``strategy``: what the run held where (its counters are added per phase)."""
    out: dict[str, Any] = {}
    if runtime.disk is not None:
        out["offload"] = {"layers_on_disk": runtime.disk.count - runtime.disk.first,
                          "layer_bytes": runtime.disk.layer_bytes, "prefetch": runtime.disk.pool is not None}
    if runtime.kv_window is not None:
        out["kv_policy"] = {"kind": "window", "budget_tokens": runtime.kv_window}
    if runtime.kv_strategy is not None:
        described = runtime.kv_strategy.describe()
        if hasattr(cache, "parts_bytes"):
            out["kv_quantization"] = {**described, **cache.parts_bytes()}
        else:
            out["kv_policy"] = described
    if runtime.experts is not None:
        out["expert_cache"] = runtime.experts.describe()
    return out or None


def _run(runtime: Transformer, spec: ModelSpec, runtime_backend: Backend, batch: int, input_len: int,
         output_len: int, repeats: int, warmup: int, seed: int) -> ExecutionResult:
    prompt = prompt_tokens(spec.vocab_size, batch, input_len, seed)
    cache = runtime.new_cache(batch, input_len + output_len - 1)
    if runtime.experts is not None:
        # The cached experts are the most routed by an untimed prefill of another prompt (a profile).
        with runtime.ops.context():
            runtime.forward(prompt_tokens(spec.vocab_size, batch, input_len, seed + 2), 0, cache)
        runtime.experts.choose_popular()
        runtime.take_counters()
    memory = measure_memory(runtime.ops, runtime.weight_bytes, cache.nbytes(),
                            lambda: generate(runtime, prompt, output_len, cache))
    for _ in range(warmup - 1):
        generate(runtime, prompt, output_len, cache)
    cpu_before, load_before = machine.cpu_times(), os.getloadavg()[0]
    runs = [generate(runtime, prompt, output_len, cache) for _ in range(repeats)]
    contention = machine.contention(cpu_before, load_before)
    return summarize(spec, runtime_backend, input_len, seed, memory, runs, contention,
                     machine.machine_info(runtime_backend.name, runtime_backend.device),
                     describe_strategies(runtime, cache))


def summarize(spec: ModelSpec, backend: Backend, input_len: int, seed: int, memory: MemoryRecord,
              runs: list[Generation], contention: dict[str, float | None],
              machine_info: dict[str, Any], strategy: dict[str, Any] | None = None) -> ExecutionResult:
    """The result of timed generations ``runs``: per-repeat metrics and the median repeat's op table
    (and, with a ``strategy``, its counters per step of each phase)."""
    results = [RepeatResult.of(run) for run in runs]
    # The per-op table of the repeat whose e2e is the median.
    middle = sorted(range(len(runs)), key=lambda i: runs[i].e2e_s)[len(runs) // 2]
    ops: dict[str, Any] = {"prefill": op_breakdown(runs[middle].steps[:1]),
                           "decode": op_breakdown(runs[middle].decode_steps)}
    if strategy is not None:
        counters = {"prefill": counter_breakdown(runs[middle].steps[:1]),
                    "decode": counter_breakdown(runs[middle].decode_steps)}
        names = sorted({name for phase in counters.values() for name in phase})
        strategy = {**strategy, "counters": {phase: {name: values.get(name, 0.0) for name in names}
                                             for phase, values in counters.items()}}
    batch, output_len = runs[0].tokens.shape
    return ExecutionResult(
        model=spec.name, backend=backend.name, device=backend.device, dtype=backend.dtype, batch=batch,
        input_len=input_len, output_len=output_len, seed=seed, memory=memory, repeats=results,
        ops=ops, output_tokens=[int(t) for t in runs[-1].tokens[0]], contention=contention,
        machine=machine_info, strategy=strategy,
    )
