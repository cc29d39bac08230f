"""`LinearRecurrence`: a gated diagonal linear recurrence (RG-LRU style), parallel over time.

`h_t = a_t * h_{t-1} + b_t` with an input-dependent decay `a_t in (0, 1)`:

    a_t = exp(-c * softplus(decay) * sigmoid(x_t W_a + b_a))
    b_t = sqrt(1 - a_t^2) * (x_t W_x + b_x)
    y_t = h_t W_o + b_o

Because the recurrence is linear in h, it is an associative scan (`linear_scan`): offline it
runs in O(log T) depth over the whole sequence, streaming it runs the same scan over each
chunk starting from the carried state. A masked frame gets `a = 1, b = 0`, an exact
identity, so it does not move the state. The `sqrt(1 - a^2)` normalisation keeps the state's
scale independent of how slowly it decays. The state is float32 whatever the compute dtype.
When `impl` resolves to a Pallas implementation ("auto": on GPU/TPU) the scan runs the
`pallas_kernels.linear_scan` kernel; otherwise, and on CPU, `linear_scan` below.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer
from streamzoo.layers.recurrent import check_dtype, check_features, project
from streamzoo.pallas_kernels import linear_scan as scan_kernels
from streamzoo.pallas_kernels.dispatch import IMPLS, resolve_impl


def linear_scan(a, b, h0):
    """`h_t = a_t * h_{t-1} + b_t` along axis 1, from `h_{-1} = h0` (jnp reference).

    a, b: `[B, T, ...]`; h0: `[B, ...]`. Returns `(h_all [B, T, ...], h_last [B, ...])`,
    with `h_last = h0` when T = 0. Work-efficient `jax.lax.associative_scan` over
    `(a, b)` pairs, whose composition is `(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2)`.
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"a, b: expected equal shapes [B, T, ...], got {a.shape} and {b.shape}")
    expected = a.shape[:1] + a.shape[2:]
    if h0.shape != expected:
        raise ValueError(f"h0: expected shape {expected} (a without its time axis), got {h0.shape}")
    if a.shape[1] == 0:
        return b, h0
    return scan_kernels.associative_linear_scan(a, b, h0)


@struct.dataclass
class LinearRecurrenceCarry:
    h: jax.Array  # [B, hidden] float32 state


def _inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class LinearRecurrence(StreamLayer):
    """Gated diagonal linear recurrence; `receptive_field = (-inf, 0)`.

    `in_features -> hidden` state -> `out_features` (default `in_features`). `c` scales the
    decay rate (8 in RG-LRU); `min_decay, max_decay` bound `a` at gate 1 when initialised
    (`a^1` uniform in that range), which sets the memory lengths the layer starts with.
    `impl` picks the scan's implementation (`pallas_kernels.dispatch`).
    """

    def __init__(self, in_features: int, hidden: int, *, out_features: int | None = None,
                 c: float = 8.0, min_decay: float = 0.9, max_decay: float = 0.999,
                 dtype=None, impl: str = "auto", rngs: nnx.Rngs):
        self.in_features = check_features("in_features", in_features)
        self.hidden = check_features("hidden", hidden)
        self.out_features = check_features(
            "out_features", in_features if out_features is None else out_features)
        if not (isinstance(c, (int, float)) and c > 0 and math.isfinite(c)):
            raise ValueError(f"c: expected a positive finite number, got {c!r}")
        if not 0.0 < min_decay < max_decay < 1.0:
            raise ValueError(
                f"min_decay, max_decay: expected 0 < min_decay < max_decay < 1, "
                f"got {min_decay}, {max_decay}")
        self.c = float(c)
        self.dtype = check_dtype(dtype)
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        self.impl = impl
        # Gate and input projections fused: one matmul for all frames.
        self.in_proj = nnx.Linear(in_features, 2 * hidden, rngs=rngs)
        self.out_proj = nnx.Linear(hidden, self.out_features, rngs=rngs)
        a = jax.random.uniform(rngs.params(), (hidden,), jnp.float32, min_decay, max_decay)
        self.decay = nnx.Param(_inverse_softplus(-jnp.log(a) / self.c))

    @property
    def spec(self):
        return StreamSpec(receptive_field=(-float("inf"), 0.0))

    def _init_carry(self, batch_size, dtype):
        return LinearRecurrenceCarry(jnp.zeros((batch_size, self.hidden), jnp.float32))

    def coefficients(self, x: Seq):
        """`(a, b)`, each `[B, T, hidden]` float32; masked frames give `(1, 0)`."""
        dtype = self.dtype or x.dtype
        proj = project(x.values.astype(dtype), self.in_proj.kernel[...], self.in_proj.bias[...])
        gate, u = jnp.split(proj, 2, axis=-1)
        log_a = -self.c * jax.nn.softplus(self.decay[...]) * jax.nn.sigmoid(gate)
        # 1 - a^2 > 0 in exact arithmetic; the floor keeps sqrt's gradient finite when the
        # gate underflows to 0 (a == 1 in float32).
        scale = jnp.sqrt(jnp.maximum(-jnp.expm1(2.0 * log_a), 1e-12))
        keep = x.mask[..., None]
        return jnp.where(keep, jnp.exp(log_a), 1.0), jnp.where(keep, scale * u, 0.0)

    def _run(self, h0, x: Seq):
        dtype = self.dtype or x.dtype
        a, b = self.coefficients(x)
        impl = resolve_impl(self.impl, scan_kernels.SCAN_KERNEL, scan_kernels.SCAN_SUPPORTED)
        if impl == "xla":
            h_all, h_last = linear_scan(a, b, h0)
        else:  # masked frames already have (a, b) = (1, 0): no lengths needed
            h_all, h_last = scan_kernels.linear_scan(a, b, h0, impl=impl)
        y = project(h_all.astype(dtype), self.out_proj.kernel[...], self.out_proj.bias[...])
        return LinearRecurrenceCarry(h_last), Seq(y.astype(dtype), x.mask, x.compact).masked()

    def _forward(self, x: Seq) -> Seq:
        return self._run(self._init_carry(x.batch_size, None).h, x)[1]

    def _step(self, carry, x: Seq):
        return self._run(carry.h, x)
