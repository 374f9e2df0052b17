"""The notebooks' interactive pieces: live loss curves, the K slider (notebook 02) and the R slider (notebook 04).

Every widget is a real ``ipywidgets`` control; its callbacks are plain functions kept in the returned ``state``
dict, so tests drive them without a browser.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from ..viz import MAP_CMAP, to_display_image
from .flow2d import demo_flow_2d, flow_density_2d, flow_samples_2d, grid_2d, histogram_density, truncate_flow

LOSS_TERMS = ("cls", "focal", "dice", "ort", "kl_context", "kl_normal", "kl_abnormal", "total")


def plot_loss_terms(steps, terms: Sequence[str] = LOSS_TERMS, fig=None, title: str = ""):
    """One small panel per loss term of Eq. 14 against the optimisation step (terms absent from ``steps`` skipped)."""
    present = [t for t in terms if len(steps) and t in steps.columns]
    if fig is None:
        fig = plt.figure(figsize=(11, 4.6))
    fig.clear()
    ncol = 4
    nrow = max(1, math.ceil(len(present) / ncol))
    for i, t in enumerate(present):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.plot(steps["step"], steps[t], lw=1.2, color="C3" if t == "total" else "C0")
        if "epoch_end" in steps.columns:
            for s in steps.loc[steps["epoch_end"].notna(), "step"]:
                ax.axvline(s, color="0.55", lw=0.7, ls=":")
        ax.set_title(t)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class LiveLossPlot:
    """Loss curves redrawn after every epoch (an IPython display handle; silent outside IPython)."""

    def __init__(self, step_log: list[dict]):
        self.step_log = step_log
        self.fig = plt.figure(figsize=(11, 4.6))
        plt.close(self.fig)
        self.handle = None

    def update(self, epoch: int) -> None:
        plot_loss_terms(pd.DataFrame(self.step_log), fig=self.fig, title=f"live: after epoch {epoch}")
        try:
            from IPython import get_ipython
            from IPython.display import display
            if get_ipython() is None:
                return
            if self.handle is None:
                self.handle = display(self.fig, display_id=True)
            else:
                self.handle.update(self.fig)
        except Exception:  # no IPython: nothing to show
            pass

    def close(self) -> None:
            plt.close(self.fig)


def k_slider_demo(k_max: int = 12, grid_n: int = 90, extent: float = 4.5, seed: int = 2, n_samples: int = 100000,
                  k_start: int | None = None, show: bool = True):
    """A K slider that redraws a 2-D prompt-flow density: Eq. 6 on a grid next to a histogram of samples.

    Returns ``(slider, state)``; ``state["update"](k)`` is the callback (densities are cached per K, so the
    slider responds at once), ``state["density"]`` the Eq. 6 density now shown ([grid_n, grid_n]),
    ``state["hist"]`` the sample histogram, ``state["mass"]`` ∫q over the grid, ``state["ui"]`` the box to display.
    """
    import ipywidgets as widgets  # the notebooks extra

    stack = demo_flow_2d(k_max, seed=seed)
    pts, area = grid_2d(grid_n, extent)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def compute(k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in cache:
            sub = truncate_flow(stack, k)
            dens = flow_density_2d(sub, pts).reshape(grid_n, grid_n).numpy()
            hist = histogram_density(flow_samples_2d(sub, n_samples), grid_n, extent)
            cache[k] = (dens, hist)
        return cache[k]

    k0 = k_max // 2 if k_start is None else k_start
    dens, hist = compute(k0)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    vmax = float(np.quantile(dens, 0.995))
    ext = (-extent, extent, -extent, extent)
    im_d = axes[0].imshow(dens, origin="lower", extent=ext, cmap="viridis", vmin=0, vmax=vmax)
    im_h = axes[1].imshow(hist, origin="lower", extent=ext, cmap="viridis", vmin=0, vmax=vmax)
    axes[1].set_title(f"histogram of {n_samples} samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    plt.close(fig)
    out = widgets.Output()
    slider = widgets.IntSlider(value=k0, min=0, max=k_max, step=1, description="K (flows)", continuous_update=True)
    state: dict[str, Any] = {"stack": stack, "cache": cache, "fig": fig, "axes": axes, "images": (im_d, im_h),
                             "output": out, "slider": slider, "history": []}

    def update(k: int) -> None:
        k = int(k)
        dens, hist = compute(k)
        vmax = float(np.quantile(dens, 0.995)) or 1.0
        im_d.set_data(dens)
        im_h.set_data(hist)
        for im in (im_d, im_h):
            im.set_clim(0, vmax)
        mass = float(dens.sum() * area)
        axes[0].set_title(f"Eq. 6 density, K = {k}  (∫q ≈ {mass:.3f})")
        state.update(K=k, density=dens, hist=hist, mass=mass)
        state["history"].append(k)
        if show:
            from IPython.display import display
            with out:
                out.clear_output(wait=True)
                display(fig)

    slider.observe(lambda change: update(change["new"]), names="value")
    state["update"] = update
    state["ui"] = widgets.VBox([slider, out])
    update(k0)
    return slider, state



# ----------------------------------------------------------------------------------------------------------
# the R slider over cached features (notebook 04)
# ----------------------------------------------------------------------------------------------------------
def r_slider_demo(model, images: torch.Tensor, class_names: Sequence[str], r_max: int = 8, seed: int = 0,
                  r_start: int | None = None, titles: Sequence[str] | None = None, show: bool = True,
                  labels: Sequence[int] | None = None, masks: Sequence | None = None):
    """An R slider (and a 're-draw samples' button) showing how the anomaly maps and scores change with R.

    The CLIP features are computed once; one forward pass draws ``r_max`` samples and keeps the map of each
    sample r (mean over layers and prompts). The map for R is the mean of the first R sample maps (Eq. 12),
    s_text the mean of the first R softmax scores, s = s_text + max(M) -- so moving the slider costs no model
    call. The button draws a fresh set of samples (next seed).

    The figure has one column per image and four rows: the image (its title says *normal* or *anomalous* when
    ``labels`` are given, normal ones in green; ``masks`` are outlined), M at R = 1 (the first sample alone, the
    reference), M at the slider's R, and the per-pixel std over those R sample maps. Both map rows share ONE colour
    scale and the std row another; both are fixed when the widget is built (from all ``r_max`` samples), so
    moving the slider or re-drawing changes the pictures, never their scales. Each row has a colorbar.

    Returns ``(slider, state)``: ``state["update"](R)`` and ``state["redraw"]()`` are the callbacks;
    ``state["maps"]`` [N, h, w] and ``state["scores"]`` [N] what is shown; ``state["spread"]`` the per-pixel std
    over the R sample maps; ``state["limits"]`` and ``state["spread_limits"]`` the fixed colour scales;
    ``state["button"]``; ``state["ui"]`` the box to display.
    """
    import ipywidgets as widgets  # the notebooks extra


    if model.config.ensemble != "image":
        raise ValueError("the R slider needs the image ensemble (one map per sample); config.ensemble='image'")
    model.eval()
    with torch.no_grad():
        feats = model.backbone.encode_image(images)
    names = list(class_names)
    size = tuple(images.shape[-2:])
    state: dict[str, Any] = {"seed": seed, "history": []}

    def draw(s: int) -> None:
        gen = torch.Generator().manual_seed(int(s))
        with torch.no_grad():
            out = model(None, names, n_samples=r_max, features=feats, generator=gen, map_size=size,
                        return_sample_maps=True)
        state["sample_maps"] = out.sample_maps.float().cpu().numpy()  # [N, R, h, w]
        state["sample_probs"] = torch.softmax(out.image_logits, dim=1)[:, 1].float().cpu().numpy()  # [N, R, B]
        state["seed"] = int(s)

    draw(seed)
    n = len(names)
    sm_all = state["sample_maps"]
    # fixed scales: every M_R is a mean of sample maps, so it lies within their range; the std row's scale is
    # the largest std any R shows (99.5th percentile, so that one pixel does not set it)
    lo, hi = float(np.percentile(sm_all, 0.5)), float(np.percentile(sm_all, 99.5))
    hi = hi if hi > lo else lo + 1e-6
    spread_hi = max(float(np.percentile(sm_all[:, :r].std(1), 99.5)) for r in range(1, r_max + 1)) or 1e-6
    state.update(limits=(lo, hi), spread_limits=(0.0, spread_hi))
    fig, axes = plt.subplots(4, n, figsize=(2.2 * n + 1.2, 9.4), squeeze=False, layout="constrained")
    ref_ims, map_ims, spread_ims = [], [], []
    gts = None
    if masks is not None:
        gts = [np.nan_to_num(np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m, dtype=np.float32)) > 0.5
               for m in masks]
    for j in range(n):
        axes[0, j].imshow(to_display_image(images[j]))
        title = titles[j] if titles else names[j]
        colour = "black"
        if labels is not None:
            normal = int(labels[j]) == 0
            title += " · normal" if normal else " · anomalous"
            colour = "tab:green" if normal else "black"
            if normal:
                for side in axes[0, j].spines.values():
                    side.set_edgecolor("tab:green")
                    side.set_linewidth(3)
        axes[0, j].set_title(title, fontsize=8, color=colour)
        ref_ims.append(axes[1, j].imshow(sm_all[j, 0], cmap=MAP_CMAP, vmin=lo, vmax=hi))
        map_ims.append(axes[2, j].imshow(sm_all[j, 0], cmap=MAP_CMAP, vmin=lo, vmax=hi))
        spread_ims.append(axes[3, j].imshow(np.zeros(size), cmap="magma", vmin=0, vmax=spread_hi))
        for i in range(4):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].grid(False)
            if gts is not None and gts[j].any() and i > 0:
                axes[i, j].contour(gts[j].astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.7)
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("M at R = 1\n(first sample)")
    axes[3, 0].set_ylabel("std over the\nR sample maps")
    fig.colorbar(map_ims[0], ax=list(axes[1:3].ravel()), shrink=0.8, fraction=0.03, pad=0.01,
                 label="M (one scale for both rows)", extend="both")
    fig.colorbar(spread_ims[0], ax=list(axes[3]), shrink=0.8, fraction=0.03, pad=0.01, label="std", extend="max")
    plt.close(fig)
    out_w = widgets.Output()
    r0 = min(r_max, 1 if r_start is None else r_start)
    slider = widgets.IntSlider(value=r0, min=1, max=r_max, step=1, description="R (samples)",
                               continuous_update=True)
    button = widgets.Button(description="re-draw samples", icon="refresh")

    def scores_at(r: int):
        maps = state["sample_maps"][:, :r].mean(1)
        s_text = state["sample_probs"][:, :r].mean(axis=(1, 2))
        s_img = maps.reshape(n, -1).max(1)
        return maps, s_text, s_img

    def update(r: int) -> None:
        r = int(r)
        sm = state["sample_maps"][:, :r]
        maps, s_text, s_img = scores_at(r)
        spread = sm.std(1)
        ref, t1, i1 = scores_at(1)
        scores = s_text + s_img
        for j in range(n):
            ref_ims[j].set_data(ref[j])
            map_ims[j].set_data(maps[j])
            spread_ims[j].set_data(spread[j])
            axes[1, j].set_title(f"s = {t1[j]:.2f} + {i1[j]:.2f} = {t1[j] + i1[j]:.2f}", fontsize=7)
            axes[2, j].set_title(f"s = {s_text[j]:.2f} + {s_img[j]:.2f} = {scores[j]:.2f}", fontsize=7)
        axes[2, 0].set_ylabel(f"M at R = {r}\n(mean of {r} maps)")
        fig.suptitle(f"R = {r} of {r_max} samples (seed {state['seed']}); titles: s = s_text + max(M)", fontsize=10)
        state.update(R=r, maps=maps, spread=spread, scores=scores, s_text=s_text, s_img=s_img)
        state["history"].append((state["seed"], r))
        if show:
            from IPython.display import display
            with out_w:
                out_w.clear_output(wait=True)
                display(fig)

    def redraw(*_args) -> None:
        draw(state["seed"] + 1)
        update(slider.value)

    slider.observe(lambda change: update(change["new"]), names="value")
    button.on_click(redraw)
    state.update(update=update, redraw=redraw, button=button, slider=slider, fig=fig, axes=axes, output=out_w,
                 features=feats, ui=widgets.VBox([widgets.HBox([slider, button]), out_w]))
    update(r0)
    return slider, state
