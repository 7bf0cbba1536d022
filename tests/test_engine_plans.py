"""The serving engine under pipeline plans: an iteration's batch is one micro-batch."""

import pytest

from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.workload import synthetic
from simulator.errors import InferSimError
from simulator.strategies.parallel import ParallelPlan


def _workload():
    return synthetic(rate=2.0, requests=12, input_len=256, output_len=16, seed=1)


def test_a_pipeline_plan_serves_without_micro_batches_and_is_slower_per_token_than_tensor_parallel():
    config = SchedulerConfig("continuous")
    pipeline = serve("llama-2-7b", "dgx-a100", _workload(), parallel=ParallelPlan(pp=2), scheduler=config)
    tensor = serve("llama-2-7b", "dgx-a100", _workload(), parallel=ParallelPlan(tp=2), scheduler=config)
    assert len(pipeline.requests) == len(tensor.requests) == 12
    # Two stages taking turns: each token crosses both halves of the model one after the other.
    assert pipeline.summary()["tbt_s"]["p50"] > tensor.summary()["tbt_s"]["p50"]


def test_micro_batches_are_refused_with_the_fix():
    with pytest.raises(InferSimError, match="drop --micro-batches"):
        serve("llama-2-7b", "dgx-a100", _workload(), parallel=ParallelPlan(pp=2, micro_batches=2),
              scheduler=SchedulerConfig("continuous"))
