"""Which CLIP backbone a run uses: one rule for the demo, ``train``/``test``/``predict`` and the notebooks.

``choose_backbone("auto")`` (the default everywhere):

1. real OpenAI CLIP ViT-B-16 at 224 px (teaching scale) when its weights are in the local cache, or downloadable
   right now (never when ``HF_HUB_OFFLINE`` is set);
2. else the kit's **bundled toy CLIP** (``bpfl-toy`` with ``pretrained="bpfl-bundled"``, 112 px, Bayes-PFL at
   :data:`~bpfl.toyclip.pretrain.TOY_BAYESPFL_LR`): it ships inside the package (:mod:`bpfl.bundled_weights`),
   so a fresh clone offline shows zero-shot transfer on the synthetic set.

The tiny random-weight ``bpfl-tiny`` is used only when asked for by name (``"tiny"``): its numbers show the
pipeline's mechanics, never results about the method. Any other name is an open_clip architecture taken as given
(with ``pretrained``). :func:`run_notes` gives the sentences every output must carry for the chosen weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import open_clip

from .backbone import TINY_BACKBONE, cached_weights_file, default_layers, host_reachable, offline_requested
from .bundled_weights import BUNDLED_ARCH, BUNDLED_TAG, bundle_available, describe, verify_bundle
from .toyclip.pretrain import TOY_BAYESPFL_LR, TOY_IMAGE_SIZE

#: the real CLIP that ``auto`` takes when its weights can be had (teaching scale: ViT-B-16 at 224 px)
AUTO_REAL_CLIP = ("ViT-B-16", "openai", 224)
#: requests that name the tiny random stand-in / the toy CLIP
TINY_NAMES = ("tiny", TINY_BACKBONE)
TOY_NAMES = ("toy", BUNDLED_ARCH)

#: backbones small enough that one CPU thread is fastest (thread synchronisation costs more than it saves:
#: measured 20-100x faster with one thread on a busy 2-core machine)
SMALL_BACKBONES = (TINY_BACKBONE, BUNDLED_ARCH)

#: printed with every result of a random-weight backbone
RANDOM_BACKBONE_NOTE = (
    "NOTE: this run used a CLIP backbone with RANDOM weights. The numbers show that the pipeline works "
    "(mechanics), not what Bayes-PFL achieves: with random features zero-shot transfer to unseen categories is at "
    "chance. Leave --backbone at 'auto' (the bundled toy CLIP offline) or use real CLIP weights "
    "(--backbone ViT-L-14-336 --pretrained openai, or a local file) to see transfer."
)
#: printed with every result of the toy CLIP on data other than the kit's synthetic set
TOY_CLIP_OFF_DOMAIN_NOTE = (
    "NOTE: this run used the kit's toy CLIP, which was pretrained on procedural surfaces only. On data that is not "
    "the kit's synthetic set (MVTec-AD, VisA, medical images, your photos) its numbers mean nothing about "
    "Bayes-PFL; use real CLIP weights (--backbone ViT-L-14-336 --pretrained openai, or --pretrained FILE) there."
)


@dataclass(frozen=True)
class BackboneChoice:
    """A backbone decision: what to load, at which size and layers, and why."""

    name: str
    pretrained: str | None
    image_size: int
    layers: tuple[int, ...]
    kind: str  # "openai" (real CLIP), "toy" (the kit's toy CLIP), "random", "user" (named by the user)
    reason: str
    lr: float | None = None  # Bayes-PFL's learning rate on this backbone, when it differs from the preset's
    extra: dict = field(default_factory=dict)

    def overrides(self) -> dict:
        """``BayesPFLConfig`` fields for this backbone (plus ``lr`` where the backbone needs its own)."""
        out = dict(backbone=self.name, pretrained=self.pretrained, image_size=self.image_size, layers=self.layers)
        if self.lr is not None:
            out["lr"] = self.lr
        return out

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def label(self) -> str:
        """``name (weights)`` in a few words, for banners."""
        return f"{self.name} ({'RANDOM weights' if self.is_random else self.pretrained})"


def set_cpu_threads(backbone: str, device) -> int:
    """One torch thread for the kit's small backbones on a CPU (unless ``$BPFL_THREADS`` says otherwise); returns
    the thread count now in use."""
    import os

    import torch

    wanted = os.environ.get("BPFL_THREADS", "").strip()
    if wanted:
        torch.set_num_threads(int(wanted))
    elif str(device).startswith("cpu") and backbone in SMALL_BACKBONES:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def real_clip_available(name: str = AUTO_REAL_CLIP[0], tag: str = AUTO_REAL_CLIP[1]) -> str | None:
    """Why real CLIP weights can be had ("cached" / "downloadable"), or None."""
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg and cached_weights_file(cfg):
        return "cached"
    if not offline_requested() and host_reachable("huggingface.co"):
        return "downloadable"
    return None


def toy_choice(pretrained: str | Path | None = None, image_size: int | None = None, reason: str = "") -> BackboneChoice:
    """The toy CLIP: the bundled weights (default, hash-checked) or a file built with ``bpfl pretrain-toy-clip``."""
    if pretrained in (None, "", BUNDLED_TAG):
        verify_bundle()  # a missing or corrupted bundle is a clear error here, not later
        weights, why = BUNDLED_TAG, describe()
    else:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"toy CLIP file {pretrained} not found: build it with `bpfl pretrain-toy-clip "
                                    f"--out {pretrained}`, or leave --pretrained out to use the bundled one")
        weights, why = str(pretrained), f"the toy CLIP at {pretrained} (built locally)"
    return BackboneChoice(BUNDLED_ARCH, weights, int(image_size or TOY_IMAGE_SIZE), default_layers(BUNDLED_ARCH),
                          "toy", reason or why, lr=TOY_BAYESPFL_LR)


def choose_backbone(request: str | None = "auto", pretrained: str | None = None,
                    image_size: int | None = None) -> BackboneChoice:
    """The backbone for ``request``: ``"auto"`` (see the module docstring), ``"toy"``, ``"tiny"`` or an open_clip
    architecture / ``local-dir:PATH`` (with ``pretrained``: an open_clip tag, a file, or ``"random"``)."""
    request = (request or "auto").strip()
    if request == "auto":
        how = real_clip_available()
        if how is not None:
            name, tag, size = AUTO_REAL_CLIP
            return BackboneChoice(name, tag, int(image_size or size), default_layers(name), "openai",
                                  f"OpenAI {name} weights are {how} (teaching scale, {size} px)")
        if not bundle_available():
            verify_bundle()  # raises with what to do
        why = ("no real CLIP weights are cached and " + ("HF_HUB_OFFLINE is set" if offline_requested()
                                                        else "the hub is unreachable")
               + f": {describe()} (a teaching stand-in, not OpenAI CLIP)")
        return toy_choice(None, image_size, why)
    random = pretrained in ("none", "random")
    if request in TOY_NAMES and not random:
        return toy_choice(pretrained, image_size)
    if request in TINY_NAMES:
        return BackboneChoice(TINY_BACKBONE, None, int(image_size or 224), default_layers(TINY_BACKBONE), "random",
                              f"'{TINY_BACKBONE}' with RANDOM weights, as asked (mechanics only)")
    random = random or pretrained in (None, "")
    if request == "toy":
        request = BUNDLED_ARCH
    layers = default_layers(request) if not request.startswith("local-dir:") else (6, 12, 18, 24)
    return BackboneChoice(request, None if random else pretrained, int(image_size or 224), layers,
                          "random" if random else "user", "chosen with --backbone/--pretrained")


def _name_and_weights(obj) -> tuple[str, str | None]:
    """(architecture, pretrained) of a BayesPFL model, a ClipBackbone, a BayesPFLConfig or a BackboneChoice."""
    inner = getattr(obj, "backbone", None)
    if inner is not None and not isinstance(inner, str):  # a model: its ClipBackbone
        obj = inner
    name = obj.backbone if isinstance(getattr(obj, "backbone", None), str) else obj.name
    return name, obj.pretrained


def run_notes(model_or_config, synthetic_data: bool = True) -> list[str]:
    """The notes an output must carry: random weights -> mechanics only; the toy CLIP on data other than the
    synthetic set -> its numbers mean nothing there. ``model_or_config``: a ``BayesPFL`` model, a
    ``ClipBackbone``, a ``BayesPFLConfig`` or a :class:`BackboneChoice`."""
    name, pretrained = _name_and_weights(model_or_config)
    if pretrained in (None, "", "none", "random"):
        return [RANDOM_BACKBONE_NOTE]
    if name == BUNDLED_ARCH and not synthetic_data:
        return [TOY_CLIP_OFF_DOMAIN_NOTE]
    return []


__all__ = ["AUTO_REAL_CLIP", "RANDOM_BACKBONE_NOTE", "SMALL_BACKBONES", "TOY_CLIP_OFF_DOMAIN_NOTE", "BackboneChoice",
           "choose_backbone", "real_clip_available", "run_notes", "set_cpu_threads", "toy_choice"]
