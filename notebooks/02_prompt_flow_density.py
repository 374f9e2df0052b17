# %% [markdown]
# # 02 · The prompt flow: planar flows and densities (Eq. 3-7)
#
# Teaching notebook of **bpfl**, the kit for *Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection* (Qu et al., CVPR 2025).
#
# **Learning goals**
#
# - read Eq. 6: the density of a sample pushed through K planar maps
# - check Eq. 6 three ways: against autograd's Jacobian, against a histogram of samples, and by integrating to 1
# - move a **K slider** and watch the density change
# - see why a planar map can fold the plane, and how the û reparameterisation prevents it
# - tell the image-specific (ISD) from the image-agnostic (IAD) distribution
#
# **Runtime**: fast mode on a 2-core CPU ≈ 25 s (kernel start included); paper mode on one GPU ≈ 1 min, plus the main training run if notebook 03 has not cached it yet.
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
from bpfl.flow import PlanarFlowStack, PromptFlow, constrain_u, planar_step, planar_inverse_step, standard_normal_log_prob
from bpfl import notebook as nb

S = nb.setup("02_prompt_flow_density", mode=MODE)  # banner, seed, plotting style, results folder
cfg = S.config

# %% [markdown]
# ## 1 · From prompts to random prompts
#
# > To construct the text prompt distribution, the context, normal state, and abnormal state word embeddings are
# > represented as C-dimensional random vectors $\Phi_e, \Phi_s^n$ and $\Phi_s^a$ […]
#
# $$p(\Phi|D) = \frac{p(D|\Phi)p(\Phi)}{p(D)} \quad (3)$$
#
# > Since computing the marginal likelihood p(D) is intractable, variational inference with distribution
# > $q_\gamma(\Phi)$ […] is employed to approximate the posterior probability. — §3.3
#
# The approximate posterior $q$ must be cheap to **sample** (the prompts are built from samples) and cheap to
# **evaluate** (the loss needs $\log q$). A normalising flow has both properties.
#
# > a prompt flow module is designed to transform a simple probability distribution $q_0(\Phi_0)$ into a more
# > complex one $q_K(\Phi_K)$ through a series of invertible mappings $h_k$ […] we use a linear-time transformation
# > $h(\Phi) = \Phi + \mathbf{u}g(\mathbf{w}^T\Phi + \mathbf{b})$, where $\mathbf{w}, \mathbf{u} \in \mathbb{R}^C,
# > \mathbf{b} \in \mathbb{R}$ are trainable parameters and $g(\cdot)$ is the Tanh activation function. — §3.3
#
# $$\log q_K(\Phi_K) = \log q_0(\Phi_0) - \sum_{k=1}^K \log |1 + \mathbf{u}_k^T \phi(\Phi_k)| \quad (6)$$
#
# > where $\phi(\Phi) = g'(\mathbf{w}^T\Phi + \mathbf{b})\mathbf{w}$.
#
# Each planar step moves a point along $\mathbf{u}$ by an amount that depends only on its position along
# $\mathbf{w}$. The Jacobian of such a step is $I + \mathbf{u}\,\phi^T$, whose determinant is
# $1 + \mathbf{u}^T\phi$, so one term of the sum costs O(C). In the kit, term k is evaluated at the step's
# *input* $\Phi_{k-1}$, as in Rezende & Mohamed (2015) and the released code.
#
# The prompts live in 768 dimensions, but everything below also works in **2-D**, where densities can be plotted.

# %% [markdown]
# ## 2 · One planar step, checked against autograd
#
# The lesson code: the Jacobian of one step, computed by autograd, whose log-determinant must equal the term of
# Eq. 6 that `planar_step` returns.

# %%
u = torch.tensor([0.8, 0.4], dtype=torch.float64)
w = torch.tensor([2.5, -1.0], dtype=torch.float64)
b = torch.tensor(0.3, dtype=torch.float64)
z = torch.tensor([0.4, -0.7], dtype=torch.float64)

_, log_det = planar_step(z, u, w, b)                                   # the kit (û inside)
u_hat = constrain_u(u, w)
jac = torch.autograd.functional.jacobian(lambda v: v + u_hat * torch.tanh(w @ v + b), z)
sign, logabs = torch.linalg.slogdet(jac)
print(f"log|det| kit {float(log_det):.10f}   autograd {float(logabs):.10f}")
assert sign > 0 and torch.allclose(log_det, logabs, atol=1e-10)

# %% [markdown]
# ## 3 · K steps: the density by Eq. 6 versus a histogram of samples
#
# `bpfl.notebook.flow_density_2d` evaluates Eq. 6 on a grid. It inverts the flow numerically,
# $z_0 = h^{-1}(z_K)$, then returns $\log \mathcal{N}(z_0; 0, I) - \sum_k \log|\det_k|$. Below it, a histogram of
# samples pushed *forward* through the same flow. If Eq. 6 is right, the two rows show the same picture and each
# density integrates to 1.

# %%
n, ext = S.scale.grid_n, 4.5
n_samples = int(100_000 * (n / 90) ** 2)  # about 12 samples per grid cell, whatever the grid
stack = nb.demo_flow_2d(k_max=S.scale.k_max)
points, area = nb.grid_2d(n, ext)
ks = [0, 1, 2, 4, 8, S.scale.k_max]
fig, axes = plt.subplots(2, len(ks), figsize=(2.2 * len(ks), 4.7))
for j, k in enumerate(ks):
    sub = nb.truncate_flow(stack, k)
    dens = nb.flow_density_2d(sub, points).reshape(n, n).numpy()
    hist = nb.histogram_density(nb.flow_samples_2d(sub, n_samples), n, ext)
    mass, tv = dens.sum() * area, 0.5 * np.abs(dens - hist).sum() * area
    vmax = np.quantile(dens, 0.995)
    axes[0, j].imshow(dens, origin="lower", extent=(-ext, ext, -ext, ext), vmin=0, vmax=vmax, cmap="viridis")
    axes[1, j].imshow(hist, origin="lower", extent=(-ext, ext, -ext, ext), vmin=0, vmax=vmax, cmap="viridis")
    axes[0, j].set_title(f"K={k}: ∫q={mass:.3f}", fontsize=9)
    axes[1, j].set_title(f"histogram (TV {tv:.2f})", fontsize=9)
    assert abs(mass - 1) < 0.02, f"K={k}: the density does not integrate to 1 ({mass:.3f})"
    assert tv < 0.15, f"K={k}: Eq. 6 and the histogram disagree (total variation {tv:.2f})"
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
axes[0, 0].set_ylabel("Eq. 6"); axes[1, 0].set_ylabel("samples")
fig.tight_layout()
S.save(fig, "density_vs_histogram")
plt.show()

# %% [markdown]
# The remaining total variation is histogram noise: about a dozen samples per bin. Each
# step splits or bends the mass, and with more steps the distribution can take shapes that no Gaussian could.
# That is the point of the flow: a richer posterior for the prompts (*"Richer posterior approximations enable us to
# better estimate the prompt distribution"*, §3.3).
#
# ## 4 · The K slider
#
# Drag the slider. The densities are cached per K, so the picture changes at once. In a static rendering (on
# GitHub, say) the widget does not appear; the saved figure `k_slider.png` shows its last state.

# %%
k_slider, k_state = nb.k_slider_demo(k_max=S.scale.k_max, grid_n=S.scale.grid_n, n_samples=n_samples)
display(k_state["ui"])

# %%
# what the slider does, without a browser: set its value; the callback redraws the density
before = k_state["density"].copy()
k_slider.value = S.scale.k_max
assert k_state["K"] == S.scale.k_max and not np.allclose(before, k_state["density"])
assert abs(k_state["mass"] - 1) < 0.02
print(f"K = {k_state['K']}: ∫q = {k_state['mass']:.4f}")
_ = S.save(k_state["fig"], "k_slider")

# %% [markdown]
# ## 5 · Invertibility and the û fix
#
# A planar step is invertible only if it never folds the plane. Along $\mathbf{w}$, with $\alpha = \mathbf{w}^T z$ and
# $c = \mathbf{w}^T \mathbf{u}$, the step moves $\alpha$ to $\alpha + c\,\tanh(\alpha + b)$. This is increasing in
# $\alpha$ for every $\alpha$ exactly when $c \ge -1$. The paper calls the maps invertible but does not state
# the condition. Rezende & Mohamed's reparameterisation enforces it:
#
# $$\hat{\mathbf{u}} = \mathbf{u} + [m(\mathbf{w}^T\mathbf{u}) - \mathbf{w}^T\mathbf{u}]\,\frac{\mathbf{w}}{\|\mathbf{w}\|^2}, \qquad m(x) = -1 + \log(1 + e^x),$$
#
# so that $\mathbf{w}^T\hat{\mathbf{u}} = m(\mathbf{w}^T\mathbf{u}) > -1$. The kit uses û by default
# (`constrained_flow=True`). The released code uses the raw $\mathbf{u}$ (`constrained_flow=False`, see `SWITCHES`).

# %%
w = torch.tensor([3.0, 0.0], dtype=torch.float64)
u = torch.tensor([-1.2, 0.8], dtype=torch.float64)   # w·u = -3.6 < -1: the raw step folds
b = torch.tensor(0.3, dtype=torch.float64)
u_hat = constrain_u(u, w)
print(f"w·u = {float(w @ u):.3f}   w·û = {float(w @ u_hat):.3f}")
assert float(w @ u_hat) > -1

alpha = torch.linspace(-4, 4, 801, dtype=torch.float64)
along = {"raw u (released)": alpha + float(w @ u) * torch.tanh(alpha + b),
         "û (kit default)": alpha + float(w @ u_hat) * torch.tanh(alpha + b)}
assert (np.diff(along["raw u (released)"].numpy()) < 0).any(), "expected a fold"
assert (np.diff(along["û (kit default)"].numpy()) > 0).all(), "û must give a monotone map"

fig, axes = plt.subplots(1, 3, figsize=(12.5, 3.8))
for name, f in along.items():
    axes[0].plot(alpha, f, label=name)
axes[0].set_xlabel("α = wᵀz (input)"); axes[0].set_ylabel("wᵀh(z) (output)"); axes[0].legend(fontsize=8)
axes[0].set_title("the step along w")
lines = torch.linspace(-3, 3, 13, dtype=torch.float64)
dense = torch.linspace(-3, 3, 200, dtype=torch.float64)
for ax, constrained, title in ((axes[1], False, "raw u: the grid folds"), (axes[2], True, "û: the grid bends, never folds")):
    for c in lines:
        for pts in (torch.stack([dense, c.expand(200)], -1), torch.stack([c.expand(200), dense], -1)):
            out, _ = planar_step(pts, u, w, b, constrained=constrained)
            ax.plot(out[:, 0], out[:, 1], lw=0.7, color="C0")
    ax.set_title(title); ax.set_aspect("equal")
fig.tight_layout()
S.save(fig, "invertibility")
plt.show()

# %% [markdown]
# What breaks without û: Eq. 6 assumes that each output has exactly one input. Where the map folds, three inputs
# land on the same output. The true density is then the sum of their contributions, while Eq. 6 reports only the
# one along the sample's own path. Near the fold, $|1 + \mathbf{u}^T\phi| \to 0$ and Eq. 6 diverges. The cell
# compares Eq. 6 at each sample with a histogram estimate at the same point. The kit's numerical inverse refuses
# a folding step.

# %%
g = torch.Generator().manual_seed(0)
z0 = torch.randn(200_000, 2, generator=g, dtype=torch.float64)
ratios = {}
for constrained in (True, False):
    zk, log_det = planar_step(z0, u, w, b, constrained=constrained)
    eq6 = (standard_normal_log_prob(z0) - log_det).exp().numpy()
    hist = nb.histogram_density(zk, 120, 4.5)
    ij = np.clip(((zk.numpy() + 4.5) / 9 * 120).astype(int), 0, 119)
    h_at = hist[ij[:, 1], ij[:, 0]]
    ok = h_at > 0.02
    ratios[constrained] = float(np.median(np.abs(np.log(eq6[ok] / h_at[ok]))))
print(f"median |log(Eq. 6 / histogram)| at the samples: û {ratios[True]:.3f}   raw u {ratios[False]:.3f}")
assert ratios[True] < 0.15 < ratios[False]
try:
    planar_inverse_step(zk[:5], u, w, b, constrained=False)
    raise AssertionError("a folding step must not be invertible")
except ValueError as e:
    print("planar_inverse_step(constrained=False):", str(e)[:110], "...")

# %% [markdown]
# ## 6 · ISD and IAD
#
# > The initial density $q_0$ is defined as a standard normal distribution: $q_0 = \mathcal{N}(\mu(\xi), \Sigma(\xi))$,
# > where $\mu \in \mathbb{R}^C$ and $\text{diag}(\Sigma) = \sigma \in \mathbb{R}^C$ are conditioned on the vector
# > $\xi \in \mathbb{R}^C$ and parameterized by three linear layers, with a Softplus activation function applied
# > between consecutive layers.
# >
# > Depending on the different inputs ξ to the prompt flow module, two types of distributions are obtained: an
# > **image-specific distribution** (ISD) and an **image-agnostic distribution** (IAD). For ISD, ξ is set as global
# > image feature x to acquire a dynamic distribution, which models the context distribution and enhances
# > generalization in unseen domains. For IAD, we set ξ as the learnable free vectors $\mathbf{x}_f^n$ and
# > $\mathbf{x}_f^a$, respectively, while sharing the same network weights. — §3.3
#
# In 2-D first, with the encoder's weights scaled up so that the picture shows something. The kit initialises
# them at N(0, 0.02²), which makes $q_0 \approx \mathcal{N}(0, I)$ for every ξ. The ISD's distribution moves
# with the image. The IAD has one distribution per state, and it is the same for every image.

# %%
torch.manual_seed(0)
isd = PromptFlow(2, in_dim=2, n_flows=4)
iad_normal = PromptFlow(2, in_dim=2, n_flows=4)
iad_abnormal = PromptFlow(2, in_dim=2, encoder=iad_normal.encoder, flow=iad_normal.flow)  # same weights, own ξ
with torch.no_grad():
    for m in list(isd.encoder.modules()) + list(iad_normal.encoder.modules()):
        if isinstance(m, torch.nn.Linear):
            m.weight.normal_(0, 0.9)
x_images = torch.tensor([[2.0, 0.0], [-1.5, 1.5], [0.0, -2.0]])     # ξ = three images' features
xi_n, xi_a = torch.tensor([[1.5, 1.5]]), torch.tensor([[-1.5, -1.5]])  # ξ = two free vectors
assert iad_abnormal.encoder is iad_normal.encoder and iad_abnormal.flow is iad_normal.flow

fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharex=True, sharey=True)
gen = torch.Generator().manual_seed(1)
with torch.no_grad():
    for i, x in enumerate(x_images):
        s = isd(x[None], n_samples=400, generator=gen).zk[:, 0]
        axes[0].scatter(s[:, 0], s[:, 1], s=4, alpha=0.5, label=f"image {i + 1}")
    for name, xi, col in (("normal state", xi_n, "C2"), ("abnormal state", xi_a, "C3")):
        s = (iad_normal if name.startswith("normal") else iad_abnormal)(xi, n_samples=400, generator=gen).zk[:, 0]
        axes[1].scatter(s[:, 0], s[:, 1], s=4, alpha=0.5, color=col, label=f"{name} (every image)")
axes[0].set_title("ISD: ξ = x, one distribution per image"); axes[1].set_title("IAD: ξ = free vectors, shared weights")
for ax in axes:
    ax.legend(markerscale=3, fontsize=8)
fig.tight_layout()
S.save(fig, "isd_vs_iad_2d")
plt.show()

# %% [markdown]
# Now the real model. The context flow (ISD) receives $\xi = \mathbf{x} = \mathbf{x}_{cls} + \mathbf{x}_{patch}$ of each
# image. The two state flows (IAD) share one encoder and one planar stack, and each receives its own free vector.
# The model comes from the kit's training cache: it is trained now if notebook 03 has not cached it yet. The
# samples are projected onto two principal components.

# %%
T = S.train_or_load()
model = T.model.eval()
from bpfl.data import collate
aux = S.aux_dataset()
idx = [aux.by_category()[c][-1] for c in aux.categories]     # one image per seen category
batch = collate([aux[i] for i in idx])
with torch.no_grad():
    feats = model.backbone.encode_image(batch["image"])
    x = model.global_embedding(feats, model.project_patches(feats))
    mu_isd, _ = model.context_flow.encoder(x)                 # [N, D]: one q0 per image
    mu_iad_n, _ = model.normal_flow.encoder(model.normal_xi)  # [1, D]: one q0 for all images
    mu_iad_a, _ = model.abnormal_flow.encoder(model.abnormal_xi)
    gen = torch.Generator().manual_seed(0)
    phis, _ = model.sample_prompts(feats, x, n_samples=64, generator=gen)
assert model.abnormal_flow.encoder is model.normal_flow.encoder and model.abnormal_flow.flow is model.normal_flow.flow
assert mu_iad_n.shape[0] == 1 and mu_isd.shape[0] == len(idx)
assert float((mu_isd - mu_isd.mean(0)).abs().max()) > 0, "ISD means should depend on the image"
print(f"ISD: std of μ over the images {float(mu_isd.std(0).mean()):.2e} | IAD: one μ per state, ‖μ_n − μ_a‖ = {float((mu_iad_n - mu_iad_a).norm()):.2e}")

ctx = phis["context"]                         # [R, N, D]
states = torch.cat([phis["normal"], phis["abnormal"]], dim=1)  # [R, 2N, D]
fig, axes = plt.subplots(1, 2, figsize=(9.5, 4))
for ax, data, title in ((axes[0], ctx, "context samples φᵉ (ISD)"), (axes[1], states, "state samples φⁿ, φᵃ (IAD)")):
    flat = data.reshape(-1, data.shape[-1])
    flat = flat - flat.mean(0)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    p = (data - data.reshape(-1, data.shape[-1]).mean(0)) @ v[:2].T   # [R, n, 2]
    for i in range(p.shape[1]):
        if data is ctx:
            label = batch["class_name"][i]
        else:
            label = ("normal" if i < len(idx) else "abnormal") + f", {batch['class_name'][i % len(idx)]}"
        ax.scatter(p[:, i, 0], p[:, i, 1], s=5, alpha=0.6, label=label)
    ax.set_title(title); ax.legend(fontsize=6, markerscale=2)
fig.tight_layout()
S.save(fig, "isd_vs_iad_model")
plt.show()

# %% [markdown]
# On the right, the normal clouds of all images overlap, and so do the abnormal clouds: the IAD does not
# depend on the image. Its samples still differ from image to image, because each image draws its own ε, but all
# of them come from one distribution per state. On the left, each image has its own cloud, at least in principle.
# With the tiny random backbone the clouds lie on top of each other: the printed spread of μ over the images is
# almost zero. Random features of different textures are nearly alike, and the encoder's small initial weights
# shrink their differences further. So here the ISD behaves like an IAD. With CLIP, $\mathbf{x}$ differs between
# images, and the ISD carries image content into the context words, which §4.3 credits for the generalisation
# to unseen categories.

# %% [markdown]
# ## Summary
#
# - Eq. 6 is the change of variables for K planar steps: each step adds −log|1 + uᵀψ| to log q. The kit's log-det matches autograd, and its density matches a histogram and integrates to 1.
# - More steps give more complex densities. The K slider shows this, and the paper uses K = 10.
# - Without û a planar step can fold the plane, and Eq. 6 is then wrong. The kit uses û by default, while the released code uses the raw u.
# - ISD conditions q₀ on the image (context words). IAD conditions it on two free vectors with shared weights (state words), the same for every image.

# %% [markdown]
# ## Exercises
#
# 1. In the density cell, change `demo_flow_2d`'s seed. Find a seed where mass leaves the [-4.5, 4.5]² window. Which assertion catches it?
# 2. Set `u = torch.tensor([-0.2, 0.8])` in §5 (so that w·u = −0.6). Is the raw step still folding? What does û change then?
# 3. With u = 0 every step is the identity. Show that Eq. 6 then reduces to log q₀, and check it numerically with `planar_step`.
# 4. In the 2-D ISD/IAD picture, give the ISD two images with the same ξ. What do you expect to see, and why is that the right behaviour for *context* words?
# 5. Time `flow_density_2d` for K = 1…12. Which part grows with K: the inverse or the forward pass?
