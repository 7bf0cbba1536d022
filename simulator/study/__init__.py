"""What-if studies: many configurations at once (``sweep``), on this machine or on Dask; their
Pareto fronts (``pareto_front``), the best plan under SLOs (``best_plan``) and cost per million
tokens from prices per device-hour (``add_cost``)."""

from simulator.study.cost import add_cost, load_prices
from simulator.study.pareto import best_plan, pareto_front
from simulator.study.sweep import sweep

__all__ = ["add_cost", "best_plan", "load_prices", "pareto_front", "sweep"]
