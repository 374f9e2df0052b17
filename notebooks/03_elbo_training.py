# %% [markdown]
# # 03 · The ELBO and training (Eq. 3-7, 13-14)
#
# Teaching notebook of **bpfl**, the kit for *Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection* (Qu et al., CVPR 2025).
#
# **Learning goals**
#
# - derive the training loss from the ELBO and name each term of Eq. 7 and Eq. 14
# - check the flow's KL term against the closed-form Gaussian KL
# - compute every loss term on one batch and check that they sum to the total
# - train on the auxiliary set with per-term loss curves, save a checkpoint, and load it instead of retraining
#
# **Runtime**: fast mode on a 2-core CPU ≈ 20 s (training ≈ 5 s) (kernel start included); paper mode on one GPU ≈ 10-30 min (20 epochs on VisA-sized data), loaded from the cache afterwards.
#
# **Mode switch**: set `MODE` in the setup cell below (`"fast"` or `"paper"`), or the environment variable
# `BPFL_MODE`. Fast mode (the default) uses a tiny backbone, the small synthetic dataset, small R and K and a few
# epochs. When that backbone has **random weights**, every number it produces shows the *mechanics* of the method,
# not its results. The banner printed by the setup cell says which mode runs, and why.

# %%
# ---- setup: the only cell to edit ------------------------------------------------------------
MODE = None  # None: $BPFL_MODE, else "fast" (CPU minutes). "paper": ViT-L-14-336/openai at 518 px (GPU advised)

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from bpfl.flow import PromptFlow, flow_kl
from bpfl.data import collate
from bpfl import notebook as nb

S = nb.setup("03_elbo_training", mode=MODE)  # banner, seed, plotting style, results folder
cfg = S.config

# %% [markdown]
# ## 1 · From the ELBO to the loss
#
# $$\log p(D) = \log \int p(D|\Phi)p(\Phi)d\Phi \quad (4)$$
#
# $$\geq E_{q_\gamma(\Phi|D)}[\log p(D, \Phi) - \log q_\gamma(\Phi|D)] = -\mathcal{L}_e(D) \quad (5)$$
#
# > By replacing $q_\gamma(\Phi|D)$ in Equation (5) with $q_K(\Phi_K)$, the objective function for optimizing the
# > prompt flow module is computed as: — §3.3
#
# $$\mathcal{L}_p(D) = E_{q_0(\Phi_0)} \left[\log q_0(\Phi_0) - \sum_{k=1}^K \log |1 + \mathbf{u}_k^T \phi(\Phi_k)| \right] - E_{q_0(\Phi_0)}[\log p(\Phi_K)] - E_{q_0(\Phi_0)}[\log p(D|\Phi_K)] \quad (7)$$
#
# > where the prior distribution follows $p = \mathcal{N}(0, \mathbf{I})$. […] The first two terms of $\mathcal{L}_p$ are
# > distribution regularization terms […] The third term […] maximizes the log-likelihood of the data, which is
# > approximated by the sum of classification loss (for text-image alignment) and segmentation loss (for text-patch
# > alignment). Specifically, our Bayes-PFL employs a cross-entropy loss for classification, along with the sum of
# > Focal loss and Dice loss for segmentation. — §3.6
#
# $$\mathcal{L} = \mathcal{L}_{ort} + \mathcal{L}_p \quad (14)$$
#
# The terms as the kit names them:
#
# | term | Eq. | kit |
# |---|---|---|
# | $E_{q_0}[\log q_0 - \sum_k \log\lvert\det_k\rvert - \log p(\Phi_K)]$, one per flow | 7 (first two terms) | `kl_context` (ISD), `kl_normal`, `kl_abnormal` (IAD): `bpfl.flow.flow_kl` |
# | $-E_{q_0}[\log p(D\mid\Phi_K)]$ ≈ classification | 7 (third term) | `cls`: cross-entropy of $\mathbf{x}$ against each normal/abnormal pair |
# | ≈ segmentation | 7 (third term) | `focal` + `dice`, per layer (summed over the L layers) |
# | orthogonality | 13 | `ort` |
#
# No weights appear in Eq. 14, so the kit's default weights are all 1. The released code weights each KL term by 0.01
# (`kl_weight`, see `SWITCHES`). During training R = 1: *"a single Monte Carlo sampling is performed to enhance
# efficiency"* (§3.6).

# %% [markdown]
# ### Check: the flow term is a KL divergence
#
# With an identity flow (K = 0) the first two terms of Eq. 7 are exactly $\mathrm{KL}(q_0 \,\|\, \mathcal{N}(0, I))$,
# and that has a closed form, $\tfrac12\sum_c(\sigma_c^2 + \mu_c^2 - 1 - \log\sigma_c^2)$. `flow_kl` estimates it by
# Monte Carlo, so with many samples the two must agree.

# %%
torch.manual_seed(0)
f0 = PromptFlow(8, n_flows=0)
with torch.no_grad():
    for m in f0.encoder.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.normal_(0, 0.3)  # a q0 visibly different from N(0, I)
    s = f0(torch.randn(3, 8), n_samples=40_000, generator=torch.Generator().manual_seed(0))
    closed = 0.5 * (s.log_var.exp() + s.mu ** 2 - 1 - s.log_var).sum(-1)
    mc = flow_kl(s, reduction="none")
print("closed form :", closed.numpy().round(4))
print("Monte Carlo :", mc.numpy().round(4))
assert torch.allclose(mc, closed, atol=0.05)

# %% [markdown]
# ## 2 · One batch, term by term
#
# One training step on a batch of the auxiliary set: the forward pass in training mode (R = 1, per-pair maps kept
# for the losses), then `BayesPFL.loss`. The lesson code recomputes the dice term of the first layer and the first
# prompt pair by hand.

# %%
aux = S.aux_dataset()
print("auxiliary set:", S.aux_name(), "-", len(aux), "images of", aux.categories)
model = S.new_model()
batch = collate([aux[i] for i in range(0, len(aux), max(1, len(aux) // cfg.batch_size))][: cfg.batch_size])
masks = torch.nan_to_num(batch["mask"])
model.train()
out = model(batch["image"], batch["class_name"], generator=torch.Generator().manual_seed(0))
terms = model.loss(out, masks, batch["label"])
print("pair maps", tuple(out.pair_maps.shape), "= [images, layers L, R·B pairs, h, w]")

expected = (terms["cls"] + terms["focal"] + terms["dice"] + cfg.ort_weight * terms["ort"]
            + cfg.kl_weight * (terms["kl_context"] + terms["kl_normal"] + terms["kl_abnormal"]))
assert torch.allclose(terms["total"], expected), "the total is not the sum of its terms (Eq. 14)"

p, g = out.pair_maps[:, 0, 0], masks.to(out.pair_maps.device)   # layer 1, pair 1
dice_by_hand = 1 - (2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5)
from bpfl.losses import dice_loss
assert torch.allclose(dice_by_hand, dice_loss(p, g))

table = pd.Series({k: float(v.detach()) for k, v in terms.items()}, name="value").to_frame()
fig, ax = plt.subplots(figsize=(7, 3))
order = ["cls", "focal", "dice", "ort", "kl_context", "kl_normal", "kl_abnormal"]
ax.bar(order, [float(terms[k].detach()) for k in order], color=["C0", "C1", "C1", "C2", "C3", "C3", "C3"])
ax.set_title(f"Eq. 14 on one batch: total = {float(terms['total'].detach()):.3f}")
ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
S.save(fig, "loss_terms_one_batch")
plt.show()
table.T.round(4)

# %% [markdown]
# `seg` and `flow` in the table are group totals (focal + dice, and the sum of the three KL terms). With R = 1 each
# KL term is a *single-sample* Monte-Carlo estimate: it is unbiased, but a single value can come out negative even
# though a KL divergence cannot. The dice and
# focal terms are summed over the L layers and averaged over the B prompt pairs. That sum makes `dice` large
# compared with `cls`; the paper does not say how the layers are combined.
#
# ## 3 · Training on the auxiliary set
#
# > We use the Adam optimizer to train our Bayes-PFL for a total of 20 epochs, with an initial learning rate of 0.0001
# > and a batch size of 32. — §4.1
#
# The frozen CLIP is never trained. Only the kit's own parameters are: the prompt banks, the flows and their
# free vectors, the per-layer projections, the $\mathbf{x}_{patch}$ layer and RCA. Fast mode trains a few epochs
# on the synthetic *seen* categories at a larger learning rate.
#
# `S.train_or_load()` follows the rule *checkpoint present? load it : train it*. The first run trains and caches,
# and every later run (or notebook) loads. Set `RETRAIN = True` to train again. The curves record every loss term
# at every step and are redrawn after each epoch.

# %%
RETRAIN = False
T = S.train_or_load(retrain=RETRAIN, live=True)
model = T.model
trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
frozen = sum(p.numel() for p in model.backbone.parameters())
print(f"{'loaded' if T.loaded else 'trained'}: {T.checkpoint}")
print(f"trainable parameters {trainable:,} | frozen CLIP parameters {frozen:,} ({100 * trainable / (trainable + frozen):.2f} % trained)")
T.history.round(4)

# %%
steps = T.steps
assert len(steps) > 0 and np.isfinite(steps["total"]).all()
fig = nb.plot_loss_terms(steps, title=f"every term of Eq. 14 per step ({S.aux_name()}, {cfg.epochs} epochs; grey lines: epoch ends)")
S.save(fig, "loss_curves")
plt.show()

# %% [markdown]
# How to read the curves: the KL terms are the regularisers. They pull each flow's $q_K$ towards the prior
# $\mathcal{N}(0, I)$. In fast mode they jump in the first steps, where the large learning rate (1e-2, against the
# paper's 1e-4) moves the flows abruptly, and then settle. The data terms (`cls`,
# `focal`, `dice`) pull the prompts wherever the images need them, so the two groups trade off. `ort` falls, as in
# notebook 01, but more slowly, because here it competes with the other terms. With a random backbone the data
# terms cannot fall far, and `dice` hardly moves: the features carry little that separates an anomaly from its
# texture. The curves are noisy because each step is one small batch with one Monte-Carlo sample.
#
# ## 4 · The checkpoint
#
# A checkpoint holds the kit's parameters, the configuration, and the optimizer and RNG state needed for exact
# resumption. It holds no CLIP weights, which are the backbone's. Loading rebuilds the model from the configuration
# it stores and gives identical outputs.

# %%
from bpfl.train import load_model, read_checkpoint

ckpt = read_checkpoint(T.checkpoint)
print("keys:", sorted(ckpt))
assert not any(k.startswith("backbone.") for k in ckpt["state"]), "checkpoints must not contain CLIP weights"
print(f"{T.checkpoint.stat().st_size / 1e6:.2f} MB on disk, {len(ckpt['state'])} tensors, epoch {ckpt['epoch']}")

reloaded = load_model(T.checkpoint, backbone=S.backbone)
model.eval()
with torch.no_grad():
    a = model(batch["image"], batch["class_name"], generator=torch.Generator().manual_seed(3))
    b = reloaded(batch["image"], batch["class_name"], generator=torch.Generator().manual_seed(3))
assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.image_score, b.image_score)
print("reloaded model: identical maps and scores")

# %%
import time
t0 = time.perf_counter()
T2 = S.train_or_load()          # the same config and data: loaded from the cache
assert T2.loaded and T2.checkpoint == T.checkpoint
print(f"second call: loaded in {time.perf_counter() - t0:.2f} s instead of training ({T2.history['seconds'].iloc[-1]:.1f} s)")

# %% [markdown]
# ## 5 · The released code's loss weights
#
# The released code multiplies each KL term by 0.01 and averages Eq. 13 over B² entries. On the same batch the
# terms are identical and only the total changes:

# %%
from bpfl.config import BayesPFLConfig
released = S.new_model(cfg.replace(kl_weight=0.01, ort_reduction="mean_with_diagonal"))
released.load_trainable_state_dict(model.trainable_state_dict())
released.train(); model.train()
g = lambda: torch.Generator().manual_seed(0)
paper_terms = model.loss(model(batch["image"], batch["class_name"], generator=g()), masks, batch["label"])
rel_terms = released.loss(released(batch["image"], batch["class_name"], generator=g()), masks, batch["label"])
model.eval()
assert torch.allclose(paper_terms["kl_context"], rel_terms["kl_context"])
assert torch.allclose(rel_terms["ort"] * cfg.n_prompts ** 2, paper_terms["ort"], atol=1e-5)
pd.DataFrame({"paper (kit default)": {k: float(v.detach()) for k, v in paper_terms.items()},
              "released-code weights": {k: float(v.detach()) for k, v in rel_terms.items()}}).round(4)

# %% [markdown]
# ## Summary
#
# - The loss is the negative ELBO. The flow terms of Eq. 7 are Monte-Carlo KL divergences to N(0, I), checked against the closed form. The likelihood term is CE + focal + dice, and Eq. 14 adds $\mathcal{L}_{ort}$.
# - Training updates only the kit's parameters. CLIP stays frozen and no CLIP weights go into checkpoints.
# - `S.train_or_load()` trains once and loads afterwards. The cache key covers the configuration and the data, so a changed setting retrains.
# - The released code's weights (KL × 0.01, Eq. 13 / B²) change the balance of the terms, not the terms themselves.

# %% [markdown]
# ## Exercises
#
# 1. Train with `kl_weight=0.01` (`S.train_or_load(cfg.replace(kl_weight=0.01), name="kl001")`) and compare the KL curves with the default run. Which run's flows end up further from the prior?
# 2. Set `flow_length=0` (no planar steps) and train. Which loss terms change, and why can the KL terms then still be non-zero?
# 3. The paper trains with R = 1. Train with `train_samples=4`. What happens to the noise of the curves, and to the time per step?
# 4. Interrupt a training run in the middle (stop the kernel), then call `bpfl.train.train(..., resume=True)` on the same folder. Check that the result equals an uninterrupted run.
