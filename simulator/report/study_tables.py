"""Rich tables for a sweep's Pareto front and its best plan under SLOs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from rich.table import Table

from simulator.report.tables import console
from simulator.study.pareto import BestPlan, summary_columns

HEADERS = {"ttft_s": "TTFT", "tpot_s": "TPOT", "throughput_tokens_per_s": "tok/s",
           "throughput_per_device": "tok/s/device", "cost_usd_per_million_tokens": "$/M tok",
           "cost_usd_per_request": "$/request",
           "devices": "devices", "input_len": "in", "output_len": "out"}
MAX_ROWS = 40


def format_cell(column: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if column.endswith("_s") and not column.endswith("per_s") and isinstance(value, float):
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if column.startswith("cost_"):
        return f"${value:,.3f}" if abs(value) >= 0.1 else f"${value:.3g}"  # cents per request
    if isinstance(value, float):
        return f"{value:,.1f}"
    return str(value)


def _table(rows: pd.DataFrame, columns: list[str], title: str) -> Table:
    table = Table(title=title)
    for column in columns:
        justify = "left" if rows[column].dtype == object else "right"
        table.add_column(HEADERS.get(column, column), justify=justify)
    for _, row in rows.head(MAX_ROWS).iterrows():
        table.add_row(*(format_cell(c, row[c]) for c in columns))
    return table


def print_front(front: pd.DataFrame, objectives: Mapping[str, str]) -> None:
    columns = summary_columns(front, extra=list(objectives))
    more = f" (first {MAX_ROWS})" if len(front) > MAX_ROWS else ""
    title = (f"Pareto front: {len(front)} plans, "
             f"{', '.join(f'{c} {d}' for c, d in objectives.items())}{more}")
    console.print(_table(front, columns, title))


def print_best(best: BestPlan, top: int = 5) -> None:
    slo = ", ".join(f"{'TTFT' if k == 'ttft_s' else 'TPOT'} <= {v:g} s"
                    for k, v in best.slo.items()) or "no SLO"
    if best.plan is None:
        console.print(f"[bold]no plan[/bold] meets {slo}: {best.why}")
        return
    columns = summary_columns(best.ranked, extra=[best.objective])
    console.print(_table(best.ranked.head(1 + top), columns,
                         f"best {best.objective} ({best.direction}) under {slo}: "
                         f"{best.candidates:,} plans qualify"))
    console.print(f"best: {_describe(best.plan)}")
    console.print(f"why: {best.why}")


def _describe(row: pd.Series) -> str:
    parts = [f"{row['model']} on {row['hardware']}"]
    for name in ("tp", "pp", "ep", "dp"):
        if name in row and row[name] not in (None, 1):
            parts.append(f"{name} {row[name]}")
    parts.append(f"batch {row['batch']}")
    if "devices" in row:
        parts.append(f"{row['devices']} devices")
    return ", ".join(parts)
