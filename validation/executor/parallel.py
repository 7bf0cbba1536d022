"""Parallel plans run for real: tensor, expert and pipeline parallelism in worker processes on one host.

``workers = stage_devices * pp`` with ``stage_devices = ep if ep > 1 else tp`` (the simulator's
layout, ``simulator.strategies.parallel``); rank ``r`` is device ``r % stage_devices`` of
pipeline stage ``r // stage_devices``. Each worker draws the whole model from the seed
(``init_weights``), keeps its shard and drops the rest, so no weights cross a pipe.

- **TP** (Megatron): shard ``r`` holds query heads ``[r H/tp, (r+1) H/tp)`` and their KV heads
  (``KV/tp`` of them, or the one they share when ``tp > KV``), the matching columns of
  ``W_qkv``, rows of ``W_o``, columns of the gate and the up halves of ``W_up`` and rows of
  ``W_down`` (every expert's too). ``y = sum_r x W_o[r]`` and ``sum_r act(x W_up[:, r]) W_down[r]``
  are all-reduces, two per layer; row-parallel biases are added by rank 0 only. Embedding,
  norms, router and LM head are replicated.
- **EP**: rank ``r`` owns experts ``[r E/ep, (r+1) E/ep)``; attention is data-parallel (rank ``r``
  runs sequences ``[r B/ep, (r+1) B/ep)``). Per MoE layer each rank routes its own tokens, an
  all-to-all dispatches ``[h | expert | gate]`` rows to the experts' owners, the owners apply
  ``g_e FFN_e(h)`` and a second all-to-all brings the rows back to be summed per token.
- **PP**: stage ``s`` runs a contiguous block of layers (earlier stages take the extra one),
  stage 0 the embedding, the last stage the final norm, LM head and argmax. A step sends each of
  ``micro_batches`` micro-batches through the stages in GPipe order; the last stage sends the
  sampled ids back to stage 0. The step's wall time is stage 0's, from its start until it holds
  every new id.

Collectives go through one ``multiprocessing.shared_memory`` segment (``ShmGroup``) sized for
the run's largest message, synchronised with blocking primitives (a barrier per stage,
semaphores per point-to-point channel). Every rank sums the all-reduce slots in rank order, so
the replicated parts (norms, LM head) stay bitwise identical across TP ranks and rank 0's ids
are everyone's. The time in each collective includes the wait for the slowest peer; it is
profiled as an op (``all_reduce``, ``all_to_all``, ``send``, ``recv``), so it counts in a step's
kernel time, and listed per step with its bytes in ``StepRecord.collectives``.

Per-step records, op tables and memory are rank 0's; each worker runs BLAS on one thread.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import statistics
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from time import perf_counter
from typing import Any

import numpy as np

from simulator.errors import InferSimError
from simulator.specs.model import ModelSpec
from simulator.strategies.parallel import shard_for_tp
from validation.executor import machine
from validation.executor.harness import (
    check_fits,
    check_shape,
    generate,
    make_backend,
    measure_memory,
    prompt_tokens,
    summarize,
)
from validation.executor.model import EXPERT_NAMES, SHARED_NAMES, KVCache, Transformer
from validation.executor.offload import _arrays
from validation.executor.results import ExecutionResult, Generation, StepRecord
from validation.executor.weights import (
    LayerWeights,
    MLPWeights,
    ModelWeights,
    MoEWeights,
    check_supported,
    init_weights,
)

SHM_PREFIX = "infersim-"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
COMM_TIMEOUT_S = 600.0  # a peer that does not arrive in this long has hung: fail instead of waiting
_DTYPES = (np.dtype(np.float32), np.dtype(np.int64))  # what point-to-point messages carry
_HEADER = 8  # int64 words before a message: nbytes, dtype index, ndim, shape (up to 5)
_ALIGN = 64


def stage_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each stage's layers, as even as possible, earlier stages taking the extra."""
    base, extra = divmod(num_layers, pp)
    bounds, start = [], 0
    for stage in range(pp):
        end = start + base + (stage < extra)
        bounds.append((start, end))
        start = end
    return bounds


def check_plan(spec: ModelSpec, batch: int, tp: int, ep: int, pp: int, micro_batches: int) -> int:
    """Refuse a plan the executor cannot run, naming the degree; returns the worker count."""
    for name, value in (("tp", tp), ("ep", ep), ("pp", pp), ("micro-batches", micro_batches)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InferSimError(f"--{name} must be a whole number, at least 1; got {value!r}")
    if ep > 1:
        if spec.moe is None:
            raise InferSimError(f"--ep {ep} needs an MoE model; {spec.name} has no experts")
        if tp > 1:
            raise InferSimError(f"the executor runs expert parallelism with --tp 1 only (got --tp {tp} "
                                f"--ep {ep}): attention is data-parallel over the {ep} expert ranks")
        if spec.moe.num_experts % ep:
            raise InferSimError(f"--ep {ep} does not divide {spec.name}'s {spec.moe.num_experts} experts")
        if batch % ep:
            raise InferSimError(f"--ep {ep} splits the batch between its ranks: batch {batch} is not a "
                                f"multiple of {ep}")
    shard_for_tp(spec, tp)  # heads, KV heads and FFN width divide (or InferSimError)
    if pp > 1:
        if tp > 1 or ep > 1:
            raise InferSimError(f"the executor runs pipeline parallelism with --tp 1 --ep 1 only "
                                f"(got --tp {tp} --ep {ep} --pp {pp})")
        if pp > spec.num_layers:
            raise InferSimError(f"--pp {pp} is more stages than {spec.name}'s {spec.num_layers} layers")
    if micro_batches > 1 and pp == 1:
        raise InferSimError("--micro-batches splits the batch between pipeline stages; "
                            "it needs --pp 2 or more")
    if batch % micro_batches:
        raise InferSimError(f"--micro-batches {micro_batches} does not divide batch {batch}")
    workers = (ep if ep > 1 else tp) * pp
    cores = os.cpu_count() or 1
    if workers > cores:
        warnings.warn(f"{workers} worker processes on {cores} cores: they will take turns, and the "
                      "times measure that", stacklevel=3)
    return workers


# --- shared-memory collectives ---------------------------------------------------------


@dataclass(frozen=True)
class GroupPlan:
    """What a worker needs to join the group: the segment, its regions' sizes and the locks."""

    segment: str
    world: int
    stage_devices: int  # ranks per collective group (one pipeline stage)
    reduce_elems: int  # float32 values per all-reduce slot
    a2a_bytes: int  # bytes per all-to-all slot
    p2p_bytes: int  # bytes per point-to-point channel
    channels: tuple[tuple[int, int], ...]  # (from rank, to rank)
    barriers: tuple[Any, ...]  # one per stage
    semaphores: tuple[tuple[Any, Any], ...]  # (empty, full) per channel

    def regions(self) -> dict[str, tuple[int, int]]:
        """Offset and size of each region of the segment; all-reduce and all-to-all regions are
        double-buffered, so one barrier per call suffices (a rank cannot write a buffer again
        before every peer has passed the next call's barrier, i.e. finished reading it)."""
        sizes = {
            "reduce": 2 * self.world * self.reduce_elems * 4,
            "a2a": 2 * self.world * self.world * self.a2a_bytes,
            "a2a_head": 2 * self.world * self.world * 2 * 8,
            "p2p": len(self.channels) * (_HEADER * 8 + self.p2p_bytes),
        }
        offsets, at = {}, 0
        for name, size in sizes.items():
            offsets[name] = (at, size)
            at += -(-size // _ALIGN) * _ALIGN
        return offsets

    @property
    def nbytes(self) -> int:
        return max(sum(-(-size // _ALIGN) * _ALIGN for _, size in self.regions().values()), 1)


class ShmGroup:
    """One rank's view of the shared segment: ``all_reduce``, ``all_to_all``, ``send``, ``recv``.

    Each primitive counts its calls, message bytes and seconds (waits included) until
    ``take_stats``.
    """

    def __init__(self, plan: GroupPlan, rank: int):
        self.plan, self.rank = plan, rank
        self.stage = rank // plan.stage_devices
        self.peers = list(range(self.stage * plan.stage_devices, (self.stage + 1) * plan.stage_devices))
        self.barrier = plan.barriers[self.stage]
        self.shm = SharedMemory(name=plan.segment)
        regions = plan.regions()

        def view(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            offset, _ = regions[name]
            return np.ndarray(shape, dtype, buffer=self.shm.buf, offset=offset)

        world = plan.world
        self._reduce = view("reduce", np.float32, (2, world, plan.reduce_elems))
        self._a2a = view("a2a", np.uint8, (2, world, world, plan.a2a_bytes))
        self._a2a_head = view("a2a_head", np.int64, (2, world, world, 2))
        channel_bytes = _HEADER * 8 + plan.p2p_bytes
        p2p = view("p2p", np.uint8, (len(plan.channels), channel_bytes))
        self._channels = {pair: (p2p[i], plan.semaphores[i]) for i, pair in enumerate(plan.channels)}
        self._turn = {"all_reduce": 0, "all_to_all": 0}
        self.stats: dict[str, list[float]] = {}

    # --- bookkeeping ---

    def _count(self, name: str, nbytes: int, start: float) -> None:
        entry = self.stats.setdefault(name, [0, 0, 0.0])
        entry[0] += 1
        entry[1] += nbytes
        entry[2] += perf_counter() - start

    def take_stats(self) -> dict[str, tuple[int, int, float]]:
        """Calls, bytes and seconds per primitive since the last call."""
        taken = {name: (int(c), int(b), float(s)) for name, (c, b, s) in self.stats.items()}
        self.stats = {}
        return taken

    def _next(self, name: str) -> int:
        turn = self._turn[name]
        self._turn[name] = 1 - turn
        return turn

    def _wait(self) -> None:
        self.barrier.wait(COMM_TIMEOUT_S)

    # --- primitives ---

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """``sum_r x_r`` over the stage's ranks, summed in rank order on every rank."""
        start, n = perf_counter(), x.size
        if n > self.plan.reduce_elems:
            raise ValueError(f"all_reduce of {n} values exceeds the {self.plan.reduce_elems} allocated")
        slots = self._reduce[self._next("all_reduce")]
        slots[self.rank, :n] = x.reshape(-1)
        self._wait()
        out = slots[self.peers[0], :n].copy()
        for peer in self.peers[1:]:
            out += slots[peer, :n]
        self._count("all_reduce", x.nbytes, start)
        return out.reshape(x.shape)

    def all_to_all(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """``chunks[j]`` (float32 ``[rows, cols]``) goes to the stage's ``j``-th rank; returns the
        chunk each rank sent here, in rank order."""
        start = perf_counter()
        turn = self._next("all_to_all")
        data, head = self._a2a[turn], self._a2a_head[turn]
        sent = 0
        for peer, chunk in zip(self.peers, chunks, strict=True):
            chunk = np.ascontiguousarray(chunk, dtype=np.float32)
            if chunk.nbytes > self.plan.a2a_bytes:
                raise ValueError(f"all_to_all chunk of {chunk.nbytes} bytes exceeds the "
                                 f"{self.plan.a2a_bytes} allocated")
            data[self.rank, peer, :chunk.nbytes] = chunk.reshape(-1).view(np.uint8)
            head[self.rank, peer] = chunk.shape
            sent += chunk.nbytes
        self._wait()
        received = []
        for peer in self.peers:
            rows, cols = (int(v) for v in head[peer, self.rank])
            block = data[peer, self.rank, :rows * cols * 4].view(np.float32)
            received.append(block.reshape(rows, cols).copy())
        self._count("all_to_all", sent, start)
        return received

    def send(self, x: np.ndarray, to: int) -> None:
        """Put ``x`` (float32 or int64) in the channel to rank ``to``, once it has been emptied."""
        start = perf_counter()
        buffer, (empty, full) = self._channels[(self.rank, to)]
        if not empty.acquire(timeout=COMM_TIMEOUT_S):
            raise TimeoutError(f"rank {self.rank}: rank {to} did not take the last message")
        x = np.ascontiguousarray(x)
        if x.nbytes > self.plan.p2p_bytes or x.ndim > _HEADER - 3:
            raise ValueError(f"message of {x.nbytes} bytes, shape {x.shape}, does not fit the channel")
        header = buffer[:_HEADER * 8].view(np.int64)
        header[:3 + x.ndim] = [x.nbytes, _DTYPES.index(x.dtype), x.ndim, *x.shape]
        buffer[_HEADER * 8:_HEADER * 8 + x.nbytes] = x.reshape(-1).view(np.uint8)
        full.release()
        self._count("send", x.nbytes, start)

    def recv(self, source: int) -> np.ndarray:
        """The next message from rank ``source`` (waits for it)."""
        start = perf_counter()
        buffer, (empty, full) = self._channels[(source, self.rank)]
        if not full.acquire(timeout=COMM_TIMEOUT_S):
            raise TimeoutError(f"rank {self.rank}: no message from rank {source}")
        header = buffer[:_HEADER * 8].view(np.int64)
        nbytes, dtype, ndim = (int(v) for v in header[:3])
        shape = tuple(int(v) for v in header[3:3 + ndim])
        out = buffer[_HEADER * 8:_HEADER * 8 + nbytes].view(_DTYPES[dtype]).reshape(shape).copy()
        empty.release()
        self._count("recv", nbytes, start)
        return out

    def abort(self) -> None:
        """Break the barriers so peers waiting on this rank fail now instead of at the timeout."""
        for barrier in self.plan.barriers:
            barrier.abort()

    def close(self) -> None:
        # Views into the buffer must go before the mapping can close.
        self._reduce = self._a2a = self._a2a_head = None  # type: ignore[assignment]
        self._channels = {}
        self.shm.close()


# --- shards -------------------------------------------------------------------------------


def _span(count: int, parts: int, index: int) -> tuple[int, int]:
    return index * count // parts, (index + 1) * count // parts


def _tp_mlp(mlp: MLPWeights, gated: bool, tp: int, rank: int) -> MLPWeights:
    """Columns ``[lo, hi)`` of the gate and of the up half, rows ``[lo, hi)`` of ``W_down``."""
    inter = mlp.down.shape[0]
    lo, hi = _span(inter, tp, rank)
    cols = np.arange(lo, hi)
    if gated:
        cols = np.concatenate([cols, inter + cols])
    return MLPWeights(
        up=mlp.up[:, cols], down=mlp.down[lo:hi].copy(),
        up_bias=None if mlp.up_bias is None else mlp.up_bias[cols],
        down_bias=mlp.down_bias if rank == 0 else None,
    )


def _tp_layer(layer: LayerWeights, spec: ModelSpec, tp: int, rank: int) -> LayerWeights:
    heads, kv, d = spec.num_attention_heads, spec.kv_heads, spec.head_size
    q_lo, q_hi = _span(heads, tp, rank)
    kv_lo, kv_hi = _span(kv, tp, rank) if kv >= tp else (rank * kv // tp, rank * kv // tp + 1)
    kv_cols = np.arange(kv_lo * d, kv_hi * d)
    cols = np.concatenate([np.arange(q_lo * d, q_hi * d), heads * d + kv_cols, (heads + kv) * d + kv_cols])
    gated = spec.ffn.gated
    moe = None
    if layer.moe is not None:
        moe = MoEWeights(
            router=layer.moe.router, router_bias=layer.moe.router_bias,
            experts=[_tp_mlp(e, gated, tp, rank) for e in layer.moe.experts],
            shared=None if layer.moe.shared is None else _tp_mlp(layer.moe.shared, gated, tp, rank),
        )
    return LayerWeights(
        input_norm=layer.input_norm, post_attention_norm=layer.post_attention_norm,
        qkv=layer.qkv[:, cols], qkv_bias=None if layer.qkv_bias is None else layer.qkv_bias[cols],
        q_norm=layer.q_norm, k_norm=layer.k_norm,
        o=layer.o[q_lo * d:q_hi * d].copy(), o_bias=layer.o_bias if rank == 0 else None,
        mlp=None if layer.mlp is None else _tp_mlp(layer.mlp, gated, tp, rank), moe=moe,
    )


def _ep_layer(layer: LayerWeights, ep: int, rank: int) -> LayerWeights:
    if layer.moe is None:
        return layer
    lo, hi = _span(len(layer.moe.experts), ep, rank)
    moe = MoEWeights(router=layer.moe.router, experts=layer.moe.experts[lo:hi], shared=layer.moe.shared,
                     router_bias=layer.moe.router_bias)
    return LayerWeights(**{**layer.__dict__, "moe": moe})


def shard_weights(weights: ModelWeights, spec: ModelSpec, tp: int, ep: int, pp: int,
                  rank: int) -> ModelWeights:
    """The parameters rank ``rank`` of the plan holds, copied out of ``weights`` (which can then go)."""
    stage_devices = ep if ep > 1 else tp
    stage, local = divmod(rank, stage_devices)
    first, end = stage_layers(spec.num_layers, pp)[stage]
    layers = weights.layers[first:end]
    if tp > 1:
        layers = [_tp_layer(layer, spec, tp, local) for layer in layers]
    if ep > 1:
        layers = [_ep_layer(layer, ep, local) for layer in layers]
    h, tied = spec.hidden_size, spec.tie_word_embeddings
    is_first, is_last = stage == 0, stage == pp - 1
    # Stages that do not embed or project onto the vocabulary keep an empty placeholder.
    embedding = weights.embedding if is_first or (is_last and tied) else np.empty((0, h), np.float32)
    lm_head = weights.lm_head if is_last and not tied else np.empty((h, 0), np.float32)
    shard = ModelWeights(embedding=embedding, layers=layers, final_norm=weights.final_norm, lm_head=lm_head,
                         position_embedding=weights.position_embedding if is_first else None)
    shard.arrays = _arrays(shard) + ([] if tied else [lm_head])
    return shard


class ShardRuntime(Transformer):
    """A ``Transformer`` over one rank's shard: TP all-reduces in ``reduce``, EP all-to-alls in ``_moe``."""

    def __init__(self, spec: ModelSpec, weights: ModelWeights, group: ShmGroup, tp: int, ep: int):
        super().__init__(shard_for_tp(spec, tp), make_backend("numpy"), weights)
        self.group, self.tp, self.ep = group, tp, ep

    def reduce(self, partial: Any) -> Any:
        if self.tp == 1:
            return partial
        return self.profiler("all_reduce", self.group.all_reduce, partial)

    def _moe(self, h: Any, moe: MoEWeights, index: int) -> Any:
        if self.ep == 1:
            return super()._moe(h, moe, index)
        k, ops, spec = self.profiler, self.ops, self.spec.moe
        assert spec is not None
        local = len(moe.experts)
        logits = k("router", ops.linear, h, moe.router, moe.router_bias)
        experts, gates = k("topk_gate", ops.route, logits, spec.top_k)
        chunks, token_rows = k("moe_permute", _pack_by_owner, h, experts, gates, local, self.ep)
        received = k("all_to_all", self.group.all_to_all, chunks)
        incoming = np.concatenate(received)
        width = h.shape[1]
        rows = np.ascontiguousarray(incoming[:, :width])
        expert_ids = incoming[:, width].astype(np.int64)[:, None]
        groups = k("moe_permute", ops.group_by_expert, expert_ids, incoming[:, width + 1:], local)
        out = k("expert_combine", ops.zeros_like, rows)
        for expert, group in zip(moe.experts, groups, strict=True):
            if group is None:
                continue
            picked, expert_gates = group
            y = self._mlp(k("experts_gather", ops.take_rows, rows, picked), expert, EXPERT_NAMES)
            k("expert_combine", ops.scatter_add_rows, out, picked, y, expert_gates)
        bounds = np.cumsum([len(chunk) for chunk in received])[:-1]
        back = k("all_to_all", self.group.all_to_all, np.split(out, bounds))
        combined = k("expert_combine", _sum_by_token, h, token_rows, back)
        if moe.shared is not None:
            k("expert_combine", ops.add_, combined, self._mlp(h, moe.shared, SHARED_NAMES))
        return combined


def _pack_by_owner(h: np.ndarray, experts: np.ndarray, gates: np.ndarray, local: int,
                   ep: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per owning rank: rows ``[h | expert index on the owner | gate]`` of the (token, choice)
    pairs routed to its experts, and the tokens they came from."""
    owner = experts // local
    chunks, token_rows = [], []
    for rank in range(ep):
        tokens, choice = np.nonzero(owner == rank)
        packed = np.empty((len(tokens), h.shape[1] + 2), np.float32)
        packed[:, :-2] = h[tokens]
        packed[:, -2] = experts[tokens, choice] - rank * local
        packed[:, -1] = gates[tokens, choice]
        chunks.append(packed)
        token_rows.append(tokens)
    return chunks, token_rows


def _sum_by_token(h: np.ndarray, token_rows: list[np.ndarray], back: list[np.ndarray]) -> np.ndarray:
    """``y[t] = sum`` of the gated expert rows that came back for token ``t``."""
    out = np.zeros_like(h)
    for tokens, rows in zip(token_rows, back, strict=True):
        np.add.at(out, tokens, rows)  # a token may send two choices to one owner
    return out


# --- workers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    spec: ModelSpec
    batch: int
    input_len: int
    output_len: int
    repeats: int
    warmup: int
    seed: int
    tp: int
    ep: int
    pp: int
    micro_batches: int
    group: GroupPlan


def _pipeline_generate(runtime: Transformer, group: ShmGroup, job: _Job, prompt: np.ndarray,
                       caches: list[KVCache]) -> Generation:
    """One greedy generation as pipeline stage ``group.stage`` runs it (GPipe order per step)."""
    k, ops, stage, last = runtime.profiler, runtime.ops, group.stage, job.pp - 1
    per = job.batch // job.micro_batches
    ids, start, length = prompt, 0, job.input_len
    tokens, steps = [], []
    begin = perf_counter()
    for index in range(job.output_len):
        k.reset()
        step_start = perf_counter()
        for j, cache in enumerate(caches):
            if stage == 0:
                x = runtime.embed(ids[j * per:(j + 1) * per], start)
            else:
                x = k("recv", group.recv, stage - 1)
            x = runtime.run_layers(x, per, start, cache)
            if stage < last:
                k("send", group.send, x, stage + 1)
            else:
                k("send", group.send, k("sampling", ops.argmax, runtime.head(x, per)), 0)
        if stage == 0:
            ids = np.concatenate([k("recv", group.recv, last) for _ in caches])[:, None]
            tokens.append(ids[:, 0])
        wall = perf_counter() - step_start
        steps.append(StepRecord(
            phase="prefill" if index == 0 else "decode", wall_s=wall, kernel_s=k.kernel_s,
            kernels=k.kernels, ops={name: (t.count, t.time_s) for name, t in k.ops.items()},
            collectives=group.take_stats(),
        ))
        start += length
        length = 1
    e2e = perf_counter() - begin
    held = np.stack(tokens, axis=1) if tokens else np.empty((0, job.output_len), np.int64)
    return Generation(held, steps, e2e)


def _run_worker(job: _Job, rank: int, group: ShmGroup) -> dict[str, Any]:
    spec = job.spec
    weights = shard_weights(init_weights(spec, job.seed), spec, job.tp, job.ep, job.pp, rank)
    runtime = ShardRuntime(spec, weights, group, job.tp, job.ep)
    del weights
    prompt = prompt_tokens(spec.vocab_size, job.batch, job.input_len, job.seed)
    max_len = job.input_len + job.output_len - 1
    if job.pp == 1:
        rows = job.batch // job.ep
        if job.ep > 1:  # attention is data-parallel: this rank's sequences
            prompt = prompt[rank * rows:(rank + 1) * rows]
        cache = runtime.new_cache(rows, max_len)
        caches = [cache]

        def run() -> Generation:
            return generate(runtime, prompt, job.output_len, cache, group.take_stats)
    else:
        per = job.batch // job.micro_batches
        caches = [runtime.new_cache(per, max_len) for _ in range(job.micro_batches)]

        def run() -> Generation:
            return _pipeline_generate(runtime, group, job, prompt, caches)

    memory = measure_memory(runtime.ops, runtime.weight_bytes, sum(c.nbytes() for c in caches), run)
    for _ in range(job.warmup - 1):
        run()
    cpu_before, load_before = machine.cpu_times(), os.getloadavg()[0]
    runs = [run() for _ in range(job.repeats)]
    report: dict[str, Any] = {"tokens": [r.tokens for r in runs], "memory": memory}
    if rank == 0:
        report["contention"] = machine.contention(cpu_before, load_before)
        report["runs"] = runs
        report["machine"] = machine.machine_info("numpy", "cpu")
    return report


def _worker(job: _Job, rank: int, conn: Connection) -> None:
    """A worker process's main: run the job as ``rank``, send back ``("ok", report)`` or
    ``("error", traceback)``."""
    group = None
    try:
        group = ShmGroup(job.group, rank)
        conn.send(("ok", _run_worker(job, rank, group)))
    except BaseException:
        if group is not None:
            group.abort()
        conn.send(("error", traceback.format_exc()))
    finally:
        if group is not None:
            try:
                group.close()
            except BufferError:  # a view still alive; the mapping goes with the process
                pass
        conn.close()


def _collect(conns: list[Connection]) -> list[dict[str, Any]]:
    """Every worker's report, blocking until each has sent one; a worker's failure as an
    ``InferSimError`` with its traceback (a root cause before the peers' broken barriers)."""
    pending = {conn: rank for rank, conn in enumerate(conns)}
    reports: dict[int, dict[str, Any]] = {}
    errors: list[tuple[int, str]] = []
    while pending:
        ready = wait(list(pending), timeout=5.0 if errors else None)
        if not ready:
            break  # after a failure, the peers that have not answered are stuck: stop waiting
        for conn in ready:
            rank = pending.pop(conn)  # type: ignore[call-overload]
            try:
                status, payload = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                errors.append((rank, "the process exited without a result (killed, or out of memory?)"))
                continue
            if status == "ok":
                reports[rank] = payload
            else:
                errors.append((rank, payload))
    if errors:
        rank, text = next(((r, t) for r, t in errors if "BrokenBarrierError" not in t), errors[0])
        raise InferSimError(f"parallel worker {rank} failed:\n{text.rstrip()}")
    return [reports[rank] for rank in range(len(conns))]


def _spawn(ctx: Any, target: Any, args: list[tuple[Any, ...]], procs: list[Any],
           conns: list[Connection]) -> None:
    """Start one worker per ``args`` entry (``target(*args[i], conn)``) with one BLAS thread each,
    the parent's environment restored after; each appends to ``procs`` and ``conns`` as it starts,
    so the caller's ``_stop`` reaches whatever started."""
    saved = {name: os.environ.get(name) for name in THREAD_VARS}
    os.environ.update({name: "1" for name in THREAD_VARS})
    try:
        for rank, rank_args in enumerate(args):
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=target, args=(*rank_args, sender), name=f"infersim-rank{rank}",
                               daemon=True)
            procs.append(proc)
            conns.append(receiver)
            proc.start()
            sender.close()  # the child holds the write end: its exit reads as EOF here
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop(procs: list[Any], conns: list[Connection]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        if proc.pid is not None:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    for conn in conns:
        conn.close()


def group_plan(ctx: Any, spec: ModelSpec, batch: int, input_len: int, tp: int, ep: int, pp: int,
                micro_batches: int) -> GroupPlan:
    """Regions sized for the run's largest messages (the prefill's), and the locks."""
    h = spec.hidden_size
    stage_devices = ep if ep > 1 else tp
    world = stage_devices * pp
    reduce_elems = batch * input_len * h if tp > 1 else 0
    a2a_bytes = 0
    if ep > 1:
        assert spec.moe is not None
        # Worst case: every (token, choice) pair of a rank's prefill goes to one owner.
        a2a_bytes = batch // ep * input_len * spec.moe.top_k * (h + 2) * 4
    p2p_bytes, channels = 0, ()
    if pp > 1:
        p2p_bytes = batch // micro_batches * input_len * h * 4
        channels = tuple((s, s + 1) for s in range(pp - 1)) + ((pp - 1, 0),)
    return GroupPlan(
        segment=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", world=world,
        stage_devices=stage_devices, reduce_elems=reduce_elems, a2a_bytes=-(-a2a_bytes // _ALIGN) * _ALIGN,
        p2p_bytes=p2p_bytes, channels=channels,
        barriers=tuple(ctx.Barrier(stage_devices) for _ in range(pp)),
        semaphores=tuple((ctx.Semaphore(1), ctx.Semaphore(0)) for _ in channels),
    )


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def _collectives_summary(runs: list[Generation]) -> dict[str, Any]:
    """Per phase: median over the timed steps of the seconds in collectives, and of each
    collective's calls, bytes and seconds."""
    summary: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        steps = [s for run in runs for s in run.steps if s.phase == phase]
        names = sorted({name for s in steps for name in s.collectives})
        summary[phase] = {
            "comm_s_per_step": _median([sum(c[2] for c in s.collectives.values()) for s in steps]),
            "collectives": {name: {
                "calls": _median([s.collectives.get(name, (0, 0, 0.0))[0] for s in steps]),
                "bytes": _median([s.collectives.get(name, (0, 0, 0.0))[1] for s in steps]),
                "time_s": _median([s.collectives.get(name, (0, 0, 0.0))[2] for s in steps]),
            } for name in names},
        }
    return summary


def execute_parallel(
    model: str | ModelSpec,
    batch: int,
    input_len: int,
    output_len: int,
    tp: int = 1,
    ep: int = 1,
    pp: int = 1,
    micro_batches: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    dtype: str = "float32",
) -> ExecutionResult:
    """``execute`` with the model split over ``(ep if ep > 1 else tp) * pp`` worker processes.

    The result's ``parallel`` holds the degrees, the worker count, each stage's layers and,
    per phase, rank 0's median seconds per step in collectives and each collective's calls,
    bytes and seconds per step.
    """
    from dataclasses import replace

    from simulator.specs.loader import load_model

    spec = model if isinstance(model, ModelSpec) else load_model(model)
    check_supported(spec)
    check_shape(spec, batch, input_len, output_len, repeats)
    backend = make_backend("numpy", "cpu", dtype)
    workers = check_plan(spec, batch, tp, ep, pp, micro_batches)
    # Each worker draws the whole model before keeping its shard.
    check_fits(spec, backend, batch, input_len, output_len, extra_bytes=(workers - 1) * spec.params() * 4)
    ctx = multiprocessing.get_context("spawn")
    plan = group_plan(ctx, spec, batch, input_len, tp, ep, pp, micro_batches)
    job = _Job(spec, batch, input_len, output_len, repeats, max(warmup, 1), seed, tp, ep, pp,
               micro_batches, plan)
    segment = SharedMemory(name=plan.segment, create=True, size=plan.nbytes)
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        _spawn(ctx, _worker, [(job, rank) for rank in range(workers)], procs, conns)
        reports = _collect(conns)
    finally:
        _stop(procs, conns)
        segment.close()
        segment.unlink()
    first = reports[0]
    runs: list[Generation] = first["runs"]
    if ep > 1:  # each expert rank ran its own slice of the batch
        runs = [Generation(np.concatenate([r["tokens"][i] for r in reports]), run.steps, run.e2e_s)
                for i, run in enumerate(runs)]
    result = summarize(spec, backend, input_len, seed, first["memory"], runs, first["contention"],
                       first["machine"])
    parallel = {
        "tp": tp, "ep": ep, "pp": pp, "micro_batches": micro_batches, "workers": workers,
        "stage_layers": [list(bounds) for bounds in stage_layers(spec.num_layers, pp)],
        **_collectives_summary(runs),
        "peak_memory_bytes_per_worker": [r["memory"].peak_bytes for r in reports],
        "shared_memory_bytes": plan.nbytes,
    }
    return replace(result, parallel=parallel)


# --- the collectives alone, for calibration ---------------------------------------------------

BENCH_SIZES = (4096, 65536, 1 << 20, 4 << 20, 16 << 20)


def _bench_worker(plan: GroupPlan, rank: int, sizes: tuple[int, ...], rounds: int,
                  conn: Connection) -> None:  # pragma: no cover - runs in a worker process
    group = ShmGroup(plan, rank)
    try:
        world, peer = plan.world, 1 - rank
        times: dict[str, dict[int, float]] = {"all_reduce": {}, "all_to_all": {}, "send_recv": {}}
        for nbytes in sizes:
            x = np.ones(nbytes // 4, np.float32)
            chunks = [np.ones((nbytes // (4 * world * 64), 64), np.float32) for _ in range(world)]
            for name, call in (("all_reduce", lambda: group.all_reduce(x)),
                               ("all_to_all", lambda: group.all_to_all(chunks))):
                samples = []
                for _ in range(rounds):
                    group._wait()  # start together: the time is the collective's, not a straggler's
                    start = perf_counter()
                    call()
                    samples.append(perf_counter() - start)
                times[name][nbytes] = statistics.median(samples)
            samples = []
            for _ in range(rounds):  # ping-pong: half a round trip is one send and its receive
                group._wait()
                start = perf_counter()
                if rank == 0:
                    group.send(x, peer)
                    group.recv(peer)
                else:
                    group.send(group.recv(peer), peer)
                samples.append((perf_counter() - start) / 2)
            times["send_recv"][nbytes] = statistics.median(samples)
        conn.send(("ok", times))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        group.close()
        conn.close()


def bench_collectives(sizes: tuple[int, ...] = BENCH_SIZES,
                      rounds: int = 21) -> dict[str, list[dict[str, float]]]:
    """Time the executor's shared-memory all-reduce, all-to-all and send/recv between two workers
    (one BLAS thread each), per message size in bytes (all-to-all: bytes each rank sends in all).
    Rank 0's medians, each call started together after a barrier."""
    ctx = multiprocessing.get_context("spawn")
    largest = max(sizes)
    plan = GroupPlan(
        segment=f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}", world=2, stage_devices=2,
        reduce_elems=largest // 4, a2a_bytes=-(-largest // _ALIGN) * _ALIGN, p2p_bytes=largest,
        channels=((0, 1), (1, 0)), barriers=(ctx.Barrier(2),),
        semaphores=((ctx.Semaphore(1), ctx.Semaphore(0)), (ctx.Semaphore(1), ctx.Semaphore(0))))
    shm = SharedMemory(name=plan.segment, create=True, size=plan.nbytes)
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        _spawn(ctx, _bench_worker, [(plan, rank, sizes, rounds) for rank in range(2)], procs, conns)
        status, payload = conns[0].recv()
        conns[1].recv()
        if status != "ok":
            raise InferSimError(f"collective benchmark failed:\n{payload}")
    finally:
        _stop(procs, conns)
        shm.close()
        shm.unlink()
    return {name: [{"bytes": n, "seconds": s} for n, s in sorted(rows.items())]
            for name, rows in payload.items()}


def _gemm_worker(ready: Any, quick: bool, conn: Connection) -> None:  # pragma: no cover - a worker
    """The calibration's GEMMs, every point started together with the other workers."""
    from simulator.calibrate.host import Points, bench_gemms, machine

    try:
        points = Points()
        bench_gemms(points, machine(), quick, before=lambda: ready.wait(COMM_TIMEOUT_S))
        conn.send(("ok", points.raw))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def bench_worker_gemms(concurrent: int, quick: bool = False) -> list[dict[str, Any]]:
    """The calibration's GEMMs timed inside a worker process (one BLAS thread), with
    ``concurrent`` such workers running them at once, as a parallel plan's workers do; rank 0's
    raw points (``simulator.calibrate.host.Points.raw``)."""
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(concurrent)
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        _spawn(ctx, _gemm_worker, [(ready, quick)] * concurrent, procs, conns)
        reports = [conn.recv() for conn in conns]
    finally:
        _stop(procs, conns)
    for status, payload in reports:
        if status != "ok":
            raise InferSimError(f"worker GEMM benchmark failed:\n{payload}")
    return reports[0][1]
