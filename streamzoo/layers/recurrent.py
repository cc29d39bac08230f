"""Gated recurrent cells: `LSTM` and `GRU`, run by `lax.scan` over time.

Offline and streaming share one code path: offline is the streaming scan started from a
fresh carry, so the two agree bit for bit up to matmul blocking. The input projections of
all frames are one matmul before the scan; only the recurrent matmul stays inside it. The
carry (hidden and cell states) is float32 whatever the compute dtype, and a frame whose mask
is False leaves it untouched, so every row advances by its own count of valid frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from streamzoo.core.checks import check_float_dtype, check_positive_int
from streamzoo.core.seq import Seq
from streamzoo.core.spec import StreamSpec
from streamzoo.core.streamer import StreamLayer


@struct.dataclass
class LSTMCarry:
    h: jax.Array  # [B, hidden] float32 hidden state
    c: jax.Array  # [B, hidden] float32 cell state


@struct.dataclass
class GRUCarry:
    h: jax.Array  # [B, hidden] float32 hidden state


# Shared argument checks (kept under these names for the layers that import them from here).
check_features = check_positive_int
check_dtype = check_float_dtype


def project(values, kernel, bias=None):
    """`values @ kernel + bias` in the dtype of `values`, accumulated and returned in float32."""
    y = jnp.matmul(values, kernel.astype(values.dtype), preferred_element_type=jnp.float32)
    return y if bias is None else y + bias.astype(jnp.float32)


def time_major(a):
    return jnp.swapaxes(a, 0, 1)


class _Recurrent(StreamLayer):
    """Shared parts: parameters of the input and recurrent projections, the scan driver."""

    num_gates: int

    def __init__(self, in_features: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        self.in_features = check_features("in_features", in_features)
        self.hidden = self.out_features = check_features("hidden", hidden)
        self.dtype = check_dtype(dtype)
        width = self.num_gates * hidden
        self.input_proj = nnx.Linear(in_features, width, rngs=rngs)
        init = nnx.initializers.orthogonal()
        self.recurrent_kernel = nnx.Param(init(rngs.params(), (hidden, width), jnp.float32))

    @property
    def spec(self):
        return StreamSpec(receptive_field=(-float("inf"), 0.0))

    def _cell(self, state, xp, dtype):
        """One time step for all rows: `(state, xp [B, G*H] float32) -> (new_state, h)`."""
        raise NotImplementedError

    def _scan(self, state, x: Seq):
        """Run the cell over the chunk; masked frames keep the state and output zeros."""
        dtype = self.dtype or x.dtype
        xp = project(x.values.astype(dtype), self.input_proj.kernel[...], self.input_proj.bias[...])

        def body(state, inputs):
            xp_t, m_t = inputs
            new, h = self._cell(state, xp_t, dtype)
            keep = m_t[:, None]
            state = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, state)
            return state, jnp.where(keep, h, 0.0).astype(dtype)

        state, ys = jax.lax.scan(body, state, (time_major(xp), time_major(x.mask)))
        return state, Seq(time_major(ys), x.mask, compact=x.compact)

    def _forward(self, x: Seq) -> Seq:
        return self._scan(self._init_carry(x.batch_size, None), x)[1]

    def _step(self, carry, x: Seq):
        return self._scan(carry, x)


class LSTM(_Recurrent):
    """Long short-term memory: gates i, f, g, o; forget-gate bias initialised to 1.

    `c' = f * c + i * g`, `h' = o * tanh(c')`; the output is h in the compute dtype.
    """

    num_gates = 4

    def __init__(self, in_features: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, dtype=dtype, rngs=rngs)
        bias = self.input_proj.bias[...]
        self.input_proj.bias[...] = bias.at[hidden:2 * hidden].set(1.0)

    def _init_carry(self, batch_size, dtype):
        zeros = lambda: jnp.zeros((batch_size, self.hidden), jnp.float32)
        return LSTMCarry(zeros(), zeros())

    def _cell(self, state, xp, dtype):
        gates = xp + project(state.h.astype(dtype), self.recurrent_kernel[...])
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f) * state.c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return LSTMCarry(h, c), h


class GRU(_Recurrent):
    """Gated recurrent unit (reset gate applied after the recurrent matmul, as in cuDNN):

    `r, z = sigmoid(x W_r,z + h U_r,z + b)`, `n = tanh(x W_n + b_n + r * (h U_n + c_n))`,
    `h' = (1 - z) * n + z * h`.
    """

    num_gates = 3

    def __init__(self, in_features: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        super().__init__(in_features, hidden, dtype=dtype, rngs=rngs)
        self.recurrent_bias = nnx.Param(jnp.zeros((3 * hidden,), jnp.float32))

    def _init_carry(self, batch_size, dtype):
        return GRUCarry(jnp.zeros((batch_size, self.hidden), jnp.float32))

    def _cell(self, state, xp, dtype):
        hp = project(state.h.astype(dtype), self.recurrent_kernel[...], self.recurrent_bias[...])
        xr, xz, xn = jnp.split(xp, 3, axis=-1)
        hr, hz, hn = jnp.split(hp, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * state.h
        return GRUCarry(h), h
