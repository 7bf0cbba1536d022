"""Sweeps: ``estimate`` over many configurations, one row each, infeasible ones included.

Configurations are grouped by every option but ``batch``, ``input_len`` and ``output_len``. A group
without strategies (or with a tensor/pipeline/data-parallel plan alone) is evaluated as arrays
over those three (``vectorized.py``); any other group runs ``estimate`` once per configuration.
Either way a row holds the configuration's options, ``feasible`` and ``reason`` (the message
``estimate`` raises: what does not fit and by how much, a degree that does not divide, a dtype the
device lacks), and every number of ``estimate --json`` with nested names joined by ``_``
(``memory_bytes_total``, ``prefill_time_s``); ``kv_dtype`` is the resolved one. A configuration
that does not fit keeps the numbers ``estimate(check_memory=False)`` gives, so a study shows by
how much; one that raises anything else has none.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.errors import DoesNotFitError, InferSimError
from simulator.estimate import (
    _does_not_fit,
    _parallel_does_not_fit,
    estimate,
    resolve_precision,
    smaller_weights,
)
from simulator.result import MemoryUse
from simulator.specs.loader import load_model, load_system
from simulator.strategies.parallel import workers_on_host
from simulator.study import vectorized
from simulator.study.options import NUMERIC, configurations, estimate_call

ECHOED = ("model", "hardware", "batch", "input_len", "output_len", "samples", "weight_dtype", "attention")
"""``estimate --json`` keys that repeat a configuration's options (the options' columns stand)."""
PHASE_KEYS = ("time_s", "bound", "energy_j", "power_w")
COLUMNS = ("kv_dtype", "compute_dtype", "ttft_s", "tpot_s", "e2e_s", "kv_transfer_s",
           "throughput_tokens_per_s", "energy_j", "energy_j_per_token", "energy_j_per_request", "power_w",
           "memory_bytes_weights", "memory_bytes_kv_cache", "memory_bytes_activations", "memory_bytes_total",
           "memory_bytes_capacity",
           *(f"{phase}_{key}" for phase in ("prefill", "decode") for key in PHASE_KEYS), "warnings")
"""Output columns of every sweep, in ``estimate --json``'s order. Those of strategies (a phase's
``compute_s`` and ``communication_s``, ``strategy_...``, memory tiers) follow where a row has them."""
PROGRESS_ROWS = 500
"""Fallback rows beyond which a progress bar is shown (about half a second of estimates)."""


# --- one configuration at a time ---------------------------------------------------------------

def flatten(result: dict[str, Any]) -> dict[str, Any]:
    """``estimate --json`` as one row: nested keys joined by ``_``, lists left out, warnings joined."""
    out: dict[str, Any] = {}

    def walk(prefix: str, values: Mapping[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, Mapping):
                walk(f"{prefix}{key}_", value)
            elif value is None and not prefix:
                continue  # a phase that did not run: the decode of a single output token
            elif not isinstance(value, (list, tuple)):
                out[f"{prefix}{key}"] = value

    values = {k: v for k, v in result.items() if k not in ECHOED and k not in ("warnings", "ops")}
    walk("", values)
    out["warnings"] = "; ".join(result.get("warnings", ()))
    return out


def estimate_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One configuration through ``estimate``: ``feasible``, ``reason`` and the flattened result."""
    try:
        model, hardware, kwargs = estimate_call(row)
        try:
            result, feasible, reason = estimate(model, hardware, **kwargs), True, None
        except DoesNotFitError as err:
            feasible, reason = False, str(err)
            result = estimate(model, hardware, check_memory=False, **kwargs)
    except InferSimError as err:
        return {"feasible": False, "reason": str(err)}
    return {"feasible": feasible, "reason": reason, **flatten(result.to_dict(ops=False))}


# --- a group as arrays -------------------------------------------------------------------------

def fast_group(row: Mapping[str, Any]) -> vectorized.Group | InferSimError | None:
    """The group of ``row`` (its options but the numeric ones) as arrays; the error every one of
    its configurations raises; or ``None`` when it takes strategies the arrays do not model."""
    try:
        model, hardware, kwargs = estimate_call(row)
    except InferSimError as err:
        return err
    if (any(k in kwargs for k in ("offload", "speculative", "flash")) or kwargs["kv_policy"] is not None
            or kwargs["kv_residual"] or kwargs["kv_store"] != "kv" or kwargs["weight_dequant"] != "fused"
            or any(kwargs[k] is not None for k in ("prefill_hardware", "decode_hardware", "kv_link"))):
        return None
    plan = kwargs.get("parallel")
    plan = plan if plan is not None and plan.active else None
    if plan is not None and plan.ep > 1:
        return None
    # One estimate of the group at a batch its plan splits: whatever it raises, every
    # configuration of the group raises (all that depends on the numbers is the batch's split
    # and the memory, both checked per row).
    try:
        estimate(model, hardware, check_memory=False,
                 **{**kwargs, "batch": plan.dp * plan.micro if plan is not None else kwargs["batch"]})
        spec, system = load_model(model), load_system(hardware)
        if plan is not None and system.num_devices == 1 and system.device.type == "cpu" and plan.devices > 1:
            system = workers_on_host(system, plan.devices, plan.concurrent)
        precision = resolve_precision(system.device, kwargs["weight_dtype"], kwargs["kv_dtype"],
                                      kwargs["act_dtype"], kwargs["group_size"])
    except InferSimError as err:
        return err
    if system.device.efficiency.volumes:
        return None  # kernels priced by the bytes between their runs: a step's sum the arrays split
    return vectorized.Group(spec, system, precision, kwargs["attention"], plan, samples=kwargs["samples"])


def _object(values: Any, n: int) -> np.ndarray:
    out = np.empty(n, dtype=object)
    out[:] = values
    return out


def evaluate_group(group: vectorized.Group, batch: np.ndarray, input_len: np.ndarray,
                   output_len: np.ndarray) -> dict[str, np.ndarray]:
    """A group's rows: ``vectorized.evaluate`` plus what fits, why not, and the warnings."""
    n = len(batch)
    out = vectorized.evaluate(group, batch, input_len, output_len)
    spec, plan, device = group.model, group.plan, group.system.device
    for key, value in out.items():
        if value.dtype.kind == "U":
            out[key] = value.astype(object)
    total, capacity = out["memory_bytes_total"], device.main_memory.capacity
    over = total > capacity
    reason = np.full(n, None, dtype=object)
    warnings = np.full(n, "", dtype=object)
    for k in np.flatnonzero(input_len + output_len > spec.max_position_embeddings):
        warnings[k] = (f"context {input_len[k] + output_len[k]} exceeds {spec.name}'s "
                       f"max_position_embeddings ({spec.max_position_embeddings})")
    smaller = smaller_weights(spec, group.precision)
    weights, kv, activations = (out[f"memory_bytes_{k}"].tolist()
                                for k in ("weights", "kv_cache", "activations"))
    for k in np.flatnonzero(over).tolist():
        memory = MemoryUse(weights=weights[k], kv_cache=kv[k], activations=activations[k], capacity=capacity)
        b = int(batch[k])
        if plan is None:
            error = _does_not_fit(spec, device, group.precision, b, int(input_len[k]), int(output_len[k]),
                                  memory, smaller, group.samples)
        else:
            error = _parallel_does_not_fit(spec, device, plan, b, memory)
        reason[k] = str(error)
        needs = f"needs {memory.total / 1e9:.1f} GB of {memory.capacity / 1e9:.1f} GB"
        warnings[k] = f"{warnings[k]}; {needs}" if warnings[k] else needs
    out["warnings"] = warnings
    out["feasible"] = ~over
    out["reason"] = reason
    if plan is not None:
        strategy = {**plan.to_dict(), "system": group.system.name, "device": device.name,
                    "memory": "per device (the busiest stage's)"}
        for key, value in strategy.items():
            out[f"strategy_parallel_{key}"] = _object([value] * n, n)
        # A batch the plan cannot split raises: no numbers.
        for rows, message in vectorized.batch_errors(plan, batch):
            for k in np.flatnonzero(rows):
                reason[k] = message(int(batch[k]))
            for key, value in out.items():
                if key not in ("feasible", "reason"):
                    value[rows] = None if value.dtype == object else np.nan
            out["feasible"] = out["feasible"] & ~rows
    return out


# --- the sweep ---------------------------------------------------------------------------------

def _row(configs: pd.DataFrame, position: int) -> dict[str, Any]:
    values = configs.iloc[position].to_dict()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v.item() if isinstance(v, np.generic)
                else v) for k, v in values.items()}


def _progress(total: int, show: bool | None):
    from contextlib import nullcontext

    if show is None:
        show = total >= PROGRESS_ROWS and sys.stderr.isatty()
    if not show:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import Progress

    return Progress(console=Console(stderr=True), transient=True)


def evaluate(configs: pd.DataFrame, fast: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """The result rows of validated configurations (``options.configurations``), in their order."""
    n = len(configs)
    keys = [c for c in configs.columns if c not in NUMERIC]
    grouped = (configs.groupby(keys, dropna=False, sort=False).indices if keys
               else {(): np.arange(n)})
    pieces: list[pd.DataFrame] = []
    slow: list[np.ndarray] = []
    as_arrays = 0
    numbers = {name: configs[name].to_numpy(dtype=np.int64) for name in NUMERIC}
    for positions in grouped.values():
        positions = np.sort(np.asarray(positions))
        group = fast_group(_row(configs, int(positions[0]))) if fast else None
        if group is None:
            slow.append(positions)
        elif isinstance(group, InferSimError):
            pieces.append(pd.DataFrame({"feasible": False, "reason": str(group)}, index=positions))
        else:
            out = evaluate_group(group, *(numbers[name][positions] for name in NUMERIC))
            pieces.append(pd.DataFrame(out, index=positions))
            as_arrays += len(positions)
    if slow:
        positions = np.sort(np.concatenate(slow))
        records = []
        with _progress(len(positions), progress) as bar:
            task = (bar.add_task("estimate, one configuration at a time", total=len(positions))
                    if bar is not None else None)
            for position in positions:
                records.append(estimate_row(_row(configs, int(position))))
                if bar is not None:
                    bar.advance(task)
        pieces.append(pd.DataFrame.from_records(records, index=positions))
    frame = _assemble(configs, pd.concat(pieces).sort_index() if len(pieces) > 1 else pieces[0])
    frame.attrs["as_arrays"] = as_arrays
    return frame


def _assemble(configs: pd.DataFrame, outputs: pd.DataFrame) -> pd.DataFrame:
    frame = configs.copy()
    if "kv_dtype" in outputs:
        frame["kv_dtype"] = outputs["kv_dtype"].where(outputs["kv_dtype"].notna(), frame["kv_dtype"])
    for name in outputs.columns:
        if name != "kv_dtype":
            frame[name] = outputs[name]
    return finish(configs, frame)


def finish(configs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """Options, ``feasible``, ``reason``, ``COLUMNS``, then the strategy columns some row has (by
    kind, then name): the same columns and dtypes whichever way and in whatever chunks the rows
    were computed."""
    frame = frame.reset_index(drop=True)
    frame["feasible"] = frame["feasible"].astype(bool)
    for name in COLUMNS[1:]:
        if name not in frame:
            frame[name] = np.nan
    base = [*configs.columns, "feasible", "reason", *COLUMNS[1:]]
    extra = sorted((c for c in frame.columns if c not in base and frame[c].notna().any()),
                   key=lambda c: (_rank(c), c))
    return normalize(frame[base + extra].copy())


def _rank(column: str) -> int:
    """Strategy columns by kind (phases, memory tiers, strategy), in order of appearance within one."""
    for rank, prefix in enumerate(("prefill_", "decode_", "memory_bytes_")):
        if column.startswith(prefix):
            return rank
    return 3


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """One dtype per column whatever rows a frame holds (a chunk of a sweep or all of it): whole
    numbers as int64 (float64 with gaps), true/false as bool (object with gaps), text as object."""
    for name in frame.columns:
        column = frame[name]
        kind = pd.api.types.infer_dtype(column, skipna=True)
        gaps = bool(column.isna().any())
        if kind == "integer" and not gaps:
            frame[name] = column.astype(np.int64)
        elif kind in ("integer", "floating", "mixed-integer-float", "empty"):
            frame[name] = column.astype(float)
        elif kind == "boolean" and not gaps:
            frame[name] = column.astype(bool)
        elif column.dtype != object:
            frame[name] = column.astype(object)
        if frame[name].dtype == object and gaps:
            frame[name] = frame[name].where(frame[name].notna(), None)
    return frame


def sweep(axes: Mapping[str, Any] | None = None,
          rows: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None, *,
          fast: bool = True, progress: bool | None = None, scheduler: Any = None,
          workers: int | None = None, chunks: str | Path | None = None,
          chunk_size: int = 50_000,
          prices: Mapping[str, Any] | str | Path | bool | None = None) -> pd.DataFrame:
    """``estimate`` over the cross product of ``axes`` or over ``rows``: one row per configuration.

    ``axes`` maps option names (``infersim estimate``'s flags: ``model``, ``hardware``, ``batch``,
    ``input_len``, ``tp``, ``kv_policy``, ...) to values: a list, one value, ``{"range": [lo, hi]}``
    (with an optional ``"step"``) or ``{"log2": [lo, hi]}``; ``rows`` are configurations, each
    naming the options it sets. ``fast=False`` runs ``estimate`` for every configuration (the
    reference the arrays reproduce).

    ``scheduler`` runs chunks of ``chunk_size`` configurations on Dask: ``"local"`` (a
    ``LocalCluster`` of ``workers`` processes), ``"tcp://HOST:PORT"``, or a
    ``dask.distributed.Client``. ``chunks`` keeps each finished chunk as a Parquet file in that
    folder, and a sweep run again with the same folder reads them instead of recomputing them
    (with or without a scheduler).

    ``prices`` (device name -> USD per device-hour, or a prices YAML; default the shipped
    ``hardware_specs/prices.yaml``) adds ``devices``, ``usd_per_device_hour``,
    ``cost_usd_per_million_tokens`` and ``cost_note`` (``cost.add_cost``); ``prices=False`` leaves
    them out.
    """
    configs = configurations(axes, rows)
    if scheduler is None and chunks is None:
        frame = evaluate(configs, fast=fast, progress=progress)
    else:
        from simulator.study.cluster import run_chunks

        frame = run_chunks(configs, None if chunks is None else Path(chunks), chunk_size=chunk_size,
                           scheduler=scheduler, workers=workers, fast=fast, progress=progress)
    if prices is False:
        return frame
    from simulator.study.cost import add_cost

    return add_cost(frame, None if prices is True else prices)
