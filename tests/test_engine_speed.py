"""The serving engine's fast paths give the records that stepping gives.

``serve(..., fast_forward=False)`` steps through every iteration with every replica in one event
loop: the reference. The fast paths (decode-only and chunked stretches costed as arrays and
sized to the next arrival, runs that arrivals cannot join left uncut, round-robin replicas
simulated one at a time or in forked processes, batch sums from the affine decode tables) must
match it on every record.
"""

from __future__ import annotations

import multiprocessing

import numpy as np
import pandas as pd
import pytest

from simulator.engine import loop
from simulator.engine.records import ITERATION_COLUMNS, IterationLog
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.stepcost import ReplicaCost, _op_from
from simulator.engine.workload import clip_lengths, read_trace, synthetic
from simulator.estimate import resolve_precision
from simulator.specs.loader import load_model, load_system
from simulator.strategies.parallel import ParallelPlan

MODEL, GPU = "llama-2-7b", "a100-80gb-sxm"
TRACE = "../shared/traces/azure-llm-inference-2023/splitwise_conv.csv"


def _assert_same(fast, slow) -> None:
    a, b = fast.requests.sort_values("request_id"), slow.requests.sort_values("request_id")
    assert (a["pool"].to_numpy() == b["pool"].to_numpy()).all()
    for column in ("scheduled_s", "first_token_s", "completion_s", "energy_j", "tbt_max_s", "preemptions",
                   "replica"):
        assert np.allclose(a[column], b[column], rtol=1e-9, atol=1e-12, equal_nan=True), column
    assert np.allclose(np.sort(fast.token_gaps_s), np.sort(slow.token_gaps_s), rtol=1e-9, atol=1e-12)
    order = ["replica", "start_s"]
    fi, si = fast.iterations.sort_values(order), slow.iterations.sort_values(order)
    assert len(fi) == len(si)
    for column in ITERATION_COLUMNS[3:]:
        got, want = fi[column].to_numpy(dtype=float), si[column].to_numpy(dtype=float)
        assert np.allclose(got, want, rtol=1e-9), column
    assert fast.meta["idle_energy_j"] == pytest.approx(slow.meta["idle_energy_j"], rel=1e-9)


def _compare(model, hardware, workload, **options):
    fast = serve(model, hardware, workload, **options)
    slow = serve(model, hardware, workload, fast_forward=False, **options)
    _assert_same(fast, slow)
    return fast


def _busy(n: int = 150, rate: float = 300.0, seed: int = 0):
    return synthetic(n, rate, "uniform:16:1500", "uniform:1:400", seed=seed)


@pytest.mark.parametrize("policy", ["continuous", "chunked", "decode-priority"])
def test_overloaded_trace_runs_left_uncut_match_stepping(policy):
    """An overloaded replica: a queue whose head is refused, runs that arrivals cannot join."""
    trace = clip_lengths(read_trace(TRACE, max_requests=300), max_total=4096)
    trace = trace.__class__(trace.arrival_s / 20, trace.prompt_tokens, trace.output_tokens)
    records = _compare(MODEL, GPU, trace, scheduler=SchedulerConfig(policy=policy, max_batch=48))
    assert (records.requests["first_token_s"] - records.requests["arrival_s"]).max() > 1.0  # queued


@pytest.mark.parametrize("router", ["round-robin", "least-tokens"])
@pytest.mark.parametrize("policy", ["continuous", "chunked"])
def test_replicas_match_stepping_in_one_loop(router, policy):
    """Round-robin replicas run one at a time (fast) or in one loop (stepping); least-tokens
    reads the state of runs in progress, chunk tokens included."""
    _compare(MODEL, "dgx-a100", _busy(200, 60.0, seed=1), parallel=ParallelPlan(dp=3), router=router,
             scheduler=SchedulerConfig(policy=policy, chunk_size=256))


def test_disaggregated_pools_match_stepping():
    _compare(MODEL, "dgx-a100", _busy(120, 40.0, seed=2), prefill_hardware="dgx-a100",
             decode_hardware="dgx-a100", kv_link="5 GB/s", prefill_replicas=2, decode_replicas=2,
             router="round-robin")


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_tight_memory_and_shared_prefixes_match_stepping(preemption):
    workload = synthetic(80, 50.0, "uniform:16:2000", "uniform:1:1500", seed=5, prefix_groups=4,
                         prefix_tokens=300)
    records = _compare("llama-2-13b", "dgx-a100", workload, memory_fraction=0.45,
                       scheduler=SchedulerConfig(policy="chunked", preemption=preemption))
    assert records.requests["preemptions"].sum() > 0


def test_sliding_window_and_tensor_parallel_match_stepping():
    """A window makes the decode tables non-affine (summed request by request); a one-stage plan
    takes the shortcut for its collectives."""
    windowed = load_model("mistral-7b").model_copy(update={"sliding_window": 256})
    _compare(windowed, GPU, _busy(100, 20.0, seed=3), scheduler=SchedulerConfig(policy="chunked"))
    _compare("llama-2-13b", "dgx-a100", _busy(100, 20.0, seed=4), parallel=ParallelPlan(tp=2, dp=2),
             router="round-robin")


def test_run_sizes_do_not_change_the_records(monkeypatch):
    """Runs sized to the next arrival from a first guess: any guess gives the same records."""
    workload = _busy(150, 8.0, seed=6)
    base = serve(MODEL, "dgx-a100", workload, parallel=ParallelPlan(dp=2), router="round-robin")
    for first in (2, 1000):
        monkeypatch.setattr(loop, "_FIRST_RUN", first)
        _assert_same(serve(MODEL, "dgx-a100", workload, parallel=ParallelPlan(dp=2), router="round-robin"),
                     base)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_forked_workers_give_the_same_records():
    workload = _busy(300, 40.0, seed=7)
    options = {"parallel": ParallelPlan(dp=5), "router": "round-robin"}
    alone = serve(MODEL, "dgx-a100", workload, **options)
    forked = serve(MODEL, "dgx-a100", workload, workers=2, **options)
    pd.testing.assert_frame_equal(alone.requests, forked.requests)
    pd.testing.assert_frame_equal(alone.iterations, forked.iterations)
    assert np.array_equal(np.sort(alone.token_gaps_s), np.sort(forked.token_gaps_s))
    assert alone.meta["idle_energy_j"] == forked.meta["idle_energy_j"]


def test_workers_must_be_positive():
    from simulator.errors import InferSimError

    with pytest.raises(InferSimError, match="workers"):
        serve(MODEL, GPU, _busy(5), workers=0)


def _cost(model: str = MODEL, max_context: int = 3000) -> ReplicaCost:
    system = load_system(GPU)
    return ReplicaCost(load_model(model), system, resolve_precision(system.device, "bf16", None, "bf16", 128),
                       max_tokens=2048, max_context=max_context)


def test_affine_decode_sums_equal_the_tables():
    cost = _cost()
    assert cost._decode_affine is not None
    rng = np.random.default_rng(0)
    contexts = rng.integers(1, 2900, 77)
    prefill = (np.array([300, 17]), np.array([1000, 0]))
    fast = cost.iteration(*prefill, contexts, 79)
    run = cost.chunked_run(contexts, 100, 40, 12)
    cost._decode_affine = None  # the per-request gather from the tables
    assert np.allclose(cost.iteration(*prefill, contexts, 79), fast, rtol=1e-12)
    assert np.allclose(cost.chunked_run(contexts, 100, 40, 12), run, rtol=1e-12)
    # A window bends the tables: no affine form.
    assert _cost("mistral-7b", max_context=5000)._decode_affine is None


def test_a_run_costed_in_pieces_equals_one_piece():
    cost = _cost()
    contexts = np.array([5, 400, 1200])
    whole = cost.chunked_run(contexts, 64, 10, 9)
    first = cost.chunked_run(contexts, 64, 10, 4)
    rest = cost.chunked_run(contexts + 4, 64, 10 + 4 * 64, 5)
    for k in range(2):
        assert np.allclose(np.concatenate([first[k], rest[k]]), whole[k], rtol=1e-12)
    steps = [cost.iteration(np.array([64]), np.array([10 + j * 64]), contexts + j, 3) for j in range(9)]
    assert np.allclose(np.array(steps).T, whole, rtol=1e-12)


@pytest.mark.parametrize("variant", ["flash", "naive", "window", "tensor-parallel"])
def test_a_decode_run_with_leavers_equals_its_iterations(variant):
    """Requests leaving a run as they finish: each step costs what ``iteration`` says for the
    requests still in it (arrays for the batch; stretch by stretch where they do not apply)."""
    system = load_system("dgx-a100" if variant == "tensor-parallel" else GPU)
    model = load_model("llama-2-13b" if variant == "tensor-parallel" else MODEL)
    if variant == "window":
        model = model.model_copy(update={"sliding_window": 300})
    cost = ReplicaCost(model, system, resolve_precision(system.device, "bf16", None, "bf16", 128),
                       "naive" if variant == "naive" else "flash",
                       ParallelPlan(tp=2) if variant == "tensor-parallel" else None,
                       max_tokens=512, max_context=2000)
    contexts, lengths, steps = np.array([5, 400, 1200, 77]), np.array([3, 9, 1, 12]), 9
    none = np.zeros(0, dtype=np.int64)
    want = np.array([cost.iteration(none, none, (contexts + j)[lengths > j], int((lengths > j).sum()))
                     for j in range(steps)]).T
    assert np.allclose(cost.decode_run(contexts, steps, lengths), want, rtol=1e-12)


def test_op_from_keeps_every_field_of_its_template():
    """``_op_from`` builds the op field by field: a field added to ``Op`` must be carried over."""
    import dataclasses

    from simulator.graph.ops import gemm

    template = gemm("w", 3.0, 8.0, 16.0, weight_bytes_per_value=2, act_bytes=2, dtype="bf16", count=7,
                    groups=2.0, single_groups=1.0)
    values = [getattr(template, f) for f in ("flops", "read_bytes", "write_bytes", "weight_bytes",
                                             "kv_read_bytes", "kv_write_bytes")] + [template.shape[0]]
    assert _op_from(template, values) == template
    changed = _op_from(template, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 9.0])
    assert dataclasses.replace(template, flops=1.0, read_bytes=2.0, write_bytes=3.0, weight_bytes=4.0,
                               kv_read_bytes=5.0, kv_write_bytes=6.0, shape=(9.0, 8.0, 16.0)) == changed


def test_iteration_log_grows_orders_and_numbers():
    log = IterationLog(capacity=2)
    log.append((1, 0.5, 0.7, 1, 100, 0, 0, 10, 50, 300.0))
    log.extend((0, np.array([0.0, 0.2, 0.4]), np.array([0.2, 0.4, 0.6]), 0, 0, 3, 3, np.array([4, 5, 6]),
                50, np.array([1.0, 2.0, 3.0])))
    log.append((0, 0.5, 0.6, 0, 0, 2, 2, 6, 50, 4.0))
    frame = log.frame(["mixed", "prefill"])
    assert list(frame.columns) == list(ITERATION_COLUMNS)
    assert frame["iteration"].tolist() == [0, 1, 2, 3, 4]
    assert frame["start_s"].tolist() == [0.0, 0.2, 0.4, 0.5, 0.5]
    assert frame["replica"].tolist() == [0, 0, 0, 0, 1]  # equal starts: lower replica first
    assert frame["pool"].tolist() == ["mixed"] * 4 + ["prefill"]
    assert frame["kv_blocks_used"].dtype == np.int64 and frame["power_w"].tolist()[:3] == [1.0, 2.0, 3.0]

