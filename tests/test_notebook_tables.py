"""The committed tables behind notebooks 05 and 06 (benchmarks/notebook_tables.py -> benchmarks/results/).

* the files exist and are well formed: every row of Tables 2-4 / Figures 4-5 with >= 3 independent training runs on
  both test sets, the R sweep, Table 1's real-sample rows, Figure 4's per-epoch curves, Appendix B's four sweeps,
  the paired differences with their bootstrap intervals, and a provenance record that says "training runs";
* they were measured with the bundled toy CLIP installed here and with the notebooks' fast configuration;
* every number the notebooks' prose quotes from them matches them (the claims listed below);
* the readers in bpfl.notebook.tables give what the notebooks show.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from bpfl.notebook import tables as nbt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NOTEBOOKS = ROOT / "notebooks"
METRICS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap"]


@pytest.fixture(scope="module")
def runs() -> pd.DataFrame:
    path = RESULTS / "notebook_tables_runs.csv"
    assert path.is_file(), "run `python benchmarks/notebook_tables.py` (notebooks 05-06 show its tables)"
    return pd.read_csv(path)


@pytest.fixture(scope="module")
def prov() -> dict:
    return json.loads((RESULTS / "notebook_tables_provenance.json").read_text())


def markdown_of(stem: str) -> str:
    """All markdown cells of a notebook's jupytext source, comment markers removed, lines joined."""
    text = (NOTEBOOKS / f"{stem}.py").read_text()
    cells = re.split(r"^# %%.*$", text, flags=re.M)
    heads = re.findall(r"^# %%.*$", text, flags=re.M)
    md = [c for h, c in zip(heads, cells[1:]) if "[markdown]" in h]
    lines = [line[2:] if line.startswith("# ") else line.lstrip("#") for cell in md for line in cell.splitlines()]
    return re.sub(r"\s+", " ", " ".join(lines))


# ------------------------------------------------------------------------------------------------ files
def test_committed_files_exist_and_have_provenance(prov):
    for kind in ("runs", "epochs", "sweeps", "deltas"):
        assert nbt.committed_file(kind).is_file(), kind
    assert nbt.committed_file("report").is_file()
    assert prov["kind"] == "training-runs" and not prov["smoke"]
    assert len(prov["seeds"]) >= 3 and prov["caption"] == f"mean ± std over {len(prov['seeds'])} training runs"
    for key in ("machine", "date", "backbone", "recipe", "config", "train_set", "test_sets", "bundle_sha256"):
        assert prov.get(key), key
    report = nbt.committed_file("report").read_text()
    assert f"Mean ± std over {len(prov['seeds'])} training runs" in report and prov["machine"] in report


def test_committed_tables_used_the_installed_toy_clip_and_the_fast_recipe(prov):
    """Stale tables (another toy CLIP, another recipe) must be measured again, and the prose updated."""
    from bpfl.bundled_weights import short_hash
    from bpfl.config import BayesPFLConfig
    from bpfl.toyclip.pretrain import toy_bayespfl_overrides

    assert prov["bundle_sha256"] == short_hash(), (
        "benchmarks/results/notebook_tables_* were measured with another bundled toy CLIP: rerun "
        "benchmarks/notebook_tables.py and update the notebooks' prose")
    fast = BayesPFLConfig.teaching(**toy_bayespfl_overrides(), seed=0)
    committed = BayesPFLConfig.from_dict(prov["config"])
    assert not fast.differences(committed), f"the fast recipe changed: {fast.differences(committed)}"


def test_every_row_has_three_training_runs_on_both_test_sets(runs, prov):
    seeds = set(prov["seeds"])
    trained = runs[runs.experiment == "trained"]
    for row in nbt.TRAINED_ROWS:
        for test_set in ("default", "large"):
            got = trained[(trained.row == row) & (trained.test_set == test_set)]
            assert set(got.seed) == seeds, (row, test_set, sorted(got.seed))
            assert got[METRICS].notna().all().all(), (row, test_set)
            assert got[METRICS].stack().between(0, 1).all()
    inference = runs[runs.experiment == "inference"]
    for row in nbt.INFERENCE_ROWS:
        assert set(inference[(inference.row == row) & (inference.test_set == "large")].seed) == seeds, row
    r = runs[(runs.experiment == "R") & (runs.test_set == "large")]
    assert set(r.R) == set(prov["r_values"]) and (r.groupby("R").seed.nunique() == len(seeds)).all()
    timed = runs[(runs.experiment == "R") & runs.ms_per_image.notna()]
    assert set(timed.R) == set(prov["r_values"]) and (timed.ms_per_image > 0).all()
    assert (runs[(runs.experiment == "timing")].ms_per_image > 0).all()
    free = runs[runs.row == nbt.TRAINING_FREE_ROW]
    assert {"default", "large"} <= set(free.test_set)
    # Table 1's real samples (where present when measured): the full model's runs, pixel metrics defined
    real = runs[runs.experiment == "real"]
    for name, g in real[real.row == "Bayes-PFL"].groupby("test_set"):
        assert set(g.seed) == seeds and g.pixel_auroc.notna().all(), name
    # the seed-0 full model on 'large' equals the summary the notebooks show
    s = nbt.committed_summary(["Bayes-PFL"], "large", runs=runs)
    assert s.attrs["caption"] == f"mean ± std over {len(seeds)} training runs"
    full = trained[(trained.row == "Bayes-PFL") & (trained.test_set == "large")]
    assert math.isclose(s.at["Bayes-PFL", "pixel_auroc_mean"], full.pixel_auroc.mean())
    assert math.isclose(s.at["Bayes-PFL", "pixel_auroc_std"], full.pixel_auroc.std(ddof=1))


def test_figure4_curves_cover_every_epoch_of_every_run(prov):
    ep = nbt.committed_epochs()
    epochs = prov["config"]["epochs"]
    for row in ("Bayes-PFL", "APRIL-GAN+", "AnomalyCLIP+"):
        g = ep[ep.row == row]
        assert set(g.seed) == set(prov["seeds"]), row
        assert (g.groupby("seed").epoch.apply(lambda e: sorted(e) == list(range(1, epochs + 1)))).all(), row
        assert g.pixel_ap.between(0, 1).all()


def test_figure4_bayes_pfl_curve_ends_at_the_table_runs(runs):
    """The Bayes-PFL curve is the Table-1/2 runs' own training: its last epoch equals their default-split value."""
    ep = nbt.committed_epochs()
    last = ep[(ep.row == "Bayes-PFL")].sort_values("epoch").groupby("seed").pixel_ap.last()
    table = runs[(runs.experiment == "trained") & (runs.row == "Bayes-PFL") & (runs.test_set == "default")]
    for seed, value in table.set_index("seed").pixel_ap.items():
        assert abs(last[seed] - value) < 1e-6, seed


def test_appendix_b_sweeps(prov):
    sw = nbt.read_committed("sweeps")
    assert nbt.committed_sweep_params() == ["K", "B", "P", "Q"]
    for sym, values in prov["sweep_values"].items():
        g = sw[sw.param == sym]
        assert sorted(g.value.unique()) == sorted(values), sym
        assert (g.groupby("value").seed.nunique() == len(prov["seeds"])).all(), sym
        assert (g.trained_value == g.value).all(), "each value is read back from the trained weights"
        df = nbt.committed_sweep_frame(sym)
        assert list(df.index) == sorted(values) and (df.n_runs == len(prov["seeds"])).all()
        assert df.loc[df.paper_default, "image_auroc_paper"].notna().all()


def test_paired_deltas_and_intervals(runs):
    d = nbt.committed_deltas()
    for row in [*[r for r in nbt.TRAINED_ROWS if r != "Bayes-PFL"], *nbt.INFERENCE_ROWS]:
        assert row in d.index, row
        assert d.at[row, "n_pairs"] >= 3
        lo, mid, hi = (d.at[row, k] for k in ("image_auroc_delta_ci_low", "image_auroc_delta_boot",
                                               "image_auroc_delta_ci_high"))
        assert lo <= mid <= hi, row
    # the committed deltas equal the pairing computed from the runs
    live = nbt.paired_deltas(runs, "large")
    for row in ("w/o ISD", "ISD-ISD", "text ensemble"):
        assert math.isclose(live.at[row, "pixel_auroc_delta_mean"], d.at[row, "pixel_auroc_delta_mean"],
                            abs_tol=1e-9)


# ------------------------------------------------------------------------------------------------ prose
def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def _pm(summary: pd.DataFrame, row, metric: str) -> str:
    return f"{_pts(summary.at[row, metric + '_mean'])} ± {_pts(summary.at[row, metric + '_std'])}"


def _signed(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def claims() -> list[tuple[str, str]]:
    """(notebook, text) pairs: each text is what the prose must contain, computed from the committed files."""
    runs = nbt.read_committed("runs")
    large = nbt.committed_summary(None, "large", runs=runs)
    d = nbt.committed_deltas()
    out: list[tuple[str, str]] = []
    nb05, nb06, nb04 = "05_ablations", "06_benchmark_and_figure4", "04_inference_and_maps"
    # Table 2: pixel AUROC of every trained ablation within X of the full model
    trained = [r for r in nbt.TABLE2_ORDER if r in nbt.TRAINED_ROWS and r != "Bayes-PFL"]
    worst = max(abs(d.at[r, "pixel_auroc_delta_mean"]) for r in trained)
    full_px = _pts(large.at["Bayes-PFL", "pixel_auroc_mean"])
    out.append((nb05, f"full model's {full_px} by at most {_pts(worst)} points"))
    for row in ("w/o ISD", "w/o IAD", "w/o ISD, IAD"):
        out.append((nb05, f"{row} {_signed(d.at[row, 'image_auroc_delta_mean'])} ± "
                          f"{_pts(d.at[row, 'image_auroc_delta_std'])}"))
        assert d.at[row, "image_auroc_delta_mean"] > 0, f"{row}: the prose says it does not hurt"
    for row, tail in (("w/o L_ort", "image AUROC, interval"), ("w/o s_text", "interval")):
        lo, hi = d.at[row, "image_auroc_delta_ci_low"], d.at[row, "image_auroc_delta_ci_high"]
        text = (f"{_signed(d.at[row, 'image_auroc_delta_mean'])} {tail} {_signed(lo)} to {_signed(hi)}"
                if row == "w/o L_ort" else
                f"{_signed(d.at[row, 'image_auroc_delta_mean'])}, {tail} {_signed(lo)} to {_signed(hi)}")
        out.append((nb05, text))
        assert hi < 0, f"{row}: the prose says its interval excludes 0"
    lort = runs[(runs.experiment == "trained") & (runs.test_set == "large")].pivot_table(
        index="seed", columns="row", values="image_auroc")
    assert (lort["w/o L_ort"] < lort["Bayes-PFL"]).all(), "the prose says w/o L_ort is lower in all 3 runs"
    rca = runs[(runs.experiment == "trained") & (runs.test_set == "large")].pivot_table(
        index="seed", columns="row", values="pixel_auroc")
    assert (rca["w/o RCA"] < rca["Bayes-PFL"]).all(), "the prose says w/o RCA loses pixel AUROC in every run"
    out.append((nb05, f"w/o RCA loses {_pts(-d.at['w/o RCA', 'pixel_auroc_delta_mean'])} ± "
                      f"{_pts(d.at['w/o RCA', 'pixel_auroc_delta_std'])} points of pixel AUROC"))
    # Table 3
    rs = nbt.committed_summary(None, "large", runs=runs, experiment="R")
    out.append((nb05, f"image AUROC {_pts(rs.at['R=1', 'image_auroc_mean'])} at R = 1 and "
                      f"{_pts(rs.at['R=10', 'image_auroc_mean'])} at R = 10, pixel AUROC "
                      f"{_pts(rs.at['R=1', 'pixel_auroc_mean'])} and {_pts(rs.at['R=10', 'pixel_auroc_mean'])}"))
    spread = max(rs["image_auroc_std"].max(), rs["pixel_auroc_std"].max())
    assert round(100 * spread, 1) <= 0.4, "the prose says: at most 0.4 AUROC points at every R"
    timing = runs[(runs.experiment == "R") & runs.ms_per_image.notna()].groupby("R").ms_per_image.mean()
    out.append((nb05, f"{timing[1]:.1f} ms at R = 1, {timing[10]:.1f} ms at R = 10"))
    # Figure 5
    f5 = nbt.figure5_frame(d)["Δ AP (points)"]
    out.append((nb05, f"lie between {f5.min():+.1f} and {f5.max():+.1f} points".replace("-", "−")))
    assert (f5 > 0).any() and (f5 < 0).any(), "the prose says the bars change sign"
    # Appendix B
    sw = nbt.read_committed("sweeps")
    by = sw.groupby(["param", "value"])[["image_auroc", "pixel_auroc"]].mean()
    out.append((nb05, f"stay between {_pts(by.image_auroc.min())} and {_pts(by.image_auroc.max())} image AUROC and "
                      f"between {_pts(by.pixel_auroc.min())} and {_pts(by.pixel_auroc.max())} pixel AUROC"))
    assert by.image_auroc.idxmin() == ("B", 1)
    assert {p for p, v in by.index[by.pixel_auroc.round(3) == by.pixel_auroc.round(3).min()]} <= {"B", "P"}
    # Table 1 (notebook 06)
    out.append((nb06, f"reach {_pm(large, 'Bayes-PFL', 'image_auroc')} image AUROC and "
                      f"{_pm(large, 'Bayes-PFL', 'pixel_auroc')} pixel AUROC"))
    mv = nbt.committed_summary(["Bayes-PFL"], "MVTec-AD (bottle sample)", runs=runs)
    kv = nbt.committed_summary(["Bayes-PFL"], "Kvasir (sample)", runs=runs)
    out.append((nb06, f"pixel AUROC {_pm(mv, 'Bayes-PFL', 'pixel_auroc')} on the MVTec-AD bottles"))
    out.append((nb06, f"{_pm(kv, 'Bayes-PFL', 'pixel_auroc')} on Kvasir"))
    out.append((nb06, f"({_pm(mv, 'Bayes-PFL', 'image_auroc')}: 10 images"))
    # Figure 4 (notebook 06)
    ep = nbt.committed_epochs()
    agg = ep.groupby(["row", "epoch"]).pixel_ap.agg(["mean", "std"])
    last = int(ep.epoch.max())
    out.append((nb06, f"starts low ({_pts(agg.at[('Bayes-PFL', 1), 'mean'])} pixel AP after epoch 1"))
    for row in ("Bayes-PFL", "APRIL-GAN+", "AnomalyCLIP+"):
        out.append((nb06, f"{_pts(agg.at[(row, last), 'mean'])} ± {_pts(agg.at[(row, last), 'std'])}"))
    assert all(abs(100 * agg.at[(row, 1), "mean"] - 56) < 2 for row in ("APRIL-GAN+", "AnomalyCLIP+")), \
        "the prose says the baselines start near 56"
    drops = [agg.loc[row, "mean"].iloc[-1] - agg.loc[row, "mean"].max() for row in ("APRIL-GAN+", "AnomalyCLIP+")]
    assert all(-dr <= agg.loc[row, "std"].max() for dr, row in zip(drops, ("APRIL-GAN+", "AnomalyCLIP+"))), \
        "the prose says no curve falls after its peak by more than the spread between runs"
    # Figure 3 with baselines (notebook 04)
    for row in ("Bayes-PFL", "APRIL-GAN+", "AnomalyCLIP+"):
        out.append((nb04, f"{_pm(large, row, 'pixel_ap')} {row}"))
    out.append((nb04, f"{_pts(large.at[nbt.TRAINING_FREE_ROW, 'pixel_ap_mean'])} WinCLIP-style"))
    return out


def test_notebook_prose_quotes_the_committed_numbers():
    missing = [(nb, text) for nb, text in claims() if text not in markdown_of(nb)]
    assert not missing, "prose and committed tables disagree (update the prose):\n" + "\n".join(
        f"  {nb}: expected '{t}'" for nb, t in missing)


def test_notebooks_use_training_runs_not_the_deprecated_alias():
    for stem in ("05_ablations", "06_benchmark_and_figure4"):
        src = (NOTEBOOKS / f"{stem}.py").read_text()
        assert "evaluate_seeds(" not in src.replace("evaluate_mc_seeds(", ""), stem
        assert "nbt.committed" in src or "nbt.read_committed" in src, stem
