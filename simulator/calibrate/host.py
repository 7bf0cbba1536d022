"""Calibrate the host CPU as a device: microbenchmarks in, a hardware YAML out.

    infersim calibrate --out hardware_specs/local/NAME.yaml [--quick]

Microbenchmarks only (end-to-end executor runs stay held out for validation):

- GEMMs (numpy float32 matmul, the executor's projections) over skinny and
  square shapes, with the weights rotated through copies larger than the last
  level cache so that decode-sized GEMMs stream from DRAM as they do in a
  model too big for the cache;
- memory streams (``a + b -> c``) from cache-resident sizes to DRAM;
- every other kernel of the numpy executor (norm, RoPE, activation,
  embedding gather, residual add, KV-cache write, attention, sampling) at
  several token counts, timed through the executor's own functions;
- the fixed cost of one numpy call, and the executor's time between kernels
  (Python control flow) per kernel, on a two-layer calibration shape;
- cold reads from disk with the page cache dropped (``posix_fadvise``);
- copies between two processes through shared memory.

The device parameters are then fitted exactly as for a GPU
(``simulator.calibrate.operators.fit_device_to_ops``): each microbenchmark is
an ``Op`` built by the simulator's own op graph, and the fit makes the cost
model reproduce its time. The YAML records the machine, the command, the raw
points and the residuals.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from simulator.errors import InferSimError
from simulator.graph.ops import Op
from simulator.graph.transformer import Precision, StepShape, build_step
from simulator.specs.hardware import Device, DeviceEfficiency, GemmTiling, KernelVolume
from simulator.specs.model import ModelSpec, MoESpec
from simulator.strategies.parallel import WORKER_KINDS

# BLAS on a CPU splits a GEMM's rows between the cores in blocks of its register tile, not in
# GPU thread-block tiles of 64-256 rows: with the GPU list over two "compute units", a 129-row
# GEMM costs as much as a 192-row one, a step OpenBLAS does not take (measured +3% from 128 to
# 129 prompt tokens). One 8-row tile: OpenBLAS's float32 kernel on the 2-core EPYC runs 8 rows
# faster than 4 (0.50 against 0.61 ms for 2048 x 1024), so a 4-row tile only let the fit price
# 2-4 rows below 8; 4- and 16-row tiles besides (commit a04d825) fitted the GEMM points at a
# median 8.9% / p90 26%, this one at 5.0% / 13.8% (with the peak measured and the weights
# packed, ``host_tiling``). The GEMM points include row counts between the powers of two so
# that the fit sees where the steps are.
HOST_TILES = ((8, 256),)
HOST_KINDS = ("gemm", "gemv", "norm", "rope", "activation", "embedding", "elementwise", "cache_write",
              "attention", "softmax", "sampling", "routing")
# The kernels timed after each of several volumes of GEMMs (``KERNEL_FLUSHES``, in last-level
# caches), fitted per volume (``DeviceEfficiency.volumes``): on the 2-core EPYC (2026-11-24) an
# RMSNorm of one row took 20 us after 8-16 MB of GEMMs, 45 after 32, 66 after 64 and 81 after
# 128 MB; a SiLU-gate over 64 rows 352, 400, 474 and 529 us. A model whose layers are smaller
# than the cache runs its small kernels warm (deep-mqa-70m, 6 MB a layer: norms and RoPE at half
# the time one cache's flush gives); one whose layers are larger runs them colder.
VOLUME_KINDS = tuple(kind for kind in HOST_KINDS if kind not in ("gemm", "gemv"))
KERNEL_FLUSHES = (0.25, 1.0, 4.0)
REFERENCE_FLUSH = 1.0
"""The volume the device's plain ``kernels`` are fitted at (with the GEMMs)."""
DEFAULT_CACHE_BYTES = 32 * 2**20
"""The last-level cache assumed where the system does not say."""
NAIVE_ATTENTION = ("attention_scores", "attention_softmax", "attention_values")
FP32 = Precision(weight="fp32", kv="fp32", act="fp32", compute="fp32")
# A calibration shape: its op sizes span those of the shipped executor models.
CALIBRATION_MODEL = ModelSpec(
    name="calibration", architecture="LlamaForCausalLM", num_layers=1, hidden_size=1024,
    num_attention_heads=16, num_kv_heads=8, head_dim=64, ffn={"intermediate_size": 2816},
    vocab_size=32000,
)


# --- the machine ----------------------------------------------------------------------

def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = (part.strip() for part in line.split(":", 1))
                info.setdefault(key, value)
    except OSError:
        pass
    return info


def _cache_bytes(level: str) -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")) if base.is_dir() else []:
        try:
            data_cache = (index / "type").read_text().strip() != "Instruction"
            if (index / "level").read_text().strip() == level and data_cache:
                text = (index / "size").read_text().strip()
                units = {"K": 1024, "M": 1024**2, "G": 1024**3}
                return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    clock_hz: float
    flags: frozenset[str]
    memory_bytes: int
    l2_bytes: int | None
    l3_bytes: int | None
    numpy: str
    blas: str

    @property
    def flops_per_cycle_fp32(self) -> int:
        """Per core: two FMA pipes of 8 (AVX2) or 16 (AVX-512) lanes, two FLOPs each."""
        if "avx512f" in self.flags:
            return 64
        if "avx2" in self.flags and "fma" in self.flags:
            return 32
        return 8

    @property
    def cache_bytes(self) -> int:
        """The last-level cache; 32 MiB where the system does not say."""
        return self.l3_bytes or DEFAULT_CACHE_BYTES

    @property
    def peak_fp32(self) -> float:
        return self.cores * self.clock_hz * self.flops_per_cycle_fp32

    def describe(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu, "cores": self.cores, "clock_ghz": round(self.clock_hz / 1e9, 3),
            "vector": "avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags else "sse",
            "memory_gib": round(self.memory_bytes / 2**30, 1),
            "l2_bytes": self.l2_bytes, "l3_bytes": self.l3_bytes,
            "numpy": self.numpy, "blas": self.blas, "python": platform.python_version(),
        }


def machine() -> Machine:
    info = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")  # type: ignore[call-arg]
        blas_info = config["Build Dependencies"]["blas"]
        blas = f"{blas_info.get('name')} {blas_info.get('version')}"
    except Exception:  # noqa: BLE001 - numpy versions differ in what they report
        pass
    return Machine(
        cpu=info.get("model name", platform.processor() or "unknown"),
        cores=cores,
        clock_hz=float(info.get("cpu MHz", "2000")) * 1e6,
        flags=frozenset(info.get("flags", "").split()),
        memory_bytes=memory,
        l2_bytes=_cache_bytes("2"),
        l3_bytes=_cache_bytes("3"),
        numpy=np.__version__,
        blas=blas,
    )


# --- timing ---------------------------------------------------------------------------

def median_time(fn: Callable[[], object], min_repeats: int = 5, min_seconds: float = 0.05,
                rounds: int = 2) -> float:
    """Wall time of ``fn``: the smallest of ``rounds`` medians, each over enough repeats to fill
    ``min_seconds`` after a warm-up call.

    On a shared machine another process can stall a whole round (OpenBLAS threads wait on a
    busy core); taking the better of two medians keeps one such round out of the fit.
    """
    best = float("inf")
    for _ in range(rounds):
        fn()
        times: list[float] = []
        deadline = time.perf_counter() + min_seconds
        while len(times) < min_repeats or time.perf_counter() < deadline:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            if len(times) > 2000:
                break
        best = min(best, statistics.median(times))
    return best


class AfterGemm:
    """Times a kernel as it runs inside a model: right after a GEMM, with the caches flushed.

    In a step every norm, add or attention follows a projection whose weights have just
    streamed through the caches, with the BLAS threads still awake, and between two calls of
    the same kernel a whole layer's weights (more than the last-level cache in any model worth
    simulating) have streamed by: the Python and numpy code and data a small kernel touches are
    no longer cached. Timed alone, in a loop over hot buffers, the same kernel runs 1.5-5x
    faster than it does in the model (2-core EPYC, 2026-11-24: the executor's top-k routing
    22 us hot, 31 us after one 4 MiB GEMM, 99 us after 32 MiB of them, 74 us inside
    ``tiny-moe-140m``'s decode). ``time`` therefore streams ``flush`` x the last-level cache of
    weights (decode-shaped GEMMs) before each timed call, ending with the GEMM just before it.
    """

    def __init__(self, cache_bytes: int, hidden: int = 1024, width: int = 1024, rows: int = 1,
                 spill: int = 2, seed: int = 3, flush: float = 1.0):
        from validation.executor.numpy_backend import NumpyBackend

        rng = np.random.default_rng(seed)
        self.backend = NumpyBackend()
        size = hidden * width * 4
        copies = max(2, int(np.ceil(max(spill, flush + 1) * cache_bytes / size)))
        self.weights = [rng.standard_normal((hidden, width), dtype=np.float32) for _ in range(copies)]
        self.per_flush = max(1, int(np.ceil(flush * cache_bytes / size)))
        self.x = rng.standard_normal((rows, hidden), dtype=np.float32)
        self.turn = 0

    def gemm(self) -> None:
        """One projection on the next weights in turn (``spill`` x the cache in all: never cached)."""
        self.turn += 1
        self.backend.linear(self.x, self.weights[self.turn % len(self.weights)], None)

    def time(self, fn: Callable[[], object], repeats: int = 15) -> float:
        fn()
        times = []
        for _ in range(repeats):
            for _ in range(self.per_flush):
                self.gemm()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


@dataclass
class Points:
    """Microbenchmark points: the simulator ops each stands for (summed) and its measured time."""

    ops: list[tuple[Op, ...]] = field(default_factory=list)
    measured_s: list[float] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)

    def add(self, ops: Op | tuple[Op, ...], seconds: float, **raw: Any) -> None:
        group = ops if isinstance(ops, tuple) else (ops,)
        self.ops.append(group)
        self.measured_s.append(seconds)
        name = "+".join(op.name for op in group)
        self.raw.append({"op": name, "kind": group[0].kind, "seconds": seconds, **raw})

    def where(self, keep: Callable[[dict[str, Any]], bool]) -> Points:
        """The points whose raw record ``keep`` accepts."""
        out = Points()
        for ops, seconds, raw in zip(self.ops, self.measured_s, self.raw, strict=True):
            if keep(raw):
                out.ops.append(ops)
                out.measured_s.append(seconds)
                out.raw.append(raw)
        return out

    def best_of(self, other: Points) -> Points:
        """Point by point, the faster of two passes over the same microbenchmarks."""
        if [r["op"] for r in self.raw] != [r["op"] for r in other.raw]:
            raise ValueError("passes ran different microbenchmarks")
        best = Points()
        for ops, mine, theirs, raw in zip(self.ops, self.measured_s, other.measured_s, self.raw, strict=True):
            best.add(ops, min(mine, theirs), **{k: v for k, v in raw.items()
                                                 if k not in ("op", "kind", "seconds")})
        return best


def _ops_at(tokens: int, phase: str = "decode", context: int = 1, new: int = 1) -> dict[str, Op]:
    if phase == "decode":
        step = StepShape("decode", tokens, 1, float(context))
    else:
        step = StepShape("prefill", 1, new, float(new))
    return {op.name: op for op in build_step(CALIBRATION_MODEL, step, FP32, attention="naive")}


# --- microbenchmarks ------------------------------------------------------------------

def gemm_cases(host: Machine, quick: bool) -> Iterator[tuple[str, int, np.ndarray, list[np.ndarray]]]:
    """(projection, rows, input, weight copies) of every GEMM point: the calibration model's
    projections at many token counts, weights rotated through more than the last-level cache."""
    rng = np.random.default_rng(0)
    m_values = ([1, 3, 4, 16, 24, 64, 96, 256, 384, 1024] if quick else
                [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536,
                 2048])
    for name in ("qkv_proj", "o_proj", "mlp_up_proj", "mlp_down_proj"):
        _, n, k = _ops_at(1)[name].shape  # type: ignore[misc]
        n, k = int(n), int(k)
        copies = _copies(n * k * 4, host, spill=4)
        weights = [rng.standard_normal((k, n), dtype=np.float32) * 0.02 for _ in range(copies)]
        for m in m_values:
            yield name, m, rng.standard_normal((m, k), dtype=np.float32), weights


def bench_gemms(points: Points, host: Machine, quick: bool,
                before: Callable[[], object] | None = None) -> None:
    """Every GEMM point of ``gemm_cases``, timed with the executor's own linear; ``before`` runs
    ahead of each point (worker processes wait there for each other)."""
    from validation.executor.numpy_backend import NumpyBackend

    backend = NumpyBackend()
    for name, m, x, weights in gemm_cases(host, quick):
        turn = iter(range(10**9))
        if before is not None:
            before()
        seconds = median_time(lambda: backend.linear(x, weights[next(turn) % len(weights)], None),
                              min_seconds=0.02 if quick else 0.05)
        n, k = weights[0].shape[1], weights[0].shape[0]
        points.add(_ops_at(m)[name], seconds, m=m, n=n, k=k)


def bench_transposed(quick: bool) -> dict[str, Any]:
    """The LM head's GEMM on the embedding table as a tied head reads it (``[vocab, hidden]``,
    transposed) against the same weights stored ``[hidden, vocab]``; both well beyond the caches.
    OpenBLAS packs transposed panels slower: 2-core EPYC (2026-11-24), 4 rows over a 50272 x 768
    table 18.3 ms against 12.0."""
    from validation.executor.numpy_backend import NumpyBackend

    backend = NumpyBackend()
    rng = np.random.default_rng(4)
    shape = (CALIBRATION_MODEL.vocab_size, CALIBRATION_MODEL.hidden_size)
    table = rng.standard_normal(shape, dtype=np.float32)
    weight = np.ascontiguousarray(table.T)
    rows = [1, 4, 16] if quick else [1, 2, 4, 8, 16]
    stored, transposed = [], []
    for m in rows:
        x = rng.standard_normal((m, table.shape[1]), dtype=np.float32)
        stored.append(median_time(lambda x=x: backend.linear(x, weight, None)))
        transposed.append(median_time(lambda x=x: backend.linear(x, table.T, None)))
    ratios = [a / b for a, b in zip(stored, transposed, strict=True)]
    return {"rows": rows, "stored_s": stored, "transposed_s": transposed,
            "transposed_bandwidth": float(min(1.0, statistics.median(ratios)))}


def with_transposed(device: Device, transposed: dict[str, Any]) -> Device:
    """``device`` reading transposed GEMM weights at the measured share of its rate."""
    eff = device.efficiency
    assert eff.gemm is not None
    gemm = eff.gemm.model_copy(update={"transposed_bandwidth": float(transposed["transposed_bandwidth"])})
    return device.model_copy(update={"efficiency": eff.model_copy(update={"gemm": gemm})})


def _copies(nbytes: int, host: Machine, spill: int = 2) -> int:
    """How many copies of an ``nbytes`` input to rotate through so none is read from cache."""
    return max(2, int(np.ceil(spill * host.cache_bytes / max(nbytes, 1))))


def _routing_op(tokens: int, experts: int, top_k: int) -> Op:
    """The ``topk_gate`` op of an MoE layer of the calibration shape routing ``tokens`` tokens."""
    model = CALIBRATION_MODEL.model_copy(update={"moe": MoESpec(
        num_experts=experts, top_k=top_k, expert_intermediate_size=256)})
    ops = build_step(model, StepShape("decode", tokens, 1, 1.0), FP32, attention="naive")
    return next(op for op in ops if op.name == "topk_gate")


ROUTING_CASES = ((1, 8, 2), (4, 16, 4), (16, 64, 6), (64, 16, 4), (256, 8, 2), (1024, 64, 6))
"""(tokens, experts, top-k) of the routing points: the executor's top-k, gates and grouping."""


def bench_kernels(points: Points, host: Machine, quick: bool, flush: float = REFERENCE_FLUSH) -> None:
    """Every non-GEMM kernel of the numpy executor, through its own functions, each timed
    right after ``flush`` last-level caches of GEMMs, as in a model (``AfterGemm``)."""
    from validation.executor.numpy_backend import NumpyBackend

    backend = NumpyBackend()
    context = AfterGemm(host.cache_bytes, flush=flush)
    at = {"flush": flush}
    rng = np.random.default_rng(1)
    model = CALIBRATION_MODEL
    h, heads, kv, d = model.hidden_size, model.num_attention_heads, model.kv_heads, model.head_size
    inter = model.ffn.intermediate_size
    table = rng.standard_normal((model.vocab_size, h), dtype=np.float32)
    norm_w = np.ones(h, np.float32)
    for tokens in ([1, 16, 256, 2048] if quick else [1, 4, 16, 64, 256, 1024, 4096]):
        ops = _ops_at(tokens)
        x = rng.standard_normal((tokens, h), dtype=np.float32)
        y = rng.standard_normal((tokens, h), dtype=np.float32)
        up = rng.standard_normal((tokens, 2 * inter), dtype=np.float32)
        ids = rng.integers(0, model.vocab_size, tokens)
        qkv = rng.standard_normal((tokens, (heads + 2 * kv) * d), dtype=np.float32)
        q, k, v = backend.split_heads(qkv, tokens, heads, kv, d)
        cos, sin = backend.rope_tables(8, d, 10000.0)
        cos, sin = cos[:1], sin[:1]
        cache_k = np.zeros((tokens, kv, 8, d), np.float32)
        cache_v = np.zeros_like(cache_k)
        logits = rng.standard_normal((tokens, model.vocab_size), dtype=np.float32)
        timed = {
            "input_norm": lambda: backend.rmsnorm(x, norm_w, 1e-5),
            "rope": lambda: backend.rope(q, k, cos, sin),
            "kv_cache_write": lambda: backend.write_cache(cache_k, cache_v, k, v, 3),
            "mlp_act": lambda: backend.activation(up, "silu", True),
            "residual_add": lambda: backend.add_(x, y),
            "embedding": lambda: backend.embedding(table, ids),
            "sampling": lambda: backend.argmax(logits),
        }
        for name, fn in timed.items():
            points.add(ops[name], context.time(fn, 9 if quick else 15), tokens=tokens, **at)
    # MoE routing: top-k and gates (``route``) and the tokens grouped by expert, one op.
    for tokens, experts, top_k in ROUTING_CASES[::2] if quick else ROUTING_CASES:
        logits = rng.standard_normal((tokens, experts), dtype=np.float32)

        def route(logits: np.ndarray = logits, experts: int = experts, top_k: int = top_k) -> object:
            chosen, gates = backend.route(logits, top_k)
            return backend.group_by_expert(chosen, gates, experts)

        points.add(_routing_op(tokens, experts, top_k), context.time(route, 9 if quick else 15),
                   tokens=tokens, experts=experts, top_k=top_k, **at)
    # Attention: decode over growing contexts, and prefill (one sequence of n tokens).
    for batch, length in ([(1, 256), (8, 1024), (1, 4096)] if quick else
                           [(1, 64), (1, 512), (1, 4096), (8, 256), (8, 2048), (32, 1024)]):
        q = rng.standard_normal((batch, kv, heads // kv, 1, d), dtype=np.float32)
        # A layer's K and V are read once a step, never from cache: copies rotated through
        # twice the last-level cache.
        copies = _copies(2 * batch * kv * length * d * 4, host)
        keys = [rng.standard_normal((batch, kv, length, d), dtype=np.float32) for _ in range(copies)]
        values = [rng.standard_normal((batch, kv, length, d), dtype=np.float32) for _ in range(copies)]
        turn = iter(range(10**9))

        def decode_attention() -> object:
            i = next(turn) % copies
            return backend.attention(q, keys[i], values[i], length - 1, 0, None)

        seconds = context.time(decode_attention, 9 if quick else 15)
        ops = _ops_at(batch, context=length)
        points.add(tuple(ops[n] for n in NAIVE_ATTENTION), seconds, batch=batch, context=length, **at)
    for new in [64, 512] if quick else [32, 128, 512, 1024, 2048]:
        q = rng.standard_normal((1, kv, heads // kv, new, d), dtype=np.float32)
        copies = _copies(kv * new * d * 4, host)
        keys = [rng.standard_normal((1, kv, new, d), dtype=np.float32) for _ in range(copies)]
        turn = iter(range(10**9))

        def prefill_attention() -> object:
            k = keys[next(turn) % copies]
            return backend.attention(q, k, k, 0, 0, None)

        seconds = context.time(prefill_attention, 5 if quick else 9)
        ops = _ops_at(1, phase="prefill", new=new)
        points.add(tuple(ops[n] for n in NAIVE_ATTENTION), seconds, prefill_tokens=new, **at)


def bench_stream(host: Machine, quick: bool) -> list[dict[str, float]]:
    """``c = a + b`` (two reads, one write) from cache-resident sizes to DRAM."""
    rows = []
    sizes = [2**k for k in range(12, 29, 2 if quick else 1)]
    for size in sizes:
        n = size // 4
        a, b, c = (np.ones(n, np.float32) for _ in range(3))
        seconds = median_time(lambda: np.add(a, b, out=c), min_seconds=0.02)
        rows.append({"bytes": 3 * size, "seconds": seconds, "bandwidth": 3 * size / seconds})
    return rows


def bench_executor_dispatch() -> dict[str, float]:
    """Time the executor spends between kernels (Python control flow, views), per kernel.

    Measured on the calibration shape cut to two layers (not a validation model):
    ``(step wall time - time inside kernels) / kernels``, decode steps.
    """
    from validation.executor.harness import execute

    probe = CALIBRATION_MODEL.model_copy(update={"num_layers": 2, "vocab_size": 1024})
    result = execute(probe, batch=1, input_len=16, output_len=17, repeats=5).to_dict()
    dispatch = result["dispatch_s_per_step"]["decode"]
    kernels = result["kernels_per_step"]["decode"]
    return {"dispatch_s_per_step": dispatch, "kernels_per_step": kernels,
            "dispatch_s_per_kernel": dispatch / kernels}


def bench_peak(quick: bool) -> dict[str, float]:
    """The host's fp32 GEMM rate: the best of square products on cache-resident operands.

    ``/proc/cpuinfo``'s clock is the nominal one; the cores boost above it (2-core EPYC VM,
    2026-11-24: 188 GFLOPS measured at 2048 rows against 156.5 from 2 x 2.445 GHz x 32), so a
    peak taken from the clock alone left the GEMM fit no way to reach the large-GEMM points.
    """
    rng = np.random.default_rng(6)
    best = 0.0
    for n in (512, 1024) if quick else (512, 1024, 1536):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        c = np.empty((n, n), np.float32)
        seconds = median_time(lambda: np.matmul(a, b, out=c), min_repeats=5, min_seconds=0.2)
        best = max(best, 2.0 * n**3 / seconds)
    return {"gemm_flops": best}


def bench_dispatch() -> float:
    """The fixed cost of one numpy call on a one-element array: Python and numpy dispatch."""
    a, b = np.ones(1, np.float32), np.empty(1, np.float32)
    return median_time(lambda: np.add(a, a, out=b), min_repeats=2000, min_seconds=0.05)


@contextlib.contextmanager
def cold_fd(path: Path) -> Iterator[int]:
    """A read-only descriptor of ``path`` with its pages dropped from the page cache, so that
    reads come from the drive."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        yield fd
    finally:
        os.close(fd)


def read_file_into(path: Path, buffer: np.ndarray, chunk: int = 2**20) -> int:
    """Read ``path`` into ``buffer`` from the drive (page cache dropped first), ``chunk`` bytes a call."""
    with cold_fd(path) as fd:
        view, done = memoryview(buffer), 0
        while done < buffer.nbytes:
            got = os.readv(fd, [view[done:done + chunk]])
            if not got:
                break
            done += got
        return done


class LayerFiles:
    """Files of incompressible data, ``count`` of ``size`` bytes (by default layer-sized), as an
    offloading runtime keeps weights on disk (`validation/executor/offload.py`, `experts.py`),
    and two reused buffers to read them into.

    Repeated blocks can read faster than real weights on a virtual disk, and a small reused
    destination stays in cache; both made the first version of this benchmark twice as fast as
    the executor's reads.
    """

    def __init__(self, folder: Path, quick: bool, count: int | None = None, size: int = 32 * 2**20,
                 seed: int = 4):
        self.count, self.size = (count or (4 if quick else 8)), size
        rng = np.random.default_rng(seed)
        self.scratch = Path(tempfile.mkdtemp(prefix="infersim-layers-", dir=folder))
        self.paths = []
        for index in range(self.count):
            path = self.scratch / f"layer-{index}.bin"
            with open(path, "wb") as handle:
                handle.write(rng.standard_normal(self.size // 4, dtype=np.float32).tobytes())
                handle.flush()
                os.fsync(handle.fileno())
            self.paths.append(path)
        self.buffers = [np.ones(self.size, np.uint8) for _ in range(2)]
        self.read_all()  # the first read after writing is slower: not what a step sees

    def read_all(self) -> int:
        return sum(read_file_into(path, self.buffers[i % 2]) for i, path in enumerate(self.paths))

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def bench_layer_reads(files: LayerFiles, quick: bool) -> dict[str, Any]:
    """Every layer file read in turn into the reused buffers; median rate over rounds (the
    drive's noise is not one-sided)."""
    rates = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        done = files.read_all()
        rates.append(done / (time.perf_counter() - start))
    return {"bandwidth": statistics.median(rates), "file_bytes": files.size, "files": files.count,
            "rounds": [round(r / 1e9, 3) for r in rates]}


def bench_read_overlap(files: LayerFiles, host: Machine) -> dict[str, float]:
    """How much of a layer read a reader thread hides under GEMMs on the main thread.

    Times the reads alone, a run of decode-shaped GEMMs (weights rotated through more than the
    last-level cache) of about the same length alone, and both at once;
    ``overlap = (t_read + t_gemm - t_both) / min(t_read, t_gemm)``, 1 when the read is free
    (a DMA engine), 0 when it is a copy that the computing cores must make in series.
    """
    import threading

    stream = AfterGemm(host.cache_bytes, rows=8, spill=4, seed=5)

    def gemms(count: int) -> None:
        for _ in range(count):
            stream.gemm()

    start = time.perf_counter()
    files.read_all()
    t_read = time.perf_counter() - start
    start = time.perf_counter()
    gemms(20)
    per_gemm = (time.perf_counter() - start) / 20
    count = max(20, int(t_read / per_gemm))
    results = []
    for _ in range(3):
        start = time.perf_counter()
        files.read_all()
        t_read = time.perf_counter() - start
        start = time.perf_counter()
        gemms(count)
        t_gemm = time.perf_counter() - start
        reader = threading.Thread(target=files.read_all)
        start = time.perf_counter()
        reader.start()
        gemms(count)
        reader.join()
        t_both = time.perf_counter() - start
        hidden = (t_read + t_gemm - t_both) / min(t_read, t_gemm)
        results.append({"read_s": t_read, "gemm_s": t_gemm, "both_s": t_both,
                        "overlap": float(min(max(hidden, 0.0), 1.0))})
    middle = sorted(results, key=lambda r: r["overlap"])[1]
    return {**middle, "rounds": [round(r["overlap"], 3) for r in results]}


FILE_READ_SIZES = (2 * 2**20, 8 * 2**20, 32 * 2**20, 64 * 2**20)  # experts to layers


def bench_file_reads(folder: Path, host: Machine, quick: bool) -> dict[str, Any]:
    """Whole files read one at a time between decode-shaped GEMMs, at several file sizes, fitted
    as ``t = latency + bytes / bandwidth`` per file (``_alpha_beta``).

    An offloading runtime reads one file per layer or per expert when a step needs it
    (``validation.executor.offload``, ``experts``): each read opens the file, drops its pages
    and starts a fresh readahead, which costs about as much as 2-3 MB of streaming on the 2-core
    EPYC (2026-11-24: 6 MiB expert files read at 1.3 GB/s, 32 MiB layer files at 1.8 GB/s).
    ``read_into_buffer`` (32 MiB files back to back) hides that fixed cost in the rate; a 6 MiB
    expert does not. Medians over rounds (the drive's noise is not one-sided). The calibrated
    host's drive is this fit (``simulator.specs.hardware._calibrated_storage``).
    """
    stream = AfterGemm(host.cache_bytes, rows=8, spill=4, seed=6)
    rows = []
    for seed, size in enumerate(FILE_READ_SIZES, start=5):
        files = LayerFiles(folder, quick, count=max(4, (64 if quick else 128) * 2**20 // size), size=size,
                           seed=seed)
        try:
            times = []
            for _ in range(2 if quick else 3):
                for path in files.paths:
                    stream.gemm()  # the step's compute before the read
                    stream.gemm()
                    start = time.perf_counter()
                    read_file_into(path, files.buffers[0])
                    times.append(time.perf_counter() - start)
        finally:
            files.close()
        rows.append({"bytes": size, "files": files.count, "seconds": statistics.median(times)})
    latency, bandwidth = _alpha_beta(rows)
    return {"latency_s": latency, "bandwidth": bandwidth, "rows": rows,
            "method": "t = latency + bytes / bandwidth per file, each read after two GEMMs"}


def bench_disk(folder: Path, quick: bool) -> dict[str, Any]:
    """Sequential cold reads (page cache dropped with posix_fadvise) at several read sizes."""
    size = (64 if quick else 256) * 2**20
    path = folder / "infersim-disk-probe.bin"
    block = np.random.default_rng(2).integers(0, 255, 2**20, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    write_bandwidth = size / (time.perf_counter() - start)
    results: dict[str, Any] = {"file_bytes": size, "page_cache": "dropped with posix_fadvise(DONTNEED)",
                               "free_bytes": shutil.disk_usage(folder).free,
                               "write_bandwidth": write_bandwidth}
    try:
        for read_size in (64 * 2**10, 2**20, 16 * 2**20):
            with cold_fd(path) as fd:
                start = time.perf_counter()
                while os.read(fd, read_size):
                    pass
                seconds = time.perf_counter() - start
            results[f"read_{read_size}"] = {"seconds": seconds, "bandwidth": size / seconds}
        with cold_fd(path) as fd:
            start = time.perf_counter()
            os.pread(fd, 4096, size // 2)
            results["latency_4k_s"] = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    return results


def _shm_child(name: str, nbytes: int, ready, done, rounds: int) -> None:  # pragma: no cover - subprocess
    shm = shared_memory.SharedMemory(name=name)
    try:
        source = np.ndarray((nbytes,), np.uint8, buffer=shm.buf)
        local = np.empty(nbytes, np.uint8)
        for _ in range(rounds):
            ready.wait()
            ready.clear()
            np.copyto(local, source)
            done.set()
    finally:
        del source
        shm.close()


def bench_shared_memory(quick: bool) -> list[dict[str, float]]:
    """A second process copies a buffer out of shared memory: handshake latency plus bytes/bandwidth."""
    rows = []
    context = mp.get_context("spawn")
    rounds = 5 if quick else 11
    for nbytes in ([4096, 2**20, 64 * 2**20] if quick else [4096, 2**16, 2**20, 16 * 2**20, 256 * 2**20]):
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        ready, done = context.Event(), context.Event()
        child = context.Process(target=_shm_child, args=(shm.name, nbytes, ready, done, rounds))
        child.start()
        try:
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                ready.set()
                done.wait()
                done.clear()
                times.append(time.perf_counter() - start)
            child.join(timeout=30)
        finally:
            if child.is_alive():
                child.terminate()
            shm.close()
            shm.unlink()
        rows.append({"bytes": nbytes, "seconds": statistics.median(times[1:])})
    return rows


FP32_KV = {bits: Precision(weight="fp32", kv=f"int{bits}", act="fp32", compute="fp32") for bits in (8, 4, 2)}
DEQUANTIZE_KINDS = ("unpack", "dequantize")


def _dequantize_ops(bits: int, batch: int, context: int) -> tuple[Op, ...]:
    shape = StepShape("decode", batch, 1, float(context))
    step = build_step(CALIBRATION_MODEL, shape, FP32_KV[bits], "naive")
    return tuple(op for op in step if op.kind in DEQUANTIZE_KINDS)


def settle_allocator(nbytes: int = 32 * 2**20 - 2**16) -> None:
    """Leave the C allocator as a model's step finds it: after one free of a large block.

    glibc's malloc serves a block above its mmap threshold (128 KiB at first) with fresh pages
    from the kernel, and raises the threshold to a freed mapped block's size (at most 32 MiB);
    a freshly started calibration that allocates a kernel's output buffer again and again gets
    new pages each call, and first-touching them costs ~2.3 us per 4 KiB page on the 2-core EPYC
    (2026-11-24: the KIVI dequantization of a 1024-token, batch-4 cache 3.7 ms faulting, 1.4 ms
    not). In a model the prefill's activations have already raised the threshold, and the
    executor's decode kernels reuse heap pages (0 faults per dequantization, counted).
    """
    block = np.empty(nbytes, np.uint8)
    block[::4096] = 0  # mapped and touched, then given back
    del block


def bench_dequantize(host: Machine, quick: bool) -> Points:
    """The executor's KIVI dequantization (unpack, scale, shift) of one layer's cache, timed after
    a GEMM, on codes and scales written beforehand (never-written pages fault on first touch).

    The cache is laid out as in a generation: preallocated for the prompt and 15 more tokens (the
    harness allocates ``P + G - 1``), ``tokens + 7`` of them quantized (a decode step mid-way,
    whose last key group is partial), and dequantized as a slice of that buffer: 10-25% slower
    than a cache exactly ``tokens`` long, whole groups and contiguous. The allocator is settled
    first (``settle_allocator``); each point records the page faults its calls took.
    """
    import resource

    from validation.executor.kv import Quantization, QuantizedCache
    from validation.executor.numpy_backend import NumpyBackend
    from validation.executor.profiler import KernelProfiler

    model, rng, points = CALIBRATION_MODEL, np.random.default_rng(2), Points()
    context = AfterGemm(host.cache_bytes)
    runtime = type("Runtime", (), {"ops": NumpyBackend(), "profiler": KernelProfiler(), "counters": {}})()
    settle_allocator()
    repeats = 5 if quick else 9
    for bits in (8, 4, 2):
        for batch, tokens in ([(1, 256), (4, 2048)] if quick else [(1, 128), (1, 1024), (4, 512), (4, 2048)]):
            held = tokens + 7
            cache = QuantizedCache(Quantization(bits), 1, batch, model.kv_heads, tokens + 15, model.head_size,
                                   runtime)
            for array in cache.k + cache.v:
                array[...] = rng.integers(0, 256, array.shape, dtype=np.uint8)
            for array in cache.key_scale + cache.key_min + cache.value_scale + cache.value_min:
                array[...] = rng.random(array.shape, dtype=np.float32)
            cache.quantized[0] = held
            cache.dequantize(0, 0)  # its first call maps the pages the later ones reuse
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            seconds = context.time(lambda c=cache: c.dequantize(0, 0), repeats)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            points.add(_dequantize_ops(bits, batch, held), seconds, bits=bits, batch=batch,
                       kv_tokens=held, faults_per_call=round(faults / (repeats + 1), 1))
    return points


def fit_dequantize(device: Device, points: Points) -> tuple[Device, dict[str, Any]]:
    """The unpack and dequantize kinds fitted to their own points, the rest of ``device`` held."""
    from simulator.calibrate.operators import fit_kernel_kinds

    fitted, info = fit_kernel_kinds(device, points.ops, np.array(points.measured_s), DEQUANTIZE_KINDS)
    return fitted, {**info, "points": points.raw}


def host_tiling() -> GemmTiling:
    """The CPU's GEMM tiles (``HOST_TILES``), no split-k, weights packed in a pass of their own
    (OpenBLAS copies each weight panel before computing on it: on the 2-core EPYC the 16-64-row
    projections take the weight stream plus the math, 0.34 ms + 21.9 us a row for 2048 x 1024,
    not the larger of the two); the rates are fitted."""
    return GemmTiling(tiles=HOST_TILES, split_k=(1,), pack_pass=True)


def fit_host(device: Device, points: Points, executor_dispatch: dict[str, float]) -> tuple[Device, dict]:
    """The host's efficiencies fitted to its microbenchmark points.

    Kernel bandwidths are multiples of the main memory's, which is one core's numpy stream.
    Kernels whose data sits in the caches are still held to it (letting them run faster fitted
    the microbenchmarks better and the executor's runs worse); a one-row GEMM is not: BLAS
    streams its weights from DRAM on every core, up to ``cores`` times one core's rate.
    """
    from simulator.calibrate.operators import fit_device_to_ops

    caps = {"gemv": float(device.compute_units or 1)}
    reference = points.where(lambda raw: _flush(raw) == REFERENCE_FLUSH)
    # Kinds with points (a file calibrated before routing was timed keeps the memory curve there).
    timed = {op.kind for group in reference.ops for op in group} | {"gemv"}
    kinds = tuple(kind for kind in HOST_KINDS if kind in timed)
    fitted, info = fit_device_to_ops(device, reference.ops, np.array(reference.measured_s), kinds,
                                     max_bandwidth=caps)
    volumes, info["volumes"] = fit_volumes(fitted, points)
    # Microbenchmarks time kernels alone; in a model the executor also spends time between them.
    overhead = fitted.efficiency.kernel_overhead + executor_dispatch["dispatch_s_per_kernel"]
    fitted = fitted.model_copy(update={"efficiency": fitted.efficiency.model_copy(
        update={"kernel_overhead": overhead, "volumes": volumes})})
    return fitted, {**info, "bandwidth_caps": caps}


def _flush(raw: dict[str, Any]) -> float:
    """The flush (last-level caches of GEMMs) a point was timed after; GEMMs and older files:
    the reference."""
    return float(raw.get("flush", REFERENCE_FLUSH))


def fit_volumes(fitted: Device, points: Points) -> tuple[tuple[KernelVolume, ...], dict[str, Any]]:
    """Each kernel kind's time at each flush volume as a multiple of its time at the reference
    volume (``fitted``'s own kernels): per kind, the median over its points of the busy time
    (measured less the fitted overhead) against the same point's at the reference flush, applied
    to the kind's bandwidth and floor. One number per kind and volume: a full refit of each
    volume's kinds (three parameters each, on five to seven points) chased single points' noise.
    None with one volume."""
    from simulator.cost.roofline import cost_op

    flushes = sorted({_flush(raw) for raw in points.raw})
    if len(flushes) < 2 or REFERENCE_FLUSH not in flushes:
        return (), {}

    def key(raw: dict[str, Any]) -> tuple:
        return tuple(sorted((k, v) for k, v in raw.items() if k not in ("seconds", "flush")))

    busy: dict[tuple, float] = {}
    kinds_of: dict[tuple, set[str]] = {}
    for group, seconds, raw in zip(points.ops, points.measured_s, points.raw, strict=True):
        kinds = {op.kind for op in group} & set(VOLUME_KINDS)
        if kinds:
            overhead = sum(float(np.mean(cost_op(op, fitted).overhead_s)) for op in group)
            busy[(_flush(raw), *key(raw))] = max(seconds - overhead, 0.1 * seconds)
            kinds_of[key(raw)] = kinds
    cache = float(fitted.cache or DEFAULT_CACHE_BYTES)
    reference = fitted.efficiency.kernels
    volumes, scales = [], {}
    for flush in flushes:
        ratios: dict[str, list[float]] = {}
        for point, kinds in kinds_of.items():
            if (flush, *point) in busy and (REFERENCE_FLUSH, *point) in busy:
                ratio = busy[(flush, *point)] / busy[(REFERENCE_FLUSH, *point)]
                for kind in kinds:
                    ratios.setdefault(kind, []).append(ratio)
        scale = {kind: float(np.exp(np.median(np.log(r)))) for kind, r in sorted(ratios.items())}
        scales[f"{flush:g}"] = {kind: round(s, 4) for kind, s in scale.items()}
        volumes.append(KernelVolume(volume=flush * cache, kernels={
            kind: reference[kind].model_copy(update={"bandwidth": reference[kind].bandwidth / s,
                                                     "floor": reference[kind].floor * s})
            for kind, s in scale.items()}))
    common = set.intersection(*(set(v.kernels) for v in volumes))
    volumes = [v.model_copy(update={"kernels": {k: e for k, e in v.kernels.items() if k in common}})
               for v in volumes]
    return tuple(volumes), {"flushes": flushes, "cache_bytes": cache,
                            "method": "per kind and volume: median busy time over the same point's "
                                      "at the reference flush", "scales": scales}

def points_from_raw(raw: list[dict[str, Any]]) -> Points:
    """The microbenchmark points a calibration file recorded, as the ops they stand for."""
    points = Points()
    for row in raw:
        extra = {k: v for k, v in row.items() if k not in ("op", "kind", "seconds")}
        if "m" in row:
            ops: Op | tuple[Op, ...] = _ops_at(int(row["m"]))[row["op"]]
        elif "experts" in row:
            ops = _routing_op(int(row["tokens"]), int(row["experts"]), int(row["top_k"]))
        elif "tokens" in row:
            ops = _ops_at(int(row["tokens"]))[row["op"]]
        elif "bits" in row:
            ops = _dequantize_ops(int(row["bits"]), int(row["batch"]), int(row["kv_tokens"]))
        elif "context" in row:
            step = _ops_at(int(row["batch"]), context=int(row["context"]))
            ops = tuple(step[n] for n in NAIVE_ATTENTION)
        else:
            step = _ops_at(1, phase="prefill", new=int(row["prefill_tokens"]))
            ops = tuple(step[n] for n in NAIVE_ATTENTION)
        points.add(ops, float(row["seconds"]), **extra)
    return points


def refit(out: Path) -> int:
    """Fit a calibrated host file's recorded microbenchmarks again (after a change to the cost
    model or the fit), keeping the measurements; nothing is measured."""
    from simulator.calibrate.operators import _round
    from simulator.specs.loader import load_device

    document = yaml.safe_load(out.read_text())
    fit = (document.get("efficiency") or {}).get("fit")
    if not isinstance(fit, dict) or "points" not in fit or "executor_dispatch" not in fit:
        raise InferSimError(f"{out}: not a file written by infersim calibrate (no efficiency.fit.points)")
    device = load_device(out)
    base = device.model_copy(update={"efficiency": DeviceEfficiency(gemm=host_tiling(), expert_loop=True)})
    fitted, info = fit_host(base, points_from_raw(fit["points"]), fit["executor_dispatch"])
    if isinstance(fit.get("transposed"), dict):
        info["transposed"] = fit["transposed"]
        fitted = with_transposed(fitted, fit["transposed"])
    if isinstance(fit.get("dequantize"), dict) and fit["dequantize"].get("points"):
        fitted, dequantize = fit_dequantize(fitted, points_from_raw(fit["dequantize"]["points"]))
        info["dequantize"] = {**fit["dequantize"], **dequantize}
    document["efficiency"].update(_efficiency_fields(fitted.efficiency))
    fit.update(_round({**info, "refit": {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": f"infersim calibrate --out {out} --only refit"}}))
    write_yaml(document, out)
    load_device(out)
    residuals = info["residuals"]
    print(f"refitted {out}: median error {residuals['median_abs_rel_error']:.1%}, "
          f"p90 {residuals['p90_abs_rel_error']:.1%} over {residuals['rows']} microbenchmarks")
    return 0


def _efficiency_fields(eff: DeviceEfficiency) -> dict[str, Any]:
    """The fitted efficiency fields as the YAML writes them (with units)."""
    assert eff.gemm is not None
    gb = 1e9
    return {
        "kernel_overhead": f"{eff.kernel_overhead * 1e6:.4g} us",
        "expert_loop": eff.expert_loop,
        "gemm": {
            "tiles": [list(t) for t in eff.gemm.tiles],
            "split_k": list(eff.gemm.split_k),
            "efficiency": round(eff.gemm.efficiency, 4),
            "operand_bandwidth": f"{(eff.gemm.operand_bandwidth or 0) / gb:.4g} GB/s",
            "tile_overhead": f"{eff.gemm.tile_overhead * 1e6:.4g} us",
            "pack_pass": eff.gemm.pack_pass,
            "transposed_bandwidth": round(eff.gemm.transposed_bandwidth, 4),
        },
        "kernels": _kernel_fields(eff.kernels),
        "volumes": [{"volume": f"{v.volume / 1e6:.4g} MB", "kernels": _kernel_fields(v.kernels)}
                    for v in eff.volumes],
    }


def _kernel_fields(kernels: dict[str, Any]) -> dict[str, Any]:
    return {kind: {"bandwidth": round(k.bandwidth, 4), "half_size": f"{k.half_size / 1e6:.4g} MB",
                   "floor": f"{k.floor * 1e6:.4g} us"}
            for kind, k in kernels.items()}


def bench_shared(quick: bool, cores: int, host_device: Device | None = None) -> dict[str, Any]:
    """What a parallel plan's worker processes see, each fitted: copies through shared memory;
    with two cores or more the executor's own collectives between two workers
    (``latency + bytes / bandwidth``), and the calibration's GEMMs inside one-thread workers,
    alone and with every core running one (fitted as a one-core device when ``host_device``,
    the host's fitted spec, is given)."""
    rows = bench_shared_memory(quick)
    latency, bandwidth = _alpha_beta(rows)
    shared: dict[str, Any] = {"rows": rows, "latency_s": latency, "bandwidth_bytes_per_s": bandwidth,
                              "date": dt.datetime.now().isoformat(timespec="seconds")}
    if cores < 2:
        return shared
    from validation.executor.parallel import bench_collectives, bench_worker_gemms

    collectives = {}
    for name, points in bench_collectives(rounds=9 if quick else 21).items():
        a, b = _alpha_beta(points)
        collectives[name] = {"workers": 2, "latency_s": a, "bandwidth_bytes_per_s": b, "rows": points}
    shared["collectives"] = collectives
    if host_device is not None:
        shared["worker_gemms"] = {}
        for concurrent in sorted({1, cores}):
            raw = bench_worker_gemms(concurrent, quick)
            shared["worker_gemms"][str(concurrent)] = fit_worker(host_device, raw)
    return shared


def worker_base(host_device: Device) -> Device:
    """One core of the host: its share of the peak, one compute unit, the host's efficiencies."""
    cores = host_device.compute_units or 1
    return host_device.model_copy(update={
        "name": f"{host_device.name} core", "compute_units": 1,
        "compute": {k: v / cores for k, v in host_device.compute.items()}})


def fit_worker(host_device: Device, raw: list[dict[str, Any]]) -> dict[str, Any]:
    """The GEMM parameters of one worker (one BLAS thread) fitted to GEMMs it ran."""
    from simulator.calibrate.operators import fit_device_to_ops

    points = points_from_raw(raw)
    base = worker_base(host_device)
    _, info = fit_device_to_ops(base, points.ops, np.array(points.measured_s), WORKER_KINDS,
                                max_bandwidth={"gemv": float(host_device.compute_units or 1)})
    return {"parameters": info["parameters"], "residuals": info["residuals"], "points": raw}


def _calibrated_on_this_host(out: Path) -> tuple[dict[str, Any], dict[str, Any], Machine]:
    """A host file ``infersim calibrate`` wrote on this CPU: its document, its fit, the machine."""
    document = yaml.safe_load(out.read_text())
    fit = (document.get("efficiency") or {}).get("fit")
    if not isinstance(fit, dict):
        raise InferSimError(f"{out}: not a file written by infersim calibrate (no efficiency.fit)")
    host = machine()
    recorded = (fit.get("machine") or {}).get("cpu")
    if recorded and recorded != host.cpu:
        raise InferSimError(f"{out} was calibrated on {recorded!r}, this is {host.cpu!r}: calibrate anew")
    return document, fit, host


def update_dequantize(out: Path, quick: bool) -> int:
    """Measure and fit only the KV dequantization kernels of a calibrated host file."""
    from simulator.calibrate.operators import _round
    from simulator.specs.loader import load_device

    document, fit, host = _calibrated_on_this_host(out)
    fitted, info = fit_dequantize(load_device(out), bench_dequantize(host, quick))
    document["efficiency"]["kernels"] = _efficiency_fields(fitted.efficiency)["kernels"]
    fit["dequantize"] = _round({**info, "date": dt.datetime.now().isoformat(timespec="seconds"),
                                "command": f"infersim calibrate --out {out} --only dequantize"})
    write_yaml(document, out)
    load_device(out)
    residuals = info["residuals"]
    print(f"updated {out}: KV dequantization fitted within {residuals['median_abs_rel_error']:.1%} median, "
          f"{residuals['p90_abs_rel_error']:.1%} p90 over {residuals['rows']} microbenchmarks")
    return 0


def update_disk(out: Path, quick: bool) -> int:
    """Measure only the per-file reads (``bench_file_reads``) for a calibrated host file."""
    from simulator.calibrate.operators import _round
    from simulator.specs.loader import load_device

    document, fit, host = _calibrated_on_this_host(out)
    reads = bench_file_reads(Path(tempfile.gettempdir()), host, quick)
    disk = fit.setdefault("disk", {})
    disk["read_per_file"] = _round({**reads, "date": dt.datetime.now().isoformat(timespec="seconds"),
                                    "command": f"infersim calibrate --out {out} --only disk"})
    write_yaml(document, out)
    load_device(out)
    print(f"updated {out}: a file read costs {reads['latency_s'] * 1e3:.2f} ms + bytes / "
          f"{reads['bandwidth'] / 1e9:.2f} GB/s")
    return 0


def update_shared(out: Path, quick: bool) -> int:
    """Re-measure only what worker processes see (shared memory, collectives, GEMMs in workers)
    for a calibrated host file, keeping the rest."""
    from simulator.calibrate.operators import _round
    from simulator.specs.loader import load_device

    document, fit, host = _calibrated_on_this_host(out)
    shared = bench_shared(quick, host.cores, load_device(out))
    fit["shared_memory"] = _round({**shared, "machine": host.describe(),
                                   "command": f"infersim calibrate --out {out} --only workers"})
    write_yaml(document, out)
    load_device(out)
    collectives = fit["shared_memory"].get("collectives", {})
    print(f"updated {out}: " + ", ".join(
        f"{k} {v['latency_s'] * 1e6:.0f} us + bytes / {v['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s"
        for k, v in collectives.items()))
    return 0


# --- putting it together ------------------------------------------------------------------

def _alpha_beta(rows: list[dict[str, float]]) -> tuple[float, float]:
    """Least-squares ``t = alpha + bytes / beta`` in relative error (weights ``1/t``), so the
    small sizes that set ``alpha`` count as much as the large ones that set ``beta``."""
    sizes = np.array([r["bytes"] for r in rows], float)
    seconds = np.array([r["seconds"] for r in rows], float)
    slope, intercept = np.polyfit(sizes, seconds, 1, w=1.0 / seconds)
    return max(float(intercept), 1e-7), 1.0 / max(float(slope), 1e-15)


def calibrate(name: str, quick: bool, progress: Callable[[str], None] = print,
              scratch: Path | None = None) -> tuple[dict[str, Any], Device]:
    """Run every microbenchmark and fit; returns the YAML document and the fitted device."""

    host = machine()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    progress(f"calibrating {host.cpu}, {host.cores} cores ({'quick' if quick else 'full'})")
    progress("memory streams")
    stream = bench_stream(host, quick)
    dram = max(r["bandwidth"] for r in stream if r["bytes"] >= 4 * host.cache_bytes)
    # The machine's speed drifts for seconds at a time (a neighbour on the other hyperthread,
    # the host's clocks), longer than one microbenchmark's rounds. Each pass runs every
    # microbenchmark once; a point keeps its best pass, as `validation.measure` keeps a case's
    # best round, so both sides see the undisturbed machine.
    passes = 3
    dispatch, dispatches, points = float("inf"), [], Points()
    layer_reads: list[dict[str, Any]] = []
    overlaps: list[dict[str, Any]] = []
    files = LayerFiles(Path(scratch or tempfile.gettempdir()), quick)
    progress("peak GEMM rate")
    measured_peak = bench_peak(quick)
    for index in range(passes):
        label = f" (pass {index + 1} of {passes})"
        progress("dispatch cost" + label)
        dispatch = min(dispatch, bench_dispatch())
        dispatches.append(bench_executor_dispatch())
        progress("GEMMs" + label)
        this = Points()
        bench_gemms(this, host, quick)
        for flush in (REFERENCE_FLUSH,) if quick else KERNEL_FLUSHES:  # --quick: the plain kernels
            progress(f"executor kernels after {flush:g} caches of GEMMs" + label)
            bench_kernels(this, host, quick, flush)
        points = this if index == 0 else points.best_of(this)
        progress("layer reads from disk" + label)
        layer_reads.append(bench_layer_reads(files, quick))
        overlaps.append(bench_read_overlap(files, host))
    files.close()
    executor_dispatch = min(dispatches, key=lambda d: d["dispatch_s_per_kernel"])
    # The drive's rate and the read overlap swing both ways: the median pass, not the best.
    read_into_buffer = sorted(layer_reads, key=lambda r: r["bandwidth"])[len(layer_reads) // 2]
    read_into_buffer = {**read_into_buffer, "passes": [round(r["bandwidth"] / 1e9, 3) for r in layer_reads]}
    read_overlap = sorted(overlaps, key=lambda r: r["overlap"])[len(overlaps) // 2]
    read_overlap = {**read_overlap, "passes": [round(r["overlap"], 3) for r in overlaps]}
    progress("disk and shared memory")
    disk = bench_disk(Path(scratch or tempfile.gettempdir()), quick)
    disk.update({"read_into_buffer": read_into_buffer, "read_overlap": read_overlap,
                 "read_per_file": bench_file_reads(Path(scratch or tempfile.gettempdir()), host, quick)})
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)

    peak = max(host.peak_fp32, measured_peak["gemm_flops"])
    base = {
        "kind": "device", "name": name, "vendor": "host", "type": "cpu",
        "compute": {"fp32": peak, "fp64": peak / 2},
        "memory": [{"name": "dram", "capacity": float(host.memory_bytes), "bandwidth": dram,
                    "latency": 100e-9}],
        "cache": float(host.l3_bytes) if host.l3_bytes else None,
        "compute_units": host.cores,
        "clock": host.clock_hz,
        "power": {"idle": 0.0, "max": 1.0, "provenance": "not measured: placeholder power range"},
    }
    device = Device.model_validate(base)
    device = device.model_copy(update={"efficiency": DeviceEfficiency(gemm=host_tiling(), expert_loop=True)})
    progress(f"fitting {len(points.ops)} points")
    fitted, info = fit_host(device, points, executor_dispatch)
    progress("GEMMs on a transposed weight")
    info["transposed"] = bench_transposed(quick)
    fitted = with_transposed(fitted, info["transposed"])
    progress("KV dequantization")
    fitted, info["dequantize"] = fit_dequantize(fitted, bench_dequantize(host, quick))
    progress("worker processes: shared memory, collectives, GEMMs")
    shared = bench_shared(quick, host.cores, fitted)

    command = "infersim calibrate --out OUT" + (" --quick" if quick else "")
    info = {**info, "executor_dispatch": executor_dispatch, "passes": passes,
            "measured_peak_flops": measured_peak["gemm_flops"]}
    document = _yaml_document(fitted, info, host, command, quick, stream, dram, dispatch, disk,
                              shared, points, load_before, load_after)
    return document, fitted


def _yaml_document(fitted: Device, info: dict[str, Any], host: Machine, command: str, quick: bool,
                   stream: list[dict[str, float]], dram: float, dispatch: float, disk: dict[str, Any],
                   shared: dict[str, Any], points: Points, load_before: tuple[float, ...],
                   load_after: tuple[float, ...]) -> dict[str, Any]:
    from simulator.calibrate.operators import _round

    eff = fitted.efficiency
    assert eff.gemm is not None
    gb = 1e9
    return {
        "kind": "device",
        "name": fitted.name,
        "vendor": "host",
        "type": "cpu",
        "compute": {
            "fp32": f"{fitted.compute['fp32'] / 1e9:.4g} GFLOPS",
            "fp64": f"{fitted.compute['fp64'] / 1e9:.4g} GFLOPS",
        },
        "memory": [{
            "name": "dram",
            "capacity": f"{host.memory_bytes / 2**30:.4g} GiB",
            "bandwidth": f"{dram / gb:.4g} GB/s",
            "latency": "100 ns",
        }],
        "cache": f"{(host.l3_bytes or 0) / 2**20:.4g} MiB",
        "compute_units": host.cores,
        "clock": f"{host.clock_hz / 1e9:.4g} GHz",
        "power": {"idle": "0 W", "max": "1 W",
                  "provenance": "not measured: a placeholder range; this host's energy numbers mean nothing"},
        "efficiency": {
            "compute": 0.7,
            "memory": 0.8,
            **_efficiency_fields(eff),
            "provenance": "fitted to this machine's microbenchmarks (see fit)",
            "fit": _round({
                **info,
                "command": command,
                "date": dt.datetime.now().isoformat(timespec="seconds"),
                "machine": host.describe(),
                "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                "peak_fp32": {"method": "the larger of cores x clock x FLOPs per cycle from "
                                        "/proc/cpuinfo and the best square fp32 GEMM (512-1536) "
                                        "on cache-resident operands",
                              "nominal_flops": host.peak_fp32,
                              "measured_flops": info.get("measured_peak_flops")},
                "dram_bandwidth": "best c = a + b rate at sizes of at least 4x the last-level cache",
                "dispatch_s_per_numpy_call": dispatch,
                "stream": stream,
                "disk": disk,
                "shared_memory": shared,
                "points": points.raw,
            }),
        },
    }


def write_yaml(document: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Host CPU calibrated by `infersim calibrate`: microbenchmarks only (GEMMs, memory\n"
        "# streams, the numpy executor's kernels, dispatch, disk, shared memory).\n"
        "# Raw points, fit residuals and the machine are under efficiency.fit.\n"
    )
    out.write_text(header + yaml.safe_dump(document, sort_keys=False, width=110))


def main_calibrate(out: Path, quick: bool, name: str | None = None) -> int:
    from simulator.specs.loader import load_device

    document, _ = calibrate(name or out.stem, quick, progress=lambda msg: print(msg, file=sys.stderr))
    write_yaml(document, out)
    load_device(out)  # what was written must load as a spec
    residuals = document["efficiency"]["fit"]["residuals"]
    print(f"wrote {out}: fit median error {residuals['median_abs_rel_error']:.1%}, "
          f"p90 {residuals['p90_abs_rel_error']:.1%} over {residuals['rows']} microbenchmarks")
    return 0
