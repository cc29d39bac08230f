"""`assert_stream_contract`: the public harness every streamzoo layer and model passes.

It checks, on the caller's random input `x` (plus inputs derived from it), the ten points of
the streaming contract in DESIGN.md:

 1. partitions       random ragged partitions into multiples of block_size (size-1 blocks,
                     the whole sequence, window-misaligned chunks), Python loop and
                     `jax.jit(multistep)`, equal the offline call;
 2. flush            the number of outputs before `flush` is what `spec` promises, and
                     `flush` emits exactly the rest;
 3. batch            each row equals running it alone; NaN in masked frames and in a garbage
                     row never leaks;
 4. exec_mask        invalid frames inserted anywhere change neither outputs nor the carry;
 5. reset_rows       reset rows equal a fresh carry bitwise, the others are bitwise untouched,
                     and a reset row then streams as a fresh stream;
 6. carry            `init_carry` works under `eval_shape`, has no aliased leaves, keeps its
                     shapes/dtypes across steps, and a jitted step compiles once per chunk shape;
 7. checkpoint       a mid-stream carry saved and restored with orbax continues bitwise;
 8. gradients        gradients through `model(x)` and through scanned `step` + `flush` agree;
 9. receptive_field  perturbing input frame i changes only outputs whose receptive field (per
                     `spec`) holds i, and the declared look-ahead is actually used;
10. long             a run of >= 3x any carry buffer length (rings wrap several times).

Failures raise `StreamContractError` naming the check, the partition or row, the max
deviation and where it is.
"""

from __future__ import annotations

import math
import tempfile
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from streamzoo.core.drivers import chunked, jitted_apply, jitted_flush, jitted_step, multistep
from streamzoo.core.seq import Seq

# Chunk sizes (in blocks) used by every check, so that jitted steps compile once per size.
_SIZES = (1, 2, 5)

ALL_CHECKS = ("partitions", "flush", "batch", "exec_mask", "reset_rows", "carry", "checkpoint",
              "gradients", "receptive_field", "long")


class StreamContractError(AssertionError):
    """A streaming-contract violation; the message says which check and where."""


# --------------------------------------------------------------------------- helpers
_step, _flush, _offline = jitted_step, jitted_flush, jitted_apply


@jax.jit
def _multistep(model, carry, xs):
    return multistep(model, carry, xs)


def _run_stream(model, x: Seq, sizes, carry=None, flush=True, step=_step):
    """Step through `x` in chunks of `sizes`; returns (carry, per-step outputs, flush output)."""
    carry = model.init_carry(x.batch_size) if carry is None else carry
    outs, start = [], 0
    for size in sizes:
        carry, y = step(model, carry, x.time_slice(start, start + size))
        outs.append(y)
        start += size
    tail = None
    if flush:
        carry, tail = _flush(model, carry)
    return carry, outs, tail


def _rows(seqs: Iterable[Seq | None]) -> list[np.ndarray]:
    """Per row, the valid frames of the concatenation of `seqs`."""
    seqs = [s for s in seqs if s is not None]
    per = [s.rows() for s in seqs]
    return [np.concatenate([p[b] for p in per], axis=0) for b in range(len(per[0]))]


def _compare(check: str, where: str, got: list[np.ndarray], want: list[np.ndarray], atol, rtol):
    """Raise unless every row of `got` equals `want` (exactly for integers)."""
    for b, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise StreamContractError(
                f"[{check}] {where}: row {b} has {g.shape[0]} valid output frames, expected "
                f"{w.shape[0]} (shapes {g.shape} vs {w.shape})")
        if g.size == 0:
            continue
        if np.issubdtype(w.dtype, np.integer) or w.dtype == np.bool_:
            bad = np.argwhere(g != w)
            if bad.size:
                raise StreamContractError(
                    f"[{check}] {where}: row {b} integer outputs differ at frame {bad[0][0]} "
                    f"({bad.shape[0]} entries differ)")
            continue
        g32, w32 = g.astype(np.float32), w.astype(np.float32)
        if not np.all(np.isfinite(g32)):
            frame = np.argwhere(~np.isfinite(g32))[0][0]
            raise StreamContractError(f"[{check}] {where}: row {b} frame {frame} is not finite")
        err = np.abs(g32 - w32)
        tol = atol + rtol * np.abs(w32)
        if np.any(err > tol):
            frame = np.unravel_index(np.argmax(err - tol), err.shape)[0]
            raise StreamContractError(
                f"[{check}] {where}: row {b}: max |stream - offline| = {err.max():.3g} at frame "
                f"{frame} (atol {atol:g}, rtol {rtol:g})")


def _random_partition(rng: np.random.Generator, length: int, block: int, sizes) -> list[int]:
    """Random chunk sizes (in frames) summing to `length // block` blocks, each drawn from
    `sizes` (in blocks; 1 must be among them) so that no partition adds a chunk shape to
    compile: the suite's time is mostly compilation."""
    blocks, out = length // block, []
    while blocks > 0:
        k = int(rng.choice([s for s in sizes if s <= blocks]))
        out.append(k * block)
        blocks -= k
    return out


def _poison(x: Seq) -> Seq:
    """Invalid frames filled with NaN (floats) or the largest value (ints)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        bad = jnp.array(jnp.nan, x.dtype)
    else:
        bad = jnp.array(jnp.iinfo(x.dtype).max, x.dtype)
    return x.replace(values=jnp.where(x.expanded_mask(), x.values, bad))


def _resample_frames(rng: np.random.Generator, x: Seq, length: int, batch: int) -> Seq:
    """A new input of `length` frames drawn from x's valid frames (valid for tokens too)."""
    pool = np.concatenate(x.rows(), axis=0)
    idx = rng.integers(0, pool.shape[0], size=(batch, length))
    values = pool[idx]
    if np.issubdtype(values.dtype, np.floating):
        values = values + rng.standard_normal(values.shape).astype(values.dtype) * 0.1
    return Seq.full(jnp.asarray(values, x.dtype))


def _with_lengths(x: Seq, lengths) -> Seq:
    return Seq.from_lengths(x.compacted().values, jnp.asarray(lengths, jnp.int32))


def _carry_len(carry) -> int:
    """The longest non-batch axis of any carry leaf (an estimate of ring/buffer sizes)."""
    dims = [d for a in jax.tree_util.tree_leaves(carry) for d in a.shape[1:]]
    return max(dims, default=1)


# ---------------------------------------------------------------------------- checks
def _check_partitions(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    want = ctx.offline_rows
    T = x.length
    parts = {"all blocks of size block_size": [block] * (T // block),
             "whole sequence in one step": [T]}
    for i in range(ctx.num_partitions):
        parts[f"random partition #{i}"] = _random_partition(ctx.rng, T, block, _SIZES)
    for name, sizes_ in parts.items():
        _, outs, tail = _run_stream(model, x, sizes_)
        _compare("partitions", f"{name} {sizes_}", _rows(outs + [tail]), want, ctx.atol, ctx.rtol)
    # One jit-compiled lax.scan over equal chunks (T padded with invalid frames).
    chunk = block * _SIZES[-1]
    xp = x.pad_to_multiple(chunk)
    carry, ys = _multistep(model, model.init_carry(x.batch_size), chunked(xp, chunk))
    carry, tail = _flush(model, carry)
    ys = Seq(ys.values.swapaxes(0, 1).reshape(x.batch_size, -1, *ys.values.shape[3:]),
             ys.mask.swapaxes(0, 1).reshape(x.batch_size, -1))
    _compare("partitions", f"jax.jit(multistep) with chunks of {chunk}", _rows([ys, tail]), want,
             ctx.atol, ctx.rtol)


def _check_flush(ctx):
    model, x, spec = ctx.model, ctx.x, ctx.spec
    _, outs, tail = _run_stream(model, x, [ctx.block] * (x.length // ctx.block))
    lengths = np.asarray(x.lengths())
    before = np.sum([np.asarray(o.lengths()) for o in outs], axis=0)
    after = np.asarray(tail.lengths())
    for b, n in enumerate(lengths):
        exp_before, exp_total = spec.outputs_after(int(n)), spec.offline_length(int(n))
        if before[b] != exp_before:
            raise StreamContractError(
                f"[flush] row {b}: after {n} valid input frames the stream emitted {before[b]} "
                f"valid frames, but spec promises floor(n * {spec.output_ratio}) - "
                f"output_latency({spec.output_latency}) = {exp_before}")
        if before[b] + after[b] != exp_total:
            raise StreamContractError(
                f"[flush] row {b}: flush emitted {after[b]} frames; with the {before[b]} already "
                f"emitted that is {before[b] + after[b]}, expected the offline length {exp_total}")


def _check_batch(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    poisoned = _poison(x)
    sizes = _random_partition(ctx.rng, x.length, block, _SIZES)
    y = _offline(model, poisoned)
    _compare("batch", "offline with NaN in masked frames", y.rows(), ctx.offline_rows, ctx.atol, ctx.rtol)
    _, outs, tail = _run_stream(model, poisoned, sizes)
    for where, out in [("offline", y)] + [(f"stream step {i}", o) for i, o in enumerate(outs + [tail])]:
        _check_finite_padding(where, out)
    _compare("batch", f"stream {sizes} with NaN in masked frames", _rows(outs + [tail]),
             ctx.offline_rows, ctx.atol, ctx.rtol)
    # A garbage row (NaN/huge values, all valid) in place of the last row must not leak.
    if x.batch_size > 1:
        # (Still compact: an all-valid row is; so no step shape is compiled a second time.)
        garbage = _poison(Seq(x.values[-1:], jnp.zeros_like(x.mask[-1:])))
        both = Seq(jnp.concatenate([poisoned.values[:-1], garbage.values]),
                   jnp.concatenate([x.mask[:-1], jnp.ones_like(x.mask[-1:])]), compact=x.compact)
        _compare("batch", "offline with a garbage row in the batch",
                 _offline(model, both).rows()[:-1], ctx.offline_rows[:-1], ctx.atol, ctx.rtol)
        _, outs, tail = _run_stream(model, both, sizes)
        _compare("batch", "stream with a garbage row in the batch", _rows(outs + [tail])[:-1],
                 ctx.offline_rows[:-1], ctx.atol, ctx.rtol)
    # Each row alone.
    for b in range(x.batch_size):
        alone = Seq(poisoned.values[b:b + 1], x.mask[b:b + 1], compact=x.compact)
        got = _offline(model, alone).rows()
        _compare("batch", f"row {b} run alone (offline)", got, ctx.offline_rows[b:b + 1],
                 ctx.atol, ctx.rtol)
        _, outs, tail = _run_stream(model, alone, [block] * (x.length // block))
        _compare("batch", f"row {b} run alone (stream in blocks)", _rows(outs + [tail]),
                 ctx.offline_rows[b:b + 1], ctx.atol, ctx.rtol)


def _check_finite_padding(where: str, y: Seq):
    """Invalid output frames must hold finite values (zeros), never NaN from masked input."""
    values = np.asarray(y.values)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        b, t = np.argwhere(~np.isfinite(values))[0][:2]
        raise StreamContractError(
            f"[batch] {where}: output row {b} frame {t} (valid={bool(np.asarray(y.mask)[b, t])}) "
            f"is not finite with NaN in the masked input frames: masked frames leak")


def _insert_invalid(rng, x: Seq, block: int) -> Seq:
    """Each row's frames with random runs of invalid (poisoned) frames inserted anywhere."""
    values, mask = np.asarray(x.values), np.asarray(x.mask)
    rows_v, rows_m = [], []
    for b in range(x.batch_size):
        v, m = [], []
        for t in range(x.length):
            for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
                v.append(values[b, t])
                m.append(False)
            v.append(values[b, t])
            m.append(bool(mask[b, t]))
        rows_v.append(v)
        rows_m.append(m)
    T = max(len(m) for m in rows_m)
    T += (-T) % block
    out_v = np.zeros((x.batch_size, T) + values.shape[2:], values.dtype)
    out_m = np.zeros((x.batch_size, T), bool)
    for b in range(x.batch_size):
        out_v[b, :len(rows_v[b])] = np.stack(rows_v[b])
        out_m[b, :len(rows_m[b])] = rows_m[b]
    return _poison(Seq(jnp.asarray(out_v), jnp.asarray(out_m)))


def _check_exec_mask(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    spread = _insert_invalid(ctx.rng, x, block)
    _compare("exec_mask", "offline with interior invalid frames", _offline(model, spread).rows(),
             ctx.offline_rows, ctx.atol, ctx.rtol)
    sizes = _random_partition(ctx.rng, spread.length, block, _SIZES)
    carry_a, outs, tail = _run_stream(model, spread, sizes, flush=False)
    carry_b, outs_b, _ = _run_stream(model, x, [block] * (x.length // block), flush=False)
    _, tail = _flush(model, carry_a)
    _compare("exec_mask", f"stream {sizes} with interior invalid frames", _rows(outs + [tail]),
             ctx.offline_rows, ctx.atol, ctx.rtol)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(carry_a)[0],
                            jax.tree_util.tree_leaves(carry_b)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if not np.allclose(a, b, atol=ctx.atol * 10, rtol=ctx.rtol * 10, equal_nan=False):
            raise StreamContractError(
                f"[exec_mask] carry{jax.tree_util.keystr(path)} differs after invalid frames were "
                f"inserted (max diff {np.nanmax(np.abs(a - b)):.3g}): invalid frames advanced the carry")


def _check_reset_rows(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    half = (x.length // 2) // block * block or block
    B = x.batch_size
    carry, _, _ = _run_stream(model, x.time_slice(0, half), [block] * (half // block), flush=False)
    rows = np.arange(B) % 2 == 0
    reset = jax.jit(lambda m, c, r: m.reset_rows(c, r))(model, carry, jnp.asarray(rows))
    fresh = model.init_carry(B)
    for (path, new), old, init, axis in zip(jax.tree_util.tree_flatten_with_path(reset)[0],
                                            jax.tree_util.tree_leaves(carry),
                                            jax.tree_util.tree_leaves(fresh),
                                            _batch_axes(model, B)):
        new, old, init = np.asarray(new), np.asarray(old), np.asarray(init)
        for b in range(B):
            got = np.take(new, b, axis)
            exp = np.take(init if rows[b] else old, b, axis)
            if got.tobytes() != exp.astype(got.dtype).tobytes():
                what = "a fresh carry" if rows[b] else "its value before the reset"
                raise StreamContractError(
                    f"[reset_rows] carry{jax.tree_util.keystr(path)} row {b} is not bitwise {what}")
    # A reset row then behaves as a fresh stream on the rest of its input; the others go on.
    rest = x.time_slice(half, x.length)
    _, outs, tail = _run_stream(model, rest, [block] * (rest.length // block), carry=reset)
    got = _rows(outs + [tail])
    fresh_rows = _offline(model, rest).rows()
    lengths = np.asarray(x.lengths())
    for b in range(B):
        if rows[b]:
            want, what = fresh_rows[b], "streamed after its reset"
        else:
            emitted = ctx.spec.outputs_after(int(min(lengths[b], half)))
            want, what = ctx.offline_rows[b][emitted:], "(not reset) continued"
        _compare("reset_rows", f"row {b} {what}", [got[b]], [want], ctx.atol, ctx.rtol)


def _batch_axes(model, batch: int) -> list[int]:
    """Per carry leaf, its batch axis: the axis whose size follows the batch size."""
    a = jax.tree_util.tree_leaves(jax.eval_shape(lambda: model.init_carry(batch)))
    b = jax.tree_util.tree_leaves(jax.eval_shape(lambda: model.init_carry(batch + 1)))
    axes = []
    for x, y in zip(a, b):
        diff = [i for i, (p, q) in enumerate(zip(x.shape, y.shape)) if p != q]
        axes.append(diff[0] if diff else 0)
    return axes


def _check_carry(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    B = x.batch_size
    shapes = jax.eval_shape(lambda: model.init_carry(B))
    carry = model.init_carry(B)
    leaves = [a for a in jax.tree_util.tree_leaves(carry) if a.size]
    pointers = [a.unsafe_buffer_pointer() for a in leaves]
    if len(set(pointers)) != len(pointers):
        raise StreamContractError(
            "[carry] init_carry returns aliased leaves (the same buffer twice): donation of the "
            "carry to a jitted step would fail")
    step = jax.jit(lambda m, c, xx: m.step(c, xx))
    chunk = block * _SIZES[0]
    xp = x.pad_to_multiple(chunk)
    for i, start in enumerate(range(0, xp.length, chunk)):
        carry, _ = step(model, carry, xp.time_slice(start, start + chunk))
        got = jax.tree.map(lambda a: (a.shape, a.dtype), carry)
        exp = jax.tree.map(lambda a: (a.shape, a.dtype), shapes)
        if got != exp:
            raise StreamContractError(
                f"[carry] carry shapes/dtypes changed after step {i}:\n  init: {exp}\n  now:  {got}")
    compiles = step._cache_size()
    if compiles != 1:
        raise StreamContractError(
            f"[carry] a jitted step with a fixed chunk shape compiled {compiles} times over "
            f"{xp.length // chunk} steps (expected 1): the carry's pytree or static data changes")


def _check_checkpoint(ctx):
    import orbax.checkpoint as ocp

    model, x, block = ctx.model, ctx.x, ctx.block
    half = (x.length // 2) // block * block or block
    carry, _, _ = _run_stream(model, x.time_slice(0, half), [block] * (half // block), flush=False)
    rest = x.time_slice(half, x.length)
    sizes = [block] * (rest.length // block)
    _, outs_a, tail_a = _run_stream(model, rest, sizes, carry=carry)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(f"{tmp}/carry", carry)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, carry)
        restored = ckpt.restore(f"{tmp}/carry", abstract)
        ckpt.close()
    if jax.tree_util.tree_structure(restored) != jax.tree_util.tree_structure(carry):
        raise StreamContractError("[checkpoint] the restored carry has another pytree structure")
    _, outs_b, tail_b = _run_stream(model, rest, sizes, carry=restored)
    for a, b in zip(outs_a + [tail_a], outs_b + [tail_b]):
        if np.asarray(a.values).tobytes() != np.asarray(b.values).tobytes() or \
                np.asarray(a.mask).tobytes() != np.asarray(b.mask).tobytes():
            raise StreamContractError(
                "[checkpoint] the stream continued from an orbax-restored carry is not bitwise "
                "identical to the uninterrupted stream")


def _check_gradients(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    graphdef, params = nnx.split(model)
    chunk = block * _SIZES[-1]
    xp = x.pad_to_multiple(chunk)
    n_out = max((r.shape[0] for r in ctx.offline_rows), default=0)
    w = jnp.asarray(ctx.rng.standard_normal((x.batch_size, n_out) + ctx.offline_rows[0].shape[1:]),
                    jnp.float32)

    def weighted(y: Seq):
        v = y.compacted().values.astype(jnp.float32)
        v = jnp.pad(v, [(0, 0), (0, max(0, n_out - v.shape[1]))] + [(0, 0)] * (v.ndim - 2))
        return jnp.sum(v[:, :n_out] * w)

    def loss_offline(p, values):
        return weighted(nnx.merge(graphdef, p)(Seq(values, x.mask, compact=x.compact)))

    def loss_stream(p, values):
        m = nnx.merge(graphdef, p)
        values = jnp.pad(values, [(0, 0), (0, xp.length - x.length)] + [(0, 0)] * (values.ndim - 2))
        xs = chunked(Seq(values, xp.mask, compact=xp.compact), chunk)
        carry, ys = multistep(m, m.init_carry(x.batch_size), xs)
        carry, tail = m.flush(carry)
        ys = Seq(ys.values.swapaxes(0, 1).reshape(x.batch_size, -1, *ys.values.shape[3:]),
                 ys.mask.swapaxes(0, 1).reshape(x.batch_size, -1))
        return weighted(Seq.concatenate([ys, tail]))

    argnums = []
    if jax.tree_util.tree_leaves(params):
        argnums.append(0)
    if jnp.issubdtype(x.dtype, jnp.floating):
        argnums.append(1)
    if not argnums:
        return
    names = {0: "d loss / d params", 1: "d loss / d x"}
    g_off = jax.jit(jax.grad(loss_offline, argnums=tuple(argnums)))(params, x.masked().values)
    g_str = jax.jit(jax.grad(loss_stream, argnums=tuple(argnums)))(params, x.masked().values)
    for argnum, a_tree, b_tree in zip(argnums, g_off, g_str):
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(a_tree)[0],
                                jax.tree_util.tree_leaves(b_tree)):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            err = float(np.abs(a - b).max(initial=0.0))
            if not np.all(np.isfinite(b)) or err > ctx.grad_atol * scale:
                raise StreamContractError(
                    f"[gradients] {names[argnum]}{jax.tree_util.keystr(path)}: offline vs scanned "
                    f"step differ by {err:.3g} (scale {scale:.3g}, tolerance {ctx.grad_atol:g} x scale)")


def _check_receptive_field(ctx):
    model, x, spec = ctx.model, ctx.x, ctx.spec
    row = int(np.argmax(np.asarray(x.lengths())))
    n = int(np.asarray(x.lengths())[row])
    base = Seq.full(x.compacted().values[row:row + 1, :n])
    y0 = np.asarray(_offline(model, base).values[0], np.float64)
    n_out = spec.offline_length(n)
    values = np.asarray(base.values[0])
    perturbed = np.repeat(values[None], n, axis=0)  # [i, t, ...]: copy i has frame i changed
    if np.issubdtype(values.dtype, np.floating):
        # Large changes: a frame that an output sees only through a small weight (the edge of
        # an analysis window, say) must still show up above the tolerance.
        scale_in = 10.0 * max(1.0, float(np.abs(values).max(initial=0.0)))
        delta = (scale_in * ctx.rng.standard_normal(values.shape)).astype(values.dtype)
        perturbed[np.arange(n), np.arange(n)] += delta
    else:
        vmax = int(values.max()) + 1
        shift = ctx.rng.integers(1, max(vmax, 2), size=values.shape)
        perturbed[np.arange(n), np.arange(n)] = (values + shift) % max(vmax, 2)
    perturbed = jnp.asarray(perturbed)
    ys = np.asarray(jax.jit(jax.vmap(lambda v: _offline(model, Seq.full(v[None])).values[0]))(
        perturbed), np.float64)
    scale = np.abs(y0).max(initial=1.0)
    diff = np.abs(ys - y0[None]).reshape(n, y0.shape[0], -1).max(axis=-1)[:, :n_out]
    depends = diff > max(ctx.atol, 1e-6) * max(scale, 1.0)  # [input i, output j]
    past, future = spec.receptive_field
    max_seen = -math.inf
    for j in range(n_out):
        anchor = float(spec.anchor(j))
        emitted = spec.emitted_at(j)
        for i in np.nonzero(depends[:, j])[0]:
            rel = i - anchor
            max_seen = max(max_seen, rel)
            if rel > future + 1e-9 or rel < past - 1e-9:
                raise StreamContractError(
                    f"[receptive_field] output frame {j} depends on input frame {i} "
                    f"(i - anchor = {rel:g}), outside the declared receptive_field {spec.receptive_field}")
            if i >= emitted and j < spec.outputs_after(n):
                raise StreamContractError(
                    f"[receptive_field] output frame {j} is emitted after {emitted} input frames "
                    f"(per spec) but depends on input frame {i}: the spec understates the latency")
    # The declared look-ahead is really used (outputs near the end can see fewer frames).
    checkable = [j for j in range(n_out) if float(spec.anchor(j)) + future <= n - 1]
    if checkable and future > 0 and max_seen <= future - 1:
        raise StreamContractError(
            f"[receptive_field] declared future {future:g} but no output depends on more than "
            f"{max_seen:g} frames ahead: the spec overstates the look-ahead (latency)")


def _check_long(ctx):
    model, x, block = ctx.model, ctx.x, ctx.block
    length = ctx.long_length or min(max(3 * _carry_len(model.init_carry(1)) + 7, 2 * x.length), 512)
    length += (-length) % block
    lengths = [length] + [int(ctx.rng.integers(length // 2, length + 1)) for _ in range(x.batch_size - 1)]
    long_x = _with_lengths(_resample_frames(ctx.rng, x, length, x.batch_size), lengths)
    want = _offline(model, long_x).rows()
    # The first chunk is longer than any carry buffer (chunks longer than a ring/window).
    first = -(-(_carry_len(model.init_carry(1)) + 1) // block) * block
    sizes = [min(first, length)] + _random_partition(ctx.rng, length - min(first, length), block, _SIZES)
    sizes = [s for s in sizes if s]
    _, outs, tail = _run_stream(model, long_x, sizes)
    _compare("long", f"run of {length} frames in chunks {sizes[:8]}...", _rows(outs + [tail]),
             want, ctx.atol, ctx.rtol)


_CHECKS = {
    "partitions": _check_partitions, "flush": _check_flush, "batch": _check_batch,
    "exec_mask": _check_exec_mask, "reset_rows": _check_reset_rows, "carry": _check_carry,
    "checkpoint": _check_checkpoint, "gradients": _check_gradients,
    "receptive_field": _check_receptive_field, "long": _check_long,
}


class _Context:
    pass


def assert_stream_contract(model, x: Seq, *, atol: float = 1e-5, rtol: float = 1e-5,
                           grad_atol: float = 1e-4, checks=ALL_CHECKS, skip=(),
                           num_partitions: int = 3, long_length: int | None = None,
                           seed: int = 0) -> dict:
    """Check that `model` honours the streaming contract on input `x` (see module docstring).

    Args:
      model: a Streamer (e.g. a `streamzoo.StreamLayer`).
      x: a random `Seq` of shape `[B, T, ...]`, ideally with different per-row lengths;
        T is padded with invalid frames to a multiple of `spec.block_size`.
      atol, rtol: tolerances of stream vs offline (integer outputs are compared exactly).
      grad_atol: tolerance of the gradient check, relative to the gradient's magnitude.
      checks / skip: which of `ALL_CHECKS` to run.
      num_partitions: random ragged partitions in check 1 (besides all-blocks and whole).
      long_length: length of the long run (default: >= 3x the longest carry buffer, <= 512).
    Returns: the names of the checks that ran, mapped to "ok".
    Raises: StreamContractError (an AssertionError) naming the check and the deviation.
    """
    unknown = set(checks) | set(skip)
    unknown -= set(ALL_CHECKS)
    if unknown:
        raise ValueError(f"checks: unknown names {sorted(unknown)}; expected a subset of {ALL_CHECKS}")
    if not isinstance(x, Seq):
        raise ValueError(f"x: expected a streamzoo.Seq, got {type(x).__name__}")
    ctx = _Context()
    ctx.model, ctx.spec = model, model.spec
    ctx.block = ctx.spec.block_size
    ctx.x = x.compacted().pad_to_multiple(ctx.block)
    ctx.atol, ctx.rtol, ctx.grad_atol = atol, rtol, grad_atol
    ctx.num_partitions, ctx.long_length = num_partitions, long_length
    ctx.rng = np.random.default_rng(seed)
    ctx.offline_rows = _offline(model, ctx.x).rows()
    report = {}
    for name in ALL_CHECKS:
        if name in checks and name not in skip:
            _CHECKS[name](ctx)
            report[name] = "ok"
    return report
