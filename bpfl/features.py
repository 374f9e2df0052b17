"""Frozen CLIP image features, computed once per image and reused by every evaluation that needs them.

The CLIP image encoder is frozen (paper §3.1, §4.1) and the test images are not augmented, so an image's
features -- ``x_cls`` and the raw patch tokens of the chosen layers, :class:`bpfl.backbone.ImageFeatures` -- are
the same in every evaluation of it. Everything that changes from one evaluation to the next (the R Monte-Carlo
samples of Eq. 8-9, the seed, the trained weights of the prompts, flows and RCA) acts *after* the encoder. At paper
scale the encoder is most of the cost (ViT-L-14-336 at 518 px: about 90 % of one R = 10 inference on a CPU,
``benchmarks/results``), so a sweep over R and seeds (Table 3, notebook 05) or a per-epoch evaluation (Figure 4)
that encodes every image again spends nearly all its time recomputing the same tensors.

:class:`FeatureStore` holds them::

    store = FeatureStore()
    for R in (1, 3, 5, 10, 20):
        for seed in (0, 1, 2, 3, 4):
            evaluate(model, dataset, n_samples=R, seed=seed, features=store)   # each image encoded once
    print(store.stats())

Features live in memory (fp32, on ``storage_device``, the CPU by default) up to ``budget_bytes``; beyond that they
are written to ``spill_dir`` when one is given (one file per image) and read back when needed, or else simply
recomputed the next time (the result is the same; only the time differs). A ViT-L-14-336 image at 518 px takes
22.4 MB (4 layers x 1369 tokens x 1024 + 768 floats), so the default 4 GiB keeps about 190 images in memory.

Results are identical with and without a store: what is stored is exactly what the encoder returned (fp32,
copied without conversion), and a batch whose images are all missing is encoded as one batch, as without a
store (tested in ``tests/test_benchmarks.py``). A store belongs to one backbone at one precision: using it with
another raises instead of handing out features of the wrong model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Hashable, Sequence

import torch

from .backbone import ClipBackbone, ImageFeatures

#: the default memory budget (the same as training's feature cache, ``bpfl.train.train(feature_cache_bytes=...)``)
DEFAULT_BUDGET_BYTES = 4 << 30


def feature_bytes(feats: ImageFeatures) -> int:
    """Bytes held by ``feats`` (all tensors, at their dtype)."""
    return sum(t.numel() * t.element_size() for t in [feats.cls, *feats.patch_tokens])


def item_key(dataset, index: int) -> Hashable:
    """What determines dataset item ``index``'s image tensor, as a hashable key.

    For an :class:`bpfl.data.AnomalyDataset` (anything with ``records`` and ``image_size``): the image file (its
    path, size and modification time, so a file rewritten in place -- a regenerated synthetic set -- is encoded
    again), the image size and the normalisation; the same file seen through two dataset objects (e.g. the subsets
    of two evaluations) shares one entry. A dataset with a ``joint_transform`` (augmentation) is refused: its images
    change from one call to the next. Any other dataset: ``(id(dataset), index)`` (the store keeps a reference to
    the dataset, so the id cannot be reused while the store lives).
    """
    records = getattr(dataset, "records", None)
    if records is not None and hasattr(dataset, "image_size"):
        if getattr(dataset, "joint_transform", None) is not None:
            raise ValueError("this dataset has a joint_transform (augmentation): its images are not the same from "
                             "one call to the next, so their features cannot be stored and reused")
        rec = records[index]
        try:
            stat = os.stat(rec.img_path)
            version = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # unreadable now: the dataset itself will say so when it loads the image
            version = None
        return ("file", str(rec.img_path), version, int(dataset.image_size), bool(getattr(dataset, "normalize", True)))
    return ("object", id(dataset), int(index))


class FeatureStore:
    """Image features per dataset item, encoded on first use and reused afterwards (module docstring).

    ``budget_bytes``: memory for features (fp32, on ``storage_device``); ``spill_dir``: a folder for the features
    beyond the budget (``True``: a temporary folder, deleted by :meth:`clear` / when the store is collected;
    ``None``: do not spill, recompute instead). ``storage_device`` ``None`` keeps them on the CPU (GPU memory is
    left to the model); pass the model's device to keep them there.

    :meth:`features` is what evaluation calls (``bpfl.evaluate.predict_dataset(..., features=store)``). The
    counters ``encoded`` (images passed through the encoder), ``reused`` (images served from memory or disk) and
    ``spilled`` / ``recomputed`` say what happened; :meth:`stats` returns them with the memory in use.
    """

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, spill_dir: str | Path | bool | None = None,
                 storage_device: str | torch.device | None = None):
        self.budget_bytes = int(budget_bytes)
        self._own_spill = spill_dir is True
        self.spill_dir = Path(tempfile.mkdtemp(prefix="bpfl-features-")) if spill_dir is True else (
            Path(spill_dir) if spill_dir else None)
        if self.spill_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.storage_device = torch.device(storage_device or "cpu")
        self._memory: dict[Hashable, ImageFeatures] = {}
        self._disk: dict[Hashable, Path] = {}
        self._datasets: dict[int, object] = {}  # keeps id()-keyed datasets alive
        self._seen: set = set()  # every key ever encoded (to count recomputations beyond the budget)
        self._backbone: weakref.ref | None = None
        self._signature: tuple | None = None
        self.bytes_in_memory = 0
        self.encoded = self.reused = self.spilled = self.recomputed = 0
        if self._own_spill:
            weakref.finalize(self, shutil.rmtree, str(self.spill_dir), True)

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def signature(backbone: ClipBackbone) -> tuple:
        """What fixes the encoder's output besides the weights: architecture, size, layers, precision, attention."""
        return (backbone.name, backbone.pretrained, backbone.image_size, tuple(backbone.layers),
                getattr(backbone, "precision", "fp32"), getattr(backbone, "attention", None))

    def _bind(self, backbone: ClipBackbone) -> None:
        sig = self.signature(backbone)
        bound = self._backbone() if self._backbone is not None else None
        if self._backbone is None:
            self._backbone, self._signature = weakref.ref(backbone), sig
        elif bound is not backbone or sig != self._signature:
            raise ValueError(f"this FeatureStore holds features of another backbone ({self._signature}); it was "
                             f"asked for {sig}. Use one store per backbone and precision, or call clear() first.")

    def __len__(self) -> int:
        return len(self._memory) + len(self._disk)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._memory or key in self._disk

    def stats(self) -> dict:
        return {"images": len(self), "in_memory": len(self._memory), "on_disk": len(self._disk),
                "bytes_in_memory": self.bytes_in_memory, "encoded": self.encoded, "reused": self.reused,
                "spilled": self.spilled, "recomputed": self.recomputed}

    def clear(self) -> None:
        """Forget every feature (and the backbone it was bound to); delete spilled files."""
        for path in self._disk.values():
            path.unlink(missing_ok=True)
        self._memory.clear()
        self._disk.clear()
        self._datasets.clear()
        self._seen.clear()
        self._backbone = self._signature = None
        self.bytes_in_memory = 0

    # ------------------------------------------------------------------ storage
    def _put(self, key: Hashable, feats: ImageFeatures) -> None:
        size = feature_bytes(feats)
        in_memory = self.bytes_in_memory + size <= self.budget_bytes
        if not in_memory and self.spill_dir is None:
            return  # recomputed when asked for again
        one = feats.to(self.storage_device)
        if one.cls.device == feats.cls.device:  # .to() returned the encoder's own tensors: copy, they are views
            one = ImageFeatures(one.cls.clone(), [t.clone() for t in one.patch_tokens], one.grid)
        if in_memory:
            self._memory[key] = one
            self.bytes_in_memory += size
        else:
            path = self.spill_dir / f"{len(self._disk):08d}.pt"
            torch.save({"cls": one.cls.cpu(), "patch_tokens": [t.cpu() for t in one.patch_tokens],
                        "grid": list(one.grid)}, path)
            self._disk[key] = path
            self.spilled += 1

    def _get(self, key: Hashable) -> ImageFeatures:
        if key in self._memory:
            return self._memory[key]
        obj = torch.load(self._disk[key], map_location=self.storage_device, weights_only=True)
        return ImageFeatures(obj["cls"], list(obj["patch_tokens"]), tuple(obj["grid"]))

    # ------------------------------------------------------------------ the one call evaluation makes
    def features(self, backbone: ClipBackbone, dataset, indices: Sequence[int],
                 images: torch.Tensor | None = None) -> ImageFeatures:
        """Features of items ``indices`` of ``dataset`` on the backbone's device, batched in that order.

        ``images`` [len(indices), 3, S, S]: the items' images when the caller already has them (a data loader's
        batch); otherwise the missing ones are read from ``dataset``. Only the images not held yet are encoded,
        together as one batch.
        """
        self._bind(backbone)
        keys = [item_key(dataset, int(i)) for i in indices]
        if keys and keys[0][0] == "object":
            self._datasets[id(dataset)] = dataset
        missing = [j for j, k in enumerate(keys) if k not in self]
        fresh: dict[int, ImageFeatures] = {}
        if missing:
            if images is not None:
                batch = images if len(missing) == len(keys) else images[missing]
            else:
                batch = torch.stack([dataset[int(indices[j])]["image"] for j in missing])
            encoded = backbone.encode_image(batch)
            self.encoded += len(missing)
            self.recomputed += sum(1 for j in missing if keys[j] in self._seen)
            for n, j in enumerate(missing):
                fresh[j] = encoded[n:n + 1]
                self._seen.add(keys[j])
                if keys[j] not in self:  # a key repeated within the batch is stored once
                    self._put(keys[j], fresh[j])
            if len(missing) == len(keys):
                return encoded  # the encoder's own output: nothing to reassemble
        self.reused += len(keys) - len(missing)
        dev = backbone.device
        parts = [fresh[j] if j in fresh else self._get(keys[j]).to(dev) for j in range(len(keys))]
        return ImageFeatures.cat(parts)
