"""The committed tables behind notebooks 05 and 06: Tables 1-4, Figures 4-5 and Appendix B on the bundled toy CLIP.

Fast mode cannot train ten ablations x several seeds inside the notebooks' CPU budget (one Bayes-PFL training
at the fast recipe takes ~90 s on a shared 2-core CPU), so this script measures them once, with independent
training runs, and commits the results; the notebooks print them beside a smaller live run
(:func:`bpfl.notebook.tables.committed_summary` reads them).

Recipe: exactly the notebooks' fast mode (:func:`bpfl.notebook.mode_config`, ``BPFL_FAST_BACKBONE=toy``): the
bundled toy CLIP at 112 px, ``BayesPFLConfig.teaching`` + the toy overrides (30 epochs, batch 4, lr 1e-2, K = 10,
B = 3, P = Q = 5, R_train = 1, R_test = 4), trained on the synthetic dataset's default split (test split of the
*seen* categories, 80 images) and evaluated zero-shot on the *unseen* categories. Each configuration is trained
once per training seed (``--seeds``, default 0 1 2: independent runs, :func:`bpfl.seeds.train_seed`); the run
with seed 0 of the full model has the same config and data as the notebooks' main model.

Test sets: ``default`` = the unseen categories of the default split (80 images, 8 normal + 12 anomalous per
category: what the notebooks evaluate live) and ``large`` = 40 normal + 40 anomalous images per unseen category
(320 images, generated with the same seed, so it contains ``default``;
``benchmarks/toy_clip_transfer.large_unseen_set``). The headline tables use ``large``; image-AUROC differences get
a paired 95 % bootstrap interval over its test images.

What is measured (``--parts``):

* ``trained``: the full model, Table 2's trained ablations (w/o ISD, w/o IAD, w/o ISD+IAD, w/o RCA, w/o L_ort,
  w/o x_cls, w/o x_patch), Figure 5's ISD-ISD and IAD-IAD, and Figure 4's APRIL-GAN+ and AnomalyCLIP+; the full
  model and the two designs with an evaluation after every epoch (pixel AP etc. on ``default``: Figure 4), so
  Figure 4's Bayes-PFL curve *is* the Table-1/2 model's training run;
* ``inference`` (from the full model's runs): w/o s_text, w/o s_img (Table 2), the text ensemble and time per
  image (Table 4), R = 1 ... 20 with time per image (Table 3), Table 1's rows on the real samples (MVTec-AD
  bottle, Kvasir: outside what the toy CLIP ever saw), the training-free WinCLIP-style design;
* ``sweeps``: Appendix B, K, B, P and Q (:func:`bpfl.sweeps.hyperparameter_sweep`; the default value's runs are the
  full model's, linked, not retrained).

Files (``--out``, default ``benchmarks/results``): ``notebook_tables_runs.csv`` (one row per run, test set and
R: category-mean metrics, ms per image, training seconds), ``notebook_tables_epochs.csv`` (Figure 4: per design,
seed and epoch), ``notebook_tables_sweeps.csv`` (Appendix B, per value and seed), ``notebook_tables_deltas.csv``
(each row minus its reference: mean ± std over the paired runs, and the bootstrap interval of the image-AUROC
difference), ``notebook_tables_provenance.json`` and the report ``notebook_tables.md``.

    python benchmarks/notebook_tables.py                          # everything, 3 seeds (~2 h on 2 busy cores)
    python benchmarks/notebook_tables.py --parts sweeps           # one part (the others' files are kept)
    python benchmarks/notebook_tables.py --smoke --out /tmp/nt    # minutes: 1 seed, 1 epoch
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bpfl.notebook.tables import INFERENCE_ROWS, TRAINED_ROWS, row_config, row_slug  # noqa: E402

PARTS = ("trained", "inference", "sweeps")
#: rows whose training is evaluated after every epoch (Figure 4)
PER_EPOCH_ROWS = ("Bayes-PFL", "APRIL-GAN+", "AnomalyCLIP+")
R_VALUES = (1, 2, 3, 4, 5, 7, 8, 10, 13, 16, 20)
SWEEP_VALUES = {"K": (1, 5, 20, 10), "B": (1, 5, 3), "P": (1, 9, 5), "Q": (1, 9, 5)}  # the default last
METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro")
EPOCH_METRICS = ("pixel_ap", "pixel_auroc", "image_auroc", "image_ap")
TRAINING_FREE = "WinCLIP-style (training-free)"
PREFIX = "notebook_tables"


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.work = Path(args.work).expanduser()
        self.work.mkdir(parents=True, exist_ok=True)
        os.environ.update({"BPFL_FAST_BACKBONE": "toy", "BPFL_DATA_DIR": str(self.work / "data"),
                           "BPFL_RESULTS_DIR": str(self.work / "results"), "HF_HUB_OFFLINE": "1"})
        for k in ("BPFL_OVERRIDES", "BPFL_AUX_DATA", "BPFL_TARGETS", "BPFL_MODE"):
            os.environ.pop(k, None)
        from toy_clip_transfer import large_unseen_set

        from bpfl import notebook as nb
        from bpfl.data import SYNTHETIC_GROUPS, open_dataset

        self.S = nb.setup("notebook_tables", mode="fast", quiet=True)
        cfg = self.S.config
        if args.smoke:
            cfg = cfg.replace(epochs=1)
        self.config = cfg
        self.aux = self.S.aux_dataset()
        targets = self.S.targets()
        self.default = targets.pop("synthetic (unseen categories)")
        self.real = targets  # the real samples present here
        if args.smoke:
            self.large = self.default
        else:
            root = self.S.synthetic_root()
            large = large_unseen_set(root, self.work, 40, 40)
            self.large = open_dataset(large, split="test", categories=SYNTHETIC_GROUPS["unseen"],
                                      image_size=cfg.image_size)
        self.sets = {"default": self.default, "large": self.large}
        from bpfl.features import FeatureStore
        self.store = FeatureStore()
        self.runs_dir = self.work / "runs"
        self.max_steps = None

    # ------------------------------------------------------------------------------------ helpers
    def evaluate(self, model, ds, name, *, n_samples=None, aupro=False, features=True):
        from bpfl.evaluate import evaluate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # image metrics of an all-anomalous set are NaN
            return evaluate(model, ds, n_samples=n_samples, seed=0, aupro_variant="mvtec" if aupro else None,
                            progress=False, dataset_name=name, features=self.store if features else None)

    def train(self, row: str, seed: int):
        """(model, checkpoint, seconds, epoch rows) of one training run (loaded when finished earlier)."""
        from bpfl.seeds import seed_dir, train_seed

        cfg = row_config(self.config, row)
        out = self.runs_dir / row_slug(row)
        kwargs = {}
        if row in PER_EPOCH_ROWS:
            def callback(epoch, model):
                res = self.evaluate(model, self.default, "default")
                return {f"eval_{m}": res.mean(m) for m in EPOCH_METRICS}
            kwargs["epoch_callback"] = callback
        t0 = time.perf_counter()
        model, ckpt, now = train_seed(cfg, self.aux, seed, out, backbone=self.S.backbone, max_steps=self.max_steps,
                                      **kwargs)
        folder = seed_dir(out, seed)
        done = json.loads((folder / "done.json").read_text())
        seconds = done.get("seconds") or (time.perf_counter() - t0)
        log = folder / "train_log.csv"
        history = pd.read_csv(log) if log.is_file() else pd.DataFrame()
        print(f"[bench] {row} seed {seed}: {'trained' if now else 'loaded'} ({seconds:.0f} s)", flush=True)
        return model.eval(), ckpt, float(seconds), history

    @staticmethod
    def metric_row(res, **keys) -> dict:
        return {**keys, **{m: res.mean(m) if m in res.table.columns else float("nan") for m in METRICS}}

    @staticmethod
    def score_rows(res, method: str, seed: int, test_set: str) -> list[dict]:
        sc = res.scores
        return [{"method": method, "seed": seed, "test_set": test_set, "category": c, "path": p, "label": int(lab),
                 "score": float(s)} for c, p, lab, s in zip(sc.category, sc.path, sc.label, sc.image_score)]

    # ------------------------------------------------------------------------------------ parts
    def trained(self) -> tuple[list[dict], list[dict], list[dict]]:
        rows, epochs, scores = [], [], []
        names = list(TRAINED_ROWS)
        for row in names:
            for seed in self.args.seeds:
                model, ckpt, seconds, history = self.train(row, seed)
                for set_name, ds in self.sets.items():
                    full = row == "Bayes-PFL"
                    res = self.evaluate(model, ds, set_name, aupro=full)
                    rows.append(self.metric_row(res, experiment="trained", row=row, seed=seed, test_set=set_name,
                                                R=model.config.test_samples, train_seconds=round(seconds, 1)))
                    if set_name == "large":
                        scores += self.score_rows(res, row, seed, set_name)
                if row in PER_EPOCH_ROWS and len(history):
                    cols = [c for c in history.columns if c.startswith("eval_")]
                    for _, h in history.iterrows():
                        epochs.append({"row": row, "seed": seed, "epoch": int(h["epoch"]),
                                       "loss": float(h.get("total", float("nan"))),
                                       **{c[len("eval_"):]: float(h[c]) for c in cols}})
                del model
        return rows, epochs, scores

    def inference(self) -> tuple[list[dict], list[dict]]:
        from bpfl.figures import figure3_models
        from bpfl.notebook.tables import time_per_image
        from bpfl.train import load_model

        rows, scores = [], []
        R_values = R_VALUES if not self.args.smoke else (1, 4)
        for seed in self.args.seeds:
            base, ckpt, _, _ = self.train("Bayes-PFL", seed)
            for row, changes in INFERENCE_ROWS.items():
                model = load_model(ckpt, backbone=self.S.backbone, **changes).eval()
                for set_name, ds in self.sets.items():
                    res = self.evaluate(model, ds, set_name)
                    rows.append(self.metric_row(res, experiment="inference", row=row, seed=seed, test_set=set_name,
                                                R=model.config.test_samples))
                    if set_name == "large":
                        scores += self.score_rows(res, row, seed, set_name)
                if row == "text ensemble":
                    for label, m in (("text ensemble", model), ("Bayes-PFL", base)):
                        ms, ms_std = time_per_image(m, self.default, m.config.test_samples, n_images=10)
                        rows.append({"experiment": "timing", "row": label, "seed": seed, "test_set": "default",
                                     "R": m.config.test_samples, "ms_per_image": ms, "ms_std": ms_std})
            for R in R_values:
                for set_name, ds in self.sets.items():
                    res = self.evaluate(base, ds, set_name, n_samples=R)
                    row = self.metric_row(res, experiment="R", row=f"R={R}", seed=seed, test_set=set_name, R=R)
                    if set_name == "default":
                        row["ms_per_image"], row["ms_std"] = time_per_image(base, self.default, R, n_images=10)
                    rows.append(row)
            for name, ds in self.real.items():
                res = self.evaluate(base, ds, name, aupro=True, features=False)
                rows.append(self.metric_row(res, experiment="real", row="Bayes-PFL", seed=seed, test_set=name,
                                            R=base.config.test_samples))
        winclip = figure3_models({"winclip": None}, backbone=self.S.backbone, reference_config=self.config)["winclip"]
        for set_name, ds in {**self.sets, **self.real}.items():
            res = self.evaluate(winclip, ds, set_name, aupro=True, features=set_name in self.sets)
            rows.append(self.metric_row(res, experiment="training-free" if set_name in self.sets else "real",
                                        row=TRAINING_FREE, seed=0, test_set=set_name, R=1))
            if set_name == "large":
                scores += self.score_rows(res, TRAINING_FREE, 0, set_name)
        return rows, scores

    def sweeps(self) -> list[dict]:
        from bpfl.sweeps import SWEEP_FIELDS, hyperparameter_sweep

        out = self.work / "sweeps"
        out.mkdir(parents=True, exist_ok=True)
        full = self.runs_dir / row_slug("Bayes-PFL")
        rows = []
        values = SWEEP_VALUES if not self.args.smoke else {"K": (1, 10), "B": (1, 3)}
        for sym, vals in values.items():
            default = getattr(self.config, SWEEP_FIELDS[sym])
            link = out / f"{sym}_{default}"
            if not link.exists():
                link.symlink_to(full.resolve(), target_is_directory=True)
            for v in vals:
                if v == default:  # the full model's runs: wait for the 'trained' part if it runs in parallel
                    self.wait_for(full)
                df = hyperparameter_sweep(self.config, sym, [v], self.aux, self.large, self.args.seeds, out,
                                          backbone=self.S.backbone, max_steps=self.max_steps, test_name="large")
                runs = pd.read_csv(out / f"{sym}_{v}" / "runs.csv")
                for _, r in runs.iterrows():
                    rows.append({"param": sym, "field": SWEEP_FIELDS[sym], "value": int(v), "seed": int(r["seed"]),
                                 "test_set": "large", **{m: float(r[m]) for m in METRICS if m in r},
                                 "trained_value": int(df["trained_value"].iloc[0])})
                print(f"[bench] sweep {sym} = {v}: image AUROC {df['image_auroc_mean'].iloc[0]:.3f}, "
                      f"pixel AUROC {df['pixel_auroc_mean'].iloc[0]:.3f}", flush=True)
        return rows

    def wait_for(self, folder: Path) -> None:
        for seed in self.args.seeds:
            marker = folder / f"seed{seed}" / "done.json"
            while not marker.is_file():
                print(f"[bench] waiting for {marker}", flush=True)
                time.sleep(60)


# ------------------------------------------------------------------------------------------ summaries
def paired_deltas(runs: pd.DataFrame, scores: pd.DataFrame, reference: str = "Bayes-PFL",
                  test_set: str = "large") -> pd.DataFrame:
    """Each row minus the reference (same training seed, same test set): mean ± std over the paired runs of every
    metric, and a paired 95 % bootstrap interval over the test images of the image-AUROC difference."""
    from bpfl.toyclip.transfer import bootstrap_image_auroc_difference

    r = runs[(runs.test_set == test_set) & runs.experiment.isin(["trained", "inference", "training-free"])]
    ref = r[r.row == reference].set_index("seed")
    out = []
    for row, g in r[r.row != reference].groupby("row", sort=False):
        g = g.set_index("seed")
        seeds = [s for s in g.index if s in ref.index] if row != TRAINING_FREE else list(ref.index)
        rec = {"row": row, "reference": reference, "test_set": test_set, "n_pairs": len(seeds)}
        for m in METRICS:
            if row == TRAINING_FREE:
                d = float(g[m].iloc[0]) - ref.loc[seeds, m]
            else:
                d = g.loc[seeds, m] - ref.loc[seeds, m]
            rec[f"{m}_delta_mean"] = float(d.mean())
            rec[f"{m}_delta_std"] = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
        if len(scores) and (scores.method == row).any():
            ci = bootstrap_image_auroc_difference(scores[scores.test_set == test_set], row, reference)
            rec.update(image_auroc_delta_boot=ci["difference"], image_auroc_delta_ci_low=ci["ci_low"],
                       image_auroc_delta_ci_high=ci["ci_high"])
        out.append(rec)
    return pd.DataFrame(out)


def write_report(out: Path, runs: pd.DataFrame, epochs: pd.DataFrame, sweeps: pd.DataFrame, deltas: pd.DataFrame,
                 prov: dict) -> Path:
    from bpfl.evaluate import markdown_table
    from bpfl.notebook.tables import committed_summary, format_summary

    lines = ["# Committed tables of notebooks 05 and 06 (bundled toy CLIP, fast recipe)\n",
             f"Written by `benchmarks/notebook_tables.py` on {prov['date']}: {prov['minutes']:.0f} min (wall clock) "
             f"over its parts ({', '.join(f'{k} {v:.0f} min' for k, v in prov.get('part_minutes', {}).items())}; "
             "parts may run in parallel processes). "
             f"**Mean ± std over {len(prov['seeds'])} training runs** (training seeds {prov['seeds']}; each run "
             f"evaluated once, Monte-Carlo seed 0), category means, metrics in %.\n",
             f"- machine: {prov['machine']}",
             f"- backbone: {prov['backbone']}",
             f"- recipe: {prov['recipe']}",
             f"- training set: {prov['train_set']}",
             f"- test sets: {prov['test_sets']}",
             "- the seed-0 run of the full model has the notebooks' main model's config and data (training is "
             "deterministic given the seed).", ""]
    if not len(runs):
        runs = pd.DataFrame(columns=["experiment", "row", "seed", "test_set", "R", "ms_per_image", *METRICS])
    for title, rows, test_set in (
            ("Table 2 (large unseen test set)", ["Bayes-PFL", "w/o ISD", "w/o IAD", "w/o ISD, IAD", "w/o RCA",
                                                  "w/o L_ort", "w/o x_cls", "w/o x_patch", "w/o s_text",
                                                  "w/o s_img"], "large"),
            ("Figure 5 designs (large unseen test set)", ["Bayes-PFL", "ISD-ISD", "IAD-IAD"], "large"),
            ("Table 4 (large unseen test set)", ["Bayes-PFL", "text ensemble"], "large"),
            ("Figure 4 designs at the last epoch (large unseen test set)",
             ["Bayes-PFL", "APRIL-GAN+", "AnomalyCLIP+", TRAINING_FREE], "large"),
            ("Default split (80 unseen images, what the notebooks evaluate live)",
             ["Bayes-PFL", "w/o ISD, IAD", "APRIL-GAN+", "AnomalyCLIP+", TRAINING_FREE], "default")):
        s = committed_summary(rows, test_set=test_set, runs=runs)
        if len(s):
            lines += [f"## {title}\n", markdown_table(format_summary(s)), ""]
    real = [t for t in runs.test_set.unique() if t not in ("default", "large")]
    if real:
        t1 = pd.concat({t: format_summary(committed_summary(["Bayes-PFL", TRAINING_FREE], test_set=t, runs=runs))
                        for t in real})
        lines += ["## Table 1 rows on the real samples (outside what the toy CLIP saw: no meaning about "
                  "Bayes-PFL)\n", markdown_table(t1), ""]
    rs = committed_summary(None, test_set="large", runs=runs, experiment="R")
    if len(rs):
        timing = runs[(runs.experiment == "R") & runs.ms_per_image.notna()].groupby("R")["ms_per_image"].mean()
        shown = format_summary(rs)
        shown["ms per image (default set, batch 1)"] = [f"{timing.get(int(r[2:]), float('nan')):.1f}"
                                                         for r in shown.index]
        lines += ["## Table 3: R at test time (large unseen test set)\n", markdown_table(shown), ""]
    if len(deltas):
        d = deltas.set_index("row")
        show = pd.DataFrame({f"Δ {m}": [f"{100 * a:+.1f} ± {100 * b:.1f}" for a, b in
                                        zip(d[f"{m}_delta_mean"], d[f"{m}_delta_std"])]
                             for m in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap")}, index=d.index)
        if "image_auroc_delta_ci_low" in d:
            show["Δ image AUROC, 95 % interval over test images"] = [
                f"{100 * a:+.1f} to {100 * b:+.1f}" if pd.notna(a) else "" for a, b in
                zip(d.image_auroc_delta_ci_low, d.image_auroc_delta_ci_high)]
        lines += ["## Differences to the full model (large test set; paired by training seed)\n",
                  "Δ = row − Bayes-PFL in points, mean ± std over the paired runs; the interval is a paired "
                  "percentile bootstrap over the test images (2000 replicates, stratified per category).\n",
                  markdown_table(show), ""]
    if len(epochs):
        last = epochs[epochs.epoch == epochs.epoch.max()].groupby("row")["pixel_ap"].agg(["mean", "std"])
        peak = epochs.groupby(["row", "epoch"])["pixel_ap"].mean().groupby("row").agg(["max", "idxmax"])
        fig4 = pd.DataFrame({"pixel AP at the last epoch": [f"{100 * a:.1f} ± {100 * b:.1f}" for a, b in
                                                             zip(last["mean"], last["std"])],
                             "peak of the mean curve": [
                                 f"{100 * v:.1f} (epoch {i[1]})"
                                 for v, i in zip(peak.loc[last.index, "max"], peak.loc[last.index, "idxmax"])]},
                            index=last.index)
        lines += ["## Figure 4: pixel AP per epoch (default split, evaluated after every epoch)\n",
                  markdown_table(fig4), ""]
    if len(sweeps):
        from bpfl.notebook.tables import committed_sweep
        for sym in sweeps.param.unique():
            lines += [f"## Appendix B: {sym} (large unseen test set)\n",
                      markdown_table(format_summary(committed_sweep(sym, sweeps=sweeps))), ""]
    path = out / f"{PREFIX}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (independent runs)")
    ap.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS,
                    help="what to measure (none: only rewrite the report from the files there)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default="~/.cache/bpfl/notebook_tables",
                    help="checkpoints and generated data (kept: a rerun loads finished runs)")
    ap.add_argument("--smoke", action="store_true",
                    help="1 epoch, one seed, R 1 and 4, two short sweeps: minutes (checks the script, not the method)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = Bench(args)
    files = {k: out / f"{PREFIX}_{k}.csv" for k in ("runs", "epochs", "sweeps", "deltas")}
    scores_file = Path(args.work).expanduser() / "scores.csv"

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path) if path.is_file() else pd.DataFrame()

    def replace(path: Path, new: list[dict], column: str, values) -> None:
        """Rewrite ``path``: its rows except those this part measured again, plus ``new`` (read just before
        writing, so that parts run in parallel processes keep each other's rows)."""
        old = read(path)
        if len(old):
            old = old[~old[column].isin(list(values))]
        pd.concat([old, pd.DataFrame(new)], ignore_index=True).to_csv(path, index=False)

    part_minutes = {}
    if "trained" in args.parts:
        t = time.perf_counter()
        rows, ep, sc = bench.trained()
        replace(files["runs"], rows, "experiment", ["trained"])
        pd.DataFrame(ep).to_csv(files["epochs"], index=False)
        replace(scores_file, sc, "method", TRAINED_ROWS)
        part_minutes["trained"] = (time.perf_counter() - t) / 60
    if "inference" in args.parts:
        t = time.perf_counter()
        rows, sc = bench.inference()
        replace(files["runs"], rows, "experiment", ["inference", "timing", "R", "training-free", "real"])
        replace(scores_file, sc, "method", [*INFERENCE_ROWS, TRAINING_FREE])
        part_minutes["inference"] = (time.perf_counter() - t) / 60
    if "sweeps" in args.parts:
        t = time.perf_counter()
        pd.DataFrame(bench.sweeps()).to_csv(files["sweeps"], index=False)
        part_minutes["sweeps"] = (time.perf_counter() - t) / 60
    runs, epochs, sweeps, scores = (read(files["runs"]), read(files["epochs"]), read(files["sweeps"]),
                                    read(scores_file))
    deltas = paired_deltas(runs, scores) if len(runs) and (runs.row == "Bayes-PFL").any() else pd.DataFrame()
    deltas.to_csv(files["deltas"], index=False)
    from toy_clip_transfer import describe_machine

    from bpfl.bundled_weights import short_hash
    cfg = bench.config
    prov_file = out / f"{PREFIX}_provenance.json"
    old = json.loads(prov_file.read_text()) if prov_file.is_file() else {}
    part_minutes = {**old.get("part_minutes", {}), **{k: round(v, 1) for k, v in part_minutes.items()}}
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    prov = {"script": "benchmarks/notebook_tables.py", "date": date,
            "minutes": round(sum(part_minutes.values()), 1), "part_minutes": part_minutes,
            "machine": describe_machine(), "seeds": list(args.seeds),
            "kind": "training-runs", "caption": f"mean ± std over {len(args.seeds)} training runs",
            "bundle_sha256": short_hash(), "smoke": bool(args.smoke),
            "backbone": f"{cfg.backbone} (bundled toy CLIP, sha256 {short_hash()}) at {cfg.image_size} px, "
                        f"layers {list(cfg.layers)}",
            "recipe": (f"BayesPFLConfig.teaching + toy overrides: {cfg.epochs} epochs, batch {cfg.batch_size}, lr "
                       f"{cfg.lr:g}, K={cfg.flow_length}, B={cfg.n_prompts}, P={cfg.n_context}, Q={cfg.n_state}, "
                       f"R_train={cfg.train_samples}, R_test={cfg.test_samples}, temperature {cfg.temperature:.4g}"),
            "config": cfg.to_dict(),
            "train_set": f"synthetic default split, seen categories' test split ({len(bench.aux)} images)",
            "test_sets": (f"default = synthetic default split, unseen categories ({len(bench.default)} images); "
                          f"large = 40 normal + 40 anomalous per unseen category ({len(bench.large)} images, "
                          "contains default); the real samples for Table 1"),
            "r_values": list(R_VALUES), "sweep_values": {k: sorted(v) for k, v in SWEEP_VALUES.items()}}
    prov_file.write_text(json.dumps(prov, indent=2, default=str) + "\n")
    report = write_report(out, runs, epochs, sweeps, deltas, prov)
    print(f"[bench] wrote {report} ({', '.join(args.parts) or 'report only'}) in "
          f"{(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
