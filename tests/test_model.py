"""Prompt banks (Eq. 1-2, 8-9), RCA (Eq. 10) and the full model (Eq. 11-12, 14) on the tiny backbone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bpfl.config import BayesPFLConfig
from bpfl.model import BayesPFL
from bpfl.prompts import PromptBanks, class_tokens, encode_prompts, prompt_class_name
from bpfl.rca import ResidualCrossModalAttention

NAMES = ["bottle", "pcb1"]


def make_model(tiny_backbone, **overrides) -> BayesPFL:
    torch.manual_seed(0)
    cfg = BayesPFLConfig.teaching(layers=(1, 2, 3, 4), **overrides)
    return BayesPFL(cfg, backbone=tiny_backbone)


# ------------------------------------------------------------------------------------------ prompts
def test_class_name_remap():
    assert prompt_class_name("pcb3") == "printed circuit board"
    assert prompt_class_name("metal_nut") == "metal nut"
    assert prompt_class_name("woven_fabric") == "woven fabric"
    assert prompt_class_name("Fabric3") == "fabric3"


def test_fusion_adds_samples_to_every_context_and_state_token():
    torch.manual_seed(0)
    banks = PromptBanks(3, 5, 4, 16)
    R, N = 2, 3
    phi_e, phi_n, phi_a = torch.randn(R, N, 16), torch.randn(R, N, 16), torch.randn(R, N, 16)
    fused = banks.fuse(phi_e, phi_n, phi_a)
    assert fused.shape == (N, 2, R, 3, 9, 16)
    for n in range(N):
        for r in range(R):
            for b in range(3):
                torch.testing.assert_close(fused[n, 0, r, b, :5], banks.context[b] + phi_e[r, n])
                torch.testing.assert_close(fused[n, 1, r, b, :5], banks.context[b] + phi_e[r, n])  # shared E
                torch.testing.assert_close(fused[n, 0, r, b, 5:], banks.state_normal[b] + phi_n[r, n])
                torch.testing.assert_close(fused[n, 1, r, b, 5:], banks.state_abnormal[b] + phi_a[r, n])


def test_batched_prompt_encoding_equals_one_prompt_at_a_time(tiny_backbone):
    torch.manual_seed(0)
    bb = tiny_backbone
    banks = PromptBanks(2, 3, 2, bb.text_width)
    phi = torch.randn(2, 2, bb.text_width)
    learned = banks.fuse(phi, phi * 0.5, -phi)
    names = ["bottle", "pcb1"]
    batched = encode_prompts(bb, learned, class_tokens(bb, names))
    # independent construction: full 77-token sequences, one prompt per call, no truncation
    for n, name in enumerate(names):
        ids = bb.tokenize(["X " + prompt_class_name(name)])[0]
        emb = bb.embed_tokens(ids)
        eot = int(bb.eot_positions(ids[None])[0])
        for s in range(2):
            for r in range(2):
                for b in range(2):
                    seq = torch.cat([emb[:1], learned[n, s, r, b], emb[2:]])[:77]
                    ref = bb.encode_token_embeddings(seq[None], torch.tensor([eot + 4]), truncate=False)
                    torch.testing.assert_close(batched[n, s, r, b], F.normalize(ref, dim=-1)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shared", [0, 3])
def test_shared_prefix_encoding_equals_full_sequences_values_and_gradients(tiny_backbone, shared):
    """[SOT][context] computed once per normal/abnormal pair (KV cache, EOT-only last block) == full pass."""
    torch.manual_seed(0)
    bb = tiny_backbone
    assert bb.supports_shared_prefix
    banks = PromptBanks(2, 3, 2, bb.text_width)
    phi = torch.randn(3, 2, bb.text_width)
    names = ["bottle", "printed circuit board"]  # different EOT positions within one batch
    tokens = class_tokens(bb, names)
    weights = torch.randn(2, 2, 3, 2, bb.embed_dim)

    def run(**kw):
        banks.zero_grad()
        out = encode_prompts(bb, banks.fuse(phi, phi * 0.5, -phi), tokens, **kw)
        (out * weights).sum().backward()
        return out.detach(), [p.grad.clone() for p in banks.parameters()]

    ref, ref_grads = run(truncate=False)  # full 77-token sequences through open_clip's own blocks
    out, grads = run(shared_context=shared)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    # the prefix really is shared: one pair's abnormal prompt changes only its own output
    learned = banks.fuse(phi, phi * 0.5, -phi).detach().clone()
    learned[0, 1, 0, 0, shared:] += torch.randn_like(learned[0, 1, 0, 0, shared:])  # (a constant would vanish in LN)
    changed = encode_prompts(bb, learned, tokens, shared_context=shared)
    diff = (changed - out).abs().amax(-1)
    assert diff[0, 1, 0, 0] > 1e-3 and diff.flatten().topk(2).values[1] < 1e-5


def test_shared_prefix_falls_back_without_a_causal_mask(tiny_backbone, monkeypatch):
    bb = tiny_backbone
    monkeypatch.setattr(type(bb), "supports_shared_prefix", property(lambda self: False))
    called = []
    monkeypatch.setattr(type(bb), "encode_shared_prefix", lambda *a, **k: called.append(1))
    learned = PromptBanks(1, 2, 2, bb.text_width).fuse(None, None, None)
    out = encode_prompts(bb, learned, class_tokens(bb, ["bottle"]), shared_context=2)
    assert out.shape == (1, 2, 1, 1, bb.embed_dim) and not called


# ------------------------------------------------------------------------------------------ RCA
def test_rca_shape_and_zero_weight_gives_residual_plus_mean():
    torch.manual_seed(0)
    rca = ResidualCrossModalAttention(32)
    z, f = torch.randn(4, 6, 2, 32), torch.randn(4, 6, 49, 32)
    assert rca(z, f).shape == (4, 6, 2, 32)
    torch.nn.init.zeros_(rca.query.weight)
    attn = rca.attention(z, f)
    torch.testing.assert_close(attn, torch.full_like(attn, 1 / 49))
    torch.testing.assert_close(rca(z, f), z + f.mean(-2, keepdim=True).expand_as(z))


def test_rca_equals_equation_10():
    torch.manual_seed(1)
    C = 24
    rca = ResidualCrossModalAttention(C)
    z, f = torch.randn(2, C), torch.randn(30, C)
    W = rca.query.weight.T  # Q = Z W
    ref = z + torch.softmax((z @ W) @ f.T / C ** 0.5, dim=-1) @ f
    torch.testing.assert_close(rca(z, f), ref)
    # released variant: 4 heads over C/4 dims each, scale still 1/sqrt(C), bias, output L2-normalised
    rel = ResidualCrossModalAttention(C, heads=4, bias=True, normalize_output=True)
    q = rel.query(z)
    outs = [torch.softmax(q[:, h * 6:(h + 1) * 6] @ f[:, h * 6:(h + 1) * 6].T / C ** 0.5, -1) @ f[:, h * 6:(h + 1) * 6]
            for h in range(4)]
    torch.testing.assert_close(rel(z, f), F.normalize(z + torch.cat(outs, -1), dim=-1))


# ------------------------------------------------------------------------------------------ model
def test_forward_backward_gradients_reach_every_trainable_part_and_no_clip_weight(tiny_backbone):
    model = make_model(tiny_backbone, n_prompts=3).train()
    images = torch.randn(2, 3, 224, 224)
    out = model(images, NAMES, n_samples=2)
    assert out.anomaly_map.shape == (2, 224, 224) and out.image_score.shape == (2,)
    assert out.pair_maps.shape == (2, 4, 2 * 3, 224, 224)
    assert set(out.kl) == {"context", "normal", "abnormal"}
    masks = torch.zeros(2, 224, 224)
    masks[1, 50:90, 60:100] = 1
    losses = model.loss(out, masks, torch.tensor([0, 1]))
    assert all(torch.isfinite(v) for v in losses.values())
    losses["total"].backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    groups = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"prompts", "context_flow", "normal_flow", "rca", "patch_projections", "patch_to_global",
            "normal_xi", "abnormal_xi"} <= groups


def test_anomaly_map_is_the_mean_of_all_pair_maps_and_streaming_matches(tiny_backbone):
    model = make_model(tiny_backbone).eval()
    images = torch.randn(2, 3, 224, 224)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        full = model(images, NAMES, n_samples=3, generator=g(), return_pair_maps=True, return_layer_maps=True,
                     return_sample_maps=True)
        streamed = model(images, NAMES, n_samples=3, generator=g(), return_layer_maps=True,
                         return_sample_maps=True)
    assert streamed.pair_maps is None
    torch.testing.assert_close(full.anomaly_map, full.pair_maps.mean(dim=(1, 2)))
    torch.testing.assert_close(streamed.anomaly_map, full.anomaly_map, atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed.layer_maps, full.layer_maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed.sample_maps, full.sample_maps, atol=1e-6, rtol=0)
    torch.testing.assert_close(streamed.sample_maps.mean(1), streamed.anomaly_map, atol=1e-6, rtol=0)
    # Eq. 11: a pair map is the 2-way softmax of the upsampled normal/abnormal logits
    assert ((full.pair_maps >= 0) & (full.pair_maps <= 1)).all()
    # s = s_text + max(M)
    torch.testing.assert_close(full.image_score, full.text_score + full.anomaly_map.flatten(1).max(1).values)


def test_text_score_equals_the_papers_formula(tiny_backbone):
    """§3.5: s_text = 1/(BR) Σ_b Σ_r softmax(x̃ Z̃ᵀ_{b,r})[abnormal], x = x_cls + x_patch,
    x_patch = Linear(GAP(concat_l F^I_l)); Z_{b,r} = the normal/abnormal text embeddings of prompt b, draw r
    (the fused prompts of Eq. 8-9 through the text encoder); logits scaled by CLIP's τ = 1/0.07."""
    model = make_model(tiny_backbone, n_prompts=2, flow_length=2).eval()
    images = torch.randn(2, 3, 224, 224)
    R, B = 3, 2
    with torch.no_grad():
        out = model(images, NAMES, n_samples=R, generator=torch.Generator().manual_seed(0))
        feats = tiny_backbone.encode_image(images)
        patches = [F.normalize(tok @ proj.weight.T, dim=-1)
                   for proj, tok in zip(model.patch_projections, feats.patch_tokens)]
        gap = torch.cat([p.mean(1) for p in patches], dim=-1)  # concat over layers, then average over positions
        x = feats.cls + gap @ model.patch_to_global.weight.T + model.patch_to_global.bias
        assert out.text_embeddings.shape == (2, 2, R, B, tiny_backbone.embed_dim)
        for n in range(2):
            probs = []
            for b in range(B):
                for r in range(R):
                    z = out.text_embeddings[n, :, r, b]  # [2, C]: normal, abnormal
                    cos = torch.stack([F.cosine_similarity(x[n], z[0], dim=0), F.cosine_similarity(x[n], z[1], dim=0)])
                    torch.testing.assert_close(out.image_logits[n, :, r, b], cos / 0.07, atol=1e-4, rtol=0)
                    e = torch.exp(cos / 0.07 - (cos / 0.07).max())
                    probs.append(e[1] / e.sum())
            s_text = sum(probs) / (B * R)
            torch.testing.assert_close(out.text_score[n], s_text, atol=1e-6, rtol=0)
    # the scores are not trivially equal across images (a broken average would hide there)
    assert (out.text_score[0] - out.text_score[1]).abs() > 1e-6


def test_pair_map_equals_softmax_of_upsampled_logits(tiny_backbone):
    """Independent computation of Eq. 10-11 for layer 0, pair 0."""
    model = make_model(tiny_backbone, flow_length=2).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(images, ["bottle"], n_samples=1, generator=torch.Generator().manual_seed(0),
                    return_pair_maps=True)
        feats = tiny_backbone.encode_image(images)
        f0 = F.normalize(model.patch_projections[0](feats.patch_tokens[0]), dim=-1)[0]  # [HW, C]
        z = out.text_embeddings[0, :, 0, 0]  # [2, C] normal, abnormal
        zr = F.normalize(model.rca(z, f0), dim=-1)
        logits = (1 / 0.07) * f0 @ zr.T  # [HW, 2]
        grid = logits.T.reshape(1, 2, 16, 16)
        up = F.interpolate(grid, size=(224, 224), mode="bilinear", align_corners=False)
        ref = torch.softmax(up, dim=1)[0, 1]
    torch.testing.assert_close(out.pair_maps[0, 0, 0], ref, atol=1e-5, rtol=0)


def test_n_samples_changes_spread_and_seed_reproduces(tiny_backbone):
    model = make_model(tiny_backbone).eval()
    images = torch.randn(2, 3, 224, 224)
    run = lambda R, seed: model(images, NAMES, n_samples=R, generator=torch.Generator().manual_seed(seed))  # noqa
    with torch.no_grad():
        a1, a1b, a10 = run(1, 0), run(1, 0), run(10, 0)
        b1 = run(1, 1)
    torch.testing.assert_close(a1.anomaly_map, a1b.anomaly_map, atol=0, rtol=0)
    assert not torch.allclose(a1.anomaly_map, a10.anomaly_map)
    assert not torch.allclose(a1.anomaly_map, b1.anomaly_map)


def test_batch_of_images_equals_one_at_a_time_without_sampling(tiny_backbone):
    model = make_model(tiny_backbone, context_distribution="none", state_distribution="none").eval()
    images = torch.randn(3, 3, 224, 224)
    names = ["bottle", "pcb1", "grass"]
    with torch.no_grad():
        batched = model(images, names, n_samples=2)
        single = [model(images[i:i + 1], names[i:i + 1], n_samples=2) for i in range(3)]
    torch.testing.assert_close(batched.anomaly_map, torch.cat([s.anomaly_map for s in single]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.image_score, torch.cat([s.image_score for s in single]), atol=1e-5, rtol=0)


def test_trainable_state_excludes_clip_and_round_trips(tiny_backbone):
    a = make_model(tiny_backbone)
    state = a.trainable_state_dict()
    assert state and not any(k.startswith("backbone.") for k in state)
    n_clip = sum(p.numel() for p in tiny_backbone.parameters())
    assert sum(v.numel() for v in state.values()) < n_clip
    torch.manual_seed(5)
    b = BayesPFL(a.config, backbone=tiny_backbone)
    assert not torch.equal(b.prompts.context, a.prompts.context)
    b.load_trainable_state_dict(state)
    for k, v in b.trainable_state_dict().items():
        torch.testing.assert_close(v, state[k])
    with pytest.raises(KeyError, match="missing"):
        b.load_trainable_state_dict({k: v for k, v in state.items() if "rca" not in k})


def test_text_ensemble_mode(tiny_backbone):
    model = make_model(tiny_backbone, ensemble="text").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224), NAMES, n_samples=3, return_pair_maps=True)
    assert out.text_embeddings.shape[2:4] == (1, 1) and out.pair_maps.shape[2] == 1
    torch.testing.assert_close(out.text_embeddings.norm(dim=-1), torch.ones(2, 2, 1, 1))


@pytest.mark.parametrize("context,state", [("none", "iad"), ("isd", "none"), ("none", "none"), ("iad", "iad"),
                                           ("isd", "isd")])
def test_distribution_ablations_train(tiny_backbone, context, state):
    model = make_model(tiny_backbone, context_distribution=context, state_distribution=state).train()
    out = model(torch.randn(2, 3, 224, 224), NAMES)
    losses = model.loss(out, torch.zeros(2, 224, 224), torch.tensor([0, 1]))
    expected = ({"context"} if context != "none" else set()) | ({"normal", "abnormal"} if state != "none" else set())
    assert set(out.kl) == expected
    losses["total"].backward()
    assert torch.isfinite(losses["total"])


def test_text_side_in_sample_chunks_equals_one_pass(monkeypatch):
    """At inference the prompts are encoded TEXT_CHUNK_SAMPLES samples at a time (bounded memory in R): the
    result equals one pass over all R samples."""
    import bpfl.prompts as P
    from bpfl.backbone import load_backbone
    from bpfl.config import BayesPFLConfig
    from bpfl.model import BayesPFL

    torch.manual_seed(0)
    bb = load_backbone("bpfl-tiny", None, image_size=64, layers=(1, 2, 3, 4), device="cpu")
    model = BayesPFL(BayesPFLConfig.teaching(image_size=64, layers=(1, 2, 3, 4), flow_length=2), backbone=bb).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        monkeypatch.setattr(P, "TEXT_CHUNK_SAMPLES", 3)
        chunked = model(images, ["brick", "grass"], n_samples=7, generator=torch.Generator().manual_seed(1))
        monkeypatch.setattr(P, "TEXT_CHUNK_SAMPLES", 100)
        whole = model(images, ["brick", "grass"], n_samples=7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked.anomaly_map, whole.anomaly_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.image_score, whole.image_score, rtol=1e-5, atol=1e-6)
