"""InferSim: analytical roofline and event simulator for LLM inference.

Public API::

    import simulator
    model = simulator.load_model("llama-2-7b")
    system = simulator.load_system("a100-80gb-sxm")
    result = simulator.estimate(model, system, batch=8, input_len=512, output_len=128)
    result.tpot_s, result.to_dict(), result.ops_frame()
    simulator.estimate("llama-2-13b", "workstation-4090", batch=8,
                       offload=simulator.OffloadPlan(weights_host=0.5),
                       kv_policy=simulator.KVPolicy("h2o", 0.2))
    simulator.search_plan("opt-30b", "workstation-4090", output_len=32)   # infersim plan
    simulator.run_scenario("workloads/scenarios/llama-7b-a100-h2o.yaml")  # infersim run
    study = simulator.sweep({"model": ["llama-2-7b", "llama-3.1-8b"], "batch": {"range": [1, 64]}})
    simulator.pareto_front(study, {"tpot_s": "min", "throughput_tokens_per_s": "max"})
    simulator.best_plan(study, slo_ttft_s=1.0, slo_tpot_s=0.05, objective="cost")  # infersim sweep --best
    simulator.plan_search("llama-2-70b", ["dgx-a100", "dgx-h100"], slo_ttft_s=2.0, slo_tpot_s=0.05)
    simulator.write_report(study, "report/")                                        # infersim report
"""

from simulator.errors import DoesNotFitError, InferSimError, SpecError, UnsupportedError
from simulator.estimate import estimate
from simulator.result import EstimateResult
from simulator.scenario import run_scenario
from simulator.specs.loader import load_device, load_model, load_system
from simulator.strategies.kv import KVPolicy
from simulator.strategies.offload import OffloadPlan
from simulator.strategies.parallel import ParallelPlan
from simulator.strategies.plan import search as search_plan
from simulator.strategies.speculative import Speculation
from simulator.study import best_plan, pareto_front, sweep
from simulator.study.plan_search import plan_search

__all__ = [
    "DoesNotFitError",
    "EstimateResult",
    "InferSimError",
    "KVPolicy",
    "OffloadPlan",
    "ParallelPlan",
    "SpecError",
    "Speculation",
    "UnsupportedError",
    "best_plan",
    "estimate",
    "load_device",
    "load_model",
    "load_system",
    "pareto_front",
    "plan_search",
    "run_scenario",
    "search_plan",
    "sweep",
    "write_report",
]


def write_report(*args, **kwargs):
    """``simulator.report.study_report.write_report`` (imported on first use: it loads matplotlib)."""
    from simulator.report.study_report import write_report as write

    return write(*args, **kwargs)
