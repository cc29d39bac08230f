"""Speculative decoding: a cheap drafter proposes k tokens, the target model checks them all
in ONE `step` of T = k + 1, and the rejected ones are un-committed from the KV caches with
`rollback`. The whole loop (draft, verify, accept, roll back) runs inside one jitted
`lax.while_loop` of fixed shapes, like `decode.generate`.

    drafter = DraftModel(small_lm, num_draft=4)      # or NGramDraft(num_draft=4, max_ngram=3)
    state = start(model, drafter, prompts, keys=key, max_new_tokens=64, stop_tokens=[[eos]])
    state, tokens = generate(model, drafter, state, num_steps=32)   # tokens: Seq [B, 32 * 5]
    stats(state)                       # draft tokens accepted per verify step, acceptance rate

Both models must be built with `max_rollback >= num_draft` (spare ring slots: rollback is
exact up to that many frames); `start`/`generate` raise a ValueError otherwise.

Drafters:

* `DraftModel(draft, num_draft)`: another `StreamingLM` over the same vocabulary (any size and
  cache policy) with its own carry. It samples d_1..d_k one token at a time from its own
  distribution q, filtered with the row's temperature / top-k / top-p like the target's: k + 1
  steps of T=1 (the pending token, then d_1..d_k), so its carry keeps pace with the target's
  and is rolled back with it.
* `NGramDraft(num_draft, max_ngram, history)`: draft-free prompt lookup. Each row keeps its
  last `history` tokens (prompt and output) in a fixed-size buffer; the drafter finds the most
  recent earlier occurrence of the row's last n tokens (the longest n <= max_ngram that
  occurs) and proposes the k tokens that followed it, continued periodically when that
  occurrence overlaps the suffix (a row ending in "a b a b" proposes "a b a b"). Without a
  match it repeats the last token. Its q is a point mass on the proposal.

One iteration, for every unfinished row (rows are desynchronised: per-row counters; finished
rows commit nothing and do not move):

1. Let x be the row's pending token: emitted by the previous iteration, not yet committed
   (there is none right after `start` or at the start of a `generate` call).
2. The drafter proposes d_1..d_k with probabilities q_1..q_k.
3. Verify: one target step commits [x, d_1..d_k] and yields p_1..p_{k+1}, the target's
   filtered next-token distributions before d_1, ..., before d_k, and after d_k (without a
   pending token the step is [d_1..d_k] and p_1 comes from the state's logits).
4. Accept (Leviathan et al. 2023; Chen et al. 2023): draw u_i ~ U[0, 1) and accept d_i while
   u_i q_i(d_i) < p_i(d_i), i.e. with probability min(1, p_i(d_i) / q_i(d_i)); n = the number
   accepted. If n < k the row's next token is drawn from the residual
   norm(max(0, p_{n+1} - q_{n+1})); if n = k it is a bonus token drawn from p_{k+1}.
   A greedy row (temperature 0) has point masses at the argmax for p (and q), so this reads:
   accept while d_i == argmax p_i, then emit argmax p_{n+1}.
5. The row emits d_1..d_n and that token, cut after its first stop token and at
   `max_new_tokens` (m <= n + 1 tokens). The last one emitted becomes pending; the target and
   the draft model roll back the k + 1 - m frames they committed past it.

The loop's last iteration drafts nothing and only commits the pending tokens (so each
model's step is compiled once), and `state.decode` is a plain `decode.DecodeState`: its carry
holds every emitted token (the stop token included) and `logits` follow the last one.
`decode.generate` can continue it, and the other way round. Each row's random numbers come
from `fold_in(keys[b], num_generated[b])` per iteration, so a row does not depend on its batch.

Speed: a verify step of T = k + 1 costs about one T=1 step where decoding is memory-bound
(large models on accelerators), so a step that emits a + 1 tokens on average is up to a + 1
times faster, minus the drafter's cost; for the tiny CPU models of the tests it is not.

Guarantees:

* Per position, P(emit t) = q(t) min(1, p(t)/q(t)) + P(reject) r(t) = min(p, q)(t) +
  max(0, p - q)(t) = p(t), whatever q is (P(reject) = 1 - sum min(p, q) = sum max(0, p - q),
  the normaliser of r): sampled rows emit sequences distributed exactly as
  the target's own sampling with the row's temperature / top-k / top-p (a draw differs from
  `decode.generate`'s with the same key: other random numbers). Only the speed depends on
  the drafter.
* Greedy rows emit the tokens of `decode.generate` (up to an argmax tie decided differently by
  the float rounding of a T=k+1 step against T=1 steps, ~1e-6).
* The final target carry equals plain decoding of the same tokens: same positions, and every
  slot that holds a position holds the same key/value (slots of rolled-back frames are empty
  until overwritten; every slot the window needs is present).
* Each verify step emits between 1 and k + 1 tokens per unfinished row, so `generate(...,
  num_steps)` returns at most `num_steps * (k + 1)` tokens per row.

The paged layout has no rollback: speculative decoding uses the model's ring caches.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from streamzoo.core.seq import Seq
from streamzoo.core.streamer import where_rows
from streamzoo.layers.kv_policies import take_rows
from streamzoo.zoo.lm import decode, paged
from streamzoo.zoo.lm.decode import DecodeState
from streamzoo.zoo.lm.model import StreamingLM
from streamzoo.zoo.lm.sampling import SamplingParams, filtered_logits, sample


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_rollback(name, model, num_draft):
    if model.max_rollback < num_draft:
        raise ValueError(
            f"max_rollback: the {name} must be built with max_rollback >= num_draft={num_draft} "
            f"to un-commit rejected draft tokens, got max_rollback={model.max_rollback} (pass "
            f"StreamingLM(..., max_rollback={num_draft}) or with_policy(model, policy, "
            f"max_rollback={num_draft}))")


def _probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """`[B, V]` logits -> each row's next-token distribution `[B, V]` (float32): the softmax
    of `filtered_logits`, or a point mass at the argmax for greedy rows."""
    greedy = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    soft = jax.nn.softmax(filtered_logits(logits, params), axis=-1)
    return jnp.where((params.temperature > 0)[:, None], soft, greedy)


def _fold(keys, i):
    """Per row: `fold_in(keys[b], i)` for a static or traced scalar i."""
    return jax.vmap(lambda key: jax.random.fold_in(key, i))(keys)


# -------------------------------------------------------------------------------- drafters
@struct.dataclass
class DraftModelState:
    """The draft model's carry (every emitted token but the pending one) and its logits after
    the last committed token (used when nothing is pending)."""

    carry: Any
    logits: jax.Array  # [B, V] float32


@jax.tree_util.register_pytree_node_class
class DraftModel:
    """Draft with a smaller `StreamingLM` over the target's vocabulary (its own carry and
    cache policy, `max_rollback >= num_draft`); proposes `num_draft` tokens per verify step."""

    def __init__(self, model: StreamingLM, num_draft: int):
        _check_int("num_draft", num_draft, 1)
        if not isinstance(model, StreamingLM):
            raise ValueError(f"model: expected a StreamingLM draft model, got "
                             f"{type(model).__name__}")
        _check_rollback("draft model", model, num_draft)
        self.model, self.num_draft = model, int(num_draft)

    def tree_flatten(self):
        return (self.model,), (self.num_draft,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        new = object.__new__(cls)
        (new.model,), (new.num_draft,) = children, aux
        return new

    def check(self, target: StreamingLM):
        if self.model.vocab_size != target.vocab_size:
            raise ValueError(f"drafter: expected a draft model with vocab_size="
                             f"{target.vocab_size} (the target's), got {self.model.vocab_size}")

    def init(self, prompts: Seq, *, chunk_size, cache_dtype) -> DraftModelState:
        carry = self.model.init_carry(prompts.batch_size, cache_dtype)
        carry, logits, _ = decode.prefill(self.model, carry, prompts, chunk_size=chunk_size)
        return DraftModelState(carry, logits.astype(jnp.float32))

    def refill(self, state: DraftModelState, rows, prompts: Seq, *, chunk_size):
        carry = self.model.reset_rows(state.carry, rows)
        prompts = prompts.replace(mask=prompts.mask & rows[:, None], compact=False)
        carry, logits, _ = decode.prefill(self.model, carry, prompts, chunk_size=chunk_size)
        return DraftModelState(carry, jnp.where(rows[:, None], logits, state.logits))

    def propose(self, state: DraftModelState, pending, has_pending, drafting, keys,
                params: SamplingParams, vocab_size: int):
        """Commit the pending tokens (rows `has_pending`), then, in the rows `drafting`, draw
        d_1..d_k, each committed as it is drawn. Returns `(state, tokens [B, k], q [B, k, V])`;
        the state's logits follow the pending token."""
        model, k = self.model, self.num_draft

        def one(loop, i):
            carry, token, logits = loop
            valid = jnp.where(i == 0, has_pending, drafting)
            carry, y = model.step(carry, Seq(token[:, None], valid[:, None], compact=True))
            logits = jnp.where(valid[:, None], y.values[:, 0], logits)
            token = sample(logits, _fold(keys, i), params)
            return (carry, token, logits), (token, _probs(logits, params), logits)

        init = (state.carry, pending, state.logits)
        (carry, _, _), (tokens, q, logits) = jax.lax.scan(one, init, jnp.arange(k + 1))
        return DraftModelState(carry, logits[0]), tokens[:k].T, jnp.moveaxis(q[:k], 0, 1)

    def accept(self, state: DraftModelState, emitted, count, rollback):
        return state.replace(carry=self.model.rollback(state.carry, rollback))


@struct.dataclass
class NGramState:
    """Each row's last `history` tokens (prompt and output, the pending one included),
    right-aligned (the newest last), -1 where the row has fewer."""

    tokens: jax.Array  # [B, history] int32
    length: jax.Array  # [B] int32 valid tokens (<= history)


@jax.tree_util.register_pytree_node_class
class NGramDraft:
    """Draft-free prompt-lookup drafting (see the module docstring): propose the `num_draft`
    tokens that followed the most recent earlier occurrence of the row's last n tokens,
    n <= `max_ngram` as long as possible, searched in the row's last `history` tokens."""

    def __init__(self, num_draft: int, *, max_ngram: int = 3, history: int = 64):
        _check_int("num_draft", num_draft, 1)
        _check_int("max_ngram", max_ngram, 1)
        _check_int("history", history, max_ngram + 1)
        self.num_draft, self.max_ngram, self.history = int(num_draft), int(max_ngram), int(history)

    def tree_flatten(self):
        return (), (self.num_draft, self.max_ngram, self.history)

    @classmethod
    def tree_unflatten(cls, aux, children):
        new = object.__new__(cls)
        new.num_draft, new.max_ngram, new.history = aux
        return new

    def check(self, target: StreamingLM):
        pass

    def init(self, prompts: Seq, *, chunk_size=None, cache_dtype=None) -> NGramState:
        prompts = prompts.compacted()
        lengths = prompts.lengths()
        idx = lengths[:, None] - self.history + jnp.arange(self.history)[None]
        values = prompts.values.astype(jnp.int32)
        if prompts.length == 0:
            values = jnp.zeros((prompts.batch_size, 1), jnp.int32)
        tokens = take_rows(values, jnp.clip(idx, 0, values.shape[1] - 1))
        return NGramState(jnp.where(idx >= 0, tokens, -1),
                          jnp.minimum(lengths, self.history).astype(jnp.int32))

    def refill(self, state: NGramState, rows, prompts: Seq, *, chunk_size=None):
        return where_rows(rows, self.init(prompts), state)

    def propose(self, state: NGramState, pending, has_pending, drafting, keys,
                params: SamplingParams, vocab_size: int):
        hist, length = state.tokens, state.length
        size, longest, k = self.history, self.max_ngram, self.num_draft
        ends = jnp.arange(size - 1)[None]          # where an earlier occurrence may end
        padded = jnp.pad(hist, ((0, 0), (longest, 0)), constant_values=-1)
        match = jnp.ones((hist.shape[0], size - 1), bool)
        best = jnp.full((hist.shape[0],), -1, jnp.int32)
        for n in range(1, longest + 1):           # the occurrence's token n back from its end
            j = n - 1
            match &= padded[:, longest + ends[0] - j] == hist[:, size - 1 - j][:, None]
            found = match & (ends - j >= size - length[:, None])
            best = jnp.maximum(best, jnp.where(found, n * size + ends, -1).max(axis=1))
        end = jnp.where(best >= 0, best % size, size - 2)
        period = size - 1 - end                    # >= 1: the proposal repeats with it
        idx = end[:, None] + 1 + jnp.arange(k)[None] % period[:, None]
        tokens = jnp.maximum(take_rows(hist, idx), 0)
        return state, tokens, jax.nn.one_hot(tokens, vocab_size, dtype=jnp.float32)

    def accept(self, state: NGramState, emitted, count, rollback):
        joined = jnp.concatenate([state.tokens, emitted], axis=1)
        tokens = take_rows(joined, count[:, None] + jnp.arange(self.history)[None])
        return NGramState(tokens, jnp.minimum(state.length + count, self.history))


# ----------------------------------------------------------------------------------- state
@struct.dataclass
class SpecState:
    """The target's `DecodeState`, the drafter's state and per-row statistics."""

    decode: DecodeState
    draft: Any
    num_verify: jax.Array    # [B] int32 verify steps the row took part in
    num_drafted: jax.Array   # [B] int32 draft tokens proposed to it
    num_accepted: jax.Array  # [B] int32 draft tokens accepted (before the stop/budget cut)

    @property
    def batch_size(self) -> int:
        return self.decode.batch_size


def _check_pair(model, drafter):
    if not isinstance(model, StreamingLM):
        raise ValueError(f"model: expected a StreamingLM, got {type(model).__name__}")
    if not isinstance(drafter, (DraftModel, NGramDraft)):
        raise ValueError(f"drafter: expected a DraftModel or an NGramDraft, got "
                         f"{type(drafter).__name__}")
    _check_rollback("target model", model, drafter.num_draft)
    drafter.check(model)


def _zero_stats(batch):
    zeros = jnp.zeros((batch,), jnp.int32)
    return dict(num_verify=zeros, num_drafted=zeros, num_accepted=zeros)


def start(model, drafter, prompts: Seq, *, keys, max_new_tokens, stop_tokens=None,
          temperature=0.0, top_k=0, top_p=1.0, chunk_size: int | None = None,
          cache_dtype=None) -> SpecState:
    """Prefill `prompts` into the target (`decode.start`, same arguments) and the drafter."""
    _check_pair(model, drafter)
    target = decode.start(model, prompts, keys=keys, max_new_tokens=max_new_tokens,
                          stop_tokens=stop_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, chunk_size=chunk_size, cache_dtype=cache_dtype)
    draft = drafter.init(prompts, chunk_size=chunk_size, cache_dtype=cache_dtype)
    return SpecState(target, draft, **_zero_stats(prompts.batch_size))


def refill(model, drafter, state: SpecState, rows, prompts: Seq, *, keys, max_new_tokens,
           stop_tokens=None, temperature=0.0, top_k=0, top_p=1.0,
           chunk_size: int | None = None) -> SpecState:
    """Row reuse (`decode.refill` for the target, the same for the drafter): the rows where
    `rows [B]` is True start the requests in those rows of `prompts`; other rows untouched."""
    _check_pair(model, drafter)
    target = decode.refill(model, state.decode, rows, prompts, keys=keys,
                           max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           chunk_size=chunk_size)
    rows = jnp.asarray(rows)
    draft = drafter.refill(state.draft, rows, prompts, chunk_size=chunk_size)
    stats = where_rows(rows, _zero_stats(state.batch_size),
                       dict(num_verify=state.num_verify, num_drafted=state.num_drafted,
                            num_accepted=state.num_accepted))
    return SpecState(target, draft, **stats)


# ---------------------------------------------------------------------------------- verify
def _accept(p, target_logits, tokens, q, keys, params: SamplingParams):
    """The acceptance rule of the module docstring. `p [B, k+1, V]`, `tokens [B, k]`,
    `q [B, k, V]`. Returns `(accepted [B], next token [B])`."""
    k = tokens.shape[1]
    p_d = jnp.take_along_axis(p[:, :k], tokens[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, tokens[..., None], axis=-1)[..., 0]
    u = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(keys, k + 1))
    ok = (u * q_d < p_d).astype(jnp.int32)
    accepted = jnp.cumprod(ok, axis=1).sum(axis=1)
    at = accepted[:, None]
    p_next = take_rows(p, at)[:, 0]
    q_next = take_rows(jnp.pad(q, ((0, 0), (0, 1), (0, 0))), at)[:, 0]   # 0 for the bonus
    residual = jnp.maximum(p_next - q_next, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p_next)
    drawn = jax.vmap(jax.random.categorical)(_fold(keys, k + 2), jnp.log(residual))
    greedy = jnp.argmax(take_rows(target_logits, at)[:, 0], axis=-1)
    token = jnp.where(params.temperature > 0, drawn, greedy).astype(jnp.int32)
    return accepted, token


@functools.partial(jax.jit, static_argnames=("num_steps", "until"))
def _generate(model, drafter, state: SpecState, num_steps: int, until: str):
    k, batch = drafter.num_draft, state.batch_size
    width = num_steps * (k + 1)
    frames = jnp.arange(k + 1)[None]

    def going(i, st, finished_any):
        go = (i < num_steps) & jnp.any(~st.decode.done)
        return go & ~finished_any if until == "any" else go

    def body(loop):
        i, st, pending, has_pending, out, count, finished_any, _ = loop
        # The last iteration only commits the pending tokens (one copy of each model's step
        # in the compiled loop): then every emitted token is committed.
        flush = ~going(i, st, finished_any)
        dec = st.decode
        drafting = ~dec.done & ~flush
        pend = has_pending & (drafting | flush)
        keys = jax.vmap(jax.random.fold_in)(dec.keys, dec.num_generated)
        draft, tokens, q = drafter.propose(st.draft, pending, pend, drafting, keys,
                                           dec.sampling, model.vocab_size)

        # Verify [pending, d_1..d_k] (or [d_1..d_k] where nothing is pending) in one step.
        shift = pend.astype(jnp.int32)
        pad = jnp.zeros_like(tokens[:, :1])
        x = jnp.where(pend[:, None], jnp.concatenate([pending[:, None], tokens], 1),
                      jnp.concatenate([tokens, pad], 1))
        valid = frames < shift[:, None] + k * drafting[:, None]
        carry, y = model.step(dec.carry, Seq(x, valid, compact=True))
        before = jnp.concatenate([dec.logits[:, None], y.values], axis=1)
        target_logits = take_rows(before, shift[:, None] + frames)            # [B, k+1, V]
        p = jax.vmap(_probs, in_axes=(1, None), out_axes=1)(target_logits, dec.sampling)
        accepted, token = _accept(p, target_logits, tokens, q, keys, dec.sampling)

        # Emit d_1..d_n and the next token, cut after a stop token and at the budget.
        emitted = jnp.where(frames < accepted[:, None], jnp.concatenate([tokens, pad], 1),
                            token[:, None])
        is_stop = jnp.any(emitted[..., None] == dec.stop_tokens[:, None, :], axis=-1)
        is_stop &= frames <= accepted[:, None]
        first_stop = jnp.where(is_stop.any(1), jnp.argmax(is_stop, axis=1), k + 1)
        m = jnp.minimum(jnp.minimum(accepted, first_stop) + 1,
                        dec.max_new_tokens - dec.num_generated)
        m = jnp.where(drafting, m, 0)
        num = dec.num_generated + m
        finished = drafting & ((first_stop < m) | (num >= dec.max_new_tokens))

        # Un-commit the draft tokens past the last emitted one (it becomes pending).
        rollback = jnp.where(drafting, k + 1 - m, 0)
        carry = model.rollback(carry, rollback)
        draft = drafter.accept(draft, emitted, m, rollback)
        last = take_rows(emitted, jnp.maximum(m - 1, 0)[:, None])[:, 0]
        pending = jnp.where(drafting, last, pending)

        at = jnp.arange(width)[None] - count[:, None]
        inside = (at >= 0) & (at < m[:, None])
        out = jnp.where(inside, take_rows(emitted, jnp.clip(at, 0, k)), out)
        committed = flush & has_pending
        logits = jnp.where(committed[:, None], y.values[:, 0], dec.logits)
        dec = dec.replace(carry=carry, logits=logits, num_generated=num,
                          done=dec.done | finished)
        used = drafting.astype(jnp.int32)
        st = st.replace(decode=dec, draft=draft, num_verify=st.num_verify + used,
                        num_drafted=st.num_drafted + k * used,
                        num_accepted=st.num_accepted + jnp.where(drafting, accepted, 0))
        return (i + 1, st, pending, (has_pending | drafting) & ~flush, out, count + m,
                finished_any | jnp.any(finished), flush)

    zeros = jnp.zeros((batch,), jnp.int32)
    init = (jnp.zeros((), jnp.int32), state, zeros, jnp.zeros((batch,), bool),
            jnp.zeros((batch, width), jnp.int32), zeros, jnp.zeros((), bool),
            jnp.zeros((), bool))
    loop = jax.lax.while_loop(lambda loop: ~loop[-1], body, init)
    st, out, count = loop[1], loop[4], loop[5]
    mask = jnp.arange(width)[None] < count[:, None]
    return st, Seq(jnp.where(mask, out, 0), mask, compact=True)


def generate(model, drafter, state: SpecState, num_steps: int, *, until: str = "all"):
    """Up to `num_steps` verify steps per unfinished row, in one jitted `lax.while_loop`.

    Returns `(state, tokens)`: tokens is a `Seq [B, num_steps * (num_draft + 1)]` whose row b
    holds the tokens row b emitted in this call (a prefix; the last one is the stop token if
    it stopped). `until="any"` returns as soon as a row finishes (for `refill`).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if until not in ("all", "any"):
        raise ValueError(f"until: expected 'all' or 'any', got {until!r}")
    if not isinstance(state, SpecState):
        raise ValueError(f"state: expected a SpecState (speculative.start), got "
                         f"{type(state).__name__}")
    _check_pair(model, drafter)
    if isinstance(state.decode.carry, paged.PagedCache):
        raise ValueError("state: speculative decoding needs the model's ring caches (rollback), "
                         "got a paged.PagedCache carry")
    return _generate(model, drafter, state, num_steps, until)


def stats(state: SpecState) -> dict:
    """Host-side totals over the batch: verify steps, draft tokens proposed and accepted,
    `accepted_per_verify` (mean accepted per verify step) and `acceptance_rate`."""
    verify = int(jnp.sum(state.num_verify))
    drafted = int(jnp.sum(state.num_drafted))
    accepted = int(jnp.sum(state.num_accepted))
    return dict(verify_steps=verify, drafted=drafted, accepted=accepted,
                accepted_per_verify=accepted / max(verify, 1),
                acceptance_rate=accepted / max(drafted, 1))


__all__ = ["DraftModel", "DraftModelState", "NGramDraft", "NGramState", "SpecState",
           "generate", "refill", "start", "stats"]
