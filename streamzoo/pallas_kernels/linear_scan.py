"""Linear recurrences with a carry in and out: diagonal (`linear_scan`) and linear attention
(`linear_attention`), as Pallas kernels with jnp references.

**Diagonal** (RG-LRU, LRU, diagonal SSMs, LMU in a diagonalised basis):
`h_t = a_t * h_{t-1} + b_t` over `a, b [B, T, N]` from `h0 [B, N]`. Frames at or after a row's
`lengths[b]` do not advance its state (they act as `a = 1, b = 0`), so `h_last` is the state
after the row's last valid frame and rows may be at different times. `h` is zero at invalid
frames.

**Linear attention** (SANA-style cumulative state, RetNet/GLA-style scalar decay):
`S_t = g_t S_{t-1} + k_t v_tᵀ`, `z_t = g_t z_{t-1} + k_t` with `g_t = exp(log_decay_t)` per
(row, head, frame), outputs `o_t = q_t S_t` and `normalizer_t = q_t · z_t`; the caller forms
`o / (normalizer + eps)` if it wants the normalised form. Chunked: within a chunk of C frames
`o = (q kᵀ ⊙ D) v + exp(G) ⊙ (q S_prev)` with `D[t, s] = exp(G_t - G_s) [s <= t]` (G the
in-chunk cumulative log decay), then one state update per chunk. All math is float32 (inputs
rounded to their dtype first); bf16 inputs may use bf16 matmul operands inside the kernels.

Implementations (`impl=`, see `pallas_kernels.dispatch`):

| | diagonal | linear attention |
|---|---|---|
| "xla" | `jax.lax.associative_scan` | chunked jnp (`lax.scan` over chunks) |
| GPU | "mosaic_gpu": grid (B, N/bn) parallel x (T/bt) sequential, blocks TMA-pipelined into SMEM, one row of lanes per frame, state in SMEM between time blocks | "triton": one program per (row, head) loops over chunks with the state in registers |
| "tpu" | same schedule, (8, 128)-aligned blocks, 8-frame groups | grid (B, H) parallel x chunks "arbitrary", state in VMEM scratch, MXU matmuls |
| "interpret" | the Mosaic GPU schedule in Pallas' interpreter | the Triton schedule in Pallas' interpreter |

Why Triton for linear attention on GPU: its chunk step is three matmuls with a float32 state
operand (`q S`, `kᵀ v`) plus a masked `q kᵀ`. Mosaic GPU expresses matmuls only as WGMMA
on SMEM operands with swizzle/tiling transforms, 16-bit (or tf32) inputs and 64-row tiles,
so an exact float32 state product and small heads need a different kernel design that we
cannot validate without a GPU; Triton's `jnp.dot` takes register operands of any power-of-2
shape >= 16 with IEEE float32. The Mosaic GPU port is listed as open work.

Gradients: `jax.custom_vjp` with the jnp reference's VJP as the backward (the Pallas forward
is not differentiated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from streamzoo.pallas_kernels.dispatch import resolve_impl

SCAN_KERNEL = "linear_scan"
SCAN_SUPPORTED = ("mosaic_gpu", "tpu", "interpret")
ATTENTION_KERNEL = "linear_attention"
ATTENTION_SUPPORTED = ("triton", "tpu", "interpret")
_HIGHEST = jax.lax.Precision.HIGHEST


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _check_lengths(lengths, batch, length):
    if lengths is None:
        return jnp.full((batch,), length, jnp.int32)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths: expected an int array of shape ({batch},), got "
                         f"{lengths.dtype}{list(lengths.shape)}")
    return jnp.clip(lengths.astype(jnp.int32), 0, length)


# ===================================================================== diagonal scan
def linear_scan_reference(a, b, h0, *, lengths):
    """The jnp reference ("xla"): `(h [B, T, N] f32, h_last [B, N] f32)`; all args given."""
    length = a.shape[1]
    valid = (jnp.arange(length)[None, :] < lengths[:, None])[..., None]
    a = jnp.where(valid, a.astype(jnp.float32), 1.0)
    b = jnp.where(valid, b.astype(jnp.float32), 0.0)
    h0 = h0.astype(jnp.float32)
    if length == 0:
        return b, h0
    h, h_last = associative_linear_scan(a, b, h0)
    return jnp.where(valid, h, 0.0), h_last


def associative_linear_scan(a, b, h0):
    """`h_t = a_t * h_{t-1} + b_t` along axis 1 from `h_{-1} = h0`, for `a, b [B, T >= 1, ...]`:
    a work-efficient `jax.lax.associative_scan` over `(a, b)` pairs, composed as
    `(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)`. Returns `(h [B, T, ...], h_last [B, ...])`.
    The core of the reference here and of `layers.linear_recurrence.linear_scan`."""
    b = b.at[:, 0].add(a[:, 0] * h0)

    def compose(first, second):
        a1, b1 = first
        a2, b2 = second
        return a1 * a2, a2 * b1 + b2

    _, h = jax.lax.associative_scan(compose, (a, b), axis=1)
    return h, h[:, -1]


class _ScanPlan:
    """Static schedule of one diagonal-scan kernel instance (hashable)."""

    def __init__(self, backend, batch, length, features, itemsize, block_t, block_n,
                 max_concurrent_steps):
        self.backend = backend
        tpu = backend in ("tpu", "tpu_interpret")
        if block_n is None:
            if backend == "mosaic_gpu":
                block_n = 128
            elif tpu:
                block_n = features if features % 128 else min(features, 512)
                while features % block_n:
                    block_n -= 128
            else:
                block_n = min(features, 128)
        if block_t is None:
            block_t = 256 if tpu else 128
            if backend == "mosaic_gpu":  # a, b and h blocks, pipelined, within ~160 KiB SMEM
                per_frame = block_n * (2 * itemsize + 4) * max_concurrent_steps
                block_t = max(8, min(128, (160 * 1024 // per_frame) // 8 * 8))
            block_t = min(block_t, _round_up(length, 8))
        if backend == "mosaic_gpu" and block_n % 128:
            raise ValueError(f"block_n: Mosaic GPU needs a multiple of 128, got {block_n}")
        if tpu and block_n % 128 and block_n != features:
            raise ValueError(f"block_n: TPU needs a multiple of 128 or N={features}, "
                             f"got {block_n}")
        if tpu and block_t % 8:
            raise ValueError(f"block_t: TPU needs a multiple of 8, got {block_t}")
        self.block_t, self.block_n = block_t, block_n
        self.length = _round_up(length, block_t)
        self.features = _round_up(features, block_n)
        self.max_concurrent_steps = max(1, min(max_concurrent_steps, self.length // block_t))
        self.grid = (batch, self.features // block_n, self.length // block_t)

    def key(self):
        return (self.backend, self.grid, self.block_t, self.block_n, self.max_concurrent_steps)

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, _ScanPlan) and self.key() == other.key()


def _scan_body_gpu(plan, len_ref, a_ref, b_ref, h0_ref, h_ref, hl_ref, carry_ref):
    """Mosaic GPU / interpret: the block's valid frames one by one, `[1, bn]` lanes each."""
    bt, bn = plan.block_t, plan.block_n
    if plan.backend == "mosaic_gpu":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        def layout(shape):
            return plgpu.Layout.WG_STRIDED(shape, vec_size=bn // 128)

        def load(ref, shape):
            return plgpu.load(ref, (), layout=layout(shape))

        def zeros(shape):
            return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), layout(shape))
    else:
        def load(ref, shape):
            del shape
            return ref[...]

        def zeros(shape):
            return jnp.zeros(shape, jnp.float32)

    row, t = pl.program_id(0), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        carry_ref[...] = load(h0_ref, (1, bn)).astype(jnp.float32)

    count = jnp.clip(len_ref[row] - t * bt, 0, bt)
    h_ref[...] = zeros((bt, bn))

    def frame(i, h):
        a = load(a_ref.at[pl.ds(i, 1)], (1, bn)).astype(jnp.float32)
        b = load(b_ref.at[pl.ds(i, 1)], (1, bn)).astype(jnp.float32)
        h = a * h + b
        h_ref[pl.ds(i, 1), :] = h
        return h

    h = jax.lax.fori_loop(0, count, frame, load(carry_ref, (1, bn)))
    carry_ref[...] = h
    hl_ref[...] = h


def _scan_body_tpu(plan, len_ref, a_ref, b_ref, h0_ref, h_ref, hl_ref, carry_ref):
    """Mosaic TPU: aligned 8-frame groups; each frame is one sublane row of the group."""
    bt, bn = plan.block_t, plan.block_n
    row, t = pl.program_id(0), pl.program_id(2)

    @pl.when(t == 0)
    def _():
        carry_ref[...] = h0_ref[...].astype(jnp.float32)

    count = jnp.clip(len_ref[row] - t * bt, 0, bt)
    sublane = jax.lax.broadcasted_iota(jnp.int32, (8, bn), 0)

    def group(g, h):
        r0 = pl.multiple_of(g * 8, 8)
        a8 = a_ref[pl.ds(r0, 8), :].astype(jnp.float32)
        b8 = b_ref[pl.ds(r0, 8), :].astype(jnp.float32)
        out = jnp.zeros((8, bn), jnp.float32)
        for i in range(8):
            valid = r0 + i < count
            h = jnp.where(valid, a8[i:i + 1] * h + b8[i:i + 1], h)
            out = jnp.where(jnp.logical_and(sublane == i, valid),
                            jnp.broadcast_to(h, (8, bn)), out)
        h_ref[pl.ds(r0, 8), :] = out
        return h

    h = jax.lax.fori_loop(0, bt // 8, group, carry_ref[...])
    carry_ref[...] = h
    hl_ref[...] = h


def _pallas_scan(plan: _ScanPlan, a, b, h0, lengths):
    batch, length, features = a.shape
    bt, bn = plan.block_t, plan.block_n
    pad = ((0, 0), (0, plan.length - length), (0, plan.features - features))
    a_p, b_p = jnp.pad(a, pad), jnp.pad(b, pad)
    h0_p = jnp.pad(h0.astype(jnp.float32), ((0, 0), (0, plan.features - features)))[:, None]
    out_shape = [jax.ShapeDtypeStruct((batch, plan.length, plan.features), jnp.float32),
                 jax.ShapeDtypeStruct((batch, 1, plan.features), jnp.float32)]
    frames = ((None, bt, bn), lambda r, n, t: (r, t, n))
    state = ((None, 1, bn), lambda r, n, t: (r, 0, n))
    lengths = lengths.astype(jnp.int32)
    if plan.backend in ("tpu", "tpu_interpret"):
        from jax.experimental.pallas import tpu as pltpu

        def spec(shape, index):
            return pl.BlockSpec(shape, lambda r, n, t, lens: index(r, n, t))

        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=plan.grid,
            in_specs=[spec(*frames), spec(*frames), spec(*state)],
            out_specs=[spec(*frames), spec(*state)],
            scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)])
        call = pl.pallas_call(
            functools.partial(_scan_body_tpu, plan), name=SCAN_KERNEL, grid_spec=grid_spec,
            out_shape=out_shape,
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if plan.backend == "tpu_interpret" else False)
    elif plan.backend == "mosaic_gpu":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        call = pl.pallas_call(
            functools.partial(_scan_body_gpu, plan), name=SCAN_KERNEL, grid=plan.grid,
            out_shape=out_shape,
            in_specs=[pl.BlockSpec(memory_space=plgpu.GMEM), pl.BlockSpec(*frames),
                      pl.BlockSpec(*frames), pl.BlockSpec(*state)],
            out_specs=[pl.BlockSpec(*frames), pl.BlockSpec(*state)],
            scratch_shapes=[plgpu.SMEM((1, bn), jnp.float32)],
            compiler_params=plgpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "sequential"),
                max_concurrent_steps=plan.max_concurrent_steps))
    else:
        from jax.experimental.pallas import tpu as pltpu

        call = pl.pallas_call(
            functools.partial(_scan_body_gpu, plan), name=SCAN_KERNEL, grid=plan.grid,
            out_shape=out_shape,
            in_specs=[pl.BlockSpec((batch,), lambda r, n, t: (0,)), pl.BlockSpec(*frames),
                      pl.BlockSpec(*frames), pl.BlockSpec(*state)],
            out_specs=[pl.BlockSpec(*frames), pl.BlockSpec(*state)],
            scratch_shapes=[pltpu.VMEM((1, bn), jnp.float32)], interpret=True)
    h, h_last = call(lengths, a_p, b_p, h0_p)
    return h[:, :length, :features], h_last[:, 0, :features]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_vjp(plan, a, b, h0, lengths):
    return _pallas_scan(plan, a, b, h0, lengths)


def _scan_fwd(plan, a, b, h0, lengths):
    return _pallas_scan(plan, a, b, h0, lengths), (a, b, h0, lengths)


def _scan_bwd(plan, residuals, cotangents):
    a, b, h0, lengths = residuals
    _, vjp = jax.vjp(lambda *args: linear_scan_reference(*args, lengths=lengths), a, b, h0)
    return (*vjp(cotangents), None)


_scan_vjp.defvjp(_scan_fwd, _scan_bwd)


def _check_scan(a, b, h0):
    if not hasattr(a, "ndim") or a.ndim != 3 or getattr(b, "shape", None) != a.shape:
        raise ValueError(f"a, b: expected equal shapes [B, T, N], got "
                         f"{getattr(a, 'shape', a)} and {getattr(b, 'shape', b)}")
    expected = (a.shape[0], a.shape[2])
    if h0 is not None and h0.shape != expected:
        raise ValueError(f"h0: expected shape {expected}, got {h0.shape}")


def scan_pallas_forward(backend: str, a, b, h0, lengths, *, block_t=None, block_n=None,
                        max_concurrent_steps: int = 2):
    """The diagonal-scan Pallas kernel of `backend` ("mosaic_gpu", "tpu", "interpret",
    "tpu_interpret"), all arguments given, no dispatch or autodiff (for lowering tests)."""
    if backend not in SCAN_SUPPORTED + ("tpu_interpret",):
        raise ValueError(f"backend: expected one of {SCAN_SUPPORTED + ('tpu_interpret',)}, "
                         f"got {backend!r}")
    _check_scan(a, b, h0)
    plan = _ScanPlan(backend, a.shape[0], a.shape[1], a.shape[2], jnp.dtype(a.dtype).itemsize,
                     block_t, block_n, max_concurrent_steps)
    return _pallas_scan(plan, a, b, h0, lengths)


def linear_scan(a, b, h0=None, *, lengths=None, impl: str = "auto", block_t: int | None = None,
                block_n: int | None = None, max_concurrent_steps: int = 2):
    """`h_t = a_t * h_{t-1} + b_t` along axis 1 with a carry: `(h [B, T, N], h_last [B, N])`.

    Args:
      a, b: `[B, T, N]` (any float dtype; computed in float32).
      h0: `[B, N]` state before the chunk (None: zeros).
      lengths: `[B]` int valid frames per row, a prefix (None: all T). Frames after it do
        not advance the state; `h` is zero there.
      impl: "auto" | "xla" | "mosaic_gpu" | "tpu" | "interpret" | "tpu_interpret".
      block_t, block_n, max_concurrent_steps: Pallas tiling and pipeline depth.
    Returns: float32 `h` and `h_last` (= h0 for rows with no valid frame).
    """
    _check_scan(a, b, h0)
    batch, length, features = a.shape
    if h0 is None:
        h0 = jnp.zeros((batch, features), jnp.float32)
    lengths = _check_lengths(lengths, batch, length)
    impl = resolve_impl(impl, SCAN_KERNEL, SCAN_SUPPORTED)
    if impl == "xla" or length == 0:
        return linear_scan_reference(a, b, h0, lengths=lengths)
    plan = _ScanPlan(impl, batch, length, features, jnp.dtype(a.dtype).itemsize, block_t, block_n,
                     max_concurrent_steps)
    return _scan_vjp(plan, a, b, h0, lengths)


# ================================================================== linear attention
def _masked_inputs(q, k, v, log_decay, lengths):
    """Invalid frames zeroed (NaN-safe `where`), log decay 0 there (no decay, no update)."""
    valid = jnp.arange(q.shape[1])[None, :] < lengths[:, None]
    v4 = valid[..., None, None]
    q, k, v = (jnp.where(v4, u, jnp.zeros((), u.dtype)) for u in (q, k, v))
    if log_decay is None:
        log_decay = jnp.zeros(q.shape[:3], jnp.float32)
    log_decay = jnp.where(valid[..., None], log_decay.astype(jnp.float32), 0.0)
    return q, k, v, log_decay, valid


def linear_attention_reference(q, k, v, log_decay, state, *, lengths, chunk: int = 64):
    """The jnp reference ("xla"): chunked, float32, `lax.scan` over chunks; all args given
    (`state = (S [B, H, Dk, Dv], z [B, H, Dk])`). Returns `(o, normalizer, (S, z))`."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    q, k, v, log_decay, valid = _masked_inputs(q, k, v, log_decay, lengths)
    s0, z0 = (u.astype(jnp.float32) for u in state)
    if length == 0:
        return (jnp.zeros((batch, 0, heads, dv), jnp.float32),
                jnp.zeros((batch, 0, heads), jnp.float32), (s0, z0))
    chunk = min(chunk, length)
    padded = _round_up(length, chunk)
    pad = padded - length

    def chunks(u):  # [B, T, H, ...] -> [nC, B, H, C, ...] float32
        u = jnp.pad(u.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (u.ndim - 2))
        u = u.reshape((batch, padded // chunk, chunk) + u.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(u, 1, 0), 3, 2)

    qc, kc, vc, gc = chunks(q), chunks(k), chunks(v), chunks(log_decay)
    gc = jnp.cumsum(gc, axis=-1)  # [nC, B, H, C] in-chunk cumulative log decay
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))

    def step(carry, xs):
        s, z = carry
        qi, ki, vi, gi = xs
        decay = jnp.where(causal, jnp.exp(gi[..., :, None] - gi[..., None, :]), 0.0)
        scores = jnp.einsum("bhtd,bhsd->bhts", qi, ki, precision=_HIGHEST) * decay
        inter = jnp.exp(gi)[..., None]
        o = (jnp.einsum("bhts,bhsv->bhtv", scores, vi, precision=_HIGHEST)
             + inter * jnp.einsum("bhtd,bhdv->bhtv", qi, s, precision=_HIGHEST))
        norm = scores.sum(-1) + inter[..., 0] * jnp.einsum("bhtd,bhd->bht", qi, z,
                                                           precision=_HIGHEST)
        last = gi[..., -1:]
        wk = jnp.exp(last - gi)[..., None] * ki
        s = jnp.exp(last)[..., None] * s + jnp.einsum("bhsd,bhsv->bhdv", wk, vi,
                                                      precision=_HIGHEST)
        z = jnp.exp(last) * z + wk.sum(-2)
        return (s, z), (o, norm)

    (s, z), (o, norm) = jax.lax.scan(step, (s0, z0), (qc, kc, vc, gc))
    o = jnp.moveaxis(o, 0, 1).transpose(0, 1, 3, 2, 4).reshape(batch, padded, heads, dv)
    norm = jnp.moveaxis(norm, 0, 1).transpose(0, 1, 3, 2).reshape(batch, padded, heads)
    o, norm = o[:, :length], norm[:, :length]
    o = jnp.where(valid[..., None, None], o, 0.0)
    norm = jnp.where(valid[..., None], norm, 0.0)
    return o, norm, (s, z)


def _la_chunk(q, k, v, g_col, g_row, s, z, valid, causal):
    """One chunk on loaded values (shared by the TPU and Triton/interpret kernels).

    q, k [C, Dk], v [C, Dv] (invalid rows zeroed by the caller's `where`), g_col [C, 1] and
    g_row [1, C] the in-chunk cumulative log decay, s [Dk, Dv] f32, z [1, Dk] f32, valid
    [C, 1] bool, causal [C, C] bool (s <= t). Returns (o [C, Dv], norm [C, 1], s, z).
    """
    f32 = jnp.float32
    mm = v.dtype if v.dtype != f32 else f32  # bf16 operands for the MXU/tensor cores
    zero = jnp.zeros((), q.dtype)
    q = jnp.where(valid, q, zero)
    k = jnp.where(valid, k, zero)
    v = jnp.where(valid, v, jnp.zeros((), v.dtype))
    scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                 preferred_element_type=f32)
    decay = jnp.where(causal, jnp.exp(g_col - g_row), 0.0)
    scores = scores * decay
    inter = jnp.exp(g_col)
    qf = q.astype(f32)
    o = (jnp.dot(scores.astype(mm), v, precision=_HIGHEST, preferred_element_type=f32)
         + inter * jnp.dot(qf, s, precision=_HIGHEST, preferred_element_type=f32))
    norm = (jnp.sum(scores, axis=1, keepdims=True)
            + inter * jnp.sum(qf * z, axis=1, keepdims=True))
    # G at the chunk's last frame, [1, 1] (a masked sum: Triton has no tensor slicing).
    is_last = jax.lax.broadcasted_iota(jnp.int32, g_col.shape, 0) == g_col.shape[0] - 1
    last = jnp.sum(jnp.where(is_last, g_col, 0.0), axis=0, keepdims=True)
    wk = jnp.exp(last - g_col) * k.astype(f32)
    s = jnp.exp(last) * s + jax.lax.dot_general(
        wk.astype(mm), v, (((0,), (0,)), ((), ())), precision=_HIGHEST,
        preferred_element_type=f32)
    z = jnp.exp(last) * z + jnp.sum(wk, axis=0, keepdims=True)
    return jnp.where(valid, o, 0.0), jnp.where(valid, norm, 0.0), s, z


class _AttentionPlan:
    def __init__(self, backend, batch, heads, length, dk, dv, chunk):
        tpu = backend in ("tpu", "tpu_interpret")
        self.backend = backend
        if chunk is None:
            chunk = 128 if tpu else 64
        if backend == "triton":
            chunk = min(chunk, max(16, _next_pow2(length)))
        else:
            chunk = min(chunk, _round_up(length, 8))
        self.length = _round_up(length, chunk)
        if tpu and chunk % 8:
            raise ValueError(f"chunk: TPU needs a multiple of 8, got {chunk}")
        if backend == "triton" and (chunk < 16 or chunk & (chunk - 1)):
            raise ValueError(f"chunk: Triton needs a power of 2 >= 16, got {chunk}")
        self.chunk = chunk
        # Triton: power-of-2 feature sizes >= 16 (zero padding is exact here).
        self.dk = max(16, _next_pow2(dk)) if backend == "triton" else dk
        self.dv = max(16, _next_pow2(dv)) if backend == "triton" else dv
        self.batch, self.heads = batch, heads

    def key(self):
        return (self.backend, self.batch, self.heads, self.length, self.dk, self.dv, self.chunk)

    def __hash__(self):
        return hash(self.key())

    def __eq__(self, other):
        return isinstance(other, _AttentionPlan) and self.key() == other.key()


def _la_body_tpu(plan, len_ref, q_ref, k_ref, v_ref, gr_ref, gc_ref, s0_ref, z0_ref,
                 o_ref, n_ref, s_ref, z_ref, s_acc, z_acc):
    c = plan.chunk
    row, i = pl.program_id(0), pl.program_id(2)

    @pl.when(i == 0)
    def _():
        s_acc[...] = s0_ref[...]
        z_acc[...] = z0_ref[...]

    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
    valid = jax.lax.broadcasted_iota(jnp.int32, (c, 1), 0) + i * c < len_ref[row]
    o, norm, s, z = _la_chunk(q_ref[...], k_ref[...], v_ref[...], gc_ref[...], gr_ref[...],
                              s_acc[...], z_acc[...], valid, cols <= rows)
    o_ref[...] = o
    n_ref[...] = norm
    s_acc[...] = s
    z_acc[...] = z
    s_ref[...] = s
    z_ref[...] = z


def _la_body_loop(plan, len_ref, q_ref, k_ref, v_ref, g_ref, s0_ref, z0_ref,
                  o_ref, n_ref, s_ref, z_ref):
    """Triton / interpret: one program per (row, head), a loop over the chunks."""
    c = plan.chunk
    row = pl.program_id(0)
    n = len_ref[row]
    ids = jnp.arange(c)
    causal = ids[None, :] <= ids[:, None]

    def chunk(i, carry):
        s, z = carry
        t0 = pl.multiple_of(i * c, c)
        frames = pl.ds(t0, c)
        g = g_ref[frames]
        valid = (ids + t0 < n)[:, None]
        o, norm, s, z = _la_chunk(q_ref[frames, :], k_ref[frames, :], v_ref[frames, :],
                                  g[:, None], g[None, :], s, z, valid, causal)
        o_ref[frames, :] = o
        n_ref[frames] = norm[:, 0]
        return s, z

    s, z = jax.lax.fori_loop(0, plan.length // c, chunk, (s0_ref[...], z0_ref[...]))
    s_ref[...] = s
    z_ref[...] = z


def _pallas_attention(plan: _AttentionPlan, q, k, v, log_decay, s0, z0, lengths):
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    c, tp = plan.chunk, plan.length
    q, k, v, log_decay, _ = _masked_inputs(q, k, v, log_decay, lengths)

    def heads_first(u, width):  # [B, T, H, D] -> [B, H, Tp, width]
        u = jnp.pad(u, ((0, 0), (0, tp - length), (0, 0), (0, width - u.shape[-1])))
        return u.transpose(0, 2, 1, 3)

    qh, kh, vh = heads_first(q, plan.dk), heads_first(k, plan.dk), heads_first(v, plan.dv)
    ld = jnp.pad(log_decay, ((0, 0), (0, tp - length), (0, 0))).transpose(0, 2, 1)
    g = jnp.cumsum(ld.reshape(batch, heads, tp // c, c), axis=-1).reshape(batch, heads, tp)
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, plan.dk - dk), (0, plan.dv - dv)))
    z0 = jnp.pad(z0.astype(jnp.float32), ((0, 0), (0, 0), (0, plan.dk - dk)))[:, :, None]
    lengths = lengths.astype(jnp.int32)
    f32 = jnp.float32
    if plan.backend in ("tpu", "tpu_interpret"):
        from jax.experimental.pallas import tpu as pltpu

        def spec(shape, index):
            return pl.BlockSpec(shape, lambda r, h, i, lens: index(r, h, i))

        frames = lambda width: spec((None, None, c, width), lambda r, h, i: (r, h, i, 0))
        whole = lambda a, b_: spec((None, None, a, b_), lambda r, h, i: (r, h, 0, 0))
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, tp // c),
            in_specs=[frames(plan.dk), frames(plan.dk), frames(plan.dv),
                      spec((None, None, None, 1, c), lambda r, h, i: (r, h, i, 0, 0)),
                      frames(1),
                      whole(plan.dk, plan.dv), whole(1, plan.dk)],
            out_specs=[frames(plan.dv), frames(1), whole(plan.dk, plan.dv), whole(1, plan.dk)],
            scratch_shapes=[pltpu.VMEM((plan.dk, plan.dv), f32), pltpu.VMEM((1, plan.dk), f32)])
        o, norm, s, z = pl.pallas_call(
            functools.partial(_la_body_tpu, plan), name=ATTENTION_KERNEL, grid_spec=grid_spec,
            out_shape=[jax.ShapeDtypeStruct((batch, heads, tp, plan.dv), f32),
                       jax.ShapeDtypeStruct((batch, heads, tp, 1), f32),
                       jax.ShapeDtypeStruct((batch, heads, plan.dk, plan.dv), f32),
                       jax.ShapeDtypeStruct((batch, heads, 1, plan.dk), f32)],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("parallel", "parallel", "arbitrary")),
            interpret=pltpu.InterpretParams() if plan.backend == "tpu_interpret" else False,
        )(lengths, qh, kh, vh, g.reshape(batch, heads, tp // c, 1, c), g[..., None], s0, z0)
        norm = norm[..., 0]
    else:
        whole = lambda *shape: pl.BlockSpec((None, None) + shape,
                                            lambda r, h: (r, h) + (0,) * len(shape))
        kwargs = {}
        if plan.backend == "triton":
            from jax.experimental.pallas import triton as pltriton

            kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=4, num_stages=2)
        else:
            kwargs["interpret"] = True
        o, norm, s, z = pl.pallas_call(
            functools.partial(_la_body_loop, plan), name=ATTENTION_KERNEL, grid=(batch, heads),
            in_specs=[pl.BlockSpec((batch,), lambda r, h: (0,)), whole(tp, plan.dk),
                      whole(tp, plan.dk), whole(tp, plan.dv), whole(tp),
                      whole(plan.dk, plan.dv), whole(1, plan.dk)],
            out_specs=[whole(tp, plan.dv), whole(tp), whole(plan.dk, plan.dv),
                       whole(1, plan.dk)],
            out_shape=[jax.ShapeDtypeStruct((batch, heads, tp, plan.dv), f32),
                       jax.ShapeDtypeStruct((batch, heads, tp), f32),
                       jax.ShapeDtypeStruct((batch, heads, plan.dk, plan.dv), f32),
                       jax.ShapeDtypeStruct((batch, heads, 1, plan.dk), f32)],
            **kwargs,
        )(lengths, qh, kh, vh, g, s0, z0)
    o = o.transpose(0, 2, 1, 3)[:, :length, :, :dv]
    norm = norm.transpose(0, 2, 1)[:, :length]
    return o, norm, (s[:, :, :dk, :dv], z[:, :, 0, :dk])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_vjp(plan, q, k, v, log_decay, s0, z0, lengths):
    return _pallas_attention(plan, q, k, v, log_decay, s0, z0, lengths)


def _attention_fwd(plan, q, k, v, log_decay, s0, z0, lengths):
    out = _pallas_attention(plan, q, k, v, log_decay, s0, z0, lengths)
    return out, (q, k, v, log_decay, s0, z0, lengths)


def _attention_bwd(plan, residuals, cotangents):
    q, k, v, log_decay, s0, z0, lengths = residuals
    _, vjp = jax.vjp(
        lambda q, k, v, ld, s0, z0: linear_attention_reference(
            q, k, v, ld, (s0, z0), lengths=lengths, chunk=plan.chunk), q, k, v, log_decay, s0, z0)
    return (*vjp(cotangents), None)


_attention_vjp.defvjp(_attention_fwd, _attention_bwd)


def _check_attention(q, k, v, log_decay, state):
    if not hasattr(q, "ndim") or q.ndim != 4:
        raise ValueError(f"q: expected [B, T, H, Dk], got shape {getattr(q, 'shape', q)}")
    if k.shape != q.shape:
        raise ValueError(f"k: expected shape {q.shape} (as q), got {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected shape {q.shape[:3] + ('Dv',)}, got {v.shape}")
    if log_decay is not None and log_decay.shape != q.shape[:3]:
        raise ValueError(f"log_decay: expected shape {q.shape[:3]} [B, T, H], got "
                         f"{log_decay.shape}")
    batch, _, heads, dk = q.shape
    dv = v.shape[-1]
    if state is not None:
        if (not isinstance(state, (tuple, list)) or len(state) != 2
                or state[0].shape != (batch, heads, dk, dv)
                or state[1].shape != (batch, heads, dk)):
            raise ValueError(f"state: expected (S [{batch}, {heads}, {dk}, {dv}], "
                             f"z [{batch}, {heads}, {dk}]), got "
                             f"{jax.tree.map(jnp.shape, state)}")


def attention_pallas_forward(backend: str, q, k, v, log_decay, state, lengths, *, chunk=None):
    """The linear-attention Pallas kernel of `backend` ("triton", "tpu", "interpret",
    "tpu_interpret"), all arguments given, no dispatch or autodiff (for lowering tests)."""
    if backend not in ATTENTION_SUPPORTED + ("tpu_interpret",):
        raise ValueError(f"backend: expected one of "
                         f"{ATTENTION_SUPPORTED + ('tpu_interpret',)}, got {backend!r}")
    _check_attention(q, k, v, log_decay, state)
    batch, length, heads, dk = q.shape
    plan = _AttentionPlan(backend, batch, heads, length, dk, v.shape[-1], chunk)
    return _pallas_attention(plan, q, k, v, log_decay, state[0], state[1], lengths)


def linear_attention(q, k, v, log_decay=None, state=None, *, lengths=None, impl: str = "auto",
                     chunk: int | None = None):
    """Causal linear attention with a carried state: `(o, normalizer, (S, z))`.

    Args:
      q, k: `[B, T, H, Dk]` (feature-mapped already, e.g. ReLU or elu+1); v: `[B, T, H, Dv]`.
      log_decay: `[B, T, H]` log of the per-frame decay (<= 0), or None (no decay).
      state: `(S [B, H, Dk, Dv], z [B, H, Dk])` before the chunk, or None (zeros).
      lengths: `[B]` int valid frames per row, a prefix (None: all T); the rest neither
        produce output (zeros) nor change the state.
      impl: "auto" | "xla" | "triton" | "tpu" | "interpret" | "tpu_interpret".
      chunk: frames per chunk (default 64; 128 on TPU).
    Returns: float32 `o [B, T, H, Dv] = q_t S_t`, `normalizer [B, T, H] = q_t · z_t`, and
      the float32 state after each row's last valid frame.
    """
    _check_attention(q, k, v, log_decay, state)
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    if state is None:
        state = (jnp.zeros((batch, heads, dk, dv), jnp.float32),
                 jnp.zeros((batch, heads, dk), jnp.float32))
    if log_decay is None:
        log_decay = jnp.zeros((batch, length, heads), jnp.float32)
    lengths = _check_lengths(lengths, batch, length)
    impl = resolve_impl(impl, ATTENTION_KERNEL, ATTENTION_SUPPORTED)
    if impl == "xla" or length == 0:
        return linear_attention_reference(q, k, v, log_decay, state, lengths=lengths,
                                          chunk=chunk or 64)
    plan = _AttentionPlan(impl, batch, heads, length, dk, dv, chunk)
    return _attention_vjp(plan, q, k, v, log_decay, state[0], state[1], lengths)
