"""Pretraining the toy CLIP: symmetric InfoNCE on captioned procedural surfaces, plus a dense auxiliary term.

Loss (per step, one batch of the stream, :mod:`bpfl.toyclip.generator`):

* **CLIP loss** -- symmetric InfoNCE between the normalised image embeddings (``ln_post(CLS) @ proj``) and
  caption embeddings, scaled by a learnable logit scale (initialised at 1/0.07, clamped at 100) as in CLIP.
  Targets are *multi-positive*: caption j is a positive for image i whenever it describes it
  (:func:`~bpfl.toyclip.generator.consistency_matrix`: "a photo of a damaged surface" fits every defective
  image of the batch); each row / column's target is uniform over its positives.
* **Dense auxiliary loss**, weighted :data:`DEFAULT_DENSE_WEIGHT` (4) against the CLIP loss (documented departure
  from plain CLIP; ``dense_weight=0`` switches it off) -- the
  patch tokens of the vision layers Bayes-PFL reads (raw residual stream; the last layer through
  ``ln_post`` and ``proj``, the others through a linear probe per layer, discarded after pretraining) are
  compared with the text embeddings of "a photo of a flawless {material} surface." and "a photo of a damaged
  {material} surface.": the patch's logit difference tau * (cos(p, t_damaged) - cos(p, t_flawless)), tau =
  1/0.07, is trained against the fraction of the patch covered by the generator's defect mask
  (foreground/background-balanced binary cross-entropy). It mirrors how Bayes-PFL builds its maps (Eq. 11),
  so that the frozen patch features separate defects from surface at patch level.
* **Image-level state term** (``state_weight``, part of the same departure) -- the same prompt pair against the
  image embedding: tau * (cos(x, t_damaged) - cos(x, t_flawless)) trained against "has a defect" (BCE). The
  captions already carry this information; the term makes it explicit, as Bayes-PFL's text branch uses it.

Everything is seeded: the model initialisation by ``torch.manual_seed(seed)``, batch ``b`` is samples
``b*batch_size ...`` of the stream with ``seed``. Checkpoints (model, probes, optimizer, step, RNG state,
loss history) are written atomically every ``checkpoint_every`` steps to ``<out>.train.pt``; with
``resume=True`` a killed run continues from there and ends with the same weights as an uninterrupted run
(same machine and thread count). The result is a plain open_clip state dict (``torch.save``) that
``bpfl.backbone.load_backbone(arch, pretrained=FILE, image_size=...)`` reads (the positional embedding is
resized to the requested size), a ``local-dir:`` folder and a ``.json`` record of how it was made.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import resize_pos_embed
from tqdm.auto import tqdm

from ..backbone import default_layers, load_backbone
from ..bundled_weights import BUNDLED_FILE, BUNDLED_TAG, initial_token_table, write_bundle
from ..console import cpu_model
from ..data.images import CLIP_MEAN, CLIP_STD
from .generator import (
    DEFAULT_HELD_OUT,
    FAMILIES,
    allowed_families,
    held_out_words,
    pseudo_word,
    samples_to_batch,
    toy_sample,
)

#: The toy architecture (``bpfl/model_configs/bpfl-toy.json``): ViT 6 x 128, patch 8; text 4 x 64; joint dim 64.
TOY_ARCH = "bpfl-toy"
#: Size Bayes-PFL uses the toy CLIP at (14 x 14 patch grid) and the size it is pretrained at (8 x 8 grid).
TOY_IMAGE_SIZE = 112
TOY_PRETRAIN_SIZE = 64
#: Default pretraining length: 2000 x 48 = 96k generated images at 64 px (15-35 min wall on a 2-core VM, by VM speed:
#: torch on one core, the batch generator on the other; docs/toy_clip.md).
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 48
#: Weight of the dense (patch-level) term against the CLIP loss. 4: on a development draw (docs/toy_clip.md,
#: "How the recipe was chosen") weights 1 -> 2 -> 4 each raised transfer; 8 gave no more.
DEFAULT_DENSE_WEIGHT = 4.0
FORMAT = "bpfl-toyclip-train-v1"
DENSE_TAU = 1.0 / 0.07
#: std of open_clip's token-embedding initialisation: what an unseen word's embedding looks like
UNKNOWN_STD = 0.02


def cache_dir() -> Path:
    """``$BPFL_CACHE`` (default ``~/.cache/bpfl``)."""
    return Path(os.environ.get("BPFL_CACHE") or "~/.cache/bpfl").expanduser()


def default_toy_clip_path(arch: str = TOY_ARCH, seed: int = 0) -> Path:
    """Where the toy CLIP checkpoint lives by default: ``$BPFL_CACHE/toyclip/<arch>-seed<seed>.pt``."""
    return cache_dir() / "toyclip" / f"{arch}-seed{seed}.pt"


def toy_layers(arch: str = TOY_ARCH) -> tuple[int, ...]:
    """The 4 vision blocks Bayes-PFL reads (and the dense loss supervises): ``default_layers(arch)``."""
    return default_layers(arch)


#: Bayes-PFL's learning rate on the toy CLIP. The teaching preset's 3e-2 was chosen for a *random* backbone
#: (``BayesPFLConfig.teaching``); on the pretrained toy CLIP it overshoots (a loss spike in the last epoch took
#: one run's pixel AUROC from 0.90 to 0.83), and 1e-2 was as good or better on a development draw
#: (docs/toy_clip.md, "How the recipe was chosen"). Also used by ``compare_backbones`` (notebook 04), which
#: trains 6 epochs (84 steps) in fast mode on the default synthetic split.
TOY_BAYESPFL_LR = 1e-2


def toy_bayespfl_overrides(path: str | Path | None = None, arch: str = TOY_ARCH,
                           image_size: int = TOY_IMAGE_SIZE) -> dict:
    """Overrides for ``BayesPFLConfig.teaching(**overrides)`` that run Bayes-PFL on the toy CLIP (``path``: a
    checkpoint file; default the bundled weights, ``"bpfl-bundled"``): the backbone, its size and layers, and
    :data:`TOY_BAYESPFL_LR`."""
    return dict(backbone=arch, pretrained=str(path) if path else BUNDLED_TAG, image_size=image_size,
                layers=toy_layers(arch), lr=TOY_BAYESPFL_LR)


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory (``getrusage`` max RSS), in MiB: of this process so far, or with ``children=True``
    of its largest finished child process (the batch-generator worker)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / (1024.0 * 1024.0)


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class PretrainSettings:
    """Everything that determines the weights (a resumed run must use the same settings)."""

    arch: str = TOY_ARCH
    seed: int = 0
    steps: int = DEFAULT_STEPS
    batch_size: int = DEFAULT_BATCH
    image_size: int = TOY_PRETRAIN_SIZE
    final_image_size: int | None = None  # the last ``final_steps`` steps at this size (None: no such phase)
    final_steps: int = 0
    held_out_families: tuple[str, ...] = DEFAULT_HELD_OUT
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    dense_weight: float = DEFAULT_DENSE_WEIGHT
    state_weight: float = 1.0
    dense_layers: tuple[int, ...] | None = None  # None: toy_layers(arch)
    p_defect: float = 0.5
    p_pseudo_word: float = 0.1
    #: how the token-embedding table starts: "numpy" (N(0, 0.02^2) from :func:`initial_token_table`, the same on
    #: every machine, so the rows pretraining never touches need not be stored: :mod:`bpfl.toyclip.bundle`) or
    #: "torch" (open_clip's own initialisation, the recipe before the bundled toy CLIP)
    token_init: str = "numpy"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["held_out_families"] = list(self.held_out_families)
        d["dense_layers"] = list(self.dense_layers) if self.dense_layers else None
        return d


# ----------------------------------------------------------------------------------------------- model bits
def encode_text(clip: nn.Module, ids: torch.Tensor, unknown: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """open_clip text tower on token ids, truncated after the last EOT (exact: the mask is causal).

    ``unknown`` [n, L] bool: positions whose token embedding is replaced by a fresh N(0, 0.02^2) vector -- what
    a word never seen in pretraining looks like (its embedding row keeps open_clip's initialisation).
    """
    eot = ids.argmax(dim=-1)  # EOT has the largest id
    n = int(eot.max()) + 1
    x = clip.token_embedding(ids[:, :n])
    if unknown is not None and bool(unknown.any()):
        u = unknown[:, :n]
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype) * UNKNOWN_STD
        x = torch.where(u[..., None], noise.to(x.device), x)
    x = x + clip.positional_embedding[:n]
    mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def unknown_positions(tokenizer, ids: torch.Tensor, words: Sequence[str | None]) -> torch.Tensor:
    """[n, L] bool: the tokens of ``words[i]`` (a pseudo-word, or None) inside row i of ``ids``."""
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for i, w in enumerate(words):
        if not w:
            continue
        sub = tokenizer.encode(w)
        row = ids[i].tolist()
        for j in range(len(row) - len(sub) + 1):
            if row[j:j + len(sub)] == sub:
                out[i, j:j + len(sub)] = True
                break
    return out


class DenseProbes(nn.Module):
    """Linear maps (no bias) from intermediate vision layers into the joint space, used only by the dense
    auxiliary loss during pretraining (Bayes-PFL learns its own, :class:`bpfl.model.BayesPFL`)."""

    def __init__(self, layers: Sequence[int], n_blocks: int, width: int, embed_dim: int):
        super().__init__()
        self.layers = tuple(int(l) for l in layers)
        self.n_blocks = n_blocks
        self.maps = nn.ModuleDict({str(l): nn.Linear(width, embed_dim, bias=False)
                                   for l in self.layers if l != n_blocks})

    def project(self, clip: nn.Module, layer: int, tokens: torch.Tensor) -> torch.Tensor:
        if layer == self.n_blocks:  # the CLIP-native path of the last block
            return clip.visual.ln_post(tokens) @ clip.visual.proj
        return self.maps[str(layer)](tokens)


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; ``positives`` [N images, N captions] bool with a True diagonal."""
    logits = logit_scale.exp().clamp(max=100) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    pos = positives.float()
    i2t = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(pos / pos.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return 0.5 * (i2t + t2i)


def balanced_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE with logits, the defect and the surface parts weighted equally (soft targets in [0, 1])."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    w_pos, w_neg = target, 1.0 - target
    loss = (bce * w_neg).sum() / w_neg.sum().clamp_min(1e-6)
    if float(w_pos.sum()) > 0:
        loss = 0.5 * loss + 0.5 * (bce * w_pos).sum() / w_pos.sum()
    return loss


def dense_prompts(batch: dict, rng: np.random.Generator) -> tuple[list[str], list[str], list[str | None]]:
    """Per image a (flawless, damaged) prompt pair naming its material fully, partly, by an unknown word or
    not at all; returns (flawless prompts, damaged prompts, the unknown word of each pair or None)."""
    normal, damaged, unknown = [], [], []
    for fam, col in zip(batch["family"], batch["colour"]):
        r = rng.random()
        word = FAMILIES[fam].word
        pseudo = None
        if r < 0.35:
            desc = f"{col} {word}"
        elif r < 0.6:
            desc = word
        elif r < 0.75:
            desc = pseudo = pseudo_word(rng)
        else:
            desc = ""
        normal.append(" ".join(f"a photo of a flawless {desc} surface.".split()))
        damaged.append(" ".join(f"a photo of a damaged {desc} surface.".split()))
        unknown.append(pseudo)
    return normal, damaged, unknown


def pretrain_losses(clip: nn.Module, probes: DenseProbes, tokenizer, batch: dict, settings: PretrainSettings,
                    rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """All loss terms for one batch (see the module docstring)."""
    layers = probes.layers
    out = clip.visual.forward_intermediates(batch["image"], indices=[l - 1 for l in layers], output_fmt="NLC",
                                            intermediates_only=False)
    captions = list(batch["caption"])
    texts, unknown_words = captions, list(batch.get("pseudo", [None] * len(captions)))
    n_cap = len(captions)
    if settings.dense_weight > 0:
        normal, damaged, unk = dense_prompts(batch, rng)
        texts = captions + normal + damaged
        unknown_words = unknown_words + unk + unk
    ids = tokenizer(texts)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    txt = encode_text(clip, ids, unknown_positions(tokenizer, ids, unknown_words), gen)
    losses = {"clip": contrastive_loss(out["image_features"], txt[:n_cap], clip.logit_scale,
                                       batch["consistent"].to(txt.device))}
    total = losses["clip"]
    if settings.dense_weight > 0:
        n = len(captions)
        t_n = F.normalize(txt[n_cap:n_cap + n], dim=-1)
        t_a = F.normalize(txt[n_cap + n:], dim=-1)
        patch = clip.visual.patch_size[0] if isinstance(clip.visual.patch_size, tuple) else clip.visual.patch_size
        target = F.avg_pool2d(batch["mask_soft"].float()[:, None], patch).flatten(1)  # [N, HW]
        dense = []
        for layer, tokens in zip(layers, out["image_intermediates"]):
            p = F.normalize(probes.project(clip, layer, tokens), dim=-1)  # [N, HW, C]
            logit = DENSE_TAU * (torch.einsum("npc,nc->np", p, t_a) - torch.einsum("npc,nc->np", p, t_n))
            dense.append(balanced_bce(logit, target))
        losses["dense"] = torch.stack(dense).mean()
        total = total + settings.dense_weight * losses["dense"]
    if settings.dense_weight > 0 and settings.state_weight > 0:
        x = F.normalize(out["image_features"], dim=-1)
        logit = DENSE_TAU * ((x * t_a).sum(-1) - (x * t_n).sum(-1))
        losses["state"] = F.binary_cross_entropy_with_logits(logit, batch["label"].float().to(logit.device))
        total = total + settings.state_weight * losses["state"]
    losses["total"] = total
    return losses


def final_phase_start(settings: PretrainSettings) -> int:
    """First step of the final phase at ``final_image_size`` (``steps`` when there is none)."""
    if not settings.final_image_size or settings.final_steps <= 0:
        return settings.steps
    return max(0, settings.steps - int(settings.final_steps))


def image_size_at(settings: PretrainSettings, step: int) -> int:
    """The image size of batch ``step``: ``image_size``, then ``final_image_size`` in the final phase."""
    return int(settings.final_image_size) if step >= final_phase_start(settings) else settings.image_size


def output_image_size(settings: PretrainSettings) -> int:
    """The size the finished weights were last trained at (what their positional embedding is laid out for)."""
    return image_size_at(settings, settings.steps - 1)


def make_batch(settings: PretrainSettings, step: int) -> dict:
    """Batch ``step`` of the stream (a pure function of the settings and the step)."""
    kw = dict(held_out=settings.held_out_families, p_defect=settings.p_defect,
              p_pseudo_word=settings.p_pseudo_word)
    b, size = settings.batch_size, image_size_at(settings, step)
    return samples_to_batch([toy_sample(settings.seed, step * b + i, size, **kw) for i in range(b)])


def grow_image_size(clip: nn.Module, size: int, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Lay ``clip``'s vision tower out for ``size`` px in place: the positional embedding is resized
    (open_clip's ``resize_pos_embed``: bicubic, CLS kept) and so are its AdamW moments (second moment clamped
    at 0), so training continues at the new size with the optimizer's history."""
    visual = clip.visual
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    pos = visual.positional_embedding
    old_grid = visual.grid_size
    new_grid = (size // patch, size // patch)
    if tuple(old_grid) == new_grid:
        return

    def resized(t: torch.Tensor) -> torch.Tensor:
        sd = {"visual.positional_embedding": t.detach().clone()}
        resize_pos_embed(sd, clip)
        return sd["visual.positional_embedding"].to(t.dtype)

    visual.image_size, visual.grid_size = (size, size), new_grid
    new = nn.Parameter(resized(pos), requires_grad=pos.requires_grad)
    visual.positional_embedding = new  # a new Parameter (autograd keeps the old one's shape)
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new if q is pos else q for q in group["params"]]
        state = optimizer.state.pop(pos, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key] = resized(state[key]).clamp_min(0) if key == "exp_avg_sq" else resized(state[key])
        if state:
            optimizer.state[new] = state


class _Batches(torch.utils.data.IterableDataset):
    """Batches ``start .. end-1`` of the stream, in order (generated in a DataLoader worker process, so the
    next batch is drawn while the model trains on this one; the batches are the same as :func:`make_batch`'s)."""

    def __init__(self, settings: PretrainSettings, start: int, end: int):
        self.settings, self.start, self.end = settings, int(start), int(end)

    def __iter__(self):
        for b in range(self.start, self.end):
            yield make_batch(self.settings, b)


def batch_iterator(settings: PretrainSettings, start: int, end: int, workers: int = 1):
    """Batches ``start .. end-1``: generated ahead in ``workers`` (0 or 1) background process(es), else inline."""
    if workers <= 0:
        return (make_batch(settings, b) for b in range(start, end))
    return iter(torch.utils.data.DataLoader(_Batches(settings, start, end), batch_size=None, num_workers=1,
                                            prefetch_factor=2))


def _param_groups(clip: nn.Module, probes: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for mod in (clip, probes):
        for name, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            skip = (p.ndim < 2 or "ln" in name or "bias" in name or "logit_scale" in name
                    or "token_embedding" in name or "positional_embedding" in name or "class_embedding" in name)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(clip: nn.Module, probes: nn.Module, settings: PretrainSettings) -> torch.optim.AdamW:
    """AdamW (betas 0.9/0.98, eps 1e-6), fused into one kernel where this torch build has it (faster on the
    CPU: the 49408 x 64 token-embedding table is updated every step)."""
    kw = dict(lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)
    try:
        return torch.optim.AdamW(_param_groups(clip, probes, settings.weight_decay), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # an older torch without CPU fused AdamW
        return torch.optim.AdamW(_param_groups(clip, probes, settings.weight_decay), **kw)


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    warm = max(1, min(settings.warmup, settings.steps // 5))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, settings.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_state_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".train.pt")


def local_dir_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + "-local-dir")


def build_toy_model(settings: PretrainSettings):
    """(clip, probes, tokenizer) initialised from ``settings.seed``."""
    torch.manual_seed(settings.seed)
    clip = open_clip.create_model(settings.arch, pretrained=None, force_image_size=settings.image_size)
    clip = clip.float().train()
    if settings.token_init == "numpy":
        emb = clip.token_embedding.weight
        with torch.no_grad():
            emb.copy_(initial_token_table(settings.seed, emb.shape[0], emb.shape[1]))
    elif settings.token_init != "torch":
        raise ValueError(f"token_init={settings.token_init!r}: choose 'numpy' or 'torch'")
    n_blocks = len(clip.visual.transformer.resblocks)
    layers = tuple(settings.dense_layers) if settings.dense_layers else toy_layers(settings.arch)
    probes = DenseProbes(layers, n_blocks, clip.visual.conv1.out_channels, clip.text_projection.shape[1])
    return clip, probes, open_clip.get_tokenizer(settings.arch)


@dataclass
class PretrainResult:
    path: Path | None
    local_dir: Path | None
    steps_done: int
    seconds: float
    peak_rss_mb: float
    history: list[dict] = field(default_factory=list)
    finished: bool = True
    settings: dict = field(default_factory=dict)


def _write_final(clip: nn.Module, out_path: Path, settings: PretrainSettings, meta: dict,
                 local_dir: bool) -> Path | None:
    sd = {k: v.detach().cpu().clone() for k, v in clip.state_dict().items()}
    _atomic_save(sd, out_path)
    folder = None
    if local_dir:
        folder = local_dir_path(out_path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = open_clip.get_model_config(settings.arch)
        cfg["vision_cfg"]["image_size"] = output_image_size(settings)  # the size the weights were trained at last
        (folder / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}, indent=2))
        _atomic_save(sd, folder / "open_clip_pytorch_model.bin")
    tmp = out_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, out_path.with_suffix(".json"))
    return folder


def pretrain_toy_clip(out_path: str | Path | None = None, seed: int = 0, steps: int = DEFAULT_STEPS,
                      batch_size: int = DEFAULT_BATCH, arch: str = TOY_ARCH, image_size: int = TOY_PRETRAIN_SIZE,
                      held_out_families: Sequence[str] = DEFAULT_HELD_OUT, resume: bool = True,
                      progress: bool = True, *, lr: float = 1e-3, weight_decay: float = 0.05, warmup: int = 100,
                      final_image_size: int | None = None, final_steps: int = 0,
                      dense_weight: float = DEFAULT_DENSE_WEIGHT, state_weight: float = 1.0,
                      dense_layers: Sequence[int] | None = None,
                      p_defect: float = 0.5, p_pseudo_word: float = 0.1, checkpoint_every: int = 50,
                      stop_at: int | None = None, local_dir: bool = True, log_every: int = 10,
                      threads: int | None = None, workers: int = 1) -> PretrainResult:
    """Pretrain the toy CLIP and write it to ``out_path`` (default :func:`default_toy_clip_path`).

    ``steps`` x ``batch_size`` generated images of ``image_size`` px; ``held_out_families`` are never drawn
    (see :mod:`bpfl.toyclip.generator`). ``resume=True`` continues from ``<out>.train.pt`` if it exists (and
    returns at once if the finished checkpoint is already there with the same settings); ``resume=False``
    starts over. ``stop_at`` ends the run after that many steps *without* finishing it (the training state is
    saved; a later call with ``resume=True`` continues). ``workers=1`` generates the next batches in a background
    process while the model trains (same batches, same weights as ``workers=0``); ``threads`` (default: all cores
    but the worker's) is restored afterwards. ``final_image_size`` / ``final_steps``: the last steps at a larger
    size (the positional embedding is resized once, :func:`grow_image_size`). Returns a :class:`PretrainResult`
    (time, peak RSS, loss history); ``path`` is None while unfinished.
    """
    settings = PretrainSettings(arch=arch, seed=int(seed), steps=int(steps), batch_size=int(batch_size),
                                image_size=int(image_size),
                                final_image_size=int(final_image_size) if final_image_size else None,
                                final_steps=int(final_steps) if final_image_size else 0,
                                held_out_families=tuple(held_out_families), lr=lr,
                                weight_decay=weight_decay, warmup=int(warmup), dense_weight=float(dense_weight),
                                state_weight=float(state_weight),
                                dense_layers=tuple(dense_layers) if dense_layers else None,
                                p_defect=p_defect, p_pseudo_word=p_pseudo_word)
    allowed_families(settings.held_out_families)  # validates the names
    out_path = Path(out_path) if out_path is not None else default_toy_clip_path(arch, seed)
    if resume:
        done = _already_pretrained(out_path, settings, progress)
        if done is not None:
            return done
    run = _PretrainRun(settings, out_path, progress, log_every)
    run.restore(resume)
    end = settings.steps if stop_at is None else min(settings.steps, int(stop_at))
    run.train_until(end, checkpoint_every, threads, workers)
    if run.step < settings.steps:  # stopped early on purpose: keep the state for resuming
        run.save_state()
        return PretrainResult(None, None, run.step, run.seconds(), peak_rss_mb(), run.history, False,
                              settings.to_dict())
    return run.write_final(local_dir, workers)


def _already_pretrained(out_path: Path, settings: PretrainSettings, progress: bool) -> PretrainResult | None:
    """The finished checkpoint at ``out_path`` if it was built with ``settings`` (and no run is half done)."""
    meta_path = out_path.with_suffix(".json")
    if not (out_path.is_file() and meta_path.is_file() and not train_state_path(out_path).exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("settings") != settings.to_dict():
        return None
    if progress:
        print(f"[bpfl] toy CLIP already pretrained: {out_path}")
    return PretrainResult(out_path, local_dir_path(out_path) if local_dir_path(out_path).is_dir() else None,
                          settings.steps, float(meta.get("seconds", 0.0)), float(meta.get("peak_rss_mb", 0.0)),
                          meta.get("history", []), True, meta["settings"])


class _PretrainRun:
    """One pretraining run in named steps: :meth:`restore`, :meth:`train_until` (:meth:`step_once` per batch,
    :meth:`save_state` every few steps), :meth:`write_final`."""

    def __init__(self, settings: PretrainSettings, out_path: Path, progress: bool, log_every: int):
        self.settings, self.out_path, self.progress, self.log_every = settings, out_path, progress, log_every
        self.state_path = train_state_path(out_path)
        self.clip, self.probes, self.tokenizer = build_toy_model(settings)
        self.optimizer = make_optimizer(self.clip, self.probes, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, settings))
        self.step, self.history, self.elapsed = 0, [], 0.0
        self.t0 = time.perf_counter()
        self.threads_used = torch.get_num_threads()

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def restore(self, resume: bool) -> None:
        """Continue from ``<out>.train.pt`` (``resume``; same settings required), or delete a stale one."""
        settings, state_path = self.settings, self.state_path
        if not (resume and state_path.is_file()):
            if state_path.exists():
                state_path.unlink()
            return
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("format") != FORMAT:
            raise ValueError(f"{state_path} is not a toy-CLIP training state")
        if st["settings"] != settings.to_dict():
            diff = {k: (v, settings.to_dict().get(k)) for k, v in st["settings"].items()
                    if settings.to_dict().get(k) != v}
            raise ValueError(f"resume: {state_path} was written with other settings {diff} (saved, now); "
                             "use the same settings, resume=False to start over, or another out_path")
        if int(st["step"]) >= final_phase_start(settings):  # saved in the final phase: lay it out for that size
            grow_image_size(self.clip, int(settings.final_image_size), self.optimizer)
        self.clip.load_state_dict(st["model"])
        self.probes.load_state_dict(st["probes"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["torch_rng"])
        self.step, self.history, self.elapsed = int(st["step"]), list(st["history"]), float(st["elapsed"])
        if self.progress:
            print(f"[bpfl] resuming toy-CLIP pretraining from step {self.step}/{settings.steps} ({state_path})")

    def save_state(self) -> None:
        _atomic_save({"format": FORMAT, "settings": self.settings.to_dict(), "step": self.step,
                      "model": self.clip.state_dict(), "probes": self.probes.state_dict(),
                      "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "torch_rng": torch.get_rng_state(), "history": self.history, "elapsed": self.seconds()},
                     self.state_path)

    def step_once(self, batch: dict) -> dict[str, torch.Tensor]:
        """One AdamW step on the CLIP + dense + state losses of ``batch`` (clipped gradients, clamped scale)."""
        settings = self.settings
        if self.step == final_phase_start(settings):
            grow_image_size(self.clip, int(settings.final_image_size), self.optimizer)
        rng = np.random.default_rng([settings.seed, 0xD3A5E, self.step])  # dense-prompt wording of this step
        losses = pretrain_losses(self.clip, self.probes, self.tokenizer, batch, settings, rng)
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(list(self.clip.parameters()) + list(self.probes.parameters()), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(100))
        self.step += 1
        return losses

    def train_until(self, end: int, checkpoint_every: int, threads: int | None, workers: int) -> None:
        """Steps up to ``end``, logging every ``log_every`` and saving the state every ``checkpoint_every``; the
        torch thread count is restored afterwards, also on Ctrl-C (the last saved state stays on disk)."""
        settings = self.settings
        self.t0 = time.perf_counter()
        self.clip.train()
        bar = tqdm(total=settings.steps, initial=self.step, desc="toy CLIP", disable=not self.progress, unit="step")
        sums: dict[str, float] = {}
        n_sum = 0
        threads_before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(int(threads))
        elif workers > 0:  # one core generates the batches: leave it to the worker (timed faster on 2 cores, ad hoc)
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
        self.threads_used = torch.get_num_threads()
        batches = batch_iterator(settings, self.step, end, workers)
        try:
            while self.step < end:
                losses = self.step_once(next(batches))
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                n_sum += 1
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
                if self.step % self.log_every == 0 or self.step == end:
                    self.history.append({"step": self.step, **{k: round(v / n_sum, 5) for k, v in sums.items()},
                                         "logit_scale": round(float(self.clip.logit_scale.detach().exp()), 3),
                                         "seconds": round(self.seconds(), 1)})
                    sums, n_sum = {}, 0
                if checkpoint_every and self.step % checkpoint_every == 0 and self.step < settings.steps:
                    self.save_state()
        finally:
            bar.close()
            torch.set_num_threads(threads_before)
            del batches  # ends the generator worker (its peak RSS then counts in RUSAGE_CHILDREN)

    def write_final(self, local_dir: bool, workers: int) -> PretrainResult:
        """The finished weights (``out_path``, its ``.json`` record, optionally a ``local-dir:`` folder)."""
        settings, out_path = self.settings, self.out_path
        seconds = self.seconds()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        meta = {"format": "bpfl-toyclip-v1", "arch": settings.arch, "settings": settings.to_dict(),
                "seconds": round(seconds, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                "peak_rss_mb_worker": round(peak_rss_mb(children=True), 1) if workers > 0 else 0.0,
                "cpu_seconds_process": round(ru.ru_utime + ru.ru_stime, 1),
                "cpu_seconds_children": round(_children_cpu_seconds(), 1),  # the batch-generator worker
                "images_seen": settings.steps * settings.batch_size,
                "families": allowed_families(settings.held_out_families),
                "held_out_words": sorted(held_out_words(settings.held_out_families)),
                "use_image_size": TOY_IMAGE_SIZE if settings.arch == TOY_ARCH else None,
                "layers": list(self.probes.layers), "torch": torch.__version__, "threads": self.threads_used,
                "batch_workers": int(workers > 0),
                "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
                "history": self.history}
        folder = _write_final(self.clip.eval(), out_path, settings, meta, local_dir)
        self.state_path.unlink(missing_ok=True)
        if self.progress:
            print(f"[bpfl] toy CLIP written to {out_path} ({seconds / 60:.1f} min, peak RSS {peak_rss_mb():.0f} MiB)")
        return PretrainResult(out_path, folder, self.step, seconds, peak_rss_mb(), self.history, True,
                              settings.to_dict())


def recipe_differences(path: str | Path) -> dict[str, tuple]:
    """How the toy CLIP at ``path`` was built differently from today's default recipe:
    ``{setting: (built with, default now)}``, the seed aside; empty when it matches or has no ``.json`` record."""
    meta_path = Path(path).with_suffix(".json")
    try:
        built = dict(json.loads(meta_path.read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    built.setdefault("token_init", "torch")  # written before the setting existed
    now = PretrainSettings(arch=built.get("arch", TOY_ARCH), seed=built.get("seed", 0)).to_dict()
    return {k: (built.get(k), v) for k, v in now.items() if k in built and built[k] != v}


def ensure_toy_clip(path: str | Path | None = None, build: bool = False, **pretrain_kwargs) -> Path | None:
    """The toy CLIP checkpoint's path if it exists; else build it (``build=True``) or return None.

    An existing checkpoint built with another recipe than today's default (e.g. by an older version of the kit)
    is still returned, with a warning that names the differences and the command that rebuilds it."""
    p = Path(path) if path is not None else default_toy_clip_path(pretrain_kwargs.get("arch", TOY_ARCH),
                                                                  pretrain_kwargs.get("seed", 0))
    if p.is_file():
        diff = recipe_differences(p) if not pretrain_kwargs else {}
        if diff:
            what = ", ".join(f"{k}={a} (default now {b})" for k, (a, b) in diff.items())
            warnings.warn(f"the toy CLIP at {p} was built with another recipe than the current default: {what}. "
                          f"Its numbers will differ from docs/toy_clip.md; rebuild it with "
                          f"`bpfl pretrain-toy-clip --out {p} --no-resume`.", stacklevel=2)
        return p
    if not build:
        return None
    res = pretrain_toy_clip(p, **pretrain_kwargs)
    return res.path


def load_toy_backbone(path: str | Path | None = None, image_size: int = TOY_IMAGE_SIZE, arch: str = TOY_ARCH,
                      device=None):
    """The toy CLIP as a frozen :class:`bpfl.backbone.ClipBackbone` (at ``image_size``, the toy layers): the bundled
    weights by default, or the checkpoint file ``path``."""
    if path is not None and str(path) != BUNDLED_TAG and not Path(path).is_file():
        raise FileNotFoundError(f"no toy CLIP at {path}: build it with `bpfl pretrain-toy-clip --out {path}`, "
                                "or leave the path out to use the bundled one")
    return load_backbone(arch, pretrained=str(path) if path else BUNDLED_TAG, image_size=image_size,
                         layers=toy_layers(arch), device=device)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bpfl pretrain-toy-clip``."""
    parser.add_argument("--out", default=None,
                        help="checkpoint file (default $BPFL_CACHE/toyclip/<arch>-seed<seed>.pt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--arch", default=TOY_ARCH)
    parser.add_argument("--image-size", type=int, default=TOY_PRETRAIN_SIZE, help="pretraining image size (px)")
    parser.add_argument("--final-image-size", type=int, default=None,
                        help="train the last --final-steps steps at this size (e.g. 112, the size Bayes-PFL uses)")
    parser.add_argument("--final-steps", type=int, default=0)
    parser.add_argument("--held-out", default=",".join(DEFAULT_HELD_OUT),
                        help=f"comma-separated families never drawn (known: {','.join(FAMILIES)})")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dense-weight", type=float, default=DEFAULT_DENSE_WEIGHT,
                        help=f"weight of the patch-level term (default {DEFAULT_DENSE_WEIGHT:g}; "
                             "0 = plain CLIP loss only)")
    parser.add_argument("--state-weight", type=float, default=1.0, help="image-level flawless/damaged term")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--no-resume", action="store_true", help="start over even if a training state exists")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--bundle", nargs="?", const=str(BUNDLED_FILE), default=None, metavar="FILE",
                        help="after pretraining, pack the weights into the kit's bundled file (default "
                             f"{BUNDLED_FILE.relative_to(BUNDLED_FILE.parents[2])}) with its manifest; then re-measure "
                             "its transfer numbers: python benchmarks/toy_clip_transfer.py --bundled --update-manifest")
    parser.add_argument("--workers", type=int, default=1, choices=(0, 1),
                        help="1: generate the next batches in a background process (default); 0: inline")
    return parser


def run(args: argparse.Namespace) -> int:
    held = tuple(h for h in (args.held_out or "").split(",") if h)
    res = pretrain_toy_clip(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, arch=args.arch,
                            image_size=args.image_size, final_image_size=args.final_image_size,
                            final_steps=args.final_steps, held_out_families=held,
                            resume=not args.no_resume,
                            progress=not args.no_progress, lr=args.lr, dense_weight=args.dense_weight,
                            state_weight=args.state_weight,
                            checkpoint_every=args.checkpoint_every, threads=args.threads, workers=args.workers)
    print(f"toy CLIP: {res.path}  ({res.seconds / 60:.1f} min, peak RSS {res.peak_rss_mb:.0f} MiB)")
    if res.local_dir:
        print(f"  also as local-dir:{res.local_dir}")
    print(f"  use: load_backbone('{args.arch}', pretrained='{res.path}', image_size={TOY_IMAGE_SIZE})")
    if args.bundle:
        manifest = bundle_toy_clip(res.path, args.bundle)
        print(f"bundled: {args.bundle} ({manifest['bytes'] / 1e6:.1f} MB, sha256 {manifest['sha256'][:12]}, "
              f"{manifest['size_options']['touched_token_rows']} token rows stored of "
              f"{manifest['size_options']['token_rows']}; unpacked = pretrained exactly)")
        print("  now re-measure its transfer numbers: python benchmarks/toy_clip_transfer.py --bundled "
              "--update-manifest")
    return 0


def bundle_toy_clip(checkpoint: str | Path, out: str | Path = BUNDLED_FILE) -> dict:
    """Pack a finished toy-CLIP checkpoint (and its ``.json`` record) into the bundled safetensors file and its
    manifest (:func:`bpfl.bundled_weights.write_bundle`): provenance = recipe, seed, held-out families and words,
    torch/numpy/open_clip versions, machine, build time and memory."""
    checkpoint = Path(checkpoint)
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    settings = meta["settings"]
    if settings.get("token_init", "torch") != "numpy":
        raise ValueError(f"{checkpoint} was built with token_init={settings.get('token_init', 'torch')!r}: only a "
                         "toy CLIP whose token table starts from initial_token_table can be bundled; rebuild it")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    provenance = {
        "arch": meta.get("arch", TOY_ARCH), "recipe": settings, "seed": settings["seed"],
        "held_out_families": settings["held_out_families"], "held_out_words": meta.get("held_out_words"),
        "families": meta.get("families"), "use_image_size": meta.get("use_image_size"), "layers": meta.get("layers"),
        "built_with": {"torch": meta.get("torch"), "numpy": np.__version__, "open_clip": open_clip.__version__,
                       "machine": meta.get("machine"), "cpu": cpu_model(), "threads": meta.get("threads"),
                       "bundled_on": time.strftime("%Y-%m-%d"),
                       "seconds": meta.get("seconds"), "peak_rss_mb": meta.get("peak_rss_mb"),
                       "peak_rss_mb_worker": meta.get("peak_rss_mb_worker")},
        "rebuild": "bpfl pretrain-toy-clip --bundle",
    }
    return write_bundle(sd, int(settings["seed"]), out, provenance)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bpfl pretrain-toy-clip", description=(
        "Pretrain the toy CLIP (a small open_clip model) on captioned procedural surfaces, offline, on the CPU."))
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
