"""bpfl.metrics against scikit-learn, brute force and closed forms."""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from bpfl import metrics as M

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# references


def sk_metrics(y, s) -> dict:
    y, s = np.ravel(y), np.ravel(s)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1_max": f1.max()}


def brute_regions(masks):
    """(image index, boolean region mask) for every connected region; skimage's default connectivity."""
    out = []
    for i, m in enumerate(masks):
        lab = measure.label(m)  # 2-D default: full (8-) connectivity
        out += [(i, lab == r) for r in range(1, lab.max() + 1)]
    return out


def brute_mvtec_curve(masks, maps):
    """PRO and FPR at every distinct threshold (score >= t), from high to low, with (0, 0) first."""
    regions = brute_regions(masks)
    n_neg = (~masks).sum()
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(float(np.mean([pred[i][r].mean() for i, r in regions])))
        xs.append(float((pred & ~masks).sum() / n_neg))
    return np.array(xs), np.array(ys)


def brute_area(xs, ys, limit):
    """∫_0^limit of the polyline, segment by segment, the last one cut at `limit`."""
    area = 0.0
    for x0, y0, x1, y1 in zip(xs[:-1], ys[:-1], xs[1:], ys[1:]):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
    return area


def brute_cflow(masks, maps, num_thresholds=200, limit=0.3):
    """The cflow-ad AUPRO as described: T thresholds in [min, max), score > t, FPR < limit, rescaled."""
    regions = brute_regions(masks)
    n_neg = (~masks).sum()
    lo, hi = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for k in range(num_thresholds):
        t = np.float64(lo + (hi - lo) * (k / num_thresholds))
        pred = maps > t
        pros.append(np.mean([pred[i][r].mean() for i, r in regions]))
        fprs.append((pred & ~masks).sum() / n_neg)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return auc(f, pros[keep])


def random_masks(rng, n=5, h=14, w=15, p=0.06):
    m = ndimage.binary_dilation(rng.random((n, h, w)) < p, structure=(rng.random((3, 3)) < 0.6)[None])
    m[0, 0, 0] = m[0, 1, 1] = True  # a diagonal pair: one region under 8-connectivity
    m[1] = False  # one normal image
    return m


def noisy_maps(rng, masks, dtype=np.float32):
    return (masks * rng.uniform(0.2, 1.0) + rng.normal(0, 0.4, masks.shape)).astype(dtype)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_metrics", ROOT / "benchmarks" / "bench_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------
# image level and flat binary problems


KINDS = ["normal", "float32", "round1", "integer", "constant", "large_offset"]


@pytest.mark.parametrize("kind", KINDS)
def test_binary_metrics_equal_sklearn(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    for trial in range(30):
        n = int(rng.integers(2, 400))
        y = rng.random(n) < rng.uniform(0.05, 0.95)
        y[0], y[1] = True, False
        s = rng.normal(size=n) + rng.uniform(0, 2) * y
        s = {"normal": s, "float32": s.astype(np.float32), "round1": np.round(s, 1),
             "integer": np.round(s).astype(np.int64), "constant": np.zeros(n),
             "large_offset": 1e4 + 50 * s}[kind]
        ours, ref = M.binary_metrics(y, s), sk_metrics(y, s)
        for k in ("auroc", "ap", "f1_max"):
            assert ours[k] == pytest.approx(ref[k], abs=1e-12), (kind, trial, k)
        img = M.image_metrics(y.astype(int), s)
        assert img == {"image_auroc": ours["auroc"], "image_ap": ours["ap"], "image_f1_max": ours["f1_max"]}
    assert M.roc_auc(y, s) == ours["auroc"] and M.average_precision(y, s) == ours["ap"]
    assert M.f1_max(y, s) == ours["f1_max"]


def test_f1_threshold_and_iou_are_those_of_the_best_threshold():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)
    r = M.binary_metrics(y, s)
    pred = s >= r["f1_threshold"]
    tp, fp, fn = (pred & y).sum(), (pred & ~y).sum(), (~pred & y).sum()
    assert r["f1_max"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-15)
    assert r["iou_at_f1_max"] == pytest.approx(tp / (tp + fp + fn), abs=1e-15)


def test_scores_are_used_as_given_no_sigmoid_and_torch_tensors_work():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    y = rng.random(200) < 0.4
    s = rng.normal(size=200) * 50 - 20  # far outside [0, 1]; a sigmoid would saturate and create ties
    ref = sk_metrics(y, s)
    ours = M.image_metrics(torch.from_numpy(y), torch.from_numpy(s))
    assert ours["image_auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
    assert ours["image_ap"] == pytest.approx(ref["ap"], abs=1e-12)


def test_input_validation():
    with pytest.raises(ValueError, match="NaN"):
        M.binary_metrics([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        M.image_metrics([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="swapped"):
        M.pixel_metrics(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="variant"):
        M.pixel_metrics(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4)), "pro")


# ----------------------------------------------------------------------------------------------------
# pixel level


@pytest.mark.parametrize("kind", ["float32", "float64", "round1", "integer", "uint8_mask"])
def test_pixel_metrics_exact_equal_sklearn(kind):
    rng = np.random.default_rng(len(kind))
    masks = random_masks(rng, n=6, h=40, w=37, p=0.01)
    maps = noisy_maps(rng, masks, np.float64)
    masks_in = masks
    if kind == "float32":
        maps = maps.astype(np.float32)
    elif kind == "round1":
        maps = np.round(maps, 1).astype(np.float32)
    elif kind == "integer":
        maps = np.round(maps * 3).astype(np.int16)
    elif kind == "uint8_mask":
        masks_in = masks.astype(np.uint8) * 255  # binarised with > 0.5
    ref = sk_metrics(masks, maps)
    ours = M.pixel_metrics(masks_in, maps, ("mvtec", "cflow"), method="exact", details=True)
    for k in ("auroc", "ap", "f1_max"):
        assert ours[f"pixel_{k}"] == pytest.approx(ref[k], abs=1e-12), k
    assert ours["n_pos"] == masks.sum() and ours["n_neg"] == (~masks).sum()
    # [n, 1, H, W] and a single [H, W] image are accepted
    ours4 = M.pixel_metrics(masks[:, None], maps[:, None], None, method="exact")
    assert ours4["pixel_auroc"] == ours["pixel_auroc"]
    one = M.pixel_metrics(masks[0], maps[0], None)
    assert one["pixel_auroc"] == pytest.approx(sk_metrics(masks[0], maps[0])["auroc"], abs=1e-12)


@pytest.mark.parametrize("bins, tol", [(M.DEFAULT_BINS, 1e-5), (1 << 16, 1e-4)])
def test_binned_path_within_documented_tolerance(bench, bins, tol):
    """Realistic smooth maps (the benchmark's generator): binned ≈ exact; the module documents these bounds."""
    masks, maps = bench.make_category(12, 160, seed=3)
    both = ("mvtec", "cflow")
    exact = M.pixel_metrics(masks, maps, both, method="exact")
    binned = M.pixel_metrics(masks, maps, both, method="binned", bins=bins)
    diffs = {k: abs(exact[k] - binned[k]) for k in exact}
    assert max(diffs.values()) < tol, diffs
    assert diffs["pixel_auroc"] < tol / 100, diffs  # AUROC is the least sensitive to merged ties
    ref = sk_metrics(masks, maps)
    assert exact["pixel_auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
    # ties: the binned path on integer-valued maps is exact (each value has its own bin)
    imaps = np.round(maps * 50).astype(np.float32)
    assert M.pixel_metrics(masks, imaps, both, method="binned") == pytest.approx(
        M.pixel_metrics(masks, imaps, both, method="exact"), abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# AUPRO


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_mvtec_aupro_equals_brute_force(seed, limit):
    rng = np.random.default_rng(seed)
    masks = random_masks(rng)
    maps = noisy_maps(rng, masks)
    if seed % 2:
        maps = np.round(maps, 1)  # heavy ties, including ties between normal and anomalous pixels
    xs, ys = brute_mvtec_curve(masks, maps)
    expected = brute_area(xs, ys, limit) / limit
    assert M.aupro(masks, maps, "mvtec", limit) == pytest.approx(expected, abs=1e-12)
    # every vertex of the kit's curve is a vertex of the brute-force curve (the kit skips only the
    # vertices inside horizontal runs of normal pixels)
    fpr, pro = M.pro_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    assert (fpr[0], pro[0]) == (0, 0) and fpr[-1] == 1 and pro[-1] == pytest.approx(1)
    dist = np.hypot(fpr[:, None] - xs[None], pro[:, None] - ys[None]).min(axis=1)
    assert dist.max() < 1e-12
    # binned is close
    assert M.aupro(masks, maps, "mvtec", limit, method="binned") == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_cflow_aupro_equals_brute_force(seed):
    rng = np.random.default_rng(10 + seed)
    masks = random_masks(rng, n=4, h=12, w=12)
    maps = noisy_maps(rng, masks, np.float32 if seed != 2 else np.float64)
    if seed == 3:  # integer scores in [0, 200]: many thresholds fall exactly on a score (strict '>' matters)
        maps = np.round((maps - maps.min()) / (maps.max() - maps.min()) * 200).astype(np.float32)
        assert np.isin(np.arange(0, 200, 10), maps).any()
    expected = brute_cflow(masks, maps)
    assert M.aupro(masks, maps, "cflow") == pytest.approx(expected, abs=1e-12)
    assert M.aupro(masks, maps, "cflow", num_thresholds=37) == pytest.approx(
        brute_cflow(masks, maps, num_thresholds=37), abs=1e-12)


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(5)
    masks = random_masks(rng)
    maps = masks + rng.uniform(0, 0.5, masks.shape)  # every anomalous pixel above every normal one
    assert M.aupro(masks, maps, "mvtec") == pytest.approx(1.0, abs=1e-12)
    assert M.pixel_metrics(masks, maps)["pixel_auroc"] == 1.0
    inverted = M.aupro(masks, -maps, "mvtec")  # anomalous pixels lowest: PRO = 0 until FPR = 1
    assert inverted == 0.0


def test_mvtec_aupro_analytic_two_stripes():
    """A closed form for the MVTec AUPRO.

    One image of 7 rows × 162 columns, with columns left to right:
    region A (10 columns) | one normal column | 100 normal columns | one normal column | region B (50 columns).
    The stripes do not touch, so there are 2 regions. The 102 normal columns have these scores:
    column j of the 100 has j/100, and the two single columns have 0, so they only enter at the lowest
    threshold. Region A's columns have 91/100 .. 100/100 and region B's 51/100 .. 100/100.

    At the threshold t = k/100 (k = 100 .. 1) write u := (101 − k)/100, the share of the 100 graded
    normal columns with a score ≥ t. Then
        FPR = 100·u/102,   TPR_A = min(1, 10u),   TPR_B = min(1, 2u),   PRO = (TPR_A + TPR_B)/2.
    Equal scores put A, B and normal columns on the same threshold, so the curve's vertices
    are the points u = 0, 0.01, ..., 1 of this function. Its kinks (u = 0.1, 0.5) are vertices, so the
    linear polyline equals the function. With L = 0.3, i.e. U = 102·L/100 = 0.306 ∈ (0.1, 0.5):
        ∫_0^L PRO dFPR = (100/102) · ½ [∫_0^0.1 10u du + (U − 0.1) + ∫_0^U 2u du]
                       = (100/102) · ½ [0.05 + (U − 0.1) + U²],
    and AUPRO = that / L. U lies on a linear piece, so the interpolation at FPR = L is exact too.
    Over the whole range (L = 1) the last 2/102 of FPR, the two 0-score columns, add a segment at PRO = 1:
        (100/102) · ½ [(0.05 + 0.9) + (0.25 + 0.5)] + 2/102.
    """
    h = 7
    cols = ([np.float32(90 + i) / np.float32(100) for i in range(1, 11)] + [0.0]
            + [np.float32(j) / np.float32(100) for j in range(1, 101)] + [0.0]
            + [np.float32(50 + i) / np.float32(100) for i in range(1, 51)])
    maps = np.tile(np.array(cols, dtype=np.float32), (h, 1))[None]
    masks = np.zeros_like(maps, dtype=bool)
    masks[0, :, :10] = True
    masks[0, :, 112:] = True
    assert M.label_regions(masks)[1] == 2
    L = 0.3
    U = L * 102 / 100
    expected = (100 / 102) * 0.5 * (0.05 + (U - 0.1) + U**2) / L
    assert M.aupro(masks, maps, "mvtec", L) == pytest.approx(expected, abs=1e-12)
    # full range: the curve reaches PRO = 1 at u = 0.5, then stays there; plus the two 0-score columns
    full = (100 / 102) * 0.5 * (0.05 + 0.9 + 0.25 + 0.5) + (2 / 102) * 1.0
    assert M.aupro(masks, maps, "mvtec", 1.0) == pytest.approx(full, abs=1e-12)


def test_regions_use_8_connectivity_like_skimage():
    rng = np.random.default_rng(7)
    masks = rng.random((3, 20, 20)) < 0.3
    labels, n = M.label_regions(masks)
    assert n == sum(measure.label(m).max() for m in masks)
    diag = np.zeros((1, 4, 4), bool)
    diag[0, 0, 0] = diag[0, 1, 1] = diag[0, 2, 2] = True
    assert M.label_regions(diag)[1] == 1
    # identical masks on consecutive images never merge across images
    assert M.label_regions(np.ones((3, 2, 2), bool))[1] == 3


# ----------------------------------------------------------------------------------------------------
# undefined metrics, tables


def test_single_class_category_gives_nan_and_warns():
    with pytest.warns(M.UndefinedMetricWarning, match=r"image_auroc.*'ISIC'.*every image is anomalous"):
        r = M.image_metrics([1, 1, 1], [0.2, 0.5, 0.9], category="ISIC")
    assert all(math.isnan(v) for v in r.values())
    with pytest.warns(M.UndefinedMetricWarning, match="image_ap"):
        r0 = M.image_metrics([1, 1], [0.2, 0.5], category="ISIC", undefined=0.0)  # the released script
    assert r0 == {"image_auroc": 0.0, "image_ap": 0.0, "image_f1_max": 0.0}
    masks = np.zeros((2, 5, 5), bool)
    with pytest.warns(M.UndefinedMetricWarning, match=r"pixel_auroc.*pixel_aupro.*'good_only'.*no anomalous"):
        p = M.pixel_metrics(masks, np.random.default_rng(0).random((2, 5, 5)), category="good_only")
    assert set(p) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}
    assert all(math.isnan(v) for v in p.values())
    with pytest.warns(M.UndefinedMetricWarning, match="no normal pixels"):
        assert math.isnan(M.aupro(~masks, np.zeros((2, 5, 5)), category="all_bad"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a defined category does not warn
        M.image_metrics([0, 1], [0.1, 0.2], category="ok")


def test_category_table_nan_aware_mean_and_counts():
    per = {
        "bottle": {"image_auroc": 0.9, "pixel_auroc": 0.8, "pixel_aupro": 0.7},
        "isic": {"image_auroc": math.nan, "pixel_auroc": 0.6, "pixel_aupro": 0.5},
        "cable": {"image_auroc": 0.7, "pixel_auroc": 0.4},  # no AUPRO computed
    }
    df = M.category_table(per)
    assert list(df.columns) == ["image_auroc", "pixel_auroc", "pixel_aupro"]
    assert list(df.index) == ["bottle", "isic", "cable", "mean", "n_averaged"]
    assert df.loc["mean", "image_auroc"] == pytest.approx(0.8)  # NaN ignored, not 0
    assert df.loc["mean", "pixel_auroc"] == pytest.approx(0.6)
    assert df.loc["mean", "pixel_aupro"] == pytest.approx(0.6)
    assert df.loc["n_averaged"].tolist() == [2, 3, 2]
    assert df.attrs["n_averaged"] == {"image_auroc": 2, "pixel_auroc": 3, "pixel_aupro": 2}
    assert df.attrs["n_categories"] == 3
    pct = M.category_table(per, percent=True, count_row=False)
    assert pct.loc["mean", "pixel_auroc"] == pytest.approx(60.0) and "n_averaged" not in pct.index
    means, counts = M.category_means(per)
    assert means["image_auroc"] == pytest.approx(0.8) and counts["pixel_aupro"] == 2
    with pytest.raises(ValueError):
        M.category_table({"mean": {"image_auroc": 1.0}})


# ----------------------------------------------------------------------------------------------------
# streaming


def test_accumulator_batches_equal_one_shot():
    rng = np.random.default_rng(8)
    masks = random_masks(rng, n=9, h=20, w=21, p=0.03)
    maps = noisy_maps(rng, masks)
    both = ("mvtec", "cflow")
    one_shot = M.pixel_metrics(masks, maps, both, method="exact")
    acc = M.PixelMetricAccumulator()
    for i in range(0, 9, 4):
        acc.update(masks[i:i + 4], maps[i:i + 4])
    assert acc.compute(both) == pytest.approx(one_shot, abs=1e-12)
    assert acc.compute(both) == pytest.approx(one_shot, abs=1e-12)  # compute does not consume
    acc.update(masks[:2], maps[:2])  # more data after a compute
    again = M.pixel_metrics(np.concatenate([masks, masks[:2]]), np.concatenate([maps, maps[:2]]), both)
    assert acc.compute(both) == pytest.approx(again, abs=1e-12)
    assert acc.nbytes > 0 and acc.n_images == 11

    half = M.PixelMetricAccumulator(store_dtype="float16")
    half.update(masks, maps)
    assert half.compute(both) == pytest.approx(one_shot, abs=2e-3)  # float16 storage: ties, approximate

    lo, hi = float(maps.min()) - 1, float(maps.max()) + 1
    stream = M.PixelMetricAccumulator("binned", value_range=(lo, hi))
    for i in range(9):
        stream.update(masks[i], maps[i])
    assert stream.nbytes == 3 * M.DEFAULT_BINS * 8
    assert stream.compute(both) == pytest.approx(one_shot, abs=1e-4)
    with pytest.raises(ValueError, match="value_range"):
        stream.update(masks[0], maps[0] + 10)
    no_regions = M.PixelMetricAccumulator(regions=False)
    no_regions.update(masks, maps)
    assert no_regions.compute(None)["pixel_auroc"] == one_shot["pixel_auroc"]
    with pytest.raises(ValueError, match="regions"):
        no_regions.compute("mvtec")


# ----------------------------------------------------------------------------------------------------
# benchmark smoke run


def test_benchmark_smoke(bench, tmp_path):
    out = bench.main(["--smoke", "--inprocess", "--no-tracemalloc", "--out-dir", str(tmp_path), "--tag", "t"])
    assert out["checks"] and all(out["checks"].values())
    assert {r["method"] for r in out["rows"]} == set(bench.METHODS)
    assert (tmp_path / "metrics_t-smoke.csv").exists() and (tmp_path / "metrics_t-smoke.md").exists()
    exact = next(r for r in out["rows"] if r["method"] == "exact+aupro")
    assert 0.5 < exact["pixel_auroc"] <= 1 and 0 < exact["pixel_aupro"] <= 1
