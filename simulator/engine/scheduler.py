"""Batching policies: which requests a replica's next iteration carries, and how many tokens each.

Every policy sees the replica's ``running`` requests (admitted, in admission order) and its
``waiting`` queue (first come, first served), and returns an ``Iteration``:

- ``static``: a fixed batch of up to ``max_batch`` requests is prefilled together, then decoded
  until its longest request finishes (finished ones keep their slot: the batch waits for the
  slowest); only then is the next batch formed. KV is reserved for prompt plus output up front.
- ``continuous`` (vLLM): prefill has priority. When waiting prompts fit (sequences, tokens,
  KV blocks), the iteration prefills them, whole; otherwise it decodes every running request.
- ``chunked`` (Sarathi-Serve): a budget of ``chunk_size`` tokens per iteration; every running
  decode takes one token, then prefills in progress and newly admitted prompts fill the rest
  of the budget in chunks. Decodes never stall behind a long prompt.
- ``decode-priority``: decodes first as in ``chunked``, then whole prompts while the
  ``max_batch_tokens`` budget lasts; a prompt that does not fit waits (no chunking).

A decode that needs a new KV block when none is free preempts the most recently admitted
request (recompute: its cache is dropped and rebuilt by a prefill when it returns; swap: its
cache is copied to host memory and back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from simulator.errors import InferSimError

POLICIES = ("static", "continuous", "chunked", "decode-priority")
PREEMPTION = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "continuous"
    max_batch: int = 256
    """Most sequences in one iteration."""
    max_batch_tokens: int = 8192
    """Most new tokens in one iteration (prefill chunks plus decodes)."""
    chunk_size: int = 512
    """Token budget per iteration under ``chunked``."""
    block_size: int = 16
    preemption: str = "recompute"
    prefix_caching: bool = True
    watermark: float = 0.01
    """Fraction of KV blocks admission leaves free for running requests to grow into."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InferSimError(f"scheduler {self.policy!r}: choose one of {', '.join(POLICIES)}")
        if self.preemption not in PREEMPTION:
            raise InferSimError(f"preemption {self.preemption!r}: choose recompute or swap")
        for name in ("max_batch", "max_batch_tokens", "chunk_size", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InferSimError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 <= self.watermark < 1:
            raise InferSimError(f"watermark must be in [0, 1), got {self.watermark}")

    @property
    def token_budget(self) -> int:
        if self.policy == "chunked":
            return min(self.chunk_size, self.max_batch_tokens)
        return self.max_batch_tokens


@dataclass
class Iteration:
    """One iteration's work: prefill chunks (request, tokens) and decode requests."""

    prefill: list[tuple[int, int]] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)
    padding: list[int] = field(default_factory=list)
    """Static batching: finished requests still occupying their slot (decoded, discarded)."""
    swap_bytes: float = 0.0
    """KV bytes copied to or from host memory by preemption this iteration."""
    decode_ids: Any = None
    """``decode`` as an array, once the engine has made one."""

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode and not self.padding

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode) + len(self.padding)
