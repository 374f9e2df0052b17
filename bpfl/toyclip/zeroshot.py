"""Training-free zero-shot maps from a CLIP backbone: patch tokens vs a "flawless" / "damaged" prompt pair.

The simplest use of the toy CLIP, with no Bayes-PFL training at all (WinCLIP-style, one scale): the last
vision block's patch tokens go through CLIP's own ``ln_post`` and ``proj`` into the joint space, and each
patch's anomaly probability is the softmax of its scaled cosine similarities with the two prompts. The image
score adds, as Bayes-PFL's s = s_text + max(M), the image embedding's "damaged" probability against the same
two prompts and the mean of the top 1 % of the map. A reference next to Bayes-PFL in
``benchmarks/toy_clip_transfer.py``; it only means something for a backbone whose last block was trained
to align patches with text (the toy CLIP's dense auxiliary loss does exactly that).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..prompts import prompt_class_name

NORMAL_PROMPT = "a photo of a flawless {} surface."
ANOMALOUS_PROMPT = "a photo of a damaged {} surface."


@torch.no_grad()
def zero_shot_maps(backbone, images: torch.Tensor, class_names: Sequence[str] | None = None,
                   temperature: float = 1.0 / 0.07, top: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` [N, 3, S, S] (CLIP-normalised) -> (maps [N, S, S] in [0, 1], image scores [N] in [0, 2]).

    ``class_names``: optional words put into the prompts ("a photo of a damaged grass surface."); by default
    the prompts name no class. Uses the last vision block (``backbone.clip.visual``'s ``ln_post`` + ``proj``).
    """
    clip = backbone.clip
    visual = clip.visual
    n_blocks = len(visual.transformer.resblocks)
    images = images.to(backbone.device)
    out = visual.forward_intermediates(images, indices=[n_blocks - 1], output_fmt="NLC", intermediates_only=False)
    tokens = out["image_intermediates"][-1]
    patches = F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)  # [N, HW, C]
    names = [prompt_class_name(c) for c in class_names] if class_names is not None else [""] * len(images)
    uniq = sorted(set(names))
    texts = [" ".join(p.format(w).split()) for w in uniq for p in (NORMAL_PROMPT, ANOMALOUS_PROMPT)]
    txt = F.normalize(backbone.encode_text(texts), dim=-1).reshape(len(uniq), 2, -1)
    txt = txt[torch.tensor([uniq.index(w) for w in names], device=txt.device)]  # [N, 2, C]
    logits = temperature * torch.einsum("npc,nsc->nps", patches, txt)
    prob = logits.softmax(-1)[..., 1]
    h, w = backbone.grid_size
    maps = F.interpolate(prob.reshape(-1, 1, h, w), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)[:, 0]
    flat = maps.flatten(1)
    k = max(1, int(top * flat.shape[1]))
    x = F.normalize(out["image_features"], dim=-1)
    s_text = (temperature * torch.einsum("nc,nsc->ns", x, txt)).softmax(-1)[:, 1]
    return maps.cpu(), (s_text + flat.topk(k, dim=1).values.mean(1)).cpu()
