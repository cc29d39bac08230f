"""`StreamSpec`: the static timing facts of a streaming layer, and how they compose.

Conventions (all in frames):

* `block_size`: every `step` input length T must be a multiple of it.
* `output_ratio`: output frames per input frame (1/2 for a stride-2 conv, 2 for an upsampler).
  After n valid input frames a layer has produced `floor(n * output_ratio) - output_latency`
  valid output frames (never fewer than 0).
* `input_latency`: input frames of look-ahead: output frame j is final once input frame
  `ceil(anchor(j)) + input_latency` has arrived.
* `output_latency`: output frames held back by that look-ahead; `flush` emits them.
* `receptive_field = (past, future)`: output frame j depends only on input frames i with
  `past <= i - anchor(j) <= future`, where `anchor(j) = (j + 1) / output_ratio - 1` is the
  last input frame of output j's block. `past` may be `-inf` (recurrences).

With this anchor the fields of a serial composition are exact sums (see `then`). Output
counts are exact too: `stages` keeps each layer's `(output_ratio, output_latency)` so that
`floor` is applied layer by layer (a stride 2 then an upsample 2 gives 16 frames from 17).
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction


def _as_fraction(x) -> Fraction:
    return x if isinstance(x, Fraction) else Fraction(x)


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    block_size: int = 1
    output_ratio: Fraction = Fraction(1)
    input_latency: int = 0
    output_latency: int = 0
    receptive_field: tuple[float, float] = (0.0, 0.0)
    stages: tuple = ()  # ((output_ratio, output_latency), ...) per layer; filled in if empty

    def __post_init__(self):
        object.__setattr__(self, "output_ratio", _as_fraction(self.output_ratio))
        if not self.stages:
            object.__setattr__(self, "stages", ((self.output_ratio, self.output_latency),))
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {self.block_size!r}")
        if self.output_ratio <= 0:
            raise ValueError(f"output_ratio: expected > 0, got {self.output_ratio}")
        if self.input_latency < 0 or self.output_latency < 0:
            raise ValueError(
                f"latencies: expected >= 0, got input_latency={self.input_latency}, "
                f"output_latency={self.output_latency}")
        past, future = self.receptive_field
        if past > future:
            raise ValueError(f"receptive_field: expected past <= future, got {self.receptive_field}")
        if (self.block_size * self.output_ratio).denominator != 1:
            raise ValueError(
                f"block_size: {self.block_size} input frames must give a whole number of output "
                f"frames at output_ratio {self.output_ratio}")

    # ------------------------------------------------------------------ composition
    def then(self, nxt: "StreamSpec") -> "StreamSpec":
        """The spec of `self` followed by `nxt` (serial composition)."""
        r_a = self.output_ratio
        # Smallest input length m such that m * r_a is a multiple of nxt.block_size.
        need = nxt.block_size * r_a.denominator
        m_b = need // math.gcd(need, r_a.numerator)
        block = math.lcm(self.block_size, m_b)

        carried = self.output_latency * nxt.output_ratio
        if carried.denominator != 1:
            raise ValueError(
                f"output_latency: {self.output_latency} frame(s) of latency before a layer with "
                f"output_ratio {nxt.output_ratio} is not a whole number of its output frames "
                f"({carried}); insert a Delay so the latency is a multiple of the stride")
        look = nxt.input_latency / r_a
        if look.denominator != 1:
            raise ValueError(
                f"input_latency: {nxt.input_latency} frame(s) of look-ahead after a layer with "
                f"output_ratio {r_a} is not a whole number of input frames ({look})")
        past = self.receptive_field[0] + nxt.receptive_field[0] / r_a
        future = self.receptive_field[1] + nxt.receptive_field[1] / r_a
        return StreamSpec(
            block_size=block,
            output_ratio=r_a * nxt.output_ratio,
            input_latency=self.input_latency + int(look),
            output_latency=int(carried) + nxt.output_latency,
            receptive_field=(float(past), float(future)),
            stages=self.stages + nxt.stages,
        )

    def repeat(self, n: int) -> "StreamSpec":
        """The spec of `n` copies in series."""
        if n < 1:
            raise ValueError(f"n: expected >= 1, got {n}")
        out = self
        for _ in range(n - 1):
            out = out.then(self)
        return out

    # ---------------------------------------------------------------------- queries
    def anchor(self, j: int) -> Fraction:
        """The last input frame of output frame j's block (see module docstring)."""
        return Fraction(j + 1) / self.output_ratio - 1

    def outputs_after(self, n: int) -> int:
        """Valid output frames produced after n valid input frames (before flush)."""
        for ratio, latency in self.stages:
            n = max(0, math.floor(n * ratio) - latency)
        return n

    def offline_length(self, n: int) -> int:
        """Valid output frames of the offline call on n valid input frames."""
        for ratio, _ in self.stages:
            n = math.floor(n * ratio)
        return n

    def emitted_at(self, j: int) -> int:
        """The number of valid input frames after which output frame j has been emitted."""
        n = 0
        while self.outputs_after(n) <= j:
            n += 1
        return n


def compose(specs) -> StreamSpec:
    """Serial composition of a non-empty iterable of specs."""
    specs = list(specs)
    if not specs:
        raise ValueError("specs: expected at least one StreamSpec")
    out = specs[0]
    for s in specs[1:]:
        out = out.then(s)
    return out
