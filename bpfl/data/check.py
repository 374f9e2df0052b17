"""``check_dataset``: validate a dataset up front and report every problem at once.

This is what ``bpfl data check ROOT`` prints. It reads every split, then (``deep=True``) decodes
every image and mask once, so missing, truncated and unreadable files, masks whose size differs
from their image and empty masks of anomalous images all show up in one report.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import load_record
from .readers import detect_layout, read_records
from .records import DatasetError, Record


@dataclass
class DatasetReport:
    """Result of :func:`check_dataset`. ``ok`` is True when ``problems`` is empty."""

    root: str
    layout: str = ""
    n_images: int = 0
    n_anomalous: int = 0
    n_with_mask: int = 0
    categories: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        """A human-readable report: layout, per-category counts, problems, notes."""
        lines = [f"Dataset {self.root}", f"  layout: {self.layout or 'unknown'}",
                 f"  images: {self.n_images} ({self.n_anomalous} anomalous, {self.n_with_mask} with masks)"]
        if self.categories:
            lines.append(f"  categories ({len(self.categories)}):")
            for c in self.categories:
                k = self.counts.get(c, {})
                lines.append(f"    {c:<24} train {k.get('train', 0):>5}  test {k.get('test', 0):>5}  "
                             f"anomalous {k.get('anomalous', 0):>5}  masks {k.get('masks', 0):>5}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.ok:
            lines.append("  OK: no problems found")
        else:
            lines.append(f"  PROBLEMS ({len(self.problems)}):")
            lines += [f"    {p}: {m}" for p, m in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"    ... and {len(self.problems) - max_problems} more")
            lines.append("  Fix or remove these files, or load with skip_bad=True (--skip-bad) to leave "
                         "them out with a warning.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def check_dataset(root: str | Path, layout: str = "auto", deep: bool = True,
                  **reader_kwargs) -> DatasetReport:
    """Validate the dataset at ``root`` (all splits) and return a :class:`DatasetReport`.

    ``deep=False`` only checks the listing (files exist, masks pair with images); ``deep=True`` also
    decodes every file. Never raises for bad data: everything goes into ``report.problems``.
    """
    report = DatasetReport(root=str(root))
    try:
        report.layout = detect_layout(root) if layout == "auto" else layout
        records = read_records(root, report.layout, split="all", skip_bad=True, quiet=True,
                               **reader_kwargs)
    except DatasetError as e:
        report.problems = e.problems or [(str(root), str(e))]
        if len(report.problems) == 1 and str(e) not in report.problems[0][1]:
            report.problems = [(report.problems[0][0], str(e))]
        return report
    report.problems = list(records.problems)
    _fill_counts(report, records)
    if deep:
        for r in records:
            try:
                _, mask = load_record(r)
            except DatasetError as e:
                report.problems.extend(e.problems or [(r.img_path, str(e))])
                continue
            if r.label == 1 and mask is not None and not mask.any():
                report.problems.append((r.mask_path, f"mask of anomalous image {r.img_path} is empty"))
    if report.n_anomalous and not report.n_with_mask:
        report.notes.append("no masks: only image-level metrics can be computed")
    if report.n_images and report.n_anomalous == report.n_images:
        report.notes.append("every image is anomalous: only pixel-level metrics are defined")
    if not any(r.split == "train" for r in records):
        report.notes.append("no train split (the paper's protocol trains on the auxiliary set's test split)")
    return report


def _fill_counts(report: DatasetReport, records: list[Record]) -> None:
    report.n_images = len(records)
    report.n_anomalous = int(np.sum([r.label for r in records])) if records else 0
    report.n_with_mask = sum(1 for r in records if r.mask_path)
    report.categories = list(dict.fromkeys(r.class_name for r in records))
    for c in report.categories:
        rs = [r for r in records if r.class_name == c]
        sp = Counter(r.split for r in rs)
        report.counts[c] = {"train": sp.get("train", 0), "test": sp.get("test", 0),
                            "anomalous": sum(r.label for r in rs),
                            "masks": sum(1 for r in rs if r.mask_path)}
