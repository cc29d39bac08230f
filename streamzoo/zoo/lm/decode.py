"""Chunked prefill and a decode loop that runs whole inside one jitted `lax.while_loop`.

    state = start(model, prompts, keys=key, max_new_tokens=64, stop_tokens=[[eos]], chunk_size=16)
    state, tokens = generate(model, state, num_steps=64)          # tokens: Seq [B, 64]

* `prefill(model, carry, prompts, chunk_size)`: feeds the prompts through `step_hidden` in
  chunks of any size (a `lax.scan` over chunks) and projects only each row's last prompt
  position to logits. The carry and logits equal one-shot prefill (and the offline call).
* `generate(model, state, num_steps, until="all" | "any")`: per iteration, every unfinished
  row samples a token (`sampling.sample`, its own key stream) and commits it with one
  `model.step` of T=1 whose mask is the unfinished rows, so rows are desynchronised streams:
  a finished row's carry does not move. A row finishes on one of its own stop tokens (the stop
  token is emitted and committed) or when it has generated `max_new_tokens`. The loop stops
  after `num_steps` iterations, when every row is done, or (`until="any"`) as soon as any
  row finishes, so the host can reuse that row.
* `refill(model, state, rows, prompts, ...)`: row reuse (continuous batching): resets the
  rows' carry (`reset_rows`), prefills their new prompts (the other rows' prompt frames are
  masked out, so their carries are bitwise untouched) and restarts their counters.

`DecodeState` is a pytree of fixed shapes, so `generate` compiles once per (model, batch,
num_steps) and can be called again and again on its own output: the carry never grows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from streamzoo.core.drivers import chunked
from streamzoo.core.seq import Seq
from streamzoo.core.streamer import where_rows
from streamzoo.zoo.lm import paged
from streamzoo.zoo.lm.sampling import SamplingParams, row_keys, sample


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries between tokens (fixed shapes)."""

    carry: Any                 # the model carry (KV caches and positions)
    logits: jax.Array          # [B, V] float32: next-token logits after each row's last token
    keys: jax.Array            # [B] typed PRNG keys; token i of row b uses fold_in(keys[b], i)
    num_generated: jax.Array   # [B] int32 tokens generated since the row's (re)start
    max_new_tokens: jax.Array  # [B] int32 budget per row
    done: jax.Array            # [B] bool: finished (stop token or budget)
    stop_tokens: jax.Array     # [B, K] int32 per-row stop tokens, -1 = unused
    sampling: SamplingParams   # per-row temperature / top_k / top_p

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]


# ------------------------------------------------------------------ carry layouts
# The carry is the model's own (ring caches under its policy) or a `paged.PagedCache`.
def _step_hidden(model, carry, x):
    if isinstance(carry, paged.PagedCache):
        return paged.step_hidden(model, carry, x)
    return model.step_hidden(carry, x)


def _step(model, carry, x):
    if isinstance(carry, paged.PagedCache):
        return paged.step(model, carry, x)
    return model.step(carry, x)


def _reset_rows(model, carry, rows):
    if isinstance(carry, paged.PagedCache):
        return paged.free_rows(carry, rows)
    return model.reset_rows(carry, rows)


def _copy_row(carry, src, dst):
    if isinstance(carry, paged.PagedCache):
        return paged.share_prefix(carry, src, dst, carry.lengths[src])
    # The model carry is a RepeatCarry: every leaf is [L, B, ...].
    return jax.tree.map(lambda a: a.at[:, dst].set(a[:, src]), carry)


def _checked(carry):
    if isinstance(carry, paged.PagedCache):
        paged.check_overflow(carry)
    return carry


# -------------------------------------------------------------------------------- prefill
def _check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None (one shot), got "
                         f"{chunk_size!r}")


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _prefill(model, carry, prompts: Seq, chunk_size):
    chunk = chunk_size or max(prompts.length, 1)
    xs = chunked(prompts.pad_to_multiple(chunk), chunk)
    batch, features = prompts.batch_size, model.features
    dtype = model.dtype or jnp.float32

    def body(state, x):
        carry, last, seen = state
        carry, h = _step_hidden(model, carry, x)
        n = h.lengths()
        here = jnp.take_along_axis(h.values, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        return (carry, jnp.where((n > 0)[:, None], here, last), seen | (n > 0)), None

    init = (carry, jnp.zeros((batch, features), dtype), jnp.zeros((batch,), bool))
    (carry, last, seen), _ = jax.lax.scan(body, init, xs)
    return carry, model.logits_from_hidden(last), seen


def prefill(model, carry, prompts: Seq, *, chunk_size: int | None = None):
    """Commit `prompts` (a `Seq` of token ids, any per-row lengths) in chunks of `chunk_size`
    (None: one chunk). Returns `(carry, logits [B, V], has_prompt [B])`: the logits after each
    row's last prompt token (zeros where a row had no prompt frame)."""
    _check_chunk_size(chunk_size)
    model.check_input(prompts, "prompts")
    carry, logits, seen = _prefill(model, carry, prompts, chunk_size)
    return _checked(carry), logits, seen


# ---------------------------------------------------------------------------------- state
def _per_row_int(name, value, batch, minimum):
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full((batch,), arr)
    if arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer) or np.any(arr < minimum):
        raise ValueError(f"{name}: expected an int >= {minimum} or one per row ({batch},), got "
                         f"{arr.tolist()}")
    return jnp.asarray(arr, jnp.int32)


def _stop_table(stop_tokens, batch, vocab):
    """`[B, K]` int32 from None, `[K]` (all rows) or `[B, K]` (per row), -1 = unused."""
    if stop_tokens is None:
        return jnp.full((batch, 1), -1, jnp.int32)
    arr = np.asarray(stop_tokens)
    if arr.size == 0:
        return jnp.full((batch, 1), -1, jnp.int32)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr, (batch, arr.shape[0]))
    if arr.ndim != 2 or arr.shape[0] != batch or not np.issubdtype(arr.dtype, np.integer) \
            or np.any((arr < -1) | (arr >= vocab)):
        raise ValueError(f"stop_tokens: expected token ids in [0, {vocab}) (-1 = unused), shape "
                         f"[K] or [{batch}, K], got {arr.tolist()}")
    return jnp.asarray(arr, jnp.int32)


def new_state(model, carry, logits, *, keys, max_new_tokens, stop_tokens=None,
              temperature=0.0, top_k=0, top_p=1.0) -> DecodeState:
    """A `DecodeState` for rows whose prompts are committed in `carry` with next-token
    `logits [B, V]`. `keys`: one PRNG key (split per row) or one per row; `max_new_tokens`,
    sampling settings: scalars or per row; `stop_tokens`: `[K]` for all rows or `[B, K]`."""
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != model.vocab_size:
        raise ValueError(f"logits: expected shape [B, {model.vocab_size}], got {logits.shape}")
    batch = logits.shape[0]
    budget = _per_row_int("max_new_tokens", max_new_tokens, batch, 0)
    return DecodeState(
        carry=carry, logits=logits.astype(jnp.float32), keys=row_keys(keys, batch),
        num_generated=jnp.zeros((batch,), jnp.int32), max_new_tokens=budget, done=budget <= 0,
        stop_tokens=_stop_table(stop_tokens, batch, model.vocab_size),
        sampling=SamplingParams.create(batch, temperature=temperature, top_k=top_k, top_p=top_p))


def start(model, prompts: Seq, *, keys, max_new_tokens, stop_tokens=None, temperature=0.0,
          top_k=0, top_p=1.0, chunk_size: int | None = None, cache_dtype=None, carry=None) -> DecodeState:
    """`prefill` of `prompts` into `carry` (default: a fresh `model.init_carry`; pass a
    `paged.create(...)` cache for the paged layout) and `new_state`: ready for `generate`."""
    if carry is None:
        carry = model.init_carry(prompts.batch_size, cache_dtype)
    carry, logits, _ = prefill(model, carry, prompts, chunk_size=chunk_size)
    return new_state(model, carry, logits, keys=keys, max_new_tokens=max_new_tokens,
                     stop_tokens=stop_tokens, temperature=temperature, top_k=top_k, top_p=top_p)


# --------------------------------------------------------------------------------- decode
def decode_step(model, state: DecodeState):
    """One token for every unfinished row: `(state, token [B], emitted [B])`."""
    active = ~state.done
    keys = jax.vmap(jax.random.fold_in)(state.keys, state.num_generated)
    token = jnp.where(active, sample(state.logits, keys, state.sampling), 0)
    num = state.num_generated + active.astype(jnp.int32)
    stop = jnp.any(token[:, None] == state.stop_tokens, axis=1)
    finished = active & (stop | (num >= state.max_new_tokens))
    carry, y = _step(model, state.carry, Seq(token[:, None], active[:, None], compact=True))
    logits = jnp.where(active[:, None], y.values[:, 0], state.logits)
    state = state.replace(carry=carry, logits=logits, num_generated=num,
                          done=state.done | finished)
    return state, token, active


@functools.partial(jax.jit, static_argnames=("num_steps", "until"))
def _generate(model, state: DecodeState, num_steps: int, until: str):
    batch = state.batch_size
    tokens = jnp.zeros((batch, num_steps), jnp.int32)
    mask = jnp.zeros((batch, num_steps), bool)

    def cond(loop):
        i, state, _, _, finished_any = loop
        go = (i < num_steps) & jnp.any(~state.done)
        return go & ~finished_any if until == "any" else go

    def body(loop):
        i, state, tokens, mask, finished_any = loop
        was_done = state.done
        state, token, emitted = decode_step(model, state)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        mask = jax.lax.dynamic_update_slice(mask, emitted[:, None], (0, i))
        return i + 1, state, tokens, mask, finished_any | jnp.any(state.done & ~was_done)

    init = (jnp.zeros((), jnp.int32), state, tokens, mask, jnp.zeros((), bool))
    _, state, tokens, mask, _ = jax.lax.while_loop(cond, body, init)
    return state, Seq(tokens, mask, compact=True)


def generate(model, state: DecodeState, num_steps: int, *, until: str = "all"):
    """Up to `num_steps` tokens per unfinished row, in one jitted `lax.while_loop`.

    Returns `(state, tokens)`: tokens is a `Seq [B, num_steps]` whose row b holds the tokens
    row b generated in this call (a prefix; its last one is the stop token if it stopped).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if until not in ("all", "any"):
        raise ValueError(f"until: expected 'all' or 'any', got {until!r}")
    if not isinstance(state, DecodeState):
        raise ValueError(f"state: expected a DecodeState, got {type(state).__name__}")
    state, tokens = _generate(model, state, num_steps, until)
    _checked(state.carry)
    return state, tokens


def refill(model, state: DecodeState, rows, prompts: Seq, *, keys, max_new_tokens,
           stop_tokens=None, temperature=0.0, top_k=0, top_p=1.0,
           chunk_size: int | None = None) -> DecodeState:
    """Reuse the rows where `rows [B]` is True for new requests whose prompts are those rows
    of `prompts`; every other row's state is bitwise untouched."""
    batch = state.batch_size
    rows = jnp.asarray(rows)
    if rows.shape != (batch,) or rows.dtype != jnp.bool_:
        raise ValueError(f"rows: expected a bool array of shape ({batch},), got "
                         f"{rows.dtype}{list(rows.shape)}")
    model.check_input(prompts, "prompts")
    if prompts.batch_size != batch:
        raise ValueError(f"prompts: expected batch size {batch}, got {prompts.batch_size}")
    carry = _reset_rows(model, state.carry, rows)
    prompts = prompts.replace(mask=prompts.mask & rows[:, None], compact=False)
    carry, logits, _ = prefill(model, carry, prompts, chunk_size=chunk_size)
    fresh = new_state(model, carry, logits, keys=keys, max_new_tokens=max_new_tokens,
                      stop_tokens=stop_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p)
    if fresh.stop_tokens.shape != state.stop_tokens.shape:
        raise ValueError(f"stop_tokens: expected {state.stop_tokens.shape[1]} per row (as the "
                         f"running state), got {fresh.stop_tokens.shape[1]}")
    key_data = where_rows(rows, jax.random.key_data(fresh.keys), jax.random.key_data(state.keys))
    merged = where_rows(rows, fresh.replace(carry=None, keys=None),
                        state.replace(carry=None, keys=None))
    return merged.replace(carry=carry, keys=jax.random.wrap_key_data(key_data))


def fork(model, state: DecodeState, src: int, dst: int, *, key) -> DecodeState:
    """Row `dst` continues row `src`'s stream (same committed tokens and settings, its own
    key stream from `key`). With a paged cache the tokens are shared by reference (copy on
    write); with the model's ring caches they are copied."""
    batch = state.batch_size
    for name, row in (("src", src), ("dst", dst)):
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < batch:
            raise ValueError(f"{name}: expected a row index in [0, {batch}), got {row!r}")
    carry = _copy_row(state.carry, src, dst)
    copied = jax.tree.map(lambda a: a.at[dst].set(a[src]), state.replace(carry=None, keys=None))
    keys = jax.random.key_data(state.keys).at[dst].set(jax.random.key_data(row_keys(key, 1))[0])
    return copied.replace(carry=carry, keys=jax.random.wrap_key_data(keys))


__all__ = ["DecodeState", "decode_step", "fork", "generate", "new_state", "prefill", "refill",
           "start"]
