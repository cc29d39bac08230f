"""Decoding: chunked prefill equals one-shot; the jitted while_loop decode equals a Python
loop of steps; sampling keeps the right sets (greedy, top-k, top-p, temperature) and draws
from them; per-row stop tokens in desynchronised rows with row reuse equal each request run
alone; constant carry bytes and one compilation over many tokens (a slow test over 100,000);
the paged layout (equal to the ring cache, prefix sharing with copy-on-write, overflow);
bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply, jitted_step
from streamzoo.layers.kv_policies import FullCache, SinksWindow
from streamzoo.zoo.lm import decode, paged
from streamzoo.zoo.lm.model import StreamingLM
from streamzoo.zoo.lm.sampling import SamplingParams, keep_mask, row_keys, sample

V, D, L, H, HKV, HIDDEN = 32, 16, 2, 4, 2, 32


def make(policy, key) -> StreamingLM:
    return StreamingLM(V, D, L, H, HKV, HIDDEN, policy=policy, rngs=nnx.Rngs(params=key))


def prompts(key, lengths, length) -> sz.Seq:
    ids = jax.random.randint(key, (len(lengths), length), 0, V, dtype=jnp.int32)
    return sz.Seq.from_lengths(ids, jnp.array(lengths))


_sample = jax.jit(sample)
MIXED = dict(temperature=[0.0, 0.8, 1.3], top_k=[0, 5, 0], top_p=[1.0, 1.0, 0.8])


# -------------------------------------------------------------------------------- prefill
def test_chunked_prefill_equals_one_shot(key):
    """Prompts of 20, 13 and 0 tokens through a 4-slot ring (wraps), in chunks of 1, 3, 7
    and all at once: same carry, same logits, equal to the offline call's last position."""
    model = make(SinksWindow(2, 4), key)
    x = prompts(jax.random.fold_in(key, 1), (20, 13, 0), 20)
    one = decode.prefill(model, model.init_carry(3), x)
    np.testing.assert_array_equal(np.asarray(one[2]), [True, True, False])
    offline = jitted_apply(model, x).rows()
    np.testing.assert_allclose(one[1][0], offline[0][-1], atol=1e-5)
    np.testing.assert_allclose(one[1][1], offline[1][-1], atol=1e-5)
    assert np.all(np.asarray(one[1][2]) == 0)
    for chunk in (1, 3, 7):
        carry, logits, seen = decode.prefill(model, model.init_carry(3), x, chunk_size=chunk)
        np.testing.assert_allclose(logits, one[1], atol=1e-5, err_msg=f"chunk {chunk}")
        for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(one[0])):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"chunk {chunk}")


# ---------------------------------------------------------------------------------- loop
def test_jitted_decode_loop_equals_python_loop_of_steps(key):
    model = make(SinksWindow(2, 4), key)
    x = prompts(jax.random.fold_in(key, 1), (7, 3, 1), 7)
    state = decode.start(model, x, keys=jax.random.key(7), max_new_tokens=12, chunk_size=3, **MIXED)
    end, out = decode.generate(model, state, 12)
    assert out.values.shape == (3, 12) and bool(out.mask.all())

    carry, logits, keys = state.carry, state.logits, state.keys
    params = SamplingParams.create(3, **MIXED)
    want = []
    for i in range(12):
        token = _sample(logits, jax.vmap(jax.random.fold_in)(keys, jnp.full((3,), i)), params)
        carry, y = jitted_step(model, carry, sz.Seq.full(token[:, None]))
        logits = y.values[:, 0]
        want.append(np.asarray(token))
    np.testing.assert_array_equal(np.asarray(out.values), np.stack(want, 1))
    np.testing.assert_allclose(end.logits, logits, atol=1e-5)
    # Two calls of 6 continue exactly where one call of 12 goes.
    half, a = decode.generate(model, state, 6)
    half, b = decode.generate(model, half, 6)
    np.testing.assert_array_equal(np.concatenate([a.values, b.values], 1), out.values)
    assert bool(half.done.all()) and np.all(np.asarray(half.num_generated) == 12)


# ------------------------------------------------------------------------------ sampling
def numpy_keep(logits, temperature, top_k, top_p):
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(logits.shape, bool)
    ranked = order[:top_k] if top_k else order
    z = logits[ranked] / (temperature or 1.0)
    p = np.exp(z - z.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep[ranked[(before < top_p) | (np.arange(len(ranked)) == 0)]] = True
    return keep


def test_keep_sets_and_greedy(key):
    logits = jax.random.normal(key, (6, V)) * 2
    temperature, top_k, top_p = [0.0, 1.0, 0.5, 2.0, 1.0, 0.7], [0, 4, 0, 7, 1, 3], [1.0, 1.0, 0.6, 0.9, 1.0, 0.5]
    params = SamplingParams.create(6, temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(jax.jit(keep_mask)(logits, params))
    for b in range(6):
        np.testing.assert_array_equal(got[b], numpy_keep(np.asarray(logits[b], np.float64),
                                                         temperature[b], top_k[b], top_p[b]))
    assert got[1].sum() == 4 and got[4].sum() == 1
    # Top-p on a known distribution; top-k with ties keeps exactly k (lowest ids first).
    probs = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3] + [1e-9] * (V - 4)]))
    for p, want in ((0.4, {1}), (0.75, {1, 3}), (0.9, {1, 2, 3})):
        kept = keep_mask(probs, SamplingParams.create(1, temperature=1.0, top_p=p))
        assert set(np.nonzero(np.asarray(kept[0]))[0]) == want
    ties = jnp.zeros((1, V)).at[0, 5:9].set(1.0)
    kept = keep_mask(ties, SamplingParams.create(1, temperature=1.0, top_k=2))
    assert set(np.nonzero(np.asarray(kept[0]))[0]) == {5, 6}
    # Greedy rows are the argmax whatever the key; sampled rows stay inside the kept set.
    keys = row_keys(jax.random.fold_in(key, 1), 6)
    tokens = np.asarray(_sample(logits, keys, params))
    assert tokens[0] == int(jnp.argmax(logits[0]))
    assert all(got[b, tokens[b]] for b in range(6))


def test_sampled_frequencies_follow_the_filtered_distribution(key):
    n = 4000
    logits = jax.random.normal(key, (1, V)) * 1.5
    params = SamplingParams.create(n, temperature=0.7, top_k=6, top_p=0.95)
    draws = np.asarray(_sample(jnp.broadcast_to(logits, (n, V)),
                               row_keys(jax.random.fold_in(key, 1), n), params))
    keep = numpy_keep(np.asarray(logits[0], np.float64), 0.7, 6, 0.95)
    z = np.where(keep, np.asarray(logits[0], np.float64) / 0.7, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    counts = np.bincount(draws, minlength=V)
    assert counts[~keep].sum() == 0
    sigma = np.sqrt(n * p * (1 - p)) + 1
    assert np.all(np.abs(counts - n * p) < 5 * sigma), (counts, n * p)


# ----------------------------------------------------------------- stop tokens, row reuse
def test_stop_tokens_and_row_reuse_equal_each_request_alone(key):
    """Five requests (own prompt, key, sampling settings, stop token, budget) through a batch
    of 3 rows: whenever a row finishes, `refill` gives it the next request. Every request's
    tokens equal running it alone."""
    model = make(SinksWindow(2, 6), key)
    n_req, width = 5, 9
    req_prompts = prompts(jax.random.fold_in(key, 1), (9, 4, 1, 6, 2), width)
    req_keys = jax.random.split(jax.random.fold_in(key, 2), n_req)
    temps = [0.0, 1.0, 0.8, 0.0, 1.2]

    def alone(r, stop, budget):
        x = sz.Seq.from_lengths(req_prompts.values[r:r + 1], req_prompts.lengths()[r:r + 1])
        st = decode.start(model, x, keys=req_keys[r:r + 1], max_new_tokens=budget,
                          stop_tokens=[[stop]], temperature=temps[r])
        _, out = decode.generate(model, st, 16)
        return list(out.rows()[0])

    # Stop tokens that do occur: each request's 5th free-running token.
    free = [alone(r, -1, 16) for r in range(n_req)]
    stops = [int(f[4]) for f in free]
    budgets = [16, 16, 3, 16, 16]
    want = []
    for r in range(n_req):
        cut = min(free[r].index(stops[r]) + 1, budgets[r])
        want.append(free[r][:cut])
        assert alone(r, stops[r], budgets[r]) == want[r]

    def request_rows(rows_to_req):
        """Per-row arguments for the requests assigned to rows (-1: none)."""
        idx = [max(r, 0) for r in rows_to_req]
        x = sz.Seq.from_lengths(req_prompts.values[np.array(idx)],
                                jnp.where(jnp.array(rows_to_req) >= 0, req_prompts.lengths()[np.array(idx)], 0))
        return dict(prompts=x, keys=req_keys[np.array(idx)],
                    max_new_tokens=[budgets[i] for i in idx],
                    stop_tokens=[[stops[i]] for i in idx],
                    temperature=[temps[i] for i in idx])

    assigned = [0, 1, 2]
    args = request_rows(assigned)
    state = decode.start(model, args.pop("prompts"), **args)
    got = {r: [] for r in range(n_req)}
    queue = [3, 4]
    for _ in range(20):
        state, out = decode.generate(model, state, 16, until="any")
        for b, toks in enumerate(out.rows()):
            if assigned[b] >= 0:
                got[assigned[b]] += list(toks)
        done = np.asarray(state.done)
        reuse = np.zeros(3, bool)
        for b in range(3):
            if done[b] and queue:
                assigned[b], reuse[b] = queue.pop(0), True
            elif done[b]:
                assigned[b] = -1
        if reuse.any():
            args = request_rows([assigned[b] if reuse[b] else -1 for b in range(3)])
            state = decode.refill(model, state, jnp.asarray(reuse), args.pop("prompts"), **args)
        elif done.all():
            break
    assert got == {r: want[r] for r in range(n_req)}


# ------------------------------------------------------------- long runs, no recompilation
def run_many_tokens(model, total, steps_per_call, batch=2):
    x = prompts(jax.random.key(3), (5, 2)[:batch], 5)
    state = decode.start(model, x, keys=jax.random.key(4), max_new_tokens=total + 1,
                         temperature=1.0)
    nbytes = sz.carry_nbytes(state.carry)
    state, _ = decode.generate(model, state, steps_per_call)
    compiles = decode._generate._cache_size()
    for _ in range(total // steps_per_call - 1):
        state, out = decode.generate(model, state, steps_per_call)
        assert sz.carry_nbytes(state.carry) == nbytes
    assert decode._generate._cache_size() == compiles, "generate recompiled"
    assert bool(out.mask.all()) and np.all(np.isfinite(np.asarray(state.logits)))
    np.testing.assert_array_equal(np.asarray(model.positions(state.carry)),
                                  np.array((5, 2)[:batch]) + total)
    return state


def test_constant_carry_and_one_compilation_over_500_tokens(key):
    model = make(SinksWindow(2, 8), key)
    run_many_tokens(model, 500, 50)


@pytest.mark.slow
def test_constant_carry_and_one_compilation_over_100k_tokens(key):
    model = make(SinksWindow(4, 32), key)
    run_many_tokens(model, 100_000, 2000)


# ---------------------------------------------------------------------------------- paged
def test_paged_decode_equals_ring_full_cache(key):
    model = make(FullCache(48), key)
    x = prompts(jax.random.fold_in(key, 1), (9, 4, 1), 9)
    kw = dict(keys=jax.random.key(5), max_new_tokens=[20, 10, 30], chunk_size=3, **MIXED)
    ring, a = decode.generate(model, decode.start(model, x, **kw), 30)
    cache = paged.create(model, 3, num_pages=30, page_size=4, pages_per_row=10)
    pag, b = decode.generate(model, decode.start(model, x, carry=cache, **kw), 30)
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    np.testing.assert_allclose(pag.logits, ring.logits, atol=1e-5)
    lengths = np.array([29, 14, 31])
    np.testing.assert_array_equal(np.asarray(pag.carry.lengths), lengths)
    used = np.asarray(pag.carry.page_table) >= 0
    np.testing.assert_array_equal(used.sum(1), -(-lengths // 4))     # pages in proportion to length
    assert np.asarray(pag.carry.ref_count).sum() == used.sum()


def test_paged_prefix_sharing_copy_on_write_and_freeing(key):
    """One 9-token prompt forked into rows 1 and 2 (pages shared by reference); each row then
    samples its own continuation, writing into the shared partial page (copied on write).
    Equal to the ring cache with copied rows; freeing returns the pages."""
    model = make(FullCache(48), key)
    x = prompts(jax.random.fold_in(key, 1), (9, 0, 0), 9)
    kw = dict(keys=jax.random.key(6), max_new_tokens=12, temperature=1.0)
    cache = paged.create(model, 3, num_pages=16, page_size=4, pages_per_row=6)
    states = [decode.start(model, x, **kw), decode.start(model, x, carry=cache, **kw)]
    for i, st in enumerate(states):
        st = decode.fork(model, st, 0, 1, key=jax.random.key(10))
        states[i] = decode.fork(model, st, 0, 2, key=jax.random.key(11))
    shared = states[1].carry
    np.testing.assert_array_equal(np.asarray(shared.page_table[:, :3]), np.tile(shared.page_table[0, :3], (3, 1)))
    np.testing.assert_array_equal(np.asarray(shared.ref_count)[np.asarray(shared.page_table[0, :3])], [3, 3, 3])
    (ring, a), (pag, b) = (decode.generate(model, st, 12) for st in states)
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
    assert len({tuple(r) for r in np.asarray(b.values)}) == 3      # three different continuations
    np.testing.assert_allclose(pag.logits, ring.logits, atol=1e-5)
    table, ref = np.asarray(pag.carry.page_table), np.asarray(pag.carry.ref_count)
    assert len(set(table[:, 2])) == 3                               # the partial page was copied
    np.testing.assert_array_equal(ref[table[0, :2]], [3, 3])          # full pages still shared
    freed = paged.free_rows(pag.carry, jnp.array([True, False, True]))
    assert np.asarray(freed.ref_count).sum() == (np.asarray(freed.page_table) >= 0).sum() == 6


def test_paged_overflow_raises(key):
    model = make(FullCache(48), key)
    x = prompts(jax.random.fold_in(key, 1), (9, 9), 9)
    cache = paged.create(model, 2, num_pages=4, page_size=4, pages_per_row=8)
    with pytest.raises(RuntimeError, match="paged cache overflow"):
        decode.start(model, x, keys=jax.random.key(0), max_new_tokens=4, carry=cache)


# ------------------------------------------------------------------------------ bad input
def test_bad_input(key):
    model = make(SinksWindow(2, 4), key)
    x = prompts(key, (3, 2), 3)
    ok = dict(keys=jax.random.key(0), max_new_tokens=4)
    cases = [
        (lambda: decode.prefill(model, model.init_carry(2), x, chunk_size=0), "chunk_size"),
        (lambda: decode.prefill(model, model.init_carry(2), x.astype(jnp.float32)), "prompts"),
        (lambda: decode.start(model, x, **ok, temperature=-1.0), "temperature"),
        (lambda: decode.start(model, x, **ok, top_p=0.0), "top_p"),
        (lambda: decode.start(model, x, **ok, top_k=-2), "top_k"),
        (lambda: decode.start(model, x, **ok, stop_tokens=[V]), "stop_tokens"),
        (lambda: decode.start(model, x, keys=jax.random.key(0), max_new_tokens=-1), "max_new_tokens"),
        (lambda: decode.start(model, x, keys=np.zeros(2), max_new_tokens=4), "keys"),
        (lambda: decode.start(model, x, keys=jax.random.split(jax.random.key(0), 3), max_new_tokens=4), "keys"),
        (lambda: SamplingParams.create(2, temperature=[1.0, 1.0, 1.0]), "temperature"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
    state = decode.start(model, x, **ok)
    for fn, name in [(lambda: decode.generate(model, state, 0), "num_steps"),
                     (lambda: decode.generate(model, state, 4, until="first"), "until"),
                     (lambda: decode.refill(model, state, jnp.array([1, 0]), x, **ok), "rows"),
                     (lambda: decode.fork(model, state, 0, 2, key=jax.random.key(1)), "dst"),
                     (lambda: paged.create(model, 2, num_pages=0, page_size=4, pages_per_row=2), "num_pages")]:
        with pytest.raises(ValueError, match=name):
            fn()
