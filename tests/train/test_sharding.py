"""Sharding on 8 simulated CPU devices: sharded train steps equal the unsharded step for DP,
FSDP, TP and DP x TP (jit with in/out shardings) and for the shard_map DP step; batch-sharded
streaming inference equals unsharded; a checkpoint saved under one mesh restores onto
another; logical names of parameters and carries."""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

import streamzoo as sz
from streamzoo.core.combinators import RepeatCarry
from streamzoo.layers.attention import StreamingAttention
from streamzoo.layers.feedforward import FeedForward
from streamzoo.layers.linear_recurrence import LinearRecurrence
from streamzoo.layers.norm import RMSNorm
from streamzoo.train import sharding as shd
from tests.train._multidevice import (cpu_devices, needs_devices, run_module_in_child,
                                      unsharded_on_cpu)  # noqa: F401 (autouse fixture)

D, HIDDEN, B, T = 16, 32, 8, 6
TX = optax.adamw(1e-2, weight_decay=0.1)


def test_this_module_on_8_cpu_devices_in_a_child():
    run_module_in_child(__file__)


# ---------------------------------------------------------------------------- fixtures
@functools.cache
def make_ffn_stack():
    """Norm + 2 stacked residual feed-forwards: Linear, norm and Repeat-stacked params.
    Built once per module (eager construction compiles many tiny programs); steps are pure,
    so tests never mutate it."""
    return jax.jit(lambda: sz.Serial(  # jit: one compile instead of many eager ops
        RMSNorm(D),
        sz.Repeat(lambda r: sz.Residual(FeedForward(D, HIDDEN, rngs=r)), 2, rngs=nnx.Rngs(0))))()


@functools.partial(jax.jit, static_argnames=("batch", "full"))
def make_batch(key, batch=B, full=False):
    kx, ky = jax.random.split(key)
    lengths = jnp.array([T] * batch if full else [T, 3, 5, 1, T, 4, 2, T][:batch])
    x = sz.Seq.from_lengths(jax.random.normal(kx, (batch, T, D)), lengths)
    return {"x": x, "y": jax.random.normal(ky, (batch, T, D))}


def loss_fn(model, batch):
    out = model(batch["x"])
    err = jnp.where(out.mask[..., None], out.values - batch["y"], 0.0)
    return jnp.sum(err ** 2) / (jnp.sum(out.mask) * D)


def train_step(model, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(model, batch)
    updates, opt_state = TX.update(grads, opt_state, model)
    return optax.apply_updates(model, updates), opt_state, loss


unsharded_step = jax.jit(train_step)


def run_steps(step, model, opt_state, batches):
    losses = []
    for batch in batches:
        model, opt_state, loss = step(model, opt_state, batch)
        losses.append(loss)
    return model, opt_state, jnp.stack(losses)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------ names, rules
def test_parameter_logical_names():
    axes = shd.param_logical_axes(make_ffn_stack())
    stack = ("layers", 1, "layers", "inner")
    assert axes[("layers", 0, "scale")] == ("embed",)
    assert axes[stack + ("up", "kernel")] == ("layers", "embed", "mlp")
    assert axes[stack + ("up", "bias")] == ("layers", "mlp")
    assert axes[stack + ("down", "kernel")] == ("layers", "mlp", "embed")
    attention = shd.param_logical_axes(make_streaming_model())
    assert attention[("layers", 0, "qkv", "kernel")] == ("embed", "heads")
    assert attention[("layers", 0, "out", "kernel")] == ("heads", "embed")


def test_declared_out_sharding_metadata_wins():
    with nnx.use_eager_sharding(False):
        layer = nnx.Linear(D, HIDDEN, rngs=nnx.Rngs(0), kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("vocab", "embed")))
    assert shd.param_logical_axes(layer)[("kernel",)] == ("vocab", "embed")


@needs_devices
def test_rules_resolve_per_mesh_and_shape():
    mesh = shd.make_mesh({"data": 2, "model": 4}, devices=cpu_devices())
    spec = lambda names, shape, rules: shd.logical_to_mesh(names, rules, mesh, shape)
    assert spec(("embed", "mlp"), (16, 32), shd.TENSOR_PARALLEL) == P(None, "model")
    assert spec(("embed", "mlp"), (16, 32), shd.FSDP) == P("data")
    assert spec(("layers", "mlp", "embed"), (2, 32, 16), shd.FSDP_TP) == P(None, "model", "data")
    # One mesh axis per array: the carry's batch takes "data" before embed can.
    assert spec(("batch", "embed"), (4, 16), shd.FSDP) == P("data")
    # Undivisible dims and axes missing from the mesh are replicated, not errors.
    assert spec(("embed", "mlp"), (16, 6), shd.TENSOR_PARALLEL) == P()
    assert spec(("batch", "time"), (4, 8), shd.CONTEXT_PARALLEL) == P("data")
    with pytest.raises(ValueError, match="strategy"):
        shd.rules_for("zero3")
    with pytest.raises(ValueError, match="rules"):
        shd.logical_to_mesh(("embed",), [("embed", 3)], mesh)
    with pytest.raises(ValueError, match="names"):
        shd.logical_to_mesh(("embed",), shd.FSDP, mesh, (4, 4))
    with pytest.raises(ValueError, match="axes"):
        shd.make_mesh({"data": 3}, devices=cpu_devices())


@struct.dataclass
class KVCarry:
    logical_axes: ClassVar[dict] = {"k": ("batch", "kv_len", "kv_heads", "head_dim")}
    k: jax.Array
    pos: jax.Array


def test_carry_logical_names_stacked_and_declared():
    carry = jax.eval_shape(lambda: make_streaming_model().init_carry(2))
    attention, _, recurrence = shd.carry_logical_axes(carry).layers
    assert attention.pos == P("batch") and attention.slot_pos[0] == "batch"
    assert recurrence.h == P("batch", None)
    stacked = RepeatCarry(KVCarry(jax.ShapeDtypeStruct((3, 2, 5, 2, 4), jnp.float32),
                                  jax.ShapeDtypeStruct((3, 2), jnp.int32)))
    axes = shd.carry_logical_axes(stacked).layers
    assert axes.k == P("layers", "batch", "kv_len", "kv_heads", "head_dim")
    assert axes.pos == P("layers", "batch")


# ------------------------------------------------------------------------ train steps
STRATEGIES = {
    "dp": ({"data": 8}, shd.DATA_PARALLEL),
    "fsdp": ({"data": 8}, shd.FSDP),
    "tp": ({"model": 8}, shd.TENSOR_PARALLEL),
    "dp_tp": ({"data": 2, "model": 4}, shd.DP_TP),
}


@needs_devices
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_sharded_train_steps_equal_unsharded(strategy, key):
    axes, rules = STRATEGIES[strategy]
    plan = shd.ShardingPlan(shd.make_mesh(axes, devices=cpu_devices()), rules)
    model = make_ffn_stack()
    batches = [make_batch(k) for k in jax.random.split(key, 2)]
    opt_state = TX.init(model)
    want_model, want_opt, want_losses = run_steps(unsharded_step, model, opt_state, batches)

    model_sh = plan.params(model)
    opt_sh = plan.params(model, tree=opt_state)
    batch_sh = plan.batch(batches[0])
    step = jax.jit(train_step, in_shardings=(model_sh, opt_sh, batch_sh),
                   out_shardings=(model_sh, opt_sh, plan.replicated()))
    got_model, got_opt, got_losses = run_steps(
        step, plan.put(model, model_sh), plan.put(opt_state, opt_sh),
        [plan.put(b, batch_sh) for b in batches])

    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
    assert_trees_close(got_model, want_model)
    assert_trees_close(got_opt, want_opt)
    up = got_model.layers[1].layers.inner.up.kernel[...]
    expected = {"dp": P(), "fsdp": P(None, "data"), "tp": P(None, None, "model"),
                "dp_tp": P(None, None, "model")}[strategy]
    assert up.sharding.spec == expected
    if strategy in ("dp", "dp_tp"):
        assert batch_sh["x"].values.spec == P("data")


@needs_devices
def test_shard_map_data_parallel_step_equals_unsharded(key):
    mesh = shd.make_mesh({"data": 8}, devices=cpu_devices())
    graphdef, params = nnx.split(make_ffn_stack())

    def pure_loss(params, batch):
        return loss_fn(nnx.merge(graphdef, params), batch)

    # Equal weights per shard: every row full, so the mean of shard means is the global mean.
    batch = make_batch(key, full=True)
    opt_state = TX.init(params)

    def reference(params, opt_state, batch):
        loss, grads = jax.value_and_grad(pure_loss)(params, batch)
        updates, opt_state = TX.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    want = jax.jit(reference)(params, opt_state, batch)
    step = shd.data_parallel_step(pure_loss, TX, mesh)
    got = step(params, opt_state, batch)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
    assert_trees_close(got[0], want[0])
    assert_trees_close(got[1], want[1])


# -------------------------------------------------------------- sharded streaming step
@functools.cache
def make_streaming_model():
    return jax.jit(lambda: sz.Serial(
        StreamingAttention(D, 4, num_kv_heads=2, max_past=5, rngs=nnx.Rngs(3)),
        sz.Repeat(lambda r: sz.Residual(FeedForward(D, HIDDEN, rngs=r)), 2, rngs=nnx.Rngs(4)),
        LinearRecurrence(D, HIDDEN, out_features=D, rngs=nnx.Rngs(5))))()


def scan_steps(model, carry, xs):
    return sz.multistep(model, carry, xs)


@needs_devices
def test_batch_sharded_streaming_inference_equals_unsharded(key):
    batch, chunk, chunks = 4, 4, 3
    model = make_streaming_model()
    xs = jax.jit(lambda key: sz.chunked(sz.Seq.from_lengths(
        jax.random.normal(key, (batch, chunk * chunks, D)), jnp.array([12, 7, 12, 2])), chunk))(key)
    carry = model.init_carry(batch)
    want_carry, want = jax.jit(scan_steps)(model, carry, xs)

    plan = shd.ShardingPlan(shd.make_mesh({"data": 4, "model": 2}, devices=cpu_devices()),
                            shd.DP_TP)
    model_sh, carry_sh = plan.params(model), plan.carry(carry)
    xs_sh = NamedSharding(plan.mesh, P(None, "data"))  # [K, B, T, ...]: rows over data
    step = jax.jit(scan_steps, in_shardings=(model_sh, carry_sh, xs_sh),
                   out_shardings=(carry_sh, xs_sh))
    got_carry, got = step(plan.put(model, model_sh), plan.put(carry, carry_sh),
                          plan.put(xs, xs_sh))

    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-5)
    assert_trees_close(got_carry, want_carry, atol=1e-5)
    kv = got_carry.layers[0].k
    assert kv.sharding.spec[0] == "data" and kv.addressable_shards[0].data.shape[0] == 1


# ------------------------------------------------------------------------- checkpoints
@needs_devices
def test_checkpoint_saved_under_one_mesh_restores_onto_another(tmp_path, key):
    model = make_ffn_stack()
    # Optimizer state over the nnx.State (orbax cannot restore trees that mix int and str
    # keys, as an optimizer state over the module pytree with its nnx.List does).
    params = nnx.state(model, nnx.Param)
    opt_state = TX.init(params)
    opt_state = jax.jit(lambda params, opt_state: TX.update(  # non-trivial moments
        jax.tree.map(lambda p: jax.random.normal(key, p.shape), params), opt_state, params)[1])(
        params, opt_state)
    state = {"params": params, "opt_state": opt_state}

    fsdp = shd.ShardingPlan(shd.make_mesh({"data": 8}, devices=cpu_devices()), shd.FSDP)
    saved = fsdp.put(state, fsdp.params(model, tree=state))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", saved)
    ckpt.wait_until_finished()

    tp = shd.ShardingPlan(shd.make_mesh({"data": 2, "model": 4}, devices=cpu_devices()),
                          shd.DP_TP)
    target_sh = tp.params(model, tree=state)
    restored = ckpt.restore(tmp_path / "ckpt", tp.abstract(state, target_sh))
    assert_trees_close(restored, state, rtol=0, atol=0)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target_sh), strict=True):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    kernel = restored["params"]["layers"][1]["layers"]["inner"]["up"]["kernel"][...]
    assert kernel.sharding.spec == P(None, None, "model")
    assert saved["params"]["layers"][1]["layers"]["inner"]["up"]["kernel"][...].sharding.spec \
        == P(None, "data")
