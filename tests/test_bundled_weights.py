"""The toy CLIP shipped in the package (bpfl/weights/): packing, hash check, provenance, freshness.

* packing is exact: a state dict whose token table starts from ``initial_token_table`` and changed in a few rows
  comes back bit for bit, and only the changed rows are stored;
* a corrupted, replaced or missing file (or manifest) is one clear error naming the file and the fix;
* the committed bundle: under 10 MB, safetensors, its sha256 matches the manifest, the unpacked weights match the
  manifest's ``weights_sha256``, the manifest records the recipe/provenance, the recipe is today's default, and
  the transfer numbers in the manifest were measured with exactly this file.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bpfl import bundled_weights as BW


def _toy_state_dict(seed: int = 3, vocab: int = 500, width: int = 16) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    table = BW.initial_token_table(seed, vocab, width)
    table[[5, 17, 401]] += torch.randn(3, width)  # "pretraining touched three rows"
    return {"token_embedding.weight": table, "visual.proj": torch.randn(8, 4), "logit_scale": torch.tensor(4.6)}


def test_initial_token_table_is_seeded_numpy_normal():
    a, b = BW.initial_token_table(0, 300, 8), BW.initial_token_table(0, 300, 8)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, BW.initial_token_table(1, 300, 8))
    ref = np.random.default_rng([0, 0x70CE7AB1E]).standard_normal((300, 8), dtype=np.float32) * np.float32(0.02)
    assert np.array_equal(a.numpy(), ref)  # exactly numpy's PCG64 stream, not torch's RNG
    assert abs(float(a.std()) - 0.02) < 0.002


def test_pack_stores_only_touched_rows_and_unpacks_exactly():
    sd = _toy_state_dict()
    tensors, meta = BW.pack_state_dict(sd, seed=3)
    assert tensors["token_embedding.touched_rows"].tolist() == [5, 17, 401]
    assert "token_embedding.weight" not in tensors
    back = BW.unpack_state_dict(tensors, meta)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert BW.weights_sha256(back) == BW.weights_sha256(sd)
    info = json.loads(meta["bpfl"])
    wrong_seed = BW.unpack_state_dict(tensors, {"bpfl": json.dumps({**info, "token_seed": 4})})
    assert not torch.equal(wrong_seed["token_embedding.weight"], sd["token_embedding.weight"])


def test_write_and_read_bundle_with_hash_check(tmp_path):
    sd = _toy_state_dict()
    out = tmp_path / "toy.safetensors"
    manifest = BW.write_bundle(sd, 3, out, {"recipe": {"seed": 3}})
    assert manifest["sha256"] == BW.sha256_file(out) and manifest["max_abs_diff_vs_pretrained"] == 0.0
    assert json.loads(out.with_suffix(".json").read_text())["recipe"] == {"seed": 3}
    opts = manifest["size_options"]
    assert opts["packed_fp32_bytes"] == out.stat().st_size < opts["fp16_full_bytes"] < opts["fp32_full_bytes"]
    assert opts["touched_token_rows"] == 3 and 0 < opts["fp16_max_abs_error"] < 1e-2
    back = BW.read_bundle(out)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = BW.write_bundle(sd, 3, tmp_path / "again.safetensors", {"recipe": {"seed": 3}})
    assert again["sha256"] == manifest["sha256"]  # a rebuild of the same weights is the same file, byte for byte
    assert out.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then JSON (no pickle)

    bad = tmp_path / "bad.safetensors"
    shutil.copy(out, bad)
    shutil.copy(out.with_suffix(".json"), bad.with_suffix(".json"))
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    bad.write_bytes(bytes(data))
    with pytest.raises(BW.BundledWeightsError, match=r"bad\.safetensors does not match its manifest.*corrupted or "
                                                     r"was replaced.*git checkout.*pretrain-toy-clip --bundle"):
        BW.read_bundle(bad)
    bad.with_suffix(".json").unlink()
    with pytest.raises(BW.BundledWeightsError, match=r"manifest .*bad\.json is missing"):
        BW.read_bundle(bad)
    with pytest.raises(BW.BundledWeightsError, match=r"nothere\.safetensors is missing"):
        BW.read_bundle(tmp_path / "nothere.safetensors")


def test_write_bundle_refuses_a_file_over_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(BW, "MAX_BYTES", 100)
    with pytest.raises(BW.BundledWeightsError, match="over the 0 MB limit"):
        BW.write_bundle(_toy_state_dict(), 3, tmp_path / "big.safetensors")


# ----------------------------------------------------------------------------------------------- the committed file
@pytest.fixture(scope="module")
def manifest() -> dict:
    return BW.verify_bundle()  # raises if the committed file does not match its manifest


def test_bundled_file_is_small_safetensors_and_hash_checked(manifest):
    f = BW.BUNDLED_FILE
    assert f.suffix == ".safetensors" and f.stat().st_size <= BW.MAX_BYTES == 10_000_000
    assert manifest["sha256"] == BW.sha256_file(f) and manifest["bytes"] == f.stat().st_size
    assert manifest["max_abs_diff_vs_pretrained"] == 0.0


def test_bundled_weights_unpack_to_the_measured_weights(manifest):
    """The tolerance is zero: the unpacked state dict hashes to the manifest's weights_sha256 (recorded when the
    file was written from the pretrained checkpoint, whose weights the transfer numbers were measured with)."""
    sd = BW.read_bundle()
    assert BW.weights_sha256(sd) == manifest["weights_sha256"]
    from bpfl.backbone import build_clip
    clip = build_clip(BW.BUNDLED_ARCH, image_size=manifest["recipe"]["image_size"])
    assert set(sd) == set(clip.state_dict())  # every open_clip key, nothing else


def test_bundled_manifest_carries_provenance(manifest):
    from bpfl.toyclip.generator import held_out_words
    for key in ("recipe", "seed", "held_out_families", "held_out_words", "built_with", "rebuild", "size_options",
                "tolerance"):
        assert key in manifest, key
    assert manifest["held_out_words"] == sorted(held_out_words(manifest["held_out_families"]))
    for key in ("torch", "machine", "seconds", "peak_rss_mb"):
        assert manifest["built_with"].get(key), key
    assert manifest["rebuild"] == "bpfl pretrain-toy-clip --bundle"


def test_bundled_file_matches_todays_default_recipe(manifest):
    """Change the default recipe (bpfl.toyclip.pretrain.PretrainSettings) and this fails until the bundled file
    is rebuilt: `bpfl pretrain-toy-clip --bundle`."""
    from bpfl.toyclip.pretrain import PretrainSettings
    today = PretrainSettings(seed=manifest["seed"]).to_dict()
    assert manifest["recipe"] == today, (
        f"the bundled toy CLIP was built with another recipe: "
        f"{ {k: (manifest['recipe'].get(k), v) for k, v in today.items() if manifest['recipe'].get(k) != v} } "
        "(bundled, default now); rebuild it with `bpfl pretrain-toy-clip --bundle`, then re-measure with "
        "`python benchmarks/toy_clip_transfer.py --bundled --update-manifest`")


def test_bundled_transfer_numbers_were_measured_with_this_file(manifest):
    t = manifest.get("transfer")
    assert t, "no transfer numbers: run python benchmarks/toy_clip_transfer.py --bundled --update-manifest"
    assert t["sha256"] == manifest["sha256"], "the transfer numbers belong to another file: re-measure them"
    from bpfl.toyclip.transfer import measured_table
    table = measured_table(BW.BUNDLE_DIR.parents[1] / "benchmarks" / "results" / t["result_file"])
    row = table.loc[t["method"]]
    assert row["pixel AUROC"] == pytest.approx(t["pixel_auroc"], abs=5e-4)
    assert row["image AUROC"] == pytest.approx(t["image_auroc"], abs=5e-4)


def test_loading_the_bundled_backbone_names_its_hash(manifest):
    from bpfl.backbone import load_backbone
    bb = load_backbone("bpfl-toy", "bpfl-bundled", image_size=112, layers=(2, 3, 5, 6), device="cpu")
    assert not bb.is_random and bb.is_toy
    assert manifest["sha256"][:12] in bb.describe() and "bundled toy CLIP" in bb.describe()
    with pytest.raises(ValueError, match="bundled toy CLIP: use it with --backbone bpfl-toy"):
        load_backbone("bpfl-tiny", "bpfl-bundled", image_size=112, layers=(1, 2, 3, 4), device="cpu")


def test_docs_quote_the_manifest(manifest):
    """docs/toy_clip.md's sizes and build numbers are the manifest's (issue 18: measured, not assumed)."""
    docs = (BW.BUNDLE_DIR.parents[1] / "docs" / "toy_clip.md").read_text()
    o, b = manifest["size_options"], manifest["built_with"]
    for text in (f"{o['fp32_full_bytes'] / 1e6:.1f} MB", f"{o['fp16_full_bytes'] / 1e6:.1f} MB",
                 f"{o['packed_fp32_bytes'] / 1e6:.1f} MB", f"only {o['touched_token_rows']} rows",
                 f"{o['fp16_max_abs_error']:.1e}", f"{b['seconds'] / 60:.1f} min", f"{b['peak_rss_mb']:.0f} MiB"):
        assert text in docs, f"docs/toy_clip.md does not quote {text!r} (from the manifest)"


def test_readme_quotes_the_bundled_files_transfer(manifest):
    """README's numbers for the bundled toy CLIP are those measured with it (the manifest and the result file)."""
    from bpfl.toyclip.transfer import RANDOM_NAME, TOY_NAME, measured_table
    root = BW.BUNDLE_DIR.parents[1]
    readme = (root / "README.md").read_text()
    t = measured_table(root / "benchmarks" / "results" / manifest["transfer"]["result_file"])
    quoted = (f"pixel\nAUROC {t.loc[TOY_NAME, 'pixel AUROC']:.3f} and image AUROC "
              f"{t.loc[TOY_NAME, 'image AUROC']:.3f}, "
              f"against {t.loc[RANDOM_NAME, 'pixel AUROC']:.3f} and {t.loc[RANDOM_NAME, 'image AUROC']:.3f}")
    assert " ".join(quoted.split()) in " ".join(readme.split())
    assert f"{manifest['bytes'] / 1e6:.1f} MB" in readme
