"""Helpers for the teaching notebooks (``notebooks/NN_*.ipynb``): mode, banner, folders, cached training, widgets.

Each notebook has ONE setup cell::

    MODE = None                       # None: $BPFL_MODE, else "fast"; "paper" for the paper's setting
    from bpfl import notebook as nb
    S = nb.setup("02_prompt_flow_density", mode=MODE)

:func:`setup` picks the mode, prints a banner that says which mode runs and why, seeds everything, applies the
plotting style and creates the results folder. The returned :class:`NotebookSetup` knows the configuration, the
backbone (loaded once, shared by every model of the notebook), the datasets, and where figures and checkpoints go.

Modes
-----
``"fast"`` (default; a laptop CPU in minutes): the kit's toy-pretrained CLIP when its checkpoint exists
(:mod:`bpfl.toyclip`), else the tiny random backbone ``bpfl-tiny``; 112 px; the synthetic dataset's ``tiny``
preset; K = 4, R = 4, a few epochs; one torch thread (tiny models run 20-100x faster single-threaded on a busy
machine). **Numbers from the random backbone are mechanics, not results about the method.**

``"paper"``: :meth:`BayesPFLConfig.paper` -- ViT-L-14-336 with OpenAI weights at 518 px, layers 6/12/18/24, B = 3,
P = Q = 5, K = 10, R = 1 (train) / 10 (test), Adam 1e-4, batch 32, 20 epochs, 5 seeds -- on
:func:`bpfl.backbone.pick_device` (CUDA, then MPS, then CPU: nothing is hard-coded to CUDA).

Environment variables (all optional)
------------------------------------
``BPFL_MODE`` fast | paper. ``BPFL_RESULTS_DIR`` where figures, tables and checkpoints go (default
``notebooks/results``). ``BPFL_DATA_DIR`` where the synthetic dataset is generated (default ``data/``).
``BPFL_SHARED_DATA`` the real samples (default ``../shared/data`` next to the checkout). ``BPFL_DEVICE`` force a
device. ``BPFL_THREADS`` torch CPU threads (default: 1 for the kit's small backbones, else torch's choice).
``BPFL_FAST_BACKBONE`` auto | tiny | toy (fast mode). ``BPFL_OVERRIDES`` config overrides,
``"key=value;key=value"`` (e.g. ``pretrained=/path/ViT-L-14-336.pt;epochs=5``). ``BPFL_AUX_DATA`` the auxiliary
training set (e.g. a VisA root; default: the synthetic *seen* categories). ``BPFL_TARGETS`` target datasets,
``"Name=/path;Name2=/path"`` (default: the synthetic *unseen* categories and the real samples when present).

Widgets
-------
:func:`k_slider_demo` and :func:`r_slider_demo` return ``(widget, state)``: a real ``ipywidgets`` control and a
dict with the data it shows, the figure, the box to display (``state["ui"]``) and the callbacks as plain functions
(``state["update"]``, ``state["redraw"]``), so tests can drive them without a browser.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .config import BayesPFLConfig

MODES = ("fast", "paper")
#: backbones small enough that one CPU thread is fastest
SMALL_BACKBONES = ("bpfl-tiny", "bpfl-toy")
REPO_ROOT = Path(__file__).resolve().parents[1]

#: What a fast-mode run is, in one sentence, for banners and table captions.
MECHANICS_NOTE = ("Random-weight backbone: these numbers show the pipeline's mechanics, not what Bayes-PFL "
                  "achieves (zero-shot transfer is at chance without pretrained CLIP features).")

# ----------------------------------------------------------------------------------------------------------
# the paper's numbers (Tables 2-4 and the medical rows of Table 1), transcribed from the CVPR 2025 paper.
# Table 1's industrial rows live in bpfl.evaluate.PAPER_TABLE1.
# ----------------------------------------------------------------------------------------------------------
#: Table 2 (MVTec-AD): (image AUROC, image AP, pixel AUROC, pixel AP) in %; None where the paper has "—".
PAPER_TABLE2: dict[str, tuple] = {
    "w/o ISD": (89.1, 94.5, 88.3, 46.5),
    "w/o IAD": (90.3, 95.2, 89.5, 47.2),
    "w/o ISD, IAD": (88.6, 93.3, 87.1, 45.6),
    "w/o RCA": (91.8, 95.9, 89.7, 46.1),
    "w/o L_ort": (91.2, 96.0, 90.2, 47.3),
    "w/o x_cls": (89.3, 94.4, None, None),
    "w/o x_patch": (90.9, 95.8, None, None),
    "w/o s_text": (89.0, 95.1, None, None),
    "w/o s_img": (90.9, 95.3, None, None),
    "Bayes-PFL": (92.3, 96.7, 91.8, 48.3),
}
#: kit ablation name (bpfl.config.ABLATIONS) -> Table 2 row
TABLE2_ROWS: dict[str | None, str] = {
    "no-isd": "w/o ISD", "no-iad": "w/o IAD", "no-isd-iad": "w/o ISD, IAD", "no-rca": "w/o RCA",
    "no-ort": "w/o L_ort", "no-x-cls": "w/o x_cls", "no-x-patch": "w/o x_patch", "no-s-text": "w/o s_text",
    "no-s-img": "w/o s_img", None: "Bayes-PFL",
}
#: Table 3 (MVTec-AD, mean ± std): R -> ((img AUROC), (img AP), (px AUROC), (px AP), (time ms)), each (mean, std)
PAPER_TABLE3: dict[int, tuple] = {
    1: ((89.5, 1.1), (94.1, 1.2), (87.1, 1.3), (45.4, 0.6), (132.2, 1.6)),
    3: ((90.0, 1.0), (94.8, 0.9), (88.2, 1.2), (46.1, 0.6), (200.3, 1.4)),
    5: ((91.1, 0.8), (95.4, 0.9), (89.5, 1.0), (46.8, 0.5), (254.2, 1.4)),
    7: ((92.0, 0.7), (96.3, 0.8), (90.9, 0.8), (47.5, 0.5), (297.4, 1.7)),
    10: ((92.7, 0.4), (96.8, 0.5), (91.8, 0.6), (48.3, 0.4), (388.5, 1.5)),
    13: ((92.7, 0.4), (96.9, 0.5), (91.9, 0.5), (48.4, 0.4), (467.5, 1.5)),
    16: ((92.8, 0.3), (96.9, 0.4), (92.0, 0.4), (48.6, 0.3), (621.6, 1.6)),
    20: ((92.9, 0.2), (97.0, 0.2), (92.1, 0.2), (48.9, 0.1), (726.1, 1.7)),
}
#: Table 4 (MVTec-AD): ensemble mode -> (image AUROC, image AP, pixel AUROC, pixel AP, time ms)
PAPER_TABLE4: dict[str, tuple] = {"text": (92.0, 96.3, 91.1, 47.6, 436.6), "image": (92.3, 96.7, 91.8, 48.3, 443.4)}
#: Table 1, Bayes-PFL column, medical rows: image (AUROC, F1-max, AP) or pixel (AUROC, PRO, AP), in %.
PAPER_TABLE1_MEDICAL: dict[str, dict[str, tuple]] = {
    "HeadCT": {"image": (96.5, 92.9, 95.5)},
    "BrainMRI": {"image": (96.2, 92.8, 92.4)},
    "Br35H": {"image": (97.8, 93.6, 96.2)},
    "CVC-ColonDB": {"pixel": (82.1, 76.1, 31.9)},
    "CVC-ClinicDB": {"pixel": (89.6, 78.4, 53.2)},
    "Endo": {"pixel": (89.2, 74.8, 58.6)},
    "Kvasir": {"pixel": (85.4, 63.9, 54.2)},
}


def paper_table1(dataset: str) -> dict[str, tuple]:
    """The paper's Table 1 (Bayes-PFL) entry for a dataset name, or {} when the paper has none."""
    from .evaluate import PAPER_TABLE1
    return dict(PAPER_TABLE1.get(dataset) or PAPER_TABLE1_MEDICAL.get(dataset) or {})


# ----------------------------------------------------------------------------------------------------------
# modes
# ----------------------------------------------------------------------------------------------------------
def detect_mode(mode: str | None = None) -> tuple[str, str]:
    """(mode, why): the argument if given, else ``$BPFL_MODE``, else ``"fast"``."""
    if mode is not None:
        why = f'MODE = "{mode}" in the setup cell'
    elif os.environ.get("BPFL_MODE", "").strip():
        mode = os.environ["BPFL_MODE"].strip()
        why = f"environment variable BPFL_MODE={mode}"
    else:
        mode, why = "fast", "the default (MODE = None and no BPFL_MODE): laptop-CPU scale"
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {MODES} (MODE in the setup cell or $BPFL_MODE)")
    return mode, why


def fast_backbone() -> tuple[dict, str]:
    """Config overrides of the fast mode's backbone and why it was chosen.

    ``$BPFL_FAST_BACKBONE``: ``auto`` (default: the toy CLIP if its checkpoint exists, else ``bpfl-tiny``),
    ``toy`` or ``tiny``.
    """
    choice = os.environ.get("BPFL_FAST_BACKBONE", "auto").strip().lower() or "auto"
    if choice not in {"auto", "toy", "tiny"}:
        raise ValueError(f"BPFL_FAST_BACKBONE={choice!r}: choose auto, toy or tiny")
    if choice in {"auto", "toy"}:
        try:
            from .toyclip import ensure_toy_clip, toy_bayespfl_overrides
            path = ensure_toy_clip(build=False)
            if path is not None:
                return (toy_bayespfl_overrides(path),
                        f"the kit's toy-pretrained CLIP found at {path} (pretrained offline on procedural surfaces)")
            why_not = "no toy CLIP checkpoint (build one with `bpfl pretrain-toy-clip`, 15-35 min on 2 CPU cores)"
        except Exception as e:  # the toy CLIP is optional
            why_not = f"toy CLIP unavailable ({type(e).__name__}: {e})"
        if choice == "toy":
            warnings.warn(f"BPFL_FAST_BACKBONE=toy but {why_not}; using bpfl-tiny with random weights")
    else:
        why_not = "BPFL_FAST_BACKBONE=tiny"
    return (dict(backbone="bpfl-tiny", pretrained=None, image_size=112, layers=(1, 2, 3, 4)),
            f"bpfl-tiny with RANDOM weights ({why_not})")


def _env_overrides() -> dict:
    text = os.environ.get("BPFL_OVERRIDES", "").strip()
    if not text:
        return {}
    from .cli import parse_overrides
    return parse_overrides([p for p in text.replace(",,", ";").split(";") if p.strip()])


def mode_config(mode: str, **overrides: Any) -> tuple[BayesPFLConfig, str]:
    """The configuration of a mode (plus ``$BPFL_OVERRIDES`` and ``overrides``) and why this backbone."""
    if mode == "fast":
        bb, why = fast_backbone()
        values = dict(bb, batch_size=4, epochs=6, lr=1e-2, flow_length=4, test_samples=4, train_samples=1, seed=0)
        cfg = BayesPFLConfig.teaching(**values)
    elif mode == "paper":
        cfg = BayesPFLConfig.paper()
        why = "the paper's backbone: OpenAI CLIP ViT-L-14-336 at 518 px, layers 6/12/18/24"
    else:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    changes = {**_env_overrides(), **overrides}
    if changes.get("seed", cfg.seed) == cfg.seed:
        changes.pop("seed", None)
    if "backbone" in changes and "layers" not in changes:
        from .backbone import default_layers
        changes["layers"] = default_layers(changes["backbone"])
    if changes:
        cfg = cfg.replace(**changes)
        why += f" -- overridden: {changes}"
    return cfg, why


@dataclass(frozen=True)
class ModeScale:
    """How much each notebook does in a mode (besides the model config)."""

    synthetic_preset: str
    seeds: tuple[int, ...]
    r_values: tuple[int, ...]  # Table 3 sweep
    k_max: int  # 2-D flow slider
    grid_n: int  # 2-D density grid
    n_show: int  # images per figure panel
    timing_images: int  # images timed per R


SCALES = {
    "fast": ModeScale("tiny", (0, 1), (1, 2, 4, 8), 12, 90, 4, 6),
    "paper": ModeScale("default", (0, 1, 2, 3, 4), (1, 3, 5, 7, 10, 13, 16, 20), 12, 200, 6, 50),
}


def _is_random(pretrained) -> bool:
    return pretrained in (None, "", "none", "random")


# ----------------------------------------------------------------------------------------------------------
# the setup object
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    """A model from :meth:`NotebookSetup.train_or_load`: trained now (``loaded=False``) or read from the cache."""

    model: Any
    history: Any  # pandas DataFrame, one row per epoch (every loss term, averaged over the epoch)
    steps: Any  # pandas DataFrame, one row per optimisation step (every loss term)
    checkpoint: Path
    loaded: bool
    seconds: float
    folder: Path


@dataclass
class NotebookSetup:
    name: str
    mode: str
    mode_reason: str
    config: BayesPFLConfig
    backbone_reason: str
    scale: ModeScale
    device: torch.device
    results: Path
    results_root: Path
    data_dir: Path
    shared_data: Path | None
    threads: int
    extra: dict = field(default_factory=dict)

    # ---- facts
    @property
    def fast(self) -> bool:
        return self.mode == "fast"

    @property
    def random_backbone(self) -> bool:
        return _is_random(self.config.pretrained)

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.scale.seeds

    @property
    def checkpoint_root(self) -> Path:
        return self.results_root / "checkpoints"

    def mechanics_note(self) -> str:
        """The caption every table of numbers from a random backbone carries ('' for pretrained weights)."""
        return MECHANICS_NOTE if self.random_backbone else ""

    def banner_text(self) -> str:
        cfg = self.config
        weights = "RANDOM weights" if self.random_backbone else f"weights: {cfg.pretrained}"
        lines = [
            f"bpfl notebook {self.name}: {self.mode.upper()} mode",
            f"  why this mode : {self.mode_reason}",
            f"  backbone      : {cfg.backbone} ({weights}) at {cfg.image_size} px, layers {list(cfg.layers)}",
            f"                  {self.backbone_reason}",
            f"  Bayes-PFL     : B={cfg.n_prompts} P={cfg.n_context} Q={cfg.n_state} K={cfg.flow_length} "
            f"R_train={cfg.train_samples} R_test={cfg.test_samples}, {cfg.epochs} epochs, batch {cfg.batch_size}, "
            f"lr {cfg.lr:g}, seeds {list(self.seeds)}",
            f"  device        : {self.device} (torch threads: {self.threads})",
            f"  synthetic data: preset '{self.scale.synthetic_preset}' in {self.data_dir}",
            f"  real samples  : {self.shared_data if self.shared_data else 'not found (cells that use them skip)'}",
            f"  results       : {self.results}",
        ]
        if self.random_backbone:
            lines.append("  NOTE          : " + MECHANICS_NOTE)
        if self.mode == "fast":
            lines.append('  paper mode    : set MODE = "paper" in the setup cell (or BPFL_MODE=paper); GPU advised')
        elif self.device.type == "cpu":
            lines.append("  WARNING       : paper mode on a CPU takes hours per notebook; a GPU is advised")
        width = max(len(line) for line in lines)
        bar = "=" * min(110, width)
        return "\n".join([bar, *lines, bar])

    # ---- backbone and models
    @cached_property
    def backbone(self):
        """The frozen CLIP of this mode, loaded once per notebook (shared by every model built here)."""
        from .backbone import load_backbone
        cfg = self.config
        torch.manual_seed(cfg.seed)  # random-weight backbones are seeded: the same in every notebook
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import logging
            logging.getLogger().setLevel(logging.ERROR)  # open_clip's 'no pretrained weights' for bpfl-tiny
            return load_backbone(cfg.backbone, cfg.pretrained, cfg.image_size, cfg.layers, self.device,
                                 quick_gelu=cfg.quick_gelu, precision=cfg.precision)

    def new_model(self, config: BayesPFLConfig | None = None, **changes: Any):
        """A freshly initialised :class:`bpfl.model.BayesPFL` on the shared backbone (seeded by ``config.seed``)."""
        from .model import BayesPFL
        cfg = (config or self.config).replace(**changes) if changes else (config or self.config)
        torch.manual_seed(cfg.seed)
        return BayesPFL(cfg, backbone=self.backbone)

    # ---- data
    def synthetic_root(self, preset: str | None = None) -> Path:
        """The synthetic dataset of ``preset`` (default: this mode's), generated on first use, reused afterwards."""
        from .data import SYNTHETIC_PRESETS, make_synthetic_dataset
        from .data.synthetic import MARKER
        preset = preset or self.scale.synthetic_preset
        if preset not in SYNTHETIC_PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}: choose one of {sorted(SYNTHETIC_PRESETS)}")
        root = self.data_dir / ("synthetic" if preset == "default" else f"synthetic-{preset}")
        want = {**SYNTHETIC_PRESETS[preset], "seed": 0}
        marker = root / MARKER
        have = json.loads(marker.read_text()) if marker.is_file() else {}
        if any(have.get(k) != v for k, v in want.items()):
            make_synthetic_dataset(root, seed=0, preset=preset)
        return root

    def aux_dataset(self, image_size: int | None = None):
        """The auxiliary (training) set: ``$BPFL_AUX_DATA`` (its test split, the paper's protocol) or the
        synthetic *seen* categories."""
        from .data import SYNTHETIC_GROUPS, open_dataset
        size = image_size or self.config.image_size
        aux = os.environ.get("BPFL_AUX_DATA", "").strip()
        if aux:
            return open_dataset(aux, split="test", image_size=size)
        return open_dataset(self.synthetic_root(), split="test", categories=SYNTHETIC_GROUPS["seen"],
                            image_size=size)

    def aux_name(self) -> str:
        aux = os.environ.get("BPFL_AUX_DATA", "").strip()
        return Path(aux).name if aux else f"synthetic seen categories ({self.scale.synthetic_preset})"

    def real_samples(self, image_size: int | None = None) -> dict:
        """{table name: dataset} for the real samples that are present (MVTec bottle, Kvasir), else {}."""
        from .data import open_dataset
        size = image_size or self.config.image_size
        out = {}
        if self.shared_data is None:
            return out
        mv, kv = self.shared_data / "mvtec-bottle-xs", self.shared_data / "kvasir-seg-sample"
        if (mv / "test").is_dir():
            out["MVTec-AD (bottle sample)"] = open_dataset(mv, layout="mvtec", split="test", image_size=size)
        if (kv / "images").is_dir():
            out["Kvasir (sample)"] = open_dataset(kv, layout="segmentation", split="test", image_size=size,
                                                  class_name="colon")
        return out

    def targets(self, image_size: int | None = None) -> dict:
        """{name: dataset} of the zero-shot targets: ``$BPFL_TARGETS`` or synthetic unseen + real samples."""
        from .data import SYNTHETIC_GROUPS, open_dataset
        size = image_size or self.config.image_size
        spec = os.environ.get("BPFL_TARGETS", "").strip()
        if spec:
            out = {}
            for part in spec.split(";"):
                if part.strip():
                    name, _, path = part.partition("=")
                    out[name.strip()] = open_dataset(path.strip(), split="test", image_size=size)
            return out
        out = {"synthetic (unseen categories)": open_dataset(
            self.synthetic_root(), split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=size)}
        out.update(self.real_samples(size))
        return out

    # ---- training with a cache
    def train_or_load(self, config: BayesPFLConfig | None = None, dataset=None, name: str = "bayes-pfl",
                      retrain: bool = False, epoch_callback: Callable | None = None, live: bool = False,
                      progress: bool | None = None) -> Trained:
        """"Checkpoint present? load it : train it" (the UvA-notebook rule).

        The checkpoint lives in ``<results root>/checkpoints/<name>-<hash>/`` where the hash covers the config and
        the training set, so a changed setting never loads a stale model. ``retrain=True`` trains anyway.
        Training is :func:`bpfl.train.train` (``last.pt`` + ``train_log.csv``); every loss term of every step is
        recorded too (``steps.csv``), and ``live=True`` redraws the loss curves after each epoch. A finished run is
        marked by ``done.json``, so an interrupted one is trained again.
        """
        import pandas as pd

        from .train import load_model, train

        cfg = config or self.config
        ds = dataset if dataset is not None else self.aux_dataset(cfg.image_size)
        folder = self.checkpoint_root / f"{name}-{fingerprint(cfg, ds)}"
        ckpt, log, done, steps_csv = folder / "last.pt", folder / "train_log.csv", folder / "done.json", \
            folder / "steps.csv"
        t0 = time.perf_counter()
        if not retrain and done.is_file() and ckpt.is_file():
            model = load_model(ckpt, backbone=self.backbone)
            history = pd.read_csv(log) if log.is_file() else pd.DataFrame()
            steps = pd.read_csv(steps_csv) if steps_csv.is_file() else pd.DataFrame()
            print(f"[bpfl] loaded the cached checkpoint {ckpt} ({name}; trained earlier in "
                  f"{json.loads(done.read_text()).get('seconds', float('nan')):.1f} s). retrain=True trains again.")
            return Trained(model, history, steps, ckpt, True, time.perf_counter() - t0, folder)
        model = self.new_model(cfg)
        step_log: list[dict] = []
        plain_loss = model.loss

        def recording_loss(*args, **kwargs):  # the package's loss, with every term written down
            terms = plain_loss(*args, **kwargs)
            step_log.append({"step": len(step_log) + 1, **{k: float(v.detach()) for k, v in terms.items()}})
            return terms

        model.loss = recording_loss
        plot = LiveLossPlot(step_log) if live else None

        def callback(epoch: int, m):
            extra = epoch_callback(epoch, m) if epoch_callback is not None else None
            if step_log:
                step_log[-1]["epoch_end"] = epoch
            if plot is not None:
                plot.update(epoch)
            return extra

        show = (not self.fast) if progress is None else progress
        print(f"[bpfl] training {name}: {len(ds)} images, {cfg.epochs} epochs, batch {cfg.batch_size} ...", flush=True)
        try:
            res = train(model, ds, folder, epochs=cfg.epochs, progress=show, epoch_callback=callback)
        finally:
            del model.loss  # back to the class method
        steps = pd.DataFrame(step_log)
        steps.to_csv(steps_csv, index=False)
        done.write_text(json.dumps({"seconds": res.seconds, "epochs": cfg.epochs, "images": len(ds)}))
        print(f"[bpfl] trained in {res.seconds:.1f} s; checkpoint {res.checkpoint}")
        if plot is not None:
            plot.close()
        return Trained(res.model, pd.DataFrame(res.history), steps, res.checkpoint, False, res.seconds, folder)

    def load_variant(self, trained: Trained, **config_changes: Any):
        """The trained weights under a changed inference setting (e.g. ``ensemble="text"``, ``use_s_text=False``)."""
        from .train import load_model
        return load_model(trained.checkpoint, backbone=self.backbone, **config_changes)

    # ---- output
    def save(self, fig, name: str) -> list[Path]:
        """Save a figure as PNG and PDF under this notebook's results folder."""
        from .viz import save_figure
        return save_figure(fig, self.results / name)

    def save_table(self, df, name: str, caption: str = "") -> list[Path]:
        """Write a table as CSV and as markdown (with its caption) under this notebook's results folder."""
        from .evaluate import markdown_table
        base = self.results / name
        base.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(base.with_suffix(".csv"))
        base.with_suffix(".md").write_text((caption + "\n\n" if caption else "") + markdown_table(df) + "\n")
        return [base.with_suffix(".csv"), base.with_suffix(".md")]

    def provenance(self, model=None, dataset: str = "", n_samples: int | None = None,
                   seeds: Sequence[int] | None = None) -> str:
        """One line: backbone, weights, size, R, K, B, seeds, dataset (every table row carries it)."""
        cfg = model.config if model is not None else self.config
        weights = "random weights" if _is_random(cfg.pretrained) else str(cfg.pretrained)
        if weights and len(weights) > 40:
            weights = "…" + weights[-38:]
        seeds = list(self.seeds if seeds is None else seeds)
        return (f"{cfg.backbone} ({weights}), {cfg.image_size}px, R={n_samples or cfg.test_samples}, "
                f"K={cfg.flow_length}, B={cfg.n_prompts}, seeds={','.join(map(str, seeds))}, {dataset}")


LOSS_TERMS = ("cls", "focal", "dice", "ort", "kl_context", "kl_normal", "kl_abnormal", "total")


def plot_loss_terms(steps, terms: Sequence[str] = LOSS_TERMS, fig=None, title: str = ""):
    """One small panel per loss term of Eq. 14 against the optimisation step (terms absent from ``steps`` skipped)."""
    import matplotlib.pyplot as plt
    present = [t for t in terms if len(steps) and t in steps.columns]
    if fig is None:
        fig = plt.figure(figsize=(11, 4.6))
    fig.clear()
    ncol = 4
    nrow = max(1, math.ceil(len(present) / ncol))
    for i, t in enumerate(present):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        ax.plot(steps["step"], steps[t], lw=1.2, color="C3" if t == "total" else "C0")
        if "epoch_end" in steps.columns:
            for s in steps.loc[steps["epoch_end"].notna(), "step"]:
                ax.axvline(s, color="0.55", lw=0.7, ls=":")
        ax.set_title(t)
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class LiveLossPlot:
    """Loss curves redrawn after every epoch (an IPython display handle; silent outside IPython)."""

    def __init__(self, step_log: list[dict]):
        import matplotlib.pyplot as plt
        self.step_log = step_log
        self.fig = plt.figure(figsize=(11, 4.6))
        plt.close(self.fig)
        self.handle = None

    def update(self, epoch: int) -> None:
        import pandas as pd
        plot_loss_terms(pd.DataFrame(self.step_log), fig=self.fig, title=f"live: after epoch {epoch}")
        try:
            from IPython import get_ipython
            from IPython.display import display
            if get_ipython() is None:
                return
            if self.handle is None:
                self.handle = display(self.fig, display_id=True)
            else:
                self.handle.update(self.fig)
        except Exception:  # no IPython: nothing to show
            pass

    def close(self) -> None:
        import matplotlib.pyplot as plt
        plt.close(self.fig)


def fingerprint(config: BayesPFLConfig, dataset) -> str:
    """A short hash of a config and a dataset's identity (root, size, categories, first and last file)."""
    recs = getattr(dataset, "records", [])
    ident = {"config": config.to_dict(), "n": len(dataset), "root": str(getattr(dataset, "root", "")),
             "size": getattr(dataset, "image_size", None),
             "categories": list(getattr(dataset, "categories", [])),
             "ends": [recs[0].img_path, recs[-1].img_path] if recs else []}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _shared_data_dir() -> Path | None:
    env = os.environ.get("BPFL_SHARED_DATA", "").strip()
    cand = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return cand.resolve() if cand.is_dir() else None


def results_root() -> Path:
    env = os.environ.get("BPFL_RESULTS_DIR", "").strip()
    return Path(env).expanduser().resolve() if env else REPO_ROOT / "notebooks" / "results"


def setup(name: str, mode: str | None = None, seed: int = 0, quiet: bool = False, **overrides: Any) -> NotebookSetup:
    """Everything a notebook's setup cell does: mode, config, device, threads, seed, style, folders, banner."""
    from .backbone import pick_device
    from .train import seed_everything
    from .viz import set_style

    mode, why = detect_mode(mode)
    cfg, bb_why = mode_config(mode, seed=seed, **overrides)
    device = pick_device(os.environ.get("BPFL_DEVICE") or None)
    threads = os.environ.get("BPFL_THREADS", "").strip()
    if threads:
        torch.set_num_threads(int(threads))
    elif device.type == "cpu" and cfg.backbone in SMALL_BACKBONES:
        # The kit's small backbones: thread synchronisation costs more than it saves (measured 20-100x faster
        # with one thread on a busy 2-core machine).
        torch.set_num_threads(1)
    seed_everything(seed)
    set_style()
    root = results_root()
    results = root / name
    results.mkdir(parents=True, exist_ok=True)
    data_env = os.environ.get("BPFL_DATA_DIR", "").strip()
    data_dir = Path(data_env).expanduser().resolve() if data_env else REPO_ROOT / "data"
    S = NotebookSetup(name=name, mode=mode, mode_reason=why, config=cfg, backbone_reason=bb_why,
                      scale=SCALES[mode], device=device, results=results, results_root=root, data_dir=data_dir,
                      shared_data=_shared_data_dir(), threads=torch.get_num_threads())
    if not quiet:
        print(S.banner_text(), flush=True)
    return S


# ----------------------------------------------------------------------------------------------------------
# optional pieces
# ----------------------------------------------------------------------------------------------------------
def prompt_designs_available() -> tuple[bool, str]:
    """Whether ``bpfl.prompt_designs`` (APRIL-GAN+, AnomalyCLIP+, WinCLIP prompt designs) can be used here."""
    import importlib
    try:
        prompt_designs = importlib.import_module(f"{__package__}.prompt_designs")
    except Exception as e:
        return False, f"bpfl.prompt_designs cannot be imported ({type(e).__name__}: {e})"
    if not hasattr(prompt_designs, "build_prompt_design"):
        return False, "bpfl.prompt_designs has no build_prompt_design() yet"
    return True, "bpfl.prompt_designs is available"


def pick_examples(dataset, n: int, n_normal: int = 0) -> list[int]:
    """Indices of ``n`` anomalous images with the largest masks, one category after the other (round robin), then
    ``n_normal`` normal images: examples for figures that show something (anomalies of 0.2 % of an image do not)."""
    from PIL import Image
    by_cat: dict[str, list[tuple[float, int]]] = {}
    for i, r in enumerate(dataset.records):
        if r.label == 1:
            area = float((np.asarray(Image.open(r.mask_path).convert("L")) > 127).mean()) if r.mask_path else 0.0
            by_cat.setdefault(r.class_name, []).append((-area, i))
    queues = [sorted(v) for v in by_cat.values()]
    picks: list[int] = []
    while len(picks) < n and any(queues):
        for q in queues:
            if q and len(picks) < n:
                picks.append(q.pop(0)[1])
    normals = [i for i, r in enumerate(dataset.records) if r.label == 0]
    return picks + normals[:n_normal]


def format_pct(value: float | None, std: float | None = None, digits: int = 1) -> str:
    """A metric in [0, 1] as a percentage string ('n/a' for NaN/None), with ± std when given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    s = f"{100 * value:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        s += f" ± {100 * std:.{digits}f}"
    return s


def format_paper(value) -> str:
    """A paper value (already in %) or a (mean, std) pair; '—' where the paper has none."""
    if value is None:
        return "—"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f"{value[0]:g} ± {value[1]:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return f"{value:g}"


@torch.no_grad()
def time_per_image(model, dataset, n_samples: int, n_images: int = 8, warmup: int = 1) -> tuple[float, float]:
    """Full inference time per image (CLIP + prompts + maps, batch size 1) in ms: (mean, std) over images."""
    from .data import collate
    model.eval()
    n = min(n_images, len(dataset))
    items = [collate([dataset[i]]) for i in range(n)]
    gen = torch.Generator().manual_seed(0)
    times = []
    for j, b in enumerate(items[:warmup] + items):
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        model(b["image"], b["class_name"], n_samples=n_samples, generator=gen)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        if j >= warmup:
            times.append(1000.0 * (time.perf_counter() - t0))
    a = np.array(times)
    return float(a.mean()), float(a.std(ddof=1) if len(a) > 1 else 0.0)


# ----------------------------------------------------------------------------------------------------------
# 2-D planar flows (notebook 02)
# ----------------------------------------------------------------------------------------------------------
def demo_flow_2d(k_max: int = 12, seed: int = 2, constrained: bool = True):
    """A 2-D :class:`bpfl.flow.PlanarFlowStack` (float64) whose densities are easy to see.

    Step k: w = |w|·d with a random direction d and |w| in [2.5, 4] (a sharp tanh), u = a·d + small
    perpendicular noise with a in [0.3, 0.6] (each step splits the mass along d), b ~ N(0, 0.5²). With the
    default seed the mass stays inside [-4.5, 4.5]² up to K = 12.
    """
    from .flow import PlanarFlowStack
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    angle = torch.rand(k_max, **f64) * math.pi
    d = torch.stack([angle.cos(), angle.sin()], dim=-1)
    perp = torch.stack([-d[:, 1], d[:, 0]], dim=-1)
    w_norm = 2.5 + 1.5 * torch.rand(k_max, 1, **f64)
    a = 0.3 + 0.3 * torch.rand(k_max, 1, **f64)
    st = PlanarFlowStack(2, k_max, constrained=constrained).double()
    with torch.no_grad():
        st.w.copy_(d * w_norm)
        st.u.copy_(d * a + perp * 0.3 * torch.randn(k_max, 1, **f64))
        st.b.copy_(0.5 * torch.randn(k_max, **f64))
    return st


def truncate_flow(stack, k: int):
    """The first ``k`` steps of a free-parameter stack, as a new stack (same dtype)."""
    from .flow import PlanarFlowStack
    out = PlanarFlowStack(stack.dim, k, constrained=stack.constrained).to(stack.u.dtype)
    with torch.no_grad():
        out.u.copy_(stack.u[:k])
        out.w.copy_(stack.w[:k])
        out.b.copy_(stack.b[:k])
    return out


def grid_2d(n: int = 100, extent: float = 4.5) -> tuple[torch.Tensor, float]:
    """Cell centres of an n x n grid on [-extent, extent]^2 ([n*n, 2], float64) and the cell area."""
    step = 2 * extent / n
    c = -extent + step * (torch.arange(n, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1), step * step


@torch.no_grad()
def flow_density_2d(stack, points: torch.Tensor) -> torch.Tensor:
    """q_K at ``points`` by Eq. 6: z0 = flow^-1(points), log q_K = log N(z0; 0, I) - Σ_k log|det_k|(z_{k-1})."""
    from .flow import standard_normal_log_prob
    if stack.n_flows == 0:
        return standard_normal_log_prob(points).exp()
    z0 = stack.inverse(points)
    _, log_det = stack(z0)
    return (standard_normal_log_prob(z0) - log_det).exp()


@torch.no_grad()
def flow_samples_2d(stack, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """n samples of q_K: z0 ~ N(0, I) pushed through the stack ([n, 2], float64)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return stack(z0)[0] if stack.n_flows else z0


def histogram_density(samples: torch.Tensor, n: int = 100, extent: float = 4.5) -> np.ndarray:
    """A 2-D histogram of samples normalised to a density on the same grid as :func:`grid_2d` ([n, n], rows = y)."""
    s = samples.cpu().numpy()
    edges = np.linspace(-extent, extent, n + 1)
    h, _, _ = np.histogram2d(s[:, 1], s[:, 0], bins=[edges, edges])
    area = (2 * extent / n) ** 2
    return h / (len(s) * area)


def k_slider_demo(k_max: int = 12, grid_n: int = 90, extent: float = 4.5, seed: int = 2, n_samples: int = 100000,
                  k_start: int | None = None, show: bool = True):
    """A K slider that redraws a 2-D prompt-flow density: Eq. 6 on a grid next to a histogram of samples.

    Returns ``(slider, state)``; ``state["update"](k)`` is the callback (densities are cached per K, so the
    slider responds at once), ``state["density"]`` the Eq. 6 density now shown ([grid_n, grid_n]),
    ``state["hist"]`` the sample histogram, ``state["mass"]`` ∫q over the grid, ``state["ui"]`` the box to display.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    stack = demo_flow_2d(k_max, seed=seed)
    pts, area = grid_2d(grid_n, extent)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def compute(k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in cache:
            sub = truncate_flow(stack, k)
            dens = flow_density_2d(sub, pts).reshape(grid_n, grid_n).numpy()
            hist = histogram_density(flow_samples_2d(sub, n_samples), grid_n, extent)
            cache[k] = (dens, hist)
        return cache[k]

    k0 = k_max // 2 if k_start is None else k_start
    dens, hist = compute(k0)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    vmax = float(np.quantile(dens, 0.995))
    ext = (-extent, extent, -extent, extent)
    im_d = axes[0].imshow(dens, origin="lower", extent=ext, cmap="viridis", vmin=0, vmax=vmax)
    im_h = axes[1].imshow(hist, origin="lower", extent=ext, cmap="viridis", vmin=0, vmax=vmax)
    axes[1].set_title(f"histogram of {n_samples} samples")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    plt.close(fig)
    out = widgets.Output()
    slider = widgets.IntSlider(value=k0, min=0, max=k_max, step=1, description="K (flows)", continuous_update=True)
    state: dict[str, Any] = {"stack": stack, "cache": cache, "fig": fig, "axes": axes, "images": (im_d, im_h),
                             "output": out, "slider": slider, "history": []}

    def update(k: int) -> None:
        k = int(k)
        dens, hist = compute(k)
        vmax = float(np.quantile(dens, 0.995)) or 1.0
        im_d.set_data(dens)
        im_h.set_data(hist)
        for im in (im_d, im_h):
            im.set_clim(0, vmax)
        mass = float(dens.sum() * area)
        axes[0].set_title(f"Eq. 6 density, K = {k}  (∫q ≈ {mass:.3f})")
        state.update(K=k, density=dens, hist=hist, mass=mass)
        state["history"].append(k)
        if show:
            from IPython.display import display
            with out:
                out.clear_output(wait=True)
                display(fig)

    slider.observe(lambda change: update(change["new"]), names="value")
    state["update"] = update
    state["ui"] = widgets.VBox([slider, out])
    update(k0)
    return slider, state


# ----------------------------------------------------------------------------------------------------------
# the R slider over cached features (notebook 04)
# ----------------------------------------------------------------------------------------------------------
def r_slider_demo(model, images: torch.Tensor, class_names: Sequence[str], r_max: int = 8, seed: int = 0,
                  r_start: int | None = None, titles: Sequence[str] | None = None, show: bool = True):
    """An R slider (and a 're-draw samples' button) showing how the anomaly maps and scores change with R.

    The CLIP features are computed once; one forward pass draws ``r_max`` samples and keeps the map of each
    sample r (mean over layers and prompts). The map for R is the mean of the first R sample maps (Eq. 12),
    s_text the mean of the first R softmax scores, s = s_text + max(M) -- so moving the slider costs no model
    call. The button draws a fresh set of samples (next seed).

    Returns ``(slider, state)``: ``state["update"](R)`` and ``state["redraw"]()`` are the callbacks;
    ``state["maps"]`` [N, h, w] and ``state["scores"]`` [N] what is shown; ``state["spread"]`` the per-pixel std
    over the R sample maps; ``state["button"]``; ``state["ui"]`` the box to display.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .viz import to_display_image

    if model.config.ensemble != "image":
        raise ValueError("the R slider needs the image ensemble (one map per sample); config.ensemble='image'")
    model.eval()
    with torch.no_grad():
        feats = model.backbone.encode_image(images)
    names = list(class_names)
    size = tuple(images.shape[-2:])
    state: dict[str, Any] = {"seed": seed, "history": []}

    def draw(s: int) -> None:
        gen = torch.Generator().manual_seed(int(s))
        with torch.no_grad():
            out = model(None, names, n_samples=r_max, features=feats, generator=gen, map_size=size,
                        return_sample_maps=True)
        state["sample_maps"] = out.sample_maps.float().cpu().numpy()  # [N, R, h, w]
        state["sample_probs"] = torch.softmax(out.image_logits, dim=1)[:, 1].float().cpu().numpy()  # [N, R, B]
        state["seed"] = int(s)

    draw(seed)
    n = len(names)
    fig, axes = plt.subplots(3, n, figsize=(2.3 * n, 6.9), squeeze=False)
    map_ims, spread_ims = [], []
    for j in range(n):
        axes[0, j].imshow(to_display_image(images[j]))
        if titles:
            axes[0, j].set_title(titles[j])
        map_ims.append(axes[1, j].imshow(np.zeros(size), cmap="jet", vmin=0, vmax=1))
        spread_ims.append(axes[2, j].imshow(np.zeros(size), cmap="magma", vmin=0, vmax=0.1))
        for i in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].grid(False)
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("M (mean of R maps)")
    axes[2, 0].set_ylabel("std over the R maps")
    fig.tight_layout()
    plt.close(fig)
    out_w = widgets.Output()
    r0 = min(r_max, 1 if r_start is None else r_start)
    slider = widgets.IntSlider(value=r0, min=1, max=r_max, step=1, description="R (samples)",
                               continuous_update=True)
    button = widgets.Button(description="re-draw samples", icon="refresh")

    def update(r: int) -> None:
        r = int(r)
        sm = state["sample_maps"][:, :r]
        maps = sm.mean(1)
        spread = sm.std(1)
        s_text = state["sample_probs"][:, :r].mean(axis=(1, 2))
        s_img = maps.reshape(n, -1).max(1)
        scores = s_text + s_img
        vmax_spread = max(float(spread.max()), 1e-6)
        for j in range(n):
            map_ims[j].set_data(maps[j])
            spread_ims[j].set_data(spread[j])
            spread_ims[j].set_clim(0, vmax_spread)
            axes[1, j].set_title(f"s = {s_text[j]:.3f} + {s_img[j]:.3f}", fontsize=8)
        fig.suptitle(f"R = {r} samples (seed {state['seed']}): s = s_text + max(M)", fontsize=10)
        state.update(R=r, maps=maps, spread=spread, scores=scores, s_text=s_text, s_img=s_img)
        state["history"].append((state["seed"], r))
        if show:
            from IPython.display import display
            with out_w:
                out_w.clear_output(wait=True)
                display(fig)

    def redraw(*_args) -> None:
        draw(state["seed"] + 1)
        update(slider.value)

    slider.observe(lambda change: update(change["new"]), names="value")
    button.on_click(redraw)
    state.update(update=update, redraw=redraw, button=button, slider=slider, fig=fig, axes=axes, output=out_w,
                 features=feats, ui=widgets.VBox([widgets.HBox([slider, button]), out_w]))
    update(r0)
    return slider, state
