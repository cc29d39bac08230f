"""`StreamingLM`: a decoder-only transformer (RoPE, GQA, RMSNorm, SwiGLU, optionally tied
embeddings) whose attention keeps its KV cache under a pluggable policy.

Token ids in (`Seq` of int32 `[B, T]`), next-token logits out (`[B, T, vocab]`, float32).
The offline call is the teacher-forced training path; `step` is cached decode and prefill
(any chunk length), and the two agree for every policy (`streamzoo.layers.kv_policies`):
the model is a `StreamLayer` and passes the streaming-contract harness.

Layers are pre-norm residual blocks `h = x + attn(norm(x)); y = h + ffn(norm(h))`, stacked
with `Repeat`, so parameters and the carry are `[L, ...]`: the carry is a `RepeatCarry` whose
`layers` is one `AttentionCarry` with every leaf `[L, B, ...]` (the only state of the model).

Beyond the contract, for decoding (`streamzoo.zoo.lm.decode`) and speculative decoding:

* `hidden(x)` / `step_hidden(carry, x)`: final-normed hidden states `[B, T, features]`, and
  `logits_from_hidden(h)`: the vocabulary projection, so prefill projects only its last frame.
* `positions(carry)`: committed tokens per row `[B]`.
* `rollback(carry, count)`: un-commit the last `count[b]` tokens of each row, exact for
  `count <= max_rollback` (the constructor argument: spare ring slots per layer).
* `reset_rows(carry, rows)`: row reuse for continuous batching.
* `with_policy(model, policy)`: the same parameters under another cache policy.
* `permute_kv_heads(model, order)`: reorder KV heads per layer (DuoAttention: move each layer's
  retrieval heads to where a `PerHead` policy expects them); outputs do not change.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.combinators import Repeat, RepeatCarry
from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.kv_policies import KVPolicy
from streamzoo.layers.norm import RMSNorm


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


class DecoderBlock(StreamLayer):
    """`h = x + attn(norm(x)); y = h + ffn(norm(h))`; the carry is the attention's."""

    def __init__(self, features: int, num_heads: int, num_kv_heads: int, hidden: int, *,
                 policy: KVPolicy, max_rollback: int = 0, rope_base: float = 10000.0,
                 dtype=None, rngs: nnx.Rngs):
        self.in_features = self.out_features = features
        self.dtype = dtype
        self.attn_norm = RMSNorm(features)
        self.attn = StreamingAttention(features, num_heads, num_kv_heads=num_kv_heads,
                                       policy=policy, max_rollback=max_rollback,
                                       rope_base=rope_base, dtype=dtype, rngs=rngs)
        self.ffn_norm = RMSNorm(features)
        self.ffn = FeedForward(features, hidden, gated=True, use_bias=False, dtype=dtype,
                               rngs=rngs)

    @property
    def spec(self):
        return self.attn.spec

    def _init_carry(self, batch_size, dtype):
        return self.attn.init_carry(batch_size, dtype)

    def with_attention(self, x: Seq, attend):
        """The block around any attention: `attend(norm(x)) -> (attention output, aux)`;
        returns `(y, aux)`. (The paged decode path plugs its own KV layout in here.)"""
        a, aux = attend(self.attn_norm(x))
        h = x.replace(values=x.values + a.values.astype(x.dtype))
        f = self.ffn(self.ffn_norm(h))
        return h.replace(values=h.values + f.values.astype(h.dtype)).masked(), aux

    def _forward(self, x: Seq) -> Seq:
        return self.with_attention(x, lambda xn: (self.attn(xn), None))[0]

    def _step(self, carry, x: Seq):
        y, carry = self.with_attention(x, lambda xn: self.attn.step(carry, xn)[::-1])
        return carry, y


class StreamingLM(StreamLayer):
    """Decoder-only LM over token ids; see the module docstring.

    Args:
      vocab_size, features, num_layers, num_heads, num_kv_heads (GQA when < num_heads),
        hidden (SwiGLU width): the architecture; head size is `features // num_heads`.
      policy: the KV-cache policy of every layer's attention (`FullCache`, `SlidingWindow`,
        `SinksWindow`, `PerHead`/`duo_attention`).
      tie_embeddings: logits use the transposed token embedding (else a separate head).
      max_rollback: spare cache slots so that `rollback` un-commits up to this many tokens.
      dtype: compute dtype (parameters stay float32; logits are returned in float32).
    """

    def __init__(self, vocab_size: int, features: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, hidden: int, *, policy: KVPolicy,
                 tie_embeddings: bool = True, max_rollback: int = 0,
                 rope_base: float = 10000.0, dtype=None, rngs: nnx.Rngs):
        _check_int("vocab_size", vocab_size, 1)
        _check_int("features", features, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("hidden", hidden, 1)
        if not isinstance(policy, KVPolicy):
            raise ValueError(f"policy: expected a KVPolicy (streamzoo.layers.kv_policies), got "
                             f"{type(policy).__name__}")
        self.vocab_size, self.features, self.num_layers = int(vocab_size), int(features), int(num_layers)
        self.num_heads, self.num_kv_heads, self.hidden_size = num_heads, num_kv_heads, int(hidden)
        self.policy, self.max_rollback, self.rope_base = policy, max_rollback, rope_base
        self.tie_embeddings = bool(tie_embeddings)
        self.dtype = dtype
        self.in_features = ()
        self.out_features = self.vocab_size
        self.embed = nnx.Embed(vocab_size, features, rngs=rngs)
        self.blocks = Repeat(
            lambda r: DecoderBlock(features, num_heads, num_kv_heads, hidden, policy=policy,
                                   max_rollback=max_rollback, rope_base=rope_base, dtype=dtype,
                                   rngs=r), num_layers, rngs=rngs)
        self.final_norm = RMSNorm(features)
        self.head = None if tie_embeddings else nnx.Linear(features, vocab_size, use_bias=False,
                                                           rngs=rngs)

    # ------------------------------------------------------------------------- facts
    @property
    def input_frame_shape(self):
        return ()

    def input_kind(self):
        return jnp.integer

    def output_dtype(self, input_dtype=None):
        return jnp.float32

    @property
    def spec(self):
        return self.blocks.spec

    @property
    def attention(self) -> StreamingAttention:
        """The (stacked) attention module; `attention.groups` describes the cache groups."""
        return self.blocks.layers.attn

    # ----------------------------------------------------------------------- pieces
    def _embed(self, tokens):
        """Token ids `[B, T]` -> `[B, T, D]` in the compute dtype (ids outside the vocabulary
        give NaN, loudly, rather than a silently clipped id)."""
        table = self.embed.embedding[...]
        return jnp.take(table, tokens, axis=0, mode="fill", fill_value=jnp.nan).astype(
            self.dtype or jnp.float32)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Final hidden states `[..., D]` -> logits `[..., vocab]` (float32)."""
        if self.tie_embeddings:
            w = self.embed.embedding[...].astype(h.dtype)
            return jnp.einsum("...d,vd->...v", h, w).astype(jnp.float32)
        return (h @ self.head.kernel[...].astype(h.dtype)).astype(jnp.float32)

    def _logits(self, h: Seq) -> Seq:
        return Seq(self.logits_from_hidden(h.values), h.mask, compact=True).masked()

    # ------------------------------------------------------------------------ paths
    def _init_carry(self, batch_size, dtype):
        return self.blocks.init_carry(batch_size, dtype or self.dtype)

    def _reset_rows(self, carry, rows, batch_size):
        return self.blocks.reset_rows(carry, rows)

    def _hidden(self, x: Seq) -> Seq:
        h = Seq(self._embed(x.values), x.mask, compact=True).masked()
        return self.final_norm(self.blocks(h))

    def _step_hidden(self, carry, x: Seq):
        h = Seq(self._embed(x.values), x.mask, compact=True).masked()
        carry, h = self.blocks.step(carry, h)
        return carry, self.final_norm(h)

    def _forward(self, x: Seq) -> Seq:
        return self._logits(self._hidden(x))

    def _step(self, carry, x: Seq):
        carry, h = self._step_hidden(carry, x)
        return carry, self._logits(h)

    # ------------------------------------------------------------------- public extras
    def hidden(self, x: Seq) -> Seq:
        """Offline final-normed hidden states `[B, T, features]` (logits = `logits_from_hidden`)."""
        self.check_input(x, "x")
        return self._hidden(x.compacted())

    def step_hidden(self, carry, x: Seq):
        """`step` that returns final-normed hidden states instead of logits."""
        self.check_input(x, "x")
        self.check_carry(carry, x.batch_size)
        return self._step_hidden(carry, x.compacted())

    def positions(self, carry) -> jax.Array:
        """Committed tokens per row, `[B]` int32."""
        return carry.layers.pos[0]

    def rollback(self, carry, count) -> RepeatCarry:
        """Un-commit the last `count[b]` tokens of each row; exact for `count <= max_rollback`."""
        batch = self.positions(carry).shape[0]
        self.check_carry(carry, batch)
        attn = self.attention
        return RepeatCarry(jax.vmap(lambda c: attn.rollback(c, count))(carry.layers))


def with_policy(model: StreamingLM, policy: KVPolicy, *, max_rollback: int | None = None,
                dtype=...) -> StreamingLM:
    """The same parameters under another KV-cache policy (parameters do not depend on it):
    train with `FullCache(context)`, then evaluate or serve with `SinksWindow`, `PerHead`, ...
    `max_rollback` and `dtype` default to the model's."""
    max_rollback = model.max_rollback if max_rollback is None else max_rollback
    dtype = model.dtype if dtype is ... else dtype
    new = nnx.eval_shape(lambda: StreamingLM(
        model.vocab_size, model.features, model.num_layers, model.num_heads, model.num_kv_heads,
        model.hidden_size, policy=policy, tie_embeddings=model.tie_embeddings,
        max_rollback=max_rollback, rope_base=model.rope_base, dtype=dtype, rngs=nnx.Rngs(0)))
    nnx.update(new, nnx.state(model, nnx.Param))
    return new


def permute_kv_heads(model: StreamingLM, order) -> StreamingLM:
    """A copy of `model` whose layer l has KV head i = the original's KV head `order[l][i]`
    (with the query heads that read it). Outputs are unchanged; under a `PerHead` policy this
    chooses which heads of each layer get which cache (DuoAttention's per-layer retrieval heads).
    """
    attn = model.attention
    layers, hkv = model.num_layers, attn.num_kv_heads
    order = np.asarray(order)
    if order.shape != (layers, hkv) or any(sorted(row) != list(range(hkv)) for row in order):
        raise ValueError(f"order: expected a permutation of range({hkv}) per layer, shape "
                         f"({layers}, {hkv}), got {order.tolist()}")
    per, dh, h = attn.num_heads // hkv, attn.head_dim, attn.num_heads
    q_cols, qkv_cols = [], []
    for row in order:
        q_heads = [kv * per + g for kv in row for g in range(per)]
        q = [hd * dh + d for hd in q_heads for d in range(dh)]
        k = [h * dh + kv * dh + d for kv in row for d in range(dh)]
        v = [(h + hkv) * dh + kv * dh + d for kv in row for d in range(dh)]
        q_cols.append(q)
        qkv_cols.append(q + k + v)
    q_cols, qkv_cols = jnp.asarray(q_cols), jnp.asarray(qkv_cols)
    new = nnx.clone(model)
    a = new.blocks.layers.attn
    a.qkv.kernel[...] = jnp.take_along_axis(a.qkv.kernel[...], qkv_cols[:, None, :], axis=2)
    if a.qkv.bias is not None:
        a.qkv.bias[...] = jnp.take_along_axis(a.qkv.bias[...], qkv_cols, axis=1)
    a.out.kernel[...] = jnp.take_along_axis(a.out.kernel[...], q_cols[:, :, None], axis=1)
    return new
