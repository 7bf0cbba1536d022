"""What-if studies: many configurations at once (``sweep``), on this machine or on Dask."""

from simulator.study.sweep import sweep

__all__ = ["sweep"]
