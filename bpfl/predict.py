"""Anomaly maps and scores for image files: the library side of ``bpfl predict``.

:func:`predict_images` runs a trained :class:`~bpfl.model.BayesPFL` over a list of image files, one at a time,
and returns a row of scores per readable image plus a :class:`PredictionFailure` (path and reason) per image
that could not be read: one bad file in a folder costs that file only. Each image gets its own Monte-Carlo
draws from a generator seeded with ``seed``, so an image's result does not depend on which other images (or
how many unreadable ones) were in the run.

Scores are the paper's (§3.5, Eq. 12): ``image_score`` s = s_text + max(M), ``text_score`` s_text and
``map_max`` max(M), on the unsmoothed map M; the map handed to ``on_prediction`` (and saved as PNGs by
:func:`save_prediction_images`) is smoothed with ``config.map_sigma`` as in evaluation.

Images of any size (a 12-megapixel photo is decoded and resized to the model's input size) and file names in
any script work; names the file system stores as undecodable bytes are written with backslash escapes.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np
import torch

from .data import IMAGE_EXTENSIONS, DatasetError, load_image
from .evaluate import smooth_maps
from .viz import MAP_CMAP, overlay

#: Columns of ``predictions.csv`` (one row per readable image).
PREDICTION_COLUMNS = ("path", "class_name", "image_score", "text_score", "map_max")


@dataclass
class Prediction:
    """One image's result. ``anomaly_map`` [S, S] (smoothed with ``config.map_sigma``), ``image`` [3, S, S]
    the CLIP-normalised model input."""

    path: Path
    class_name: str
    image_score: float
    text_score: float
    map_max: float
    anomaly_map: np.ndarray
    image: torch.Tensor

    def row(self) -> dict:
        return {"path": str(self.path), "class_name": self.class_name, "image_score": self.image_score,
                "text_score": self.text_score, "map_max": self.map_max}


@dataclass(frozen=True)
class PredictionFailure:
    """An image that could not be predicted, and why (the reader's words)."""

    path: Path
    reason: str


@dataclass
class PredictionReport:
    """``rows``: one dict per predicted image (:data:`PREDICTION_COLUMNS`), in input order;
    ``failures``: the unreadable images, in input order."""

    rows: list[dict] = field(default_factory=list)
    failures: list[PredictionFailure] = field(default_factory=list)


def find_images(src: str | Path) -> list[Path]:
    """The image files to predict: ``src`` itself, or every image under the folder ``src`` (recursive, sorted).

    Raises ``FileNotFoundError`` when ``src`` does not exist and ``ValueError`` when a folder holds no image.
    Files are chosen by their ending (:data:`bpfl.data.IMAGE_EXTENSIONS`); whether they decode is found out
    by :func:`predict_images`, image by image.
    """
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such file or folder; pass an image or a folder of images")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {src}")
    return files


def default_class_name(path: str | Path) -> str:
    """The object words for an image's prompts when none are given: the name of the folder it is in."""
    folder = Path(path).parent
    return folder.name or folder.resolve().name


def output_stems(paths: Iterable[Path], root: Path | None = None) -> dict[Path, Path]:
    """Where each image's PNGs go, relative to the output folder, without the ``_heatmap.png`` ending.

    ``x.png`` -> ``x``; under a folder ``root`` the sub-folders are kept (``crack/000.png`` -> ``crack/000``),
    so files with the same name in different folders do not overwrite each other; two files of one folder
    that differ only in their ending keep it (``000.png``, ``000.jpg`` -> ``000_png``, ``000_jpg``).
    """
    paths = list(paths)

    def rel(p: Path) -> Path:
        if root is not None:
            try:
                return p.relative_to(root)
            except ValueError:
                pass
        return Path(p.name)
    stems = {p: rel(p).with_suffix("") for p in paths}
    counts = Counter(stems.values())
    return {p: (s if counts[s] == 1 else s.with_name(rel(p).name.replace(".", "_"))) for p, s in stems.items()}


def predict_images(model, paths: Iterable[str | Path], *, class_name: str | None = None,
                   n_samples: int | None = None, seed: int = 0,
                   on_prediction: Callable[[Prediction], None] | None = None) -> PredictionReport:
    """Predict every readable image of ``paths``; list the unreadable ones instead of stopping at them.

    Args:
        model: a :class:`~bpfl.model.BayesPFL` (e.g. from :func:`bpfl.train.load_model`); put in eval mode.
        paths: image files (:func:`find_images` gives them for a file or a folder).
        class_name: the object words for every prompt; default :func:`default_class_name`.
        n_samples: R (default ``config.test_samples``). seed: seeds each image's own generator.
        on_prediction: called with each :class:`Prediction` as soon as it is ready (print, save PNGs), so that
            the maps of a large folder need not be held in memory.

    Returns:
        :class:`PredictionReport`: a row per predicted image and a :class:`PredictionFailure` per image that
        is missing, truncated, corrupt or not an image.
    """
    model.eval()
    size = model.config.image_size
    report = PredictionReport()
    for path in map(Path, paths):
        try:
            image = load_image(path, size)
        except DatasetError as e:
            reason = e.problems[0][1] if e.problems else str(e)
            report.failures.append(PredictionFailure(path, reason))
            continue
        except (OSError, ValueError, SyntaxError) as e:  # a decoder's own error past the reader's checks
            report.failures.append(PredictionFailure(path, f"unreadable image: {type(e).__name__}: {e}"))
            continue
        name = class_name or default_class_name(path)
        with torch.no_grad():
            out = model(image[None], [name], n_samples=n_samples,
                        generator=torch.Generator().manual_seed(seed))
        amap = smooth_maps(out.anomaly_map.float().cpu().numpy(), model.config.map_sigma)[0]
        pred = Prediction(path=path, class_name=name, image_score=float(out.image_score[0]),
                          text_score=float(out.text_score[0]), map_max=float(out.map_max[0]),
                          anomaly_map=amap, image=image)
        report.rows.append(pred.row())
        if on_prediction is not None:
            on_prediction(pred)
    return report


def save_prediction_images(pred: Prediction, out_dir: str | Path, stem: str | Path) -> tuple[Path, Path]:
    """Write ``OUT/STEM_heatmap.png`` (the map, inferno colours on [0, 1]) and ``OUT/STEM_overlay.png``."""
    base = Path(out_dir) / stem
    base.parent.mkdir(parents=True, exist_ok=True)
    heatmap = base.with_name(base.name + "_heatmap.png")
    over = base.with_name(base.name + "_overlay.png")
    plt.imsave(heatmap, np.clip(pred.anomaly_map, 0, 1), cmap=MAP_CMAP, vmin=0, vmax=1)
    plt.imsave(over, np.clip(overlay(pred.image, pred.anomaly_map), 0, 1))
    return heatmap, over


def write_predictions_csv(rows: Iterable[dict], path: str | Path) -> Path:
    """``predictions.csv`` (UTF-8; undecodable bytes of a file name written as backslash escapes)."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=list(PREDICTION_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in PREDICTION_COLUMNS})
    return path
