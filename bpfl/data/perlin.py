"""Perlin gradient noise in numpy (vectorised), and the DRAEM-style anomaly-shape mask built on it.

Noise is evaluated at arbitrary (rotated, scaled) pixel coordinates, so rotated and anisotropic
noise cost no more than plain noise. The gradient lattice wraps around with a period larger than the
area sampled, so no repetition is visible.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def noise_at(y: np.ndarray, x: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Perlin noise at lattice coordinates ``y``, ``x`` (equal-shape float arrays) from unit gradient
    vectors ``grads`` [Gy, Gx, 2] (the lattice wraps). Values lie roughly in [-1, 1]."""
    gy, gx = grads.shape[:2]
    g_y = np.ascontiguousarray(grads[..., 0], dtype=np.float32).ravel()
    g_x = np.ascontiguousarray(grads[..., 1], dtype=np.float32).ravel()
    yf, xf = np.floor(y), np.floor(x)
    fy, fx = (y - yf).astype(np.float32), (x - xf).astype(np.float32)
    y0 = yf.astype(np.intp) % gy
    x0 = xf.astype(np.intp) % gx
    r0, r1 = y0 * gx, ((y0 + 1) % gy) * gx  # flat row offsets
    x1 = (x0 + 1) % gx

    def dot(flat, dy, dx):
        return np.take(g_y, flat) * dy + np.take(g_x, flat) * dx

    n00 = dot(r0 + x0, fy, fx)
    n01 = dot(r0 + x1, fy, fx - 1.0)
    n10 = dot(r1 + x0, fy - 1.0, fx)
    n11 = dot(r1 + x1, fy - 1.0, fx - 1.0)
    u, v = _fade(fx), _fade(fy)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return (top + v * (bottom - top)) * np.float32(np.sqrt(2.0))


@lru_cache(maxsize=8)
def _centred_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy -= (h - 1) / 2.0
    xx -= (w - 1) / 2.0
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def perlin(shape: tuple[int, int], res: float | tuple[float, float], rng: np.random.Generator,
           angle: float = 0.0, octaves: int = 1, persistence: float = 0.5) -> np.ndarray:
    """Fractal Perlin noise of ``shape`` (H, W), float32, roughly in [-1, 1].

    ``res``: lattice cells across the image (per axis, may differ: anisotropic noise), ``angle``:
    rotation in degrees, ``octaves``: each doubles the frequency and multiplies the amplitude by
    ``persistence``.
    """
    h, w = shape
    ry, rx = (res, res) if np.isscalar(res) else res
    yy, xx = _centred_grid(int(h), int(w))
    a = np.deg2rad(angle)
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    ry_px = ca * yy - sa * xx  # rotated coordinates, still in pixels
    rx_px = sa * yy + ca * xx
    scale = max(h, w)
    out = np.zeros(shape, np.float32)
    amp, freq, norm = 1.0, 1.0, 0.0
    for _ in range(octaves):
        fy, fx = np.float32(ry * freq / scale), np.float32(rx * freq / scale)
        gy = int(np.ceil(ry * freq * 1.5)) + 3
        gx = int(np.ceil(rx * freq * 1.5)) + 3
        theta = rng.uniform(0.0, 2.0 * np.pi, (gy, gx))
        grads = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
        oy, ox = np.float32(rng.uniform(0, gy)), np.float32(rng.uniform(0, gx))
        out += np.float32(amp) * noise_at(ry_px * fy + oy, rx_px * fx + ox, grads)
        norm += amp
        amp *= persistence
        freq *= 2.0
    return out / np.float32(norm)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, min_area: float = 0.002,
                max_area: float = 0.25, tries: int = 100) -> np.ndarray:
    """A DRAEM-style anomaly region: threshold a rotated Perlin map; bool array with an area
    fraction in [``min_area``, ``max_area``] (resampled until it is)."""
    lo, hi = max(min_area, 0.004), min(max_area, 0.18)
    for _ in range(tries):
        res = (2.0 ** rng.integers(0, 4), 2.0 ** rng.integers(0, 4))  # 1..8 cells: blob-like regions
        noise = perlin(shape, res, rng, angle=rng.uniform(-90, 90))
        target = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        thr = np.quantile(noise, 1.0 - target)
        mask = noise > thr
        frac = float(mask.mean())
        if min_area <= frac <= max_area:
            return mask
    raise RuntimeError("perlin_mask: no mask within the area bounds; widen min_area/max_area")
