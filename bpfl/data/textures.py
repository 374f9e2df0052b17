"""Texture generators for the synthetic dataset: real CC0 crops and procedural patterns.

Each generator is ``fn(rng, size) -> float32 array [size, size, 3] in [0, 1]`` and draws everything
random from ``rng``, so the output is fixed by the generator's seed. Images of one category vary
(crop, flip, phase, small colour and brightness jitter) but share the category's look.

Real textures are scikit-image's bundled CC0 images ``brick``, ``grass`` and ``gravel`` (greyscale
512 x 512, tinted here). Procedural ones follow DTD-Synthetic's spirit: stripes, dots, a plain
weave, marble veins (Perlin turbulence) and fibres (anisotropic Perlin noise).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import numpy as np
from PIL import Image

from .perlin import perlin

TextureFn = Callable[[np.random.Generator, int], np.ndarray]


def _jitter_color(rgb: np.ndarray, rng: np.random.Generator, amount: float = 0.05) -> np.ndarray:
    """Small brightness, contrast and per-channel gain jitter."""
    gain = 1.0 + rng.uniform(-amount, amount, 3)
    bright = rng.uniform(-amount, amount)
    contrast = 1.0 + rng.uniform(-2 * amount, 2 * amount)
    mean = rgb.mean()
    out = (rgb - mean) * contrast + mean + bright
    return np.clip(out * gain, 0.0, 1.0).astype(np.float32)


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Blend colours ``a``, ``b`` (3,) by weight map ``t`` (H, W) -> (H, W, 3)."""
    return (np.asarray(a, np.float32) * (1.0 - t[..., None]) + np.asarray(b, np.float32) * t[..., None])


# ---- real textures ----------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _skimage_texture(name: str) -> np.ndarray:
    import skimage.data
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)


def _real(name: str, tint: tuple[float, float, float], allow_rot90: bool = True) -> TextureFn:
    def make(rng: np.random.Generator, size: int) -> np.ndarray:
        src = _skimage_texture(name)
        n = src.shape[0]
        c = int(rng.integers(int(0.45 * n), int(0.8 * n) + 1))
        y0, x0 = rng.integers(0, n - c + 1, 2)
        crop = src[y0:y0 + c, x0:x0 + c]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        if allow_rot90 and rng.random() < 0.5:
            crop = crop.T
        g = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BICUBIC),
                       np.float32) / 255.0
        g = (g - g.mean()) / (g.std() + 1e-6) * 0.18 + 0.5  # normalise contrast across crops
        rgb = np.clip(g, 0, 1)[..., None] * (np.asarray(tint, np.float32) * 1.3)
        return _jitter_color(np.clip(rgb, 0, 1), rng)
    make.__doc__ = f"Random crop of scikit-image's CC0 '{name}' texture, tinted {tint}."
    return make


# ---- procedural textures ----------------------------------------------------------------------
def striped_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """Near-horizontal stripes (a grating) with soft edges and fine noise."""
    yy, xx = _coords(size)
    theta = np.deg2rad(rng.normal(0.0, 3.0))
    period = size / rng.uniform(9.0, 11.0)
    phase = rng.uniform(0, 2 * np.pi)
    s = np.sin(2 * np.pi * (yy * np.cos(theta) + xx * np.sin(theta)) / period + phase)
    t = 1.0 / (1.0 + np.exp(-4.0 * s))
    img = _mix((0.16, 0.22, 0.45), (0.90, 0.86, 0.74), t)
    img *= 1.0 + 0.06 * perlin((size, size), size / 6, rng)[..., None]
    return _jitter_color(np.clip(img, 0, 1), rng)


def dotted_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """A square lattice of round dots on a plain ground."""
    yy, xx = _coords(size)
    period = size / rng.uniform(7.0, 9.0)
    oy, ox = rng.uniform(0, period, 2)
    dy = (yy + oy) % period - period / 2
    dx = (xx + ox) % period - period / 2
    r = np.sqrt(dy * dy + dx * dx)
    radius = 0.24 * period
    t = np.clip((radius - r) / 1.5 + 0.5, 0.0, 1.0)
    img = _mix((0.80, 0.20, 0.22), (0.97, 0.93, 0.82), t)
    img *= 1.0 + 0.05 * perlin((size, size), size / 8, rng)[..., None]
    return _jitter_color(np.clip(img, 0, 1), rng)


def woven_fabric(rng: np.random.Generator, size: int) -> np.ndarray:
    """A plain weave: warp and weft threads alternating over and under in a checkerboard."""
    yy, xx = _coords(size)
    p = size / rng.uniform(14.0, 18.0)
    oy, ox = rng.uniform(0, p, 2)
    y, x = yy + oy, xx + ox
    over = ((np.floor(y / p) + np.floor(x / p)) % 2).astype(np.float32)
    across_x = np.sin(np.pi * (x % p) / p) ** 0.6  # profile of a vertical (warp) thread
    across_y = np.sin(np.pi * (y % p) / p) ** 0.6  # profile of a horizontal (weft) thread
    shade = over * across_x + (1 - over) * across_y
    base = _mix((0.55, 0.42, 0.28), (0.68, 0.56, 0.38), over)
    img = base * (0.45 + 0.55 * shade[..., None])
    img *= 1.0 + 0.05 * perlin((size, size), size / 5, rng)[..., None]
    return _jitter_color(np.clip(img, 0, 1), rng)


def marble(rng: np.random.Generator, size: int) -> np.ndarray:
    """Marble: veins along the zero lines of a Perlin-turbulent sine."""
    yy, xx = _coords(size)
    theta = rng.uniform(20, 70)
    a = np.deg2rad(theta)
    turb = perlin((size, size), 3.0, rng, octaves=4, persistence=0.55)
    v = np.sin((xx * np.cos(a) + yy * np.sin(a)) / size * 2 * np.pi * 2.5 + 6.0 * turb)
    vein = (1.0 - np.abs(v)) ** 10
    cloud = perlin((size, size), 4.0, rng, octaves=2)
    base = np.asarray((0.90, 0.88, 0.84), np.float32) * (1.0 + 0.04 * cloud[..., None])
    img = base * (1 - 0.65 * vein[..., None]) + 0.65 * vein[..., None] * np.asarray((0.35, 0.36, 0.42))
    return _jitter_color(np.clip(img, 0, 1), rng, 0.03)


def fibre(rng: np.random.Generator, size: int) -> np.ndarray:
    """Fibres: several layers of strongly anisotropic Perlin noise at nearby orientations."""
    theta = rng.uniform(-10, 10) + 35.0
    n = np.zeros((size, size), np.float32)
    for _ in range(3):
        n += perlin((size, size), (size / 5.0, 2.0), rng, angle=theta + rng.normal(0, 6))
    n = (n - n.mean()) / (n.std() + 1e-6)
    t = np.clip(0.5 + 0.22 * n, 0, 1)
    img = _mix((0.55, 0.50, 0.40), (0.96, 0.93, 0.85), t)
    return _jitter_color(img, rng)


TEXTURES: dict[str, TextureFn] = {
    "brick": _real("brick", (0.75, 0.42, 0.33), allow_rot90=False),
    "grass": _real("grass", (0.40, 0.70, 0.30)),
    "gravel": _real("gravel", (0.70, 0.66, 0.58)),
    "striped_fabric": striped_fabric,
    "dotted_fabric": dotted_fabric,
    "woven_fabric": woven_fabric,
    "marble": marble,
    "fibre": fibre,
}
