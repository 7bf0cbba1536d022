"""KV caches that evict or compress tokens, run for real: StreamingLLM, H2O and KIVI.

``simulator.strategies.kv`` and ``simulator.graph.transformer`` model the same strategies;
these caches do what they model, in numpy.

Eviction (``EvictingCache``), per layer ``budget`` slots ``[B, KV, budget, d]`` of K and V,
the position each slot holds and (H2O) each slot's accumulated attention:

* ``streaming`` (StreamingLLM, Xiao et al. 2023): the first ``sinks`` tokens and the most
  recent ``budget - sinks``, the recent ones in a ring of slots;
* ``h2o`` (Heavy-Hitter Oracle, Zhang et al. 2023): the ``budget - budget // 2`` most recent
  tokens and ``budget // 2`` heavy hitters. Per ``(b, kv_head)`` every cached token's score is
  the attention probability it has received, summed over the query heads of its KV group and
  over steps (prefill's rows included: the prefill initialises the scores). When the cache is
  full, the lowest-scoring token outside the recent ones is evicted (``h2o_scores``: the
  simulator's op of the same name).

Prefill attends the whole prompt (the policies evict after it, as the simulator models) and
keeps ``budget`` of it. A decode step evicts one token when the cache is full, writes the new
token into the freed slot and attends the ``min(context, budget)`` held tokens, the new one
included: the keys ``KVPolicy.decode_model`` gives attention (a window of ``budget``). Slots are
not in position order; decode needs no mask, as every held token precedes the query.

Quantization (``QuantizedCache``, KIVI, Liu et al. 2024): keys per channel in groups of
``group_size`` tokens, values per token in groups of ``group_size`` channels (of the token's
``KV x d`` values; a group may span heads), asymmetric min-max: ``code = round((x - min) /
scale)``, ``scale = (max - min) / (2^bits - 1)``, codes packed ``8 / bits`` to a uint8 along
``d``, float32 scales and minima. The most recent ``residual`` tokens stay float32 in a ring;
the token leaving it is quantized (``kv_quantize``). A key joining a group that already holds
tokens requantizes that group: it is dequantized, the new key appended and the group quantized
again (a code survives that unchanged while the group's range does). Prefill attends the prompt
in float32, then quantizes it; each decode step dequantizes the whole quantized cache into a
float32 buffer beside the residual (``kv_dequantize``, KIVI's extra work; its kernels fuse it
into the attention, numpy cannot) and attends that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from simulator.errors import InferSimError
from validation.executor.model import KVCache

QUANT_BITS = (8, 4, 2)


# --- eviction -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    """A ``streaming`` or ``h2o`` policy over ``budget`` tokens (``KVPolicy.budget_tokens``)."""

    kind: str
    budget: int
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("streaming", "h2o"):
            raise InferSimError(f"the executor's evicting caches are streaming and h2o, got {self.kind!r}")
        if self.budget < 1 or (self.kind == "streaming" and self.budget <= self.sinks):
            raise InferSimError(f"--kv-budget of {self.budget} tokens leaves no room beside "
                                f"{self.sinks} attention sinks")

    @property
    def recent(self) -> int:
        """Tokens kept for being recent; the others are sinks or heavy hitters."""
        return self.budget - (self.sinks if self.kind == "streaming" else self.budget // 2)

    def new_cache(self, runtime: Any, batch: int, max_len: int) -> EvictingCache:
        s = runtime.spec
        return EvictingCache(self, len(runtime.weights.layers), batch, s.kv_heads, s.head_size, max_len,
                             runtime)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "budget_tokens": self.budget, "recent": self.recent}
        if self.kind == "streaming":
            out["sinks"] = self.sinks
        else:
            out["heavy_hitters"] = self.budget - self.recent
        return out


class EvictingCache(KVCache):
    """``budget`` slots per layer and ``(b, kv_head)`` (``max_len`` if fewer: a sequence that fits
    evicts nothing), filled and evicted as the module says."""

    managed = True

    def __init__(self, policy: Eviction, layers: int, batch: int, kv_heads: int, head_dim: int,
                 max_len: int, runtime: Any):
        shape = (batch, kv_heads, min(policy.budget, max_len), head_dim)
        super().__init__(k=[np.zeros(shape, np.float32) for _ in range(layers)],
                         v=[np.zeros(shape, np.float32) for _ in range(layers)], max_len=max_len)
        self.policy = policy
        self.ops, self.profiler, self.counters = runtime.ops, runtime.profiler, runtime.counters
        self.positions = [np.full(shape[:3], -1, np.int64) for _ in range(layers)]
        self.scores = [np.zeros(shape[:3], np.float32) for _ in range(layers)] if policy.kind == "h2o" else []
        self.held = [0] * layers
        self._rows = np.meshgrid(np.arange(batch), np.arange(kv_heads), indexing="ij")

    def nbytes(self) -> int:
        return super().nbytes() + sum(int(a.nbytes) for a in self.positions + self.scores)

    def attend(self, index: int, q: np.ndarray, key: np.ndarray, value: np.ndarray, start: int) -> np.ndarray:
        if start == 0:
            return self._prefill(index, q, key, value)
        if key.shape[2] != 1:
            raise ValueError("an evicting cache takes one new token per step after the prefill")
        return self._decode(index, q, key, value, start)

    def _prefill(self, index: int, q: np.ndarray, key: np.ndarray, value: np.ndarray) -> np.ndarray:
        k, ops, budget = self.profiler, self.ops, self.policy.budget
        tokens = key.shape[2]
        if tokens <= budget:  # everything fits: attend from the cache, as the full cache does
            k("kv_cache_write", self._keep_all, index, key, value)
            key, value = self.k[index][:, :, :tokens], self.v[index][:, :, :tokens]
        if self.policy.kind == "h2o":
            out, probs = k("attention", ops.attention_probs, q, key, value, 0, 0, None)
            mass = k("h2o_scores", _key_mass, probs)
        else:
            out, mass = k("attention", ops.attention, q, key, value, 0, 0, None), None
        if tokens <= budget:
            if mass is not None:
                self.scores[index][:, :, :tokens] = mass
        else:
            k("kv_cache_write", self._keep_some, index, key, value, mass)
        return out

    def _keep_all(self, index: int, key: np.ndarray, value: np.ndarray) -> None:
        tokens = key.shape[2]
        self.k[index][:, :, :tokens] = key
        self.v[index][:, :, :tokens] = value
        self.positions[index][:] = -1
        self.positions[index][:, :, :tokens] = np.arange(tokens)
        if self.scores:
            self.scores[index][:] = 0.0
        self.held[index] = tokens

    def _keep_some(self, index: int, key: np.ndarray, value: np.ndarray, mass: np.ndarray | None) -> None:
        """``budget`` of a longer prompt: sinks and the ring of recent tokens, or heavy hitters."""
        policy, tokens = self.policy, key.shape[2]
        recent = np.arange(tokens - policy.recent, tokens)
        if policy.kind == "streaming":
            kept = np.concatenate([np.arange(policy.sinks), recent])
            slots = np.concatenate([np.arange(policy.sinks), self._ring_slot(recent)])
            self.k[index][:, :, slots] = key[:, :, kept]
            self.v[index][:, :, slots] = value[:, :, kept]
            self.positions[index][:, :, slots] = kept
        else:
            assert mass is not None
            heavy = policy.budget - policy.recent
            older = mass[:, :, :tokens - policy.recent]
            top = np.sort(np.argpartition(-older, heavy - 1, axis=-1)[..., :heavy], axis=-1) if heavy else \
                np.zeros(older.shape[:2] + (0,), np.int64)
            kept = np.concatenate([top, np.broadcast_to(recent, older.shape[:2] + recent.shape)], axis=-1)
            self.k[index][:] = np.take_along_axis(key, kept[..., None], axis=2)
            self.v[index][:] = np.take_along_axis(value, kept[..., None], axis=2)
            self.positions[index][:] = kept
            self.scores[index][:] = np.take_along_axis(mass, kept, axis=-1)
        self.held[index] = policy.budget

    def _ring_slot(self, position: Any) -> Any:
        """Streaming: a recent token's slot; positions below ``budget`` fill slots in order."""
        sinks = self.policy.sinks
        return sinks + (position - sinks) % self.policy.recent

    def _decode(self, index: int, q: np.ndarray, key: np.ndarray, value: np.ndarray,
                position: int) -> np.ndarray:
        k, ops = self.profiler, self.ops
        if self.held[index] < self.policy.budget:
            slot: Any = self.held[index]
            self.held[index] += 1
        elif self.policy.kind == "h2o":
            slot = k("h2o_scores", self._evict, index, position)
        else:
            slot = self._ring_slot(position)
        k("kv_cache_write", self._write, index, slot, key, value, position)
        held = self.held[index]
        keys, values = self.k[index][:, :, :held], self.v[index][:, :, :held]
        first = position - held + 1  # every held key precedes the query: no mask
        if self.policy.kind == "h2o":
            out, probs = k("attention", ops.attention_probs, q, keys, values, position, first, None)
            k("h2o_scores", self._accumulate, index, probs)
        else:
            out = k("attention", ops.attention, q, keys, values, position, first, None)
        self.counters["kv_keys_attended"] = max(self.counters.get("kv_keys_attended", 0), held)
        return out

    def _evict(self, index: int, position: int) -> np.ndarray:
        """Per ``(b, kv_head)`` the slot of the lowest score outside the recent tokens (the new
        token at ``position`` counts as recent)."""
        older = self.positions[index] <= position - self.policy.recent
        return np.where(older, self.scores[index], np.float32(np.inf)).argmin(axis=-1)

    def _write(self, index: int, slot: Any, key: np.ndarray, value: np.ndarray, position: int) -> None:
        if isinstance(slot, np.ndarray):
            rows = (*self._rows, slot)
            self.k[index][rows] = key[:, :, 0]
            self.v[index][rows] = value[:, :, 0]
            self.positions[index][rows] = position
            self.scores[index][rows] = 0.0
        else:
            self.k[index][:, :, slot] = key[:, :, 0]
            self.v[index][:, :, slot] = value[:, :, 0]
            self.positions[index][:, :, slot] = position
            if self.scores:
                self.scores[index][:, :, slot] = 0.0

    def _accumulate(self, index: int, probs: np.ndarray) -> None:
        held = probs.shape[-1]
        self.scores[index][:, :, :held] += _key_mass(probs)


def _key_mass(probs: np.ndarray) -> np.ndarray:
    """``[B, KV, L]``: each key's attention probability summed over its group's query rows."""
    return probs.sum(axis=2)


# --- quantization ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantization:
    """KIVI: ``bits`` per value, ``group_size`` values a group, ``residual`` recent tokens in float32."""

    bits: int
    residual: int = 0
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise InferSimError(f"KV quantization takes {', '.join(map(str, QUANT_BITS))} bits "
                                f"(--kv-dtype int8, int4, int2), got {self.bits}")
        if isinstance(self.residual, bool) or not isinstance(self.residual, (int, np.integer)) \
                or self.residual < 0:
            raise InferSimError(f"--kv-residual must be a whole number of tokens, at least 0; "
                                f"got {self.residual!r}")
        if self.group_size < 1:
            raise InferSimError(f"the quantization group size must be at least 1, got {self.group_size}")

    def check(self, kv_heads: int, head_dim: int) -> None:
        """Value groups must tile the token's ``KV x d`` values, head by head or heads together."""
        g, d = self.group_size, head_dim
        if head_dim % (8 // self.bits):
            raise InferSimError(f"head_dim {d} does not pack into bytes of {8 // self.bits} "
                                f"{self.bits}-bit codes")
        if not ((g % d == 0 and kv_heads % (g // d) == 0) or d % g == 0):
            raise InferSimError(f"value groups of {g} channels do not tile {kv_heads} KV heads of "
                                f"{d} channels")

    def new_cache(self, runtime: Any, batch: int, max_len: int) -> QuantizedCache:
        s = runtime.spec
        self.check(s.kv_heads, s.head_size)
        return QuantizedCache(self, len(runtime.weights.layers), batch, s.kv_heads, max_len, s.head_size,
                              runtime)

    def describe(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "residual_tokens": self.residual,
                "keys": "per channel", "values": "per token", "packed": True,
                "scale_dtype": "float32"}


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``8 / bits`` codes a byte along the last axis, the first in the lowest bits."""
    per = 8 // bits
    if per == 1:
        return codes
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    packed = grouped[..., 0].copy()
    for i in range(1, per):
        packed |= grouped[..., i] << np.uint8(bits * i)
    return packed


def unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """The codes ``pack`` packed, as uint8 ``[..., d]``."""
    per = 8 // bits
    if per == 1:
        return packed
    out = np.empty((*packed.shape, per), np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for i in range(per):
        np.right_shift(packed, np.uint8(bits * i), out=out[..., i])
        out[..., i] &= mask
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def quantize(x: np.ndarray, axes: tuple[int, ...], bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min-max over ``axes``: (uint8 codes, scale, minimum), the last two keeping dims."""
    levels = np.float32((1 << bits) - 1)
    low = x.min(axis=axes, keepdims=True)
    scale = (x.max(axis=axes, keepdims=True) - low) / levels
    scale[scale == 0] = np.float32(1.0)  # a constant group: every code 0, exact
    codes = np.rint((x - low) / scale)
    np.clip(codes, 0, levels, out=codes)
    return codes.astype(np.uint8), scale, low


class QuantizedCache(KVCache):
    """KIVI's cache as the module says: ``k``/``v`` hold the packed codes ``[B, KV, tokens, d*bits/8]``."""

    managed = True

    def __init__(self, quant: Quantization, layers: int, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, runtime: Any):
        self.quant, self.bits, self.group = quant, quant.bits, quant.group_size
        self.ops, self.profiler, self.counters = runtime.ops, runtime.profiler, runtime.counters
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.ring = min(quant.residual, max_len)
        capacity = max_len - self.ring  # tokens that ever leave the residual
        packed = head_dim * self.bits // 8
        g, d = self.group, head_dim
        # Values: a group is `heads` heads' channels, or a `width`-channel part of one head.
        self.heads, self.parts = max(1, g // d), max(1, d // g)
        self.width = d // self.parts
        codes = (batch, kv_heads, capacity, packed)
        super().__init__(k=[np.zeros(codes, np.uint8) for _ in range(layers)],
                         v=[np.zeros(codes, np.uint8) for _ in range(layers)], max_len=max_len)
        key_groups = (batch, kv_heads, math.ceil(capacity / g), d)
        value_groups = (batch, kv_heads // self.heads, capacity, self.parts)
        self.key_scale = [np.ones(key_groups, np.float32) for _ in range(layers)]
        self.key_min = [np.zeros(key_groups, np.float32) for _ in range(layers)]
        self.value_scale = [np.ones(value_groups, np.float32) for _ in range(layers)]
        self.value_min = [np.zeros(value_groups, np.float32) for _ in range(layers)]
        ring = (batch, kv_heads, self.ring, d)
        self.residual_k = [np.zeros(ring, np.float32) for _ in range(layers)]
        self.residual_v = [np.zeros(ring, np.float32) for _ in range(layers)]
        self.quantized = [0] * layers  # tokens in codes, per layer

    def parts_bytes(self) -> dict[str, int]:
        def total(arrays: list[np.ndarray]) -> int:
            return sum(int(a.nbytes) for a in arrays)

        return {"codes_bytes": total(self.k + self.v),
                "scale_bytes": total(self.key_scale + self.key_min + self.value_scale + self.value_min),
                "residual_bytes": total(self.residual_k + self.residual_v)}

    def nbytes(self) -> int:
        return sum(self.parts_bytes().values())

    def attend(self, index: int, q: np.ndarray, key: np.ndarray, value: np.ndarray, start: int) -> np.ndarray:
        k, ops = self.profiler, self.ops
        tokens = key.shape[2]
        if start == 0:  # prefill attends in float32, then the prompt goes to the cache
            out = k("attention", ops.attention, q, key, value, 0, 0, None)
            self.quantized[index] = 0
            kept = min(self.ring, tokens)
            if tokens > kept:
                k("kv_quantize", self._append, index, key[:, :, :tokens - kept], value[:, :, :tokens - kept])
            if kept:
                k("kv_cache_write", self._to_ring, index, key[:, :, tokens - kept:],
                  value[:, :, tokens - kept:], tokens - kept)
            return out
        if tokens != 1:
            raise ValueError("a quantized cache takes one new token per step after the prefill")
        if self.ring:
            slot = start % self.ring
            if start >= self.ring:  # the oldest residual token (start - ring) leaves for the codes
                k("kv_quantize", self._append, index, self.residual_k[index][:, :, slot:slot + 1],
                  self.residual_v[index][:, :, slot:slot + 1])
            k("kv_cache_write", self._to_ring, index, key, value, start)
        else:
            k("kv_quantize", self._append, index, key, value)
        held = min(start + 1, self.ring)
        keys, values = k("kv_dequantize", self.dequantize, index, held)
        return k("attention", ops.attention, q, keys, values, start, start + 1 - keys.shape[2], None)

    def _to_ring(self, index: int, key: np.ndarray, value: np.ndarray, first: int) -> None:
        slots = np.arange(first, first + key.shape[2]) % self.ring
        self.residual_k[index][:, :, slots] = key
        self.residual_v[index][:, :, slots] = value

    def _append(self, index: int, key: np.ndarray, value: np.ndarray) -> None:
        """Quantize ``m`` tokens after the ``quantized[index]`` already in codes."""
        first, count, bits, g = self.quantized[index], key.shape[2], self.bits, self.group
        b, kv, d = self.batch, self.kv_heads, self.head_dim
        # Values: per token, over groups of channels.
        grouped = value.reshape(b, kv // self.heads, self.heads, count, self.parts, self.width)
        codes, scale, low = quantize(grouped, (2, 5), bits)
        end = first + count
        self.v[index][:, :, first:end] = pack(codes.reshape(b, kv, count, d), bits)
        self.value_scale[index][:, :, first:end] = scale.reshape(b, kv // self.heads, count, self.parts)
        self.value_min[index][:, :, first:end] = low.reshape(b, kv // self.heads, count, self.parts)
        # Keys: per channel, over groups of `g` tokens; a group that holds tokens is requantized.
        position = first
        while position < end:
            group = position // g
            lo, hi = group * g, min(group * g + g, end)
            block = key[:, :, position - first:hi - first]
            if position > lo:
                block = np.concatenate([self._keys(index, lo, position), block], axis=2)
            codes, scale, low = quantize(block, (2,), bits)
            self.k[index][:, :, lo:hi] = pack(codes, bits)
            self.key_scale[index][:, :, group] = scale[:, :, 0]
            self.key_min[index][:, :, group] = low[:, :, 0]
            position = hi
        self.quantized[index] = end

    def _keys(self, index: int, lo: int, hi: int) -> np.ndarray:
        """Dequantized keys of positions ``lo .. hi`` inside one group."""
        group = lo // self.group
        codes = unpack(self.k[index][:, :, lo:hi], self.bits)
        return codes * self.key_scale[index][:, :, group, None] + self.key_min[index][:, :, group, None]

    def dequantize(self, index: int, held: int) -> tuple[np.ndarray, np.ndarray]:
        """Float32 ``K, V [B, KV, quantized + held, d]``: the codes dequantized, then the residual."""
        count, g, bits = self.quantized[index], self.group, self.bits
        b, kv, d = self.batch, self.kv_heads, self.head_dim
        keys = np.empty((b, kv, count + held, d), np.float32)
        values = np.empty_like(keys)
        if count:
            codes = unpack(self.k[index][:, :, :count], bits)
            whole = count // g
            if whole:
                out = keys[:, :, :whole * g].reshape(b, kv, whole, g, d)
                np.multiply(codes[:, :, :whole * g].reshape(b, kv, whole, g, d),
                            self.key_scale[index][:, :, :whole, None], out=out)
                out += self.key_min[index][:, :, :whole, None]
            if count > whole * g:
                out = keys[:, :, whole * g:count]
                np.multiply(codes[:, :, whole * g:], self.key_scale[index][:, :, whole, None], out=out)
                out += self.key_min[index][:, :, whole, None]
            shape = (b, kv // self.heads, self.heads, count, self.parts, self.width)
            codes = unpack(self.v[index][:, :, :count], bits).reshape(shape)
            out = values[:, :, :count].reshape(shape)
            np.multiply(codes, self.value_scale[index][:, :, None, :count, :, None], out=out)
            out += self.value_min[index][:, :, None, :count, :, None]
        if held:
            keys[:, :, count:] = self.residual_k[index][:, :, :held]
            values[:, :, count:] = self.residual_v[index][:, :, :held]
        return keys, values
