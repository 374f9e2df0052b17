"""Readers, the dataset type, image/mask conversion, and bad-input handling (bpfl.data)."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bpfl.data import (
    CLIP_MEAN,
    CLIP_STD,
    AnomalyDataset,
    DatasetError,
    DatasetWarning,
    Record,
    check_dataset,
    collate,
    detect_layout,
    load_image,
    load_mask,
    load_record,
    open_dataset,
    read_folder,
    read_meta_json,
    read_mvtec,
    read_segmentation_only,
    read_visa,
    write_meta_json,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MVTEC_XS = SHARED / "mvtec-bottle-xs"
KVASIR = SHARED / "kvasir-seg-sample"


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _rgb(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h: int = 40, w: int = 48, value: int = 255) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[10:20, 12:30] = value
    return m


def _mini_mvtec(root: Path, cats=("widget",), n_good=2, n_bad=2) -> Path:
    """A tiny MVTec-layout dataset with 40x48 images and 0/255 masks."""
    for c in cats:
        for i in range(n_good):
            _png(root / c / "train" / "good" / f"{i:03d}.png", _rgb(seed=i))
            _png(root / c / "test" / "good" / f"{i:03d}.png", _rgb(seed=10 + i))
        for i in range(n_bad):
            _png(root / c / "test" / "crack" / f"{i:03d}.png", _rgb(seed=20 + i))
            _png(root / c / "ground_truth" / "crack" / f"{i:03d}_mask.png", _mask())
    return root


# ------------------------------------------------------------------------------------------------
# real samples
# ------------------------------------------------------------------------------------------------
def test_mvtec_reader_on_real_bottle_sample():
    if not MVTEC_XS.is_dir():
        pytest.skip(f"real sample not present: {MVTEC_XS}")
    every = read_mvtec(MVTEC_XS, split="all", class_name="bottle")
    assert len(every) == 15
    test = read_mvtec(MVTEC_XS, split="test", class_name="bottle")
    assert len(test) == 10
    assert sorted(r.label for r in test) == [0] * 5 + [1] * 5
    assert {r.specie for r in test if r.label} == {"broken_large"}
    assert all(r.class_name == "bottle" and r.split == "test" for r in test)
    assert all((r.mask_path is None) == (r.label == 0) for r in test)
    assert all(Path(r.mask_path).name == Path(r.img_path).stem + "_mask.png" for r in test if r.label)
    assert [r.split for r in every].count("train") == 5
    assert detect_layout(MVTEC_XS) == "mvtec"

    for r in test:  # masks are binary and have the image's size; foreground only where anomalous
        rgb, mask = load_record(r)
        assert mask.shape == (rgb.size[1], rgb.size[0]) == (900, 900)
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask.sum() > 0) == (r.label == 1)

    ds = AnomalyDataset(test, image_size=64)
    item = ds[len(ds) - 1]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (64, 64)
    for i in range(len(ds)):
        it = ds[i]
        assert set(torch.unique(it["mask"]).tolist()) <= {0.0, 1.0}
        assert (it["mask"].sum() > 0).item() == bool(it["label"]) and it["has_mask"]
    assert ds.categories == ["bottle"] and ds.has_masks


def test_segmentation_only_reader_on_real_kvasir_sample():
    if not KVASIR.is_dir():
        pytest.skip(f"real sample not present: {KVASIR}")
    recs = read_segmentation_only(KVASIR)
    assert len(recs) == 12
    assert all(r.label == 1 and r.class_name == "colon" for r in recs)
    assert detect_layout(KVASIR) == "segmentation"
    noisy = 0
    for r in recs:
        raw = np.asarray(Image.open(r.mask_path))
        noisy += int(((raw > 0) & (raw <= 127)).any())  # JPEG noise that > 0 would count as polyp
        _, mask = load_record(r)
        assert set(np.unique(mask)) <= {0, 1} and mask.sum() > 0
        assert mask.sum() < (raw.max(axis=2) > 0).sum() or not ((raw > 0) & (raw <= 127)).any()
    assert noisy > 0  # the sample really has compression noise, so the > 127 threshold matters
    ds = open_dataset(KVASIR, image_size=32)
    batch = collate([ds[0], ds[1]])
    assert batch["mask"].shape == (2, 32, 32) and batch["label"].tolist() == [1, 1]
    assert all(m.sum() > 0 for m in batch["mask"])
    assert isinstance(batch["path"], list) and isinstance(batch["class_name"][0], str)


# ------------------------------------------------------------------------------------------------
# synthetic fixtures for each layout
# ------------------------------------------------------------------------------------------------
def _visa_fixture(root: Path) -> Path:
    rows = []
    for obj in ("candle", "pcb1"):
        d = root / obj / "Data"
        for i in range(3):
            p = _png(d / "Images" / "Normal" / f"{i:04d}.JPG", _rgb(seed=i))
            rows.append((obj, "train" if i < 2 else "test", "normal", p.relative_to(root).as_posix(), ""))
        for i in range(2):
            p = _png(d / "Images" / "Anomaly" / f"{i:03d}.JPG", _rgb(seed=5 + i))
            m = np.zeros((40, 48), np.uint8)
            m[5:10, 5:15] = 1  # VisA masks hold small label values, not 255
            m[25:30, 30:40] = 3
            q = _png(d / "Masks" / "Anomaly" / f"{i:03d}.png", m)
            rows.append((obj, "test", "anomaly", p.relative_to(root).as_posix(), q.relative_to(root).as_posix()))
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def test_visa_reader_with_split_csv_and_small_mask_values(tmp_path):
    root = _visa_fixture(tmp_path / "visa")
    assert detect_layout(root) == "visa"
    test = read_visa(root, split="test")
    assert len(test) == 6 and sum(r.label for r in test) == 4
    assert read_visa(root, split="train", categories=["pcb1"]).categories == ["pcb1"]
    assert len(read_visa(root, split="train")) == 4
    assert len(read_visa(root, split="all")) == 10
    anomalous = [r for r in test if r.label]
    _, mask = load_record(anomalous[0])
    assert mask.sum() == 5 * 10 + 5 * 10  # values 1 and 3 both count (threshold > 0)
    ds = open_dataset(root, image_size=48)
    i = [k for k, r in enumerate(ds.records) if r.label][0]
    assert ds[i]["mask"].sum() > 0 and set(torch.unique(ds[i]["mask"]).tolist()) == {0.0, 1.0}
    # without the CSV the folders are read; everything is a test image
    (root / "split_csv" / "1cls.csv").unlink()
    (root / "split_csv").rmdir()
    folders = read_visa(root)
    assert len(folders) == 10 and sum(r.label for r in folders) == 4
    assert all(r.split == "test" for r in folders)


def test_folder_reader_with_and_without_masks(tmp_path):
    root = tmp_path / "custom"
    _png(root / "good" / "a.png", _rgb())
    _png(root / "good" / "b.jpg", _rgb(seed=1))
    _png(root / "bad" / "c.png", _rgb(seed=2))
    _png(root / "bad" / "scratch" / "d.png", _rgb(seed=3))
    _png(root / "masks" / "c.bmp", _mask())           # any extension, same stem
    _png(root / "masks" / "d_mask.png", _mask())
    recs = read_folder(root, class_name="screw")
    assert detect_layout(root) == "folder"
    assert sorted((Path(r.img_path).name, r.label) for r in recs) == [("a.png", 0), ("b.jpg", 0),
                                                                      ("c.png", 1), ("d.png", 1)]
    assert {r.specie for r in recs if r.label} == {"anomaly", "scratch"}
    assert all(r.has_mask for r in recs) and all(r.class_name == "screw" for r in recs)

    nomask = tmp_path / "nomask"
    _png(nomask / "good" / "a.png", _rgb())
    _png(nomask / "anomaly" / "b.png", _rgb(seed=1))
    recs = read_folder(nomask)
    bad = [r for r in recs if r.label][0]
    assert bad.mask_path is None and not bad.has_mask
    ds = AnomalyDataset(recs, image_size=16)
    items = {it["label"]: it for it in (ds[0], ds[1])}
    assert torch.isnan(items[1]["mask"]).all() and items[1]["has_mask"] is False
    assert items[0]["mask"].sum() == 0 and items[0]["has_mask"] is True
    assert not ds.has_masks
    assert "image-level" in check_dataset(nomask).format()


def test_btad_and_isic_naming_conventions(tmp_path):
    from bpfl.data import BTAD_CLASS_NAMES
    root = tmp_path / "btad"
    _png(root / "01" / "train" / "ok" / "0000.bmp", _rgb())
    _png(root / "01" / "test" / "ok" / "0001.bmp", _rgb(seed=1))
    _png(root / "01" / "test" / "ko" / "0002.bmp", _rgb(seed=2))
    _png(root / "01" / "ground_truth" / "ko" / "0002.png", _mask())
    recs = read_mvtec(root, split="all", rename=BTAD_CLASS_NAMES, dataset="BTAD")
    assert [(r.label, r.split) for r in recs] == [(0, "train"), (1, "test"), (0, "test")]
    assert recs.categories == ["metal1"] and recs[1].mask_path.endswith("0002.png")
    isic = tmp_path / "ISIC2016"
    _png(isic / "images" / "ISIC_0000001.jpg", _rgb())
    _png(isic / "masks" / "ISIC_0000001_Segmentation.png", _mask())
    recs = read_segmentation_only(isic)
    assert len(recs) == 1 and recs[0].class_name == "skin" and recs[0].mask_path.endswith("_Segmentation.png")


def test_image_modes_become_rgb_and_normalised(tmp_path):
    grey16 = np.full((8, 8), 65535, np.uint16)
    grey16[:, :4] = 257 * 100
    p16 = tmp_path / "g16.png"
    Image.fromarray(grey16).save(p16)
    assert Image.open(p16).mode.startswith("I")
    t = load_image(p16, size=None, normalize=False)
    assert t.shape == (3, 8, 8)
    assert torch.allclose(t[:, 0, 7], torch.ones(3)) and torch.allclose(t[:, 0, 0], torch.full((3,), 100 / 255))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    _png(tmp_path / "a.png", rgba, "RGBA")
    p = Image.fromarray(_rgb(8, 8)).convert("P")
    p.save(tmp_path / "p.png")
    _png(tmp_path / "l.png", np.full((8, 8), 128, np.uint8))
    for name in ("a.png", "p.png", "l.png"):
        assert load_image(tmp_path / name, size=12).shape == (3, 12, 12)
    white = _png(tmp_path / "w.png", np.full((4, 4, 3), 255, np.uint8))
    x = load_image(white, size=4)
    expect = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(x[:, 0, 0], expect, atol=1e-5)
    # masks of any mode -> {0, 1}; JPEG masks use > 127
    _png(tmp_path / "m_rgb.png", np.stack([_mask()] * 3, axis=2))
    assert load_mask(tmp_path / "m_rgb.png", size=None).sum() == 10 * 18
    noisy = _mask()
    noisy[0, 0] = 40
    Image.fromarray(noisy).save(tmp_path / "m.jpg", quality=100)
    m = load_mask(tmp_path / "m.jpg", size=None)
    assert m[0, 0] == 0 and m[15, 20] == 1


# ------------------------------------------------------------------------------------------------
# bad input: each raises a DatasetError naming the file, or is skipped and counted
# ------------------------------------------------------------------------------------------------
def test_wrong_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="nowhere"):
        open_dataset(missing)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as e:
        open_dataset(tmp_path / "stuff")
    assert str(tmp_path / "stuff") in str(e.value) and "layout" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_image_at_load_time_names_the_file(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    ds = open_dataset(root, image_size=16)
    victim = ds.records[0].img_path
    Path(victim).unlink()
    with pytest.raises(DatasetError, match=victim):
        ds[0]


def test_unreadable_image_names_the_file(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    ds = open_dataset(root, image_size=16)
    victim = ds.records[1].img_path
    Path(victim).write_bytes(b"this is not a png")
    with pytest.raises(DatasetError, match=victim):
        ds[1]


def test_truncated_image_names_the_file_and_skip_bad_counts_it(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    victim = root / "widget" / "test" / "crack" / "001.png"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    ds = open_dataset(root, image_size=16)
    i = [k for k, r in enumerate(ds.records) if r.img_path == str(victim)][0]
    with pytest.raises(DatasetError, match=str(victim)):
        ds[i]
    with pytest.warns(DatasetWarning, match="001.png"):
        ds2 = open_dataset(root, image_size=16, skip_bad=True)
    assert len(ds2) == len(ds) - 1 and sum(ds2.skipped.values()) == 1


def test_mask_of_other_size_names_mask_and_image(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    m = root / "widget" / "ground_truth" / "crack" / "000_mask.png"
    _png(m, _mask(20, 24))
    ds = open_dataset(root, image_size=16)
    i = [k for k, r in enumerate(ds.records) if r.mask_path == str(m)][0]
    with pytest.raises(DatasetError) as e:
        ds[i]
    assert str(m) in str(e.value) and ds.records[i].img_path in str(e.value)


def test_anomalous_image_without_mask_names_it_and_skip_counts(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    (root / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    img = root / "widget" / "test" / "crack" / "001.png"
    with pytest.raises(DatasetError, match=str(img)):
        read_mvtec(root)
    with pytest.warns(DatasetWarning):
        recs = read_mvtec(root, skip_bad=True)
    assert len(recs) == 3 and recs.skipped["missing mask"] == 1
    assert str(img) not in [r.img_path for r in recs]


def test_mask_for_good_image_names_the_mask(tmp_path):
    root = tmp_path / "custom"
    _png(root / "good" / "a.png", _rgb())
    _png(root / "bad" / "b.png", _rgb(seed=1))
    _png(root / "masks" / "b.png", _mask())
    _png(root / "masks" / "a.png", _mask())
    with pytest.raises(DatasetError, match=str(root / "masks" / "a.png")):
        read_folder(root)
    mv = _mini_mvtec(tmp_path / "mv")
    _png(mv / "widget" / "ground_truth" / "good" / "000_mask.png", _mask())
    with pytest.raises(DatasetError, match="good"):
        read_mvtec(mv)


def test_empty_category_names_the_folder(tmp_path):
    root = _mini_mvtec(tmp_path / "mv", cats=("widget", "gadget"))
    for p in (root / "gadget" / "test").rglob("*.png"):
        p.unlink()
    for p in (root / "gadget" / "ground_truth").rglob("*.png"):
        p.unlink()
    with pytest.raises(DatasetError) as e:
        read_mvtec(root)
    assert str(root / "gadget") in str(e.value) and "no images" in str(e.value)
    with pytest.warns(DatasetWarning):
        recs = read_mvtec(root, skip_bad=True)
    assert recs.categories == ["widget"] and recs.skipped["empty category"] == 1
    with pytest.raises(DatasetError, match="unknown categor"):
        read_mvtec(root, categories=["nope"])


def test_meta_json_pointing_at_missing_files(tmp_path):
    root = _mini_mvtec(tmp_path / "mv")
    recs = read_mvtec(root, split="all")
    write_meta_json(recs, root, "mv")
    gone = root / "widget" / "test" / "good" / "001.png"
    gone.unlink()
    with pytest.raises(DatasetError, match=str(gone)):
        read_meta_json(root, "mv")
    with pytest.raises(DatasetError, match="case-sensitive"):
        read_meta_json(root, "MV")
    (root / "meta_bad.json").write_text("{not json")
    with pytest.raises(DatasetError, match="meta_bad.json"):
        read_meta_json(root, "bad")


def test_check_dataset_reports_every_problem_at_once(tmp_path):
    root = _mini_mvtec(tmp_path / "mv", n_bad=3)
    report = check_dataset(root)
    assert report.ok and report.n_images == 7 and report.categories == ["widget"]
    assert "OK" in report.format()
    (root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()          # missing mask
    _png(root / "widget" / "ground_truth" / "crack" / "001_mask.png", _mask(10, 10))  # size mismatch
    trunc = root / "widget" / "train" / "good" / "000.png"
    trunc.write_bytes(trunc.read_bytes()[:60])                                         # truncated
    report = check_dataset(root)
    assert not report.ok and len(report.problems) == 3
    text = report.format()
    for p in ("crack/000.png", "001_mask.png", str(trunc)):
        assert p in text
    bad = check_dataset(tmp_path / "nowhere")
    assert not bad.ok and "nowhere" in bad.format()


# ------------------------------------------------------------------------------------------------
# meta.json round trip
# ------------------------------------------------------------------------------------------------
def test_meta_json_round_trip(tmp_path):
    root = _mini_mvtec(tmp_path / "mv", cats=("widget", "gadget"))
    for c in ("gadget",):  # a category without training images gets the authors' placeholder
        for p in (root / c / "train").rglob("*.png"):
            p.unlink()
    recs = read_mvtec(root, split="all", dataset="mv")
    path = write_meta_json(recs, root, "mv")
    meta = json.loads(path.read_text())
    assert set(meta) == {"train", "test"} and list(meta["test"]) == ["gadget", "widget"]
    assert meta["train"]["gadget"][0]["img_path"] == ""
    bad = [r for r in meta["test"]["widget"] if r["anomaly"] == 1]
    good = [r for r in meta["test"]["widget"] if r["anomaly"] == 0]
    assert len(bad) == 2 and all(r["mask_path"] and not r["img_path"].startswith("/") for r in bad)
    assert all(r["mask_path"] == "" and r["specie_name"] == "good" for r in good)
    back = read_meta_json(root, "mv", split="all")
    assert sorted(back, key=lambda r: r.img_path) == sorted(recs, key=lambda r: r.img_path)
    assert detect_layout(root) == "meta"
    assert len(read_meta_json(root, "mv", split="train")) == 2

    seg = tmp_path / "seg"
    _png(seg / "images" / "x.png", _rgb())
    _png(seg / "masks" / "x.png", _mask())
    recs = read_segmentation_only(seg, class_name="colon")
    write_meta_json(recs, seg)
    assert list(read_meta_json(seg)) == list(recs)


def test_record_is_plain_data():
    r = Record("a.png", None, 0, "bottle")
    assert r.has_mask and r.to_dict()["class_name"] == "bottle"
    assert not Record("a.png", None, 1, "bottle").has_mask
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert AnomalyDataset([r], image_size=8).categories == ["bottle"]
