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

from .data import denormalize


def set_style() -> None:
    """The kit's plotting style (seaborn whitegrid, readable fonts), used by every notebook and figure."""
    import matplotlib
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook", palette="deep")
    matplotlib.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight",
                                "image.cmap": "jet", "axes.titlesize": 10})


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


def normalize_map(m: np.ndarray, norm: str = "fixed") -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    if norm == "per-image":
        lo, hi = float(m.min()), float(m.max())
        return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    if norm == "fixed":
        return np.clip(m, 0.0, 1.0)
    raise ValueError("norm must be 'fixed' or 'per-image'")


def overlay(image, anomaly_map, alpha: float = 0.5, norm: str = "fixed", cmap: str = "jet") -> np.ndarray:
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
                  norm: str = "fixed", row_labels: Sequence[str] = ("image", "ground truth", "anomaly map", "overlay")):
    """Figure-3-style grid: one column per example; rows image / ground truth / map / overlay."""
    import matplotlib.pyplot as plt

    n = len(images)
    rows = list(row_labels) if masks is not None else [r for r in row_labels if r != "ground truth"]
    fig, axes = plt.subplots(len(rows), n, figsize=(2.2 * n, 2.2 * len(rows)), squeeze=False)
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
                ax.imshow(normalize_map(maps[j], norm), cmap="jet", vmin=0, vmax=1)
            else:
                ax.imshow(overlay(images[j], maps[j], norm=norm))
            if j == 0:
                ax.set_ylabel(what)
    fig.suptitle(f"anomaly maps (colour scale: {'probability 0-1' if norm == 'fixed' else 'per-image min-max'})",
                 fontsize=10)
    fig.tight_layout()
    return fig


def save_overlays(items: Sequence[tuple], folder: str | Path, norm: str = "fixed") -> Path:
    """Write ``<category>_<stem>_overlay.png`` for (category, path, image, mask, map) tuples."""
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for cat, path, image, mask, amap in items:
        stem = Path(path).stem
        plt.imsave(folder / f"{cat}_{stem}_overlay.png", np.clip(overlay(image, amap, norm=norm), 0, 1))
    return folder
