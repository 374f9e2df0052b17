"""Tests of bpfl.losses against hand-computed numbers and brute force (paper §3.6, Eq. 13-14).

The 2×2 example used throughout (one image, anomaly probability p, mask g):

    p = [[0.9, 0.2],      g = [[1, 0],      p_t = [[0.9, 0.8],
         [0.6, 0.1]]           [0, 1]]             [0.4, 0.1]]

focal terms −(1 − p_t)²·ln p_t:
    0.01·(−ln 0.9) = 0.0010536052     0.04·(−ln 0.8) = 0.0089257421
    0.36·(−ln 0.4) = 0.3298646635     0.81·(−ln 0.1) = 1.8650939253
    mean = 2.2049379361 / 4 = 0.5512344840
    balanced = (0.0010536052 + 1.8650939253)/2 + (0.0089257421 + 0.3298646635)/2 = 1.1024689680
dice (anomaly channel): Σpg = 0.9 + 0.1 = 1.0, Σp = 1.8, Σg = 2
    1 − (2·1.0 + 1e-5)/(1.8 + 2 + 1e-5) = 0.4736829640
dice (normal channel): Σ(1−p)(1−g) = 0.8 + 0.4 = 1.2, Σ(1−p) = 2.2, Σ(1−g) = 2
    1 − (2·1.2 + 1e-5)/(2.2 + 2 + 1e-5) = 0.4285704082;   both channels: 0.4511266861
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from bpfl.losses import (
    classification_loss,
    dice_loss,
    focal_loss,
    orthogonal_loss,
    segmentation_loss,
    total_loss,
)

F64 = torch.float64
P = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]], dtype=F64)
G = torch.tensor([[[1, 0], [0, 1]]])
# a second image: p = 0.5 everywhere, no anomaly; each focal term is 0.25·ln 2 = 0.1732867951
P2 = torch.cat([P, torch.full((1, 2, 2), 0.5, dtype=F64)])
G2 = torch.cat([G, torch.zeros(1, 2, 2, dtype=torch.long)])


# -------------------------------------------------------------------------------------------- focal
def test_focal_hand_computed():
    assert focal_loss(P, G).item() == pytest.approx(0.5512344840, abs=1e-9)
    assert focal_loss(P, G, balanced=True).item() == pytest.approx(1.1024689680, abs=1e-9)
    # target given as float or bool gives the same
    assert focal_loss(P, G.double()).item() == pytest.approx(0.5512344840, abs=1e-9)
    assert focal_loss(P, G.bool(), balanced=True).item() == pytest.approx(1.1024689680, abs=1e-9)


def test_focal_batch_and_balanced_pool_over_the_batch():
    # plain: mean over the 8 pixels = (4·0.5512344840 + 4·0.1732867951)/8
    assert focal_loss(P2, G2).item() == pytest.approx(0.3622606396, abs=1e-9)
    # balanced: fg mean over the batch's 2 fg pixels + bg mean over its 6 bg pixels
    #   (0.0010536052 + 1.8650939253)/2 + (0.0089257421 + 0.3298646635 + 4·0.1732867951)/6
    #   = 0.9330737653 + 0.1719895977
    assert focal_loss(P2, G2, balanced=True).item() == pytest.approx(1.1050633629, abs=1e-9)


def test_balanced_focal_without_foreground_is_background_mean():
    p = torch.full((2, 3, 3), 0.3, dtype=F64)
    g = torch.zeros(2, 3, 3)
    bg = 0.3 ** 2 * -math.log(0.7)
    assert focal_loss(p, g, balanced=True).item() == pytest.approx(bg, abs=1e-12)
    assert focal_loss(p, g).item() == pytest.approx(bg, abs=1e-12)


def test_focal_gamma_zero_is_bce_and_safe_at_the_extremes():
    torch.manual_seed(0)
    p = torch.rand(2, 5, 5, dtype=F64) * 0.98 + 0.01
    g = (torch.rand(2, 5, 5) > 0.7).long()
    torch.testing.assert_close(focal_loss(p, g, gamma=0.0), F.binary_cross_entropy(p, g.double()))
    # p exactly 0 on a foreground pixel: finite loss (log clamped at 1e-8), finite gradients
    p = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]], dtype=F64, requires_grad=True)
    g = torch.tensor([[[1, 0], [1, 0]]])
    loss = focal_loss(p, g, balanced=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    # p_t = 0 on both bad pixels: each term −1·ln(1e-8); fg mean (18.42 + 0)/2, bg mean (18.42 + 0)/2
    assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-9)


# --------------------------------------------------------------------------------------------- dice
def test_dice_hand_computed():
    assert dice_loss(P, G).item() == pytest.approx(0.4736829640, abs=1e-9)
    assert dice_loss(P, G, both_channels=True).item() == pytest.approx(0.4511266861, abs=1e-9)


def test_dice_is_pooled_over_the_batch():
    # Σpg = 1.0, Σp = 1.8 + 2.0, Σg = 2: 1 − (2 + 1e-5)/(5.8 + 1e-5) — not the mean of per-image dice
    assert dice_loss(P2, G2).item() == pytest.approx(0.6551712842, abs=1e-9)
    per_image = 0.5 * (dice_loss(P2[:1], G2[:1]) + dice_loss(P2[1:], G2[1:]))
    assert abs(per_image.item() - 0.6551712842) > 0.05


def test_dice_perfect_and_empty():
    g = torch.zeros(1, 4, 4)
    g[0, 1:3, 1:3] = 1
    assert dice_loss(g.clone(), g).item() == pytest.approx(0.0, abs=1e-9)
    # nothing predicted, nothing there: (0 + eps)/(0 + eps) → loss 0
    assert dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == pytest.approx(0.0, abs=1e-12)


def test_segmentation_loss_sums_or_averages_layers():
    maps = torch.stack([P[0], torch.full((2, 2), 0.5, dtype=F64)])[:, None]  # [L=2, N=1, 2, 2]
    f0, f1 = focal_loss(maps[0], G), focal_loss(maps[1], G)
    d0, d1 = dice_loss(maps[0], G), dice_loss(maps[1], G)
    out = segmentation_loss(maps, G)
    torch.testing.assert_close(out["focal"], f0 + f1)
    torch.testing.assert_close(out["dice"], d0 + d1)
    out = segmentation_loss(list(maps), G, layer_reduction="mean", balanced=True)
    torch.testing.assert_close(out["focal"], 0.5 * (focal_loss(maps[0], G, balanced=True)
                                                     + focal_loss(maps[1], G, balanced=True)))
    torch.testing.assert_close(out["dice"], 0.5 * (d0 + d1))
    with pytest.raises(ValueError):
        segmentation_loss(maps, G, layer_reduction="max")


# ----------------------------------------------------------------------------------- cross-entropy
def test_classification_loss_is_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(7, 2, dtype=F64)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    ref = torch.stack([-torch.log_softmax(logits[i], 0)[labels[i]] for i in range(7)]).mean()
    torch.testing.assert_close(classification_loss(logits, labels), ref)
    torch.testing.assert_close(classification_loss(logits, labels.double()), F.cross_entropy(logits, labels))
    # by hand: logits (0, ln 3), label 1 → −ln(3/4)
    assert classification_loss(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([1])).item() == \
        pytest.approx(-math.log(0.75), abs=1e-7)


# ------------------------------------------------------------------------------------- orthogonal
def _brute_force_ort(t_n, t_a, reduction):
    n_img, n_b, _ = t_n.shape
    per_image = []
    for img in range(n_img):
        acc = {"n": [], "a": []}
        for bank, t in (("n", t_n), ("a", t_a)):
            for i, j in itertools.product(range(n_b), range(n_b)):
                cos = float(t[img, i] @ t[img, j]) / (float(t[img, i].norm()) * float(t[img, j].norm()))
                acc[bank].append(0.0 if i == j else cos ** 2)
        per_image.append(acc)
    if reduction == "sum":
        return sum(sum(a["n"]) + sum(a["a"]) for a in per_image) / n_img
    # released: mean over all N·B·B entries (diagonal zeros included), normal + abnormal
    return (sum(sum(a["n"]) for a in per_image) + sum(sum(a["a"]) for a in per_image)) / (n_img * n_b * n_b)


@pytest.mark.parametrize("reduction", ["sum", "mean_with_diagonal"])
def test_orthogonal_loss_matches_brute_force(reduction):
    torch.manual_seed(0)
    t_n = torch.randn(4, 3, 16, dtype=F64) * 2.0
    t_a = torch.randn(4, 3, 16, dtype=F64) + 0.5
    got = orthogonal_loss(t_n, t_a, reduction=reduction).item()
    assert got == pytest.approx(_brute_force_ort(t_n, t_a, reduction), rel=1e-12)


def test_orthogonal_loss_extremes():
    eye = torch.eye(3, dtype=F64)[None]  # orthonormal prompts: 0
    assert orthogonal_loss(eye, eye).item() == pytest.approx(0.0, abs=1e-15)
    same = torch.ones(2, 3, 8, dtype=F64)  # identical prompts: B(B−1) = 6 per bank
    assert orthogonal_loss(same, same).item() == pytest.approx(12.0)
    assert orthogonal_loss(same, same, reduction="mean_with_diagonal").item() == pytest.approx(12.0 / 9.0)
    with pytest.raises(ValueError):
        orthogonal_loss(same, same, reduction="mean")


# ------------------------------------------------------------------------------------- Eq. 14 total
def test_total_loss_terms_and_weights():
    t = {k: torch.tensor(v, dtype=F64) for k, v in dict(cls=0.7, focal=0.3, dice=0.4, ort=0.05,
                                                         kl_context=2.0, kl_normal=1.0, kl_abnormal=3.0).items()}
    out = total_loss(**t)
    assert set(out) == {"cls", "focal", "dice", "seg", "ort", "kl_context", "kl_normal", "kl_abnormal",
                        "flow", "total"}
    assert out["seg"].item() == pytest.approx(0.7)
    assert out["flow"].item() == pytest.approx(6.0)
    assert out["total"].item() == pytest.approx(0.7 + 0.7 + 0.05 + 6.0)  # Eq. 14: no weights
    rel = total_loss(**t, kl_weight=0.01)  # released code
    assert rel["total"].item() == pytest.approx(0.7 + 0.7 + 0.05 + 0.06)
    assert rel["flow"].item() == pytest.approx(6.0)  # logged terms stay unweighted
    w = total_loss(**t, cls_weight=2.0, focal_weight=3.0, dice_weight=0.5, ort_weight=10.0, kl_weight=0.0)
    assert w["total"].item() == pytest.approx(1.4 + 0.9 + 0.2 + 0.5)


def test_total_loss_partial_terms_and_gradient():
    x = torch.tensor(1.5, requires_grad=True)
    out = total_loss(cls=x * 2.0)  # stage-2 style: CE only
    assert set(out) == {"cls", "total"}
    out["total"].backward()
    assert x.grad.item() == pytest.approx(2.0)
    out = total_loss(kl_normal=torch.tensor(1.0), kl_abnormal=torch.tensor(2.0))  # ablation without ISD
    assert set(out) == {"kl_normal", "kl_abnormal", "flow", "total"} and out["total"].item() == 3.0
    with pytest.raises(ValueError):
        total_loss()
