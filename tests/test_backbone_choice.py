"""One rule picks the backbone for the demo, train/test/predict and the notebooks (bpfl.backbone_choice).

auto: real CLIP if cached or downloadable -> the bundled toy CLIP; random bpfl-tiny only when asked for by name;
the notes every output carries (random weights: mechanics; toy CLIP off the synthetic set: meaningless).
"""
from __future__ import annotations

import pytest

import bpfl.backbone_choice as C
from bpfl.bundled_weights import BUNDLED_TAG, short_hash
from bpfl.config import BayesPFLConfig
from bpfl.toyclip.pretrain import TOY_BAYESPFL_LR, TOY_IMAGE_SIZE


@pytest.fixture
def no_real_clip(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "cached_weights_file", lambda *a, **k: None)


def test_auto_offline_is_the_bundled_toy_clip(no_real_clip):
    c = C.choose_backbone("auto")
    assert (c.name, c.pretrained, c.image_size, c.kind) == ("bpfl-toy", BUNDLED_TAG, TOY_IMAGE_SIZE, "toy")
    assert c.lr == TOY_BAYESPFL_LR and c.overrides()["lr"] == TOY_BAYESPFL_LR
    assert "HF_HUB_OFFLINE" in c.reason and short_hash() in c.reason
    cfg = BayesPFLConfig.teaching(**c.overrides())
    assert cfg.backbone == "bpfl-toy" and cfg.layers == c.layers and len(cfg.layers) == 4


def test_auto_takes_real_clip_when_cached(monkeypatch):
    monkeypatch.setattr(C, "cached_weights_file", lambda cfg, *a, **k: "/cache/open_clip_model.safetensors")
    c = C.choose_backbone("auto")
    assert (c.name, c.pretrained, c.image_size, c.kind, c.lr) == ("ViT-B-16", "openai", 224, "openai", None)
    assert "cached" in c.reason


def test_auto_takes_real_clip_when_downloadable_but_not_offline(monkeypatch):
    monkeypatch.setattr(C, "cached_weights_file", lambda *a, **k: None)
    monkeypatch.setattr(C, "host_reachable", lambda host, *a, **k: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("BPFL_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert C.choose_backbone("auto").kind == "openai"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline wins over a reachable host
    assert C.choose_backbone("auto").kind == "toy"


def test_random_only_when_asked_by_name(no_real_clip):
    tiny = C.choose_backbone("tiny", image_size=112)
    assert (tiny.name, tiny.pretrained, tiny.image_size, tiny.kind) == ("bpfl-tiny", None, 112, "random")
    assert C.choose_backbone("bpfl-tiny").is_random and "RANDOM" in C.choose_backbone("bpfl-tiny").reason
    assert C.choose_backbone("bpfl-toy", "random").is_random  # an untrained toy architecture, as asked
    assert C.choose_backbone("toy").pretrained == BUNDLED_TAG


def test_a_named_architecture_is_taken_as_given():
    c = C.choose_backbone("ViT-L-14-336", "openai", image_size=518)
    assert (c.name, c.pretrained, c.image_size, c.layers, c.kind) == ("ViT-L-14-336", "openai", 518,
                                                                      (6, 12, 18, 24), "user")


def test_a_missing_toy_file_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"bpfl pretrain-toy-clip --out .*nothere\.pt"):
        C.choose_backbone("toy", str(tmp_path / "nothere.pt"))


def test_run_notes():
    toy = BayesPFLConfig.teaching(backbone="bpfl-toy", pretrained=BUNDLED_TAG)
    assert C.run_notes(toy, synthetic_data=True) == []
    assert C.run_notes(toy, synthetic_data=False) == [C.TOY_CLIP_OFF_DOMAIN_NOTE]
    assert "mean nothing" in C.TOY_CLIP_OFF_DOMAIN_NOTE
    rnd = BayesPFLConfig.teaching()
    assert C.run_notes(rnd) == [C.RANDOM_BACKBONE_NOTE] == C.run_notes(rnd, synthetic_data=False)
    assert C.run_notes(BayesPFLConfig.paper(), synthetic_data=False) == []
    assert C.run_notes(C.choose_backbone("tiny")) == [C.RANDOM_BACKBONE_NOTE]


def test_demo_cli_and_notebooks_use_the_one_rule(no_real_clip, monkeypatch):
    """The CLI's train config, the notebooks' fast mode and the demo all build from choose_backbone."""
    import argparse

    from bpfl import cli
    from bpfl.notebook import fast_backbone
    monkeypatch.delenv("BPFL_FAST_BACKBONE", raising=False)
    over, why = fast_backbone()
    assert over == C.choose_backbone("auto", image_size=112).overrides() and short_hash() in why
    args = argparse.Namespace(preset="teaching", backbone=None, image_size=None, epochs=None, batch_size=None,
                              lr=None, seed=None, pretrained=None, layers=None, samples=None, precision=None,
                              prompt_design=None, set=None, ablation=None)
    cfg = cli.build_config(args)
    assert (cfg.backbone, cfg.pretrained, cfg.lr) == ("bpfl-toy", BUNDLED_TAG, TOY_BAYESPFL_LR)
    args.backbone, args.pretrained = "tiny", None
    assert cli.build_config(args).backbone == "bpfl-tiny"
