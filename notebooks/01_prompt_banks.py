# %% [markdown]
# # 01 · Two-class prompt banks (Eq. 1-2) and the orthogonal loss (Eq. 13)
#
# Teaching notebook of **bpfl**, the kit for *Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection* (Qu et al., CVPR 2025).
#
# **Learning goals**
#
# - build the normal and abnormal prompt banks and find where their learned vectors are spliced into the token sequence
# - encode one prompt **by hand** and check that it equals the kit's batched encoder
# - read the similarity matrix of the bank's text embeddings
# - see what the orthogonal loss $\mathcal{L}_{ort}$ (Eq. 13) does to that matrix in a few steps
# - read the banks of the trained model, and compare them with hand-written prompts
#
# **Runtime**: fast mode 49 s in the committed cold-start run (`benchmarks/results/notebook_times.md`: all seven
# notebooks in order on a 2-core CPU, kernel start included), training the main model
# included: this notebook is the first to ask for it, and every later notebook loads it from the cache (so a second
# run is shorter). Paper mode (a GPU and the OpenAI weights, plus the main training if no notebook has cached it)
# was not timed here.
#
# **Mode switch**: set `MODE` in the setup cell below (`"fast"` or `"paper"`), or the environment variable
# `BPFL_MODE`. Fast mode (the default) runs on the kit's **bundled toy CLIP** (notebook 00): its text encoder was
# pretrained on captions of synthetic surfaces, so it knows words like "damaged" or "striped", and little else.
# `BPFL_FAST_BACKBONE=tiny` asks for the random-weight `bpfl-tiny` instead (mechanics only). The banner printed
# by the setup cell says which backbone runs, and why.

# %%
# ---- setup: the only cell to edit ------------------------------------------------------------
MODE = None  # None: $BPFL_MODE, else "fast" (CPU minutes). "paper": ViT-L-14-336/openai at 518 px (GPU advised)

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from bpfl.prompts import PromptBanks, class_tokens, encode_prompts, prompt_class_name
from bpfl import notebook as nb

S = nb.setup("01_prompt_banks", mode=MODE)  # banner, seed, plotting style, results folder
cfg = S.config

# %% [markdown]
# ## 1 · The banks
#
# > the manually designed context and state words are replaced with learnable vectors. Inspired by Compositional
# > Prompt Ensemble, normal and abnormal prompt banks are further constructed to expand the prompt space, with each
# > containing B distinct trainable prompts: — §3.2
#
# $$g_b^n = [\mathbf{E}_{b,1}][\mathbf{E}_{b,2}] \cdots [\mathbf{E}_{b,P}][\mathbf{S}_{b,1}^n] \cdots [\mathbf{S}_{b,Q}^n][\text{class}] \quad (1)$$
#
# $$g_b^a = [\mathbf{E}_{b,1}][\mathbf{E}_{b,2}] \cdots [\mathbf{E}_{b,P}][\mathbf{S}_{b,1}^a] \cdots [\mathbf{S}_{b,Q}^a][\text{class}] \quad (2)$$
#
# Both banks share the $P$ context vectors $\mathbf{E}_b$ and differ only in their $Q$ state vectors. Each vector
# lives in the *word-embedding* space of CLIP's text encoder, whose width is $D$ (768 for ViT-L-14-336, 64 for the
# toy CLIP). The paper writes $\mathbb{R}^C$; for ViT-L/14 the text width, 768, is also the joint width $C$.
# The paper uses $B = 3$ and $P = Q = 5$.

# %%
D = S.backbone.text_width
torch.manual_seed(0)
banks = PromptBanks(cfg.n_prompts, cfg.n_context, cfg.n_state, D, cfg.prompt_init_std, cfg.state_init_mean)
B, P, Q = banks.n_prompts, banks.n_context, banks.n_state
for name, p in banks.named_parameters():
    print(f"{name:15s} {tuple(p.shape)}")
assert banks.context.shape == (B, P, D) and banks.state_normal.shape == banks.state_abnormal.shape == (B, Q, D)
print(f"{sum(p.numel() for p in banks.parameters())} learnable numbers; the paper's setting: B=3, P=Q=5, D=768 -> {3 * (5 + 5 + 5) * 768}")

# %% [markdown]
# ## 2 · Where the vectors are spliced
#
# The class words come from the tokenizer. The kit tokenises `"X " + class name`, and the P + Q learned vectors
# replace the placeholder `X` at position 1, right after the start token, which is where the released code splices
# them. Category folder names become words first (`woven_fabric` → `woven fabric`, `metal_nut` → `metal nut`,
# `pcb3` → `printed circuit board`). The example is `woven_fabric`, one of the unseen categories: at test time
# its words go into the prompts although no image of it was trained on.

# %%
category = "woven_fabric"
words = prompt_class_name(category)
ids = S.backbone.tokenize(["X " + words])[0]
eot = int(S.backbone.eot_positions(ids[None])[0])
decoder = getattr(S.backbone.tokenizer, "decoder", {})
tokens = [decoder.get(int(t), str(int(t))) for t in ids[: eot + 1]]
print(f"{category!r} -> {words!r} -> tokens {tokens}")

layout = (["[SOT]"] + [f"[E_b,{i + 1}]" for i in range(P)] + [f"[S_b,{j + 1}]" for j in range(Q)]
          + [t.replace("</w>", "") for t in tokens[2:eot]] + ["[EOT]"])
print("prompt g_b:", " ".join(layout))
assert tokens[1].startswith("x") and len(layout) == eot + P + Q

# %% [markdown]
# ### The lesson: one prompt by hand
#
# `encode_prompts` encodes all 2·B·R prompts of a batch in a single text pass. For a single prompt, the same work
# reads as: concatenate [SOT], the P context vectors, the Q state vectors, and the class-word embeddings up to EOT,
# then run CLIP's text transformer and take the feature at EOT. Here φ = 0 (no flow samples yet; notebook 02
# adds them, Eq. 8-9).

# %%
tok = class_tokens(S.backbone, [category])
learned = banks.fuse(None, None, None)          # [N=1, 2 banks, R=1, B, P+Q, D]; index 1 = abnormal bank
kit = encode_prompts(S.backbone, learned, tok)  # [1, 2, 1, B, C], unit norm

b = 0  # the abnormal prompt g_b^a of Eq. 2, built by hand
with torch.no_grad():
    seq = torch.cat([tok.sot[0], banks.context[b], banks.state_abnormal[b], tok.rest[0]], dim=0)[None, : S.backbone.context_length]
    eot_by_hand = tok.eot + P + Q - 1               # the X (one token) became P + Q tokens
    by_hand = F.normalize(S.backbone.encode_token_embeddings(seq, eot_by_hand), dim=-1)[0]
print("by hand:", by_hand[:5].numpy().round(4))
print("kit    :", kit[0, 1, 0, b, :5].detach().numpy().round(4))
assert torch.allclose(by_hand, kit[0, 1, 0, b], atol=1e-5), "hand-built prompt differs from bpfl.prompts.encode_prompts"


# %% [markdown]
# ## 3 · The text embeddings of the banks
#
# The banks yield B normal and B abnormal text embeddings per class, written $\mathbf{t}^n_b$ and $\mathbf{t}^a_b$.
# At initialisation all learned vectors are tiny (std 0.02, far below the norm of a real word embedding), so
# every prompt reads almost like `"[SOT] <nothing> woven fabric"`. The 2B embeddings are then nearly the same
# vector, and all their cosine similarities are close to 1.

# %%
def bank_similarity(banks, tok=tok):
    """Cosine similarities of the 2B text embeddings of one class (φ = 0): [2B, 2B], rows n1..nB, a1..aB."""
    t = encode_prompts(S.backbone, banks.fuse(None, None, None), tok)[0, :, 0]  # [2, B, C]
    flat = t.reshape(2 * B, -1)
    return (flat @ flat.T).detach().cpu().numpy(), t


def block_means(sim):
    """Mean off-diagonal cosine within the normal bank, within the abnormal bank, and between the banks."""
    off = ~np.eye(B, dtype=bool)
    return {"normal-normal": float(sim[:B, :B][off].mean()), "abnormal-abnormal": float(sim[B:, B:][off].mean()),
            "normal-abnormal": float(sim[:B, B:].mean())}


labels = [f"n{b + 1}" for b in range(B)] + [f"a{b + 1}" for b in range(B)]
sim0, t0 = bank_similarity(banks)
assert np.allclose(np.diag(sim0), 1, atol=1e-5)
print("mean cosine at initialisation:", {k: round(v, 4) for k, v in block_means(sim0).items()})
assert min(block_means(sim0).values()) > 0.9, "at initialisation the prompts should be nearly identical"

# %% [markdown]
# ## 4 · The orthogonal loss
#
# > Note that we enforce orthogonality among the text embeddings generated from the same prompt bank, promoting
# > diversity in the normal or anomalous semantics captured by different prompts. — §3.2
#
# $$\mathcal{L}_{ort} = \sum_{i=1}^B \sum_{j=1, j \neq i}^B \{(\langle \mathbf{t}_{i,1}^n, \mathbf{t}_{j,1}^n \rangle)^2 + (\langle \mathbf{t}_{i,1}^a, \mathbf{t}_{j,1}^a \rangle)^2\} \quad (13)$$
#
# > in which $\langle \cdot, \cdot \rangle$ denotes the cosine similarity. — §3.6
#
# The loss compares only prompts *within* a bank (normal with normal, abnormal with abnormal). Whether the
# normal and abnormal banks separate is the job of the classification and segmentation losses (notebook 03). The
# released code averages over all B×B entries, counting the zero diagonal, so its value is Eq. 13 divided by B².
# That is the `ort_reduction` switch.

# %%
from bpfl.losses import orthogonal_loss

def l_ort_by_hand(tn, ta):  # Eq. 13 literally, for one image: tn, ta [B, C]
    total = 0.0
    for i in range(B):
        for j in range(B):
            if i != j:
                total += F.cosine_similarity(tn[i], tn[j], dim=0) ** 2 + F.cosine_similarity(ta[i], ta[j], dim=0) ** 2
    return total

tn, ta = t0[0].detach(), t0[1].detach()
kit_sum = orthogonal_loss(tn[None], ta[None])
kit_released = orthogonal_loss(tn[None], ta[None], reduction="mean_with_diagonal")
print(f"by hand {float(l_ort_by_hand(tn, ta)):.5f} | kit (paper) {float(kit_sum):.5f} | kit (released) x B^2 {float(kit_released) * B * B:.5f}")
assert torch.allclose(l_ort_by_hand(tn, ta), kit_sum, atol=1e-5)
assert torch.allclose(kit_released * B * B, kit_sum, atol=1e-5)

# %% [markdown]
# ### A few steps of $\mathcal{L}_{ort}$ alone
#
# In training, $\mathcal{L}_{ort}$ is one term of Eq. 14. Here it is the only term, optimised by Adam, so that its
# effect shows on its own. The two matrices share one colour scale (−1 to 1, the colorbar).

# %%
import copy

banks_init = copy.deepcopy(banks)   # kept for the exercises
steps = 40 if S.fast else 150
opt = torch.optim.Adam(banks.parameters(), lr=1e-2)
curve = []
for _ in range(steps):
    t = encode_prompts(S.backbone, banks.fuse(None, None, None), tok)[0, :, 0]
    loss = orthogonal_loss(t[0][None], t[1][None])
    opt.zero_grad(); loss.backward(); opt.step()
    curve.append(float(loss))
sim1, _ = bank_similarity(banks)
before, after = block_means(sim0), block_means(sim1)
pair_cos = np.diag(sim1[:B, B:])            # cos(t^n_b, t^a_b): the two prompts of one pair b
print(f"L_ort: {curve[0]:.4f} -> {curve[-1]:.4f} after {steps} Adam steps")
print(pd.DataFrame({"at initialisation": before, f"after {steps} steps of L_ort": after}).round(3))
print("cosine of the two prompts of each pair b (n_b, a_b):", pair_cos.round(3))
assert curve[-1] < curve[0], "L_ort did not decrease"

import seaborn as sns
fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), gridspec_kw={"width_ratios": [1, 1.2, 1.1]})
for ax, sim, title, bar in ((axes[0], sim0, "at initialisation", False), (axes[1], sim1, f"after {steps} steps of L_ort", True)):
    sns.heatmap(sim, ax=ax, vmin=-1, vmax=1, cmap="RdBu_r", annot=True, fmt=".2f", xticklabels=labels,
                yticklabels=labels, cbar=bar, cbar_kws={"label": "cosine similarity"}, annot_kws={"size": 7})
    ax.set_title(f"text embeddings of '{words}', {title}")
axes[2].plot(np.arange(1, steps + 1), curve); axes[2].set_xlabel("Adam step"); axes[2].set_ylabel("L_ort (Eq. 13)")
axes[2].set_yscale("log"); axes[2].set_title("the orthogonal loss alone")
fig.tight_layout()
S.save(fig, "bank_similarity_ort")
plt.show()

# %% [markdown]
# Compare the two matrices with the table printed above them. The loss sees only the two within-bank blocks
# (n×n and a×a), and their off-diagonal entries move towards 0. The n×a block is not in Eq. 13, yet it moves
# too, because $\mathbf{t}^n_b$ and $\mathbf{t}^a_b$ share their context vectors $\mathbf{E}_b$: pulling the
# normal prompts apart drags the abnormal prompts of the same b along. The diagonal of the n×a block (the pairs
# n_b, a_b, printed last) stays where it started, near 1, while the other entries of that block fall: nothing in
# Eq. 13 tells a normal prompt from its abnormal partner, and their state vectors started almost equal.

# %% [markdown]
# ## 5 · The banks after training
#
# What do the banks look like in the model that was trained with the whole of Eq. 14 (notebook 03 explains the
# training)? `S.train_or_load()` returns the main model of fast mode: it is trained once, by the first notebook
# that asks for it, and loaded from the cache afterwards. The matrix is again the banks at φ = 0 (the *means* of
# the prompt distributions, without flow samples), for the same unseen category.
#
# A second question: the toy CLIP's text encoder already understands hand-written prompts (notebook 00 used
# "a photo of a flawless surface." against "a photo of a damaged surface."). Did training find prompts near
# those? The right panel gives the cosine of each learned prompt with the two hand-written ones.

# %%
T = S.train_or_load()
trained = T.model.eval()
with torch.no_grad():
    sim_trained, t_trained = bank_similarity(trained.prompts)
    hand = F.normalize(S.backbone.encode_text([f"a photo of a flawless {words} surface.",
                                               f"a photo of a damaged {words} surface."]), dim=-1)   # [2, C]
    to_hand = (t_trained.reshape(2 * B, -1) @ hand.T).cpu().numpy()                              # [2B, 2]
trained_blocks = block_means(sim_trained)
print(pd.DataFrame({"at initialisation": before, "after training (Eq. 14)": trained_blocks}).round(3))
closest_n, closest_a = int(to_hand[:B, 0].argmax()), int(to_hand[B:, 1].argmax())
print(f"hand-written 'flawless' vs 'damaged' prompts: cosine {float(hand[0] @ hand[1]):.3f}")
print(f"learned prompt closest to 'flawless': n{closest_n + 1} (cosine {to_hand[closest_n, 0]:.3f}); "
      f"closest to 'damaged': a{closest_a + 1} (cosine {to_hand[B + closest_a, 1]:.3f})")
if closest_n == closest_a:
    b_hand = closest_n
    ordered = to_hand[b_hand, 0] > to_hand[B + b_hand, 0] and to_hand[B + b_hand, 1] > to_hand[b_hand, 1]
    print(f"-> pair {b_hand + 1} is the learned counterpart of the hand-written pair"
          + (" (its normal prompt nearer 'flawless', its abnormal prompt nearer 'damaged')" if ordered else ""))
else:
    print("-> no single pair matches both hand-written prompts")
assert np.allclose(np.diag(sim_trained), 1, atol=1e-5)
assert trained_blocks["normal-normal"] < before["normal-normal"], "training should have spread the normal bank"

fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0), gridspec_kw={"width_ratios": [1.35, 0.75]})
sns.heatmap(sim_trained, ax=axes[0], vmin=-1, vmax=1, cmap="RdBu_r", annot=True, fmt=".2f", xticklabels=labels,
            yticklabels=labels, cbar=False, annot_kws={"size": 7})
axes[0].set_title(f"trained banks, '{words}' (unseen): cosine similarity")
fig.suptitle("one colour scale for both panels (the colorbar)", fontsize=9)
sns.heatmap(to_hand, ax=axes[1], vmin=-1, vmax=1, cmap="RdBu_r", annot=True, fmt=".2f",
            xticklabels=["'flawless'", "'damaged'"], yticklabels=labels, cbar_kws={"label": "cosine similarity"},
            annot_kws={"size": 8})
axes[1].set_title("vs hand-written prompts")
fig.tight_layout()
S.save(fig, "trained_banks")
plt.show()

# %% [markdown]
# Read the table and the two matrices:
#
# - **Within each bank** the trained prompts are spread out (the first table compares the block means with the
#   initialisation): Eq. 13 did its job, together with everything else.
# - **Across the banks**, each normal prompt stays close to the abnormal prompt *of the same b* (the diagonal of
#   the n×a block): the pair shares its context vectors $\mathbf{E}_b$ and differs only in its Q state vectors.
#   Bayes-PFL compares $\mathbf{t}^n_b$ with $\mathbf{t}^a_b$ pair by pair (Eq. 11), so what matters is the
#   *difference* inside a pair, not the distance between pairs.
# - **Against the hand-written prompts**, the printed lines name the learned prompts closest to "flawless" and to
#   "damaged". When one pair lies close to both hand-written prompts, with its normal prompt nearer "flawless"
#   and its abnormal prompt nearer "damaged", training has rediscovered the hand-written wording inside the toy
#   CLIP's vocabulary; the other pairs, pushed away by Eq. 13, carry other directions. This reading holds for
#   this backbone: with the paper's CLIP the prompts have a far larger vocabulary to move in.

# %% [markdown]
# ## Summary
#
# - A prompt is [SOT][E₁…E_P][S₁…S_Q][class words][EOT]. E is shared by the two banks and S differs (Eq. 1-2).
# - The learned vectors take the place of one placeholder token, and all prompts are encoded in one batched text pass. A hand-built prompt gives the same embedding.
# - At initialisation the 2B prompts of a class are nearly identical. $\mathcal{L}_{ort}$ (Eq. 13) pushes the embeddings apart within each bank; the normal and abnormal prompts of one b stay close because they share E_b. The released code's variant is the same loss divided by B².
# - After training, the banks are spread within each bank, and the learned prompts can be compared with hand-written ones in CLIP's own embedding space.

# %% [markdown]
# ## Exercises

# %% [markdown] tags=["exercise"]
# **Exercise 1.** Change the category to `"pcb3"`. Which words go into the prompt, how many tokens do they take,
# and where does EOT move?

# %% tags=["solution"]
def prompt_layout(cat):
    w = prompt_class_name(cat)
    i = S.backbone.tokenize(["X " + w])[0]
    e = int(S.backbone.eot_positions(i[None])[0])
    return w, e - 2, e + P + Q - 1      # words, tokens of the words (between X and EOT), EOT after the splice

for cat in ("woven_fabric", "pcb3"):
    w, n_tok, eot_after = prompt_layout(cat)
    print(f"{cat!r}: words {w!r}, {n_tok} word tokens, EOT at position {eot_after} of the spliced prompt")
w, n_tok, eot_after = prompt_layout("pcb3")
assert w == "printed circuit board" and n_tok == 3 and eot_after == 1 + P + Q + n_tok

# %% [markdown] tags=["exercise"]
# **Exercise 2.** Initialise the states like the released code (`state_init_mean=0.5`, see `SWITCHES`: every entry
# of Sⁿ around +0.5, of Sᵃ around −0.5) and recompute the similarity matrix at initialisation. One would expect the
# n×a block to fall, since the two banks now start with opposite state vectors. Does it? Explain what you find
# (hint: what is the first operation of each block of CLIP's text transformer?).

# %% tags=["solution"]
torch.manual_seed(0)
banks_released = PromptBanks(cfg.n_prompts, cfg.n_context, cfg.n_state, D, cfg.prompt_init_std, state_init_mean=0.5)
sim_rel, t_rel = bank_similarity(banks_released)
table = pd.DataFrame({"kit init (mean 0)": block_means(sim0), "released init (±0.5)": block_means(sim_rel)}).round(4)
print(table)
print("largest difference between the two inits' text embeddings:", float((t_rel - t0).abs().max()))
# the reason: LayerNorm removes the mean over the D dimensions of every token, so a constant offset is invisible
x = torch.randn(3, D)
ln = torch.nn.LayerNorm(D)
print("LayerNorm(x + 0.5) == LayerNorm(x):", torch.allclose(ln(x + 0.5), ln(x), atol=1e-5))
assert torch.allclose(t_rel, t0, atol=1e-3) and torch.allclose(ln(x + 0.5), ln(x), atol=1e-5)

# ANSWER. Nothing changes: the embeddings are the same to float precision. The offset ±0.5 is the same number in
# every one of the D dimensions, and CLIP's text transformer is "pre-LN": each block reads its input through a
# LayerNorm, which subtracts the mean over the D dimensions of each token. A constant added to all dimensions of a
# token is removed there, in every block, and the final LayerNorm removes it once more. So the released code's ±0.5
# initialisation is invisible to the model at initialisation, and, because gradients see only what the function
# sees, it stays invisible during training (the flow samples φ are added on top and do not change this). The banks
# start apart only in the std-0.02 noise, exactly as with the kit's default.

# %% [markdown] tags=["exercise"]
# **Exercise 3.** Run the $\mathcal{L}_{ort}$ loop of §4 again from the same initialisation with
# `reduction="mean_with_diagonal"` (the released code's loss, Eq. 13 / B²) and the same learning rate. Is it B²
# times slower? Explain with how Adam scales its steps.

# %% tags=["solution"]
def run_ort(reduction, n_steps=20):
    bk = copy.deepcopy(banks_init)
    o = torch.optim.Adam(bk.parameters(), lr=1e-2)
    values = []
    for _ in range(n_steps):
        t = encode_prompts(S.backbone, bk.fuse(None, None, None), tok)[0, :, 0]
        loss = orthogonal_loss(t[0][None], t[1][None], reduction=reduction)
        o.zero_grad(); loss.backward(); o.step()
        values.append(float(orthogonal_loss(t[0][None], t[1][None]).detach()))  # always report Eq. 13 itself
    return np.array(values)

paper_curve, released_curve = run_ort("sum"), run_ort("mean_with_diagonal")
print("Eq. 13 along the paper run   :", paper_curve[[0, 4, 9, 19]].round(4))
print("Eq. 13 along the released run:", released_curve[[0, 4, 9, 19]].round(4))
assert np.allclose(paper_curve, released_curve, rtol=0.05, atol=1e-3)

# ANSWER. No: the two runs follow almost the same path. Adam divides each gradient by a running estimate of its own
# magnitude, so multiplying the loss by 1/B² multiplies the gradient and its magnitude estimate alike, and the steps
# stay the same (up to Adam's ε). The weighting matters only relative to the other terms of Eq. 14, whose gradients
# reach the same parameters: there, a term ÷B² loses influence. With plain SGD, the released variant would indeed be
# B² = 9 times slower.

# %% [markdown] tags=["exercise"]
# **Exercise 4.** Can B unit vectors in C dimensions all be mutually orthogonal? For which B must
# $\mathcal{L}_{ort}$ stay above 0, and how far? Check numerically: minimise the Eq. 13 sum of one bank for B = 6
# vectors in C = 3 dimensions and compare with the bound $\sum_{i \ne j}\cos^2 \ge B^2/C - B$.

# %% tags=["solution"]
def min_within_bank(n_vec, dim, n_steps=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n_vec, dim, generator=g).requires_grad_()
    o = torch.optim.Adam([v], lr=0.05)
    for _ in range(n_steps):
        u = F.normalize(v, dim=-1)
        c = u @ u.T
        loss = (c ** 2).sum() - n_vec       # Σ_{i≠j} cos², one bank of Eq. 13
        o.zero_grad(); loss.backward(); o.step()
    return float(loss)

for n_vec, dim in ((3, 3), (6, 3), (3, D)):
    reached, bound = min_within_bank(n_vec, dim), max(0.0, n_vec ** 2 / dim - n_vec)
    print(f"B = {n_vec} in C = {dim}: minimum reached {reached:.4f}, lower bound {bound:.4f}")
assert abs(min_within_bank(6, 3) - (36 / 3 - 6)) < 0.05 and min_within_bank(3, 3) < 1e-3

# ANSWER. B vectors can be mutually orthogonal only if B ≤ C. For B > C the sum is at least B²/C − B (the Gram
# matrix has rank ≤ C, so the sum of its squared entries is at least B²/C), reached by a "tight frame"; for B = 6 in
# C = 3 that is 6, and the optimiser finds it. The paper has B = 3 and C = 768 (the toy CLIP: 64), so L_ort can
# reach 0 in principle, and what keeps it above 0 in training is the competition with the other terms of Eq. 14.
