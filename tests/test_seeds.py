"""The paper's seeds are training runs (bpfl.seeds); Monte-Carlo redraws of one model are a different, named thing."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import bpfl.seeds as T  # the module that calls train(): patched there
from bpfl.config import BayesPFLConfig
from bpfl.data import make_synthetic_dataset, open_dataset
from bpfl.evaluate import evaluate_mc_seeds, evaluate_seeds
from bpfl.seeds import evaluate_checkpoints, seed_dir, train_and_evaluate_seeds
from bpfl.train import load_model, read_checkpoint

SIZE = 112


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick", "grass"])
    return (root, open_dataset(root, split="test", categories=["brick"], image_size=SIZE),
            open_dataset(root, split="test", categories=["grass"], image_size=SIZE))


def cfg(**kw) -> BayesPFLConfig:
    base = dict(image_size=SIZE, layers=(1, 2, 3, 4), batch_size=6, epochs=1, lr=1e-2, test_samples=2, flow_length=2)
    base.update(kw)
    return BayesPFLConfig.teaching(**base)


@pytest.fixture(scope="module")
def two_runs(bb, data, tmp_path_factory):
    _, train_set, test_set = data
    out = tmp_path_factory.mktemp("runs")
    res = train_and_evaluate_seeds(cfg(), train_set, {"grass": test_set}, [0, 1], out, backbone=bb, max_steps=1)
    return out, res


def test_one_training_run_per_seed_in_its_own_folder(two_runs):
    out, res = two_runs
    assert res.trained == [0, 1] and res.seeds == [0, 1]
    states = {}
    for s in (0, 1):
        folder = seed_dir(out, s)
        ck = read_checkpoint(folder / "last.pt")
        assert ck["config"]["seed"] == s and ck["global_step"] == 1  # trained with its own seed
        assert json.loads((folder / "done.json").read_text())["config"]["seed"] == s
        assert (folder / "eval" / "grass" / "metrics.csv").is_file()
        states[s] = ck["state"]
    # independent runs: different initial weights and samples -> different trained weights
    assert not torch.equal(states[0]["prompts.context"], states[1]["prompts.context"])
    runs = res.runs.loc["grass"]
    assert list(runs.index) == ["seed0", "seed1"] and list(runs["seed"]) == [0, 1]
    assert [str(p) for p in runs["checkpoint"]] == [str(seed_dir(out, s) / "last.pt") for s in (0, 1)]


def test_summary_is_mean_and_sample_std_over_the_runs_and_says_so(two_runs):
    out, res = two_runs
    per_run = [pd.read_csv(seed_dir(out, s) / "eval" / "grass" / "metrics.csv", index_col=0).loc["mean"]
               for s in (0, 1)]
    summary = res.summary("grass")
    for m in ("image_auroc", "pixel_ap"):
        vals = np.array([float(r[m]) for r in per_run])
        assert summary.at[m, "mean"] == pytest.approx(vals.mean())
        assert summary.at[m, "std"] == pytest.approx(vals.std(ddof=1))
    assert "over 2 training runs" in res.caption and summary.attrs["kind"] == "training-runs"
    assert "Monte-Carlo redraws" not in res.caption
    md = (out / "summary.md").read_text()
    assert "over 2 training runs" in md and "seed0" in md
    assert set(pd.read_csv(out / "runs.csv")["seed"]) == {0, 1}
    long = pd.read_csv(out / "summary.csv", index_col=[0, 1])
    assert long.loc[("grass", "image_auroc"), "mean"] == pytest.approx(summary.at["image_auroc", "mean"])


def test_a_finished_seed_is_loaded_not_retrained(two_runs, bb, data, monkeypatch):
    out, first = two_runs
    _, train_set, test_set = data
    calls = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = train_and_evaluate_seeds(cfg(), train_set, {"grass": test_set}, [0, 1, 2], out, backbone=bb,
                                     max_steps=1)
    assert len(calls) == 1 and again.trained == [2]  # only the new seed trains
    pd.testing.assert_frame_equal(again.runs.loc[("grass", "seed0"):("grass", "seed1")], first.runs)
    # a different budget (or config) is a different run: trained again
    calls.clear()
    train_and_evaluate_seeds(cfg(), train_set, {"grass": test_set}, [0], out, backbone=bb, max_steps=2)
    assert len(calls) == 1


def test_monte_carlo_redraws_are_named_as_such(bb, data, two_runs, tmp_path):
    out, _ = two_runs
    _, _, test_set = data
    model = load_model(seed_dir(out, 0) / "last.pt", backbone=bb)
    summary = evaluate_mc_seeds(model, test_set, [0, 1], progress=False, aupro_variant=None, out_dir=tmp_path)
    assert summary.attrs["kind"] == "monte-carlo"
    assert "2 Monte-Carlo redraws of one trained model" in summary.attrs["caption"]
    assert "Monte-Carlo redraws of one trained model" in (tmp_path / "mc_seeds_summary.md").read_text()
    rows = pd.read_csv(tmp_path / "mc_seeds.csv", index_col=0)
    assert summary.at["pixel_ap", "mean"] == pytest.approx(rows["pixel_ap"].mean())
    with pytest.warns(DeprecationWarning, match="evaluate_mc_seeds"):
        old = evaluate_seeds(model, test_set, [0, 1], progress=False, aupro_variant=None)
    pd.testing.assert_frame_equal(old, summary)


def test_evaluate_checkpoints_equals_the_training_runs(two_runs, bb, data, tmp_path):
    out, res = two_runs
    _, _, test_set = data
    # a random-weight CLIP is not in the checkpoints: give the same one (real weights are reloaded from their tag)
    again = evaluate_checkpoints([seed_dir(out, s) / "last.pt" for s in (0, 1)], {"grass": test_set}, tmp_path,
                                 backbone=bb)
    cols = ["image_auroc", "pixel_ap"]
    np.testing.assert_allclose(again.runs[cols].to_numpy(float), res.runs[cols].to_numpy(float), rtol=1e-6)
    assert again.caption == res.caption
    with pytest.warns(UserWarning, match="repeat"):
        evaluate_checkpoints([seed_dir(out, 0) / "last.pt"] * 2, {"grass": test_set}, backbone=bb)


def test_cli_train_seeds_and_test_several_checkpoints(data, tmp_path, capsys):
    from bpfl.cli import main
    root = data[0]
    common = ["--backbone", "bpfl-tiny", "--pretrained", "random", "--image-size", str(SIZE), "--device", "cpu"]
    assert main(["train", "--data", str(root), "--categories", "brick", "--out", str(tmp_path / "t"),
                 "--preset", "teaching", "--max-steps", "1", "--quiet", "--seeds", "3", "4",
                 "--set", "batch_size=6", "flow_length=2", "test_samples=2", *common]) == 0
    ckpts = [tmp_path / "t" / f"seed{s}" / "last.pt" for s in (3, 4)]
    assert [read_checkpoint(p)["config"]["seed"] for p in ckpts] == [3, 4]
    assert "bpfl test --checkpoint" in capsys.readouterr().out
    assert main(["test", "--checkpoint", *map(str, ckpts), "--data", str(root), "--categories", "grass",
                 "--out", str(tmp_path / "e"), "--aupro", "mvtec", "--device", "cpu"]) == 0
    assert "over 2 training runs" in (tmp_path / "e" / "summary.md").read_text()
    assert "over 2 training runs" in capsys.readouterr().out
    # the old --seeds: Monte-Carlo redraws of one model, said so
    assert main(["test", "--checkpoint", str(ckpts[0]), "--data", str(root), "--categories", "grass",
                 "--out", str(tmp_path / "mc"), "--seeds", "0", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "--seeds means Monte-Carlo redraws" in text and "Monte-Carlo redraws of one trained model" in text
    assert (tmp_path / "mc" / "mc_seeds_summary.md").is_file()
    with pytest.raises(SystemExit, match="choose one"):
        main(["test", "--checkpoint", *map(str, ckpts), "--data", str(root), "--mc-seeds", "0", "1"])
