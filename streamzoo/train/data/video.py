"""Moving-digits video from scikit-learn's `load_digits` (1797 real 8x8 handwritten digits).

Each clip has 1-2 digits, upscaled (bilinear) to `digit_size` pixels, bouncing off the walls
of a `frame_size` square at constant speed; overlapping digits combine by `max`. Clip i of a
`MovingDigits(seed=s)` is a pure function of (s, split, i), so the dataset is random-access,
as long as you like, and identical on every machine. The digit images are split once into
train/test (80/20, fixed), so test clips show handwriting never seen in training.

Frames are float32 in [0, 1], `[T, H, W, 1]` per clip (`[N, T, H, W, 1]` from `moving_digits`),
with the digit classes, their centres per frame and the number of digits shown.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "test")
_TEST_FRACTION = 0.2
_SPLIT_SEED = 20240601  # fixed: the image split must not move with the clip seed


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - dev extra
        raise ImportError("moving digits need scikit-learn: pip install scikit-learn") from err
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int32)


@functools.lru_cache(maxsize=4)
def _digit_bank(digit_size: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """`(images [M, S, S] float32 in [0, 1], labels [M] int32)` of one split."""
    from scipy import ndimage

    images, labels = _load_digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    n_test = round(len(images) * _TEST_FRACTION)
    keep = np.sort(order[:n_test] if split == "test" else order[n_test:])
    scale = digit_size / images.shape[-1]
    big = ndimage.zoom(images[keep], (1.0, scale, scale), order=1, grid_mode=True,
                       mode="nearest")
    return np.clip(big, 0.0, 1.0).astype(np.float32), labels[keep]


class MovingDigits(Sequence):
    """Random-access moving-digits clips: item i is a dict of numpy arrays

    * `frames [T, H, W, 1]` float32 in [0, 1]
    * `labels [K]` int32 digit classes, -1 for absent digits (K = max digits)
    * `positions [T, K, 2]` float32 (row, col) centres in pixels, 0 for absent digits
    * `num_digits` int32 scalar
    """

    def __init__(self, num_examples: int, *, num_frames: int = 20, frame_size: int = 64,
                 digit_size: int = 24, num_digits: tuple[int, int] = (1, 2),
                 speed: tuple[float, float] = (1.0, 3.0), split: str = "train", seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
        if num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
        if not 1 <= digit_size <= frame_size:
            raise ValueError(f"digit_size: expected 1 <= digit_size <= frame_size={frame_size}, "
                             f"got {digit_size}")
        lo, hi = num_digits
        if not 1 <= lo <= hi:
            raise ValueError(f"num_digits: expected (min, max) with 1 <= min <= max, "
                             f"got {num_digits}")
        if not 0 <= speed[0] <= speed[1]:
            raise ValueError(f"speed: expected (min, max) pixels/frame with 0 <= min <= max, "
                             f"got {speed}")
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        self.num_examples = num_examples
        self.num_frames = num_frames
        self.frame_size = frame_size
        self.digit_size = digit_size
        self.num_digits = (lo, hi)
        self.speed = (float(speed[0]), float(speed[1]))
        self.split = split
        self.seed = seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        T, H = self.num_frames, self.frame_size
        frames = np.zeros((T, H, H, 1), np.float32)
        return {"frames": frames, **self._render(index, frames)}

    def _render(self, index: int, frames: np.ndarray) -> dict[str, np.ndarray]:
        """Draw clip `index` into the zeroed `frames [T, H, W, 1]`; return its other fields."""
        index = int(index)
        if not -self.num_examples <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} clips")
        index %= self.num_examples
        images, classes = _digit_bank(self.digit_size, self.split)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        T, H, S = self.num_frames, self.frame_size, self.digit_size
        K = self.num_digits[1]
        k = int(rng.integers(self.num_digits[0], K + 1))
        pick = rng.integers(0, len(images), size=k)
        room = float(H - S)  # top-left corners live in [0, room]
        pos = rng.uniform(0.0, room, size=(k, 2))
        angle = rng.uniform(0.0, 2 * np.pi, size=k)
        speed = rng.uniform(*self.speed, size=k)
        vel = np.stack([np.sin(angle), np.cos(angle)], -1) * speed[:, None]

        positions = np.zeros((T, K, 2), np.float32)
        for t in range(T):
            corner = np.rint(pos).astype(np.int64)
            for d in range(k):
                r, c = corner[d]
                view = frames[t, r:r + S, c:c + S, 0]
                np.maximum(view, images[pick[d]], out=view)
            positions[t, :k] = corner + (S - 1) / 2.0
            pos, vel = _bounce(pos + vel, vel, room)
        labels = np.full((K,), -1, np.int32)
        labels[:k] = classes[pick]
        return {"labels": labels, "positions": positions, "num_digits": np.int32(k)}

    def __iter__(self):
        return (self[i] for i in range(self.num_examples))


def _bounce(pos: np.ndarray, vel: np.ndarray, room: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect positions that left [0, room] back inside and flip those velocity components."""
    if room == 0.0:
        return np.zeros_like(pos), vel
    low, high = pos < 0.0, pos > room
    pos = np.where(low, -pos, np.where(high, 2 * room - pos, pos))
    vel = np.where(low | high, -vel, vel)
    return np.clip(pos, 0.0, room), vel


def moving_digits(num_examples: int, **kwargs) -> dict[str, np.ndarray]:
    """All clips of `MovingDigits(num_examples, **kwargs)` stacked: `frames [N, T, H, W, 1]`
    float32, `labels [N, K]` int32, `positions [N, T, K, 2]` float32, `num_digits [N]` int32."""
    clips = MovingDigits(num_examples, **kwargs)
    T, H, K = clips.num_frames, clips.frame_size, clips.num_digits[1]
    out = {"frames": np.zeros((num_examples, T, H, H, 1), np.float32),
           "labels": np.empty((num_examples, K), np.int32),
           "positions": np.empty((num_examples, T, K, 2), np.float32),
           "num_digits": np.empty((num_examples,), np.int32)}
    for i in range(num_examples):
        for key, value in clips._render(i, out["frames"][i]).items():
            out[key][i] = value
    return out
