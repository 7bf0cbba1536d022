"""Measured records of one generation and their summary over repeats.

Per repeat: ``TTFT`` = wall time of the prefill step (it yields the first
token), ``TPOT`` = mean wall time of the ``G - 1`` decode steps, ``e2e`` = wall
time from the start of prefill to the last token, throughput = ``B * G / e2e``.
Per step: ``dispatch = wall - sum(kernel times)``. The summary takes the median
over repeats and gives the spread ``(max - min) / median`` beside it as noise.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class StepRecord:
    phase: str  # "prefill" or "decode"
    wall_s: float
    kernel_s: float
    kernels: int
    ops: dict[str, tuple[int, float]]  # op name -> (kernels, seconds)
    # Worker processes' collectives: name -> (calls, bytes, seconds), waits for peers included.
    collectives: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # Memory-hierarchy strategies' counts: expert hits, misses and bytes read, keys attended.
    counters: dict[str, float] = field(default_factory=dict)

    @property
    def dispatch_s(self) -> float:
        return self.wall_s - self.kernel_s


@dataclass(frozen=True)
class Generation:
    tokens: np.ndarray  # [B, G] greedy tokens
    steps: list[StepRecord]
    e2e_s: float

    @property
    def decode_steps(self) -> list[StepRecord]:
        return self.steps[1:]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class RepeatResult:
    """One timed generation."""

    ttft_s: float
    tpot_s: float | None  # None when output_len == 1 (no decode step)
    e2e_s: float
    throughput_tokens_per_s: float
    dispatch_s_per_step: dict[str, float | None]
    kernel_s_per_step: dict[str, float | None]
    kernels_per_step: dict[str, float | None]

    @classmethod
    def of(cls, gen: Generation) -> RepeatResult:
        prefill, decode = gen.steps[0], gen.decode_steps
        batch, output_len = gen.tokens.shape

        def per_step(attr: str) -> dict[str, float | None]:
            return {"prefill": float(getattr(prefill, attr)),
                    "decode": _mean([float(getattr(s, attr)) for s in decode])}

        return cls(
            ttft_s=prefill.wall_s,
            tpot_s=_mean([s.wall_s for s in decode]),
            e2e_s=gen.e2e_s,
            throughput_tokens_per_s=batch * output_len / gen.e2e_s,
            dispatch_s_per_step=per_step("dispatch_s"),
            kernel_s_per_step=per_step("kernel_s"),
            kernels_per_step=per_step("kernels"),
        )


def op_breakdown(steps: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Per op name: kernels and seconds per step, averaged over ``steps``."""
    totals: dict[str, list[float]] = {}
    for step in steps:
        for name, (count, seconds) in step.ops.items():
            total = totals.setdefault(name, [0.0, 0.0])
            total[0] += count
            total[1] += seconds
    n = max(len(steps), 1)
    return {name: {"kernels": count / n, "time_s": seconds / n} for name, (count, seconds) in totals.items()}


def counter_breakdown(steps: list[StepRecord]) -> dict[str, float]:
    """Per counter: its mean per step over ``steps`` (a step without it counts 0)."""
    totals: dict[str, float] = {}
    for step in steps:
        for name, value in step.counters.items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: total / max(len(steps), 1) for name, total in totals.items()}


@dataclass(frozen=True)
class MemoryRecord:
    weights_bytes: int
    kv_cache_bytes: int
    activations_peak_bytes: int
    rss_peak_bytes: int
    method: str

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activations_peak_bytes


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def _spread(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return None
    return (max(present) - min(present)) / statistics.median(present)


@dataclass(frozen=True)
class ExecutionResult:
    """Medians over repeats of a measured generation, with the per-repeat values."""

    model: str
    backend: str
    device: str
    dtype: str
    batch: int
    input_len: int
    output_len: int
    seed: int
    memory: MemoryRecord
    repeats: list[RepeatResult]
    ops: dict[str, dict[str, dict[str, float]]]  # phase -> op -> per-step kernels and time
    output_tokens: list[int]  # greedy tokens of the first sequence
    contention: dict[str, float | None] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    parallel: dict[str, Any] | None = None  # worker processes: degrees and collectives per step
    speculative: dict[str, Any] | None = None  # draft model: gamma, alpha, rounds, step times
    # KV policy, KV quantization, expert cache: settings and counters per step of each phase.
    strategy: dict[str, Any] | None = None

    def median(self, attr: str) -> float | None:
        return _median([getattr(r, attr) for r in self.repeats])

    def _per_step(self, attr: str) -> dict[str, float | None]:
        return {phase: _median([getattr(r, attr)[phase] for r in self.repeats])
                for phase in ("prefill", "decode")}

    @property
    def ttft_s(self) -> float:
        value = self.median("ttft_s")
        assert value is not None
        return value

    @property
    def tpot_s(self) -> float | None:
        return self.median("tpot_s")

    @property
    def e2e_s(self) -> float:
        value = self.median("e2e_s")
        assert value is not None
        return value

    def to_dict(self) -> dict[str, Any]:
        metrics = ("ttft_s", "tpot_s", "e2e_s", "throughput_tokens_per_s")
        return {
            "model": self.model, "backend": self.backend, "device": self.device, "dtype": self.dtype,
            "batch": self.batch, "input_len": self.input_len, "output_len": self.output_len,
            "seed": self.seed,
            **{m: self.median(m) for m in metrics},
            "noise": {m: _spread([getattr(r, m) for r in self.repeats]) for m in metrics},
            "contention": self.contention,
            "peak_memory_bytes": self.memory.peak_bytes,
            "memory": {**asdict(self.memory), "peak_bytes": self.memory.peak_bytes},
            "dispatch_s_per_step": self._per_step("dispatch_s_per_step"),
            "kernel_s_per_step": self._per_step("kernel_s_per_step"),
            "kernels_per_step": self._per_step("kernels_per_step"),
            "ops": self.ops,
            "output_tokens": self.output_tokens,
            "repeats": [asdict(r) for r in self.repeats],
            "machine": self.machine,
            **({"parallel": self.parallel} if self.parallel is not None else {}),
            **({"speculative": self.speculative} if self.speculative is not None else {}),
            **({"strategy": self.strategy} if self.strategy is not None else {}),
        }
