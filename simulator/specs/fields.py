"""Pydantic field types for quantities with units, and efficiency curves.

A spec field typed ``Bandwidth`` accepts ``"3.35 TB/s"`` in YAML and holds
3.35e12 (bytes/s) in Python; a wrong or missing unit fails validation with a
message that shows the expected form.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, model_validator

from simulator.specs import units


def _unit_field(dimension: units.Dimension, allow_zero: bool = False):
    def parse(value: object) -> float:
        quantity = units.parse_quantity(value, dimension)
        if quantity < 0 or (quantity == 0 and not allow_zero):
            raise ValueError(f"{dimension.name} must be positive, got {value!r}")
        return quantity

    return BeforeValidator(parse)


Bytes = Annotated[float, _unit_field(units.BYTES)]
Bandwidth = Annotated[float, _unit_field(units.BANDWIDTH)]
FlopRate = Annotated[float, _unit_field(units.FLOPS)]
Seconds = Annotated[float, _unit_field(units.TIME, allow_zero=True)]
Watts = Annotated[float, _unit_field(units.POWER, allow_zero=True)]
Hertz = Annotated[float, _unit_field(units.FREQUENCY)]
Joules = Annotated[float, _unit_field(units.ENERGY, allow_zero=True)]


def _fraction(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError(f"must be a fraction in (0, 1], got {value}")
    return value


Fraction = Annotated[float, AfterValidator(_fraction)]


class Spec(BaseModel):
    """Base for every spec: frozen, and unknown fields are errors (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class EfficiencyCurve(Spec):
    """Achievable fraction of a peak as a function of an op's size.

    ``points`` are ``[size, fraction]`` pairs, size in FLOPs (compute curves)
    or bytes (memory curves); between points the fraction is interpolated
    linearly in log10(size) and held constant beyond the ends.
    """

    points: tuple[tuple[float, Fraction], ...]

    @model_validator(mode="after")
    def _sorted(self) -> EfficiencyCurve:
        sizes = [size for size, _ in self.points]
        if not sizes:
            raise ValueError("an efficiency curve needs at least one [size, fraction] point")
        if any(size <= 0 for size in sizes) or sizes != sorted(sizes):
            raise ValueError("curve sizes must be positive and increasing")
        return self

    def at(self, size: float | np.ndarray) -> float | np.ndarray:
        if len(self.points) == 1:
            return self.points[0][1]
        log_sizes = np.log10([p[0] for p in self.points])
        fractions = [p[1] for p in self.points]
        return np.interp(np.log10(np.maximum(size, 1.0)), log_sizes, fractions)


def _curve_or_constant(value: object) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"points": [[1.0, value]]}
    if isinstance(value, list):
        return {"points": value}
    return value


Efficiency = Annotated[EfficiencyCurve, BeforeValidator(_curve_or_constant)]
