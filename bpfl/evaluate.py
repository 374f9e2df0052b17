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

from . import metrics as M
from .config import BayesPFLConfig
from .model import BayesPFL

#: released code: categories whose image score uses the top-20 map values (others: top-2000)
RELEASED_TOP20 = {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum"}
#: released code: datasets whose image score is s_text only (HeadCT, BrainMRI, Br35H)
RELEASED_TEXT_ONLY = {"head ct", "brain ct", "brain"}

#: Paper Table 1, Bayes-PFL column: (image AUROC, F1-max, AP) and (pixel AUROC, PRO, AP), in %.
PAPER_TABLE1 = {
    "MVTec-AD": {"image": (92.3, 93.1, 96.7), "pixel": (91.8, 87.4, 48.3)},
    "VisA": {"image": (87.0, 84.1, 89.2), "pixel": (95.6, 88.9, 29.8)},
    "BTAD": {"image": (93.2, 91.9, 96.5), "pixel": (93.9, 76.6, 47.1)},
    "KSDD2": {"image": (97.3, 92.3, 97.9), "pixel": (99.6, 97.6, 73.7)},
    "RSDD": {"image": (94.1, 89.6, 92.3), "pixel": (99.6, 98.0, 39.1)},
    "DAGM": {"image": (97.7, 95.7, 97.0), "pixel": (99.3, 98.0, 43.1)},
    "DTD-Synthetic": {"image": (95.1, 95.1, 98.4), "pixel": (97.8, 94.3, 69.9)},
}


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
               seeds: Sequence[int] = (), extra: dict | None = None) -> dict:
    """Everything a results table must carry to be reproducible."""
    cfg = model.config
    bb = model.backbone
    switches = cfg.differences(BayesPFLConfig(backbone=cfg.backbone, pretrained=cfg.pretrained,
                                              image_size=cfg.image_size, layers=cfg.layers))
    return {
        "backbone": bb.name, "pretrained": bb.pretrained or "random (no pretrained weights)",
        "image_size": bb.image_size, "layers": list(bb.layers),
        "R": n_samples or cfg.test_samples, "K": cfg.flow_length, "B": cfg.n_prompts,
        "seeds": list(seeds), "dataset": dataset, "protocol": protocol,
        "config_vs_paper": {k: v[0] for k, v in switches.items()},
        "random_backbone": bb.is_random, "torch": torch.__version__, "device": str(bb.device),
        "host": platform.node(), **(extra or {}),
    }


def provenance_markdown(prov: dict) -> str:
    lines = [f"- **{k}**: {v}" for k, v in prov.items() if k != "config_vs_paper"]
    diff = prov.get("config_vs_paper") or {}
    lines.append(f"- **config switches differing from the paper**: {diff if diff else 'none'}")
    if prov.get("random_backbone"):
        lines.insert(0, "> **Random-weight backbone: these numbers show the pipeline's mechanics only, not the "
                        "method.** Zero-shot transfer to unseen categories needs pretrained CLIP features.")
    return "\n".join(lines)


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
                    batch_size: int = 8, seed: int = 0, progress: bool = True, desc: str = "predict"):
    """Yield (batch dict, BayesPFLOutput) over ``dataset`` (optionally a subset), R samples per image."""
    from tqdm.auto import tqdm

    from .data import collate

    model.eval()
    model.reset_state_samples()
    subset = dataset if indices is None else Subset(dataset, list(indices))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    gen = torch.Generator().manual_seed(seed)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        out = model(batch["image"], batch["class_name"], n_samples=n_samples, generator=gen,
                    map_size=batch["image"].shape[-2:])
        yield batch, out


def evaluate(model: BayesPFL, dataset, *, n_samples: int | None = None, batch_size: int = 8, seed: int = 0,
             map_sigma: float | None = None, aupro_variant: str | Sequence[str] | None = "mvtec",
             metric_method: str = "auto", out_dir: str | Path | None = None, overlays: int = 0,
             dataset_name: str = "", protocol: str = "zero-shot", progress: bool = True,
             categories: Sequence[str] | None = None) -> EvalResult:
    """Zero-shot test of ``model`` on ``dataset`` (an :class:`bpfl.data.AnomalyDataset`).

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
                                          seed=seed, progress=progress, desc=cat):
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
        row = M.image_metrics(labels_a, scores, category=cat)
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
                      n_samples=n_samples, seeds=[seed], extra={"map_sigma": sigma,
                                                                "image_score": cfg.image_score,
                                                                "aupro_variant": aupro_variant})
    result = EvalResult(per_category, table, pd.DataFrame(score_rows), prov, time.perf_counter() - t0)
    if out_dir is not None:
        result.files = write_results(result, out_dir, title=f"Zero-shot results on {prov['dataset']}")
        if overlay_items:
            from .viz import save_overlays
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


def evaluate_seeds(model: BayesPFL, dataset, seeds: Sequence[int], **kwargs) -> pd.DataFrame:
    """Mean ± std over Monte-Carlo seeds of the category-mean metrics (the paper reports 5 seeds)."""
    rows = []
    for s in seeds:
        res = evaluate(model, dataset, seed=s, **{k: v for k, v in kwargs.items() if k != "out_dir"})
        rows.append(res.table.loc["mean"].rename(f"seed {s}"))
    df = pd.DataFrame(rows)
    summary = pd.DataFrame({"mean": df.mean(), "std": df.std(ddof=1) if len(seeds) > 1 else df.std(ddof=0)})
    if kwargs.get("out_dir"):
        out = Path(kwargs["out_dir"])
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "seeds.csv")
        summary.to_csv(out / "seeds_summary.csv")
    return summary


def format_mean_std(summary: pd.DataFrame, percent: bool = True) -> pd.Series:
    f = 100.0 if percent else 1.0
    return pd.Series({k: (f"{summary.at[k, 'mean'] * f:.1f} ± {summary.at[k, 'std'] * f:.1f}"
                          if not math.isnan(summary.at[k, "mean"]) else "n/a") for k in summary.index})
