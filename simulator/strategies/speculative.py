"""Speculative decoding: a draft proposes ``gamma`` tokens, the target verifies them in one step.

Per round (Leviathan et al., 2023): the draft runs ``gamma`` decode steps, then the target runs
one step over the ``gamma + 1`` positions (the drafted tokens and the one after), projecting each
onto the vocabulary. With a per-token acceptance rate ``alpha`` (independent positions) the
expected tokens a round yields is ``(1 - alpha^(gamma+1)) / (1 - alpha)``; with a per-position
profile ``a_1..a_gamma`` (probability that position ``i`` is accepted given the ones before),
``1 + sum_i prod_{j<=i} a_j``. The time per output token is the round's time over that.

Speculation pays when that beats the target's plain decode step. ``break_even_alpha`` is the
acceptance rate at which the two are equal (none when even ``alpha = 1`` does not pay, as at a
batch large enough that verifying ``gamma + 1`` positions costs as much as ``gamma + 1`` steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from simulator.errors import InferSimError
from simulator.specs.model import ModelSpec


def parse_profile(text: str | None) -> tuple[float, ...] | None:
    """``--spec-profile``'s comma-separated acceptance rates (``None`` when not given)."""
    if not text:
        return None
    try:
        return tuple(float(a) for a in text.split(","))
    except ValueError:
        raise InferSimError(f"--spec-profile {text!r}: give comma-separated acceptance rates, "
                            "e.g. 0.9,0.8,0.7,0.6") from None


@dataclass(frozen=True)
class Speculation:
    draft: str | Path | ModelSpec
    gamma: int = 4
    alpha: float | None = 0.8
    profile: tuple[float, ...] | None = None
    draft_hardware: str | Path | None = None
    """Run the draft on another device (a system name or file); ``None``: the target's device."""
    draft_kv_budget: int | None = None
    """The draft attends to (and caches) at most this many recent tokens. With ``draft="self"``
    the target drafts for itself over that sparse cache, sharing its weights (TriForce, MagicDec)."""

    @property
    def self_draft(self) -> bool:
        return isinstance(self.draft, str) and self.draft == "self"

    def draft_model(self, target: ModelSpec) -> ModelSpec:
        """The draft's shape: a named model, or the target itself; windowed by ``draft_kv_budget``."""
        from simulator.specs.loader import load_model

        draft = target if self.self_draft else load_model(self.draft)
        if self.draft_kv_budget is None:
            return draft
        window = min(self.draft_kv_budget, draft.sliding_window or self.draft_kv_budget)
        name = f"{draft.name} (self-draft)" if self.self_draft else draft.name
        return draft.model_copy(update={"sliding_window": window, "name": name})

    def __post_init__(self) -> None:
        if self.self_draft and self.draft_kv_budget is None:
            raise InferSimError("--draft-model self drafts with the target over a sparse KV cache; give "
                                "its size with --draft-kv-budget TOKENS (e.g. 4096)")
        if self.draft_kv_budget is not None and (isinstance(self.draft_kv_budget, bool)
                                                 or not isinstance(self.draft_kv_budget, int)
                                                 or self.draft_kv_budget < 1):
            raise InferSimError(f"--draft-kv-budget must be a whole number of tokens, at least 1; "
                                f"got {self.draft_kv_budget!r}")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or not 1 <= self.gamma <= 64:
            raise InferSimError(f"--spec-gamma must be a whole number of drafted tokens from 1 to 64, "
                                f"got {self.gamma!r}")
        if self.profile is not None:
            if len(self.profile) != self.gamma:
                raise InferSimError(f"the acceptance profile has {len(self.profile)} positions; it needs "
                                    f"one per drafted token (gamma = {self.gamma})")
            if any(not 0.0 <= a <= 1.0 for a in self.profile):
                raise InferSimError("every acceptance in the profile must be between 0 and 1")
        elif self.alpha is None or not 0.0 <= self.alpha <= 1.0:
            raise InferSimError(f"--spec-alpha must be an acceptance rate between 0 and 1, "
                                f"got {self.alpha!r}")

    def expected_tokens(self) -> float:
        """Tokens one verification round yields on average (the target's own included)."""
        if self.profile is not None:
            total, survive = 1.0, 1.0
            for accept in self.profile:
                survive *= accept
                total += survive
            return total
        return expected_tokens(self.alpha or 0.0, self.gamma)


def expected_tokens(alpha: float, gamma: int) -> float:
    """``(1 - alpha^(gamma+1)) / (1 - alpha)``; ``gamma + 1`` at ``alpha = 1``."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def break_even_alpha(gamma: int, round_s: float, plain_s: float) -> float | None:
    """The acceptance rate at which a round of ``round_s`` yields tokens as fast as plain decoding."""
    needed = round_s / plain_s
    if needed > gamma + 1:
        return None
    return acceptance_for(needed, gamma)


def acceptance_for(tokens_per_round: float, gamma: int) -> float:
    """The per-token acceptance rate whose expected tokens per round is ``tokens_per_round``."""
    if tokens_per_round >= gamma + 1:
        return 1.0
    if tokens_per_round <= 1.0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens(mid, gamma) < tokens_per_round:
            low = mid
        else:
            high = mid
    return high
