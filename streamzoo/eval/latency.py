"""Per-chunk latency of a streaming model, with the stream-vs-offline check alongside.

`measure_stream(model, x, chunk_size)` compiles `model.step` once ahead of time for chunks of
`chunk_size` frames (the input is padded with invalid frames to a whole number of chunks, so
every call has the same shape), then runs the chunks one by one from a fresh carry, blocking
on each result: the per-chunk wall time is what a caller of a jitted step function sees,
dispatch included. The streamed outputs plus `flush` are compared with the offline call.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from streamzoo.core.drivers import carry_nbytes, jit_step, jitted_apply, jitted_flush
from streamzoo.core.packed import pack_carry
from streamzoo.core.seq import Seq


@dataclasses.dataclass(frozen=True)
class LatencyReport:
    """One streaming run at one chunk size."""

    chunk_size: int              # input frames per step call
    num_chunks: int              # step calls timed
    compile_ms: float            # trace + lower + compile of the step function
    chunk_ms: np.ndarray         # [num_chunks] wall time of each step call
    carry_bytes: int             # bytes held by the carry (constant across steps)
    max_deviation: float         # max |stream - offline| over all valid output frames
    frame_ms: float | None = None  # duration of one input frame, for the real-time factor

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.chunk_ms, 50))

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.chunk_ms, 90))

    @property
    def real_time_factor(self) -> float | None:
        """Median compute time per chunk over the chunk's duration (< 1: faster than real time)."""
        if self.frame_ms is None:
            return None
        return self.p50_ms / (self.chunk_size * self.frame_ms)


_flush, _call = jitted_flush, jitted_apply  # shared with the harness and drivers


def offline(model, x: Seq) -> Seq:
    """The offline (whole-sequence) output under `jax.jit`."""
    return _call(model, x)


def max_deviation(streamed: Seq, reference: Seq) -> float:
    """Max abs difference between the valid frames of two outputs, row by row.

    Raises a ValueError when a row has a different number of valid frames in the two.
    """
    worst = 0.0
    for b, (s, r) in enumerate(zip(streamed.rows(), reference.rows())):
        if s.shape != r.shape:
            raise ValueError(
                f"streamed: row {b} has {s.shape[0]} valid output frames, "
                f"expected {r.shape[0]} (the offline output)")
        if s.size:
            worst = max(worst, float(np.max(np.abs(s.astype(np.float64) - r.astype(np.float64)))))
    return worst


def measure_stream(model, x: Seq, chunk_size: int, *, reference: Seq | None = None,
                   frame_ms: float | None = None, progress: bool = True) -> LatencyReport:
    """Stream `x` through `model` in chunks of `chunk_size` frames and time every chunk.

    `chunk_size` must be a multiple of `model.spec.block_size`. `reference` is the offline
    output (computed here when not given). `frame_ms` is one input frame's duration.
    """
    block = model.spec.block_size
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size % block:
        raise ValueError(
            f"chunk_size: expected a positive multiple of block_size={block}, got {chunk_size!r}")
    if reference is None:
        reference = offline(model, x)
    padded = x.pad_to_multiple(chunk_size)
    num_chunks = padded.length // chunk_size
    chunks = [padded.time_slice(i * chunk_size, (i + 1) * chunk_size) for i in range(num_chunks)]

    # Packed: a few buffers cross each call instead of one array per layer buffer.
    carry = pack_carry(model.init_carry(x.batch_size, x.dtype))
    start = time.perf_counter()
    step = jit_step(model).compile(carry, chunks[0])
    compile_ms = (time.perf_counter() - start) * 1e3

    outputs, times = [], np.empty(num_chunks)
    for i, chunk in enumerate(tqdm(chunks, desc=f"chunk={chunk_size}", leave=False,
                                   disable=None if progress else True)):
        start = time.perf_counter()
        carry, y = step(carry, chunk)
        jax.block_until_ready((carry, y))
        times[i] = (time.perf_counter() - start) * 1e3
        outputs.append(y)
    nbytes = carry_nbytes(carry)
    carry, tail = _flush(model, carry)
    outputs.append(tail)
    streamed = Seq.concatenate(outputs)
    return LatencyReport(chunk_size=chunk_size, num_chunks=num_chunks, compile_ms=compile_ms,
                         chunk_ms=times, carry_bytes=nbytes,
                         max_deviation=max_deviation(streamed, reference), frame_ms=frame_ms)


def format_table(reports, *, title: str | None = None) -> str:
    """A plain-text table, one line per chunk size."""
    head = ("chunk frames", "chunk ms", "p50 ms", "p90 ms", "RTF", "compile ms", "carry bytes",
            "max |stream-offline|")
    rows = []
    for r in reports:
        rtf = r.real_time_factor
        rows.append((str(r.chunk_size),
                     "-" if r.frame_ms is None else f"{r.chunk_size * r.frame_ms:g}",
                     f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}",
                     "-" if rtf is None else f"{rtf:.4f}",
                     f"{r.compile_ms:.0f}", f"{r.carry_bytes:,}", f"{r.max_deviation:.2e}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [title] if title else []
    out += [line(head), line(["-" * w for w in widths])] + [line(row) for row in rows]
    return "\n".join(out)
