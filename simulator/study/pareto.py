"""Pareto fronts and the best plan under SLOs, over a sweep's rows.

A row *dominates* another when it is at least as good in every objective and better in one. The
front is the feasible rows no feasible row dominates (rows with a missing objective value are left
out). Two objectives: sort by the first, then the second; a point is on the front when its second
value is below every earlier one (a running minimum, O(n log n)). More: take the lexicographically
first point left (nothing left can dominate it), keep it, drop every point it dominates, repeat
(O(n x front size), each step one vectorized comparison).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.errors import InferSimError

ALIASES = {
    "cost": ("cost_usd_per_million_tokens", "min"),
    "cost_per_million_tokens": ("cost_usd_per_million_tokens", "min"),
    "cost_per_request": ("cost_usd_per_request", "min"),
    "throughput": ("throughput_tokens_per_s", "max"),
    "throughput_per_device": ("throughput_per_device", "max"),
    "devices": ("devices", "min"),
    "gpus": ("devices", "min"),
    "ttft": ("ttft_s", "min"),
    "tpot": ("tpot_s", "min"),
    "energy": ("energy_j_per_token", "min"),
}
"""Short objective names (``--best cost``) and the column and direction they stand for."""
DIRECTIONS = ("min", "max")


def parse_objectives(text: str, flag: str = "--pareto") -> dict[str, str]:
    """``"tpot_s:min,throughput_tokens_per_s:max"`` (or short names: ``"tpot,throughput"``)."""
    objectives: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, direction = item.partition(":")
        column, default = ALIASES.get(name, (name, ""))
        direction = direction or default
        if direction not in DIRECTIONS:
            raise InferSimError(f"{flag} {item!r}: give COLUMN:min or COLUMN:max")
        objectives[column] = direction
    if not objectives:
        raise InferSimError(f"{flag}: name at least one objective, as COLUMN:min or COLUMN:max")
    return objectives


def with_derived(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``devices`` and ``throughput_per_device`` when it lacks them."""
    if "devices" in frame and "throughput_per_device" in frame:
        return frame
    from simulator.study.cost import row_devices

    out = frame.copy()
    if "devices" not in out:
        out["devices"] = row_devices(out)
    out["throughput_per_device"] = (pd.to_numeric(out["throughput_tokens_per_s"], errors="coerce")
                                    / out["devices"])
    return out


def _check(frame: pd.DataFrame, objectives: Mapping[str, str]) -> None:
    if not objectives:
        raise InferSimError("name at least one objective")
    for column, direction in objectives.items():
        if column not in frame:
            raise InferSimError(f"objective {column!r} is not a column of the study "
                                f"(numeric columns: {', '.join(_numeric(frame))})")
        if direction not in DIRECTIONS:
            raise InferSimError(f"objective {column!r}: direction must be min or max, got {direction!r}")


def _numeric(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]


def costs_matrix(frame: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """The objectives as an ``[rows, objectives]`` array to minimise (maxima negated)."""
    columns = [pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float) * (-1.0 if d == "max" else 1.0)
               for c, d in objectives.items()]
    return np.column_stack(columns) if columns else np.empty((len(frame), 0))


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (to minimise, no NaN) that no other row dominates."""
    n = len(points)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # Equal points do not dominate each other: find the front of the distinct points, then map back.
    unique, inverse = np.unique(points, axis=0, return_inverse=True)  # lexicographic order
    inverse = np.asarray(inverse).reshape(-1)
    if unique.shape[1] == 1:
        keep = unique[:, 0] == unique[0, 0]
    elif unique.shape[1] == 2:
        # Distinct and sorted: every earlier point has a smaller first value (or an equal first and
        # smaller second), so an earlier point with a second value <= this one's dominates it.
        second = unique[:, 1]
        earlier = np.minimum.accumulate(np.concatenate(([np.inf], second[:-1])))
        keep = second < earlier
    else:
        keep = np.zeros(len(unique), dtype=bool)
        alive = np.ones(len(unique), dtype=bool)
        while alive.any():
            first = int(np.argmax(alive))  # lexicographically first: nothing left dominates it
            keep[first] = True
            alive[first] = False
            left = np.flatnonzero(alive)
            others = unique[left]
            dominated = np.all(unique[first] <= others, axis=1) & np.any(unique[first] < others, axis=1)
            alive[left[dominated]] = False
    return keep[inverse]


def pareto_front(frame: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The feasible rows of ``frame`` that no feasible row dominates in ``objectives``
    (column -> ``"min"`` or ``"max"``; default ``tpot_s`` min, ``throughput_tokens_per_s`` max),
    sorted by the first objective. Rows missing an objective's value are left out."""
    objectives = dict(objectives or {"tpot_s": "min", "throughput_tokens_per_s": "max"})
    frame = with_derived(frame) if {"devices", "throughput_per_device"} & set(objectives) else frame
    _check(frame, objectives)
    feasible = frame[frame["feasible"].astype(bool)] if "feasible" in frame else frame
    points = costs_matrix(feasible, objectives)
    complete = ~np.isnan(points).any(axis=1)
    rows = feasible[complete]
    front = rows[non_dominated(points[complete])]
    first, direction = next(iter(objectives.items()))
    return front.sort_values(first, ascending=direction == "min", kind="stable")


@dataclass(frozen=True)
class BestPlan:
    """The best row meeting the SLOs, and why the rows that would beat it do not count."""

    plan: pd.Series | None
    objective: str
    direction: str
    candidates: int
    """Feasible rows meeting the SLOs (with a value of the objective)."""
    ranked: pd.DataFrame
    """Those rows, best first."""
    excluded_better: int
    """Rows better in the objective that do not fit or miss an SLO."""
    runner_up: pd.Series | None
    """The best of those excluded rows, with ``why`` naming the constraint that binds it."""
    why: str
    slo: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def record(row: pd.Series | None) -> dict[str, Any] | None:
            if row is None:
                return None
            return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in row.items()
                    if not (isinstance(v, float) and np.isnan(v))}

        return {"objective": self.objective, "direction": self.direction, "slo": self.slo,
                "candidates": self.candidates, "plan": record(self.plan),
                "excluded_better": self.excluded_better, "runner_up": record(self.runner_up), "why": self.why}


def slo_violations(row: pd.Series, slo: Mapping[str, float]) -> list[str]:
    found = []
    if "feasible" in row and not bool(row["feasible"]):
        reason = str(row.get("reason") or "no reason given").split(". ")[0]
        found.append(f"does not fit or raises: {reason}")
    for column, label in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
        if column in slo:
            value = row.get(column)
            if value is None or not np.isfinite(value):
                found.append(f"no {label}")
            elif value > slo[column]:
                found.append(f"{label} {_seconds(value)} > {_seconds(slo[column])} SLO")
    return found


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def best_plan(frame: pd.DataFrame, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
              objective: str = "cost", prices: Mapping[str, Any] | str | Path | None = None) -> BestPlan:
    """The feasible row meeting the SLOs that is best in ``objective``.

    ``objective`` is a column (``COLUMN:min``/``COLUMN:max``, or a short name: ``cost`` (USD per
    million output tokens: the frame's column, or from ``prices`` when given or the column is
    missing, default the shipped table), ``throughput``,
    ``throughput_per_device``, ``devices``, ``ttft``, ``tpot``, ``energy``). Ties go to fewer
    devices, then the lower TPOT. ``why`` names what binds the best excluded row (the runner-up
    that would have won): a TTFT or TPOT over its SLO, or memory."""
    (column, direction), = parse_objectives(objective, "objective").items()
    slo = {k: float(v) for k, v in (("ttft_s", slo_ttft_s), ("tpot_s", slo_tpot_s)) if v is not None}
    for name, value in slo.items():
        if not value > 0:
            raise InferSimError(f"SLO on {name} must be positive, got {value}")
    if (column in ("cost_usd_per_million_tokens", "cost_usd_per_request")
            and (column not in frame or prices is not None)):
        from simulator.study.cost import add_cost

        frame = add_cost(frame, prices)
    frame = with_derived(frame)
    _check(frame, {column: direction})
    value = pd.to_numeric(frame[column], errors="coerce")
    scored = frame[value.notna()]
    meets = scored["feasible"].astype(bool) if "feasible" in scored else pd.Series(True, index=scored.index)
    for name, bound in slo.items():
        meets &= pd.to_numeric(scored[name], errors="coerce") <= bound
    order = [column, "devices", "tpot_s"]
    ascending = [direction == "min", True, True]
    ranked = scored[meets].sort_values(order, ascending=ascending, kind="stable")
    excluded = scored[~meets].sort_values(order, ascending=ascending, kind="stable")
    label = f"{column} ({direction})"
    if ranked.empty:
        runner = excluded.iloc[0] if len(excluded) else None
        why = (f"no feasible configuration meets the SLOs; the best by {label} fails on "
               f"{'; '.join(slo_violations(runner, slo))}" if runner is not None
               else f"no configuration has a value of {column}")
        return BestPlan(None, column, direction, 0, ranked, len(excluded), runner, why, slo)
    best = ranked.iloc[0]
    others = pd.to_numeric(excluded[column], errors="coerce")
    better = excluded[others < best[column] if direction == "min" else others > best[column]]
    head = (f"best {label} = {best[column]:.4g} among {len(ranked):,} plans meeting the SLOs"
            f"{slo_margin(best, slo)}")
    if len(better):
        fits = (better["feasible"].astype(bool) if "feasible" in better
                else pd.Series(True, index=better.index))
        # The runner-up is the best better plan that fits (an SLO binds it), else the best one.
        runner = better[fits].iloc[0] if fits.any() else better.iloc[0]
        why = (f"{head}; {len(better):,} better plans are excluded "
               f"({int((~fits).sum()):,} do not fit), "
               f"the best that fits ({runner[column]:.4g}) on {'; '.join(slo_violations(runner, slo))}"
               if fits.any() else
               f"{head}; {len(better):,} better plans do not fit, the best ({runner[column]:.4g}): "
               f"{'; '.join(slo_violations(runner, slo))}")
    else:
        runner = ranked.iloc[1] if len(ranked) > 1 else None
        why = f"{head}; no configuration is better, the SLOs bind nothing"
    return BestPlan(best, column, direction, len(ranked), ranked, len(better), runner, why, slo)


def slo_margin(row: pd.Series, slo: Mapping[str, float]) -> str:
    """The SLO the plan is closest to, as ``(TTFT 0.996 s of 1 s)``."""
    if not slo:
        return ""
    name = max(slo, key=lambda k: row[k] / slo[k])
    label = "TTFT" if name == "ttft_s" else "TPOT"
    return f" (closest to its {label} SLO: {_seconds(row[name])} of {_seconds(slo[name])})"


def summary_columns(frame: pd.DataFrame, extra: Sequence[str] = ()) -> list[str]:
    """The columns a front or a plan is shown with: the options that vary, then the objectives."""
    options = [c for c in ("model", "hardware") if c in frame]
    options += [c for c in ("tp", "pp", "ep", "dp", "batch", "samples", "input_len", "output_len",
                           "weight_dtype", "kv_dtype") if c in frame and frame[c].nunique(dropna=False) > 1]
    numbers = [c for c in ("devices", "ttft_s", "tpot_s", "throughput_tokens_per_s",
                           "cost_usd_per_million_tokens") if c in frame]
    return list(dict.fromkeys([*options, *extra, *numbers]))
