"""The released Bayes-PFL code's *cost structure*, re-expressed on the kit's own modules, for side-by-side timing.

This is not the authors' code. It is what ``docs/reference-implementation.md`` §4-§6 describe, written as plainly
as possible on top of :class:`bpfl.model.BayesPFL`, so that :mod:`benchmarks.bench_inference` can time both on the
same weights and inputs and check that they agree:

* **text** (:func:`reference_text_embeddings`): one text-transformer pass per (image, bank, sample), each on the
  B prompts of that bank at the full context length of 77 tokens, i.e. 2·R sequential passes per image at test
  time and 2·N passes per training step (R = 1). The kit encodes all 2·B·R·N prompts in one pass truncated after
  the last EOT (:func:`bpfl.prompts.encode_prompts`).
* **maps** (:func:`reference_pair_maps`): per layer, RCA on all 2·R·B text queries, logits for every query, *all*
  of them upsampled to full resolution, then a 2-way softmax per (normal, abnormal) pair; at test time every
  abnormal-probability map is copied out as its own numpy array (the released ``.cpu().numpy()`` per map) and the
  mean is taken over the list. The kit upsamples only the L·R·B logit *differences* (softmax of two channels =
  sigmoid of their difference) and streams their mean in chunks (:meth:`bpfl.model.BayesPFL._accumulate_maps`).
* **loss** (:func:`reference_loss`): classification, focal and dice terms in Python loops over pairs and layers,
  one small graph per (layer, pair), as the released ``train.py`` / ``loss.py`` do. The kit's
  :meth:`bpfl.model.BayesPFL.loss` evaluates all layers and pairs at once.

Everything here follows the kit's configuration (paper semantics: all prompt pairs, ``ensemble="image"``...), so
the outputs must equal the kit's up to floating-point rounding; only the structure differs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bpfl import losses as L
from bpfl.backbone import ImageFeatures
from bpfl.model import BayesPFL, BayesPFLOutput
from bpfl.prompts import ClassTokens, class_tokens


def reference_text_embeddings(backbone, learned: torch.Tensor, tokens: ClassTokens) -> torch.Tensor:
    """``learned`` [N, 2, R, B, P+Q, D] -> unit text embeddings [N, 2, R, B, C] by 2·N·R passes of B prompts × 77.

    The same spliced token sequence as :func:`bpfl.prompts.encode_prompts` ([SOT][learned][class words][EOT][pad]
    cut at the context length), but never truncated and never batched across images, banks or samples.
    """
    N, S, R, B, M, _ = learned.shape
    length = backbone.context_length
    per_image = []
    for n in range(N):
        sot = tokens.sot[n].to(learned.dtype).expand(B, -1, -1)  # [B, 1, D]
        rest = tokens.rest[n].to(learned.dtype).expand(B, -1, -1)  # [B, 75, D]
        eot = (tokens.eot[n] + M - 1).repeat(B)
        banks = []
        for s in range(S):  # normal bank, then abnormal bank
            samples = []
            for r in range(R):  # one pass per Monte-Carlo sample
                seq = torch.cat([sot, learned[n, s, r], rest], dim=1)[:, :length]  # [B, 77, D]
                feats = backbone.encode_token_embeddings(seq, eot, truncate=False)
                samples.append(F.normalize(feats, dim=-1))
            banks.append(torch.stack(samples))
        per_image.append(torch.stack(banks))
    return torch.stack(per_image)


def reference_prompt_embeddings(model: BayesPFL, feats: ImageFeatures, x: torch.Tensor, class_names: Sequence[str],
                                n_samples: int, generator: torch.Generator | None = None):
    """The same flow samples as :meth:`BayesPFL.prompt_embeddings` (same generator), encoded the reference way."""
    phis, kls = model.sample_prompts(feats, x, n_samples, generator)
    learned = model.prompts.fuse(phis["context"], phis["normal"], phis["abnormal"])
    N = len(class_names)
    if learned.shape[0] != N:
        learned = learned.expand(N, *learned.shape[1:])
    return reference_text_embeddings(model.backbone, learned, class_tokens(model.backbone, class_names)), kls


def reference_pair_maps(model: BayesPFL, patches: list[torch.Tensor], text: torch.Tensor, size: tuple[int, int],
                        copy_to_numpy: bool) -> list:
    """Abnormal-probability maps of every (layer, sample, prompt), in that order: L·R·B maps [N, h, w].

    Per layer: RCA on all 2·R·B queries (normal block, then abnormal block), logits of every query, all 2·R·B
    logit maps upsampled, then softmax over each (normal i, abnormal i + R·B) pair. With ``copy_to_numpy`` each
    map is copied out as a separate numpy array (inference), otherwise the tensors are kept (training).
    """
    N, _, R, B, C = text.shape
    H, W = model.backbone.grid_size
    T = R * B
    z = text.flatten(2, 3).reshape(N, 2 * T, C)  # rows: normal (r, b) ..., then abnormal (r, b) ...
    tau = model.log_temperature_pixel.exp()
    maps = []
    for patch in patches:
        zl = model.rca(z, patch) if model.rca is not None else z
        zl = F.normalize(zl, dim=-1)
        logits = (tau * patch @ zl.transpose(1, 2)).transpose(1, 2).reshape(N, 2 * T, H, W)
        up = model.upsample(logits, size)  # [N, 2T, h, w]: every logit map at full resolution
        for i in range(T):
            prob = torch.softmax(torch.stack([up[:, i], up[:, i + T]], dim=1), dim=1)[:, 1]
            maps.append(prob.detach().cpu().numpy().copy() if copy_to_numpy else prob)
    return maps


def reference_forward(model: BayesPFL, images: torch.Tensor | None, class_names: Sequence[str], n_samples: int, *,
                      features: ImageFeatures | None = None, generator: torch.Generator | None = None,
                      map_size: int | None = None, keep_pair_maps: bool = False) -> BayesPFLOutput:
    """:meth:`BayesPFL.forward` with the reference structure for the text pass, the maps and their mean.

    ``keep_pair_maps=False`` (inference): maps are copied to numpy one by one and averaged there; the returned
    ``anomaly_map`` is a tensor again. ``True`` (training): ``pair_maps`` [N, L, R·B, h, w] keeps the graph.
    """
    cfg = model.config
    feats = features if features is not None else model.backbone.encode_image(images)
    feats = feats.to(model.device)
    size = (map_size or model.backbone.image_size,) * 2
    patches = model.project_patches(feats)
    x = model.global_embedding(feats, patches)
    text, kls = reference_prompt_embeddings(model, feats, x, class_names, n_samples, generator)
    if cfg.ensemble == "text":
        text = F.normalize(text.mean(dim=(2, 3), keepdim=True), dim=-1)
    image_logits = model.text_branch(x, text)
    text_score = torch.softmax(image_logits, dim=1)[:, 1].mean(dim=(1, 2))
    maps = reference_pair_maps(model, patches, text, size, copy_to_numpy=not keep_pair_maps)
    n_layers = len(patches)
    pair_maps = None
    if keep_pair_maps:
        pair_maps = torch.stack(maps, dim=1).unflatten(1, (n_layers, -1))
        anomaly_map = pair_maps.mean(dim=(1, 2))
    else:
        anomaly_map = torch.from_numpy(np.mean(np.stack(maps), axis=0)).to(text.device)
    map_max = anomaly_map.flatten(1).max(dim=1).values
    image_score = torch.zeros_like(text_score)
    if cfg.use_s_text:
        image_score = image_score + text_score
    if cfg.use_s_img:
        image_score = image_score + map_max
    return BayesPFLOutput(anomaly_map=anomaly_map, image_score=image_score, text_score=text_score, map_max=map_max,
                          image_logits=image_logits, text_embeddings=text, kl=kls, pair_maps=pair_maps)


def reference_loss(model: BayesPFL, out: BayesPFLOutput, masks: torch.Tensor, labels: torch.Tensor,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Eq. 14 with one small graph per (layer, pair): Python loops over pairs and layers, as the released code."""
    cfg = model.config
    masks = masks.to(out.pair_maps.device).float()
    labels = labels.to(out.pair_maps.device).long()
    N, n_layers, n_pairs = out.pair_maps.shape[:3]
    logits = out.image_logits.flatten(2)
    pairs = list(range(n_pairs))
    if cfg.loss_pairs == "one":
        pairs = [int(torch.randint(n_pairs, (1,), generator=generator).item())]
    reduce = torch.sum if cfg.seg_layer_reduction == "sum" else torch.mean
    cls_terms, focal_terms, dice_terms = [], [], []
    for p in pairs:
        cls_terms.append(L.classification_loss(logits[:, :, p], labels))
        focal_l, dice_l = [], []
        for l in range(n_layers):
            m = out.pair_maps[:, l, p]
            focal_l.append(L.focal_loss(m, masks, balanced=cfg.focal_balanced))
            dice_l.append(L.dice_loss(m, masks))
        focal_terms.append(reduce(torch.stack(focal_l)))
        dice_terms.append(reduce(torch.stack(dice_l)))
    t = out.text_embeddings
    ort = None
    if cfg.use_ort and t.shape[3] > 1:
        ort = L.orthogonal_loss(t[:, 0].reshape(-1, t.shape[3], t.shape[4]),
                                t[:, 1].reshape(-1, t.shape[3], t.shape[4]), reduction=cfg.ort_reduction)
    return L.total_loss(cls=torch.stack(cls_terms).mean(), focal=torch.stack(focal_terms).mean(),
                        dice=torch.stack(dice_terms).mean(), ort=ort, kl_context=out.kl.get("context"),
                        kl_normal=out.kl.get("normal"), kl_abnormal=out.kl.get("abnormal"),
                        ort_weight=cfg.ort_weight, kl_weight=cfg.kl_weight)
