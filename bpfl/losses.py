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
    "focal_dice_per_map",
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


#: elements of one chunk of maps in :func:`focal_dice_per_map` (16 MB in fp32): the temporaries stay this small
FUSED_CHUNK_ELEMENTS = 1 << 22


class _FocalDicePerMap(torch.autograd.Function):
    """Fused focal + dice of K maps per image, chunked over K; backward in closed form (see the function below)."""

    @staticmethod
    def forward(ctx, prob: Tensor, target: Tensor, gamma: float, balanced: bool, focal_eps: float,
                dice_eps: float) -> tuple[Tensor, Tensor]:
        K = prob.shape[1]
        ct = torch.promote_types(prob.dtype, torch.float32)  # compute dtype: at least float32
        fg = (target > 0.5).unsqueeze(1)  # [N, 1, h, w]
        g = target.unsqueeze(1).to(ct)
        fgf = fg.to(ct)
        n_pix = fg.numel()
        n_fg = fgf.sum()
        n_bg = n_pix - n_fg
        step = max(1, FUSED_CHUNK_ELEMENTS // max(1, prob[:, :1].numel()))
        focal, inter, p_sum = (prob.new_empty(K, dtype=ct) for _ in range(3))
        dims = (0, 2, 3)
        for k in range(0, K, step):
            ks = slice(k, k + step)
            p = prob[:, ks].to(ct)
            p_t = torch.where(fg, p, 1.0 - p)
            q = torch.sub(1.0, p_t)
            logp = p_t.clamp_(focal_eps, 1.0).log_()
            loss = q.pow_(gamma).mul_(logp).neg_()  # -(1 - p_t)^gamma log p_t
            if balanced:
                focal[ks] = ((loss * fgf).sum(dims) / n_fg.clamp_min(1.0)
                             + (loss * (1.0 - fgf)).sum(dims) / n_bg.clamp_min(1.0))
            else:
                focal[ks] = loss.sum(dims) / n_pix
            inter[ks] = (p * g).sum(dims)
            p_sum[ks] = p.sum(dims)
        num = 2.0 * inter + dice_eps
        den = p_sum + g.sum() + dice_eps
        ctx.save_for_backward(prob, target, num, den, n_fg, n_bg)
        ctx.options = (gamma, balanced, focal_eps, step)
        return focal, 1.0 - num / den

    @staticmethod
    def backward(ctx, grad_focal: Tensor | None, grad_dice: Tensor | None):
        nothing = (None,) * 5
        if not ctx.needs_input_grad[0]:
            return (None, *nothing)
        prob, target, num, den, n_fg, n_bg = ctx.saved_tensors
        gamma, balanced, eps, step = ctx.options
        K = prob.shape[1]
        ct = num.dtype
        fg = (target > 0.5).unsqueeze(1)
        g = target.unsqueeze(1).to(ct)
        fgf = fg.to(ct)
        grad_focal = num.new_zeros(K) if grad_focal is None else grad_focal.to(ct)
        grad_dice = num.new_zeros(K) if grad_dice is None else grad_dice.to(ct)
        # focal: d loss / d p = (d p_t / d p) * w * d loss / d p_t, with d p_t / d p = +1 (fg) or -1 (bg), w the
        # weight of the pixel in the mean(s), and d loss / d p_t = (1-p_t)^(gamma-1) (gamma log p_t - (1-p_t)/p_t)
        # (the 1/p_t term only where clamp(p_t, eps, 1) passes the gradient)
        if balanced:
            w = fgf / n_fg.clamp_min(1.0) + (1.0 - fgf) / n_bg.clamp_min(1.0)
        else:
            w = torch.full_like(fgf, 1.0 / fg.numel())
        signed_w = (2.0 * fgf - 1.0) * w  # [N, 1, h, w]
        # dice: D = 1 - num/den, num = 2 sum(p g) + e, den = sum(p) + sum(g) + e -> dD/dp = num/den^2 - (2/den) g
        a = (grad_dice * num / den ** 2).view(1, K, 1, 1)
        b = (grad_dice * 2.0 / den).view(1, K, 1, 1)
        grad = torch.empty_like(prob)
        for k in range(0, K, step):
            ks = slice(k, k + step)
            p = prob[:, ks].to(ct)
            p_t = torch.where(fg, p, 1.0 - p)
            q = torch.sub(1.0, p_t)
            inside = (p_t >= eps) & (p_t <= 1.0)
            r = torch.div(1.0 if gamma == 0 else q, p_t.clamp_min_(eps)).masked_fill_(~inside, 0.0)
            if gamma == 0:
                d = r.neg_()
            else:
                d = p_t.clamp_(max=1.0).log_().mul_(gamma).sub_(r)  # gamma log p_t - (1-p_t)/p_t
                if gamma != 1:
                    d.mul_(q.pow_(gamma - 1.0))
            d.mul_(signed_w).mul_(grad_focal[ks].view(1, -1, 1, 1))
            d.add_(torch.addcmul(a[:, ks], b[:, ks], g, value=-1.0))
            grad[:, ks] = d
        return (grad, *nothing)


def focal_dice_per_map(prob_abnormal: Tensor, target: Tensor, gamma: float = 2.0, balanced: bool = False,
                       focal_eps: float = 1e-8, dice_eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """:func:`focal_loss` and :func:`dice_loss` of K maps per image against one mask per image, fused.

    ``prob_abnormal`` ``[N, K, H, W]`` (e.g. the L·P pair maps of a batch, ``pair_maps.flatten(1, 2)``),
    ``target`` ``[N, H, W]``. Returns ``(focal [K], dice [K])`` where entry k equals
    ``focal_loss(prob_abnormal[:, k], target, gamma, balanced, focal_eps)`` and
    ``dice_loss(prob_abnormal[:, k], target, dice_eps)`` up to the order of floating-point summation.

    One autograd node instead of a dozen per map: the forward pass works through the maps in chunks of
    :data:`FUSED_CHUNK_ELEMENTS` and keeps nothing but the input, and the backward pass recomputes each chunk and
    writes the closed-form gradient of both terms into one tensor -- far fewer full-size temporaries than the
    composed ops (each of which autograd would keep for backward). Computed in at least float32.
    """
    if prob_abnormal.dim() != 4 or target.shape != (prob_abnormal.shape[0], *prob_abnormal.shape[2:]):
        raise ValueError(f"expected prob [N, K, H, W] and target [N, H, W], got {tuple(prob_abnormal.shape)} and "
                         f"{tuple(target.shape)}")
    return _FocalDicePerMap.apply(prob_abnormal, target, float(gamma), bool(balanced), float(focal_eps),
                                  float(dice_eps))


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
