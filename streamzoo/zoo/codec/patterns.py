"""Codebook interleaving patterns: how a grid of codes (T frames x K codebooks) becomes the
token sequence of a language model, and back.

A pattern places code (frame t, level k) in cell (step s, slot w) of a `[S, W]` layout; an
LM predicts one step (W tokens in parallel) at a time. Patterns here:

* `flat`: `s = t*K + k`, `W = 1`. Every token sees all earlier ones (best quality, K*T steps).
* `delay` (MusicGen): `s = t + delays[k]`, `w = k` (default delays `0..K-1`): level k of
  frame t is predicted together with lower levels of later frames; T + max(delay) steps.
  Moshi-style acoustic delays (e.g. `(0, 1, 1, 1)`) are the same pattern with other delays.
* `stack_delay` (Le Lan et al. 2023, "Stack-and-Delay"): each frame's token stack is built
  level by level over K consecutive steps (`s = pos(t) + k`, `w = k`), stacks of successive
  frames in the decoding order overlap with a delay of one step (K tokens per step, close to
  the delay pattern's speed), and frames are started in a permuted order so that the frames
  decoded together are `spacing` frames apart in time: within each block of `K * spacing`
  frames the order is `r, r + spacing, r + 2*spacing, ...` for `r = 0 .. spacing - 1`.
  `spacing=1` is the delay pattern. (Our reading of the paper's layout: the stacked *input*
  embedding of each step is the LM's business; the layout records which code goes where and,
  in `layout()[0]`, each cell's frame index, i.e. its time position.)

Every pattern is a bijection between the grid and its non-empty cells, so
`deinterleave(interleave(codes)) == codes` exactly, per row, for ragged rows too. Empty cells
and cells of frames beyond a row's length hold `pad_id`, which must not be a code value.
"""

from __future__ import annotations

import dataclasses
import numbers

import jax.numpy as jnp
import numpy as np

from streamzoo.core.seq import Seq

KINDS = ("flat", "delay", "stack_delay")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class CodebookPattern:
    """One interleaving pattern for `num_codebooks` codebooks (see the module docstring).
    Build with `CodebookPattern.flat(K)`, `.delay(K, delays=None)` or `.stack_delay(K, spacing)`."""

    kind: str
    num_codebooks: int
    delays: tuple = ()
    spacing: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        k = _check_int("num_codebooks", self.num_codebooks, 1)
        _check_int("spacing", self.spacing, 1)
        delays = tuple(self.delays)
        if self.kind == "flat":
            delays = ()
        elif not delays:
            delays = tuple(range(k))
        if self.kind != "flat":
            if len(delays) != k or any(isinstance(d, bool) or not isinstance(d, numbers.Integral)
                                       or d < 0 for d in delays):
                raise ValueError(f"delays: expected {k} non-negative ints, got {self.delays!r}")
            if list(delays) != sorted(delays):
                raise ValueError(f"delays: expected non-decreasing delays (a level is never "
                                 f"predicted before the levels below it), got {delays}")
        object.__setattr__(self, "delays", tuple(int(d) for d in delays))

    @classmethod
    def flat(cls, num_codebooks: int) -> "CodebookPattern":
        return cls("flat", num_codebooks)

    @classmethod
    def delay(cls, num_codebooks: int, delays=None) -> "CodebookPattern":
        return cls("delay", num_codebooks, tuple(delays or ()))

    @classmethod
    def stack_delay(cls, num_codebooks: int, spacing: int = 2) -> "CodebookPattern":
        return cls("stack_delay", num_codebooks, (), spacing)

    # ------------------------------------------------------------------ geometry (numpy)
    @property
    def width(self) -> int:
        """Tokens per step W."""
        return 1 if self.kind == "flat" else self.num_codebooks

    def frame_positions(self, num_frames: int) -> np.ndarray:
        """`[T]` the decoding position of each frame (a permutation for stack_delay)."""
        t = np.arange(num_frames)
        if self.kind != "stack_delay":
            return t
        block = self.num_codebooks * self.spacing
        start, r = t - t % block, t % block
        # Frame start + r with r = rho + spacing*j sits at position start + rho*K + j.
        return start + (r % self.spacing) * self.num_codebooks + r // self.spacing

    def cells(self, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """`(step [T, K], slot [T, K])`: where each code goes."""
        num_frames = _check_int("num_frames", num_frames, 0)
        k = np.arange(self.num_codebooks)
        if self.kind == "flat":
            step = np.arange(num_frames)[:, None] * self.num_codebooks + k[None, :]
            return step, np.zeros_like(step)
        pos = self.frame_positions(num_frames)
        step = pos[:, None] + np.asarray(self.delays)[None, :]
        return step, np.broadcast_to(k[None, :], step.shape).copy()

    def steps_for(self, num_frames: int) -> np.ndarray:
        """`[num_frames + 1]`: the steps a row of n frames occupies, for n = 0..num_frames."""
        step, _ = self.cells(num_frames)
        last = np.maximum.accumulate(step.max(axis=1)) if num_frames else np.zeros(0, int)
        return np.concatenate([[0], last + 1]).astype(np.int32)

    def num_steps(self, num_frames: int) -> int:
        return int(self.steps_for(num_frames)[-1])

    def layout(self, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """`(frame [S, W], level [S, W])` of each cell, -1 where the cell is empty."""
        step, slot = self.cells(num_frames)
        s = self.num_steps(num_frames)
        frame = np.full((s, self.width), -1, np.int32)
        level = np.full((s, self.width), -1, np.int32)
        t, k = np.meshgrid(np.arange(num_frames), np.arange(self.num_codebooks), indexing="ij")
        if len(set(zip(step.ravel().tolist(), slot.ravel().tolist()))) != step.size:
            raise AssertionError(f"{self}: two codes share a cell")  # impossible by construction
        frame[step, slot], level[step, slot] = t, k
        return frame, level

    # --------------------------------------------------------------------- transforms
    def interleave(self, codes: Seq, pad_id: int) -> Seq:
        """Codes `Seq [B, T, K]` (int) -> tokens `Seq [B, S, W]`: row b occupies the steps its
        `n_b` frames need; empty cells and cells of frames >= n_b hold `pad_id`."""
        codes = self._check_seq(codes, "codes", self.num_codebooks)
        pad_id = _check_pad(pad_id)
        x = codes.compacted()
        frame, level = self.layout(x.length)
        values = x.values[:, np.maximum(frame, 0), np.maximum(level, 0)]  # [B, S, W]
        n = x.lengths()
        filled = (jnp.asarray(frame)[None] >= 0) & (jnp.asarray(frame)[None] < n[:, None, None])
        tokens = jnp.where(filled, values, jnp.asarray(pad_id, values.dtype))
        steps = jnp.asarray(self.steps_for(x.length))[n]
        mask = jnp.arange(frame.shape[0])[None, :] < steps[:, None]
        return Seq(tokens, mask, compact=True)

    def deinterleave(self, tokens: Seq, num_frames: int, pad_id: int) -> Seq:
        """Tokens `Seq [B, S, W]` -> codes `Seq [B, num_frames, K]`. A row's valid frames are
        the longest prefix of frames whose K tokens all sit in valid steps and are not
        `pad_id` (a partly generated sequence gives its complete frames)."""
        tokens = self._check_seq(tokens, "tokens", self.width)
        pad_id = _check_pad(pad_id)
        num_frames = _check_int("num_frames", num_frames, 0)
        need = self.num_steps(num_frames)
        x = tokens.compacted()
        if x.length < need:
            raise ValueError(f"tokens: {num_frames} frames need {need} steps, got T={x.length}")
        step, slot = self.cells(num_frames)
        values = x.values[:, step, slot]  # [B, T, K]
        present = x.mask[:, step] & (values != pad_id)
        mask = jnp.cumprod(present.all(axis=-1), axis=1).astype(bool)
        return Seq(values, mask, compact=True).masked()

    def _check_seq(self, x, name, width) -> Seq:
        if not isinstance(x, Seq):
            raise ValueError(f"{name}: expected a streamzoo.Seq, got {type(x).__name__}")
        if x.values.ndim != 3 or x.values.shape[-1] != width:
            raise ValueError(f"{name}: expected values of shape [B, T, {width}], got "
                             f"{tuple(x.values.shape)}")
        if not jnp.issubdtype(x.values.dtype, jnp.integer):
            raise ValueError(f"{name}: expected integer values, got dtype {x.values.dtype}")
        return x


def _check_pad(pad_id) -> int:
    if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral):
        raise ValueError(f"pad_id: expected an int (not a code value), got {pad_id!r}")
    return int(pad_id)
