"""The kit's offline dataset: small, seeded, MVTec-layout texture anomalies with exact masks.

``make_synthetic_dataset(root, seed)`` writes::

    root/<category>/train/good/000.png ...
    root/<category>/test/good/000.png ...
    root/<category>/test/<defect>/000.png ...          defect in color, contamination, distortion
    root/<category>/ground_truth/<defect>/000_mask.png 0/255
    root/meta.json                                     the authors' format (train + test)
    root/bpfl_synthetic.json                           the generation parameters

Normal images are textures (:mod:`bpfl.data.textures`). An anomaly is a DRAEM-style region (a
thresholded, rotated Perlin map covering 0.2-25 % of the image) filled with a foreign texture
(``contamination``), a colour-transformed copy (``color``: invert, solarise, channel swap) or a
geometrically transformed copy (``distortion``: blur, rotation, shift), blended at opacity 0.7-1.
The saved mask is exactly the blended region. Files are byte-identical for the same seed and
parameters. The categories come in two disjoint groups (:data:`SYNTHETIC_GROUPS`), so the zero-shot
protocol (train on ``seen``, test on ``unseen``) runs offline.
"""
from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

from .perlin import perlin_mask
from .readers import write_meta_json
from .records import DatasetError, Record, RecordList
from .textures import TEXTURES

SYNTHETIC_CATEGORIES = tuple(TEXTURES)
SYNTHETIC_GROUPS: dict[str, list[str]] = {
    "seen": ["brick", "striped_fabric", "marble", "dotted_fabric"],
    "unseen": ["grass", "gravel", "woven_fabric", "fibre"],
}
DEFECTS = ("color", "contamination", "distortion")

#: Presets: ``default`` (~30 images per category at 256 px) and ``tiny`` for tests and CI.
SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {
    "default": dict(n_train_good=10, n_test_good=8, n_test_anomalous=12, image_size=256),
    "tiny": dict(n_train_good=2, n_test_good=3, n_test_anomalous=3, image_size=96),
}
SYNTHETIC_TINY = SYNTHETIC_PRESETS["tiny"]

MARKER = "bpfl_synthetic.json"
_CLASS_WORDS = {"fibre": "fibre", "striped_fabric": "striped fabric", "dotted_fabric": "dotted fabric",
                "woven_fabric": "woven fabric"}
#: The authors' category -> prompt-name remap (VPB.py:8-18); every other name is used as is, lower case.
AUTHORS_CLASS_REMAP = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
                       "pcb2": "printed circuit board", "pcb3": "printed circuit board",
                       "pcb4": "printed circuit board", "pipe_fryum": "pipe fryum",
                       "chewinggum": "chewing gum", "metal_nut": "metal nut"}


def class_word(category: str) -> str:
    """The English words for a category folder name, for text prompts.

    Synthetic categories: ``woven_fabric`` -> ``woven fabric``. Real ones follow the authors' remap
    (``pcb3`` -> ``printed circuit board``, ``chewinggum`` -> ``chewing gum``, ...). Any other name:
    lower case, underscores and dashes become spaces.
    """
    key = category.strip().lower()
    if key in _CLASS_WORDS:
        return _CLASS_WORDS[key]
    if key in AUTHORS_CLASS_REMAP:
        return AUTHORS_CLASS_REMAP[key]
    return " ".join(key.replace("_", " ").replace("-", " ").split())


def _rng(seed: int, category: str, stage: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(category.encode()), stage, index])


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _fill(img: np.ndarray, defect: str, category: str, rng: np.random.Generator) -> np.ndarray:
    """The content pasted into the anomaly region (same shape as ``img``)."""
    size = img.shape[0]
    if defect == "contamination":
        others = [c for c in SYNTHETIC_CATEGORIES if c != category]
        src = TEXTURES[others[int(rng.integers(len(others)))]](rng, size)
        return src[..., rng.permutation(3)] if rng.random() < 0.5 else src
    if defect == "color":
        op = int(rng.integers(3))
        if op == 0:
            return 1.0 - img
        if op == 1:
            return np.where(img > 0.35, 1.0 - img, img * 0.4)  # solarise, darkened below the cut
        return np.clip(img[..., [2, 0, 1]] * 1.3 + 0.1, 0, 1)  # channel rotation, brighter
    op = int(rng.integers(3))  # distortion
    if op == 0:
        blurred = ndimage.gaussian_filter(img, sigma=(size / 40, size / 40, 0))
        return np.clip(blurred + rng.choice([-0.25, 0.25]), 0, 1)
    if op == 1:
        return np.ascontiguousarray(np.rot90(img, k=1 + int(rng.integers(3))))
    shift = rng.integers(size // 8, size // 3, 2) * rng.choice([-1, 1], 2)
    return np.clip(np.roll(img, tuple(shift), axis=(0, 1)) * rng.choice([0.7, 1.3]), 0, 1)


def _anomalous(img: np.ndarray, defect: str, category: str,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste an anomaly into ``img``; returns (image, bool mask). Retries until it is visible."""
    for _ in range(20):
        mask = perlin_mask(img.shape[:2], rng, 0.002, 0.25)
        src = _fill(img, defect, category, rng)
        beta = rng.uniform(0.7, 1.0)
        m = mask[..., None].astype(np.float32) * beta
        out = img * (1.0 - m) + src * m
        if np.abs(out - img)[mask].mean() > 0.08:  # the region must actually look different
            return out.astype(np.float32), mask
    return out.astype(np.float32), mask


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _prepare_root(root: Path) -> None:
    """Create ``root``; clear a previous synthetic dataset there; refuse other non-empty folders."""
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{root} is a file; pass a folder for the synthetic dataset", [(str(root), "not a folder")])
    if root.is_dir() and any(root.iterdir()):
        marker = root / MARKER
        if not marker.is_file():
            raise DatasetError(f"{root} is not empty and holds no {MARKER}; refusing to write a synthetic "
                               "dataset into it. Pass an empty or new folder.", [(str(root), "not empty")])
        try:
            old = json.loads(marker.read_text())["categories"]
        except (OSError, ValueError, KeyError):
            old = list(SYNTHETIC_CATEGORIES)
        for c in old:
            if (root / c).is_dir() and c in SYNTHETIC_CATEGORIES:
                shutil.rmtree(root / c)
        for f in ("meta.json", MARKER):
            (root / f).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def make_synthetic_dataset(root: str | Path, seed: int = 0, categories: Iterable[str] | None = None,
                           n_train_good: int | None = None, n_test_good: int | None = None,
                           n_test_anomalous: int | None = None, image_size: int | None = None,
                           preset: str = "default") -> RecordList:
    """Write the synthetic dataset to ``root`` and return its records (train and test).

    ``categories``: names from :data:`SYNTHETIC_CATEGORIES` (default all eight, or a group name
    ``"seen"``/``"unseen"``). Counts and size default to ``SYNTHETIC_PRESETS[preset]``
    (``"default"``: 10 train good, 8 test good, 12 test anomalous at 256 px; ``"tiny"``: 2/3/3 at
    96 px). Anomalous images cycle through :data:`DEFECTS`. A folder that already holds a synthetic
    dataset is regenerated in place; any other non-empty folder is refused.
    """
    if preset not in SYNTHETIC_PRESETS:
        raise DatasetError(f"unknown preset {preset!r}: use one of {list(SYNTHETIC_PRESETS)}")
    p = dict(SYNTHETIC_PRESETS[preset])
    for k, v in dict(n_train_good=n_train_good, n_test_good=n_test_good,
                     n_test_anomalous=n_test_anomalous, image_size=image_size).items():
        if v is not None:
            p[k] = int(v)
    if isinstance(categories, str):
        categories = SYNTHETIC_GROUPS.get(categories, [categories])
    cats = list(categories) if categories is not None else list(SYNTHETIC_CATEGORIES)
    unknown = [c for c in cats if c not in TEXTURES]
    if unknown:
        raise DatasetError(f"unknown synthetic categories {unknown}; available: {list(SYNTHETIC_CATEGORIES)}")
    if p["image_size"] < 32:
        raise DatasetError("image_size must be at least 32 for the synthetic dataset")
    root = Path(root).expanduser().absolute()
    _prepare_root(root)
    size = p["image_size"]
    records: list[Record] = []
    for cat in cats:
        tex = TEXTURES[cat]
        cdir = root / cat
        for stage, sub, n in ((0, "train", p["n_train_good"]), (1, "test", p["n_test_good"])):
            for i in range(n):
                path = cdir / sub / "good" / f"{i:03d}.png"
                _save_png(_to_u8(tex(_rng(seed, cat, stage, i), size)), path)
                records.append(Record(str(path), None, 0, cat, "good", "synthetic", sub))
        counters = {d: 0 for d in DEFECTS}
        for i in range(p["n_test_anomalous"]):
            defect = DEFECTS[i % len(DEFECTS)]
            j = counters[defect]
            counters[defect] += 1
            rng = _rng(seed, cat, 2, i)
            img, mask = _anomalous(tex(rng, size), defect, cat, rng)
            ipath = cdir / "test" / defect / f"{j:03d}.png"
            mpath = cdir / "ground_truth" / defect / f"{j:03d}_mask.png"
            _save_png(_to_u8(img), ipath)
            _save_png(mask.astype(np.uint8) * 255, mpath)
            records.append(Record(str(ipath), str(mpath), 1, cat, defect, "synthetic", "test"))
    write_meta_json(records, root)
    (root / MARKER).write_text(json.dumps({"seed": int(seed), "categories": cats, **p,
                                           "groups": SYNTHETIC_GROUPS}, indent=1) + "\n")
    return RecordList(records, root=str(root), layout="mvtec")


def synthetic_up_to_date(root: str | Path, preset: str = "default", seed: int = 0) -> bool:
    """Does ``root`` hold the synthetic dataset of ``preset`` and ``seed`` (by its marker file)?"""
    if preset not in SYNTHETIC_PRESETS:
        raise DatasetError(f"unknown synthetic preset {preset!r}: choose one of {sorted(SYNTHETIC_PRESETS)}")
    marker = Path(root) / MARKER
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    want = {**SYNTHETIC_PRESETS[preset], "seed": int(seed)}
    return all(have.get(k) == v for k, v in want.items())


def ensure_synthetic(root: str | Path, preset: str = "default", seed: int = 0, quiet: bool = False) -> Path:
    """The synthetic dataset of ``preset``/``seed`` at ``root``: generated when missing or different, else reused."""
    root = Path(root)
    if not synthetic_up_to_date(root, preset, seed):
        if not quiet:
            print(f"[bpfl] generating the synthetic dataset ({preset}, seed {seed}) in {root} ...", flush=True)
        make_synthetic_dataset(root, seed=seed, preset=preset)
    return root


def is_synthetic_root(root: str | Path | None) -> bool:
    """Is ``root`` (or a folder above it, for a category folder) the kit's synthetic dataset?"""
    if not root:
        return False
    p = Path(root).absolute()
    return any((q / MARKER).is_file() for q in (p, *p.parents[:2]))
