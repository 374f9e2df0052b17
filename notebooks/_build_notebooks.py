#!/usr/bin/env python3
"""Writes notebooks/NN_*.ipynb (outputs stripped, stable cell ids, minimal metadata).

The notebooks' source of truth is this script: edit it, then run ``python notebooks/_build_notebooks.py``.
``tests/test_notebooks.py`` checks that the committed notebooks equal what this script writes.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
PAPER = "*Bayesian Prompt Flow Learning for Zero-Shot Anomaly Detection* (Qu et al., CVPR 2025)"


def md(text: str) -> dict:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str) -> dict:
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))


def header(number: str, title: str, goals: list[str], cpu: str, gpu: str, extra: str = "") -> dict:
    goal_lines = "\n".join(f"- {g}" for g in goals)
    return md(f"""
# {number} · {title}

Teaching notebook of **bpfl**, the kit for {PAPER}.

**Learning goals**

{goal_lines}

**Runtime**: fast mode on a 2-core CPU {cpu} (kernel start included); paper mode on one GPU {gpu}.{(" " + extra) if extra else ""}

**Mode switch**: set `MODE` in the setup cell below (`"fast"` or `"paper"`), or the environment variable
`BPFL_MODE`. Fast mode (the default) uses a tiny backbone, the small synthetic dataset, small R and K and a few
epochs. When that backbone has **random weights**, every number it produces shows the *mechanics* of the method,
not its results. The banner printed by the setup cell says which mode runs, and why.
""")


def setup_cell(name: str, extra_imports: str = "") -> dict:
    return code(f'''
# ---- setup: the only cell to edit ------------------------------------------------------------
MODE = None  # None: $BPFL_MODE, else "fast" (CPU minutes). "paper": ViT-L-14-336/openai at 518 px (GPU advised)

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
{extra_imports}
from bpfl import notebook as nb

S = nb.setup("{name}", mode=MODE)  # banner, seed, plotting style, results folder
cfg = S.config
''')


def summary(points: list[str], exercises: list[str]) -> list[dict]:
    p = "\n".join(f"- {x}" for x in points)
    e = "\n".join(f"{i}. {x}" for i, x in enumerate(exercises, 1))
    return [md(f"## Summary\n\n{p}"), md(f"## Exercises\n\n{e}")]


# =============================================================================================== 00
def nb00() -> list[dict]:
    return [
        header("00", "Overview and setup", [
            "state the zero-shot anomaly detection (ZSAD) protocol: train on *seen* categories, test on disjoint "
            "*unseen* ones",
            "find each part of the paper (sections, equations) in the `bpfl` package",
            "run every notebook in **fast** mode, and know the one switch to **paper** mode",
            "meet the datasets of the notebooks: the offline synthetic set and the small real samples",
        ], "≈ 20 s", "≈ 1 min (loads ViT-L-14-336)"),
        setup_cell("00_overview_and_setup"),
        md(r"""
## 1 · Zero-shot anomaly detection

> Our approach follows the recent ZSAD task setting, where the model is trained in a supervised manner on seen
> categories $C^s$ from an industrial dataset and then directly tested on unseen categories $C^u$ from other
> industrial or medical datasets. Notably, $C^u \cap C^s = \emptyset$, and the object categories used for auxiliary
> training and testing come from different datasets with large domain gaps. — §3

> Since the categories in VisA do not overlap with those in the other datasets, we use VisA as the auxiliary
> training set. To assess VisA itself, we fine-tune our model on the MVTEC-AD dataset. — §4.1

*Zero-shot* means that no image of a target category is seen during training. The model still trains, but on an
*auxiliary* dataset, and it trains on that dataset's **test split**, because only the test split has anomalous
images with masks. The kit reproduces this protocol offline with its synthetic dataset: the texture categories
come in two disjoint groups, `seen` (auxiliary training) and `unseen` (zero-shot targets).
"""),
        code(r'''
from bpfl.data import SYNTHETIC_GROUPS, open_dataset

seen, unseen = set(SYNTHETIC_GROUPS["seen"]), set(SYNTHETIC_GROUPS["unseen"])
assert not seen & unseen, "C^u and C^s must be disjoint"

aux = S.aux_dataset()      # what the notebooks train on: its test split (the paper's protocol)
targets = S.targets()      # the zero-shot targets available here
print("auxiliary (training) set:", S.aux_name())
print(aux.summary())
for name, ds in targets.items():
    print(f"\ntarget: {name}")
    print(ds.summary())
import os
if not (os.environ.get("BPFL_TARGETS") or os.environ.get("BPFL_AUX_DATA")):
    assert set(aux.categories).isdisjoint(targets["synthetic (unseen categories)"].categories)
'''),
        md(r"""
One anomalous test image of every synthetic category, with its mask outlined. An anomaly is a region of the image
re-textured by colour, contamination or distortion, and its mask is exact. The backbone never sees the bottom row
(unseen categories) before the test.
"""),
        code(r'''
from bpfl.viz import to_display_image

syn = open_dataset(S.synthetic_root(), split="test", image_size=cfg.image_size)
groups = [("seen", SYNTHETIC_GROUPS["seen"]), ("unseen", SYNTHETIC_GROUPS["unseen"])]
fig, axes = plt.subplots(2, 4, figsize=(10, 5.4))
for row, (group, cats) in enumerate(groups):
    for col, cat in enumerate(cats):
        one = syn.subset(categories=cat)
        i = nb.pick_examples(one, 1)[0]        # the category's largest anomaly
        item = one[i]
        ax = axes[row, col]
        ax.imshow(to_display_image(item["image"]))
        ax.contour(item["mask"].numpy(), levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(f"{group}: {cat}\n({one.records[i].specie})", fontsize=9)
        ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
fig.suptitle("synthetic dataset: train on the top row's categories, test zero-shot on the bottom row's")
fig.tight_layout()
S.save(fig, "synthetic_categories")
plt.show()
'''),
        md(r"""
The real samples in `../shared/data` (set `BPFL_SHARED_DATA` to use another folder): 10 MVTec-AD `bottle` test
images (5 good, 5 `broken_large` with masks) and 12 Kvasir-SEG colonoscopy images with polyp masks. All Kvasir
images are anomalous, so only pixel-level metrics are defined on it. Table 1 of the paper has the same property
for its segmentation-only medical datasets. When the samples are missing, the cell says so and skips.
"""),
        code(r'''
real = S.real_samples()
if not real:
    print("real samples not found: skipped (set BPFL_SHARED_DATA to the folder holding mvtec-bottle-xs/ and kvasir-seg-sample/)")
else:
    fig, axes = plt.subplots(len(real), 4, figsize=(10, 2.7 * len(real)), squeeze=False)
    for row, (name, ds) in enumerate(real.items()):
        picks = nb.pick_examples(ds, 4)
        for col, i in enumerate(picks):
            item = ds[i]
            axes[row, col].imshow(to_display_image(item["image"]))
            axes[row, col].contour(np.nan_to_num(item["mask"].numpy()), levels=[0.5], colors="white", linewidths=1)
            axes[row, col].set_title(f"{name}\n{ds.records[i].class_name}", fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    S.save(fig, "real_samples")
    plt.show()
    for name, ds in real.items():
        assert len(ds) > 0 and ds.has_masks, name
'''),
        md(r"""
## 2 · The kit mirrors the paper

| paper | what it is | `bpfl` |
|---|---|---|
| §3.1, §4.1 | frozen CLIP ViT-L-14-336 at 518 px, patch tokens of layers 6/12/18/24 | `bpfl.backbone.load_backbone`, `ClipBackbone.encode_image` |
| §3.2, Eq. 1-2 | two-class prompt banks (context E, states Sⁿ, Sᵃ) | `bpfl.prompts.PromptBanks`, `class_tokens`, `encode_prompts` |
| §3.3, Eq. 3-7 | prompt flow: planar flows, ISD and IAD, the ELBO | `bpfl.flow.PlanarFlowStack`, `PromptFlow`, `flow_kl` |
| §3.3, Eq. 8-9 | fusing flow samples into the prompts | `PromptBanks.fuse` |
| §3.4, Eq. 10 | residual cross-modal attention (RCA) | `bpfl.rca.ResidualCrossModalAttention` |
| §3.5, Eq. 11-12 | anomaly maps and scores | `bpfl.model.BayesPFL.forward` → `BayesPFLOutput` |
| §3.6, Eq. 13-14 | losses | `bpfl.losses`, `BayesPFL.loss` |
| §4 | training, metrics, tables | `bpfl.train`, `bpfl.metrics`, `bpfl.evaluate` |
| everything else | data, figures, these notebooks | `bpfl.data`, `bpfl.viz`, `bpfl.notebook` |

Each equation number appears in the docstring of the one function that implements it. The next cell checks this.
"""),
        code(r'''
import bpfl.flow, bpfl.losses, bpfl.model, bpfl.prompts, bpfl.rca

where = {
    "Eq. 1-2": bpfl.prompts.PromptBanks, "Eq. 6": bpfl.flow.planar_step, "Eq. 7": bpfl.flow.flow_kl,
    "Eq. 8-9": bpfl.prompts.PromptBanks.fuse, "Eq. 10": bpfl.rca.ResidualCrossModalAttention,
    "Eq. 10-11": bpfl.model.BayesPFL.pair_logit_differences, "Eq. 12": bpfl.model.BayesPFL._accumulate_maps,
    "Eq. 13": bpfl.losses.orthogonal_loss, "Eq. 14": bpfl.losses.total_loss,
}
rows = []
for eq, obj in where.items():
    assert eq in (obj.__doc__ or ""), f"{eq} missing from {obj.__qualname__}'s docstring"
    rows.append({"equation": eq, "implemented by": f"{obj.__module__}.{obj.__qualname__}",
                 "docstring starts": (obj.__doc__ or "").strip().splitlines()[0][:80]})
pd.DataFrame(rows).set_index("equation")
'''),
        md(r"""
## 3 · Two modes, one switch

The setup cell has one variable, `MODE`. Fast mode is the teaching scale and paper mode is the paper's
setting. The next cell lists every configuration field that differs between the two. Paper mode runs on
`bpfl.backbone.pick_device()` (CUDA, then Apple MPS, then CPU), so nothing in it is hard-coded to CUDA. It needs
the OpenAI weights in the local cache, or a file passed with `BPFL_OVERRIDES="pretrained=/path/ViT-L-14-336.pt"`.
Without them, the backbone loader stops and says what to do.
"""),
        code(r'''
from bpfl.config import BayesPFLConfig

fast_cfg, fast_why = nb.mode_config("fast")
paper_cfg, paper_why = nb.mode_config("paper")
diff = fast_cfg.differences(paper_cfg)
table = pd.DataFrame({"fast": {k: str(v[0]) for k, v in diff.items()}, "paper": {k: str(v[1]) for k, v in diff.items()}})
print("fast  :", fast_why)
print("paper :", paper_why)
preset = BayesPFLConfig.paper()  # §4.1, before any BPFL_OVERRIDES
assert preset.backbone == "ViT-L-14-336" and preset.image_size == 518 and preset.layers == (6, 12, 18, 24)
assert (preset.n_prompts, preset.n_context, preset.n_state, preset.flow_length) == (3, 5, 5, 10)
assert (preset.train_samples, preset.test_samples, preset.epochs, preset.batch_size, preset.lr) == (1, 10, 20, 32, 1e-4)
table.astype(str)
'''),
        md(r"""
The other scale settings: the synthetic preset, seeds, the R values of Table 3, and the 2-D grid.
"""),
        code(r'''
pd.DataFrame({m: vars(nb.SCALES[m]) for m in nb.MODES}).astype(str)
'''),
        md(r"""
### The paper versus the released code

The authors' released code differs from the paper in places. The kit follows the paper by default, and each
difference is a named configuration field. `BayesPFLConfig.released_code()` switches all of them at once:
"""),
        code(r'''
from bpfl.config import SWITCHES, BayesPFLConfig, switches_markdown

released = BayesPFLConfig.released_code()
assert set(BayesPFLConfig.paper().differences(released)) <= set(SWITCHES)
display(Markdown(switches_markdown()))
'''),
        md(r"""
## 4 · The backbone

> Given an input image $\mathbf{X} \in \mathbb{R}^{h \times w \times 3}$, the model first maps the patch-level image
> features to the joint embedding space through a single linear layer, producing
> $\mathbf{F}^I \in \mathbb{R}^{HW \times C}$, where $H = h/\text{patchsize}$, $W = w/\text{patchsize}$ and $C$
> represents the dimensionality of the joint embedding space. — §3.1

> we standardize the resolution of input images to 518×518 and select the 6th, 12th, 18th, 24th layers from the
> 24-layer image encoder to extract patch embeddings. — §4.1

The frozen CLIP returns `x_cls` (the class token after `ln_post` and `proj`, in the joint space) and the raw
patch tokens of the chosen layers. The per-layer linear maps into the joint space belong to the model, not to
the backbone (notebook 04). The picture shows the first three principal components of each layer's patch tokens
as RGB. Even random weights give the tokens spatial structure. Pretrained weights give them meaning.
"""),
        code(r'''
from bpfl.data import collate

bb = S.backbone
print(bb.describe())
two = syn.subset(categories=SYNTHETIC_GROUPS["unseen"][:2])
batch = collate([two[i] for i in nb.pick_examples(two, 2)])
feats = bb.encode_image(batch["image"])
H, W = bb.grid_size
assert feats.cls.shape == (2, bb.embed_dim)
assert len(feats.patch_tokens) == len(cfg.layers)
assert all(t.shape == (2, H * W, bb.vision_width) for t in feats.patch_tokens)
print(f"x_cls {tuple(feats.cls.shape)}; {len(feats.patch_tokens)} layers of patch tokens {tuple(feats.patch_tokens[0].shape)} "
      f"= [images, {H}x{W} patches, vision width]")

def pca_rgb(tokens):  # [HW, V] -> [H, W, 3] in [0, 1]
    t = tokens - tokens.mean(0)
    _, _, v = torch.linalg.svd(t, full_matrices=False)
    p = t @ v[:3].T
    p = (p - p.min(0).values) / (p.max(0).values - p.min(0).values + 1e-8)
    return p.reshape(H, W, 3).cpu().numpy()

fig, axes = plt.subplots(2, 1 + len(cfg.layers), figsize=(2.3 * (1 + len(cfg.layers)), 4.8))
for r in range(2):
    axes[r, 0].imshow(to_display_image(batch["image"][r])); axes[r, 0].set_title(batch["class_name"][r])
    for j, layer in enumerate(cfg.layers):
        axes[r, j + 1].imshow(pca_rgb(feats.patch_tokens[j][r]), interpolation="nearest")
        axes[r, j + 1].set_title(f"layer {layer}: PCA of tokens", fontsize=8)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout()
S.save(fig, "backbone_tokens")
plt.show()
'''),
        md(r"""
## 5 · Where things go

Figures are saved as PNG and PDF in `notebooks/results/<notebook>/`, and tables as CSV and markdown in the same
folder. Trained checkpoints go to `notebooks/results/checkpoints/<name>-<hash>/`. The hash covers the
configuration and the training set, so a later notebook **loads** a model that an earlier notebook trained and
never loads a stale one. The folder is generated output and should be git-ignored (`/notebooks/results/`).
Environment variables move these folders: `BPFL_RESULTS_DIR`, `BPFL_DATA_DIR` (the synthetic data) and
`BPFL_SHARED_DATA` (the real samples). `BPFL_AUX_DATA` and `BPFL_TARGETS` point the notebooks at real
datasets (for example VisA and MVTec-AD) for a paper-scale run.
"""),
        code(r'''
print("this notebook's results :", S.results)
print("checkpoints             :", S.checkpoint_root)
print("saved so far            :", sorted(p.name for p in S.results.iterdir()))
assert (S.results / "synthetic_categories.png").is_file() and (S.results / "synthetic_categories.pdf").is_file()
'''),
        *summary([
            "ZSAD trains on an auxiliary dataset's test split (VisA in the paper) and tests on categories never seen "
            "in training. The kit's synthetic `seen`/`unseen` groups reproduce this offline.",
            "Every section and equation of the paper has one home in `bpfl`, and the docstrings carry the equation "
            "numbers.",
            "`MODE` (or `BPFL_MODE`) is the only switch. Fast mode is for teaching and paper mode is the paper's "
            "setting on any device. A random-weight backbone gives mechanics, not results.",
            "The released code differs from the paper in named switches (`SWITCHES`), and "
            "`BayesPFLConfig.released_code()` reproduces it.",
        ], [
            "Set `MODE = \"paper\"` on a machine without the OpenAI weights. Read the error: what are the three "
            "ways out?",
            "Open the synthetic dataset folder (`S.synthetic_root()`). Which file records the generation "
            "parameters, and which file is the authors' `meta.json` format?",
            "Point `BPFL_TARGETS` at a folder of your own images (`good/` + `anomaly/` [+ `masks/`]) and re-run "
            "the first code cell. Which metrics will be defined for it?",
            "Compare the PCA pictures of layer 1 and layer 4. How much of the spatial structure survives in the "
            "deeper layer, and why could a deeper layer still be useful for anomaly maps?",
        ]),
    ]


# =============================================================================================== 01
def nb01() -> list[dict]:
    return [
        header("01", "Two-class prompt banks (Eq. 1-2) and the orthogonal loss (Eq. 13)", [
            "build the normal and abnormal prompt banks and find where their learned vectors are spliced into the "
            "token sequence",
            "encode one prompt **by hand** and check that it equals the kit's batched encoder",
            "read the similarity matrix of the bank's text embeddings",
            "see what the orthogonal loss $\\mathcal{L}_{ort}$ (Eq. 13) does to that matrix in a few steps",
        ], "≈ 20 s", "≈ 1 min"),
        setup_cell("01_prompt_banks", "from bpfl.prompts import PromptBanks, class_tokens, encode_prompts, prompt_class_name"),
        md(r"""
## 1 · The banks

> the manually designed context and state words are replaced with learnable vectors. Inspired by Compositional
> Prompt Ensemble, normal and abnormal prompt banks are further constructed to expand the prompt space, with each
> containing B distinct trainable prompts: — §3.2

$$g_b^n = [\mathbf{E}_{b,1}][\mathbf{E}_{b,2}] \cdots [\mathbf{E}_{b,P}][\mathbf{S}_{b,1}^n] \cdots [\mathbf{S}_{b,Q}^n][\text{class}] \quad (1)$$

$$g_b^a = [\mathbf{E}_{b,1}][\mathbf{E}_{b,2}] \cdots [\mathbf{E}_{b,P}][\mathbf{S}_{b,1}^a] \cdots [\mathbf{S}_{b,Q}^a][\text{class}] \quad (2)$$

Both banks share the $P$ context vectors $\mathbf{E}_b$ and differ only in their $Q$ state vectors. Each vector
lives in the *word-embedding* space of CLIP's text encoder, whose width is $D$ (768 for ViT-L-14-336, 64 for the
tiny backbone). The paper writes $\mathbb{R}^C$; for ViT-L/14 the text width, 768, is also the joint width $C$.
The paper uses $B = 3$ and $P = Q = 5$.
"""),
        code(r'''
D = S.backbone.text_width
torch.manual_seed(0)
banks = PromptBanks(cfg.n_prompts, cfg.n_context, cfg.n_state, D, cfg.prompt_init_std, cfg.state_init_mean)
B, P, Q = banks.n_prompts, banks.n_context, banks.n_state
for name, p in banks.named_parameters():
    print(f"{name:15s} {tuple(p.shape)}")
assert banks.context.shape == (B, P, D) and banks.state_normal.shape == banks.state_abnormal.shape == (B, Q, D)
print(f"{sum(p.numel() for p in banks.parameters())} learnable numbers; the paper's setting: B=3, P=Q=5, D=768 -> {3 * (5 + 5 + 5) * 768}")
'''),
        md(r"""
## 2 · Where the vectors are spliced

The class words come from the tokenizer. The kit tokenises `"X " + class name`, and the P + Q learned vectors
replace the placeholder `X` at position 1, right after the start token, which is where the released code splices
them. Category folder names become words first (`metal_nut` → `metal nut`, `pcb3` → `printed circuit board`).
"""),
        code(r'''
category = "metal_nut"
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
'''),
        md(r"""
### The lesson: one prompt by hand

`encode_prompts` encodes all 2·B·R prompts of a batch in a single text pass. For a single prompt, the same work
reads as: concatenate [SOT], the P context vectors, the Q state vectors, and the class-word embeddings up to EOT,
then run CLIP's text transformer and take the feature at EOT. Here φ = 0 (no flow samples yet; notebook 02
adds them, Eq. 8-9).
"""),
        code(r'''
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
'''),
        md(r"""
## 3 · The text embeddings of the banks

The banks yield B normal and B abnormal text embeddings per class, written $\mathbf{t}^n_b$ and $\mathbf{t}^a_b$. At
initialisation all learned vectors are tiny (std 0.02), so every prompt reads almost like `"[SOT] <noise> metal
nut"`. The 2B embeddings are then similar to each other, and their cosine similarities are high.
"""),
        code(r'''
def bank_similarity(banks):
    t = encode_prompts(S.backbone, banks.fuse(None, None, None), tok)[0, :, 0]  # [2, B, C]
    flat = t.reshape(2 * B, -1)
    return (flat @ flat.T).detach().cpu().numpy(), t

labels = [f"n{b + 1}" for b in range(B)] + [f"a{b + 1}" for b in range(B)]
sim0, t0 = bank_similarity(banks)
assert np.allclose(np.diag(sim0), 1, atol=1e-5)
print(f"mean off-diagonal cosine within the normal bank at init: {sim0[:B, :B][~np.eye(B, dtype=bool)].mean():.4f}")
'''),
        md(r"""
## 4 · The orthogonal loss

> Note that we enforce orthogonality among the text embeddings generated from the same prompt bank, promoting
> diversity in the normal or anomalous semantics captured by different prompts. — §3.2

$$\mathcal{L}_{ort} = \sum_{i=1}^B \sum_{j=1, j \neq i}^B \{(\langle \mathbf{t}_{i,1}^n, \mathbf{t}_{j,1}^n \rangle)^2 + (\langle \mathbf{t}_{i,1}^a, \mathbf{t}_{j,1}^a \rangle)^2\} \quad (13)$$

> in which $\langle \cdot, \cdot \rangle$ denotes the cosine similarity. — §3.6

The loss compares only prompts *within* a bank (normal with normal, abnormal with abnormal). Whether the
normal and abnormal banks separate is the job of the classification and segmentation losses (notebook 03). The
released code averages over all B×B entries, counting the zero diagonal, so its value is Eq. 13 divided by B².
That is the `ort_reduction` switch.
"""),
        code(r'''
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
'''),
        md(r"""
### A few steps of $\mathcal{L}_{ort}$ alone

In training, $\mathcal{L}_{ort}$ is one term of Eq. 14. Here it is the only term, optimised by Adam, so that its
effect shows on its own: the within-bank blocks of the similarity matrix move away from 1.
"""),
        code(r'''
steps = 40 if S.fast else 150
opt = torch.optim.Adam(banks.parameters(), lr=1e-2)
curve = []
for step in range(steps):
    t = encode_prompts(S.backbone, banks.fuse(None, None, None), tok)[0, :, 0]
    loss = orthogonal_loss(t[0][None], t[1][None])
    opt.zero_grad(); loss.backward(); opt.step()
    curve.append(float(loss))
sim1, _ = bank_similarity(banks)
print(f"L_ort: {curve[0]:.4f} -> {curve[-1]:.4f} after {steps} Adam steps")
assert curve[-1] < curve[0], "L_ort did not decrease"

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.2]})
import seaborn as sns
for ax, sim, title in ((axes[0], sim0, "at initialisation"), (axes[1], sim1, f"after {steps} steps of L_ort")):
    sns.heatmap(sim, ax=ax, vmin=-1, vmax=1, cmap="coolwarm", annot=True, fmt=".2f", xticklabels=labels,
                yticklabels=labels, cbar=False, annot_kws={"size": 7})
    ax.set_title(f"cosine similarity, {title}")
axes[2].plot(curve); axes[2].set_xlabel("Adam step"); axes[2].set_ylabel("L_ort (Eq. 13)"); axes[2].set_yscale("log")
axes[2].set_title("orthogonal loss")
fig.tight_layout()
S.save(fig, "bank_similarity_ort")
plt.show()
'''),
        md(r"""
Only the two within-bank blocks (n×n and a×a) are pushed towards 0. The n×a block is left alone by Eq. 13.
With the tiny random backbone the text encoder has no language knowledge, so these embeddings mean
nothing yet. The mechanics are the same as with CLIP.
"""),
        *summary([
            "A prompt is [SOT][E₁…E_P][S₁…S_Q][class words][EOT]. E is shared by the two banks and S differs (Eq. 1-2).",
            "The learned vectors take the place of one placeholder token, and all prompts are encoded in one "
            "batched text pass. A hand-built prompt gives the same embedding.",
            "At initialisation the B prompts of a bank are nearly identical. $\\mathcal{L}_{ort}$ (Eq. 13) pushes "
            "their embeddings apart within each bank. The released code's variant is the same loss divided by B².",
        ], [
            "Change `category` to `\"pcb3\"`. How many tokens do the class words take now, and where does EOT move?",
            "Initialise the states like the released code (`cfg.replace(state_init_mean=0.5)`, see `SWITCHES`) "
            "and recompute the similarity matrix at initialisation. What changes in the n×a block?",
            "Run the L_ort loop with `reduction=\"mean_with_diagonal\"`. With the same learning rate, how much "
            "slower is it, and why (think about B²)?",
            "Can B vectors in C dimensions all be mutually orthogonal? For which B would $\\mathcal{L}_{ort}$ "
            "necessarily stay above 0?",
        ]),
    ]


# =============================================================================================== 02
def nb02() -> list[dict]:
    return [
        header("02", "The prompt flow: planar flows and densities (Eq. 3-7)", [
            "read Eq. 6: the density of a sample pushed through K planar maps",
            "check Eq. 6 three ways: against autograd's Jacobian, against a histogram of samples, and by "
            "integrating to 1",
            "move a **K slider** and watch the density change",
            "see why a planar map can fold the plane, and how the û reparameterisation prevents it",
            "tell the image-specific (ISD) from the image-agnostic (IAD) distribution",
        ], "≈ 25 s", "≈ 1 min, plus the main training run if notebook 03 has not cached it yet"),
        setup_cell("02_prompt_flow_density",
                   "from bpfl.flow import PlanarFlowStack, PromptFlow, constrain_u, planar_step, planar_inverse_step, standard_normal_log_prob"),
        md(r"""
## 1 · From prompts to random prompts

> To construct the text prompt distribution, the context, normal state, and abnormal state word embeddings are
> represented as C-dimensional random vectors $\Phi_e, \Phi_s^n$ and $\Phi_s^a$ […]

$$p(\Phi|D) = \frac{p(D|\Phi)p(\Phi)}{p(D)} \quad (3)$$

> Since computing the marginal likelihood p(D) is intractable, variational inference with distribution
> $q_\gamma(\Phi)$ […] is employed to approximate the posterior probability. — §3.3

The approximate posterior $q$ must be cheap to **sample** (the prompts are built from samples) and cheap to
**evaluate** (the loss needs $\log q$). A normalising flow has both properties.

> a prompt flow module is designed to transform a simple probability distribution $q_0(\Phi_0)$ into a more
> complex one $q_K(\Phi_K)$ through a series of invertible mappings $h_k$ […] we use a linear-time transformation
> $h(\Phi) = \Phi + \mathbf{u}g(\mathbf{w}^T\Phi + \mathbf{b})$, where $\mathbf{w}, \mathbf{u} \in \mathbb{R}^C,
> \mathbf{b} \in \mathbb{R}$ are trainable parameters and $g(\cdot)$ is the Tanh activation function. — §3.3

$$\log q_K(\Phi_K) = \log q_0(\Phi_0) - \sum_{k=1}^K \log |1 + \mathbf{u}_k^T \phi(\Phi_k)| \quad (6)$$

> where $\phi(\Phi) = g'(\mathbf{w}^T\Phi + \mathbf{b})\mathbf{w}$.

Each planar step moves a point along $\mathbf{u}$ by an amount that depends only on its position along
$\mathbf{w}$. The Jacobian of such a step is $I + \mathbf{u}\,\phi^T$, whose determinant is
$1 + \mathbf{u}^T\phi$, so one term of the sum costs O(C). In the kit, term k is evaluated at the step's
*input* $\Phi_{k-1}$, as in Rezende & Mohamed (2015) and the released code.

The prompts live in 768 dimensions, but everything below also works in **2-D**, where densities can be plotted.
"""),
        md(r"""
## 2 · One planar step, checked against autograd

The lesson code: the Jacobian of one step, computed by autograd, whose log-determinant must equal the term of
Eq. 6 that `planar_step` returns.
"""),
        code(r'''
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
'''),
        md(r"""
## 3 · K steps: the density by Eq. 6 versus a histogram of samples

`bpfl.notebook.flow_density_2d` evaluates Eq. 6 on a grid. It inverts the flow numerically,
$z_0 = h^{-1}(z_K)$, then returns $\log \mathcal{N}(z_0; 0, I) - \sum_k \log|\det_k|$. Below it, a histogram of
samples pushed *forward* through the same flow. If Eq. 6 is right, the two rows show the same picture and each
density integrates to 1.
"""),
        code(r'''
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
'''),
        md(r"""
The remaining total variation is histogram noise: about a dozen samples per bin. Each
step splits or bends the mass, and with more steps the distribution can take shapes that no Gaussian could.
That is the point of the flow: a richer posterior for the prompts (*"Richer posterior approximations enable us to
better estimate the prompt distribution"*, §3.3).

## 4 · The K slider

Drag the slider. The densities are cached per K, so the picture changes at once. In a static rendering (on
GitHub, say) the widget does not appear; the saved figure `k_slider.png` shows its last state.
"""),
        code(r'''
k_slider, k_state = nb.k_slider_demo(k_max=S.scale.k_max, grid_n=S.scale.grid_n, n_samples=n_samples)
display(k_state["ui"])
'''),
        code(r'''
# what the slider does, without a browser: set its value; the callback redraws the density
before = k_state["density"].copy()
k_slider.value = S.scale.k_max
assert k_state["K"] == S.scale.k_max and not np.allclose(before, k_state["density"])
assert abs(k_state["mass"] - 1) < 0.02
print(f"K = {k_state['K']}: ∫q = {k_state['mass']:.4f}")
_ = S.save(k_state["fig"], "k_slider")
'''),
        md(r"""
## 5 · Invertibility and the û fix

A planar step is invertible only if it never folds the plane. Along $\mathbf{w}$, with $\alpha = \mathbf{w}^T z$ and
$c = \mathbf{w}^T \mathbf{u}$, the step moves $\alpha$ to $\alpha + c\,\tanh(\alpha + b)$. This is increasing in
$\alpha$ for every $\alpha$ exactly when $c \ge -1$. The paper calls the maps invertible but does not state
the condition. Rezende & Mohamed's reparameterisation enforces it:

$$\hat{\mathbf{u}} = \mathbf{u} + [m(\mathbf{w}^T\mathbf{u}) - \mathbf{w}^T\mathbf{u}]\,\frac{\mathbf{w}}{\|\mathbf{w}\|^2}, \qquad m(x) = -1 + \log(1 + e^x),$$

so that $\mathbf{w}^T\hat{\mathbf{u}} = m(\mathbf{w}^T\mathbf{u}) > -1$. The kit uses û by default
(`constrained_flow=True`). The released code uses the raw $\mathbf{u}$ (`constrained_flow=False`, see `SWITCHES`).
"""),
        code(r'''
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
'''),
        md(r"""
What breaks without û: Eq. 6 assumes that each output has exactly one input. Where the map folds, three inputs
land on the same output. The true density is then the sum of their contributions, while Eq. 6 reports only the
one along the sample's own path. Near the fold, $|1 + \mathbf{u}^T\phi| \to 0$ and Eq. 6 diverges. The cell
compares Eq. 6 at each sample with a histogram estimate at the same point. The kit's numerical inverse refuses
a folding step.
"""),
        code(r'''
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
'''),
        md(r"""
## 6 · ISD and IAD

> The initial density $q_0$ is defined as a standard normal distribution: $q_0 = \mathcal{N}(\mu(\xi), \Sigma(\xi))$,
> where $\mu \in \mathbb{R}^C$ and $\text{diag}(\Sigma) = \sigma \in \mathbb{R}^C$ are conditioned on the vector
> $\xi \in \mathbb{R}^C$ and parameterized by three linear layers, with a Softplus activation function applied
> between consecutive layers.
>
> Depending on the different inputs ξ to the prompt flow module, two types of distributions are obtained: an
> **image-specific distribution** (ISD) and an **image-agnostic distribution** (IAD). For ISD, ξ is set as global
> image feature x to acquire a dynamic distribution, which models the context distribution and enhances
> generalization in unseen domains. For IAD, we set ξ as the learnable free vectors $\mathbf{x}_f^n$ and
> $\mathbf{x}_f^a$, respectively, while sharing the same network weights. — §3.3

In 2-D first, with the encoder's weights scaled up so that the picture shows something. The kit initialises
them at N(0, 0.02²), which makes $q_0 \approx \mathcal{N}(0, I)$ for every ξ. The ISD's distribution moves
with the image. The IAD has one distribution per state, and it is the same for every image.
"""),
        code(r'''
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
'''),
        md(r"""
Now the real model. The context flow (ISD) receives $\xi = \mathbf{x} = \mathbf{x}_{cls} + \mathbf{x}_{patch}$ of each
image. The two state flows (IAD) share one encoder and one planar stack, and each receives its own free vector.
The model comes from the kit's training cache: it is trained now if notebook 03 has not cached it yet. The
samples are projected onto two principal components.
"""),
        code(r'''
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
'''),
        md(r"""
On the right, the normal clouds of all images overlap, and so do the abnormal clouds: the IAD does not
depend on the image. Its samples still differ from image to image, because each image draws its own ε, but all
of them come from one distribution per state. On the left, each image has its own cloud, at least in principle.
With the tiny random backbone the clouds lie on top of each other: the printed spread of μ over the images is
almost zero. Random features of different textures are nearly alike, and the encoder's small initial weights
shrink their differences further. So here the ISD behaves like an IAD. With CLIP, $\mathbf{x}$ differs between
images, and the ISD carries image content into the context words, which §4.3 credits for the generalisation
to unseen categories.
"""),
        *summary([
            "Eq. 6 is the change of variables for K planar steps: each step adds −log|1 + uᵀψ| to log q. The kit's "
            "log-det matches autograd, and its density matches a histogram and integrates to 1.",
            "More steps give more complex densities. The K slider shows this, and the paper uses K = 10.",
            "Without û a planar step can fold the plane, and Eq. 6 is then wrong. The kit uses û by default, while "
            "the released code uses the raw u.",
            "ISD conditions q₀ on the image (context words). IAD conditions it on two free vectors with shared "
            "weights (state words), the same for every image.",
        ], [
            "In the density cell, change `demo_flow_2d`'s seed. Find a seed where mass leaves the [-4.5, 4.5]² "
            "window. Which assertion catches it?",
            "Set `u = torch.tensor([-0.2, 0.8])` in §5 (so that w·u = −0.6). Is the raw step still folding? "
            "What does û change then?",
            "With u = 0 every step is the identity. Show that Eq. 6 then reduces to log q₀, and check it numerically "
            "with `planar_step`.",
            "In the 2-D ISD/IAD picture, give the ISD two images with the same ξ. What do you expect to see, and "
            "why is that the right behaviour for *context* words?",
            "Time `flow_density_2d` for K = 1…12. Which part grows with K: the inverse or the forward pass?",
        ]),
    ]


# =============================================================================================== 03
def nb03() -> list[dict]:
    return [
        header("03", "The ELBO and training (Eq. 3-7, 13-14)", [
            "derive the training loss from the ELBO and name each term of Eq. 7 and Eq. 14",
            "check the flow's KL term against the closed-form Gaussian KL",
            "compute every loss term on one batch and check that they sum to the total",
            "train on the auxiliary set with per-term loss curves, save a checkpoint, and load it instead of "
            "retraining",
        ], "≈ 20 s (training ≈ 5 s)", "≈ 10-30 min (20 epochs on VisA-sized data), loaded from the cache afterwards"),
        setup_cell("03_elbo_training", "from bpfl.flow import PromptFlow, flow_kl\nfrom bpfl.data import collate"),
        md(r"""
## 1 · From the ELBO to the loss

$$\log p(D) = \log \int p(D|\Phi)p(\Phi)d\Phi \quad (4)$$

$$\geq E_{q_\gamma(\Phi|D)}[\log p(D, \Phi) - \log q_\gamma(\Phi|D)] = -\mathcal{L}_e(D) \quad (5)$$

> By replacing $q_\gamma(\Phi|D)$ in Equation (5) with $q_K(\Phi_K)$, the objective function for optimizing the
> prompt flow module is computed as: — §3.3

$$\mathcal{L}_p(D) = E_{q_0(\Phi_0)} \left[\log q_0(\Phi_0) - \sum_{k=1}^K \log |1 + \mathbf{u}_k^T \phi(\Phi_k)| \right] - E_{q_0(\Phi_0)}[\log p(\Phi_K)] - E_{q_0(\Phi_0)}[\log p(D|\Phi_K)] \quad (7)$$

> where the prior distribution follows $p = \mathcal{N}(0, \mathbf{I})$. […] The first two terms of $\mathcal{L}_p$ are
> distribution regularization terms […] The third term […] maximizes the log-likelihood of the data, which is
> approximated by the sum of classification loss (for text-image alignment) and segmentation loss (for text-patch
> alignment). Specifically, our Bayes-PFL employs a cross-entropy loss for classification, along with the sum of
> Focal loss and Dice loss for segmentation. — §3.6

$$\mathcal{L} = \mathcal{L}_{ort} + \mathcal{L}_p \quad (14)$$

The terms as the kit names them:

| term | Eq. | kit |
|---|---|---|
| $E_{q_0}[\log q_0 - \sum_k \log\lvert\det_k\rvert - \log p(\Phi_K)]$, one per flow | 7 (first two terms) | `kl_context` (ISD), `kl_normal`, `kl_abnormal` (IAD): `bpfl.flow.flow_kl` |
| $-E_{q_0}[\log p(D\mid\Phi_K)]$ ≈ classification | 7 (third term) | `cls`: cross-entropy of $\mathbf{x}$ against each normal/abnormal pair |
| ≈ segmentation | 7 (third term) | `focal` + `dice`, per layer (summed over the L layers) |
| orthogonality | 13 | `ort` |

No weights appear in Eq. 14, so the kit's default weights are all 1. The released code weights each KL term by 0.01
(`kl_weight`, see `SWITCHES`). During training R = 1: *"a single Monte Carlo sampling is performed to enhance
efficiency"* (§3.6).
"""),
        md(r"""
### Check: the flow term is a KL divergence

With an identity flow (K = 0) the first two terms of Eq. 7 are exactly $\mathrm{KL}(q_0 \,\|\, \mathcal{N}(0, I))$,
and that has a closed form, $\tfrac12\sum_c(\sigma_c^2 + \mu_c^2 - 1 - \log\sigma_c^2)$. `flow_kl` estimates it by
Monte Carlo, so with many samples the two must agree.
"""),
        code(r'''
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
'''),
        md(r"""
## 2 · One batch, term by term

One training step on a batch of the auxiliary set: the forward pass in training mode (R = 1, per-pair maps kept
for the losses), then `BayesPFL.loss`. The lesson code recomputes the dice term of the first layer and the first
prompt pair by hand.
"""),
        code(r'''
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
'''),
        md(r"""
`seg` and `flow` in the table are group totals (focal + dice, and the sum of the three KL terms). With R = 1 each
KL term is a *single-sample* Monte-Carlo estimate: it is unbiased, but a single value can come out negative even
though a KL divergence cannot. The dice and
focal terms are summed over the L layers and averaged over the B prompt pairs. That sum makes `dice` large
compared with `cls`; the paper does not say how the layers are combined.

## 3 · Training on the auxiliary set

> We use the Adam optimizer to train our Bayes-PFL for a total of 20 epochs, with an initial learning rate of 0.0001
> and a batch size of 32. — §4.1

The frozen CLIP is never trained. Only the kit's own parameters are: the prompt banks, the flows and their
free vectors, the per-layer projections, the $\mathbf{x}_{patch}$ layer and RCA. Fast mode trains a few epochs
on the synthetic *seen* categories at a larger learning rate.

`S.train_or_load()` follows the rule *checkpoint present? load it : train it*. The first run trains and caches,
and every later run (or notebook) loads. Set `RETRAIN = True` to train again. The curves record every loss term
at every step and are redrawn after each epoch.
"""),
        code(r'''
RETRAIN = False
T = S.train_or_load(retrain=RETRAIN, live=True)
model = T.model
trainable = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("backbone."))
frozen = sum(p.numel() for p in model.backbone.parameters())
print(f"{'loaded' if T.loaded else 'trained'}: {T.checkpoint}")
print(f"trainable parameters {trainable:,} | frozen CLIP parameters {frozen:,} ({100 * trainable / (trainable + frozen):.2f} % trained)")
T.history.round(4)
'''),
        code(r'''
steps = T.steps
assert len(steps) > 0 and np.isfinite(steps["total"]).all()
fig = nb.plot_loss_terms(steps, title=f"every term of Eq. 14 per step ({S.aux_name()}, {cfg.epochs} epochs; grey lines: epoch ends)")
S.save(fig, "loss_curves")
plt.show()
'''),
        md(r"""
How to read the curves: the KL terms are the regularisers. They pull each flow's $q_K$ towards the prior
$\mathcal{N}(0, I)$. In fast mode they jump in the first steps, where the large learning rate (1e-2, against the
paper's 1e-4) moves the flows abruptly, and then settle. The data terms (`cls`,
`focal`, `dice`) pull the prompts wherever the images need them, so the two groups trade off. `ort` falls, as in
notebook 01, but more slowly, because here it competes with the other terms. With a random backbone the data
terms cannot fall far, and `dice` hardly moves: the features carry little that separates an anomaly from its
texture. The curves are noisy because each step is one small batch with one Monte-Carlo sample.

## 4 · The checkpoint

A checkpoint holds the kit's parameters, the configuration, and the optimizer and RNG state needed for exact
resumption. It holds no CLIP weights, which are the backbone's. Loading rebuilds the model from the configuration
it stores and gives identical outputs.
"""),
        code(r'''
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
'''),
        code(r'''
import time
t0 = time.perf_counter()
T2 = S.train_or_load()          # the same config and data: loaded from the cache
assert T2.loaded and T2.checkpoint == T.checkpoint
print(f"second call: loaded in {time.perf_counter() - t0:.2f} s instead of training ({T2.history['seconds'].iloc[-1]:.1f} s)")
'''),
        md(r"""
## 5 · The released code's loss weights

The released code multiplies each KL term by 0.01 and averages Eq. 13 over B² entries. On the same batch the
terms are identical and only the total changes:
"""),
        code(r'''
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
'''),
        *summary([
            "The loss is the negative ELBO. The flow terms of Eq. 7 are Monte-Carlo KL divergences to N(0, I), "
            "checked against the closed form. The likelihood term is CE + focal + dice, and Eq. 14 adds "
            "$\\mathcal{L}_{ort}$.",
            "Training updates only the kit's parameters. CLIP stays frozen and no CLIP weights go into checkpoints.",
            "`S.train_or_load()` trains once and loads afterwards. The cache key covers the configuration and the "
            "data, so a changed setting retrains.",
            "The released code's weights (KL × 0.01, Eq. 13 / B²) change the balance of the terms, not the terms "
            "themselves.",
        ], [
            "Train with `kl_weight=0.01` (`S.train_or_load(cfg.replace(kl_weight=0.01), name=\"kl001\")`) and "
            "compare the KL curves with the default run. Which run's flows end up further from the prior?",
            "Set `flow_length=0` (no planar steps) and train. Which loss terms change, and why can the KL terms "
            "then still be non-zero?",
            "The paper trains with R = 1. Train with `train_samples=4`. What happens to the noise of the curves, "
            "and to the time per step?",
            "Interrupt a training run in the middle (stop the kernel), then call `bpfl.train.train(..., resume=True)` "
            "on the same folder. Check that the result equals an uninterrupted run.",
        ]),
    ]


# =============================================================================================== 04
def nb04() -> list[dict]:
    return [
        header("04", "Inference: RCA, anomaly maps and scores (Eq. 10-12)", [
            "implement Eq. 10 (RCA) by hand, check it against the kit, and look at its attention",
            "take the anomaly map apart: layers, prompts, samples (Eq. 11-12)",
            "separate the text branch $s_{text}$ from the image branch $s_{img} = \\max(\\mathbf{M})$",
            "move an **R slider** and press **re-draw** to see how Monte-Carlo sampling shapes maps and scores",
            "draw Figure-3 panels (synthetic and real samples) and Figure 6 (image vs text ensemble)",
            "compare a random backbone with the kit's toy-pretrained CLIP on unseen categories",
        ], "≈ 30 s", "≈ 2 min (after notebook 03 cached the model)"),
        setup_cell("04_inference_and_maps", "from bpfl.data import collate\nfrom bpfl.viz import figure3_panel, overlay, to_display_image\nfrom bpfl.evaluate import predict_dataset"),
        code(r'''
T = S.train_or_load()            # the model of notebook 03 (trained now if not cached)
model = T.model.eval()
targets = S.targets()
target_name, target = next(iter(targets.items()))
picks = nb.pick_examples(target, S.scale.n_show - 1, n_normal=1)   # large anomalies of several categories + 1 normal
batch = collate([target[i] for i in picks])
names = batch["class_name"]
print(f"target: {target_name}; showing {len(picks)} images: {names}")
if S.random_backbone:
    print(nb.MECHANICS_NOTE)
'''),
        md(r"""
## 1 · Residual cross-modal attention

> the RCA module is designed to promote cross-modal interaction between textual and fine-grained image features,
> which can be formulated as follows: — §3.4

$$\mathbf{F}_{b,r}^t = \mathbf{Z}_{b,r}^t + \text{softmax}(\mathbf{Q}_{b,r}(\mathbf{F}^I)^T / \sqrt{C})\mathbf{F}^I \quad (10)$$

> The query embedding $\mathbf{Q}_{b,r} = \mathbf{Z}_{b,r}^t \mathbf{W}$, where $\mathbf{W} \in \mathbb{R}^{C \times C}$ is the
> weight matrix of a linear mapping layer. The RCA module introduces residuals to: 1) fuse original textual
> features with cross-modal features for better zero-shot performance and 2) facilitate gradient backpropagation
> to the prompt bank

$\mathbf{Z}$ stacks one normal and one abnormal text embedding (2 × C). Each row attends over the HW patch
features of one layer and adds what it finds to itself. The text embeddings thus adapt to the image before they
are compared with its patches. The lesson code: Eq. 10, one head, by hand.
"""),
        code(r'''
C = S.backbone.embed_dim
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    feats = model.backbone.encode_image(batch["image"])
    patches = model.project_patches(feats)                    # F^I_l, L2-normalised, [N, HW, C] per layer
    x = model.global_embedding(feats, patches)
    text, _ = model.prompt_embeddings(feats, x, names, 1, gen)   # [N, 2, R=1, B, C]
    Z = text[:, :, 0, 0]                                       # pair b = 1, r = 1: [N, 2, C]
    F_I = patches[-1]                                          # the last layer
    if model.rca is not None and cfg.rca_heads == 1:
        Q = Z @ model.rca.query.weight.T + (model.rca.query.bias if model.rca.query.bias is not None else 0)
        attn = torch.softmax(Q @ F_I.transpose(1, 2) / C ** 0.5, dim=-1)       # [N, 2, HW]
        by_hand = Z + attn @ F_I
        if cfg.rca_normalize_output:
            by_hand = F.normalize(by_hand, dim=-1)
        assert torch.allclose(by_hand, model.rca(Z, F_I), atol=1e-5), "Eq. 10 by hand differs from bpfl.rca"
        print("Eq. 10 by hand == ResidualCrossModalAttention ✓")
    else:
        attn = model.rca.attention(Z, F_I).mean(1) if model.rca is not None else None
H, W = S.backbone.grid_size
if attn is not None:
    fig, axes = plt.subplots(3, len(picks), figsize=(2.2 * len(picks), 6.6), squeeze=False)
    for j in range(len(picks)):
        axes[0, j].imshow(to_display_image(batch["image"][j])); axes[0, j].set_title(names[j], fontsize=8)
        for i, state in ((1, "normal"), (2, "abnormal")):
            axes[i, j].imshow(attn[j, i - 1].reshape(H, W).numpy(), cmap="viridis")
    axes[1, 0].set_ylabel("normal row of Z"); axes[2, 0].set_ylabel("abnormal row of Z")
    for ax in axes.flat:
        ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
    fig.suptitle(f"RCA attention over the {H}x{W} patches of layer {cfg.layers[-1]}")
    fig.tight_layout()
    S.save(fig, "rca_attention")
    plt.show()
'''),
        md(r"""
## 2 · The anomaly map, layer by layer

$$\mathbf{M}_{l,b,r} = \text{softmax}(Up(\widetilde{\mathbf{F}}_l^I \widetilde{\mathbf{F}}_{l,b,r}^{tT})) \quad (11)$$

$$\mathbf{M} = \frac{1}{LBR} \sum_{l=1}^L \sum_{b=1}^B \sum_{r=1}^R \mathbf{M}_{l,b,r} \quad (12)$$

The softmax runs over the two channels (normal, abnormal) of each pixel, so the abnormal channel equals
$\sigma(\text{logit}_a - \text{logit}_n)$. The kit computes that difference at patch resolution and upsamples it
before the sigmoid. It keeps the L·B·R maps only on request (`return_layer_maps`, `return_sample_maps`);
otherwise it averages them on the fly, so memory does not grow with R.
"""),
        code(r'''
with torch.no_grad():
    out = model(batch["image"], names, generator=torch.Generator().manual_seed(0),
                return_layer_maps=True, return_sample_maps=True)
L = len(cfg.layers)
assert out.layer_maps.shape[1] == L and out.sample_maps.shape[1] == cfg.test_samples
assert torch.allclose(out.layer_maps.mean(1), out.anomaly_map, atol=1e-5), "M must be the mean of the layer maps"
assert torch.allclose(out.sample_maps.mean(1), out.anomaly_map, atol=1e-5), "M must be the mean of the sample maps"

fig, axes = plt.subplots(L + 3, len(picks), figsize=(2.1 * len(picks), 2.1 * (L + 3)), squeeze=False)
for j in range(len(picks)):
    axes[0, j].imshow(to_display_image(batch["image"][j])); axes[0, j].set_title(names[j], fontsize=8)
    axes[1, j].imshow(np.nan_to_num(batch["mask"][j].numpy()), cmap="gray", vmin=0, vmax=1)
    for l in range(L):
        axes[2 + l, j].imshow(out.layer_maps[j, l].numpy(), cmap="jet", vmin=0, vmax=1)
    axes[L + 2, j].imshow(out.anomaly_map[j].numpy(), cmap="jet", vmin=0, vmax=1)
for i, lab in enumerate(["image", "ground truth"] + [f"layer {l}" for l in cfg.layers] + ["M (Eq. 12)"]):
    axes[i, 0].set_ylabel(lab)
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
fig.suptitle("per-layer maps and their mean (colour: probability 0-1)", fontsize=10)
fig.tight_layout()
S.save(fig, "layer_maps")
plt.show()
'''),
        md(r"""
## 3 · Image-level score: text branch and image branch

> The anomaly score in the text branch is computed as: $s_{text} = (\frac{1}{BR}) \sum_b \sum_r
> \text{softmax}(\widetilde{\mathbf{x}} \widetilde{\mathbf{Z}}_{b,r}^{tT})$, where $\mathbf{x} = \mathbf{x}_{cls} + \mathbf{x}_{patch}$
> is the global image embedding. […] The anomaly score from the image branch is derived from the maximum value of
> the anomaly map: $s_{img} = \max(\mathbf{M})$. The final image-level anomaly score is then expressed as:
> $s = s_{text} + s_{img}$. — §3.5

Over the whole target set: each image is a point ($s_{text}$, $s_{img}$). A good detector puts the anomalous
images (red) up and to the right. Table 2's classification ablations (notebook 05) remove one branch at a time.
"""),
        code(r'''
rows = []
for b, o in predict_dataset(model, target, progress=False):
    rows += [{"label": int(l), "s_text": float(t), "s_img": float(m), "s": float(s)}
             for l, t, m, s in zip(b["label"], o.text_score, o.map_max, o.image_score)]
scores = pd.DataFrame(rows)
assert np.allclose(scores["s"], scores["s_text"] + scores["s_img"], atol=1e-5)

fig, ax = plt.subplots(figsize=(5, 4))
for lab, col, name in ((0, "C0", "normal"), (1, "C3", "anomalous")):
    d = scores[scores.label == lab]
    ax.scatter(d.s_text, d.s_img, c=col, label=f"{name} ({len(d)})", s=25, alpha=0.8)
ax.set_xlabel("s_text (text branch)"); ax.set_ylabel("s_img = max(M) (image branch)"); ax.legend()
ax.set_title(f"{target_name}" + (" — random backbone: mechanics only" if S.random_backbone else ""), fontsize=9)
fig.tight_layout()
S.save(fig, "s_text_vs_s_img")
plt.show()
scores.groupby("label")[["s_text", "s_img", "s"]].mean().rename(index={0: "normal", 1: "anomalous"}).round(3)
'''),
        md(r"""
## 4 · How R shapes maps and scores: the R slider

> Monte Carlo sampling is used to sample R iterations from the initial densities […] After sampling and fusion,
> the number of prompts in each bank increases to B × R at a very low cost. — §3.3

The slider works on **cached** tensors. CLIP runs once, and one forward pass draws R_max samples and keeps one
map per sample. For a given R, the map is the mean of the first R sample maps (Eq. 12) and the score is
recomputed from them, with no model call, so the slider responds at once on a CPU. **re-draw samples** draws a
fresh set (the next seed). Row 3 shows the per-pixel standard deviation over the R sample maps: how much the
prompts disagree.
"""),
        code(r'''
r_max = max(S.scale.r_values)
r_slider, r_state = nb.r_slider_demo(model, batch["image"], names, r_max=r_max, titles=names)
display(r_state["ui"])
'''),
        code(r'''
# what the controls do, without a browser
m1 = r_state["maps"].copy()
r_slider.value = r_max                       # the slider's callback
assert r_state["R"] == r_max and not np.allclose(m1, r_state["maps"])
m_full = r_state["maps"].copy()
r_state["button"].click()                    # the button's callback: a new set of samples
assert r_state["seed"] == 1 and not np.allclose(m_full, r_state["maps"])
print("scores at R =", r_max, "after re-draw:", np.round(r_state["scores"], 3))
_ = S.save(r_state["fig"], "r_slider")
'''),
        md(r"""
The same idea as a curve: for each R, redraw the samples with several seeds and measure how much the map
$\mathbf{M}$ changes between redraws. The Monte-Carlo spread shrinks like $1/\sqrt{R}$. This is the "± std" of
Table 3, whose R sweep is regenerated in notebook 05.
"""),
        code(r'''
seeds = range(6 if S.fast else 10)
maps_by_seed = []
with torch.no_grad():
    for s in seeds:
        o = model(None, names, n_samples=r_max, features=r_state["features"], map_size=tuple(batch["image"].shape[-2:]),
                  generator=torch.Generator().manual_seed(100 + s), return_sample_maps=True)
        maps_by_seed.append(o.sample_maps.numpy())
maps_by_seed = np.stack(maps_by_seed)            # [seeds, N, R, h, w]
Rs = list(range(1, r_max + 1))
spread = [maps_by_seed[:, :, :r].mean(2).std(0).mean() for r in Rs]
fig, ax = plt.subplots(figsize=(5, 3.4))
ax.plot(Rs, spread, "o-", label="std of M over redraws (mean over pixels)")
ax.plot(Rs, spread[0] / np.sqrt(Rs), "--", color="0.5", label="spread(R=1) / √R")
ax.set_xlabel("R (Monte-Carlo samples)"); ax.set_ylabel("spread of M"); ax.legend(fontsize=8)
fig.tight_layout()
S.save(fig, "spread_vs_R")
plt.show()
assert spread[-1] < spread[0], "averaging more samples must reduce the Monte-Carlo spread"
'''),
        md(r"""
## 5 · Figure 3: image, ground truth, map, overlay

> Figure 3 visualizes anomaly maps from both industrial and medical datasets. […] the learned prompt distribution
> can cover a more comprehensive prompt space and capture the anomaly semantics in images from different novel
> categories. — §4.2

Figure-3-style panels for every target that is available here: the synthetic unseen categories and, when
present, the real MVTec-AD bottle and Kvasir samples. The colour scale is fixed (probability 0 to 1), so a
normal image looks cold, as it should. A per-image min-max scale would always show something hot.
"""),
        code(r'''
def panel(name, ds, n):
    idx = nb.pick_examples(ds, n)
    images, masks, maps, titles = [], [], [], []
    for b, o in predict_dataset(model, ds, idx, progress=False):
        images += list(b["image"]); masks += list(b["mask"]); maps += list(o.anomaly_map.numpy())
        titles += [f"{c}" for c in b["class_name"]]
    fig = figure3_panel(images, masks, maps, titles)
    fig.suptitle(f"{name}: " + ("random backbone — mechanics only" if S.random_backbone else S.provenance(model, name)), fontsize=9)
    return fig, maps

for name, ds in targets.items():
    fig, maps = panel(name, ds, S.scale.n_show)
    assert all(np.isfinite(m).all() and m.min() >= 0 and m.max() <= 1 for m in maps)
    S.save(fig, "figure3_" + name.split(" ")[0].lower().replace("-", ""))
    plt.show()
if not S.real_samples():
    print("real samples not found: their Figure-3 panels are skipped (set BPFL_SHARED_DATA)")
'''),
        md(r"""
## 6 · Figure 6: image ensemble versus text ensemble

> Given the text embeddings $\mathbf{t}_{b,r}^n$ and $\mathbf{t}_{b,r}^a$, we consider two ensemble modes: 1) Text
> ensemble, where text embeddings are averaged first and then aligned with image features; and 2) Image ensemble,
> where image features are aligned separately first, followed by averaging the anomaly scores or maps. […] As
> illustrated in Figure 6, image ensemble produces more complete detection results with higher confidence in
> anomalous regions. — §4.4

The same trained weights with `ensemble="text"`: the B·R normal (abnormal) embeddings are averaged into one
before RCA and the maps. Table 4 (notebook 05) has the numbers.
"""),
        code(r'''
text_model = S.load_variant(T, ensemble="text")
idx = nb.pick_examples(target, S.scale.n_show)
sub = collate([target[i] for i in idx])
with torch.no_grad():
    g = lambda: torch.Generator().manual_seed(0)
    img_ens = model(sub["image"], sub["class_name"], generator=g())
    txt_ens = text_model(sub["image"], sub["class_name"], generator=g())
assert txt_ens.text_embeddings.shape[2:4] == (1, 1) and img_ens.text_embeddings.shape[2] == cfg.test_samples
assert not torch.allclose(img_ens.anomaly_map, txt_ens.anomaly_map)

n = len(idx)
fig, axes = plt.subplots(4, n, figsize=(2.2 * n, 8.8), squeeze=False)
for j in range(n):
    axes[0, j].imshow(to_display_image(sub["image"][j])); axes[0, j].set_title(sub["class_name"][j], fontsize=8)
    axes[1, j].imshow(np.nan_to_num(sub["mask"][j].numpy()), cmap="gray", vmin=0, vmax=1)
    axes[2, j].imshow(overlay(sub["image"][j], img_ens.anomaly_map[j].numpy()))
    axes[3, j].imshow(overlay(sub["image"][j], txt_ens.anomaly_map[j].numpy()))
for i, lab in enumerate(["image", "ground truth", "image ensemble", "text ensemble"]):
    axes[i, 0].set_ylabel(lab)
for ax in axes.flat:
    ax.set_xticks([]); ax.set_yticks([]); ax.grid(False)
fig.suptitle("Figure 6 — ensemble modes" + (" (random backbone: mechanics only)" if S.random_backbone else ""), fontsize=10)
fig.tight_layout()
S.save(fig, "figure6_ensembles")
plt.show()
'''),
        md(r"""
## 7 · Why the pretraining matters: a random backbone versus the kit's toy CLIP

Zero-shot transfer rests on CLIP's pretraining: its patch features already separate "damaged" from "flawless",
and Bayes-PFL only learns prompts on top of them. Without internet there is no CLIP, so the kit pretrains a small
one itself, on generated, captioned surfaces, with the synthetic dataset's *unseen* surface families held out
(`bpfl pretrain-toy-clip`, [docs/toy_clip.md](../docs/toy_clip.md)). Below, the same Bayes-PFL recipe on the
same architecture, once with random weights and once with the toy CLIP, trained on the seen categories and
tested on the unseen ones, next to a training-free classical detector (local mean/variance statistics).

First the committed measurement (`benchmarks/toy_clip_transfer.py`, several seeds, the full teaching schedule);
then, when a toy CLIP checkpoint exists on this machine, a live run with this notebook's epochs and its maps. The
live run uses the kit's *default* synthetic split (80 unseen test images), even in fast mode: on the fast mode's
tiny set (6 images per category) image AUROC takes only a few values and swings from chance to 1.0 with the
training seed. It trains each backbone for 84 steps (6 epochs of 56 seen images) in fast mode.
"""),
        code(r'''
from bpfl.toyclip import ensure_toy_clip
from bpfl.toyclip.transfer import compare_backbones, measured_table

measured = measured_table()
if measured is not None:
    display(Markdown("**Measured** (`benchmarks/results/toy_clip_transfer.md`; 320 test images of the unseen categories, "
                     "mean over categories, ± over runs: training seeds, times 3 pretrainings of the toy CLIP; "
                     "95 % interval over the test images):"))
    display(measured)
toy_path = ensure_toy_clip()     # $BPFL_CACHE/toyclip/bpfl-toy-seed0.pt, or None
if toy_path is None:
    print("No toy CLIP checkpoint on this machine: build it once with `bpfl pretrain-toy-clip` "
          "(15-35 min on 2 CPU cores) and run this cell again for the live comparison and its maps.")
else:
    cmp = compare_backbones(toy_path, S.synthetic_root("default"), S.checkpoint_root / "toy-vs-random",
                            seeds=S.scale.seeds[:1], epochs=cfg.epochs, n_show=S.scale.n_show)
    display(Markdown(f"**Live** ({cfg.epochs} epochs, seed {S.scale.seeds[0]}, "
                     f"{cmp.n_test_images} test images of the unseen categories):"))
    display(cmp.table)
    fig = cmp.figure()
    S.save(fig, "random_vs_toy_clip")
    plt.show()
    assert cmp.table.loc[:, ["pixel AUROC", "image AUROC"]].stack().between(0, 1).all()
'''),
        *summary([
            "RCA (Eq. 10) moves each text embedding towards the patches it attends to, with a residual connection. "
            "The hand-written version equals the kit's.",
            "M (Eq. 12) is the plain mean of L·B·R per-pair maps. The layer means and the sample means both give "
            "back M exactly.",
            "s = s_text + max(M). The two branches come from different features (x vs patches) and can disagree.",
            "More samples R give a smoother, more stable M, and its Monte-Carlo spread shrinks like 1/√R. The "
            "slider works on cached tensors, so it costs no model calls.",
            "The text ensemble averages the embeddings first, and the image ensemble (the paper's default) averages "
            "the maps.",
            "Transfer to unseen categories comes from the backbone's pretraining: on random weights Bayes-PFL's maps "
            "are near chance there (pixel AUROC ≈ 0.54), on the kit's toy CLIP they reach ≈ 0.90, and image AUROC "
            "≈ 0.88 (section 7's measured table). A classical detector of local statistics matches the toy CLIP on "
            "pixels and stays behind it on whole images (≈ 0.81).",
        ], [
            "In the R slider, find an image whose score changes most between R = 1 and R = R_max. Is its s_text or "
            "its s_img the unstable part?",
            "Turn RCA off for inference only (`S.load_variant(T, use_rca=False)` fails: why?). Then train a model "
            "without RCA (`with_ablations(cfg, [\"no-rca\"])`) and compare its layer maps with these.",
            "Draw the Figure-3 panels with `norm=\"per-image\"` (`figure3_panel(..., norm=\"per-image\")`). Why is "
            "this misleading for the normal image?",
            "With the released code's `map_sigma=8` (Gaussian smoothing before the pixel metrics), how do the maps "
            "look at fast-mode resolution? Is σ = 8 px meaningful at 112 px?",
        ]),
    ]


# =============================================================================================== 05
def nb05() -> list[dict]:
    return [
        header("05", "Ablations: Tables 2, 3, 4 and Figure 5, regenerated", [
            "train the paper's ablations through named configuration switches (`bpfl.config.ABLATIONS`)",
            "regenerate Table 2 (modules, loss, classification), Table 3 (R sweep with mean ± std and time per "
            "image) and Table 4 (ensemble mode), each printed next to the paper's values",
            "regenerate Figure 5 (ISD-IAD against ISD-ISD and IAD-IAD) as a bar chart",
            "read a results table critically: provenance, seeds, scale",
        ], "≈ 1 min (9 short trainings)", "≈ 2-4 h (9 trainings × 20 epochs)"),
        setup_cell("05_ablations", "import time\nimport warnings\nfrom bpfl.config import ABLATIONS, with_ablations\nfrom bpfl.evaluate import evaluate_seeds, markdown_table"),
        md(r"""
The paper runs every ablation on MVTec-AD after training on VisA, with ViT-L-14-336. This notebook runs the same
ablations with the mode's backbone, training set and target. Every table carries a provenance column
(backbone, weights, R, K, seeds, dataset) and shows the paper's value in its own column. **At fast-mode scale
with a random backbone, the kit's numbers test the mechanics of the ablations (does each switch remove what it
should, does everything run) and say nothing about which design is better.** With pretrained weights and real
data (paper mode), the same cells regenerate the tables.
"""),
        code(r'''
aux = S.aux_dataset()
targets = S.targets()
target_name, target = next(iter(targets.items()))   # the paper's Tables 2-4: MVTec-AD; here the first target
seeds = S.seeds
base = S.train_or_load()                              # the full model (cached by notebook 03)
METRICS = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap"]
NAMES = ["img AUROC", "img AP", "px AUROC", "px AP"]
print(f"train: {S.aux_name()} ({len(aux)} images) -> test: {target_name} ({len(target)} images); seeds {list(seeds)}")
if S.random_backbone:
    print(nb.MECHANICS_NOTE)

def kit_metrics(model, n_samples=None):
    """mean and std over the Monte-Carlo seeds of the category-mean metrics (evaluate_seeds)"""
    return evaluate_seeds(model, target, seeds, n_samples=n_samples, progress=False, dataset_name=target_name)

def table_row(label, summary, paper, model, metrics=METRICS):
    row = {"setting": label}
    for m, short, p in zip(METRICS, NAMES, paper):
        row[f"kit {short}"] = nb.format_pct(summary.at[m, "mean"], summary.at[m, "std"]) if m in metrics else "—"
        row[f"paper {short}"] = nb.format_paper(p)
    row["provenance"] = S.provenance(model, target_name)
    return row
'''),
        md(r"""
## 1 · Table 2, module and loss ablations

> The module ablation study shows that ZSAD performance declines when the RCA module or any distribution type in
> the prompt flow module is removed. Notably, omitting ISD results in a greater performance drop than omitting IAD
> in all metrics […] Not using the orthogonal loss $\mathcal{L}_{ort}$ also leads to a decrease of approximately 1%
> in both image-level and pixel-level metrics. — §4.4

Each ablation is a named set of configuration changes. Each is trained on the same auxiliary set, with the same
seed and epochs as the full model, and then tested zero-shot. Before any number is read, the cell checks
that each switch removed what it should.
"""),
        code(r'''
module_ablations = ["no-isd", "no-iad", "no-isd-iad", "no-rca", "no-ort"]
print(pd.Series({a: ABLATIONS[a] for a in module_ablations}, name="config changes").to_frame())
trained = {None: base}
for name in module_ablations:
    trained[name] = S.train_or_load(with_ablations(cfg, [name]), name=f"ablation-{name}")

m = {k: v.model for k, v in trained.items()}
assert m["no-isd"].context_flow is None and m["no-isd"].normal_flow is not None
assert m["no-iad"].normal_flow is None and m["no-iad"].context_flow is not None
assert m["no-isd-iad"].context_flow is None and m["no-isd-iad"].normal_flow is None
assert m["no-rca"].rca is None and m[None].rca is not None
assert "ort" not in trained["no-ort"].history.columns and "ort" in base.history.columns
print("each ablation removed what it should ✓")
'''),
        md(r"""
## 2 · Table 2, classification ablations

> In the classification ablation study, the best performance is achieved when all components are included. This
> suggests that the results from the text and image branches complement each other, and integrating fine-grained
> patch features into the global image features $\mathbf{x}_{cls}$ from the vanilla CLIP model helps enhance
> classification performance. — §4.4

Removing $\mathbf{x}_{cls}$ or $\mathbf{x}_{patch}$ changes $\mathbf{x}$, which conditions the ISD and the text branch,
so the model must be retrained. Removing $s_{text}$ or $s_{img}$ changes only the final sum, so the trained
weights are reused and only the score changes. The paper reports image-level metrics only for these rows.
"""),
        code(r'''
for name in ["no-x-cls", "no-x-patch"]:
    trained[name] = S.train_or_load(with_ablations(cfg, [name]), name=f"ablation-{name}")
variants = {name: S.load_variant(base, **ABLATIONS[name]) for name in ["no-s-text", "no-s-img"]}

from bpfl.data import collate
probe = collate([target[i] for i in range(min(4, len(target)))])
with torch.no_grad():
    o = variants["no-s-text"](probe["image"], probe["class_name"], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(o.image_score, o.map_max), "w/o s_text the score must be max(M)"
    o = variants["no-s-img"](probe["image"], probe["class_name"], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(o.image_score, o.text_score), "w/o s_img the score must be s_text"

rows = []
for name in [None] + module_ablations + ["no-x-cls", "no-x-patch", "no-s-text", "no-s-img"]:
    label = nb.TABLE2_ROWS[name]
    model = variants[name] if name in variants else trained[name].model
    only_image = name in ("no-x-cls", "no-x-patch", "no-s-text", "no-s-img")
    rows.append(table_row(label, kit_metrics(model), nb.PAPER_TABLE2[label], model,
                          METRICS[:2] if only_image else METRICS))
table2 = pd.DataFrame(rows).set_index("setting")
caption = (f"Table 2 (kit, {target_name}; metrics in %, mean ± std over seeds {list(seeds)}). Paper: MVTec-AD, ViT-L-14-336."
           + (f" {nb.MECHANICS_NOTE}" if S.random_backbone else ""))
S.save_table(table2, "table2", caption)
display(Markdown(f"**{caption}**\n\n" + markdown_table(table2)))
'''),
        code(r'''
def mean_of(cell):
    return float(cell.split(" ± ")[0]) if cell not in ("—", "n/a") else np.nan

plot_rows = [r for r in table2.index if r != "Bayes-PFL"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=False)
for ax, short in zip(axes, ["img AUROC", "px AUROC"]):
    kit = np.array([mean_of(table2.at[r, f"kit {short}"]) - mean_of(table2.at["Bayes-PFL", f"kit {short}"]) for r in plot_rows])
    paper = np.array([(nb.PAPER_TABLE2[r][NAMES.index(short)] or np.nan) - nb.PAPER_TABLE2["Bayes-PFL"][NAMES.index(short)]
                      if nb.PAPER_TABLE2[r][NAMES.index(short)] is not None else np.nan for r in plot_rows])
    xs = np.arange(len(plot_rows))
    ax.bar(xs - 0.2, kit, 0.4, label="kit (this run)")
    ax.bar(xs + 0.2, paper, 0.4, label="paper (MVTec-AD)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(xs, plot_rows, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel(f"Δ {short} vs full model (points)"); ax.legend(fontsize=8)
fig.suptitle("Table 2 as differences to the full model" + (" — kit: random backbone, mechanics only" if S.random_backbone else ""), fontsize=10)
fig.tight_layout()
S.save(fig, "table2_deltas")
plt.show()
'''),
        md(r"""
## 3 · Table 3, the number of samples R at test time

> the standard deviation and average inference time per image (calculated from 50 images) are reported to assess
> the stability of the results and inference efficiency. As the number of sampling iterations increases, our
> method demonstrates improved zero-shot generalization performance and stability, but at the cost of longer
> inference times. Consequently, we identified a trade-off at R = 10 — §4.4

The trained full model, evaluated at each R with several Monte-Carlo seeds (mean ± std over seeds), plus the
full inference time per image (CLIP, prompts, maps; batch size 1; mean ± std over images) on this machine.
"""),
        code(r'''
rows, curves = [], []
for R in S.scale.r_values:
    summ = kit_metrics(base.model, n_samples=R)
    t_mean, t_std = nb.time_per_image(base.model, target, R, n_images=S.scale.timing_images)
    paper = nb.PAPER_TABLE3.get(R)
    row = {"R": R}
    for j, (mname, short) in enumerate(zip(METRICS, NAMES)):
        row[f"kit {short}"] = nb.format_pct(summ.at[mname, "mean"], summ.at[mname, "std"])
        row[f"paper {short}"] = nb.format_paper(paper[j]) if paper else "—"
    row["kit time (ms)"] = f"{t_mean:.1f} ± {t_std:.1f}"
    row["paper time (ms)"] = nb.format_paper(paper[4]) if paper else "—"
    row["provenance"] = S.provenance(base.model, target_name, n_samples=R) + f", {S.device}"
    rows.append(row)
    curves.append({"R": R, **{m: summ.at[m, "mean"] for m in METRICS}, **{m + "_std": summ.at[m, "std"] for m in METRICS},
                   "ms": t_mean, "ms_std": t_std})
table3 = pd.DataFrame(rows).set_index("R")
curves = pd.DataFrame(curves)
assert np.isfinite(curves["ms"]).all() and (curves["ms"] > 0).all()
caption = (f"Table 3 (kit, {target_name}; mean ± std over seeds {list(seeds)}; time per image on {S.device}). "
           "Paper: MVTec-AD, ViT-L-14-336, RTX 3090." + (f" {nb.MECHANICS_NOTE}" if S.random_backbone else ""))
S.save_table(table3, "table3", caption)
display(Markdown(f"**{caption}**\n\n" + markdown_table(table3)))
'''),
        code(r'''
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for ax, mname, short in ((axes[0], "image_auroc", "img AUROC"), (axes[1], "pixel_ap", "px AP")):
    ax.errorbar(curves.R, 100 * curves[mname], yerr=100 * curves[mname + "_std"], marker="o", capsize=3, label="kit")
    pr = [R for R in nb.PAPER_TABLE3]
    j = METRICS.index(mname)
    ax.errorbar(pr, [nb.PAPER_TABLE3[R][j][0] for R in pr], yerr=[nb.PAPER_TABLE3[R][j][1] for R in pr], marker="s",
                capsize=3, label="paper (MVTec-AD)", alpha=0.7)
    ax.set_xlabel("R"); ax.set_ylabel(f"{short} (%)"); ax.legend(fontsize=8)
axes[2].errorbar(curves.R, curves.ms, yerr=curves.ms_std, marker="o", capsize=3, label=f"kit ({S.device})")
axes[2].plot(list(nb.PAPER_TABLE3), [v[4][0] for v in nb.PAPER_TABLE3.values()], "s-", alpha=0.7, label="paper (3090)")
axes[2].set_xlabel("R"); axes[2].set_ylabel("ms per image"); axes[2].legend(fontsize=8)
fig.suptitle("Table 3 as curves" + (" — kit: random backbone, mechanics only" if S.random_backbone else ""), fontsize=10)
fig.tight_layout()
S.save(fig, "table3_curves")
plt.show()
'''),
        md(r"""
## 4 · Table 4, ensemble mode

> The results show that image ensemble outperforms text ensemble while maintaining comparable inference
> efficiency. — §4.4

The same weights, two inference modes (notebook 04, §6).
"""),
        code(r'''
R = cfg.test_samples
rows = []
for mode_name, model in (("text", S.load_variant(base, ensemble="text")), ("image", base.model)):
    summ = kit_metrics(model)
    t_mean, t_std = nb.time_per_image(model, target, R, n_images=S.scale.timing_images)
    paper = nb.PAPER_TABLE4[mode_name]
    row = {"ensemble": f"{mode_name} ensemble"}
    for j, (mname, short) in enumerate(zip(METRICS, NAMES)):
        row[f"kit {short}"] = nb.format_pct(summ.at[mname, "mean"], summ.at[mname, "std"])
        row[f"paper {short}"] = nb.format_paper(paper[j])
    row["kit time (ms)"] = f"{t_mean:.1f} ± {t_std:.1f}"
    row["paper time (ms)"] = nb.format_paper(paper[4])
    row["provenance"] = S.provenance(model, target_name) + f", {S.device}"
    rows.append(row)
table4 = pd.DataFrame(rows).set_index("ensemble")
caption = (f"Table 4 (kit, {target_name}; mean ± std over seeds {list(seeds)})." + (f" {nb.MECHANICS_NOTE}" if S.random_backbone else ""))
S.save_table(table4, "table4", caption)
display(Markdown(f"**{caption}**\n\n" + markdown_table(table4)))
'''),
        md(r"""
## 5 · Figure 5, ISD-IAD against ISD-ISD and IAD-IAD

> In Bayes-PFL, ISD and IAD are modeled in the context and state word embedding spaces, respectively, referred to
> collectively as ISD-IAD. A natural question arises: why not use ISD-ISD or IAD-IAD instead? In Figure 5, we
> compare the absolute AP improvement achieved by using ISD-IAD over ISD-ISD and IAD-IAD across six industrial
> datasets. […] It can be observed that all metrics are positive — §4.3

The paper gives these improvements only as bars in a figure, not as numbers in the text. The comparison
below is the sign: positive means that ISD-IAD is better. It covers every target available here with pixel
masks, with image AP where a target has normal images.
"""),
        code(r'''
for name in ["isd-isd", "iad-iad"]:
    trained[name] = S.train_or_load(with_ablations(cfg, [name]), name=f"ablation-{name}")
assert trained["isd-isd"].model.config.state_distribution == "isd" and trained["iad-iad"].model.config.context_distribution == "iad"

rows = []
for tname, ds in targets.items():
    res = {}
    for design, tr in (("ISD-IAD", base), ("ISD-ISD", trained["isd-isd"]), ("IAD-IAD", trained["iad-iad"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # image metrics of an all-anomalous set are undefined (NaN)
            res[design] = evaluate_seeds(tr.model, ds, seeds, progress=False, dataset_name=tname)["mean"]
    for metric, short in (("image_ap", "image AP"), ("pixel_ap", "pixel AP")):
        for other in ("ISD-ISD", "IAD-IAD"):
            delta = 100 * (res["ISD-IAD"][metric] - res[other][metric])
            rows.append({"dataset": tname, "metric": short, "vs": other, "Δ AP (points)": delta,
                         "paper": "> 0 (Fig. 5, six industrial datasets)", "provenance": S.provenance(base.model, tname)})
fig5 = pd.DataFrame(rows).dropna(subset=["Δ AP (points)"])
S.save_table(fig5.set_index(["dataset", "metric", "vs"]), "figure5", "Figure 5 (kit): AP of ISD-IAD minus AP of the alternative, in points")
print("paper: all improvements > 0 (Figure 5; six industrial datasets, values given only as bars)")
print("provenance:", S.provenance(base.model, "each dataset below"))
display(fig5.pivot_table(index=["dataset", "metric"], columns="vs", values="Δ AP (points)", sort=False).round(2))

labels = [f"{d}\n{m}" for d, m in dict.fromkeys(zip(fig5.dataset, fig5.metric))]
xs = np.arange(len(labels))
fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels)), 3.8))
for k, (other, col) in enumerate((("ISD-ISD", "C0"), ("IAD-IAD", "C1"))):
    vals = [fig5[(fig5.dataset == d) & (fig5.metric == m) & (fig5.vs == other)]["Δ AP (points)"].iloc[0]
            for d, m in dict.fromkeys(zip(fig5.dataset, fig5.metric))]
    ax.bar(xs + (k - 0.5) * 0.38, vals, 0.38, label=f"ISD-IAD vs {other}", color=col)
ax.axhline(0, color="k", lw=0.8)
ax.set_xticks(xs, labels, fontsize=7); ax.set_ylabel("Δ AP (points)"); ax.legend(fontsize=8)
ax.set_title("Figure 5 (kit): > 0 means ISD-IAD is better" + (" — random backbone: mechanics only" if S.random_backbone else ""), fontsize=9)
fig.tight_layout()
S.save(fig, "figure5")
plt.show()
'''),
        *summary([
            "Every ablation of the paper is a named configuration change (`ABLATIONS`, `with_ablations`), "
            "trained and tested exactly like the full model. A check confirms that each removes what it names.",
            "Table 2's $s_{text}$/$s_{img}$ rows need no retraining; the $\\mathbf{x}_{cls}$/$\\mathbf{x}_{patch}$ rows do.",
            "Table 3 is a Monte-Carlo question: metrics and their spread over seeds as a function of R, against the "
            "time per image.",
            "Every table carries its provenance and the paper's values side by side. At fast-mode scale with a random "
            "backbone, only the mechanics can be read from them.",
        ], [
            "Add a row to Table 2 for the released code's RCA (`rca_heads=4, rca_bias=True, "
            "rca_normalize_output=True`). Which `SWITCHES` entry documents each of the three?",
            "Re-run Table 3 with 5 seeds (`nb.SCALES` or a longer `seeds` list). Does the std at R = 1 shrink "
            "with more seeds? Should it?",
            "Time per image grows with R, but not in proportion. Which parts of the pipeline do not depend on R? "
            "(Look at `BayesPFL.forward`.)",
            "With `BPFL_AUX_DATA` pointing at VisA and `BPFL_TARGETS=\"MVTec-AD=/data/mvtec\"` on a GPU in paper "
            "mode, this notebook regenerates Tables 2-4 at the paper's scale. Estimate the run time from fast-mode "
            "numbers and Table 3's timings.",
        ]),
    ]


# =============================================================================================== 06
def nb06() -> list[dict]:
    return [
        header("06", "Benchmark (Table 1) and training dynamics (Figure 4)", [
            "fill Table 1's layout (datasets × image/pixel metrics) for every dataset available here, next to the "
            "paper's values",
            "know which metrics are defined for which dataset (all-anomalous sets: pixel metrics only)",
            "regenerate Figure 4, pixel AP per training epoch, for Bayes-PFL and, once `bpfl.prompt_designs` exists, "
            "APRIL-GAN+ and AnomalyCLIP+",
        ], "≈ 30 s", "≈ 1-3 h (Figure 4: 3 trainings with an evaluation after every epoch)"),
        setup_cell("06_benchmark_and_figure4", "import warnings\nfrom bpfl.evaluate import PAPER_TABLE1, evaluate, evaluate_seeds, markdown_table"),
        md(r"""
## 1 · Table 1

> For classification, we report image-level metrics: Area Under the Receiver Operating Characteristic (AUROC), the
> maximum F1 score at the optimal threshold (F1-Max) and the average precision (AP). For segmentation, pixel-level
> AUROC, AP and Per-Region Overlap (PRO) are employed to evaluate the model's ability. — §4.1

> All experiments are conducted on a single NVIDIA 3090 GPU, with 5 random seeds selected. The experimental
> results are the averages of different object categories from the target dataset. — §4.1

The kit computes every metric per category and then averages over categories, as the field's tables do. PRO is
the MVTec AUPRO (FPR ≤ 0.3, see `bpfl.metrics`). Each row is one dataset available here. The paper's row is
shown where the paper has the dataset: the MVTec-AD *sample* is one category with 10 images, and the paper's
MVTec-AD row averages 15 categories and 1725 images, so the two are not comparable. Kvasir has only anomalous
images, so its image-level metrics are undefined (n/a), as in the paper, which reports only pixel metrics for it.
"""),
        code(r'''
base = S.train_or_load()
model = base.model
targets = S.targets()
PAPER_NAME = {"MVTec-AD (bottle sample)": "MVTec-AD", "Kvasir (sample)": "Kvasir"}

def triple(summary, keys):
    return "(" + ", ".join(nb.format_pct(summary.at[k, "mean"]) for k in keys) + ")"

rows, raw = [], {}
for name, ds in targets.items():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # undefined metrics (one class only) are NaN, with a warning
        summ = evaluate_seeds(model, ds, S.seeds, progress=False, dataset_name=name)
    raw[name] = summ
    paper = nb.paper_table1(PAPER_NAME.get(name, name))
    rows.append({
        "dataset": name, "images": len(ds), "categories": len(ds.categories),
        "kit image (AUROC, F1-max, AP)": triple(summ, ["image_auroc", "image_f1_max", "image_ap"]),
        "paper image": nb.format_paper(paper.get("image")),
        "kit pixel (AUROC, PRO, AP)": triple(summ, ["pixel_auroc", "pixel_aupro", "pixel_ap"]),
        "paper pixel": nb.format_paper(paper.get("pixel")),
        "provenance": S.provenance(model, name),
    })
table1 = pd.DataFrame(rows).set_index("dataset")
for name, summ in raw.items():
    vals = summ["mean"].dropna()
    assert ((vals >= 0) & (vals <= 1)).all(), name
    if name.startswith("Kvasir"):
        assert np.isnan(summ.at["image_auroc", "mean"]), "an all-anomalous set has no image AUROC"
caption = (f"Table 1 layout (kit; metrics in %, mean over seeds {list(S.seeds)}; trained on {S.aux_name()}). "
           "Paper: Bayes-PFL column, ViT-L-14-336, trained on VisA." + (f" {nb.MECHANICS_NOTE}" if S.random_backbone else ""))
S.save_table(table1, "table1", caption)
display(Markdown(f"**{caption}**\n\n" + markdown_table(table1)))
'''),
        md(r"""
The paper's full Table 1 (Bayes-PFL column) for reference. `bpfl.evaluate.PAPER_TABLE1` holds the industrial rows
and `bpfl.notebook.PAPER_TABLE1_MEDICAL` the medical rows that the kit transcribes.
"""),
        code(r'''
paper_rows = {**PAPER_TABLE1, **nb.PAPER_TABLE1_MEDICAL}
pd.DataFrame({k: {"image (AUROC, F1-max, AP)": nb.format_paper(v.get("image")),
                  "pixel (AUROC, PRO, AP)": nb.format_paper(v.get("pixel"))} for k, v in paper_rows.items()}).T
'''),
        code(r'''
names = list(raw)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (metric, level, j, title) in zip(axes, (("image_auroc", "image", 0, "image AUROC"), ("pixel_auroc", "pixel", 0, "pixel AUROC"))):
    kit = [100 * raw[n].at[metric, "mean"] for n in names]
    err = [100 * raw[n].at[metric, "std"] for n in names]
    paper = [(nb.paper_table1(PAPER_NAME.get(n, n)).get(level) or (np.nan,))[j] for n in names]
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, kit, 0.4, yerr=err, capsize=3, label="kit (this run)")
    ax.bar(xs + 0.2, paper, 0.4, label="paper (full dataset)")
    ax.axhline(50, color="0.5", ls="--", lw=0.8, label="chance")
    ax.set_xticks(xs, [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel(f"{title} (%)"); ax.set_ylim(0, 100); ax.legend(fontsize=7)
fig.suptitle("Table 1 (kit vs paper)" + (" — kit: random backbone, mechanics only" if S.random_backbone else ""), fontsize=10)
fig.tight_layout()
S.save(fig, "table1")
plt.show()
'''),
        md(r"""
## 2 · Figure 4: pixel AP per training epoch

> In Figure 4, we compare APRIL-GAN and AnomalyCLIP, which employ two different text prompt design strategies,
> with our Bayes-PFL across various training epochs. The pixel-level AP during testing is reported to evaluate
> ZSAD performance. For a fair comparison, we modify these methods by replacing only their text prompt designs
> while keeping all other components identical to Bayes-PFL. These modified versions are referred to as
> APRIL-GAN+ and AnomalyCLIP+, respectively. Our Bayes-PFL achieves stable and consistently improving AP
> throughout training […] In contrast, APRIL-GAN+ and AnomalyCLIP+ exhibit performance declines after reaching
> their peak AP values — §4.2

In the kit, a design is one configuration field, `prompt_design` ∈ {`"bayes-pfl"`, `"aprilgan+"`,
`"anomalyclip+"`, `"winclip"`}. The alternatives are implemented in `bpfl.prompt_designs`. When that module
cannot be imported, the cells below say so and plot only Bayes-PFL; they **wait for it** and do not fail.
Each training run evaluates pixel AP on the target after every epoch (the `epoch_callback` of
`bpfl.train.train`). This evaluation reads target data, but only to draw the curve: the checkpoint is always the
last epoch's (`selection="last"`).
"""),
        code(r'''
PD_OK, PD_WHY = nb.prompt_designs_available()
fig4_name, fig4_target = next((n, d) for n, d in targets.items() if d.has_masks)
print(f"prompt designs: {PD_WHY}")
print(f"Figure 4 target: {fig4_name} (paper: MVTec-AD)")
if not PD_OK:
    print("WAITING for bpfl.prompt_designs: the APRIL-GAN+ and AnomalyCLIP+ curves (next cell) are skipped; "
          "the Bayes-PFL curve and the plot still run.")

def pixel_ap_each_epoch(epoch, m):
    res = evaluate(m, fig4_target, progress=False, aupro_variant=None, dataset_name=fig4_name)
    return {"pixel_ap": res.mean("pixel_ap"), "image_auroc": res.mean("image_auroc")}
'''),
        code(r'''
curves = {}
fails = {}
designs = [("Bayes-PFL", "bayes-pfl"), ("APRIL-GAN+", "aprilgan+"), ("AnomalyCLIP+", "anomalyclip+")]
for label, design in designs:
    if design != "bayes-pfl" and not PD_OK:
        print(f"{label}: skipped, waits for bpfl.prompt_designs")
        continue
    try:
        tr = S.train_or_load(cfg.replace(prompt_design=design), name=f"fig4-{design}", epoch_callback=pixel_ap_each_epoch)
        curves[label] = tr.history[["epoch", "pixel_ap", "image_auroc"]]
    except Exception as e:  # a design still under construction must not stop the notebook
        fails[label] = f"{type(e).__name__}: {e}"
        print(f"{label}: could not be trained ({fails[label][:200]}); skipped")
assert "Bayes-PFL" in curves and len(curves["Bayes-PFL"]) == cfg.epochs
fig4_table = pd.concat({f"{k} {m.replace('_', ' ')}": v.set_index("epoch")[m] for k, v in curves.items()
                        for m in ("pixel_ap", "image_auroc")}, axis=1)
fig4_table.round(4)
'''),
        code(r'''
fig, ax = plt.subplots(figsize=(6, 3.8))
for (label, df), marker in zip(curves.items(), "osd"):
    ax.plot(df.epoch, 100 * df.pixel_ap, marker=marker, label=label)
ax.set_xlabel("training epoch"); ax.set_ylabel(f"pixel AP (%) on {fig4_name}")
missing = [l for l, _ in designs if l not in curves]
note = f" (not shown: {', '.join(missing)})" if missing else ""
ax.set_title("Figure 4 (kit)" + note + (" — random backbone: mechanics only" if S.random_backbone else ""), fontsize=9)
ax.legend(fontsize=8, loc="best")
fig.tight_layout()
S.save(fig, "figure4")
S.save_table(fig4_table, "figure4",
             f"Figure 4 (kit): per-epoch metrics on {fig4_name}; {S.provenance(model, fig4_name)}")
plt.show()
'''),
        *summary([
            "Table 1 is computed per category, averaged over categories and over seeds. The kit fills its layout "
            "for every dataset that is available, and the paper's values stand in their own columns.",
            "All-anomalous datasets (Kvasir, ClinicDB, ISIC, …) have pixel metrics only. Their image metrics are NaN "
            "and are never counted as 0.",
            "Figure 4 is a per-epoch evaluation during training. The design under comparison is one configuration "
            "field (`prompt_design`), and everything else stays identical, as the paper requires.",
        ], [
            "Add your own dataset to Table 1 with `BPFL_TARGETS=\"Mine=/path/to/data\"` (any layout "
            "`bpfl.data.open_dataset` reads) and re-run the first cell.",
            "Compare `pixel_aupro` with the cflow-ad variant (`aupro_variant=(\"mvtec\", \"cflow\")` in "
            "`evaluate`). Why can the two disagree by many points on the same maps?",
            "Add the `winclip` design to Figure 4 (it needs `bpfl.prompt_designs`). It has no trainable text "
            "part. What does its curve measure, then?",
            "The paper picks no epoch: it trains 20 and reports the last. Look at your Figure 4 curves. Which epoch "
            "would a `selection=\"released-target\"` rule pick, and why is that leakage?",
        ]),
    ]


NOTEBOOKS = {
    "00_overview_and_setup": nb00,
    "01_prompt_banks": nb01,
    "02_prompt_flow_density": nb02,
    "03_elbo_training": nb03,
    "04_inference_and_maps": nb04,
    "05_ablations": nb05,
    "06_benchmark_and_figure4": nb06,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOKS[name]()
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
        if cell.cell_type == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell["metadata"] = {}
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else HERE
    for name in NOTEBOOKS:
        path = out / f"{name}.ipynb"
        path.write_text(render(name))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
