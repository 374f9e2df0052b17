"""Faults a new user meets at the command line: bad checkpoints, bad images in a folder, huge images, odd names.

Every checkpoint-loading failure must be one line on stderr that names the file and what to do, a non-zero exit
status, no traceback, and nothing from the file executed. ``bpfl predict`` over a folder predicts every readable
image and lists the others. The model is the tiny random backbone at 112 px; checkpoints are saved untrained
(their content does not matter here, only whether and how they load).
"""
from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bpfl.cli import main
from bpfl.config import BayesPFLConfig
from bpfl.data import CLIP_MEAN, CLIP_STD, open_dataset
from bpfl.model import BayesPFL
from bpfl.predict import find_images, output_stems, predict_images, write_predictions_csv
from bpfl.train import CheckpointError, load_model, read_checkpoint, save_checkpoint

SIZE = 112  # the tiny backbone's 14-px patches -> an 8x8 grid
REPO = Path(__file__).resolve().parents[1]
ODD_NAME = "défaut_图像.png"


def tiny_config(**kw) -> BayesPFLConfig:
    return BayesPFLConfig.teaching(image_size=SIZE, layers=(1, 2, 3, 4), n_prompts=2, flow_length=2,
                                   test_samples=2, **kw)


@pytest.fixture(scope="module")
def backbone112():
    from bpfl.backbone import load_backbone
    torch.manual_seed(0)
    return load_backbone("bpfl-tiny", None, image_size=SIZE, layers=(1, 2, 3, 4), device="cpu")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone112) -> Path:
    torch.manual_seed(0)
    model = BayesPFL(tiny_config(), backbone=backbone112)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "last.pt", model)


@pytest.fixture(scope="module")
def model(checkpoint, backbone112) -> BayesPFL:
    return load_model(checkpoint, backbone=backbone112)


def write_image(path: Path, width: int = 64, height: int = 48, seed: int = 0) -> Path:
    """A smooth colour gradient with a bright square (compresses well at any size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, np.full_like(x, rng.uniform())], -1) * 200
    img[height // 2: height // 2 + height // 4, width // 2: width // 2 + width // 4] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str, list]:
    """``bpfl ARGV`` in this process: (exit status, stdout, stderr, warnings it emitted)."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err, caught


# ------------------------------------------------------------------------------ malicious checkpoints
class _CreatesFile:
    """Unpickling this runs ``open(marker, 'w')``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _malicious(path: Path, marker: Path, kind: str) -> Path:
    payload = {"format": "bpfl-checkpoint-v1", "config": {}, "state": {}, "x": _CreatesFile(marker)}
    if kind == "zip":  # what torch.save writes, with the payload inside
        torch.save(payload, path)
    else:  # a bare pickle
        path.write_bytes(pickle.dumps(payload, protocol=4))
    return path


@pytest.mark.parametrize("kind", ["zip", "bare-pickle"])
def test_malicious_checkpoint_is_refused_in_one_line_and_its_code_never_runs(tmp_path, capsys, kind):
    # control: the payload is live (an unsafe load does create its marker)
    control_marker = tmp_path / "control_ran"
    control = _malicious(tmp_path / "control.pt", control_marker, kind)
    if kind == "zip":
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert control_marker.exists()

    marker = tmp_path / "payload_ran"
    evil = _malicious(tmp_path / "evil.pt", marker, kind)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(evil)
    image = write_image(tmp_path / "img" / "a.png")
    rc, _, err, caught = run_cli(capsys, "predict", str(image), "--checkpoint", str(evil), "--out",
                                 str(tmp_path / "pred"))
    assert rc != 0
    assert len(err.strip().splitlines()) == 1 and str(evil) in err and "refused" in err
    assert "bpfl train" in err  # what to do instead
    assert not caught, [str(w.message) for w in caught]
    assert not marker.exists()
    assert not (tmp_path / "pred" / "predictions.csv").exists()


def test_malicious_checkpoint_in_a_subprocess_prints_one_line_and_no_traceback(tmp_path):
    marker = tmp_path / "payload_ran"
    evil = _malicious(tmp_path / "evil.pt", marker, "zip")
    image = write_image(tmp_path / "img" / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "bpfl", "predict", str(image), "--checkpoint", str(evil),
                           "--out", str(tmp_path / "pred")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("bpfl predict: error:") and str(evil) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------- other bad checkpoints
def _edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    ckpt = read_checkpoint(src)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def _shape_mismatch(ckpt: dict) -> None:
    ckpt["state"]["prompts.context"] = torch.zeros(7, 5, 3)


def _foreign_backbone(ckpt: dict) -> None:  # weights of the tiny CLIP, config of another (wider) architecture
    ckpt["config"]["backbone"] = "ViT-S-32"


def _unknown_backbone(ckpt: dict) -> None:
    ckpt["config"]["backbone"] = "ViT-Nowhere-99"


def _unknown_config_key(ckpt: dict) -> None:  # written by another version
    ckpt["config"]["flux_capacitor"] = 1.21


def _missing_key(ckpt: dict) -> None:
    del ckpt["state"]["rca.query.weight"]


def _make_case(case: str, tmp_path: Path, checkpoint: Path) -> tuple[Path, list[str], str]:
    """(checkpoint path, extra CLI arguments, a phrase the message must contain)."""
    if case == "missing":
        return tmp_path / "nowhere" / "last.pt", [], "not found"
    if case == "folder":
        return checkpoint.parent, [], f"--checkpoint {checkpoint}"
    if case == "empty":
        (tmp_path / "empty.pt").write_bytes(b"")
        return tmp_path / "empty.pt", [], "empty"
    if case == "truncated":
        data = checkpoint.read_bytes()
        (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
        return tmp_path / "cut.pt", [], "truncated"
    if case == "text-file":
        (tmp_path / "notes.pt").write_text("these are not weights\n")
        return tmp_path / "notes.pt", [], "text file"
    if case == "an-image":
        return write_image(tmp_path / "photo.png"), [], "PNG image"
    if case == "plain-state-dict":
        torch.save({"weight": torch.zeros(3)}, tmp_path / "sd.pt")
        return tmp_path / "sd.pt", [], "not a bpfl checkpoint"
    if case == "shape-mismatch":
        return _edited_checkpoint(checkpoint, tmp_path / "odd.pt", _shape_mismatch), [], "size mismatch"
    if case == "missing-key":
        return _edited_checkpoint(checkpoint, tmp_path / "short.pt", _missing_key), [], "rca.query.weight"
    if case == "other-architecture":
        return _edited_checkpoint(checkpoint, tmp_path / "toy.pt", _foreign_backbone), [], "does not fit"
    if case == "unknown-architecture":
        return _edited_checkpoint(checkpoint, tmp_path / "vit.pt", _unknown_backbone), [], "cannot be built"
    if case == "unknown-config-key":
        return (_edited_checkpoint(checkpoint, tmp_path / "future.pt", _unknown_config_key), [],
                "config does not fit")
    if case == "override-changes-shape":
        return checkpoint, ["--set", "n_prompts=5"], "drop the overrides"
    raise AssertionError(case)


CASES = ["missing", "folder", "empty", "truncated", "text-file", "an-image", "plain-state-dict", "shape-mismatch",
         "missing-key", "other-architecture", "unknown-architecture", "unknown-config-key", "override-changes-shape"]


@pytest.mark.parametrize("case", CASES)
def test_every_checkpoint_fault_is_one_line_naming_the_file_and_the_fix(tmp_path, capsys, checkpoint, case):
    path, extra, phrase = _make_case(case, tmp_path, checkpoint)
    image = write_image(tmp_path / "img" / "a.png")
    rc, _, err, caught = run_cli(capsys, "predict", str(image), "--checkpoint", str(path), "--out",
                                 str(tmp_path / "pred"), *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bpfl predict: error:")
    assert str(path) in lines[0] and phrase in lines[0], lines[0]
    # and says what to do
    assert any(w in lines[0] for w in ("pass ", "train", "copy it again", "drop the overrides", "use ")), lines[0]
    assert not caught, [str(w.message) for w in caught]
    with pytest.raises(CheckpointError):
        load_model(path, **({"n_prompts": 5} if extra else {}))


def test_a_good_checkpoint_still_loads_and_predicts(tmp_path, capsys, checkpoint):
    image = write_image(tmp_path / "bottle" / "a.png")
    rc, out, err, _ = run_cli(capsys, "predict", str(image), "--checkpoint", str(checkpoint), "--out",
                              str(tmp_path / "pred"))
    assert rc == 0 and err == ""
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv", encoding="utf-8")))
    assert [r["path"] for r in rows] == [str(image)] and rows[0]["class_name"] == "bottle"
    assert (tmp_path / "pred" / "a_overlay.png").is_file() and (tmp_path / "pred" / "a_heatmap.png").is_file()


# ----------------------------------------------------------------------------- a folder with bad images
def _folder_with_bad_files(root: Path) -> tuple[list[Path], dict[Path, str]]:
    good = [write_image(root / "a.png", seed=1), write_image(root / "crack" / "a.png", seed=2),
            write_image(root / "crack" / "b.jpg", seed=3), write_image(root / "crack" / "b.png", seed=4)]
    bad = {}
    data = (root / "a.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 3])
    bad[root / "cut.png"] = "truncated"
    (root / "crack" / "notes.png").write_text("not an image")
    bad[root / "crack" / "notes.png"] = "cannot identify image file"
    (root / "empty.jpg").write_bytes(b"")
    bad[root / "empty.jpg"] = "cannot identify image file"
    return good, bad


def test_predict_images_skips_unreadable_files_and_the_others_are_unaffected(tmp_path, model):
    good, bad = _folder_with_bad_files(tmp_path / "bottle")
    files = find_images(tmp_path / "bottle")
    assert set(files) == set(good) | set(bad)
    report = predict_images(model, files, seed=3)
    assert [Path(r["path"]) for r in report.rows] == [p for p in files if p in good]
    assert [f.path for f in report.failures] == [p for p in files if p in bad]
    for failure in report.failures:
        assert bad[failure.path] in failure.reason, failure
    # each image's result is its own: the same as predicting it alone (per-image seeding)
    for row in report.rows:
        alone = predict_images(model, [Path(row["path"])], seed=3).rows[0]
        assert alone == row
    # and equals the model's own forward on the file (same seed)
    from bpfl.data import load_image
    with torch.no_grad():
        out = model(load_image(good[1], SIZE)[None], ["crack"], generator=torch.Generator().manual_seed(3))
    row = next(r for r in report.rows if Path(r["path"]) == good[1])
    assert row["class_name"] == "crack" and row["image_score"] == pytest.approx(float(out.image_score[0]), abs=1e-6)


def test_output_names_never_collide():
    root = Path("/data/bottle")
    paths = [root / "a.png", root / "crack" / "a.png", root / "crack" / "b.jpg", root / "crack" / "b.png"]
    stems = output_stems(paths, root)
    assert stems == {paths[0]: Path("a"), paths[1]: Path("crack/a"), paths[2]: Path("crack/b_jpg"),
                     paths[3]: Path("crack/b_png")}
    assert output_stems([root / "x.png"]) == {root / "x.png": Path("x")}


def test_cli_predict_over_a_folder_keeps_going_lists_the_bad_files_and_fails(tmp_path, capsys, checkpoint):
    good, bad = _folder_with_bad_files(tmp_path / "bottle")
    out_dir = tmp_path / "pred"
    rc, out, err, _ = run_cli(capsys, "predict", str(tmp_path / "bottle"), "--checkpoint", str(checkpoint),
                              "--out", str(out_dir))
    assert rc == 1
    rows = list(csv.DictReader(open(out_dir / "predictions.csv", encoding="utf-8")))
    assert sorted(Path(r["path"]) for r in rows) == sorted(good)
    assert all(np.isfinite(float(r["image_score"])) for r in rows)
    for stem in ("a", "crack/a", "crack/b_jpg", "crack/b_png"):
        assert (out_dir / f"{stem}_overlay.png").is_file() and (out_dir / f"{stem}_heatmap.png").is_file(), stem
    # the bad ones are listed at the end, each with its reason
    listing = err[err.index("skipped 3 of 7 image(s)"):]
    for path, reason in bad.items():
        line = next(ln for ln in listing.splitlines() if str(path) in ln)
        assert reason in line, line
    assert "Traceback" not in err
    assert "predicted 4 of 7 image(s)" in out


# --------------------------------------------------------------------------- huge images and odd names
def _explicit_input(path: Path) -> torch.Tensor:
    """The model input written out: RGB, bicubic resize to SIZE x SIZE, /255, CLIP mean/std."""
    img = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return (t - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def test_12_megapixel_images_and_non_ascii_names_in_predict(tmp_path, model):
    folder = tmp_path / "瓶子"
    big_png = write_image(folder / ODD_NAME, 4000, 3000, seed=1)
    big_jpg = write_image(folder / "grand_画像.jpg", 4000, 3000, seed=2)
    report = predict_images(model, find_images(folder), seed=0)
    assert not report.failures
    assert [Path(r["path"]).name for r in report.rows] == sorted([ODD_NAME, "grand_画像.jpg"])
    for path in (big_png, big_jpg):
        row = next(r for r in report.rows if Path(r["path"]) == path)
        assert row["class_name"] == "瓶子"
        with torch.no_grad():
            out = model(_explicit_input(path)[None], ["瓶子"], generator=torch.Generator().manual_seed(0))
        assert row["image_score"] == pytest.approx(float(out.image_score[0]), abs=1e-5)
    csv_path = write_predictions_csv(report.rows, tmp_path / "p.csv")
    assert {Path(r["path"]).name for r in csv.DictReader(open(csv_path, encoding="utf-8"))} == {
        ODD_NAME, "grand_画像.jpg"}


def test_cli_predict_with_odd_names_and_an_ascii_terminal(tmp_path, checkpoint):
    """A folder with a non-ASCII name, an undecodable one and a bad file, printed to an ASCII-only stdout."""
    folder = tmp_path / "bottle"
    write_image(folder / ODD_NAME)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    undecodable = None
    try:
        raw = os.path.join(os.fsencode(folder), b"raw\xff.png")
        write_image(Path(os.fsdecode(raw)))
        undecodable = Path(os.fsdecode(raw))
    except (OSError, UnicodeError):  # a file system that refuses such names has nothing to test
        pass
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "ascii"}
    proc = subprocess.run([sys.executable, "-m", "bpfl", "predict", str(folder), "--checkpoint", str(checkpoint),
                           "--out", str(tmp_path / "pred")], capture_output=True, text=True, env=env, cwd=tmp_path,
                          encoding="ascii", errors="replace")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "d\\xe9faut_\\u56fe\\u50cf.png" in proc.stdout  # the name, escaped for an ASCII terminal
    assert "broken.png" in proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv", encoding="utf-8")))
    names = {Path(r["path"]).name for r in rows}
    assert ODD_NAME in names
    assert (tmp_path / "pred" / f"{Path(ODD_NAME).stem}_overlay.png").is_file()
    if undecodable is not None:
        assert "raw\\udcff.png" in names  # undecodable bytes written as a visible escape
        assert Path(os.fsdecode(os.path.join(os.fsencode(tmp_path / "pred"), b"raw\xff_overlay.png"))).is_file()


def test_dataset_loaders_read_12_megapixel_images_and_non_ascii_names(tmp_path):
    root = tmp_path / "物体"
    write_image(root / "good" / "正常_1.png", 640, 480, seed=0)
    big = write_image(root / "anomaly" / ODD_NAME, 4000, 3000, seed=1)
    mask = np.zeros((3000, 4000), np.uint8)
    mask[1500:2250, 2000:3000] = 255  # a defect at x in [1/2, 3/4), y in [1/2, 3/4)
    (root / "masks").mkdir()
    Image.fromarray(mask).save(root / "masks" / ODD_NAME)
    ds = open_dataset(root, image_size=SIZE)
    assert len(ds) == 2
    item = next(ds[i] for i in range(len(ds)) if Path(ds[i]["path"]).name == ODD_NAME)
    assert item["label"] == 1 and Path(item["path"]) == big
    torch.testing.assert_close(item["image"], _explicit_input(big), atol=1e-5, rtol=0)
    m = item["mask"]
    assert m.shape == (SIZE, SIZE)
    assert m[57:83, 57:83].min() == 1 and m[:55].max() == 0 and m[:, :55].max() == 0
    assert abs(float(m.sum()) - SIZE * SIZE / 16) <= 2 * SIZE  # a quarter by a quarter, up to a border row
    # and through the authors' meta format (paths relative to the root, in UTF-8 JSON)
    from bpfl.data import read_records, write_meta_json
    write_meta_json(read_records(root), root)
    via_meta = open_dataset(root, layout="meta", image_size=SIZE)
    assert sorted(Path(r.img_path).name for r in via_meta.records) == sorted([ODD_NAME, "正常_1.png"])
