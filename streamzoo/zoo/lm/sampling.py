"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), per row, explicit keys.

Parameters are per-row arrays (`SamplingParams`), so one compiled decode loop serves a batch
of requests with different settings. The order is the usual one: temperature scales the
logits, top-k keeps the k most likely tokens, top-p then keeps the smallest set of those
whose (renormalised) probability reaches p. A row with `temperature == 0` is greedy (argmax).

Randomness is explicit: each row has its own key and draws token i of its stream with
`fold_in(key[b], i)`, so a row's samples do not depend on the batch it runs in, on the
chunking of the decode loop, or on rows being reused around it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingParams:
    """Per-row sampling settings: `temperature [B]` (0 = greedy), `top_k [B]` (0 = off),
    `top_p [B]` (1 = off)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def create(cls, batch_size: int, *, temperature=0.0, top_k=0, top_p=1.0) -> "SamplingParams":
        """Scalars or `[B]` arrays; checked here, eagerly (values must be concrete)."""
        def per_row(name, value, dtype, ok, what):
            arr = np.asarray(value)
            if arr.ndim == 0:
                arr = np.full((batch_size,), arr)
            if arr.shape != (batch_size,):
                raise ValueError(f"{name}: expected a scalar or shape ({batch_size},), got "
                                 f"shape {arr.shape}")
            if not np.all(ok(arr)):
                raise ValueError(f"{name}: expected {what}, got {arr.tolist()}")
            return jnp.asarray(arr, dtype)

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        return cls(
            per_row("temperature", temperature, jnp.float32,
                    lambda a: np.isfinite(a) & (a >= 0), "finite values >= 0"),
            per_row("top_k", top_k, jnp.int32,
                    lambda a: (a >= 0) & (a == np.round(a)), "integers >= 0 (0 = off)"),
            per_row("top_p", top_p, jnp.float32,
                    lambda a: (a > 0) & (a <= 1), "values in (0, 1] (1 = off)"))


def keep_mask(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """`[B, V]` bool: the tokens top-k and then top-p keep (after temperature) per row.

    Ties at the top-k boundary are broken by token id (exactly k tokens are kept). Top-p keeps
    a token when the probability mass of the tokens ranked before it is below p, so the most
    likely token is always kept.
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1, stable=True)             # rank -> token
    ranked = jnp.take_along_axis(logits, order, axis=-1).astype(jnp.float32)
    rank = jnp.arange(vocab)[None]
    top_k = params.top_k[:, None]
    keep = (top_k <= 0) | (rank < top_k)
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, ranked / temp, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (before < params.top_p[:, None]) | (rank == 0)
    inverse = jnp.argsort(order, axis=-1)                          # token -> rank
    return jnp.take_along_axis(keep, inverse, axis=-1)


def filtered_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature-scaled logits with the tokens outside `keep_mask` at -inf (float32)."""
    temp = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    scaled = logits.astype(jnp.float32) / temp
    return jnp.where(keep_mask(logits, params), scaled, -jnp.inf)


def sample(logits: jax.Array, keys: jax.Array, params: SamplingParams) -> jax.Array:
    """One token per row, `[B]` int32, from logits `[B, V]` with one key per row `[B]`."""
    filt = filtered_logits(logits, params)
    drawn = jax.vmap(jax.random.categorical)(keys, filt).astype(jnp.int32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(params.temperature > 0, drawn, greedy)


def row_keys(keys, batch_size: int) -> jax.Array:
    """`[B]` typed PRNG keys: `keys` itself when it is one key per row, else `batch_size` keys
    split from one key (or from an int seed)."""
    if isinstance(keys, int) and not isinstance(keys, bool):
        keys = jax.random.key(keys)
    if not (isinstance(keys, jax.Array) and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)):
        raise ValueError(f"keys: expected a typed PRNG key (jax.random.key) or an int seed, got "
                         f"{type(keys).__name__} {getattr(keys, 'dtype', '')}")
    if keys.shape == (batch_size,):
        return keys
    if keys.shape == ():
        return jax.random.split(keys, batch_size)
    raise ValueError(f"keys: expected one key or one per row, shape ({batch_size},), got shape "
                     f"{keys.shape}")


__all__ = ["SamplingParams", "filtered_logits", "keep_mask", "row_keys", "sample"]
