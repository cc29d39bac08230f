"""Cache-aware streaming Conformer (NeMo's stateful Conformer; WeNet/ChunkFormer chunk masks):
chunked attention with limited left context and look-ahead that is peeked, not committed.

**Latency setting** `Latency(chunk=C, left=Lf, lookahead=R)` (all in encoder frames). Frames
are grouped into chunks of C by logical position. At every layer, chunk c's frames see
* the `Lf` committed frames before the chunk (the left context: a cache in streaming),
* all C frames of the chunk (so a chunk is emitted at once, when it is complete), and
* R look-ahead states: the frames `(c+1)C .. (c+1)C + R - 1` run through the layers as
  extra queries of chunk c's window. They are *peeked*: their states only serve chunk c and
  are never written to a cache; the same frames are computed again, committed, as part of
  chunk c+1 (NeMo's `cache_drop_size`). So look-ahead does not accumulate with depth: the
  encoder's look-ahead is `C - 1 + R` frames whatever the number of layers.

One set of weights serves every setting (`ConformerStack.with_latency`), and the offline
(training) forward of a setting is the exact masked equivalent of streaming it: both run the
same blocked computation over per-chunk windows (`_process`), offline with an empty cache and
the whole utterance, streaming with the carry's cache and the frames that arrived.

**Block** (Macaron Conformer, pre-norm): `x += FFN(LN x)/2; x += MHSA(LN x); x += Conv(LN x);
x += FFN(LN x)/2; x = LN x`. The conv module is pointwise conv + GLU, a causal depthwise
`Conv1D` (its history of `K-1` frames is in the carry), LayerNorm (not BatchNorm: no batch or
time statistics), swish, pointwise conv. A look-ahead state's depthwise conv reads the
committed frames up to its chunk's end and then the earlier look-ahead states.

**Lengths and timing** (`ChunkedSpec`): after n valid input frames the stream has emitted
`C * floor((n - R) / C)` frames (whole chunks whose look-ahead has arrived); `flush` emits the
rest, including a final partial chunk, computed with the look-ahead that exists. Offline gives
all n frames. Frames past a row's end are never seen (as look-ahead or keys).

**Carry** (`StackCarry`): the uncommitted input frames (`< C + R`), per layer the un-rotated
keys and values of the last `max(Lf, 1)` committed frames and the depthwise conv history,
and a saturating count of committed frames (which cache slots are valid). Layer parameters
and per-layer caches are stacked `[L, ...]` and the layers run under `lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.checks import check_positive_int
from streamzoo.core.frames import take_frames
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.conv import Conv1D
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.norm import LayerNorm
from streamzoo.zoo.asr.chunked_attention import ChunkedSelfAttention, _linear, chunk_windows


# ------------------------------------------------------------------------------- latency
def _nonneg_int(name, value, minimum=0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Latency:
    """A streaming setting, in encoder frames: chunk size C, left context `left` (committed
    frames before a chunk that it attends to) and peeked look-ahead R."""

    chunk: int
    left: int
    lookahead: int = 0

    def __post_init__(self):
        object.__setattr__(self, "chunk", _nonneg_int("chunk", self.chunk, 1))
        object.__setattr__(self, "left", _nonneg_int("left", self.left))
        object.__setattr__(self, "lookahead", _nonneg_int("lookahead", self.lookahead))

    @classmethod
    def of(cls, value) -> "Latency":
        """A `Latency`, or one from a `(chunk, left, lookahead)` tuple/list or a dict."""
        if isinstance(value, Latency):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (tuple, list)) and len(value) in (2, 3):
            return cls(*value)
        raise ValueError(f"latency: expected a Latency, a (chunk, left, lookahead) tuple or a "
                         f"dict, got {value!r}")

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.chunk, self.left, self.lookahead)

    @property
    def pending_size(self) -> int:
        """Input frames a stream may hold uncommitted: at most `C + R - 1` (at least 1 slot)."""
        return max(self.chunk + self.lookahead - 1, 1)

    @property
    def cache_size(self) -> int:
        """Cached committed frames per layer: `left` (at least 1 slot)."""
        return max(self.left, 1)

    @property
    def future(self) -> int:
        """The look-ahead of the first frame of a chunk: `C - 1 + R` frames."""
        return self.chunk - 1 + self.lookahead


# ---------------------------------------------------------------------------------- spec
def _stages_of(spec: StreamSpec) -> tuple:
    return spec.offline_stages if isinstance(spec, ChunkedSpec) else spec.stages


@dataclasses.dataclass(frozen=True)
class ChunkedSpec(StreamSpec):
    """A `StreamSpec` whose offline length differs from what whole chunks give: `stages` say
    how many frames the stream emits before `flush` (whole chunks once their look-ahead is
    in), `offline_stages` how many the offline call and stream + flush give in total (a final
    partial chunk is not dropped). `then` keeps both (so a head after the encoder composes);
    a plain spec followed by this one composes with `after`."""

    offline_stages: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        if not self.offline_stages:
            object.__setattr__(self, "offline_stages", self.stages)

    def offline_length(self, n: int) -> int:
        for ratio, _ in self.offline_stages:
            n = math.floor(n * ratio)
        return n

    def then(self, nxt: StreamSpec) -> "ChunkedSpec":
        base = StreamSpec.then(self, nxt)
        return _as_chunked(base, self.offline_stages + _stages_of(nxt))

    def after(self, prefix: StreamSpec) -> "ChunkedSpec":
        """The spec of `prefix` followed by this layer."""
        return _as_chunked(prefix.then(self), _stages_of(prefix) + self.offline_stages)


def _as_chunked(spec: StreamSpec, offline_stages) -> ChunkedSpec:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(StreamSpec)}
    return ChunkedSpec(**fields, offline_stages=tuple(offline_stages))


def stack_spec(latency: Latency, num_layers: int, conv_kernel: int) -> ChunkedSpec:
    """The timing of a chunked Conformer stack at `latency` (see module docstring)."""
    c, r = latency.chunk, latency.lookahead
    past = num_layers * (latency.left + c - 1 + conv_kernel - 1)
    return ChunkedSpec(
        block_size=1, output_ratio=Fraction(1), input_latency=latency.future,
        output_latency=latency.future, receptive_field=(-float(past), float(latency.future)),
        stages=((Fraction(1), r), (Fraction(1, c), 0), (Fraction(c), 0)),
        offline_stages=((Fraction(1), 0),))


# --------------------------------------------------------------------------------- layer
def _depthwise(conv: Conv1D, v: jax.Array) -> jax.Array:
    """`conv`'s taps over `v [B, span + T, D]` without padding: `[B, T, D]` (output t reads
    `v[t : t + span + 1]`), i.e. a causal conv whose history is v's first `span` frames."""
    y = jax.lax.conv_general_dilated(
        v, conv.kernel[...].astype(v.dtype), window_strides=(1,), padding="VALID",
        rhs_dilation=(conv.dilation,), dimension_numbers=("NWC", "WIO", "NWC"),
        feature_group_count=conv.groups)
    return y + conv.bias[...].astype(y.dtype) if conv.bias is not None else y


class ConformerLayer(nnx.Module):
    """One Macaron Conformer block's parameters and its blocked chunk computation."""

    def __init__(self, d_model: int, num_heads: int, *, ff_mult: int = 4, conv_kernel: int = 15,
                 rope_base: float = 10000.0, rngs: nnx.Rngs):
        hidden = ff_mult * d_model
        self.ffn1_norm = LayerNorm(d_model)
        self.ffn1 = FeedForward(d_model, hidden, rngs=rngs)
        self.attn_norm = LayerNorm(d_model)
        self.attn = ChunkedSelfAttention(d_model, num_heads, rope_base=rope_base, rngs=rngs)
        self.conv_norm = LayerNorm(d_model)
        self.pointwise_in = nnx.Linear(d_model, 2 * d_model, rngs=rngs)
        self.depthwise = Conv1D(d_model, d_model, conv_kernel, groups=d_model, rngs=rngs)
        self.depthwise_norm = LayerNorm(d_model)
        self.pointwise_out = nnx.Linear(d_model, d_model, rngs=rngs)
        self.ffn2_norm = LayerNorm(d_model)
        self.ffn2 = FeedForward(d_model, hidden, rngs=rngs)
        self.out_norm = LayerNorm(d_model)

    def process(self, h, h_valid, a, a_valid, cache_k, cache_v, cache_valid, conv_history,
                count, latency: Latency):
        """One layer over N chunk slots.

        h `[B, N*C, D]` the chunks' committed frames (`h_valid [B, N*C]`, a per-row prefix);
        a `[B, N, R, D]` each chunk's look-ahead states (`a_valid [B, N, R]`), or None when
        R = 0; `cache_k/v [B, S, H, Dh]` and `cache_valid [B, S]` the committed frames before
        the first slot; `conv_history [B, K-1, D]` the depthwise conv's input history; `count
        [B]` how many frames of h this call commits (cache updates).
        Returns `(h, a, cache_k, cache_v, conv_history)`, the caches advanced by `count`.
        """
        batch, nc, d = h.shape
        c, r, left = latency.chunk, latency.lookahead, latency.left
        n = nc // c
        if r:
            z = jnp.concatenate([h, a.reshape(batch, n * r, d)], axis=1)
            zv = jnp.concatenate([h_valid, a_valid.reshape(batch, n * r)], axis=1)
        else:
            z, zv = h, h_valid

        def seq(values):
            return Seq(values, zv)

        def masked(values):
            return jnp.where(zv[..., None], values, jnp.zeros((), values.dtype))

        z = z + 0.5 * self.ffn1(self.ffn1_norm(seq(z))).values

        # Chunked self-attention: chunk j's queries (its frames, then its look-ahead states)
        # over [left committed frames, the chunk, its look-ahead states].
        q, k, v = self.attn.project(self.attn_norm(seq(z)).values)
        size = cache_k.shape[1]
        k_seq = jnp.concatenate([cache_k.astype(k.dtype), k[:, :nc]], axis=1)
        v_seq = jnp.concatenate([cache_v.astype(v.dtype), v[:, :nc]], axis=1)
        valid_seq = jnp.concatenate([cache_valid, h_valid], axis=1)
        kw = chunk_windows(k_seq, size, left, c, n)
        vw = chunk_windows(v_seq, size, left, c, n)
        valid_w = chunk_windows(valid_seq, size, left, c, n)
        heads = q.shape[2:]
        qw = q[:, :nc].reshape(batch, n, c, *heads)
        if r:
            qw = jnp.concatenate([qw, q[:, nc:].reshape(batch, n, r, *heads)], axis=2)
            kw = jnp.concatenate([kw, k[:, nc:].reshape(batch, n, r, *heads)], axis=2)
            vw = jnp.concatenate([vw, v[:, nc:].reshape(batch, n, r, *heads)], axis=2)
            valid_w = jnp.concatenate([valid_w, a_valid], axis=2)
        o = self.attn.attend(qw, kw, vw, valid_w, q_offset=left)
        o = o[:, :, :c].reshape(batch, nc, d) if not r else jnp.concatenate(
            [o[:, :, :c].reshape(batch, nc, d), o[:, :, c:].reshape(batch, n * r, d)], axis=1)
        z = z + masked(o)
        new_k = take_frames(k_seq, count, size).astype(cache_k.dtype)
        new_v = take_frames(v_seq, count, size).astype(cache_v.dtype)

        # Conv module: GLU, causal depthwise conv (committed frames continue the history;
        # look-ahead states continue their chunk's committed frames), LayerNorm, swish.
        g = jax.nn.glu(_linear(self.pointwise_in, self.conv_norm(seq(z)).values), axis=-1)
        history = conv_history.astype(g.dtype)
        hs = history.shape[1]
        g_seq = jnp.concatenate([history, g[:, :nc]], axis=1)  # frame t at hs + t
        dw = _depthwise(self.depthwise, g_seq[:, hs - self.depthwise.span:])
        new_history = take_frames(g_seq, count, hs)
        if r:
            # Chunk j's look-ahead states continue the `span` committed frames before (j+1)C.
            span = self.depthwise.span
            idx = np.arange(1, n + 1)[:, None] * c + np.arange(hs - span, hs)[None, :]
            windows = jnp.concatenate([g_seq[:, idx], g[:, nc:].reshape(batch, n, r, d)], axis=2)
            da = _depthwise(self.depthwise, windows.reshape(batch * n, -1, d))
            dw = jnp.concatenate([dw, da.reshape(batch, n * r, d)], axis=1)
        dw = jax.nn.silu(self.depthwise_norm(seq(dw)).values)
        z = z + masked(_linear(self.pointwise_out, dw))

        z = z + 0.5 * self.ffn2(self.ffn2_norm(seq(z))).values
        z = self.out_norm(seq(z)).values
        a_out = z[:, nc:].reshape(batch, n, r, d) if r else None
        return z[:, :nc], a_out, new_k, new_v, new_history.astype(conv_history.dtype)


# --------------------------------------------------------------------------------- stack
@struct.dataclass
class StackCarry:
    """Streaming state of a `ConformerStack` at one latency (the latency is static data, so
    a carry of another setting is rejected by structure)."""

    pending: jax.Array  # [B, P, D] uncommitted input frames, oldest first (P = C + R - 1)
    pending_count: jax.Array  # [B] int32 valid frames in `pending`
    committed: jax.Array  # [B] int32 committed frames, saturating at the cache size S
    k: jax.Array  # [L, B, S, H, Dh] un-rotated keys of the last S committed frames per layer
    v: jax.Array  # [L, B, S, H, Dh]
    conv: jax.Array  # [L, B, K-1, D] depthwise conv input history per layer
    latency: Latency = struct.field(pytree_node=False)

    @property
    def batch_size(self) -> int:
        return self.pending.shape[0]


def merge_rows(pending: jax.Array, count: jax.Array, new: jax.Array,
               new_count: jax.Array) -> jax.Array:
    """Per row b: `pending[b, :count[b]] ++ new[b, :new_count[b]]`, then zeros, in a
    `[B, P + T, ...]` buffer."""
    size = pending.shape[1]
    t = jnp.arange(size + new.shape[1])[None, :]
    src = jnp.where(t < count[:, None], t, size + t - count[:, None])
    src = jnp.minimum(src, size + new.shape[1] - 1)
    both = jnp.concatenate([pending, new.astype(pending.dtype)], axis=1)
    out = jnp.take_along_axis(both, src.reshape(src.shape + (1,) * (both.ndim - 2)), axis=1)
    keep = t < (count + new_count)[:, None]
    return jnp.where(keep.reshape(keep.shape + (1,) * (out.ndim - 2)), out,
                     jnp.zeros((), out.dtype))


class ConformerStack(StreamLayer):
    """`num_layers` chunked Conformer blocks at a `latency` (see module docstring):
    `[B, T, d_model] -> [B, T, d_model]`.

    The same parameters serve every latency: `with_latency(...)` returns a streamer view at
    another setting, and `forward_at(x, latency)` is the offline forward of any setting.
    """

    def __init__(self, d_model: int, num_layers: int, num_heads: int, *, latency,
                 ff_mult: int = 4, conv_kernel: int = 15, rope_base: float = 10000.0,
                 dtype=None, rngs: nnx.Rngs):
        self.in_features = self.out_features = check_positive_int("d_model", d_model)
        self.num_layers = check_positive_int("num_layers", num_layers)
        check_positive_int("ff_mult", ff_mult)
        self.conv_kernel = check_positive_int("conv_kernel", conv_kernel)
        self.latency = Latency.of(latency)
        self.dtype = dtype
        check_positive_int("num_heads", num_heads)
        if d_model % num_heads or (d_model // num_heads) % 2:
            raise ValueError(f"num_heads: expected a divisor of d_model={d_model} giving an even "
                             f"head size (RoPE), got {num_heads}")
        keys = jax.random.split(rngs.params(), num_layers)
        self.layers = jax.vmap(lambda k: ConformerLayer(
            d_model, num_heads, ff_mult=ff_mult, conv_kernel=conv_kernel, rope_base=rope_base,
            rngs=nnx.Rngs(params=k)))(keys)
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads

    # ------------------------------------------------------------------ latency API
    def with_latency(self, latency=None, **kwargs) -> "AtLatency":
        """This stack (same parameters) as a streamer at another setting: a `Latency`, a
        `(chunk, left, lookahead)` tuple, or keywords `chunk=, left=, lookahead=`."""
        return AtLatency(self, latency_arg(latency, kwargs))

    @property
    def spec(self) -> ChunkedSpec:
        return self.spec_at(self.latency)

    def spec_at(self, latency: Latency) -> ChunkedSpec:
        return stack_spec(latency, self.num_layers, self.conv_kernel)

    @property
    def history_size(self) -> int:
        return max(self.conv_kernel - 1, 1)

    # ------------------------------------------------------------------------ paths
    def _init_carry(self, batch_size, dtype):
        return self.init_carry_at(batch_size, dtype, self.latency)

    def init_carry_at(self, batch_size, dtype, latency: Latency) -> StackCarry:
        dtype = dtype or self.dtype or jnp.float32
        L, d, s = self.num_layers, self.in_features, latency.cache_size
        kv = (L, batch_size, s, self.num_heads, self.head_dim)
        return StackCarry(
            pending=jnp.zeros((batch_size, latency.pending_size, d), dtype),
            pending_count=jnp.zeros((batch_size,), jnp.int32),
            committed=jnp.zeros((batch_size,), jnp.int32),
            k=jnp.zeros(kv, dtype), v=jnp.zeros(kv, dtype),
            conv=jnp.zeros((L, batch_size, self.history_size, d), dtype), latency=latency)

    def _process(self, carry: StackCarry, buf, count, final: bool, latency: Latency):
        """Run the chunks of `buf [B, total, D]` whose row prefix `count [B]` is valid.

        Streaming (`final=False`): the whole chunks whose look-ahead has arrived. End of
        stream (`final=True`, flush and offline): every remaining frame, the last chunk
        possibly partial, with the look-ahead that exists. Returns `(out Seq [B, N*C, D],
        committed [B], (k, v, conv))`.
        """
        c, r = latency.chunk, latency.lookahead
        batch, total, d = buf.shape
        if final:
            n = -(-total // c)
            chunks = (count + c - 1) // c
        else:
            n = max(total - r, 0) // c
            chunks = jnp.clip((count - r) // c, 0, n)
        dtype = buf.dtype
        if n == 0:
            empty = Seq.empty(batch, (d,), dtype)
            return empty, jnp.zeros((batch,), jnp.int32), (carry.k, carry.v, carry.conv)
        need = n * c + r
        if need > total:
            buf = jnp.pad(buf, ((0, 0), (0, need - total), (0, 0)))
        done = jnp.minimum(count, chunks * c)  # frames of this call's chunks (committed)
        h = buf[:, :n * c]
        h_valid = jnp.arange(n * c)[None, :] < done[:, None]
        if r:
            idx = np.arange(1, n + 1)[:, None] * c + np.arange(r)[None, :]  # [N, R]
            a = buf[:, idx]
            a_valid = ((np.arange(n)[None, :, None] < chunks[:, None, None])
                       & (idx[None] < count[:, None, None]))
        else:
            a = a_valid = None
        s = latency.cache_size
        cache_valid = jnp.arange(s)[None, :] >= (s - carry.committed)[:, None]

        def body(state, layer_and_cache):
            hh, aa = state
            layer, (ck, cv, hist) = layer_and_cache
            hh, aa, ck, cv, hist = layer.process(hh, h_valid, aa, a_valid, ck, cv, cache_valid,
                                                 hist, done, latency)
            return (hh, aa), (ck, cv, hist)

        (h, _), caches = jax.lax.scan(body, (h, a), (self.layers, (carry.k, carry.v, carry.conv)),
                                      length=self.num_layers)
        return Seq(h, h_valid, compact=True).masked(), done, caches

    def _forward(self, x: Seq) -> Seq:
        return self.forward_at(x, self.latency)

    def forward_at(self, x: Seq, latency: Latency) -> Seq:
        """Offline forward of the compact `x` at `latency` (the exact masked equivalent of
        streaming it): `[B, T, D] -> [B, T, D]`."""
        dtype = self.dtype or x.dtype
        if x.length == 0:
            return Seq.empty(x.batch_size, (self.out_features,), dtype)
        carry = self.init_carry_at(x.batch_size, dtype, latency)
        out, _, _ = self._process(carry, x.values.astype(dtype), x.lengths(), True, latency)
        return out.time_slice(0, x.length)

    def _step(self, carry: StackCarry, x: Seq):
        return self.step_at(carry, x, self.latency)

    def step_at(self, carry: StackCarry, x: Seq, latency: Latency):
        """Streaming step (x compact) at `latency` (the carry's setting)."""
        dtype = self.dtype or x.dtype
        count = carry.pending_count + x.lengths()
        buf = merge_rows(carry.pending.astype(dtype), carry.pending_count, x.values.astype(dtype),
                         x.lengths())
        out, done, (k, v, conv) = self._process(carry, buf, count, False, latency)
        size = latency.pending_size
        # The frames after this call's chunks stay pending; slots past them are zeros, so the
        # carry does not depend on how the input was chunked.
        pending = take_frames(buf, done, size)
        keep = jnp.arange(size)[None, :] < (count - done)[:, None]
        pending = jnp.where(keep[..., None], pending, jnp.zeros((), pending.dtype))
        pending = pending.astype(carry.pending.dtype)
        committed = jnp.minimum(carry.committed + done, latency.cache_size)
        return StackCarry(pending, count - done, committed, k, v, conv, latency), out

    def _flush(self, carry: StackCarry, batch_size):
        return self.flush_at(carry, batch_size, self.latency)

    def flush_at(self, carry: StackCarry, batch_size, latency: Latency):
        """Emit the pending frames as final chunks; the carry is returned unchanged (the
        stream is over; `reset_rows` reuses a row)."""
        dtype = self.dtype or carry.pending.dtype
        out, _, _ = self._process(carry, carry.pending.astype(dtype), carry.pending_count, True,
                                  latency)
        return carry, out

    def _reset_rows(self, carry: StackCarry, rows, batch_size):
        return self.reset_rows_at(carry, rows, batch_size, carry.latency)

    def reset_rows_at(self, carry: StackCarry, rows, batch_size, latency: Latency):
        fresh = self.init_carry_at(batch_size, carry.pending.dtype, latency)

        def pick(new, old, axis):
            shape = [1] * old.ndim
            shape[axis] = rows.shape[0]
            return jnp.where(rows.reshape(shape), new.astype(old.dtype), old)

        return StackCarry(
            pick(fresh.pending, carry.pending, 0), pick(fresh.pending_count, carry.pending_count, 0),
            pick(fresh.committed, carry.committed, 0), pick(fresh.k, carry.k, 1),
            pick(fresh.v, carry.v, 1), pick(fresh.conv, carry.conv, 1), latency)


# ---------------------------------------------------------------------------------- view
def latency_arg(latency, kwargs) -> Latency:
    """The `Latency` named by `with_latency(latency)` or `with_latency(chunk=, left=, lookahead=)`."""
    if latency is not None and kwargs:
        raise ValueError(f"latency: pass a Latency or keywords, got both {latency!r} and {kwargs}")
    if latency is None:
        if not kwargs:
            raise ValueError("latency: expected a Latency, a (chunk, left, lookahead) tuple or "
                             "keywords chunk=, left=, lookahead=; got nothing")
        return Latency(**kwargs)
    return Latency.of(latency)


class AtLatency(StreamLayer):
    """A streamer view of a multi-latency model (`ConformerStack`, `ConformerEncoder`) at one
    `Latency`. It holds the model itself (shared parameters, no copy): training the model
    trains every view."""

    def __init__(self, base, latency: Latency):
        self.base = base
        self.latency = Latency.of(latency)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.dtype = getattr(base, "dtype", None)

    @property
    def spec(self):
        return self.base.spec_at(self.latency)

    def input_kind(self):
        return self.base.input_kind()

    def with_latency(self, latency=None, **kwargs) -> "AtLatency":
        return self.base.with_latency(latency, **kwargs)

    def _init_carry(self, batch_size, dtype):
        return self.base.init_carry_at(batch_size, dtype, self.latency)

    def _forward(self, x):
        return self.base.forward_at(x, self.latency)

    def _step(self, carry, x):
        return self.base.step_at(carry, x, self.latency)

    def _flush(self, carry, batch_size):
        return self.base.flush_at(carry, batch_size, self.latency)

    def _reset_rows(self, carry, rows, batch_size):
        return self.base.reset_rows_at(carry, rows, batch_size, self.latency)


__all__ = ["AtLatency", "ChunkedSpec", "ConformerLayer", "ConformerStack", "Latency",
           "StackCarry", "merge_rows", "stack_spec"]
