"""Hyper-parameter sweeps of paper Appendix B: flow length K, prompts per bank B, context length P, state length Q.

``hyperparameter_sweep(base_config, "K", [1, 5, 10], train_set, test_set, seeds, out_dir)`` trains one model per
(value, seed) (:func:`bpfl.seeds.train_and_evaluate_seeds`: independent training runs, finished runs loaded, not
retrained), evaluates each on ``test_set`` and returns one row per value: mean ± std over the training seeds of
the category-mean metrics, the paper's number beside it where the paper gives one, and the value read back
from the trained weights' shapes. :func:`plot_sweep` draws it (PNG + PDF); :func:`appendix_b_sweeps` runs all
four. The scale is the config's: pass ``BayesPFLConfig.teaching(...)`` for a CPU run or ``BayesPFLConfig()``
for the paper's (ViT-L-14-336 at 518 px, 20 epochs; GPU).

**What the paper gives.** §4.1 sets K = 10, B = 3, P = Q = 5 and says (§4.4) "More ablation studies on the
hyperparameters can be found in Appendix B". The appendix is not part of the paper text the kit works from
(``shared/paper``; the reference brief says the same), so :data:`PAPER_SWEEP_RESULTS` holds only what the main
text gives: the full model at the defaults, which is Table 2's "Bayes-PFL" row (MVTec-AD, trained on VisA).
:data:`DEFAULT_SWEEP_VALUES` are therefore the kit's choice of values around those defaults, not the
appendix's; fill both dicts from Appendix B when it is at hand (they are data only).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from .config import BayesPFLConfig
from .evaluate import markdown_table
from .seeds import shared_backbone, train_and_evaluate_seeds
from .train import read_checkpoint
from .viz import save_figure

__all__ = ["SWEEP_FIELDS", "PAPER_DEFAULTS", "DEFAULT_SWEEP_VALUES", "PAPER_SWEEP_RESULTS", "PAPER_SWEEP_SOURCE",
           "SWEEP_METRICS", "hyperparameter_sweep", "plot_sweep", "appendix_b_sweeps", "trained_value"]

#: Appendix B's symbols -> config fields
SWEEP_FIELDS: dict[str, str] = {"K": "flow_length", "B": "n_prompts", "P": "n_context", "Q": "n_state"}
#: the paper's defaults (§4.1)
PAPER_DEFAULTS: dict[str, int] = {"K": 10, "B": 3, "P": 5, "Q": 5}
#: the values swept when none are given: the kit's choice around the defaults (Appendix B's own are not at hand)
DEFAULT_SWEEP_VALUES: dict[str, tuple[int, ...]] = {
    "K": (1, 5, 10, 15, 20),
    "B": (1, 2, 3, 4, 5),
    "P": (1, 3, 5, 7, 9),
    "Q": (1, 3, 5, 7, 9),
}
#: the paper's numbers for the sweeps, in %: symbol -> value -> {metric: %}. Only the defaults are known (Table 2,
#: "Bayes-PFL" row = Table 1 MVTec-AD; image AUROC, image AP, pixel AUROC, pixel AP); see the module docstring.
PAPER_SWEEP_RESULTS: dict[str, dict[int, dict[str, float]]] = {
    "K": {10: {"image_auroc": 92.3, "image_ap": 96.7, "pixel_auroc": 91.8, "pixel_ap": 48.3}},
    "B": {3: {"image_auroc": 92.3, "image_ap": 96.7, "pixel_auroc": 91.8, "pixel_ap": 48.3}},
    "P": {5: {"image_auroc": 92.3, "image_ap": 96.7, "pixel_auroc": 91.8, "pixel_ap": 48.3}},
    "Q": {5: {"image_auroc": 92.3, "image_ap": 96.7, "pixel_auroc": 91.8, "pixel_ap": 48.3}},
}
PAPER_SWEEP_SOURCE = ("paper §4.1 defaults and Table 2's full-model row (MVTec-AD); Appendix B's sweep numbers "
                      "are not in the paper text available to the kit")
#: metrics tabulated and plotted (category means, in [0, 1])
SWEEP_METRICS: tuple[str, ...] = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap")


def _symbol(param: str) -> str:
    if param in SWEEP_FIELDS:
        return param
    for sym, name in SWEEP_FIELDS.items():
        if param == name:
            return sym
    raise ValueError(f"param={param!r}: Appendix B sweeps {sorted(SWEEP_FIELDS)} "
                     f"(fields {sorted(SWEEP_FIELDS.values())})")


def trained_value(state: Mapping[str, "object"], param: str) -> int:
    """Read K, B, P or Q back from a trained model's state dict (shapes of the prompt banks and flows)."""
    sym = _symbol(param)
    if sym == "B":
        return int(state["prompts.context"].shape[0])
    if sym == "P":
        return int(state["prompts.context"].shape[1])
    if sym == "Q":
        return int(state["prompts.state_normal"].shape[1])
    for key in sorted(state):  # K: b of a free flow [K] or the amortiser of b [K, cond]
        if key.endswith("flow.b") or key.endswith("flow.amor_b.weight"):
            return int(state[key].shape[0])
    raise KeyError("no planar flow in this state dict (prompt design without flows?)")


def hyperparameter_sweep(base_config: BayesPFLConfig, param: str, values: Sequence[int] | None, train_set,
                         test_set, seeds: Sequence[int], out_dir: str | Path, *, backbone=None, device=None,
                         n_samples: int | None = None, mc_seed: int = 0, batch_size: int = 8,
                         metrics: Sequence[str] = SWEEP_METRICS, epochs: int | None = None,
                         max_steps: int | None = None, progress: bool = False, test_name: str = "test",
                         **train_kwargs) -> pd.DataFrame:
    """Appendix B: one row per value of ``param`` (``"K"``, ``"B"``, ``"P"``, ``"Q"`` or the field name).

    For each value v, ``base_config`` with that field = v is trained once per seed in ``seeds`` into
    ``out_dir/<param>_<v>/seed<k>/`` and evaluated on ``test_set`` (same Monte-Carlo seed ``mc_seed`` and R for
    all). Columns: ``field``; for each metric ``<m>_mean``, ``<m>_std`` (over the training runs, in [0, 1]) and
    ``<m>_paper`` (the paper's number in [0, 1], NaN where it gives none); ``n_runs``; ``trained_value`` (read back
    from every run's weights: equal to the row's value); ``paper_default``. ``df.attrs`` holds the caption,
    the checkpoints {value: {seed: path}} (each run's files are under ``out_dir/<param>_<v>/``). Writes
    ``sweep_<param>.csv`` and ``sweep_<param>.md`` to ``out_dir``.
    """

    sym = _symbol(param)
    name = SWEEP_FIELDS[sym]
    values = list(DEFAULT_SWEEP_VALUES[sym] if values is None else values)
    if not values or not seeds:
        raise ValueError("give at least one value and one training seed")
    out = Path(out_dir)
    backbone = shared_backbone(base_config, backbone, device)
    paper = PAPER_SWEEP_RESULTS.get(sym, {})
    rows, checkpoints = [], {}
    for v in values:
        cfg = base_config.replace(**{name: int(v)})
        runs = train_and_evaluate_seeds(cfg, train_set, {test_name: test_set}, seeds, out / f"{sym}_{v}",
                                        backbone=backbone, n_samples=n_samples, mc_seed=mc_seed,
                                        batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                                        progress=progress, **train_kwargs)
        summary = runs.summary(test_name)
        realised = {trained_value(read_checkpoint(p)["state"], sym) for p in runs.checkpoints.values()}
        if realised != {int(v)}:
            raise RuntimeError(f"{sym} = {v}: the trained models have {sorted(realised)}")
        row = {"field": name}
        for m in metrics:
            has = m in summary.index
            row[f"{m}_mean"] = float(summary.at[m, "mean"]) if has else math.nan
            row[f"{m}_std"] = float(summary.at[m, "std"]) if has else math.nan
            p = paper.get(int(v), {}).get(m)
            row[f"{m}_paper"] = p / 100.0 if p is not None else math.nan
        row.update(n_runs=len(runs.checkpoints), trained_value=realised.pop(),
                   paper_default=int(v) == PAPER_DEFAULTS[sym])
        rows.append(row)
        checkpoints[int(v)] = {s: runs.checkpoints[f"seed{s}"] for s in runs.seeds}
    df = pd.DataFrame(rows, index=pd.Index([int(v) for v in values], name=sym))
    caption = (f"Appendix B sweep of {sym} ({name}): mean ± std over {len(seeds)} training runs per value "
               f"(training seeds {', '.join(map(str, seeds))}); paper column: {PAPER_SWEEP_SOURCE}")
    df.attrs.update(caption=caption, param=sym, field=name, checkpoints=checkpoints, metrics=list(metrics))
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"sweep_{sym}.csv")
    (out / f"sweep_{sym}.md").write_text(sweep_markdown(df))
    return df


def sweep_markdown(df: pd.DataFrame) -> str:
    """The sweep table in % ("mean ± std" per metric, the paper's number beside it)."""

    metrics = df.attrs.get("metrics") or [c[:-5] for c in df.columns if c.endswith("_mean")]
    shown = pd.DataFrame(index=df.index)
    for m in metrics:
        mean, std, paper = df[f"{m}_mean"] * 100, df[f"{m}_std"] * 100, df[f"{m}_paper"] * 100
        shown[m] = [f"{a:.1f} ± {b:.1f}" if not math.isnan(a) else "n/a" for a, b in zip(mean, std)]
        shown[f"{m} (paper)"] = [f"{p:.1f}" if not math.isnan(p) else "" for p in paper]
    shown["runs"] = df["n_runs"]
    return f"# {df.attrs.get('caption', 'sweep')}\n\nMetrics in %.\n\n{markdown_table(shown)}\n"


def plot_sweep(df: pd.DataFrame, path: str | Path, metrics: Sequence[str] | None = None,
               title: str | None = None) -> list[Path]:
    """One panel per metric: mean ± std over training runs vs the swept value (error bars), the paper's number
    as a star where it gives one, the paper's default as a dashed line. Saved as PNG and PDF."""
    import matplotlib.pyplot as plt


    sym = df.attrs.get("param", df.index.name)
    metrics = list(metrics or df.attrs.get("metrics") or SWEEP_METRICS)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
    x = df.index.to_numpy()
    for ax, m in zip(axes[0], metrics):
        ax.errorbar(x, df[f"{m}_mean"] * 100, yerr=df[f"{m}_std"] * 100, marker="o", capsize=3, label="kit")
        paper = df[f"{m}_paper"] * 100
        if paper.notna().any():
            ax.plot(x[paper.notna().to_numpy()], paper.dropna(), "*", markersize=11, color="C3", label="paper")
        if sym in PAPER_DEFAULTS:
            ax.axvline(PAPER_DEFAULTS[sym], color="grey", linestyle="--", linewidth=1, label="paper default")
        ax.set_xlabel(sym)
        ax.set_ylabel(f"{m} (%)")
        ax.set_xticks(x)
        ax.set_title(m)
    axes[0][0].legend(fontsize=8)
    n = int(df["n_runs"].min()) if "n_runs" in df else 0
    fig.suptitle(title or f"Appendix B: {sym} ({df.attrs.get('field', '')}), mean ± std over {n} training runs",
                 fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, path)
    plt.close(fig)
    return paths


def appendix_b_sweeps(base_config: BayesPFLConfig, train_set, test_set, seeds: Sequence[int], out_dir: str | Path,
                      params: Sequence[str] = ("K", "B", "P", "Q"),
                      values: Mapping[str, Sequence[int]] | None = None, **kwargs) -> dict[str, pd.DataFrame]:
    """Run :func:`hyperparameter_sweep` for each of ``params`` (one frozen CLIP for all) and plot each to
    ``out_dir/sweep_<param>.png/.pdf``. ``values``: {param: values} (default :data:`DEFAULT_SWEEP_VALUES`)."""

    kwargs["backbone"] = shared_backbone(base_config, kwargs.get("backbone"), kwargs.pop("device", None))
    tables = {}
    for p in params:
        sym = _symbol(p)
        df = hyperparameter_sweep(base_config, sym, (values or {}).get(sym), train_set, test_set, seeds, out_dir,
                                  **kwargs)
        df.attrs["figure"] = plot_sweep(df, Path(out_dir) / f"sweep_{sym}")
        tables[sym] = df
    return tables
