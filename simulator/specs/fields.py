"""Pydantic field types for quantities with units, and efficiency curves.

A spec field typed ``Bandwidth`` accepts ``"3.35 TB/s"`` in YAML and holds
3.35e12 (bytes/s) in Python; a wrong or missing unit fails validation with a
message that shows the expected form.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationInfo,
    model_validator,
)

from simulator.specs import units


def _unit_field(dimension: units.Dimension, allow_zero: bool = False):
    def parse(value: object, info: ValidationInfo) -> float:
        # Spec files must say their units; Python callers pass SI numbers.
        from_file = bool(info.context and info.context.get("from_file"))
        if not from_file and isinstance(value, (int, float)) and not isinstance(value, bool):
            quantity = float(value)
        else:
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


def _size(value: object) -> object:
    if isinstance(value, str):
        return units.parse_quantity(value, units.SIZE)
    return value  # type: ignore[return-value]


class EfficiencyCurve(Spec):
    """Achievable fraction of a peak as a function of an op's size.

    Either ``points``, ``[size, fraction]`` pairs with size in FLOPs (compute
    curves) or bytes (memory curves), interpolated linearly in log10(size) and
    held constant beyond the ends; or a ramp ``peak * size / (size + half_size)``,
    which is the same as a fixed start-up cost of ``half_size`` bytes (or FLOPs)
    at the peak rate.
    """

    points: tuple[tuple[float, Fraction], ...] = ()
    peak: Fraction | None = None
    half_size: Annotated[float, BeforeValidator(_size)] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> EfficiencyCurve:
        if (self.peak is None) != (self.half_size is None):
            raise ValueError("a ramp needs both peak and half_size")
        if self.peak is not None:
            if self.points:
                raise ValueError("give either points or peak/half_size, not both")
            if self.half_size < 0:  # type: ignore[operator]
                raise ValueError("half_size must not be negative")
            return self
        sizes = [size for size, _ in self.points]
        if not sizes:
            raise ValueError("an efficiency curve needs at least one [size, fraction] point")
        if any(size <= 0 for size in sizes) or any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError("curve sizes must be positive and strictly increasing")
        return self

    def at(self, size: float | np.ndarray) -> float | np.ndarray:
        if self.peak is not None:
            return self.peak * size / (size + self.half_size)
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
