"""Plan search: the plans returned fit and meet their SLOs in the estimate and in the engine; the
ranking answers to the SLOs and the objective; bad input is one clear error."""

import json

import numpy as np
import pandas as pd
import pytest

import simulator
from simulator.cli import main
from simulator.engine.scheduler import SchedulerConfig
from simulator.engine.serve import serve
from simulator.engine.workload import synthetic
from simulator.errors import InferSimError
from simulator.study.plan_search import NoPlanError, plan_search

# A small space: two systems, tp 1-2, four batches, two weight dtypes (KV: bf16 and fp8, the
# default on an H100); short serving runs.
SPACE = {"tp": [1, 2], "pp": [1], "batch": [1, 4, 16, 64], "weight_dtype": ["bf16", "fp8"], "requests": 40,
         "input_len": 512, "output_len": 64}
HARDWARE = "h100-sxm,dgx-h100"


def search(slo_ttft_s=0.5, slo_tpot_s=0.02, **kwargs):
    return plan_search("llama-2-7b", HARDWARE, slo_ttft_s, slo_tpot_s, **{**SPACE, **kwargs})


@pytest.fixture(scope="module")
def at_rate():
    return search(rate=20.0, confirm=2, max_engine_runs=40, pp=[1, 2])


def test_returned_plans_fit_and_meet_their_slos_in_estimate_and_engine(at_rate):
    plans = at_rate.plans
    assert len(plans) == 2
    for _, plan in plans.iterrows():
        parallel = (simulator.ParallelPlan(tp=int(plan.tp), pp=int(plan.pp))
                    if plan.tp * plan.pp > 1 else None)
        result = simulator.estimate("llama-2-7b", plan.hardware, batch=int(plan.batch), input_len=512,
                                    output_len=64, weight_dtype=plan.weight_dtype, kv_dtype=plan.kv_dtype,
                                    parallel=parallel)  # raises when the plan does not fit
        assert result.ttft_s <= 0.5 and result.tpot_s <= 0.02
        # The plan's share of the load, served again: one replica at rate / replicas.
        assert plan.replicas * plan.capacity_requests_per_s * 0.8 >= 20.0
        assert plan.devices == plan.replicas * plan.devices_per_replica
        records = serve("llama-2-7b", plan.hardware, synthetic(40, 20.0 / plan.replicas, 512, 64),
                        SchedulerConfig(policy="chunked", max_batch=int(plan.batch)),
                        weight_dtype=plan.weight_dtype, kv_dtype=plan.kv_dtype,
                        parallel=parallel if plan.pp == 1 else simulator.ParallelPlan(
                            tp=int(plan.tp), pp=int(plan.pp), micro_batches=1))
        summary = records.summary()
        assert summary["completed"] == 40
        assert summary["ttft_s"]["p90"] <= 0.5 and summary["tbt_s"]["p90"] <= 0.02
        assert summary["ttft_s"]["p90"] == pytest.approx(plan.engine_ttft_p90_s)
        assert plan.engine_meets_slo
    # Best first, by cost.
    assert plans.cost_usd_per_million_tokens.is_monotonic_increasing


def test_dropped_candidates_say_why_and_rank_above_the_plans():
    # A TPOT SLO between the estimate's decode step and the engine's TBT at this load: the
    # estimate's best batches are dropped in the engine, smaller ones are confirmed.
    result = search(slo_ttft_s=None, slo_tpot_s=0.0105, rate=40.0, confirm=1, max_engine_runs=40,
                    scheduler="continuous")
    assert len(result.plans) == 1 and result.dropped
    best = result.plans.iloc[0]
    for item in result.dropped:
        assert "TBT" in item["why"] or "TTFT" in item["why"] or "engine raised" in item["why"]
        assert item["cost_usd_per_million_tokens"] <= best.cost_usd_per_million_tokens
    assert best.engine_tbt_p90_s <= 0.0105


@pytest.mark.parametrize("slos, scheduler", [
    ([(1.0, 0.02), (0.5, 0.02), (0.25, 0.02), (0.1, 0.02), (0.03, 0.02)], "chunked"),
    ([(None, 0.02), (None, 0.014), (None, 0.0121), (None, 0.0105), (None, 0.009)], "continuous"),
])
def test_tightening_an_slo_never_returns_a_cheaper_plan(slos, scheduler):
    # The continuous scheduler's prefills stretch the gaps between tokens past the estimate's TPOT,
    # so there the engine drops candidates the estimate ranks first.
    costs, dropped = [], 0
    for ttft, tpot in slos:
        try:
            result = search(ttft, tpot, rate=40.0, confirm=1, max_engine_runs=60, scheduler=scheduler)
        except NoPlanError:
            costs.append(np.inf)
            continue
        costs.append(result.plans.cost_usd_per_million_tokens.iloc[0])
        dropped += len(result.dropped)
    assert np.all(np.diff(costs) >= -1e-12), costs
    assert len(set(costs)) > 2  # the SLOs move the answer
    assert dropped or scheduler == "chunked"


def test_gpus_objective_uses_no_more_devices_than_the_cheapest_plan(at_rate):
    fewest = search(rate=20.0, confirm=1, objective="gpus", max_engine_runs=40)
    assert fewest.plans.devices.iloc[0] <= at_rate.plans.devices.iloc[0]
    assert fewest.plans.engine_meets_slo.all()


def test_replicas_carry_the_rate():
    low, high = (search(rate=rate, confirm=1, max_engine_runs=40).plans.iloc[0] for rate in (5.0, 60.0))
    for plan, rate in ((low, 5.0), (high, 60.0)):
        assert plan.replicas == int(np.ceil(rate / (0.8 * plan.capacity_requests_per_s)))
    assert high.devices > low.devices


def test_impossible_slos_say_which_slo_is_closest():
    with pytest.raises(NoPlanError, match=r"misses the TTFT SLO by .* s"):
        search(slo_ttft_s=1e-4, slo_tpot_s=0.05, confirm=0)
    with pytest.raises(NoPlanError, match=r"misses the TPOT SLO"):
        search(slo_ttft_s=10.0, slo_tpot_s=1e-4, confirm=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "latency"}, "--objective 'latency': choose one of cost, throughput, gpus"),
    ({"model": "no-such-model"}, "--model no-such-model: unknown"),
    ({"hardware": "dgx-h100,no-such-system"}, "--hardware no-such-system: unknown"),
    ({"tp": [16]}, "--tp 16: more devices than the systems hold"),
    ({"slo_ttft_s": -1.0}, "--slo-ttft must be a positive"),
    ({"slo_ttft_s": None, "slo_tpot_s": None}, "give at least one SLO"),
    ({"input_len": 4000, "output_len": 200}, "exceeds llama-2-7b's context of 4096"),
    ({"load": 1.5}, "--load"),
])
def test_bad_input_is_one_clear_error(kwargs, message):
    args = {"model": "llama-2-7b", "hardware": HARDWARE, "slo_ttft_s": 0.5, "slo_tpot_s": 0.02,
            **SPACE, "confirm": 0, **kwargs}
    with pytest.raises(InferSimError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_search(args.pop("model"), args.pop("hardware"), args.pop("slo_ttft_s"), args.pop("slo_tpot_s"),
                    **args)


def test_a_trace_is_dealt_round_robin_and_rescaled_to_the_rate(tmp_path):
    rng = np.random.default_rng(1)
    n = 400
    trace = pd.DataFrame({"arrived_at": np.cumsum(rng.exponential(0.1, n)),  # about 10 requests/s
                          "num_prefill_tokens": rng.integers(100, 900, n),
                          "num_decode_tokens": rng.integers(10, 120, n)})
    path = tmp_path / "trace.csv"
    trace.to_csv(path, index=False)
    own = search(workload=path, confirm=1, max_engine_runs=40)
    assert own.workload["rate_requests_per_s"] == pytest.approx((n - 1) / np.ptp(trace.arrived_at))
    assert own.workload["input_len"] == round(trace.num_prefill_tokens.mean())
    faster = search(workload=path, rate=40.0, confirm=1, max_engine_runs=40)
    assert faster.workload["rate_requests_per_s"] == 40.0
    assert faster.plans.replicas.iloc[0] >= own.plans.replicas.iloc[0]
    assert faster.plans.engine_requests.iloc[0] <= 40


def test_confirm_zero_returns_the_estimates_plans_unconfirmed():
    result = search(confirm=0, top=3)
    assert len(result.plans) == 3 and result.engine_runs == 0
    assert all(record["engine"] is None for record in result.to_dict()["plans"])
    assert result.plans.binding.str.len().gt(0).all()


def test_cli_json_has_the_plans_and_their_engine_numbers(capsys):
    code = main(["plan-search", "--model", "llama-2-7b", "--hardware", HARDWARE, "--slo-ttft", "0.5",
                 "--slo-tpot", "0.02", "--input-len", "512", "--output-len", "64", "--rate", "20",
                 "--tp", "1,2", "--batch", "4,16", "--weight-dtype", "fp8", "--requests", "40",
                 "--confirm", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"plans", "dropped", "candidates", "objective", "slo", "workload", "why"} <= set(out)
    plan = out["plans"][0]
    assert {"hardware", "tp", "pp", "ep", "batch", "weight_dtype", "kv_dtype", "strategy", "ttft_s", "tpot_s",
            "throughput_tokens_per_s", "cost_usd_per_million_tokens", "devices", "replicas",
            "binding"} <= set(plan)
    assert set(plan["engine"]) >= {"ttft_p90_s", "tbt_p90_s", "meets_slo"} and plan["engine"]["meets_slo"]
    assert plan["devices"] == plan["replicas"] * plan["devices_per_replica"]


def test_cli_errors_are_one_line(capsys):
    assert main(["plan-search", "--model", "llama-2-7b", "--hardware", "h100-sxm", "--slo-ttft", "1e-5",
                 "--batch", "1,4", "--confirm", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no plan meets TTFT <= 1e-05 s" in err
    assert main(["plan-search", "--model", "llama-2-7b", "--hardware", "h100-sxm", "--slo-ttft", "1",
                 "--workload", "x.csv", "--input-len", "5"]) == 2
    assert "--workload brings its own lengths" in capsys.readouterr().err
