"""Streaming training: truncated BPTT through `model.step`, and dynamic-chunk helpers.

Truncated BPTT splits a long sequence into consecutive chunks, runs `model.step` on each
with the carry of the previous chunk, and stops gradients at every chunk boundary
(`lax.stop_gradient` on the incoming carry): the forward pass sees the whole history, the
backward pass only the current chunk. Because it goes through `step`, training uses exactly
the carry semantics of streaming inference (per-row counters, masked frames not committed).

* `tbptt_loss`: all chunks of a batch in one update (`lax.scan` over chunks; `remat=True`
  keeps only the carries between chunks for the backward pass).
* `make_tbptt_loss_fn`: one chunk per update, the carry kept in `TrainState.carry` across
  steps (and checkpointed with it); rows whose `batch["reset"]` is True start a new stream.
* Dynamic chunk training (U2 / WeNet style streaming ASR): `DynamicChunkSampler` draws a
  chunk size and a left context per batch (deterministically from the step, so resumed runs
  draw the same ones), and `chunk_attention_mask` turns them into an attention mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from streamzoo.core.seq import Seq

ChunkLoss = Callable[[Seq, Any], tuple[jax.Array, jax.Array]]
"""`chunk_loss(y_chunk, target_chunk) -> (loss_sum, weight)`: a chunk's summed loss and the
number of frames (or tokens) it sums over; the TBPTT loss is `sum(loss_sum) / sum(weight)`."""


def _chunk_time(tree, k: int, name: str):
    """Leaves `[B, T, ...]` -> `[K, B, T // K, ...]`."""

    def split(path, a):
        a = jnp.asarray(a)
        if a.ndim < 2 or a.shape[1] % k:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)}: expected [B, T, ...] with T divisible by the "
                f"{k} chunks, got shape {a.shape}")
        a = a.reshape(a.shape[0], k, a.shape[1] // k, *a.shape[2:])
        return jnp.moveaxis(a, 1, 0)

    return jax.tree_util.tree_map_with_path(split, tree)


def tbptt_loss(model, x: Seq, targets, chunk_loss: ChunkLoss, *, chunk_size: int, carry=None,
               remat: bool = False):
    """Truncated-BPTT loss of `model` on `x`, chunk by chunk through `model.step`.

    x: `Seq [B, T, ...]`; T must be a multiple of `chunk_size`, itself a multiple of
        `model.spec.block_size` (pad with invalid frames: `x.pad_to_multiple(chunk_size)`).
    targets: a pytree of `[B, T_out, ...]` arrays split into the same number of chunks along
        time (T_out = T * output_ratio), handed to `chunk_loss` with the chunk's output.
    carry: the carry at the start of `x` (default: a fresh one).
    Returns `(loss, (carry, chunk_losses [K]))`; the returned carry has no gradient.
    The model must have no output latency (each chunk's outputs belong to its own inputs).
    """
    spec = model.spec
    if not isinstance(x, Seq):
        raise ValueError(f"x: expected a streamzoo.Seq, got {type(x).__name__}")
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size % spec.block_size:
        raise ValueError(f"chunk_size: expected a positive multiple of block_size={spec.block_size}, "
                         f"got {chunk_size!r}")
    if x.length % chunk_size:
        raise ValueError(f"x: expected T divisible by chunk_size={chunk_size}, got T={x.length} "
                         "(pad with x.pad_to_multiple(chunk_size))")
    if spec.output_latency:
        raise ValueError(f"model: tbptt_loss needs output_latency 0 so that a chunk's outputs "
                         f"match its targets, got output_latency={spec.output_latency}")
    k = x.length // chunk_size
    if carry is None:
        carry = model.init_carry(x.batch_size)
    xs = Seq(*_chunk_time((x.values, x.mask), k, "x"), compact=x.compact)
    ts = _chunk_time(targets, k, "targets")

    def body(carry, inputs):
        x_chunk, t_chunk = inputs
        carry, y = model.step(jax.lax.stop_gradient(carry), x_chunk)
        loss_sum, weight = chunk_loss(y, t_chunk)
        return carry, (jnp.asarray(loss_sum, jnp.float32), jnp.asarray(weight, jnp.float32))

    if remat:
        body = jax.checkpoint(body)
    carry, (sums, weights) = jax.lax.scan(body, carry, (xs, ts))
    loss = sums.sum() / jnp.maximum(weights.sum(), 1.0)
    return loss, (jax.lax.stop_gradient(carry), sums / jnp.maximum(weights, 1.0))


def make_tbptt_loss_fn(chunk_loss: ChunkLoss, *, chunk_size: int | None = None,
                       inputs_key: str = "inputs", targets_key: str = "targets",
                       reset_key: str = "reset", remat: bool = False):
    """A `loss_fn(model, batch, rng, carry)` for TBPTT across train steps.

    Each batch is the next segment of B long streams: `batch[inputs_key]` a Seq,
    `batch[targets_key]` its targets and optionally `batch[reset_key] [B] bool` marking rows
    that start a new stream (their carry is re-initialised first). The segment is cut into
    chunks of `chunk_size` (default: the whole segment is one chunk). The returned aux holds
    the next carry (`aux["carry"]`, stored by `train_step` in `TrainState.carry`) and
    `weight`, the number of frames the loss averages over.
    """

    def loss_fn(model, batch, rng, carry):
        x, targets = batch[inputs_key], batch[targets_key]
        if reset_key in batch:
            carry = model.reset_rows(carry, jnp.asarray(batch[reset_key], bool))
        size = chunk_size or x.length
        loss, (carry, chunk_losses) = tbptt_loss(model, x, targets, chunk_loss, chunk_size=size,
                                                 carry=carry, remat=remat)
        return loss, {"carry": carry, "weight": x.mask.sum().astype(jnp.float32)}

    return loss_fn


# ------------------------------------------------------------------ dynamic chunk training
@dataclasses.dataclass(frozen=True)
class ChunkChoice:
    """One draw of `DynamicChunkSampler`: None means full context (offline)."""

    chunk_size: int | None
    left_chunks: int | None


@dataclasses.dataclass(frozen=True)
class DynamicChunkSampler:
    """Draws a chunk size and a left context (in chunks) per training step.

    With probability `full_context_prob` the draw is full context (both None); otherwise a
    chunk size from `chunk_sizes` and a left context from `left_chunks` (None = unlimited).
    Draws depend only on `(seed, step)`, so a resumed run draws what an unbroken one would.
    Chunk sizes are Python ints (static shapes): each distinct size compiles once.
    """

    chunk_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    left_chunks: tuple[int | None, ...] = (None,)
    full_context_prob: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if not self.chunk_sizes or any(not isinstance(c, int) or c < 1 for c in self.chunk_sizes):
            raise ValueError(f"chunk_sizes: expected positive ints, got {self.chunk_sizes!r}")
        if not self.left_chunks or any(l is not None and (not isinstance(l, int) or l < 0)
                                       for l in self.left_chunks):
            raise ValueError(f"left_chunks: expected non-negative ints or None, got {self.left_chunks!r}")
        if not 0.0 <= self.full_context_prob <= 1.0:
            raise ValueError(f"full_context_prob: expected a probability in [0, 1], "
                             f"got {self.full_context_prob!r}")

    def sample(self, step: int) -> ChunkChoice:
        rng = np.random.default_rng([self.seed, int(step)])
        if rng.random() < self.full_context_prob:
            return ChunkChoice(None, None)
        chunk = self.chunk_sizes[rng.integers(len(self.chunk_sizes))]
        left = self.left_chunks[rng.integers(len(self.left_chunks))]
        return ChunkChoice(int(chunk), None if left is None else int(left))


def chunk_attention_mask(length: int, chunk_size: int | None, left_chunks: int | None = None):
    """`[T, T]` bool: query frame i may attend key frame j (chunk-wise causal).

    Frame i sees every frame of its own chunk (look-ahead to the chunk's end) and of the
    `left_chunks` chunks before it (all earlier chunks when None). `chunk_size=None` gives
    full context. This is the training-time mask of a streaming encoder that will be run
    chunk by chunk with that chunk size and left context.
    """
    if chunk_size is None:
        return jnp.ones((length, length), bool)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")
    chunk = jnp.arange(length) // chunk_size
    q, k = chunk[:, None], chunk[None, :]
    mask = k <= q
    if left_chunks is not None:
        mask &= k >= q - left_chunks
    return mask


def random_partition(rng: np.random.Generator, length: int, chunk_sizes, block_size: int = 1) -> list[int]:
    """Random chunk lengths (multiples of `block_size`, drawn from `chunk_sizes`) summing to
    `length`; the last one is cut to fit. For training through `model.step` with ragged chunks."""
    if length % block_size:
        raise ValueError(f"length: expected a multiple of block_size={block_size}, got {length}")
    sizes = [int(c) for c in chunk_sizes]
    if not sizes or any(c < 1 or c % block_size for c in sizes):
        raise ValueError(f"chunk_sizes: expected positive multiples of block_size={block_size}, "
                         f"got {chunk_sizes!r}")
    out, left = [], length
    while left:
        c = min(sizes[rng.integers(len(sizes))], left)
        out.append(c)
        left -= c
    return out
