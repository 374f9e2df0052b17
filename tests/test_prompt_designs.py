"""Prompt designs (Figure 4), Table 2 / Figure 5 ablations and the per-epoch evaluation hook, on the tiny backbone."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from bpfl.config import ABLATIONS, BayesPFLConfig, with_ablations
from bpfl.data import make_synthetic_dataset, open_dataset
from bpfl.evaluate import evaluate
from bpfl.model import BayesPFL
from bpfl.prompt_designs import (
    AnomalyCLIPPlusDesign,
    AprilGANPlusDesign,
    HandcraftedEnsemble,
    WinCLIPDesign,
    build_prompt_design,
    compare_prompt_designs,
    init_projections_from_clip,
    plot_design_curves,
)
from bpfl.prompts import prompt_class_name
from bpfl.train import per_epoch_eval, train

SIZE = 112


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("designs")
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick", "grass"])
    return (open_dataset(root, split="test", categories=["brick"], image_size=SIZE),
            open_dataset(root, split="test", categories=["grass"], image_size=SIZE))


def cfg(**kw) -> BayesPFLConfig:
    base = dict(image_size=SIZE, layers=(1, 2, 3, 4), batch_size=6, epochs=1, lr=1e-2, test_samples=2)
    base.update(kw)
    return BayesPFLConfig.teaching(**base)


def model_for(bb, **kw) -> BayesPFL:
    torch.manual_seed(0)
    return BayesPFL(cfg(**kw), backbone=bb)


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train_and_evaluate(model, data, tmp_path, steps=1):
    train_set, test_set = data
    before = params(model)
    res = train(model, train_set, tmp_path, max_steps=steps, progress=False)
    after = params(model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    r = evaluate(model, test_set, n_samples=2, batch_size=6, progress=False, aupro_variant=None)
    for m in ("image_auroc", "pixel_auroc", "pixel_ap"):
        assert math.isfinite(r.mean(m)), (m, r.table)
    assert math.isfinite(res.history[-1]["total"])
    return changed


# ------------------------------------------------------------------------------------------ designs
@pytest.mark.parametrize("design", ["winclip", "aprilgan+", "anomalyclip+", "bayes-pfl"])
def test_each_prompt_design_trains_a_few_steps_and_evaluates(bb, data, tmp_path, design):
    model = model_for(bb, prompt_design=design)
    if design == "bayes-pfl":
        assert model.prompt_design is None and model.prompts is not None
    else:  # the design replaces banks and flows; every other component is the same
        assert model.prompts is None and model.context_flow is None and model.normal_flow is None
        assert model.rca is not None and len(model.patch_projections) == 4
    changed = train_and_evaluate(model, data, tmp_path)
    assert any(n.startswith("patch_projections") for n in changed)  # the shared pipeline trains in every design
    text_params = {n for n in params(model) if n.startswith(("prompts.", "prompt_design."))}
    if design in ("winclip", "aprilgan+"):
        assert not text_params  # handcrafted: no trainable text part
    else:
        assert text_params and text_params <= set(changed)


def test_winclip_needs_no_training_and_gives_deterministic_maps(bb, data):
    model = model_for(bb, prompt_design="winclip").eval()
    _, test_set = data
    images = torch.stack([test_set[i]["image"] for i in range(3)])
    names = [test_set[i]["class_name"] for i in range(3)]
    a = model(images, names, generator=torch.Generator().manual_seed(1))
    b = model(images, names, n_samples=5, generator=torch.Generator().manual_seed(2))
    assert a.text_embeddings.shape == (3, 2, 1, 1, bb.embed_dim)  # R = B = 1 whatever n_samples says
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(a.image_score, b.image_score, rtol=0, atol=0)
    assert a.kl == {}
    # untrained evaluation works end to end and is reproducible
    r1 = evaluate(model, test_set, seed=0, progress=False, aupro_variant=None)
    r2 = evaluate(model, test_set, seed=7, progress=False, aupro_variant=None)
    pd.testing.assert_frame_equal(r1.table, r2.table)


def test_handcrafted_ensemble_is_the_normalised_mean_of_its_prompts_and_is_cached(bb, monkeypatch):
    design = WinCLIPDesign()
    assert design.n_prompts == len(design.templates) * 13 and len(design.templates) >= 10
    emb = design.class_embedding(bb, "brick")
    for s, state in enumerate(("normal", "abnormal")):
        texts = design.prompts_for("brick", state)
        assert all("brick" in t for t in texts) and len(set(texts)) == len(texts)
        ref = F.normalize(F.normalize(bb.encode_text(texts), dim=-1).mean(0), dim=-1)
        torch.testing.assert_close(emb[s], ref, rtol=1e-5, atol=1e-6)
    calls = []
    monkeypatch.setattr(bb, "encode_text", lambda *a, **k: calls.append(1))
    assert design.class_embedding(bb, "brick") is emb and not calls  # cached per class word
    # the class words go through the kit's remap (pcb1 -> printed circuit board)
    assert all("printed circuit board" in t for t in design.prompts_for(prompt_class_name("pcb1"), "normal"))


def test_aprilgan_plus_is_a_larger_handcrafted_ensemble(bb):
    a, w = AprilGANPlusDesign(), WinCLIPDesign()
    assert isinstance(a, HandcraftedEnsemble) and a.n_prompts > w.n_prompts
    assert not list(a.parameters())
    with pytest.raises(ValueError):
        HandcraftedEnsemble([], {"normal": ["{}"], "abnormal": ["bad {}"]})


def test_anomalyclip_plus_splices_learnable_context_before_fixed_words(bb):
    model = model_for(bb, prompt_design="anomalyclip+")
    d = model.prompt_design
    assert isinstance(d, AnomalyCLIPPlusDesign)
    assert d.context_normal.shape == (10, bb.text_width)  # z = P + Q learnable tokens
    feats = bb.encode_image(torch.zeros(2, 3, SIZE, SIZE))
    text, kl = d(model, feats, feats.cls, ["brick", "pcb1"], 3, None)
    assert kl == {} and text.shape == (2, 2, 1, 1, bb.embed_dim)
    torch.testing.assert_close(text[0], text[1])  # object-agnostic: the class name is not used
    # independent construction: [SOT][V1..Vz][tokens of "<state> object"][EOT] through the text transformer
    for s, (ctx, word) in enumerate(((d.context_normal, "normal object"), (d.context_abnormal, "anomalous object"))):
        ids = bb.tokenize([word])[0]
        emb = bb.embed_tokens(ids)
        eot = int(bb.eot_positions(ids[None])[0])
        seq = torch.cat([emb[:1], ctx, emb[1:]])[None, :77]
        ref = F.normalize(bb.encode_token_embeddings(seq, torch.tensor([eot + ctx.shape[0]]), truncate=False), dim=-1)
        torch.testing.assert_close(text[0, s, 0, 0], ref[0], rtol=1e-4, atol=1e-5)
    text.sum().backward()
    assert d.context_normal.grad is not None and d.context_normal.grad.abs().sum() > 0


def test_build_prompt_design_rejects_the_models_own_design(bb):
    with pytest.raises(ValueError, match="bayes-pfl"):
        build_prompt_design(cfg(), bb)
    assert isinstance(build_prompt_design(cfg(prompt_design="winclip"), bb), WinCLIPDesign)


def test_init_projections_from_clip_is_ln_post_and_proj_up_to_the_ln_bias(bb):
    model = model_for(bb, prompt_design="winclip")
    init_projections_from_clip(model)
    visual = bb.clip.visual
    t = torch.randn(5, bb.vision_width)
    ln = visual.ln_post
    ref = F.normalize(F.layer_norm(t, ln.normalized_shape, ln.weight, None, ln.eps) @ visual.proj, dim=-1)
    for lin in model.patch_projections:
        torch.testing.assert_close(F.normalize(lin(t), dim=-1), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ ablations
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_ablation_trains_and_evaluates(bb, data, tmp_path, name):
    c = with_ablations(cfg(), [name])
    torch.manual_seed(0)
    model = BayesPFL(c, backbone=bb)
    changes = ABLATIONS[name]
    if changes.get("use_rca") is False:
        assert model.rca is None
    if changes.get("context_distribution") == "none":
        assert model.context_flow is None
    if changes.get("state_distribution") == "none":
        assert model.normal_flow is None and model.abnormal_flow is None
    if name == "iad-iad":
        assert model.context_xi is not None  # the context gets a free xi like the states
    train_and_evaluate(model, data, tmp_path, steps=1)


def test_score_ablations_change_the_image_score(bb, data):
    _, test_set = data
    images = torch.stack([test_set[i]["image"] for i in range(2)])
    names = [test_set[i]["class_name"] for i in range(2)]
    outs = {}
    for name in ("none", "no-s-text", "no-s-img"):
        torch.manual_seed(0)
        c = cfg() if name == "none" else with_ablations(cfg(), [name])
        outs[name] = BayesPFL(c, backbone=bb).eval()(images, names, generator=torch.Generator().manual_seed(0))
    full = outs["none"]
    torch.testing.assert_close(full.image_score, full.text_score + full.map_max)
    torch.testing.assert_close(outs["no-s-text"].image_score, full.map_max)
    torch.testing.assert_close(outs["no-s-img"].image_score, full.text_score)


# ------------------------------------------------------------------------------------------ Figure 4
def test_per_epoch_eval_logs_pixel_ap_every_epoch(bb, data, tmp_path):
    train_set, test_set = data
    model = model_for(bb, prompt_design="aprilgan+", epochs=2)
    seen = []
    cb = per_epoch_eval(test_set, n_samples=2, metrics=("pixel_ap", "image_auroc"), history=seen)
    res = train(model, train_set, tmp_path, progress=False, epoch_callback=cb)
    log = pd.read_csv(tmp_path / "train_log.csv")
    assert list(log["epoch"]) == [1, 2] and [r["epoch"] for r in seen] == [1, 2]
    assert {"eval_pixel_ap", "eval_image_auroc"} <= set(log.columns)
    assert log["eval_pixel_ap"].between(0, 1).all()
    # the callback's numbers are exactly what evaluate() gives for the final weights
    final = evaluate(res.model, test_set, n_samples=2, progress=False, aupro_variant=None)
    assert log["eval_pixel_ap"].iloc[-1] == pytest.approx(final.mean("pixel_ap"), abs=1e-9)


def test_compare_prompt_designs_gives_the_figure_4_table(bb, data, tmp_path):
    train_set, test_set = data
    df = compare_prompt_designs(train_set, test_set, cfg(epochs=2), designs=("winclip", "anomalyclip+"),
                                backbone=bb, out_dir=tmp_path, n_samples=2)
    assert list(df.index) == [1, 2] and list(df.columns) == ["winclip/pixel_ap", "anomalyclip+/pixel_ap"]
    assert df.notna().all().all() and (tmp_path / "design_curves.csv").is_file()
    assert (tmp_path / "anomalyclip_plus" / "train_log.csv").is_file()
    png = plot_design_curves(df, tmp_path / "figure4.png")
    assert png.stat().st_size > 1000
