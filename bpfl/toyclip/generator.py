"""Captioned procedural surfaces for pretraining the toy CLIP: families, colours, defects, captions.

Every sample is a pure function of ``(seed, index)``: :func:`toy_sample` draws a surface **family** (24 for
pretraining -- 23 procedural ones and ``natural``, crops of public-domain photos -- plus the 4 held out by
default), a named **colour**, a scale, and with probability ``p_defect`` one of 8 **defect kinds**; it renders
the image at 1-2.2x the output size (so downsampling anti-aliases it like the synthetic dataset's 256 px ->
model-size resize), pastes the defect, resizes, flips/rotates, and writes a **caption** that names what was
drawn ("a photo of a scratched blue striped surface"). Nothing is stored: :func:`toy_stream` /
:class:`ToyCaptionStream` generate on the fly.

Captions come in three kinds (``caption_mode``): ``both`` (state and material), ``state`` (state only:
"a photo of a damaged surface") and ``material`` (material only: "a photo of a blue striped surface"). Each
sample carries the caption's *specification* (which state / colour / family it commits to) so the contrastive
loss can treat every caption consistent with an image as a positive (:func:`consistency_matrix`).
With probability ``p_pseudo_word`` the family word is replaced by a made-up word ("a photo of a scratched
blue korvex surface"): Bayes-PFL feeds class names the toy text encoder has never seen (the unseen
categories' words are held out), and this teaches it that the state words carry the meaning.

Held-out families (:data:`DEFAULT_HELD_OUT`: the four textures of the synthetic dataset's ``unseen`` group)
are never drawn, never used as foreign-texture fill, and none of their words (:data:`HELD_OUT_WORDS`)
appears in any caption.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data import textures as _tex
from ..data.perlin import perlin, perlin_mask
from ..data.synthetic import SYNTHETIC_GROUPS, class_word

PatternFn = Callable[[np.random.Generator, int], np.ndarray]

# ============================================================================================ colours
#: colour word -> RGB in [0, 1]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.78, 0.16, 0.14), "orange": (0.93, 0.50, 0.12), "yellow": (0.93, 0.83, 0.20),
    "green": (0.22, 0.60, 0.25), "blue": (0.16, 0.33, 0.78), "purple": (0.50, 0.24, 0.62),
    "pink": (0.93, 0.55, 0.68), "brown": (0.50, 0.32, 0.17), "grey": (0.52, 0.52, 0.52),
    "white": (0.93, 0.92, 0.89), "black": (0.10, 0.10, 0.11), "teal": (0.10, 0.55, 0.55),
}


def _lum(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def colourise(t: np.ndarray, colour: str, rng: np.random.Generator) -> np.ndarray:
    """Map a pattern ``t`` [H, W] in [0, 1] to RGB: t = 1 is the named colour, t = 0 a partner colour
    (a darker or lighter shade, white/black, or another palette colour), with random contrast."""
    main = np.asarray(COLOURS[colour], np.float32) * np.float32(rng.uniform(0.9, 1.1))
    main = np.clip(main, 0, 1)
    mode = rng.random()
    if mode < 0.45:  # shade of the same colour, darker or lighter depending on how bright it is
        if _lum(main) > 0.55 or (_lum(main) > 0.25 and rng.random() < 0.5):
            partner = main * np.float32(rng.uniform(0.2, 0.65))
        else:
            partner = main + (1 - main) * np.float32(rng.uniform(0.35, 0.8))
    elif mode < 0.75:  # white or black
        partner = np.asarray(COLOURS["white" if _lum(main) < 0.5 else "black"], np.float32)
    else:  # another palette colour
        names = [c for c in COLOURS if c != colour]
        partner = np.asarray(COLOURS[names[int(rng.integers(len(names)))]], np.float32)
    contrast = np.float32(rng.uniform(0.45, 1.0))
    t = 1.0 - contrast * (1.0 - t)  # low contrast pulls everything toward the main colour
    return (partner * (1.0 - t[..., None]) + main * t[..., None]).astype(np.float32)


# ============================================================================================ patterns
def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _uv(rng: np.random.Generator, size: int, angle: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rotated pixel coordinates (u along, v across), random origin."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    a = rng.uniform(0, np.pi) if angle is None else angle
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    oy, ox = rng.uniform(0, 1000, 2).astype(np.float32)
    return (xx + ox) * ca + (yy + oy) * sa, -(xx + ox) * sa + (yy + oy) * ca


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))).astype(np.float32)


def _norm01(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, 1), np.percentile(x, 99)
    return np.clip((x - lo) / (hi - lo + 1e-6), 0, 1).astype(np.float32)


def _angle(rng: np.random.Generator, p_axis: float = 0.6) -> float:
    """Mostly axis-aligned (with a small tilt), sometimes any angle."""
    if rng.random() < p_axis:
        return float(rng.integers(4) * np.pi / 2 + np.deg2rad(rng.normal(0, 4)))
    return float(rng.uniform(0, np.pi))


def p_striped(rng, s):
    u, v = _uv(rng, s, _angle(rng))
    period = _loguniform(rng, 3.5, s / 2.5)
    duty = rng.uniform(-0.6, 0.6)
    return _sigmoid(rng.uniform(2, 10) * (np.sin(2 * np.pi * v / period) + duty))


def p_dotted(rng, s):
    u, v = _uv(rng, s, _angle(rng))
    period = _loguniform(rng, 5, s / 3)
    hexa = rng.random() < 0.4
    row = np.floor(v / period)
    du = (u + (0.5 * period * (row % 2) if hexa else 0)) % period - period / 2
    dv = v % period - period / 2
    r = np.sqrt(du * du + dv * dv)
    radius = rng.uniform(0.15, 0.42) * period
    return np.clip((radius - r) / rng.uniform(0.6, 1.6) + 0.5, 0, 1).astype(np.float32)


def p_checkered(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.7))
    period = _loguniform(rng, 3, s / 3)
    return _sigmoid(rng.uniform(3, 12) * np.sin(np.pi * u / period) * np.sin(np.pi * v / period))


def p_grid(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.8))
    period = _loguniform(rng, 5, s / 3)
    width = rng.uniform(0.5, max(0.6, 0.18 * period))
    d = np.maximum(np.abs((u % period) - period / 2), np.abs((v % period) - period / 2))
    return (1.0 - np.clip((d - (period / 2 - width)) / 0.8, 0, 1)).astype(np.float32)


def p_marble(rng, s):
    u, v = _uv(rng, s)
    turb = perlin((s, s), rng.uniform(2, 5), rng, octaves=4, persistence=0.55)
    x = np.sin(2 * np.pi * u / _loguniform(rng, s / 4, s * 1.2) + rng.uniform(4, 8) * turb)
    vein = (1.0 - np.abs(x)) ** rng.uniform(6, 14)
    cloud = perlin((s, s), rng.uniform(2, 6), rng, octaves=2)
    return np.clip(1.0 - 0.8 * vein + 0.06 * cloud, 0, 1).astype(np.float32)


def p_mottled(rng, s):
    return _norm01(perlin((s, s), _loguniform(rng, 2, max(3, s / 6)), rng, octaves=int(rng.integers(2, 5))))


def p_brick(rng, s):
    if rng.random() < 0.3:  # the real CC0 brick photo (scikit-image), as a luminance pattern
        return _norm01(_tex.TEXTURES["brick"](rng, s).mean(-1))
    ang = _angle(rng, 0.9)
    u, v = _uv(rng, s, ang)
    h = _loguniform(rng, 4, s / 4)
    w = h * rng.uniform(1.6, 3.2)
    row = np.floor(v / h)
    uu = u + 0.5 * w * (row % 2)
    col = np.floor(uu / w)
    mortar = max(0.6, rng.uniform(0.06, 0.16) * h)
    dv, du = np.minimum(v % h, h - v % h), np.minimum(uu % w, w - uu % w)
    inside = np.clip((np.minimum(dv, du) - mortar / 2) / 0.8, 0, 1)
    shade = (np.sin(row * 12.9898 + col * 78.233) * 43758.5453) % 1.0  # per-brick hash
    face = 0.75 + 0.25 * (shade - 0.5) * rng.uniform(0.5, 1.5) + 0.06 * perlin((s, s), s / 6, rng)
    return np.clip(inside * face + (1 - inside) * rng.uniform(0.0, 0.3), 0, 1).astype(np.float32)


def p_wooden(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.7))
    period = _loguniform(rng, 4, s / 3)
    turb = perlin((s, s), (rng.uniform(1, 3), rng.uniform(0.5, 2)), rng, octaves=3)
    curve = rng.uniform(0, 0.004) * (u - u.mean()) ** 2  # gently bent growth rings
    rings = np.sin(2 * np.pi * (v + curve + period * rng.uniform(0.5, 2.0) * turb) / period)
    grain = perlin((s, s), (s / 3, 1.0), rng, angle=0.0)
    t = 0.55 + 0.35 * np.sign(rings) * np.abs(rings) ** 0.5 + 0.08 * grain
    return np.clip(t, 0, 1).astype(np.float32)


def p_brushed_metal(rng, s):
    ang = float(np.rad2deg(_angle(rng, 0.8)))
    streak = perlin((s, s), (s / rng.uniform(1.0, 3.0), rng.uniform(0.5, 2.0)), rng, angle=ang, octaves=2)
    sheen = perlin((s, s), rng.uniform(0.5, 1.5), rng)
    return np.clip(0.62 + rng.uniform(0.15, 0.3) * streak + 0.15 * sheen, 0, 1).astype(np.float32)


def p_tiled(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.9))
    p = _loguniform(rng, 6, s / 2.5)
    grout = max(0.6, rng.uniform(0.04, 0.12) * p)
    d = np.minimum(np.minimum(u % p, p - u % p), np.minimum(v % p, p - v % p))
    inside = np.clip((d - grout / 2) / 0.7, 0, 1)
    hsh = (np.sin(np.floor(u / p) * 12.9898 + np.floor(v / p) * 78.233) * 43758.5453) % 1.0
    face = 0.85 + rng.uniform(0.0, 0.2) * (hsh - 0.5)
    return np.clip(inside * face + (1 - inside) * rng.uniform(0.1, 0.45), 0, 1).astype(np.float32)


def _worley(rng, s, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """F1, F2 distances of a jittered-grid Worley noise (3x3 neighbour cells, vectorised)."""
    n = int(np.ceil(s / cell)) + 3
    pts = rng.uniform(0, 1, (n, n, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cy, cx = np.floor(yy / cell).astype(np.intp) + 1, np.floor(xx / cell).astype(np.intp) + 1
    d = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            gy, gx = cy + dy, cx + dx
            py = (gy - 1 + pts[gy, gx, 0]) * cell
            px = (gx - 1 + pts[gy, gx, 1]) * cell
            d.append(np.hypot(yy - py, xx - px))
    d = np.sort(np.stack(d), axis=0)
    return d[0], d[1]


def p_leather(rng, s):
    cell = _loguniform(rng, 4, s / 5)
    f1, f2 = _worley(rng, s, cell)
    edge = np.clip((f2 - f1) / (rng.uniform(0.1, 0.3) * cell), 0, 1) ** 0.7
    pebble = 1.0 - 0.25 * (f1 / cell)
    return np.clip(0.25 + 0.7 * edge * pebble + 0.05 * perlin((s, s), s / 4, rng), 0, 1).astype(np.float32)


def p_wavy(rng, s):
    u, v = _uv(rng, s, _angle(rng))
    period = _loguniform(rng, 4, s / 3)
    lam = _loguniform(rng, 8, s)
    amp = rng.uniform(0.2, 1.2) * period
    return _sigmoid(rng.uniform(2, 8) * np.sin(2 * np.pi * (v + amp * np.sin(2 * np.pi * u / lam)) / period))


def p_honeycomb(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.8))
    w = _loguniform(rng, 5, s / 3)  # centre spacing along a row
    h = w * np.sqrt(3) / 2  # row spacing of a hexagonal lattice
    dists = []
    for ou, ov in ((0.0, 0.0), (w / 2, h)):  # the lattice = two rectangular lattices (w x 2h)
        du = (u - ou) % w - w / 2
        dv = (v - ov) % (2 * h) - h
        for k in (-1, 0, 1):
            dists.append(np.hypot(du + k * w, dv))
    d = np.sort(np.stack(dists), axis=0)
    edge = d[1] - d[0]
    return np.clip(edge / (rng.uniform(0.08, 0.3) * w), 0, 1).astype(np.float32)


def p_zigzag(rng, s):
    u, v = _uv(rng, s, _angle(rng, 0.8))
    period = _loguniform(rng, 4, s / 3)
    lam = _loguniform(rng, 4, s / 2)
    amp = rng.uniform(0.3, 1.5) * period
    tri = 2 * np.abs((u / lam) % 1.0 - 0.5) - 0.5
    return _sigmoid(rng.uniform(3, 10) * np.sin(2 * np.pi * (v + amp * tri) / period))


def p_plain(rng, s):
    return np.clip(0.92 + 0.04 * perlin((s, s), rng.uniform(1, 4), rng, octaves=2), 0, 1).astype(np.float32)


def p_camouflage(rng, s):
    n = perlin((s, s), _loguniform(rng, 1.5, max(2, s / 12)), rng, octaves=3)
    levels = np.quantile(n, [0.33, 0.66])
    t = (n > levels[0]).astype(np.float32) * 0.5 + (n > levels[1]).astype(np.float32) * 0.5
    return t


def p_concrete(rng, s):
    cloud = perlin((s, s), rng.uniform(2, 6), rng, octaves=3)
    grain = rng.normal(0, 1, (s, s)).astype(np.float32)
    return np.clip(0.7 + 0.12 * cloud + rng.uniform(0.03, 0.1) * grain, 0, 1).astype(np.float32)


def p_ringed(rng, s):
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cy, cx = rng.uniform(-0.5 * s, 1.5 * s, 2)
    r = np.hypot(yy - cy, xx - cx)
    return _sigmoid(rng.uniform(2, 8) * np.sin(2 * np.pi * r / _loguniform(rng, 4, s / 3)))


def p_speckled(rng, s):
    """Terrazzo-like: flecks of several sizes scattered over a mottled ground."""
    ground = 0.75 + 0.1 * perlin((s, s), rng.uniform(2, 6), rng, octaves=2)
    t = ground.copy()
    for scale in (rng.uniform(1.0, 2.0), rng.uniform(2.0, 4.0)):
        n = perlin((s, s), s / (scale * 2.0), rng, octaves=1)
        thr = np.quantile(n, 1.0 - rng.uniform(0.05, 0.25))
        t = np.where(n > thr, rng.uniform(0.0, 0.45), t)
    return np.clip(t, 0, 1).astype(np.float32)


def p_sand(rng, s):
    """Fine granular surface: high-frequency noise on soft ripples."""
    grain = perlin((s, s), s / rng.uniform(1.5, 3.0), rng, octaves=2)
    ripple = perlin((s, s), (rng.uniform(1, 3), rng.uniform(4, 10)), rng, angle=rng.uniform(0, 180))
    return np.clip(0.65 + rng.uniform(0.1, 0.25) * grain + 0.12 * ripple, 0, 1).astype(np.float32)


def p_crumpled(rng, s):
    """Crumpled paper: ridged multi-octave noise (creases) with soft shading."""
    n = perlin((s, s), rng.uniform(2, 6), rng, octaves=4, persistence=0.6)
    ridges = 1.0 - np.abs(n)
    return _norm01(ridges ** rng.uniform(2, 5) + 0.3 * n)


def p_crackle(rng, s):
    """Crackle glaze: a network of thin dark lines between irregular cells (a texture, not a crack)."""
    cell = _loguniform(rng, 5, s / 4)
    f1, f2 = _worley(rng, s, cell)
    line = np.clip((f2 - f1) / rng.uniform(0.6, 1.5), 0, 1)
    return np.clip(0.25 + 0.7 * line + 0.05 * perlin((s, s), 4, rng), 0, 1).astype(np.float32)


def p_grainy(rng, s):
    """Grainy, busy surface: white noise smoothed at a random scale, partly per colour channel."""
    from scipy.ndimage import gaussian_filter
    n = gaussian_filter(rng.normal(0, 1, (s, s)).astype(np.float32), rng.uniform(0.4, 2.0))
    n = n / (n.std() + 1e-6)
    return np.clip(0.6 + rng.uniform(0.1, 0.25) * n + 0.08 * perlin((s, s), rng.uniform(1, 4), rng), 0, 1
                   ).astype(np.float32)


#: Public-domain / CC0 photos bundled with scikit-image (never ``grass`` or ``gravel``: those draw held-out
#: categories). Crops of them, as luminance patterns, are the ``natural`` family: natural-image statistics
#: (fur, coffee foam, coins, hair, stone, cells, ...) that no procedural family has.
PHOTO_SOURCES = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "immunohistochemistry", "cell",
                 "clock")


@lru_cache(maxsize=None)
def _photo_luminance(name: str) -> np.ndarray:
    """Luminance of a bundled scikit-image photo in [0, 1] (the synthetic dataset's cached loader underneath)."""
    a = _tex._skimage_texture(name).astype(np.float32) / 255.0
    return a if a.ndim == 2 else a[..., :3] @ np.asarray([0.299, 0.587, 0.114], np.float32)


def p_natural(rng, s):
    """A zoomed-in crop (12-50 % of the shorter side) of one of :data:`PHOTO_SOURCES`, as a luminance pattern."""
    src = _photo_luminance(PHOTO_SOURCES[int(rng.integers(len(PHOTO_SOURCES)))])
    h, w = src.shape
    c = max(8, int(min(h, w) * rng.uniform(0.12, 0.5)))
    y0, x0 = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    crop = src[y0:y0 + c, x0:x0 + c]
    if rng.random() < 0.5:
        crop = crop.T
    u8 = np.clip(np.round(crop * 255), 0, 255).astype(np.uint8)
    g = np.asarray(Image.fromarray(np.ascontiguousarray(u8)).resize((s, s), Image.BICUBIC), np.float32) / 255.0
    return _norm01(g)


def _from_texture(name: str) -> PatternFn:
    """An RGB texture of :mod:`bpfl.data.textures` used as is (held-out families keep their own look)."""
    fn = _tex.TEXTURES[name]

    def make(rng, s):
        return fn(rng, s)
    make.rgb = True  # type: ignore[attr-defined]
    return make


@dataclass(frozen=True)
class Family:
    """A surface family: ``word`` (the caption's class word), ``pattern(rng, size)`` -> [S, S] in [0, 1]
    (colourised with a drawn colour) or, for ``rgb`` families, an RGB image used as is (``word`` colour-free)."""

    name: str
    word: str
    pattern: PatternFn
    rgb: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("striped", "striped", p_striped), Family("dotted", "dotted", p_dotted),
    Family("checkered", "checkered", p_checkered), Family("grid", "grid", p_grid),
    Family("marble", "marble", p_marble), Family("mottled", "mottled", p_mottled),
    Family("brick", "brick", p_brick), Family("wood", "wooden", p_wooden),
    Family("brushed_metal", "brushed metal", p_brushed_metal), Family("tiles", "tiled", p_tiled),
    Family("leather", "leather", p_leather), Family("wavy", "wavy", p_wavy),
    Family("honeycomb", "honeycomb", p_honeycomb), Family("zigzag", "zigzag", p_zigzag),
    Family("plain", "plain", p_plain), Family("camouflage", "camouflage", p_camouflage),
    Family("concrete", "concrete", p_concrete), Family("ringed", "ringed", p_ringed),
    Family("speckled", "speckled", p_speckled), Family("sand", "sandy", p_sand),
    Family("crumpled", "crumpled", p_crumpled), Family("crackle", "crackled", p_crackle),
    Family("grainy", "grainy", p_grainy), Family("natural", "natural", p_natural),
    # the textures of the synthetic dataset's unseen group: held out of pretraining by default
    Family("weave", "woven", _from_texture("woven_fabric"), rgb=True),
    Family("fibre", "fibrous", _from_texture("fibre"), rgb=True),
    Family("grass", "grass", _from_texture("grass"), rgb=True),
    Family("gravel", "gravel", _from_texture("gravel"), rgb=True),
]}

#: Families held out of pretraining by default: the four textures of ``SYNTHETIC_GROUPS["unseen"]``.
DEFAULT_HELD_OUT: tuple[str, ...] = ("weave", "fibre", "grass", "gravel")
#: synthetic-dataset category -> the generator family that draws it (the seen ones are covered by broader
#: families: stripes, dots, marble veins, bricks incl. the same CC0 brick photo)
CATEGORY_FAMILY = {"woven_fabric": "weave", "fibre": "fibre", "grass": "grass", "gravel": "gravel",
                   "striped_fabric": "striped", "dotted_fabric": "dotted", "marble": "marble", "brick": "brick"}


def held_out_words(held_out: Sequence[str] = DEFAULT_HELD_OUT) -> frozenset[str]:
    """Every word that must not appear in pretraining captions: the held-out families' words, the class
    words of the synthetic categories they draw (e.g. "woven fabric" -> woven, fabric), and spelling variants."""
    words: set[str] = set()
    for name in held_out:
        words.update(FAMILIES[name].word.split())
        for cat, fam in CATEGORY_FAMILY.items():
            if fam == name:
                words.update(class_word(cat).split())
    variants = {"fibre": {"fiber", "fibres", "fibers", "fibrous"}, "woven": {"weave", "weaves", "weaving"},
                "grass": {"grassy"}, "gravel": {"pebble", "pebbles"}, "fabric": {"fabrics", "cloth", "textile"}}
    for w in list(words):
        words.update(variants.get(w, ()))
    return frozenset(words)


HELD_OUT_WORDS = held_out_words(DEFAULT_HELD_OUT)
assert set(DEFAULT_HELD_OUT) == {CATEGORY_FAMILY[c] for c in SYNTHETIC_GROUPS["unseen"]}


#: families whose fine detail is overlaid on other surfaces (irregular, "natural" texture)
DETAIL_FAMILIES = ("mottled", "sand", "crumpled", "grainy", "concrete")


def _warp(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Domain warping: displace the pattern by a smooth random field (irregular, hand-made look)."""
    from scipy.ndimage import map_coordinates
    s = t.shape[0]
    amp = rng.uniform(0.5, 4.0) * s / 64.0
    res = rng.uniform(2, 6)
    dy = amp * perlin((s, s), res, rng)
    dx = amp * perlin((s, s), res, rng)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return map_coordinates(t, [yy + dy, xx + dx], order=1, mode="reflect").astype(np.float32)


def render_surface(family: str, colour: str, rng: np.random.Generator, size: int,
                   variation: bool = True) -> np.ndarray:
    """One defect-free surface [size, size, 3] float32 in [0, 1] with slow lighting variation.

    ``variation``: sometimes warp the pattern (domain warping) and overlay the fine detail of a second,
    irregular family, so that every family also comes in less regular, more natural-looking versions.
    """
    fam = FAMILIES[family]
    if fam.rgb:
        img = fam.pattern(rng, size)
    else:
        t = fam.pattern(rng, size)
        if variation and rng.random() < 0.6:
            t = _warp(t, rng)
        if variation and rng.random() < 0.5:
            detail = DETAIL_FAMILIES[int(rng.integers(len(DETAIL_FAMILIES)))]
            d = FAMILIES[detail].pattern(rng, size)
            t = np.clip(t * (1.0 + rng.uniform(0.2, 0.6) * (d - d.mean()) / (d.std() + 1e-6) * 0.5), 0, 1)
        img = colourise(t, colour, rng)
        if variation and rng.random() < 0.3:  # a slowly varying second hue (multi-coloured surfaces)
            other = colourise(t, list(COLOURS)[int(rng.integers(len(COLOURS)))], rng)
            w = np.clip(0.5 + perlin((size, size), rng.uniform(1, 4), rng, octaves=2), 0, 1)
            w = (w * rng.uniform(0.3, 0.6))[..., None].astype(np.float32)  # the named colour stays dominant
            img = img * (1 - w) + other * w
    light = 1.0 + rng.uniform(0.0, 0.12) * perlin((size, size), rng.uniform(0.5, 2.0), rng)
    img = img * light[..., None].astype(np.float32)
    return _tex._jitter_color(np.clip(img, 0, 1), rng, 0.04)


# ============================================================================================ defects
@dataclass(frozen=True)
class DefectKind:
    """A defect kind: adjectives and phrases for captions; ``apply(img, rng, ctx)`` -> (img, mask)."""

    name: str
    adjectives: tuple[str, ...]
    phrases: tuple[str, ...]


DEFECT_KINDS: dict[str, DefectKind] = {d.name: d for d in [
    DefectKind("scratch", ("scratched",), ("with a scratch", "with scratches")),
    DefectKind("crack", ("cracked",), ("with a crack",)),
    DefectKind("hole", ("punctured", "holed"), ("with a hole",)),
    DefectKind("stain", ("stained",), ("with a stain", "with a spot")),
    DefectKind("contamination", ("contaminated",), ("with a foreign patch",)),
    DefectKind("missing", ("chipped", "torn"), ("with a missing piece",)),
    DefectKind("discoloured", ("discoloured",), ("with a discoloured patch",)),
    DefectKind("deformed", ("deformed", "distorted"), ("with a distorted region",)),
]}
NORMAL_ADJECTIVES = ("flawless", "perfect", "intact", "normal", "undamaged", "good")
NORMAL_PHRASES = ("without defects", "with no damage")
DEFECT_ADJECTIVES = ("damaged", "defective", "flawed", "anomalous", "broken")
DEFECT_PHRASES = ("with a defect", "with damage")


def _draw_mask(size: int, draw_fn) -> np.ndarray:
    im = Image.new("L", (size, size), 0)
    draw_fn(ImageDraw.Draw(im))
    return np.asarray(im, np.float32) / 255.0


def _curve(rng, size: int, n: int = 24, jagged: float = 0.0) -> list[tuple[float, float]]:
    length = rng.uniform(0.25, 0.9) * size
    a = rng.uniform(0, 2 * np.pi)
    p0 = rng.uniform(0.1, 0.9, 2) * size
    bend = rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, n)
    d = np.array([np.cos(a), np.sin(a)])
    nrm = np.array([-d[1], d[0]])
    pts = p0[None] + (t[:, None] - 0.5) * length * d[None] + (bend * np.sin(np.pi * t))[:, None] * nrm[None]
    if jagged:
        steps = rng.normal(0, jagged * length / n, (n, 1)) * nrm[None]
        pts = pts + np.cumsum(steps, axis=0)
    return [tuple(p) for p in pts]


def _blob(rng, size: int, lo: float = 0.004, hi: float = 0.15) -> np.ndarray:
    return perlin_mask((size, size), rng, lo, hi).astype(np.float32)


def _other_surface(rng, size: int, families: Sequence[str], exclude: str) -> np.ndarray:
    names = [f for f in families if f != exclude] or list(families)
    fam = names[int(rng.integers(len(names)))]
    return render_surface(fam, list(COLOURS)[int(rng.integers(len(COLOURS)))], rng, size)


def apply_defect(img: np.ndarray, kind: str, rng: np.random.Generator, family: str,
                 families: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Paste a defect of ``kind`` into ``img`` -> (image, soft mask [S, S] in [0, 1]). ``families``: the
    allowed families (foreign-texture fill is drawn from them, never from held-out ones)."""
    s = img.shape[0]
    scale = s / 64.0
    if kind in ("scratch", "crack"):
        jag = 0.0 if kind == "scratch" else rng.uniform(0.6, 1.5)
        width = max(1, int(round(rng.uniform(0.7, 1.8 if kind == "scratch" else 2.4) * scale)))
        curves = [_curve(rng, s, 24, jag) for _ in range(int(rng.integers(1, 4 if kind == "scratch" else 3)))]
        m = _draw_mask(s, lambda d: [d.line(c, fill=255, width=width, joint="curve") for c in curves])
        if kind == "scratch":
            tone = np.float32(rng.uniform(0.75, 1.0)) if rng.random() < 0.6 else np.float32(rng.uniform(0.0, 0.2))
            fill = np.full_like(img, tone) * 0.8 + img * 0.2
        else:
            fill = img * np.float32(rng.uniform(0.0, 0.25))
        alpha = rng.uniform(0.75, 1.0)
    elif kind == "hole":
        def holes(d):
            for _ in range(int(rng.integers(1, 3))):
                r = rng.uniform(0.03, 0.12) * s
                cy, cx = rng.uniform(r, s - r, 2)
                e = rng.uniform(0.6, 1.0)
                d.ellipse([cx - r, cy - r * e, cx + r, cy + r * e], fill=255)
        m = _draw_mask(s, holes)
        yy = np.linspace(0, 1, s, dtype=np.float32)[:, None, None]
        fill = np.broadcast_to(np.float32(rng.uniform(0.0, 0.12)) + 0.1 * yy, img.shape).astype(np.float32)
        alpha = 1.0
    elif kind == "stain":
        from scipy.ndimage import gaussian_filter
        m = _blob(rng, s)
        soft = np.clip(gaussian_filter(m, rng.uniform(0.5, 2.0) * scale) * 1.3, 0, 1)
        tint = np.asarray([(0.35, 0.22, 0.08), (0.1, 0.1, 0.1), (0.85, 0.75, 0.3), (0.55, 0.1, 0.1),
                           (0.95, 0.95, 0.9)][int(rng.integers(5))], np.float32)
        fill = img * 0.3 + tint * 0.7
        alpha = rng.uniform(0.55, 0.95)
        out = img * (1 - alpha * soft[..., None]) + fill * (alpha * soft[..., None])
        return out.astype(np.float32), m
    elif kind == "contamination":
        m = _blob(rng, s)
        fill = _other_surface(rng, s, families, family)
        alpha = rng.uniform(0.7, 1.0)
    elif kind == "missing":
        def chunk(d):
            n = int(rng.integers(3, 7))
            r = rng.uniform(0.06, 0.25) * s
            cy, cx = rng.uniform(0, s, 2)
            if rng.random() < 0.5:  # a bite out of an edge
                side = int(rng.integers(4))
                cy, cx = [(0, cx), (s, cx), (cy, 0), (cy, s)][side]
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.5, 1.0, n)
            d.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(ang, rad)], fill=255)
        m = _draw_mask(s, chunk)
        bg = np.asarray([(0.02, 0.02, 0.02), (0.97, 0.97, 0.97), (0.5, 0.5, 0.5)][int(rng.integers(3))], np.float32)
        fill = np.broadcast_to(bg, img.shape).astype(np.float32)
        alpha = 1.0
    elif kind == "discoloured":
        m = _blob(rng, s)
        op = int(rng.integers(5))
        if op == 0:
            fill = 1.0 - img
        elif op == 1:
            fill = np.where(img > 0.35, 1.0 - img, img * 0.4)
        elif op == 2:
            fill = np.clip(img[..., [2, 0, 1]] * 1.3 + 0.1, 0, 1)
        elif op == 3:
            fill = np.clip(img * rng.uniform(0.3, 0.6), 0, 1)
        else:
            fill = np.clip(img * 0.5 + 0.5 * np.asarray(COLOURS[list(COLOURS)[int(rng.integers(len(COLOURS)))]]), 0, 1)
        alpha = rng.uniform(0.7, 1.0)
    elif kind == "deformed":
        from scipy.ndimage import gaussian_filter
        m = _blob(rng, s)
        op = int(rng.integers(4))
        if op == 0:
            fill = np.clip(gaussian_filter(img, (s / 40, s / 40, 0)) + rng.choice([-0.2, 0.0, 0.2]), 0, 1)
        elif op == 1:
            fill = np.ascontiguousarray(np.rot90(img, k=1 + int(rng.integers(3))))
        elif op == 2:
            sh = rng.integers(s // 8, s // 3, 2) * rng.choice([-1, 1], 2)
            fill = np.clip(np.roll(img, tuple(sh), axis=(0, 1)) * rng.choice([0.7, 1.3]), 0, 1)
        else:  # locally rescaled copy of the surface (stretched region)
            z = rng.uniform(1.6, 2.5)
            c = max(4, int(s / z))
            y0, x0 = rng.integers(0, s - c + 1, 2)
            crop = (img[y0:y0 + c, x0:x0 + c] * 255).astype(np.uint8)
            fill = np.asarray(Image.fromarray(crop).resize((s, s), Image.BILINEAR), np.float32) / 255.0
        alpha = rng.uniform(0.7, 1.0)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; known: {list(DEFECT_KINDS)}")
    a = (alpha * m)[..., None]
    return (img * (1 - a) + fill * a).astype(np.float32), m


# ============================================================================================ captions
TEMPLATES_ADJ = ("a photo of a {adj} {desc} surface.", "a close-up photo of a {adj} {desc} surface.",
                 "a {adj} {desc} texture.", "a photo of the {adj} {desc} material.", "{adj} {desc}")
TEMPLATES_PHRASE = ("a photo of a {desc} surface {phrase}.", "a close-up photo of a {desc} texture {phrase}.")
_SYLLABLES = ("ka", "zo", "mi", "tu", "re", "vo", "lan", "dri", "pex", "qui", "ny", "sor", "bel", "tak", "mur",
              "esh", "ov", "ix", "pla", "gon")


def pseudo_word(rng: np.random.Generator, forbidden: frozenset[str] = HELD_OUT_WORDS) -> str:
    """A made-up word ("korvex"-like) standing in for a class word the text encoder has never seen."""
    while True:
        w = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), int(rng.integers(2, 4))))
        if w not in forbidden and not any(f in w for f in forbidden):
            return w


@dataclass
class Caption:
    """A caption and what it commits to: ``state`` in {None, "normal", "defect", <kind>}; ``colour`` and
    ``family`` None when not named (a pseudo-word names no family)."""

    text: str
    state: str | None
    colour: str | None
    family: str | None
    mode: str
    pseudo: str | None = None  # the made-up word standing for an unknown class word, if any


def make_caption(rng: np.random.Generator, family: str, colour: str, defect: str | None, *,
                 p_modes: tuple[float, float, float] = (0.5, 0.3, 0.2), p_pseudo_word: float = 0.1,
                 p_kind_word: float = 0.6) -> Caption:
    """A caption for a drawn sample. ``p_modes``: probabilities of ``both`` / ``state`` / ``material``."""
    mode = ("both", "state", "material")[int(rng.choice(3, p=np.asarray(p_modes) / sum(p_modes)))]
    fam = FAMILIES[family]
    name_colour = name_family = mode != "state"
    if mode != "state" and rng.random() < 0.35:  # name only one of colour / family
        if rng.random() < 0.5:
            name_colour = False
        else:
            name_family = False
    if fam.rgb:
        name_colour = False
    words = []
    spec_colour = spec_family = pseudo = None
    if name_colour:
        words.append(colour)
        spec_colour = colour
    if name_family:
        if rng.random() < p_pseudo_word:
            pseudo = pseudo_word(rng)
            words.append(pseudo)
        else:
            words.append(fam.word)
            spec_family = family
    desc = " ".join(words)
    state = None
    adj = phrase = ""
    if mode != "material":
        if defect is None:
            state = "normal"
            adj = NORMAL_ADJECTIVES[int(rng.integers(len(NORMAL_ADJECTIVES)))]
            phrase = NORMAL_PHRASES[int(rng.integers(len(NORMAL_PHRASES)))]
        elif rng.random() < p_kind_word:
            state = defect
            k = DEFECT_KINDS[defect]
            adj = k.adjectives[int(rng.integers(len(k.adjectives)))]
            phrase = k.phrases[int(rng.integers(len(k.phrases)))]
        else:
            state = "defect"
            adj = DEFECT_ADJECTIVES[int(rng.integers(len(DEFECT_ADJECTIVES)))]
            phrase = DEFECT_PHRASES[int(rng.integers(len(DEFECT_PHRASES)))]
    if phrase and rng.random() < 0.3:
        tpl = TEMPLATES_PHRASE[int(rng.integers(len(TEMPLATES_PHRASE)))]
        text = tpl.format(desc=desc, phrase=phrase)
    else:
        tpl = TEMPLATES_ADJ[int(rng.integers(len(TEMPLATES_ADJ)))]
        text = tpl.format(adj=adj, desc=desc)
    text = " ".join(text.split()).replace(" .", ".")
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)
    return Caption(text, state, spec_colour, spec_family, mode, pseudo)


def caption_consistent(caption: Caption, family: str, colour: str, defect: str | None) -> bool:
    """Does ``caption`` describe an image of (family, colour, defect)? (What the contrastive targets use.)"""
    if caption.family is not None and caption.family != family:
        return False
    if caption.colour is not None and caption.colour != colour:
        return False
    if caption.state is None:
        return True
    if caption.state == "normal":
        return defect is None
    if caption.state == "defect":
        return defect is not None
    return caption.state == defect


# ============================================================================================ samples
@dataclass
class ToySample:
    """One generated sample. ``image`` [S, S, 3] float32 in [0, 1]; ``mask`` [S, S] bool (the defect's
    pixels; all False for a flawless surface); ``mask_soft`` the area fraction of the defect per pixel."""

    image: np.ndarray
    mask: np.ndarray
    mask_soft: np.ndarray
    caption: Caption
    family: str
    colour: str
    defect: str | None
    index: int = 0
    extras: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.caption.text


_STREAM_TAG = 0x70C11  # separates the toy-CLIP stream from any other use of the same seed


def allowed_families(held_out: Sequence[str] = DEFAULT_HELD_OUT, families: Sequence[str] | None = None) -> list[str]:
    unknown = [f for f in list(held_out) + list(families or []) if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown surface families {unknown}; known: {sorted(FAMILIES)}")
    pool = list(families) if families is not None else list(FAMILIES)
    out = [f for f in pool if f not in set(held_out)]
    if not out:
        raise ValueError("no surface family left after holding out " + ", ".join(held_out))
    return out


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Whole-image nuisance (never a defect): gamma, slight blur, sensor noise."""
    if rng.random() < 0.3:
        img = img ** np.float32(np.exp(rng.uniform(-0.3, 0.3)))
    if rng.random() < 0.2:
        from scipy.ndimage import gaussian_filter
        img = gaussian_filter(img, (rng.uniform(0.3, 0.8),) * 2 + (0,))
    if rng.random() < 0.4:
        img = img + rng.normal(0, rng.uniform(0.005, 0.05), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def toy_sample(seed: int, index: int, image_size: int = 64, *, held_out: Sequence[str] = DEFAULT_HELD_OUT,
               families: Sequence[str] | None = None, p_defect: float = 0.5,
               defects: Sequence[str] | None = None, render_scale: tuple[float, float] = (1.0, 2.2),
               p_pseudo_word: float = 0.1, p_modes: tuple[float, float, float] = (0.5, 0.3, 0.2),
               augment: bool = True) -> ToySample:
    """Sample number ``index`` of the stream with ``seed`` (a pure function of both)."""
    rng = np.random.default_rng([int(seed), _STREAM_TAG, int(index)])
    pool = allowed_families(held_out, families)
    kinds = list(defects) if defects is not None else list(DEFECT_KINDS)
    family = pool[int(rng.integers(len(pool)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    defect = kinds[int(rng.integers(len(kinds)))] if rng.random() < p_defect else None
    render = max(image_size, int(round(image_size * rng.uniform(*render_scale))))
    img = render_surface(family, colour, rng, render)
    m = np.zeros((render, render), np.float32)
    if defect is not None:
        base = img
        for _ in range(10):  # the defect must actually be visible
            img, m = apply_defect(base, defect, rng, family, pool)
            sel = m > 0.5
            if sel.any() and float(np.abs(img - base)[sel].mean()) > 0.08:
                break
    u8 = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
    if render != image_size:
        u8 = np.asarray(Image.fromarray(u8).resize((image_size, image_size), Image.BICUBIC))
        m = np.asarray(Image.fromarray(m.astype(np.float32)).resize((image_size, image_size),
                                                                               Image.BOX), np.float32)
    image = u8.astype(np.float32) / 255.0
    m = np.clip(m, 0, 1)
    if augment:
        image = _photometric(image, rng)
        k = int(rng.integers(4))
        flip = rng.random() < 0.5
        image, m = np.rot90(image, k), np.rot90(m, k)
        if flip:
            image, m = image[:, ::-1], m[:, ::-1]
        image, m = np.ascontiguousarray(image), np.ascontiguousarray(m)
    mask = m >= 0.3
    if defect is not None and not mask.any():
        mask = m >= m.max() * 0.5  # a very thin defect after downsampling: keep its strongest pixels
    if defect is None:
        mask[:] = False
        m[:] = 0
    caption = make_caption(rng, family, colour, defect, p_modes=p_modes, p_pseudo_word=p_pseudo_word)
    return ToySample(image, mask, m.astype(np.float32), caption, family, colour, defect, index)


def toy_stream(seed: int = 0, image_size: int = 64, start: int = 0, stop: int | None = None,
               **kwargs) -> Iterator[ToySample]:
    """Samples ``start, start+1, ...`` (endless when ``stop`` is None) of the stream with ``seed``."""
    i = start
    while stop is None or i < stop:
        yield toy_sample(seed, i, image_size, **kwargs)
        i += 1


def consistency_matrix(samples: Sequence[ToySample]) -> np.ndarray:
    """[n images, n captions] bool: caption j describes image i (the diagonal is always True)."""
    n = len(samples)
    out = np.zeros((n, n), bool)
    for i, si in enumerate(samples):
        for j, sj in enumerate(samples):
            out[i, j] = caption_consistent(sj.caption, si.family, si.colour, si.defect)
    return out


try:  # torch is a dependency of the kit; keep the generator importable without it for data-only uses
    import torch
    from torch.utils.data import IterableDataset, get_worker_info

    from ..data.images import CLIP_MEAN, CLIP_STD

    def samples_to_batch(samples: Sequence[ToySample], normalize: bool = True) -> dict:
        """Stack samples: ``image`` [N, 3, S, S] (CLIP-normalised), ``mask`` / ``mask_soft`` [N, S, S],
        ``caption`` list, ``label`` [N] (1 = defect), ``consistent`` [N, N] bool."""
        imgs = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
        if normalize:
            imgs = (imgs - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return {"image": imgs, "mask": torch.from_numpy(np.stack([s.mask for s in samples])),
                "mask_soft": torch.from_numpy(np.stack([s.mask_soft for s in samples])),
                "caption": [s.text for s in samples], "pseudo": [s.caption.pseudo for s in samples],
                "family": [s.family for s in samples],
                "colour": [s.colour for s in samples], "defect": [s.defect for s in samples],
                "label": torch.tensor([int(s.defect is not None) for s in samples]),
                "consistent": torch.from_numpy(consistency_matrix(samples)), "index": [s.index for s in samples]}

    class ToyCaptionStream(IterableDataset):
        """The stream as a torch IterableDataset of batches (``batch_size`` samples each, see
        :func:`samples_to_batch`); batch ``b`` holds samples ``b*batch_size ...``, so it is the same whatever
        the number of DataLoader workers (they split batches round-robin). Use ``DataLoader(ds, batch_size=None)``."""

        def __init__(self, seed: int = 0, batch_size: int = 64, image_size: int = 64, start_batch: int = 0,
                     n_batches: int | None = None, **sample_kwargs):
            self.seed, self.batch_size, self.image_size = seed, batch_size, image_size
            self.start_batch, self.n_batches, self.kw = start_batch, n_batches, sample_kwargs

        def batch(self, b: int) -> dict:
            return samples_to_batch([toy_sample(self.seed, b * self.batch_size + i, self.image_size, **self.kw)
                                     for i in range(self.batch_size)])

        def __iter__(self):
            info = get_worker_info()
            wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
            b = self.start_batch + wid
            while self.n_batches is None or b < self.start_batch + self.n_batches:
                yield self.batch(b)
                b += nw
except ImportError:  # pragma: no cover
    pass
