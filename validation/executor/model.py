"""A decoder-only transformer read from a ModelSpec, written once over a backend's ops.

One forward step over ``T`` new tokens of ``B`` sequences at positions
``start .. start + T - 1`` (prefill: ``start = 0, T = P``; decode: ``T = 1``)::

    x = E[ids] (+ P[pos])
    per layer:
        h = norm(x);  [q | k | v] = h W_qkv (+ b)          # GQA: H query, KV key/value heads
        q, k = rope(q), rope(k)                            # rotate-half, theta 10000
        cache[start : start + T] = k, v
        x += softmax(q K^T / sqrt(d) + causal mask) V W_o
        h = norm(x)
        x += W_down act(h W_gate) * (h W_up)               # dense layer, or:
        x += sum_{e in topk(h W_r)} g_e FFN_e(h) + FFN_shared(h)   # MoE layer
    logits = norm(x[:, -1]) W_head

A ragged step (``forward_ragged``, the serving loop's iteration) runs several requests at once,
each with its own cache and its own count of new tokens (a prefill chunk, or one decode token):
their tokens are concatenated for the token-wise work (embedding, norms, projections, MLP or
MoE, residuals), so each GEMM sees the total token count, and attention runs per request
against its own cache. The layer code is the same for both: a step is a list of segments
(``Segment``: rows of the token matrix that attend to one cache; one for a uniform batch).

Every numeric call goes through the profiler with the simulator's op name, so
the executor's per-op times line up with ``simulator.graph.transformer``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from simulator.specs.model import ModelSpec
from validation.executor.profiler import KernelProfiler
from validation.executor.weights import (
    LayerWeights,
    MLPWeights,
    ModelWeights,
    MoEWeights,
    NormWeights,
    check_supported,
)

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
NORM_EPS = 1e-5
ROPE_THETA = 10000.0
# ModelSpec activation -> the backend's kernel; gating follows ffn.gated (as the parameter count does).
ACTIVATIONS = {
    "silu": "silu", "swiglu": "silu", "gelu": "gelu", "geglu": "gelu", "gelu_new": "gelu_tanh",
    "relu": "relu",
}


@dataclass
class KVCache:
    """Preallocated K and V per layer, each ``[B, KV, max_len, d]``.

    A ``managed`` cache (``validation.executor.kv``: evicting or quantized) stores, evicts and
    attends by itself: ``attend(layer, q, k, v, start)`` returns the attention output.
    """

    k: list[Any]
    v: list[Any]
    max_len: int
    managed: ClassVar[bool] = False

    def nbytes(self) -> int:
        return sum(int(a.nbytes) if hasattr(a, "nbytes") else a.numel() * a.element_size()
                   for a in self.k + self.v)

    def attend(self, index: int, q: Any, key: Any, value: Any, start: int) -> Any:
        raise NotImplementedError("a plain KV cache is read by Transformer._attention")


class Backend(Protocol):
    """The ops a backend provides; ``NumpyBackend`` documents each one's equation."""

    name: str
    device: str
    dtype: str
    sync: Any

    def context(self) -> contextlib.AbstractContextManager[Any]: ...
    def from_numpy(self, array: np.ndarray) -> Any: ...
    def to_numpy(self, x: Any) -> np.ndarray: ...
    def new_cache(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int) -> KVCache: ...
    def synchronize(self) -> None: ...
    def embedding(self, table: Any, ids: np.ndarray) -> Any: ...
    def add_positions(self, x: Any, table: Any, positions: np.ndarray, batch: int) -> Any: ...
    def linear(self, x: Any, w: Any, b: Any | None) -> Any: ...
    def rmsnorm(self, x: Any, w: Any, eps: float) -> Any: ...
    def layernorm(self, x: Any, w: Any, b: Any | None, eps: float) -> Any: ...
    def rope_tables(self, max_len: int, head_dim: int, theta: float) -> tuple[Any, Any]: ...
    def split_heads(self, qkv: Any, batch: int, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[Any, Any, Any]: ...
    def qk_norm(self, q: Any, k: Any, wq: Any, wk: Any, eps: float) -> tuple[Any, Any]: ...
    def rope(self, q: Any, k: Any, cos: Any, sin: Any) -> tuple[Any, Any]: ...
    def write_cache(self, cache_k: Any, cache_v: Any, k: Any, v: Any, start: int) -> None: ...
    def attention(self, q: Any, keys: Any, values: Any, q_start: int, k_start: int,
                  window: int | None) -> Any: ...
    def activation(self, up: Any, kind: str, gated: bool) -> Any: ...
    def add_(self, x: Any, y: Any) -> Any: ...
    def route(self, logits: Any, top_k: int) -> tuple[Any, Any]: ...
    def group_by_expert(self, experts: Any, gates: Any, num_experts: int) -> list[tuple[Any, Any] | None]: ...
    def take_rows(self, x: Any, rows: Any) -> Any: ...
    def zeros_like(self, x: Any) -> Any: ...
    def scatter_add_rows(self, out: Any, rows: Any, y: Any, gates: Any) -> None: ...
    def last_positions(self, x: Any, batch: int, count: int) -> Any: ...
    def select_rows(self, x: Any, rows: np.ndarray) -> Any: ...
    def concat_rows(self, parts: list[Any]) -> Any: ...
    def argmax(self, logits: Any) -> np.ndarray: ...


class Segment(NamedTuple):
    """Rows ``lo:hi`` of a step's token matrix: ``batch`` sequences of ``(hi - lo) / batch`` new
    tokens each, at positions ``start ..``, attending to ``cache`` (``None``: to these tokens only)."""

    lo: int
    hi: int
    batch: int
    start: int
    cache: KVCache | None


def _convert(obj: Any, fn: Any) -> Any:
    """The same weight tree with every numpy array passed through ``fn``."""
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, list):
        return [_convert(item, fn) for item in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: _convert(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)
                   if f.name not in ("arrays", "lm_head")}
        return dataclasses.replace(obj, **changes)
    return obj


class Transformer:
    """``forward(ids, start, cache)`` -> logits of each sequence's last position.

    ``forward`` is ``embed``, ``run_layers``, ``head``: a pipeline stage calls the parts it holds.
    """

    def __init__(self, spec: ModelSpec, backend: Backend, weights: ModelWeights,
                 profiler: KernelProfiler | None = None):
        check_supported(spec)
        self.spec = spec
        self.ops = backend
        self.profiler = profiler or KernelProfiler(sync=backend.sync)
        converted = _convert(weights, backend.from_numpy)
        # A tied head stays a view of the embedding on the backend too (no second copy).
        converted.lm_head = (converted.embedding.T if spec.tie_word_embeddings
                             else backend.from_numpy(weights.lm_head))
        converted.arrays = []
        self.weights: ModelWeights = converted
        self.weight_bytes = weights.num_params() * DTYPE_BYTES[backend.dtype]
        self.act_kind, self.gated = ACTIVATIONS[spec.ffn.activation], spec.ffn.gated
        self._rope: tuple[Any, Any] | None = None
        self._rope_len = 0
        self.disk: Any = None  # DiskLayers when some layers' weights live on disk
        self.experts: Any = None  # ExpertStore when MoE experts live on disk behind a cache
        self.kv_window: int | None = None  # KV eviction: decode attends to the last kv_window tokens
        # An evicting or quantized cache (validation.executor.kv.Eviction / Quantization).
        self.kv_strategy: Any = None
        self.counters: dict[str, float] = {}  # the strategies' counts this step (take_counters)

    def offload_layers(self, layers: int, prefetch: bool, folder: Any = None) -> None:
        """Put the last ``layers`` layers' weights on disk, read back every step
        (``validation.executor.offload``)."""
        from validation.executor.offload import DiskLayers

        if self.ops.name != "numpy":
            raise ValueError("disk-offloaded layers run on the numpy backend only")
        if self.disk is not None:
            raise ValueError("this runtime's layers are already offloaded")
        self.disk = DiskLayers(self.weights.layers, layers, prefetch, folder)
        self.disk.profiler = self.profiler
        self.weights.layers = self.disk.resident + self.disk.templates
        self.weight_bytes = self.weight_bytes - self.disk.file_bytes + self.disk.buffer_bytes

    def cache_experts(self, fraction: float, folder: Any = None) -> None:
        """Keep ``fraction`` of each MoE layer's experts in memory, the rest on disk, read when
        routed to (``validation.executor.experts``)."""
        from validation.executor.experts import ExpertStore

        if self.ops.name != "numpy":
            raise ValueError("experts on disk run on the numpy backend only")
        self.experts = ExpertStore(self.weights.layers, fraction, folder)
        self.experts.profiler, self.experts.counters = self.profiler, self.counters
        self.weight_bytes = self.weight_bytes - self.experts.disk_bytes + self.experts.buffer_bytes

    def take_counters(self) -> dict[str, float]:
        """The strategies' counts since the last call (expert hits and misses, keys attended)."""
        counts = dict(self.counters)
        self.counters.clear()
        return counts

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
            self.disk = None
        if self.experts is not None:
            self.experts.close()
            self.experts = None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        s = self.spec
        self._ensure_rope(max_len)
        if self.kv_strategy is not None:
            return self.kv_strategy.new_cache(self, batch, max_len)
        return self.ops.new_cache(len(self.weights.layers), batch, s.kv_heads, max_len, s.head_size)

    def _ensure_rope(self, length: int) -> None:
        if self.spec.position_encoding == "rope" and length > self._rope_len:
            self._rope = self.ops.rope_tables(length, self.spec.head_size, ROPE_THETA)
            self._rope_len = length

    # --- the step ----------------------------------------------------------------------

    def forward(self, ids: np.ndarray, start: int, cache: KVCache | None, last: int | None = None) -> Any:
        """Logits ``[B, V]`` of the last position, or ``[B, last, V]`` of the last ``last`` positions
        (a speculative verify step); ``cache=None`` attends to this step's tokens only."""
        batch = ids.shape[0]
        x = self.embed(ids, start)
        x = self.run_layers(x, batch, start, cache)
        return self.head(x, batch, last)

    def forward_ragged(self, ids: Sequence[np.ndarray], starts: Sequence[int], caches: Sequence[KVCache],
                       emit: Sequence[bool] | None = None) -> Any:
        """One step over several requests, each with its own cache (batch 1): request ``r`` brings
        the tokens ``ids[r]`` (1-D) at positions ``starts[r] ..``. Returns the logits ``[R, V]`` of
        the last new position of each request with ``emit[r]`` (all by default), in request order,
        or ``None`` when none emits (a step of unfinished prefill chunks only)."""
        lengths = [len(tokens) for tokens in ids]
        if not lengths or min(lengths) < 1 or not len(lengths) == len(starts) == len(caches):
            raise ValueError("forward_ragged takes one start and one cache per request, each request "
                             "with at least one new token")
        bounds = np.cumsum([0, *lengths]).tolist()
        segments = [Segment(bounds[r], bounds[r + 1], 1, starts[r], caches[r]) for r in range(len(lengths))]
        positions = np.concatenate([np.arange(seg.start, seg.start + seg.hi - seg.lo) for seg in segments])
        self._ensure_rope(max(seg.start + seg.hi - seg.lo for seg in segments))
        x = self._embed(np.concatenate([np.ravel(tokens) for tokens in ids])[None, :], positions)
        x = self._run_segments(x, segments)
        rows = [seg.hi - 1 for r, seg in enumerate(segments) if emit is None or emit[r]]
        return self._head_rows(self.ops.select_rows(x, np.asarray(rows))) if rows else None

    def embed(self, ids: np.ndarray, start: int) -> Any:
        """``x [B*T, h]`` of tokens ``ids [B, T]`` at positions ``start ..``; the first pipeline stage."""
        return self._embed(ids, np.arange(start, start + ids.shape[1]))

    def _embed(self, ids: np.ndarray, positions: np.ndarray) -> Any:
        """``x [B*T, h]`` of ``ids [B, T]``, token ``t`` of every sequence at ``positions[t]``."""
        k, w = self.profiler, self.weights
        x = k("embedding", self.ops.embedding, w.embedding, ids)
        if w.position_embedding is not None:
            x = k("position_embedding", self.ops.add_positions, x, w.position_embedding, positions,
                  ids.shape[0])
        return x

    def run_layers(self, x: Any, batch: int, start: int, cache: KVCache | None) -> Any:
        """Every layer this runtime holds over ``x`` (all of them, or a pipeline stage's)."""
        if cache is None:
            self._ensure_rope(start + x.shape[0] // batch)
        return self._run_segments(x, [Segment(0, x.shape[0], batch, start, cache)])

    def _run_segments(self, x: Any, segments: list[Segment]) -> Any:
        k, w = self.profiler, self.weights
        if self.disk is not None:
            self.disk.begin_step()
        for index in range(len(w.layers)):
            layer = w.layers[index] if self.disk is None else self.disk.layer(index)
            self._attention(x, layer, index, segments)
            h = k("post_attention_norm", self._norm, x, layer.post_attention_norm)
            if layer.moe is not None:
                y = self._moe(h, layer.moe, index)
            else:
                assert layer.mlp is not None
                y = self._mlp(h, layer.mlp, MLP_NAMES)
            k("residual_add", self.ops.add_, x, self.reduce(y))
        return x

    def head(self, x: Any, batch: int, last: int | None = None) -> Any:
        """Final norm and LM head of each sequence's last position (``[B, V]``), or of its last
        ``last`` positions (``[B, last, V]``); the last pipeline stage."""
        logits = self._head_rows(self.ops.last_positions(x, batch, last or 1))
        return logits if last is None else logits.reshape(batch, last, -1)

    def _head_rows(self, rows: Any) -> Any:
        k, w = self.profiler, self.weights
        rows = k("final_norm", self._norm, rows, w.final_norm)
        return k("lm_head", self.ops.linear, rows, w.lm_head, None)

    def reduce(self, partial: Any) -> Any:
        """The sum of a row-parallel output over tensor-parallel shards: ``partial`` itself in one
        process; ``validation.executor.parallel`` puts an all-reduce here."""
        return partial

    def _norm(self, x: Any, norm: NormWeights) -> Any:
        if self.spec.norm == "layernorm":
            return self.ops.layernorm(x, norm.weight, norm.bias, NORM_EPS)
        return self.ops.rmsnorm(x, norm.weight, NORM_EPS)

    def _attention(self, x: Any, layer: LayerWeights, index: int, segments: list[Segment]) -> None:
        k, ops = self.profiler, self.ops
        h = k("input_norm", self._norm, x, layer.input_norm)
        qkv = k("qkv_proj", ops.linear, h, layer.qkv, layer.qkv_bias)
        if len(segments) == 1:
            out = self._attend(qkv, layer, index, segments[0])
        else:
            parts = [self._attend(qkv[seg.lo:seg.hi], layer, index, seg) for seg in segments]
            out = k("attention", ops.concat_rows, parts)
        attn = k("o_proj", ops.linear, out, layer.o, layer.o_bias)
        k("residual_add", ops.add_, x, self.reduce(attn))

    def _attend(self, qkv: Any, layer: LayerWeights, index: int, segment: Segment) -> Any:
        """Attention output ``[rows, H*d]`` of one segment's rows of the fused QKV projection."""
        k, s, ops = self.profiler, self.spec, self.ops
        _, _, batch, start, cache = segment
        q, key, value = ops.split_heads(qkv, batch, s.num_attention_heads, s.kv_heads, s.head_size)
        tokens = key.shape[2]
        if layer.q_norm is not None:
            q, key = k("qk_norm", ops.qk_norm, q, key, layer.q_norm, layer.k_norm, NORM_EPS)
        if self._rope is not None:
            cos, sin = self._rope[0][start:start + tokens], self._rope[1][start:start + tokens]
            q, key = k("rope", ops.rope, q, key, cos, sin)
        end, k_start = start + tokens, 0
        if cache is not None and cache.managed:  # an evicting or quantized cache attends itself
            out = cache.attend(index, q, key, value, start)
        else:
            if cache is not None:
                k("kv_cache_write", ops.write_cache, cache.k[index], cache.v[index], key, value, start)
                # With a sliding window the step needs only the last window + T - 1 keys; a KV
                # eviction window applies to decode (prefill attends to the whole prompt).
                if s.sliding_window is not None:
                    k_start = max(0, start - s.sliding_window + 1)
                if self.kv_window is not None and tokens == 1:
                    k_start = max(k_start, start - self.kv_window + 1)
                key, value = cache.k[index][:, :, k_start:end], cache.v[index][:, :, k_start:end]
            else:
                k_start = start
            out = k("attention", ops.attention, q, key, value, start, k_start, s.sliding_window)
        return out

    def _mlp(self, x: Any, mlp: MLPWeights, names: tuple[str, str, str]) -> Any:
        k, ops = self.profiler, self.ops
        up = k(names[0], ops.linear, x, mlp.up, mlp.up_bias)
        act = k(names[1], ops.activation, up, self.act_kind, self.gated)
        return k(names[2], ops.linear, act, mlp.down, mlp.down_bias)

    def _moe(self, h: Any, moe: MoEWeights, index: int) -> Any:
        """``y = sum_{e in topk} g_e FFN_e(h) + FFN_shared(h)``, each expert on its own tokens only;
        ``index`` is the layer's (experts on disk are found by it)."""
        k, ops, spec = self.profiler, self.ops, self.spec.moe
        assert spec is not None
        logits = k("router", ops.linear, h, moe.router, moe.router_bias)
        experts, gates = k("topk_gate", ops.route, logits, spec.top_k)
        groups = k("moe_permute", ops.group_by_expert, experts, gates, spec.num_experts)
        out = k("expert_combine", ops.zeros_like, h)
        for number, (expert, group) in enumerate(zip(moe.experts, groups, strict=True)):
            if group is None:
                continue
            rows, expert_gates = group
            if self.experts is not None:
                expert = self.experts.expert(index, number, len(rows))
            routed = k("experts_gather", ops.take_rows, h, rows)
            y = self._mlp(routed, expert, EXPERT_NAMES)
            k("expert_combine", ops.scatter_add_rows, out, rows, y, expert_gates)
        if moe.shared is not None:
            shared = self._mlp(h, moe.shared, SHARED_NAMES)
            k("expert_combine", ops.add_, out, shared)
        return out


MLP_NAMES = ("mlp_up_proj", "mlp_act", "mlp_down_proj")
EXPERT_NAMES = ("experts_up_proj", "experts_act", "experts_down_proj")
SHARED_NAMES = ("shared_experts_up_proj", "shared_experts_act", "shared_experts_down_proj")
