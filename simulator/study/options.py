"""A sweep's configurations: ``infersim estimate``'s options, named as its flags without the dashes.

``--input-len`` is ``input_len``, ``--offload-weights`` is ``offload_weights`` (``"host=0.5"``),
``--draft-model`` is ``draft_model``, ``--tp`` is ``tp``. An axis lists an option's values; the
configurations are the cross product of the axes, or a list of rows, each option at
``infersim estimate``'s default where neither names it. A sweep file::

    axes:
      model: [llama-2-7b, llama-3.1-8b]
      hardware: [a100-80gb-sxm, h100-sxm]
      tp: [1, 2]
      batch: {range: [1, 256]}           # every integer from 1 to 256
      input_len: {log2: [128, 8192]}     # the powers of two from 128 to 8192
      output_len: 128                    # one value
    # or, instead of axes, rows: [{model: llama-2-7b, batch: 8}, {model: llama-2-13b, tp: 2}]

``{range: [lo, hi], step: s}`` steps from ``lo`` to ``hi`` inclusive (integer options step 1 by
default; real ones need ``step``). The first axis varies slowest, as ``itertools.product``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.errors import InferSimError, SpecError

NUMERIC = ("batch", "input_len", "output_len")
"""The options evaluated as arrays within a group; every other option groups configurations."""
POSITIVE = (*NUMERIC, "samples")
"""Whole-number options of at least 1."""
CORE = ("model", "hardware", "batch", "input_len", "output_len", "weight_dtype", "kv_dtype", "act_dtype",
        "attention")
"""Options that are always a column of the result, swept or not."""
SPECS = {"model": "model", "draft_model": "model", "hardware": "hardware", "draft_hardware": "hardware",
         "prefill_hardware": "hardware", "decode_hardware": "hardware"}
MAX_CONFIGURATIONS = 200_000_000


@lru_cache(maxsize=1)
def _parser() -> argparse.ArgumentParser:
    from simulator import cli

    parser = argparse.ArgumentParser(add_help=False)
    cli._add_model_hardware(parser)
    cli._add_shape(parser)
    cli._add_strategy(parser)
    return parser


@lru_cache(maxsize=1)
def actions() -> dict[str, argparse.Action]:
    """Every option a sweep may name, as ``infersim estimate`` defines it."""
    return {a.dest: a for a in _parser()._actions}


def defaults() -> dict[str, Any]:
    return {name: action.default for name, action in actions().items()}


def estimate_call(row: Mapping[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``(model, hardware, estimate keyword arguments)`` for one configuration, as the CLI builds them."""
    from simulator import cli

    args = argparse.Namespace(**{**defaults(), **row})
    kwargs = {"batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
              "weight_dtype": args.weight_dtype, "kv_dtype": args.kv_dtype, "act_dtype": args.act_dtype,
              "attention": args.attention, "group_size": args.group_size, "samples": args.samples,
              **cli.strategy_options(args)}
    return args.model, args.hardware, kwargs


# --- validation --------------------------------------------------------------------------------

def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreTrueAction):
        return "bool"
    if action.type is int:
        return "int"
    if action.type is float:
        return "float"
    return "str"


def check_value(name: str, value: Any, source: str, field: str, folder: Path | None = None) -> Any:
    """The value as the option takes it, or a ``SpecError`` naming the file and field. A model or
    hardware path is taken relative to ``folder`` (the sweep file's) when a file is there."""
    action = actions()[name]
    kind = _kind(action)
    if value is None and kind != "bool" and action.default is None:
        return None
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise SpecError(source, field, f"{value!r}: {name} is true or false")
        return bool(value)
    if kind == "int":
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise SpecError(source, field, f"{value!r}: {name} is a whole number")
        value = int(value)
        if name in POSITIVE and value < 1:
            raise SpecError(source, field, f"{value}: {name} must be at least 1")
        return value
    if kind == "float":
        number = (isinstance(value, (int, float, np.integer, np.floating))
                  and not isinstance(value, (bool, np.bool_)))
        if not number or not math.isfinite(value):
            raise SpecError(source, field, f"{value!r}: {name} is a number")
        return float(value)
    if not isinstance(value, str):
        raise SpecError(source, field, f"{value!r}: {name} is a name or text")
    if action.choices is not None and value not in action.choices:
        raise SpecError(source, field, f"{value!r} is not one of {', '.join(map(str, action.choices))}")
    if name in SPECS and not (name == "draft_model" and value == "self"):
        if folder is not None and (folder / value).is_file():
            value = str(folder / value)
        _check_spec(SPECS[name], value, source, field)
    return value


def _check_spec(what: str, value: str, source: str, field: str) -> None:
    from simulator.specs.loader import load_model, load_system

    try:
        (load_model if what == "model" else load_system)(value)
    except InferSimError as err:
        message = err.message if isinstance(err, SpecError) and err.source == value else str(err)
        raise SpecError(source, field, f"{value!r}: {message}") from None


def _check_name(name: str, source: str, field: str) -> None:
    if name not in actions():
        hint = ", ".join(sorted(actions()))
        raise SpecError(source, field, f"unknown option {name!r}; an axis is one of infersim estimate's "
                                       f"options, named as its flag: {hint}")


def expand(name: str, value: Any, source: str, folder: Path | None = None) -> list[Any]:
    """An axis's values: a list, one value, ``{range: [lo, hi], step: s}`` or ``{log2: [lo, hi]}``."""
    field = f"axes.{name}"
    _check_name(name, source, field)
    kind = _kind(actions()[name])
    if isinstance(value, Mapping):
        values = _expand_mapping(name, dict(value), kind, source, field)
    elif isinstance(value, (list, tuple)):
        if not value:
            raise SpecError(source, field, "an axis needs at least one value")
        values = list(value)
    else:
        values = [value]
    return [check_value(name, v, source, f"{field}[{k}]" if len(values) > 1 else field, folder)
            for k, v in enumerate(values)]


def _bounds(value: Any, source: str, field: str, what: str) -> tuple[float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value)):
        raise SpecError(source, field, f"{what} needs [lo, hi], two numbers; got {value!r}")
    lo, hi = value
    if lo > hi:
        raise SpecError(source, field, f"{what} [{lo}, {hi}]: lo is above hi")
    return lo, hi


def _expand_mapping(name: str, spec: dict, kind: str, source: str, field: str) -> list[Any]:
    if "log2" in spec:
        if set(spec) != {"log2"}:
            raise SpecError(source, field, f"log2 takes no other key; got {', '.join(sorted(spec))}")
        lo, hi = _bounds(spec["log2"], source, field, "log2")
        if kind != "int" or not isinstance(lo, int) or not isinstance(hi, int) or lo < 1:
            raise SpecError(source, field, f"log2 [{lo}, {hi}] needs whole numbers of at least 1 "
                                           f"for an integer option ({name} is {kind})")
        values = [1 << k for k in range((lo - 1).bit_length(), hi.bit_length()) if lo <= 1 << k <= hi]
        if not values:
            raise SpecError(source, field, f"log2 [{lo}, {hi}] holds no power of two")
        return values
    if "range" not in spec or not set(spec) <= {"range", "step"}:
        raise SpecError(source, field, "a mapping is {range: [lo, hi]} (with an optional step) or "
                                       f"{{log2: [lo, hi]}}; got keys {', '.join(sorted(spec))}")
    lo, hi = _bounds(spec["range"], source, field, "range")
    step = spec.get("step")
    if kind == "int":
        step = 1 if step is None else step
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, step)) or step < 1:
            raise SpecError(source, field, f"range of {name} (a whole number) needs whole lo, hi and a "
                                           f"step of at least 1; got {spec!r}")
        return list(range(lo, hi + 1, step))
    if kind != "float":
        raise SpecError(source, field, f"range applies to numbers; {name} is {kind}")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        raise SpecError(source, field, f"range of {name} (a real number) needs a step above 0; got {step!r}")
    count = math.floor((hi - lo) / step + 1e-9) + 1
    return [round(lo + k * step, 12) for k in range(count)]


# --- configurations ----------------------------------------------------------------------------

def _column(values: Sequence[Any]) -> np.ndarray:
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (float, np.floating)) for v in values):
        return np.array(values, dtype=float)
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def _with_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    base = defaults()
    for name in CORE:
        if name not in frame.columns:
            frame[name] = _column([base[name]])[np.zeros(len(frame), dtype=np.int64)]
    order = [*CORE, *[c for c in frame.columns if c not in CORE]]
    return frame[order]


def cross_product(axes: Mapping[str, Any], source: str = "axes", folder: Path | None = None) -> pd.DataFrame:
    """One row per configuration of the axes' cross product (validated), first axis slowest."""
    expanded = {str(name): expand(str(name), value, source, folder) for name, value in axes.items()}
    sizes = [len(v) for v in expanded.values()]
    total = math.prod(sizes)
    if total > MAX_CONFIGURATIONS:
        raise SpecError(source, "axes", f"{total:,} configurations; split the study into sweeps of at most "
                                        f"{MAX_CONFIGURATIONS:,}")
    columns, stride = {}, total
    for name, values in expanded.items():
        stride //= len(values)
        codes = (np.arange(total, dtype=np.int64) // stride) % len(values)
        columns[name] = _column(values)[codes]
    return _with_defaults(pd.DataFrame(columns, index=pd.RangeIndex(total)))


def from_rows(rows: pd.DataFrame | Sequence[Mapping[str, Any]], source: str = "rows",
              folder: Path | None = None) -> pd.DataFrame:
    """Given configurations, validated (each distinct value of each option once)."""
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), dtype=object)
    if not len(frame):
        raise SpecError(source, None, "no configurations")
    frame = frame.reset_index(drop=True)
    for name in frame.columns:
        _check_name(str(name), source, f"rows.{name}")
        column = frame[name].to_numpy(dtype=object)
        present = np.array([not (v is None or (isinstance(v, float) and math.isnan(v))) for v in column])
        if name in NUMERIC and not present.all():
            raise SpecError(source, f"rows.{name}", f"{name} is missing in some rows")
        if _kind(actions()[str(name)]) == "int":  # a column with gaps holds whole numbers as floats
            column = np.array([int(v) if isinstance(v, (float, np.floating)) and p and float(v).is_integer()
                               else v for v, p in zip(column, present, strict=True)], dtype=object)
        checked = {}
        for value in pd.unique(column[present]):
            checked[value] = check_value(str(name), value, source, f"rows.{name}", folder)
        filled = [checked[v] if p else defaults()[name] for v, p in zip(column, present, strict=True)]
        frame[name] = _column(filled)
    return _with_defaults(frame)


def configurations(axes: Mapping[str, Any] | None = None,
                   rows: pd.DataFrame | Sequence[Mapping[str, Any]] | None = None,
                   source: str = "sweep", folder: Path | None = None) -> pd.DataFrame:
    if (axes is None) == (rows is None):
        raise SpecError(source, None, "give axes (a cross product) or rows (a list of configurations), "
                                      "one of the two")
    if axes is not None:
        if not isinstance(axes, Mapping) or not axes:
            raise SpecError(source, "axes", "axes is a mapping of option names to values")
        return cross_product(axes, source, folder)
    return from_rows(rows, source, folder)  # type: ignore[arg-type]


def load_sweep(path: str | Path) -> pd.DataFrame:
    """The configurations of a sweep file (``axes`` or ``rows``; ``name`` and ``description``)."""
    from simulator.specs.loader import read_yaml

    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), None, "no such sweep file")
    data = read_yaml(path)
    for key in data:
        if key not in ("axes", "rows", "name", "description"):
            raise SpecError(str(path), str(key), "unknown field (a typo?); a sweep has axes or rows, "
                                                 "and optionally name and description")
    rows = data.get("rows")
    if rows is not None and (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows)):
        raise SpecError(str(path), "rows", "rows is a list of mappings of option names to values")
    return configurations(data.get("axes"), rows, str(path), path.parent)
