"""Codebook interleaving patterns: exact round trips (ragged rows too), layouts, causality
constraints, partial sequences, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import streamzoo as sz
from streamzoo.zoo.codec.patterns import CodebookPattern

K, T, PAD = 4, 13, -1
PATTERNS = {
    "flat": CodebookPattern.flat(K),
    "delay": CodebookPattern.delay(K),
    "delay_moshi": CodebookPattern.delay(K, (0, 2, 2, 2)),
    "stack_delay": CodebookPattern.stack_delay(K, spacing=2),
    "stack_delay_3": CodebookPattern.stack_delay(K, spacing=3),
}


def grid(key, lengths=(T, 9, 1, 0)) -> sz.Seq:
    values = jax.random.randint(key, (len(lengths), T, K), 0, 1024, jnp.int32)
    return sz.Seq.from_lengths(values, jnp.asarray(lengths))


@pytest.mark.parametrize("name", PATTERNS)
def test_round_trip(name, key):
    pattern = PATTERNS[name]
    codes = grid(key)
    tokens = pattern.interleave(codes, PAD)
    assert tokens.values.shape == (4, pattern.num_steps(T), pattern.width)
    back = pattern.deinterleave(tokens, T, PAD)
    for got, want in zip(back.rows(), codes.rows()):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # Every code sits in exactly one cell, and valid steps hold no foreign values.
    t = np.asarray(tokens.values)
    for b, n in enumerate([T, 9, 1, 0]):
        valid = t[b][np.asarray(tokens.mask[b])]
        assert (valid != PAD).sum() == n * K
        assert np.asarray(tokens.lengths())[b] == pattern.steps_for(T)[n]


@pytest.mark.parametrize("name", PATTERNS)
def test_layout_constraints(name):
    pattern = PATTERNS[name]
    step, slot = pattern.cells(T)
    cells = set(zip(step.ravel().tolist(), slot.ravel().tolist()))
    assert len(cells) == T * K  # a bijection onto the non-empty cells
    # A level is never predicted before the levels below it in its own frame.
    assert (np.diff(step, axis=1) >= 0).all()
    if pattern.kind == "flat":
        assert (np.diff(step.ravel()) == 1).all()
    frame, level = pattern.layout(T)
    assert frame.shape == (pattern.num_steps(T), pattern.width)
    for t in range(T):
        for k in range(K):
            assert frame[step[t, k], slot[t, k]] == t and level[step[t, k], slot[t, k]] == k


def test_known_layouts():
    frame, level = CodebookPattern.delay(3).layout(3)
    np.testing.assert_array_equal(frame, [[0, -1, -1], [1, 0, -1], [2, 1, 0], [-1, 2, 1],
                                          [-1, -1, 2]])
    frame, _ = CodebookPattern.flat(2).layout(2)
    np.testing.assert_array_equal(frame[:, 0], [0, 0, 1, 1])
    # Stack-and-delay, K=2, spacing 2: frames start in the order 0, 2, 1, 3 | 4, 6, 5, 7.
    pattern = CodebookPattern.stack_delay(2, spacing=2)
    np.testing.assert_array_equal(pattern.frame_positions(8), [0, 2, 1, 3, 4, 6, 5, 7])
    frame, level = pattern.layout(4)
    np.testing.assert_array_equal(frame, [[0, -1], [2, 0], [1, 2], [3, 1], [-1, 3]])
    np.testing.assert_array_equal(level[1], [0, 1])
    assert CodebookPattern.stack_delay(3, spacing=1).cells(7)[0].tolist() == \
        CodebookPattern.delay(3).cells(7)[0].tolist()  # spacing 1 is the delay pattern


def test_stack_delay_spreads_concurrent_frames():
    """Frames whose stacks are built in the same steps are `spacing` apart in time, except
    across the hand-over between two interleaved runs of a block."""
    pattern = CodebookPattern.stack_delay(K, spacing=3)
    frame, _ = pattern.layout(2 * K * 3)
    gaps = []
    for row in frame:
        live = sorted(f for f in row if f >= 0)
        gaps += [b - a for a, b in zip(live, live[1:])]
    assert np.median(gaps) == 3
    delay_frame, _ = CodebookPattern.delay(K).layout(2 * K * 3)
    assert max(np.diff(sorted(f for f in delay_frame[K] if f >= 0))) == 1


def test_partial_sequence_gives_complete_frames(key):
    pattern = PATTERNS["delay"]
    codes = grid(key, lengths=(T, T, T, T))
    tokens = pattern.interleave(codes, PAD)
    # Only the first 6 steps generated: frames 0..2 are complete (frame 2's last level is
    # at step 2 + 3 = 5), frame 3 is not.
    cut = tokens.replace(mask=tokens.mask & (jnp.arange(tokens.length) < 6)[None])
    back = pattern.deinterleave(cut, T, PAD)
    np.testing.assert_array_equal(np.asarray(back.lengths()), [3, 3, 3, 3])
    np.testing.assert_array_equal(back.rows()[0], codes.rows()[0][:3])


def test_bad_input(key):
    with pytest.raises(ValueError, match="kind"):
        CodebookPattern("zigzag", K)
    with pytest.raises(ValueError, match="delays"):
        CodebookPattern.delay(3, (0, 2, 1))
    with pytest.raises(ValueError, match="delays"):
        CodebookPattern.delay(3, (0, 1))
    with pytest.raises(ValueError, match="spacing"):
        CodebookPattern.stack_delay(3, spacing=0)
    codes = grid(key)
    pattern = PATTERNS["delay"]
    with pytest.raises(ValueError, match="codes: expected values of shape"):
        pattern.interleave(codes.replace(values=codes.values[..., :3]), PAD)
    with pytest.raises(ValueError, match="codes: expected integer"):
        pattern.interleave(codes.replace(values=codes.values.astype(jnp.float32)), PAD)
    with pytest.raises(ValueError, match="pad_id"):
        pattern.interleave(codes, 1.5)
    tokens = pattern.interleave(codes, PAD)
    with pytest.raises(ValueError, match="tokens: 20 frames need"):
        pattern.deinterleave(tokens, 20, PAD)
