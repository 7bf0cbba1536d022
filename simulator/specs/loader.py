"""Find and load spec files by shipped name or path, turning every failure into a SpecError.

Shipped specs live in the repository's top-level ``hardware_specs/`` and
``workloads/`` folders (``INFERSIM_ROOT`` overrides where they are looked for).
"""

from __future__ import annotations

import difflib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from simulator.errors import SpecError
from simulator.specs.hardware import Device, System
from simulator.specs.model import ModelSpec

SpecT = TypeVar("SpecT", bound=BaseModel)


_REPOSITORY = Path(__file__).resolve().parents[2]


def spec_root() -> Path:
    override = os.environ.get("INFERSIM_ROOT")
    return Path(override) if override else _REPOSITORY


def _shipped(folder: str) -> dict[str, Path]:
    return _scan(spec_root() / folder)


@lru_cache(maxsize=16)
def _scan(base: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(base.rglob("*.yaml"))} if base.is_dir() else {}


def shipped_models() -> dict[str, Path]:
    return _shipped("workloads/models")


def shipped_devices() -> dict[str, Path]:
    return _shipped("hardware_specs/devices")


def shipped_systems() -> dict[str, Path]:
    return _shipped("hardware_specs/systems")


def _resolve(name_or_path: str | Path, shipped: dict[str, Path], what: str) -> Path:
    text = str(name_or_path)
    path = Path(text)
    if text in shipped:
        return shipped[text]
    if path.suffix in {".yaml", ".yml", ".json"} or os.sep in text:
        if not path.is_file():
            raise SpecError(text, None, f"no such {what} file")
        return path
    close = difflib.get_close_matches(text, list(shipped), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; see `infersim list {what}`"
    raise SpecError(text, None, f"unknown {what} name{hint}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(str(path), where, f"malformed YAML: {problem}") from None
    except OSError as err:
        raise SpecError(str(path), None, f"cannot read: {err.strerror}") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), None, "expected a mapping of fields at the top level")
    return data


def validate(cls: type[SpecT], data: dict[str, Any], source: str) -> SpecT:
    """Build a spec, reporting the first invalid field by its dotted path."""
    try:
        return cls.model_validate(data, context={"from_file": True})
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "required field is missing"
        elif first["type"] == "extra_forbidden":
            message = "unknown field (a typo?)"
        elif first["type"] == "literal_error":
            message = f"{message}, got {first.get('input')!r}"
        more = len(err.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise SpecError(source, field, message) from None


@lru_cache(maxsize=256)
def _load_device_path(path: Path) -> Device:
    data = read_yaml(path)
    if data.get("kind", "device") != "device":
        raise SpecError(str(path), "kind", f"expected 'device', got {data.get('kind')!r}")
    return validate(Device, data, str(path))


def load_device(name_or_path: str | Path) -> Device:
    return _load_device_path(_resolve(name_or_path, shipped_devices(), "hardware"))


@lru_cache(maxsize=256)
def _load_system_path(path: Path) -> System:
    data = read_yaml(path)
    kind = data.get("kind", "device")
    if kind == "device":
        return System.single(_load_device_path(path))
    if kind != "system":
        raise SpecError(str(path), "kind", f"expected 'device' or 'system', got {kind!r}")
    data = _merge_fitted_links(data)
    device = data.get("device")
    if isinstance(device, str):
        try:
            data = {**data, "device": load_device(device)}
        except SpecError as err:
            raise SpecError(str(path), "device", err.message) from None
    return validate(System, data, str(path))


def _merge_fitted_links(data: dict[str, Any]) -> dict[str, Any]:
    """``fitted_links`` (written by the collective fit) overrides links' latency and efficiency."""
    fitted = data.get("fitted_links")
    if not fitted:
        return {key: value for key, value in data.items() if key != "fitted_links"}
    links = dict(data.get("links") or {})
    for name, values in fitted.items():
        if not isinstance(links.get(name), dict) or not isinstance(values, dict):
            continue  # validation reports the missing or malformed link
        links[name] = {**links[name], **values}
    return {**{k: v for k, v in data.items() if k != "fitted_links"}, "links": links}


def datasheet_text(path: Path) -> str:
    """A spec file's text before any fitted block: its datasheet values alone."""
    from simulator.calibrate.operators import FIT_MARKER

    text = path.read_text()
    return text[: text.index(FIT_MARKER)] if FIT_MARKER in text else text


def load_system(name_or_path: str | Path | System | Device) -> System:
    """A system by shipped name or path; a device spec becomes a one-device system."""
    if isinstance(name_or_path, System):
        return name_or_path
    if isinstance(name_or_path, Device):
        return System.single(name_or_path)
    shipped = {**shipped_devices(), **shipped_systems()}
    return _load_system_path(_resolve(name_or_path, shipped, "hardware"))


@lru_cache(maxsize=256)
def _load_model_path(path: Path) -> ModelSpec:
    if path.suffix == ".json":
        from simulator.specs.hf import model_from_hf_config

        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(str(path), f"line {err.lineno}", f"malformed JSON: {err.msg}") from None
        if not isinstance(config, dict):
            raise SpecError(str(path), None, "expected a JSON object")
        return model_from_hf_config(config, str(path))
    return validate(ModelSpec, read_yaml(path), str(path))


def load_model(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """A model by shipped name, YAML path, or Hugging Face ``config.json`` path."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    return _load_model_path(_resolve(name_or_path, shipped_models(), "models"))
