"""RNN-T (transducer) head: predictor, joint network, RNN-T loss and streaming greedy decoding.

* `Predictor(vocab_size, embed_dim, hidden)`: a `StreamLayer` over label tokens `[B, U]` int
  -> `[B, U, hidden]` (embedding + `layers.recurrent.LSTM`); its carry is the LSTM state. The
  blank id doubles as the start-of-sequence token.
* `Joint(enc_features, pred_features, hidden, vocab_size)`:
  `logits = W_out tanh(W_enc enc + W_pred pred + b)`, broadcast over `[B, T, U+1]` in training.
* `Transducer(enc_features, vocab_size, ...)`: predictor + joint. `loss(enc, labels,
  label_lengths) -> [B]` is the RNN-T negative log-likelihood of each row.
* `rnnt_loss(logits, labels, frame_lengths, label_lengths) -> [B]`: the loss on a joint
  lattice `[B, T, U+1, V]`.
* `RNNTGreedyDecoder(transducer, max_symbols_per_frame)`: a `StreamLayer` from encoder frames
  `[B, T, D]` to the tokens emitted at each frame `[B, T, S]` int32 (-1 = none; S is the cap);
  its carry holds the predictor state and the last emitted token.

RNN-T loss. With `lp = log_softmax(logits)`, `blank(t, u) = lp[t, u, blank]` and
`emit(t, u) = lp[t, u, y_{u+1}]`, the forward variable over the lattice t < T_b, u <= U_b is

    alpha(0, 0) = 0,   alpha(t, u) = logaddexp(alpha(t-1, u) + blank(t-1, u),
                                               alpha(t, u-1) + emit(t, u-1))

and `loss = -(alpha(T_b-1, U_b) + blank(T_b-1, U_b))` (every alignment ends with a blank on the
last frame). Cells on one anti-diagonal `d = t + u` depend only on diagonal d-1, so a
`lax.scan` over the T+U diagonals updates a whole diagonal (a vector over u) per step: T+U
sequential steps instead of T*U. Padded frames and labels lie outside each row's lattice and
are never read. A row without frames gets 0 if it has no labels, else about 1e5 (like CTC).

Greedy decoding, per frame t and row: up to S times, run the predictor on the last emitted
token (from the state before it), take the joint's argmax at (t, that output); a blank ends the
frame, another token is emitted and becomes the last token. The carry therefore needs no
parameter values (`init_carry` is zeros plus the blank as the start token); the price is one
predictor cell per frame for the frame's final blank. The symbol loop is a `lax.while_loop`
(early exit once every row has emitted its blank), so the decoder is not reverse-mode
differentiable (its outputs are integers anyway). Offline and streaming share this code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.checks import check_float_dtype, check_positive_int
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.recurrent import LSTM, LSTMCarry, project
from streamzoo.zoo.asr.ctc import LOG_EPSILON
from streamzoo.zoo.asr.text import check_blank_id, check_labels

_NEG = -1e30  # "impossible" inside the lattice recursion (finite: gradients stay finite)


def _linear(layer: nnx.Linear, v):
    y = v @ layer.kernel[...].astype(v.dtype)
    return y if layer.bias is None else y + layer.bias[...].astype(v.dtype)


class Predictor(StreamLayer):
    """Label tokens `[B, U]` int -> `[B, U, hidden]`: embedding then an LSTM (state in the carry).

    A token id outside `[0, vocab_size)` in a valid frame gives NaN outputs (loud, not clipped).
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden: int, *, dtype=None,
                 rngs: nnx.Rngs):
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.in_features = ()
        self.out_features = self.hidden = check_positive_int("hidden", hidden)
        self.dtype = check_float_dtype(dtype)
        self.embed = nnx.Embed(vocab_size, check_positive_int("embed_dim", embed_dim), rngs=rngs)
        self.lstm = LSTM(embed_dim, hidden, dtype=dtype, rngs=rngs)

    @property
    def spec(self) -> StreamSpec:
        return StreamSpec(receptive_field=(-float("inf"), 0.0))

    def input_kind(self):
        return jnp.integer

    def output_dtype(self, input_dtype=None):
        return self.dtype or jnp.float32

    def _embed(self, x: Seq) -> Seq:
        table = self.embed.embedding[...].astype(self.output_dtype())
        values = jnp.take(table, x.values, axis=0, mode="fill", fill_value=jnp.nan)
        return Seq(values, x.mask, x.compact).masked()

    def _init_carry(self, batch_size, dtype) -> LSTMCarry:
        return self.lstm.init_carry(batch_size)

    def _forward(self, x: Seq) -> Seq:
        return self.lstm(self._embed(x))

    def _step(self, carry: LSTMCarry, x: Seq):
        return self.lstm.step(carry, self._embed(x))

    def advance(self, carry: LSTMCarry, tokens: jax.Array) -> tuple[LSTMCarry, jax.Array]:
        """One token per row, `tokens [B]` int -> `(carry after it, output [B, hidden])`, every
        row advanced (callers pick rows). The same cell as `step` on a one-frame chunk, without
        the chunk machinery: the inner loop of greedy decoding."""
        dtype = self.output_dtype()
        emb = jnp.take(self.embed.embedding[...].astype(dtype), tokens, axis=0, mode="fill",
                       fill_value=jnp.nan)
        lstm = self.lstm
        xp = project(emb, lstm.input_proj.kernel[...], lstm.input_proj.bias[...])
        new, h = lstm._cell(carry, xp, dtype)  # the LSTM's own cell (layers/recurrent.py)
        return new, h.astype(dtype)


class Joint(nnx.Module):
    """`W_out tanh(W_enc enc + W_pred pred + b)`: the transducer's per-(t, u) classifier."""

    def __init__(self, enc_features: int, pred_features: int, hidden: int, vocab_size: int, *,
                 dtype=None, rngs: nnx.Rngs):
        self.enc_features = check_positive_int("enc_features", enc_features)
        self.pred_features = check_positive_int("pred_features", pred_features)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.dtype = check_float_dtype(dtype)
        self.enc_proj = nnx.Linear(enc_features, check_positive_int("hidden", hidden), rngs=rngs)
        self.pred_proj = nnx.Linear(pred_features, hidden, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(hidden, vocab_size, rngs=rngs)

    def project_enc(self, enc):
        """`[..., enc_features] -> [..., hidden]` (once per encoder frame)."""
        return _linear(self.enc_proj, enc.astype(self.dtype or enc.dtype))

    def project_pred(self, pred):
        """`[..., pred_features] -> [..., hidden]` (once per predictor output)."""
        return _linear(self.pred_proj, pred.astype(self.dtype or pred.dtype))

    def logits(self, enc_h, pred_h):
        """Logits `[..., vocab_size]` from projected (broadcastable) encoder and predictor parts."""
        return _linear(self.out, jnp.tanh(enc_h + pred_h))

    def lattice(self, enc, pred):
        """`enc [B, T, De]`, `pred [B, U1, Dp]` -> logits `[B, T, U1, V]`."""
        return self.logits(self.project_enc(enc)[:, :, None, :], self.project_pred(pred)[:, None, :, :])


class Transducer(nnx.Module):
    """RNN-T head over encoder frames `[B, T, enc_features]`: predictor + joint (module docstring)."""

    def __init__(self, enc_features: int, vocab_size: int, *, embed_dim: int = 64,
                 pred_hidden: int = 128, joint_hidden: int = 128, blank_id: int = 0, dtype=None,
                 rngs: nnx.Rngs):
        self.enc_features = check_positive_int("enc_features", enc_features)
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.blank_id = check_blank_id(blank_id, vocab_size)
        self.predictor = Predictor(vocab_size, embed_dim, pred_hidden, dtype=dtype, rngs=rngs)
        self.joint = Joint(enc_features, pred_hidden, joint_hidden, vocab_size, dtype=dtype,
                           rngs=rngs)

    def lattice_logits(self, enc: Seq, labels, label_lengths) -> tuple[Seq, jax.Array]:
        """`(enc compacted, logits [B, T, U+1, V])`: the joint over all (frame, label prefix)."""
        _check_enc(enc, self.enc_features)
        labels, label_lengths = check_labels(labels, label_lengths)
        enc = enc.compacted()
        start = jnp.full((labels.shape[0], 1), self.blank_id, jnp.int32)
        tokens = jnp.concatenate([start, labels], axis=1)
        in_label = jnp.arange(tokens.shape[1])[None, :] <= label_lengths[:, None]
        pred = self.predictor(Seq(jnp.where(in_label, tokens, self.blank_id), in_label, compact=True))
        return enc, self.joint.lattice(enc.values, pred.values)

    def loss(self, enc: Seq, labels, label_lengths) -> jax.Array:
        """Per-row RNN-T negative log-likelihood `[B]` float32 (`labels [B, U]` right-padded)."""
        enc, logits = self.lattice_logits(enc, labels, label_lengths)
        return rnnt_loss(logits, labels, enc.lengths(), label_lengths, blank_id=self.blank_id)


def _check_enc(enc: Seq, features: int, name: str = "enc") -> None:
    if not isinstance(enc, Seq):
        raise ValueError(f"{name}: expected a streamzoo.Seq, got {type(enc).__name__}")
    if enc.values.ndim != 3 or enc.values.shape[-1] != features:
        raise ValueError(
            f"{name}: expected values [B, T, {features}], got {list(enc.values.shape)}")


# ------------------------------------------------------------------------------ loss
def rnnt_loss(logits, labels, frame_lengths, label_lengths, *, blank_id: int = 0) -> jax.Array:
    """Per-row RNN-T negative log-likelihood `[B]` float32.

    Args:
      logits: `[B, T, U+1, V]` joint outputs (log-softmaxed here, in float32).
      labels: `[B, U]` int (never the blank), right-padded with anything.
      frame_lengths: `[B]` int, valid frames per row (the first T_b frames).
      label_lengths: `[B]` int, labels per row (<= U).
    """
    logits = jnp.asarray(logits)
    labels, label_lengths = check_labels(labels, label_lengths)
    if logits.ndim != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2] != labels.shape[1] + 1:
        raise ValueError(
            f"logits: expected [B, T, U+1, V] = [{labels.shape[0]}, T, {labels.shape[1] + 1}, V] "
            f"for labels {list(labels.shape)}, got {list(logits.shape)}")
    frame_lengths = jnp.asarray(frame_lengths)
    if frame_lengths.shape != labels.shape[:1] or not jnp.issubdtype(frame_lengths.dtype, jnp.integer):
        raise ValueError(f"frame_lengths: expected an int array of shape ({labels.shape[0]},), "
                         f"got {frame_lengths.dtype}{list(frame_lengths.shape)}")
    blank_id = check_blank_id(blank_id, logits.shape[-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -rnnt_log_likelihood(log_probs, labels, frame_lengths.astype(jnp.int32), label_lengths,
                                blank_id=blank_id)


def rnnt_log_likelihood(log_probs, labels, frame_lengths, label_lengths, *, blank_id: int = 0):
    """The forward algorithm over anti-diagonals (module docstring); `[B]` log-likelihoods."""
    B, T, U1, _ = log_probs.shape
    U = U1 - 1
    labels = jnp.clip(labels, 0, log_probs.shape[-1] - 1)  # padded slots: any in-range id
    blank = log_probs[..., blank_id]  # [B, T, U1]
    emit = jnp.take_along_axis(log_probs[:, :, :U, :],
                               jnp.broadcast_to(labels[:, None, :, None], (B, T, U, 1)), axis=3)[..., 0]
    emit = jnp.pad(emit, ((0, 0), (0, 0), (0, 1)), constant_values=_NEG)  # [B, T, U1]
    D = T + U1 - 1
    t_of = jnp.arange(D)[:, None] - jnp.arange(U1)[None, :]  # [D, U1]: t on diagonal d at u
    on_lattice = (t_of >= 0) & (t_of < T)
    t_idx, u_idx = jnp.clip(t_of, 0, T - 1), jnp.broadcast_to(jnp.arange(U1), (D, U1))

    def skew(a):  # [B, T, U1] -> [D, B, U1]: a[b, d - u, u] on diagonal d
        return jnp.where(on_lattice[:, None, :], a[:, t_idx, u_idx].swapaxes(0, 1), _NEG)

    def body(alpha, inputs):
        blank_d, emit_d = inputs  # diagonal d-1's blank and emit log-probs
        from_t = alpha + blank_d  # (t-1, u) -> (t, u)
        from_u = jnp.pad((alpha + emit_d)[:, :-1], ((0, 0), (1, 0)), constant_values=_NEG)
        alpha = jnp.logaddexp(from_t, from_u)
        return alpha, alpha

    alpha0 = jnp.full((B, U1), _NEG, jnp.float32).at[:, 0].set(0.0)
    _, alphas = jax.lax.scan(body, alpha0, (skew(blank)[:-1], skew(emit)[:-1]))
    alphas = jnp.concatenate([alpha0[None], alphas], axis=0)  # [D, B, U1]
    last_t = jnp.maximum(frame_lengths - 1, 0)
    rows = jnp.arange(B)
    ll = alphas[jnp.clip(last_t + label_lengths, 0, D - 1), rows, label_lengths] + \
        blank[rows, last_t, label_lengths]
    empty = jnp.where(label_lengths == 0, 0.0, LOG_EPSILON)
    return jnp.where(frame_lengths > 0, ll, empty)


# -------------------------------------------------------------------- greedy decoding
@struct.dataclass
class RNNTGreedyCarry:
    pred: LSTMCarry         # predictor state before it has read `last_token`
    last_token: jax.Array   # [B] int32: last emitted token (the blank = start of sequence)


class RNNTGreedyDecoder(StreamLayer):
    """Streaming greedy RNN-T: encoder frames `[B, T, enc_features]` -> tokens emitted at each
    frame `[B, T, max_symbols_per_frame]` int32, -1 padded (module docstring).

    Holds the `Transducer` (shared parameters); the carry is `RNNTGreedyCarry`.
    """

    def __init__(self, transducer: Transducer, *, max_symbols_per_frame: int = 4):
        self.transducer = transducer
        self.in_features = transducer.enc_features
        self.max_symbols = check_positive_int("max_symbols_per_frame", max_symbols_per_frame)
        self.out_features = (self.max_symbols,)

    @property
    def spec(self) -> StreamSpec:
        return StreamSpec(receptive_field=(-float("inf"), 0.0))

    def output_dtype(self, input_dtype=None):
        return jnp.int32

    def _init_carry(self, batch_size, dtype) -> RNNTGreedyCarry:
        return RNNTGreedyCarry(self.transducer.predictor.init_carry(batch_size),
                               jnp.full((batch_size,), self.transducer.blank_id, jnp.int32))

    def _frame(self, carry: RNNTGreedyCarry, enc_h, valid):
        """One frame for all rows: `enc_h [B, H]` projected encoder frame, `valid [B]` bool.

        A `lax.while_loop` over symbols that stops as soon as every row has emitted a blank
        (or after `max_symbols` symbols), so frames that emit nothing cost one predictor cell.
        """
        predictor, joint = self.transducer.predictor, self.transducer.joint
        blank, cap = self.transducer.blank_id, self.max_symbols

        def cond(loop):
            s, _, _, active, _ = loop
            return (s < cap) & jnp.any(active)

        def body(loop):
            s, state, last, active, tokens = loop
            new_state, g = predictor.advance(state, last)
            k = jnp.argmax(joint.logits(enc_h, joint.project_pred(g)), axis=-1)
            emit = active & (k != blank)
            tokens = jax.lax.dynamic_update_slice_in_dim(
                tokens, jnp.where(emit, k, -1).astype(jnp.int32)[:, None], s, axis=1)
            state = jax.tree.map(lambda n, o: jnp.where(emit[:, None], n, o), new_state, state)
            return s + 1, state, jnp.where(emit, k, last).astype(jnp.int32), emit, tokens

        tokens = jnp.full((valid.shape[0], cap), -1, jnp.int32)
        _, state, last, _, tokens = jax.lax.while_loop(
            cond, body, (jnp.int32(0), carry.pred, carry.last_token, valid, tokens))
        return RNNTGreedyCarry(state, last), tokens

    def _step(self, carry: RNNTGreedyCarry, x: Seq):
        enc_h = self.transducer.joint.project_enc(x.values)  # [B, T, H]
        carry, tokens = jax.lax.scan(lambda c, inp: self._frame(c, *inp), carry,
                                     (jnp.swapaxes(enc_h, 0, 1), x.mask.T))
        return carry, Seq(jnp.swapaxes(tokens, 0, 1), x.mask, compact=True).masked()

    def _forward(self, x: Seq) -> Seq:
        return self._step(self._init_carry(x.batch_size, None), x)[1]
