"""The highest arrival rate a deployment serves within its SLOs (DistServe's per-GPU goodput).

``attainment(rate)``: the fraction of requests whose TTFT is within ``slo_ttft_s`` and whose
worst gap between tokens is within ``slo_tbt_s``, serving a workload drawn at that rate (the
same seed, so lengths are the same at every rate). ``capacity`` doubles the rate until the
attainment drops below the target, then bisects to ``tolerance`` (relative); the answer is the
highest rate found that meets the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulator.engine.records import ServeRecords
from simulator.errors import InferSimError


def attainment(records: ServeRecords, slo_ttft_s: float | None, slo_tbt_s: float | None) -> float:
    req = records.requests
    ok = np.isfinite(req["completion_s"].to_numpy(dtype=float))
    if slo_ttft_s is not None:
        ok &= (req["first_token_s"] - req["arrival_s"]).to_numpy(dtype=float) <= slo_ttft_s
    if slo_tbt_s is not None:
        ok &= req["tbt_max_s"].fillna(0.0).to_numpy(dtype=float) <= slo_tbt_s
    return float(ok.mean()) if len(ok) else 0.0


@dataclass
class Capacity:
    rate: float
    """Highest rate (requests/s) found meeting the target; 0 when even ``start`` misses it."""
    attainment: float
    target: float
    probes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rate_requests_per_s": self.rate, "attainment": self.attainment,
                "target_attainment": self.target, "probes": self.probes}


def capacity(serve_at: Callable[[float], ServeRecords], slo_ttft_s: float | None, slo_tbt_s: float | None,
             target: float = 0.9, start: float = 1.0, tolerance: float = 0.05,
             max_probes: int = 30) -> Capacity:
    if slo_ttft_s is None and slo_tbt_s is None:
        raise InferSimError("capacity needs an objective: --slo-ttft and/or --slo-tbt")
    if not 0 < target <= 1:
        raise InferSimError(f"target attainment must be in (0, 1], got {target}")
    if not start > 0 or not tolerance > 0:
        raise InferSimError("the starting rate and the tolerance must be positive")
    probes: list[dict[str, Any]] = []

    def probe(rate: float) -> float:
        records = serve_at(rate)
        value = attainment(records, slo_ttft_s, slo_tbt_s)
        summary = records.summary(slo_ttft_s, slo_tbt_s)
        probes.append({"rate": rate, "attainment": value, "ttft_p90_s": summary["ttft_s"]["p90"],
                       "tbt_p90_s": summary["tbt_s"]["p90"],
                       "throughput_tokens_per_s": summary["throughput_tokens_per_s"]})
        return value

    good, good_value, bad = 0.0, 0.0, None
    rate = start
    while len(probes) < max_probes:
        value = probe(rate)
        if value >= target:
            good, good_value = rate, value
            if bad is not None:
                break
            rate *= 2
        else:
            bad = rate
            if good:
                break
            rate /= 2
            if rate < start / 1024:
                return Capacity(0.0, value, target, probes)
    while bad is not None and good and bad / good - 1 > tolerance and len(probes) < max_probes:
        mid = (good * bad) ** 0.5
        value = probe(mid)
        if value >= target:
            good, good_value = mid, value
        else:
            bad = mid
    return Capacity(good, good_value, target, probes)
