"""Loading the authors' released checkpoints (reference-implementation.md §10) into the kit.

The real files cannot be downloaded here, so the tests build state dicts with exactly the documented keys and
shapes: at full size on the meta device (ViT-L-14-336, never materialised) for the key/shape map, and at the
tiny backbone's width (C = 64, V = 128) with random values for loading, semantics and a forward pass.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from bpfl import load_reference_checkpoint
from bpfl.config import BayesPFLConfig
from bpfl.reference import export_reference_state_dict, map_reference_state_dict, reference_layout

SIZE = 112


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def documented_layout(C=768, V=1024, H=512, K=10, B=3, P=5, Q=5, L=4) -> dict[str, tuple]:
    """The released ``Context_Prompting`` keys and shapes, spelled out from reference-implementation.md §10."""
    keys: dict[str, tuple] = {
        "prompt_context": (B, P, C), "prompt_state_normal": (B, Q, C), "prompt_state_abnormal": (B, Q, C),
        "temperature_pixel": (), "temperature_image": (),
    }
    mlp = {0: (H, C), 2: (H, H), 4: (C, H)}
    encoders = ["context_encoder", "state_encoder", "PFL_context.encoder", "PFL_normal.encoder", "PFL_abnormal.encoder"]
    decoders = ["context_decoder", "state_decoder", "PFL_context.decoder", "PFL_normal.decoder", "PFL_abnormal.decoder"]
    for prefix in encoders + decoders:
        heads = ["weight_mean", "weight_log_variance"] if prefix in encoders else ["weight_mean"]
        for head in heads:
            for i, shape in mlp.items():
                keys[f"{prefix}.{head}.module.{i}.weight"] = shape
                keys[f"{prefix}.{head}.module.{i}.bias"] = (shape[0],)
    for pfl in ("PFL_context", "PFL_normal", "PFL_abnormal"):
        keys[f"{pfl}.p_mu.0.weight"], keys[f"{pfl}.p_mu.0.bias"] = (C, C), (C,)
    keys["PFL_context.amor_u.weight"], keys["PFL_context.amor_u.bias"] = (K * C, C), (K * C,)
    keys["PFL_context.amor_w.weight"], keys["PFL_context.amor_w.bias"] = (K * C, C), (K * C,)
    keys["PFL_context.amor_b.weight"], keys["PFL_context.amor_b.bias"] = (K, C), (K,)
    for pfl in ("PFL_normal", "PFL_abnormal"):
        keys.update({f"{pfl}.amor_u": (1, K, C, 1), f"{pfl}.amor_w": (1, K, 1, C), f"{pfl}.amor_b": (1, K, 1, 1),
                     f"{pfl}.state": (1, C)})
    keys["fuse.fuse_modules.weight"], keys["fuse.fuse_modules.bias"] = (V // 2, L * V), (V // 2,)
    keys["fuse.compress.weight"], keys["fuse.compress.bias"] = (1, V // 2), (1,)
    keys["fuse.post_process.weight"], keys["fuse.post_process.bias"] = (C, V // 2), (C,)
    keys["RCA.q_proj_pre.weight"], keys["RCA.q_proj_pre.bias"] = (C, C, 1), (C,)
    for l in range(L):
        keys[f"RCA.linear_proj.{l}.weight"] = (C, V)
    for m in ("class_mapping", "image_mapping"):
        keys[f"{m}.weight"], keys[f"{m}.bias"] = (C, C), (C,)
    return keys


def synthetic_released(seed=0, **dims) -> dict[str, torch.Tensor]:
    """Random values in the documented layout, with the duplicated modules stored as equal copies."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: 0.05 * torch.randn(s, generator=g) for k, s in documented_layout(**dims).items()}
    sd["temperature_pixel"] = torch.tensor(math.log(1 / 0.07)) + 0.1
    sd["temperature_image"] = torch.tensor(math.log(1 / 0.07)) - 0.2
    for k in list(sd):
        m = re.fullmatch(r"(context|state)_encoder\.(.+)", k)
        if m:
            sd[k] = sd[("PFL_context" if m.group(1) == "context" else "PFL_normal") + ".encoder." + m.group(2)].clone()
        m = re.fullmatch(r"PFL_abnormal\.encoder\.(.+)", k)
        if m:
            sd[k] = sd["PFL_normal.encoder." + m.group(1)].clone()
    return sd


TINY = dict(C=64, V=128, H=64)


@pytest.fixture(scope="module")
def loaded(bb):
    sd = synthetic_released(**TINY)
    model, report = load_reference_checkpoint({"MyModel": sd}, backbone=bb, return_report=True)
    return sd, model, report


# ------------------------------------------------------------------------------------------ full size, meta device
def test_full_size_layout_maps_onto_the_released_preset_with_nothing_left_over():
    import open_clip

    from bpfl.backbone import ClipBackbone
    from bpfl.model import BayesPFL

    doc = documented_layout()
    assert reference_layout() == doc  # the kit's layout function is §10
    cfg = BayesPFLConfig.released_code()
    with torch.device("meta"):  # ViT-L-14-336 at 518 px without materialising a single weight
        clip = open_clip.create_model(cfg.backbone, pretrained=None, force_image_size=cfg.image_size,
                                      force_quick_gelu=False, device="meta")
    bb = ClipBackbone(clip, open_clip.get_tokenizer(cfg.backbone), name=cfg.backbone, pretrained=None,
                      layers=cfg.layers, image_size=cfg.image_size)  # (the tokenizer must run off the meta device)
    with torch.device("meta"):
        model = BayesPFL(cfg, backbone=bb)
    assert all(p.is_meta for p in model.parameters())
    assert (bb.embed_dim, bb.vision_width, bb.grid_size) == (768, 1024, (37, 37))
    sd = {k: torch.empty(s, device="meta") for k, s in doc.items()}
    kit_state, report = map_reference_state_dict(sd, model)
    kit_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    assert report.ok, report.format()
    assert report.missing_in_kit == [] and report.unknown == [] and report.shape_errors == {}
    assert set(kit_state) == set(kit_shapes) and len(kit_shapes) == 71
    assert all(tuple(kit_state[k].shape) == s for k, s in kit_shapes.items())
    # every released key is accounted for: loaded, a duplicate copy, or unused (decoders, p_mu)
    assert set(report.matched) | set(report.duplicates) | set(report.unused) == set(doc)
    assert len(report.duplicates) == 36 and len(report.unused) == 36 and len(report.matched) == 59
    assert not report.verified_duplicates  # meta tensors cannot be compared
    # §5: about 27M trainable released parameters (copies counted once), about 3.9M of them in the dead
    # decoders / p_mu heads; the kit holds exactly the rest
    size = lambda keys: sum(math.prod(doc[k]) for k in keys)  # noqa: E731
    unused_once = [k for k in report.unused if not k.startswith(("PFL_context.decoder", "PFL_normal.decoder",
                                                                 "PFL_abnormal.decoder"))]
    n_unique = size(report.matched) + size(unused_once)
    assert 26.5e6 < n_unique < 28e6 and 3.7e6 < size(unused_once) < 4.0e6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == size(report.matched)


# ------------------------------------------------------------------------------------------ tiny, real values
def test_synthetic_checkpoint_loads_with_zero_unmatched_kit_parameters_and_runs(bb, loaded):
    sd, model, report = loaded
    assert report.ok and report.missing_in_kit == [] and report.verified_duplicates
    assert model.reference_report is report
    assert set(report.unmatched_in_checkpoint) == set(report.duplicates) | set(report.unused)
    assert all("decoder" in k or "p_mu" in k for k in report.unused)
    assert "unused" in report.format() and "x0.5" not in report.format()  # the preset halves its own head
    cfg = model.config
    released = BayesPFLConfig.released_code()
    for name in ("isd_condition", "isd_amortized", "constrained_flow", "iad_share_flow", "x_patch_pool",
                 "rca_heads", "rca_bias", "rca_normalize_output", "learnable_temperature", "class_mapping",
                 "quick_gelu", "image_score", "map_sigma"):
        assert getattr(cfg, name) == getattr(released, name), name
    images = torch.randn(2, 3, SIZE, SIZE)
    out = model(images, ["brick", "pcb1"], n_samples=3, generator=torch.Generator().manual_seed(0))
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and torch.isfinite(out.anomaly_map).all()
    assert torch.isfinite(out.image_score).all() and out.text_embeddings.shape[2] == 3
    # a kit checkpoint of the loaded model reloads into the same config (log-var scaling is baked into weights)
    from bpfl.model import BayesPFL
    again = BayesPFL(cfg, backbone=bb)
    again.load_trainable_state_dict(model.trainable_state_dict())
    for k, v in model.trainable_state_dict().items():
        torch.testing.assert_close(again.trainable_state_dict()[k], v)


def test_mapping_semantics_match_the_released_computations(loaded):
    sd, model, _ = loaded
    torch.manual_seed(1)
    xi = torch.randn(3, 64)

    def released_mlp(prefix, head, x):  # Linear -> Softplus -> Linear -> Softplus -> Linear
        for i in (0, 2, 4):
            x = F.linear(x, sd[f"{prefix}.{head}.module.{i}.weight"], sd[f"{prefix}.{head}.module.{i}.bias"])
            if i < 4:
                x = F.softplus(x)
        return x

    # encoders: mu = weight_mean(x); released var = exp(0.5 h) -> the kit's log_var = 0.5 h
    for kit, rel in ((model.context_flow, "PFL_context.encoder"), (model.normal_flow, "state_encoder"),
                     (model.abnormal_flow, "state_encoder")):
        mu, log_var = kit.encoder(xi)
        torch.testing.assert_close(mu, released_mlp(rel, "weight_mean", xi))
        torch.testing.assert_close(log_var, 0.5 * released_mlp(rel, "weight_log_variance", xi))
    assert model.normal_flow.encoder is model.abnormal_flow.encoder  # shared, as released
    # ISD amortised flow parameters: u = Linear(x_cls) reshaped K x C
    u, w, b = model.context_flow.flow.step_parameters(xi)
    amor_u = F.linear(xi, sd["PFL_context.amor_u.weight"], sd["PFL_context.amor_u.bias"])
    torch.testing.assert_close(u, amor_u.view(3, 10, 64))
    torch.testing.assert_close(b, F.linear(xi, sd["PFL_context.amor_b.weight"], sd["PFL_context.amor_b.bias"]))
    # IAD free parameters and xi
    for state in ("normal", "abnormal"):
        flow = getattr(model, f"{state}_flow").flow
        torch.testing.assert_close(flow.u, sd[f"PFL_{state}.amor_u"][0, :, :, 0])
        torch.testing.assert_close(flow.w, sd[f"PFL_{state}.amor_w"][0, :, 0, :])
        torch.testing.assert_close(flow.b, sd[f"PFL_{state}.amor_b"].flatten())
        torch.testing.assert_close(getattr(model, f"{state}_xi"), sd[f"PFL_{state}.state"])
        assert flow.constrained is False  # raw u, as released
    # RCA query = the released Conv1d 1x1 over the text embeddings
    z = torch.randn(2, 6, 64)
    conv = F.conv1d(z.transpose(1, 2), sd["RCA.q_proj_pre.weight"], sd["RCA.q_proj_pre.bias"]).transpose(1, 2)
    torch.testing.assert_close(model.rca.query(z), conv)
    for l in range(4):
        torch.testing.assert_close(model.patch_projections[l].weight, sd[f"RCA.linear_proj.{l}.weight"])
    # x_patch: Linear(4V->512) -> softmax over tokens of Linear(512->1) -> weighted sum -> Linear(512->C)
    tokens = torch.randn(2, 7, 4 * 128)
    h = F.linear(tokens, sd["fuse.fuse_modules.weight"], sd["fuse.fuse_modules.bias"])
    a = torch.softmax(F.linear(h, sd["fuse.compress.weight"], sd["fuse.compress.bias"]), dim=1)
    ref = F.linear((a * h).sum(1), sd["fuse.post_process.weight"], sd["fuse.post_process.bias"])
    torch.testing.assert_close(model.patch_to_global(tokens), ref)
    # temperatures are logs (the model multiplies by their exp), prompts and mappings copied as they are
    assert float(model.log_temperature_pixel.detach().exp()) == pytest.approx(math.exp(float(sd["temperature_pixel"])))
    assert float(model.log_temperature_image.detach()) == pytest.approx(float(sd["temperature_image"]))
    torch.testing.assert_close(model.prompts.context, sd["prompt_context"])
    torch.testing.assert_close(model.prompts.state_abnormal, sd["prompt_state_abnormal"])
    torch.testing.assert_close(model.class_mapping.weight, sd["class_mapping.weight"])
    torch.testing.assert_close(model.image_mapping.bias, sd["image_mapping.bias"])


def test_export_is_the_inverse_map(loaded):
    sd, model, _ = loaded
    out = export_reference_state_dict(model)
    assert set(out) == set(sd)
    for k, v in sd.items():
        if "decoder" in k or "p_mu" in k:
            assert out[k].shape == v.shape and not out[k].any()  # written as zeros
        else:
            torch.testing.assert_close(out[k], v.reshape(out[k].shape), rtol=1e-6, atol=1e-7, msg=k)


def test_reading_from_a_file_and_checkpoint_dimensions(bb, tmp_path):
    sd = synthetic_released(seed=3, B=2, K=4, Q=3, **TINY)  # other bank / flow sizes are read off the file
    path = tmp_path / "train_visa.pth"
    torch.save({"MyModel": sd}, path)
    model = load_reference_checkpoint(path, backbone=bb)
    c = model.config
    assert (c.n_prompts, c.n_context, c.n_state, c.flow_length) == (2, 5, 3, 4)
    assert model.reference_report.ok
    with pytest.raises(FileNotFoundError):
        load_reference_checkpoint(tmp_path / "missing.pth", backbone=bb)


def test_inconsistent_or_foreign_checkpoints_are_reported(bb):
    sd = synthetic_released(**TINY)
    bad = dict(sd)
    bad["context_encoder.weight_mean.module.0.weight"] = bad["context_encoder.weight_mean.module.0.weight"] + 1
    with pytest.raises(ValueError, match="DIFFERENT|mismatch"):
        load_reference_checkpoint(bad, backbone=bb)
    _, report = load_reference_checkpoint(bad, backbone=bb, strict=False, return_report=True)
    assert list(report.duplicate_mismatches) == ["context_encoder.weight_mean.module.0.weight"]
    # a missing tensor leaves a kit parameter unfilled; an extra key is unknown
    partial = {k: v for k, v in sd.items() if k != "RCA.q_proj_pre.bias"}
    partial["some_new_head.weight"] = torch.zeros(3)
    _, report = load_reference_checkpoint(partial, backbone=bb, strict=False, return_report=True)
    assert report.missing_in_kit == ["rca.query.bias"] and report.unknown == ["some_new_head.weight"]
    with pytest.raises(ValueError, match="rca.query.bias"):
        load_reference_checkpoint(partial, backbone=bb)
    # only the duplicate copy of an encoder present: it is used instead
    only_copy = {k: v for k, v in sd.items() if not k.startswith("PFL_context.encoder.")}
    model, report = load_reference_checkpoint(only_copy, backbone=bb, return_report=True)
    assert report.ok
    torch.testing.assert_close(model.context_flow.encoder.mean_net[0].weight,
                               sd["context_encoder.weight_mean.module.0.weight"])
    # a backbone of the wrong width is refused with a clear message
    with pytest.raises(ValueError, match="ViT-L-14-336"):
        load_reference_checkpoint(synthetic_released(C=32, V=128, H=64), backbone=bb)


def test_log_variance_head_scaling_follows_the_kits_encoder(bb, loaded):
    sd, model, _ = loaded
    key = "PFL_context.encoder.weight_log_variance.module.4.weight"
    kit_key = "context_flow.encoder.log_var_net.4.weight"
    kit_state, report = map_reference_state_dict(sd, model)
    # the released preset's encoders compute log sigma^2 = 0.5 * head themselves: the head is copied unscaled
    torch.testing.assert_close(kit_state[kit_key], sd[key])
    assert kit_key not in report.transforms
    for enc in (model.context_flow.encoder, model.normal_flow.encoder):
        enc.log_var_scale = 1.0  # an encoder that reads the head as log sigma^2: the loader halves the weights
    try:
        kit_state, _ = map_reference_state_dict(sd, model)
        torch.testing.assert_close(kit_state[kit_key], 0.5 * sd[key])
    finally:
        for enc in (model.context_flow.encoder, model.normal_flow.encoder):
            enc.log_var_scale = 0.5
