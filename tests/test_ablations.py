"""Each ablation of Table 2 / Figure 5 (``bpfl.config.ABLATIONS``) removes exactly its part, and nothing else.

The model is built the public way (``with_ablations(config, [name])``) on the tiny random backbone. Three kinds
of check, each against something written out here rather than read back from ``bpfl.model``:

* an explicit forward pass (paper §3.5, Eq. 10-12 and the text score), wired by this file from the model's
  parameters and the flow samples the model drew, with the ablated part left out *by this file's own reading of
  the ablation* (:data:`ABLATION_PARTS`); the model's outputs must equal it;
* which prompt tokens depend on the image and on the random seed (ISD: image-specific, IAD: image-agnostic,
  none: the bank's vectors exactly);
* against the full model with the same weights and inputs: what must change changes, what must stay stays.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from bpfl.backbone import ImageFeatures
from bpfl.config import ABLATIONS, BayesPFLConfig, with_ablations
from bpfl.flow import flow_kl
from bpfl.model import BayesPFL

NAMES = ["bottle", "pcb1"]
R = 2  # Monte-Carlo samples at test time
B = 2  # prompts per bank

#: The full model's parts, in this file's own words (paper §3.3-3.6).
FULL_PARTS = dict(context="isd", states="iad", rca=True, ort=True, x_cls=True, x_patch=True, s_text=True,
                  s_img=True)

#: What each named ablation removes or swaps (paper Table 2 and Figure 5), independent of bpfl.config.ABLATIONS.
ABLATION_PARTS: dict[str, dict] = {
    "no-isd": {"context": "none"},
    "no-iad": {"states": "none"},
    "no-isd-iad": {"context": "none", "states": "none"},
    "no-rca": {"rca": False},
    "no-ort": {"ort": False},
    "no-x-cls": {"x_cls": False},
    "no-x-patch": {"x_patch": False},
    "no-s-text": {"s_text": False},
    "no-s-img": {"s_img": False},
    "isd-isd": {"states": "isd"},
    "iad-iad": {"context": "iad"},
}
ALL = [None, *ABLATION_PARTS]


def parts(name: str | None) -> dict:
    return {**FULL_PARTS, **(ABLATION_PARTS[name] if name else {})}


def test_every_ablation_is_covered_here():
    assert set(ABLATION_PARTS) == set(ABLATIONS)


# ------------------------------------------------------------------------------------------------ helpers
def build(backbone, name: str | None, like: BayesPFL | None = None) -> BayesPFL:
    """The teaching config with ablation ``name``; with ``like``: its weights wherever the two share a part."""
    torch.manual_seed(0)
    cfg = BayesPFLConfig.teaching(n_prompts=B, flow_length=3, test_samples=R)
    if name is not None:
        cfg = with_ablations(cfg, [name])
    model = BayesPFL(cfg, backbone=backbone).eval()
    if like is not None:
        own, theirs = model.trainable_state_dict(), like.trainable_state_dict()
        model.load_trainable_state_dict({k: theirs.get(k, v) for k, v in own.items()})
    return model


@pytest.fixture(scope="module")
def feats(tiny_backbone) -> ImageFeatures:
    torch.manual_seed(1)
    with torch.no_grad():
        return tiny_backbone.encode_image(torch.randn(2, 3, 224, 224))


def perturbed(f: ImageFeatures, cls: bool = True, patches: bool = True) -> ImageFeatures:
    g = torch.Generator().manual_seed(7)
    new_cls = f.cls + torch.randn(f.cls.shape, generator=g) if cls else f.cls
    new_tokens = [t + torch.randn(t.shape, generator=g) for t in f.patch_tokens] if patches else f.patch_tokens
    return ImageFeatures(new_cls, new_tokens, f.grid)


@contextlib.contextmanager
def recording(model: BayesPFL):
    """Record each prompt flow's input ξ and its FlowSample, and the fused prompt tokens (Eq. 8-9)."""
    seen: dict = {"flows": {}, "learned": None}
    handles = []
    for name in ("context", "normal", "abnormal"):
        flow = getattr(model, f"{name}_flow")
        if flow is not None:
            handles.append(flow.register_forward_hook(
                lambda mod, args, out, name=name: seen["flows"].__setitem__(name, (args[0].detach().clone(), out))))
    fuse = model.prompts.fuse

    def fuse_and_record(*args):
        seen["learned"] = fuse(*args)
        return seen["learned"]
    model.prompts.fuse = fuse_and_record
    try:
        yield seen
    finally:
        del model.prompts.fuse
        for h in handles:
            h.remove()


def run(model: BayesPFL, f: ImageFeatures, seed: int = 0):
    with recording(model) as seen, torch.no_grad():
        out = model(None, NAMES, R, features=f, generator=torch.Generator().manual_seed(seed))
    return out, seen


def explicit_forward(model: BayesPFL, f: ImageFeatures, samples: dict, p: dict) -> dict:
    """Paper §3.1, 3.5, Eq. 10-12 written out, with the parts ``p`` says are absent left out.

    x_patch = Linear(concat_l GAP(F_l)), F_l = normalize(W_l · tokens_l); x = x_cls + x_patch;
    s_text = 1/(BR) Σ_{b,r} softmax(τ [x̂·t̂ⁿ, x̂·t̂ᵃ])[abnormal];
    M = 1/(LBR) Σ_{l,b,r} softmax(Up(τ F_l Ẑᵀ))[abnormal], Z = t + softmax(Z W F_lᵀ/√C) F_l (RCA, Eq. 10)
    or Z = t;
    s = s_text + max(M).
    """
    tau = model.config.temperature
    n_images = f.cls.shape[0]
    patches = [F.normalize(tok @ proj.weight.T, dim=-1) for proj, tok in zip(model.patch_projections, f.patch_tokens)]
    lin = model.patch_to_global
    x_patch = torch.cat([pl.mean(1) for pl in patches], dim=-1) @ lin.weight.T + lin.bias
    x = torch.zeros_like(f.cls)
    if p["x_cls"]:
        x = x + f.cls
    if p["x_patch"]:
        x = x + x_patch
    phis = {"context": samples["context"][1].zk if p["context"] != "none" else None,
            "normal": samples["normal"][1].zk if p["states"] != "none" else None,
            "abnormal": samples["abnormal"][1].zk if p["states"] != "none" else None}
    text = model.encode_prompts(NAMES, phis)  # [N, 2, R, B, C] (Eq. 8-9; checked in tests/test_model.py)
    # with no distribution at all there is nothing to sample: the R identical draws are one
    n_draws = R if any(v is not None for v in phis.values()) else 1
    assert text.shape == (n_images, 2, n_draws, B, model.backbone.embed_dim)
    H, W = f.grid
    S = model.backbone.image_size
    s_text = torch.zeros(n_images)
    amap = torch.zeros(n_images, S, S)
    for n in range(n_images):
        xn = F.normalize(x[n], dim=0)
        for r in range(n_draws):
            for b in range(B):
                t_normal, t_abnormal = text[n, 0, r, b], text[n, 1, r, b]
                logits = tau * torch.stack([xn @ F.normalize(t_normal, dim=0), xn @ F.normalize(t_abnormal, dim=0)])
                s_text[n] += torch.softmax(logits, 0)[1] / (B * n_draws)
                for pl in patches:
                    z = torch.stack([t_normal, t_abnormal])  # [2, C]
                    if p["rca"]:
                        attention = torch.softmax((z @ model.rca.query.weight.T) @ pl[n].T / z.shape[1] ** 0.5, -1)
                        z = z + attention @ pl[n]
                    z = F.normalize(z, dim=-1)
                    grid = (tau * pl[n] @ z.T).T.reshape(1, 2, H, W)
                    up = F.interpolate(grid, size=(S, S), mode="bilinear", align_corners=False)
                    amap[n] += torch.softmax(up, dim=1)[0, 1] / (len(patches) * n_draws * B)
    s_img = amap.flatten(1).max(1).values
    score = (s_text if p["s_text"] else 0.0) + (s_img if p["s_img"] else 0.0)
    return dict(x=x, text=text, text_score=s_text, anomaly_map=amap, map_max=s_img, image_score=score)


def expected_flows(p: dict) -> set[str]:
    return ({"context"} if p["context"] != "none" else set()) | ({"normal", "abnormal"} if p["states"] != "none"
                                                                else set())


# ---------------------------------------------------------------------------------- the explicit forward
@pytest.mark.parametrize("name", ALL)
def test_forward_equals_the_explicit_computation_without_the_removed_part(tiny_backbone, feats, name):
    p = parts(name)
    model = build(tiny_backbone, name)
    out, seen = run(model, feats)
    flows = seen["flows"]
    assert set(flows) == expected_flows(p)
    assert set(out.kl) == expected_flows(p)
    ref = explicit_forward(model, feats, flows, p)
    # what each distribution is conditioned on (§3.3): ISD on the image embedding x, IAD on a free vector
    n_images = feats.cls.shape[0]
    if p["context"] == "isd":
        torch.testing.assert_close(flows["context"][0], ref["x"], atol=1e-6, rtol=0)
    elif p["context"] == "iad":
        torch.testing.assert_close(flows["context"][0], model.context_xi.detach().expand(n_images, -1))
    if p["states"] == "isd":
        torch.testing.assert_close(flows["normal"][0], ref["x"], atol=1e-6, rtol=0)
        torch.testing.assert_close(flows["abnormal"][0], ref["x"], atol=1e-6, rtol=0)
    elif p["states"] == "iad":
        torch.testing.assert_close(flows["normal"][0], model.normal_xi.detach().expand(n_images, -1))
        torch.testing.assert_close(flows["abnormal"][0], model.abnormal_xi.detach().expand(n_images, -1))
    for name_ in flows:
        torch.testing.assert_close(out.kl[name_], flow_kl(flows[name_][1]))
    torch.testing.assert_close(out.text_embeddings, ref["text"], atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_score, ref["text_score"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.anomaly_map, ref["anomaly_map"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.map_max, ref["map_max"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.image_score, ref["image_score"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_removed_parts_hold_no_parameters(tiny_backbone, name):
    p = parts(name)
    full = set(build(tiny_backbone, None).trainable_state_dict())
    keys = set(build(tiny_backbone, name).trainable_state_dict())
    removed = set()
    if p["context"] == "none":
        removed |= {k for k in full if k.startswith("context_flow.")}
    if p["states"] == "none":
        removed |= {k for k in full if k.startswith(("normal_flow.", "abnormal_flow."))}
    if p["states"] != "iad":
        removed |= {"normal_xi", "abnormal_xi"}
    if not p["rca"]:
        removed |= {k for k in full if k.startswith("rca.")}
    added = {"context_xi"} if p["context"] == "iad" else set()
    assert keys == (full - removed) | added


# --------------------------------------------------------------------------- what the prompts depend on
def _token_parts(model: BayesPFL, learned: torch.Tensor) -> dict[str, torch.Tensor]:
    n_context = model.prompts.n_context
    return {"context": learned[..., :n_context, :], "normal": learned[:, 0, ..., n_context:, :],
            "abnormal": learned[:, 1, ..., n_context:, :]}


@pytest.mark.parametrize("name", ALL)
def test_prompt_tokens_depend_on_the_image_and_the_seed_exactly_as_the_ablation_says(tiny_backbone, feats, name):
    """Eq. 8-9: context tokens E + φᵉ, state tokens S + φ. Without a distribution the tokens are the bank's
    vectors exactly; an ISD sample changes with the image, an IAD sample does not; every sample changes with
    the seed."""
    p = parts(name)
    model = build(tiny_backbone, name)
    base = _token_parts(model, run(model, feats, seed=0)[1]["learned"])
    other_seed = _token_parts(model, run(model, feats, seed=1)[1]["learned"])
    other_image = _token_parts(model, run(model, perturbed(feats), seed=0)[1]["learned"])
    bank = {"context": model.prompts.context, "normal": model.prompts.state_normal,
            "abnormal": model.prompts.state_abnormal}
    for which in ("context", "normal", "abnormal"):
        dist = p["context"] if which == "context" else p["states"]
        tokens = base[which]
        if dist == "none":
            assert torch.equal(tokens, bank[which].detach().expand_as(tokens)), which
        else:
            assert not torch.allclose(tokens, bank[which].detach().expand_as(tokens)), which
        assert torch.equal(tokens, other_seed[which]) == (dist == "none"), which
        assert torch.equal(tokens, other_image[which]) == (dist != "isd"), which


# ------------------------------------------------------------------ against the full model, same weights
def test_no_x_cls_the_isd_no_longer_sees_x_cls(tiny_backbone, feats):
    full = build(tiny_backbone, None)
    ablated = build(tiny_backbone, "no-x-cls", like=full)
    moved = perturbed(feats, cls=True, patches=False)
    for model, depends in ((full, True), (ablated, False)):
        a, seen_a = run(model, feats)
        b, seen_b = run(model, moved)
        xi_a, xi_b = seen_a["flows"]["context"][0], seen_b["flows"]["context"][0]
        assert torch.equal(xi_a, xi_b) == (not depends)
        # without x_cls nothing downstream of the image sees it: text, s_text and maps are all unchanged
        for field in ("text_embeddings", "text_score", "anomaly_map", "image_score"):
            assert torch.equal(getattr(a, field), getattr(b, field)) == (not depends), field
    # and the ablated ISD input is x_patch alone, the same vector the full model adds to x_cls
    xi_full = run(full, feats)[1]["flows"]["context"][0]
    xi_ablated = run(ablated, feats)[1]["flows"]["context"][0]
    torch.testing.assert_close(xi_full - feats.cls, xi_ablated, atol=1e-6, rtol=0)


def test_no_x_patch_the_isd_sees_x_cls_alone(tiny_backbone, feats):
    full = build(tiny_backbone, None)
    ablated = build(tiny_backbone, "no-x-patch", like=full)
    moved = perturbed(feats, cls=False, patches=True)
    for model, depends in ((full, True), (ablated, False)):
        a, seen_a = run(model, feats)
        b, seen_b = run(model, moved)
        assert torch.equal(seen_a["flows"]["context"][0], seen_b["flows"]["context"][0]) == (not depends)
        assert torch.equal(a.text_embeddings, b.text_embeddings) == (not depends)
        assert torch.equal(a.text_score, b.text_score) == (not depends)  # s_text uses x = x_cls only
        assert not torch.equal(a.anomaly_map, b.anomaly_map)  # the maps still use the patches (Eq. 11)
    torch.testing.assert_close(run(ablated, feats)[1]["flows"]["context"][0], feats.cls)


def test_no_rca_changes_the_maps_only(tiny_backbone, feats):
    full = build(tiny_backbone, None)
    ablated = build(tiny_backbone, "no-rca", like=full)
    a, b = run(full, feats)[0], run(ablated, feats)[0]
    torch.testing.assert_close(b.text_embeddings, a.text_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(b.text_score, a.text_score, atol=0, rtol=0)
    assert (b.anomaly_map - a.anomaly_map).abs().max() > 1e-3  # RCA really acts on the maps


@pytest.mark.parametrize("name,score", [("no-s-text", "map_max"), ("no-s-img", "text_score")])
def test_score_ablations_change_the_image_score_only(tiny_backbone, feats, name, score):
    full = build(tiny_backbone, None)
    ablated = build(tiny_backbone, name, like=full)
    a, b = run(full, feats)[0], run(ablated, feats)[0]
    for field in ("text_embeddings", "text_score", "anomaly_map", "map_max"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=0, rtol=0, msg=field)
    torch.testing.assert_close(b.image_score, getattr(b, score), atol=0, rtol=0)  # s = s_img or s = s_text
    torch.testing.assert_close(a.image_score, a.text_score + a.map_max)
    assert (a.image_score - b.image_score).abs().min() > 1e-3


def _train_losses(model: BayesPFL, f: ImageFeatures) -> tuple[dict, dict]:
    masks = torch.zeros(2, 224, 224)
    masks[1, 60:120, 80:140] = 1.0
    model.train()
    try:
        with recording(model) as seen, torch.no_grad():
            g = torch.Generator().manual_seed(0)
            out = model(None, NAMES, features=f, generator=g)
            losses = model.loss(out, masks, torch.tensor([0, 1]), generator=g)
    finally:
        model.eval()
    return losses, seen


@pytest.mark.parametrize("name", ALL)
def test_loss_has_exactly_the_terms_of_the_parts_present(tiny_backbone, feats, name):
    """Eq. 14 = cls + focal + dice + L_ort + Σ KL (all weights 1 in the teaching config)."""
    p = parts(name)
    model = build(tiny_backbone, name)
    losses, seen = _train_losses(model, feats)
    kl_terms = {f"kl_{n}" for n in expected_flows(p)}
    expected = {"cls", "focal", "dice", "seg", "total"} | ({"ort"} if p["ort"] else set()) | kl_terms \
        | ({"flow"} if kl_terms else set())
    assert set(losses) == expected
    for n in expected_flows(p):
        torch.testing.assert_close(losses[f"kl_{n}"], flow_kl(seen["flows"][n][1]))
    total = sum(losses[k] for k in ("cls", "focal", "dice", "ort", *sorted(kl_terms)) if k in losses)
    torch.testing.assert_close(losses["total"], total)


def test_no_ort_drops_the_orthogonal_term_and_keeps_every_other(tiny_backbone, feats):
    full = build(tiny_backbone, None)
    ablated = build(tiny_backbone, "no-ort", like=full)
    a, _ = _train_losses(full, feats)
    b, _ = _train_losses(ablated, feats)
    assert "ort" not in b and float(a["ort"]) > 0
    for k in set(a) - {"ort", "total"}:
        torch.testing.assert_close(b[k], a[k], atol=0, rtol=0, msg=k)
    torch.testing.assert_close(b["total"], a["total"] - full.config.ort_weight * a["ort"])
