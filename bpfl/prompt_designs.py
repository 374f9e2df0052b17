"""Text-prompt designs as interchangeable parts of one pipeline (paper §2.2, §4.2 and Figure 4).

Figure 4 compares Bayes-PFL with APRIL-GAN+ and AnomalyCLIP+: "we modify these methods by replacing only their
text prompt designs while keeping all other components identical to Bayes-PFL". This module provides those
designs. Each is an ``nn.Module`` that :class:`bpfl.model.BayesPFL` calls instead of its prompt banks and flows
when ``config.prompt_design != "bayes-pfl"``::

    text, kl = design(model, feats, x, class_names, n_samples, generator)
    # text: [N, 2, R, B, C] unit-norm embeddings (index 0 normal, 1 abnormal); kl: {} (no distribution)

Everything else stays the same: backbone, per-layer projections, x_patch, RCA, maps, losses and metrics.

================  =========================================================  ==================================
design            text prompts                                               trainable text part
================  =========================================================  ==================================
``winclip``       compositional ensemble: WinCLIP-style templates × state    none (deterministic, cached per
                  words, embeddings averaged per state (R = B = 1)           class name)
``aprilgan+``     APRIL-GAN-style ensemble: a larger list of templates ×     none; the kit's projections, RCA
                  state words, averaged per state (R = B = 1)                etc. train as usual
``anomalyclip+``  object-agnostic ``[V1..Vz][state word][object]`` with      the z learnable vectors per state
                  learnable V per state, fixed words (R = B = 1)
``bayes-pfl``     the paper's prompt banks + ISD/IAD flows (not in this      prompt banks and flows
                  module: ``BayesPFL`` handles it itself)
================  =========================================================  ==================================

The word lists below are the kit's own (written for this kit in the spirit of the WinCLIP and APRIL-GAN papers:
a set of normal and abnormal *state* phrases with a ``{}`` slot for the object, composed with *templates*). A
handcrafted design has no trainable text part, so a ``winclip`` model gives the same maps on every call; it can
be used untrained (with pretrained CLIP, :func:`init_projections_from_clip` gives the per-layer projections a
training-free start from CLIP's own ``ln_post`` + ``proj``).

:func:`compare_prompt_designs` trains one model per design with a per-epoch evaluation
(:func:`bpfl.train.per_epoch_eval`) and returns the pixel-AP-vs-epoch table behind Figure 4.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ClipBackbone, ImageFeatures, load_backbone
from .config import BayesPFLConfig
from .model import BayesPFL, register_prompt_design
from .prompts import class_tokens, encode_prompts, prompt_class_name
from .train import per_epoch_eval, seed_everything, train

__all__ = [
    "PROMPT_DESIGNS", "WINCLIP_STATES", "WINCLIP_TEMPLATES", "APRILGAN_STATES", "APRILGAN_TEMPLATES",
    "PromptDesign", "HandcraftedEnsemble", "WinCLIPDesign", "AprilGANPlusDesign", "AnomalyCLIPPlusDesign",
    "build_prompt_design", "init_projections_from_clip", "compare_prompt_designs", "plot_design_curves",
]

# ------------------------------------------------------------------------------------------ word lists
#: WinCLIP-style compositional prompt ensemble: state phrases (``{}`` = the object) ...
WINCLIP_STATES: dict[str, tuple[str, ...]] = {
    "normal": ("{}", "normal {}", "intact {}", "pristine {}", "{} in good condition",
               "{} with no defects", "{} free of damage"),
    "abnormal": ("defective {}", "damaged {}", "{} with a defect", "{} with damage", "{} with a flaw",
                 "faulty {}"),
}
#: ... composed with these templates (``{}`` = a state phrase).
WINCLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a cropped photo of a {}.", "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
    "a blurry photo of a {}.", "a low resolution photo of the {}.", "a picture of a {}.", "an image of the {}.",
    "there is a {} in the scene.", "this is a photo of a {}.",
)

#: APRIL-GAN-style ensemble: more templates (industrial inspection wording) and state phrases.
APRILGAN_STATES: dict[str, tuple[str, ...]] = {
    "normal": ("{}", "flawless {}", "perfect {}", "normal {}", "{} without defect", "{} without damage",
               "undamaged {}"),
    "abnormal": ("damaged {}", "broken {}", "{} with a defect", "{} with damage", "anomalous {}",
                 "{} with an anomaly"),
}
APRILGAN_TEMPLATES: tuple[str, ...] = WINCLIP_TEMPLATES + (
    "a photo of a {} for inspection.", "a photo of the {} for inspection.", "an industrial photo of a {}.",
    "an industrial photo of the {}.", "a photo of a {} for visual inspection.", "a macro photo of a {}.",
    "a good photo of the {}.", "a bad photo of a {}.", "a jpeg photo of a {}.", "a large photo of the {}.",
    "a small photo of a {}.", "a photo of my {}.", "a textured photo of the {}.", "a top-down photo of a {}.",
    "a grayscale photo of the {}.", "a photo of one {}.", "a rendering of a {}.", "a snapshot of the {}.",
    "a detailed photo of a {}.", "a zoomed-in photo of the {}.",
)


# ------------------------------------------------------------------------------------------ designs
class PromptDesign(nn.Module):
    """Base class: ``forward(model, feats, x, class_names, n_samples, generator) -> (text, kl)``.

    ``text`` is ``[N, 2, R, B, C]`` (unit norm; index 0 = normal, 1 = abnormal); ``kl`` a dict of flow terms
    (empty for the non-Bayesian designs). A design must not hold the backbone as a submodule (the model's
    checkpoints would then contain CLIP): it gets it as ``model.backbone`` at call time.
    """

    name = "base"
    trainable_text = False

    def forward(self, model, feats: ImageFeatures, x: torch.Tensor, class_names: Sequence[str], n_samples: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


class HandcraftedEnsemble(PromptDesign):
    """Averaged text embeddings of every template × state phrase, one per state (R = B = 1).

    For each class word w and state s: t_s = normalize(mean_{template, phrase} normalize(E(template(phrase(w))))),
    computed once per class word under ``no_grad`` and cached (CLIP is frozen, so the cache never goes stale).
    """

    def __init__(self, templates: Sequence[str], states: dict[str, Sequence[str]], name: str = "handcrafted"):
        super().__init__()
        if not templates or not states.get("normal") or not states.get("abnormal"):
            raise ValueError("a handcrafted ensemble needs templates and normal/abnormal state phrases")
        self.templates = tuple(templates)
        self.states = {k: tuple(states[k]) for k in ("normal", "abnormal")}
        self.name = name
        self._cache: dict[str, torch.Tensor] = {}

    def prompts_for(self, word: str, state: str) -> list[str]:
        """All prompt strings of one state for one class word."""
        return [t.format(s.format(word)) for t in self.templates for s in self.states[state]]

    @property
    def n_prompts(self) -> int:
        return len(self.templates) * (len(self.states["normal"]) + len(self.states["abnormal"]))

    @torch.no_grad()
    def class_embedding(self, backbone: ClipBackbone, word: str, chunk: int = 256) -> torch.Tensor:
        """``[2, C]`` unit vectors (normal, abnormal) for one class word (cached)."""
        hit = self._cache.get(word)
        if hit is not None and hit.device == backbone.device:
            return hit
        out = []
        for state in ("normal", "abnormal"):
            texts = self.prompts_for(word, state)
            feats = torch.cat([backbone.encode_text(texts[i:i + chunk]) for i in range(0, len(texts), chunk)])
            out.append(F.normalize(F.normalize(feats, dim=-1).mean(0), dim=-1))
        emb = torch.stack(out)
        self._cache[word] = emb
        return emb

    def clear_cache(self) -> None:
        self._cache.clear()

    def forward(self, model, feats, x, class_names, n_samples, generator=None):
        words = [prompt_class_name(c) for c in class_names]
        table = {w: self.class_embedding(model.backbone, w) for w in sorted(set(words))}
        text = torch.stack([table[w] for w in words])  # [N, 2, C]
        return text[:, :, None, None, :].to(x.dtype), {}

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, templates={len(self.templates)}, normal={len(self.states['normal'])}, "
                f"abnormal={len(self.states['abnormal'])}")


class WinCLIPDesign(HandcraftedEnsemble):
    """``winclip``: the compositional prompt ensemble (no training, deterministic)."""

    def __init__(self):
        super().__init__(WINCLIP_TEMPLATES, WINCLIP_STATES, name="winclip")


class AprilGANPlusDesign(HandcraftedEnsemble):
    """``aprilgan+``: APRIL-GAN's handcrafted ensemble inside the Bayes-PFL pipeline (Figure 4)."""

    def __init__(self):
        super().__init__(APRILGAN_TEMPLATES, APRILGAN_STATES, name="aprilgan+")


class AnomalyCLIPPlusDesign(PromptDesign):
    """``anomalyclip+``: object-agnostic learnable prompts ``[V1..Vz][state word][object]`` (Figure 4).

    One learnable context per state (``context_normal``, ``context_abnormal``: ``[z, D]``), spliced after SOT
    exactly like the Bayes-PFL banks (:func:`bpfl.prompts.encode_prompts`), followed by the fixed words
    ``"<state word> object"``; the class name is ignored (object-agnostic). No distribution, no sampling:
    R = B = 1 and the KL dict is empty. ``z`` defaults to P + Q of the config (the same number of learnable
    tokens per prompt as Bayes-PFL); the vectors start N(0, prompt_init_std²) as in AnomalyCLIP.
    AnomalyCLIP itself writes the normal prompt without a state word and the abnormal one with "damaged",
    and also learns deep prompt tokens inside the text encoder; only the input-level design is kept here.
    """

    name = "anomalyclip+"
    trainable_text = True

    def __init__(self, width: int, n_tokens: int = 10, state_words: tuple[str, str] = ("normal", "anomalous"),
                 object_word: str = "object", init_std: float = 0.02):
        super().__init__()
        self.context_normal = nn.Parameter(torch.empty(n_tokens, width))
        self.context_abnormal = nn.Parameter(torch.empty(n_tokens, width))
        nn.init.normal_(self.context_normal, std=init_std)
        nn.init.normal_(self.context_abnormal, std=init_std)
        self.words = tuple(f"{s} {object_word}".strip() for s in state_words)

    def forward(self, model, feats, x, class_names, n_samples, generator=None):
        backbone = model.backbone
        tokens = class_tokens(backbone, list(self.words))  # "X normal object", "X anomalous object"
        learned = torch.stack([self.context_normal, self.context_abnormal])  # [2, z, D]
        learned = learned[:, None, None, None]  # [2 (as "images"), 1, 1, 1, z, D]
        text = encode_prompts(backbone, learned, tokens)  # [2, 1, 1, 1, C]
        text = text.reshape(1, 2, 1, 1, -1).expand(len(class_names), -1, -1, -1, -1)
        return text, {}

    def extra_repr(self) -> str:
        return f"tokens={self.context_normal.shape[0]}, words={self.words}"


PROMPT_DESIGNS = {"winclip": WinCLIPDesign, "aprilgan+": AprilGANPlusDesign, "anomalyclip+": AnomalyCLIPPlusDesign}


def build_prompt_design(cfg: BayesPFLConfig, backbone: ClipBackbone) -> PromptDesign:
    """The design named by ``cfg.prompt_design`` (``"bayes-pfl"`` is built into the model, not here)."""
    name = cfg.prompt_design
    if name == "winclip":
        return WinCLIPDesign()
    if name == "aprilgan+":
        return AprilGANPlusDesign()
    if name == "anomalyclip+":
        return AnomalyCLIPPlusDesign(backbone.text_width, n_tokens=cfg.n_context + cfg.n_state,
                                     init_std=cfg.prompt_init_std)
    raise ValueError(f"prompt_design={name!r}: 'bayes-pfl' is the model's own design; "
                     f"this module builds {sorted(PROMPT_DESIGNS)}")


for _name in PROMPT_DESIGNS:  # BayesPFL(config with prompt_design=_name) builds its prompts here
    register_prompt_design(_name, build_prompt_design)


# ------------------------------------------------------------------------------------------ training-free start
@torch.no_grad()
def init_projections_from_clip(model) -> None:
    """Set every per-layer projection to CLIP's own patch head, ``ln_post`` + ``proj``, as a linear map.

    normalize(ln_post(t) @ proj) = normalize(((t - mean t) ⊙ g) @ proj / std(t) + β @ proj). The per-token 1/std
    disappears in the L2 normalisation; dropping the LayerNorm bias β leaves a linear map,
    W = projᵀ · diag(g) · (I - 11ᵀ/V), which is what this writes into ``model.patch_projections`` (exact when
    β = 0). With a pretrained CLIP this gives ``winclip`` a training-free start (WinCLIP compares patch tokens
    with text in CLIP's joint space); with random weights it only shows the mechanics.
    """
    visual = model.backbone.clip.visual
    proj = visual.proj  # [V, C]
    g = visual.ln_post.weight  # [V]
    V = proj.shape[0]
    centre = torch.eye(V, device=proj.device, dtype=proj.dtype) - 1.0 / V
    weight = (centre @ (g[:, None] * proj)).T  # [C, V]: x -> x @ centre @ diag(g) @ proj
    for lin in model.patch_projections:
        lin.weight.copy_(weight.to(lin.weight.dtype))


# ------------------------------------------------------------------------------------------ Figure 4
def compare_prompt_designs(train_set, test_set, base_config: BayesPFLConfig, *,
                           designs: Sequence[str] = ("aprilgan+", "anomalyclip+", "bayes-pfl"),
                           backbone: ClipBackbone | None = None, out_dir: str | Path = "runs/figure4",
                           epochs: int | None = None, n_samples: int | None = None, eval_batch_size: int = 8,
                           metrics: Sequence[str] = ("pixel_ap",), max_steps: int | None = None,
                           progress: bool = False):
    """Figure 4: train one model per prompt design (same everything else) and evaluate after every epoch.

    Returns a DataFrame with one row per epoch and one column per (design, metric) (``"aprilgan+/pixel_ap"``);
    each run's ``train_log.csv`` under ``out_dir/<design>`` carries the same numbers next to the loss terms.
    Every design starts from the same seed (``base_config.seed``).
    """
    import pandas as pd


    out_dir = Path(out_dir)
    if backbone is None:  # one frozen CLIP for every design
        c = base_config
        backbone = load_backbone(c.backbone, c.pretrained, c.image_size, c.layers, quick_gelu=c.quick_gelu,
                                 precision=c.precision)
    columns: dict[str, dict[int, float]] = {}
    for design in designs:
        cfg = base_config.replace(prompt_design=design)
        seed_everything(cfg.seed)
        model = BayesPFL(cfg, backbone=backbone)
        cb = per_epoch_eval(test_set, n_samples=n_samples, batch_size=eval_batch_size, metrics=metrics,
                            seed=cfg.seed)
        res = train(model, train_set, out_dir / design.replace("+", "_plus"), epochs=epochs, progress=progress,
                    epoch_callback=cb, max_steps=max_steps)
        for row in res.history:
            for m in metrics:
                columns.setdefault(f"{design}/{m}", {})[int(row["epoch"])] = float(row[f"eval_{m}"])
    df = pd.DataFrame(columns)
    df.index.name = "epoch"
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / "design_curves.csv")
    return df


def plot_design_curves(df, path: str | Path, metric: str = "pixel_ap", title: str | None = None) -> Path:
    """Figure-4-style plot (metric in % vs epoch, one line per design) from :func:`compare_prompt_designs`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for col in df.columns:
        design, m = col.split("/", 1)
        if m == metric:
            ax.plot(df.index, df[col] * 100, marker="o", label=design)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title or f"{metric} per epoch for each prompt design")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
