"""Chunked Conformer stack: offline against an independent float64 chunk-by-chunk reference
(`reference.py`) at several (chunk, left, look-ahead) settings of the same weights; the
streaming contract per setting; look-ahead that is peeked but not committed; latency views
sharing parameters; the spec's timing; bad input."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import streamzoo as sz
from streamzoo.testing import assert_stream_contract
from streamzoo.zoo.asr.conformer import ChunkedSpec, ConformerStack, Latency

from tests.zoo.asr.reference import stack_reference

D, T, LAYERS, HEADS = 8, 20, 2, 2
LENGTHS = (T, 13, 3)
SETTINGS = {  # (chunk, left, look-ahead) in frames
    "c2_l3_r1": Latency(2, 3, 1),  # look-ahead shorter than a chunk, left not a chunk multiple
    "c3_l0_r4": Latency(3, 0, 4),  # no left context, look-ahead longer than a chunk
    "c1_l2_r0": Latency(1, 2, 0),  # fully causal, frame by frame
}
# The default run checks the semantics of every setting against the reference above and the
# whole encoder's harness (test_encoder.py, which streams this stack) at two settings; the
# stack's own harness runs with `-m slow` (compiles dominate on the 2-core CI).

_offline, _step, _flush = sz.jitted_apply, sz.jitted_step, sz.jitted_flush


@pytest.fixture(scope="module")
def stack() -> ConformerStack:
    return ConformerStack(D, LAYERS, HEADS, latency=SETTINGS["c2_l3_r1"], conv_kernel=3,
                          rngs=nnx.Rngs(params=jax.random.key(7)))


def ragged(key, lengths=LENGTHS, length=T) -> sz.Seq:
    return sz.Seq.from_lengths(jax.random.normal(key, (len(lengths), length, D)),
                               jnp.array(lengths))


@pytest.mark.parametrize("name", SETTINGS)
def test_offline_matches_chunkwise_reference(stack, name, key):
    lat = SETTINGS[name]
    x = ragged(key)
    got = _offline(stack.with_latency(lat), x).rows()
    for b, row in enumerate(x.rows()):
        want = stack_reference(stack, lat, row)
        assert got[b].shape == want.shape
        np.testing.assert_allclose(got[b], want, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", SETTINGS)
def test_stream_contract_all_checks(stack, name, key):
    assert_stream_contract(stack.with_latency(SETTINGS[name]), ragged(key))


def test_lookahead_is_peeked_not_committed(stack, key):
    """Chunk c sees its R look-ahead frames, and no further; a chunk is emitted as soon as its
    look-ahead has arrived, while the look-ahead frames stay pending (uncommitted)."""
    view = stack.with_latency(SETTINGS["c2_l3_r1"])  # C=2, left=3, R=1
    x = ragged(key)
    y = _offline(view, x).rows()[0]
    bumped = sz.Seq(x.values.at[0, 6].add(jax.random.normal(key, (D,))), x.mask)
    dy = np.abs(_offline(view, bumped).rows()[0] - y).max(axis=-1)
    assert np.all(dy[:4] < 1e-6)  # chunks 0, 1 neither contain nor peek at frame 6
    assert np.all(dy[4:6] > 1e-4)  # chunk 2 (frames 4, 5) peeks at it
    # After 5 frames, chunks 0 and 1 are out (chunk 1's look-ahead, frame 4, has arrived) and
    # equal the offline outputs; frame 4 stays pending, uncommitted.
    carry, out = _step(view, view.init_carry(3), x.time_slice(0, 5))
    np.testing.assert_allclose(out.rows()[0], y[:4], atol=1e-5)
    assert np.asarray(carry.pending_count).tolist() == [1, 1, 1]


def test_spec_timing(stack):
    lat = Latency(4, 8, 3)
    spec = stack.with_latency(lat).spec
    assert isinstance(spec, ChunkedSpec)
    assert spec.receptive_field[1] == 4 - 1 + 3  # C - 1 + R, whatever the depth
    assert [spec.outputs_after(n) for n in range(12)] == [0] * 7 + [4] * 4 + [8]
    assert spec.offline_length(10) == 10  # the final partial chunk is not dropped
    # A frame-wise head after the encoder keeps the offline length (ChunkedSpec.then).
    head = sz.StreamSpec()
    assert spec.then(head).offline_length(10) == 10
    assert spec.after(sz.StreamSpec(block_size=4, output_ratio=Fraction(1, 4))).offline_length(41) == 10


def test_views_share_parameters(stack, key):
    """`with_latency` holds the same parameters (no copy): training the stack trains every
    view. Two settings of the same weights give different outputs (the masks differ)."""
    view = stack.with_latency(chunk=2, left=1, lookahead=0)
    assert view.base is stack
    mine = jax.tree_util.tree_leaves(nnx.state(stack, nnx.Param))
    theirs = jax.tree_util.tree_leaves(nnx.state(view, nnx.Param))
    assert len(mine) == len(theirs) and all(a is b for a, b in zip(mine, theirs))
    x = ragged(key)
    a = _offline(stack.with_latency(SETTINGS["c1_l2_r0"]), x).values
    b = _offline(stack.with_latency(SETTINGS["c3_l0_r4"]), x).values
    assert float(jnp.abs(a - b).max()) > 1e-3


def test_rows_desynchronised(stack, key):
    """Rows that have committed different numbers of frames share one step."""
    view = stack.with_latency(SETTINGS["c2_l3_r1"])
    x = ragged(key, (T, T, T))
    want = _offline(view, x).rows()
    schedule = [(1, 4, 0), (4, 0, 3), (5, 7, 4), (6, 5, 8), (4, 4, 5)]  # per-row frames per step
    carry, outs, start = view.init_carry(3), [], np.zeros(3, int)
    values = np.asarray(x.values)
    for lengths in schedule:
        chunk, mask = np.zeros((3, 8, D), np.float32), np.zeros((3, 8), bool)
        for b, n in enumerate(lengths):
            chunk[b, :n] = values[b, start[b]:start[b] + n]
            mask[b, :n] = True
            start[b] += n
        carry, y = _step(view, carry, sz.Seq(jnp.asarray(chunk), jnp.asarray(mask)))
        outs.append(y)
    carry, tail = _flush(view, carry)
    for b in range(3):
        row = np.concatenate([o.rows()[b] for o in outs + [tail]])
        np.testing.assert_allclose(row, want[b], atol=1e-5, rtol=1e-5)


def test_bad_input(stack, key):
    for kwargs, match in [(dict(chunk=0, left=1), "chunk"), (dict(chunk=2, left=-1), "left"),
                          (dict(chunk=2, left=1, lookahead=1.5), "lookahead")]:
        with pytest.raises(ValueError, match=match):
            Latency(**kwargs)
    with pytest.raises(ValueError, match="latency"):
        Latency.of("fast")
    with pytest.raises(ValueError, match="latency"):
        stack.with_latency()
    with pytest.raises(ValueError, match="num_heads"):
        ConformerStack(D, 1, 3, latency=(2, 2, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_heads"):
        ConformerStack(12, 1, 4, latency=(2, 2, 0), rngs=nnx.Rngs(0))  # odd head size
    a, b = stack.with_latency(Latency(2, 3, 1)), stack.with_latency(Latency(3, 2, 0))
    x = ragged(key)
    with pytest.raises(ValueError, match="carry"):  # a carry of another latency
        a.step(b.init_carry(3), x)
    with pytest.raises(ValueError, match="feature shape"):
        a(sz.Seq.full(jax.random.normal(key, (3, T, D + 1))))
