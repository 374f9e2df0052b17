"""Training (§3.6), checkpoints and resume, zero-shot evaluation, and the `bpfl` command line."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bpfl.config import BayesPFLConfig
from bpfl.data import SYNTHETIC_GROUPS, make_synthetic_dataset, open_dataset
from bpfl.evaluate import evaluate, released_image_scores, smooth_maps
from bpfl.model import BayesPFL
from bpfl.train import load_model, read_checkpoint, save_checkpoint, train

SIZE = 112  # multiple of the tiny backbone's patch size 14 -> an 8x8 grid


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, seed=0, preset="tiny")
    return root


@pytest.fixture(scope="module")
def backbone112():
    from bpfl.backbone import load_backbone
    torch.manual_seed(0)
    return load_backbone("bpfl-tiny", None, image_size=SIZE, layers=(1, 2, 3, 4), device="cpu")


def config(**kw) -> BayesPFLConfig:
    base = dict(image_size=SIZE, layers=(1, 2, 3, 4), batch_size=4, epochs=2, lr=1e-2, test_samples=2)
    base.update(kw)
    return BayesPFLConfig.teaching(**base)


def fresh_model(backbone, **kw) -> BayesPFL:
    torch.manual_seed(0)
    return BayesPFL(config(**kw), backbone=backbone)


def seen_set(root):
    return open_dataset(root, split="test", categories=SYNTHETIC_GROUPS["seen"], image_size=SIZE)


def fixed_batch_loss(model, ds) -> float:
    from bpfl.data import collate
    batch = collate([ds[i] for i in range(len(ds))])
    model.train()
    with torch.no_grad():
        out = model(batch["image"], batch["class_name"], generator=torch.Generator().manual_seed(0))
        losses = model.loss(out, torch.nan_to_num(batch["mask"]), batch["label"])
    return float(losses["total"])


def test_short_training_lowers_the_loss(synthetic, backbone112, tmp_path):
    ds = seen_set(synthetic)
    model = fresh_model(backbone112, epochs=4)
    before = fixed_batch_loss(model, ds)
    res = train(model, ds, tmp_path, progress=False)
    after = fixed_batch_loss(model, ds)
    assert after < before - 0.05 * abs(before), (before, after)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert {"cls", "focal", "dice", "ort", "kl_context", "kl_normal", "kl_abnormal", "total"} <= set(log.columns)
    assert res.checkpoint == tmp_path / "last.pt"


def test_resume_after_interruption_reproduces_the_uninterrupted_run(synthetic, backbone112, tmp_path):
    ds = seen_set(synthetic)  # 24 images, batch 4 -> 6 steps per epoch
    full = fresh_model(backbone112)
    train(full, ds, tmp_path / "full", progress=False)
    part = fresh_model(backbone112)
    train(part, ds, tmp_path / "part", progress=False, max_steps=8, checkpoint_every=1)  # killed mid-epoch 2
    ck = read_checkpoint(tmp_path / "part" / "last.pt")
    assert (ck["epoch"], ck["step_in_epoch"], ck["global_step"]) == (1, 2, 8)
    resumed = fresh_model(backbone112)
    train(resumed, ds, tmp_path / "part", progress=False, resume=True)
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(part.prompts.context, full.prompts.context)  # the interrupted one really differed


def test_resume_refuses_a_different_config(synthetic, backbone112, tmp_path):
    ds = seen_set(synthetic)
    train(fresh_model(backbone112), ds, tmp_path, progress=False, max_steps=1)
    with pytest.raises(ValueError, match="different config"):
        train(fresh_model(backbone112, lr=0.5), ds, tmp_path, progress=False, resume=True)


def test_non_finite_loss_stops_with_the_step(synthetic, backbone112, tmp_path, monkeypatch):
    ds = seen_set(synthetic)
    model = fresh_model(backbone112)
    real_loss = model.loss
    calls = {"n": 0}

    def bad_loss(*a, **k):
        out = real_loss(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["total"] = out["total"] * float("nan")
        return out
    monkeypatch.setattr(model, "loss", bad_loss)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 3"):
        train(model, ds, tmp_path, progress=False)


def test_checkpoint_holds_only_the_kits_parameters(backbone112, tmp_path):
    model = fresh_model(backbone112)
    path = save_checkpoint(tmp_path / "c.pt", model)
    ck = read_checkpoint(path)
    assert not any(k.startswith("backbone") for k in ck["state"])
    n_clip = sum(p.numel() for p in backbone112.parameters())
    assert sum(v.numel() for v in ck["state"].values()) < 0.2 * n_clip
    loaded = load_model(path, backbone=backbone112)
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(loaded.trainable_state_dict()[k], v)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable bpfl checkpoint"):
        read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="bpfl train"):
        read_checkpoint(tmp_path / "missing.pt")


def test_evaluate_writes_tables_and_matches_sklearn(synthetic, backbone112, tmp_path):
    from sklearn.metrics import roc_auc_score
    model = fresh_model(backbone112).eval()
    ds = open_dataset(synthetic, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=SIZE)
    res = evaluate(model, ds, out_dir=tmp_path, progress=False, overlays=1)
    for f in ("metrics.csv", "metrics.md", "scores.csv", "provenance.json"):
        assert (tmp_path / f).is_file()
    assert len(list((tmp_path / "overlays").glob("*.png"))) == len(SYNTHETIC_GROUPS["unseen"])
    assert set(res.per_category) == set(SYNTHETIC_GROUPS["unseen"])
    scores = res.scores
    assert len(scores) == len(ds)
    for cat, rows in scores.groupby("category"):
        assert res.per_category[cat]["image_auroc"] == pytest.approx(roc_auc_score(rows["label"], rows["image_score"]))
    md = (tmp_path / "metrics.md").read_text()
    assert "RANDOM weights" in md and "bpfl-tiny" in md and "R" in res.provenance
    mean = np.mean([res.per_category[c]["pixel_auroc"] for c in res.per_category])
    assert res.mean("pixel_auroc") == pytest.approx(mean)


def test_single_class_category_gives_nan_not_zero(synthetic, backbone112):
    model = fresh_model(backbone112).eval()
    ds = open_dataset(synthetic, split="train", categories=["brick"], image_size=SIZE)  # good images only
    with pytest.warns(UserWarning, match="brick"):
        res = evaluate(model, ds, progress=False)
    assert math.isnan(res.per_category["brick"]["image_auroc"])


def test_released_image_score_and_smoothing():
    s_text = np.array([0.2, 0.4, 0.6])
    topk = np.array([10.0, 30.0, 20.0])
    got = released_image_scores(s_text, topk, "bottle")
    np.testing.assert_allclose(got, 0.5 * np.array([0, 0.5, 1]) + 0.5 * np.array([0, 1, 0.5]))
    np.testing.assert_allclose(released_image_scores(s_text, topk, "brain"), [0, 0.5, 1])
    maps = np.zeros((2, 31, 31), np.float32)
    maps[0, 15, 15] = 1
    sm = smooth_maps(maps, 2.0)
    assert sm[0].sum() == pytest.approx(1.0, abs=1e-4) and sm[0, 15, 15] < 0.1 and sm[1].max() == 0
    assert smooth_maps(maps, 0) is maps


def test_cli_data_generate_and_check(tmp_path, capsys):
    from bpfl.cli import main
    assert main(["data", "generate", str(tmp_path / "syn"), "--preset", "tiny"]) == 0
    assert main(["data", "check", str(tmp_path / "syn")]) == 0
    (tmp_path / "syn" / "brick" / "test" / "good" / "000.png").write_bytes(b"broken")
    assert main(["data", "check", str(tmp_path / "syn")]) == 1
    assert "000.png" in capsys.readouterr().out


def test_cli_set_overrides_are_typed():
    from bpfl.cli import parse_overrides
    got = parse_overrides(["kl_weight=0.01", "layers=6,12,18,24", "rca_bias=true", "pretrained=none",
                           "ensemble=text"])
    assert got == {"kl_weight": 0.01, "layers": (6, 12, 18, 24), "rca_bias": True, "pretrained": None,
                   "ensemble": "text"}
    with pytest.raises(SystemExit, match="unknown config field"):
        parse_overrides(["nope=1"])


def test_demo_tiny_end_to_end(tmp_path, capsys):
    from bpfl.cli import main
    rc = main(["demo", "--tiny", "--backbone", "bpfl-tiny", "--out", str(tmp_path / "demo"),
               "--data", str(tmp_path / "data")])
    assert rc == 0
    out = tmp_path / "demo"
    for f in ("results.md", "results.csv", "figure3_panel.png", "figure3_panel.pdf", "train/last.pt",
              "train/train_log.csv", "unseen/metrics.csv", "seen_heldout/metrics.csv", "unseen/scores.csv"):
        assert (out / f).is_file(), f
    table = pd.read_csv(out / "results.csv", index_col=0)
    assert list(table.index) == ["seen (held-out images)", "unseen (zero-shot)"]
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "mechanics" in text


def test_predict_on_a_real_image(shared_data, backbone112, tmp_path):
    from bpfl.cli import main
    image = shared_data / "mvtec-bottle-xs" / "test" / "broken_large" / "000.png"
    ckpt = save_checkpoint(tmp_path / "c.pt", fresh_model(backbone112))
    rc = main(["predict", str(image), "--checkpoint", str(ckpt), "--class-name", "bottle",
               "--out", str(tmp_path / "pred"), "--samples", "2"])
    assert rc == 0
    assert (tmp_path / "pred" / "000_overlay.png").is_file() and (tmp_path / "pred" / "000_heatmap.png").is_file()
    rows = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert rows.loc[0, "class_name"] == "bottle" and np.isfinite(rows.loc[0, "image_score"])
