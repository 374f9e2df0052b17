"""Figure 3 with baselines: the same images, one row per method, one shared colour scale, ground-truth outlines."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bpfl.config import BayesPFLConfig
from bpfl.data import make_synthetic_dataset, open_dataset
from bpfl.figures import figure3_method_maps, figure3_models
from bpfl.model import BayesPFL
from bpfl.train import train
from bpfl.viz import figure3_methods, save_figure

SIZE = 112
DESIGNS = ("bayes-pfl", "winclip", "aprilgan+", "anomalyclip+")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig")
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick", "grass"])
    return root, open_dataset(root, split="test", categories=["brick", "grass"], image_size=SIZE)


@pytest.fixture(scope="module")
def checkpoints(bb, data, tmp_path_factory):
    """One briefly trained checkpoint per trained design (winclip trains nothing)."""
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for design in ("bayes-pfl", "aprilgan+", "anomalyclip+"):
        torch.manual_seed(0)
        cfg = BayesPFLConfig.teaching(image_size=SIZE, layers=(1, 2, 3, 4), batch_size=6, lr=1e-2, test_samples=2,
                                      flow_length=2, prompt_design=design)
        res = train(BayesPFL(cfg, backbone=bb), data[1], out / design, max_steps=1, progress=False)
        paths[design] = res.checkpoint
    return paths


@pytest.fixture(scope="module")
def maps(bb, data, checkpoints):
    ds = data[1]
    models = figure3_models({**checkpoints, "winclip": None}, backbone=bb)
    models = {d: models[d] for d in DESIGNS}
    picks = [i for i, r in enumerate(ds.records) if r.label == 1][:3]
    return picks, figure3_method_maps(models, ds, picks), models


def test_one_row_per_method_shared_colour_scale_and_outlines(maps, tmp_path):
    picks, (images, masks, titles, by_method), _ = maps
    assert list(by_method) == list(DESIGNS) and all(len(v) == len(picks) for v in by_method.values())
    fig = figure3_methods(images, masks, by_method, titles)
    assert fig.bpfl_rows == ["input", *DESIGNS]
    grid = np.array([ax for ax in fig.axes if ax.get_images()]).reshape(1 + len(DESIGNS), len(picks))
    labels = [grid[i, 0].get_ylabel() for i in range(1, grid.shape[0])]
    assert labels == ["Bayes-PFL", "WinCLIP-style", "APRIL-GAN+", "AnomalyCLIP+"]
    clims = {im.get_clim() for row in grid[1:] for ax in row for im in ax.get_images()}
    assert clims == {(0.0, 1.0)}  # one colour scale for every panel of every method
    cmaps = {im.get_cmap().name for row in grid[1:] for ax in row for im in ax.get_images()}
    assert cmaps == {"inferno"}
    # one colorbar for all panels, and each panel of an anomalous image carries the ground-truth outline
    assert len(fig.axes) == grid.size + 1
    assert all(ax.collections for ax in grid.ravel())
    # each panel shows that method's map for that image
    for i, d in enumerate(DESIGNS, start=1):
        for j in range(len(picks)):
            np.testing.assert_allclose(grid[i, j].get_images()[0].get_array(), by_method[d][j], rtol=1e-6)
    paths = save_figure(fig, tmp_path / "figure3_methods")
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"] and all(p.stat().st_size > 0 for p in paths)


def test_data_limits_are_the_range_over_all_methods(maps):
    _, (images, masks, titles, by_method), _ = maps
    fig = figure3_methods(images, masks, by_method, titles, limits="data")
    lo = min(float(m.min()) for v in by_method.values() for m in v)
    hi = max(float(m.max()) for v in by_method.values() for m in v)
    clims = {im.get_clim() for ax in fig.axes for im in ax.get_images()
             if im.get_cmap().name == "inferno" and im.get_array().ndim == 2}  # the maps, not the RGB inputs
    assert len(clims) == 1 and np.allclose(clims.pop(), (lo, hi))


def test_maps_are_each_models_own(maps, data):
    picks, (_, _, _, by_method), models = maps
    from bpfl.evaluate import predict_dataset
    for d in ("winclip", "anomalyclip+"):
        (_, out), = list(predict_dataset(models[d], data[1], picks, progress=False))
        np.testing.assert_allclose(np.stack(by_method[d]), out.anomaly_map.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.stack(by_method["bayes-pfl"]), np.stack(by_method["aprilgan+"]))
    assert models["winclip"].rca is None and models["winclip"].config.prompt_design == "winclip"


def test_trained_designs_need_their_checkpoint(checkpoints, bb):
    with pytest.raises(ValueError, match="aprilgan\\+ is trained"):
        figure3_models({"bayes-pfl": checkpoints["bayes-pfl"], "aprilgan+": None}, backbone=bb)
    with pytest.raises(ValueError, match="not 'aprilgan\\+'"):
        figure3_models({"aprilgan+": checkpoints["anomalyclip+"]}, backbone=bb)


def test_cli_figures_with_designs(data, checkpoints, tmp_path, capsys):
    from bpfl.cli import main
    root = data[0]
    rc = main(["figures", "--checkpoint", str(checkpoints["bayes-pfl"]), "--data", str(root), "--categories", "brick",
               "--designs", *DESIGNS, "--per-category", "2", "--out", str(tmp_path), "--device", "cpu",
               "--design-checkpoint", f"aprilgan+={checkpoints['aprilgan+']}",
               f"anomalyclip+={checkpoints['anomalyclip+']}"])
    assert rc == 0
    for f in ("figure3_methods.png", "figure3_methods.pdf", "figure3_panel.png"):
        assert (tmp_path / f).is_file(), f
    with pytest.raises(SystemExit, match="anomalyclip\\+=PATH"):
        main(["figures", "--checkpoint", str(checkpoints["bayes-pfl"]), "--data", str(root),
              "--designs", "bayes-pfl", "anomalyclip+"])
