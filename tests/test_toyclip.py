"""The toy CLIP (issue 9): caption-image generator, pretraining loss, checkpoint round-trip and resume."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from bpfl.toyclip import (
    DEFAULT_HELD_OUT,
    DEFECT_KINDS,
    FAMILIES,
    HELD_OUT_WORDS,
    consistency_matrix,
    default_toy_clip_path,
    ensure_toy_clip,
    pretrain_toy_clip,
    toy_sample,
    toy_stream,
)
from bpfl.toyclip import generator as G
from bpfl.toyclip import pretrain as P

SIZE = 32  # tiny images keep the tests fast (a 4 x 4 patch grid for bpfl-toy)
N = 120


@pytest.fixture(scope="module")
def samples():
    return [toy_sample(0, i, SIZE) for i in range(N)]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# ------------------------------------------------------------------------------------------ generator
def test_same_seed_same_samples_other_seed_differs(samples):
    again = list(toy_stream(0, SIZE, start=0, stop=8))
    for a, b in zip(samples[:8], again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.text == b.text
    other = [toy_sample(1, i, SIZE) for i in range(8)]
    assert sum(np.array_equal(a.image, b.image) for a, b in zip(samples[:8], other)) == 0
    assert [s.text for s in other] != [s.text for s in samples[:8]]
    s = samples[0]
    assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.float32
    assert 0.0 <= s.image.min() and s.image.max() <= 1.0 and s.mask.shape == (SIZE, SIZE) and s.mask.dtype == bool


def test_captions_match_what_was_drawn(samples):
    normal_words = set(G.NORMAL_ADJECTIVES) | {w for p in G.NORMAL_PHRASES for w in p.split()}
    defect_words = set(G.DEFECT_ADJECTIVES) | {"defect", "damage"}
    kind_words = {k: set(d.adjectives) | {p.split()[-1] for p in d.phrases} for k, d in DEFECT_KINDS.items()}
    all_kind_words = set().union(*kind_words.values())
    n_defect = n_state = 0
    for s in samples:
        words = _words(s.text)
        assert s.mask.any() == (s.defect is not None), (s.text, s.defect)
        assert (s.mask_soft > 0).any() == (s.defect is not None)
        n_defect += s.defect is not None
        c = s.caption
        if c.state is None:  # material-only caption: no state word at all
            assert not words & (normal_words | defect_words | all_kind_words), s.text
        else:
            n_state += 1
            if s.defect is None:
                assert c.state == "normal" and words & set(G.NORMAL_ADJECTIVES + ("defects", "damage")), s.text
                assert not words & (set(G.DEFECT_ADJECTIVES) | all_kind_words), s.text
            else:
                assert c.state in (s.defect, "defect")
                expected = kind_words[s.defect] if c.state == s.defect else defect_words
                assert words & expected, (s.text, s.defect)
                assert not words & set(G.NORMAL_ADJECTIVES), s.text
        fam_words = set(FAMILIES[s.family].word.split())
        assert fam_words.issubset(words) == (c.family is not None), s.text
        if c.family is not None:
            assert c.family == s.family and fam_words <= words
        if c.colour is not None:
            assert c.colour == s.colour and s.colour in words
        other_colours = set(G.COLOURS) - {s.colour}
        assert not words & other_colours, s.text  # no wrong colour word
        assert G.caption_consistent(c, s.family, s.colour, s.defect)
    assert 0.3 * N < n_defect < 0.7 * N and n_state > 0.5 * N  # p_defect = 0.5, most captions name a state


def test_held_out_families_and_words_never_appear(samples, monkeypatch):
    assert set(DEFAULT_HELD_OUT) == {"weave", "fibre", "grass", "gravel"}
    assert {"woven", "fabric", "fibre", "grass", "gravel"} <= HELD_OUT_WORDS
    for s in samples:
        assert s.family not in DEFAULT_HELD_OUT
        assert not _words(s.text) & HELD_OUT_WORDS, s.text
    # foreign-texture defects are filled from allowed families only
    drawn = []
    real = G.render_surface
    monkeypatch.setattr(G, "render_surface", lambda fam, *a, **k: drawn.append(fam) or real(fam, *a, **k))
    for i in range(20):
        toy_sample(3, i, SIZE, defects=["contamination"], p_defect=1.0)
    assert len(drawn) >= 40 and not set(drawn) & set(DEFAULT_HELD_OUT)
    # the held-out set is a parameter: holding out stripes removes them (and only they are dropped)
    fams = {toy_sample(0, i, SIZE, held_out=("striped",)).family for i in range(300)}
    assert "striped" not in fams and "grass" in fams
    with pytest.raises(ValueError):
        toy_sample(0, 0, SIZE, held_out=("no_such_family",))


def test_consistency_matrix_semantics(samples):
    C = consistency_matrix(samples[:24])
    assert C.diagonal().all()
    for i, si in enumerate(samples[:24]):
        for j, sj in enumerate(samples[:24]):
            c = sj.caption
            if c.state == "normal" and si.defect is not None:
                assert not C[i, j]
            if c.family is not None and c.family != si.family:
                assert not C[i, j]


# ------------------------------------------------------------------------------------------ pretraining
def _settings(**kw):
    base = dict(batch_size=8, image_size=SIZE, steps=4, warmup=1)
    base.update(kw)
    return P.PretrainSettings(**base)


def test_a_few_steps_lower_the_contrastive_loss():
    torch.manual_seed(0)
    s = _settings()
    clip, probes, tok = P.build_toy_model(s)
    batch = P.make_batch(s, 0)
    opt = torch.optim.AdamW(list(clip.parameters()) + list(probes.parameters()), lr=2e-3)

    def losses():
        return P.pretrain_losses(clip, probes, tok, batch, s, np.random.default_rng(0))
    with torch.no_grad():
        first = {k: float(v) for k, v in losses().items()}
    for _ in range(20):
        opt.zero_grad()
        losses()["total"].backward()
        opt.step()
    with torch.no_grad():
        last = {k: float(v) for k, v in losses().items()}
    # multi-positive targets: the loss cannot go below the entropy of the target distributions
    pos = batch["consistent"].float()
    ent = lambda t: float(-(t * torch.log(t.clamp_min(1e-12))).sum(1).mean())  # noqa: E731
    floor = 0.5 * (ent(pos / pos.sum(1, keepdim=True)) + ent((pos / pos.sum(0, keepdim=True)).t()))
    assert np.isfinite(first["total"]) and first["clip"] > floor + 0.5
    assert last["clip"] - floor < 0.8 * (first["clip"] - floor), (floor, first, last)
    assert last["clip"] < first["clip"] - 0.25, (floor, first, last)
    assert last["dense"] < first["dense"], (first, last)


def test_checkpoint_roundtrip_local_dir_and_resume(tmp_path):
    from bpfl.backbone import load_backbone

    kw = dict(steps=4, batch_size=4, image_size=SIZE, progress=False, warmup=1, checkpoint_every=1)
    full = pretrain_toy_clip(tmp_path / "full.pt", **kw)
    assert full.finished and full.path.is_file() and full.steps_done == 4
    sd = torch.load(full.path, weights_only=True)
    assert "visual.conv1.weight" in sd and "logit_scale" in sd  # a plain open_clip state dict
    meta = json.loads(full.path.with_suffix(".json").read_text())
    assert meta["settings"]["held_out_families"] == list(DEFAULT_HELD_OUT) and meta["peak_rss_mb"] > 0
    assert not P.train_state_path(full.path).exists()  # training state removed once finished

    bb = load_backbone("bpfl-toy", pretrained=str(full.path), image_size=SIZE, layers=P.toy_layers(), device="cpu")
    for k, v in bb.clip.state_dict().items():
        if k in sd:
            torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    big = load_backbone("bpfl-toy", pretrained=str(full.path), image_size=112, layers=P.toy_layers(), device="cpu")
    assert big.grid_size == (14, 14)  # positional embedding resized from the 4 x 4 pretraining grid
    torch.testing.assert_close(big.clip.visual.conv1.weight, sd["visual.conv1.weight"], rtol=0, atol=0)
    ld = load_backbone(f"local-dir:{full.local_dir}", pretrained=None, image_size=SIZE, layers=P.toy_layers(),
                       device="cpu")
    torch.testing.assert_close(ld.encode_text(["a photo of a damaged surface."]),
                               bb.encode_text(["a photo of a damaged surface."]))

    # interrupted after 2 steps, then resumed: same weights as the uninterrupted run
    part = pretrain_toy_clip(tmp_path / "resumed.pt", stop_at=2, **kw)
    assert not part.finished and part.path is None and part.steps_done == 2
    state = torch.load(P.train_state_path(tmp_path / "resumed.pt"), weights_only=True)
    assert state["step"] == 2
    with pytest.raises(ValueError, match="other settings"):
        pretrain_toy_clip(tmp_path / "resumed.pt", **{**kw, "batch_size": 5})
    done = pretrain_toy_clip(tmp_path / "resumed.pt", resume=True, **kw)
    assert done.finished and done.steps_done == 4 and [h["step"] for h in done.history][-1] == 4
    sd2 = torch.load(done.path, weights_only=True)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=1e-5, atol=1e-6, msg=k)
    # a finished checkpoint with the same settings is not rebuilt
    again = pretrain_toy_clip(tmp_path / "resumed.pt", resume=True, **kw)
    assert again.finished and again.path == done.path


def test_final_phase_at_a_larger_size_grows_the_grid_and_resumes_exactly(tmp_path):
    from bpfl.backbone import load_backbone

    big = 2 * SIZE
    kw = dict(steps=4, batch_size=4, image_size=SIZE, final_image_size=big, final_steps=2, progress=False, warmup=1,
              checkpoint_every=1)
    s = P.PretrainSettings(steps=4, batch_size=4, image_size=SIZE, final_image_size=big, final_steps=2)
    assert [P.image_size_at(s, i) for i in range(4)] == [SIZE, SIZE, big, big]
    assert P.make_batch(s, 1)["image"].shape[-1] == SIZE and P.make_batch(s, 2)["image"].shape[-1] == big
    full = pretrain_toy_clip(tmp_path / "full.pt", **kw)
    sd = torch.load(full.path, weights_only=True)
    assert sd["visual.positional_embedding"].shape[0] == (big // 8) ** 2 + 1  # laid out for the final size
    cfg = json.loads((full.local_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == big
    bb = load_backbone("bpfl-toy", pretrained=str(full.path), image_size=112, layers=P.toy_layers(), device="cpu")
    assert bb.grid_size == (14, 14)
    # interrupted inside the final phase, then resumed: the same weights
    pretrain_toy_clip(tmp_path / "part.pt", stop_at=3, **kw)
    done = pretrain_toy_clip(tmp_path / "part.pt", resume=True, **kw)
    sd2 = torch.load(done.path, weights_only=True)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=1e-5, atol=1e-6, msg=k)


def test_grow_image_size_moves_the_parameter_and_its_optimizer_state():
    from open_clip.model import resize_pos_embed

    s = _settings()
    clip, probes, tok = P.build_toy_model(s)
    opt = torch.optim.AdamW(list(clip.parameters()), lr=1e-2)
    P.pretrain_losses(clip, probes, tok, P.make_batch(s, 0), s, np.random.default_rng(0))["total"].backward()
    opt.step()
    old = clip.visual.positional_embedding
    m_old = opt.state[old]["exp_avg"].clone()
    P.grow_image_size(clip, 2 * SIZE, opt)
    new = clip.visual.positional_embedding
    assert new is not old and new.shape == ((2 * SIZE // 8) ** 2 + 1, old.shape[1]) and clip.visual.grid_size == (8, 8)
    assert any(q is new for g in opt.param_groups for q in g["params"]) and old not in opt.state
    ref = {"visual.positional_embedding": old.detach().clone()}
    resize_pos_embed(ref, clip)  # open_clip's own resize, against the grown model
    torch.testing.assert_close(new.detach(), ref["visual.positional_embedding"])
    torch.testing.assert_close(new.detach()[0], old.detach()[0])  # the class token's row is kept
    ref_m = {"visual.positional_embedding": m_old}
    resize_pos_embed(ref_m, clip)
    torch.testing.assert_close(opt.state[new]["exp_avg"], ref_m["visual.positional_embedding"])
    assert float(opt.state[new]["exp_avg_sq"].min()) >= 0
    # training goes on at the new size and updates the new parameter
    s2 = _settings(image_size=2 * SIZE)
    opt.zero_grad()
    P.pretrain_losses(clip, probes, tok, P.make_batch(s2, 1), s2, np.random.default_rng(1))["total"].backward()
    before = new.detach().clone()
    opt.step()
    assert not torch.equal(before, new.detach())


def test_background_batch_generation_gives_the_same_weights(tmp_path):
    kw = dict(steps=2, batch_size=4, image_size=SIZE, progress=False, warmup=1, checkpoint_every=0, local_dir=False)
    a = pretrain_toy_clip(tmp_path / "inline.pt", workers=0, **kw)
    b = pretrain_toy_clip(tmp_path / "worker.pt", workers=1, **kw)
    sa, sb = torch.load(a.path, weights_only=True), torch.load(b.path, weights_only=True)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)
    assert [h["clip"] for h in a.history] == [h["clip"] for h in b.history]


def test_default_path_ensure_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFL_CACHE", str(tmp_path / "cache"))
    p = default_toy_clip_path()
    assert p == tmp_path / "cache" / "toyclip" / "bpfl-toy-seed0.pt"
    assert ensure_toy_clip() is None
    assert P.main(["--out", str(p), "--steps", "2", "--batch-size", "4", "--image-size", str(SIZE),
                   "--no-progress", "--checkpoint-every", "0"]) == 0
    with pytest.warns(UserWarning, match="another recipe"):  # 2 steps of 4 images: not the default recipe
        assert ensure_toy_clip() == p and p.is_file()
    over = P.toy_bayespfl_overrides(p)
    assert over["backbone"] == "bpfl-toy" and over["image_size"] == 112 and len(over["layers"]) == 4
    # the CLI's defaults are the recipe's: only the settings given on the command line differ from it
    assert P.recipe_differences(p) == {"steps": (2, P.DEFAULT_STEPS), "batch_size": (4, P.DEFAULT_BATCH),
                                       "image_size": (SIZE, P.TOY_PRETRAIN_SIZE)}


def test_a_toy_clip_built_with_an_older_recipe_is_used_with_a_warning(tmp_path, monkeypatch):
    """A checkpoint from an older default (dense weight 1) is still found, and the user is told how to rebuild."""
    import json
    import warnings

    monkeypatch.setenv("BPFL_CACHE", str(tmp_path / "cache"))
    p = default_toy_clip_path()
    p.parent.mkdir(parents=True)
    p.write_bytes(b"weights")
    assert P.recipe_differences(p) == {}  # no .json record: nothing to compare
    settings = P.PretrainSettings().to_dict()
    p.with_suffix(".json").write_text(json.dumps({"settings": settings}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ensure_toy_clip() == p  # today's recipe: no warning
    p.with_suffix(".json").write_text(json.dumps({"settings": {**settings, "dense_weight": 1.0, "seed": 3}}))
    assert P.recipe_differences(p) == {"dense_weight": (1.0, P.DEFAULT_DENSE_WEIGHT)}  # the seed is no recipe
    with pytest.warns(UserWarning, match=r"dense_weight=1.0 \(default now 4.0\).*--no-resume"):
        assert ensure_toy_clip() == p


def test_stream_dataset_batches_are_the_stream():
    from torch.utils.data import DataLoader

    from bpfl.toyclip import ToyCaptionStream
    ds = ToyCaptionStream(seed=0, batch_size=3, image_size=SIZE, n_batches=2)
    batches = list(DataLoader(ds, batch_size=None))
    assert len(batches) == 2 and batches[1]["image"].shape == (3, 3, SIZE, SIZE)
    assert batches[1]["caption"] == [toy_sample(0, 3 + i, SIZE).text for i in range(3)]
    assert batches[0]["mask"].dtype == torch.bool and batches[0]["consistent"].diagonal().all()


def test_zero_shot_maps_shapes(tmp_path):
    from bpfl.backbone import load_backbone
    from bpfl.toyclip import zero_shot_maps
    torch.manual_seed(0)
    bb = load_backbone("bpfl-toy", None, image_size=SIZE, layers=P.toy_layers(), device="cpu")
    maps, scores = zero_shot_maps(bb, torch.randn(2, 3, SIZE, SIZE), class_names=["grass", "woven_fabric"])
    assert maps.shape == (2, SIZE, SIZE) and scores.shape == (2,)
    assert 0 <= float(maps.min()) and float(maps.max()) <= 1 and 0 <= float(scores.min()) <= float(scores.max()) <= 2


# ------------------------------------------------------------------------------------------ transfer pieces
def test_classical_map_is_affine_invariant_and_finds_a_planted_patch():
    from bpfl.metrics import roc_auc
    from bpfl.toyclip.transfer import classical_map

    rng = np.random.default_rng(0)
    img = (0.5 + 0.05 * rng.standard_normal((48, 48, 3))).astype(np.float32)
    mask = np.zeros((48, 48), bool)
    mask[20:28, 10:18] = True
    img[mask] += np.array([0.3, -0.2, 0.1], np.float32)  # a shifted colour: the local mean deviates there
    m = classical_map(img, 1.0)
    assert m.shape == (48, 48) and np.isfinite(m).all()
    assert roc_auc(mask.ravel(), m.ravel()) > 0.95
    # robust z-scores: a per-channel gain and offset leaves the map almost unchanged (up to the MAD floor 1e-3)
    m2 = classical_map(img * np.array([2.0, 0.7, 1.3], np.float32) + 0.1, 1.0)
    np.testing.assert_allclose(m2, m, rtol=0.1)
    assert np.corrcoef(m.ravel(), m2.ravel())[0, 1] > 0.999


def test_compare_backbones_trains_both_and_returns_table_and_maps(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from bpfl.data import make_synthetic_dataset
    from bpfl.toyclip.transfer import RANDOM_NAME, TOY_NAME, compare_backbones

    toy = pretrain_toy_clip(tmp_path / "toy.pt", steps=2, batch_size=4, image_size=SIZE, progress=False,
                            checkpoint_every=0).path
    root = tmp_path / "syn"
    make_synthetic_dataset(root, seed=0, preset="tiny")
    cmp = compare_backbones(toy, root, tmp_path / "runs", seeds=(0,), epochs=1, image_size=64, n_show=2)
    assert list(cmp.table.index[:2]) == [RANDOM_NAME, TOY_NAME] and cmp.table.index[2].startswith("classical")
    vals = cmp.table[["pixel AUROC", "image AUROC"]].to_numpy()
    assert np.isfinite(vals).all() and (vals >= 0).all() and (vals <= 1).all()
    assert set(cmp.rows.category) == {"grass", "gravel", "woven_fabric", "fibre"}
    assert cmp.n_test_images == sum(len(list((root / c / "test").rglob("*.png"))) for c in cmp.rows.category.unique())
    from bpfl.train import read_checkpoint
    for name in (RANDOM_NAME, TOY_NAME):
        assert len(cmp.maps[name]) == 2 and cmp.maps[name][0].shape == (64, 64)
        # the benchmark's learning rate unless overridden
        assert read_checkpoint(tmp_path / "runs" / f"{name}-seed0" / "last.pt")["config"]["lr"] == P.TOY_BAYESPFL_LR
    # different backbones, different maps
    assert not np.allclose(cmp.maps[RANDOM_NAME][0], cmp.maps[TOY_NAME][0])
    fig = cmp.figure()
    assert len(fig.axes) == 4 * 2


def test_loading_a_checkpoint_file_does_not_claim_random_weights(tmp_path, caplog):
    """open_clip logs "initialized randomly" while building the architecture; with a file it would be false. With
    random weights the kit says so itself (``is_random``, ``describe()``, the run notes), once, not on the root
    logger (a second stderr line before every error message)."""
    import logging

    from bpfl.backbone import load_backbone

    path = pretrain_toy_clip(tmp_path / "t.pt", steps=1, batch_size=2, image_size=SIZE, progress=False,
                             checkpoint_every=0).path
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_backbone("bpfl-toy", pretrained=str(path), image_size=SIZE, layers=P.toy_layers(), device="cpu")
    assert "initialized randomly" not in caplog.text
    with caplog.at_level(logging.WARNING):
        rnd = load_backbone("bpfl-toy", pretrained=None, image_size=SIZE, layers=P.toy_layers(), device="cpu")
    assert "initialized randomly" not in caplog.text
    assert rnd.is_random and "random weights" in rnd.describe()


def test_natural_family_draws_bundled_photos_but_never_the_held_out_ones():
    assert not {"grass", "gravel"} & set(G.PHOTO_SOURCES)
    imgs = [toy_sample(0, i, SIZE, families=["natural"]).image for i in range(6)]
    assert all(im.shape == (SIZE, SIZE, 3) and 0 <= im.min() and im.max() <= 1 for im in imgs)
    assert min(float(np.abs(a - b).mean()) for a, b in zip(imgs, imgs[1:])) > 0.01  # crops differ
    pat = G.p_natural(np.random.default_rng(0), SIZE)
    assert pat.shape == (SIZE, SIZE) and pat.min() >= 0 and pat.max() <= 1 and pat.std() > 0.05


def _explicit_resamples(g, draw, n_boot):
    """Brute force of the bootstraps' draws for one category's score rows ``g``: per replicate b the resampled
    image ids and their labels (multinomial counts drawn from ``draw``: anomalous images, then normal ones)."""
    ids = {lab: sorted(g[g.label == lab].path.unique()) for lab in (1, 0)}
    wa = draw.multinomial(len(ids[1]), np.full(len(ids[1]), 1 / len(ids[1])), size=n_boot)
    wn = draw.multinomial(len(ids[0]), np.full(len(ids[0]), 1 / len(ids[0])), size=n_boot)
    for b in range(n_boot):
        yield b, np.r_[np.repeat(ids[1], wa[b]), np.repeat(ids[0], wn[b])], np.r_[np.ones(wa[b].sum()),
                                                                                 np.zeros(wn[b].sum())]


def test_bootstrap_interval_matches_a_brute_force_resample():
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from bpfl.toyclip.transfer import bootstrap_image_auroc, summarize

    rng = np.random.default_rng(3)
    rows, per = [], []
    for cat, (na, nn) in {"a": (5, 4), "b": (3, 6)}.items():
        labels = np.r_[np.ones(na, int), np.zeros(nn, int)]
        for seed in (0, 1):
            sc = rng.normal(size=na + nn) + 0.8 * labels
            sc[0] = sc[-1]  # a tie between an anomalous and a normal image
            rows += [{"method": "m", "seed": seed, "test_set": "t", "category": cat, "path": f"{cat}{i}",
                      "label": int(labels[i]), "score": float(sc[i])} for i in range(na + nn)]
            per.append({"method": "m", "seed": seed, "category": cat, "pixel_auroc": 0.5,
                        "image_auroc": roc_auc_score(labels, sc)})
    scores = pd.DataFrame(rows)
    n_boot = 40
    ci = bootstrap_image_auroc(scores, n_boot=n_boot, seed=5).iloc[0]
    assert abs(ci.image_auroc - summarize(pd.DataFrame(per)).at["m", "image_auroc_mean"]) < 1e-12
    assert ci.n_images == 18 and ci.n_seeds == 2
    # brute force: the same multinomial draws (per category in order: anomalous, then normal), explicit resamples
    draw = np.random.default_rng(5)
    reps = np.zeros(n_boot)
    for _cat, g in scores.groupby("category", sort=False):
        for b, pick, lab in _explicit_resamples(g, draw, n_boot):
            for seed in (0, 1):
                sc = g[g.seed == seed].set_index("path").score
                reps[b] += roc_auc_score(lab, sc.loc[pick].to_numpy()) / 4
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert abs(ci.ci_low - lo) < 1e-12 and abs(ci.ci_high - hi) < 1e-12 and lo < ci.image_auroc < hi


def test_measured_table_summarises_the_committed_csv(tmp_path):
    from bpfl.toyclip.transfer import measured_table

    assert measured_table(tmp_path / "absent.csv") is None
    rows = [{"method": "m", "seed": s, "category": c, "pixel_auroc": p, "image_auroc": i}
            for s, (p, i) in enumerate([(0.8, 0.6), (0.9, 0.7)]) for c in ("a", "b")]
    import pandas as pd
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    t = measured_table(tmp_path / "t.csv")
    assert t.loc["m", "pixel AUROC"] == 0.85 and t.loc["m", "image AUROC"] == 0.65 and t.loc["m", "runs"] == 2
    assert abs(t.loc["m", "pixel ± (runs)"] - round(float(np.std([0.8, 0.9], ddof=1)), 3)) < 1e-9
    # two test sets: the large one is summarised by default, and the per-image scores beside it add an interval
    from bpfl.toyclip.transfer import DEFAULT_TEST_SET, LARGE_TEST_SET
    rows2 = [{**r, "test_set": LARGE_TEST_SET} for r in rows] + \
        [{**r, "test_set": DEFAULT_TEST_SET, "image_auroc": 0.1} for r in rows]
    pd.DataFrame(rows2).to_csv(tmp_path / "two.csv", index=False)
    assert measured_table(tmp_path / "two.csv").loc["m", "image AUROC"] == 0.65
    assert measured_table(tmp_path / "two.csv", DEFAULT_TEST_SET).loc["m", "image AUROC"] == 0.1
    scores = [{"method": "m", "seed": 0, "test_set": LARGE_TEST_SET, "category": "a", "path": f"p{i}",
               "label": i % 2, "score": float(i)} for i in range(10)]
    pd.DataFrame(scores).to_csv(tmp_path / "two_scores.csv", index=False)
    ci = measured_table(tmp_path / "two.csv").loc["m", "image 95% CI (test images)"]
    lo, hi = (float(x) for x in ci.split("-"))
    assert 0 <= lo <= 0.6 <= hi <= 1  # scores i, labels i % 2: AUROC 0.6 on these images


def test_readme_and_docs_quote_the_committed_transfer_table():
    """The toy-CLIP numbers in README.md and docs/toy_clip.md are those of benchmarks/results (issue 9)."""
    from pathlib import Path

    from bpfl.toyclip.transfer import RANDOM_NAME, TOY_NAME, measured_table

    root = Path(__file__).resolve().parents[1]
    t = measured_table(root / "benchmarks" / "results" / "toy_clip_transfer.csv")
    if t is None:
        pytest.skip("benchmarks/results/toy_clip_transfer.csv is absent")
    readme = (root / "README.md").read_text()
    docs = (root / "docs" / "toy_clip.md").read_text()
    for name in (RANDOM_NAME, TOY_NAME):
        for col in ("pixel AUROC", "image AUROC"):
            v = f"{t.loc[name, col]:.3f}"
            assert v in readme and v in docs, f"{name} {col} {v} is not quoted"
    ci = t.loc[TOY_NAME, "image 95% CI (test images)"]
    assert ci in readme and ci.replace("-", " – ") in docs
    met = t.loc[TOY_NAME, "image AUROC"] >= 0.85
    assert met or "not reached" in readme, "the image-AUROC target is not met: the README must say so"


def test_released_fusion_column_equals_evaluating_with_the_released_switch(tmp_path):
    """train_and_evaluate's image_auroc_released_fusion is what evaluate() gives under image_score="released"."""
    import dataclasses

    from bpfl.backbone import load_backbone
    from bpfl.data import SYNTHETIC_GROUPS, make_synthetic_dataset, open_dataset
    from bpfl.evaluate import evaluate
    from bpfl.toyclip.transfer import train_and_evaluate

    root = tmp_path / "syn"
    make_synthetic_dataset(root, seed=0, preset="tiny")
    train_ds = open_dataset(root, split="test", categories=SYNTHETIC_GROUPS["seen"], image_size=64)
    test_ds = open_dataset(root, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=64)
    torch.manual_seed(0)
    bb = load_backbone(P.TOY_ARCH, None, image_size=64, layers=P.toy_layers(P.TOY_ARCH))
    rows, scores, _, models = train_and_evaluate("m", bb, dict(backbone=P.TOY_ARCH, image_size=64,
                                                              layers=P.toy_layers(P.TOY_ARCH)),
                                                 train_ds, test_ds, [0], tmp_path / "runs", epochs=1)
    model = models[0]
    model.config = dataclasses.replace(model.config, image_score="released")
    res = evaluate(model, test_ds, seed=0, progress=False)
    fused = rows.set_index("category")["image_auroc_released_fusion"]
    assert set(fused.index) == set(res.per_category)
    for cat, r in res.per_category.items():
        assert abs(fused[cat] - r["image_auroc"]) < 1e-12, cat
    # the fusion is a different score from the paper's sum on at least one category (else the test shows nothing)
    paper = rows.set_index("category")["image_auroc"]
    assert not np.allclose(paper.to_numpy(), fused.loc[paper.index].to_numpy())


def test_runs_of_several_pretrainings_are_counted_and_summarised_apart():
    """With pretrain_seed, a run is (pretraining seed, training seed): two toy CLIPs x one seed = two runs."""
    import pandas as pd

    from bpfl.toyclip.transfer import bootstrap_image_auroc, run_ids, summarize

    rows = pd.DataFrame([{"method": "toy", "seed": 0, "pretrain_seed": ps, "category": c, "pixel_auroc": px,
                          "image_auroc": im} for ps, px, im in ((0, 0.8, 0.6), (1, 0.9, 0.8)) for c in "ab"]
                        + [{"method": "classical", "seed": 0, "pretrain_seed": np.nan, "category": c,
                            "pixel_auroc": 0.7, "image_auroc": 0.7} for c in "ab"])
    assert list(run_ids(rows)) == ["0/0", "0/0", "1/0", "1/0", "0", "0"]
    s = summarize(rows)
    assert s.at["toy", "n_seeds"] == 2 and s.at["classical", "n_seeds"] == 1
    assert abs(s.at["toy", "image_auroc_mean"] - 0.7) < 1e-12
    assert abs(s.at["toy", "image_auroc_std"] - np.std([0.6, 0.8], ddof=1)) < 1e-12
    # the bootstrap keeps the two pretrainings' scores of the same image apart (one column each)
    scores = pd.DataFrame([{"method": "toy", "seed": 0, "pretrain_seed": ps, "test_set": "t", "category": "a",
                            "path": f"p{i}", "label": i % 2, "score": float(i if ps == 0 else 10 * (i % 2))}
                           for ps in (0, 1) for i in range(6)])
    ci = bootstrap_image_auroc(scores, n_boot=50).iloc[0]
    # pretraining 0 ranks 6 of the 9 (anomalous, normal) pairs right, pretraining 1 all 9; averaging their scores
    # per image first would give 1.0
    assert ci.n_seeds == 2 and abs(ci.image_auroc - 0.5 * (6 / 9 + 1.0)) < 1e-12


def test_transfer_benchmark_runs_each_toy_clip_and_writes_the_tables(tmp_path):
    """benchmarks/toy_clip_transfer.py at smoke size, two toy CLIPs: rows per pretraining seed, runs counted."""
    import importlib.util
    import sys
    from pathlib import Path

    import pandas as pd

    from bpfl.data import make_synthetic_dataset
    from bpfl.toyclip.transfer import TOY_NAME, summarize

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_clip_transfer.py"
    spec = importlib.util.spec_from_file_location("toy_clip_transfer_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("toy_clip_transfer_bench", bench)
    spec.loader.exec_module(bench)
    toys = [pretrain_toy_clip(tmp_path / f"toy{s}.pt", seed=s, steps=2, batch_size=4, image_size=SIZE,
                              progress=False, checkpoint_every=0).path for s in (3, 5)]
    data = tmp_path / "syn"
    make_synthetic_dataset(data, seed=0, preset="tiny")
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--toy-clip", *map(str, toys), "--pretrain-seeds", "3", "5", "--seeds", "0",
                           "--epochs", "1", "--image-size", "64", "--test-good", "2", "--test-anomalous", "2",
                           "--skip-random", "--data", str(data), "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path / "out" / "t")]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = pd.read_csv(tmp_path / "out" / "t.csv")
    toy = rows[rows.method == TOY_NAME]
    assert set(toy.pretrain_seed) == {3, 5} and set(toy.test_set) == {"large", "default"}
    assert summarize(rows, "large").at[TOY_NAME, "n_seeds"] == 2
    scores = pd.read_csv(tmp_path / "out" / "t_scores.csv")
    assert len(scores[(scores.method == TOY_NAME) & (scores.test_set == "large")]) == 2 * 4 * (2 + 2)
    md = (tmp_path / "out" / "t.md").read_text()
    assert "## Per toy CLIP" in md and "pretraining seed 3" in md and "pretraining seed 5" in md
    assert "released fusion" in md
    configs = json.loads(md.split("```json")[1].split("```")[0])
    assert configs["toy CLIP"]["lr"] == P.TOY_BAYESPFL_LR  # the toy CLIP's Bayes-PFL learning rate


def test_bayes_pfl_on_the_toy_clip_uses_its_learning_rate_in_the_demo_and_the_benchmark(tmp_path):
    """toy_bayespfl_overrides, the demo and the transfer benchmark train Bayes-PFL on the toy CLIP at
    TOY_BAYESPFL_LR; the demo on a random backbone keeps the teaching preset's."""
    from bpfl.cli import main
    from bpfl.config import BayesPFLConfig

    assert P.TOY_BAYESPFL_LR != BayesPFLConfig.teaching().lr  # else this test shows nothing
    assert BayesPFLConfig.teaching(**P.toy_bayespfl_overrides(tmp_path / "t.pt")).lr == P.TOY_BAYESPFL_LR
    toy = pretrain_toy_clip(tmp_path / "toy.pt", seed=0, steps=2, batch_size=4, image_size=SIZE, progress=False,
                            checkpoint_every=0, local_dir=False).path
    common = ["demo", "--tiny", "--data", str(tmp_path / "data"), "--epochs", "1"]
    assert main([*common, "--backbone", P.TOY_ARCH, "--pretrained", str(toy), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["lr"] == P.TOY_BAYESPFL_LR
    assert main([*common, "--backbone", "bpfl-tiny", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["lr"] == BayesPFLConfig.teaching().lr


def test_paired_bootstrap_of_a_difference_matches_a_brute_force_resample():
    """bootstrap_image_auroc_difference: the same image draw for both methods (all their runs); brute force with
    scikit-learn on explicit resamples gives the same interval."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from bpfl.toyclip.transfer import bootstrap_image_auroc_difference, summarize

    rng = np.random.default_rng(7)
    rows, per = [], []
    for cat, (na, nn) in {"a": (4, 5), "b": (6, 3)}.items():
        labels = np.r_[np.ones(na, int), np.zeros(nn, int)]
        difficulty = rng.normal(size=na + nn)  # shared by both methods: what pairing cancels
        for method, seeds, gain in (("toy", (0, 1, 2), 1.2), ("classical", (0,), 0.6)):
            for seed in seeds:
                sc = difficulty + gain * labels + 0.3 * rng.normal(size=na + nn)
                rows += [{"method": method, "seed": seed, "test_set": "t", "category": cat, "path": f"{cat}{i}",
                          "label": int(labels[i]), "score": float(sc[i])} for i in range(na + nn)]
                per.append({"method": method, "seed": seed, "category": cat, "pixel_auroc": 0.5,
                            "image_auroc": roc_auc_score(labels, sc)})
    scores = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter
    n_boot = 30
    d = bootstrap_image_auroc_difference(scores, "toy", "classical", n_boot=n_boot, seed=4)
    s = summarize(pd.DataFrame(per))
    assert abs(d["difference"] - (s.at["toy", "image_auroc_mean"] - s.at["classical", "image_auroc_mean"])) < 1e-12
    draw = np.random.default_rng(4)
    reps = np.zeros(n_boot)
    for _cat, g in sorted(scores.groupby("category"), key=lambda kv: kv[0]):
        for b, pick, lab in _explicit_resamples(g, draw, n_boot):
            for method, sign in (("toy", 1), ("classical", -1)):
                runs = g[g.method == method]
                for seed in runs.seed.unique():
                    sc = runs[runs.seed == seed].set_index("path").score
                    reps[b] += sign * roc_auc_score(lab, sc.loc[pick].to_numpy()) / (2 * runs.seed.nunique())
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert abs(d["ci_low"] - lo) < 1e-12 and abs(d["ci_high"] - hi) < 1e-12 and lo < d["difference"] < hi
    with pytest.raises(ValueError, match="no scores of 'nope'"):
        bootstrap_image_auroc_difference(scores, "toy", "nope")
    with pytest.raises(ValueError, match="no score for"):
        bootstrap_image_auroc_difference(scores[~((scores.method == "toy") & (scores.path == "a0"))],
                                         "toy", "classical")


def test_docs_quote_the_per_kind_aurocs_of_the_committed_scores():
    """docs/toy_clip.md's AUROC per anomaly kind comes from benchmarks/results/toy_clip_transfer_scores.csv."""
    from pathlib import Path

    import pandas as pd

    from bpfl.toyclip.transfer import TOY_NAME, anomaly_kind_auroc

    root = Path(__file__).resolve().parents[1]
    table = anomaly_kind_auroc(pd.read_csv(root / "benchmarks" / "results" / "toy_clip_transfer_scores.csv"))
    docs = " ".join((root / "docs" / "toy_clip.md").read_text().split())
    toy = table.loc[TOY_NAME]
    classical = table.loc[table.index.str.startswith("classical"), "distortion"]
    assert (f"colour {toy['color']:.2f} and foreign-texture contamination {toy['contamination']:.2f}, but "
            f"**geometric distortions only {toy['distortion']:.2f}** (the classical windows "
            f"{classical.min():.2f}-{classical.max():.2f})") in docs
