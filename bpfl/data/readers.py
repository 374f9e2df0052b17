"""Readers: one function per on-disk layout, each returning a :class:`RecordList`.

======================  ==========================================================================
layout (``open_dataset``)  reader and what it expects
======================  ==========================================================================
``meta``                :func:`read_meta_json` -- the authors' ``meta_<NAME>.json`` / ``meta.json``
``visa``                :func:`read_visa` -- ``<obj>/Data/Images/{Normal,Anomaly}`` + ``split_csv/1cls.csv``
``mvtec``               :func:`read_mvtec` -- ``<cat>/{train,test}/<defect>``, ``<cat>/ground_truth``
``folder``              :func:`read_folder` -- ``good/``, ``anomaly/`` (or ``bad/``), optional ``masks/``
``segmentation``        :func:`read_segmentation_only` -- ``images/`` + ``masks/``, all anomalous
======================  ==========================================================================

Readers only list files and check that they exist; they never decode images (that happens lazily in
the dataset, or up front in :func:`bpfl.data.check_dataset`). Every reader collects all problems it
finds and raises one :class:`DatasetError` naming the files, unless ``skip_bad=True``, in which case
it leaves the bad items out, warns once and counts them in ``RecordList.skipped``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Iterable

from .images import is_image_file
from .records import DatasetError, ProblemLog, Record, RecordList, check_split

LAYOUTS = ("meta", "visa", "mvtec", "folder", "segmentation")

#: Class words the paper's prompts use for single-class datasets, keyed by a normalised dataset name
#: (lower case, letters and digits only). Used when a reader has to guess the class from a folder name.
KNOWN_CLASS_WORDS = {
    "kvasir": "colon", "clinicdb": "colon", "cvcclinicdb": "colon", "colondb": "colon",
    "cvccolondb": "colon", "endo": "colon", "isic": "skin", "headct": "head ct",
    "brainmri": "brain ct", "br35h": "brain", "ksdd2": "metal", "rsdd": "metal",
}

#: Folder names read as normal / anomalous (MVTec uses good/<defect>; BTAD uses ok/ko).
GOOD_DIR_NAMES = ("good", "ok", "normal")
#: BTAD's numbered folders -> the class names of the authors' meta_BTAD.json.
BTAD_CLASS_NAMES = {"01": "metal1", "02": "wood", "03": "metal2"}
ANOMALY_DIR_NAMES = ("anomaly", "anomalous", "bad", "ko", "defect", "defective", "abnormal")
MASK_DIR_NAMES = ("masks", "mask", "ground_truth", "gt")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def _root(root: str | Path) -> Path:
    p = Path(root).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset root not found: {p}. Pass the folder that holds the dataset "
                           "(for MVTec-AD the folder with bottle/, cable/, ...).", [(str(p), "not found")])
    if not p.is_dir():
        raise DatasetError(f"dataset root is not a folder: {p}. Pass the dataset's top folder, not a file.",
                           [(str(p), "not a folder")])
    return Path(os.path.abspath(p))


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    if not folder.is_dir():
        return []
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and is_image_file(p))


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _by_stem(files: Iterable[Path]) -> dict[str, Path]:
    """Mask files by lower-case stem."""
    return {p.stem.lower(): p for p in files}


#: Mask file stems tried for an image ``x``: ``x_mask`` (MVTec), ``x``, ``x_segmentation`` (ISIC),
#: ``x_gt`` (KSDD2), ``x_label`` (DAGM); case-insensitive, any image extension.
MASK_SUFFIXES = ("_mask", "", "_segmentation", "_gt", "_label")


def _match_mask(index: dict[str, Path], stem: str) -> Path | None:
    stem = stem.lower()
    for s in MASK_SUFFIXES:
        if stem + s in index:
            return index[stem + s]
    return None


def _pick_categories(found: list[str], wanted: Iterable[str] | None, root: Path) -> list[str]:
    if wanted is None:
        return found
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise DatasetError(f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {unknown} in {root}; "
                           f"available: {found}", [(str(root), f"unknown category {c}") for c in unknown])
    return [c for c in found if c in wanted]


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def guess_class_word(folder_name: str) -> str:
    """A prompt class word for a single-class dataset folder: the paper's word when the folder name
    contains a known dataset name (``Kvasir-SEG`` -> ``colon``), else the folder name in words."""
    n = _norm_name(folder_name)
    for key in sorted(KNOWN_CLASS_WORDS, key=len, reverse=True):
        if key in n:
            return KNOWN_CLASS_WORDS[key]
    return re.sub(r"[_\-]+", " ", folder_name).strip().lower()


def _mask_consistency(records: list[Record], log: ProblemLog) -> list[Record]:
    """If some anomalous images have masks, all must: flag (and drop) the ones without."""
    anomalous = [r for r in records if r.label == 1]
    if not any(r.mask_path for r in anomalous):
        return records  # a dataset without pixel labels: image-level metrics only
    bad = {id(r) for r in anomalous if not r.mask_path}
    for r in anomalous:
        if id(r) in bad:
            log.add(r.img_path, "anomalous image has no mask although the dataset has masks for other "
                    "anomalous images; add its mask (same file stem) or remove the image", "missing mask")
    return [r for r in records if id(r) not in bad]


# ----------------------------------------------------------------------------------------------
# MVTec-AD
# ----------------------------------------------------------------------------------------------
def _mvtec_category_dirs(root: Path, class_name: str | None) -> list[tuple[str, Path]]:
    if any((root / d).is_dir() for d in ("train", "test")):
        return [(class_name or root.name, root)]  # root is a single category
    cats = [(d.name, d) for d in _subdirs(root)
            if (d / "test").is_dir() or (d / "train").is_dir() or (d / "ground_truth").is_dir()]
    if not cats:
        raise DatasetError(f"no MVTec-style categories under {root}: expected <category>/train/good, "
                           "<category>/test/<defect>/ and <category>/ground_truth/<defect>/NNN_mask.png",
                           [(str(root), "no MVTec categories")])
    return cats


def read_mvtec(root: str | Path, split: str = "test", categories: Iterable[str] | None = None,
               skip_bad: bool = False, class_name: str | None = None, dataset: str = "mvtec",
               rename: dict[str, str] | None = None, quiet: bool = False) -> RecordList:
    """Read the official MVTec-AD layout (also BTAD, MPDD and the authors' standardised tree).

    ``<cat>/train/good/*``, ``<cat>/test/good/*``, ``<cat>/test/<defect>/NNN.png`` with masks in
    ``<cat>/ground_truth/<defect>/NNN_mask.png`` (``NNN.png`` is also accepted). ``root`` may also be a
    single category folder; then ``class_name`` names it (default: the folder name).
    ``rename`` maps folder names to class names (e.g. :data:`BTAD_CLASS_NAMES`); ``categories``
    filters by the resulting names. Normal folders may be called ``good`` or ``ok`` (BTAD).
    A category without a ``ground_truth`` folder anywhere is read as image-level only.
    ``split``: ``"train"``, ``"test"`` or ``"all"``.
    """
    split = check_split(split)
    root = _root(root)
    log = ProblemLog(root, skip_bad)
    cat_dirs = [((rename or {}).get(c, c), d) for c, d in _mvtec_category_dirs(root, class_name)]
    names = _pick_categories([c for c, _ in cat_dirs], categories, root)
    splits = ("train", "test") if split == "all" else (split,)
    records: list[Record] = []
    for cat, cdir in cat_dirs:
        if cat not in names:
            continue
        gt = cdir / "ground_truth"
        n_before = len(records)
        for sp in splits:
            used: set[Path] = set()
            for sub in _subdirs(cdir / sp):
                defect, label = sub.name, int(sub.name.lower() not in GOOD_DIR_NAMES)
                mask_index = _by_stem(_images(gt / defect))
                for img in _images(sub):
                    mask = _match_mask(mask_index, img.stem)
                    if label == 0:
                        if mask is not None:
                            log.add(mask, f"mask for a good image ({img}); move the image to a defect "
                                    "folder or delete the mask", "mask for good image")
                            used.add(mask)
                            continue
                        records.append(Record(str(img), None, 0, cat, "good", dataset, sp))
                    elif mask is not None:
                        used.add(mask)
                        records.append(Record(str(img), str(mask), 1, cat, defect, dataset, sp))
                    elif gt.is_dir():
                        log.add(img, f"anomalous image has no mask: expected {gt / defect / (img.stem + '_mask.png')}; "
                                "add the mask or remove the image", "missing mask")
                    else:
                        records.append(Record(str(img), None, 1, cat, defect, dataset, sp))
            if sp == "test" and gt.is_dir():
                for mdir in _subdirs(gt):
                    for m in _images(mdir):
                        if m not in used and m.parent.name.lower() not in GOOD_DIR_NAMES:
                            log.add(m, f"mask without an image: no {cdir / 'test' / mdir.name}/"
                                    f"{m.stem.removesuffix('_mask')}.*; restore the image or delete the mask",
                                    "mask without image")
                        elif m not in used:
                            log.add(m, "mask for a good image (ground_truth/good); delete it",
                                    "mask for good image")
        if len(records) == n_before and split != "train":
            log.add(cdir, f"category '{cat}' has no images in split '{split}'; check the folder or "
                    "leave the category out with categories=[...]", "empty category")
    records = _mask_consistency(records, log)
    return log.finish(records, "mvtec", quiet)


# ----------------------------------------------------------------------------------------------
# VisA
# ----------------------------------------------------------------------------------------------
VISA_CSV = Path("split_csv") / "1cls.csv"


def read_visa(root: str | Path, split: str = "test", categories: Iterable[str] | None = None,
              skip_bad: bool = False, csv_path: str | Path | None = None, dataset: str = "visa",
              quiet: bool = False) -> RecordList:
    """Read the official VisA layout.

    With ``split_csv/1cls.csv`` (columns ``object,split,label,image,mask``; label ``normal`` /
    ``anomaly``; paths relative to ``root``) the CSV defines the split. Without it, every image of
    ``<obj>/Data/Images/{Normal,Anomaly}`` is read as split ``test`` (there is no train split), with
    masks ``<obj>/Data/Masks/Anomaly/<stem>.png``. VisA masks hold small label values (1, 2, ...),
    so they are binarised at > 0.
    """
    split = check_split(split)
    root = _root(root)
    log = ProblemLog(root, skip_bad)
    csv_file = Path(csv_path) if csv_path else root / VISA_CSV
    records: list[Record] = []
    if csv_file.is_file():
        rows = _read_visa_csv(csv_file)
        found = list(dict.fromkeys(r["object"] for r in rows))
        names = set(_pick_categories(found, categories, root))
        for line, row in enumerate(rows, start=2):
            if row["object"] not in names or (split != "all" and row["split"] != split):
                continue
            where = f"{csv_file}:{line}"
            lab = row["label"].strip().lower()
            if lab not in ("normal", "anomaly"):
                log.add(where, f"label {row['label']!r} is neither 'normal' nor 'anomaly'; fix the CSV",
                        "bad csv row")
                continue
            img = root / row["image"]
            mask = root / row["mask"] if row.get("mask", "").strip() else None
            rec = _checked_record(log, img, mask, int(lab == "anomaly"), row["object"],
                                  dataset, row["split"].strip(), where)
            if rec:
                records.append(rec)
        for cat in [c for c in found if c in names]:
            if not any(r.class_name == cat for r in records) and split != "train":
                log.add(csv_file, f"category '{cat}' has no images in split '{split}'", "empty category")
    else:
        if split == "train":
            raise DatasetError(f"VisA at {root} has no {VISA_CSV}, so there is no train split; put the "
                               "official split_csv/1cls.csv there or use split='test'",
                               [(str(csv_file), "missing split csv")])
        objs = [d for d in _subdirs(root) if (d / "Data" / "Images").is_dir()]
        if not objs:
            raise DatasetError(f"no VisA objects under {root}: expected {VISA_CSV} or "
                               "<object>/Data/Images/{Normal,Anomaly}", [(str(root), "not VisA")])
        names = set(_pick_categories([d.name for d in objs], categories, root))
        for d in objs:
            if d.name not in names:
                continue
            mask_index = _by_stem(_images(d / "Data" / "Masks" / "Anomaly"))
            used = set()
            n_before = len(records)
            for sub, label in (("Normal", 0), ("Anomaly", 1)):
                for img in _images(d / "Data" / "Images" / sub):
                    mask = mask_index.get(img.stem) if label else None
                    if mask is None and label == 1 and mask_index:
                        log.add(img, f"anomalous image has no mask {d / 'Data/Masks/Anomaly' / (img.stem + '.png')}",
                                "missing mask")
                        continue
                    used.add(mask)
                    records.append(Record(str(img), str(mask) if mask else None, label, d.name,
                                          "anomaly" if label else "good", dataset, "test"))
            for m in mask_index.values():
                if m not in used:
                    log.add(m, "mask without an image in Data/Images/Anomaly; restore the image or delete "
                            "the mask", "mask without image")
            if len(records) == n_before:
                log.add(d, f"category '{d.name}' has no images", "empty category")
    records = _mask_consistency(records, log)
    return log.finish(records, "visa", quiet)


def _read_visa_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"object", "split", "label", "image", "mask"}
            missing = need - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(f"{path} lacks column(s) {sorted(missing)}; the VisA split CSV has "
                                   "columns object,split,label,image,mask", [(str(path), "bad csv header")])
            return [{k: (v or "") for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"cannot read {path}: {e}", [(str(path), str(e))]) from e


def _checked_record(log: ProblemLog, img: Path, mask: Path | None, label: int, cat: str,
                    dataset: str, split: str, where: str, specie: str | None = None) -> Record | None:
    """A Record for ``img``/``mask`` after checking that the files exist and the mask fits the label."""
    if not img.is_file():
        log.add(img, f"image file not found (listed in {where}); restore it or remove the entry",
                "missing image")
        return None
    if mask is not None and label == 0:
        log.add(mask, f"mask for a good image ({img}, listed in {where}); label it anomalous or drop "
                "the mask", "mask for good image")
        return None
    if mask is not None and not mask.is_file():
        log.add(mask, f"mask file not found (for {img}, listed in {where}); restore it or remove the "
                "entry", "missing mask")
        return None
    sp = specie if specie is not None else ("anomaly" if label else "good")
    return Record(str(img), str(mask) if mask else None, label, cat, sp, dataset, split)


# ----------------------------------------------------------------------------------------------
# the authors' meta.json
# ----------------------------------------------------------------------------------------------
def find_meta_json(root: str | Path, name: str | None = None) -> Path:
    """``root/meta_<name>.json`` (case-sensitive, as the authors' loader) or, for ``name=None``,
    ``root/meta.json`` or the only ``meta_*.json``."""
    root = _root(root)
    if name is not None:
        p = root / f"meta_{name}.json"
        if p.is_file():
            return p
        alt = [q.name for q in root.glob("meta*.json")]
        raise DatasetError(f"{p} not found (the name is case-sensitive); meta files here: {alt or 'none'}",
                           [(str(p), "not found")])
    if (root / "meta.json").is_file():
        return root / "meta.json"
    metas = sorted(root.glob("meta_*.json"))
    if len(metas) == 1:
        return metas[0]
    if not metas:
        raise DatasetError(f"no meta.json or meta_<NAME>.json in {root}", [(str(root), "no meta json")])
    raise DatasetError(f"several meta files in {root} ({[m.name for m in metas]}); pass name=... "
                       "(the part after 'meta_')", [(str(root), "ambiguous meta json")])


def read_meta_json(root: str | Path, name: str | None = None, split: str = "test",
                   categories: Iterable[str] | None = None, skip_bad: bool = False,
                   quiet: bool = False) -> RecordList:
    """Read the authors' ``meta_<NAME>.json`` format.

    ``{"train": {cat: [rec, ...]}, "test": {cat: [rec, ...]}}``; each record has ``img_path`` and
    ``mask_path`` (relative to ``root``; ``''`` for good images), ``cls_name``, ``specie_name`` and
    ``anomaly`` (0/1). Placeholder records with an empty ``img_path`` (categories without training
    images) are skipped. The dataset name is ``name``, else the records' ``dataset_name``.
    """
    split = check_split(split)
    path = find_meta_json(root, name)
    root = path.parent
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot parse {path}: {e}; regenerate it with write_meta_json",
                           [(str(path), str(e))]) from e
    if not isinstance(meta, dict) or not any(k in meta for k in ("train", "test")) or not all(
            isinstance(meta.get(k, {}), dict) for k in ("train", "test")):
        raise DatasetError(f"{path} is not in the meta.json format "
                           '{"train": {category: [records]}, "test": {category: [records]}}',
                           [(str(path), "bad structure")])
    log = ProblemLog(root, skip_bad)
    splits = ("train", "test") if split == "all" else (split,)
    found = list(dict.fromkeys(c for sp in ("test", "train") for c in meta.get(sp, {})))
    names = _pick_categories(found, categories, root)
    records: list[Record] = []
    for sp in splits:
        for cat, recs in meta.get(sp, {}).items():
            if cat not in names:
                continue
            n_before = len(records)
            for i, r in enumerate(recs if isinstance(recs, list) else []):
                where = f"{path.name}[{sp}][{cat}][{i}]"
                if not isinstance(r, dict):
                    log.add(path, f"{where} is not a record object", "bad meta record")
                    continue
                if not r.get("img_path"):
                    continue  # the authors' placeholder for categories without training images
                try:
                    label = int(r.get("anomaly", 0))
                except (TypeError, ValueError):
                    log.add(path, f"{where}: anomaly must be 0 or 1, got {r.get('anomaly')!r}", "bad meta record")
                    continue
                mask = root / r["mask_path"] if r.get("mask_path") else None
                rec = _checked_record(log, root / r["img_path"], mask, label, r.get("cls_name") or cat,
                                      name or r.get("dataset_name") or root.name, sp, where,
                                      r.get("specie_name") or ("anomaly" if label else "good"))
                if rec:
                    records.append(rec)
            if len(records) == n_before and sp == "test" and recs:
                log.add(path, f"category '{cat}' has no usable test records", "empty category")
    records = _mask_consistency(records, log)
    return log.finish(records, "meta", quiet)


def write_meta_json(records: Iterable[Record], root: str | Path, name: str | None = None) -> Path:
    """Write ``records`` in the authors' format to ``root/meta_<name>.json`` (``meta.json`` if no name).

    Records of split ``train`` go under ``"train"``, all others under ``"test"``; paths are written
    relative to ``root`` with forward slashes. Every category appears in both splits; a category
    without training images gets the authors' placeholder record (empty paths).
    """
    root = _root(root)
    records = list(records)
    cats = list(dict.fromkeys(r.class_name for r in records))
    meta: dict = {"train": {c: [] for c in cats}, "test": {c: [] for c in cats}}

    def rel(p: str) -> str:
        try:
            return Path(os.path.relpath(p, root)).as_posix()
        except ValueError as e:  # another drive on Windows
            raise DatasetError(f"{p} cannot be written relative to {root}: {e}", [(p, str(e))]) from e

    for r in records:
        meta["train" if r.split == "train" else "test"][r.class_name].append({
            "img_path": rel(r.img_path), "mask_path": rel(r.mask_path) if r.mask_path else "",
            "cls_name": r.class_name, "specie_name": r.specie or ("anomaly" if r.label else "good"),
            "dataset_name": r.dataset, "anomaly": int(r.label)})
    for c in cats:
        if not meta["train"][c]:
            ds = next((r.dataset for r in records if r.class_name == c), "")
            meta["train"][c].append({"img_path": "", "mask_path": "", "cls_name": c, "specie_name": "",
                                     "dataset_name": ds, "anomaly": 0})
    out = root / (f"meta_{name}.json" if name else "meta.json")
    out.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------
# generic folders
# ----------------------------------------------------------------------------------------------
def _has_good(d: Path) -> bool:
    return any((d / g).is_dir() for g in GOOD_DIR_NAMES)


def _folder_category_dirs(root: Path, class_name: str | None) -> list[tuple[str, Path]]:
    if _has_good(root) or any((root / a).is_dir() for a in ANOMALY_DIR_NAMES):
        return [(class_name or guess_class_word(root.name), root)]
    cats = [(d.name, d) for d in _subdirs(root) if _has_good(d)]
    if not cats:
        raise DatasetError(f"no good/ folder in {root} or its sub-folders; the custom layout is good/, "
                           "anomaly/ (or bad/) and optional masks/", [(str(root), "not a folder dataset")])
    return cats


def read_folder(root: str | Path, categories: Iterable[str] | None = None, skip_bad: bool = False,
                class_name: str | None = None, dataset: str | None = None,
                split: str = "test", quiet: bool = False) -> RecordList:
    """Read a custom layout: ``good/``, ``anomaly/`` (or ``bad/``, ``defect/``, ...), optional ``masks/``.

    Masks are matched to anomalous images by file stem (``x.png`` <-> ``masks/x.png`` or
    ``masks/x_mask.png``, any image extension). Without ``masks/`` the anomalous records carry no
    mask (``has_mask`` False) and only image-level metrics apply. Sub-folders of ``anomaly/`` become
    the defect (specie) name. ``root`` may also hold one such folder per category. The layout has no
    train/test split: every record is in split ``test`` (``split="train"`` finds nothing).
    """
    split = check_split(split)
    root = _root(root)
    log = ProblemLog(root, skip_bad)
    cat_dirs = _folder_category_dirs(root, class_name)
    names = _pick_categories([c for c, _ in cat_dirs], categories, root)
    dataset = dataset or root.name
    records: list[Record] = []
    if split == "train":
        raise DatasetError(f"the folder layout at {root} has no train split (every image is a test "
                           "image); use split='test'", [(str(root), "no train split")])
    for cat, cdir in cat_dirs:
        if cat not in names:
            continue
        mdir = next((cdir / m for m in MASK_DIR_NAMES if (cdir / m).is_dir()), None)
        mask_index = _by_stem(_images(mdir, recursive=True)) if mdir else {}
        goods = [p for g in GOOD_DIR_NAMES for p in _images(cdir / g, recursive=True)]
        bads = [p for a in ANOMALY_DIR_NAMES for p in _images(cdir / a, recursive=True)]
        used: set[Path] = set()
        n_before = len(records)
        for img in bads:
            mask = _match_mask(mask_index, img.stem)
            parent = img.parent.name
            specie = parent if parent not in ANOMALY_DIR_NAMES else "anomaly"
            if mask is None and mdir is not None:
                log.add(img, f"anomalous image has no mask in {mdir} (expected {img.stem}.png or "
                        f"{img.stem}_mask.png); add it or remove the image", "missing mask")
                continue
            if mask is not None:
                used.add(mask)
            records.append(Record(str(img), str(mask) if mask else None, 1, cat, specie, dataset, "test"))
        for img in goods:
            mask = _match_mask(mask_index, img.stem)
            if mask is not None and mask not in used:
                log.add(mask, f"mask for a good image ({img}); move the image to anomaly/ or delete the mask",
                        "mask for good image")
                used.add(mask)
                continue
            records.append(Record(str(img), None, 0, cat, "good", dataset, "test"))
        for m in mask_index.values():
            if m not in used:
                log.add(m, "mask without an image (no image with this stem in anomaly/); restore the "
                        "image or delete the mask", "mask without image")
        if len(records) == n_before:
            log.add(cdir, f"category '{cat}' has no images in good/ or anomaly/", "empty category")
    records = _mask_consistency(records, log)
    return log.finish(records, "folder", quiet)


def read_segmentation_only(root: str | Path, class_name: str | None = None, skip_bad: bool = False,
                           mask_threshold: int | None = None, dataset: str | None = None,
                           split: str = "test", categories: Iterable[str] | None = None,
                           quiet: bool = False) -> RecordList:
    """Read a Kvasir/ISIC/CVC-style set: ``images/`` + ``masks/`` paired by file stem, all anomalous.

    Masks ``masks/x.*``, ``masks/x_mask.*`` or ``masks/x_segmentation.*`` (ISIC) pair with
    ``images/x.*``. ``mask_threshold=None`` binarises JPEG masks at > 127 (compression noise) and
    others at > 0. ``class_name`` defaults to the paper's word when the folder name contains a known
    dataset name (Kvasir, ClinicDB, ColonDB, Endo -> ``colon``; ISIC -> ``skin``), else the folder name.
    Only pixel-level metrics are defined for such a set (every image is anomalous).
    """
    split = check_split(split)
    root = _root(root)
    log = ProblemLog(root, skip_bad)
    idir, mdir = root / "images", root / "masks"
    if not idir.is_dir() or not mdir.is_dir():
        raise DatasetError(f"{root} needs images/ and masks/ folders (files paired by name)",
                           [(str(root), "missing images/ or masks/")])
    if split == "train":
        raise DatasetError(f"the segmentation-only layout at {root} has no train split; use split='test'",
                           [(str(root), "no train split")])
    cat = class_name or guess_class_word(root.name)
    _pick_categories([cat], categories, root)
    dataset = dataset or root.name
    mask_index = _by_stem(_images(mdir))
    used: set[Path] = set()
    records: list[Record] = []
    for img in _images(idir):
        mask = _match_mask(mask_index, img.stem)
        if mask is None:
            log.add(img, f"image has no mask in {mdir} (expected {img.stem} with any image extension); "
                    "add it or remove the image", "missing mask")
            continue
        used.add(mask)
        records.append(Record(str(img), str(mask), 1, cat, "anomaly", dataset, "test", mask_threshold))
    for m in mask_index.values():
        if m not in used:
            log.add(m, f"mask without an image in {idir}; restore the image or delete the mask",
                    "mask without image")
    if not records and not log:
        log.add(idir, "no images found", "empty category")
    return log.finish(records, "segmentation", quiet)


# ----------------------------------------------------------------------------------------------
# layout detection
# ----------------------------------------------------------------------------------------------
def detect_layout(root: str | Path) -> str:
    """Guess the layout of ``root``: one of :data:`LAYOUTS`. Raises DatasetError if none fits."""
    root = _root(root)
    if list(root.glob("meta*.json")):
        return "meta"
    if (root / VISA_CSV).is_file():
        return "visa"
    if any((root / d).is_dir() for d in ("train", "test", "ground_truth")):
        return "mvtec"
    subs = _subdirs(root)
    if any((d / "ground_truth").is_dir() or (d / "test").is_dir() for d in subs):
        return "mvtec"
    if _has_good(root) or any(_has_good(d) for d in subs):
        return "folder"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "segmentation"
    if any((d / "Data" / "Images").is_dir() for d in subs):
        return "visa"
    seen = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    raise DatasetError(
        f"cannot tell the dataset layout of {root} (it holds {seen or 'nothing'}). Expected one of: "
        "meta.json / meta_<NAME>.json; split_csv/1cls.csv (VisA); <category>/test and "
        "<category>/ground_truth (MVTec); good/ + anomaly/ [+ masks/]; images/ + masks/. "
        "Point to the right folder or pass layout=...", [(str(root), "unknown layout")])


READERS = {"meta": read_meta_json, "visa": read_visa, "mvtec": read_mvtec,
           "folder": read_folder, "segmentation": read_segmentation_only}


def read_records(root: str | Path, layout: str = "auto", split: str = "test",
                 categories: Iterable[str] | None = None, skip_bad: bool = False,
                 quiet: bool = False, **kwargs) -> RecordList:
    """Detect the layout (``layout="auto"``) and run the matching reader."""
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in READERS:
        raise DatasetError(f"unknown layout {layout!r}: use auto or one of {', '.join(LAYOUTS)}")
    return READERS[layout](root, split=split, categories=categories, skip_bad=skip_bad, quiet=quiet,
                           **kwargs)
