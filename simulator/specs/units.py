"""Quantities with units, parsed at the edge into SI floats.

Every number in a spec file carries its unit (``3.35 TB/s``, ``989 TFLOPS``,
``80 GiB``, ``700 W``, ``2 us``). Inside the simulator everything is SI:
bytes, bytes/s, FLOP/s, seconds, watts, hertz. Decimal prefixes are powers of
1000 and binary ones (``Ki``, ``Mi``, ``Gi``, ``Ti``) powers of 1024, as
datasheets use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DECIMAL = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
BINARY = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9, "ps": 1e-12}
ENERGY_UNITS = {"J": 1.0, "mJ": 1e-3, "uJ": 1e-6, "nJ": 1e-9, "pJ": 1e-12, "fJ": 1e-15}

_QUANTITY = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([^\d\s].*?)?\s*$")


@dataclass(frozen=True)
class Dimension:
    """A physical dimension: its name, an example for error messages, a unit table."""

    name: str
    example: str
    units: dict[str, float]


def _prefixed(base: str, binary: bool) -> dict[str, float]:
    units = {prefix + base: factor for prefix, factor in DECIMAL.items()}
    if binary:
        units.update({prefix + base: factor for prefix, factor in BINARY.items()})
    return units


_BYTES = _prefixed("B", binary=True)
_BANDWIDTH = {unit + "/s": factor for unit, factor in _BYTES.items()}
_BANDWIDTH.update({unit[:-1] + "bit/s": factor / 8 for unit, factor in _prefixed("b", False).items()})
_FLOPS = _prefixed("FLOPS", binary=False)
_FLOPS.update(_prefixed("FLOP/s", binary=False))
_FLOPS.update(_prefixed("OPS", binary=False))  # integer datasheet rates (TOPS)

BYTES = Dimension("size", "80 GiB", _BYTES)
BANDWIDTH = Dimension("bandwidth", "3.35 TB/s", _BANDWIDTH)
FLOPS = Dimension("compute rate", "989 TFLOPS", _FLOPS)
TIME = Dimension("time", "2 us", TIME_UNITS)
POWER = Dimension("power", "700 W", _prefixed("W", binary=False))
FREQUENCY = Dimension("frequency", "1.98 GHz", _prefixed("Hz", binary=False))
ENERGY = Dimension("energy", "0.5 pJ", ENERGY_UNITS)
FLOP_COUNT = Dimension("FLOP count", "2 GFLOP", _prefixed("FLOP", binary=False))
SIZE = Dimension("size in bytes or FLOPs", "4 MB", {**_BYTES, **FLOP_COUNT.units})
PRICE_PER_HOUR = Dimension("price", "2.5 USD/h", {"USD/h": 1.0, "$/h": 1.0})


class UnitError(ValueError):
    """A quantity that could not be read; the message says what was expected."""


def parse_quantity(value: object, dimension: Dimension) -> float:
    """Parse ``"3.35 TB/s"`` into SI (3.35e12). Bare numbers are refused: say the unit."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UnitError(f"expected a {dimension.name} like '{dimension.example}', got {value!r}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise UnitError(
            f"{value!r} has no unit; write a {dimension.name} like '{dimension.example}'"
        )
    match = _QUANTITY.match(value)
    if not match:
        raise UnitError(f"cannot read {value!r}; write a {dimension.name} like '{dimension.example}'")
    number, unit = float(match.group(1)), (match.group(2) or "").strip()
    if not unit:
        if number == 0:
            return 0.0
        raise UnitError(f"{value!r} has no unit; write a {dimension.name} like '{dimension.example}'")
    factor = dimension.units.get(unit)
    if factor is None:
        known = ", ".join(sorted({u for u in dimension.units if len(u) <= 7})[:12])
        raise UnitError(
            f"unknown {dimension.name} unit {unit!r} in {value!r} "
            f"(expected e.g. '{dimension.example}'; units: {known}, ...)"
        )
    return number * factor


def format_quantity(value: float, unit: str, binary: bool = False) -> str:
    """Format an SI value with a prefix: ``format_quantity(3.35e12, 'B/s') == '3.35 TB/s'``."""
    if value == 0:
        return f"0 {unit}"
    steps = (
        [("Ti", 2.0**40), ("Gi", 2.0**30), ("Mi", 2.0**20), ("Ki", 2.0**10)]
        if binary
        else [("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)]
    )
    for prefix, factor in steps:
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    if not binary and unit == "s" and abs(value) < 1:
        for prefix, factor in [("m", 1e-3), ("u", 1e-6), ("n", 1e-9)]:
            if abs(value) >= factor:
                return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
