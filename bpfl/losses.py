"""Training losses of Bayes-PFL (paper §3.6, Eq. 7, 13, 14).

The objective (Eq. 14) is L = L_ort + L_p, where the prompt-flow loss L_p (Eq. 7) has two parts:

* the distribution-regularisation terms E_{q0}[log q0 − Σ log|det| − log p(z_K)], one per prompt flow
  (ISD context, IAD normal, IAD abnormal); these are :func:`bpfl.flow.flow_kl`;
* −E_{q0}[log p(D | Φ_K)], "approximated by the sum of classification loss (for text-image alignment)
  and segmentation loss (for text-patch alignment)": cross-entropy for the image label, focal + dice
  for the mask.

Where the authors' released code (commit 8f155a0) differs, a keyword reproduces it (the kit's default is
what the paper says):

=====================  ======================================  ============================================
term                   default (paper)                         released code
=====================  ======================================  ============================================
focal                  mean over all pixels                    ``balanced=True``: fg mean + bg mean
dice                   anomaly channel, pooled over the batch  the same (normal-channel dice is unused)
orthogonal (Eq. 13)    ``"sum"`` over i ≠ j, mean over images  ``"mean_with_diagonal"``
weights (Eq. 14)       all 1                                   ``kl_weight=0.01`` on each flow KL
per-layer seg losses   summed (the paper is silent)            summed
=====================  ======================================  ============================================
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "focal_loss",
    "dice_loss",
    "segmentation_loss",
    "classification_loss",
    "orthogonal_loss",
    "total_loss",
]


def focal_loss(prob_abnormal: Tensor, target: Tensor, gamma: float = 2.0, balanced: bool = False,
               eps: float = 1e-8) -> Tensor:
    """Binary focal loss on anomaly-probability maps (segmentation term of §3.6; Lin et al., ref. [37]).

    ℓ = −(1 − p_t)^γ · log p_t, with p_t = p where the target is 1 and 1 − p where it is 0, and
    log p_t taken of p_t clamped to [eps, 1].

    Args:
        prob_abnormal: anomaly probabilities in [0, 1], e.g. ``[N, H, W]`` (any shape).
        target: the same shape, values in {0, 1} (bool, int or float).
        gamma: focusing parameter γ (2 in the paper's reference and the released code; α = 1).
        balanced: ``False`` (default): mean over all pixels. ``True`` (released ``loss.py``): mean over the
            foreground pixels of the whole batch plus mean over its background pixels (the two means are
            added); without foreground pixels, the background mean alone (likewise for no background).
            The released code writes log(p_t + 1e-8) where this clamps; the two agree to ≈ 1e-8.
    """
    p = prob_abnormal
    fg = target > 0.5
    p_t = torch.where(fg, p, 1.0 - p)
    loss = -((1.0 - p_t) ** gamma) * torch.log(p_t.clamp(eps, 1.0))
    if not balanced:
        return loss.mean()
    fgf = fg.to(loss.dtype)
    n_fg = fgf.sum()
    n_bg = fgf.numel() - n_fg
    fg_mean = (loss * fgf).sum() / n_fg.clamp_min(1.0)
    bg_mean = (loss * (1.0 - fgf)).sum() / n_bg.clamp_min(1.0)
    return fg_mean + bg_mean  # an empty group contributes 0


def dice_loss(prob_abnormal: Tensor, target: Tensor, eps: float = 1e-5, both_channels: bool = False) -> Tensor:
    """Dice loss on the anomaly channel, pooled over the whole batch (segmentation term of §3.6; ref. [30]).

    1 − (2·Σ p·g + eps) / (Σ p + Σ g + eps), sums over every pixel of every image. This is exactly what
    the released code (``loss.py``) optimises: anomaly channel only, one dice for the batch.

    ``both_channels=True`` averages it with the dice loss of the normal channel (1 − p against 1 − g),
    which the released code computes but does not use.
    """
    g = target.to(prob_abnormal.dtype)

    def _dice(p: Tensor, t: Tensor) -> Tensor:
        return 1.0 - (2.0 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)

    loss = _dice(prob_abnormal, g)
    if both_channels:
        loss = 0.5 * (loss + _dice(1.0 - prob_abnormal, 1.0 - g))
    return loss


def segmentation_loss(prob_abnormal: Tensor | Sequence[Tensor], target: Tensor, gamma: float = 2.0,
                      balanced: bool = False, both_channels: bool = False, layer_reduction: str = "sum"
                      ) -> dict[str, Tensor]:
    """Focal and dice over the L per-layer anomaly maps (§3.6 segmentation term).

    ``prob_abnormal`` is a list of L maps ``[N, H, W]`` or a tensor ``[L, N, H, W]``; each is compared to
    ``target [N, H, W]``. Returns ``{"focal": ..., "dice": ...}`` reduced over layers with
    ``layer_reduction`` = ``"sum"`` (released code; the paper does not say) or ``"mean"``.
    """
    maps = list(prob_abnormal)
    focal = torch.stack([focal_loss(p, target, gamma, balanced) for p in maps])
    dice = torch.stack([dice_loss(p, target, both_channels=both_channels) for p in maps])
    if layer_reduction == "sum":
        return {"focal": focal.sum(), "dice": dice.sum()}
    if layer_reduction == "mean":
        return {"focal": focal.mean(), "dice": dice.mean()}
    raise ValueError(f"layer_reduction={layer_reduction!r}; choose 'sum' or 'mean'")


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits [N, 2]`` (normal, abnormal) against image labels ``[N]`` in {0, 1} (§3.6)."""
    return F.cross_entropy(logits, labels.long())


def orthogonal_loss(t_normal: Tensor, t_abnormal: Tensor, reduction: str = "sum") -> Tensor:
    """Orthogonality of the B text embeddings of each prompt bank (paper Eq. 13).

    L_ort = Σ_i Σ_{j≠i} [cos(t_i^n, t_j^n)² + cos(t_i^a, t_j^a)²]

    Args:
        t_normal, t_abnormal: ``[N, B, C]`` embeddings of the B prompts per image (any leading shape
            ``[..., B, C]``; need not be normalised).
        reduction: ``"sum"`` (default, Eq. 13): the double sum per image, averaged over the images.
            ``"mean_with_diagonal"`` (released ``loss.py``): for each bank, the B×B squared-cosine matrix
            with its diagonal set to 0, averaged over all N·B·B entries (the zeros included); normal plus
            abnormal. It equals the ``"sum"`` value divided by B².
    """
    def _offdiag_sq_cos(t: Tensor) -> Tensor:
        tn = F.normalize(t, dim=-1)
        cos2 = (tn @ tn.transpose(-1, -2)) ** 2
        eye = torch.eye(t.shape[-2], dtype=torch.bool, device=t.device)
        return cos2.masked_fill(eye, 0.0)

    m_n, m_a = _offdiag_sq_cos(t_normal), _offdiag_sq_cos(t_abnormal)
    if reduction == "sum":
        return (m_n.sum((-1, -2)) + m_a.sum((-1, -2))).mean()
    if reduction == "mean_with_diagonal":
        return m_n.mean() + m_a.mean()
    raise ValueError(f"reduction={reduction!r}; choose 'sum' or 'mean_with_diagonal'")


def total_loss(*, cls: Tensor | None = None, focal: Tensor | None = None, dice: Tensor | None = None,
               ort: Tensor | None = None, kl_context: Tensor | None = None, kl_normal: Tensor | None = None,
               kl_abnormal: Tensor | None = None, cls_weight: float = 1.0, focal_weight: float = 1.0,
               dice_weight: float = 1.0, ort_weight: float = 1.0, kl_weight: float = 1.0) -> dict[str, Tensor]:
    """The training objective (paper Eq. 14): L = L_ort + L_p, with L_p from Eq. 7.

    L_p = Σ_flows KL-like term (:func:`bpfl.flow.flow_kl`) − E log p(D|Φ_K), and −E log p(D|Φ_K) is
    approximated by cls + seg with seg = focal + dice (§3.6). Hence

        total = cls_weight·cls + focal_weight·focal + dice_weight·dice + ort_weight·ort
                + kl_weight·(kl_context + kl_normal + kl_abnormal).

    The paper has no weights (all 1, the default); the released code uses ``kl_weight=0.01``. Terms left
    as ``None`` are absent (e.g. an ablation without ISD, or stage-2 training with CE only).

    Returns a dict of the *unweighted* terms that were given, the unweighted groups ``seg`` = focal + dice
    and ``flow`` = Σ KL (when any of their parts is given), and the weighted ``total`` — everything a
    training loop logs.
    """
    terms = {"cls": cls, "focal": focal, "dice": dice, "ort": ort, "kl_context": kl_context,
             "kl_normal": kl_normal, "kl_abnormal": kl_abnormal}
    given = {k: v for k, v in terms.items() if v is not None}
    if not given:
        raise ValueError("total_loss needs at least one term")
    weights = {"cls": cls_weight, "focal": focal_weight, "dice": dice_weight, "ort": ort_weight,
               "kl_context": kl_weight, "kl_normal": kl_weight, "kl_abnormal": kl_weight}
    out: dict[str, Tensor] = dict(given)
    seg_parts = [given[k] for k in ("focal", "dice") if k in given]
    if seg_parts:
        out["seg"] = sum(seg_parts[1:], seg_parts[0])
    flow_parts = [given[k] for k in ("kl_context", "kl_normal", "kl_abnormal") if k in given]
    if flow_parts:
        out["flow"] = sum(flow_parts[1:], flow_parts[0])
    items = list(given.items())
    total = weights[items[0][0]] * items[0][1]
    for k, v in items[1:]:
        total = total + weights[k] * v
    out["total"] = total
    return out
