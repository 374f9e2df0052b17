"""Zero-shot evaluation of a trained model on a dataset (paper §4.1, Tables 1-4).

Per category: R Monte-Carlo samples per image, optional Gaussian smoothing of the maps, image-level AUROC /
AP / F1-max and pixel-level AUROC / AP / F1-max / AUPRO, then the unweighted mean over categories. Writes
``metrics.csv``, ``metrics.md`` (with provenance), ``scores.csv`` (one row per image) and optional overlay PNGs.
"""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from . import metrics as M
from .backbone_choice import run_notes
from .config import BayesPFLConfig
from .data import collate
from .data.synthetic import is_synthetic_root
from .features import FeatureStore
from .model import BayesPFL
from .viz import save_overlays

#: released code: categories whose image score uses the top-20 map values (others: top-2000)
RELEASED_TOP20 = {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"}
#: released code: datasets whose image score is s_text only (HeadCT, BrainMRI, Br35H)
RELEASED_TEXT_ONLY = {"head ct", "brain ct", "brain"}


def smooth_maps(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Spatial Gaussian smoothing of [n, h, w] maps (released code: sigma = 8 before the pixel metrics)."""
    if not sigma:
        return maps
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(maps, sigma=(0, sigma, sigma), mode="reflect", truncate=4.0)


def released_image_scores(text_score: np.ndarray, topk_mean: np.ndarray, category: str,
                          alpha: float = 0.5) -> np.ndarray:
    """The released code's image score for one category: alpha·minmax(s_text) + (1-alpha)·minmax(top-k of M)."""
    def minmax(v: np.ndarray) -> np.ndarray:
        lo, hi = float(np.min(v)), float(np.max(v))
        return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    if category.lower() in RELEASED_TEXT_ONLY:
        return minmax(text_score)
    return alpha * minmax(text_score) + (1 - alpha) * minmax(topk_mean)


def released_topk(category: str) -> int:
    return 20 if category in RELEASED_TOP20 else 2000


def provenance(model: BayesPFL, *, dataset: str = "", protocol: str = "", n_samples: int | None = None,
               seeds: Sequence[int] = (), extra: dict | None = None, synthetic_data: bool | None = None) -> dict:
    """Everything a results table must carry to be reproducible, with the notes the weights call for
    (:func:`bpfl.backbone_choice.run_notes`; ``synthetic_data`` None: judged from the ``dataset`` path)."""
    cfg = model.config
    bb = model.backbone
    switches = cfg.differences(BayesPFLConfig(backbone=cfg.backbone, pretrained=cfg.pretrained,
                                              image_size=cfg.image_size, layers=cfg.layers))
    return {
        "backbone": bb.name, "pretrained": bb.pretrained or "random (no pretrained weights)",
        "weights": bb.weights_label(),
        "image_size": bb.image_size, "layers": list(bb.layers),
        "R": n_samples or cfg.test_samples, "K": cfg.flow_length, "B": cfg.n_prompts,
        "seeds": list(seeds), "dataset": dataset, "protocol": protocol,
        "config_vs_paper": {k: v[0] for k, v in switches.items()},
        "random_backbone": bb.is_random, "torch": torch.__version__, "device": str(bb.device),
        "host": platform.node(),
        "notes": run_notes(model, is_synthetic_root(dataset) if synthetic_data is None else synthetic_data),
        **(extra or {}),
    }


def provenance_markdown(prov: dict) -> str:
    lines = [f"- **{k}**: {v}" for k, v in prov.items() if k not in ("config_vs_paper", "notes")]
    diff = prov.get("config_vs_paper") or {}
    lines.append(f"- **config switches differing from the paper**: {diff if diff else 'none'}")
    return "\n".join([f"> **{note}**\n" for note in prov.get("notes") or []] + lines)


@dataclass
class EvalResult:
    per_category: dict[str, dict[str, float]]
    table: pd.DataFrame
    scores: pd.DataFrame
    provenance: dict
    seconds: float = 0.0
    files: dict[str, Path] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        return float(self.table.loc["mean", metric])


@torch.no_grad()
def predict_dataset(model: BayesPFL, dataset, indices: Sequence[int] | None = None, *, n_samples: int | None = None,
                    batch_size: int = 8, seed: int = 0, progress: bool = True, desc: str = "predict",
                    features: FeatureStore | None = None):
    """Yield (batch dict, BayesPFLOutput) over ``dataset`` (optionally a subset), R samples per image.

    ``features``: a :class:`bpfl.features.FeatureStore`; each image is then encoded once and its frozen CLIP
    features reused by every later call with the same store (R / seed sweeps; results unchanged).
    """
    model.eval()
    model.reset_state_samples()
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    for b, batch in enumerate(tqdm(loader, desc=desc, disable=not progress, leave=False)):
        feats = None if features is None else features.features(
            model.backbone, dataset, order[b * batch_size:(b + 1) * batch_size], batch["image"])
        out = model(batch["image"] if feats is None else None, batch["class_name"], n_samples=n_samples,
                    generator=gen, map_size=batch["image"].shape[-2:], features=feats)
        yield batch, out


def evaluate(model: BayesPFL, dataset, *, n_samples: int | None = None, batch_size: int = 8, seed: int = 0,
             map_sigma: float | None = None, aupro_variant: str | Sequence[str] | None = "mvtec",
             metric_method: str = "auto", out_dir: str | Path | None = None, overlays: int = 0,
             dataset_name: str = "", protocol: str = "zero-shot", progress: bool = True,
             categories: Sequence[str] | None = None, features: FeatureStore | None = None) -> EvalResult:
    """Zero-shot test of ``model`` on ``dataset`` (an :class:`bpfl.data.AnomalyDataset`).

    ``features``: a :class:`bpfl.features.FeatureStore` shared by several evaluations (seeds, R values, epochs) so
    that each image is encoded once; the results are the same as without it.

    ``map_sigma`` defaults to ``config.map_sigma`` (paper: none; released: 8). The image score follows
    ``config.image_score``: ``"sum"`` = s_text + max(M) (paper), ``"released"`` = per-category min-max fusion of
    s_text and the top-k mean of the un-smoothed map. Pixel metrics are computed for categories whose anomalous
    images all have masks; a metric undefined for a category (one class only) is NaN, never 0.
    """
    cfg = model.config
    sigma = cfg.map_sigma if map_sigma is None else map_sigma
    t0 = time.perf_counter()
    by_cat = dataset.by_category()
    if categories is not None:
        missing = sorted(set(categories) - set(by_cat))
        if missing:
            raise ValueError(f"categories {missing} not in the dataset (it has {sorted(by_cat)})")
        by_cat = {c: by_cat[c] for c in categories}
    if not by_cat:
        raise ValueError("the evaluation dataset is empty")
    per_category: dict[str, dict[str, float]] = {}
    score_rows: list[dict] = []
    overlay_items: list[tuple] = []
    for cat, idx in by_cat.items():
        labels, s_text, s_max, s_topk, s_sum, paths = [], [], [], [], [], []
        acc = None
        records = [dataset.records[i] for i in idx]
        has_masks = any(r.label == 1 for r in records) and all(r.mask_path for r in records if r.label == 1)
        if has_masks:
            method = metric_method
            if method == "auto":
                method = "exact" if len(idx) * dataset.image_size ** 2 <= (1 << 29) else "binned"
            acc = M.PixelMetricAccumulator(method, regions=aupro_variant is not None)
        k = released_topk(cat)
        for batch, out in predict_dataset(model, dataset, idx, n_samples=n_samples, batch_size=batch_size,
                                          seed=seed, progress=progress, desc=cat, features=features):
            maps = out.anomaly_map.float().cpu().numpy()
            flat = out.anomaly_map.flatten(1)
            s_topk.append(flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1).cpu().numpy())
            labels.append(batch["label"].numpy())
            s_text.append(out.text_score.cpu().numpy())
            s_max.append(out.map_max.cpu().numpy())
            s_sum.append(out.image_score.cpu().numpy())
            paths += list(batch["path"])
            smoothed = smooth_maps(maps, sigma)
            if acc is not None:
                masks = np.nan_to_num(batch["mask"].numpy(), nan=0.0) > 0.5
                acc.update(masks, smoothed.astype(np.float32))
            if overlays and sum(1 for o in overlay_items if o[0] == cat) < overlays:
                for j in range(min(len(maps), overlays)):
                    overlay_items.append((cat, batch["path"][j], batch["image"][j], batch["mask"][j], smoothed[j]))
        labels_a = np.concatenate(labels)
        text_a, max_a, topk_a, sum_a = (np.concatenate(v) for v in (s_text, s_max, s_topk, s_sum))
        if cfg.image_score == "released":
            scores = released_image_scores(text_a, topk_a, cat)
        else:
            scores = sum_a
        # undefined (one class only): NaN, left out of the mean (paper tables) | 0, entering it (released code)
        row = M.image_metrics(labels_a, scores, category=cat,
                              undefined=0.0 if cfg.undefined_metrics == "zero" else math.nan)
        if acc is not None:
            variants = () if aupro_variant is None else ((aupro_variant,) if isinstance(aupro_variant, str)
                                                          else tuple(aupro_variant))
            row.update(acc.compute(variants, category=cat))
        per_category[cat] = row
        for p, lab, sc, st, sm, tk in zip(paths, labels_a, scores, text_a, max_a, topk_a):
            score_rows.append({"category": cat, "path": p, "label": int(lab), "image_score": float(sc),
                               "text_score": float(st), "map_max": float(sm), f"map_top{k}_mean": float(tk)})
    table = M.category_table(per_category)
    prov = provenance(model, dataset=dataset_name or str(getattr(dataset, "root", "")), protocol=protocol,
                      n_samples=n_samples, seeds=[seed], extra={"training_seed": cfg.seed, "map_sigma": sigma,
                                                                "image_score": cfg.image_score,
                                                                "aupro_variant": aupro_variant})
    result = EvalResult(per_category, table, pd.DataFrame(score_rows), prov, time.perf_counter() - t0)
    if out_dir is not None:
        result.files = write_results(result, out_dir, title=f"Zero-shot results on {prov['dataset']}")
        if overlay_items:
            result.files["overlays"] = save_overlays(overlay_items, Path(out_dir) / "overlays")
    return result


def write_results(result: EvalResult, out_dir: str | Path, title: str = "Results") -> dict[str, Path]:
    """metrics.csv, metrics.md (table + provenance), scores.csv and provenance.json in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics_csv": out / "metrics.csv", "metrics_md": out / "metrics.md",
             "scores_csv": out / "scores.csv", "provenance": out / "provenance.json"}
    result.table.to_csv(files["metrics_csv"])
    result.scores.to_csv(files["scores_csv"], index=False)
    files["provenance"].write_text(json.dumps(result.provenance, indent=2, default=str))
    pct = (result.table.drop(index="n_averaged", errors="ignore") * 100).round(1)
    files["metrics_md"].write_text(f"# {title}\n\n{provenance_markdown(result.provenance)}\n\n"
                                   f"Metrics in %, per category and the unweighted mean over categories "
                                   f"(NaN: undefined for that category).\n\n{markdown_table(pct)}\n")
    return files


def markdown_table(df: pd.DataFrame, index_name: str | None = None) -> str:
    """A pipe table of a DataFrame (no extra dependency)."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else f"{v:g}"
        return str(v)
    head = [index_name or df.index.name or ""] + [str(c) for c in df.columns]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, r in df.iterrows():
        rows.append("| " + " | ".join([str(idx)] + [cell(v) for v in r.tolist()]) + " |")
    return "\n".join(rows)


def selection_score(model: BayesPFL, dataset, *, batch_size: int = 8, seed: int = 0) -> float:
    """The validation score behind ``config.selection`` (higher is better): category-mean pixel AP at
    R = ``config.validation_samples`` (None: the test R, ``config.test_samples``; released code: 5).

    Use it as ``bpfl.train.train(..., val_fn=lambda m: selection_score(m, held_out))``. The paper selects
    nothing (``selection="last"``); ``"released-target"`` validates on TARGET categories (leakage).
    """
    cfg = model.config
    res = evaluate(model, dataset, n_samples=cfg.validation_samples or cfg.test_samples, batch_size=batch_size,
                   seed=seed, progress=False, aupro_variant=None)
    return res.mean("pixel_ap")


#: caption of a mean ± std over Monte-Carlo redraws (one trained model) and over independent training runs
MC_CAPTION = "mean ± std over {n} Monte-Carlo redraws of one trained model (sampling seeds {seeds})"
RUNS_CAPTION = "mean ± std over {n} training runs (training seeds {seeds})"


def mean_std_summary(rows: pd.DataFrame, caption: str, kind: str) -> pd.DataFrame:
    """``rows`` (one row per seed, one column per metric) -> DataFrame(index=metric, columns mean/std/n).

    std is the sample standard deviation (ddof = 1; 0 for a single row). ``caption`` and ``kind``
    ("monte-carlo" or "training-runs") are kept in ``summary.attrs`` so a table says what its ± means.
    """
    std = rows.std(ddof=1) if len(rows) > 1 else rows.std(ddof=0)
    summary = pd.DataFrame({"mean": rows.mean(), "std": std, "n": rows.notna().sum().astype(int)})
    summary.attrs.update(caption=caption, kind=kind, n=len(rows))
    return summary


def write_mean_std(rows: pd.DataFrame, summary: pd.DataFrame, out_dir: str | Path, stem: str,
                   title: str, provenance_md: str = "") -> dict[str, Path]:
    """``<stem>.csv`` (one row per seed), ``<stem>_summary.csv`` and ``<stem>_summary.md`` (caption, %)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"rows": out / f"{stem}.csv", "summary_csv": out / f"{stem}_summary.csv",
             "summary_md": out / f"{stem}_summary.md"}
    rows.to_csv(files["rows"])
    summary.to_csv(files["summary_csv"])
    table = format_mean_std(summary).rename("value").to_frame()
    files["summary_md"].write_text(f"# {title}\n\n**{summary.attrs['caption']}** (metrics in %).\n\n"
                                   + (f"{provenance_md}\n\n" if provenance_md else "")
                                   + markdown_table(table, index_name="metric") + "\n")
    return files


def evaluate_mc_seeds(model: BayesPFL, dataset, seeds: Sequence[int], **kwargs) -> pd.DataFrame:
    """Mean ± std over Monte-Carlo sampling seeds of ONE trained model (category-mean metrics).

    Only the R prompt samples of Eq. 8-9 are redrawn; the trained weights stay the same. This is NOT the
    paper's "5 random seeds", which are independent training runs (:func:`bpfl.seeds.train_and_evaluate_seeds`,
    ``bpfl test --checkpoint a.pt b.pt ...``): it understates the spread, most of all at small R (Table 3).
    Returns DataFrame(index=metric, columns mean/std/n) whose ``attrs["caption"]`` says so; with ``out_dir``
    writes ``mc_seeds.csv``, ``mc_seeds_summary.csv`` and ``mc_seeds_summary.md``.
    """
    out_dir = kwargs.pop("out_dir", None)
    if len(seeds) > 1 and kwargs.get("features") is None:  # the seeds share each image's encoder pass
        kwargs["features"] = FeatureStore()
    rows, prov = [], None
    for s in seeds:
        res = evaluate(model, dataset, seed=s, **kwargs)
        rows.append(res.table.loc["mean"].rename(f"mc seed {s}"))
        prov = prov or res.provenance
    df = pd.DataFrame(rows)
    df.index.name = "monte_carlo_seed"
    summary = mean_std_summary(df, MC_CAPTION.format(n=len(seeds), seeds=", ".join(map(str, seeds))),
                               kind="monte-carlo")
    if out_dir:
        summary.attrs["files"] = write_mean_std(df, summary, out_dir, "mc_seeds",
                                                "Monte-Carlo redraws of one trained model",
                                                provenance_markdown(prov) if prov else "")
    return summary


def evaluate_seeds(model: BayesPFL, dataset, seeds: Sequence[int], **kwargs) -> pd.DataFrame:
    """Deprecated name of :func:`evaluate_mc_seeds` (Monte-Carlo redraws of one trained model, NOT training
    runs: for the paper's seeds use :func:`bpfl.seeds.train_and_evaluate_seeds`)."""
    import warnings
    warnings.warn("evaluate_seeds redraws only the Monte-Carlo prompt samples of one trained model; it is now "
                  "called evaluate_mc_seeds. The paper's seeds are training runs: "
                  "bpfl.seeds.train_and_evaluate_seeds.", DeprecationWarning, stacklevel=2)
    return evaluate_mc_seeds(model, dataset, seeds, **kwargs)


def format_mean_std(summary: pd.DataFrame, percent: bool = True) -> pd.Series:
    f = 100.0 if percent else 1.0
    return pd.Series({k: (f"{summary.at[k, 'mean'] * f:.1f} ± {summary.at[k, 'std'] * f:.1f}"
                          if not math.isnan(summary.at[k, "mean"]) else "n/a") for k in summary.index})
