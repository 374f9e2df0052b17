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
# - diagnose a **collapsed** prompt distribution in a trained model, and find out why it collapsed
#
# **Runtime**: fast mode 25 s in the committed cold-start run (`benchmarks/results/notebook_times.md`: all seven
# notebooks in order on a 2-core CPU, kernel start included), with the main model cached by
# notebook 01; run first on a cold cache, it trains the main model too, as 01 does. Paper mode (a GPU and the
# OpenAI weights, plus the main training if no notebook has cached it) was not timed here.
#
# **Mode switch**: set `MODE` in the setup cell below (`"fast"` or `"paper"`), or the environment variable
# `BPFL_MODE`. Fast mode (the default) runs on the kit's **bundled toy CLIP** (notebook 00), with K = 10 flow
# steps as in the paper, and the fast training recipe (lr 1e-2, 30 epochs on 80 images). §1-5 are exact 2-D
# mathematics and do not depend on the backbone; §6 reads the trained model. `BPFL_FAST_BACKBONE=tiny` asks for
# the random-weight `bpfl-tiny` instead (mechanics only). The banner printed by the setup cell says which
# backbone runs, and why.

# %%
# ---- setup: the only cell to edit ------------------------------------------------------------
MODE = None  # None: $BPFL_MODE, else "fast" (CPU minutes). "paper": ViT-L-14-336/openai at 518 px (GPU advised)

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from IPython.display import display
from bpfl.flow import PromptFlow, constrain_u, planar_step, planar_inverse_step, standard_normal_log_prob
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
fig, axes = plt.subplots(2, len(ks), figsize=(2.4 * len(ks), 6.0))
for j, k in enumerate(ks):
    sub = nb.truncate_flow(stack, k)
    dens = nb.flow_density_2d(sub, points).reshape(n, n).numpy()
    hist = nb.histogram_density(nb.flow_samples_2d(sub, n_samples), n, ext)
    mass, tv = dens.sum() * area, 0.5 * np.abs(dens - hist).sum() * area
    vmax = np.quantile(dens, 0.995)          # one scale per column: Eq. 6 and its histogram are compared
    axes[0, j].imshow(dens, origin="lower", extent=(-ext, ext, -ext, ext), vmin=0, vmax=vmax, cmap="viridis")
    im = axes[1, j].imshow(hist, origin="lower", extent=(-ext, ext, -ext, ext), vmin=0, vmax=vmax, cmap="viridis")
    fig.colorbar(im, ax=list(axes[:, j]), orientation="horizontal", fraction=0.05, pad=0.03, label="density")
    axes[0, j].set_title(f"K = {k}: ∫q = {mass:.3f}", fontsize=9)
    axes[1, j].set_title(f"histogram (TV {tv:.2f})", fontsize=9)
    assert abs(mass - 1) < 0.02, f"K={k}: the density does not integrate to 1 ({mass:.3f})"
    assert tv < 0.15, f"K={k}: Eq. 6 and the histogram disagree (total variation {tv:.2f})"
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
axes[0, 0].set_ylabel("Eq. 6"); axes[1, 0].set_ylabel("samples")
fig.suptitle("top: Eq. 6 on a grid; bottom: histogram of samples pushed through the same K steps (one colour scale per column)", fontsize=10)
S.save(fig, "density_vs_histogram")
plt.show()

# %% [markdown]
# In each column the two panels show the same picture, and the titles give ∫q ≈ 1 and a small total variation
# (TV) between them. The remaining TV is histogram noise: about a dozen samples per bin. Each
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
k_state["fig"].colorbar(k_state["images"][1], ax=list(k_state["axes"]), fraction=0.025, pad=0.02,
                        label="density (both panels)")   # follows the slider: both images share one scale
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
# In 2-D first, with untrained networks whose encoder weights are scaled up so that the picture shows the idea:
# the ISD's distribution moves with the image (one cloud per ξ = x). The IAD has one distribution per state, the
# same for every image, and the two states share the network and differ only in their free vector ξ.

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
# In 2-D the encoder's weights were scaled up so that the picture shows something. The kit initialises them at
# N(0, 0.02²), as the released code does, which makes $q_0 \approx \mathcal{N}(0, I)$ for every ξ at the start of
# training. Whether the distributions then come to depend on the image (ISD) and on the state (IAD) is up to
# training. The next section looks at the trained model.
#
# ## 7 · The trained model's prompt distributions
#
# In the model, the context flow (ISD) receives $\xi = \mathbf{x} = \mathbf{x}_{cls} + \mathbf{x}_{patch}$ of each
# image. The two state flows (IAD) share one encoder and one planar stack, and each receives its own free vector.
# The model is fast mode's main model from the training cache (`S.train_or_load()`: trained once by the first
# notebook that asks, loaded afterwards).
#
# Four diagnostics ask whether a distribution depends on its input. They come from variational autoencoders,
# where a posterior that ignores its input is called **posterior collapse**:
#
# 1. **spread of μ over the inputs**: the standard deviation of $\mu_c(\xi)$ over the inputs (16 training images
#    for the ISD; ξ_n and ξ_a for the IAD), averaged over the dimensions c. Compare it with σ, the width of the
#    noise: a spread far below σ means that the samples hardly depend on the input;
# 2. **live hidden units**: the fraction of the μ network's second hidden layer whose Softplus is not flat. Below a
#    pre-activation of −5, Softplus's slope is under 0.007: the unit passes neither signal nor gradient;
# 3. **active dimensions** (Burda et al., 2016): the dimensions whose $\mu_c$ varies over the inputs with a variance
#    above 0.01;
# 4. **KL(q₀ ‖ N(0, I)) per dimension** in closed form, averaged over the inputs: how far q₀ is from the prior.
#
# Each is computed for the trained model and for the same model at its initialisation (`S.new_model()`, the
# weights that this training started from).

# %%
from bpfl.data import collate

T = S.train_or_load()
model = T.model.eval()
untrained = S.new_model().eval()          # the initialisation the training started from (same seed)
aux = S.aux_dataset()
probe_idx = list(range(0, len(aux), max(1, len(aux) // 16)))[:16]   # 16 training images, every category
probe = collate([aux[i] for i in probe_idx])
with torch.no_grad():
    probe_feats = S.backbone.encode_image(probe["image"])


def hidden_preactivations(encoder, xi):
    """Pre-activations of the μ network's second hidden layer (its Linear 2, before the Softplus)."""
    return encoder.mean_net[2](F.softplus(encoder.mean_net[0](xi)))


def flow_inputs(m):
    """ξ of the ISD (the probe images' x) and of the IAD (ξ_n, ξ_a), with the encoder each goes through."""
    with torch.no_grad():
        x = m.global_embedding(probe_feats, m.project_patches(probe_feats))
    return {"ISD (context)": (m.context_flow.encoder, x),
            "IAD (states)": (m.normal_flow.encoder, torch.cat([m.normal_xi, m.abnormal_xi]).detach())}


@torch.no_grad()
def flow_diagnostics(m):
    out = {}
    for name, (enc, xi) in flow_inputs(m).items():
        mu, log_var = enc(xi)
        kl_per_dim = 0.5 * (log_var.exp() + mu ** 2 - 1 - log_var)      # [inputs, D]
        out[name] = {"spread of μ over the inputs": float(mu.std(0).mean()),
                     "mean σ": float((0.5 * log_var).exp().mean()),
                     "live hidden units": float((hidden_preactivations(enc, xi) > -5).float().mean()),
                     "active dimensions": f"{int((mu.var(0) > 0.01).sum())} of {mu.shape[1]}",
                     "KL(q0‖N(0,I)) per dimension": float(kl_per_dim.mean())}
    return out


diag = {"initialisation": flow_diagnostics(untrained), "trained": flow_diagnostics(model)}
table = pd.concat({when: pd.DataFrame(d) for when, d in diag.items()}, axis=1).swaplevel(axis=1).sort_index(axis=1)
# check: the μ of the ISD seen by the diagnostics is the μ the model's own sampling path uses (PromptFlow.forward)
with torch.no_grad():
    enc, x_probe = flow_inputs(model)["ISD (context)"]
    drawn = model.context_flow(x_probe, n_samples=2, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(drawn.mu.std(0).mean(), torch.tensor(diag["trained"]["ISD (context)"]["spread of μ over the inputs"]))
assert model.abnormal_flow.encoder is model.normal_flow.encoder and model.abnormal_flow.flow is model.normal_flow.flow
display(table)
for name in ("ISD (context)", "IAD (states)"):
    d = diag["trained"][name]
    ratio = d["spread of μ over the inputs"] / d["mean σ"]
    verdict = ("COLLAPSED: the samples do not depend on the input" if ratio < 0.01 and d["live hidden units"] < 0.5
               else "nearly input-independent" if ratio < 0.05 else "depends on its input")
    print(f"{name}: spread/σ = {ratio:.1e}, live hidden units {d['live hidden units']:.0%} -> {verdict}")

# %% [markdown]
# Read the table row by row, comparing the two columns of each flow, and the verdicts printed below it. At
# initialisation μ already varies little over the inputs (the encoder's small weights shrink the differences of
# ξ), but every hidden unit is alive, so training *could* make the distributions depend on their input. The
# trained column answers whether it did. When the verdict says COLLAPSED, the μ network's hidden units are dead:
# its output is its last bias, the same μ for every image (ISD) and for both states (IAD). The distributions have
# become $q_0 \approx \mathcal{N}(\mathbf{b}, \sigma^2 I)$ with one constant $\mathbf{b}$, and the flows then add
# noise that knows nothing about the image or the state.
#
# The figure shows what that means for the prompts. **Left**: R = 64 flow samples of the four images, in the
# plane of their first two principal components: context samples coloured by image, state samples by state.
# **Middle**: the text embeddings of the prompts built from the same samples (Eq. 8-9), projected on the
# direction from the mean normal to the mean abnormal embedding (x) and on the main remaining direction (y).
# **Right**: the pre-activations of the μ networks' hidden units, at initialisation and after training; below
# −5 (shaded) a Softplus unit is flat.

# %%
idx = [aux.by_category()[c][-1] for c in aux.categories]     # one image per seen category
batch = collate([aux[i] for i in idx])
R = 64
with torch.no_grad():
    feats = model.backbone.encode_image(batch["image"])
    x = model.global_embedding(feats, model.project_patches(feats))
    phis, _ = model.sample_prompts(feats, x, n_samples=R, generator=torch.Generator().manual_seed(0))
    text = model.encode_prompts(batch["class_name"], phis)     # [N, 2 states, R, B, C]
N, B = len(idx), text.shape[3]
assert phis["context"].shape == (R, N, model.prompts.context.shape[-1]) and text.shape[:3] == (N, 2, R)


def top_directions(points, first=None):
    """2-D coordinates: ``first`` (a unit vector) or the first principal axis, then the next principal axis."""
    centred = points - points.mean(0)
    if first is not None:
        rest = centred - (centred @ first)[:, None] * first
        return torch.stack([centred @ first, rest @ torch.linalg.svd(rest, full_matrices=False)[2][0]], -1)
    v = torch.linalg.svd(centred, full_matrices=False)[2]
    return centred @ v[:2].T


fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
# left: the flow samples
D_prompt = phis["context"].shape[-1]
everything = torch.cat([phis["context"].reshape(-1, D_prompt), phis["normal"].reshape(-1, D_prompt),
                        phis["abnormal"].reshape(-1, D_prompt)])
xy = top_directions(everything)
k = R * N
image_colours = plt.cm.viridis(np.linspace(0.0, 0.85, N))
for i in range(N):
    pts = xy[:k].reshape(R, N, 2)[:, i]
    axes[0].scatter(pts[:, 0], pts[:, 1], s=6, color=image_colours[i], alpha=0.6, label=f"φᵉ (ISD), {batch['class_name'][i]}")
axes[0].scatter(xy[k:2 * k, 0], xy[k:2 * k, 1], s=6, color="tab:blue", alpha=0.35, label="φⁿ (IAD, normal)")
axes[0].scatter(xy[2 * k:, 0], xy[2 * k:, 1], s=6, color="tab:red", alpha=0.35, label="φᵃ (IAD, abnormal)")
axes[0].set_title("flow samples φ (2 principal components)")
axes[0].legend(fontsize=7, markerscale=2, loc="upper right")
# middle: the text embeddings of the sampled prompts, by state
tn, ta = text[:, 0].reshape(-1, text.shape[-1]), text[:, 1].reshape(-1, text.shape[-1])
state_axis = F.normalize(ta.mean(0) - tn.mean(0), dim=0)
xy2 = top_directions(torch.cat([tn, ta]), first=state_axis)
n_t = tn.shape[0]
axes[1].scatter(xy2[:n_t, 0], xy2[:n_t, 1], s=5, color="tab:blue", alpha=0.35, label="normal prompts tⁿ")
axes[1].scatter(xy2[n_t:, 0], xy2[n_t:, 1], s=5, color="tab:red", alpha=0.35, label="abnormal prompts tᵃ")
axes[1].set_xlabel("along mean(tᵃ) − mean(tⁿ)"); axes[1].set_ylabel("main remaining direction")
axes[1].set_title(f"text embeddings of the sampled prompts ({N} images × R={R} × B={B})")
axes[1].legend(fontsize=7, markerscale=2)
# right: hidden pre-activations, one box per flow and state of training
boxes, names = [], []
for name in ("ISD (context)", "IAD (states)"):
    for when, m in (("init", untrained), ("trained", model)):
        enc, xi = flow_inputs(m)[name]
        with torch.no_grad():
            boxes.append(hidden_preactivations(enc, xi).flatten().numpy())
        names.append(f"{name.split()[0]}\n{when}")
axes[2].axhspan(min(-6.0, min(float(b.min()) for b in boxes) - 2), -5, color="0.85", zorder=0,
                label="Softplus flat (< −5)")
axes[2].boxplot(boxes, showfliers=False, whis=(0, 100))
axes[2].set_xticks(range(1, len(names) + 1), names)
axes[2].set_ylabel("pre-activation of a hidden unit")
axes[2].set_title("μ networks' hidden units (box: quartiles, whiskers: range)")
axes[2].legend(fontsize=7, loc="lower left")
fig.tight_layout()
S.save(fig, "isd_vs_iad_model")
plt.show()

sep = (xy2[n_t:, 0].mean() - xy2[:n_t, 0].mean()) / torch.cat([xy2[:n_t, 0] - xy2[:n_t, 0].mean(), xy2[n_t:, 0] - xy2[n_t:, 0].mean()]).std()
print(f"middle panel: the normal and abnormal clouds are {float(sep):.1f} standard deviations apart along x")

# %% [markdown]
# How to read it. Left: if the context samples of the four images lie on top of each other, and the normal and
# abnormal samples too, the flows ignore their inputs, as the table said. Middle: the prompts still separate
# by state, and the printed line gives by how much: the normal and abnormal *bank vectors* differ (notebook 01),
# and that difference survives the noise that the flows add. The groups along y are the B prompt pairs. So
# in the collapsed model the distinction between normal and abnormal lives in the banks alone, and the
# "Bayesian" part acts as noise injection around them. Right: trained units far below −5 are the dead units.
#
# **This disagrees with the paper**:
#
# > to introduce rich visual semantics into the text prompts, ISD is learned through prompt flow to model the
# > context words, dynamically adapting based on the input image. — §1
#
# > Notably, omitting ISD results in a greater performance drop than omitting IAD in all metrics, indicating that
# > context distribution modeling conditioned on the image has a greater impact on generalization ability. — §4.4
#
# A collapsed ISD adapts to nothing, so fast mode cannot show that mechanism (notebook 05 measures the kit's
# "w/o ISD" row of Table 2). Why it collapsed, and which differences from the paper's setting are to blame, is the
# next section.
#
# ## 8 · Why the distributions collapse: the first training steps
#
# The flow terms of Eq. 7 pull every $q_K$ towards the prior $\mathcal{N}(0, I)$. For q₀'s mean, the pull is
# towards μ = 0 *for every input*, and an encoder whose hidden units are all off outputs the same μ for every
# input. The cell below follows the first steps of training from the same initialisation, and records before each
# step the fraction of live hidden units of the ISD's μ network and the spread of μ over the 16 probe images. It
# compares fast mode's setting (Adam at lr 1e-2, every KL term at weight 1 as Eq. 14 has it) with two changes,
# one at a time: the released code's KL weight 0.01, and a 10× smaller learning rate. It also measures which way
# the KL term alone pushes the weights of the μ network's middle layer at initialisation.

# %%
from bpfl.notebook.tables import record_first_steps


def isd_probe(m):
    with torch.no_grad():
        enc, xi = flow_inputs(m)["ISD (context)"]
        mu, _ = enc(xi)
        return {"live hidden units": float((hidden_preactivations(enc, xi) > -5).float().mean()),
                "spread of μ": float(mu.std(0).mean())}


# which way does the KL term alone push the middle layer at initialisation? (closed form, the probe images)
fresh = S.new_model()
enc, xi = flow_inputs(fresh)["ISD (context)"]
mu, log_var = enc(xi)
(0.5 * (log_var.exp() + mu ** 2 - 1 - log_var).sum(-1).mean()).backward()
grad = enc.mean_net[2].weight.grad
print(f"KL gradient on the middle layer's weights at initialisation: {float((grad > 0).float().mean()):.0%} positive "
      f"(a step against the gradient lowers the pre-activations)")

n_steps = 24 if S.fast else 60
settings = {f"lr {cfg.lr:g}, KL weight {cfg.kl_weight:g} (fast mode)": {},
            f"lr {cfg.lr:g}, KL weight 0.01 (released code)": {"kl_weight": 0.01},
            f"lr {cfg.lr / 10:g}, KL weight {cfg.kl_weight:g}": {"lr": cfg.lr / 10}}
runs = {}
for label, change in settings.items():
    runs[label] = record_first_steps(S.new_model(cfg.replace(**change)), aux, n_steps, isd_probe)
first = {label: r["live hidden units"].iloc[0] for label, r in runs.items()}
assert len(set(first.values())) == 1, "all runs must start from the same initialisation"

fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
for (label, r), col in zip(runs.items(), ("C3", "C1", "C0")):
    axes[0].plot(r["step"], 100 * r["live hidden units"], marker=".", color=col, label=label)
    axes[1].plot(r["step"], r["spread of μ"], marker=".", color=col, label=label)
axes[0].set_ylabel("live hidden units (%)"); axes[1].set_ylabel("spread of μ over 16 images")
axes[1].set_yscale("log")
for ax in axes:
    ax.set_xlabel("training step (before its update)")
axes[0].legend(fontsize=8)
axes[0].set_title("ISD μ network: hidden units alive"); axes[1].set_title("ISD: how much μ depends on the image")
fig.tight_layout()
S.save(fig, "collapse_first_steps")
plt.show()
for label, r in runs.items():
    dead = r.index[r["live hidden units"] < 0.05]
    when = f"all but <5 % of the units dead before step {int(r.loc[dead[0], 'step'])}" if len(dead) else \
        f"{r['live hidden units'].iloc[-1]:.0%} of the units alive after {n_steps} steps"
    print(f"{label:45s}: {when}; largest spread of μ {r['spread of μ'].max():.3f} (step {int(r.loc[r['spread of μ'].idxmax(), 'step'])})")

# %% [markdown]
# Read the two panels with the printed lines:
#
# - **The cause is the size of the first Adam steps.** Adam's first updates are about lr × sign(gradient) for
#   every weight, whatever the gradient's size. The KL gradient is positive for most weights of the middle layer
#   (the printed share), because the Softplus outputs feeding them are all positive. So at lr 1e-2 the
#   pre-activations fall by a large amount per step, all together, until they pass −5 and the Softplus units go
#   flat. A flat unit gets no gradient, so it never comes back: the collapse is permanent.
# - **The KL weight changes when, not whether.** At the released code's weight 0.01, the data terms (which do want
#   image-specific context: watch the spread of μ rise first) hold out for a few more steps, then the units die
#   as well, because Adam normalises each parameter's gradient and a smaller weight does not make the steps
#   smaller. (A full 30-epoch run at weight 0.01 ends collapsed too, measured while writing this notebook.)
# - **A smaller learning rate keeps the units alive**, and μ starts to depend on the image, slowly.
#
# Why the paper does not collapse, as far as we can tell: it trains at lr 1e-4, and the released code trains the μ
# and σ encoders at 1e-4 with a 10 % warm-up (`group_lrs`, `cosine_schedule` in `SWITCHES`): steps 100× smaller
# than fast mode's 1e-2. Fast mode needs the large steps because it trains on 80 images for a few minutes on a CPU.
# One full 30-epoch run at lr 1e-3, made while writing this notebook, transferred no better to the unseen
# categories and still ended with μ almost the same for every image, so this notebook keeps fast mode's
# collapsed model and teaches the diagnosis. The toy CLIP and the
# four seen categories matter too: with so little variety, image-specific context has little to gain. Remedies known
# from VAEs are KL annealing (a KL weight that grows from 0 during training), "free bits" (no KL penalty below a
# floor per dimension) and a smaller learning rate for the encoders; exercise 5 tries the last one.

# %% [markdown]
# ## Summary
#
# - Eq. 6 is the change of variables for K planar steps: each step adds −log|1 + uᵀψ| to log q. The kit's log-det matches autograd, and its density matches a histogram and integrates to 1.
# - More steps give more complex densities. The K slider shows this, and the paper uses K = 10.
# - Without û a planar step can fold the plane, and Eq. 6 is then wrong. The kit uses û by default, while the released code uses the raw u.
# - ISD conditions q₀ on the image (context words). IAD conditions it on two free vectors with shared weights (state words), the same for every image.
# - Four numbers diagnose a collapsed distribution: the spread of μ over the inputs against σ, the live hidden units, the active dimensions and the KL per dimension. In fast mode the trained model's distributions collapse: Adam's first steps at lr 1e-2 push the μ networks' Softplus units into their flat range, where they stay. The normal/abnormal distinction then lives in the prompt banks alone. This is a difference from the paper (lr 1e-4), not a property of Bayes-PFL.

# %% [markdown]
# ## Exercises

# %% [markdown] tags=["exercise"]
# **Exercise 1.** `demo_flow_2d` was given a seed whose mass stays inside the [−4.5, 4.5]² window up to K = 12.
# Find seeds where it does not (at K = 12, on a coarser 60 × 60 grid to be quick). Which assertion of §3 would
# catch them, and why is a density that "leaks" out of the window not wrong?

# %% tags=["solution"]
coarse, coarse_area = nb.grid_2d(60, 4.5)
leaky = {}
for seed in range(12):
    k_flow = nb.demo_flow_2d(k_max=12, seed=seed)
    mass = float(nb.flow_density_2d(k_flow, coarse).sum() * coarse_area)
    if mass < 0.98:
        leaky[seed] = round(mass, 3)
print("seeds whose density keeps less than 98 % of its mass inside the window:", leaky or "none of 0-11")
assert abs(float(nb.flow_density_2d(nb.demo_flow_2d(k_max=12, seed=2), coarse).sum() * coarse_area) - 1) < 0.02

# ANSWER. assert abs(mass - 1) < 0.02 in §3 catches them. The density is not wrong there: Eq. 6 is exact at every
# point, but the grid only covers [−4.5, 4.5]², and ∫q over the window is below 1 when some samples land outside it.
# The histogram test would still pass, since the histogram loses the same mass.

# %% [markdown] tags=["exercise"]
# **Exercise 2.** In §5, set `u = [−0.2, 0.8]` (so that w·u = −0.6). Does the raw step still fold? What does û
# change then?

# %% tags=["solution"]
w2 = torch.tensor([3.0, 0.0], dtype=torch.float64)
u2 = torch.tensor([-0.2, 0.8], dtype=torch.float64)
b2 = torch.tensor(0.3, dtype=torch.float64)
u2_hat = constrain_u(u2, w2)
raw_along = alpha + float(w2 @ u2) * torch.tanh(alpha + b2)
print(f"w·u = {float(w2 @ u2):.3f}, w·û = {float(w2 @ u2_hat):.3f}, û - u = {(u2_hat - u2).numpy().round(4)}")
print("raw step monotone along w:", bool((np.diff(raw_along.numpy()) > 0).all()))
assert (np.diff(raw_along.numpy()) > 0).all() and float(w2 @ u2_hat) > -1

# ANSWER. No: with w·u = −0.6 > −1 the raw step is already invertible. û still differs from u: the
# reparameterisation maps w·u to m(w·u) = −1 + log(1 + e^{w·u}) for every u, not only for the folding ones, so it
# moves u along w (here from −0.6 to about −0.56). The constraint is a change of parameters, not a correction
# applied only when needed; training learns u with û in place, so this costs nothing.

# %% [markdown] tags=["exercise"]
# **Exercise 3.** With u = 0 a planar step should be the identity, and Eq. 6 should reduce to log q₀. Check it
# numerically with `planar_step`, with the raw u (`constrained=False`) and with û (the kit's default). Is the
# kit's step with u = 0 the identity? Which u gives the identity under the constraint?

# %% tags=["solution"]
w3 = torch.tensor([1.5, -0.5], dtype=torch.float64)
b3 = torch.tensor(0.2, dtype=torch.float64)
z3 = torch.randn(1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
zero = torch.zeros(2, dtype=torch.float64)
out_raw, ld_raw = planar_step(z3, zero, w3, b3, constrained=False)
out_hat, ld_hat = planar_step(z3, zero, w3, b3, constrained=True)
print("raw u = 0: identity", torch.allclose(out_raw, z3), "| max |log det|", float(ld_raw.abs().max()))
print("û(u = 0) =", constrain_u(zero, w3).numpy().round(4), "-> identity:", torch.allclose(out_hat, z3))
u_id = np.log(np.e - 1) * w3 / (w3 @ w3)          # w·u = log(e - 1), so m(w·u) = 0 and û = 0
out_id, ld_id = planar_step(z3, u_id, w3, b3, constrained=True)
print("u = log(e-1)·w/‖w‖²: û =", constrain_u(u_id, w3).numpy().round(12), "-> identity:", torch.allclose(out_id, z3))
assert torch.allclose(out_raw, z3) and float(ld_raw.abs().max()) < 1e-4   # log(|1| + 1e-5): the released ε
assert not torch.allclose(out_hat, z3) and torch.allclose(out_id, z3) and float(ld_id.abs().max()) < 1e-12

# ANSWER. With the raw u, u = 0 is the identity and every log-det is log(1 + 10⁻⁵) ≈ 10⁻⁵ (the released code's ε),
# so Eq. 6 gives log q₀ up to that ε. With û it is not: m(0) = −1 + log 2 ≈ −0.31, so û(0) = −0.31·w/‖w‖² ≠ 0 and
# the step still bends the space. The identity under the constraint is u = log(e − 1)·w/‖w‖² (then w·u = log(e − 1),
# m(w·u) = 0 and û = 0). Initialising u and w near 0, as the kit does, therefore does not start the flow at the
# identity; that is harmless, since each step is invertible and its density exact.

# %% [markdown] tags=["exercise"]
# **Exercise 4.** The table of §7 printed the spread of μ over the inputs at initialisation. Where does the
# image dependence of the *initial* ISD get lost? Follow the 16 probe images through the μ network of the untrained
# model: the spread over the images of ξ = x, of the first hidden layer, of the second, and of μ.

# %% tags=["solution"]
enc0, xi0 = flow_inputs(untrained)["ISD (context)"]
with torch.no_grad():
    h1 = F.softplus(enc0.mean_net[0](xi0))
    h2 = F.softplus(enc0.mean_net[2](h1))
    mu0 = enc0.mean_net[4](h2)
stages = {"ξ = x (input)": xi0, "hidden 1 (after Softplus)": h1, "hidden 2 (after Softplus)": h2, "μ (output)": mu0}
spread = pd.Series({k: float(v.std(0).mean()) for k, v in stages.items()}, name="spread over the 16 images")
print(spread.round(5))
assert torch.allclose(mu0, enc0(xi0)[0], atol=1e-6) and spread.iloc[-1] < spread.iloc[0]

# ANSWER. Each Linear layer with weights of std 0.02 multiplies a difference between images by roughly
# 0.02·√(width), well below 1 here, so after three layers the spread of μ is a small fraction of that of x (the
# printed column). At initialisation the ISD is therefore almost image-agnostic, which is the released code's choice
# too (its Linears are initialised the same way). Training must grow the image dependence, and the first steps of §8
# decide whether it gets the chance.

# %% [markdown] tags=["exercise"]
# **Exercise 5.** Run the probe of §8 with the released code's learning rates (`group_lrs=True`: the μ/σ
# encoders at 1e-4, the flows and free vectors at 1e-3, the prompts at 1e-3). Do the hidden units survive the
# first steps? Does μ start to depend on the image?

# %% tags=["solution"]
released_run = record_first_steps(S.new_model(cfg.replace(group_lrs=True)), aux, n_steps, isd_probe)
print(released_run[["step", "live hidden units", "spread of μ"]].iloc[[0, n_steps // 2, n_steps - 1]].round(4))
fast_run = runs[list(runs)[0]]
print(f"after {n_steps} steps, live units: released lrs {released_run['live hidden units'].iloc[-1]:.0%} vs "
      f"fast mode {fast_run['live hidden units'].iloc[-1]:.0%}")
assert released_run["live hidden units"].iloc[-1] > fast_run["live hidden units"].iloc[-1]

# ANSWER. With the encoders at 1e-4 the pre-activations move 100× less per step, and every hidden unit is alive
# after these steps: no collapse, at least not yet. The spread of μ stays close to its initial, small value, because
# steps of 1e-4 also make the image dependence grow slowly. The paper's training has about 1 400 such steps (20
# epochs of VisA's ~2 200 test images at batch 32), fast mode's 600. Whether the ISD then becomes image-specific
# needs that full training, on a GPU.
