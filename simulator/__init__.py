"""InferSim: analytical roofline and event simulator for LLM inference.

Public API::

    import simulator
    model = simulator.load_model("llama-2-7b")
    system = simulator.load_system("a100-80gb-sxm")
    result = simulator.estimate(model, system, batch=8, input_len=512, output_len=128)
    result.tpot_s, result.to_dict(), result.ops_frame()
"""

from simulator.errors import DoesNotFitError, InferSimError, SpecError, UnsupportedError
from simulator.estimate import estimate
from simulator.result import EstimateResult
from simulator.specs.loader import load_device, load_model, load_system

__all__ = [
    "DoesNotFitError",
    "EstimateResult",
    "InferSimError",
    "SpecError",
    "UnsupportedError",
    "estimate",
    "load_device",
    "load_model",
    "load_system",
]
