"""The CLIP backbone layer: equivalence with open_clip's own forward on the same (random) weights."""
from __future__ import annotations

import json
import time

import open_clip
import pytest
import torch

from bpfl.backbone import (
    ClipBackbone,
    WeightsNotAvailableError,
    build_clip,
    load_backbone,
    load_state_dict_into,
    pick_device,
)

PROMPTS = ["a photo of a damaged bottle", "x grass", "a flawless woven fabric surface with many threads",
           "printed circuit board"]


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    torch.manual_seed(0)
    return load_backbone("bpfl-tiny", None, image_size=224, layers=(1, 2, 3, 4), device="cpu")


def test_tiny_architecture_and_frozen(tiny):
    assert tiny.embed_dim == 64 and tiny.vision_width == 128 and tiny.text_width == 64
    assert tiny.patch_size == 14 and tiny.grid_size == (16, 16)
    assert len(tiny.clip.visual.transformer.resblocks) == 4 and len(tiny.clip.transformer.resblocks) == 4
    assert all(not p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.clip.training


def test_encode_text_equals_open_clip_tiny(tiny):
    ref = tiny.clip.encode_text(tiny.tokenizer(PROMPTS))
    torch.testing.assert_close(tiny.encode_text(PROMPTS), ref, atol=1e-5, rtol=0)


def test_truncated_context_equals_full_77(tiny):
    ids = tiny.tokenize(PROMPTS)
    emb = tiny.embed_tokens(ids)
    eot = tiny.eot_positions(ids)
    assert int(eot.max()) + 1 < 20  # really truncated
    full = tiny.encode_token_embeddings(emb, eot, truncate=False)
    short = tiny.encode_token_embeddings(emb, eot, truncate=True)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=0)
    # and a learned vector spliced after SOT changes the output (the path carries gradients)
    delta = torch.zeros_like(emb, requires_grad=True)
    out = tiny.encode_token_embeddings(emb + delta, eot)
    out.sum().backward()
    assert delta.grad[:, 1].abs().sum() > 0
    assert delta.grad[0, int(eot[0]) + 1:].abs().sum() == 0  # positions after EOT cannot matter


def test_encode_text_equals_open_clip_vit_b16():
    torch.manual_seed(0)
    bb = load_backbone("ViT-B-16", None, image_size=224, layers=(3, 6, 9, 12), device="cpu")
    with torch.no_grad():
        ref = bb.clip.encode_text(bb.tokenizer(PROMPTS))
        mine = bb.encode_text(PROMPTS)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_patch_tokens_equal_forward_hooks(tiny):
    captured = {}
    blocks = tiny.clip.visual.transformer.resblocks
    hooks = [blocks[l - 1].register_forward_hook(lambda m, i, o, l=l: captured.__setitem__(l, o))
             for l in tiny.layers]
    try:
        x = torch.randn(3, 3, 224, 224)
        feats = tiny.encode_image(x)
    finally:
        for h in hooks:
            h.remove()
    assert feats.cls.shape == (3, 64)
    for l, tokens in zip(tiny.layers, feats.patch_tokens):
        hooked = captured[l]
        assert tokens.shape == (3, 256, 128)
        torch.testing.assert_close(tokens, hooked[:, 1:], atol=1e-6, rtol=0)  # CLS dropped, raw stream
    torch.testing.assert_close(feats.cls, tiny.clip.encode_image(x), atol=1e-5, rtol=0)


def test_vit_l14_336_at_518_shapes_without_running():
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14-336", pretrained=None, force_image_size=518, device="meta")
    assert tuple(clip.visual.grid_size) == (37, 37)
    assert tuple(clip.visual.positional_embedding.shape) == (37 * 37 + 1, 1024)
    assert len(clip.visual.transformer.resblocks) == 24
    assert clip.text_projection.shape == (768, 768)
    # what encode_image would return per layer: [N, 1369, 1024]
    assert clip.visual.conv1.out_channels == 1024 and clip.visual.conv1.kernel_size == (14, 14)


@pytest.mark.slow
def test_vit_l14_336_real_forward_at_518():
    bb = load_backbone("ViT-L-14-336", None, image_size=518, device=pick_device())
    feats = bb.encode_image(torch.randn(1, 3, 518, 518))
    assert [tuple(t.shape) for t in feats.patch_tokens] == [(1, 1369, 1024)] * 4
    assert feats.cls.shape == (1, 768)


def _assert_same_weights(clip_a, clip_b, skip=("visual.positional_embedding",)):
    sa, sb = clip_a.state_dict(), clip_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in skip:
            torch.testing.assert_close(sa[k].float(), sb[k].float(), msg=k)


@pytest.mark.parametrize("fmt", ["state_dict", "wrapped", "safetensors", "torchscript"])
def test_checkpoint_saved_at_224_loads_at_518(tmp_path, fmt):
    torch.manual_seed(1)
    src = build_clip("bpfl-tiny", image_size=224)
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "state_dict":
        torch.save(src.state_dict(), path)
    elif fmt == "wrapped":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.jit.script(src).save(str(path))
    bb = load_backbone("bpfl-tiny", str(path), image_size=518, layers=(1, 2, 3, 4), device="cpu")
    pos_old = src.visual.positional_embedding.detach()
    pos_new = bb.clip.visual.positional_embedding.detach()
    assert bb.grid_size == (37, 37) and pos_new.shape == (37 * 37 + 1, 128)
    torch.testing.assert_close(pos_new[0], pos_old[0])  # CLS entry kept
    # the grid is a bicubic resize of the 16x16 grid (independent computation)
    grid = pos_old[1:].reshape(1, 16, 16, 128).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(37, 37), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(pos_new[1:], ref.permute(0, 2, 3, 1).reshape(-1, 128))
    _assert_same_weights(src, bb.clip)


def test_checkpoint_with_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"visual.foo": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="missing keys"):
        load_state_dict_into(build_clip("bpfl-tiny"), path)


def test_local_dir(tmp_path):
    torch.manual_seed(2)
    src = build_clip("bpfl-tiny", image_size=224)
    cfg = {"model_cfg": open_clip.get_model_config("bpfl-tiny"), "preprocess_cfg": {}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save(src.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    bb = load_backbone(f"local-dir:{tmp_path}", image_size=224, layers=(1, 2, 3, 4), device="cpu")
    _assert_same_weights(src, bb.clip, skip=())
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_backbone(f"local-dir:{tmp_path / 'nope'}", image_size=224, layers=(1,), device="cpu")


def test_offline_error_is_fast_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotAvailableError) as err:
        load_backbone("ViT-L-14-336", "openai", image_size=518, device="cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    for needle in ("ViT-L-14-336", "openai", str(tmp_path), "open_clip.create_model('ViT-L-14-336'",
                   "--pretrained", "ViT-L-14-336px.pt"):
        assert needle in msg, needle


def test_unreachable_hub_is_fast_without_offline_flag(monkeypatch, tmp_path):
    import bpfl.backbone as backbone
    for var in ("HF_HUB_OFFLINE", "BPFL_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(backbone, "host_reachable", lambda host, port=443, timeout=0.5: False)
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotAvailableError, match="unreachable"):
        load_backbone("ViT-B-16", "openai", image_size=224, device="cpu", cache_dir=str(tmp_path))
    assert time.perf_counter() - t0 < 1.0


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone("bpfl-tiny", str(tmp_path / "missing.pt"), image_size=224, device="cpu")
    with pytest.raises(ValueError, match="known tags"):
        load_backbone("ViT-B-16", "not-a-tag", image_size=224, device="cpu")


def test_layers_out_of_range():
    with pytest.raises(ValueError, match="out of range"):
        load_backbone("bpfl-tiny", None, image_size=224, layers=(6, 12), device="cpu")


def test_quick_gelu_switch():
    a = load_backbone("bpfl-tiny", None, image_size=224, layers=(1,), device="cpu", quick_gelu=True)
    b = load_backbone("bpfl-tiny", None, image_size=224, layers=(1,), device="cpu", quick_gelu=False)
    act_a = type(a.clip.visual.transformer.resblocks[0].mlp.gelu).__name__
    act_b = type(b.clip.visual.transformer.resblocks[0].mlp.gelu).__name__
    assert act_a == "QuickGELU" and act_b == "GELU"
