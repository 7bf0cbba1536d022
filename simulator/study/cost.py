"""Cost per million output tokens of a sweep's rows, from hourly prices per device.

``cost_usd_per_million_tokens = devices * usd_per_device_hour / (throughput_tokens_per_s * 3600) * 1e6``
``cost_usd_per_request = devices * usd_per_device_hour * e2e_s / (batch * 3600)`` (a request's prompt
and all its ``samples``: the price of one answer under best-of-N)

``devices`` is what the row's plan occupies (``ParallelPlan.devices``: tensor or expert degree x
pipeline x data-parallel replicas; 1 without a plan), ``throughput_tokens_per_s`` the output
tokens of the whole batch over its end-to-end time (``estimate``'s). Prices are data with their
source (``hardware_specs/prices.yaml``, or a file of the same layout): a device without one gets
NaN and the reason in ``cost_note``, never an invented number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from simulator.errors import InferSimError, SpecError
from simulator.specs.loader import spec_root

SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class DevicePrice:
    """On-demand price of one device for one hour, with where and when it was read."""

    usd_per_hour: float
    source: str = "given"
    retrieved: str | None = None


def default_prices_path() -> Path:
    return spec_root() / "hardware_specs" / "prices.yaml"


def load_prices(path: str | Path | None = None) -> dict[str, DevicePrice]:
    """Device name -> price, from ``path`` (default: the shipped ``hardware_specs/prices.yaml``).

    The file holds ``prices: {DEVICE: {usd_per_hour: X, source: URL, retrieved: DATE}}``; a bare
    number (``DEVICE: 2.5``) is a price without provenance."""
    file = Path(path) if path is not None else default_prices_path()
    if not file.is_file():
        raise InferSimError(f"prices file {file} not found")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SpecError(str(file), None, f"not valid YAML: {err}") from None
    entries = data.get("prices") if isinstance(data, Mapping) else None
    if not isinstance(entries, Mapping):
        raise SpecError(str(file), "prices", "expected a mapping of device name to a price per hour")
    return {str(name): _price(str(file), str(name), entry) for name, entry in entries.items()}


def _price(source: str, name: str, entry: Any) -> DevicePrice:
    if isinstance(entry, Mapping):
        value, where, when = entry.get("usd_per_hour"), entry.get("source", source), entry.get("retrieved")
    else:
        value, where, when = entry, source, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SpecError(source, f"prices.{name}.usd_per_hour", f"expected a positive number, got {value!r}")
    return DevicePrice(float(value), str(where), None if when is None else str(when))


def as_prices(prices: Mapping[str, Any] | str | Path | None) -> dict[str, DevicePrice]:
    """Prices from a file, a mapping (of ``DevicePrice`` or plain numbers), or the shipped table."""
    if prices is None or isinstance(prices, (str, Path)):
        return load_prices(prices)
    return {name: value if isinstance(value, DevicePrice) else _price("prices", name, value)
            for name, value in prices.items()}


@lru_cache(maxsize=256)
def _device_of(hardware: str) -> str:
    from simulator.specs.loader import load_system

    return load_system(hardware).device.name


def row_devices(frame: pd.DataFrame) -> np.ndarray:
    """Devices each row's plan occupies (``ParallelPlan.devices``), 1 without a plan."""
    n = len(frame)

    def degree(name: str) -> np.ndarray:
        if name not in frame:
            return np.ones(n, dtype=np.int64)
        return pd.to_numeric(frame[name], errors="coerce").fillna(1).to_numpy(dtype=np.int64)

    tp, pp, ep, dp = (degree(name) for name in ("tp", "pp", "ep", "dp"))
    return np.where(ep > 1, ep, tp) * pp * dp


def add_cost(frame: pd.DataFrame, prices: Mapping[str, Any] | str | Path | None = None) -> pd.DataFrame:
    """``frame`` with ``devices``, ``usd_per_device_hour``, ``cost_usd_per_million_tokens``,
    ``cost_usd_per_request`` and ``cost_note`` (why a row has no cost: no price for its device,
    disaggregated pools, no numbers)."""
    table = as_prices(prices)
    out = frame.copy()
    n = len(out)
    devices = row_devices(out)
    price = np.full(n, np.nan)
    note = np.full(n, None, dtype=object)
    hardware = out["hardware"].astype(str).to_numpy() if "hardware" in out else np.full(n, "")
    for name in pd.unique(hardware):
        rows = hardware == name
        try:
            device = _device_of(name)
        except InferSimError as err:
            note[rows] = f"hardware {name}: {err}"
            continue
        if device in table:
            price[rows] = table[device].usd_per_hour
        else:
            note[rows] = f"no price for {device} (add it with --prices FILE)"
    for pool in ("prefill_hardware", "decode_hardware"):
        if pool in out:
            split = out[pool].notna().to_numpy()
            price[split] = np.nan
            note[split] = "disaggregated pools: cost per pool not modelled"

    def numbers(name: str) -> np.ndarray:
        return pd.to_numeric(out.get(name, pd.Series(np.nan, index=out.index)),
                             errors="coerce").to_numpy(dtype=float)

    throughput = numbers("throughput_tokens_per_s")
    missing = ~(throughput > 0) & ~np.isnan(price)
    note[missing] = "no throughput (the configuration raised)"
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = devices * price / (throughput * SECONDS_PER_HOUR) * 1e6
    cost[~(throughput > 0)] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        per_request = devices * price * numbers("e2e_s") / (numbers("batch") * SECONDS_PER_HOUR)
    per_request[~(throughput > 0)] = np.nan
    out["devices"] = devices
    out["usd_per_device_hour"] = price
    out["cost_usd_per_million_tokens"] = cost
    out["cost_usd_per_request"] = per_request
    out["cost_note"] = note
    return out
