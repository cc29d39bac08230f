from fractions import Fraction

import pytest

from streamzoo import StreamSpec
from streamzoo.core.spec import compose

STRIDE2 = StreamSpec(block_size=2, output_ratio=Fraction(1, 2), receptive_field=(-2, 0))
UP3 = StreamSpec(block_size=1, output_ratio=3, receptive_field=(-1 / 3, 2 / 3))
LOOK2 = StreamSpec(input_latency=2, output_latency=2, receptive_field=(-4, 2))


def test_strides_multiply_and_blocks_grow():
    s = STRIDE2.then(STRIDE2)
    assert s.block_size == 4 and s.output_ratio == Fraction(1, 4)
    assert s.receptive_field == (-2 + -2 * 2, 0)


def test_upsampler_after_stride_needs_whole_output_blocks():
    s = STRIDE2.then(UP3)
    assert s.output_ratio == Fraction(3, 2) and s.block_size == 2
    t = UP3.then(STRIDE2)
    assert t.output_ratio == Fraction(3, 2)
    assert (t.block_size * UP3.output_ratio) % 2 == 0


def test_latency_accumulates_through_strides():
    s = STRIDE2.then(LOOK2)  # 2 frames of look-ahead at half rate = 4 input frames
    assert s.input_latency == 4 and s.output_latency == 2
    assert s.receptive_field == (-2 - 8, 4)
    assert s.outputs_after(11) == 5 - 2 and s.offline_length(11) == 5


def test_latency_not_divisible_by_a_later_stride_is_a_clear_error():
    one = StreamSpec(input_latency=1, output_latency=1, receptive_field=(0, 1))
    with pytest.raises(ValueError, match="output_latency.*Delay"):
        one.then(STRIDE2)
    assert LOOK2.then(STRIDE2).output_latency == 1


def test_compose_and_repeat_agree():
    assert compose([LOOK2] * 3) == LOOK2.repeat(3)
    assert LOOK2.repeat(3).output_latency == 6


def test_anchor_is_last_input_of_the_block():
    assert STRIDE2.anchor(0) == 1 and STRIDE2.anchor(3) == 7
    assert UP3.anchor(2) == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size"),
    (dict(output_ratio=0), "output_ratio"),
    (dict(input_latency=-1), "latencies"),
    (dict(receptive_field=(1, 0)), "receptive_field"),
    (dict(block_size=3, output_ratio=Fraction(1, 2)), "block_size"),
])
def test_bad_specs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamSpec(**kwargs)
