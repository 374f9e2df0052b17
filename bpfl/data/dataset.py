"""The one dataset type, :class:`AnomalyDataset`, and :func:`open_dataset` that builds it from a root.

Item convention (``dataset[i]`` is a dict):

* ``image``: float tensor [3, S, S], bicubic-resized, CLIP-normalised;
* ``mask``: float tensor [S, S] in {0, 1}; all zeros for a good image. For an anomalous image
  without a mask (a dataset with image-level labels only, e.g. HeadCT) the mask is **all NaN** and
  ``has_mask`` is False: such items must be left out of pixel metrics and segmentation losses
  (``batch["has_mask"]`` selects the usable ones);
* ``has_mask`` (bool), ``label`` (int 0/1), ``class_name``, ``specie``, ``dataset``, ``path``,
  ``mask_path`` (``""`` when none) and ``orig_size`` (tensor [H, W] of the file).

Files are decoded lazily in ``__getitem__``; a file that is missing or became unreadable raises a
:class:`DatasetError` naming it.
"""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import default_mask_threshold, image_to_tensor, mask_to_binary, mask_to_tensor, open_pil, pil_to_rgb
from .readers import read_records
from .records import DatasetError, DatasetWarning, Record, RecordList

#: (rgb PIL image, binary mask array or None) -> (rgb PIL image, binary mask array or None);
#: applied before resizing, e.g. for joint training augmentation.
JointTransform = Callable[[Image.Image, "np.ndarray | None"], tuple]


def _size_mismatch(mask_path: str, mask_size: tuple, img_path: str, img_size: tuple) -> DatasetError:
    msg = (f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but its image {img_path} is "
           f"{img_size[0]}x{img_size[1]}; a mask must have its image's size (resize it with "
           "nearest-neighbour interpolation, or fix the pairing)")
    short = (f"mask is {mask_size[0]}x{mask_size[1]} but its image {img_path} is "
             f"{img_size[0]}x{img_size[1]}")
    return DatasetError(msg, [(mask_path, short)])


def load_record(record: Record) -> tuple[Image.Image, np.ndarray | None]:
    """Decode one record: (RGB PIL image, binary mask H x W uint8, zeros for good, None if unknown)."""
    img = open_pil(record.img_path, "image")
    mask = None
    if record.mask_path:
        m = open_pil(record.mask_path, "mask")
        if m.size != img.size:
            raise _size_mismatch(record.mask_path, m.size, record.img_path, img.size)
        thr = default_mask_threshold(record.mask_path) if record.mask_threshold is None else record.mask_threshold
        mask = mask_to_binary(m, thr)
    elif record.label == 0:
        mask = np.zeros((img.size[1], img.size[0]), np.uint8)
    try:
        rgb = pil_to_rgb(img)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot convert image {record.img_path} (mode {img.mode}) to RGB: {e}",
                           [(record.img_path, str(e))]) from e
    return rgb, mask


def verify_record(record: Record) -> list[tuple[str, str]]:
    """Decode a record's files and compare sizes; returns its problems as (path, message)."""
    try:
        load_record(record)
    except DatasetError as e:
        return e.problems or [(record.img_path, str(e))]
    return []


class AnomalyDataset(Dataset):
    """A list of :class:`Record` as a torch Dataset (see the module docstring for the item dict).

    ``records`` may be a :class:`RecordList` from a reader; its ``skipped`` counts and ``root`` are
    kept. ``joint_transform`` (optional) augments the RGB image and binary mask together before
    resizing. ``normalize=False`` returns images in [0, 1] instead of CLIP-normalised.
    """

    def __init__(self, records: Iterable[Record], image_size: int = 518, normalize: bool = True,
                 joint_transform: JointTransform | None = None):
        self.records: list[Record] = list(records)
        self.image_size = int(image_size)
        self.normalize = normalize
        self.joint_transform = joint_transform
        self.root: str = getattr(records, "root", "")
        self.layout: str = getattr(records, "layout", "")
        self.skipped: Counter = Counter(getattr(records, "skipped", {}))
        self.problems: list[tuple[str, str]] = list(getattr(records, "problems", []))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        rgb, mask = load_record(r)
        orig = torch.tensor([rgb.size[1], rgb.size[0]])
        if self.joint_transform is not None:
            rgb, mask = self.joint_transform(rgb, mask)
        S = self.image_size
        if mask is None:
            mask_t = torch.full((S, S), float("nan"))
        else:
            mask_t = mask_to_tensor(mask, S)
        return {
            "image": image_to_tensor(rgb, S, self.normalize),
            "mask": mask_t,
            "has_mask": mask is not None,
            "label": int(r.label),
            "class_name": r.class_name,
            "specie": r.specie,
            "dataset": r.dataset,
            "path": r.img_path,
            "mask_path": r.mask_path or "",
            "orig_size": orig,
        }

    # ---- bookkeeping helpers ---------------------------------------------------------------
    @property
    def categories(self) -> list[str]:
        """Category names in order of first appearance."""
        return list(dict.fromkeys(r.class_name for r in self.records))

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        """True when every anomalous image has a mask (pixel metrics are defined)."""
        anomalous = [r for r in self.records if r.label == 1]
        return bool(anomalous) and all(r.mask_path for r in anomalous)

    def by_category(self) -> dict[str, list[int]]:
        """Indices of the items of each category, in category order."""
        out: dict[str, list[int]] = {c: [] for c in self.categories}
        for i, r in enumerate(self.records):
            out[r.class_name].append(i)
        return out

    def subset(self, categories: str | Sequence[str] | None = None,
               indices: Sequence[int] | None = None) -> "AnomalyDataset":
        """A new dataset with the same settings over some categories or indices."""
        if categories is not None:
            cats = {categories} if isinstance(categories, str) else set(categories)
            unknown = cats - set(self.categories)
            if unknown:
                raise DatasetError(f"unknown categories {sorted(unknown)}; available: {self.categories}")
            recs = [r for r in self.records if r.class_name in cats]
        else:
            recs = [self.records[i] for i in (indices or [])]
        out = AnomalyDataset(recs, self.image_size, self.normalize, self.joint_transform)
        out.root, out.layout, out.skipped = self.root, self.layout, Counter(self.skipped)
        return out

    def summary(self) -> str:
        """One line per category: images, anomalous, with masks."""
        lines = [f"{len(self)} images, {len(self.categories)} categories"
                 + (f" ({self.root})" if self.root else "")]
        for c, idx in self.by_category().items():
            recs = [self.records[i] for i in idx]
            n_a = sum(r.label for r in recs)
            n_m = sum(1 for r in recs if r.mask_path)
            lines.append(f"  {c}: {len(recs)} images, {n_a} anomalous, {n_m} masks")
        if self.skipped:
            lines.append("  skipped: " + ", ".join(f"{n} {k}" for k, n in self.skipped.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"AnomalyDataset({len(self)} images, categories={self.categories}, "
                f"image_size={self.image_size})")


def collate(batch: list[dict]) -> dict:
    """Stack tensors; ``label`` -> LongTensor, ``has_mask`` -> BoolTensor; strings stay lists."""
    out: dict = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        elif isinstance(vals[0], bool):
            out[key] = torch.tensor(vals, dtype=torch.bool)
        elif isinstance(vals[0], int):
            out[key] = torch.tensor(vals, dtype=torch.long)
        else:
            out[key] = list(vals)
    return out


def open_dataset(root: str | Path, layout: str = "auto", split: str = "test",
                 categories: Iterable[str] | None = None, image_size: int = 518,
                 skip_bad: bool = False, normalize: bool = True,
                 joint_transform: JointTransform | None = None, **reader_kwargs) -> AnomalyDataset:
    """Detect the layout of ``root`` (or use ``layout``), read it and return an :class:`AnomalyDataset`.

    ``split``: ``"test"`` (default; note the paper *trains* on the auxiliary set's test split),
    ``"train"`` or ``"all"``. ``categories``: a subset of category names. ``skip_bad=True`` leaves
    out bad items with a :class:`DatasetWarning` instead of raising; it then also decodes every file
    once up front (so truncated files and size mismatches are caught before training), and the
    counts are in ``dataset.skipped``. Extra keyword arguments go to the reader (e.g. ``name=`` for
    meta files, ``class_name=`` for single-class folders).
    """
    records = read_records(root, layout, split, categories, skip_bad, **reader_kwargs)
    if skip_bad:
        keep, bad = [], []
        for r in records:
            probs = verify_record(r)
            (bad.extend(probs) if probs else keep.append(r))
        if bad:
            warnings.warn(f"skip_bad=True: left out {len(bad)} unreadable item(s) of {records.root}. "
                          f"First: {bad[0][0]}: {bad[0][1]}", DatasetWarning, stacklevel=2)
            skipped = Counter(records.skipped)
            skipped["unreadable or mismatched file"] += len(bad)
            if not keep:
                raise DatasetError(f"every image of {records.root} was left out as unreadable", bad)
            records = RecordList(keep, root=records.root, layout=records.layout, skipped=skipped,
                                 problems=records.problems + bad)
    return AnomalyDataset(records, image_size, normalize, joint_transform)
