"""Figures: one consistent style, overlays, Figure-3-style panels, and a save helper (PNG + PDF).

Heat maps are drawn with an explicit, stated normalisation (``norm="fixed"``: probabilities on [0, 1], the
same scale for every image, so a normal image looks cold; ``norm="per-image"``: each map min-max scaled, which
always shows *something* hot and can mislead).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data import denormalize

#: the colormap of anomaly maps everywhere (perceptually uniform; jet's bright cyan band misleads)
MAP_CMAP = "inferno"


def set_style() -> None:
    """The kit's plotting style (seaborn whitegrid, readable fonts), used by every notebook and figure."""
    import matplotlib
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="deep")
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "image.cmap": MAP_CMAP, "axes.titlesize": 10})


def save_figure(fig, path: str | Path, pdf: bool = True) -> list[Path]:
    """Save ``fig`` as PNG (and PDF) next to each other; returns the written paths."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path.with_suffix(".png")]
    fig.savefig(written[0])
    if pdf:
        written.append(path.with_suffix(".pdf"))
        fig.savefig(written[1])
    return written


def to_display_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CLIP-normalised [3, H, W] tensor (or an HxWx3 array) -> HxWx3 float in [0, 1]."""
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] == 3:
            img = denormalize(image.detach().cpu())
            return img.permute(1, 2, 0).clamp(0, 1).numpy()
        image = image.detach().cpu().numpy()
    img = np.asarray(image, dtype=np.float32)
    return img / 255.0 if img.max() > 1.5 else img


def shared_limits(maps: Sequence, low: float = 0.0, high: float = 100.0) -> tuple[float, float]:
    """One colour scale for panels that are compared: the ``low``/``high`` percentiles over all ``maps``."""
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    lo, hi = float(np.percentile(values, low)), float(np.percentile(values, high))
    return (lo, hi) if hi > lo else (lo, lo + 1e-6)


def normalize_map(m: np.ndarray, norm: str | tuple[float, float] = "fixed") -> np.ndarray:
    """A map scaled to [0, 1] for colouring: ``"fixed"`` (probabilities as they are, clipped), ``"per-image"``
    (its own min-max) or ``(lo, hi)`` (a scale shared with other panels, :func:`shared_limits`)."""
    m = np.asarray(m, dtype=np.float32)
    if isinstance(norm, tuple):
        lo, hi = norm
        return np.clip((m - lo) / (hi - lo), 0.0, 1.0)
    if norm == "per-image":
        lo, hi = float(m.min()), float(m.max())
        return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if norm == "fixed":
        return np.clip(m, 0.0, 1.0)
    raise ValueError("norm must be 'fixed', 'per-image' or (lo, hi)")


def overlay(image, anomaly_map, alpha: float = 0.5, norm: str | tuple[float, float] = "fixed",
            cmap: str = MAP_CMAP) -> np.ndarray:
    """Heat map blended over the image, HxWx3 in [0, 1]."""
    import matplotlib

    img = to_display_image(image)
    m = normalize_map(anomaly_map, norm)
    if m.shape != img.shape[:2]:
        m = torch.nn.functional.interpolate(torch.from_numpy(m)[None, None], size=img.shape[:2],
                                            mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = matplotlib.colormaps[cmap](m)[..., :3]
    return (1 - alpha) * img + alpha * heat


def figure3_panel(images: Sequence, masks: Sequence | None, maps: Sequence, titles: Sequence[str] | None = None,
                  norm: str | tuple[float, float] = "shared",
                  row_labels: Sequence[str] = ("image", "ground truth", "anomaly map", "overlay")):
    """Figure-3-style grid: one column per example; rows image / ground truth / map / overlay.

    ``norm="shared"`` (default): every map on one colour scale, the range of all maps shown (so panels compare);
    ``"fixed"``: probabilities on [0, 1]; ``"per-image"``: each map's own min-max (shapes only, not values).
    The scale is drawn as a colorbar and named in the title."""
    import matplotlib.pyplot as plt

    n = len(images)
    limits = shared_limits(maps) if norm == "shared" else norm
    rows = list(row_labels) if masks is not None else [r for r in row_labels if r != "ground truth"]
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n + 0.8, 2.2 * len(rows)), squeeze=False)
    shown = None
    for j in range(n):
        for i, what in enumerate(rows):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if what == "image":
                ax.imshow(to_display_image(images[j]))
                if titles:
                    ax.set_title(titles[j])
            elif what == "ground truth":
                mk = masks[j]
                mk = mk.cpu().numpy() if isinstance(mk, torch.Tensor) else np.asarray(mk)
                ax.imshow(np.nan_to_num(mk), cmap="gray", vmin=0, vmax=1)
            elif what == "anomaly map":
                m = np.asarray(maps[j], dtype=np.float32)
                if isinstance(limits, tuple):
                    shown = ax.imshow(m, cmap=MAP_CMAP, vmin=limits[0], vmax=limits[1])
                else:
                    shown = ax.imshow(normalize_map(m, limits), cmap=MAP_CMAP, vmin=0, vmax=1)
            else:
                ax.imshow(overlay(images[j], maps[j], norm=limits))
            if j == 0:
                ax.set_ylabel(what)
    scale = {"fixed": "probability 0-1", "per-image": "per-image min-max (shapes only)"}.get(
        limits if isinstance(limits, str) else "", f"shared by all panels, {limits[0]:.2f}-{limits[1]:.2f}"
        if isinstance(limits, tuple) else "")
    fig.suptitle(f"anomaly maps (colour scale: {scale})", fontsize=10)
    fig.tight_layout()
    if shown is not None:  # a colorbar beside the map row, in its own axes (the panels keep their size)
        fig.subplots_adjust(right=0.92)
        row = axes[rows.index("anomaly map")]
        top, bottom = row[0].get_position().y1, row[0].get_position().y0
        cax = fig.add_axes((0.935, bottom, 0.012, top - bottom))
        fig.colorbar(shown, cax=cax, label="anomaly score" + (" (per-image)" if limits == "per-image" else ""))
    return fig


def save_overlays(items: Sequence[tuple], folder: str | Path, norm: str = "fixed") -> Path:
    """Write ``<category>_<stem>_overlay.png`` for (category, path, image, mask, map) tuples."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for cat, path, image, _mask, amap in items:
        stem = Path(path).stem
        plt.imsave(folder / f"{cat}_{stem}_overlay.png", np.clip(overlay(image, amap, norm=norm), 0, 1))
    return folder


def pick_examples(dataset, n: int, n_normal: int = 0) -> list[int]:
    """Indices of ``n`` anomalous images with the largest masks, one category after the other (round robin), then
    ``n_normal`` normal images: examples for figures that show something (anomalies of 0.2 % of an image do not)."""
    by_cat: dict[str, list[tuple[float, int]]] = {}
    for i, r in enumerate(dataset.records):
        if r.label == 1:
            area = float((np.asarray(Image.open(r.mask_path).convert("L")) > 127).mean()) if r.mask_path else 0.0
            by_cat.setdefault(r.class_name, []).append((-area, i))
    queues = [sorted(v) for v in by_cat.values()]
    picks: list[int] = []
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0)[1])
    normals = [i for i, r in enumerate(dataset.records) if r.label == 0]
    return picks + normals[:n_normal]


# ------------------------------------------------------------------------------------------ Figure 3 with baselines
#: display names of the prompt designs in figures (paper Figure 3 / 4 wording)
METHOD_TITLES = {"bayes-pfl": "Bayes-PFL", "winclip": "WinCLIP-style", "aprilgan+": "APRIL-GAN+",
                 "anomalyclip+": "AnomalyCLIP+"}


def _as_array(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _resize_map(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if m.shape == tuple(shape):
        return m
    return torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(m))[None, None], size=shape,
                                           mode="bilinear", align_corners=False)[0, 0].numpy()


def figure3_methods(images: Sequence, masks: Sequence | None, maps_by_method, titles: Sequence[str] | None = None,
                    *, cmap: str = "inferno", limits: tuple[float, float] | str = (0.0, 1.0),
                    outline_color: str = "cyan", show_input: bool = True, panel_size: float = 1.9):
    """Paper Figure 3: the same images (columns), one row of anomaly maps per method, one shared colour scale.

    ``images``: CLIP-normalised ``[3, H, W]`` tensors (or HxWx3 arrays); ``masks``: ``[H, W]`` ground truths (NaN =
    none; ``None`` for no outlines); ``maps_by_method``: {method name: one ``[h, w]`` map per image} in row order
    (e.g. from :func:`figure3_method_maps`); ``titles``: one per column. The first row shows the inputs (when
    ``show_input``); every map panel uses the same perceptual colormap ``cmap`` and the same limits, drawn by one
    colorbar: ``limits=(0, 1)`` (default: the maps are probabilities, Eq. 11-12, so a cold panel means "normal"
    for every method) or ``"data"`` (the min and max over all panels of all methods). The ground-truth mask is
    outlined on every panel. Returns the figure (save it with :func:`save_figure`: PNG + PDF).
    """
    import matplotlib.pyplot as plt

    methods = list(maps_by_method)
    n = len(images)
    if not methods or n == 0:
        raise ValueError("figure3_methods needs at least one method and one image")
    for name in methods:
        if len(maps_by_method[name]) != n:
            raise ValueError(f"{name}: {len(maps_by_method[name])} maps for {n} images")
    display = [to_display_image(im) for im in images]
    maps = {name: [_resize_map(_as_array(m), display[j].shape[:2]) for j, m in enumerate(maps_by_method[name])]
            for name in methods}
    if isinstance(limits, str):
        if limits != "data":
            raise ValueError("limits: (vmin, vmax) or 'data'")
        vmin = float(min(m.min() for ms in maps.values() for m in ms))
        vmax = float(max(m.max() for ms in maps.values() for m in ms))
    else:
        vmin, vmax = map(float, limits)
    gts = None
    if masks is not None:
        gts = [np.nan_to_num(_as_array(mk)) > 0.5 for mk in masks]
    rows = (["input"] if show_input else []) + methods
    fig, axes = plt.subplots(len(rows), n, figsize=(panel_size * n + 1.0, panel_size * len(rows)), squeeze=False,
                             layout="constrained")
    image_artist = None
    for i, row in enumerate(rows):
        for j in range(n):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            if row == "input":
                ax.imshow(display[j])
            else:
                image_artist = ax.imshow(maps[row][j], cmap=cmap, vmin=vmin, vmax=vmax)
            if gts is not None and gts[j].any():
                gt = gts[j] if gts[j].shape == display[j].shape[:2] else _resize_map(
                    gts[j].astype(np.float32), display[j].shape[:2]) > 0.5
                ax.contour(gt.astype(np.float32), levels=[0.5], colors=outline_color, linewidths=0.8)
            if i == 0 and titles:
                ax.set_title(titles[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(METHOD_TITLES.get(row, row))
    bar = fig.colorbar(image_artist, ax=axes[1 if show_input else 0:, :].ravel().tolist(), shrink=0.8,
                       fraction=0.03, pad=0.01)
    bar.set_label("anomaly map M (Eq. 12)" + (", shared scale" if len(methods) > 1 else ""))
    outline = f"; {outline_color} outline: ground truth" if gts is not None else ""
    fig.suptitle(f"anomaly maps of each method on the same images (one colour scale, {vmin:.3g} to {vmax:.3g}"
                 f"{outline})", fontsize=9)
    fig.bpfl_rows = rows  # what each row shows (tests, notebooks)
    return fig
