"""The math of one decoder layer in numpy, one function per simulator op.

Activations are 2-D ``[tokens, width]`` with tokens ordered ``(sequence, position)``;
attention works on ``q: [B, KV, G, T, d]`` (``G = H / KV`` query heads per KV head)
and a KV cache of ``[B, KV, max_len, d]`` per layer. Float32 throughout; numpy's
float16 matmul has no BLAS path, so the numpy backend does not offer it.

Only numpy here (exact GELU uses a float32-accurate erf of its own).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

from simulator.errors import UnsupportedError
from validation.executor.model import KVCache

Array = np.ndarray
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class NumpyBackend:
    """Float32 numpy on the host CPU (BLAS threads as numpy's BLAS is configured)."""

    name = "numpy"
    device = "cpu"

    def __init__(self, dtype: str = "float32"):
        if dtype != "float32":
            raise UnsupportedError(
                f"the numpy backend runs float32 only (got {dtype!r}): numpy has no BLAS path "
                "for float16; use --backend torch for 16-bit types"
            )
        self.dtype = dtype
        self.sync = None  # synchronous: nothing to wait for

    # --- arrays ------------------------------------------------------------------------

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def from_numpy(self, array: np.ndarray) -> Array:
        return np.ascontiguousarray(array, dtype=np.float32)

    def to_numpy(self, x: Array) -> np.ndarray:
        return x

    def new_cache(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int) -> KVCache:
        shape = (batch, kv_heads, max_len, head_dim)
        return KVCache(
            k=[np.zeros(shape, np.float32) for _ in range(layers)],
            v=[np.zeros(shape, np.float32) for _ in range(layers)],
            max_len=max_len,
        )

    def synchronize(self) -> None:
        return None

    # --- ops ---------------------------------------------------------------------------

    def embedding(self, table: Array, ids: np.ndarray) -> Array:
        """``x[n] = E[ids[n]]``: a row gather, ``[B*T, h]``."""
        return table[ids.reshape(-1)]

    def add_positions(self, x: Array, table: Array, positions: np.ndarray, batch: int) -> Array:
        """Learned positions: ``x[b, t] += P[positions[t]]``."""
        x.reshape(batch, len(positions), -1)[...] += table[positions]
        return x

    def linear(self, x: Array, w: Array, b: Array | None) -> Array:
        """``y = x W + b``."""
        y = x @ w
        if b is not None:
            y += b
        return y

    def rmsnorm(self, x: Array, w: Array, eps: float) -> Array:
        """``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis."""
        mean_square = np.einsum("...i,...i->...", x, x)[..., None] / np.float32(x.shape[-1])
        return x * (1.0 / np.sqrt(mean_square + np.float32(eps))) * w

    def layernorm(self, x: Array, w: Array, b: Array | None, eps: float) -> Array:
        """``y = (x - mean) / sqrt(var + eps) * w + b`` over the last axis."""
        centred = x - x.mean(axis=-1, keepdims=True)
        var = np.einsum("...i,...i->...", centred, centred)[..., None] / np.float32(x.shape[-1])
        y = centred * (1.0 / np.sqrt(var + np.float32(eps))) * w
        return y if b is None else y + b

    def rope_tables(self, max_len: int, head_dim: int, theta: float) -> tuple[Array, Array]:
        """``cos, sin [max_len, d]`` of ``p * theta^(-2i/d)``, each half repeated (rotate-half)."""
        angles = rope_angles(max_len, head_dim, theta)
        return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def split_heads(self, qkv: Array, batch: int, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[Array, Array, Array]:
        """Views ``q [B, KV, G, T, d]``, ``k, v [B, KV, T, d]`` of the fused projection."""
        tokens = qkv.shape[0] // batch
        groups = heads // kv_heads
        qkv = qkv.reshape(batch, tokens, heads + 2 * kv_heads, head_dim)
        q = qkv[:, :, :heads].reshape(batch, tokens, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
        k = qkv[:, :, heads:heads + kv_heads].transpose(0, 2, 1, 3)
        v = qkv[:, :, heads + kv_heads:].transpose(0, 2, 1, 3)
        return q, k, v

    def qk_norm(self, q: Array, k: Array, wq: Array, wk: Array, eps: float) -> tuple[Array, Array]:
        """Per-head RMSNorm of q and k over ``d`` (Qwen3)."""
        return self.rmsnorm(q, wq, eps), self.rmsnorm(k, wk, eps)

    def rope(self, q: Array, k: Array, cos: Array, sin: Array) -> tuple[Array, Array]:
        """``x' = x cos + rotate_half(x) sin``, ``rotate_half([x1, x2]) = [-x2, x1]``; cos, sin ``[T, d]``."""
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def write_cache(self, cache_k: Array, cache_v: Array, k: Array, v: Array, start: int) -> None:
        """Store the new tokens' K and V at positions ``start .. start + T``."""
        end = start + k.shape[2]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v

    def attention(self, q: Array, keys: Array, values: Array, q_start: int, k_start: int,
                  window: int | None) -> Array:
        """``O = softmax(Q K^T / sqrt(d) + M) V`` per head; returns ``[B*T, H*d]``.

        ``M`` is ``-inf`` where key position ``j`` is after query position ``i``
        (causal) or ``i - j >= window`` (sliding window). The score matrix is
        materialised (the simulator's ``--attention naive``).
        """
        return self.attention_probs(q, keys, values, q_start, k_start, window)[0]

    def attention_probs(self, q: Array, keys: Array, values: Array, q_start: int, k_start: int,
                        window: int | None) -> tuple[Array, Array]:
        """``attention``'s output and its probabilities ``P [B, KV, G*T, L]`` (rows ordered
        ``(query head, position)``), which H2O sums into each key's attention mass."""
        batch, kv_heads, groups, tokens, head_dim = q.shape
        length = keys.shape[2]
        # Fold the G query heads of a KV head into the rows of one GEMM per (sequence, KV head).
        q_rows = q.reshape(batch, kv_heads, groups * tokens, head_dim)
        scores = q_rows @ keys.transpose(0, 1, 3, 2)
        scores *= np.float32(1.0 / math.sqrt(head_dim))
        mask = _mask(q_start, tokens, k_start, length, window)
        if mask is not None:
            scores.reshape(batch, kv_heads, groups, tokens, length)[...] += mask
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = (scores @ values).reshape(batch, kv_heads, groups, tokens, head_dim)
        return out.transpose(0, 3, 1, 2, 4).reshape(batch * tokens, kv_heads * groups * head_dim), scores

    def activation(self, up: Array, kind: str, gated: bool) -> Array:
        """Gated: ``act(g) * u`` with ``up = [g | u]``; else ``act(up)``."""
        if not gated:
            return _act(up, kind)
        inter = up.shape[-1] // 2
        out = _act(up[:, :inter], kind)
        out *= up[:, inter:]
        return out

    def add_(self, x: Array, y: Array) -> Array:
        """In-place residual ``x += y``."""
        x += y
        return x

    def route(self, logits: Array, top_k: int) -> tuple[np.ndarray, Array]:
        """Top-k experts per token and their gates ``softmax`` over the k chosen logits.

        Equal to a softmax over all experts renormalised over the top k (Mixtral).
        """
        experts = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
        chosen = np.take_along_axis(logits, experts, axis=-1)
        gates = np.exp(chosen - chosen.max(axis=-1, keepdims=True))
        gates /= gates.sum(axis=-1, keepdims=True)
        return experts, gates

    def group_by_expert(self, experts: np.ndarray, gates: Array,
                        num_experts: int) -> list[tuple[np.ndarray, Array] | None]:
        """Per expert: the tokens routed to it and their gates (``None`` if none)."""
        top_k = experts.shape[1]
        flat = experts.reshape(-1)
        order = np.argsort(flat, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=num_experts))])
        tokens = order // top_k
        flat_gates = gates.reshape(-1)[order]
        return [
            (tokens[lo:hi], flat_gates[lo:hi]) if hi > lo else None
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)
        ]

    def take_rows(self, x: Array, rows: np.ndarray) -> Array:
        return x[rows]

    def zeros_like(self, x: Array) -> Array:
        return np.zeros_like(x)

    def scatter_add_rows(self, out: Array, rows: np.ndarray, y: Array, gates: Array) -> None:
        """``out[rows] += gates * y``; an expert sees each token once, so rows are unique."""
        y *= gates[:, None]
        out[rows] += y

    def last_positions(self, x: Array, batch: int, count: int) -> Array:
        """The rows of each sequence's last ``count`` positions, ``[B*count, h]``."""
        return x.reshape(batch, -1, x.shape[-1])[:, -count:].reshape(batch * count, -1)

    def select_rows(self, x: Array, rows: np.ndarray) -> Array:
        """``x[rows]``: a ragged step's last new position of each request that emits a token."""
        return x[rows]

    def concat_rows(self, parts: list[Array]) -> Array:
        """The per-request attention outputs of a ragged step stacked back into one ``[N, H*d]``."""
        return np.concatenate(parts, axis=0)

    def argmax(self, logits: Array) -> np.ndarray:
        return np.argmax(logits, axis=-1)


def rope_angles(max_len: int, head_dim: int, theta: float) -> np.ndarray:
    """``[max_len, d]`` angles ``p * theta^(-2i/d)`` in float64, each half repeated (rotate-half);
    both backends take their cos/sin tables from here."""
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.concatenate([angles, angles], axis=-1)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    rotated *= sin
    rotated += x * cos
    return rotated


def _mask(q_start: int, tokens: int, k_start: int, length: int, window: int | None) -> Array | None:
    """Additive ``[T, L]`` mask (0 or -inf), or ``None`` when every key is visible."""
    q_pos = np.arange(q_start, q_start + tokens)[:, None]
    k_pos = np.arange(k_start, k_start + length)[None, :]
    hidden = k_pos > q_pos
    if window is not None:
        hidden |= q_pos - k_pos >= window
    if not hidden.any():
        return None
    return np.where(hidden, np.float32(-np.inf), np.float32(0.0))


def _erf(x: Array) -> Array:
    """Abramowitz & Stegun 7.1.26: ``erf(x) = 1 - poly(t) exp(-x^2)``, ``t = 1/(1 + p|x|)``.

    Absolute error below 1.5e-7, under float32 rounding.
    """
    t = 1.0 / (1.0 + np.float32(0.3275911) * np.abs(x))
    poly = t * (np.float32(0.254829592) + t * (np.float32(-0.284496736) + t * (
        np.float32(1.421413741) + t * (np.float32(-1.453152027) + t * np.float32(1.061405429)))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _act(x: Array, kind: str) -> Array:
    if kind == "silu":  # x * sigmoid(x)
        return x / (1.0 + np.exp(-x))
    if kind == "gelu":  # x * Phi(x), exact
        return 0.5 * x * (1.0 + _erf(x * np.float32(1.0 / math.sqrt(2.0))))
    if kind == "gelu_tanh":  # GPT-2's tanh approximation
        return 0.5 * x * (1.0 + np.tanh(np.float32(_SQRT_2_OVER_PI) * (x + np.float32(0.044715) * x**3)))
    if kind == "relu":
        return np.maximum(x, 0.0)
    raise UnsupportedError(f"activation {kind!r} is not implemented by the numpy backend")
