"""Quantizers for neural codecs: residual vector quantization (`ResidualVQ`) with quantizer
dropout, and finite scalar quantization (`FSQ`).

Both act on each frame alone (frame-wise StreamLayers, so streaming equals offline trivially)
and share one interface:

* `quantize(v, num_active=None, mask=None) -> QuantizerOutput` (training): straight-through
  quantized vectors, codes, commitment and codebook losses;
* `encode(v, num_quantizers=None) -> codes int32 [..., n]` and `decode(codes) -> [..., features]`
  (inference); `decode(encode(v))` equals `quantize(v).quantized`;
* `__call__(x: Seq)` / `step` give the straight-through quantized frames with the first
  `active_quantizers` codebooks.

RVQ codebooks are *learned* (VQ-VAE codebook loss `|sg(z) - e|^2` plus commitment loss
`|z - sg(e)|^2`), not EMA-updated: training stays a pure function of the parameters, so any
optax loop, `jax.grad`, sharding rule, `streamzoo.pure()` and orbax checkpoint handles the
codebooks like every other weight (EMA codebooks are state mutated outside the gradient that
each train loop must thread through and, under data parallelism, all-reduce). The usual
weakness of learned codebooks, dead codes, is addressed as in DAC (Kumar et al. 2023, after
Yu et al.'s ViT-VQGAN): the lookup runs in a low-dimensional projection (`codebook_dim`,
e.g. 8) with l2-normalised vectors (`normalize=True`), which keeps codebook usage high.

Quantizer dropout (SoundStream): during training a random number of leading quantizers is
active (`sample_active_quantizers`), so one model serves several bitrates; at inference
`encode(v, num_quantizers=n)` / `decode(codes[..., :n])` pick the bitrate.

FSQ (Mentzer et al. 2023): each of `len(levels)` dimensions is bounded with tanh to
`levels[i]` values and rounded (straight-through); the code is the mixed-radix index of the
rounded digits, one code per frame with `prod(levels)` possible values. No codebook, no
auxiliary loss.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.streamer import StreamLayer

_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class QuantizerOutput:
    """What `quantize` returns (all float32 except `codes`)."""

    quantized: jax.Array        # [..., features] straight-through: value = decode(codes)
    codes: jax.Array            # [..., num_quantizers] int32, -1 where a quantizer is inactive
    commitment_loss: jax.Array  # scalar: mean over frames of sum over active stages |z - sg(e)|^2
    codebook_loss: jax.Array    # scalar: the same with sg on the encoder side (trains codebooks)
    num_active: jax.Array       # the active quantizer counts used (broadcast to the batch)


# ---------------------------------------------------------------------------------- helpers
@jax.custom_jvp
def straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
    """Value `y`, gradient of the identity to `x` (and none to `y`): exactly `y` in the
    forward pass, unlike `x + stop_gradient(y - x)`, which can be an ulp off."""
    return y


@straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _, y = primals
    dx, _ = tangents
    return y, dx


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _l2_normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, -1, keepdims=True), eps))


def _frame_weights(lead_shape, mask):
    """`[...]` float32 weights of the frames (1 where valid) and their total (at least 1)."""
    if mask is None:
        w = jnp.ones(lead_shape, jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != tuple(lead_shape):
            raise ValueError(f"mask: expected shape {tuple(lead_shape)} (the frames of v), "
                             f"got {mask.shape}")
        w = mask.astype(jnp.float32)
    return w, jnp.maximum(w.sum(), 1.0)


def _active_counts(num_active, lead_shape, total: int) -> jax.Array:
    """`num_active` (int, or `[B]` per row) broadcast to the frames `lead_shape`, int32."""
    if isinstance(num_active, numbers.Integral) and not isinstance(num_active, bool):
        if not 0 <= num_active <= total:
            raise ValueError(f"num_active: expected 0 <= num_active <= {total}, got {num_active}")
    n = jnp.asarray(num_active, jnp.int32)
    if n.ndim == 1 and len(lead_shape) >= 1:
        if n.shape[0] != lead_shape[0]:
            raise ValueError(f"num_active: expected a scalar or shape ({lead_shape[0]},) (one per "
                             f"row), got {n.shape}")
        n = n.reshape((-1,) + (1,) * (len(lead_shape) - 1))
    elif n.ndim:
        raise ValueError(f"num_active: expected a scalar or shape ({lead_shape[0]},), got {n.shape}")
    return jnp.broadcast_to(n, lead_shape)


def sample_active_quantizers(rng: jax.Array, batch_size: int, num_quantizers: int, *,
                             dropout_rate: float = 1.0, per_row: bool = False) -> jax.Array:
    """Quantizer dropout: `[batch_size]` int32 counts of active (leading) quantizers.

    With probability `dropout_rate` the count is uniform in `1..num_quantizers`, otherwise it
    is `num_quantizers` (all). `per_row=False` (SoundStream, EnCodec) draws one count for the
    whole batch; `per_row=True` (DAC) one per row.
    """
    _check_int("batch_size", batch_size)
    _check_int("num_quantizers", num_quantizers)
    if not 0.0 <= dropout_rate <= 1.0:
        raise ValueError(f"dropout_rate: expected a probability in [0, 1], got {dropout_rate!r}")
    rows = batch_size if per_row else 1
    k_drop, k_count = jax.random.split(rng)
    count = jax.random.randint(k_count, (rows,), 1, num_quantizers + 1, jnp.int32)
    drop = jax.random.bernoulli(k_drop, dropout_rate, (rows,))
    count = jnp.where(drop, count, num_quantizers).astype(jnp.int32)
    return jnp.broadcast_to(count, (batch_size,))


def codebook_perplexity(codes: jax.Array, codebook_size: int, mask=None) -> jax.Array:
    """Per quantizer, `exp(entropy)` of the code histogram over the (valid) frames: how many
    codes are effectively in use (`codebook_size` at best). codes `[..., n]`, -1 ignored."""
    codes = jnp.asarray(codes)
    lead = codes.shape[:-1]
    w, _ = _frame_weights(lead, mask)
    onehot = jax.nn.one_hot(codes, codebook_size, dtype=jnp.float32)  # -1 gives zeros
    counts = jnp.einsum("...nk,...->nk", onehot, w)
    p = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    return jnp.exp(entropy)


class _Quantizer(StreamLayer):
    """Frame-wise layer plumbing shared by the quantizers."""

    frame_wise = True

    def _check_values(self, v, name="v"):
        v = jnp.asarray(v)
        if v.ndim < 1 or v.shape[-1] != self.in_features:
            raise ValueError(f"{name}: expected shape [..., {self.in_features}], got {v.shape}")
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise ValueError(f"{name}: expected floating values, got dtype {v.dtype}")
        return v

    def _check_codes(self, codes, name="codes"):
        codes = jnp.asarray(codes)
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise ValueError(f"{name}: expected integer codes, got dtype {codes.dtype}")
        if codes.ndim < 1 or not 1 <= codes.shape[-1] <= self.num_quantizers:
            raise ValueError(f"{name}: expected shape [..., n] with 1 <= n <= "
                             f"{self.num_quantizers}, got {codes.shape}")
        return codes

    def _check_n(self, num_quantizers):
        n = self.num_quantizers if num_quantizers is None else num_quantizers
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= self.num_quantizers:
            raise ValueError(f"num_quantizers: expected an int in 1..{self.num_quantizers}, "
                             f"got {num_quantizers!r}")
        return int(n)

    def _forward(self, x: Seq) -> Seq:
        out = self.quantize(x.values, num_active=self.active_quantizers, mask=x.mask)
        return x.replace(values=out.quantized.astype(x.dtype)).masked()

    def _step(self, carry, x):
        return carry, self._forward(x)


# ------------------------------------------------------------------------------- RVQ
class ResidualVQ(_Quantizer):
    """Residual vector quantizer: stage i quantizes what stages 0..i-1 left over.

    `features` in and out; `num_quantizers` codebooks of `codebook_size` codes of
    `codebook_dim` (default `features`; when smaller, each stage has its own in/out
    projections, DAC's factorised codes). `normalize=True` looks codes up by cosine
    similarity (l2-normalised query and codes). `active_quantizers` (default all) is what
    `__call__`/`step` use. Parameters and the lookup are float32.
    """

    def __init__(self, features: int, *, num_quantizers: int, codebook_size: int,
                 codebook_dim: int | None = None, normalize: bool = False,
                 active_quantizers: int | None = None, rngs: nnx.Rngs):
        self.in_features = self.out_features = _check_int("features", features)
        self.num_quantizers = _check_int("num_quantizers", num_quantizers)
        self.codebook_size = _check_int("codebook_size", codebook_size)
        self.codebook_dim = _check_int("codebook_dim", features if codebook_dim is None else codebook_dim)
        self.normalize = bool(normalize)
        self.active_quantizers = self._check_n(active_quantizers)
        n, k, d = self.num_quantizers, self.codebook_size, self.codebook_dim
        self.codebooks = nnx.Param(jax.random.normal(rngs.params(), (n, k, d), jnp.float32))
        if d != features:
            init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
            self.in_proj = nnx.Param(init(rngs.params(), (n, features, d), jnp.float32))
            self.in_bias = nnx.Param(jnp.zeros((n, d), jnp.float32))
            self.out_proj = nnx.Param(init(rngs.params(), (n, d, features), jnp.float32))
            self.out_bias = nnx.Param(jnp.zeros((n, features), jnp.float32))
        else:
            self.in_proj = self.in_bias = self.out_proj = self.out_bias = None

    @property
    def projected(self) -> bool:
        return self.in_proj is not None

    def _stage_params(self, n: int):
        """Per-stage parameters stacked on a leading axis of size n (the first n stages)."""
        p = {"codebook": self.codebooks[...][:n]}
        if self.projected:
            for name in ("in_proj", "in_bias", "out_proj", "out_bias"):
                p[name] = getattr(self, name)[...][:n]
        return p

    def _project_in(self, p, r):
        if not self.projected:
            return r
        return jnp.einsum("...f,fd->...d", r, p["in_proj"], precision=_HIGHEST) + p["in_bias"]

    def _project_out(self, p, e):
        if not self.projected:
            return e
        return jnp.einsum("...d,df->...f", e, p["out_proj"], precision=_HIGHEST) + p["out_bias"]

    def nearest(self, codebook: jax.Array, z: jax.Array) -> jax.Array:
        """Index of the nearest code to each `z [..., d]` (Euclidean, or cosine when
        `normalize`); ties go to the lowest index."""
        if self.normalize:
            z, codebook = _l2_normalize(z), _l2_normalize(codebook)
        scores = (jnp.einsum("...d,kd->...k", z, codebook, precision=_HIGHEST)
                  - 0.5 * jnp.sum(codebook * codebook, -1))
        return jnp.argmax(scores, axis=-1).astype(jnp.int32)

    def _scan(self, v, n: int, active, weights, total):
        """Run the first n stages: quantized (straight-through), codes, losses."""
        params = self._stage_params(n)

        def body(acc, inputs):
            residual, quantized, commit, cb_loss = acc
            p, i = inputs
            z = self._project_in(p, residual)
            idx = self.nearest(p["codebook"], z)
            e = p["codebook"][idx]
            on = i < active  # [...] this stage is active for the frame
            w = weights * on.astype(jnp.float32)
            commit = commit + jnp.sum(w * jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)), -1)) / total
            cb_loss = cb_loss + jnp.sum(w * jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e), -1)) / total
            out = self._project_out(p, straight_through(z, e))
            out = jnp.where(on[..., None], out, 0.0)
            codes = jnp.where(on, idx, -1)
            return (residual - out, quantized + out, commit, cb_loss), codes

        zero = jnp.zeros((), jnp.float32)
        init = (v, jnp.zeros_like(v), zero, zero)
        (_, quantized, commit, cb_loss), codes = jax.lax.scan(
            body, init, (params, jnp.arange(n, dtype=jnp.int32)))
        return quantized, jnp.moveaxis(codes, 0, -1), commit, cb_loss

    def quantize(self, v, *, num_active=None, mask=None) -> QuantizerOutput:
        """Quantize `v [..., features]` with the first `num_active` stages (an int, or `[B]`
        per row; default `active_quantizers`); `mask [...]` weights the losses."""
        v = self._check_values(v).astype(jnp.float32)
        lead = v.shape[:-1]
        num_active = self.active_quantizers if num_active is None else num_active
        active = _active_counts(num_active, lead, self.num_quantizers)
        weights, total = _frame_weights(lead, mask)
        quantized, codes, commit, cb_loss = self._scan(v, self.num_quantizers, active, weights, total)
        return QuantizerOutput(quantized, codes, commit, cb_loss, active)

    def encode(self, v, num_quantizers: int | None = None) -> jax.Array:
        """Codes `[..., n]` int32 of `v [..., features]` with the first n quantizers."""
        v = self._check_values(v).astype(jnp.float32)
        n = self._check_n(num_quantizers)
        lead = v.shape[:-1]
        ones = jnp.ones(lead, jnp.float32)
        active = jnp.full(lead, n, jnp.int32)
        _, codes, _, _ = self._scan(jax.lax.stop_gradient(v), n, active, ones, 1.0)
        return codes

    def decode(self, codes) -> jax.Array:
        """`[..., features]` float32: the sum of the first `codes.shape[-1]` stages' vectors.
        Code -1 means "inactive" (adds nothing); other codes are clipped to the codebook."""
        codes = self._check_codes(codes)
        n = codes.shape[-1]
        p = self._stage_params(n)
        # The stages' lookups are independent (only encoding is sequential): all n at once,
        # a few ops instead of a loop of n (this runs in every streaming decode step).
        e = p["codebook"][jnp.arange(n), jnp.clip(codes, 0, self.codebook_size - 1)]  # [..., n, d]
        if self.projected:
            e = (jnp.einsum("...nd,ndf->...nf", e, p["out_proj"], precision=_HIGHEST)
                 + p["out_bias"])
        return jnp.sum(jnp.where((codes >= 0)[..., None], e, 0.0), axis=-2)


# ------------------------------------------------------------------------------- FSQ
class FSQ(_Quantizer):
    """Finite scalar quantization with `levels` (e.g. (8, 5, 5, 5): 1000 codes).

    `features` in and out; when `features != len(levels)`, learned linear projections map to
    and from the `len(levels)` quantized dimensions. Dimension i is bounded by
    `tanh(z + shift) * (L-1)(1+eps)/2 - offset` (offset 1/2 for even L, so that rounding
    gives exactly L integers), rounded with a straight-through gradient, and scaled to
    [-1, 1] by `L // 2`. One code per frame: the mixed-radix index of the digits
    `round + L // 2` in `0..L-1` (dimension 0 least significant).
    """

    num_quantizers = 1
    active_quantizers = 1

    def __init__(self, features: int, levels: Sequence[int], *, eps: float = 1e-3,
                 rngs: nnx.Rngs):
        self.in_features = self.out_features = _check_int("features", features)
        levels = tuple(levels) if isinstance(levels, (tuple, list)) else levels
        if (not isinstance(levels, tuple) or not levels
                or any(isinstance(l, bool) or not isinstance(l, numbers.Integral) or l < 2
                       for l in levels)):
            raise ValueError(f"levels: expected a non-empty sequence of ints >= 2, got {levels!r}")
        self.levels = tuple(int(l) for l in levels)
        if math.prod(self.levels) >= 2 ** 31:
            raise ValueError(f"levels: the code count prod(levels) must fit int32, got "
                             f"{math.prod(self.levels)}")
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps: expected a small non-negative float, got {eps!r}")
        self.eps = float(eps)
        self.codebook_size = math.prod(self.levels)
        d = len(self.levels)
        if d != features:
            self.in_proj = nnx.Linear(features, d, rngs=rngs)
            self.out_proj = nnx.Linear(d, features, rngs=rngs)
        else:
            self.in_proj = self.out_proj = None

    # Static per-dimension constants (numpy, so they fold into the program).
    def _constants(self):
        levels = np.asarray(self.levels, np.float32)
        half_l = (levels - 1) * (1 + self.eps) / 2
        offset = np.where(np.asarray(self.levels) % 2 == 0, 0.5, 0.0).astype(np.float32)
        shift = np.arctanh(offset / half_l).astype(np.float32)
        half_width = (np.asarray(self.levels) // 2).astype(np.float32)
        basis = np.cumprod([1] + list(self.levels[:-1])).astype(np.int32)
        return half_l, offset, shift, half_width, basis

    def bound(self, z: jax.Array) -> jax.Array:
        """Dimension i squashed into `(-(L-1)/2 - offset, (L-1)/2 - offset)`, slightly widened,
        so that rounding reaches exactly the integers `-(L//2) .. (L-1)//2`."""
        half_l, offset, shift, _, _ = self._constants()
        return jnp.tanh(z + shift) * half_l - offset

    def _project_in(self, v):
        return v if self.in_proj is None else _linear(self.in_proj, v)

    def _project_out(self, q):
        return q if self.out_proj is None else _linear(self.out_proj, q)

    def _digits(self, v):
        """Rounded integers (float) of `v` and their straight-through version."""
        zb = self.bound(self._project_in(v))
        rounded = jnp.round(zb)
        return rounded, straight_through(zb, rounded)

    def quantize(self, v, *, num_active=None, mask=None) -> QuantizerOutput:
        """Quantize `v [..., features]` (straight-through); FSQ has no auxiliary loss."""
        v = self._check_values(v).astype(jnp.float32)
        lead = v.shape[:-1]
        if num_active is not None:
            _active_counts(num_active, lead, 1)
        _frame_weights(lead, mask)
        _, _, _, half_width, basis = self._constants()
        rounded, st = self._digits(v)
        quantized = self._project_out(st / half_width)
        codes = self._index(rounded)
        zero = jnp.zeros((), jnp.float32)
        return QuantizerOutput(quantized, codes, zero, zero, jnp.ones(lead, jnp.int32))

    def _index(self, rounded):
        _, _, _, half_width, basis = self._constants()
        digits = (rounded + half_width).astype(jnp.int32)
        return jnp.sum(digits * basis, -1, keepdims=True).astype(jnp.int32)

    def encode(self, v, num_quantizers: int | None = None) -> jax.Array:
        """Codes `[..., 1]` int32 in `0 .. prod(levels) - 1`."""
        v = self._check_values(v).astype(jnp.float32)
        self._check_n(num_quantizers)
        rounded, _ = self._digits(jax.lax.stop_gradient(v))
        return self._index(rounded)

    def digits(self, codes) -> jax.Array:
        """Per-dimension digits `[..., len(levels)]` in `0..L-1` of codes `[..., 1]`."""
        codes = self._check_codes(codes)
        _, _, _, _, basis = self._constants()
        levels = np.asarray(self.levels, np.int32)
        return (codes // basis) % levels

    def decode(self, codes) -> jax.Array:
        """`[..., features]` float32 of codes `[..., 1]` (clipped to the valid range)."""
        codes = jnp.clip(self._check_codes(codes), 0, self.codebook_size - 1)
        _, _, _, half_width, _ = self._constants()
        q = (self.digits(codes).astype(jnp.float32) - half_width) / half_width
        return self._project_out(q)


def _linear(layer: nnx.Linear, v):
    y = jnp.einsum("...i,io->...o", v, layer.kernel[...], precision=_HIGHEST)
    if layer.bias is not None:
        y = y + layer.bias[...]
    return y
