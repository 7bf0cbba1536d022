"""The discrete-event loop: requests arrive, are routed to replicas, batched, and leave.

Events, in time order: an arrival (routed to a replica, or to a prefill replica when pools are
disaggregated), the end of a replica's iteration (tokens emitted, requests finished, the next
iteration formed at once), and the end of a KV-cache transfer from a prefill replica to a
decode replica (each prefill replica sends over its own link, one transfer at a time, so
transfers queue when the link is busy). A replica with nothing to do idles until an event
gives it work. Iteration times and energies come from ``ReplicaCost``; the policies from
``scheduler``.

Request state, for request ``i``: ``cached[i]`` tokens have K and V in its replica's cache,
``generated[i]`` output tokens are out, and while it prefills, ``target[i]`` is the number of
tokens the cache must hold before it emits (the prompt, or prompt plus the tokens generated
before a recompute preemption). While it decodes, ``cached = prompt + generated - 1``: each
decode step writes the last token's K and V and emits the next.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from simulator.engine.blocks import BlockManager
from simulator.engine.records import ITERATION_COLUMNS, ServeRecords
from simulator.engine.scheduler import Iteration, SchedulerConfig
from simulator.engine.stepcost import ReplicaCost
from simulator.engine.workload import Workload
from simulator.errors import InferSimError
from simulator.strategies.speculative import Speculation

ROUTERS = ("round-robin", "least-tokens")
_ARRIVAL, _DONE, _TRANSFER = 0, 1, 2


@dataclass
class _Run:
    """Decode-only iterations of the same requests, costed together (``Simulation._start_run``)."""

    requests: np.ndarray
    start: float
    ends: np.ndarray
    energies: np.ndarray
    blocks_used: np.ndarray
    prefill: int = -1
    """Chunked prefill: the request whose prompt takes a full chunk every iteration (-1: none)."""
    chunk: int = 0


@dataclass
class Replica:
    """One replica: its cost model, KV blocks and queues (mutable state of the loop)."""

    index: int
    pool: str  # "mixed", "prefill" or "decode"
    cost: ReplicaCost
    blocks: BlockManager
    devices: int
    kv_bytes_per_token: float
    idle_power_w: float
    swap_rate: float | None = None  # bytes/s to host memory, for swap preemption
    draft: ReplicaCost | None = None  # speculative decoding: the draft model on the same devices
    run: _Run | None = None  # a stretch of decode-only iterations costed at once
    version: int = 0  # bumped when a run is cut short: its old end event is stale
    running: list[int] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)
    busy: bool = False
    current: Iteration | None = None
    outstanding_tokens: int = 0
    busy_s: float = 0.0
    link_free_s: float = 0.0  # a prefill replica's KV link: free from this time


class Simulation:
    def __init__(self, workload: Workload, replicas: list[Replica], config: SchedulerConfig,
                 router: str = "round-robin", kv_link_rate: float | None = None,
                 kv_link_latency: float = 0.0, speculation: Speculation | None = None, seed: int = 0,
                 fast_forward: bool = True):
        if router not in ROUTERS:
            raise InferSimError(f"router {router!r}: choose round-robin or least-tokens")
        self.w, self.replicas, self.config, self.router = workload, replicas, config, router
        self.mixed = [r for r in replicas if r.pool == "mixed"]
        self.prefill_pool = [r for r in replicas if r.pool == "prefill"]
        self.decode_pool = [r for r in replicas if r.pool == "decode"]
        if self.mixed and (self.prefill_pool or self.decode_pool):
            raise InferSimError("replicas are either all mixed or split into prefill and decode pools")
        if bool(self.prefill_pool) != bool(self.decode_pool):
            raise InferSimError("disaggregation needs at least one prefill and one decode replica")
        self.kv_link_rate, self.kv_link_latency = kv_link_rate, kv_link_latency
        self.spec = speculation
        self.gamma = speculation.gamma if speculation is not None else 0
        if speculation is not None and config.policy == "static":
            raise InferSimError("speculative decoding runs under continuous, chunked or decode-priority "
                                "scheduling, not static batches")
        self.rng = np.random.default_rng(seed)
        # Decode-only stretches are costed as one array (cut short when a request arrives), which
        # gives the same records as stepping through them one iteration at a time.
        self.fast_forward = fast_forward and config.policy != "static" and not self.gamma
        n = len(workload)
        self.prompt = workload.prompt_tokens.astype(np.int64)
        self.output = workload.output_tokens.astype(np.int64)
        self.arrival = workload.arrival_s.astype(float)
        self.group = (workload.prefix_group if workload.prefix_group is not None and config.prefix_caching
                      else np.full(n, -1))
        self.cached = np.zeros(n, dtype=np.int64)
        self.shared = np.zeros(n, dtype=np.int64)  # of cached, tokens in a group's prefix blocks
        self.generated = np.zeros(n, dtype=np.int64)
        self.target = self.prompt.copy()
        self.swapped = np.zeros(n, dtype=bool)
        self.scheduled = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.completion = np.full(n, np.nan)
        self.last_token = np.full(n, np.nan)
        self.tbt_max = np.zeros(n)
        self.preemptions = np.zeros(n, dtype=np.int64)
        self.energy = np.zeros(n)
        self.where = np.full(n, -1, dtype=np.int64)  # replica index serving the request now
        self.served_by = np.full(n, -1, dtype=np.int64)  # replica that emitted its last token
        self.gaps: list[np.ndarray] = []
        self.iterations: list[tuple] = []
        self.events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._rr = 0

    # --- events ---------------------------------------------------------------------------

    def _push(self, t: float, kind: int, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, data))

    def run(self) -> ServeRecords:
        wall = time.perf_counter()
        for i, t in enumerate(self.arrival):
            self._push(float(t), _ARRIVAL, i)
        now = 0.0
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if kind == _DONE:
                replica, version = data
                if version != replica.version:
                    continue  # a run cut short: its end moved
                self._finish(replica, now)
                self._start(replica, now)
                continue
            if kind == _ARRIVAL:
                request, replica = data, self._route(data, now)
            else:
                request, replica = data
            self._enqueue(replica, request)
            if not replica.busy:
                self._start(replica, now)
            elif replica.run is not None:
                self._cut(replica, now)
        return self._records(now, time.perf_counter() - wall)

    def _route(self, request: int, now: float) -> Replica:
        pool = self.mixed or self.prefill_pool
        return self._pick(pool, request, now)

    def _pick(self, pool: list[Replica], request: int, now: float) -> Replica:
        if len(pool) == 1:
            return pool[0]
        if self.router == "round-robin":
            self._rr += 1
            return pool[self._rr % len(pool)]
        return min(pool, key=lambda r: self._outstanding(r, now))

    def _outstanding(self, replica: Replica, now: float) -> int:
        """Tokens the replica still owes, as stepping iteration by iteration would have it now."""
        run = replica.run
        if run is None:
            return replica.outstanding_tokens
        done = int(np.searchsorted(run.ends, now, side="left"))  # iterations ended before now
        return replica.outstanding_tokens - done * len(run.requests)

    def _enqueue(self, replica: Replica, request: int) -> None:
        replica.waiting.append(request)
        self.where[request] = replica.index
        replica.outstanding_tokens += self._remaining_tokens(request, replica)

    def _remaining_tokens(self, request: int, replica: Replica) -> int:
        prefill = int(self.target[request] - self.cached[request]) if self._prefilling(request) else 0
        decode = 0 if replica.pool == "prefill" else int(self.output[request] - self.generated[request])
        return prefill + decode

    def _prefilling(self, request: int) -> bool:
        return bool(self.cached[request] < self.target[request])

    # --- forming an iteration ---------------------------------------------------------------

    def _start(self, replica: Replica, now: float) -> None:
        if self.fast_forward and self._start_run(replica, now):
            return
        step = self._form(replica)
        if step.empty:
            replica.busy, replica.current = False, None
            return
        prefill_new = np.array([n for _, n in step.prefill], dtype=np.int64)
        prefill_ids = np.array([r for r, _ in step.prefill], dtype=np.int64)
        prefill_start = self.cached[prefill_ids]
        decoding = np.array(step.decode + step.padding, dtype=np.int64)
        contexts = self.cached[decoding] + 1
        finishing = prefill_start + prefill_new >= self.target[prefill_ids]
        emitting = len(step.decode) + int(np.count_nonzero(finishing))
        if self.gamma and len(step.decode):
            # Draft gamma tokens per decoding request (and the draft's own prefill of new prompt
            # chunks), then verify gamma + 1 positions each on the target.
            verify = self.gamma + 1
            seconds, energy = replica.cost.iteration(prefill_new, prefill_start, contexts,
                                                     emitting + len(step.decode) * self.gamma, verify)
            assert replica.draft is not None
            draft_s, draft_j = replica.draft.iteration(prefill_new, prefill_start, contexts, len(contexts))
            extra_s, extra_j = replica.draft.iteration(np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                       contexts, len(contexts))
            seconds += draft_s + (self.gamma - 1) * extra_s
            energy += draft_j + (self.gamma - 1) * extra_j
        else:
            seconds, energy = replica.cost.iteration(prefill_new, prefill_start, contexts, emitting)
            if self.gamma and len(prefill_new):
                assert replica.draft is not None
                draft_s, draft_j = replica.draft.iteration(prefill_new, prefill_start, contexts, 0)
                seconds, energy = seconds + draft_s, energy + draft_j
        if step.swap_bytes:
            seconds += step.swap_bytes / replica.swap_rate  # type: ignore[operator]
            energy += step.swap_bytes / replica.swap_rate * replica.idle_power_w  # type: ignore[operator]
        replica.busy, replica.current = True, step
        replica.busy_s += seconds
        for r, _ in step.prefill:
            if np.isnan(self.scheduled[r]):
                self.scheduled[r] = now
        self.iterations.append((len(self.iterations), replica.index, replica.pool, now, now + seconds,
                                len(step.prefill), int(prefill_new.sum()), len(step.decode),
                                len(step.decode) + len(step.padding), replica.blocks.used,
                                replica.blocks.total, energy / seconds if seconds > 0 else 0.0))
        tokens = max(step.tokens, 1)
        for r, n in step.prefill:
            self.energy[r] += energy * n / tokens
        for r in step.decode:
            self.energy[r] += energy / tokens
        self._push(now + seconds, _DONE, (replica, replica.version))

    def _start_run(self, replica: Replica, now: float) -> bool:
        """When nothing waits and every running request decodes, the next iterations are the same
        requests one token longer each, until one finishes: cost them as one array."""
        if not replica.running or replica.pool == "prefill":
            return False
        ids = np.array(replica.running, dtype=np.int64)
        prefilling = self.cached[ids] < self.target[ids]
        if prefilling.any():
            return self._start_chunked_run(replica, now, ids, prefilling)
        if not self._head_blocked(replica):
            return False
        cached, shared = self.cached[ids], self.shared[ids]
        steps = int(min((self.output[ids] - self.generated[ids]).min(), 1024))
        if steps < 2:
            return False
        blocks = replica.blocks
        held, used = blocks.held[ids].copy(), blocks.used
        if not blocks.grow_all(ids, cached + steps, shared):
            return False
        step_tokens = cached[None, :] + np.arange(1, steps + 1)[:, None]
        blocks_used = used + blocks.growth(held[None, :], step_tokens, shared[None, :]).sum(axis=1)
        seconds, energy = replica.cost.decode_run(cached + 1, steps)
        self._begin_run(replica, now, _Run(ids, now, now + np.cumsum(seconds), energy, blocks_used))
        return True

    def _start_chunked_run(self, replica: Replica, now: float, ids: np.ndarray,
                           prefilling: np.ndarray) -> bool:
        """Chunked prefill with one prompt in progress that fills the budget left by the decodes
        every iteration: until that prompt's last chunk, or a decode's last token, the iterations
        are the same decodes one token longer and the next full chunk; nothing can be admitted
        (no budget is left). Cost them as one array."""
        if self.config.policy != "chunked" or int(prefilling.sum()) != 1:
            return False
        p = int(ids[prefilling][0])
        decoders = ids[~prefilling]
        chunk = self.config.token_budget - len(decoders)
        if chunk <= 0 or self.group[p] >= 0:
            return False
        steps = (int(self.target[p] - self.cached[p]) - 1) // chunk  # every one a full chunk
        if len(decoders):
            steps = min(steps, int((self.output[decoders] - self.generated[decoders]).min()))
        steps = min(steps, 1024)
        if steps < 2:
            return False
        blocks = replica.blocks
        cached, shared = self.cached[decoders], self.shared[decoders]
        held, used = blocks.held[decoders].copy(), blocks.used
        held_p = int(blocks.held[p])
        cached_p, shared_p = int(self.cached[p]), int(self.shared[p])
        final_p = cached_p + steps * chunk
        extra = int(blocks.growth(held_p, final_p, shared_p)
                    + blocks.growth(held, cached + steps, shared).sum())
        if not blocks.can_reserve(extra):
            return False
        blocks.grow_all(decoders, cached + steps, shared)
        blocks.grow(p, final_p, shared_p)
        j = np.arange(1, steps + 1)
        decoding = blocks.growth(held[None, :], cached[None, :] + j[:, None], shared[None, :]).sum(axis=1)
        blocks_used = used + decoding + blocks.growth(held_p, cached_p + j * chunk, shared_p)
        seconds, energy = replica.cost.chunked_run(cached + 1, chunk, cached_p, steps)
        self._begin_run(replica, now, _Run(decoders, now, now + np.cumsum(seconds), energy, blocks_used,
                                           prefill=p, chunk=chunk))
        return True

    def _begin_run(self, replica: Replica, now: float, run: _Run) -> None:
        ends = run.ends
        replica.run = run
        replica.busy, replica.current = True, None
        replica.busy_s += float(ends[-1] - now)
        self._push(float(ends[-1]), _DONE, (replica, replica.version))

    def _head_blocked(self, replica: Replica) -> bool:
        """Whether no waiting request can join before a running one finishes: the queue is empty,
        or its head is refused for want of a slot, token budget or KV blocks, all of which only
        shrink while the running requests decode (a head with a shared prefix, swapped out or
        already prefilled elsewhere is not judged: no run)."""
        if not replica.waiting:
            return True
        r = replica.waiting[0]
        if self.group[r] >= 0 or self.swapped[r] or not self._prefilling(r):
            return False
        config, running = self.config, len(replica.running)
        if running >= config.max_batch:
            return True
        budget = config.max_batch_tokens if config.policy == "continuous" else config.token_budget - running
        if budget <= 0:
            return True
        need = int(self.target[r] - self.cached[r])
        if config.policy == "chunked":
            need = min(need, budget)
        elif need > budget:
            return True
        reserve = int(config.watermark * replica.blocks.total)
        return not replica.blocks.can_grow(r, int(self.cached[r]) + need, int(self.shared[r]), reserve)

    def _cut(self, replica: Replica, now: float) -> None:
        """Work arrived during a run: it ends with the iteration in progress now."""
        run = replica.run
        assert run is not None
        last = int(np.searchsorted(run.ends, now, side="left"))  # the iteration running at now
        if last + 1 >= len(run.ends):
            return
        replica.busy_s -= float(run.ends[-1] - run.ends[last])
        run.ends, run.energies = run.ends[:last + 1], run.energies[:last + 1]
        run.blocks_used = run.blocks_used[:last + 1]
        replica.version += 1
        self._push(float(run.ends[-1]), _DONE, (replica, replica.version))

    def _finish_run(self, replica: Replica, run: _Run) -> None:
        ids, steps = run.requests, len(run.ends)
        n = len(ids)
        starts = np.concatenate([[run.start], run.ends[:-1]])
        durations = run.ends - starts
        tokens = n + run.chunk
        if n:
            first = run.ends[0] - self.last_token[ids]
            self.gaps.append(first)
            if steps > 1:
                self.gaps.append(np.tile(durations[1:], n))
            self.tbt_max[ids] = np.maximum(self.tbt_max[ids],
                                           np.maximum(first, durations[1:].max(initial=0.0)))
            self.cached[ids] += steps
            self.generated[ids] += steps
            self.last_token[ids] = run.ends[-1]
            self.served_by[ids] = replica.index
            self.energy[ids] += float(run.energies.sum()) / tokens
            replica.blocks.fit_all(ids, self.cached[ids], self.shared[ids])
        replica.outstanding_tokens -= steps * tokens
        if run.prefill >= 0:
            p = run.prefill
            self.cached[p] += steps * run.chunk
            self.energy[p] += float(run.energies.sum()) * run.chunk / tokens
            replica.blocks.fit_all(np.array([p]), self.cached[[p]], self.shared[[p]])
        base = len(self.iterations)
        power = np.divide(run.energies, durations, out=np.zeros(steps), where=durations > 0)
        total = replica.blocks.total
        prefills = 1 if run.prefill >= 0 else 0
        self.iterations.extend(
            (base + j, replica.index, replica.pool, float(starts[j]), float(run.ends[j]), prefills,
             run.chunk, n, n, int(run.blocks_used[j]), total, float(power[j])) for j in range(steps))
        done = ids[self.generated[ids] >= self.output[ids]]
        for r in done.tolist():
            self._complete(replica, r, float(run.ends[-1]))
        replica.run = None

    def _form(self, replica: Replica) -> Iteration:
        policy = self.config.policy
        if policy == "static":
            return self._form_static(replica)
        step = Iteration()
        if policy == "continuous":
            self._admit(replica, step, budget=self.config.max_batch_tokens, chunked=False)
            if step.prefill:
                return step
            self._decodes(replica, step)
            return step
        self._decodes(replica, step)
        budget = self.config.token_budget - len(step.decode)
        chunked = policy == "chunked"
        running = np.array(replica.running, dtype=np.int64)
        partial = (running[self.cached[running] < self.target[running]].tolist()
                   if chunked and len(running) else [])
        for r in partial:
            if budget <= 0:
                break
            if True:
                n = min(int(self.target[r] - self.cached[r]), budget)
                if not replica.blocks.can_grow(r, int(self.cached[r]) + n, int(self.shared[r])):
                    break
                replica.blocks.grow(r, int(self.cached[r]) + n, int(self.shared[r]))
                step.prefill.append((r, n))
                budget -= n
        self._admit(replica, step, budget=budget, chunked=chunked)
        return step

    def _decodes(self, replica: Replica, step: Iteration) -> None:
        """Every decoding request of ``replica`` takes one token; preempt when blocks run out."""
        blocks = replica.blocks
        running = np.array(replica.running, dtype=np.int64)
        if not len(running):
            return
        candidates = running[self.cached[running] >= self.target[running]]
        ahead = self.gamma + 1
        if blocks.grow_all(candidates, self.cached[candidates] + ahead, self.shared[candidates]):
            step.decode.extend(candidates.tolist())
            return
        for r in candidates.tolist():
            if r not in replica.running:  # preempted below
                continue
            need = int(self.cached[r]) + ahead
            while not blocks.can_grow(r, need, int(self.shared[r])):
                victim = replica.running[-1]
                self._preempt(replica, victim, step)
                if victim == r:
                    break
            if r in replica.running:
                blocks.grow(r, need, int(self.shared[r]))
                step.decode.append(r)

    def _preempt(self, replica: Replica, request: int, step: Iteration) -> None:
        replica.running.remove(request)
        if request in step.decode:
            step.decode.remove(request)
        self.preemptions[request] += 1
        replica.outstanding_tokens -= self._remaining_tokens(request, replica)
        if self.config.preemption == "swap":
            if replica.swap_rate is None:
                raise InferSimError("swap preemption needs a link to host memory (links.host_device); "
                                    "this system has none: use --preemption recompute")
            step.swap_bytes += int(self.cached[request]) * replica.kv_bytes_per_token
            self.swapped[request] = True
        else:
            self.target[request] = self.prompt[request] + self.generated[request]
            self.cached[request] = 0
            self.shared[request] = 0
        replica.blocks.release(request)
        if self.group[request] >= 0:
            replica.blocks.leave_prefix(int(self.group[request]))
        replica.waiting.appendleft(request)
        replica.outstanding_tokens += self._remaining_tokens(request, replica)

    def _admit(self, replica: Replica, step: Iteration, budget: int, chunked: bool) -> None:
        """Admit waiting requests first come, first served while sequences, tokens and blocks allow."""
        config, blocks = self.config, replica.blocks
        reserve = int(config.watermark * blocks.total)
        while replica.waiting and budget > 0 and len(replica.running) < config.max_batch:
            r = replica.waiting[0]
            if self.swapped[r] or not self._prefilling(r):
                # Its cache comes back from host memory, or over the link from a prefill replica:
                # it only needs the blocks to hold it.
                if not blocks.can_grow(r, int(self.cached[r]), 0, reserve):
                    return
                blocks.grow(r, int(self.cached[r]))
                if self.swapped[r]:
                    step.swap_bytes += int(self.cached[r]) * replica.kv_bytes_per_token
                    self.swapped[r] = False
                replica.waiting.popleft()
                replica.running.append(r)
                continue
            group = int(self.group[r])
            if group >= 0 and self.cached[r] == 0:
                hit = blocks.prefix_hit(group)
                shared = blocks.use_prefix(group, self.w.prefix_tokens)
                self.shared[r] = blocks.shared_tokens(group)
                if hit:
                    self.cached[r] = min(shared, int(self.target[r]) - 1)
            remaining = int(self.target[r] - self.cached[r])
            n = min(remaining, budget) if chunked else remaining
            if n > budget or not blocks.can_grow(r, int(self.cached[r]) + n, int(self.shared[r]), reserve):
                if group >= 0:
                    blocks.leave_prefix(group)
                    self.cached[r], self.shared[r] = 0, 0
                return
            blocks.grow(r, int(self.cached[r]) + n, int(self.shared[r]))
            replica.waiting.popleft()
            replica.running.append(r)
            step.prefill.append((r, n))
            budget -= n

    def _form_static(self, replica: Replica) -> Iteration:
        step = Iteration()
        if replica.running:
            for r in replica.running:
                (step.padding if self.generated[r] >= self.output[r] else step.decode).append(r)
            if step.decode:
                return step
            for r in replica.running:
                replica.blocks.release(r)
            replica.running.clear()
            step = Iteration()
        budget = self.config.max_batch_tokens
        while replica.waiting and len(replica.running) < self.config.max_batch:
            r = replica.waiting[0]
            need = int(self.prompt[r] + self.output[r])
            if self.target[r] > budget or not replica.blocks.can_grow(r, need):
                break
            replica.blocks.grow(r, need)
            replica.waiting.popleft()
            replica.running.append(r)
            step.prefill.append((r, int(self.target[r] - self.cached[r])))
            budget -= int(self.target[r])
        return step

    # --- the end of an iteration ----------------------------------------------------------

    def _finish(self, replica: Replica, now: float) -> None:
        if replica.run is not None:
            self._finish_run(replica, replica.run)
            replica.busy = False
            return
        step = replica.current
        assert step is not None
        emitted: list[int] = []
        for r, n in step.prefill:
            self.cached[r] += n
            replica.outstanding_tokens -= n
            group = int(self.group[r])
            if group >= 0 and self.cached[r] >= self.w.prefix_tokens:
                replica.blocks.prefix_computed(group)
            if self.cached[r] >= self.target[r]:
                emitted.append(r)
        decoded = np.array(step.decode, dtype=np.int64)
        tokens = np.ones(len(decoded), dtype=np.int64)
        if self.gamma and len(decoded):
            tokens = np.minimum(self._accepted(len(decoded)) + 1,
                                self.output[decoded] - self.generated[decoded])
        self.cached[decoded] += tokens
        emitted_ids = np.concatenate([np.array(emitted, dtype=np.int64), decoded])
        counts = np.concatenate([np.ones(len(emitted), dtype=np.int64), tokens])
        if len(emitted_ids):
            ids = emitted_ids
            first = np.isnan(self.first_token[ids])
            self.first_token[ids[first]] = now
            later = ids[~first]
            if len(later):
                # Tokens verified together arrive together: each counts an equal share of the gap.
                per = counts[~first]
                gaps = (now - self.last_token[later]) / per
                self.gaps.append(np.repeat(gaps, per))
                np.maximum.at(self.tbt_max, later, gaps)
            self.last_token[ids] = now
            self.generated[ids] += counts
            self.served_by[ids] = replica.index
            if replica.pool != "prefill":
                replica.outstanding_tokens -= int(counts.sum())
        if len(emitted_ids):
            for r in emitted_ids[self.generated[emitted_ids] >= self.output[emitted_ids]].tolist():
                self._complete(replica, r, now)
            if replica.pool == "prefill":
                for r in emitted:
                    if self.generated[r] < self.output[r]:
                        self._hand_over(replica, r, now)
        replica.busy = False

    def _accepted(self, count: int) -> np.ndarray:
        """Drafted tokens the target accepts per request: each position is accepted with its
        rate given that every earlier one was (a geometric draw for a flat rate)."""
        spec = self.spec
        assert spec is not None
        rates = np.asarray(spec.profile if spec.profile is not None else [spec.alpha] * spec.gamma)
        accepted = self.rng.random((count, spec.gamma)) < rates
        return np.cumprod(accepted, axis=1).sum(axis=1)

    def _complete(self, replica: Replica, request: int, now: float) -> None:
        self.completion[request] = now
        if self.config.policy != "static":
            replica.running.remove(request)
            replica.blocks.release(request)
        if self.group[request] >= 0:
            replica.blocks.leave_prefix(int(self.group[request]))

    def _hand_over(self, replica: Replica, request: int, now: float) -> None:
        """A prefill replica sends the request's KV cache to a decode replica over its link."""
        replica.running.remove(request)
        if self.group[request] >= 0:
            replica.blocks.leave_prefix(int(self.group[request]))
        target = self._pick(self.decode_pool, request, now)
        nbytes = int(self.cached[request]) * replica.kv_bytes_per_token
        assert self.kv_link_rate is not None
        start = max(now, replica.link_free_s)
        done = start + self.kv_link_latency + nbytes / self.kv_link_rate
        replica.link_free_s = done
        replica.blocks.release(request)  # freed once sent (the link is FIFO: no later reuse races)
        self._push(done, _TRANSFER, (request, target))

    # --- records ---------------------------------------------------------------------------

    def _records(self, end: float, wall_s: float) -> ServeRecords:
        n = len(self.w)
        requests = pd.DataFrame({
            "request_id": np.arange(n), "arrival_s": self.arrival, "prompt_tokens": self.prompt,
            "output_tokens": self.output, "scheduled_s": self.scheduled, "first_token_s": self.first_token,
            "completion_s": self.completion, "preemptions": self.preemptions, "replica": self.served_by,
            "pool": [self.replicas[i].pool if i >= 0 else "" for i in self.served_by],
            "energy_j": self.energy, "tbt_max_s": self.tbt_max,
        })
        iterations = pd.DataFrame(self.iterations, columns=list(ITERATION_COLUMNS))
        start = float(self.arrival.min()) if n else 0.0
        idle = sum(max(0.0, end - start - r.busy_s) * r.idle_power_w for r in self.replicas)
        gaps = np.concatenate(self.gaps) if self.gaps else np.zeros(0)
        meta = {"idle_energy_j": idle, "sim_wall_s": wall_s, "iterations": len(self.iterations),
                "replicas": len(self.replicas),
                "replica_idle_w": {r.index: r.idle_power_w for r in self.replicas},
                "devices_per_replica": self.replicas[0].devices}
        return ServeRecords(requests, iterations, gaps, meta)
