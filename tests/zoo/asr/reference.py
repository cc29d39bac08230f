"""A float64 NumPy reference of the chunked Conformer stack, written chunk by chunk from the
semantics in `streamzoo/zoo/asr/conformer.py` (no shared code with the blocked JAX version):
chunk c's frames and its R look-ahead states attend to the `left` committed frames before the
chunk, the chunk and the look-ahead states; look-ahead states are recomputed per chunk and
never become context of a later chunk; the depthwise conv is causal over committed frames
(a look-ahead state's conv continues its chunk's committed frames)."""

from __future__ import annotations

import jax
import numpy as np


def _np(a):
    return np.asarray(a[...], np.float64)


def _layer_norm(p, x, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * _np(p.scale) + _np(p.bias)


def _linear(p, x):
    y = x @ _np(p.kernel)
    return y + _np(p.bias) if p.bias is not None else y


def _silu(x):
    return x / (1 + np.exp(-x))


def _ffn(p, x):
    return _linear(p.down, _silu(_linear(p.up, x)))


def _rope(x, pos, base=10000.0):
    """x [T, H, Dh] rotated by positions [T] (rotate-half layout)."""
    dh = x.shape[-1]
    inv = base ** (-np.arange(0, dh, 2) / dh)
    ang = pos[:, None, None] * inv
    x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def _attention(p, q_in, q_pos, k_in, k_pos, heads):
    """Queries q_in [Q, D] over keys k_in [W, D], RoPE at the given window positions."""
    d = q_in.shape[-1]
    dh = d // heads
    w = _np(p.qkv.kernel)
    b = _np(p.qkv.bias)
    q = (q_in @ w[:, :d] + b[:d]).reshape(-1, heads, dh)
    k = (k_in @ w[:, d:2 * d] + b[d:2 * d]).reshape(-1, heads, dh)
    v = (k_in @ w[:, 2 * d:] + b[2 * d:]).reshape(-1, heads, dh)
    q, k = _rope(q, q_pos), _rope(k, k_pos)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", s, v).reshape(-1, d)
    return _linear(p.out, o)


def _depthwise(p, seq, t):
    """Causal depthwise conv output at index t of seq [T, D] (zeros before index 0)."""
    kernel = _np(p.kernel)[:, 0, :]  # [K, D]
    k = kernel.shape[0]
    out = _np(p.bias).copy()
    for tap in range(k):
        i = t - (k - 1 - tap)
        if i >= 0:
            out += kernel[tap] * seq[i]
    return out


def stack_reference(stack, latency, x: np.ndarray) -> np.ndarray:
    """The stack's output for ONE row `x [n, D]` at `latency`, float64."""
    x = np.asarray(x, np.float64)
    n, d = x.shape
    c, left, r = latency.chunk, latency.left, latency.lookahead
    layers = [jax.tree.map(lambda a, i=i: a[i], stack.layers) for i in range(stack.num_layers)]
    heads = stack.num_heads
    H = [x] + [np.zeros((n, d)) for _ in layers]  # committed inputs of each layer
    G = [np.zeros((n, d)) for _ in layers]  # committed GLU outputs (conv inputs) per layer
    for chunk in range(-(-n // c)):
        start, end = chunk * c, min((chunk + 1) * c, n)
        look = [p for p in range(chunk * c + c, chunk * c + c + r) if p < n]
        a = x[look]
        for li, p in enumerate(layers):
            lo = max(0, start - left)
            ctx = H[li][lo:end]  # left context + the chunk, committed inputs
            u_ctx = ctx + 0.5 * _ffn(p.ffn1, _layer_norm(p.ffn1_norm, ctx))
            u_a = a + 0.5 * _ffn(p.ffn1, _layer_norm(p.ffn1_norm, a)) if len(look) else a
            keys = np.concatenate([u_ctx, u_a])
            queries = np.concatenate([u_ctx[start - lo:], u_a])
            # RoPE positions within the window, which starts `left` frames before the chunk;
            # look-ahead state i sits at left + C + i.
            la_pos = left + c + np.arange(len(look))
            k_pos = np.concatenate([np.arange(lo, end) - start + left, la_pos])
            q_pos = np.concatenate([np.arange(start, end) - start + left, la_pos])
            att = _attention(p.attn, _layer_norm(p.attn_norm, queries), q_pos,
                             _layer_norm(p.attn_norm, keys), k_pos, heads)
            u2 = queries + att
            g = _linear(p.pointwise_in, _layer_norm(p.conv_norm, u2))
            g = g[:, :d] * (1 / (1 + np.exp(-g[:, d:])))
            m = end - start
            G[li][start:end] = g[:m]
            seq = np.concatenate([G[li][:end], g[m:]])
            conv = np.stack([_depthwise(p.depthwise, seq, t)
                             for t in list(range(start, end)) + list(range(end, end + len(look)))])
            conv = _silu(_layer_norm(p.depthwise_norm, conv))
            u3 = u2 + _linear(p.pointwise_out, conv)
            u4 = u3 + 0.5 * _ffn(p.ffn2, _layer_norm(p.ffn2_norm, u3))
            out = _layer_norm(p.out_norm, u4)
            H[li + 1][start:end] = out[:m]
            a = out[m:]
    return H[-1]
