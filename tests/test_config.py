"""The configuration object: the paper's defaults, presets, ablations, serialisation and validation."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bpfl.config import (
    ABLATIONS,
    NOT_MODELLED,
    SWITCHES,
    BayesPFLConfig,
    not_modelled_markdown,
    switches_markdown,
    with_ablations,
)


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


# ------------------------------------------------------------------------------------------ every departure declared
def test_each_switch_changes_exactly_its_own_field():
    paper, released = BayesPFLConfig(), BayesPFLConfig.released_code()
    for name, (p, r, _) in SWITCHES.items():
        flipped = paper.replace(**{name: r})
        assert set(flipped.differences(paper)) == ({name} if p != r else set()), name
        back = released.replace(**{name: p})  # and from the released side: only that one field goes back
        assert set(back.differences(released)) == ({name} if p != r else set()), name
        assert name in {f.name for f in dataclasses.fields(BayesPFLConfig)}


def test_the_paper_default_logit_scale_is_none_and_the_presets_say_theirs():
    assert BayesPFLConfig().temperature == 1.0 and SWITCHES["temperature"][0] == 1.0  # Eq. 11 / s_text as written
    assert BayesPFLConfig.released_code().temperature == pytest.approx(1 / 0.07)
    teaching = BayesPFLConfig.teaching()
    # the teaching preset keeps CLIP's scale, and its provenance lists it among the departures from the paper
    assert teaching.temperature == SWITCHES["temperature"][1]
    assert "temperature" in teaching.differences(BayesPFLConfig())
    assert "temperature" in BayesPFLConfig.teaching.__doc__


#: reference brief §9 "Differences from the paper's text", item -> (words of that item, names that model it)
REFERENCE_DIFFERENCES: dict[int, tuple[str, set[str]]] = {
    1: ("two training stages", {"epochs", "selection", "two_stage_training"}),
    2: ("per-group learning rates", {"group_lrs", "adam_betas", "cosine_schedule"}),
    3: ("target-dataset categories", {"selection"}),
    4: ("x_cls only", {"isd_condition"}),
    5: ("amortised from x_cls", {"isd_amortized", "iad_share_flow"}),
    6: ("no invertibility constraint", {"constrained_flow"}),
    7: ("scaled by 1/N", {"kl_weight", "iad_log_det_weight"}),
    8: ("attention pooling", {"x_patch_pool", "class_mapping"}),
    9: ("stage 1 the image side is x_cls alone", {"class_mapping", "learnable_temperature",
                                                 "stage1_image_branch_x_cls"}),
    10: ("4 heads", {"rca_heads", "rca_bias", "rca_normalize_output"}),
    11: ("align_corners=True", {"learnable_temperature", "upsample_align_corners", "map_sigma"}),
    12: ("minmax(top-k mean of M)", {"image_score"}),
    13: ("one random prompt pair", {"loss_pairs"}),
    14: ("once per test run", {"iad_sample_once"}),
    15: ("orthogonal loss is a mean", {"ort_reduction"}),
    16: ("Focal is fg/bg balanced", {"focal_balanced"}),
    17: ("PRO computation is disabled", {"pro_metric"}),
    18: ("exact GELU", {"quick_gelu"}),
    19: ("mosaic plus albumentations", {"mvtec_mosaic", "augmentation"}),
    20: ("Validation uses R = 5", {"validation_samples"}),
}
#: differences the brief describes elsewhere (§1-§7), -> (words of the brief, names that model them)
OTHER_REFERENCE_DIFFERENCES: list[tuple[str, set[str]]] = [
    ("trunc-normal mean +0.5", {"state_init_mean"}),
    ("returns var = exp(0.5·h)", {"log_var_scale"}),
    ("all init torch.randn", {"iad_flow_init"}),
    ("one sample shared by the whole batch", {"iad_one_sample_per_batch"}),
    ("image metrics are set to 0", {"undefined_metrics"}),
    ("initialised to log(1/0.07)", {"temperature", "learnable_temperature"}),
    ("Stage-2 total: L_cls only", {"two_stage_training"}),
]
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "docs" / "reference-implementation.md"


def _plain(text: str) -> str:
    return " ".join(text.replace("**", "").replace("`", "").split())


def test_switches_and_not_modelled_are_disjoint_and_cover_every_documented_difference():
    assert not set(SWITCHES) & set(NOT_MODELLED)
    assert all(isinstance(v, str) and "Not " in v for v in NOT_MODELLED.values())  # each says why not
    named = set().union(*(names for _, names in REFERENCE_DIFFERENCES.values()),
                        *(names for _, names in OTHER_REFERENCE_DIFFERENCES))
    assert named == set(SWITCHES) | set(NOT_MODELLED)  # every difference has a name, every name a difference
    # the list of released behaviours: each is a switch or explicitly not modelled
    for name in ("augmentation", "mvtec_mosaic", "two_stage_training", "stage1_image_branch_x_cls",
                 "iad_one_sample_per_batch", "iad_log_det_weight", "validation_samples", "undefined_metrics"):
        assert name in SWITCHES or name in NOT_MODELLED


def test_the_transcription_matches_the_reference_brief():
    if not REFERENCE.is_file():
        pytest.skip(f"reference brief not found at {REFERENCE}")
    text = REFERENCE.read_text()
    start = text.index("**Differences from the paper's text:**")
    end = text.index("**Bugs and oddities:**", start)
    items: dict[int, str] = {}
    for line in text[start:end].splitlines()[1:]:
        m = re.match(r"^(\d+)\. (.*)", line)
        if m:
            current = int(m.group(1))
            items[current] = m.group(2)
        elif line.strip() and items:
            items[current] += " " + line.strip()
    assert sorted(items) == sorted(REFERENCE_DIFFERENCES) == list(range(1, len(items) + 1))
    for number, (words, _) in REFERENCE_DIFFERENCES.items():
        assert _plain(words) in _plain(items[number]), (number, items[number])
    plain = _plain(text)
    for words, _ in OTHER_REFERENCE_DIFFERENCES:
        assert _plain(words) in plain, words


def test_readme_renders_both_tables():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Paper vs the authors' released code"):]
    section = section[:section.index("\n## ", 5)]
    hint = "README is out of date: paste bpfl.config.switches_markdown() / not_modelled_markdown() into it"
    assert switches_markdown() in section, hint
    assert not_modelled_markdown() in section, hint
    assert all(f"`{name}`" in not_modelled_markdown() for name in NOT_MODELLED)


def test_new_fields_are_validated():
    for bad in (dict(temperature=0.0), dict(validation_samples=0), dict(iad_flow_init="zeros"),
                dict(iad_log_det_weight="1/B"), dict(undefined_metrics="zeroes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BayesPFLConfig(**bad)
