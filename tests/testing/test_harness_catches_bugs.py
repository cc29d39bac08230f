"""The harness must pass correct layers and report each deliberately broken one."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from streamzoo import Seq
from streamzoo.testing import StreamContractError, assert_stream_contract
from tests import toy_layers as toy

D = 4


@pytest.fixture(scope="module")
def x():
    values = jax.random.normal(jax.random.key(7), (3, 14, D))
    return Seq.from_lengths(values, jnp.array([14, 9, 4]))


@pytest.mark.parametrize("make", [toy.NextFrameMix, toy.DepthwiseCausalConv, toy.RotateByPosition])
def test_correct_toy_layers_pass(make, x):
    report = assert_stream_contract(make(D, rngs=nnx.Rngs(0)), x)
    assert set(report) == {"partitions", "flush", "batch", "exec_mask", "reset_rows", "carry",
                           "checkpoint", "gradients", "receptive_field", "long"}


BROKEN = [
    # (layer, checks to run, the check that must report it)
    (toy.ConvDropsBuffer, ("partitions",), r"\[partitions\].*max \|stream - offline\|"),
    (toy.RotateByPhysicalSlot, ("partitions",), r"\[partitions\]"),
    (toy.RotateAdvancesOnMasked, ("exec_mask",), r"\[exec_mask\]"),
    (toy.FlushLosesTail, ("flush",), r"\[flush\].*flush emitted 0 frames"),
    (toy.FlushLosesTail, ("partitions",), r"\[partitions\].*valid output frames, expected"),
    (toy.LatencyUnderstated, ("receptive_field",), r"\[receptive_field\].*outside the declared"),
    (toy.LeaksMaskedFrames, ("batch",), r"\[batch\].*masked frames leak"),
    (toy.CarryChangesDtype, ("carry",), r"\[carry\] carry shapes/dtypes changed"),
]


@pytest.mark.parametrize("make,checks,message", BROKEN, ids=lambda v: getattr(v, "__name__", None))
def test_broken_layer_is_reported(make, checks, message, x):
    with pytest.raises(StreamContractError, match=message):
        assert_stream_contract(make(D, rngs=nnx.Rngs(0)), x, checks=checks)


@pytest.mark.parametrize("make", [toy.ConvDropsBuffer, toy.RotateAdvancesOnMasked, toy.FlushLosesTail])
def test_broken_layer_fails_full_harness(make, x):
    with pytest.raises(StreamContractError):
        assert_stream_contract(make(D, rngs=nnx.Rngs(0)), x)


def test_unknown_check_name_is_a_value_error(x):
    with pytest.raises(ValueError, match="checks: unknown names"):
        assert_stream_contract(toy.RotateByPosition(D), x, checks=("partition",))
