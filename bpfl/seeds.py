"""Independent training runs, one per seed, and their mean ± std (the paper's "5 random seeds", §4.1).

The paper reports every number as the mean over 5 random seeds, and Table 3 its standard deviation: each seed
is a separate *training* run, evaluated afterwards. Redrawing only the Monte-Carlo prompt samples of one trained
model (:func:`bpfl.evaluate.evaluate_mc_seeds`) measures a smaller spread (the sampling noise alone, not the
training noise), so the kit keeps the two apart and every table says which one it shows:

* :func:`train_and_evaluate_seeds` trains one model per seed into ``out_dir/seed<k>/`` (reusing
  :func:`bpfl.train.train`; a finished seed is loaded, not retrained; a killed one resumes) and evaluates each;
  its summary is "mean ± std over N training runs";
* :func:`evaluate_checkpoints` does the evaluation half for runs trained elsewhere (``bpfl test --checkpoint
  a.pt b.pt c.pt``);
* :func:`train_seeds` does the training half (``bpfl train --seeds 0 1 2``).

Files under ``out_dir``: ``seed<k>/last.pt``, ``seed<k>/train_log.csv``, ``seed<k>/done.json`` (written when a
seed's training finished; what makes it "finished"), ``seed<k>/eval/<test set>/metrics.*``, and
``runs.csv`` (one row per test set and run), ``summary.csv`` and ``summary.md`` (caption, table, provenance).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import pandas as pd

from .backbone import load_backbone
from .config import BayesPFLConfig
from .evaluate import (
    RUNS_CAPTION,
    EvalResult,
    evaluate,
    format_mean_std,
    markdown_table,
    mean_std_summary,
    provenance_markdown,
)
from .model import BayesPFL
from .train import load_model, read_checkpoint, seed_everything, train

__all__ = ["SeedRuns", "seed_dir", "train_seed", "train_seeds", "train_and_evaluate_seeds", "evaluate_checkpoints",
           "evaluate_runs", "finished_checkpoint", "mark_finished", "DONE_MARKER"]

#: written into ``seed<k>/`` when that seed's training has finished (config + checkpoint), so it is loaded next time
DONE_MARKER = "done.json"

#: category-mean metrics shown in the summary tables (others stay in runs.csv)
HEADLINE = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")


@dataclass
class SeedRuns:
    """Results of several training runs of one configuration, evaluated on one or more test sets.

    ``runs``: one row per (test set, run) with the category-mean metrics and the run's ``seed`` and
    ``checkpoint``. ``summaries[test_set]``: DataFrame(index=metric, columns mean/std/n) over the runs, with
    ``attrs["caption"]`` ("mean ± std over N training runs ..."). ``table``: test set × metric, "mean ± std" in %.
    ``results[test_set][run]``: the full :class:`bpfl.evaluate.EvalResult` of each run. ``trained``: the seeds
    trained by this call (the others were loaded from finished runs).
    """

    caption: str
    seeds: list[int]
    checkpoints: dict[str, Path]
    runs: pd.DataFrame
    summaries: dict[str, pd.DataFrame]
    table: pd.DataFrame
    results: dict[str, dict[str, EvalResult]] = field(default_factory=dict)
    trained: list[int] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    kind: str = "training-runs"

    def summary(self, test_set: str | None = None) -> pd.DataFrame:
        """The mean/std/n table of one test set (the only one if ``None``)."""
        if test_set is None:
            if len(self.summaries) != 1:
                raise ValueError(f"several test sets {sorted(self.summaries)}: name one")
            test_set = next(iter(self.summaries))
        return self.summaries[test_set]


# ------------------------------------------------------------------------------------------ training
def seed_dir(out_dir: str | Path, seed: int) -> Path:
    """``out_dir/seed<k>``: where the run trained with seed k lives."""
    return Path(out_dir) / f"seed{int(seed)}"


def shared_backbone(config: BayesPFLConfig, backbone, device):
    if backbone is not None:
        return backbone
    return load_backbone(config.backbone, config.pretrained, config.image_size, config.layers, device,
                         quick_gelu=config.quick_gelu, precision=config.precision)


def finished_checkpoint(folder: str | Path, config: BayesPFLConfig, budget: dict) -> Path | None:
    """The checkpoint of a finished run in ``folder`` trained with exactly ``config`` and ``budget``
    ({"epochs": ..., "max_steps": ...}), or None (not finished, or trained otherwise)."""
    folder = Path(folder)
    marker = folder / DONE_MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    ckpt = folder / info.get("checkpoint", "last.pt")
    if info.get("config") != json.loads(json.dumps(config.to_dict())) or info.get("budget") != budget \
            or not ckpt.is_file():
        return None
    return ckpt


def train_seed(config: BayesPFLConfig, train_set, seed: int, out_dir: str | Path, *, backbone=None, device=None,
               epochs: int | None = None, max_steps: int | None = None, resume: bool = True,
               progress: bool = False, **train_kwargs) -> tuple[BayesPFL, Path, bool]:
    """Train ``config`` with ``seed`` into ``out_dir/seed<k>/`` or, if that run already finished, load it.

    Returns ``(model, checkpoint, trained_now)``. A run counts as finished when its ``done.json`` holds the same
    config (seed included) and budget (``epochs``, ``max_steps``); a run killed before that resumes from its
    last checkpoint when ``resume`` (the default), else starts over. The model's initial weights, the shuffling
    and the flow samples all follow the seed (:func:`bpfl.train.seed_everything`, ``config.seed``).
    """

    cfg = config.replace(seed=int(seed))
    folder = seed_dir(out_dir, seed)
    budget = {"epochs": epochs, "max_steps": max_steps}
    backbone = shared_backbone(cfg, backbone, device)
    done = finished_checkpoint(folder, cfg, budget)
    if done is not None:
        return load_model(done, backbone=backbone), done, False
    seed_everything(cfg.seed)
    model = BayesPFL(cfg, backbone=backbone)
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save(folder / "config.json")
    res = train(model, train_set, folder, epochs=epochs, max_steps=max_steps, resume=resume, progress=progress,
                **train_kwargs)
    mark_finished(folder, cfg, budget, res.checkpoint, res.seconds)
    return res.model, res.checkpoint, True


def mark_finished(folder: str | Path, config: BayesPFLConfig, budget: dict, checkpoint: str | Path,
                  seconds: float = 0.0) -> Path:
    """Write ``folder/done.json``: this run finished with ``config`` and ``budget`` (:func:`finished_checkpoint`)."""
    marker = Path(folder) / DONE_MARKER
    marker.write_text(json.dumps({"config": config.to_dict(), "budget": budget, "checkpoint": Path(checkpoint).name,
                                  "seconds": seconds}, indent=2, default=str))
    return marker


def train_seeds(config: BayesPFLConfig, train_set, seeds: Sequence[int], out_dir: str | Path, *, backbone=None,
                device=None, **kwargs) -> dict[int, Path]:
    """Train one run per seed (:func:`train_seed`, same keywords); returns {seed: checkpoint}."""
    backbone = shared_backbone(config, backbone, device)
    return {int(s): train_seed(config, train_set, s, out_dir, backbone=backbone, **kwargs)[1] for s in seeds}


# ------------------------------------------------------------------------------------------ evaluation
def _named(test_sets) -> dict[str, object]:
    if isinstance(test_sets, Mapping):
        if not test_sets:
            raise ValueError("no test sets given")
        return dict(test_sets)
    root = getattr(test_sets, "root", None)
    return {Path(root).name if root else "test": test_sets}


def evaluate_runs(runs: Iterable[tuple[str, int, Path | None, BayesPFL]], test_sets, out_dir: str | Path | None,
                  *, n_samples: int | None = None, mc_seed: int = 0, batch_size: int = 8,
                  aupro_variant=None, map_sigma: float | None = None, overlays: int = 0, progress: bool = False,
                  protocol: str = "zero-shot", extra_caption: str = "") -> SeedRuns:
    """Evaluate each ``(run name, seed, checkpoint, model)`` on every test set; mean ± std over the runs.

    Every run is evaluated with the same Monte-Carlo seed ``mc_seed`` and R = ``n_samples`` (default: the
    config's test R), so the spread is that of the training runs. Models are used one at a time (pass a
    generator to keep one in memory at once).
    """
    sets = _named(test_sets)
    out = Path(out_dir) if out_dir is not None else None
    rows, results, checkpoints, seeds, provs = [], {name: {} for name in sets}, {}, [], {}
    for run, seed, ckpt, model in runs:
        seeds.append(int(seed))
        checkpoints[run] = ckpt
        for name, ds in sets.items():
            folder = out / run / "eval" / name if out is not None else None
            res = evaluate(model, ds, n_samples=n_samples, seed=mc_seed, batch_size=batch_size,
                           aupro_variant=aupro_variant, map_sigma=map_sigma, out_dir=folder, overlays=overlays,
                           dataset_name=name, protocol=protocol, progress=progress)
            results[name][run] = res
            provs.setdefault(name, res.provenance)
            rows.append({"test_set": name, "run": run, "seed": int(seed), "checkpoint": str(ckpt or ""),
                         **res.table.loc["mean"].to_dict()})
    if not rows:
        raise ValueError("no runs to evaluate")
    if len(set(seeds)) < len(seeds):
        warnings.warn(f"training seeds {seeds} repeat: runs with the same seed and config are the same run, "
                      "not independent ones", UserWarning, stacklevel=2)
    runs_df = pd.DataFrame(rows).set_index(["test_set", "run"])
    metric_cols = [c for c in runs_df.columns if c not in ("seed", "checkpoint")]
    caption = RUNS_CAPTION.format(n=len(checkpoints), seeds=", ".join(map(str, seeds)))
    r_values = sorted({res.provenance["R"] for by_run in results.values() for res in by_run.values()})
    caption += (f"; each run evaluated once (Monte-Carlo seed {mc_seed}, R = {', '.join(map(str, r_values))})"
                + extra_caption)
    summaries = {name: mean_std_summary(runs_df.loc[name, metric_cols].astype(float), caption, "training-runs")
                 for name in sets}
    shown = [m for m in HEADLINE if m in metric_cols] or metric_cols
    table = pd.DataFrame({name: format_mean_std(s.loc[shown]) for name, s in summaries.items()}).T
    table.index.name = "test set"
    result = SeedRuns(caption=caption, seeds=seeds, checkpoints=checkpoints, runs=runs_df, summaries=summaries,
                      table=table, results=results)
    if out is not None:
        result.files = _write(result, out, provs)
    return result


def _write(result: SeedRuns, out: Path, provs: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"runs": out / "runs.csv", "summary_csv": out / "summary.csv", "summary_md": out / "summary.md"}
    result.runs.to_csv(files["runs"])
    long = pd.concat({name: s for name, s in result.summaries.items()}, names=["test_set", "metric"])
    long.to_csv(files["summary_csv"])
    per_run = (result.runs.drop(columns=["checkpoint"]).astype(float) * 100).round(1).assign(seed=result.runs["seed"])
    per_run.index = [f"{test_set} / {run}" for test_set, run in per_run.index]
    md = ["# Mean ± std over training runs\n", f"**{result.caption}** (metrics in %).\n",
          markdown_table(result.table), "", "Per run (category means, %):", "",
          markdown_table(per_run, index_name="test set / run"), ""]
    for name, prov in provs.items():
        md += [f"## Provenance ({name}, first run)\n", provenance_markdown(prov), ""]
    files["summary_md"].write_text("\n".join(md))
    return files


def train_and_evaluate_seeds(config: BayesPFLConfig, train_set, test_sets, seeds: Sequence[int],
                             out_dir: str | Path, *, backbone=None, device=None, n_samples: int | None = None,
                             mc_seed: int = 0, batch_size: int = 8, aupro_variant=None,
                             map_sigma: float | None = None, epochs: int | None = None, max_steps: int | None = None,
                             resume: bool = True, progress: bool = False, protocol: str = "zero-shot",
                             **train_kwargs) -> SeedRuns:
    """The paper's seeds: one independent training run per seed, each evaluated; mean ± std over the runs.

    ``config``: the configuration to train (its ``seed`` is replaced by each of ``seeds``). ``train_set``: the
    auxiliary data. ``test_sets``: one dataset or {name: dataset}. Run k lives in ``out_dir/seed<k>/`` (a
    finished run is loaded instead of retrained, see :func:`train_seed`). Every run is evaluated with the same
    Monte-Carlo seed ``mc_seed`` and R = ``n_samples`` (default ``config.test_samples``). One frozen CLIP
    (``backbone``, loaded from the config if None) serves every run. Writes ``runs.csv``, ``summary.csv``
    and ``summary.md`` to ``out_dir``; the caption says "mean ± std over N training runs".
    """
    if not seeds:
        raise ValueError("give at least one training seed")
    backbone = shared_backbone(config, backbone, device)
    trained: list[int] = []

    def runs() -> Iterator[tuple[str, int, Path, BayesPFL]]:
        for s in seeds:
            model, ckpt, now = train_seed(config, train_set, s, out_dir, backbone=backbone, epochs=epochs,
                                          max_steps=max_steps, resume=resume, progress=progress, **train_kwargs)
            if now:
                trained.append(int(s))
            yield seed_dir(out_dir, s).name, int(s), ckpt, model.eval()
            del model
    result = evaluate_runs(runs(), test_sets, out_dir, n_samples=n_samples, mc_seed=mc_seed, batch_size=batch_size,
                           aupro_variant=aupro_variant, map_sigma=map_sigma, progress=progress, protocol=protocol)
    result.trained = trained
    return result


def evaluate_checkpoints(checkpoints: Sequence[str | Path], test_sets, out_dir: str | Path | None = None, *,
                         device=None, backbone=None, config_overrides: dict | None = None, **kwargs) -> SeedRuns:
    """Mean ± std over training runs trained elsewhere: one checkpoint per run (``bpfl test --checkpoint ...``).

    Each checkpoint is loaded (:func:`bpfl.train.load_model`; one frozen CLIP shared when the backbones agree) and
    evaluated as in :func:`evaluate_runs` (same keywords). Runs are named after their folder (``seed<k>`` for
    ``bpfl train --seeds``). A warning says when the runs differ in more than the seed (then the spread is not
    that of one configuration) or repeat a seed.
    """

    paths = [Path(c) for c in checkpoints]
    if not paths:
        raise ValueError("give at least one checkpoint")
    overrides = dict(config_overrides or {})
    configs = [BayesPFLConfig.from_dict(read_checkpoint(p)["config"]).replace(**overrides) for p in paths]
    base = configs[0].replace(seed=0)
    differ = sorted({k for c in configs[1:] for k in base.differences(c.replace(seed=0))})
    if differ:
        warnings.warn(f"the checkpoints differ in more than the seed ({differ}): their spread is not that of "
                      "one configuration's training runs", UserWarning, stacklevel=2)
    names = [p.parent.name or p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [f"{n}:{p.stem}" if names.count(n) > 1 else n for n, p in zip(names, paths)]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]

    def runs() -> Iterator[tuple[str, int, Path, BayesPFL]]:
        loaded = {}  # one frozen CLIP per distinct backbone setting
        for name, path, cfg in zip(names, paths, configs):
            key = (cfg.backbone, cfg.pretrained, cfg.image_size, tuple(cfg.layers), cfg.quick_gelu, cfg.precision)
            model = load_model(path, device=device, backbone=backbone or loaded.get(key), **overrides)
            loaded.setdefault(key, model.backbone)
            yield name, cfg.seed, path, model
            del model
    return evaluate_runs(runs(), test_sets, out_dir, **kwargs)

