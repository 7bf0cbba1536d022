"""What a serving run leaves behind, simulated or measured, and the numbers read off it.

Both the engine (``simulator.engine``) and the executor's real serving loop
(``validation.executor.serve``) fill one ``ServeRecords``, so predicted and measured
runs are summarized by the same code.

Per request (``REQUEST_COLUMNS``): ``arrival_s``, ``scheduled_s`` (first admitted to a
batch), ``first_token_s``, ``completion_s``, the prompt and output token counts,
``preemptions``, the replica or pool that served it and the energy charged to it.
Per iteration (``ITERATION_COLUMNS``): start and end, what the batch held, the KV
cache in use and the power drawn. ``token_gaps_s``: every gap between two
consecutive output tokens of one request (TBT samples), in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

REQUEST_COLUMNS = (
    "request_id", "arrival_s", "prompt_tokens", "output_tokens", "scheduled_s", "first_token_s",
    "completion_s", "preemptions", "replica", "pool", "energy_j",
)
ITERATION_COLUMNS = (
    "iteration", "replica", "pool", "start_s", "end_s", "prefill_requests", "prefill_tokens",
    "decode_requests", "decode_tokens", "kv_blocks_used", "kv_blocks_total", "power_w",
)
PERCENTILES = (50, 90, 99)


class IterationLog:
    """Per-iteration records as they are made, in growing numpy columns (one row of
    ``ITERATION_COLUMNS`` less ``iteration`` and ``pool``; a run of iterations is appended as
    arrays), and ``frame()``, their table in start order (replica breaking ties), numbered."""

    _NUMBERS = ITERATION_COLUMNS[1:2] + ITERATION_COLUMNS[3:]
    _INTEGERS = ("replica", "prefill_requests", "prefill_tokens", "decode_requests", "decode_tokens",
                 "kv_blocks_used", "kv_blocks_total")

    def __init__(self, capacity: int = 4096):
        self.rows = np.empty((capacity, len(self._NUMBERS)))
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _reserve(self, count: int) -> None:
        if self.size + count > len(self.rows):
            grown = np.empty((max(2 * len(self.rows), self.size + count), self.rows.shape[1]))
            grown[:self.size] = self.rows[:self.size]
            self.rows = grown

    def append(self, row: tuple) -> None:
        """One iteration: the values of ``_NUMBERS`` in order."""
        if self.size == len(self.rows):
            self._reserve(1)
        self.rows[self.size] = row
        self.size += 1

    def extend(self, columns: tuple) -> None:
        """A run of iterations: ``_NUMBERS`` in order, each an array or a scalar shared by all."""
        count = len(columns[1])
        self._reserve(count)
        block = self.rows[self.size:self.size + count]
        for j, values in enumerate(columns):
            block[:, j] = values
        self.size += count

    def frame(self, pools: list[str]) -> pd.DataFrame:
        """The table; ``pools[r]``: replica ``r``'s pool."""
        rows = self.rows[:self.size]
        order = np.lexsort((rows[:, 0], rows[:, 1]))  # by start, then replica
        columns: dict[str, Any] = {"iteration": np.arange(self.size)}
        for j, name in enumerate(self._NUMBERS):
            column = rows[:, j][order]
            columns[name] = column.astype(np.int64) if name in self._INTEGERS else column
            if name == "replica":
                columns["pool"] = np.asarray(pools, dtype=object)[columns["replica"]]
        return pd.DataFrame(columns, columns=list(ITERATION_COLUMNS))


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    """``{p50, p90, p99}`` of ``values`` (None when there are none)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)}


@dataclass
class ServeRecords:
    """Per-request and per-iteration records of one serving run."""

    requests: pd.DataFrame
    iterations: pd.DataFrame
    token_gaps_s: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, frame, columns in (("requests", self.requests, REQUEST_COLUMNS),
                                     ("iterations", self.iterations, ITERATION_COLUMNS)):
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise ValueError(f"{name} records lack columns {missing}")
        self.token_gaps_s = np.asarray(self.token_gaps_s, dtype=float)

    @property
    def completed(self) -> pd.DataFrame:
        return self.requests[np.isfinite(self.requests["completion_s"].to_numpy(dtype=float))]

    def summary(self, slo_ttft_s: float | None = None, slo_tbt_s: float | None = None) -> dict[str, Any]:
        """The headline numbers: latency percentiles, throughput, goodput, energy and power.

        Throughput counts output tokens of completed requests over the makespan (first arrival
        to last completion). Goodput counts requests meeting both SLOs (TTFT, and the request's
        worst token gap for TBT) per second of makespan; without SLOs it equals throughput in
        requests. ``power_w.mean`` is energy over makespan (idle between iterations included
        when the iteration records carry it).
        """
        done = self.completed
        ttft = (done["first_token_s"] - done["arrival_s"]).to_numpy(dtype=float)
        e2e = (done["completion_s"] - done["arrival_s"]).to_numpy(dtype=float)
        tokens = float(done["output_tokens"].sum())
        start = float(self.requests["arrival_s"].min()) if len(self.requests) else 0.0
        end = float(done["completion_s"].max()) if len(done) else start
        makespan = max(end - start, 1e-12)
        good = np.ones(len(done), dtype=bool)
        if slo_ttft_s is not None:
            good &= ttft <= slo_ttft_s
        if slo_tbt_s is not None and "tbt_max_s" in done.columns:
            good &= done["tbt_max_s"].fillna(0.0).to_numpy(dtype=float) <= slo_tbt_s
        energy = float(self.iterations_energy_j())
        return {
            "completed": int(len(done)),
            "requests": int(len(self.requests)),
            "throughput_tokens_per_s": tokens / makespan,
            "throughput_requests_per_s": len(done) / makespan,
            "ttft_s": percentiles(ttft),
            "tbt_s": percentiles(self.token_gaps_s),
            "e2e_s": percentiles(e2e),
            "goodput_requests_per_s": float(good.sum()) / makespan,
            "preemptions": int(self.requests["preemptions"].sum()),
            "energy_j_per_token": energy / tokens if tokens else None,
            "power_w": {"mean": energy / makespan, "peak": self.peak_power_w()},
            "makespan_s": makespan,
        }

    def peak_power_w(self) -> float:
        """Highest total power over time: every replica at its iteration's power while it runs
        and at its idle power (``meta["replica_idle_w"]``, by replica) between iterations."""
        it = self.iterations
        if not len(it):
            return 0.0
        idle = self.meta.get("replica_idle_w", {})
        base = float(sum(idle.values()))
        lift = it["power_w"].to_numpy(dtype=float) - np.array([idle.get(r, 0.0) for r in it["replica"]])
        times = np.concatenate([it["start_s"].to_numpy(dtype=float), it["end_s"].to_numpy(dtype=float)])
        steps = np.concatenate([lift, -lift])
        order = np.lexsort((steps, times))  # at equal times, ends (negative) before starts
        return base + float(np.max(np.cumsum(steps[order])))

    def iterations_energy_j(self) -> float:
        it = self.iterations
        if not len(it):
            return 0.0
        busy = float(((it["end_s"] - it["start_s"]) * it["power_w"]).sum())
        return busy + float(self.meta.get("idle_energy_j", 0.0))

    def write(self, path: str, kind: str = "requests") -> None:
        """Write one table as CSV or Parquet (by the file's suffix)."""
        frame = self.requests if kind == "requests" else self.iterations
        if str(path).endswith(".parquet"):
            frame.to_parquet(path, index=False)
        else:
            frame.to_csv(path, index=False)

    def write_chrome_trace(self, path: str) -> None:
        """A Chrome/Perfetto trace (opens in ui.perfetto.dev): one process per replica with its
        iterations as slices (composition, KV blocks and power in their args), and one async
        track per request from arrival to completion with its first token as an instant."""
        import json

        events: list[dict[str, Any]] = []
        it = self.iterations
        for replica, pool in it[["replica", "pool"]].drop_duplicates().itertuples(index=False):
            events.append({"ph": "M", "name": "process_name", "pid": int(replica) + 1,
                           "args": {"name": f"replica {int(replica)} ({pool})"}})
        for row in it.itertuples(index=False):
            name = (f"prefill {row.prefill_tokens} + decode {row.decode_tokens}" if row.prefill_tokens
                    else f"decode {row.decode_tokens}")
            events.append({"ph": "X", "name": name, "pid": int(row.replica) + 1, "tid": 1,
                           "ts": row.start_s * 1e6, "dur": (row.end_s - row.start_s) * 1e6,
                           "args": {"prefill_requests": int(row.prefill_requests),
                                    "decode_requests": int(row.decode_requests),
                                    "kv_blocks_used": int(row.kv_blocks_used),
                                    "power_w": float(row.power_w)}})
        events.append({"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "requests"}})
        for row in self.completed.itertuples(index=False):
            rid = int(row.request_id)
            common = {"cat": "request", "name": f"request {rid}", "id": rid, "pid": 0, "tid": 0}
            events.append({**common, "ph": "b", "ts": row.arrival_s * 1e6,
                           "args": {"prompt_tokens": int(row.prompt_tokens),
                                    "output_tokens": int(row.output_tokens),
                                    "replica": int(row.replica), "preemptions": int(row.preemptions)}})
            events.append({**common, "ph": "n", "name": "first token", "ts": row.first_token_s * 1e6})
            events.append({**common, "ph": "e", "ts": row.completion_s * 1e6})
        with open(path, "w") as out:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, out)
