"""The offline synthetic dataset: determinism, masks, groups, speed (bpfl.data.synthetic)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bpfl.data import (
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_GROUPS,
    SYNTHETIC_PRESETS,
    TEXTURES,
    DatasetError,
    check_dataset,
    class_word,
    make_synthetic_dataset,
    open_dataset,
    perlin,
    perlin_mask,
    read_meta_json,
    read_mvtec,
)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "a"
    make_synthetic_dataset(root, seed=0, preset="tiny")
    return root


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tiny, tmp_path):
    make_synthetic_dataset(tmp_path / "b", seed=0, preset="tiny")
    a, b = _files(tiny), _files(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 60
    assert all(a[k] == b[k] for k in a)
    make_synthetic_dataset(tmp_path / "c", seed=1, preset="tiny")
    c = _files(tmp_path / "c")
    pngs = [k for k in a if k.endswith(".png") and "/ground_truth/" not in k]
    assert c.keys() == a.keys()
    assert sum(a[k] != c[k] for k in pngs) == len(pngs)  # every image differs


def test_layout_counts_and_meta(tiny):
    p = SYNTHETIC_PRESETS["tiny"]
    per_cat = p["n_train_good"] + p["n_test_good"] + p["n_test_anomalous"]
    for cat in SYNTHETIC_CATEGORIES:
        assert len(list((tiny / cat / "train" / "good").glob("*.png"))) == p["n_train_good"]
        assert len(list((tiny / cat / "test" / "good").glob("*.png"))) == p["n_test_good"]
        assert not (tiny / cat / "ground_truth" / "good").exists()
        with Image.open(tiny / cat / "train" / "good" / "000.png") as im:
            assert im.size == (p["image_size"],) * 2 and im.mode == "RGB"
    meta = read_meta_json(tiny, split="all")
    mv = read_mvtec(tiny, split="all", dataset="synthetic")
    assert len(meta) == len(SYNTHETIC_CATEGORIES) * per_cat
    assert sorted(meta, key=lambda r: r.img_path) == sorted(mv, key=lambda r: r.img_path)
    assert check_dataset(tiny).ok


def test_anomaly_masks_are_exact_and_within_area_bounds(tiny):
    recs = read_meta_json(tiny, split="all")
    anomalous = [r for r in recs if r.label == 1]
    assert len(anomalous) == len(SYNTHETIC_CATEGORIES) * SYNTHETIC_PRESETS["tiny"]["n_test_anomalous"]
    assert all(r.mask_path is None for r in recs if r.label == 0)
    assert {r.specie for r in anomalous} == {"color", "contamination", "distortion"}
    for r in anomalous:
        m = np.asarray(Image.open(r.mask_path))
        assert set(np.unique(m)) <= {0, 255}
        frac = (m > 0).mean()
        assert 0.002 <= frac <= 0.25, (r.mask_path, frac)
        img = np.asarray(Image.open(r.img_path), np.float32)
        assert img.shape[:2] == m.shape
    ds = open_dataset(tiny, image_size=64)
    item = ds[[i for i, r in enumerate(ds.records) if r.label][0]]
    assert item["has_mask"] and 0 < item["mask"].mean() <= 0.3


def test_anomalies_change_the_masked_pixels(tmp_path):
    root = tmp_path / "s"
    recs = make_synthetic_dataset(root, seed=3, categories=["marble", "grass"], n_train_good=0,
                                  n_test_good=1, n_test_anomalous=6, image_size=64)
    goods = {r.class_name: np.asarray(Image.open(r.img_path), np.float32) / 255
             for r in recs if r.label == 0}
    for r in (r for r in recs if r.label):
        img = np.asarray(Image.open(r.img_path), np.float32) / 255
        m = np.asarray(Image.open(r.mask_path)) > 0
        # inside the mask the local texture statistics differ from a normal image of the class
        inside, ref = img[m], goods[r.class_name].reshape(-1, 3)
        assert np.abs(inside.mean(0) - ref.mean(0)).max() > 0.02 or inside.std() > 1.5 * ref.std() \
            or inside.std() < 0.67 * ref.std()


def test_groups_are_disjoint_english_and_complete():
    seen, unseen = SYNTHETIC_GROUPS["seen"], SYNTHETIC_GROUPS["unseen"]
    assert len(seen) >= 3 and len(unseen) >= 3 and not set(seen) & set(unseen)
    assert set(seen) | set(unseen) <= set(TEXTURES) == set(SYNTHETIC_CATEGORIES)
    assert class_word("woven_fabric") == "woven fabric" and class_word("brick") == "brick"
    assert all("_" not in class_word(c) for c in SYNTHETIC_CATEGORIES)
    assert class_word("Metal_Nut") == "metal nut" and class_word("pcb3") == "printed circuit board"
    assert class_word("chewinggum") == "chewing gum" and class_word("Metal15") == "metal15"


def test_group_name_and_refusal_of_foreign_folders(tmp_path):
    recs = make_synthetic_dataset(tmp_path / "g", categories="unseen", preset="tiny", n_train_good=0,
                                  n_test_good=1, n_test_anomalous=1)
    assert recs.categories == SYNTHETIC_GROUPS["unseen"]
    # regenerating in place replaces the old categories (no stale files left behind)
    make_synthetic_dataset(tmp_path / "g", categories=["brick"], preset="tiny", n_train_good=0,
                           n_test_good=1, n_test_anomalous=1)
    assert sorted(p.name for p in (tmp_path / "g").iterdir() if p.is_dir()) == ["brick"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DatasetError, match="mine"):
        make_synthetic_dataset(tmp_path / "mine", preset="tiny")
    with pytest.raises(DatasetError, match="unknown synthetic"):
        make_synthetic_dataset(tmp_path / "x", categories=["lava"])


def test_perlin_is_vectorised_bounded_and_seeded():
    a = perlin((64, 80), (4, 2), np.random.default_rng(0), angle=30, octaves=3)
    b = perlin((64, 80), (4, 2), np.random.default_rng(0), angle=30, octaves=3)
    assert a.shape == (64, 80) and np.array_equal(a, b)
    assert np.abs(a).max() <= 1.5 and a.std() > 0.05
    rng = np.random.default_rng(1)
    fracs = [perlin_mask((64, 64), rng).mean() for _ in range(30)]
    assert min(fracs) >= 0.002 and max(fracs) <= 0.25


def test_default_size_generates_in_seconds(tmp_path):
    t = time.perf_counter()
    recs = make_synthetic_dataset(tmp_path / "d", seed=0)
    dt = time.perf_counter() - t
    p = SYNTHETIC_PRESETS["default"]
    n = len(SYNTHETIC_CATEGORIES) * (p["n_train_good"] + p["n_test_good"] + p["n_test_anomalous"])
    print(f"\nsynthetic default preset: {n} images at {p['image_size']} px in {dt:.1f} s")
    assert len(recs) == n and n >= 200
    assert dt < 60
