"""The discrete-event loop: requests arrive, are routed to replicas, batched, and leave.

Events, in time order: an arrival (routed to a replica, or to a prefill replica when pools are
disaggregated), the end of a replica's iteration (tokens emitted, requests finished, the next
iteration formed at once), and the end of a KV-cache transfer from a prefill replica to a
decode replica (each prefill replica sends over its own link, one transfer at a time, so
transfers queue when the link is busy). A replica with nothing to do idles until an event
gives it work. Iteration times and energies come from ``ReplicaCost``; the policies from
``scheduler``.

Fast paths (``fast_forward``; each gives the records that stepping gives, tests/test_engine.py
and tests/test_engine_speed.py): stretches in which every request only grows by a token (and,
under chunked prefill, one prompt by a full chunk) are costed as one array ("runs"), while
nobody waits with requests leaving as they finish, and as far as the next arrival the replica
could get; an arrival cuts a run short only if it could join it (nobody was waiting, so it
would be the head of the queue). Round-robin replicas of one pool share nothing (their
arrivals are dealt in turn): they are simulated one after another, or in forked processes.

Request state, for request ``i``: ``cached[i]`` tokens have K and V in its replica's cache,
``generated[i]`` output tokens are out, and while it prefills, ``target[i]`` is the number of
tokens the cache must hold before it emits (the prompt, or prompt plus the tokens generated
before a recompute preemption). While it decodes, ``cached = prompt + generated - 1``: each
decode step writes the last token's K and V and emits the next.
"""

from __future__ import annotations

import heapq
import multiprocessing
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from simulator.engine.blocks import BlockManager
from simulator.engine.records import IterationLog, ServeRecords
from simulator.engine.scheduler import Iteration, SchedulerConfig
from simulator.engine.stepcost import ReplicaCost
from simulator.engine.workload import Workload
from simulator.errors import InferSimError
from simulator.strategies.speculative import Speculation

ROUTERS = ("round-robin", "least-tokens")
_DONE, _TRANSFER = 1, 2
_NONE = np.zeros(0, dtype=np.int64)
_FIRST_RUN = 16
"""Iterations costed for a replica's first run before anything is known of its step time."""
_OUTCOMES = ("scheduled", "first_token", "completion", "tbt_max", "preemptions", "energy", "served_by")
"""Per-request arrays a replica simulated in another process sends back."""
_FORKED: Simulation | None = None
"""The simulation whose replicas forked worker processes run (they inherit it)."""


@dataclass
class _Run:
    """Iterations of the same decoding requests (and one prompt's chunks), costed together
    (``Simulation._begin_run``)."""

    requests: np.ndarray
    start: float
    ends: np.ndarray
    energies: np.ndarray
    blocks_used: np.ndarray
    lengths: np.ndarray
    """The iterations each request decodes in: it leaves the batch, finished, after its last."""
    prefill: int = -1
    """Chunked prefill: the request whose prompt takes a full chunk every iteration (-1: none)."""
    chunk: int = 0
    open: bool = True
    """Whether a request arriving during the run could join it: it started with nobody waiting
    (a request behind a refused head is refused too; a full chunk leaves no budget)."""


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
    step_s: float = 0.0  # mean iteration time of its last run (sizes the next run; 0: unknown)


class Simulation:
    def __init__(self, workload: Workload, replicas: list[Replica], config: SchedulerConfig,
                 router: str = "round-robin", kv_link_rate: float | None = None,
                 kv_link_latency: float = 0.0, speculation: Speculation | None = None, seed: int = 0,
                 fast_forward: bool = True, workers: int = 1):
        if router not in ROUTERS:
            raise InferSimError(f"router {router!r}: choose round-robin or least-tokens")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InferSimError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers
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
        grouped = workload.prefix_group is not None and config.prefix_caching
        self.group = workload.prefix_group.copy() if grouped else np.full(n, -1)  # type: ignore[union-attr]
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
        # A run's iterations after its first give each request in them a gap of their length:
        # kept as the lengths and the requests, expanded once at the end.
        self.run_gaps: list[np.ndarray] = []
        self.run_gap_counts: list[np.ndarray] = []
        self.forked_gaps: list[tuple[np.ndarray, np.ndarray]] = []  # (gaps, repeats) of workers
        self.iterations = IterationLog()
        self.events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._rr = 0
        # Arrivals in the order they are handled (time, then index): a stream merged with the
        # event heap rather than pushed onto it. ``_next`` is the next one to come.
        self._arrivals = np.argsort(self.arrival, kind="stable")
        self._arrival_times = self.arrival[self._arrivals].tolist()
        self._next = 0
        self._only: Replica | None = None  # simulating one replica by itself: its arrivals only

    # --- events ---------------------------------------------------------------------------

    def _push(self, t: float, kind: int, data: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, data))

    def run(self) -> ServeRecords:
        wall = time.perf_counter()
        positions = list(range(len(self.mixed)))
        workers = min(self.workers, len(positions))
        if not self._independent():
            end = self._loop()
        elif workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            end = self._run_forked([positions[k::workers] for k in range(workers)])
        else:
            end = self._run_alone(positions)
        return self._records(end, time.perf_counter() - wall)

    def _independent(self) -> bool:
        """Whether the replicas can be simulated one at a time: mixed replicas under round-robin
        (the draws of speculative decoding come from one generator shared in event order)."""
        return (self.fast_forward and len(self.mixed) > 1 and self.router == "round-robin"
                and not self.gamma)

    def _dealt(self) -> np.ndarray:
        """The pool position of the replica each arrival (in handling order) goes to: round-robin
        deals the k-th to ``(k + 1) mod R``, whatever the replicas' state."""
        return np.arange(1, len(self._arrivals) + 1) % len(self.mixed)

    def _run_alone(self, positions: list[int]) -> float:
        """Simulate the mixed replicas at ``positions`` one after another, each with its own
        arrivals only (round-robin: they share nothing); the time of the last event."""
        arrivals, times, dealt = self._arrivals, self._arrival_times, self._dealt()
        end = 0.0
        for position in positions:
            mine = np.flatnonzero(dealt == position)
            self._arrivals, self._arrival_times = arrivals[mine], [times[k] for k in mine.tolist()]
            self._next, self._only = 0, self.mixed[position]
            end = max(end, self._loop())
        self._arrivals, self._arrival_times, self._next, self._only = arrivals, times, len(times), None
        return end

    def _run_forked(self, groups: list[list[int]]) -> float:
        """``_run_alone`` for each group of replica positions in a forked process of its own;
        their records gathered here."""
        global _FORKED
        _FORKED = self
        try:
            with multiprocessing.get_context("fork").Pool(len(groups)) as pool:
                parts = pool.map(_run_part, groups)
        finally:
            _FORKED = None
        end = 0.0
        for part_end, ids, outcomes, rows, gaps, busy in parts:
            end = max(end, part_end)
            for name, values in zip(_OUTCOMES, outcomes, strict=True):
                getattr(self, name)[ids] = values
            self.iterations.extend(tuple(rows.T))
            self.forked_gaps.append(gaps)
            for position, busy_s in busy.items():
                self.mixed[position].busy_s = busy_s
        return end

    def _gap_parts(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token gap recorded here, as gaps and how many times each occurs."""
        values = np.concatenate([*self.gaps, *self.run_gaps]) if self.gaps or self.run_gaps else np.zeros(0)
        repeats = np.concatenate([np.ones(sum(len(g) for g in self.gaps), dtype=np.int64),
                                  *self.run_gap_counts])
        return values, repeats.astype(np.int64)

    def _loop(self) -> float:
        """Handle arrivals and events in time order (at equal times arrivals first, in index
        order) until none are left; the time of the last one handled."""
        events, times, arrivals = self.events, self._arrival_times, self._arrivals
        count = len(times)
        end = 0.0
        while True:
            if self._next < count and (not events or times[self._next] <= events[0][0]):
                now = times[self._next]
                request = int(arrivals[self._next])
                self._next += 1
                replica = self._route(request, now)
            elif events:
                now, _, kind, data = heapq.heappop(events)
                if kind == _DONE:
                    replica, version = data
                    if version != replica.version:
                        continue  # a run cut short: its end moved
                    end = now
                    self._finish(replica, now)
                    self._start(replica, now)
                    continue
                request, replica = data
            else:
                return end
            end = now
            self._enqueue(replica, request)
            if not replica.busy:
                self._start(replica, now)
            elif replica.run is not None and replica.run.open:
                self._cut(replica, now)

    def _route(self, request: int, now: float) -> Replica:
        if self._only is not None:
            return self._only
        pool = self.mixed or self.prefill_pool
        return self._pick(pool, request, now)

    def _horizon(self, replica: Replica) -> float:
        """A time by which the replica has probably been given new work (for sizing a run; any
        size gives the same records): its next arrival when it runs alone; for a pool of ``R``
        under round-robin the R-th next arrival (each replica gets one of any R in a row),
        which least-tokens is taken to match on average; never for a decode replica."""
        if replica.pool == "decode":
            return np.inf
        ahead = self._next + (0 if self._only is not None else len(self.mixed or self.prefill_pool) - 1)
        return self._arrival_times[ahead] if ahead < len(self._arrival_times) else np.inf

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
        decoded = int(np.minimum(run.lengths, done).sum())
        return replica.outstanding_tokens - decoded - done * run.chunk

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
        running = np.array(replica.running, dtype=np.int64)
        prefilling = self.cached[running] < self.target[running]
        if self.fast_forward and self._start_run(replica, now, running, prefilling):
            return
        step = self._form(replica, running, prefilling)
        if step.empty:
            replica.busy, replica.current = False, None
            return
        if step.prefill:
            prefill_ids, prefill_new = np.array(step.prefill, dtype=np.int64).T
            prefill_start = self.cached[prefill_ids]
            finishing = int(np.count_nonzero(prefill_start + prefill_new >= self.target[prefill_ids]))
        else:
            prefill_ids = prefill_new = prefill_start = _NONE
            finishing = 0
        if step.padding:
            decoding = np.array(step.decode + step.padding, dtype=np.int64)
        else:
            decoding = step.decode_ids = np.array(step.decode, dtype=np.int64) if step.decode else _NONE
        contexts = self.cached[decoding] + 1
        emitting = len(step.decode) + finishing
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
        prefill_tokens = 0
        tokens = max(step.tokens, 1)
        for r, n in step.prefill:
            if np.isnan(self.scheduled[r]):
                self.scheduled[r] = now
            self.energy[r] += energy * n / tokens
            prefill_tokens += n
        if step.decode:
            self.energy[decoding[:len(step.decode)]] += energy / tokens
        self.iterations.append((replica.index, now, now + seconds, len(step.prefill), prefill_tokens,
                                len(step.decode), len(decoding), replica.blocks.used, replica.blocks.total,
                                energy / seconds if seconds > 0 else 0.0))
        self._push(now + seconds, _DONE, (replica, replica.version))

    def _start_run(self, replica: Replica, now: float, ids: np.ndarray, prefilling: np.ndarray) -> bool:
        """When nothing waits and every running request decodes, the next iterations are the same
        requests one token longer each, until one finishes: cost them as one array. ``ids``:
        the running requests; ``prefilling``: which of them are still prefilling."""
        if not len(ids) or replica.pool == "prefill":
            return False
        if np.count_nonzero(prefilling):
            return self._start_chunked_run(replica, now, ids, prefilling)
        if not self._head_blocked(replica):
            return False
        return self._begin_run(replica, now, ids, self.output[ids] - self.generated[ids])

    def _start_chunked_run(self, replica: Replica, now: float, ids: np.ndarray,
                           prefilling: np.ndarray) -> bool:
        """Chunked prefill with one prompt in progress that fills the budget left by the decodes
        every iteration: until that prompt's last chunk, or a decode's last token, the iterations
        are the same decodes one token longer and the next full chunk; nothing can be admitted
        (no budget is left). Cost them as one array."""
        if self.config.policy != "chunked" or np.count_nonzero(prefilling) != 1:
            return False
        p = int(ids[prefilling.argmax()])
        chunk = self.config.token_budget - (len(ids) - 1)
        if chunk <= 0 or self.group[p] >= 0:
            return False
        steps = (int(self.target[p] - self.cached[p]) - 1) // chunk  # every one a full chunk
        if steps < 2:
            return False
        decoders = ids[~prefilling]
        if len(decoders):
            steps = min(steps, int((self.output[decoders] - self.generated[decoders]).min()))
        return self._begin_run(replica, now, decoders, np.full(len(decoders), steps), p, chunk, steps)

    def _begin_run(self, replica: Replica, now: float, decoders: np.ndarray, remaining: np.ndarray,
                   prefill: int = -1, chunk: int = 0, prompt_steps: int = 0) -> bool:
        """Cost the iterations of ``decoders`` (``remaining`` tokens to go each) as one array, if
        the KV blocks hold them: up to the first to finish, or, while nobody waits, the last (the
        others leave the batch as they finish: nobody can take their place); with ``prefill``'s
        chunks, ``prompt_steps`` of them at most; as far as the replica's ``_horizon`` (a run cut
        short costs the rest for nothing; one that ends early is followed by the next)."""
        blocks = replica.blocks
        cached, shared = self.cached[decoders], self.shared[decoders]
        held, used = blocks.held[decoders].copy(), blocks.used
        held_p = cached_p = shared_p = 0
        if prefill >= 0:
            held_p, cached_p, shared_p = (int(blocks.held[prefill]), int(self.cached[prefill]),
                                          int(self.shared[prefill]))
        open_run = prefill < 0 and not replica.waiting
        limit = int(min(remaining.max() if open_run else remaining.min(initial=1024), 1024))
        if prefill >= 0:
            limit = min(limit, prompt_steps)
        if limit < 2:
            return False
        horizon = self._horizon(replica) if open_run else np.inf
        steps = limit
        if horizon < np.inf:
            guess = (horizon - now) / replica.step_s * 1.25 + 2 if replica.step_s > 0 else _FIRST_RUN
            steps = int(min(limit, max(2, guess)))
        lengths = np.minimum(remaining, steps)
        if not self._reserve(replica, decoders, lengths, steps, prefill, chunk):
            # Leaving requests free blocks that stepping could reuse (or its evictions could
            # differ): up to the first to finish, holding what the whole batch reaches.
            steps = min(int(remaining.min(initial=limit)), limit)
            lengths = np.minimum(remaining, steps)
            if steps < 2 or not self._reserve(replica, decoders, lengths, steps, prefill, chunk):
                return False
            limit = steps
        if prefill >= 0:
            seconds, energies = replica.cost.chunked_run(cached + 1, chunk, cached_p, steps)
        else:
            seconds, energies = replica.cost.decode_run(cached + 1, steps, lengths)
        ends = now + np.cumsum(seconds)
        if steps < limit and ends[-1] < horizon:
            # Short of the horizon: as many more as the last step's time says reach it.
            more = int(min(limit - steps, (horizon - ends[-1]) / max(seconds[-1], 1e-12) + 1))
            longer = np.minimum(remaining, steps + more)
            if self._reserve(replica, decoders, longer, steps + more, prefill, chunk):
                if prefill >= 0:
                    extra_s, extra_j = replica.cost.chunked_run(cached + 1 + steps, chunk,
                                                                cached_p + steps * chunk, more)
                else:
                    staying = longer > steps
                    extra_s, extra_j = replica.cost.decode_run(cached[staying] + 1 + steps, more,
                                                               longer[staying] - steps)
                ends = np.concatenate([ends, ends[-1] + np.cumsum(extra_s)])
                energies = np.concatenate([energies, extra_j])
                steps, lengths = steps + more, longer
        j = np.arange(1, steps + 1)
        growth = blocks.growth(held[None, :], cached[None, :] + j[:, None], shared[None, :])
        if lengths.min(initial=steps) < steps:  # a finished request's blocks are free from then on
            growth = np.where(lengths[None, :] >= j[:, None], growth, -held[None, :])
        blocks_used = used + growth.sum(axis=1)
        if prefill >= 0:
            blocks_used += blocks.growth(held_p, cached_p + j * chunk, shared_p)
        replica.run = _Run(decoders, now, ends, energies, blocks_used, lengths, prefill, chunk, open_run)
        replica.busy, replica.current = True, None
        replica.busy_s += float(ends[-1] - now)
        self._push(float(ends[-1]), _DONE, (replica, replica.version))
        return True

    def _reserve(self, replica: Replica, decoders: np.ndarray, lengths: np.ndarray, steps: int,
                 prefill: int, chunk: int) -> bool:
        """Hold the blocks that ``steps`` iterations of a run reach, ``lengths`` of them for each
        decoder (False, holding none more, if they are not there). When some leave early, only
        free blocks are taken: evicting cached prefixes now could pick others than stepping."""
        blocks = replica.blocks
        cached, shared = self.cached[decoders], self.shared[decoders]
        extra = int(blocks.growth(blocks.held[decoders], cached + lengths, shared).sum())
        final_p = shared_p = 0
        if prefill >= 0:
            final_p, shared_p = int(self.cached[prefill]) + steps * chunk, int(self.shared[prefill])
            extra += int(blocks.growth(int(blocks.held[prefill]), final_p, shared_p))
        if extra > blocks.free and (lengths.min(initial=steps) < steps or not blocks.can_reserve(extra)):
            return False
        blocks.grow_all(decoders, cached + lengths, shared)
        if prefill >= 0:
            blocks.grow(prefill, final_p, shared_p)
        return True

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
        taken = np.minimum(run.lengths, steps)  # iterations each request decoded in
        leaving = n and int(taken.min()) < steps
        # Requests decoding in each iteration (all of them unless some left).
        decoding = n - np.cumsum(np.bincount(taken, minlength=steps))[:steps] if leaving else n
        tokens = decoding + run.chunk
        if n:
            first = run.ends[0] - self.last_token[ids]
            self.gaps.append(first)
            if steps > 1:
                self.run_gaps.append(durations[1:])
                counts = decoding[1:] if leaving else np.full(steps - 1, n)  # type: ignore[index]
                self.run_gap_counts.append(counts)
            if leaving:
                later = np.maximum.accumulate(np.concatenate([[0.0], durations[1:]]))[taken - 1]
                self.energy[ids] += np.cumsum(run.energies / tokens)[taken - 1]
                self.last_token[ids] = run.ends[taken - 1]
            else:
                later = durations[1:].max(initial=0.0)
                self.energy[ids] += float(run.energies.sum()) / tokens
                self.last_token[ids] = run.ends[-1]
            self.tbt_max[ids] = np.maximum(self.tbt_max[ids], np.maximum(first, later))
            self.cached[ids] += taken
            self.generated[ids] += taken
            self.served_by[ids] = replica.index
            replica.blocks.fit_all(ids, self.cached[ids], self.shared[ids])
        replica.outstanding_tokens -= int(np.sum(tokens)) if leaving else steps * tokens
        if run.prefill >= 0:
            p = run.prefill
            self.cached[p] += steps * run.chunk
            self.energy[p] += float(run.energies.sum()) * run.chunk / tokens
            replica.blocks.fit(p, int(self.cached[p]), int(self.shared[p]))
        power = np.divide(run.energies, durations, out=np.zeros(steps), where=durations > 0)
        self.iterations.extend((replica.index, starts, run.ends, 1 if run.prefill >= 0 else 0, run.chunk,
                                decoding, decoding, run.blocks_used, replica.blocks.total, power))
        replica.step_s = float(run.ends[-1] - run.start) / steps
        done = np.flatnonzero(self.generated[ids] >= self.output[ids])
        for r, t in zip(ids[done].tolist(), run.ends[taken[done] - 1].tolist(), strict=True):
            self._complete(replica, r, t)
        replica.run = None

    def _form(self, replica: Replica, running: np.ndarray, prefilling: np.ndarray) -> Iteration:
        """The next iteration; ``running``: the running requests now, ``prefilling``: which of
        them are still prefilling."""
        policy = self.config.policy
        if policy == "static":
            return self._form_static(replica)
        step = Iteration()
        if policy == "continuous":
            self._admit(replica, step, budget=self.config.max_batch_tokens, chunked=False)
            if step.prefill:
                return step
            self._decodes(replica, step)  # admission may have swapped requests in: not ``running``
            return step
        self._decodes(replica, step, running[~prefilling])
        budget = self.config.token_budget - len(step.decode)
        chunked = policy == "chunked"
        partial: list[int] = []
        if chunked:
            if len(replica.running) != len(running):  # requests were preempted
                running = np.array(replica.running, dtype=np.int64)
                prefilling = self.cached[running] < self.target[running]
            partial = running[prefilling].tolist()
        for r in partial:
            if budget <= 0:
                break
            n = min(int(self.target[r] - self.cached[r]), budget)
            if not replica.blocks.can_grow(r, int(self.cached[r]) + n, int(self.shared[r])):
                break
            replica.blocks.grow(r, int(self.cached[r]) + n, int(self.shared[r]))
            step.prefill.append((r, n))
            budget -= n
        self._admit(replica, step, budget=budget, chunked=chunked)
        return step

    def _decodes(self, replica: Replica, step: Iteration, candidates: np.ndarray | None = None) -> None:
        """Every decoding request of ``replica`` (``candidates``, if known) takes one token;
        preempt when blocks run out."""
        blocks = replica.blocks
        if candidates is None:
            running = np.array(replica.running, dtype=np.int64)
            candidates = running[self.cached[running] >= self.target[running]]
        if not len(candidates):
            return
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
            if self.config.preemption == "swap":
                # It comes back with its whole cache (the prefix's tokens too) in blocks of its own.
                self.group[request] = -1
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
        owed = replica.pool != "prefill"  # a prefill replica owes no output tokens
        # A prompt's last chunk emits its first token (or, recomputed after a preemption, its
        # next one: a gap since the last).
        later: list[int] = []
        for r in emitted:
            if np.isnan(self.first_token[r]):
                self.first_token[r] = now
            else:
                later.append(r)
        if later:
            gaps = now - self.last_token[later]
            self.gaps.append(gaps)
            self.tbt_max[later] = np.maximum(self.tbt_max[later], gaps)
        finished = []
        if emitted:
            self.last_token[emitted] = now
            self.generated[emitted] += 1
            self.served_by[emitted] = replica.index
            if owed:
                replica.outstanding_tokens -= len(emitted)
            finished = [r for r in emitted if self.generated[r] >= self.output[r]]
        if step.decode:
            decoded = step.decode_ids
            if decoded is None:
                decoded = np.array(step.decode, dtype=np.int64)
            if self.gamma:
                # Tokens verified together arrive together: each counts an equal share of the gap.
                tokens = np.minimum(self._accepted(len(decoded)) + 1,
                                    self.output[decoded] - self.generated[decoded])
                gaps = (now - self.last_token[decoded]) / tokens
                self.gaps.append(np.repeat(gaps, tokens))
                count = int(tokens.sum())
            else:
                tokens, gaps = 1, now - self.last_token[decoded]  # type: ignore[assignment]
                self.gaps.append(gaps)
                count = len(decoded)
            self.cached[decoded] += tokens
            self.tbt_max[decoded] = np.maximum(self.tbt_max[decoded], gaps)
            self.last_token[decoded] = now
            self.generated[decoded] += tokens
            self.served_by[decoded] = replica.index
            if owed:
                replica.outstanding_tokens -= count
            finished += decoded[self.generated[decoded] >= self.output[decoded]].tolist()
        for r in finished:
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
        iterations = self.iterations.frame([r.pool for r in self.replicas])
        start = float(self.arrival.min()) if n else 0.0
        idle = sum(max(0.0, end - start - r.busy_s) * r.idle_power_w for r in self.replicas)
        parts = [self._gap_parts(), *self.forked_gaps]
        gaps = np.repeat(np.concatenate([v for v, _ in parts]), np.concatenate([r for _, r in parts]))
        meta = {"idle_energy_j": idle, "sim_wall_s": wall_s, "iterations": len(iterations),
                "replicas": len(self.replicas),
                "replica_idle_w": {r.index: r.idle_power_w for r in self.replicas},
                "devices_per_replica": self.replicas[0].devices}
        return ServeRecords(requests, iterations, gaps, meta)


def _run_part(positions: list[int]) -> tuple:
    """In a forked worker: simulate the replicas at ``positions`` of the inherited simulation;
    the outcomes of their requests, their iterations, token gaps and busy times."""
    sim = _FORKED
    assert sim is not None
    dealt = sim._dealt()
    ids = sim._arrivals[np.isin(dealt, positions)]
    end = sim._run_alone(positions)
    outcomes = [getattr(sim, name)[ids] for name in _OUTCOMES]
    rows = sim.iterations.rows[:len(sim.iterations)]
    busy = {position: sim.mixed[position].busy_s for position in positions}
    return end, ids, outcomes, rows, sim._gap_parts(), busy
