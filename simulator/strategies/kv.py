"""KV-cache eviction: keep a budget of tokens per sequence instead of the whole context.

* ``window``: the most recent ``budget`` tokens.
* ``streaming`` (StreamingLLM): ``sinks`` first tokens plus the most recent
  ``budget - sinks``.
* ``h2o`` (Heavy-Hitter Oracle): the ``budget`` tokens with the largest
  accumulated attention, half of them the most recent; every decode step adds
  each head's attention probabilities to a running score per kept token and
  drops the lowest, an extra pass over ``budget`` float32 scores per head.

Prefill attends to the whole prompt (the policies evict after it); decode
attends to at most ``budget`` keys, so per step it reads at most ``budget``
tokens of KV, and the cache holds ``budget`` tokens per sequence, which sets
the largest batch that fits. The budget is a token count (``> 1``) or a
fraction of the full sequence ``input_len + output_len`` (``<= 1``, as the
H2O paper states its 20% budget).

KV quantization (KIVI) is ``kv_dtype`` with ``kv_residual`` recent tokens
kept in the activation dtype; see ``simulator/graph/transformer.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from simulator.errors import InferSimError
from simulator.graph.ops import Op, Quantity
from simulator.specs.model import ModelSpec

KVPolicyKind = Literal["full", "window", "streaming", "h2o"]
POLICIES: tuple[str, ...] = ("full", "window", "streaming", "h2o")


@dataclass(frozen=True)
class KVPolicy:
    kind: str = "full"
    budget: float | None = None
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise InferSimError(f"--kv-policy {self.kind!r} is unknown; choose one of {', '.join(POLICIES)}")
        if self.kind == "full":
            if self.budget is not None:
                raise InferSimError("--kv-budget needs an eviction policy: --kv-policy window, "
                                    "streaming or h2o")
            return
        if self.budget is None:
            raise InferSimError(f"--kv-policy {self.kind} needs --kv-budget: a token count (e.g. 512) "
                                "or a fraction of the sequence (e.g. 0.2)")
        if isinstance(self.budget, bool) or not (self.budget > 0) or math.isinf(self.budget):
            raise InferSimError(f"--kv-budget must be a positive token count or a fraction in (0, 1], "
                                f"got {self.budget!r}")
        if self.budget > 1 and self.budget != int(self.budget):
            raise InferSimError(f"--kv-budget {self.budget:g}: above 1 it is a token count and must be "
                                "whole; below 1 it is a fraction of the sequence")
        if self.sinks < 0:
            raise InferSimError(f"--kv-sinks must be at least 0, got {self.sinks}")

    @classmethod
    def chosen(cls, kind: str, budget: float | None, sinks: int = 4) -> KVPolicy | None:
        """The policy a flag set or scenario names; ``None`` for the default (keep everything)."""
        if kind == "full" and budget is None:
            return None
        return cls(kind, budget, sinks)

    @property
    def evicts(self) -> bool:
        return self.kind != "full"

    def budget_tokens(self, input_len: int, output_len: int) -> int | None:
        """Tokens kept per sequence (``None``: everything)."""
        if not self.evicts:
            return None
        assert self.budget is not None
        tokens = self.budget if self.budget > 1 else math.ceil(self.budget * (input_len + output_len))
        tokens = max(int(tokens), 1)
        if self.kind == "streaming" and tokens <= self.sinks:
            raise InferSimError(f"--kv-budget of {tokens} tokens leaves no room beside {self.sinks} "
                                "attention sinks; raise the budget or lower --kv-sinks")
        return tokens

    def decode_model(self, model: ModelSpec, input_len: int, output_len: int) -> ModelSpec:
        """The model as decode sees it: attention over at most ``budget`` keys, as with a sliding
        window (sinks plus window, or heavy hitters, are as many keys as a window)."""
        budget = self.budget_tokens(input_len, output_len)
        if budget is None:
            return model
        window = budget if model.sliding_window is None else min(budget, model.sliding_window)
        return model.model_copy(update={"sliding_window": window})

    def extra_ops(self, model: ModelSpec, batch: int, kept: Quantity, dtype: str) -> list[Op]:
        """H2O's per-step bookkeeping: read and rewrite one float32 score per kept token and head,
        then pick the lowest (about 3 FLOPs a score)."""
        if self.kind != "h2o":
            return []
        scores = batch * model.num_attention_heads * kept
        return [Op(name="h2o_scores", kind="elementwise", flops=3.0 * scores, read_bytes=4.0 * scores,
                   write_bytes=4.0 * scores, dtype="fp32", count=model.num_layers)]
