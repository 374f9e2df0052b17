"""Zero-shot anomaly detection metrics, computed the way the field's tables are (paper §4.1).

Every number in a Bayes-PFL / AnomalyCLIP / AdaCLIP table is computed **per category** and then averaged
over the categories with equal weight. This module provides exactly those metrics, fast enough for
full-resolution maps (one MVTec category ≈ 200 maps of 518² ≈ 54 M pixels), and checked against
scikit-learn and brute-force references in ``tests/test_metrics.py``.

Conventions
-----------
* Labels and masks: ``True``/1 = anomalous (the positive class). Non-boolean masks are binarised with
  ``mask > 0.5``; this is the authors' rule for bilinearly resized masks. Resize masks with
  nearest-neighbour interpolation where you can.
* Scores and maps: higher = more anomalous. Any real values are accepted and used **as given**.
  There is no sigmoid and no per-batch normalisation. (torchmetrics' binary AUROC/AP apply a
  sigmoid to any batch with values outside [0, 1]. The order then depends on the batch, and
  the result no longer matches scikit-learn.) Only the order of the scores matters. NaN and inf
  raise ``ValueError``, as in scikit-learn.
* Thresholds are the distinct score values. A sample is predicted anomalous when ``score >= t``, as in
  ``sklearn.metrics.roc_curve``/``precision_recall_curve``. Tied scores move together.

Definitions (P positives, N negatives, TP(t), FP(t) counted with ``score >= t``)
--------------------------------------------------------------------------------
* **AUROC** = the area under the ROC curve (FPR = FP/N, TPR = TP/P), with linear interpolation between
  distinct thresholds. This is ``sklearn.metrics.roc_auc_score``. It equals the Mann-Whitney statistic with
  ties counted as 1/2, and the kit computes it in that form, in exact integer arithmetic:
  AUROC = Σ_v p_v · (2·n_{<v} + n_{=v}) / (2PN), summed over the distinct values v, where p_v is the
  number of positives at v and n_{<v}, n_{=v} count the negatives below and equal to v.
* **AP** (average precision) = Σ_k (R_k − R_{k−1}) · P_k over the thresholds in decreasing order. This is
  the step-wise sum of ``sklearn.metrics.average_precision_score``, with no trapezoid. Only the
  thresholds that contain positives contribute, so AP = Σ_v (p_v / P) · TP(v) / (TP(v) + FP(v)).
* **F1-max** = max over thresholds of 2PR/(P+R) = 2TP / (TP + FP + P). It is the maximum over
  ``precision_recall_curve``'s points. The authors add ε = 1e-8 (pixel) or 1e-6 (image) to the
  denominator. This changes the value by < 1e-6, and the kit uses ε = 0. The maximum is always reached at a
  threshold that contains a positive. With ``details=True`` the threshold is returned together with
  **IoU** = TP / (FP + P) at that threshold (the authors' "IoU at the F1-max threshold"; F1 = 2·IoU/(1+IoU), so the
  same threshold also maximises IoU).
* **PRO** (per-region overlap; Bergmann et al., MVTec AD, IJCV 2021). The ground-truth mask of each
  image is split into connected regions, using **8-connectivity** (``scipy.ndimage.label`` with a 3×3
  structure of ones inside each image and no connection across images). This is skimage's
  default for 2-D and the authors' setting. PRO(t) is the mean, over **all regions of all images** of
  the category, of the region's TPR (the share of the region's pixels with ``score >= t``). Each
  anomalous pixel therefore carries the weight 1/(|region| · #regions), and PRO(t) is a weighted
  cumulative sum over the sorted scores. The kit uses this, so there is no loop over thresholds or images.
* **AUPRO**, two named variants. Always say which one you report; the keys differ:

  - ``"mvtec"`` (default, key ``pixel_aupro``): the MVTec AD definition. Take the PRO-vs-FPR curve
    over all distinct thresholds, starting at (0, 0) and linear between points. Integrate it with the
    trapezoid rule over FPR ∈ [0, L], with the curve interpolated exactly at FPR = L, and divide by L
    (L = ``fpr_limit`` = 0.3). A perfect map scores 1.
  - ``"cflow"`` (key ``pixel_aupro_cflow``): the cflow-ad variant in the ZSAD repositories (Bayes-PFL's
    ``cal_pro_score``, whose call is commented out in the released test script). Take T = 200 thresholds
    t_k = min + k·(max − min)/T, k = 0..T−1, over the category's maps, and predict anomalous when
    ``score > t_k`` (strict). Keep the points with FPR < L, min-max rescale those FPRs to [0, 1], and
    integrate PRO over them with the trapezoid rule (``sklearn.metrics.auc``). The rescaling makes the
    number depend on where the thresholds happen to fall, so it is not comparable to ``"mvtec"``.
    The authors use ``np.arange(min, max, step)``, which can yield a 201st threshold through
    floating-point rounding; the kit always uses exactly T. Each float64 t_k is compared with the scores
    exactly. Under NumPy 2's promotion rules, ``maps > t`` with a *Python* float t and float32 maps
    first rounds t to float32. That can move a threshold past a tied score, so a reference
    implementation should compare with ``np.float64(t)``.

Undefined metrics
-----------------
AUROC, AP, F1-max and AUPRO need both classes. A category with only anomalous images (ISIC, ClinicDB,
Kvasir, ...) or without anomalous pixels gives **NaN**. An :class:`UndefinedMetricWarning` names the
category and the metric. NaN is never silently turned into 0. The released Bayes-PFL script writes 0 for
such image metrics, and the 0 enters the category mean; ``image_metrics(..., undefined=0.0)``
reproduces that on purpose. :func:`category_table` and :func:`category_means` average over the
categories where a metric is defined and report how many those were.

Exact and binned computation
----------------------------
``method="exact"`` (the default, and what ``"auto"`` picks up to 2**29 pixels) is exact. It splits
the pixels into negatives and positives, sorts the negatives once (numpy's SIMD sort, in place, in the
maps' own float32), argsorts the much smaller set of positives, and reads every count it needs
(n_{<v}, n_{=v}) with ``np.searchsorted``. AUROC, AP, F1-max and both AUPROs all reuse this one sort.
Ties are handled exactly as scikit-learn does: each distinct float value is one threshold. The extra
memory is about one float32 copy of the pixels. On one MVTec-sized category (54 M pixels, 2 cores) the kit
needs 0.5–1.2 s and ≈ 250 MB of numpy allocations for AUROC + AP + F1-max, and 0.8–1.7 s and ≈ 270 MB with
both AUPROs. scikit-learn needs 67–89 s and ≈ 2.5 GB for the first three. The numbers are in
``benchmarks/bench_metrics.py`` and ``benchmarks/results/``.

``method="binned"`` puts the scores into ``bins`` (default 2**20) equal-width bins over [min, max] and
treats each bin as one tied value. The bin index is a monotone function of the score, so the only
error comes from merging neighbouring values into one tie (for AUROC it is at most Σ_b p_b·n_b / (2PN)).
Measured on the benchmark's realistic 54 M-pixel float32 maps (3 seeds), the largest |binned − exact| is:

=========  ========  ========  ========  ============  ============
bins       AUROC     AP        F1-max    AUPRO mvtec   AUPRO cflow
=========  ========  ========  ========  ============  ============
2**16      3e-9      1.0e-5    2.7e-6    2e-7          6.2e-6
2**20      3e-10     6e-7      1.0e-6    2e-8          3e-7
=========  ========  ========  ========  ============  ============

The documented tolerance, with margin, is |Δ| < 1e-5 at 2**20 bins and < 1e-4 at 2**16 bins. Maps with
few distinct values (e.g. integers) are binned exactly. The binned path is not faster than the exact
one; its use is streaming. With a known ``value_range``, :class:`PixelMetricAccumulator` keeps only the
histograms (O(bins) memory), however many maps it is fed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "AUPRO_VARIANTS",
    "IMAGE_KEYS",
    "PIXEL_KEYS",
    "DEFAULT_BINS",
    "UndefinedMetricWarning",
    "roc_auc",
    "average_precision",
    "f1_max",
    "binary_metrics",
    "image_metrics",
    "pixel_metrics",
    "aupro",
    "pro_curve",
    "label_regions",
    "PixelMetricAccumulator",
    "category_means",
    "category_table",
]

AUPRO_VARIANTS = ("mvtec", "cflow")
#: Result keys of :func:`image_metrics`.
IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")
#: Result keys of :func:`pixel_metrics` (the AUPRO keys only for the variants asked for).
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro", "pixel_aupro_cflow")
_AUPRO_KEY = {"mvtec": "pixel_aupro", "cflow": "pixel_aupro_cflow"}
#: Default number of bins of the binned path.
DEFAULT_BINS = 1 << 20
#: ``method="auto"`` uses the exact path up to this many pixels (≈ 2 GiB of float32 negatives).
EXACT_MAX_PIXELS = 1 << 29
#: Pixels per internal batch when labelling regions or binning (bounds the temporary arrays).
_BATCH_PIXELS = 1 << 22
# 8-connectivity inside each image of an [n, H, W] stack, and no connection between images.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for a category (only one class present) and is reported as NaN."""


# ----------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_scores(x: Any, name: str = "scores") -> np.ndarray:
    """Float array with the same order and ties: float32/float64 kept, float16 → float32, ints → float64."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        raise TypeError(f"{name} must be real-valued scores, got a boolean array (arguments swapped?)")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
            raise TypeError(f"{name} must be real-valued, got dtype {a.dtype}")
        a = a.astype(np.float64)
    return a


def _as_binary(x: Any, name: str = "masks") -> np.ndarray:
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{name} must be boolean or numeric, got dtype {a.dtype}")
    return a > 0.5


def _as_labels(x: Any) -> np.ndarray:
    a = _to_numpy(x).ravel()
    if a.dtype == np.bool_:
        return a
    values = np.unique(a)
    if not np.all(np.isin(values, (0, 1))):
        raise ValueError(f"image labels must be 0/1 or boolean, got values {values[:10]}")
    return a == 1


def _as_stack(a: np.ndarray, name: str) -> np.ndarray:
    """[H, W] → [1, H, W]; [n, 1, H, W] → [n, H, W]; [n, H, W] unchanged."""
    if a.ndim == 2:
        return a[None]
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape [H, W], [n, H, W] or [n, 1, H, W], got {a.shape}")
    return a


def _value_range(a: np.ndarray, name: str) -> tuple[float, float]:
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    lo, hi = float(a.min()), float(a.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or infinity")
    return lo, hi


def _warn_undefined(category: str | None, metrics: Sequence[str], reason: str) -> None:
    where = f"category {category!r}" if category is not None else "this input"
    warnings.warn(
        f"{', '.join(metrics)} undefined for {where}: {reason}; reported as NaN",
        UndefinedMetricWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------------------------------
# the shared core: statistics at the distinct score values that hold positives


@dataclass
class _Levels:
    """The distinct score values that contain at least one positive, in decreasing order.

    Only these thresholds matter: TP changes only there. Everything between two of them is a run of
    negatives (a horizontal ROC or PRO segment).
    """

    values: np.ndarray  # threshold values, decreasing
    pos: np.ndarray  # int64, positives equal to the value
    neg_lt: np.ndarray  # int64, negatives strictly below the value
    neg_eq: np.ndarray  # int64, negatives equal to the value
    n_pos: int
    n_neg: int
    pro_w: np.ndarray | None  # float64, PRO weight of the positives at the value (sums to 1)

    def auroc(self) -> float:
        den = 2 * self.n_pos * self.n_neg
        if den < 2**62:  # exact integer Mann-Whitney sum (cannot overflow int64: it is at most den)
            return int(np.dot(self.pos, 2 * self.neg_lt + self.neg_eq)) / den
        return float(np.dot(self.pos.astype(np.float64), 2.0 * self.neg_lt + self.neg_eq)) / den

    def ap_f1(self) -> tuple[float, float, float, float]:
        tp = np.cumsum(self.pos)
        fp = self.n_neg - self.neg_lt  # negatives with score >= value
        precision = tp / (tp + fp)
        ap = float(np.dot(self.pos, precision)) / self.n_pos
        f1 = 2.0 * tp / (tp + fp + self.n_pos)
        i = int(np.argmax(f1))
        iou = tp[i] / (fp[i] + self.n_pos)
        return ap, float(f1[i]), float(self.values[i]), float(iou)

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The MVTec PRO-vs-FPR polyline: (0,0), then for each level the point just above it and at it."""
        k = self.values.size
        pro_ge = np.cumsum(self.pro_w)
        fp_ge = self.n_neg - self.neg_lt
        x = np.empty(2 * k + 2)
        y = np.empty(2 * k + 2)
        x[0] = y[0] = 0.0
        x[1:-1:2] = (fp_ge - self.neg_eq) / self.n_neg  # FPR(score > v)
        x[2:-1:2] = fp_ge / self.n_neg  # FPR(score >= v)
        y[1:-1:2] = np.concatenate(([0.0], pro_ge[:-1]))  # PRO(score > v)
        y[2:-1:2] = pro_ge
        x[-1] = 1.0
        y[-1] = pro_ge[-1]
        return x, y


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)


def _area_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """∫_0^limit y dx of the polyline (x nondecreasing), linear interpolation at x = limit."""
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit
    area = _trapezoid(x[:k], y[:k])
    if k < x.size and x[k - 1] < limit:
        x0, y0, x1, y1 = x[k - 1], y[k - 1], x[k], y[k]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += 0.5 * (limit - x0) * (y0 + y_lim)
    return area


def _round_down(th: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Largest values f of ``dtype`` with f <= th, so that for s of that dtype: s > th ⇔ s > f."""
    f = th.astype(dtype)
    over = f.astype(np.float64) > th
    if np.any(over):
        f[over] = np.nextafter(f[over], np.array(-np.inf, dtype=dtype))
    return f


def _cflow_thresholds(vmin: float, vmax: float, num_thresholds: int) -> np.ndarray:
    return vmin + (vmax - vmin) * (np.arange(num_thresholds, dtype=np.float64) / num_thresholds)


def _cflow_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    keep = fpr < limit
    f, p = fpr[keep], pro[keep]
    if f.size < 2 or f.max() == f.min():
        return math.nan
    f = (f - f.min()) / (f.max() - f.min())
    # thresholds increase along the arrays, so FPR is nonincreasing: reverse (do not sort, which would
    # misorder the points of equal FPR) to integrate from left to right, as sklearn.metrics.auc does
    return _trapezoid(f[::-1], p[::-1])


class _Sorted:
    """Exact representation: sorted negatives, sorted positives and their PRO weights."""

    def __init__(self, pos: np.ndarray, neg: np.ndarray, pos_area: np.ndarray | None, n_regions: int,
                 vmin: float, vmax: float, *, presorted: bool = False):
        if pos.dtype != neg.dtype:
            dt = np.promote_types(pos.dtype, neg.dtype)
            pos, neg = pos.astype(dt), neg.astype(dt)
        if not presorted:
            neg.sort()  # in place: the caller hands over ownership
            if pos_area is not None:
                order = np.argsort(pos)
                pos, pos_area = pos[order], pos_area[order]
            else:
                pos.sort()
        self.pos, self.neg, self.pos_area = pos, neg, pos_area
        self.n_regions, self.vmin, self.vmax = n_regions, vmin, vmax

    def levels(self) -> _Levels:
        pos = self.pos
        if pos.size == 0:
            e = np.zeros(0, dtype=np.int64)
            return _Levels(pos, e, e, e, 0, int(self.neg.size), None)
        starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1])))
        values = pos[starts]
        counts = np.diff(np.append(starts, pos.size)).astype(np.int64)
        lo = np.searchsorted(self.neg, values, side="left").astype(np.int64)
        hi = np.searchsorted(self.neg, values, side="right").astype(np.int64)
        pro_w = None
        if self.pos_area is not None and self.n_regions > 0:
            pro_w = np.add.reduceat(1.0 / self.pos_area.astype(np.float64), starts) / self.n_regions
            pro_w = pro_w[::-1]
        return _Levels(values[::-1], counts[::-1], lo[::-1], (hi - lo)[::-1], int(pos.size),
                       int(self.neg.size), pro_w)

    def above(self, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FP count and PRO at ``score > th`` for each threshold (float64 thresholds)."""
        f = _round_down(th, self.neg.dtype)
        fp = self.neg.size - np.searchsorted(self.neg, f, side="right")
        w = 1.0 / self.pos_area.astype(np.float64)
        suffix = np.concatenate((np.cumsum(w[::-1])[::-1], [0.0])) / self.n_regions
        pro = suffix[np.searchsorted(self.pos, f, side="right")]
        return fp.astype(np.int64), pro


class _Histogram:
    """Binned representation: per-bin counts of negatives, positives and PRO weights."""

    def __init__(self, lo: float, hi: float, bins: int, neg: np.ndarray, pos: np.ndarray,
                 w: np.ndarray | None, n_regions: int, vmin: float, vmax: float):
        self.lo, self.bins = lo, bins
        self.scale = bins / (hi - lo) if hi > lo else 1.0
        self.neg, self.pos, self.w = neg, pos, w
        self.n_regions, self.vmin, self.vmax = n_regions, vmin, vmax

    def levels(self) -> _Levels:
        b = np.flatnonzero(self.pos)[::-1]
        neg_lt = np.concatenate(([0], np.cumsum(self.neg)[:-1]))
        pro_w = None
        if self.w is not None and self.n_regions > 0:
            pro_w = self.w[b] / self.n_regions
        return _Levels(self.lo + b / self.scale, self.pos[b], neg_lt[b], self.neg[b],
                       int(self.pos.sum()), int(self.neg.sum()), pro_w)

    def above(self, th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """FP and PRO at ``score > th``, with the mass of a partly covered bin interpolated linearly."""
        z = (th - self.lo) * self.scale
        b = np.clip(np.floor(z), 0, self.bins - 1).astype(np.int64)
        frac = np.clip(z - b, 0.0, 1.0)

        def mass_above(h: np.ndarray) -> np.ndarray:
            suffix = np.concatenate((np.cumsum(h[::-1])[::-1], [0]))
            return suffix[b + 1] + (1.0 - frac) * h[b]

        return mass_above(self.neg), mass_above(self.w) / self.n_regions


def _bin_index(x: np.ndarray, lo: float, scale: float, bins: int) -> np.ndarray:
    """Monotone bin index floor((x - lo)·scale), clipped to [0, bins-1] (int64)."""
    z = np.subtract(x, lo, dtype=np.float64)
    z *= scale
    idx = z.astype(np.int64)
    np.clip(idx, 0, bins - 1, out=idx)
    return idx


def label_regions(masks: Any) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions of a mask stack, 8-connectivity inside each image.

    Returns ``(labels, n_regions)``: ``labels`` is int32 ``[n, H, W]`` with 0 = background and
    1..n_regions numbering the regions of all images (regions never span two images).
    """
    m = _as_stack(_as_binary(masks), "masks")
    labels, n = ndimage.label(m, structure=_STRUCTURE_8)
    return labels, int(n)


def _positive_areas(m: np.ndarray) -> tuple[np.ndarray, int]:
    """Region area of every anomalous pixel (C order, as ``x[m]``), and the number of regions."""
    areas_out, n_total = [], 0
    per = max(1, _BATCH_PIXELS // max(1, m[0].size))
    for i in range(0, m.shape[0], per):
        mb = m[i:i + per]
        labels, n = ndimage.label(mb, structure=_STRUCTURE_8)
        lab = labels[mb]
        area = np.bincount(lab, minlength=n + 1).astype(np.int32)
        areas_out.append(area[lab])
        n_total += int(n)
    areas = np.concatenate(areas_out) if len(areas_out) != 1 else areas_out[0]
    return areas, n_total


# ----------------------------------------------------------------------------------------------------
# image level (and any flat binary problem)


def _binary_levels(labels: Any, scores: Any) -> _Levels:
    y = _as_labels(labels)
    s = _as_scores(scores).ravel()
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in size: {y.size} vs {s.size}")
    vmin, vmax = _value_range(s, "scores")
    return _Sorted(s[y].copy(), s[~y].copy(), None, 0, vmin, vmax).levels()


def binary_metrics(labels: Any, scores: Any) -> dict[str, float]:
    """Exact AUROC, AP, F1-max (+ its threshold and the IoU there) for a flat binary problem.

    Returns ``{"auroc", "ap", "f1_max", "f1_threshold", "iou_at_f1_max"}``. They are NaN when only one class
    is present; this function does not warn, and :func:`image_metrics` does. ``f1_threshold`` t means
    "predict anomalous when score >= t".
    """
    L = _binary_levels(labels, scores)
    if L.n_pos == 0 or L.n_neg == 0:
        return dict.fromkeys(("auroc", "ap", "f1_max", "f1_threshold", "iou_at_f1_max"), math.nan)
    ap, f1, th, iou = L.ap_f1()
    return {"auroc": L.auroc(), "ap": ap, "f1_max": f1, "f1_threshold": th, "iou_at_f1_max": iou}


def roc_auc(labels: Any, scores: Any) -> float:
    """AUROC, equal to ``sklearn.metrics.roc_auc_score`` (NaN if only one class is present)."""
    return binary_metrics(labels, scores)["auroc"]


def average_precision(labels: Any, scores: Any) -> float:
    """Step-wise AP, equal to ``sklearn.metrics.average_precision_score`` (NaN if only one class)."""
    return binary_metrics(labels, scores)["ap"]


def f1_max(labels: Any, scores: Any) -> float:
    """max 2PR/(P+R) over the points of ``sklearn.metrics.precision_recall_curve`` (NaN if only one class)."""
    return binary_metrics(labels, scores)["f1_max"]


def image_metrics(labels: Any, scores: Any, *, category: str | None = None,
                  undefined: float = math.nan) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max of one category.

    Args:
        labels: ``[n]`` 0/1 or bool, 1 = anomalous image.
        scores: ``[n]`` image anomaly scores (any real values, higher = more anomalous).
        category: name used in the warning when a metric is undefined.
        undefined: the value reported when only one class is present (all images anomalous, e.g. ISIC,
            or all normal). The default is NaN, with an :class:`UndefinedMetricWarning`. The released Bayes-PFL
            script uses 0.0 and lets it enter the mean; pass ``undefined=0.0`` only to reproduce that.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max"}`` as floats in [0, 1].
    """
    m = binary_metrics(labels, scores)
    out = {"image_auroc": m["auroc"], "image_ap": m["ap"], "image_f1_max": m["f1_max"]}
    if math.isnan(m["auroc"]):
        n_pos = int(_as_labels(labels).sum())
        reason = "every image is anomalous" if n_pos else "no image is anomalous"
        _warn_undefined(category, list(out), reason)
        out = dict.fromkeys(out, float(undefined))
    return out


# ----------------------------------------------------------------------------------------------------
# pixel level


def _variants(aupro_variant: str | Sequence[str] | None) -> tuple[str, ...]:
    if aupro_variant is None:
        return ()
    vs = (aupro_variant,) if isinstance(aupro_variant, str) else tuple(aupro_variant)
    for v in vs:
        if v not in AUPRO_VARIANTS:
            raise ValueError(f"unknown AUPRO variant {v!r}; choose from {AUPRO_VARIANTS}")
    return vs


class PixelMetricAccumulator:
    """Collect anomaly maps and masks batch by batch; compute the pixel metrics of a category at the end.

    ``update(masks, maps)`` takes batches of shape ``[n, H, W]``, ``[n, 1, H, W]`` or ``[H, W]``. The image
    sizes may differ between batches. Each batch's GT regions are labelled at once (8-connectivity).
    The accumulator keeps only what the metrics need:

    * ``method="exact"``: the scores of normal and of anomalous pixels, plus the region area of
      each anomalous pixel. That is ≈ 4 bytes/pixel in ``store_dtype="float32"`` and 2 in ``"float16"``.
      Storing in a narrower type than the maps' own (float16, or float32 for float64 maps) introduces
      ties, so the results are then approximate.
    * ``method="binned"`` with ``value_range=(lo, hi)``: three histograms with ``bins`` bins. The memory is
      constant, and a score outside the range raises ``ValueError``. Without ``value_range`` the
      scores are stored as in the exact mode and binned over [min, max] in :meth:`compute`.

    ``compute`` does not consume the state: more batches can follow, and ``compute`` can be called again.
    The exact mode keeps its sorted arrays, so a second ``compute`` is cheap.

    Set ``regions=False`` to skip the connected-component labelling when no AUPRO is needed.
    """

    def __init__(self, method: Literal["exact", "binned"] = "exact", *, bins: int = DEFAULT_BINS,
                 value_range: tuple[float, float] | None = None, store_dtype: str | np.dtype = "float32",
                 regions: bool = True):
        if method not in ("exact", "binned"):
            raise ValueError(f"method must be 'exact' or 'binned', got {method!r}")
        self.method, self.bins, self.regions = method, int(bins), regions
        self.store_dtype = np.dtype(store_dtype)
        if self.store_dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(f"store_dtype must be float16, float32 or float64, got {self.store_dtype}")
        self.value_range = None
        if value_range is not None:
            if method != "binned":
                raise ValueError("value_range is only used by method='binned'")
            lo, hi = float(value_range[0]), float(value_range[1])
            if not hi > lo:
                raise ValueError(f"value_range needs lo < hi, got {value_range}")
            self.value_range = (lo, hi)
        self.reset()

    @property
    def streaming(self) -> bool:
        return self.value_range is not None

    def reset(self) -> None:
        self._neg: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []
        self._area: list[np.ndarray] = []
        self._sorted = False
        self.n_regions = 0
        self.n_images = 0
        self.vmin, self.vmax = math.inf, -math.inf
        if self.streaming:
            self._hist = np.zeros(2 * self.bins, dtype=np.int64)  # interleaved [neg, pos] per bin
            self._w = np.zeros(self.bins, dtype=np.float64) if self.regions else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator's arrays."""
        if self.streaming:
            return self._hist.nbytes + (self._w.nbytes if self._w is not None else 0)
        return sum(a.nbytes for a in (*self._neg, *self._pos, *self._area))

    def update(self, masks: Any, maps: Any) -> None:
        """Add a batch: ``masks`` (bool or numeric, > 0.5 = anomalous) and ``maps`` (scores), same shape."""
        s = _as_stack(_as_scores(maps, "maps"), "maps")
        m = _as_stack(_as_binary(masks, "masks"), "masks")
        if s.shape != m.shape:
            raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
        if s.size == 0:
            return
        lo, hi = _value_range(s, "maps")
        self.vmin, self.vmax = min(self.vmin, lo), max(self.vmax, hi)
        self.n_images += s.shape[0]
        if self.streaming:
            self._update_hist(m, s, lo, hi)
            return
        area, n = _positive_areas(m) if self.regions else (None, 0)
        self.n_regions += n
        neg, pos = s[~m], s[m]
        if neg.dtype != self.store_dtype and not (self.store_dtype == np.float64 and neg.dtype == np.float32):
            neg, pos = neg.astype(self.store_dtype), pos.astype(self.store_dtype)
        self._neg.append(neg)
        self._pos.append(pos)
        if area is not None:
            self._area.append(area)
        self._sorted = False

    def _update_hist(self, m: np.ndarray, s: np.ndarray, lo: float, hi: float) -> None:
        r_lo, r_hi = self.value_range
        if lo < r_lo or hi > r_hi:
            raise ValueError(f"maps range [{lo}, {hi}] leaves value_range [{r_lo}, {r_hi}]")
        scale = self.bins / (r_hi - r_lo)
        per = max(1, _BATCH_PIXELS // max(1, s[0].size))
        for i in range(0, s.shape[0], per):
            sb, mb = s[i:i + per], m[i:i + per]
            idx = _bin_index(sb.ravel(), r_lo, scale, self.bins)
            if self.regions:
                area, n = _positive_areas(mb)
                self.n_regions += n
                pos_idx = idx[mb.ravel()]
                self._w += np.bincount(pos_idx, weights=1.0 / area, minlength=self.bins)
            idx <<= 1
            idx += mb.ravel()
            self._hist += np.bincount(idx, minlength=2 * self.bins)

    def _representation(self, method: str) -> _Sorted | _Histogram:
        if self.streaming:
            lo, hi = self.value_range
            return _Histogram(lo, hi, self.bins, self._hist[0::2], self._hist[1::2], self._w,
                              self.n_regions, self.vmin, self.vmax)
        if not self._sorted:
            neg = np.concatenate(self._neg) if len(self._neg) != 1 else self._neg[0]
            pos = np.concatenate(self._pos) if len(self._pos) != 1 else self._pos[0]
            area = None
            if self.regions:
                area = np.concatenate(self._area) if len(self._area) != 1 else self._area[0]
            if neg.dtype == np.float16:
                neg, pos = neg.astype(np.float32), pos.astype(np.float32)
            rep = _Sorted(pos, neg, area, self.n_regions, self.vmin, self.vmax)
            # keep the sorted arrays as the state: a later update appends, a later compute re-sorts
            self._neg, self._pos = [rep.neg], [rep.pos]
            self._area = [rep.pos_area] if area is not None else []
            self._sorted = True
        rep = _Sorted(self._pos[0], self._neg[0], self._area[0] if self.regions else None,
                      self.n_regions, self.vmin, self.vmax, presorted=True)
        if method == "exact":
            return rep
        return _histogram_from_sorted(rep, self.bins)

    def compute(self, aupro_variant: str | Sequence[str] | None = "mvtec", *, fpr_limit: float = 0.3,
                num_thresholds: int = 200, category: str | None = None, details: bool = False,
                method: Literal["exact", "binned"] | None = None) -> dict[str, float]:
        """The pixel metrics of everything added so far. The arguments are those of :func:`pixel_metrics`.

        ``method`` may switch a storing accumulator from exact to binned for this call. A streaming
        accumulator (binned with ``value_range``) is always binned.
        """
        variants = _variants(aupro_variant)
        if variants and not self.regions:
            raise ValueError("AUPRO needs region labels: create the accumulator with regions=True")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if self.n_images == 0:
            raise ValueError("no maps were added")
        rep = self._representation(method or self.method)
        return _pixel_results(rep, variants, fpr_limit, num_thresholds, category, details)


def _histogram_from_sorted(rep: _Sorted, bins: int) -> _Histogram:
    lo, hi = rep.vmin, rep.vmax
    scale = bins / (hi - lo) if hi > lo else 1.0
    neg = np.zeros(bins, dtype=np.int64)
    for i in range(0, rep.neg.size, _BATCH_PIXELS):
        neg += np.bincount(_bin_index(rep.neg[i:i + _BATCH_PIXELS], lo, scale, bins), minlength=bins)
    pidx = _bin_index(rep.pos, lo, scale, bins)
    pos = np.bincount(pidx, minlength=bins).astype(np.int64)
    w = None
    if rep.pos_area is not None:
        w = np.bincount(pidx, weights=1.0 / rep.pos_area.astype(np.float64), minlength=bins)
    return _Histogram(lo, hi, bins, neg, pos, w, rep.n_regions, rep.vmin, rep.vmax)


def _pixel_results(rep: _Sorted | _Histogram, variants: tuple[str, ...], fpr_limit: float,
                   num_thresholds: int, category: str | None, details: bool) -> dict[str, float]:
    L = rep.levels()
    keys = ["pixel_auroc", "pixel_ap", "pixel_f1_max"] + [_AUPRO_KEY[v] for v in variants]
    out: dict[str, float] = {}
    if L.n_pos == 0 or L.n_neg == 0:
        reason = "no anomalous pixels" if L.n_pos == 0 else "no normal pixels"
        _warn_undefined(category, keys, reason)
        out = dict.fromkeys(keys, math.nan)
        if details:
            out.update(pixel_f1_threshold=math.nan, pixel_iou_at_f1_max=math.nan)
    else:
        ap, f1, th, iou = L.ap_f1()
        out = {"pixel_auroc": L.auroc(), "pixel_ap": ap, "pixel_f1_max": f1}
        if "mvtec" in variants:
            x, y = L.pro_curve()
            out["pixel_aupro"] = float(_area_to(x, y, fpr_limit) / fpr_limit)
        if "cflow" in variants:
            th_c = _cflow_thresholds(rep.vmin, rep.vmax, num_thresholds)
            fp, pro = rep.above(th_c)
            out["pixel_aupro_cflow"] = float(_cflow_area(fp / L.n_neg, pro, fpr_limit))
            if math.isnan(out["pixel_aupro_cflow"]):
                _warn_undefined(category, ["pixel_aupro_cflow"],
                                f"fewer than two distinct FPRs below {fpr_limit} among the thresholds")
        if details:
            out.update(pixel_f1_threshold=th, pixel_iou_at_f1_max=iou)
    if details:
        out.update(n_pos=L.n_pos, n_neg=L.n_neg, n_regions=rep.n_regions)
    return out


def _pick_method(method: str, n_pixels: int) -> str:
    if method == "auto":
        return "exact" if n_pixels <= EXACT_MAX_PIXELS else "binned"
    if method not in ("exact", "binned"):
        raise ValueError(f"method must be 'auto', 'exact' or 'binned', got {method!r}")
    return method


def pixel_metrics(masks: Any, maps: Any, aupro_variant: str | Sequence[str] | None = "mvtec", *,
                  method: Literal["auto", "exact", "binned"] = "auto", bins: int = DEFAULT_BINS,
                  fpr_limit: float = 0.3, num_thresholds: int = 200, category: str | None = None,
                  details: bool = False) -> dict[str, float]:
    """Pixel-level AUROC, AP, F1-max and AUPRO over all pixels of one category.

    Args:
        masks: ``[n, H, W]`` (or ``[n, 1, H, W]``, ``[H, W]``) ground truth, bool or numeric (> 0.5 = anomalous).
        maps: anomaly maps of the same shape (float32 recommended; used as given, no sigmoid).
        aupro_variant: ``"mvtec"`` (default), ``"cflow"``, both as a tuple, or ``None`` to skip AUPRO
            (then no region labelling is done).
        method: ``"exact"``, ``"binned"`` (``bins`` equal-width bins over [min, max], streamed batch by batch
            without a copy of the maps), or ``"auto"`` (exact up to 2**29 pixels).
        fpr_limit: L of the AUPRO integral (0.3 in every table).
        num_thresholds: T of the cflow variant (200 in the ZSAD repositories).
        category: name used in warnings.
        details: also return ``pixel_f1_threshold``, ``pixel_iou_at_f1_max``, ``n_pos``, ``n_neg``, ``n_regions``.

    Returns:
        ``{"pixel_auroc", "pixel_ap", "pixel_f1_max"}`` plus ``"pixel_aupro"`` (MVTec) and/or
        ``"pixel_aupro_cflow"``. All are NaN with an :class:`UndefinedMetricWarning` when the category has
        no anomalous or no normal pixel.
    """
    variants = _variants(aupro_variant)
    s = _as_stack(_as_scores(maps, "maps"), "maps")
    m = _as_stack(_as_binary(masks, "masks"), "masks")
    if s.shape != m.shape:
        raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
    how = _pick_method(method, s.size)
    if how == "binned":
        lo, hi = _value_range(s, "maps")
        acc = PixelMetricAccumulator("binned", bins=bins, regions=bool(variants),
                                     value_range=(lo, hi) if hi > lo else None)
    else:
        acc = PixelMetricAccumulator("exact", regions=bool(variants), store_dtype=s.dtype)
    acc.update(m, s)
    return acc.compute(variants, fpr_limit=fpr_limit, num_thresholds=num_thresholds, category=category,
                       details=details)


def aupro(masks: Any, maps: Any, variant: Literal["mvtec", "cflow"] = "mvtec", fpr_limit: float = 0.3, *,
          method: Literal["auto", "exact", "binned"] = "auto", bins: int = DEFAULT_BINS,
          num_thresholds: int = 200, category: str | None = None) -> float:
    """AUPRO of one category: ``"mvtec"`` (normalised ∫_0^L PRO dFPR / L) or ``"cflow"`` (see module doc).

    NaN with an :class:`UndefinedMetricWarning` when the category has no anomalous or no normal pixel.
    """
    out = pixel_metrics(masks, maps, variant, method=method, bins=bins, fpr_limit=fpr_limit,
                        num_thresholds=num_thresholds, category=category)
    return out[_AUPRO_KEY[variant]]


def pro_curve(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """The exact MVTec PRO curve: ``(fpr, pro)``, nondecreasing, from (0, 0) to (1, 1).

    The curve is linear between the returned points, which are all its vertices. Use it for plots or
    for your own integration limit. Raises ``ValueError`` if the maps have no anomalous or no normal pixel.
    """
    s = _as_stack(_as_scores(maps, "maps"), "maps")
    m = _as_stack(_as_binary(masks, "masks"), "masks")
    if s.shape != m.shape:
        raise ValueError(f"masks {m.shape} and maps {s.shape} differ in shape")
    acc = PixelMetricAccumulator("exact", store_dtype=s.dtype)
    acc.update(m, s)
    L = acc._representation("exact").levels()
    if L.n_pos == 0 or L.n_neg == 0:
        raise ValueError("the PRO curve needs anomalous and normal pixels")
    return L.pro_curve()


# ----------------------------------------------------------------------------------------------------
# per-category tables


def _ordered_columns(per_category: Mapping[str, Mapping[str, float]]) -> list[str]:
    seen: list[str] = []
    for metrics in per_category.values():
        for k in metrics:
            if k not in seen:
                seen.append(k)
    canonical = [k for k in (*IMAGE_KEYS, *PIXEL_KEYS) if k in seen]
    return canonical + [k for k in seen if k not in canonical]


def category_means(per_category: Mapping[str, Mapping[str, float]]) -> tuple[dict[str, float], dict[str, int]]:
    """Unweighted mean over categories of each metric, ignoring NaN, and how many categories entered it.

    Returns ``(means, counts)``. A metric that is NaN for every category has mean NaN and count 0.
    """
    means, counts = {}, {}
    for key in _ordered_columns(per_category):
        vals = np.array([float(m.get(key, math.nan)) for m in per_category.values()], dtype=np.float64)
        ok = ~np.isnan(vals)
        counts[key] = int(ok.sum())
        means[key] = float(vals[ok].mean()) if counts[key] else math.nan
    return means, counts


def category_table(per_category: Mapping[str, Mapping[str, float]], *, columns: Iterable[str] | None = None,
                   percent: bool = False, count_row: bool = True):
    """A ``pandas.DataFrame`` with one row per category, a ``mean`` row and a ``n_averaged`` row.

    ``mean`` is the unweighted mean over the categories where the metric is defined (NaN ignored), as in
    the papers' tables. ``n_averaged`` says how many categories entered each mean (drop it with
    ``count_row=False``). The counts are also in ``df.attrs["n_averaged"]``, and the total in
    ``df.attrs["n_categories"]``. ``percent=True`` multiplies the metric rows by 100.
    """
    import pandas as pd

    if not per_category:
        raise ValueError("per_category is empty")
    for reserved in ("mean", "n_averaged"):
        if reserved in per_category:
            raise ValueError(f"a category may not be called {reserved!r}")
    cols = list(columns) if columns is not None else _ordered_columns(per_category)
    df = pd.DataFrame(
        [[float(per_category[c].get(k, math.nan)) for k in cols] for c in per_category],
        index=pd.Index(list(per_category), name="category"), columns=cols, dtype=np.float64,
    )
    means, counts = category_means({c: {k: df.at[c, k] for k in cols} for c in df.index})
    if percent:
        df = df * 100.0
        means = {k: v * 100.0 for k, v in means.items()}
    df.loc["mean"] = [means[k] for k in cols]
    if count_row:
        df.loc["n_averaged"] = [float(counts[k]) for k in cols]
    df.attrs["n_averaged"] = counts
    df.attrs["n_categories"] = len(per_category)
    return df
