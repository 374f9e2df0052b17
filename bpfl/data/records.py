"""The unit every reader produces: one :class:`Record` per image, and the error type for bad data.

A reader never opens images; it lists files, pairs images with masks and checks that the files
exist. Everything it finds wrong goes through a :class:`ProblemLog`, which either raises one
:class:`DatasetError` listing every problem (the default) or, when the user passed
``skip_bad=True``, drops the affected records, counts them by reason and emits one warning.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

#: How many problems a DatasetError message spells out before it says "... and N more".
MAX_LISTED = 8

SPLITS = ("train", "test", "all")


class DatasetError(ValueError):
    """Bad or missing data. The message names the file(s) and says what to do.

    ``problems`` holds every ``(path, message)`` pair found, also the ones the message leaves out.
    """

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DatasetWarning(UserWarning):
    """Emitted when ``skip_bad=True`` made a reader or loader leave files out."""


@dataclass(frozen=True)
class Record:
    """One image of a dataset.

    ``mask_path`` is ``None`` for good images and for anomalous images of a dataset without pixel
    annotations (then :attr:`has_mask` is False and only image-level metrics apply).
    ``mask_threshold``: a mask pixel is anomalous when its value is greater than this; ``None``
    means 127 for JPEG masks (compression noise) and 0 for everything else.
    """

    img_path: str
    mask_path: str | None
    label: int
    class_name: str
    specie: str = ""
    dataset: str = ""
    split: str = "test"
    mask_threshold: int | None = None

    @property
    def has_mask(self) -> bool:
        """True when the pixel ground truth is known: good images (all zeros) or a mask file."""
        return self.label == 0 or self.mask_path is not None

    def to_dict(self) -> dict:
        return asdict(self)


class RecordList(list):
    """A plain list of :class:`Record` that also carries what the reader skipped.

    ``skipped`` counts left-out files by reason (empty unless ``skip_bad=True``), ``problems`` lists
    them as ``(path, message)``, and ``root``/``layout`` say where the records came from.
    """

    def __init__(self, records=(), *, root: str = "", layout: str = "",
                 skipped: Counter | None = None, problems: list | None = None):
        super().__init__(records)
        self.root = root
        self.layout = layout
        self.skipped: Counter = Counter(skipped or {})
        self.problems: list[tuple[str, str]] = list(problems or [])

    @property
    def categories(self) -> list[str]:
        """Category names in order of first appearance."""
        return list(dict.fromkeys(r.class_name for r in self))


class ProblemLog:
    """Collects problems while a reader runs, then raises or warns once at the end."""

    def __init__(self, root: str | Path, skip_bad: bool = False, what: str = "dataset"):
        self.root = str(root)
        self.skip_bad = skip_bad
        self.what = what
        self.problems: list[tuple[str, str]] = []
        self.skipped: Counter = Counter()

    def add(self, path: str | Path, message: str, reason: str) -> None:
        """Record a problem with ``path``; ``reason`` is the short key counted in ``skipped``."""
        self.problems.append((str(path), message))
        self.skipped[reason] += 1

    def __bool__(self) -> bool:
        return bool(self.problems)

    def finish(self, records: list[Record], layout: str, quiet: bool = False) -> RecordList:
        """Raise a DatasetError listing every problem, or (``skip_bad``) warn and return the rest."""
        if self.problems and not self.skip_bad:
            raise DatasetError(format_problems(self.problems, self.root, self.what, hint=True),
                               self.problems)
        if not records:
            msg = f"no usable images found in {self.root}"
            if self.problems:
                msg += " (every item was left out):\n" + format_problems(self.problems, self.root,
                                                                        self.what, hint=False)
            else:
                msg += "; check the root folder, the split and the categories"
            raise DatasetError(msg, self.problems or [(self.root, "no images")])
        if self.problems and not quiet:
            counts = ", ".join(f"{n} {k}" for k, n in self.skipped.items())
            first = "; ".join(f"{p}: {m}" for p, m in self.problems[:3])
            warnings.warn(f"skip_bad=True: left out {len(self.problems)} item(s) of {self.root} "
                          f"({counts}). First: {first}", DatasetWarning, stacklevel=3)
        return RecordList(records, root=self.root, layout=layout,
                          skipped=self.skipped if self.skip_bad else None,
                          problems=self.problems)


def format_problems(problems: list[tuple[str, str]], root: str, what: str = "dataset",
                    hint: bool = True) -> str:
    """One message listing up to :data:`MAX_LISTED` problems, each with its file path."""
    n = len(problems)
    lines = [f"{n} problem{'s' if n != 1 else ''} in {what} at {root}:"]
    lines += [f"  - {p}: {m}" for p, m in problems[:MAX_LISTED]]
    if n > MAX_LISTED:
        lines.append(f"  ... and {n - MAX_LISTED} more")
    if hint:
        lines.append(f"Fix or remove these files; `bpfl data check {root}` lists every problem, and "
                     "skip_bad=True (CLI: --skip-bad) leaves the bad items out with a warning.")
    return "\n".join(lines)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return split
