"""Random vs toy-pretrained CLIP vs a classical reference on unseen categories (issue 9): the pieces.

Used by ``benchmarks/toy_clip_transfer.py`` (the measured table) and by notebook 04's backbone comparison.

* :func:`classical_map` / :func:`classical_reference` -- a training-free local-statistics detector: per-pixel
  robust z-scores of the local mean and standard deviation (Gaussian window ``sigma``) against the image's own
  median statistics, summed over channels; image score = mean of the top 1 % of the map.
* :func:`training_free_reference` -- the toy CLIP alone (:func:`bpfl.toyclip.zero_shot_maps`), no Bayes-PFL.
* :func:`train_and_evaluate` -- Bayes-PFL trained on seen categories, evaluated zero-shot, once per seed.
* :func:`summarize` -- category mean per (method, seed), then mean ± std over seeds.
* :func:`bootstrap_image_auroc` -- a confidence interval for the category-mean image AUROC over the *test
  images* (the seeds' spread says nothing about how few test images there are).

Each measuring function returns ``(rows, scores)``: ``rows`` one line per (method, seed, test set, category)
with the metrics, ``scores`` one line per (method, seed, test set, image) with its label and image score.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter

from .. import metrics as M
from ..backbone import load_backbone
from ..config import BayesPFLConfig
from ..data import SYNTHETIC_GROUPS, collate, open_dataset
from ..evaluate import evaluate, predict_dataset, released_image_scores, released_topk
from ..model import BayesPFL
from ..train import train
from ..viz import overlay, pick_examples, to_display_image
from .pretrain import TOY_ARCH, TOY_IMAGE_SIZE, toy_bayespfl_overrides, toy_layers
from .zeroshot import zero_shot_maps


def classical_map(img: np.ndarray, sigma: float) -> np.ndarray:
    """img [H, W, 3] in [0, 1] -> map [H, W]: robust z-scores of local mean and std vs the image's own."""
    img = img.astype(np.float64)
    mu = gaussian_filter(img, (sigma, sigma, 0))
    sd = np.sqrt(np.clip(gaussian_filter(img * img, (sigma, sigma, 0)) - mu * mu, 0, None))
    score = np.zeros(img.shape[:2])
    for f in (mu, sd):
        flat = f.reshape(-1, 3)
        med = np.median(flat, axis=0)
        mad = np.median(np.abs(flat - med), axis=0) * 1.4826 + 1e-3
        score += (np.abs(f - med) / mad).sum(-1)
    return score.astype(np.float32)


def _test_sets(test_ds) -> dict:
    """``{name: dataset}`` from one dataset (named ``"test"``) or a mapping of named ones."""
    return dict(test_ds) if isinstance(test_ds, dict) else {"test": test_ds}


def _image_id(path) -> str:
    """An image's name inside its dataset (``<category>/test/<kind>/<file>``): shorter than the absolute path."""
    return "/".join(Path(str(path)).parts[-4:])


def _score_rows(method: str, seed: int, test_set: str, category: str, paths, labels, scores) -> list[dict]:
    return [{"method": method, "seed": seed, "test_set": test_set, "category": category, "path": _image_id(p),
             "label": int(lab), "score": float(sc)} for p, lab, sc in zip(paths, labels, scores)]


def classical_reference(test_ds, sigmas=(1.0, 2.0, 4.0), top: float = 0.01) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per test set, category and sigma: pixel and image AUROC of the classical map (datasets with
    ``normalize=False``). Returns ``(rows, scores)``."""
    rows, score_rows = [], []
    for test_set, ds in _test_sets(test_ds).items():
        r, sc = _classical_one(ds, sigmas, top, test_set)
        rows += r
        score_rows += sc
    return pd.DataFrame(rows), pd.DataFrame(score_rows)


def _classical_one(ds, sigmas, top: float, test_set: str) -> tuple[list[dict], list[dict]]:
    rows, score_rows = [], []
    for cat, idx in ds.by_category().items():
        items = [ds[i] for i in idx]
        imgs = [it["image"].permute(1, 2, 0).numpy() for it in items]
        masks = np.stack([np.nan_to_num(it["mask"].numpy()) > 0.5 for it in items])
        labels = np.array([it["label"] for it in items])
        for s in sigmas:
            maps = np.stack([classical_map(im, s) for im in imgs])
            flat = maps.reshape(len(maps), -1)
            k = max(1, int(top * flat.shape[1]))
            img_score = np.sort(flat, axis=1)[:, -k:].mean(1)
            method = f"classical (sigma={s:g})"
            rows.append({"method": method, "sigma": s, "seed": 0, "test_set": test_set, "category": cat,
                         "pixel_auroc": M.roc_auc(masks.ravel(), maps.ravel()),
                         "image_auroc": M.roc_auc(labels, img_score)})
            score_rows += _score_rows(method, 0, test_set, cat, [it["path"] for it in items], labels, img_score)
    return rows, score_rows


def training_free_reference(backbone, test_ds, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(iv) the toy CLIP alone: patch tokens vs "flawless"/"damaged" prompts, no Bayes-PFL training.
    Returns ``(rows, scores)``."""
    rows, score_rows = [], []
    for test_set, ds in _test_sets(test_ds).items():
        for cat, idx in ds.by_category().items():
            batch = collate([ds[i] for i in idx])
            maps, scores = zero_shot_maps(backbone, batch["image"])
            masks = np.nan_to_num(batch["mask"].numpy()) > 0.5
            rows.append({"method": name, "seed": 0, "test_set": test_set, "category": cat,
                         "pixel_auroc": M.roc_auc(masks.ravel(), maps.numpy().ravel()),
                         "image_auroc": M.roc_auc(batch["label"].numpy(), scores.numpy())})
            score_rows += _score_rows(name, 0, test_set, cat, batch["path"], batch["label"].numpy(), scores.numpy())
    return pd.DataFrame(rows), pd.DataFrame(score_rows)


def train_and_evaluate(name: str, backbone, overrides: dict, train_ds, test_ds, seeds, out_dir: Path,
                       epochs: int | None = None, progress: bool = False
                       ) -> tuple[pd.DataFrame, pd.DataFrame, dict, list]:
    """Per seed: Bayes-PFL (``BayesPFLConfig.teaching(**overrides)``) trained on ``train_ds``, evaluated on
    ``test_ds`` (a dataset, or ``{name: dataset}`` to evaluate each trained model on several test sets).
    Returns rows (method=name, seed, test_set, category, pixel/image AUROC and AP, the image AUROC of each part
    of s = s_text + max(M) alone and of the released code's fusion, train seconds), per-image scores, the last
    seed's config and the trained models (one per seed)."""
    rows, score_rows, models = [], [], []
    cfg = None
    for seed in seeds:
        cfg = BayesPFLConfig.teaching(**{**overrides, "seed": seed, **({"epochs": epochs} if epochs else {})})
        torch.manual_seed(seed)
        model = BayesPFL(cfg, backbone=backbone)
        t0 = time.perf_counter()
        train(model, train_ds, out_dir / f"{name}-seed{seed}", progress=progress)
        t_train = time.perf_counter() - t0
        models.append(model)
        for test_set, ds in _test_sets(test_ds).items():
            res = evaluate(model, ds, seed=seed, progress=False)
            scores = res.scores.groupby("category")
            for cat, r in res.per_category.items():
                g = scores.get_group(cat)  # which branch of s = s_text + max(M) separates the images
                rows.append({"method": name, "seed": seed, "test_set": test_set, "category": cat,
                             "pixel_auroc": r["pixel_auroc"], "image_auroc": r["image_auroc"],
                             "pixel_ap": r.get("pixel_ap"), "image_ap": r.get("image_ap"),
                             "image_auroc_s_text_only": M.roc_auc(g.label.to_numpy(), g.text_score.to_numpy()),
                             "image_auroc_max_map_only": M.roc_auc(g.label.to_numpy(), g.map_max.to_numpy()),
                             # the released code's fusion (config image_score="released"), same maps
                             "image_auroc_released_fusion": M.roc_auc(g.label.to_numpy(), released_image_scores(
                                 g.text_score.to_numpy(), g[f"map_top{released_topk(cat)}_mean"].to_numpy(), cat)),
                             "train_seconds": round(t_train, 1)})
                score_rows += _score_rows(name, seed, test_set, cat, g.path, g.label.to_numpy(),
                                          g.image_score.to_numpy())
            print(f"[bench] {name} seed {seed} on {test_set}: pixel AUROC {res.mean('pixel_auroc'):.3f}, "
                  f"image AUROC {res.mean('image_auroc'):.3f} (train {t_train:.0f} s)", flush=True)
    return pd.DataFrame(rows), pd.DataFrame(score_rows), cfg.to_dict(), models


def run_ids(df: pd.DataFrame) -> pd.Series:
    """One id per run: the Bayes-PFL training ``seed``, and where a ``pretrain_seed`` column is filled (several
    toy CLIPs pretrained with different seeds) ``"<pretrain_seed>/<seed>"``."""
    seed = df["seed"].astype(str)
    if "pretrain_seed" not in df:
        return seed
    ps = df["pretrain_seed"]
    has = ps.notna()
    return seed.where(~has, ps.where(has, 0).astype(int).astype(str) + "/" + seed)


def summarize(df: pd.DataFrame, test_set: str | None = None) -> pd.DataFrame:
    """Category mean per (method, run), then mean ± std over runs (rows of ``test_set`` only, if given). A run is
    a training seed, or a (pretraining seed, training seed) pair where rows carry ``pretrain_seed``
    (:func:`run_ids`); ``n_seeds`` counts runs."""
    if test_set is not None and "test_set" in df:
        df = df[df.test_set == test_set]
    per_seed = df.assign(run=run_ids(df)).groupby(["method", "run"])[["pixel_auroc", "image_auroc"]].mean()
    g = per_seed.groupby("method")
    out = pd.DataFrame({"pixel_auroc_mean": g["pixel_auroc"].mean(), "pixel_auroc_std": g["pixel_auroc"].std(ddof=1),
                        "image_auroc_mean": g["image_auroc"].mean(), "image_auroc_std": g["image_auroc"].std(ddof=1),
                        "n_seeds": g.size()})
    return out.fillna({"pixel_auroc_std": 0.0, "image_auroc_std": 0.0})


def bootstrap_image_auroc(scores: pd.DataFrame, n_boot: int = 2000, level: float = 0.95,
                          seed: int = 0) -> pd.DataFrame:
    """Percentile-bootstrap interval, over the test images, of the category-mean image AUROC (mean over seeds).

    ``scores``: one row per (method, seed, test_set, category, path) with ``label`` and ``score`` (what the
    measuring functions return). A replicate redraws, per category, the normal and the anomalous images with
    replacement (stratified: both counts stay fixed) and applies the same draw to every seed (run,
    :func:`run_ids`) of a method.
    With the Mann-Whitney pair matrix C[s, i, j] = [a_i > n_j] + 0.5 [a_i = n_j] of seed s and the draw's
    multiplicities w, a replicate's AUROC is w_a C w_n / (n_a n_n). Returns one row per (method, test_set):
    ``image_auroc`` (the point estimate, equal to :func:`summarize`'s mean), ``ci_low``, ``ci_high``,
    ``n_images`` (per category, summed) and ``n_seeds``.
    """
    rng = np.random.default_rng(seed)
    out = []
    for (method, test_set), g in scores.groupby(["method", "test_set"], sort=False):
        reps, point, n_cat, n_img = np.zeros(n_boot), 0.0, 0, 0
        for _cat, gc in g.groupby("category", sort=False):
            pairs = _pair_matrix(gc, *_image_ids(gc))  # [S, n_a, n_n]
            if pairs.shape[1] == 0 or pairs.shape[2] == 0:
                continue  # AUROC undefined for this category
            na, nn = pairs.shape[1:]
            wa = rng.multinomial(na, np.full(na, 1.0 / na), size=n_boot)
            wn = rng.multinomial(nn, np.full(nn, 1.0 / nn), size=n_boot)
            reps += np.einsum("bi,sij,bj->b", wa, pairs, wn) / (na * nn * pairs.shape[0])
            point += float(pairs.mean())
            n_cat += 1
            n_img += na + nn
        if not n_cat:
            continue
        lo, hi = np.quantile(reps / n_cat, [(1 - level) / 2, (1 + level) / 2])
        out.append({"method": method, "test_set": test_set, "image_auroc": point / n_cat, "ci_low": float(lo),
                    "ci_high": float(hi), "n_images": n_img, "n_seeds": int(run_ids(g).nunique())})
    return pd.DataFrame(out)


def _image_ids(gc: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The anomalous and the normal images of one category's score rows, each sorted by path."""
    first = gc.drop_duplicates("path")
    return sorted(first.path[first.label == 1]), sorted(first.path[first.label == 0])


def _pair_matrix(gc: pd.DataFrame, anomalous: list[str], normal: list[str]) -> np.ndarray:
    """Mann-Whitney pairs C[s, i, j] = [a_i > n_j] + 0.5 [a_i = n_j] of every run s of one method and category."""
    table = gc.assign(run=run_ids(gc)).pivot_table(index="path", columns="run", values="score")  # images x runs
    missing = set(anomalous + normal) - set(table.index)
    if missing:
        raise ValueError(f"no score for {sorted(missing)[:3]} ({len(missing)} images) in {gc.method.iloc[0]!r}")
    a, n = table.loc[anomalous].to_numpy().T, table.loc[normal].to_numpy().T  # [S, n_a], [S, n_n]
    return (a[:, :, None] > n[:, None, :]) + 0.5 * (a[:, :, None] == n[:, None, :])


def bootstrap_image_auroc_difference(scores: pd.DataFrame, method: str, reference: str, n_boot: int = 2000,
                                     level: float = 0.95, seed: int = 0) -> dict:
    """Paired percentile bootstrap of image AUROC(``method``) - image AUROC(``reference``) over the test images.

    Both methods must have scored the same images (one test set). A replicate redraws, per category, the anomalous
    and the normal images with replacement (stratified) and applies *the same draw* to both methods and to all
    their runs, so that what the two share -- the difficulty of the drawn images -- cancels. Returns
    ``difference`` (the difference of the :func:`summarize` means), ``ci_low``, ``ci_high``."""
    rng = np.random.default_rng(seed)
    both = scores[scores.method.isin([method, reference])]
    for m in (method, reference):
        if not (both.method == m).any():
            raise ValueError(f"no scores of {m!r}; methods: {sorted(scores.method.unique())}")
    diff, point, n_cat = np.zeros(n_boot), 0.0, 0
    for _cat, gc in both.groupby("category", sort=True):  # categories in name order: independent of row order
        anomalous, normal = _image_ids(gc)
        na, nn = len(anomalous), len(normal)
        if not na or not nn:
            continue
        wa = rng.multinomial(na, np.full(na, 1.0 / na), size=n_boot)
        wn = rng.multinomial(nn, np.full(nn, 1.0 / nn), size=n_boot)
        for sign, m in ((1.0, method), (-1.0, reference)):
            pairs = _pair_matrix(gc[gc.method == m], anomalous, normal)
            diff += sign * np.einsum("bi,sij,bj->b", wa, pairs, wn) / (na * nn * pairs.shape[0])
            point += sign * float(pairs.mean())
        n_cat += 1
    if not n_cat:
        raise ValueError("no category with both normal and anomalous images")
    lo, hi = np.quantile(diff / n_cat, [(1 - level) / 2, (1 + level) / 2])
    return {"method": method, "reference": reference, "difference": point / n_cat, "ci_low": float(lo),
            "ci_high": float(hi)}


# ------------------------------------------------------------------------------------------ comparison
#: method names used in the tables
RANDOM_NAME = "Bayes-PFL, random bpfl-toy"
TOY_NAME = "Bayes-PFL, toy CLIP"
#: test-set names of ``benchmarks/toy_clip_transfer.py``: the synthetic dataset's default split of the unseen
#: categories (8 normal + 12 anomalous images each) and the larger one that contains it (same seed, more images)
DEFAULT_TEST_SET = "default"
LARGE_TEST_SET = "large"


@dataclass
class BackboneComparison:
    """:func:`compare_backbones`' result: per-seed rows, the summary table and example maps of both backbones."""

    rows: pd.DataFrame
    table: pd.DataFrame
    n_test_images: int  # images of the unseen categories behind the table
    images: list  # CLIP-normalised [3, S, S] tensors of the examples
    masks: list  # [S, S] ground-truth masks
    titles: list[str]
    maps: dict[str, list]  # method -> one [S, S] map per example (first seed's model)

    def figure(self, title: str = "random vs toy-pretrained CLIP on unseen categories"):
        """Rows: image, ground truth, then one overlay row per backbone (fixed colour scale 0-1)."""
        import matplotlib.pyplot as plt


        n, names = len(self.images), list(self.maps)
        fig, axes = plt.subplots(2 + len(names), n, figsize=(2.1 * n, 2.1 * (2 + len(names))), squeeze=False)
        for j in range(n):
            axes[0, j].imshow(to_display_image(self.images[j]))
            axes[0, j].set_title(self.titles[j], fontsize=8)
            axes[1, j].imshow(np.nan_to_num(np.asarray(self.masks[j], dtype=float)), cmap="gray", vmin=0, vmax=1)
            for i, m in enumerate(names):
                axes[2 + i, j].imshow(overlay(self.images[j], self.maps[m][j]))
        for i, lab in enumerate(["image", "ground truth"] + [m.replace("Bayes-PFL, ", "") for m in names]):
            axes[i, 0].set_ylabel(lab, fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig


def compare_backbones(toy_path: str | Path, data_root: str | Path, out_dir: str | Path, seeds=(0,),
                      epochs: int | None = None, image_size: int | None = None, n_show: int = 4,
                      overrides: dict | None = None, progress: bool = False) -> BackboneComparison:
    """The same Bayes-PFL recipe on a random ``bpfl-toy`` and on the toy CLIP at ``toy_path``: trained on the
    synthetic dataset's *seen* categories, evaluated zero-shot on its *unseen* ones (held out of both trainings),
    plus the classical reference's best window; maps of ``n_show`` anomalous unseen images from each backbone.

    The learning rate is the benchmark's :data:`~bpfl.toyclip.pretrain.TOY_BAYESPFL_LR` unless ``overrides`` sets
    one. Use the default synthetic split (20 unseen images per category) or larger: on the ``tiny`` preset (6 per
    category) image AUROC takes only a few distinct values and swings from chance to 1.0 with the training seed."""

    size = image_size or TOY_IMAGE_SIZE
    layers = toy_layers(TOY_ARCH)
    train_ds = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["seen"], image_size=size)
    test_ds = open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=size)
    base = {**toy_bayespfl_overrides(toy_path, TOY_ARCH, size), **(overrides or {})}  # "pretrained" set per backbone
    torch.manual_seed(0)
    backbones = {RANDOM_NAME: (load_backbone(TOY_ARCH, None, image_size=size, layers=layers), None),
                 TOY_NAME: (load_backbone(TOY_ARCH, str(toy_path), image_size=size, layers=layers), str(toy_path))}
    idx = pick_examples(test_ds, n_show)
    shown = collate([test_ds[i] for i in idx])
    frames, maps = [], {}
    for name, (bb, pretrained) in backbones.items():
        df, _, _, models = train_and_evaluate(name, bb, {**base, "pretrained": pretrained}, train_ds, test_ds,
                                              list(seeds), Path(out_dir), epochs, progress)
        frames.append(df)
        pairs = list(predict_dataset(models[0], test_ds, idx, progress=False))
        maps[name] = [m for _, o in pairs for m in o.anomaly_map.numpy()]
    cl, _ = classical_reference(open_dataset(data_root, split="test", categories=SYNTHETIC_GROUPS["unseen"],
                                             image_size=size, normalize=False))
    best = cl.groupby("method")["pixel_auroc"].mean().idxmax()
    frames.append(cl[cl.method == best])
    rows = pd.concat(frames, ignore_index=True)
    s = summarize(rows)
    table = pd.DataFrame({"pixel AUROC": s.pixel_auroc_mean, "image AUROC": s.image_auroc_mean,
                          "seeds": s.n_seeds}).loc[[RANDOM_NAME, TOY_NAME, best]].round(3)
    return BackboneComparison(rows, table, len(test_ds), list(shown["image"]), list(shown["mask"]),
                              list(shown["class_name"]), maps)


def measured_table(path: str | Path | None = None, test_set: str | None = None) -> pd.DataFrame | None:
    """The committed measurement of ``benchmarks/toy_clip_transfer.py`` (``benchmarks/results/toy_clip_transfer.csv``)
    summarised per method (mean ± std over runs, :func:`run_ids`; with the bootstrap interval over test images
    when the per-image scores ``<name>_scores.csv`` lie beside it), on ``test_set`` (default:
    :data:`LARGE_TEST_SET` where the file has several), or None where the file is absent (e.g. an installed
    package)."""
    p = Path(path) if path else Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "toy_clip_transfer.csv"
    if not p.is_file():
        return None
    rows = pd.read_csv(p)
    if test_set is None and "test_set" in rows and rows.test_set.nunique() > 1:
        test_set = LARGE_TEST_SET
    s = summarize(rows, test_set)
    table = pd.DataFrame({"pixel AUROC": s.pixel_auroc_mean.round(3), "pixel ± (runs)": s.pixel_auroc_std.round(3),
                          "image AUROC": s.image_auroc_mean.round(3), "image ± (runs)": s.image_auroc_std.round(3),
                          "runs": s.n_seeds})
    scores_path = p.with_name(p.stem + "_scores.csv")
    if scores_path.is_file():
        sc = pd.read_csv(scores_path)
        if test_set is not None:
            sc = sc[sc.test_set == test_set]
        ci = bootstrap_image_auroc(sc).set_index("method")
        table["image 95% CI (test images)"] = [f"{ci.at[m, 'ci_low']:.3f}-{ci.at[m, 'ci_high']:.3f}"
                                               if m in ci.index else "" for m in table.index]
    return table


def anomaly_kind_auroc(scores: pd.DataFrame, test_set: str | None = LARGE_TEST_SET) -> pd.DataFrame:
    """Image AUROC of each anomaly kind (the synthetic set's colour / contamination / distortion, read from the
    image's folder) against the normal images of its category: per run and category, then the mean over
    categories and runs. Rows: methods; columns: kinds. From ``toy_clip_transfer_scores.csv``."""
    from sklearn.metrics import roc_auc_score

    s = scores if test_set is None else scores[scores.test_set == test_set]
    s = s.assign(kind=s.path.str.split("/").str[-2])
    run_cols = [c for c in ("seed", "pretrain_seed") if c in s]
    rows = []
    for (method, *run, category), g in s.groupby(["method", *run_cols, "category"], dropna=False):
        good = g[g.kind == "good"].score.to_numpy()
        for kind, k in g[g.label == 1].groupby("kind"):
            y = np.r_[np.zeros(len(good)), np.ones(len(k))]
            rows.append({"method": method, "run": tuple(run), "category": category, "kind": kind,
                         "auroc": roc_auc_score(y, np.r_[good, k.score.to_numpy()])})
    per = pd.DataFrame(rows).groupby(["method", "run", "kind"]).auroc.mean()  # mean over categories
    return per.groupby(["method", "kind"]).mean().unstack("kind")
