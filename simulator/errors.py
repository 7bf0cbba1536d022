"""Errors a user can act on: they name the file, the field and the fix."""

from __future__ import annotations


class InferSimError(Exception):
    """Base of every error the CLI turns into a one-line message and exit code 2."""


class SpecError(InferSimError):
    """A spec file (hardware, model, scenario) that cannot be used as written."""

    def __init__(self, source: str, field: str | None, message: str):
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}" if field else source
        super().__init__(f"{where}: {message}")


class DoesNotFitError(InferSimError):
    """A plan whose memory exceeds the device's capacity; says by how much and what would fit."""

    def __init__(self, message: str, required_bytes: float, capacity_bytes: float):
        self.required_bytes = required_bytes
        self.capacity_bytes = capacity_bytes
        super().__init__(message)


class UnsupportedError(InferSimError):
    """A request the hardware or model cannot serve (a dtype the device has no units for)."""
