"""Formatting and table helpers of the notebooks (percentages, the paper's values, time per image), and the
pieces of notebooks 04-06 that are not the lesson:

* the readers of the committed tables of ``benchmarks/notebook_tables.py`` (``committed_*``, ``read_committed``):
  every row trained with 3 training seeds, "mean ± std over N training runs";
* the same rows measured live in the same long format (:func:`live_runs`, paper mode);
* the figures of notebooks 04-06 (one colour scale and a colorbar wherever panels are compared);
* the "Read: ..." sentences (``*_sentence``): what a table or figure shows, computed from its data, so that the
  commentary cannot drift from the numbers.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .. import metrics as M
from ..bundled_weights import short_hash
from ..config import with_ablations
from ..data import collate
from ..evaluate import evaluate, predict_dataset
from ..features import FeatureStore
from ..paper_numbers import paper_table1
from ..seeds import train_and_evaluate_seeds
from ..sweeps import PAPER_DEFAULTS, PAPER_SWEEP_RESULTS, SWEEP_FIELDS, SWEEP_METRICS
from ..toyclip.transfer import measured_table
from ..train import load_model, train
from ..viz import METHOD_TITLES, figure3_panel, pick_examples, to_display_image


def format_pct(value: float | None, std: float | None = None, digits: int = 1) -> str:
    """A metric in [0, 1] as a percentage string ('n/a' for NaN/None), with ± std when given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    s = f"{100 * value:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        s += f" ± {100 * std:.{digits}f}"
    return s


def format_paper(value) -> str:
    """A paper value (already in %) or a (mean, std) pair; '—' where the paper has none."""
    if value is None:
        return "—"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]:g} ± {value[1]:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return f"{value:g}"


@torch.no_grad()
def time_per_image(model, dataset, n_samples: int, n_images: int = 8, warmup: int = 1) -> tuple[float, float]:
    """Full inference time per image (CLIP + prompts + maps, batch size 1) in ms: (mean, std) over images."""
    model.eval()
    n = min(n_images, len(dataset))
    items = [collate([dataset[i]]) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    times = []
    for j, b in enumerate(items[:warmup] + items):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        model(b["image"], b["class_name"], n_samples=n_samples, generator=gen)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if j >= warmup:
            times.append(1000.0 * (time.perf_counter() - t0))
    a = np.array(times)
    return float(a.mean()), float(a.std(ddof=1) if len(a) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------------
# the committed tables of benchmarks/notebook_tables.py (notebooks 05 and 06)
# ----------------------------------------------------------------------------------------------------------
#: where ``benchmarks/notebook_tables.py`` commits its results (files ``notebook_tables_*.csv|json`` and ``.md``)
COMMITTED_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
COMMITTED_PREFIX = "notebook_tables"
#: the category-mean metrics of the committed tables, in the order the notebooks show them
COMMITTED_METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")


def committed_file(kind: str, folder: str | Path | None = None) -> Path:
    """``benchmarks/results/notebook_tables_<kind>.csv`` (``kind``: runs, epochs, sweeps, deltas), or ``.json``
    for ``provenance``, or the report ``notebook_tables.md`` for ``report``. ``$BPFL_COMMITTED_DIR`` replaces
    ``benchmarks/results`` (e.g. the output of a ``--smoke`` run, to try the notebooks on it)."""
    import os

    folder = Path(folder) if folder is not None else Path(os.environ.get("BPFL_COMMITTED_DIR") or COMMITTED_DIR)
    if kind == "report":
        return folder / f"{COMMITTED_PREFIX}.md"
    return folder / f"{COMMITTED_PREFIX}_{kind}.{'json' if kind == 'provenance' else 'csv'}"


def committed_available(folder: str | Path | None = None) -> bool:
    """Whether the committed measurement is here (a source checkout; an installed package has none)."""
    return committed_file("runs", folder).is_file() and committed_file("provenance", folder).is_file()


def committed_provenance(folder: str | Path | None = None) -> dict:
    """Machine, date, seeds, recipe, bundled-weights hash ... of the committed measurement."""
    return json.loads(committed_file("provenance", folder).read_text())


def read_committed(kind: str, folder: str | Path | None = None) -> pd.DataFrame:
    """One committed CSV (``runs``, ``epochs``, ``sweeps`` or ``deltas``) as a DataFrame."""
    return pd.read_csv(committed_file(kind, folder))


def _summary(frame: pd.DataFrame, key: str, order: Sequence) -> pd.DataFrame:
    metrics = [m for m in COMMITTED_METRICS if m in frame.columns]
    g = frame.groupby(key, sort=False)[metrics]
    out = pd.concat({"mean": g.mean(), "std": g.std(ddof=1)}, axis=1)
    out.columns = [f"{m}_{stat}" for stat, m in out.columns]
    out = out[[f"{m}_{stat}" for m in metrics for stat in ("mean", "std")]]
    out["n"] = frame.groupby(key, sort=False).size()
    return out.loc[[r for r in order if r in out.index]]


def committed_summary(rows: Sequence[str] | None = None, test_set: str = "large", *, runs: pd.DataFrame | None = None,
                      experiment: str | None = None, folder: str | Path | None = None) -> pd.DataFrame:
    """Mean and std over the committed training runs: one line per table row (``rows`` in this order; ``None``:
    every row of ``experiment``), columns ``<metric>_mean``, ``<metric>_std`` (in [0, 1]) and ``n`` (runs).

    ``test_set``: ``"large"`` (320 unseen images, the headline), ``"default"`` (the 80 the notebooks evaluate
    live) or a real sample's name. ``attrs["caption"]`` says "mean ± std over N training runs"."""
    runs = read_committed("runs", folder) if runs is None else runs
    sel = runs[runs.test_set == test_set]
    if experiment is not None:
        sel = sel[sel.experiment == experiment]
    else:  # the R sweep and the timing rows are asked for by name
        sel = sel[~sel.experiment.isin(["R", "timing"])]
    if rows is not None:
        sel = sel[sel.row.isin(list(rows))]
    order = list(rows) if rows is not None else list(dict.fromkeys(sel.row))
    out = _summary(sel, "row", order)
    n = int(out["n"].max()) if len(out) else 0
    out.attrs["caption"] = f"mean ± std over {n} training runs"
    return out


def format_summary(summary: pd.DataFrame, metrics: Sequence[str] | None = None, digits: int = 1) -> pd.DataFrame:
    """A mean/std summary as "mean ± std" strings in % (one run: the mean alone; NaN: 'n/a')."""
    metrics = metrics or [m for m in COMMITTED_METRICS if f"{m}_mean" in summary.columns]
    out = pd.DataFrame(index=summary.index)
    for m in metrics:
        out[m] = [format_pct(a, None if (n or 0) < 2 else b, digits)
                  for a, b, n in zip(summary[f"{m}_mean"], summary[f"{m}_std"], summary.get("n", [2] * len(summary)))]
    if "n" in summary:
        out["runs"] = summary["n"].astype(int)
    return out


def committed_value(row: str, metric: str, test_set: str = "large", stat: str = "mean",
                    folder: str | Path | None = None) -> float:
    """One number of the committed tables (``stat``: mean or std over the training runs), in [0, 1]."""
    s = committed_summary([row], test_set, folder=folder)
    return float(s.at[row, f"{metric}_{stat}"])


def committed_deltas(folder: str | Path | None = None) -> pd.DataFrame:
    """Each committed row minus the full model, paired by training seed (large test set), indexed by row:
    ``<metric>_delta_mean``/``_delta_std`` and the bootstrap interval ``image_auroc_delta_ci_low/high``."""
    return read_committed("deltas", folder).set_index("row")


def committed_sweep(param: str, sweeps: pd.DataFrame | None = None, folder: str | Path | None = None) -> pd.DataFrame:
    """Appendix B from the committed runs: one line per value of ``param`` (K, B, P or Q), mean/std over runs."""
    sweeps = read_committed("sweeps", folder) if sweeps is None else sweeps
    sel = sweeps[sweeps.param == param].sort_values("value")
    out = _summary(sel, "value", sorted(sel.value.unique()))
    out.index.name = param
    return out


def committed_sweep_params(folder: str | Path | None = None) -> list[str]:
    """The Appendix-B parameters the committed sweeps cover, in the paper's order (K, B, P, Q)."""
    have = set(read_committed("sweeps", folder).param)
    return [p for p in ("K", "B", "P", "Q") if p in have]


def committed_epochs(folder: str | Path | None = None) -> pd.DataFrame:
    """Figure 4 from the committed runs: one line per (design row, training seed, epoch)."""
    return read_committed("epochs", folder)


# ----------------------------------------------------------------------------------------------------------
# notebook 04 (inference and maps): examples, figures and the sentences that read them
# ----------------------------------------------------------------------------------------------------------
def pick_columns(dataset, n_anomalous: int, n_normal: int = 1) -> list[int]:
    """``n_anomalous`` anomalous images with large defects, one category after the other
    (:func:`bpfl.viz.pick_examples`), then ``n_normal`` normal images taken from categories not shown yet where
    possible (so no two columns show the same surface when there are enough categories)."""

    picks = pick_examples(dataset, n_anomalous)
    shown = {dataset.records[i].class_name for i in picks}
    normals = [i for i, r in enumerate(dataset.records) if r.label == 0]
    fresh = [i for i in normals if dataset.records[i].class_name not in shown]
    chosen: list[int] = []
    for i in fresh + normals:
        if len(chosen) == n_normal:
            break
        if i not in chosen and dataset.records[i].class_name not in {dataset.records[c].class_name for c in chosen}:
            chosen.append(i)
    for i in normals:  # fewer categories than columns: repeat one
        if len(chosen) < n_normal and i not in chosen:
            chosen.append(i)
    return picks + chosen


def column_titles(names: Sequence[str], labels: Sequence[int]) -> list[str]:
    """'grass · anomalous' / 'gravel · normal' column titles."""
    return [f"{n} · {'normal' if int(lab) == 0 else 'anomalous'}" for n, lab in zip(names, labels)]


def _mask_grid(masks, grid: tuple[int, int]) -> np.ndarray:
    """Ground-truth masks [N, S, S] -> the share of each patch covered by the defect [N, H*W] (0 for no mask)."""
    m = torch.nan_to_num(torch.as_tensor(np.asarray([np.asarray(x, dtype=np.float32) for x in masks])), nan=0.0)
    return torch.nn.functional.adaptive_avg_pool2d((m > 0.5).float()[:, None], grid)[:, 0].flatten(1).numpy()


def attention_on_defects(attn, masks, grid: tuple[int, int]) -> pd.DataFrame:
    """RCA attention ``attn`` [N, 2, H*W] (rows: normal, abnormal text embedding) against the defects: per
    anomalous image, the share of each row's attention on the defect's patches divided by the defect's share of
    the patches (1 = no preference), and the defect's share itself."""
    a = np.asarray(attn)
    cover = _mask_grid(masks, grid)
    rows = []
    for j in range(len(a)):
        area = float(cover[j].mean())
        if area <= 0:
            continue
        rows.append({"image": j, "defect share of patches": area,
                     "normal row: attention on defect / share": float((a[j, 0] * cover[j]).sum()) / area,
                     "abnormal row: attention on defect / share": float((a[j, 1] * cover[j]).sum()) / area})
    return pd.DataFrame(rows).set_index("image")


def attention_sentence(table: pd.DataFrame) -> str:
    """What the attention table says, in one sentence computed from it."""
    if not len(table):
        return "no anomalous image among the columns: nothing to measure."
    n = table["normal row: attention on defect / share"].mean()
    a = table["abnormal row: attention on defect / share"].mean()

    def word(v):
        return "more than uniform" if v > 1.2 else "less than uniform" if v < 0.8 else "about uniform"
    return (f"Read: on these {len(table)} anomalous images the abnormal row puts {a:.2f}x a uniform share of its "
            f"attention on the defect ({word(a)}), the normal row {n:.2f}x ({word(n)}).")


def attention_figure(batch: dict, rel: np.ndarray, names, labels, title: str = ""):
    """Image row + the normal and abnormal rows' attention (``rel`` [N, 2, H, W], relative to uniform) on ONE
    colour scale with a colorbar, the ground truth outlined in cyan."""
    import matplotlib.pyplot as plt


    n = rel.shape[0]
    size = batch["image"].shape[-1]
    vmax = float(np.percentile(rel, 99.5))
    fig, axes = plt.subplots(3, n, figsize=(2.1 * n + 1.0, 6.6), squeeze=False, layout="constrained")
    shown = None
    for j in range(n):
        mask = np.nan_to_num(np.asarray(batch["mask"][j], dtype=np.float32)) > 0.5
        axes[0, j].imshow(to_display_image(batch["image"][j]))
        axes[0, j].set_title(column_titles([names[j]], [labels[j]])[0], fontsize=8)
        for i in (1, 2):
            shown = axes[i, j].imshow(rel[j, i - 1], cmap="viridis", vmin=0, vmax=vmax, extent=(0, size, size, 0))
        for i in range(3):
            if mask.any():
                axes[i, j].contour(mask.astype(np.float32), levels=[0.5], colors="cyan", linewidths=0.8)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].grid(False)
    axes[1, 0].set_ylabel("normal row of Z")
    axes[2, 0].set_ylabel("abnormal row of Z")
    fig.colorbar(shown, ax=list(axes[1:].ravel()), shrink=0.8, fraction=0.03, pad=0.01,
                 label="attention × HW (1 = uniform)", extend="max")
    fig.suptitle(title, fontsize=10)
    return fig


@torch.no_grad()
def layer_pixel_metrics(model, dataset, features=None, seed: int = 0) -> pd.DataFrame:
    """Pixel AUROC and AP of each layer's map M_l (mean over B and R) and of M, pooled over all pixels of
    ``dataset`` (the anomalous images with masks and the normal images)."""

    idx = [i for i, r in enumerate(dataset.records) if r.label == 0 or r.mask_path]
    per_layer, full, gts = [], [], []
    model.eval()
    for start in range(0, len(idx), 8):
        chunk = idx[start:start + 8]
        batch = collate([dataset[i] for i in chunk])
        feats = features.features(model.backbone, dataset, chunk, batch["image"]) if features is not None else None
        out = model(None if feats is not None else batch["image"], batch["class_name"], features=feats,
                    map_size=batch["image"].shape[-2:], generator=torch.Generator().manual_seed(seed + start),
                    return_layer_maps=True)
        per_layer.append(out.layer_maps.float().numpy())
        full.append(out.anomaly_map.float().numpy())
        gts.append(np.nan_to_num(batch["mask"].numpy()) > 0.5)
    lm, fm, gt = np.concatenate(per_layer), np.concatenate(full), np.concatenate(gts)
    rows = {f"layer {layer}": lm[:, i] for i, layer in enumerate(model.config.layers)}
    rows["M (mean of the layers)"] = fm
    return pd.DataFrame({name: {"pixel AUROC": M.roc_auc(gt.ravel(), m.ravel()),
                                "pixel AP": M.average_precision(gt.ravel(), m.ravel()),
                                "mean of the map": float(m.mean())} for name, m in rows.items()}).T


def layer_sentence(table: pd.DataFrame) -> str:
    layers = table.drop(index="M (mean of the layers)")
    best, worst = layers["pixel AUROC"].idxmax(), layers["pixel AUROC"].idxmin()
    m = table.at["M (mean of the layers)", "pixel AUROC"]
    beaten = int((layers["pixel AUROC"] < m).sum())
    return (f"Read: {best} localises best alone (pixel AUROC {layers.at[best, 'pixel AUROC']:.3f}), {worst} worst "
            f"({layers.at[worst, 'pixel AUROC']:.3f}); their mean M reaches {m:.3f}, above {beaten} of the "
            f"{len(layers)} layers alone.")


def branch_auroc(scores: pd.DataFrame) -> pd.Series:
    """Image AUROC of s_text, of s_img = max(M) and of s = s_text + s_img, per category then averaged
    (``scores``: an :class:`bpfl.evaluate.EvalResult`'s per-image scores)."""

    out = {}
    for col, name in (("text_score", "s_text alone"), ("map_max", "s_img = max(M) alone"),
                      ("image_score", "s = s_text + s_img")):
        vals = [M.roc_auc(g.label.to_numpy(), g[col].to_numpy()) for _, g in scores.groupby("category")
                if g.label.nunique() == 2]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    return pd.Series(out)


def branch_sentence(b: pd.Series, scores: pd.DataFrame | None = None) -> str:
    t, i, s = b["s_text alone"], b["s_img = max(M) alone"], b["s = s_text + s_img"]
    lead = "the text branch" if t > i else "the image branch"
    comb = ("the sum beats both" if s > max(t, i) else "the sum lies between them" if s > min(t, i)
            else "the sum is below both")
    out = (f"Read: {lead} separates normal from anomalous images better here (s_text {t:.3f}, max(M) {i:.3f}); "
           f"{comb} ({s:.3f}).")
    if scores is not None:
        hi = scores.groupby("label")["map_max"].apply(lambda v: float((v > 0.9).mean()))
        out += (f" max(M) exceeds 0.9 on {hi.get(1, float('nan')):.0%} of the anomalous and "
                f"{hi.get(0, float('nan')):.0%} of the normal images: one hot spot anywhere in a normal image "
                "is enough to raise its max.")
    return out


def figure3_dataset_panel(model, name: str, dataset, n: int, S=None, features=None, seed: int = 0):
    """Figure-3-style panel of ``n`` examples of ``dataset`` (anomalies with large defects, and one normal image
    where there are normal images): image, ground truth, map, overlay on ONE colour scale with a colorbar."""

    has_normal = any(r.label == 0 for r in dataset.records)
    idx = pick_columns(dataset, n - 1 if has_normal else n, n_normal=1 if has_normal else 0)
    images, masks, maps, titles = [], [], [], []
    for b, o in predict_dataset(model, dataset, idx, progress=False, seed=seed, features=features):
        images += list(b["image"])
        masks += list(b["mask"])
        maps += list(o.anomaly_map.float().numpy())
        titles += column_titles(b["class_name"], b["label"].tolist())
    fig = figure3_panel(images, masks, maps, titles)
    prov = S.provenance(model, name, seeds=[model.config.seed]) if S is not None else name
    fig.suptitle(f"{prov} (training seed)\n{fig.get_suptitle()}", fontsize=8)
    return fig, maps


def train_design(S, design: str, eval_set: tuple[str, object] | None = None, metrics: Sequence[str] = (
        "pixel_ap", "pixel_auroc", "image_auroc")):
    """A prompt design (``aprilgan+``, ``anomalyclip+``, ...) trained with the notebook's recipe, everything else
    identical to Bayes-PFL, through the shared cache (name ``design-<design>``; notebooks 04 and 06 share it).

    ``eval_set=(name, dataset)`` evaluates after every epoch (Figure 4's curve, columns ``eval_<metric>`` in the
    history); the cache key does not cover it, so whichever notebook trains first decides."""
    callback = None
    if eval_set is not None:
        store = FeatureStore()
        name, ds = eval_set
        callback = pixel_ap_each_epoch(ds, name, store, metrics)
    return S.train_or_load(S.config.replace(prompt_design=design), name=f"design-{design}", epoch_callback=callback)


def pixel_ap_each_epoch(dataset, name: str = "", features=None,
                        metrics: Sequence[str] = ("pixel_ap", "pixel_auroc", "image_auroc")):
    """An ``epoch_callback`` for training: the metrics on ``dataset`` after every epoch (Figure 4), keyed
    ``eval_<metric>``; ``features`` (a FeatureStore) encodes each test image once for all epochs."""

    def callback(epoch: int, m) -> dict:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = evaluate(m, dataset, progress=False, aupro_variant=None, dataset_name=name, features=features)
        return {f"eval_{k}": res.mean(k) for k in metrics}
    return callback


def design_metrics(models: dict, dataset, name: str, features=None) -> pd.DataFrame:
    """Image and pixel AUROC/AP of each design's model on ``dataset`` (one training run each), in %."""

    rows = {}
    for design, m in models.items():
        res = evaluate(m, dataset, progress=False, aupro_variant=None, dataset_name=name, features=features)
        rows[METHOD_TITLES.get(design, design)] = {k: round(100 * res.mean(k), 1) for k in
                                                   ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap")}
    out = pd.DataFrame(rows).T
    out.index.name = "design (one training run, %)"
    return out


def design_sentence(table: pd.DataFrame) -> str:
    best_px, best_img = table["pixel_ap"].idxmax(), table["image_auroc"].idxmax()
    bp = table.loc["Bayes-PFL"] if "Bayes-PFL" in table.index else None
    out = (f"Read: the highest pixel AP here is {best_px}'s ({table.at[best_px, 'pixel_ap']:.1f}), the highest "
           f"image AUROC {best_img}'s ({table.at[best_img, 'image_auroc']:.1f})")
    if bp is not None and best_px != "Bayes-PFL":
        out += (f"; Bayes-PFL reaches {bp['pixel_ap']:.1f} pixel AP. The paper's Figure 3 shows Bayes-PFL ahead; "
                "here it is not, one training run each on a toy backbone (notebook 06 has the committed "
                "comparison over 3 training runs)")
    return out + "."


@torch.no_grad()
def map_inside_outside(model, dataset, features=None, seed: int = 0) -> dict:
    """Mean of M inside the defects, outside them (anomalous images) and on normal images, over ``dataset``."""

    inside, outside, normal = [], [], []
    for b, o in predict_dataset(model, dataset, progress=False, seed=seed, features=features):
        maps = o.anomaly_map.float().numpy()
        gt = np.nan_to_num(b["mask"].numpy()) > 0.5
        for m, g, lab in zip(maps, gt, b["label"].tolist()):
            if lab == 0:
                normal.append(m.mean())
            elif g.any():
                inside.append(m[g].mean())
                outside.append(m[~g].mean())
    return {"M inside defects": float(np.mean(inside)), "M outside defects": float(np.mean(outside)),
            "M on normal images": float(np.mean(normal)) if normal else float("nan"),
            "inside - outside": float(np.mean(inside) - np.mean(outside))}


def ensemble_sentence(table: pd.DataFrame) -> str:
    i, t = table.loc["image ensemble"], table.loc["text ensemble"]
    higher = i["M inside defects"] > t["M inside defects"]
    contrast = i["inside - outside"] > t["inside - outside"]
    verdict = ("as the paper's Figure 6 says" if higher and contrast else
               "only partly as the paper's Figure 6 says" if higher or contrast else
               "unlike the paper's Figure 6")
    return (f"Read: inside the defects M averages {i['M inside defects']:.3f} (image ensemble) vs "
            f"{t['M inside defects']:.3f} (text ensemble); the contrast inside − outside is "
            f"{i['inside - outside']:.3f} vs {t['inside - outside']:.3f}: {verdict}.")


def measured_transfer() -> tuple[pd.DataFrame | None, str]:
    """The committed random-vs-toy measurement: of the bundled toy CLIP when measured
    (``toy_clip_transfer_bundled.csv``), else of the toy CLIPs of ``toy_clip_transfer.csv``; (table, file)."""

    for stem in ("toy_clip_transfer_bundled", "toy_clip_transfer"):
        path = COMMITTED_DIR / f"{stem}.csv"
        if path.is_file():
            return measured_table(path), f"benchmarks/results/{stem}.md"
    return None, ""


def _row(table: pd.DataFrame, needle: str) -> str | None:
    hits = [i for i in table.index if needle in str(i)]
    return hits[0] if hits else None


def transfer_sentence(table: pd.DataFrame) -> str:
    toy, rnd = _row(table, "toy CLIP"), _row(table, "random")
    free = _row(table, "training-free")
    if toy is None or rnd is None:
        return ""
    out = (f"Read: Bayes-PFL reaches pixel AUROC {table.at[toy, 'pixel AUROC']:.2f} / image AUROC "
           f"{table.at[toy, 'image AUROC']:.2f} on the toy CLIP and {table.at[rnd, 'pixel AUROC']:.2f} / "
           f"{table.at[rnd, 'image AUROC']:.2f} on random weights (chance = 0.50).")
    if free is not None:
        d = table.at[free, "pixel AUROC"] - table.at[toy, "pixel AUROC"]
        out += (f" The toy CLIP *alone*, with two fixed prompts and no training, reaches "
                f"{table.at[free, 'pixel AUROC']:.2f} / {table.at[free, 'image AUROC']:.2f}: "
                + ("as good as" if abs(d) < 0.02 else "better than" if d > 0 else "below")
                + " Bayes-PFL on it. The paper's Bayes-PFL beats training-free prompts by far on real CLIP; here "
                "the toy CLIP was pretrained with exactly such 'flawless/damaged surface' captions, so its own "
                "prompts already know the task, and 80 training images of 4 seen surfaces add little.")
    return out


def live_transfer_sentence(table: pd.DataFrame) -> str:
    toy, rnd = _row(table, "toy CLIP"), _row(table, "random")
    if toy is None or rnd is None:
        return ""
    gap = table.at[toy, "pixel AUROC"] - table.at[rnd, "pixel AUROC"]
    return (f"Read (live): pixel AUROC {table.at[toy, 'pixel AUROC']:.2f} with the toy CLIP vs "
            f"{table.at[rnd, 'pixel AUROC']:.2f} with random weights ({gap:+.2f}); image AUROC "
            f"{table.at[toy, 'image AUROC']:.2f} vs {table.at[rnd, 'image AUROC']:.2f}.")


# ----------------------------------------------------------------------------------------------------------
# notebooks 05 and 06: the rows of Tables 1-4 / Figures 4-5, measured live (paper mode) in the committed format
# ----------------------------------------------------------------------------------------------------------
#: Table 2's trained rows, Figure 5's designs and Figure 4's prompt designs: row label -> what changes
TRAINED_ROWS: dict[str, dict] = {
    "Bayes-PFL": {},
    "w/o ISD": {"ablation": "no-isd"},
    "w/o IAD": {"ablation": "no-iad"},
    "w/o ISD, IAD": {"ablation": "no-isd-iad"},
    "w/o RCA": {"ablation": "no-rca"},
    "w/o L_ort": {"ablation": "no-ort"},
    "w/o x_cls": {"ablation": "no-x-cls"},
    "w/o x_patch": {"ablation": "no-x-patch"},
    "ISD-ISD": {"ablation": "isd-isd"},
    "IAD-IAD": {"ablation": "iad-iad"},
    "APRIL-GAN+": {"prompt_design": "aprilgan+"},
    "AnomalyCLIP+": {"prompt_design": "anomalyclip+"},
}
#: rows that reuse the full model's weights with an inference-time switch (Table 2's s_text/s_img, Table 4)
INFERENCE_ROWS: dict[str, dict] = {"w/o s_text": {"use_s_text": False}, "w/o s_img": {"use_s_img": False},
                                   "text ensemble": {"ensemble": "text"}}
TABLE2_ORDER = ("Bayes-PFL", "w/o ISD", "w/o IAD", "w/o ISD, IAD", "w/o RCA", "w/o L_ort", "w/o x_cls",
                "w/o x_patch", "w/o s_text", "w/o s_img")
#: the training-free prompt design of the committed tables
TRAINING_FREE_ROW = "WinCLIP-style (training-free)"


def row_config(base, row: str):
    """The configuration of a committed/live row (:data:`TRAINED_ROWS`) from the full model's ``base``."""

    spec = TRAINED_ROWS[row]
    cfg = with_ablations(base, [spec["ablation"]]) if "ablation" in spec else base
    return cfg.replace(prompt_design=spec["prompt_design"]) if "prompt_design" in spec else cfg


def row_slug(row: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")


def live_runs(S, rows: Sequence[str], test_sets: dict, seeds: Sequence[int], *, inference: Sequence[str] = (),
              r_values: Sequence[int] = (), aupro: bool = False) -> pd.DataFrame:
    """Train every row of ``rows`` once per training seed (:func:`bpfl.seeds.train_and_evaluate_seeds`; cached
    under ``checkpoints/seeds/<row>/seed<k>``) and evaluate it on ``test_sets`` ({name: dataset}); the
    ``inference`` rows and the ``r_values`` reuse the full model's runs. Returns the committed tables' long
    format (experiment, row, seed, test_set, R, metrics), so :func:`committed_summary` (``runs=``) reads both."""

    out, full = [], None
    for row in rows:
        res = train_and_evaluate_seeds(row_config(S.config, row), S.aux_dataset(), test_sets, list(seeds),
                                       S.checkpoint_root / "seeds" / row_slug(row), backbone=S.backbone,
                                       aupro_variant="mvtec" if aupro else None)
        for (test_set, _run), r in res.runs.iterrows():
            out.append({"experiment": "trained", "row": row, "seed": int(r["seed"]), "test_set": test_set,
                        "R": S.config.test_samples, **{m: r.get(m, float("nan")) for m in COMMITTED_METRICS}})
        if row == "Bayes-PFL":
            full = res.checkpoints
    if (inference or r_values) and full is None:
        raise ValueError("the inference rows and the R sweep need 'Bayes-PFL' among the rows")
    for run, ckpt in (full or {}).items():
        seed = int(str(run).replace("seed", ""))
        for row in inference:
            m = load_model(ckpt, backbone=S.backbone, **INFERENCE_ROWS[row])
            for name, ds in test_sets.items():
                res = evaluate(m, ds, progress=False, aupro_variant=None, dataset_name=name)
                out.append({"experiment": "inference", "row": row, "seed": seed, "test_set": name,
                            "R": m.config.test_samples, **{k: res.mean(k) for k in COMMITTED_METRICS
                                                          if k in res.table.columns}})
        base = load_model(ckpt, backbone=S.backbone) if r_values else None
        for R in r_values:
            for name, ds in test_sets.items():
                res = evaluate(base, ds, n_samples=R, progress=False, aupro_variant=None, dataset_name=name)
                out.append({"experiment": "R", "row": f"R={R}", "seed": seed, "test_set": name, "R": R,
                            **{k: res.mean(k) for k in COMMITTED_METRICS if k in res.table.columns}})
    return pd.DataFrame(out)


def paired_deltas(runs: pd.DataFrame, test_set: str, reference: str = "Bayes-PFL",
                  metrics: Sequence[str] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap")) -> pd.DataFrame:
    """Each row minus ``reference`` on ``test_set``, paired by training seed: ``<m>_delta_mean``/``_delta_std``."""
    r = runs[(runs.test_set == test_set) & ~runs.experiment.isin(["R", "timing"])]
    ref = r[r.row == reference].set_index("seed")
    out = {}
    for row, g in r[r.row != reference].groupby("row", sort=False):
        g = g.set_index("seed")
        seeds = [s for s in g.index if s in ref.index]
        if not seeds:
            continue
        rec = {"n_pairs": len(seeds)}
        for m in metrics:
            d = g.loc[seeds, m] - ref.loc[seeds, m]
            rec[f"{m}_delta_mean"] = float(d.mean())
            rec[f"{m}_delta_std"] = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
        out[row] = rec
    return pd.DataFrame(out).T


def beside_paper(summary: pd.DataFrame, paper: dict, metrics: Sequence[str] = (
        "image_auroc", "image_ap", "pixel_auroc", "pixel_ap"), live: pd.DataFrame | None = None,
        live_metrics: Sequence[str] = ("image_auroc", "pixel_auroc")) -> pd.DataFrame:
    """The kit's "mean ± std" next to the paper's value for each metric (``paper``: row -> tuple in % in the
    order of ``metrics``, None for '—'), plus optional live columns (``live``: row -> {metric: value})."""
    short = {"image_auroc": "img AUROC", "image_ap": "img AP", "pixel_auroc": "px AUROC", "pixel_ap": "px AP",
             "image_f1_max": "img F1-max", "pixel_aupro": "px PRO"}
    shown = format_summary(summary, metrics)
    out = pd.DataFrame(index=summary.index)
    for j, m in enumerate(metrics):
        out[f"kit {short[m]}"] = shown[m]
        out[f"paper {short[m]}"] = [format_paper((paper.get(r) or (None,) * len(metrics))[j]) for r in out.index]
    if live is not None:
        for m in live_metrics:
            out[f"live {short[m]}"] = [format_pct(live.at[r, m]) if r in live.index else "" for r in out.index]
    if "n" in summary:
        out["runs"] = summary["n"].astype(int)
    return out


def committed_banner(S=None, folder: str | Path | None = None) -> str:
    """What the committed measurement is (markdown): script, date, machine, seeds, recipe, and whether the
    bundled toy CLIP it used is the one installed here."""

    p = committed_provenance(folder)
    same = p.get("bundle_sha256") == short_hash()
    lines = [f"**Committed measurement** (`{p['script']}`, {p['date']}, {p['minutes']:.0f} min): "
             f"**{p['caption']}** (training seeds {p['seeds']}), each run evaluated once.",
             f"- backbone: {p['backbone']}" + ("" if same else f" — **NOT the toy CLIP installed here "
                                                             f"({short_hash()}): rerun the script**"),
             f"- recipe: {p['recipe']}", f"- trained on: {p['train_set']}", f"- tested on: {p['test_sets']}",
             f"- machine: {p['machine']}"]
    if S is not None:
        differ = sorted(S.config.differences(type(S.config).from_dict(p["config"])))
        if differ:
            lines.append(f"- NOTE: this notebook's configuration differs from the committed one in {differ}")
    return "\n".join(lines)


def live_metrics(models: dict, dataset, name: str, features=None, n_samples: int | None = None) -> pd.DataFrame:
    """Category-mean metrics of each model on ``dataset`` (one evaluation each, Monte-Carlo seed 0)."""
    import warnings


    rows = {}
    for row, m in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = evaluate(m, dataset, n_samples=n_samples, progress=False, aupro_variant=None, dataset_name=name,
                           features=features)
        rows[row] = {k: res.mean(k) for k in COMMITTED_METRICS if k in res.table.columns}
    return pd.DataFrame(rows).T


def reproduction_check(live: pd.DataFrame, runs: pd.DataFrame, row: str = "Bayes-PFL", test_set: str = "default",
                       seed: int = 0, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_ap")) -> str:
    """Compare the live model's metrics with the committed run of the same training seed on the same test set,
    and, where they differ, with the range of all committed runs."""
    sel = runs[(runs.row == row) & (runs.test_set == test_set) & (runs.experiment == "trained")]
    ref = sel[sel.seed == seed]
    if not len(ref) or row not in live.index:
        return "no committed run to compare with."
    diffs = {m: 100 * (live.at[row, m] - float(ref[m].iloc[0])) for m in metrics}
    worst = max(abs(v) for v in diffs.values())
    parts = ", ".join(f"{m} {100 * live.at[row, m]:.1f} vs {100 * float(ref[m].iloc[0]):.1f}" for m in metrics)
    if worst < 0.5:
        return (f"Reproduced: the live main model equals the committed seed-{seed} run ({parts}; live vs committed, "
                f"%, {test_set} split).")
    inside = all(sel[m].min() - 0.01 <= live.at[row, m] <= sel[m].max() + 0.01 for m in metrics)
    return (f"The live main model is not the committed seed-{seed} run ({parts}; live vs committed, %, {test_set} "
            f"split): same recipe and seed, but another initial random state (e.g. the frozen CLIP loaded after "
            f"seeding), so another training run; it lies {'within' if inside else 'outside'} the range of the "
            f"{sel.seed.nunique()} committed runs.")


# ----------------------------------------------------------------------------------------------------------
# notebook 05: differences to the full model, Table 3, Figure 5, Appendix B
# ----------------------------------------------------------------------------------------------------------
_SHORT = {"image_auroc": "img AUROC", "image_ap": "img AP", "pixel_auroc": "px AUROC", "pixel_ap": "px AP"}
_PAPER_INDEX = {"image_auroc": 0, "image_ap": 1, "pixel_auroc": 2, "pixel_ap": 3}


def _paper_delta(paper: dict, row: str, metric: str, reference: str = "Bayes-PFL") -> float:
    v, ref = (paper.get(row) or (None,) * 4)[_PAPER_INDEX[metric]], paper[reference][_PAPER_INDEX[metric]]
    return float("nan") if v is None else float(v - ref)


def delta_table(deltas: pd.DataFrame, rows: Sequence[str], paper: dict,
                metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_ap")) -> pd.DataFrame:
    """Δ = row − full model in points: kit (mean ± std over the paired runs; image AUROC with its bootstrap
    interval over the test images where there is one) next to the paper's Δ."""
    out = pd.DataFrame(index=list(rows))
    for m in metrics:
        out[f"kit Δ {_SHORT[m]}"] = [f"{100 * deltas.at[r, f'{m}_delta_mean']:+.1f} ± "
                                     f"{100 * deltas.at[r, f'{m}_delta_std']:.1f}" for r in rows]
        if m == "image_auroc" and "image_auroc_delta_ci_low" in deltas:
            out["kit Δ img AUROC, 95 % interval"] = [
                f"{100 * deltas.at[r, 'image_auroc_delta_ci_low']:+.1f} to "
                f"{100 * deltas.at[r, 'image_auroc_delta_ci_high']:+.1f}" for r in rows]
        out[f"paper Δ {_SHORT[m]}"] = [("—" if np.isnan(d) else f"{d:+.1f}")
                                       for d in (_paper_delta(paper, r, m) for r in rows)]
    out.index.name = "row (minus the full model, points)"
    return out


def delta_sentence(table: pd.DataFrame) -> str:
    """Which rows' image-AUROC intervals exclude 0, and whether they agree with the paper in sign."""
    col = "kit Δ img AUROC, 95 % interval"
    if col not in table:
        return ""
    found, agree = [], 0
    for row, cell in table[col].items():
        lo, hi = (float(x) for x in cell.split(" to "))
        if lo > 0 or hi < 0:
            found.append(f"{row} ({table.at[row, 'kit Δ img AUROC'].split(' ±')[0]})")
            p = table.at[row, "paper Δ img AUROC"]
            agree += p != "—" and (float(p) > 0) == (lo > 0)
    if not found:
        return "Read: no row's image-AUROC interval excludes 0: no ablation is distinguishable from the full model."
    return (f"Read: {len(found)} of {len(table)} rows have an image-AUROC interval that excludes 0: "
            f"{', '.join(found)}; {agree} of them {'agrees' if agree == 1 else 'agree'} in sign with the paper "
            "(whose Δ are all negative).")


def delta_figure(deltas: pd.DataFrame, rows: Sequence[str], paper: dict,
                 metrics: Sequence[str] = ("image_auroc", "pixel_auroc"), title: str = ""):
    """Bars of Δ = row − full model (points), kit (± std over the paired runs) beside the paper's Δ."""
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m in ("image_auroc", "pixel_auroc")] or list(metrics)[:2]
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 3.9), squeeze=False)
    xs = np.arange(len(rows))
    for ax, m in zip(axes[0], shown):
        kit = np.array([100 * deltas.at[r, f"{m}_delta_mean"] for r in rows])
        err = np.array([100 * deltas.at[r, f"{m}_delta_std"] for r in rows])
        ax.bar(xs - 0.2, kit, 0.4, yerr=np.nan_to_num(err), capsize=3, label="kit (± std over paired runs)")
        ax.bar(xs + 0.2, [_paper_delta(paper, r, m) for r in rows], 0.4, label="paper (MVTec-AD)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(xs, rows, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(f"Δ {_SHORT[m]} vs full model (points)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def table3_frame(committed: pd.DataFrame, live: pd.DataFrame, timing: pd.Series, paper: dict,
                 metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_ap")) -> pd.DataFrame:
    """Table 3: per R, the committed mean ± std over training runs, the live mean ± std over Monte-Carlo redraws,
    the paper's value, and the times per image."""
    Rs = sorted(set(committed.index) | set(live.index) | set(paper))
    out = pd.DataFrame(index=pd.Index(Rs, name="R"))
    for m in metrics:
        j = _PAPER_INDEX[m]
        out[f"kit {_SHORT[m]} (runs)"] = [format_pct(committed.at[r, f"{m}_mean"], committed.at[r, f"{m}_std"])
                                          if r in committed.index else "" for r in Rs]
        out[f"live {_SHORT[m]} (MC)"] = [format_pct(live.at[r, m], live.at[r, f"{m}_std"]) if r in live.index
                                         else "" for r in Rs]
        out[f"paper {_SHORT[m]}"] = [format_paper(paper[r][j]) if r in paper else "" for r in Rs]
    out["kit ms (committed machine)"] = [f"{timing[r]:.1f}" if r in timing.index else "" for r in Rs]
    out["live ms (this machine)"] = [f"{live.at[r, 'ms']:.1f} ± {live.at[r, 'ms_std']:.1f}" if r in live.index
                                     else "" for r in Rs]
    out["paper ms"] = [format_paper(paper[r][4]) if r in paper else "" for r in Rs]
    return out


def table3_figure(committed: pd.DataFrame, live: pd.DataFrame, timing: pd.Series, paper: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    pr = sorted(paper)
    for ax, m in ((axes[0], "image_auroc"), (axes[1], "pixel_ap")):
        j = _PAPER_INDEX[m]
        if len(committed):
            ax.errorbar(committed.index, 100 * committed[f"{m}_mean"], yerr=100 * committed[f"{m}_std"].fillna(0),
                        marker="o", capsize=3, label="kit: ± over training runs")
        ax.errorbar(live.index, 100 * live[m].astype(float), yerr=100 * live[f"{m}_std"].astype(float), marker="^",
                    capsize=3, label="kit live: ± over MC redraws")
        ax.errorbar(pr, [paper[r][j][0] for r in pr], yerr=[paper[r][j][1] for r in pr], marker="s", capsize=3,
                    alpha=0.7, label="paper (MVTec-AD)")
        ax.set_xlabel("R")
        ax.set_ylabel(f"{_SHORT[m]} (%)")
        ax.legend(fontsize=7)
    if len(timing):
        axes[2].plot(timing.index, timing.values, "o-", label="kit (committed machine)")
    axes[2].errorbar(live.index, live["ms"].astype(float), yerr=live["ms_std"].astype(float), marker="^",
                     capsize=3, label="kit live (this machine)")
    axes[2].plot(pr, [paper[r][4][0] for r in pr], "s-", alpha=0.7, label="paper (RTX 3090)")
    axes[2].set_xlabel("R")
    axes[2].set_ylabel("ms per image")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.suptitle("Table 3 as curves (the paper's model is ~100x larger: compare shapes, not levels)", fontsize=10)
    fig.tight_layout()
    return fig


def table3_sentence(committed: pd.DataFrame, live: pd.DataFrame) -> str:
    out = []
    if len(committed) and 1 in committed.index:
        r_hi = 10 if 10 in committed.index else max(committed.index)
        a, b = 100 * committed.at[1, "image_auroc_mean"], 100 * committed.at[r_hi, "image_auroc_mean"]
        pa, pb = 100 * committed.at[1, "pixel_ap_mean"], 100 * committed.at[r_hi, "pixel_ap_mean"]
        out.append(f"over training runs: image AUROC {a:.1f} at R = 1 and {b:.1f} at R = {r_hi} ({b - a:+.1f}), "
                   f"pixel AP {pa:.1f} -> {pb:.1f} ({pb - pa:+.1f}) (paper: +3.2 and +2.9)")
    if len(live) > 1:
        r0, r1 = min(live.index), max(live.index)
        s0, s1 = 100 * float(live.at[r0, "image_auroc_std"]), 100 * float(live.at[r1, "image_auroc_std"])
        t0, t1 = float(live.at[r0, "ms"]), float(live.at[r1, "ms"])
        out.append(f"live: the Monte-Carlo std of image AUROC goes from {s0:.2f} (R = {r0}) to {s1:.2f} points "
                   f"(R = {r1}); time per image {t0:.0f} -> {t1:.0f} ms ({t1 / t0:.1f}x for {r1 / r0:.0f}x the "
                   "samples)")
    return "Read: " + "; ".join(out) + "." if out else ""


def table4_sentence(delta: pd.Series) -> str:
    lo, hi = delta.get("image_auroc_delta_ci_low", np.nan), delta.get("image_auroc_delta_ci_high", np.nan)
    d_img, d_px = 100 * delta["image_auroc_delta_mean"], 100 * delta["pixel_auroc_delta_mean"]
    d_ap = 100 * delta["pixel_ap_delta_mean"]
    verdict = ("the image ensemble is ahead, as in the paper" if d_img < 0 and d_px < 0 else
               "the image ensemble is not ahead on every metric, unlike the paper (−0.3 to −0.7 points there)")
    ci = f" (95 % interval {100 * lo:+.1f} to {100 * hi:+.1f})" if not np.isnan(lo) else ""
    return (f"Read: text minus image ensemble: image AUROC {d_img:+.1f}{ci}, pixel AUROC {d_px:+.1f}, pixel AP "
            f"{d_ap:+.1f} points (mean over paired runs): {verdict}.")


def figure5_frame(deltas: pd.DataFrame) -> pd.DataFrame:
    """Figure 5: AP(ISD-IAD) − AP(other) = −Δ(other − full model), image AP and pixel AP, in points."""
    rows = []
    for other in ("ISD-ISD", "IAD-IAD"):
        if other not in deltas.index:
            continue
        for m, label in (("image_ap", "image AP"), ("pixel_ap", "pixel AP")):
            rows.append({"vs": other, "metric": label, "Δ AP (points)": -100 * deltas.at[other, f"{m}_delta_mean"],
                         "± std (paired runs)": 100 * deltas.at[other, f"{m}_delta_std"],
                         "paper": "> 0 (Figure 5)"})
    return pd.DataFrame(rows).set_index(["vs", "metric"])


def figure5_figure(frame: pd.DataFrame, title: str = ""):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    metrics = list(dict.fromkeys(frame.index.get_level_values("metric")))
    xs = np.arange(len(metrics))
    for k, (other, col) in enumerate((("ISD-ISD", "C0"), ("IAD-IAD", "C1"))):
        if other not in frame.index.get_level_values("vs"):
            continue
        vals = [frame.at[(other, m), "Δ AP (points)"] for m in metrics]
        err = [frame.at[(other, m), "± std (paired runs)"] for m in metrics]
        ax.bar(xs + (k - 0.5) * 0.38, vals, 0.38, yerr=np.nan_to_num(err), capsize=3, label=f"ISD-IAD vs {other}",
               color=col)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, metrics)
    ax.set_ylabel("Δ AP (points); > 0: ISD-IAD better")
    ax.legend(fontsize=8)
    ax.set_title(title + " — paper: all > 0", fontsize=9)
    fig.tight_layout()
    return fig


def figure5_sentence(frame: pd.DataFrame) -> str:
    vals = frame["Δ AP (points)"]
    pos = int((vals > 0).sum())
    within = int((vals.abs() <= frame["± std (paired runs)"].fillna(np.inf)).sum())
    return (f"Read: {pos} of {len(vals)} bars are positive (paper: all); {within} of {len(vals)} lie within one "
            f"std of 0; the bars range from {vals.min():+.1f} to {vals.max():+.1f} points.")


def committed_sweep_frame(param: str, folder: str | Path | None = None) -> pd.DataFrame:
    """A committed Appendix-B sweep in :func:`bpfl.sweeps.hyperparameter_sweep`'s format (``plot_sweep`` draws it)."""

    s = committed_sweep(param, folder=folder)
    paper = PAPER_SWEEP_RESULTS.get(param, {})
    df = pd.DataFrame(index=pd.Index([int(v) for v in s.index], name=param))
    df["field"] = SWEEP_FIELDS[param]
    for m in SWEEP_METRICS:
        df[f"{m}_mean"] = s[f"{m}_mean"].to_numpy()
        df[f"{m}_std"] = s[f"{m}_std"].to_numpy()
        df[f"{m}_paper"] = [paper.get(int(v), {}).get(m, float("nan")) / 100.0 for v in df.index]
    df["n_runs"] = s["n"].to_numpy()
    df["paper_default"] = [int(v) == PAPER_DEFAULTS[param] for v in df.index]
    df.attrs.update(param=param, field=SWEEP_FIELDS[param], metrics=list(SWEEP_METRICS),
                    caption=f"Appendix B sweep of {param}: mean ± std over {int(df['n_runs'].min())} training runs")
    return df


def sweep_table(sweeps: dict) -> pd.DataFrame:
    """All sweeps in one table: (parameter, value) × metrics as 'mean ± std' (%), the paper's default marked."""
    parts = []
    for sym, df in sweeps.items():
        t = pd.DataFrame(index=pd.Index([f"{sym} = {int(v)}" for v in df.index], name="value"))
        for m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap"):
            t[_SHORT[m]] = [format_pct(a, b) for a, b in zip(df[f"{m}_mean"], df[f"{m}_std"])]
        t["paper"] = ["default (Table 2's full model: 92.3 / 96.7 / 91.8 / 48.3)" if d else ""
                      for d in df["paper_default"]]
        t["runs"] = df["n_runs"].astype(int).to_numpy()
        parts.append(t)
    return pd.concat(parts)


def sweeps_figure(sweeps: dict, defaults: dict, metrics: Sequence[str] = ("image_auroc", "pixel_auroc", "pixel_ap")):
    """One panel per parameter: each metric (mean ± std over runs) against the value; dashed: the paper's default."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(3.4 * len(sweeps), 3.3), squeeze=False, sharey=True)
    for ax, (sym, df) in zip(axes[0], sweeps.items()):
        for k, m in enumerate(metrics):
            ax.errorbar(df.index, 100 * df[f"{m}_mean"], yerr=100 * df[f"{m}_std"].fillna(0), marker="o", capsize=3,
                        color=f"C{k}", label=_SHORT[m])
        ax.axvline(defaults[sym], color="grey", ls="--", lw=1)
        for k, m in enumerate(metrics):
            col = df.get(f"{m}_paper")
            if col is not None and col.notna().any():
                ax.plot(col.dropna().index, 100 * col.dropna(), "*", ms=11, color=f"C{k}", mec="k",
                        label=f"paper, {_SHORT[m]}" if sym == next(iter(sweeps)) else None)
        ax.set_xlabel(f"{sym} (dashed: paper default {defaults[sym]})")
        ax.set_xticks(list(df.index))
    axes[0][0].set_ylabel("%")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle("Appendix B: the kit's mean ± std over training runs per value; stars: the paper at its defaults "
                 "(MVTec-AD, ViT-L-14-336)", fontsize=10)
    fig.tight_layout()
    return fig


def sweep_sentence(sweeps: dict, metric: str = "pixel_auroc") -> str:
    parts = []
    for sym, df in sweeps.items():
        col = 100 * df[f"{metric}_mean"]
        spread = float(col.max() - col.min())
        noise = float(100 * df[f"{metric}_std"].max())
        parts.append(f"{sym}: best at {int(col.idxmax())}, range {spread:.1f} points (largest run std {noise:.1f})")
    return f"Read ({_SHORT[metric]}): " + "; ".join(parts) + "."


# ----------------------------------------------------------------------------------------------------------
# notebook 06: Table 1 and Figure 4
# ----------------------------------------------------------------------------------------------------------
def triple(values, keys: Sequence[str], std=None) -> str:
    """'(a, b, c)' in % from a Series (or a summary row with ``<key>_mean``/``_std`` when ``std`` is True)."""
    if std:
        return "(" + ", ".join(format_pct(values.get(f"{k}_mean"), values.get(f"{k}_std")) for k in keys) + ")"
    return "(" + ", ".join(format_pct(values.get(k)) for k in keys) + ")"


def table1_frame(live: pd.DataFrame, committed: dict, targets: dict, synthetic: str, paper_names: dict,
                 image: Sequence[str], pixel: Sequence[str]) -> pd.DataFrame:
    """Table 1's layout: one row per dataset (live) plus the committed rows, image and pixel triples, the paper."""

    rows = []
    for name in live.index:
        paper = paper_table1(paper_names.get(name, name))
        rows.append({"dataset": name, "run": "live (seed 0)", "images": len(targets[name]),
                     "image (AUROC, F1-max, AP)": triple(live.loc[name], image),
                     "pixel (AUROC, PRO, AP)": triple(live.loc[name], pixel),
                     "paper image": format_paper(paper.get("image")), "paper pixel": format_paper(paper.get("pixel"))})
    for name, summ in committed.items():
        r = summ.iloc[0]
        paper = paper_table1(paper_names.get(name, name))
        n_img = "320" if name.startswith("synthetic") else len(targets.get(name, []))
        rows.append({"dataset": name, "run": f"committed ({int(r['n'])} runs)", "images": n_img,
                     "image (AUROC, F1-max, AP)": triple(r, image, std=True),
                     "pixel (AUROC, PRO, AP)": triple(r, pixel, std=True),
                     "paper image": format_paper(paper.get("image")), "paper pixel": format_paper(paper.get("pixel"))})
    out = pd.DataFrame(rows)
    out.index = [f"{d} · {r}" for d, r in zip(out.pop("dataset"), out.pop("run"))]
    out.index.name = "dataset · run"
    return out


def table1_figure(live: pd.DataFrame, committed: dict, synthetic: str, paper_names: dict):
    import matplotlib.pyplot as plt


    names = list(live.index)
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.0))
    xs = np.arange(len(names))
    for ax, (metric, level, title) in zip(axes, (("image_auroc", "image", "image AUROC"),
                                                  ("pixel_auroc", "pixel", "pixel AUROC"))):
        com_key = {synthetic: "synthetic (unseen, 320 images)"}
        com = [committed.get(com_key.get(n, n)) for n in names]
        kit = [100 * c.iloc[0][f"{metric}_mean"] if c is not None else np.nan for c in com]
        err = [100 * c.iloc[0][f"{metric}_std"] if c is not None else 0 for c in com]
        n_runs = max([int(c.iloc[0]["n"]) for c in com if c is not None] or [0])
        ax.bar(xs - 0.27, kit, 0.27, yerr=np.nan_to_num(err), capsize=3, label=f"kit committed ({n_runs} runs)")
        ax.bar(xs, 100 * live[metric].astype(float), 0.27, label="kit live (seed 0)")
        paper = [(paper_table1(paper_names.get(n, n)).get(level) or (np.nan,))[0] for n in names]
        ax.bar(xs + 0.27, paper, 0.27, label="paper (full dataset, OpenAI CLIP)")
        ax.axhline(50, color="0.4", ls="--", lw=0.9, label="chance")
        labels = [n.replace(" (", "\n(") + ("" if n == synthetic else "\n[toy CLIP never saw it]") for n in names]
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 100)
        for x, v in zip(xs, live[metric].astype(float)):
            if np.isnan(v):
                ax.text(x, 3, "n/a\n(no normal\nimages)", ha="center", va="bottom", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle("Table 1 (kit vs paper); synthetic: committed on 320, live on 80 unseen images", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
    return fig


def table1_sentence(live: pd.DataFrame, synthetic: str) -> str:
    parts = [f"{synthetic}: image AUROC {100 * live.at[synthetic, 'image_auroc']:.1f}, pixel AUROC "
             f"{100 * live.at[synthetic, 'pixel_auroc']:.1f}"]
    for name in live.index:
        if name != synthetic:
            parts.append(f"{name}: pixel AUROC {100 * live.at[name, 'pixel_auroc']:.1f}")
    return "Read (live, %): " + "; ".join(parts) + " (chance: 50)."


def live_epoch_curves(trained: dict) -> pd.DataFrame:
    """Figure 4's curves from live runs trained with a per-epoch evaluation (``eval_<metric>`` history columns),
    in the committed format (row, seed, epoch, metrics)."""
    rows = []
    for label, t in trained.items():
        h = t.history
        cols = [c for c in h.columns if c.startswith("eval_")]
        for _, r in h.iterrows():
            rows.append({"row": label, "seed": int(t.model.config.seed), "epoch": int(r["epoch"]),
                         **{c[len("eval_"):]: float(r[c]) for c in cols}})
    return pd.DataFrame(rows)


FIG4_COLOURS = {"Bayes-PFL": "C3", "APRIL-GAN+": "C0", "AnomalyCLIP+": "C2", TRAINING_FREE_ROW: "0.4"}


def figure4_figure(curves: pd.DataFrame, endpoints: pd.DataFrame, target: str, title: str = "",
                   metric: str = "pixel_ap"):
    """Figure 4: per design, the mean curve over the runs with a ± std band; the live models' last-epoch values as
    markers side by side right of the last epoch; the training-free design as a horizontal line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    last = int(curves.epoch.max()) if len(curves) else 1
    for i, ((label, g), marker) in enumerate(zip(curves.groupby("row", sort=False), "osd^")):
        agg = g.groupby("epoch")[metric].agg(["mean", "std", "count"])
        c = FIG4_COLOURS.get(label)
        ax.plot(agg.index, 100 * agg["mean"], marker=marker, ms=3, color=c,
                label=f"{label} (mean of {int(agg['count'].max())} runs)")
        if agg["count"].max() > 1:
            ax.fill_between(agg.index, 100 * (agg["mean"] - agg["std"]), 100 * (agg["mean"] + agg["std"]),
                            color=c, alpha=0.18)
        if label in endpoints.index:
            # side by side right of the last epoch, so that equal values do not hide one another
            ax.plot([last + 0.7 + 0.6 * i], [100 * endpoints.at[label, metric]], marker=marker, ms=8, color=c,
                    mec="k", ls="none")
    if TRAINING_FREE_ROW in endpoints.index:
        ax.axhline(100 * endpoints.at[TRAINING_FREE_ROW, metric], color=FIG4_COLOURS[TRAINING_FREE_ROW], ls="--",
                   lw=1, label="WinCLIP-style, training-free (no epochs)")
    ax.plot([], [], "ko", mfc="w", label="live model, last epoch (right edge)")
    ax.set_xlabel("training epoch")
    ax.set_ylabel(f"{_SHORT.get(metric, metric).replace('px', 'pixel').replace('img', 'image')} (%) on {target}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def figure4_table(curves: pd.DataFrame, metric: str = "pixel_ap", epochs: Sequence[int] | None = None) -> pd.DataFrame:
    """Figure 4 as numbers: mean ± std over the runs at a few epochs, the peak of the mean curve and its epoch."""
    last = int(curves.epoch.max())
    epochs = list(epochs or sorted({1, 5, 10, 15, 20, 25, last} & set(curves.epoch.unique())))
    out = {}
    for label, g in curves.groupby("row", sort=False):
        agg = g.groupby("epoch")[metric].agg(["mean", "std"])
        row = {f"epoch {e}": format_pct(agg.at[e, "mean"], agg.at[e, "std"]) for e in epochs if e in agg.index}
        row["peak (epoch)"] = f"{100 * agg['mean'].max():.1f} ({int(agg['mean'].idxmax())})"
        row["last − peak"] = f"{100 * (agg['mean'].iloc[-1] - agg['mean'].max()):+.1f}"
        out[label] = row
    return pd.DataFrame(out).T


def figure4_sentence(curves: pd.DataFrame, metric: str = "pixel_ap") -> str:
    parts = []
    for label, g in curves.groupby("row", sort=False):
        m = g.groupby("epoch")[metric].mean()
        peak, at, end = 100 * m.max(), int(m.idxmax()), 100 * m.iloc[-1]
        shape = ("still rising at the end" if at == int(m.index.max()) else
                 f"peaks at epoch {at} and ends {end - peak:+.1f} below it")
        parts.append(f"{label}: {shape} (last epoch {end:.1f})")
    return "Read (mean curves, pixel AP %): " + "; ".join(parts) + "."


def figure4_reproduction(curves: pd.DataFrame, endpoints: pd.DataFrame, metric: str = "pixel_ap",
                         seed: int = 0) -> str:
    """Do the live models land on the committed seed-0 runs' last epoch (or at least within the runs' range)?"""
    parts = []
    for label in curves.row.unique():
        g = curves[curves.row == label]
        if not len(g) or label not in endpoints.index:
            continue
        last = g[g.epoch == g.epoch.max()].set_index("seed")[metric]
        v = endpoints.at[label, metric]
        if seed in last.index and abs(v - last[seed]) < 0.005:
            verdict = f"= seed {seed}"
        else:
            inside = last.min() - 0.01 <= v <= last.max() + 0.01
            verdict = "within the runs' range" if inside else "outside the runs' range"
        ref = f"{100 * last[seed]:.1f}" if seed in last.index else "n/a"
        parts.append(f"{label} {100 * v:.1f} vs {ref} ({verdict})")
    return (f"Read: live last epoch vs the committed seed-{seed} run's last epoch ({metric.replace('_', ' ')}, %): "
            + "; ".join(parts) + ".")



# ----------------------------------------------------------------------------------------------------------
# notebook 02: the prompt flows of a model, and what their first training steps do to them
# ----------------------------------------------------------------------------------------------------------
def record_first_steps(model, dataset, n_steps: int, probe, folder: str | Path | None = None) -> pd.DataFrame:
    """Train ``model`` for ``n_steps`` optimisation steps with :func:`bpfl.train.train` (its config: lr, batch,
    seed) and record ``probe(model)`` (a dict of numbers) before every step, with the step's loss terms.

    One row per step: ``step`` (1-based), the probe's values (measured on the parameters *before* that step's
    update) and every term of Eq. 14. ``folder``: where ``train`` writes its checkpoint (default: a temporary
    folder, deleted afterwards)."""
    import shutil
    import tempfile


    rows: list[dict] = []
    plain = model.loss

    def recording_loss(*args, **kwargs):  # the package's loss; the probe reads the parameters of this step
        terms = plain(*args, **kwargs)
        rows.append({"step": len(rows) + 1, **probe(model), **{k: float(v.detach()) for k, v in terms.items()}})
        return terms

    out = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="bpfl-first-steps-"))
    model.loss = recording_loss
    try:
        train(model, dataset, out, max_steps=n_steps, progress=False)
    finally:
        del model.loss
        if folder is None:
            shutil.rmtree(out, ignore_errors=True)
    return pd.DataFrame(rows)
