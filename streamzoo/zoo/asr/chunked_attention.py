"""Chunked self-attention with limited left context and peeked look-ahead (the attention of
NeMo's cache-aware streaming Conformer, `chunked_limited` style, plus ChunkFormer-style right
context).

Frames are grouped into chunks of C frames by their logical position. Every query of chunk c
(and every look-ahead query of chunk c, see `conformer.py`) sees the same key window: the
`left` committed frames before the chunk, the C frames of the chunk, and the chunk's R
look-ahead states. This module holds the projections and computes that attention for a batch
of windows; the conformer layer builds the windows (from a cache or from the offline
sequence), so streaming and offline feed identical windows to identical code.

RoPE positions are relative to the window (key i of a window has position i, query i of the
chunk position `left + i`), so the angles are the same for every chunk, every step and every
stream length: no absolute positions, no precision loss on long streams, no position counter
in the carry.

Why not `layers/attention.py`: `StreamingAttention`'s visibility is a per-query sliding window
`[p - max_past, p + max_future]`; a chunk mask (visibility by chunk index, the same for every
query of a chunk) and look-ahead states that differ per chunk cannot be expressed there. The
score/softmax math is shared: `attention_reference` does it here too.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.layers.attention import attention_reference
from streamzoo.layers.positional import apply_rope


def chunk_windows(seq: jax.Array, cache_size: int, left: int, chunk: int,
                  num_chunks: int) -> jax.Array:
    """`seq [B, cache_size + num_chunks*chunk, ...]` (a cache of earlier frames, then the
    chunks' frames) -> `[B, num_chunks, left + chunk, ...]`: chunk j's `left` previous frames
    and its own `chunk` frames (static gather)."""
    idx = (np.arange(num_chunks)[:, None] * chunk + (cache_size - left)
           + np.arange(left + chunk)[None, :])
    return seq[:, idx]


def _linear(layer: nnx.Linear, v):
    """An `nnx.Linear` applied in the dtype of `v` (parameters stay float32)."""
    y = v @ layer.kernel[...].astype(v.dtype)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(v.dtype)
    return y


class ChunkedSelfAttention(nnx.Module):
    """Multi-head attention over per-chunk key windows (see module docstring).

    Parameters only; `project` gives un-rotated q, k, v per frame, `attend` runs the windows.
    """

    def __init__(self, features: int, num_heads: int, *, rope: bool = True,
                 rope_base: float = 10000.0, use_bias: bool = True, rngs: nnx.Rngs):
        for name, value in (("features", features), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if features % num_heads:
            raise ValueError(f"num_heads: expected a divisor of features={features}, got {num_heads}")
        head_dim = features // num_heads
        if rope and head_dim % 2:
            raise ValueError(f"num_heads: RoPE needs an even head size, got features={features} / "
                             f"num_heads={num_heads} = {head_dim}")
        self.features, self.num_heads, self.head_dim = int(features), int(num_heads), head_dim
        self.rope, self.rope_base = bool(rope), float(rope_base)
        self.qkv = nnx.Linear(features, 3 * features, use_bias=use_bias, rngs=rngs)
        self.out = nnx.Linear(features, features, use_bias=use_bias, rngs=rngs)

    def project(self, values: jax.Array):
        """`[B, T, features]` -> un-rotated q, k, v, each `[B, T, H, Dh]` (values' dtype)."""
        batch, length = values.shape[:2]
        q, k, v = jnp.split(_linear(self.qkv, values), 3, axis=-1)
        shape = (batch, length, self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, k_valid: jax.Array,
               q_offset: int) -> jax.Array:
        """Queries `[B, N, Q, H, Dh]` over their chunk's window `k, v [B, N, W, H, Dh]` with
        `k_valid [B, N, W]`; query i sits at window position `q_offset + i`. A query sees every
        valid key of its window. Returns `[B, N, Q, features]`."""
        batch, chunks, nq, heads, dh = q.shape
        width = k.shape[2]
        q = q.reshape(batch * chunks, nq, heads, dh)
        k = k.reshape(batch * chunks, width, heads, dh)
        v = v.reshape(batch * chunks, width, heads, dh)
        q_pos = jnp.broadcast_to(jnp.arange(q_offset, q_offset + nq, dtype=jnp.int32),
                                 (batch * chunks, nq))
        k_pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch * chunks, width))
        if self.rope:
            q = apply_rope(q, q_pos, base=self.rope_base)
            k = apply_rope(k, k_pos, base=self.rope_base)
        # Every valid key of the window is visible: no position rule beyond validity.
        o = attention_reference(q, k, v, q_pos, k_pos, k_valid.reshape(batch * chunks, width),
                                None, width, 0)
        o = _linear(self.out, o.reshape(batch * chunks, nq, heads * dh))
        return o.reshape(batch, chunks, nq, self.features)


__all__ = ["ChunkedSelfAttention", "chunk_windows"]
