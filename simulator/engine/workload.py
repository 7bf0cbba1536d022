"""Requests for a serving run: from a trace file, or drawn from arrival and length distributions.

A workload is three arrays (arrival time, prompt tokens, output tokens) plus an
optional shared-prefix group per request (requests of one group share their
first ``prefix_tokens`` prompt tokens, which prefix caching can reuse).

Arrivals: Poisson at ``rate`` (exponential gaps), or gamma with a coefficient of
variation ``cv`` (``cv = 1`` is Poisson; above 1 burstier). Lengths: ``fixed``,
``uniform`` between two bounds, ``lognormal`` with a median and a spread
(sigma of the log), or ``trace`` (sampled with replacement from a trace's
columns). All draws come from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from simulator.errors import InferSimError

TRACE_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")


@dataclass(frozen=True)
class Workload:
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_group: np.ndarray | None = None
    """Shared-prefix group of each request (-1: none)."""
    prefix_tokens: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise InferSimError("a workload's arrival, prompt and output arrays differ in length")
        if n and (np.any(self.prompt_tokens < 1) or np.any(self.output_tokens < 1)):
            raise InferSimError(f"{self.source or 'workload'}: every request needs at least one prompt "
                                "token and one output token")
        if n and np.any(np.diff(self.arrival_s) < 0):
            order = np.argsort(self.arrival_s, kind="stable")
            for name in ("arrival_s", "prompt_tokens", "output_tokens"):
                object.__setattr__(self, name, getattr(self, name)[order])
            if self.prefix_group is not None:
                object.__setattr__(self, "prefix_group", self.prefix_group[order])

    def __len__(self) -> int:
        return len(self.arrival_s)

    def describe(self) -> dict:
        return {
            "source": self.source, "requests": len(self),
            "duration_s": float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0,
            "prompt_tokens_mean": float(self.prompt_tokens.mean()) if len(self) else 0.0,
            "output_tokens_mean": float(self.output_tokens.mean()) if len(self) else 0.0,
        }


def read_trace(path: str | Path, max_requests: int | None = None, time_scale: float = 1.0,
               start_s: float | None = None) -> Workload:
    """A trace CSV with ``num_prefill_tokens`` and ``num_decode_tokens`` (and ``arrived_at`` in
    seconds, when it has arrival times: the Azure traces). ``time_scale`` stretches the arrival
    times (2 halves the rate); ``start_s`` skips to that point of the trace."""
    path = Path(path)
    if not path.is_file():
        raise InferSimError(f"{path}: no such trace file; the shared traces live in ../shared/traces/")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise InferSimError(f"{path}: not a CSV trace ({exc})") from None
    missing = [c for c in TRACE_COLUMNS if c not in frame.columns]
    if missing:
        raise InferSimError(f"{path}: a trace needs columns {', '.join(TRACE_COLUMNS)} "
                            f"(and arrived_at); missing {', '.join(missing)}")
    if "arrived_at" not in frame.columns:
        raise InferSimError(f"{path}: no arrived_at column; use it for lengths only "
                            f"(--input-len trace:{path} --output-len trace:{path}) with --rate")
    if time_scale <= 0:
        raise InferSimError(f"time scale must be positive, got {time_scale}")
    if start_s is not None:
        frame = frame[frame["arrived_at"] >= start_s]
    if max_requests is not None:
        frame = frame.iloc[:max_requests]
    arrivals = frame["arrived_at"].to_numpy(dtype=float)
    arrivals = (arrivals - (arrivals[0] if len(arrivals) else 0.0)) * time_scale
    return Workload(arrivals, np.maximum(frame["num_prefill_tokens"].to_numpy(dtype=np.int64), 1),
                    np.maximum(frame["num_decode_tokens"].to_numpy(dtype=np.int64), 1), source=str(path))


def _trace_column(path: str, column: str) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise InferSimError(f"length distribution trace:{path}: no such file")
    frame = pd.read_csv(p)
    if column not in frame.columns:
        raise InferSimError(f"trace:{path}: no {column} column")
    return frame[column].to_numpy(dtype=np.int64)


def draw_lengths(spec: str | int, count: int, rng: np.random.Generator, column: str) -> np.ndarray:
    """Lengths from a distribution written as text:

    ``N`` (fixed), ``uniform:LO:HI``, ``lognormal:MEDIAN:SIGMA``, ``trace:PATH`` (sampled from
    the trace's ``column``, with replacement)."""
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    try:
        if not rest:
            value = int(kind)
            if value < 1:
                raise ValueError
            return np.full(count, value, dtype=np.int64)
        if kind == "uniform":
            lo, hi = (int(v) for v in rest.split(":"))
            if not 1 <= lo <= hi:
                raise ValueError
            return rng.integers(lo, hi + 1, size=count)
        if kind == "lognormal":
            median, sigma = (float(v) for v in rest.split(":"))
            if median < 1 or sigma < 0:
                raise ValueError
            drawn = median * np.exp(sigma * rng.standard_normal(count))
            return np.maximum(1, np.round(drawn)).astype(np.int64)
        if kind == "trace":
            values = _trace_column(rest, column)
            return np.maximum(1, rng.choice(values, size=count, replace=True))
    except ValueError:
        pass
    raise InferSimError(f"length distribution {text!r}: write N, uniform:LO:HI, lognormal:MEDIAN:SIGMA "
                        "or trace:PATH (lengths at least 1)")


def arrivals(count: int, rate: float, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """Arrival times of ``count`` requests at ``rate`` per second: gamma-distributed gaps with
    mean ``1/rate`` and coefficient of variation ``cv`` (exponential at ``cv = 1``); the first
    request arrives at 0."""
    if not rate > 0:
        raise InferSimError(f"arrival rate must be positive (requests per second), got {rate}")
    if not cv > 0:
        raise InferSimError(f"arrival cv must be positive, got {cv}")
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=count)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic(requests: int | None, rate: float, input_len: str | int, output_len: str | int,
              seed: int = 0, cv: float = 1.0, duration_s: float | None = None,
              prefix_tokens: int = 0, prefix_groups: int = 0) -> Workload:
    """``requests`` requests (or as many as arrive within ``duration_s``) at ``rate`` per second.

    ``prefix_groups > 0``: each request belongs to one of that many groups (uniformly) whose
    members share their first ``prefix_tokens`` prompt tokens (a system prompt)."""
    rng = np.random.default_rng(seed)
    if requests is None:
        if duration_s is None or duration_s <= 0:
            raise InferSimError("give a request count (--requests N) or a positive duration (--duration S)")
        expected = int(rate * duration_s * 1.5 + 10 * np.sqrt(rate * duration_s) + 10)
        times = arrivals(expected, rate, rng, cv)
        requests = int(np.searchsorted(times, duration_s))
        times = times[:requests]
    else:
        if isinstance(requests, bool) or requests < 1:
            raise InferSimError(f"request count must be a positive integer, got {requests}")
        times = arrivals(requests, rate, rng, cv)
    prompt = draw_lengths(input_len, requests, rng, "num_prefill_tokens")
    output = draw_lengths(output_len, requests, rng, "num_decode_tokens")
    group = None
    if prefix_groups:
        if prefix_tokens < 1:
            raise InferSimError("shared prefixes need --prefix-tokens N (N >= 1)")
        group = rng.integers(0, prefix_groups, size=requests)
        prompt = np.maximum(prompt, prefix_tokens + 1)
    return Workload(times, prompt, output, group, prefix_tokens if prefix_groups else 0,
                    source=f"{'poisson' if cv == 1 else f'gamma cv={cv}'} {rate}/s")


def clip_lengths(workload: Workload, max_input_len: int | None = None, max_output_len: int | None = None,
                 max_total: int | None = None) -> Workload:
    """Cap prompt and output lengths (a trace's longest requests beyond a model's context);
    ``max_total`` trims the prompt so that prompt plus output fits a context window."""
    prompt, output = workload.prompt_tokens.copy(), workload.output_tokens.copy()
    if max_input_len is not None:
        prompt = np.minimum(prompt, max_input_len)
    if max_output_len is not None:
        output = np.minimum(output, max_output_len)
    if max_total is not None:
        output = np.minimum(output, max_total - 1)
        prompt = np.minimum(prompt, max_total - output)
    if np.any(prompt < 1) or np.any(output < 1):
        raise InferSimError("length limits must leave at least one prompt and one output token")
    return Workload(workload.arrival_s, prompt, output, workload.prefix_group, workload.prefix_tokens,
                    workload.source)
