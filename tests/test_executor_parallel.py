"""The executor's parallel plans (worker processes, shared-memory collectives) and speculative decoding."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest

from simulator.errors import InferSimError
from simulator.specs.model import ModelSpec
from validation.executor import Transformer, execute, init_weights, make_backend, prompt_tokens
from validation.executor import parallel as par
from validation.executor.speculative import execute_speculative, speculate

BASE = {
    "name": "test-tiny", "architecture": "LlamaForCausalLM", "num_layers": 3, "hidden_size": 64,
    "num_attention_heads": 4, "num_kv_heads": 2, "head_dim": 16,
    "ffn": {"intermediate_size": 96, "activation": "silu", "gated": True}, "vocab_size": 211,
}
MOE = {"num_experts": 4, "top_k": 2, "expert_intermediate_size": 48}


def spec(**changes) -> ModelSpec:
    return ModelSpec.model_validate({**BASE, **changes})


DENSE = spec()
BIASED = spec(name="test-opt", norm="layernorm", position_encoding="learned", max_position_embeddings=64,
              ffn={"intermediate_size": 96, "activation": "relu", "gated": False}, qkv_bias=True,
              attention_out_bias=True, mlp_bias=True, tie_word_embeddings=True)
MOE_SPEC = spec(name="test-moe", moe={**MOE, "num_shared_experts": 1, "first_dense_layers": 1,
                                      "router_bias": True})
DRAFT = spec(name="test-draft", num_layers=1, hidden_size=32, num_attention_heads=2, num_kv_heads=1)


def my_segments() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith(f"{par.SHM_PREFIX}{os.getpid()}-")]


def one_process_logits(model: ModelSpec, ids: np.ndarray) -> np.ndarray:
    rt = Transformer(model, make_backend("numpy"), init_weights(model))
    return rt.forward(ids, 0, rt.new_cache(ids.shape[0], ids.shape[1]))


def shard_logits(model: ModelSpec, ids: np.ndarray, tp: int = 1, ep: int = 1, pp: int = 1) -> np.ndarray:
    """The plan's ranks as threads of this process over one shared segment; the batch's logits."""
    batch, length = ids.shape
    plan = par.group_plan(multiprocessing.get_context("spawn"), model, batch, length, tp, ep, pp, 1)
    segment = SharedMemory(name=plan.segment, create=True, size=plan.nbytes)
    weights = init_weights(model)
    world = (ep if ep > 1 else tp) * pp
    logits: dict[int, np.ndarray] = {}

    def rank_main(rank: int) -> None:
        group = par.ShmGroup(plan, rank)
        rt = par.ShardRuntime(model, par.shard_weights(weights, model, tp, ep, pp, rank), group, tp, ep)
        rows = ids if ep == 1 else np.split(ids, ep)[rank]
        cache = rt.new_cache(rows.shape[0], length)
        if pp == 1:
            logits[rank] = rt.forward(rows, 0, cache)
        else:  # a stage: embed (the first) or receive, its layers, then send on or project (the last)
            x = rt.embed(rows, 0) if rank == 0 else group.recv(rank - 1)
            x = rt.run_layers(x, batch, 0, cache)
            if rank < pp - 1:
                group.send(x, rank + 1)
            else:
                logits[0] = rt.head(x, batch)
        group.close()

    try:
        threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        segment.close()
        segment.unlink()
    if pp > 1:
        return logits[0]
    if tp > 1:
        for rank in range(1, tp):  # the all-reduce leaves every rank the same numbers
            np.testing.assert_array_equal(logits[rank], logits[0])
        return logits[0]
    return np.concatenate([logits[rank] for rank in range(world)])


@pytest.mark.parametrize(("model", "tp"), [(DENSE, 2), (DENSE, 4), (BIASED, 2), (MOE_SPEC, 2)],
                         ids=["gqa-tp2", "kv-replicated-tp4", "biases-tp2", "moe-tp2"])
def test_tensor_parallel_shards_sum_to_the_one_process_logits(model, tp):
    ids = prompt_tokens(model.vocab_size, 2, 7, seed=3)
    expected = one_process_logits(model, ids)
    np.testing.assert_allclose(shard_logits(model, ids, tp=tp), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("ep", [2, 4])
def test_expert_parallel_all_to_all_gives_the_one_process_logits(ep):
    ids = prompt_tokens(MOE_SPEC.vocab_size, 4, 7, seed=3)
    expected = one_process_logits(MOE_SPEC, ids)
    np.testing.assert_allclose(shard_logits(MOE_SPEC, ids, ep=ep), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("model", "pp"), [(DENSE, 2), (DENSE, 3), (BIASED, 2)],
                         ids=["pp2", "pp3", "biases-pp2"])
def test_pipeline_stages_in_turn_give_the_one_process_logits(model, pp):
    ids = prompt_tokens(model.vocab_size, 2, 7, seed=3)
    expected = one_process_logits(model, ids)
    np.testing.assert_allclose(shard_logits(model, ids, pp=pp), expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


def test_pipeline_stages_split_layers_evenly_first_stages_taking_the_extra():
    assert par.stage_layers(8, 2) == [(0, 4), (4, 8)]
    assert par.stage_layers(7, 3) == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.parametrize(("model", "plan"), [
    ("tiny-dense-58m", {"tp": 2}),
    (MOE_SPEC, {"ep": 2}),
    (DENSE, {"pp": 2, "micro_batches": 2}),
], ids=["tp2", "ep2", "pp2-mb2"])
def test_worker_processes_give_the_one_process_tokens(model, plan):
    one = execute(model, batch=2, input_len=6, output_len=3, repeats=1)
    result = par.execute_parallel(model, 2, 6, 3, repeats=1, **plan)
    assert result.output_tokens == one.output_tokens and result.batch == 2
    report = result.to_dict()
    parallel = report["parallel"]
    assert parallel["workers"] == 2 and {k: parallel[k] for k in plan} == plan
    collective = {"tp": "all_reduce", "ep": "all_to_all", "pp": "send"}[next(iter(plan))]
    prefill, decode = parallel["prefill"], parallel["decode"]
    assert prefill["collectives"][collective]["calls"] >= 1 and decode["comm_s_per_step"] > 0
    assert prefill["collectives"][collective]["bytes"] > decode["collectives"][collective]["bytes"]
    assert report["tpot_s"] > 0 and report["throughput_tokens_per_s"] > 0
    assert my_segments() == []
    json.dumps(report)


def test_tensor_parallel_counts_two_all_reduces_per_layer_of_the_hidden_state():
    result = par.execute_parallel(DENSE, 1, 5, 2, tp=2, repeats=1)
    prefill = result.parallel["prefill"]["collectives"]["all_reduce"]
    assert prefill["calls"] == 2 * DENSE.num_layers
    assert prefill["bytes"] == 2 * DENSE.num_layers * 5 * DENSE.hidden_size * 4


@pytest.mark.parametrize(("model", "plan", "fragment"), [
    (DENSE, {"tp": 3}, "does not divide"),
    (DENSE, {"ep": 2}, "needs an MoE model"),
    (MOE_SPEC, {"ep": 2, "tp": 2}, "--tp 1 only"),
    (MOE_SPEC, {"ep": 3}, "does not divide test-moe's 4 experts"),
    (MOE_SPEC, {"ep": 4}, "batch 2 is not a multiple of 4"),
    (DENSE, {"pp": 4}, "more stages than"),
    (DENSE, {"pp": 2, "tp": 2}, "--tp 1 --ep 1 only"),
    (DENSE, {"pp": 2, "micro_batches": 4}, "does not divide batch 2"),
    (DENSE, {"micro_batches": 2}, "needs --pp 2"),
    (DENSE, {"tp": 0}, "at least 1"),
])
def test_bad_degrees_are_refused_before_any_worker_starts(model, plan, fragment):
    with pytest.raises(InferSimError, match=fragment):
        par.execute_parallel(model, 2, 4, 2, repeats=1, **plan)


def test_parallel_and_speculative_do_not_combine_with_other_strategies():
    with pytest.raises(InferSimError, match="offloaded layers"):
        execute(DENSE, batch=2, input_len=4, output_len=2, tp=2, offload_layers=1)
    with pytest.raises(InferSimError, match="one process"):
        execute(DENSE, batch=2, input_len=4, output_len=2, tp=2, draft_model=DRAFT)


def test_more_workers_than_cores_only_warns(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    with pytest.warns(UserWarning, match="2 worker processes on 1 cores"):
        assert par.check_plan(DENSE, 2, 2, 1, 1, 1) == 2


def test_a_failing_worker_is_an_error_with_its_traceback():
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(3)]
    pipes[0][1].send(("error", "Traceback ...\nthreading.BrokenBarrierError"))
    pipes[1][1].send(("error", "Traceback ...\nValueError: boom"))
    pipes[2][1].close()  # exited without a word
    with pytest.raises(InferSimError, match="worker 1 failed:\nTraceback ...\nValueError: boom"):
        par._collect([receiver for receiver, _ in pipes])


def test_shared_memory_is_unlinked_when_the_run_fails(monkeypatch):
    def fail(conns):
        assert len(my_segments()) == 1
        raise InferSimError("a worker failed")

    monkeypatch.setattr(par, "_spawn", lambda ctx, target, args, procs, conns: None)
    monkeypatch.setattr(par, "_collect", fail)
    with pytest.raises(InferSimError, match="a worker failed"):
        par.execute_parallel(DENSE, 2, 4, 2, tp=2, repeats=1)
    assert my_segments() == []


# --- speculative decoding ------------------------------------------------------------------


def test_forward_returns_the_logits_of_the_last_positions_when_asked():
    rt = Transformer(DENSE, make_backend("numpy"), init_weights(DENSE))
    ids = prompt_tokens(DENSE.vocab_size, 2, 6, seed=1)
    last3 = rt.forward(ids, 0, None, last=3)
    assert last3.shape == (2, 3, DENSE.vocab_size)
    np.testing.assert_allclose(last3[:, -1], rt.forward(ids, 0, None), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last3[:, -2], rt.forward(ids[:, :-1], 0, None), rtol=1e-4, atol=1e-5)


def greedy(rt: Transformer, seq: np.ndarray) -> np.ndarray:
    return np.argmax(rt.forward(seq, 0, None), axis=-1)


@pytest.mark.parametrize("alpha", [1.0, 0.6, 0.0])
def test_each_emitted_token_is_its_models_greedy_choice_after_the_tokens_before(alpha):
    """Accepted drafts are the draft's greedy tokens, the one after them the target's, each given
    every token before it: checks both KV caches, the verify step and the draft's catch-up."""
    backend = make_backend("numpy")
    target = Transformer(DENSE, backend, init_weights(DENSE))
    draft = Transformer(DRAFT, backend, init_weights(DRAFT, 5))
    prompt = prompt_tokens(DENSE.vocab_size, 2, 5, seed=0)
    gamma, output_len = 3, 11
    caches = (target.new_cache(2, 5 + output_len + gamma), draft.new_cache(2, 5 + output_len + gamma))
    gen, timings = speculate(target, draft, prompt, output_len, gamma, alpha, 0, caches)
    assert gen.tokens.shape == (2, output_len) and sum(timings.emitted) == output_len - 1
    if alpha == 1.0:
        assert timings.emitted[:-1] == [gamma + 1] * (len(timings.emitted) - 1)
    if alpha == 0.0:
        assert timings.emitted == [1] * (output_len - 1)
    seq = np.concatenate([prompt, gen.tokens[:, :1]], axis=1)
    assert (gen.tokens[:, 0] == greedy(target, prompt)).all()
    for accepted, emitted in zip(timings.accepted, timings.emitted, strict=True):
        for i in range(emitted):
            model = draft if i < accepted else target
            expected = greedy(model, seq)
            assert (gen.tokens[:, seq.shape[1] - 5] == expected).all()
            seq = np.concatenate([seq, expected[:, None]], axis=1)


def test_speculative_result_counts_rounds_and_tpot_per_token():
    out = 9
    full = execute_speculative(DENSE, DRAFT, 1, 5, out, gamma=3, alpha=1.0, repeats=1)
    spec = full.speculative
    assert spec["rounds"] == 2 and spec["tokens_per_round"] == 4.0
    assert spec["expected_tokens_per_round"] == 4.0
    assert spec["draft_step_s"] > 0 and spec["verify_step_s"] > 0
    repeat = full.repeats[0]
    assert repeat.tpot_s == pytest.approx((repeat.e2e_s - repeat.ttft_s) / (out - 1))
    assert "draft_qkv_proj" in full.ops["decode"] and "speculative" in full.to_dict()
    none = execute(DENSE, batch=1, input_len=5, output_len=out, repeats=1, draft_model=DRAFT, spec_gamma=3,
                   spec_alpha=0.0)
    plain = execute(DENSE, batch=1, input_len=5, output_len=out, repeats=1)
    assert none.speculative["rounds"] == out - 1 and none.output_tokens == plain.output_tokens


def test_a_draft_with_another_vocabulary_or_bad_gamma_is_refused():
    with pytest.raises(InferSimError, match="share the target's vocabulary"):
        execute_speculative(DENSE, spec(name="other", vocab_size=300), 1, 4, 3, 2, 0.5, repeats=1)
    with pytest.raises(InferSimError, match="spec-gamma"):
        execute_speculative(DENSE, DRAFT, 1, 4, 3, 0, 0.5, repeats=1)
    with pytest.raises(InferSimError, match="spec-alpha"):
        execute_speculative(DENSE, DRAFT, 1, 4, 3, 2, 1.5, repeats=1)


def test_shipped_draft_shares_the_targets_vocabulary():
    from simulator.specs.loader import load_model

    assert load_model("tiny-dense-58m").vocab_size == load_model("small-dense-250m").vocab_size


def test_execute_cli_takes_the_parallel_and_speculative_flags(tmp_path, capsys):
    import yaml

    from simulator.cli import main

    paths = {}
    for model in (DENSE, DRAFT):
        paths[model.name] = tmp_path / f"{model.name}.yaml"
        paths[model.name].write_text(yaml.safe_dump(model.model_dump(mode="json", exclude_none=True)))
    assert main(["execute", "--model", str(paths["test-tiny"]), "--draft-model", str(paths["test-draft"]),
                 "--spec-gamma", "2", "--spec-alpha", "1", "--input-len", "4", "--output-len", "4",
                 "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["speculative"]["gamma"] == 2 and report["speculative"]["rounds"] == 1
    assert main(["execute", "--model", str(paths["test-tiny"]), "--input-len", "4", "--output-len", "2",
                 "--repeats", "1", "--tp", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_parallel_suite_keeps_the_old_keys_and_adds_the_plans():
    from validation.measure import Case, suite

    assert Case("tiny-dense-58m", 1, 128, 8).key == "tiny-dense-58m/b1/p128/g8"
    cases = suite("parallel")
    assert 30 <= len(cases) <= 40 and len({c.key for c in cases}) == len(cases)
    keys = {c.key for c in cases}
    assert {"tiny-dense-58m/b8/p512/g8/tp2", "tiny-moe-140m/b8/p512/g8/ep2",
            "small-dense-250m/b8/p128/g8/pp2-mb2",
            "small-dense-250m/b1/p128/g32/spec-tiny-dense-58m-g8-a0.9"} <= keys
    options = Case("small-dense-250m", 1, 128, 32, draft="tiny-dense-58m", gamma=4, alpha=0.5).options()
    assert options["draft_model"] == "tiny-dense-58m" and options["spec_gamma"] == 4
    assert "draft_model" not in Case("tiny-dense-58m", 1, 128, 8, tp=2).options()
