"""`causal_depthwise_conv`: a fused streaming depthwise conv with its state, as one kernel.

    y[b, t, c] = bias[c] + sum_k kernel[k, c] * w[b, S - span + t + k*dilation, c]
    w = state[b] ++ x[b]                      (the window, [S + T, C]; span = (K-1)*dilation)
    new_state[b] = w[b, n_b : n_b + S]        (the row's last S committed frames)

`x [B, T, C]` is a chunk of a stream whose row b has its `n_b = lengths[b]` valid frames first
(the streaming contract's compact layout); `state [B, S, C]` (S >= span, S >= 1) holds the
frames before it. The offline form is the same call with a zero state. Outputs at invalid
frames (t >= n_b) are zeros, and values there (NaN included) never reach valid outputs or the
new state: rows are desynchronised and each row advances by exactly its n_b frames.

Implementations (`impl=`, see `pallas_kernels.dispatch`):
* "xla": the jnp reference below (K shifted multiply-adds that XLA fuses into one pass).
* "mosaic_gpu": Pallas Mosaic GPU. Grid (B, C/bc) parallel x (T/bt) sequential: a CTA walks
  its channels' time axis with the blocks TMA-pipelined into SMEM, keeps the last P input
  frames in an SMEM window (the carry between time blocks), reads each tap as a shifted slice
  of it, and writes the new state from the one time block that holds frame n_b. One pass:
  x read once, y written once, state in and out. Arrays use Mosaic GPU's strided register
  layout (bc = 128 * vec lanes), so any bt works, including the T of a streaming step.
* "tpu": Pallas Mosaic TPU, the same schedule with (8, 128)-aligned blocks, lengths as a
  scalar prefetch, and shifts done with `pltpu.roll` on the VMEM window so that no load is
  misaligned.
* "interpret": the Mosaic GPU kernel's schedule with plain ref loads, run by Pallas'
  interpreter (CPU tests); "tpu_interpret": the TPU kernel in the TPU-semantics simulator.

Computation is float32 inside (inputs rounded to x.dtype first, like `Conv1D`), rounded to
x.dtype at the end. Gradients: `jax.custom_vjp` whose backward is the jnp reference's VJP
(the forward Pallas kernel is not differentiated).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from streamzoo.pallas_kernels.dispatch import resolve_impl

KERNEL = "causal_depthwise_conv"
SUPPORTED = ("mosaic_gpu", "tpu", "interpret")
_PALLAS = ("mosaic_gpu", "tpu", "interpret", "tpu_interpret")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ----------------------------------------------------------------------------- checks
def _check(x, state, kernel, bias, dilation, lengths):
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"x: expected an array [B, T, C], got shape {getattr(x, 'shape', x)}")
    batch, _, channels = x.shape
    if not isinstance(dilation, int) or isinstance(dilation, bool) or dilation < 1:
        raise ValueError(f"dilation: expected a positive int, got {dilation!r}")
    if kernel.ndim != 2 or kernel.shape[1] != channels or kernel.shape[0] < 1:
        raise ValueError(f"kernel: expected shape [K, {channels}] (K >= 1), got {kernel.shape}")
    span = (kernel.shape[0] - 1) * dilation
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"bias: expected shape ({channels},), got {bias.shape}")
    if state is not None and (state.ndim != 3 or state.shape[0] != batch
                              or state.shape[2] != channels or state.shape[1] < max(span, 1)):
        raise ValueError(f"state: expected shape [{batch}, S, {channels}] with S >= "
                         f"max((K-1)*dilation, 1) = {max(span, 1)}, got {state.shape}")
    if lengths is not None and (lengths.shape != (batch,)
                                or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ValueError(f"lengths: expected an int array of shape ({batch},), got "
                         f"{lengths.dtype}{list(lengths.shape)}")
    return span


# -------------------------------------------------------------------------- reference
def causal_depthwise_conv_reference(x, state, kernel, bias, *, dilation: int, lengths):
    """The jnp reference ("xla"): see the module docstring. Same arguments as the kernel,
    all given (state [B, S, C], bias [C], lengths [B] int32)."""
    dtype = x.dtype
    length, size = x.shape[1], state.shape[1]
    span = (kernel.shape[0] - 1) * dilation
    window = jnp.concatenate([state.astype(dtype), x], axis=1)
    w = kernel.astype(dtype).astype(jnp.float32)
    acc = jnp.broadcast_to(bias.astype(dtype).astype(jnp.float32), x.shape)
    for k in range(kernel.shape[0]):
        start = size - span + k * dilation
        acc = acc + w[k] * window[:, start:start + length].astype(jnp.float32)
    valid = jnp.arange(length)[None, :, None] < lengths[:, None, None]
    y = jnp.where(valid, acc, 0.0).astype(dtype)
    new_state = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, size, 0))(
        window, lengths)
    return y, new_state


# ----------------------------------------------------------------------- Pallas body
class _Plan:
    """Static schedule of one kernel instance (hashable, so it can key `custom_vjp`)."""

    def __init__(self, backend, batch, length, channels, taps, dilation, size, dtype,
                 block_t, block_c, max_concurrent_steps):
        self.backend, self.batch, self.taps, self.dilation = backend, batch, taps, dilation
        self.size, self.span = size, (taps - 1) * dilation
        self.pad = _round_up(size, 8)  # P: window rows before the current block (aligned)
        gpu = backend in ("mosaic_gpu", "interpret")
        tpu = not gpu
        if block_c is None:
            if backend == "mosaic_gpu":
                block_c = 128
            elif tpu:
                block_c = channels if channels % 128 else math.gcd(channels, 512)
            else:
                block_c = min(channels, 128)
        if block_t is None:
            block_t = 64 if gpu else 256
            if backend == "mosaic_gpu":  # x and y blocks pipelined + f32 window, ~160 KiB SMEM
                per_frame = block_c * (2 * jnp.dtype(dtype).itemsize * max_concurrent_steps + 4)
                block_t = max(8, min(64, (160 * 1024 // per_frame) // 8 * 8))
            block_t = min(block_t, _round_up(length, 8))
        if backend == "mosaic_gpu" and block_c % 128:
            raise ValueError(f"block_c: Mosaic GPU needs a multiple of 128, got {block_c}")
        if tpu and block_c % 128 and block_c != channels:
            raise ValueError(f"block_c: TPU needs a multiple of 128 or C={channels}, got {block_c}")
        if tpu and block_t % 8:
            raise ValueError(f"block_t: TPU needs a multiple of 8, got {block_t}")
        self.block_t, self.block_c = block_t, block_c
        self.length = _round_up(length, block_t)
        self.channels = _round_up(channels, block_c)
        self.dtype = jnp.dtype(dtype)
        self.max_concurrent_steps = max(1, min(max_concurrent_steps, self.length // block_t))
        self.grid = (batch, self.channels // block_c, self.length // block_t)

    def key(self):
        return (self.backend, self.batch, self.length, self.channels, self.taps, self.dilation,
                self.size, str(self.dtype), self.block_t, self.block_c,
                self.max_concurrent_steps)

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, _Plan) and self.key() == other.key()


def _conv_body(plan: _Plan, len_ref, x_ref, s_ref, w_ref, b_ref, y_ref, ns_ref, win_ref,
               st_ref):
    """One (row, channel block, time block) step; the time axis runs in order.

    win_ref [P + bt, bc] f32 holds the P frames before the block, then the block; st_ref
    [P, bc] f32 the row's new (padded) state once the block holding frame n_b has run.
    """
    bt, bc, pad = plan.block_t, plan.block_c, plan.pad
    rows = pad + bt
    gpu = plan.backend == "mosaic_gpu"
    tpu = plan.backend in ("tpu", "tpu_interpret")
    if gpu:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        vec = bc // 128

        def load(ref, shape):
            return plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED(shape, vec_size=vec))

        def row_ids():
            return plgpu.broadcasted_iota(jnp.int32, (bt, bc), 0,
                                          layout=plgpu.Layout.WG_STRIDED((bt, bc), vec_size=vec))
    else:
        def load(ref, shape):
            del shape
            return ref[...]

        def row_ids():
            return jax.lax.broadcasted_iota(jnp.int32, (bt, bc), 0)

    b, t = pl.program_id(0), pl.program_id(2)
    n = len_ref[b]

    @pl.when(t == 0)
    def _():
        win_ref[pl.ds(0, pad), :] = load(s_ref, (pad, bc)).astype(jnp.float32)

    win_ref[pl.ds(pad, bt), :] = load(x_ref, (bt, bc)).astype(jnp.float32)
    if tpu:
        from jax.experimental.pallas import tpu as pltpu

        window = win_ref[...]

        def shifted(offset, count):  # window rows offset .. offset + count - 1, aligned
            return pltpu.roll(window, (rows - offset) % rows, 0)[:count]
    else:
        def shifted(offset, count):
            return load(win_ref.at[pl.ds(offset, count)], (count, bc))

    acc = jnp.broadcast_to(load(b_ref.at[0], (bc,)).astype(plan.dtype).astype(jnp.float32),
                           (bt, bc))
    for k in range(plan.taps):
        w_k = load(w_ref.at[k], (bc,)).astype(plan.dtype).astype(jnp.float32)
        tap = shifted(pad - plan.span + k * plan.dilation, bt)
        acc = acc + jnp.broadcast_to(w_k, (bt, bc)) * tap
    valid = row_ids() + t * bt < n
    y_ref[...] = jnp.where(valid, acc, 0.0).astype(y_ref.dtype)

    # The new state: window rows off .. off + P - 1 of the block where n - t*bt lies in [0, bt].
    off = jnp.clip(n - t * bt, 0, bt)

    @pl.when(t == jnp.minimum(jax.lax.div(n, bt), plan.grid[2] - 1))  # n >= 0: div = floor
    def _():
        st_ref[...] = shifted(off, pad)

    ns_ref[...] = load(st_ref, (pad, bc)).astype(ns_ref.dtype)
    # Carry: the last P frames of the window become the frames before the next block.
    win_ref[pl.ds(0, pad), :] = shifted(bt, pad) if tpu else load(win_ref.at[pl.ds(bt, pad)],
                                                                 (pad, bc))


def _pallas_conv(plan: _Plan, x, state, kernel, bias, lengths):
    """Run the Pallas kernel of `plan.backend` (no dispatch, no checks); see the docstring."""
    batch, length, channels = x.shape
    bt, bc, pad = plan.block_t, plan.block_c, plan.pad
    x_p = jnp.pad(x, ((0, 0), (0, plan.length - length), (0, plan.channels - channels)))
    # The state is right-aligned in P rows (the zeros in front are never read by a valid tap).
    s_p = jnp.pad(state.astype(x.dtype), ((0, 0), (pad - plan.size, 0),
                                          (0, plan.channels - channels)))
    w_p = jnp.pad(kernel, ((0, 0), (0, plan.channels - channels)))
    b_p = jnp.pad(bias, (0, plan.channels - channels))[None]
    lengths = lengths.astype(jnp.int32)
    out_shape = [jax.ShapeDtypeStruct((batch, plan.length, plan.channels), x.dtype),
                 jax.ShapeDtypeStruct((batch, pad, plan.channels), x.dtype)]
    body = functools.partial(_conv_body, plan)
    taps = kernel.shape[0]

    if plan.backend in ("tpu", "tpu_interpret"):
        from jax.experimental.pallas import tpu as pltpu

        def spec(shape, index):
            return pl.BlockSpec(shape, lambda b, c, t, lens: index(b, c, t))

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=plan.grid,
            in_specs=[spec((None, bt, bc), lambda b, c, t: (b, t, c)),
                      spec((None, pad, bc), lambda b, c, t: (b, 0, c)),
                      spec((taps, bc), lambda b, c, t: (0, c)),
                      spec((1, bc), lambda b, c, t: (0, c))],
            out_specs=[spec((None, bt, bc), lambda b, c, t: (b, t, c)),
                       spec((None, pad, bc), lambda b, c, t: (b, 0, c))],
            scratch_shapes=[pltpu.VMEM((pad + bt, bc), jnp.float32),
                            pltpu.VMEM((pad, bc), jnp.float32)])
        call = pl.pallas_call(
            body, name=KERNEL, grid_spec=grid_spec, out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if plan.backend == "tpu_interpret" else False)
    else:
        specs_in = [pl.BlockSpec((None, bt, bc), lambda b, c, t: (b, t, c)),
                    pl.BlockSpec((None, pad, bc), lambda b, c, t: (b, 0, c)),
                    pl.BlockSpec((taps, bc), lambda b, c, t: (0, c)),
                    pl.BlockSpec((1, bc), lambda b, c, t: (0, c))]
        specs_out = [pl.BlockSpec((None, bt, bc), lambda b, c, t: (b, t, c)),
                     pl.BlockSpec((None, pad, bc), lambda b, c, t: (b, 0, c))]
        if plan.backend == "mosaic_gpu":
            from jax.experimental.pallas import mosaic_gpu as plgpu

            call = pl.pallas_call(
                body, name=KERNEL, grid=plan.grid, out_shape=out_shape,
                in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM)] + specs_in,
                out_specs=specs_out,
                scratch_shapes=[plgpu.SMEM((pad + bt, bc), jnp.float32),
                                plgpu.SMEM((pad, bc), jnp.float32)],
                compiler_params=plgpu.CompilerParams(
                    dimension_semantics=("parallel", "parallel", "sequential"),
                    max_concurrent_steps=plan.max_concurrent_steps))
        else:  # "interpret": the GPU schedule, plain loads, Pallas' interpreter
            from jax.experimental.pallas import tpu as pltpu

            call = pl.pallas_call(
                body, name=KERNEL, grid=plan.grid, out_shape=out_shape,
                in_specs=[pl.BlockSpec((batch,), lambda b, c, t: (0,))] + specs_in,
                out_specs=specs_out,
                scratch_shapes=[pltpu.VMEM((pad + bt, bc), jnp.float32),
                                pltpu.VMEM((pad, bc), jnp.float32)],
                interpret=True)
    y, new_state = call(lengths, x_p, s_p, w_p, b_p)
    return y[:, :length, :channels], new_state[:, pad - plan.size:, :channels]


def pallas_forward(backend: str, x, state, kernel, bias, lengths, *, dilation: int = 1,
                   block_t: int | None = None, block_c: int | None = None,
                   max_concurrent_steps: int = 2):
    """The Pallas kernel of `backend` (one of "mosaic_gpu", "tpu", "interpret",
    "tpu_interpret"), all arguments given, without dispatch or autodiff: what tests use to
    lower a kernel for a platform the machine lacks, e.g.
    `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`."""
    if backend not in _PALLAS:
        raise ValueError(f"backend: expected one of {_PALLAS}, got {backend!r}")
    _check(x, state, kernel, bias, dilation, lengths)
    plan = _Plan(backend, x.shape[0], x.shape[1], x.shape[2], kernel.shape[0], dilation,
                 state.shape[1], x.dtype, block_t, block_c, max_concurrent_steps)
    return _pallas_conv(plan, x, state.astype(x.dtype), kernel, bias, lengths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv_pallas_vjp(plan, dilation, x, state, kernel, bias, lengths):
    return _pallas_conv(plan, x, state, kernel, bias, lengths)


def _conv_fwd(plan, dilation, x, state, kernel, bias, lengths):
    return (_pallas_conv(plan, x, state, kernel, bias, lengths),
            (x, state, kernel, bias, lengths))


def _conv_bwd(plan, dilation, residuals, cotangents):
    x, state, kernel, bias, lengths = residuals
    _, vjp = jax.vjp(lambda *a: causal_depthwise_conv_reference(*a, dilation=dilation,
                                                                lengths=lengths),
                     x, state, kernel, bias)
    return (*vjp(cotangents), None)


_conv_pallas_vjp.defvjp(_conv_fwd, _conv_bwd)


# ------------------------------------------------------------------------- public API
def causal_depthwise_conv(x, state=None, kernel=None, bias=None, *, dilation: int = 1,
                          lengths=None, impl: str = "auto", block_t: int | None = None,
                          block_c: int | None = None, max_concurrent_steps: int = 2):
    """Depthwise causal conv over a chunk with its carried state: `(y, new_state)`.

    Args:
      x: `[B, T, C]`, row b's `lengths[b]` valid frames first.
      state: `[B, S, C]` frames before x, oldest first, S >= max((K-1)*dilation, 1);
        None: zeros with S = max((K-1)*dilation, 1) (the offline form).
      kernel: `[K, C]` taps, kernel[K-1] on the newest frame. bias: `[C]` or None.
      dilation: tap spacing in frames. lengths: `[B]` int valid frames per row (None: all T).
      impl: "auto" | "xla" | "mosaic_gpu" | "tpu" | "interpret" | "tpu_interpret".
      block_t, block_c, max_concurrent_steps: Pallas tiling (time frames, channels) and
        pipeline depth (Mosaic GPU); defaults suit the backend.
    Returns: `y [B, T, C]` in x.dtype (zeros at invalid frames) and `new_state [B, S, C]` in
      x.dtype: row b's last S frames of `state ++ x[b, :lengths[b]]`.
    """
    if kernel is None:
        raise ValueError("kernel: expected an array [K, C], got None")
    span = _check(x, state, kernel, bias, dilation, lengths)
    batch, length, channels = x.shape
    if state is None:
        state = jnp.zeros((batch, max(span, 1), channels), x.dtype)
    if bias is None:
        bias = jnp.zeros((channels,), kernel.dtype)
    if lengths is None:
        lengths = jnp.full((batch,), length, jnp.int32)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, length)
    impl = resolve_impl(impl, KERNEL, SUPPORTED)
    if impl == "xla" or length == 0:
        return causal_depthwise_conv_reference(x, state.astype(x.dtype), kernel, bias,
                                               dilation=dilation, lengths=lengths)
    plan = _Plan(impl, batch, length, channels, kernel.shape[0], dilation, state.shape[1],
                 x.dtype, block_t, block_c, max_concurrent_steps)
    return _conv_pallas_vjp(plan, dilation, x, state.astype(x.dtype), kernel, bias, lengths)
