"""Speculative decoding run for real: a draft model proposes ``gamma`` tokens, the target verifies them.

After both models prefill the prompt (the target's argmax is the first token; TTFT covers both
prefills), each round starts from the last emitted token ``t`` at position ``p``:

    draft:  gamma decode steps from (t, p)             -> d_1 .. d_gamma
    target: one forward over [t, d_1 .. d_gamma] at p  -> argmax y_0 .. y_gamma (logits of all gamma+1)
    accept: d_i for i = 1, 2, .. while a draw < alpha  -> a accepted (0 <= a <= gamma)
    emit:   d_1 .. d_a, y_a                            -> a + 1 tokens

The weights are random, so a real acceptance test (``d_i == y_(i-1)``) would accept almost
nothing; acceptance is a seeded rule instead, one uniform draw per drafted position from
``np.random.default_rng(seed + 2)``, the same ``a`` for every sequence of the batch (one draw
per round for the whole batch), so each round emits the same count everywhere. Every repeat
draws the same sequence, so repeats run the same rounds. The emitted tokens are the accepted
drafts and the target's token after them, not the target's own greedy output.

Caches: the verify step writes the target's K/V at ``p .. p + gamma``; the accepted positions
``p .. p + a`` hold exactly the emitted tokens, the rejected ones are overwritten by the next
round. The draft wrote ``t, d_1 .. d_(gamma-1)`` at ``p .. p + gamma - 1``, which covers
``p .. p + a`` unless all ``gamma`` were accepted; then ``d_gamma`` never went through the draft,
and its next round's first step feeds ``[d_gamma, y_gamma]`` together (``T = 2``).

The last round is cut to the tokens still wanted. ``tpot_s`` is the decode time per token
after the first, ``(e2e - ttft) / (output_len - 1)``; a "decode" step is a round.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any

import numpy as np

from simulator.errors import InferSimError
from simulator.specs.loader import load_model
from simulator.specs.model import ModelSpec
from simulator.strategies.speculative import Speculation, expected_tokens
from validation.executor import machine
from validation.executor.harness import (
    check_fits,
    check_shape,
    make_backend,
    measure_memory,
    prompt_tokens,
    summarize,
)
from validation.executor.model import KVCache, Transformer
from validation.executor.profiler import KernelProfiler
from validation.executor.results import ExecutionResult, Generation, RepeatResult, StepRecord
from validation.executor.weights import ModelWeights, check_supported, init_weights


@dataclass
class _Timings:
    """One generation's round structure and the times inside its rounds."""

    accepted: list[int] = field(default_factory=list)  # per round, before the last round's cut
    emitted: list[int] = field(default_factory=list)  # per round
    draft_step_s: list[float] = field(default_factory=list)
    verify_step_s: list[float] = field(default_factory=list)


def accepted_drafts(rng: np.random.Generator, gamma: int, alpha: float) -> int:
    """Drafted positions accepted in a round: each with probability ``alpha``, up to the first rejection."""
    accepted = 0
    while accepted < gamma and rng.random() < alpha:
        accepted += 1
    return accepted


def _step(phase: str, wall: float, target: KernelProfiler, draft: KernelProfiler) -> StepRecord:
    """A step's record with the draft's ops named ``draft_<op>`` beside the target's."""
    ops = {name: (t.count, t.time_s) for name, t in target.ops.items()}
    ops.update({f"draft_{name}": (t.count, t.time_s) for name, t in draft.ops.items()})
    return StepRecord(phase=phase, wall_s=wall, kernel_s=target.kernel_s + draft.kernel_s,
                      kernels=target.kernels + draft.kernels, ops=ops)


def speculate(target: Transformer, draft: Transformer, prompt: np.ndarray, output_len: int, gamma: int,
              alpha: float, seed: int, caches: tuple[KVCache, KVCache]) -> tuple[Generation, _Timings]:
    """One generation of ``output_len`` tokens by draft-and-verify rounds (the module docstring)."""
    rng = np.random.default_rng(seed + 2)
    tk, dk, ops = target.profiler, draft.profiler, target.ops
    target_cache, draft_cache = caches
    timings = _Timings()
    begin = perf_counter()
    tk.reset()
    dk.reset()
    first = tk("sampling", ops.argmax, target.forward(prompt, 0, target_cache))
    draft.forward(prompt, 0, draft_cache)  # its own next token goes unused: rounds start from the target's
    steps = [_step("prefill", perf_counter() - begin, tk, dk)]
    emitted = [first]
    position = prompt.shape[1]  # of the last emitted token, which neither cache holds yet
    pending = first[:, None]  # what the draft is fed first: the last emitted token (and any it missed)
    while len(emitted) < output_len:
        tk.reset()
        dk.reset()
        round_start = perf_counter()
        ids, start, drafted = pending, position - pending.shape[1] + 1, []
        for _ in range(gamma):
            step_start = perf_counter()
            token = dk("sampling", ops.argmax, draft.forward(ids, start, draft_cache))
            timings.draft_step_s.append(perf_counter() - step_start)
            drafted.append(token)
            start += ids.shape[1]
            ids = token[:, None]
        step_start = perf_counter()
        verify = np.stack([emitted[-1], *drafted], axis=1)
        checked = tk("sampling", ops.argmax, target.forward(verify, position, target_cache, last=gamma + 1))
        timings.verify_step_s.append(perf_counter() - step_start)
        accepted = accepted_drafts(rng, gamma, alpha)
        new = (drafted[:accepted] + [checked[:, accepted]])[:output_len - len(emitted)]
        emitted.extend(new)
        position += accepted + 1
        if accepted == gamma:  # d_gamma never went through the draft: feed it before the target's token
            pending = np.stack([drafted[-1], checked[:, gamma]], axis=1)
        else:
            pending = checked[:, accepted:accepted + 1]
        timings.accepted.append(accepted)
        timings.emitted.append(len(new))
        steps.append(_step("decode", perf_counter() - round_start, tk, dk))
    return Generation(np.stack(emitted, axis=1), steps, perf_counter() - begin), timings


def _repeat(gen: Generation) -> RepeatResult:
    """``RepeatResult.of`` with ``tpot_s`` per emitted token, not per round."""
    result = RepeatResult.of(gen)
    tokens = gen.tokens.shape[1]
    tpot = (gen.e2e_s - gen.steps[0].wall_s) / (tokens - 1) if tokens > 1 else None
    return replace(result, tpot_s=tpot)


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def execute_speculative(
    target: str | ModelSpec,
    draft: str | ModelSpec,
    batch: int,
    input_len: int,
    output_len: int,
    gamma: int,
    alpha: float,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    weights: ModelWeights | None = None,
) -> ExecutionResult:
    """``execute`` with draft-and-verify rounds on numpy, in this process.

    ``weights`` are the target's (from ``init_weights(target, seed)``); the draft's are drawn
    from ``seed``. The result's ``speculative`` holds the draft's name, ``gamma``, ``alpha``,
    rounds per generation, mean tokens emitted and drafts accepted per round (with the
    expectation ``(1 - alpha^(gamma+1)) / (1 - alpha)`` beside them), and the median seconds of
    one draft step and of one verify step.
    """
    target_spec = target if isinstance(target, ModelSpec) else load_model(target)
    draft_spec = draft if isinstance(draft, ModelSpec) else load_model(draft)
    Speculation(draft_spec, gamma, alpha)  # gamma and alpha checked as `infersim estimate` checks them
    max_len = input_len + output_len - 1 + gamma  # a round verifies up to gamma positions past the last
    for spec in (target_spec, draft_spec):
        check_supported(spec)
        check_shape(spec, batch, input_len, output_len, repeats)
        if spec.position_encoding == "learned" and max_len > spec.max_position_embeddings:
            raise InferSimError(f"speculative rounds reach position {max_len}, past {spec.name}'s "
                                f"{spec.max_position_embeddings} learned positions")
    if draft_spec.vocab_size != target_spec.vocab_size:
        raise InferSimError(f"the draft {draft_spec.name} has a vocabulary of {draft_spec.vocab_size} tokens "
                            f"and the target {target_spec.name} {target_spec.vocab_size}: a draft must "
                            "share the target's vocabulary")
    backend = make_backend("numpy")
    check_fits(target_spec, backend, batch, input_len, output_len + gamma,
               extra_bytes=draft_spec.params() * 4 + draft_spec.kv_elements_per_token() * batch
               * (input_len + output_len + gamma) * 4)
    target_rt = Transformer(target_spec, backend, weights or init_weights(target_spec, seed))
    draft_rt = Transformer(draft_spec, backend, init_weights(draft_spec, seed))
    prompt = prompt_tokens(target_spec.vocab_size, batch, input_len, seed)
    caches = (target_rt.new_cache(batch, max_len), draft_rt.new_cache(batch, max_len))

    def run() -> tuple[Generation, _Timings]:
        return speculate(target_rt, draft_rt, prompt, output_len, gamma, alpha, seed, caches)

    memory = measure_memory(backend, target_rt.weight_bytes + draft_rt.weight_bytes,
                            caches[0].nbytes() + caches[1].nbytes(), run)
    for _ in range(warmup - 1):
        run()
    cpu_before, load_before = machine.cpu_times(), os.getloadavg()[0]
    runs = [run() for _ in range(repeats)]
    contention = machine.contention(cpu_before, load_before)
    result = summarize(target_spec, backend, input_len, seed, memory, [gen for gen, _ in runs], contention,
                       machine.machine_info("numpy", "cpu"))
    timings = runs[-1][1]  # every repeat draws the same acceptances, so runs the same rounds
    speculative: dict[str, Any] = {
        "draft": draft_spec.name, "gamma": gamma, "alpha": alpha, "rounds": len(timings.emitted),
        "tokens_per_round": float(np.mean(timings.emitted)) if timings.emitted else None,
        "accepted_per_round": float(np.mean(timings.accepted)) if timings.accepted else None,
        "expected_tokens_per_round": expected_tokens(alpha, gamma),
        "draft_step_s": _median([s for _, t in runs for s in t.draft_step_s]),
        "verify_step_s": _median([s for _, t in runs for s in t.verify_step_s]),
        "draft_weights_bytes": draft_rt.weight_bytes,
    }
    return replace(result, repeats=[_repeat(gen) for gen, _ in runs], speculative=speculative)
