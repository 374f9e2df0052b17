"""The configuration object: the paper's defaults, presets, ablations, serialisation and validation."""
from __future__ import annotations

import pytest

from bpfl.config import ABLATIONS, SWITCHES, BayesPFLConfig, switches_markdown, with_ablations


def test_paper_defaults():
    c = BayesPFLConfig()
    assert (c.n_prompts, c.n_context, c.n_state, c.flow_length) == (3, 5, 5, 10)  # B, P, Q, K
    assert (c.train_samples, c.test_samples) == (1, 10)  # R
    assert (c.backbone, c.pretrained, c.image_size, c.layers) == ("ViT-L-14-336", "openai", 518, (6, 12, 18, 24))
    assert (c.batch_size, c.lr, c.epochs) == (32, 1e-4, 20)
    assert c.ensemble == "image" and c.image_score == "sum" and c.isd_condition == "cls+patch"
    assert c.constrained_flow and not c.isd_amortized and c.kl_weight == 1.0 and c.selection == "last"


def test_released_preset_sets_every_switch_and_only_those():
    paper, released = BayesPFLConfig(), BayesPFLConfig.released_code()
    changed = set(paper.differences(released))
    differing = {k for k, (p, r, _) in SWITCHES.items() if p != r}
    assert changed == differing
    for name, (p, r, doc) in SWITCHES.items():
        assert getattr(paper, name) == p and getattr(released, name) == r and doc
    assert BayesPFLConfig.released_code(kl_weight=0.5).kl_weight == 0.5


def test_roundtrip_and_validation(tmp_path):
    c = BayesPFLConfig.released_code(seed=3)
    c.save(tmp_path / "c.json")
    assert BayesPFLConfig.load(tmp_path / "c.json") == c
    with pytest.raises(ValueError, match="unknown config keys"):
        BayesPFLConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="ensemble"):
        BayesPFLConfig(ensemble="both")
    with pytest.raises(ValueError, match="test_samples"):
        BayesPFLConfig(test_samples=0)


def test_ablations():
    c = with_ablations(BayesPFLConfig(), ["no-rca", "no-isd"])
    assert c.use_rca is False and c.context_distribution == "none" and c.state_distribution == "iad"
    assert with_ablations(BayesPFLConfig(), ["isd-isd"]).state_distribution == "isd"
    with pytest.raises(ValueError, match="unknown ablation"):
        with_ablations(BayesPFLConfig(), ["no-such"])
    for name, changes in ABLATIONS.items():
        assert with_ablations(BayesPFLConfig(), [name]).differences(BayesPFLConfig()).keys() <= changes.keys()


def test_switch_table_lists_every_switch():
    md = switches_markdown()
    assert all(f"`{name}`" in md for name in SWITCHES)
