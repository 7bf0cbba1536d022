"""The cost of one serving iteration: a mixed batch of prefill chunks and decode tokens.

A mixed batch is not one big prefill. Its ops split three ways:

- **token ops** (projections, MLP or experts, norms, RoPE, KV-cache writes, residual adds,
  embedding) see the iteration's ``T`` new tokens together: one op graph per ``T``, costed for
  every ``T`` up to the largest iteration at once (the graph takes arrays), then looked up;
- **attention** (and whatever reads the cache: dequantization, XQuant's recomputation) is per
  request over its own context: a decode token attends to its context ``c``, a prefill chunk of
  ``n`` tokens starting at ``s`` to ``s + n`` keys. Each request's FLOPs and bytes come from the
  same graph (decode ones from a table over ``c``, prefill chunks from a cache by ``(n, s)``);
  FlashAttention-style kernels take the whole batch in one launch (the op costed on the summed
  FLOPs and bytes); eager attention (``attention="naive"``, the executor) launches per request;
- **the head** (final norm, LM head, sampling) runs for the requests that emit a token.

``time = token(T) + attention(requests) + head(emitting) + step_overhead``; energy likewise.
Under a parallel plan the three parts' op costs go through the plan's step time (collectives,
pipeline stages) as a single step would.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.cost.roofline import OpCost, cost_op, cost_ops
from simulator.errors import InferSimError
from simulator.graph.ops import Op, with_intervals
from simulator.graph.transformer import AttentionImpl, Precision, StepShape, build_step
from simulator.specs.hardware import Device, System
from simulator.specs.model import ModelSpec
from simulator.strategies.offload import NON_LAYER_OPS
from simulator.strategies.parallel import LAST_STAGE_OPS, ParallelPlan
from simulator.strategies.parallel import step_time as parallel_step_time

ATTENTION_OPS = frozenset({"attention", "attention_scores", "attention_softmax", "attention_values",
                           "kv_unpack", "kv_dequantize", "kv_recompute", "kv_recompute_rope",
                           "kv_up_proj"})
HEAD_OPS = LAST_STAGE_OPS
_FIELDS = ("flops", "read_bytes", "write_bytes", "weight_bytes", "kv_read_bytes", "kv_write_bytes")


def power_capped(device: Device, cap_w: float) -> Device:
    """The device under a power cap (POLCA): the clock drops to the ratio ``s`` at which running
    flat out draws the cap, ``s = ((cap - idle) / (max - idle))^(1/3)`` (dynamic power goes as
    frequency times voltage squared, voltage with frequency); compute peaks scale by ``s``,
    energy per FLOP by ``s^2``; memory bandwidth is unchanged, so memory-bound decode slows
    little and compute-bound prefill by up to ``1/s``."""
    power = device.power
    if cap_w >= power.max:
        return device
    if cap_w <= power.idle:
        raise InferSimError(f"power cap {cap_w:g} W is at or below {device.name}'s idle power "
                            f"({power.idle:g} W); a cap must lie between idle and max ({power.max:g} W)")
    s = ((cap_w - power.idle) / (power.max - power.idle)) ** (1.0 / 3.0)
    # A derived energy per FLOP, compute_share * (max - idle) / peak, already scales by
    # s^3 / s = s^2 through the lowered max and peak; only an explicit one needs scaling. Memory
    # does not slow with the cores: its energy per byte is pinned at the uncapped value (derived
    # from max - idle, it would otherwise fall by s^3 with the lowered max).
    per_byte = (power.energy_per_byte if power.energy_per_byte is not None
                else power.memory_share * (power.max - power.idle) / device.main_memory.bandwidth)
    new_power = power.model_copy(update={
        "max": cap_w,
        "energy_per_flop": None if power.energy_per_flop is None else power.energy_per_flop * s**2,
        "energy_per_byte": per_byte,
    })
    return device.model_copy(update={
        "compute": {dtype: rate * s for dtype, rate in device.compute.items()},
        "clock": None if device.clock is None else device.clock * s,
        "power": new_power,
    })


@dataclass
class _Table:
    """One op's fields as arrays over a size (tokens, context or requests)."""

    template: Op
    rows: np.ndarray
    """One row per size: the ``_FIELDS`` and the GEMM's rows (0 for other ops)."""


def _tables(ops: list[Op], names: frozenset[str], size: int) -> dict[str, _Table]:
    out = {}
    for op in ops:
        if op.name not in names:
            continue
        columns = [getattr(op, f) for f in _FIELDS] + [op.shape[0] if op.shape is not None else 0.0]
        rows = np.stack([np.broadcast_to(np.asarray(c, dtype=float), (size,)) for c in columns], 1)
        out[op.name] = _Table(op, np.ascontiguousarray(rows))
    return out


def _op_from(template: Op, values: Any) -> Op:
    """``template`` with its fields (and a GEMM's rows) replaced by ``values`` (in ``_FIELDS``
    order, rows last): scalars for one launch, arrays for one launch per request."""
    shape = None if template.shape is None else (values[-1], template.shape[1], template.shape[2])
    # The constructor, not ``dataclasses.replace``: this runs once per iteration.
    return Op(name=template.name, kind=template.kind, dtype=template.dtype, count=template.count,
              unit=template.unit, groups=template.groups, single_groups=template.single_groups,
              transposed_weight=template.transposed_weight, interval_bytes=template.interval_bytes,
              shape=shape, flops=values[0], read_bytes=values[1], write_bytes=values[2],
              weight_bytes=values[3], kv_read_bytes=values[4], kv_write_bytes=values[5])


class ReplicaCost:
    """Iteration costs of one replica (a model on a system, with a precision and a plan).

    ``max_tokens``: the most new tokens one iteration may carry; ``max_context``: the longest
    context a request may reach. Both size the precomputed tables.
    """

    def __init__(self, model: ModelSpec, system: System, precision: Precision,
                 attention: AttentionImpl = "flash", parallel: ParallelPlan | None = None,
                 max_tokens: int = 8192, max_context: int = 8192, step_overhead_s: float = 0.0):
        self.model, self.system, self.precision, self.attention = model, system, precision, attention
        self.plan = parallel if parallel is not None and parallel.active else None
        if self.plan is not None and self.plan.ep > 1:
            raise InferSimError("the serving engine runs tensor and pipeline parallel replicas "
                                "(--tp, --pp, and --dp for more replicas); expert parallelism is not "
                                "modelled per iteration yet")
        self.device_model = self.plan.device_model(model) if self.plan is not None else model
        self.device = system.device
        self.step_overhead_s = step_overhead_s
        self.per_request = attention == "naive"
        self.max_tokens, self.max_context = int(max_tokens), int(max_context)
        # Token ops by the phase whose graph has them: most are the same in both (they see all
        # the iteration's tokens); a few exist in one phase only (MLA's absorbed projections in
        # decode) and see that phase's tokens.
        prefill = self._costs_over_tokens(self.max_tokens, "prefill")
        decode = self._costs_over_tokens(self.max_tokens, "decode")
        self._token_costs = {"both": {k: c for k, c in prefill.items() if k in decode},
                             "prefill": {k: c for k, c in prefill.items() if k not in decode},
                             "decode": {k: c for k, c in decode.items() if k not in prefill}}
        self._token_time = {k: _total(v, "total_s", self.max_tokens) for k, v in self._token_costs.items()}
        self._token_energy = {k: _total(v, "total_energy_j", self.max_tokens)
                              for k, v in self._token_costs.items()}
        # Under a one-stage plan the step is its layers' time with the collectives partly hidden
        # under them, plus the ops outside the layers (embedding, head): kept apart for that.
        self._token_outside = {k: (_total({n: c for n, c in v.items() if c.op.name in NON_LAYER_OPS},
                                          "total_s", self.max_tokens),
                                   _total({n: c for n, c in v.items() if c.op.name in NON_LAYER_OPS},
                                          "total_energy_j", self.max_tokens))
                               for k, v in self._token_costs.items()}
        # The same sums as rows of Python floats by count (one iteration looks up three of them).
        self._token_rows = {k: np.stack([self._token_time[k], self._token_energy[k],
                                         self._token_outside[k][0]], 1).tolist()
                            for k in self._token_costs}
        self._plan_fast = (self.plan is not None and self.plan.pp == 1 and self.plan.micro == 1
                           and not self.plan.sequence_parallel)
        self._communication: dict[int, float] = {}
        self._head_cache: dict[int, list[OpCost]] = {}
        self._head_sums: dict[int, tuple[float, float]] = {}
        contexts = np.arange(1, self.max_context + 1, dtype=float)
        decode_ops = self._build(StepShape("decode", 1, 1, contexts))
        self._decode = _tables(decode_ops, ATTENTION_OPS, self.max_context)
        self._decode_affine = _affine(self._decode, contexts)
        self._prefill_cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._prefill_coef = self._fit_prefill()
        # Every op that reads the cache in either phase (MLA's up-projection of the latent runs in
        # prefill only; XQuant's recomputation in decode only), with an op to copy its kind from.
        self._templates = {op.name: op for op in self._build(StepShape("prefill", 1, 1, 1.0))
                           if op.name in ATTENTION_OPS}
        self._templates.update({name: table.template for name, table in self._decode.items()})
        # Templates serve any size: one interval between runs, their sizes' mean.
        self._templates = {name: dataclasses.replace(op, interval_bytes=float(np.mean(op.interval_bytes)))
                           for name, op in self._templates.items()}
        self._attention_names = tuple(self._templates)

    # --- tables -------------------------------------------------------------------------

    def _build(self, shape: StepShape) -> list[Op]:
        ops = build_step(self.device_model, shape, self.precision, self.attention)
        return with_intervals(ops) if self.device.efficiency.volumes else ops

    def _costs_over_tokens(self, max_tokens: int, phase: str) -> dict[str, OpCost]:
        tokens = np.arange(1, max_tokens + 1, dtype=float)
        shape = (StepShape("prefill", 1, tokens, tokens) if phase == "prefill"  # type: ignore[arg-type]
                 else StepShape("decode", tokens, 1, 1.0))  # type: ignore[arg-type]
        costs: dict[str, OpCost] = {}
        seen: dict[str, int] = {}
        for op in self._build(shape):
            if op.name in ATTENTION_OPS or op.name in HEAD_OPS:
                continue
            # Ops of one name (the two residual adds of a layer) by their order among that name, so
            # that the same op carries the same key in both phases' graphs.
            seen[op.name] = seen.get(op.name, 0) + 1
            name = op.name if seen[op.name] == 1 else f"{op.name}#{seen[op.name]}"
            costs[name] = _broadcast(cost_op(op, self.device), max_tokens)
        return costs

    def _fit_prefill(self) -> dict[str, np.ndarray] | None:
        """Coefficients giving each attention op's fields (and GEMM rows) as a linear function of
        a prefill chunk's features (``_features``), fitted on sample chunks of the graph itself
        and kept only if exact there; ``None`` (per-chunk graphs) otherwise."""
        new, start = np.meshgrid([1, 2, 3, 7, 16, 61, 128, 300, 1000], [0, 1, 5, 17, 100, 999, 2500])
        new, start = new.ravel().astype(float), start.ravel().astype(float)
        ops = self._build(StepShape("prefill", 1, new, start + new))  # type: ignore[arg-type]
        features = self._features(new, start)
        coef = {}
        for op in ops:
            if op.name not in ATTENTION_OPS:
                continue
            rows = op.shape[0] if op.shape is not None else 0.0
            columns = [getattr(op, f) for f in _FIELDS] + [rows]
            values = np.stack([np.broadcast_to(np.asarray(c, dtype=float), new.shape) for c in columns], 1)
            solution = np.linalg.lstsq(features, values, rcond=None)[0]
            if not np.allclose(features @ solution, values, rtol=1e-9, atol=1e-6):
                return None
            coef[op.name] = solution
        return coef

    def _features(self, new: Any, start: Any) -> np.ndarray:
        """A prefill chunk's features (of ``new`` tokens from ``start``; a row per chunk when
        arrays, one row when scalars)."""
        context = start + new
        window = self.device_model.sliding_window
        shape = StepShape("prefill", 1, new, context)  # type: ignore[arg-type]
        keys = context if window is None else np.minimum(context, window + new - 1)
        if isinstance(new, float):  # one chunk: Python floats are cheaper than numpy scalars
            return np.array([1.0, new, context, keys, min(keys, self.precision.kv_residual),
                             shape.attended_pairs(True, window), new * context])
        return np.array([np.ones_like(new), new, context, keys, np.minimum(keys, self.precision.kv_residual),
                         shape.attended_pairs(True, window), new * context]).T

    def _prefill_parts(self, new: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
        """Each attention op's fields (rows: chunks; columns: ``_FIELDS`` and GEMM rows)."""
        if self._prefill_coef is not None:
            features = self._features(new.astype(float), start.astype(float))
            return {name: features @ coef for name, coef in self._prefill_coef.items()}
        out: dict[str, list[np.ndarray]] = {}
        for n, s in zip(new.tolist(), start.tolist(), strict=True):
            key = (n, s)
            cached = self._prefill_cache.get(key)
            if cached is None:
                ops = self._build(StepShape("prefill", 1, n, float(s + n)))
                cached = {op.name: np.array([float(getattr(op, f)) for f in _FIELDS]
                                            + [float(op.shape[0]) if op.shape is not None else 0.0])
                          for op in ops if op.name in ATTENTION_OPS}
                self._prefill_cache[key] = cached
            for name, row in cached.items():
                out.setdefault(name, []).append(row)
        return {name: np.array(rows) for name, rows in out.items()}

    def _head(self, emitting: int) -> list[OpCost]:
        costs = self._head_cache.get(emitting)
        if costs is None:
            ops = self._build(StepShape("decode", emitting, 1, 1.0))
            costs = cost_ops([op for op in ops if op.name in HEAD_OPS], self.device)
            self._head_cache[emitting] = costs
        return costs

    def _head_sum(self, emitting: int) -> tuple[float, float]:
        """(seconds, joules) of the head ops for ``emitting`` positions."""
        total = self._head_sums.get(emitting)
        if total is None:
            costs = self._head(emitting)
            total = (float(sum(float(c.total_s) for c in costs)),
                     float(sum(float(c.total_energy_j) for c in costs)))
            self._head_sums[emitting] = total
        return total

    def _token_sum(self, tokens: int, decoding: int) -> tuple[float, float, float]:
        """(seconds, joules, seconds outside the layers) of the token ops of an iteration of
        ``tokens`` new tokens, ``decoding`` of them decode tokens."""
        rows = self._token_rows
        time_s, energy, outside_s = rows["both"][tokens - 1]
        if tokens > decoding:
            t, e, o = rows["prefill"][tokens - decoding - 1]
            time_s, energy, outside_s = time_s + t, energy + e, outside_s + o
        if decoding:
            t, e, o = rows["decode"][decoding - 1]
            time_s, energy, outside_s = time_s + t, energy + e, outside_s + o
        return time_s, energy, outside_s

    # --- one iteration ------------------------------------------------------------------

    def iteration(self, prefill_new: np.ndarray, prefill_start: np.ndarray, decode_context: np.ndarray,
                  emitting: int, verify: int = 0) -> tuple[float, float]:
        """(seconds, joules) of one iteration: prefill chunks of ``prefill_new`` tokens starting at
        ``prefill_start``, one token for each decode request at its ``decode_context`` (the keys
        it attends, its own token included), and ``emitting`` positions sampling a token.

        ``verify > 0``: speculative verification; each decode request runs ``verify`` positions
        (its last token and the drafted ones) as a chunk starting at ``decode_context - 1``."""
        decode_context = np.asarray(decode_context, dtype=np.int64)
        if verify and len(decode_context):
            prefill_new = np.concatenate([np.asarray(prefill_new, dtype=np.int64),
                                          np.full(len(decode_context), verify, dtype=np.int64)])
            prefill_start = np.concatenate([np.asarray(prefill_start, dtype=np.int64), decode_context - 1])
            decode_context = np.zeros(0, dtype=np.int64)
        tokens = int(np.asarray(prefill_new).sum()) + len(decode_context)
        if tokens == 0:
            return 0.0, 0.0
        if tokens > self.max_tokens:
            raise InferSimError(f"an iteration of {tokens} tokens exceeds the engine's table of "
                                f"{self.max_tokens}; raise max_tokens (--max-batch-tokens)")
        if len(decode_context) and decode_context.max() > self.max_context:
            raise InferSimError(f"a context of {decode_context.max()} tokens exceeds the engine's "
                                f"table of {self.max_context}")
        attention = self._attention_costs(prefill_new, prefill_start, decode_context)
        if self.plan is None or self._plan_fast:
            time_s, energy, outside_s = self._token_sum(tokens, len(decode_context))
            for cost in attention:
                if self.per_request:  # one launch per request: arrays
                    time_s += float(np.sum(cost.time_s)) * cost.op.count
                    energy += float(np.sum(cost.energy_j)) * cost.op.count
                else:
                    time_s += float(cost.time_s) * cost.op.count
                    energy += float(cost.energy_j) * cost.op.count
            if emitting:
                head_s, head_j = self._head_sum(emitting)
                time_s, energy, outside_s = time_s + head_s, energy + head_j, outside_s + head_s
            if self.plan is None:
                return time_s + self.step_overhead_s, energy + self.step_overhead_s * self.device.power.idle
            return self._one_stage(tokens, time_s - outside_s, outside_s, energy)
        head = self._head(emitting) if emitting else []
        counts = {"both": tokens, "prefill": tokens - len(decode_context), "decode": len(decode_context)}
        costs = [_at(cost, count - 1) for part, count in counts.items() if count
                 for cost in self._token_costs[part].values()]
        costs += [_summed(cost) for cost in attention] + head
        step = parallel_step_time(self.plan, self.system, self.model, tokens, self.precision.act_bytes,
                                  costs, "prefill" if len(prefill_new) else "decode")
        return (step.time_s + self.step_overhead_s,
                step.energy_j + self.step_overhead_s * self.device.power.idle * self.plan.devices)

    def _one_stage(self, tokens: Any, layer_s: Any, outside_s: Any, energy: Any) -> tuple[Any, Any]:
        """A tensor-parallel step without pipeline stages (``parallel.step_time`` with one stage and
        one micro-batch): the layers, their collectives hidden by the plan's overlap, the ops
        outside the layers; idle devices draw idle power while communication is exposed.
        ``tokens``: the step's, or an array of each step's."""
        assert self.plan is not None
        if np.ndim(tokens):
            distinct, which = np.unique(tokens, return_inverse=True)
            comm = np.array([self._communication_s(int(t)) for t in distinct])[which]
        else:
            comm = self._communication_s(tokens)
        time_s = layer_s + outside_s + comm - self.plan.overlap * np.minimum(comm, layer_s)
        exposed = np.maximum(0.0, time_s - layer_s - outside_s)
        joules = (energy + exposed * self.device.power.idle) * self.plan.devices
        return (time_s + self.step_overhead_s,
                joules + self.step_overhead_s * self.device.power.idle * self.plan.devices)

    def _communication_s(self, tokens: int) -> float:
        comm = self._communication.get(tokens)
        if comm is None:
            comm = parallel_step_time(self.plan, self.system, self.model, tokens,  # type: ignore[arg-type]
                                      self.precision.act_bytes, [], "decode").communication_s
            self._communication[tokens] = comm
        return comm

    def _attention_costs(self, prefill_new: np.ndarray, prefill_start: np.ndarray,
                         decode_context: np.ndarray) -> list[OpCost]:
        if not self.per_request:
            return self._batched_attention(prefill_new, prefill_start, decode_context)
        costs = []
        index = decode_context - 1
        chunks = self._prefill_parts(prefill_new, prefill_start) if len(prefill_new) else {}
        for name in self._attention_names:
            parts = []
            table = self._decode.get(name)
            if table is not None and len(index):
                parts.append(table.rows[index])
            if name in chunks:
                parts.append(chunks[name])
            if parts:
                rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
                costs.append(cost_op(_op_from(self._templates[name], rows.T), self.device))
        return costs

    def _batched_attention(self, prefill_new: np.ndarray, prefill_start: np.ndarray,
                           decode_context: np.ndarray) -> list[OpCost]:
        """One launch for the batch: each op's fields summed over the requests. The prefill map
        is linear, so the chunks' features are summed before it is applied."""
        decoding = len(decode_context)
        summed_features = None
        if len(prefill_new) and self._prefill_coef is not None:
            # Chunk by chunk on scalars (an iteration has a few; arrays cost more to set up).
            for new, start in zip(prefill_new.tolist(), prefill_start.tolist(), strict=True):
                features = self._features(float(new), float(start))
                summed_features = features if summed_features is None else summed_features + features
        chunks = ({} if summed_features is not None or not len(prefill_new)
                  else self._prefill_parts(prefill_new, prefill_start))
        context_sum = float(decode_context.sum()) if decoding and self._decode_affine is not None else 0.0
        costs = []
        for name in self._attention_names:
            table = self._decode.get(name)
            used = table is not None and decoding > 0
            if not used:
                total = np.zeros(len(_FIELDS) + 1)
            elif self._decode_affine is not None:
                base, slope = self._decode_affine[name]
                total = decoding * base + context_sum * slope
            else:
                total = table.rows[decode_context - 1].sum(axis=0)  # type: ignore[union-attr]
            if summed_features is not None and name in self._prefill_coef:  # type: ignore[operator]
                total = total + summed_features @ self._prefill_coef[name]  # type: ignore[index]
                used = True
            elif name in chunks:
                total = total + chunks[name].sum(axis=0)
                used = True
            if used:
                costs.append(cost_op(_op_from(self._templates[name], total.tolist()), self.device))
        return costs

    def decode_run(self, contexts: np.ndarray, steps: int,
                   lengths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(seconds, joules) of each of ``steps`` decode-only iterations of the same requests, the
        first at ``contexts``, each step one token longer: ``iteration`` for every step, costed
        as arrays over the steps. ``lengths``: the steps each request takes part in (a request
        leaves the batch after its last; at least one stays to the end); all when ``None``."""
        contexts = np.asarray(contexts, dtype=np.int64)
        if lengths is None or int(np.min(lengths)) >= steps:
            return self.chunked_run(contexts, 0, 0, steps)
        lengths = np.minimum(lengths, steps)
        assert int(lengths.max()) == steps, "a decode run keeps at least one request to its end"
        if int((contexts + lengths).max()) - 1 > self.max_context:
            raise InferSimError(f"a context of {int((contexts + lengths).max()) - 1} tokens exceeds the "
                                f"engine's table of {self.max_context}")
        if self.per_request or self._decode_affine is None or (self.plan is not None and not self._plan_fast):
            # Stretch by stretch of the same batch.
            parts, first = [], 0
            for last in np.unique(lengths).tolist():
                staying = lengths > first
                parts.append(self.chunked_run(contexts[staying] + first, 0, 0, last - first))
                first = last
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        step = np.arange(steps)
        staying = lengths[None, :] > step[:, None]  # steps x requests
        counts = staying.sum(axis=1)
        context_sums = (staying * contexts[None, :]).sum(axis=1) + counts * step
        distinct, which = np.unique(counts, return_inverse=True)
        sums = np.array([[*self._token_sum(c, c), *self._head_sum(c)] for c in distinct.tolist()])[which]
        time_s, energy, outside_s = sums[:, 0] + sums[:, 3], sums[:, 1] + sums[:, 4], sums[:, 2] + sums[:, 3]
        for name in self._attention_names:
            if name not in self._decode_affine:
                continue
            base, slope = self._decode_affine[name]
            fields = counts[:, None] * base + context_sums[:, None] * slope
            cost = cost_op(_op_from(self._templates[name], fields.T), self.device)
            time_s = time_s + cost.time_s * cost.op.count
            energy = energy + cost.energy_j * cost.op.count
        if self.plan is not None:
            return self._one_stage(counts, time_s - outside_s, outside_s, energy)
        return time_s + self.step_overhead_s, energy + self.step_overhead_s * self.device.power.idle

    def chunked_run(self, contexts: np.ndarray, chunk: int, start: int,
                    steps: int) -> tuple[np.ndarray, np.ndarray]:
        """``decode_run`` with, in every step, a prefill chunk of ``chunk`` tokens of one prompt
        (the first starting at ``start``, each next one ``chunk`` further; none emits a token)."""
        contexts = np.asarray(contexts, dtype=np.int64)
        n = len(contexts)
        if (self.plan is not None and not self._plan_fast) or (chunk and self._prefill_coef is None):
            empty = np.zeros(0, dtype=np.int64)
            pairs = [self.iteration(np.array([chunk]) if chunk else empty,
                                    np.array([start + j * chunk]) if chunk else empty, contexts + j, n)
                     for j in range(steps)]
            return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        tokens = n + chunk
        if tokens == 0:
            return np.zeros(steps), np.zeros(steps)
        token_s, token_j, outside_s = self._token_sum(tokens, n)
        if n:
            head_s, head_j = self._head_sum(n)
            token_s, token_j, outside_s = token_s + head_s, token_j + head_j, outside_s + head_s
        time_s, energy = np.full(steps, token_s), np.full(steps, token_j)
        if n and int(contexts.max()) + steps - 1 > self.max_context:
            raise InferSimError(f"a context of {int(contexts.max()) + steps - 1} tokens exceeds the "
                                f"engine's table of {self.max_context}")
        chunks = None
        if chunk:
            starts = start + chunk * np.arange(steps, dtype=float)
            chunks = self._features(np.full(steps, float(chunk)), starts)  # steps x features
        affine = n and not self.per_request and self._decode_affine is not None
        if affine:
            # The decodes' fields summed at each step: n requests, contexts summing to C + n j.
            context_sums = float(contexts.sum()) + n * np.arange(steps, dtype=float)
        else:
            index = (contexts - 1)[None, :] + np.arange(steps)[:, None]  # steps x requests
        for name in self._attention_names:
            table = self._decode.get(name)
            parts = []  # each steps x requests x fields, or steps x fields summed over requests
            if table is not None and n:
                if affine:
                    base, slope = self._decode_affine[name]  # type: ignore[index]
                    parts.append(n * base + context_sums[:, None] * slope)
                else:
                    rows = table.rows[index]
                    parts.append(rows if self.per_request else rows.sum(axis=1))
            if chunks is not None and name in self._prefill_coef:  # type: ignore[operator]
                chunk_rows = chunks @ self._prefill_coef[name]  # type: ignore[index]
                parts.append(chunk_rows[:, None, :] if self.per_request else chunk_rows)
            if not parts:
                continue
            template = self._templates[name]
            if self.per_request:  # one launch per request
                rows = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
                cost = cost_op(_op_from(template, np.moveaxis(rows, 2, 0)), self.device)
                time_s += np.sum(cost.time_s, axis=1) * cost.op.count
                energy += np.sum(cost.energy_j, axis=1) * cost.op.count
            else:
                fields = parts[0] + parts[1] if len(parts) > 1 else parts[0]
                cost = cost_op(_op_from(template, fields.T), self.device)
                time_s += cost.time_s * cost.op.count
                energy += cost.energy_j * cost.op.count
        if self.plan is not None:
            return self._one_stage(tokens, time_s - outside_s, outside_s, energy)
        return time_s + self.step_overhead_s, energy + self.step_overhead_s * self.device.power.idle

    def prefill_alone_s(self, prompt: int) -> float:
        """One request's whole prompt as the only work of an iteration (a lower bound on TTFT)."""
        return self.iteration(np.array([prompt]), np.array([0]), np.zeros(0, dtype=np.int64), 1)[0]


def _affine(tables: dict[str, _Table],
            contexts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Each decode table as ``base + slope * context`` when it is exactly that at every context
    (attention over the whole cache; not a sliding window, a KIVI residual or a recomputation
    with a step): a batch's summed fields are then ``n base + slope sum(context)``. ``None`` when
    any table is not."""
    out = {}
    for name, table in tables.items():
        rows = table.rows
        span = contexts[-1] - contexts[0]
        slope = (rows[-1] - rows[0]) / span if span else np.zeros(rows.shape[1])
        base = rows[0] - slope * contexts[0]
        if not np.allclose(base + contexts[:, None] * slope, rows, rtol=1e-12, atol=1e-9):
            return None
        out[name] = (base, slope)
    return out


def _broadcast(cost: OpCost, size: int) -> OpCost:
    return dataclasses.replace(
        cost, time_s=np.broadcast_to(np.asarray(cost.time_s, dtype=float), (size,)) * 1.0,
        energy_j=np.broadcast_to(np.asarray(cost.energy_j, dtype=float), (size,)) * 1.0)


def _total(costs: dict[str, OpCost], field: str, size: int) -> np.ndarray:
    total = np.zeros(size)
    for cost in costs.values():
        total = total + getattr(cost, field)
    return total


def _at(cost: OpCost, index: int) -> OpCost:
    assert isinstance(cost.time_s, np.ndarray) and isinstance(cost.energy_j, np.ndarray)
    return dataclasses.replace(cost, time_s=float(cost.time_s[index]), energy_j=float(cost.energy_j[index]))


def _summed(cost: OpCost) -> OpCost:
    return dataclasses.replace(cost, time_s=float(np.sum(cost.time_s)), energy_j=float(np.sum(cost.energy_j)))
