"""Speculative decoding: greedy outputs equal plain `decode.generate` for a small draft model,
for the target as its own draft and for n-gram drafting, in a batch of desynchronised rows
(prompt lengths, stop tokens, budgets, one sampled row) under FullCache and SinksWindow with
ring wrap-around, over several `generate` calls and row reuse; after it, the KV caches equal
plain decoding of the same tokens (rollback is exact); sampled tokens follow the target's
distribution (chi-square); n-gram proposals; bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import streamzoo as sz
from streamzoo.core import jitted_apply
from streamzoo.layers.kv_policies import FullCache, SinksWindow, SlidingWindow
from streamzoo.zoo.lm import decode, paged
from streamzoo.zoo.lm import speculative as spec
from streamzoo.zoo.lm.model import StreamingLM, with_policy
from streamzoo.zoo.lm.sampling import SamplingParams, filtered_logits

V, D, L, H, HKV, HIDDEN, K = 32, 16, 2, 4, 2, 32, 3
POLICIES = {  # target policy, small draft's policy
    "full": (FullCache(48), SlidingWindow(4)),
    "sinks_window": (SinksWindow(2, 6), SinksWindow(1, 4)),  # 9 ring slots: wraps ~3 times
}
LENGTHS, WIDTH = (9, 4, 1, 6), 9
BUDGETS = [24, 20, 24, 16]
SAMPLING = dict(temperature=[0.0, 0.0, 0.0, 1.0], top_p=[1.0, 1.0, 1.0, 0.9])
CALL_STEPS = 5   # verify steps per generate call: a row needs several calls


def target_lm(policy, seed=0, max_rollback=K) -> StreamingLM:
    return StreamingLM(V, D, L, H, HKV, HIDDEN, policy=policy, max_rollback=max_rollback,
                       rngs=nnx.Rngs(params=jax.random.key(seed)))


def small_lm(policy, seed=1, vocab=V, max_rollback=K) -> StreamingLM:
    return StreamingLM(vocab, 8, 1, 2, 1, 16, policy=policy, max_rollback=max_rollback,
                       rngs=nnx.Rngs(params=jax.random.key(seed)))


@pytest.fixture(scope="module")
def models():
    return {name: (target_lm(t), small_lm(d)) for name, (t, d) in POLICIES.items()}


def drafter_for(variant, target, small):
    return {"draft": lambda: spec.DraftModel(small, K), "self": lambda: spec.DraftModel(target, K),
            "ngram": lambda: spec.NGramDraft(K, max_ngram=3, history=32)}[variant]()


def batch_prompts():
    ids = jax.random.randint(jax.random.key(11), (len(LENGTHS), WIDTH), 0, V, dtype=jnp.int32)
    return sz.Seq.from_lengths(ids, jnp.array(LENGTHS))


def first_new(tokens, start):
    """The first token of `tokens[start:]` that does not occur before `start` (-1 if none):
    a stop token that ends the row there."""
    tokens = list(tokens)
    return next((int(t) for t in tokens[start:] if tokens.index(t) >= start), -1)


_RUNS = {}


def run(models, policy, variant):
    """Plain and speculative decoding of the same requests (cached per module)."""
    if (policy, variant) in _RUNS:
        return _RUNS[policy, variant]
    target, small = models[policy]
    x = batch_prompts()
    kw = dict(keys=jax.random.key(5), **SAMPLING)
    free = decode.generate(target, decode.start(target, x, max_new_tokens=24, **kw), 24)[1].rows()
    stops = [[first_new(free[0], 7)], [first_new(free[1], 11)], [-1], [-1]]
    kw.update(max_new_tokens=BUDGETS, stop_tokens=stops)
    plain, want = decode.generate(target, decode.start(target, x, **kw), 24)

    drafter = drafter_for(variant, target, small)
    state = spec.start(target, drafter, x, **kw)
    got = [[] for _ in LENGTHS]
    for _ in range(24):
        state, out = spec.generate(target, drafter, state, CALL_STEPS)
        assert out.values.shape == (len(LENGTHS), CALL_STEPS * (K + 1))
        for b, row in enumerate(out.rows()):
            got[b] += row.tolist()
        if bool(state.decode.done.all()):
            break
    _RUNS[policy, variant] = result = dict(x=x, stops=stops, plain=plain, want=want.rows(),
                                           state=state, got=got, drafter=drafter)
    return result


CASES = [("full", "draft"), ("full", "ngram"), ("sinks_window", "draft"),
         ("sinks_window", "self"), ("sinks_window", "ngram")]
DEFAULT_CASES = {("full", "draft"), ("sinks_window", "ngram"), ("sinks_window", "self")}


def cases(keep=lambda policy, variant: True):
    """CASES as pytest params; those outside DEFAULT_CASES only run with `-m slow` (each case
    compiles its own decode loop: ~1 CPU-minute)."""
    return [pytest.param(*c, marks=() if c in DEFAULT_CASES else pytest.mark.slow,
                         id=f"{c[0]}-{c[1]}") for c in CASES if keep(*c)]


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("policy,variant", cases())
def test_greedy_rows_equal_plain_decoding(models, policy, variant):
    r = run(models, policy, variant)
    state, got = r["state"], r["got"]
    for b in range(3):                                   # greedy rows: identical tokens
        assert got[b] == r["want"][b].tolist(), f"row {b}"
    assert len(got[0]) < BUDGETS[0] and got[0][-1] == r["stops"][0][0]   # stopped on its token
    assert len(got[2]) == BUDGETS[2]
    assert len(got[3]) == BUDGETS[3] and all(0 <= t < V for t in got[3])  # the sampled row
    np.testing.assert_array_equal(np.asarray(state.decode.num_generated), [len(g) for g in got])
    assert bool(state.decode.done.all())
    np.testing.assert_allclose(state.decode.logits[:3], r["plain"].logits[:3], atol=1e-5)
    s = spec.stats(state)
    print(f"\n{policy}/{variant}: {s}")
    assert s["drafted"] == K * s["verify_steps"] and 0 <= s["accepted"] <= s["drafted"]
    # Each verify step emits 1..k+1 tokens per row: fewer verify steps than tokens.
    assert s["verify_steps"] <= sum(len(g) for g in got)
    if variant == "self":                                # the target as its own draft
        assert s["acceptance_rate"] > 0.95


def test_row_reuse_equals_plain_refill(models):
    """Rows 0 and 2 get new requests after the batch finished: equal to `decode.refill`."""
    target, small = models["sinks_window"]
    r = run(models, "sinks_window", "ngram")
    rows = jnp.array([True, False, True, False])
    new = sz.Seq.from_lengths(jax.random.randint(jax.random.key(12), (4, WIDTH), 0, V),
                              jnp.array([3, 0, 8, 0]))
    kw = dict(keys=jax.random.key(9), max_new_tokens=[10, 1, 12, 1], stop_tokens=r["stops"],
              temperature=0.0)
    plain = decode.refill(target, r["plain"], rows, new, **kw)
    _, want = decode.generate(target, plain, 24)
    state = spec.refill(target, r["drafter"], r["state"], rows, new, **kw)
    assert np.asarray(state.num_verify)[[0, 2]].sum() == 0
    got = [[] for _ in LENGTHS]
    while not bool(state.decode.done.all()):
        state, out = spec.generate(target, r["drafter"], state, CALL_STEPS)
        for b, row in enumerate(out.rows()):
            got[b] += row.tolist()
    assert got == [w.tolist() for w in want.rows()]
    assert got[1] == got[3] == []                        # finished rows do not move


# ------------------------------------------------------------------------------ rollback
def assert_cache_equals(spec_carry, ref_carry, model):
    """Same positions; every slot the speculative cache fills holds the reference's position,
    key and value; every position the policy keeps is there."""
    a, b = spec_carry.layers, ref_carry.layers
    np.testing.assert_array_equal(np.asarray(a.pos), np.asarray(b.pos))
    slots = np.asarray(a.slot_pos)
    filled = slots >= 0
    np.testing.assert_array_equal(slots[filled], np.asarray(b.slot_pos)[filled])
    np.testing.assert_allclose(np.asarray(a.k)[filled], np.asarray(b.k)[filled], atol=1e-5)
    np.testing.assert_allclose(np.asarray(a.v)[filled], np.asarray(b.v)[filled], atol=1e-5)
    group = model.attention.groups[0]
    pos = np.asarray(a.pos)
    for layer in range(pos.shape[0]):
        for row in range(pos.shape[1]):
            p = pos[layer, row]
            kept = set(range(max(0, p - group.max_past), p)) | set(range(min(group.num_sinks, p)))
            assert kept <= set(slots[layer, row].tolist()), (layer, row)


@pytest.mark.parametrize("policy,variant", cases(lambda policy, variant: variant != "self"))
def test_caches_after_speculation_equal_plain_decoding_of_the_same_tokens(models, policy,
                                                                            variant):
    r = run(models, policy, variant)
    target, small = models[policy]
    x, got = r["x"], r["got"]
    n = [int(v) for v in np.asarray(x.lengths())]
    width = max(a + len(g) for a, g in zip(n, got))
    seq = np.zeros((len(n), width), np.int32)
    for b, g in enumerate(got):
        seq[b, :n[b] + len(g)] = np.concatenate([np.asarray(x.values[b, :n[b]]), g])
    full = sz.Seq.from_lengths(jnp.asarray(seq), jnp.array([a + len(g) for a, g in zip(n, got)]))
    state = r["state"]
    pairs = [(target, state.decode)] + ([(small, state.draft)] if variant == "draft" else [])
    for model, got_state in pairs:
        ref, logits, _ = decode.prefill(model, model.init_carry(len(n)), full)
        assert_cache_equals(got_state.carry, ref, model)
        np.testing.assert_allclose(got_state.logits, logits, atol=1e-5)


# ---------------------------------------------------------------------------- sampling
def noisy_copy(model, seed, scale):
    """The target with every parameter perturbed: a draft that agrees often, not always.
    (numpy noise: no per-shape compilations.)"""
    rng = np.random.default_rng(seed)
    new = nnx.clone(model)
    params = nnx.state(new, nnx.Param)
    noisy = jax.tree.map(lambda p: jnp.asarray(
        np.asarray(p) + scale * np.std(np.asarray(p)) * rng.standard_normal(p.shape), p.dtype),
        params)
    nnx.update(new, noisy)
    return new


def exact_two_token_distribution(model, prompt, params):
    """`P[t1, t2]` of the first two sampled tokens after `prompt`, from the offline call."""
    rows = np.concatenate([np.tile(prompt, (V, 1)), np.arange(V)[:, None]], 1)
    logits = jitted_apply(model, sz.Seq.full(jnp.asarray(rows, jnp.int32))).values
    one = SamplingParams.create(V, **params)

    def probs(lg):
        z = np.asarray(filtered_logits(lg, one), np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    return probs(logits[:, -2])[0][:, None] * probs(logits[:, -1])


def lookup_prompt(model, key, params):
    """`[a b X r1 r2 r3 a b]` with X the token the target likes most after it: the n-gram
    drafter proposes `X r1 r2` and X is often accepted. (The rows get one more token, which
    the causal model ignores, so that the offline call has the shape it has elsewhere.)"""
    a, b, r1, r2, r3 = np.asarray(jax.random.randint(key, (5,), 0, V))
    rows = np.array([[a, b, x, r1, r2, r3, a, b, 0] for x in range(V)], np.int32)
    logits = jitted_apply(model, sz.Seq.full(jnp.asarray(rows))).values[:, -2]
    p = jax.nn.softmax(filtered_logits(logits, SamplingParams.create(V, **params)), -1)
    return rows[int(jnp.argmax(p[jnp.arange(V), jnp.arange(V)])), :-1]


NUM_DRAWS = 500    # generate calls from one prefilled state, each with fresh keys


@pytest.mark.parametrize("variant", ["near_draft", "ngram"])
def test_sampled_tokens_follow_the_target_distribution(models, key, variant):
    """One prompt in all four rows, prefilled once; 500 `generate` calls from that state
    with fresh keys draw the first two tokens 2000 times. The counts over the (t1, t2) cells
    must fit the exact target distribution (temperature with top-k, and top-p): Pearson's
    statistic below the chi-square 1e-3 upper quantile (cells expected below 5 pooled; with a
    fixed seed the test is deterministic, and a correct sampler fails it for 1 seed in 1000),
    and no token outside the kept sets. The near draft (the target with perturbed weights) is
    accepted about half the time, so acceptance, residual and bonus paths all run; the n-gram
    draft is a point mass, on a prompt built so that its proposal is often accepted."""
    target = models["sinks_window"][0]
    if variant == "near_draft":
        params = dict(temperature=1.3, top_k=4)
        drafter = spec.DraftModel(noisy_copy(target, 1, 0.15), K)
        prompt = np.asarray(jax.random.randint(jax.random.fold_in(key, 2), (8,), 0, V))
    else:
        params = dict(temperature=0.8, top_k=5, top_p=0.9)
        drafter = spec.NGramDraft(K, max_ngram=3, history=32)
        prompt = lookup_prompt(target, jax.random.fold_in(key, 2), params)
    rows = len(LENGTHS)
    x = sz.Seq.from_lengths(jnp.asarray(np.tile(np.pad(prompt, (0, WIDTH - 8)), (rows, 1))),
                            jnp.full((rows,), 8))
    state = spec.start(target, drafter, x, keys=key, max_new_tokens=2, **params)
    all_keys = jax.random.split(jax.random.fold_in(key, 3), (NUM_DRAWS, rows))
    draws, accepted, drafted = [], 0, 0
    for keys in all_keys:
        end, out = spec.generate(target, drafter,
                                 state.replace(decode=state.decode.replace(keys=keys)),
                                 CALL_STEPS)
        draws.append(out.values[:, :2])
        accepted, drafted = accepted + end.num_accepted.sum(), drafted + end.num_drafted.sum()
    assert np.all(np.asarray(out.lengths()) == 2)
    print(f"\nsampled/{variant}: acceptance rate {int(accepted) / int(drafted):.3f}")
    assert 0 < int(accepted) < int(drafted)        # both acceptance and rejection happen

    draws = np.asarray(jnp.concatenate(draws))
    p = exact_two_token_distribution(target, prompt, params)
    counts = np.zeros((V, V))
    np.add.at(counts, (draws[:, 0], draws[:, 1]), 1)
    assert counts[p == 0].sum() == 0, "a token outside the kept set was emitted"
    expected, observed = len(draws) * p[p > 0], counts[p > 0]
    small = expected < 5
    if small.any():
        expected = np.append(expected[~small], expected[small].sum())
        observed = np.append(observed[~small], observed[small].sum())
    stat = ((observed - expected) ** 2 / expected).sum()
    limit = scipy.stats.chi2.isf(1e-3, len(expected) - 1)
    print(f"chi-square {stat:.1f} < {limit:.1f} ({len(expected)} cells)")
    assert stat < limit, (stat, limit)


# ------------------------------------------------------------------------------- n-gram
def test_ngram_proposals():
    drafter = spec.NGramDraft(3, max_ngram=3, history=10)
    histories = [
        [5, 6, 7, 8, 5, 6],              # "5 6" occurred before: propose what followed
        [1, 2, 1, 2],                    # overlapping occurrence: continue the period
        [1, 2, 3, 9, 2, 3, 4, 1, 2, 3],  # the longest suffix wins over the most recent "2 3"
        [4, 7, 9],                       # no match: repeat the last token
        [3, 1, 3, 2, 3],                 # most recent occurrence of "3": after it came 2
    ]
    want = [[7, 8, 5], [1, 2, 1], [9, 2, 3], [9, 9, 9], [2, 3, 2]]
    lengths = [len(h) for h in histories]
    x = sz.Seq.from_lengths(jnp.asarray([h + [0] * (10 - len(h)) for h in histories], jnp.int32),
                            jnp.array(lengths))
    state = drafter.init(x)
    np.testing.assert_array_equal(np.asarray(state.length), lengths)
    none = jnp.zeros((5,), bool)
    _, tokens, q = drafter.propose(state, jnp.zeros((5,), jnp.int32), none, ~none, None, None, V)
    np.testing.assert_array_equal(np.asarray(tokens), want)
    np.testing.assert_array_equal(np.asarray(q.argmax(-1)), want)
    # Accepting appends to the (fixed-size) history: the newest tokens stay at the end.
    emitted = jnp.asarray([[11, 12, 13, 14]] * 5, jnp.int32)
    state = drafter.accept(state, emitted, jnp.array([4, 0, 1, 2, 3]), None)
    np.testing.assert_array_equal(np.asarray(state.length), [10, 4, 10, 5, 8])
    np.testing.assert_array_equal(np.asarray(state.tokens[0]), [5, 6, 7, 8, 5, 6, 11, 12, 13, 14])
    np.testing.assert_array_equal(np.asarray(state.tokens[1, -4:]), [1, 2, 1, 2])


# ------------------------------------------------------------------------------ bad input
def test_bad_input(models):
    target, small = models["full"]
    x = batch_prompts()
    ok = dict(keys=jax.random.key(0), max_new_tokens=4)
    short = with_policy(target, FullCache(48), max_rollback=K - 1)
    other_vocab = nnx.eval_shape(lambda: small_lm(SlidingWindow(4), vocab=16))  # never run
    cases = [
        (lambda: spec.start(short, spec.NGramDraft(K), x, **ok), "max_rollback"),
        (lambda: spec.DraftModel(with_policy(small, SlidingWindow(4), max_rollback=1), K),
         "max_rollback"),
        (lambda: spec.start(target, spec.DraftModel(other_vocab, K), x, **ok), "vocab_size"),
        (lambda: spec.DraftModel(small, 0), "num_draft"),
        (lambda: spec.NGramDraft(0), "num_draft"),
        (lambda: spec.NGramDraft(2, max_ngram=4, history=4), "history"),
        (lambda: spec.DraftModel(object(), K), "model"),
        (lambda: spec.start(target, small, x, **ok), "drafter"),
        (lambda: spec.start(target, spec.NGramDraft(K), x, **ok, temperature=-1.0), "temperature"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name):
            fn()
    drafter = spec.NGramDraft(K)
    state = spec.start(target, drafter, x, **ok)
    cache = paged.create(target, 4, num_pages=16, page_size=4, pages_per_row=8)
    paged_state = state.replace(decode=decode.start(target, x, carry=cache, **ok))
    for fn, name in [(lambda: spec.generate(target, drafter, state, 0), "num_steps"),
                     (lambda: spec.generate(target, drafter, state, 2, until="first"), "until"),
                     (lambda: spec.generate(target, drafter, state.decode, 2), "state"),
                     (lambda: spec.generate(short, drafter, state, 2), "max_rollback"),
                     (lambda: spec.generate(target, drafter, paged_state, 2), "paged")]:
        with pytest.raises(ValueError, match=name):
            fn()
