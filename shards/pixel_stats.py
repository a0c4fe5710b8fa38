"""Pixel histograms (numba loops) for the dataset's mean/std and for 16-bit windowing."""

from __future__ import annotations

import math

import numpy as np

from cxrfast.shards.jit import jit


@jit
def histogram(img: np.ndarray, hist: np.ndarray) -> None:
    """Add the pixel counts of a 2-D uint8 or uint16 image into `hist` (int64[256] or [65536]),
    in place. numba compiles one specialisation per pixel dtype."""
    h, w = img.shape
    for y in range(h):
        for x in range(w):
            hist[img[y, x]] += 1


@jit
def percentile_bounds(hist: np.ndarray, lo_pct: float, hi_pct: float) -> tuple[int, int]:
    """Smallest values v_lo, v_hi whose cumulative share reaches lo_pct / hi_pct percent."""
    total = 0
    for i in range(hist.shape[0]):
        total += hist[i]
    lo_target = total * lo_pct / 100.0
    hi_target = total * hi_pct / 100.0
    lo = -1
    hi = -1
    cum = 0
    for i in range(hist.shape[0]):
        cum += hist[i]
        if lo < 0 and cum > 0 and cum >= lo_target:
            lo = i
        if hi < 0 and cum > 0 and cum >= hi_target:
            hi = i
            break
    if hi < 0:
        hi = hist.shape[0] - 1
    if lo < 0:
        lo = 0
    return lo, hi


@jit
def window_u16_to_u8(img: np.ndarray, lo: int, hi: int, out: np.ndarray) -> None:
    """Linear window [lo, hi] of a 2-D uint16 image to uint8 `out` (clipped, rounded half up)."""
    h, w = img.shape
    span = float(hi - lo)
    if span <= 0.0:
        span = 1.0
    scale = 255.0 / span
    for y in range(h):
        for x in range(w):
            v = (float(img[y, x]) - lo) * scale
            if v <= 0.0:
                out[y, x] = 0
            elif v >= 255.0:
                out[y, x] = 255
            else:
                out[y, x] = np.uint8(math.floor(v + 0.5))


def window_16bit(img: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """16-bit image -> 8-bit with a percentile window from its histogram."""
    if img.dtype != np.uint16 or img.ndim != 2:
        raise ValueError(f"expected a 2-D uint16 image, got {img.dtype} {img.shape}")
    img = np.ascontiguousarray(img)
    hist = np.zeros(65536, dtype=np.int64)
    histogram(img, hist)
    lo, hi = percentile_bounds(hist, lo_pct, hi_pct)
    out = np.empty(img.shape, dtype=np.uint8)
    window_u16_to_u8(img, lo, hi, out)
    return out


class PixelHistogram:
    """A 256-bin histogram of written 8-bit pixels; merged across workers; mean/std on 0..1."""

    def __init__(self, counts: np.ndarray | list[int] | None = None) -> None:
        self.counts = np.zeros(256, dtype=np.int64) if counts is None else np.asarray(counts, dtype=np.int64).copy()
        if self.counts.shape != (256,):
            raise ValueError(f"a pixel histogram has 256 bins, got shape {self.counts.shape}")

    def add(self, img: np.ndarray) -> None:
        if img.dtype != np.uint8 or img.ndim != 2:
            raise ValueError(f"expected a 2-D uint8 image, got {img.dtype} {img.shape}")
        histogram(np.ascontiguousarray(img), self.counts)

    def merge(self, other: PixelHistogram) -> None:
        self.counts += other.counts

    @property
    def pixels(self) -> int:
        return int(self.counts.sum())

    def mean_std(self) -> tuple[float, float]:
        """Mean and standard deviation of pixel values scaled to 0..1."""
        n = self.pixels
        if n == 0:
            raise ValueError("no pixels were counted")
        v = np.arange(256, dtype=np.float64) / 255.0
        mean = float((self.counts * v).sum() / n)
        var = float((self.counts * (v - mean) ** 2).sum() / n)
        return mean, math.sqrt(max(var, 0.0))
