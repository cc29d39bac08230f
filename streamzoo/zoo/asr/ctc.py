"""CTC head: the frame-wise projection to the vocabulary, the CTC loss (with an optional delay
penalty) and streaming greedy decoding with the decoder state in the carry.

* `CTCHead(in_features, vocab_size)`: encoder frames `[B, T, D]` -> logits `[B, T, V]`
  (a frame-wise `StreamLayer`; token 0 is the blank by default).
* `ctc_loss(logits, labels, label_lengths, delay_penalty=0.0) -> [B]`: the negative
  log-likelihood of each row's labels given its valid frames. With `delay_penalty == 0` it is
  `optax.ctc_loss` (logits are log-softmaxed there; `logit_paddings` = not mask; labels
  right-padded; padded label slots are set to the blank here, because optax reads the label
  after the last one to detect repeats).
* `CTCGreedyDecoder(vocab_size)`: a `StreamLayer` from logits `[B, T, V]` to the token emitted
  at each frame `[B, T]` int32 (-1 where nothing is emitted): the frame's argmax, unless it is
  the blank or repeats the previous frame's argmax. The carry holds that previous argmax per
  row, so any chunking gives the offline output; `text.emitted_tokens` collects the tokens.

Delay penalty (delay-penalised CTC, as in the k2 FST version): each path is weighted by
`exp(-lambda * sum over its tokens of (t_onset - (T_b - 1) / 2))`, where `t_onset` is the
frame at which the path *enters* a token (its first frame, not the repeats that follow) and
`T_b` the row's valid frame count. The loss is `-log sum_paths p(path) * weight(path)`; its
gradient shifts posterior mass to alignments that emit each token earlier. The centring term
(as in k2/icefall's `delay_penalty`) keeps the loss near the plain CTC loss and does not change
its gradient with respect to the logits (every path has the same number of onsets).

Why a modified forward pass and not a log-prob offset: adding `-lambda * t` to every
non-blank log-prob would also charge the frames on which a token is *repeated*, so it would
penalise long token spans (duration) as much as late onsets. In the forward recursion over
the blank-extended label sequence, an onset is exactly a transition *into* a label state (from
the blank before it, or from the previous label), so the penalty is added to those two
transitions only; staying in a label state is free. `optax.ctc_loss` has no hook for per-
transition weights, hence our own forward (`ctc_log_likelihood`), which with `lambda = 0`
equals optax's (tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from streamzoo.core.checks import check_float_dtype, check_positive_int
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.zoo.asr.text import check_blank_id, check_labels

# Log of "impossible" in the forward recursion: finite, so that gradients stay finite; the
# same value as optax's `log_epsilon`, so an infeasible row (labels that cannot fit in its
# frames) gets a loss of about 1e5 in both implementations.
LOG_EPSILON = -1e5


class CTCHead(StreamLayer):
    """Linear projection of encoder frames `[B, T, in_features]` to logits `[B, T, vocab_size]`."""

    frame_wise = True

    def __init__(self, in_features: int, vocab_size: int, *, dtype=None, rngs: nnx.Rngs):
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.dtype = check_float_dtype(dtype)
        self.proj = nnx.Linear(in_features, vocab_size, rngs=rngs)

    def _forward(self, x: Seq) -> Seq:
        dtype = self.dtype or x.dtype
        kernel, bias = self.proj.kernel[...].astype(dtype), self.proj.bias[...].astype(dtype)
        return x.map(lambda v: v.astype(dtype) @ kernel + bias).masked()

    def _step(self, carry, x: Seq):
        return carry, self._forward(x)


# ----------------------------------------------------------------------------- loss
def _check_logits(logits: Seq, name: str = "logits") -> None:
    if not isinstance(logits, Seq):
        raise ValueError(f"{name}: expected a streamzoo.Seq, got {type(logits).__name__}")
    if logits.values.ndim != 3 or not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(
            f"{name}: expected float values [B, T, V], got {logits.dtype}{list(logits.values.shape)}")


def ctc_loss(logits: Seq, labels, label_lengths, *, blank_id: int = 0,
             delay_penalty: float | jax.Array = 0.0) -> jax.Array:
    """Per-row CTC negative log-likelihood `[B]` float32.

    Args:
      logits: Seq `[B, T, V]` (unnormalised; log-probs work too). Only valid frames count,
        wherever they sit; NaN in invalid frames does not leak.
      labels: `[B, U]` int token ids (never `blank_id`), right-padded with anything.
      label_lengths: `[B]` int, the number of labels of each row (<= U).
      blank_id: the blank token.
      delay_penalty: lambda >= 0 of the delay-penalised CTC (module docstring). A Python 0
        uses `optax.ctc_loss`; any other value (or a traced one) our forward recursion.
    A row whose labels do not fit in its frames gets a loss of about 1e5 (finite).
    """
    _check_logits(logits)
    labels, label_lengths = check_labels(labels, label_lengths)
    if labels.shape[0] != logits.batch_size:
        raise ValueError(f"labels: expected {logits.batch_size} rows (the batch size of logits), "
                         f"got {labels.shape[0]}")
    blank_id = check_blank_id(blank_id, logits.values.shape[-1])
    x = logits.compacted()  # valid frames first, the rest zeroed (so NaN cannot leak)
    in_label = jnp.arange(labels.shape[1])[None, :] < label_lengths[:, None]
    labels = jnp.where(in_label, labels, blank_id)
    if isinstance(delay_penalty, (int, float)) and delay_penalty == 0:
        return optax.ctc_loss(x.values.astype(jnp.float32), 1.0 - x.mask.astype(jnp.float32),
                              labels, 1.0 - in_label.astype(jnp.float32), blank_id=blank_id)
    log_probs = jax.nn.log_softmax(x.values.astype(jnp.float32), axis=-1)
    return -ctc_log_likelihood(log_probs, x.mask, labels, label_lengths, blank_id=blank_id,
                               delay_penalty=delay_penalty)


def ctc_log_likelihood(log_probs, mask, labels, label_lengths, *, blank_id: int = 0,
                       delay_penalty=0.0) -> jax.Array:
    """The (delay-weighted) CTC forward recursion, `[B]` float32 log-likelihoods.

    `log_probs [B, T, V]` normalised, `mask [B, T]` with each row's valid frames first
    (compact), `labels [B, U]`, `label_lengths [B]`. A `lax.scan` over T carries
    `alpha [B, 2U+1]` over the blank-extended labels (blank, y1, blank, y2, ..., blank);
    invalid frames leave it untouched.
    """
    B, T, _ = log_probs.shape
    U = labels.shape[1]
    S = 2 * U + 1
    ext = jnp.full((B, S), blank_id, jnp.int32).at[:, 1::2].set(labels)
    lp_ext = jnp.take_along_axis(log_probs, jnp.broadcast_to(ext[:, None, :], (B, T, S)), axis=2)
    is_label = (jnp.arange(S) % 2 == 1)[None, :]
    prev_label = jnp.pad(ext[:, :-2], ((0, 0), (2, 0)), constant_values=blank_id)
    can_skip = is_label & (jnp.arange(S) >= 3)[None, :] & (ext != prev_label)
    centre = (mask.sum(axis=1).astype(jnp.float32) - 1.0) / 2.0  # [B]
    penalty = jnp.asarray(delay_penalty, jnp.float32)
    neg = jnp.float32(LOG_EPSILON)

    def body(alpha, inputs):
        lp_t, m_t, t = inputs
        onset = jnp.where(is_label, -penalty * (t - centre)[:, None], 0.0)  # [B, S]
        from_prev = jnp.pad(alpha[:, :-1], ((0, 0), (1, 0)), constant_values=neg)
        from_skip = jnp.where(can_skip, jnp.pad(alpha[:, :-2], ((0, 0), (2, 0)),
                                                constant_values=neg), neg)
        stacked = jnp.stack([alpha, from_prev + onset, from_skip + onset])
        new = jax.nn.logsumexp(stacked, axis=0) + lp_t
        return jnp.where(m_t[:, None], new, alpha), None

    alpha0 = jnp.full((B, S), neg).at[:, 0].set(0.0)  # before frame 0: "in the first blank"
    xs = (jnp.swapaxes(lp_ext, 0, 1), mask.T, jnp.arange(T, dtype=jnp.float32))
    alpha, _ = jax.lax.scan(body, alpha0, xs)
    end = 2 * label_lengths
    last_blank = jnp.take_along_axis(alpha, end[:, None], axis=1)[:, 0]
    last_label = jnp.take_along_axis(alpha, jnp.maximum(end - 1, 0)[:, None], axis=1)[:, 0]
    return jnp.logaddexp(last_blank, jnp.where(label_lengths > 0, last_label, neg))


# ------------------------------------------------------------------- greedy decoding
@struct.dataclass
class CTCGreedyCarry:
    prev: jax.Array  # [B] int32: argmax of each row's last committed frame (blank at start)


class CTCGreedyDecoder(StreamLayer):
    """Streaming greedy CTC: logits `[B, T, V]` -> the token emitted at each frame `[B, T]`
    int32, -1 where nothing is emitted (blank, or a repeat of the previous frame's argmax).

    No parameters; the carry is the previous frame's argmax per row. Output frame t depends
    on input frames t-1 and t, hence `receptive_field = (-1, 0)`.
    """

    def __init__(self, vocab_size: int, *, blank_id: int = 0):
        self.in_features = self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.out_features = ()
        self.blank_id = check_blank_id(blank_id, vocab_size)

    @property
    def spec(self) -> StreamSpec:
        return StreamSpec(receptive_field=(-1.0, 0.0))

    def output_dtype(self, input_dtype=None):
        return jnp.int32

    def _init_carry(self, batch_size, dtype):
        return CTCGreedyCarry(jnp.full((batch_size,), self.blank_id, jnp.int32))

    def _step(self, carry: CTCGreedyCarry, x: Seq):
        best = jnp.argmax(x.values, axis=-1).astype(jnp.int32)  # [B, T], valid frames first
        before = jnp.concatenate([carry.prev[:, None], best[:, :-1]], axis=1)
        emit = x.mask & (best != self.blank_id) & (best != before)
        n = x.lengths()
        last = jnp.take_along_axis(best, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
        new = CTCGreedyCarry(jnp.where(n > 0, last, carry.prev))
        return new, Seq(jnp.where(emit, best, -1), x.mask, compact=True).masked()

    def _forward(self, x: Seq) -> Seq:
        return self._step(self._init_carry(x.batch_size, None), x)[1]
