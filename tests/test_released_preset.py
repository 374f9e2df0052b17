"""The released-code preset changes exactly the documented behaviours (one test per switch of config.SWITCHES).

Each ``test_switch_<name>`` builds the paper configuration and the same configuration with only that switch at
its released-code value (tiny backbone, 112 px), and checks the behaviour the switch table describes.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bpfl.evaluate as E
import bpfl.train as T
from bpfl import losses as L
from bpfl.config import SWITCHES, BayesPFLConfig
from bpfl.data import make_synthetic_dataset, open_dataset
from bpfl.flow import constrain_u
from bpfl.model import AttentionPooling, BayesPFL

SIZE = 112
RELEASED = {name: released for name, (_paper, released, _doc) in SWITCHES.items()}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def feats(bb):
    torch.manual_seed(5)
    return bb.encode_image(torch.randn(3, 3, SIZE, SIZE))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset")
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick"])
    return open_dataset(root, split="test", image_size=SIZE)


NAMES = ["brick", "pcb1", "grass"]


def cfg(**kw) -> BayesPFLConfig:
    base = dict(backbone="bpfl-tiny", pretrained=None, image_size=SIZE, layers=(1, 2, 3, 4), batch_size=6,
                test_samples=2)
    base.update(kw)
    return BayesPFLConfig.paper(**base)


def make(bb, seed=0, **kw) -> BayesPFL:
    torch.manual_seed(seed)
    return BayesPFL(cfg(**kw), backbone=bb)


def released(name: str) -> dict:
    return {name: RELEASED[name]}


def masks_labels(n=3):
    masks = torch.zeros(n, SIZE, SIZE)
    masks[1, 20:60, 30:70] = 1
    masks[2, 70:100, 10:40] = 1
    return masks, torch.tensor([0, 1, 1][:n])


def train_out(model, feats, gen_seed=0):
    model.train()
    return model(None, NAMES, features=feats, generator=torch.Generator().manual_seed(gen_seed))


# ------------------------------------------------------------------------------------------ the preset itself
def test_preset_changes_exactly_the_documented_switches():
    diff = BayesPFLConfig().differences(BayesPFLConfig.released_code())
    expected = {k for k, (p, r, _) in SWITCHES.items() if p != r}
    assert set(diff) == expected
    for k, (paper_value, released_value) in diff.items():
        assert (paper_value, released_value) == SWITCHES[k][:2]
    assert BayesPFLConfig() == BayesPFLConfig.paper()
    # one behavioural test per switch in this file
    missing = [k for k in SWITCHES if f"test_switch_{k}" not in globals()]
    assert not missing, missing


# ------------------------------------------------------------------------------------------ backbone
def test_switch_quick_gelu(tmp_path):
    from open_clip.transformer import QuickGELU

    from bpfl.backbone import build_clip
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in build_clip("bpfl-tiny", SIZE).state_dict().items()}  # looks like OpenAI's fp16
    path = tmp_path / "tiny_openai_like.pt"
    torch.save(sd, path)
    models = {}
    for name, q in (("paper", None), ("released", RELEASED["quick_gelu"])):
        models[name] = BayesPFL(cfg(pretrained=str(path), quick_gelu=q), device="cpu")
    acts = {n: {type(m) for m in mdl.backbone.clip.modules() if isinstance(m, (torch.nn.GELU, QuickGELU))}
            for n, mdl in models.items()}
    assert acts == {"paper": {QuickGELU}, "released": {torch.nn.GELU}}  # None = what OpenAI weights need
    x = torch.randn(1, 3, SIZE, SIZE)
    a, b = (models[n].backbone.encode_image(x).cls for n in ("paper", "released"))
    assert not torch.allclose(a, b)  # same weights, slightly different features


# ------------------------------------------------------------------------------------------ prompts and flows
def test_switch_state_init_mean(bb, feats):
    paper, rel = make(bb), make(bb, **released("state_init_mean"))
    m = RELEASED["state_init_mean"]
    with torch.no_grad():
        assert abs(float(paper.prompts.state_normal.mean())) < 0.01
        assert float(rel.prompts.state_normal.mean()) == pytest.approx(m, abs=0.01)
        assert float(rel.prompts.state_abnormal.mean()) == pytest.approx(-m, abs=0.01)
    # the same draws, shifted by +-m in every channel
    torch.testing.assert_close(rel.prompts.state_normal - paper.prompts.state_normal,
                               torch.full_like(paper.prompts.state_normal, m), rtol=0, atol=1e-6)
    torch.testing.assert_close(rel.prompts.context, paper.prompts.context)
    # FINDING: a constant shift across channels of a token embedding is removed by the text transformer's
    # pre-LayerNorms (and carried unchanged in the residual stream of that token only), so the released +-0.5
    # init has no effect on any output: same text embeddings, maps and scores.
    outs = [mdl.eval()(None, NAMES, features=feats, generator=torch.Generator().manual_seed(0))
            for mdl in (paper, rel)]
    torch.testing.assert_close(outs[0].text_embeddings, outs[1].text_embeddings, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0].anomaly_map, outs[1].anomaly_map, rtol=1e-4, atol=1e-5)


def _context_phi(model, feats, patch_noise=0.0):
    g = torch.Generator().manual_seed(9)
    f = type(feats)(feats.cls, [t + patch_noise * torch.randn(t.shape, generator=g) for t in feats.patch_tokens],
                    feats.grid)
    x = model.global_embedding(f, model.project_patches(f))
    phis, _ = model.sample_prompts(f, x, 2, torch.Generator().manual_seed(0))
    return phis["context"]


def test_switch_log_var_scale(bb, feats):
    paper, rel = make(bb), make(bb, **released("log_var_scale"))
    xi = torch.randn(3, bb.embed_dim)
    with torch.no_grad():
        rel.context_flow.encoder.load_state_dict(paper.context_flow.encoder.state_dict())
        _, lv_paper = paper.context_flow.encoder(xi)
        _, lv_rel = rel.context_flow.encoder(xi)
    torch.testing.assert_close(lv_rel, RELEASED["log_var_scale"] * lv_paper)


def test_switch_isd_condition(bb, feats):
    paper, rel = make(bb), make(bb, **released("isd_condition"))
    # released: xi = x_cls only -> the ISD does not see the patch tokens
    torch.testing.assert_close(_context_phi(rel, feats), _context_phi(rel, feats, patch_noise=1.0))
    assert not torch.allclose(_context_phi(paper, feats), _context_phi(paper, feats, patch_noise=1.0))


def test_switch_isd_amortized(bb, feats):
    paper, rel = make(bb), make(bb, **released("isd_amortized"))
    u, w, b = rel.context_flow.flow.step_parameters(feats.cls)
    K, C = rel.config.flow_length, bb.text_width
    assert u.shape == (3, K, C) and w.shape == (3, K, C) and b.shape == (3, K)
    assert not torch.allclose(u[0], u[1])  # per image
    assert not hasattr(rel.context_flow.flow, "u")
    pu, _, _ = paper.context_flow.flow.step_parameters(feats.cls)
    assert pu.shape == (K, C) and pu is paper.context_flow.flow.u  # free, the same for every image


def test_switch_constrained_flow(bb):
    z0 = torch.randn(4, bb.text_width)
    for model, constrained in ((make(bb), True), (make(bb, **released("constrained_flow")), False)):
        flows = [model.context_flow.flow, model.normal_flow.flow, model.abnormal_flow.flow]
        assert all(f.constrained is constrained for f in flows)
        flow = model.normal_flow.flow
        with torch.no_grad():  # a step with w'u < -1: not invertible unless u is constrained
            flow.w.copy_(torch.randn_like(flow.w))
            flow.u.copy_(-3.0 * flow.w / (flow.w * flow.w).sum(-1, keepdim=True))
        z, _ = flow(z0)
        ref = z0
        for k in range(flow.n_flows):
            u = constrain_u(flow.u[k], flow.w[k]) if constrained else flow.u[k]  # raw u in the released code
            ref = ref + u * torch.tanh(ref @ flow.w[k] + flow.b[k])[:, None]
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)


def test_switch_iad_share_flow(bb):
    paper, rel = make(bb), make(bb, **released("iad_share_flow"))
    assert paper.normal_flow.flow is paper.abnormal_flow.flow
    assert paper.normal_flow.encoder is paper.abnormal_flow.encoder
    assert rel.normal_flow.flow is not rel.abnormal_flow.flow  # own u, w, b per state
    assert rel.normal_flow.encoder is rel.abnormal_flow.encoder  # only the mu/sigma net is shared
    assert not torch.equal(rel.normal_flow.flow.u, rel.abnormal_flow.flow.u)
    n_paper = sum(p.numel() for p in paper.parameters() if p.requires_grad)
    n_rel = sum(p.numel() for p in rel.parameters() if p.requires_grad)
    K, C = paper.config.flow_length, bb.text_width
    assert n_rel - n_paper == 2 * K * C + K
    # one thing only: the sharing. The IAD flows keep the paper's init (iad_flow_init is its own switch)
    for flow in (rel.normal_flow.flow, rel.abnormal_flow.flow, paper.normal_flow.flow):
        assert flow.init == "normal" and torch.equal(flow.b, torch.zeros_like(flow.b))
        assert float(flow.u.detach().std()) == pytest.approx(C ** -0.5, rel=0.25)


def test_switch_iad_flow_init(bb):
    C = bb.text_width
    paper, rel = make(bb), make(bb, **released("iad_flow_init"))
    assert rel.normal_flow.flow is rel.abnormal_flow.flow  # sharing untouched (iad_share_flow is its own switch)
    for model, std, zero_b in ((paper, C ** -0.5, True), (rel, 1.0, False)):
        flow = model.normal_flow.flow
        with torch.no_grad():
            assert float(flow.u.std()) == pytest.approx(std, rel=0.25)
            assert float(flow.w.std()) == pytest.approx(std, rel=0.25)
            assert torch.equal(flow.b, torch.zeros_like(flow.b)) is zero_b
        assert model.context_flow.flow.init == "normal"  # the ISD flow is not an IAD flow


def test_switch_iad_one_sample_per_batch(bb, feats):
    masks, labels = masks_labels()
    for model, once in ((make(bb), False), (make(bb, **released("iad_one_sample_per_batch")), True)):
        model.train()
        x = model.global_embedding(feats, model.project_patches(feats))
        phis, kls = model.sample_prompts(feats, x, 1, torch.Generator().manual_seed(0))
        assert phis["normal"].shape == phis["context"].shape == (1, 3, bb.text_width)
        for state in ("normal", "abnormal"):
            same = all(torch.equal(phis[state][:, 0], phis[state][:, n]) for n in (1, 2))
            assert same is once  # released: one draw for the whole training batch
        assert not torch.equal(phis["context"][:, 0], phis["context"][:, 1])  # ISD stays per image
        if once:  # the KL is that of the single draw of the free vector
            g = torch.Generator().manual_seed(0)
            torch.randn((1, 3, bb.text_width), generator=g)  # the context draw comes first
            from bpfl.flow import flow_kl
            ref = flow_kl(model.normal_flow(model.normal_xi, 1, generator=g))
            torch.testing.assert_close(kls["normal"], ref)
            model.loss(train_out(model, feats), masks, labels)["total"].backward()
            assert model.normal_xi.grad.abs().sum() > 0
            model.eval()  # at test time: per image (iad_sample_once is the test-time switch)
            phis, _ = model.sample_prompts(feats, x, 1, torch.Generator().manual_seed(0))
            assert not torch.equal(phis["normal"][:, 0], phis["normal"][:, 1])


def test_switch_iad_log_det_weight(bb, feats):
    from bpfl.flow import gaussian_log_prob, standard_normal_log_prob
    torch.manual_seed(0)
    model = BayesPFL(cfg(context_distribution="none", constrained_flow=False), backbone=bb).train()
    with torch.no_grad():  # a flow with large steps, so the log-det term is far from 0
        model.normal_flow.flow.u.mul_(20.0)
    x = model.global_embedding(feats, model.project_patches(feats))
    N = x.shape[0]
    kls = {}
    for w in ("1", RELEASED["iad_log_det_weight"]):
        model.config = model.config.replace(iad_log_det_weight=w)
        kls[w] = model.sample_prompts(feats, x, 2, torch.Generator().manual_seed(4))[1]["normal"]
    s = model.normal_flow(model.normal_xi.expand(N, -1), 2, generator=torch.Generator().manual_seed(4))
    log_q0 = gaussian_log_prob(s.z0, s.mu, s.log_var)
    log_p = standard_normal_log_prob(s.zk)
    assert float(s.log_det.detach().abs().mean()) > 1.0
    torch.testing.assert_close(kls["1"], (log_q0 - s.log_det - log_p).mean())  # Eq. 7
    torch.testing.assert_close(kls["1/N"], (log_q0 - s.log_det / N - log_p).mean())  # released


def test_switch_iad_sample_once(bb, feats):
    for model, once in ((make(bb), False), (make(bb, **released("iad_sample_once")), True)):
        model.eval()
        x = model.global_embedding(feats, model.project_patches(feats))
        a, _ = model.sample_prompts(feats, x, 2, torch.Generator().manual_seed(1))
        b, _ = model.sample_prompts(feats, x, 2, torch.Generator().manual_seed(2))
        assert torch.equal(a["normal"], b["normal"]) is once  # released: drawn once per test run
        assert torch.equal(a["abnormal"], b["abnormal"]) is once
        assert not torch.equal(a["context"], b["context"])  # ISD context samples are always redrawn
        if once:
            torch.testing.assert_close(a["normal"][:, 0], a["normal"][:, 2])  # shared by every image
            model.reset_state_samples()  # evaluate() starts every run like this
            c, _ = model.sample_prompts(feats, x, 2, torch.Generator().manual_seed(2))
            assert not torch.equal(a["normal"], c["normal"])


# ------------------------------------------------------------------------------------------ x_patch and RCA
def test_switch_x_patch_pool(bb, feats):
    paper, rel = make(bb), make(bb, **released("x_patch_pool"))
    patches = paper.project_patches(feats)
    gap = paper.patch_to_global(torch.cat([p.mean(1) for p in patches], dim=-1))
    torch.testing.assert_close(paper.global_embedding(feats, patches), feats.cls + gap)
    assert isinstance(rel.patch_to_global, AttentionPooling)
    pool = rel.patch_to_global
    h = pool.fuse(torch.cat(feats.patch_tokens, dim=-1))  # the RAW tokens of the 4 layers
    x_patch = pool.out((torch.softmax(pool.score(h), dim=1) * h).sum(1))
    torch.testing.assert_close(rel.global_embedding(feats, rel.project_patches(feats)), feats.cls + x_patch)


def _rca_inputs(bb):
    torch.manual_seed(3)
    return torch.randn(2, 6, bb.embed_dim), F.normalize(torch.randn(2, 64, bb.embed_dim), dim=-1)


def test_switch_rca_heads(bb):
    z, f = _rca_inputs(bb)
    paper, rel = make(bb), make(bb, **released("rca_heads"))
    assert paper.rca.attention(z, f).shape == (2, 1, 6, 64)
    attn = rel.rca.attention(z, f)
    assert attn.shape == (2, 4, 6, 64)
    d = bb.embed_dim // 4
    q = rel.rca.query(z)[..., :d]
    ref = torch.softmax(q @ f[..., :d].transpose(1, 2) / math.sqrt(bb.embed_dim), dim=-1)  # scale stays 1/sqrt(C)
    torch.testing.assert_close(attn[:, 0], ref)


def test_switch_rca_bias(bb):
    paper, rel = make(bb), make(bb, **released("rca_bias"))
    assert paper.rca.query.bias is None
    assert isinstance(rel.rca.query.bias, torch.nn.Parameter) and rel.rca.query.bias.requires_grad


def test_switch_rca_normalize_output(bb):
    z, f = _rca_inputs(bb)
    paper, rel = make(bb), make(bb, **released("rca_normalize_output"))
    torch.testing.assert_close(rel.rca(z, f).norm(dim=-1), torch.ones(2, 6))
    out = paper.rca(z, f)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2, 6))
    torch.testing.assert_close(F.normalize(out, dim=-1), rel.rca(z, f))  # same weights otherwise


# ------------------------------------------------------------------------------------------ maps and scores
def test_switch_temperature(bb, feats):
    paper, rel = make(bb).eval(), make(bb, **released("temperature")).eval()
    assert paper.config.temperature == 1.0  # Eq. 11 and s_text as the paper writes them: no scale
    rel.load_state_dict(paper.state_dict())  # the same weights: only the scale differs
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a, b = paper(None, NAMES, features=feats, generator=gen()), rel(None, NAMES, features=feats, generator=gen())
    torch.testing.assert_close(a.text_embeddings, b.text_embeddings)
    tau = RELEASED["temperature"]
    x = F.normalize(paper.global_embedding(feats, paper.project_patches(feats)), dim=-1)
    cos = torch.einsum("nc,nsrbc->nsrb", x, a.text_embeddings)
    torch.testing.assert_close(a.image_logits, cos, rtol=1e-5, atol=1e-6)  # independent: plain cosines
    torch.testing.assert_close(b.image_logits, tau * cos, rtol=1e-5, atol=1e-5)
    patches = paper.project_patches(feats)
    torch.testing.assert_close(rel.pair_logit_differences(patches, a.text_embeddings),
                               tau * paper.pair_logit_differences(patches, a.text_embeddings), rtol=1e-4, atol=1e-5)
    # unit vectors and no scale: the two-way softmax of Eq. 11 stays within sigmoid(+-2)
    lim = 1 / (1 + math.exp(2))
    amap = a.anomaly_map.detach()
    assert float(amap.min()) >= lim - 1e-6 and float(amap.max()) <= 1 - lim + 1e-6


def test_switch_learnable_temperature(bb, feats):
    paper, rel = make(bb), make(bb, **released("learnable_temperature"))
    trainable = {id(p) for p in paper.trainable_parameters()}
    assert id(paper.log_temperature_pixel) not in trainable and "log_temperature_pixel" not in paper.state_dict()
    assert isinstance(rel.log_temperature_pixel, torch.nn.Parameter)
    assert float(rel.log_temperature_image.detach()) == pytest.approx(math.log(rel.config.temperature))
    assert BayesPFLConfig.released_code().temperature == pytest.approx(1 / 0.07)  # the released init, log(1/0.07)
    masks, labels = masks_labels()
    rel.loss(train_out(rel, feats), masks, labels)["total"].backward()
    assert rel.log_temperature_pixel.grad is not None and rel.log_temperature_pixel.grad != 0
    assert rel.log_temperature_image.grad is not None and rel.log_temperature_image.grad != 0


def test_switch_class_mapping(bb, feats):
    paper, rel = make(bb), make(bb, **released("class_mapping"))
    assert paper.class_mapping is None and paper.image_mapping is None
    masks, labels = masks_labels()
    out = train_out(rel, feats)
    rel.loss(out, masks, labels)["total"].backward()
    assert rel.class_mapping.weight.grad.abs().sum() > 0 and rel.image_mapping.weight.grad.abs().sum() > 0
    x, t = torch.randn(3, bb.embed_dim), out.text_embeddings.detach()
    before = rel.text_branch(x, t)
    with torch.no_grad():
        rel.class_mapping.weight.add_(0.1)
    assert not torch.allclose(before, rel.text_branch(x, t))  # the image branch goes through the mapping


def test_switch_upsample_align_corners(bb, feats):
    model = make(bb).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model(None, NAMES, features=feats, generator=gen(), return_layer_maps=True)
    model.config = model.config.replace(**released("upsample_align_corners"))
    b = model(None, NAMES, features=feats, generator=gen(), return_layer_maps=True)
    assert not torch.allclose(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.text_embeddings, b.text_embeddings)  # only the upsampling differs
    diff = model.pair_logit_differences(model.project_patches(feats), b.text_embeddings)  # [N, L, RB, H, W]
    for out, corners in ((a, False), (b, True)):
        up = F.interpolate(diff.flatten(1, 2), size=(SIZE, SIZE), mode="bilinear", align_corners=corners)
        torch.testing.assert_close(out.anomaly_map, torch.sigmoid(up).mean(1), rtol=1e-5, atol=1e-6)


def test_switch_map_sigma(bb, dataset, monkeypatch):
    seen = []
    real = E.smooth_maps
    monkeypatch.setattr(E, "smooth_maps", lambda maps, sigma: seen.append(sigma) or real(maps, sigma))
    results = {}
    for name, kw in (("paper", {}), ("released", released("map_sigma"))):
        seen.clear()
        results[name] = E.evaluate(make(bb, **kw), dataset, n_samples=2, batch_size=6, progress=False,
                                   aupro_variant=None)
        assert set(seen) == {0.0 if name == "paper" else 8.0}
    assert results["paper"].mean("pixel_ap") != results["released"].mean("pixel_ap")
    # what the smoothing is: spatial only, image by image
    maps = np.random.default_rng(0).random((2, 40, 40)).astype(np.float32)
    sm = real(maps, 8.0)
    from scipy.ndimage import gaussian_filter
    np.testing.assert_allclose(sm[1], gaussian_filter(maps[1], 8.0, mode="reflect", truncate=4.0), rtol=1e-5)


def test_switch_image_score(bb, dataset):
    for name, kw in (("paper", {}), ("released", released("image_score"))):
        res = E.evaluate(make(bb, **kw), dataset, n_samples=2, batch_size=6, progress=False, aupro_variant=None)
        s = res.scores
        if name == "paper":  # s = s_text + max(M)
            np.testing.assert_allclose(s["image_score"], s["text_score"] + s["map_max"], rtol=1e-6)
        else:  # 0.5 minmax(s_text) + 0.5 minmax(top-k mean of M), k = 2000 for "brick"
            ref = E.released_image_scores(s["text_score"].to_numpy(), s["map_top2000_mean"].to_numpy(), "brick")
            np.testing.assert_allclose(s["image_score"], ref, rtol=1e-6)
            assert s["image_score"].min() >= 0 and s["image_score"].max() <= 1


# ------------------------------------------------------------------------------------------ losses
def test_switch_kl_weight(bb, feats):
    model = make(bb)
    out = train_out(model, feats)
    masks, labels = masks_labels()
    full = model.loss(out, masks, labels)
    model.config = model.config.replace(**released("kl_weight"))
    weighted = model.loss(out, masks, labels)
    kl = full["kl_context"] + full["kl_normal"] + full["kl_abnormal"]
    torch.testing.assert_close(full["total"] - weighted["total"], (1 - RELEASED["kl_weight"]) * kl,
                               rtol=1e-5, atol=1e-5)
    assert float(full["flow"].detach()) == pytest.approx(float(weighted["flow"].detach()))  # logged unweighted


def test_switch_ort_reduction(bb, feats):
    model = make(bb)
    out = train_out(model, feats)
    masks, labels = masks_labels()
    paper = model.loss(out, masks, labels)["ort"]
    model.config = model.config.replace(**released("ort_reduction"))
    rel = model.loss(out, masks, labels)["ort"]
    B = model.config.n_prompts
    torch.testing.assert_close(rel, paper / B ** 2)  # mean over B x B including the zero diagonal
    t = out.text_embeddings[:, 0, 0]  # [N, B, C]
    cos2 = (t @ t.transpose(1, 2)) ** 2
    off = cos2.sum((1, 2)) - cos2.diagonal(dim1=1, dim2=2).sum(-1)
    assert float(off.mean().detach()) < float(paper.detach())  # the normal bank's share of Eq. 13's sum


def test_switch_focal_balanced(bb, feats):
    model = make(bb)
    out = train_out(model, feats)
    masks, labels = masks_labels()
    for flag in (False, RELEASED["focal_balanced"]):
        model.config = model.config.replace(focal_balanced=flag)
        got = model.loss(out, masks, labels)["focal"]
        pm = out.pair_maps
        ref = torch.stack([sum(L.focal_loss(pm[:, l, p], masks, balanced=flag) for l in range(pm.shape[1]))
                           for p in range(pm.shape[2])]).mean()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    fg = masks > 0.5
    assert fg.float().mean() < 0.2  # so the balanced (fg mean + bg mean) and plain means differ a lot


def test_switch_loss_pairs(bb, feats):
    masks, labels = masks_labels()
    for model, one in ((make(bb), False), (make(bb, **released("loss_pairs")), True)):
        out = train_out(model, feats)
        out.pair_maps.retain_grad()
        model.loss(out, masks, labels, generator=torch.Generator().manual_seed(0))["total"].backward()
        g = out.pair_maps.grad.abs().sum(dim=(0, 1, 3, 4))  # per prompt pair
        n_with_grad = int((g > 0).sum())
        assert n_with_grad == (1 if one else model.config.n_prompts)


# ------------------------------------------------------------------------------------------ training
_MAKE_SCHEDULER = T.make_scheduler


def _scheduler_horizon(bb, dataset, tmp_path, monkeypatch, **kw):
    seen = {}
    real = _MAKE_SCHEDULER

    def spy(optimizer, total_steps, enabled):
        seen["total"], seen["enabled"] = total_steps, enabled
        return real(optimizer, total_steps, enabled)
    monkeypatch.setattr(T, "make_scheduler", spy)
    T.train(make(bb, **kw), dataset, tmp_path, max_steps=1, progress=False)
    return seen


def test_switch_epochs(bb, dataset, tmp_path, monkeypatch):
    paper = _scheduler_horizon(bb, dataset, tmp_path / "p", monkeypatch)
    rel = _scheduler_horizon(bb, dataset, tmp_path / "r", monkeypatch, **released("epochs"))
    steps = math.ceil(len(dataset) / 6)
    assert (paper["total"], rel["total"]) == (20 * steps, 30 * steps)  # the run length (and cosine horizon)


def test_switch_selection(bb, dataset, tmp_path, capsys):
    from bpfl.cli import main
    assert cfg().selection == "last"  # no validation, the last epoch's weights
    args = ["train", "--data", str(dataset.root), "--out", str(tmp_path), "--backbone", "bpfl-tiny",
            "--pretrained", "random", "--image-size", str(SIZE), "--max-steps", "1", "--quiet", "--device", "cpu"]
    with pytest.raises(SystemExit, match="--val-data"):  # released: selection on TARGET categories, asked for by name
        main(args + ["--preset", "released"])
    assert main(args + ["--preset", "paper", "--set", "batch_size=6", "epochs=1"]) == 0
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / "best.pt").exists()


def test_switch_validation_samples(bb, dataset, tmp_path, monkeypatch):
    seen = []
    real = E.evaluate
    monkeypatch.setattr(E, "evaluate", lambda *a, **k: seen.append(k["n_samples"]) or real(*a, **k))
    for kw, want in (({}, 2), (released("validation_samples"), 5)):  # paper: the test R (2 here); released: 5
        seen.clear()
        score = E.selection_score(make(bb, **kw), dataset)
        assert seen == [want] and 0 <= score <= 1
    # the command line's selection runs through it too
    from bpfl.cli import main
    seen.clear()
    assert main(["train", "--data", str(dataset.root), "--out", str(tmp_path), "--backbone", "bpfl-tiny",
                 "--pretrained", "random", "--image-size", str(SIZE), "--max-steps", "1", "--quiet", "--device", "cpu",
                 "--selection", "aux-val", "--val-fraction", "0.34",
                 "--set", "batch_size=6", "epochs=1", "test_samples=2", "validation_samples=3"]) == 0
    assert seen == [3] and (tmp_path / "best.pt").is_file()


def test_switch_undefined_metrics(bb, tmp_path):
    root = tmp_path / "good_only"
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick", "grass"])
    ds = open_dataset(root, split="train", image_size=SIZE)  # normal images only: image metrics undefined
    for kw, released_rule in (({}, False), (released("undefined_metrics"), True)):
        with pytest.warns(UserWarning, match="no image is anomalous"):
            res = E.evaluate(make(bb, **kw), ds, n_samples=1, batch_size=6, progress=False, aupro_variant=None)
        vals = [res.per_category[c][m] for c in ("brick", "grass") for m in ("image_auroc", "image_ap")]
        if released_rule:  # 0, and it enters the mean over categories
            assert vals == [0.0] * 4
            assert res.table.loc["n_averaged", "image_auroc"] == 2 and res.table.loc["mean", "image_auroc"] == 0.0
        else:  # NaN, left out of the mean
            assert all(math.isnan(v) for v in vals)
            assert res.table.loc["n_averaged", "image_auroc"] == 0 and math.isnan(res.table.loc["mean", "image_auroc"])


def test_switch_group_lrs(bb):
    one = T.make_optimizer(make(bb))
    assert len(one.param_groups) == 1 and one.param_groups[0]["lr"] == cfg().lr
    model = make(bb, **released("group_lrs"), learnable_temperature=True, isd_amortized=True)
    opt = T.make_optimizer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: (g["lr"], {names[id(p)] for p in g["params"]}) for g in opt.param_groups}
    assert {k: v[0] for k, v in groups.items()} == {"prompts": 1e-3, "temperatures": 1e-2, "flow": 1e-3, "rest": 1e-4}
    assert groups["prompts"][1] == {"prompts.context", "prompts.state_normal", "prompts.state_abnormal"}
    assert groups["temperatures"][1] == {"log_temperature_pixel", "log_temperature_image"}
    assert {"normal_xi", "abnormal_xi", "context_flow.flow.amor_u.weight", "normal_flow.flow.u"} <= groups["flow"][1]
    assert not any("encoder" in n for n in groups["flow"][1])  # the mu/sigma nets train at the "rest" lr
    assert {"context_flow.encoder.mean_net.0.weight", "rca.query.weight", "patch_projections.0.weight"} \
        <= groups["rest"][1]
    assert sum(len(v[1]) for v in groups.values()) == len(model.trainable_parameters())


def test_switch_adam_betas(bb):
    assert T.make_optimizer(make(bb)).param_groups[0]["betas"] == (0.9, 0.999)
    opt = T.make_optimizer(make(bb, **released("adam_betas")))
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"] == (0.5, 0.999)


def test_switch_cosine_schedule(bb):
    def lrs(enabled, total=20):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = T.make_scheduler(opt, total, enabled)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    assert lrs(False) == [1.0] * 20
    cos = lrs(RELEASED["cosine_schedule"])
    assert cos[:2] == pytest.approx([0.5, 1.0])  # 10 % linear warm-up (2 of 20 steps)
    assert cos[2] == pytest.approx(1.0) and all(a >= b for a, b in zip(cos[2:], cos[3:]))
    assert cos[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert cos[-1] < 0.01
