"""Streaming perplexity of a `StreamingLM` over one long token stream, per token, under any
KV-cache policy, and the sliding-window-with-recomputation baseline.

* `stream_nll(model, tokens, chunk_size)`: feeds `tokens [B, N]` chunk by chunk (fixed chunk
  size, the last chunk masked at the end) through a jitted `model.step`, so the model sees the
  stream exactly as a server would under its policy (`FullCache`, `SlidingWindow`,
  `SinksWindow`, `PerHead`, ...). Returns the next-token NLL (nats) of every position
  `[B, N - 1]`: entry t is `-log p(tokens[t + 1] | what the cache kept at t)`.
* `recompute_nll(model, tokens, context)`: the baseline of StreamingLLM's Figure 1(c): token t's
  logits come from running the model offline (full causal attention) over the last `context`
  tokens `tokens[t - context + 1 .. t]` with positions restarting at 0, i.e. a fresh prompt per
  token. Windows are batched, so it costs `N * context` token evaluations, not a loop.
  `keep_first=n` keeps the stream's first n tokens at the front of every window (for a model
  trained with a start token: every recomputed prompt starts with it, as in training).
* `offline_nll(model, tokens)`: one offline call (the training path), for reference.

`python -m streamzoo.zoo.lm.perplexity` evaluates the checked-in model (`training.load_pretrained`)
on held-out documents concatenated into streams of `--length` tokens and prints a table of
perplexity per position range for full cache, window only, sinks + window and recomputation
at equal cache budgets (see `main`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from streamzoo.core.seq import Seq
from streamzoo.layers.kv_policies import FullCache, SinksWindow, SlidingWindow


def token_nll(logits, targets) -> jax.Array:
    """Per-token negative log-likelihood (nats) `[..., T]` of `targets` under `logits`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


# ------------------------------------------------------------------------------ checking
def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_tokens(model, tokens) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[1] < 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens: expected int token ids of shape [B, N] with N >= 2, got "
                         f"{arr.dtype}{list(arr.shape)}")
    vocab = model.vocab_size
    if arr.size and (arr.min() < 0 or arr.max() >= vocab):
        raise ValueError(f"tokens: expected ids in [0, {vocab}), got values in "
                         f"[{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


# ------------------------------------------------------------------------------ streaming
@jax.jit
def _chunk_nll(model, carry, x: Seq, targets):
    carry, y = model.step(carry, x)
    return carry, jnp.where(y.mask, token_nll(y.values, targets), 0.0)


def stream_nll(model, tokens, *, chunk_size: int = 64, cache_dtype=None) -> np.ndarray:
    """Per-token NLL `[B, N - 1]` (float32, nats) of streaming `tokens [B, N]` through
    `model.step` in chunks of `chunk_size` under the model's own KV policy."""
    tokens = _check_tokens(model, tokens)
    _check_positive_int("chunk_size", chunk_size)
    batch, n = tokens.shape
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    total = -(-(n - 1) // chunk_size) * chunk_size
    pad = ((0, 0), (0, total - (n - 1)))
    inputs, targets = np.pad(inputs, pad), np.pad(targets, pad)
    lengths = np.full((batch,), n - 1)
    carry = model.init_carry(batch, cache_dtype)
    out = []
    for start in range(0, total, chunk_size):
        chunk_lengths = np.clip(lengths - start, 0, chunk_size).astype(np.int32)
        x = Seq.from_lengths(jnp.asarray(inputs[:, start:start + chunk_size]), chunk_lengths)
        carry, nll = _chunk_nll(model, carry, x, jnp.asarray(targets[:, start:start + chunk_size]))
        out.append(nll)
    return np.asarray(jnp.concatenate(out, axis=1))[:, :n - 1]


@jax.jit
def _offline_nll(model, x: Seq, targets):
    y = model(x)
    return jnp.where(y.mask, token_nll(y.values, targets), 0.0)


def offline_nll(model, tokens) -> np.ndarray:
    """Per-token NLL `[B, N - 1]` from one offline (teacher-forced) call of `model`."""
    tokens = _check_tokens(model, tokens)
    return np.asarray(_offline_nll(model, Seq.full(jnp.asarray(tokens[:, :-1])),
                                   jnp.asarray(tokens[:, 1:])))


# -------------------------------------------------------------------------- recomputation
@jax.jit
def _window_nll(model, windows, lengths, targets):
    h = model.hidden(Seq.from_lengths(windows, lengths)).values
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    return token_nll(model.logits_from_hidden(last), targets)


def recompute_nll(model, tokens, context: int, *, keep_first: int = 0,
                  batch_windows: int = 128) -> np.ndarray:
    """Per-token NLL `[B, N - 1]` of sliding-window recomputation: position t is predicted by
    an offline, full-causal run of `model` over `tokens[b, max(0, t - context + 1) .. t]` at
    positions `0 .. len - 1` (the model's own policy is replaced by `FullCache(context)`).
    With `keep_first = n`, once `t >= context` the window is the first n tokens followed by
    the last `context - n`. `batch_windows` windows go through one jitted call."""
    from streamzoo.zoo.lm.model import with_policy

    tokens = _check_tokens(model, tokens)
    _check_positive_int("context", context)
    _check_positive_int("batch_windows", batch_windows)
    if isinstance(keep_first, bool) or not isinstance(keep_first, (int, np.integer)) \
            or not 0 <= keep_first < context:
        raise ValueError(f"keep_first: expected an int in [0, context={context}), got "
                         f"{keep_first!r}")
    full = with_policy(model, FullCache(context))
    batch, n = tokens.shape
    t = np.arange(n - 1)[:, None]
    width = min(context, n - 1)
    j = np.arange(width)[None]
    lengths = np.minimum(t[:, 0] + 1, context).astype(np.int32)
    late = (t >= context) & (j >= keep_first)
    idx = np.minimum(np.where(late, t - context + 1 + j, j), n - 1)
    windows = tokens[:, idx].reshape(batch * (n - 1), width)          # row-major: (b, t)
    lengths = np.tile(lengths, batch)
    targets = tokens[:, 1:].reshape(-1)
    count = len(windows)
    padded = -(-count // batch_windows) * batch_windows
    windows = np.pad(windows, ((0, padded - count), (0, 0)))
    lengths = np.pad(lengths, (0, padded - count), constant_values=1)
    targets = np.pad(targets, (0, padded - count))
    out = [_window_nll(full, jnp.asarray(windows[i:i + batch_windows]),
                       jnp.asarray(lengths[i:i + batch_windows]),
                       jnp.asarray(targets[i:i + batch_windows]))
           for i in range(0, padded, batch_windows)]
    return np.asarray(jnp.concatenate(out))[:count].reshape(batch, n - 1)


# ---------------------------------------------------------------------------- reporting
def bucket_edges(length: int, context: int) -> list[int]:
    """Position ranges for a table: `0, C/2, C, 2C, 4C, ...` up to `length`."""
    edges = [0, max(1, context // 2), context]
    while edges[-1] < length:
        edges.append(edges[-1] * 2)
    edges = sorted({min(e, length) for e in edges})
    return edges


def bucket_perplexity(nll: np.ndarray, edges) -> list[float]:
    """`exp(mean NLL)` over all rows for each position range `[edges[i], edges[i + 1])`."""
    nll = np.asarray(nll, np.float64)
    return [float(np.exp(nll[:, a:b].mean())) for a, b in zip(edges[:-1], edges[1:])]


def heldout_streams(tokens: np.ndarray, rows: int, length: int,
                    start_token: int | None = None) -> np.ndarray:
    """`rows` consecutive, disjoint segments of `length` tokens from the start of `tokens`
    (held-out documents joined with EOS, so each stream spans several documents). With
    `start_token`, each stream is that token followed by `length - 1` text tokens."""
    _check_positive_int("rows", rows)
    _check_positive_int("length", length)
    text = length - (start_token is not None)
    if rows * text > len(tokens) or text < 1:
        raise ValueError(f"rows: expected rows * length <= the {len(tokens)} held-out tokens, "
                         f"got {rows} * {length}")
    streams = np.asarray(tokens[:rows * text], np.int32).reshape(rows, text)
    if start_token is not None:
        streams = np.concatenate([np.full((rows, 1), start_token, np.int32), streams], axis=1)
    return streams


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "nproc": os.cpu_count(), "cpu": cpu}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def evaluate(model, streams: np.ndarray, *, budgets, sink_counts=(4,), recompute_keep=(0,),
             chunk_size: int = 64, log=print) -> dict:
    """The perplexity-table results: `{method: {"policy", "kept", "nll" [B, N-1], "seconds"}}`
    for the full cache over the whole stream and, per cache budget K: window only
    (`SlidingWindow(K)`), sinks + window (`SinksWindow(s, K - s)` at cache positions, for each
    s in `sink_counts`), the same at absolute positions (largest s), and recomputation over
    `K + 1` tokens (keeping the first n tokens, for each n in `recompute_keep`). Every method
    but the full cache lets a query see at most `K + 1` tokens (itself included)."""
    from streamzoo.zoo.lm.model import with_policy

    n = streams.shape[1]
    methods = {f"full cache (max {n})": ("stream", FullCache(n), n)}
    for k in budgets:
        if k <= max(sink_counts):
            raise ValueError(f"budgets: expected cache budgets > the sinks {max(sink_counts)}, "
                             f"got {k}")
        methods[f"window only, K={k}"] = ("stream", SlidingWindow(k), k + 1)
        for s in sink_counts:
            methods[f"sinks + window ({s} sink{'s' * (s != 1)}), K={k}"] = (
                "stream", SinksWindow(s, k - s), k + 1)
        s = max(sink_counts)
        methods[f"sinks + window ({s} sinks, absolute positions), K={k}"] = (
            "stream", SinksWindow(s, k - s, positions="absolute"), k + 1)
        for keep in recompute_keep:
            name = f"recompute, K={k}" + (f", keeping the first {keep}" if keep else "")
            methods[name] = ("recompute", (k + 1, keep), k + 1)
    out = {}
    for name, (kind, arg, kept) in methods.items():
        t0 = time.perf_counter()
        if kind == "stream":
            nll = stream_nll(with_policy(model, arg), streams, chunk_size=chunk_size)
            policy = repr(arg)
        else:
            nll = recompute_nll(model, streams, arg[0], keep_first=arg[1])
            policy = (f"offline FullCache over the last {arg[0]} tokens, positions from 0"
                      + (f", the stream's first {arg[1]} kept in front" if arg[1] else ""))
        seconds = time.perf_counter() - t0
        out[name] = {"policy": policy, "kept": kept, "nll": nll, "seconds": round(seconds, 1)}
        log(f"{name}: ppl {math.exp(float(nll.mean())):.3f} ({seconds:.1f} s)")
    return out


def markdown_table(results: dict, edges) -> str:
    head = ["method", "tokens seen per query", "PPL all", "bits/byte all"] + [
        f"PPL [{a}, {b})" for a, b in zip(edges[:-1], edges[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        nll = np.asarray(r["nll"], np.float64)
        row = [name, str(r["kept"]), f"{math.exp(nll.mean()):.3f}",
               f"{nll.mean() / math.log(2):.3f}"] + [f"{p:.3f}" for p in
                                                    bucket_perplexity(nll, edges)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Perplexity table of the checked-in LM on held-out text (see the module docstring)."""
    from streamzoo.zoo.lm import training

    parser = argparse.ArgumentParser(prog="python -m streamzoo.zoo.lm.perplexity",
                                     description=main.__doc__)
    parser.add_argument("--name", default=training.PRETRAINED, help="checked-in weights name")
    parser.add_argument("--weights-dir", default=training.WEIGHTS_DIR)
    parser.add_argument("--rows", type=int, default=4, help="held-out streams (batch rows)")
    parser.add_argument("--length", type=int, default=None,
                        help="tokens per stream (default 16 x the training context)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="cache budgets K (default: C/2 and C-1 for training context C)")
    parser.add_argument("--sinks", type=int, nargs="+", default=None,
                        help="sink counts (default 4; 1 and 4 for a start-token model)")
    parser.add_argument("--recompute-keep", type=int, nargs="+", default=None,
                        help="first tokens kept by recomputation (default 0; 0 and 1 for a "
                             "start-token model)")
    parser.add_argument("--chunk", type=int, default=64, help="streaming chunk size")
    parser.add_argument("--out", default=None, help="JSON path for the results")
    args = parser.parse_args(argv)
    info = training.pretrained_info(args.name, args.weights_dir)
    context = info["context"]
    length = args.length or 16 * context
    budgets = args.budgets or [context // 2, context - 1]
    start = info.get("start_token")
    sinks = args.sinks or ([1, 4] if start is not None else [4])
    keep = args.recompute_keep or ([0, 1] if start is not None else [0])
    corpus_info = info["corpus"]
    corpus = training.text_corpus(corpus_info["source"], corpus_info["heldout_fraction"],
                                  corpus_info["split_seed"])
    streams = heldout_streams(corpus.heldout_tokens, args.rows, length, start)
    model = training.load_pretrained(name=args.name, directory=args.weights_dir)
    started = datetime.datetime.now().astimezone()
    load_before = _load()
    print(f"{args.name}: context {context}, start token {start}, {args.rows} held-out streams "
          f"x {length} tokens, budgets {budgets}, sinks {sinks}, recompute keeping {keep}, "
          f"chunk {args.chunk}; load {load_before}", flush=True)
    results = evaluate(model, streams, budgets=budgets, sink_counts=sinks, recompute_keep=keep,
                       chunk_size=args.chunk, log=lambda s: print(s, flush=True))
    edges = bucket_edges(length - 1, context)
    table = markdown_table(results, edges)
    print(table)
    if args.out:
        record = {
            "date": started.isoformat(timespec="seconds"), "machine": _machine(),
            "load_before": load_before, "load_after": _load(),
            "command": "python -m streamzoo.zoo.lm.perplexity " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "weights": {"name": args.name, "npz_sha256": info["npz_sha256"],
                        "context": context, "architecture": info["architecture"]},
            "streams": {"rows": args.rows, "length": length,
                        "source": corpus_info["source"],
                        "start_token": start,
                        "documents": "held-out documents in name order, joined with EOS; row r = "
                                     "[start token, if any] + the next length (- 1) tokens"},
            "edges": edges, "table": table,
            "results": {k: {**{kk: vv for kk, vv in v.items() if kk != "nll"},
                            "ppl": math.exp(float(np.mean(v["nll"]))),
                            "ppl_buckets": bucket_perplexity(v["nll"], edges),
                            "mean_nll_per_position_nats": np.round(
                                np.asarray(v["nll"]).mean(0), 4).tolist()}
                        for k, v in results.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.out}")
    return 0


__all__ = ["bucket_edges", "bucket_perplexity", "evaluate", "heldout_streams", "markdown_table",
           "offline_nll", "recompute_nll", "stream_nll", "token_nll"]


if __name__ == "__main__":
    sys.exit(main())
