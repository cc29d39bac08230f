"""Checkpoints: exact round trips (params, optax NamedTuples, rng, step, data position, carries),
bitwise-identical resumption, max_to_keep, and a clear ValueError for another model or config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from streamzoo.train.checkpoint import Checkpointer
from streamzoo.train.configs import WindowBatches, build_predictor, eeg_series, predictor_loss
from streamzoo.train.loop import TrainState, fit, make_optimizer, train_step

B, T, HIDDEN = 4, 16, 8
TX, _ = make_optimizer(1e-2, 100, warmup_steps=0)
CONFIG = {"model": "predictor", "model_args": {"hidden": HIDDEN}, "num_steps": 6}


def new_state(seed=0, hidden=HIDDEN, tx=TX, carry=None):
    model = build_predictor(4, hidden, rngs=nnx.Rngs(seed))
    return TrainState.create(model, tx, predictor_loss, rng=seed, carry=carry)


def data(seed=0):
    return WindowBatches(eeg_series()[:640], B, T, seed=seed, min_length=9)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def train(state, batches, n):
    for _ in range(n):
        state, _ = train_step(state, next(batches))
    return state


def test_round_trip_is_exact(tmp_path):
    batches = data()
    state = train(new_state(), batches, 2)
    model = state.model()
    carries = {"live": model.init_carry(3)}
    carries["live"] = jax.tree.map(lambda a: a + 1 if a.dtype != jnp.int32 else a + 2, carries["live"])
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.save(state, data_state=batches.get_state(), config=CONFIG, carries=carries)
        ck.wait()
        template = new_state(seed=7)  # another init: only structure / shapes / dtypes matter
        restored, info = ck.restore(template, config=CONFIG,
                                    carries=jax.eval_shape(lambda: {"live": model.init_carry(3)}))
    assert int(restored.step) == 2 == info.step
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(state.opt_state)
    assert type(restored.opt_state[1][0]).__name__ == "ScaleByAdamState"  # NamedTuples kept
    assert type(restored.params) is type(state.params)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    assert jax.random.key_impl(restored.rng) == jax.random.key_impl(state.rng)
    assert info.data_state == batches.get_state() and info.config == CONFIG
    assert_trees_equal(info.carries, carries)
    # The restored state trains on exactly like the original.
    batch = next(batches)
    assert_trees_equal(train_step(restored, batch)[0].params, train_step(state, batch)[0].params)


def test_resume_gives_bitwise_the_same_steps(tmp_path):
    straight = fit(new_state(), data(), num_steps=6, progress=False, donate=False)

    with Checkpointer(tmp_path / "ck") as ck:
        fit(new_state(), data(), num_steps=3, checkpointer=ck, config=CONFIG, progress=False)
        assert ck.all_steps() == [3]
    batches = data()  # a fresh iterator: its position comes from the checkpoint
    with Checkpointer(tmp_path / "ck") as ck:
        resumed = fit(new_state(seed=5), batches, num_steps=6, checkpointer=ck, config=CONFIG,
                      progress=False)
        assert ck.all_steps() == [3, 6]
    assert int(resumed.step) == 6
    assert_trees_equal(resumed.params, straight.params)
    assert_trees_equal(resumed.opt_state, straight.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(resumed.rng), jax.random.key_data(straight.rng))


def test_live_stream_carry_is_checkpointed(tmp_path, key):
    model = build_predictor(4, HIDDEN, rngs=nnx.Rngs(0))
    carry = jax.tree.map(lambda a: jax.random.normal(key, a.shape).astype(a.dtype)
                         if jnp.issubdtype(a.dtype, jnp.floating) else a + 3, model.init_carry(2))
    state = TrainState.create(model, TX, predictor_loss, carry=carry)
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(state)
        restored, _ = ck.restore(TrainState.create(model, TX, predictor_loss,
                                                   carry=model.init_carry(2)))
    assert_trees_equal(restored.carry, carry)


def test_max_to_keep_and_latest(tmp_path):
    state = new_state()
    with Checkpointer(tmp_path / "ck", max_to_keep=2) as ck:
        assert ck.latest_step() is None
        with pytest.raises(ValueError, match="found none"):
            ck.restore(state)
        for step in (1, 2, 3):
            ck.save(state.replace(step=jnp.int32(step)))
        assert not ck.save(state.replace(step=jnp.int32(3)))  # already saved
        ck.wait()
        assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
        with pytest.raises(ValueError, match="step"):
            ck.restore(state, step=1)
        assert int(ck.restore(state, step=2)[0].step) == 2


def test_restoring_another_model_or_config_raises(tmp_path):
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(new_state(), config=CONFIG)
        with pytest.raises(ValueError, match=r"(?s)another model.*\['params'\]\['inner'\]\['layers'\]\[0\].*"
                                             r"checkpoint float32\[4, 16\], current float32\[4, 24\]"):
            ck.restore(new_state(hidden=12))
        with pytest.raises(ValueError, match=r"config\['model_args'\]: checkpoint \{'hidden': 8\}"):
            ck.restore(new_state(), config={**CONFIG, "model_args": {"hidden": 9}})
        with pytest.raises(ValueError, match=r"opt_state"):
            ck.restore(new_state(tx=optax.adam(1e-3)))
        # A changed run length is not an identity change: resuming with more steps is allowed.
        restored, _ = ck.restore(new_state(), config={**CONFIG, "num_steps": 60})
        assert int(restored.step) == 0
