"""The teaching notebooks' session (``notebooks/NN_*.ipynb``): mode, banner, folders, cached training.

Each notebook has ONE setup cell::

    MODE = None                       # None: $BPFL_MODE, else "fast"; "paper" for the paper's setting
    from bpfl import notebook as nb
    S = nb.setup("02_prompt_flow_density", mode=MODE)

:func:`setup` picks the mode, prints a banner that says which mode runs and why, seeds everything, applies the
plotting style and creates the results folder. The returned :class:`NotebookSetup` knows the configuration, the
backbone (loaded once, shared by every model of the notebook), the datasets, and where figures and checkpoints go.

Modes
-----
``"fast"`` (default; a laptop CPU in minutes): the backbone of
:func:`bpfl.backbone_choice.choose_backbone` -- real CLIP if cached, else the kit's **bundled toy CLIP** at 112 px
(``BPFL_FAST_BACKBONE=tiny`` asks for the random ``bpfl-tiny``, whose numbers are mechanics only); the demo's
training recipe (teaching preset) on the synthetic dataset's ``default`` split; one model trained once, cached and
shared by every notebook; one torch thread (the small models run 20-100x faster single-threaded on a busy
machine).

``"paper"``: :meth:`BayesPFLConfig.paper` -- ViT-L-14-336 with OpenAI weights at 518 px, layers 6/12/18/24, B = 3,
P = Q = 5, K = 10, R = 1 (train) / 10 (test), Adam 1e-4, batch 32, 20 epochs, 5 seeds -- on
:func:`bpfl.backbone.pick_device` (CUDA, then MPS, then CPU: nothing is hard-coded to CUDA).

Environment variables (all optional)
------------------------------------
``BPFL_MODE`` fast | paper. ``BPFL_RESULTS_DIR`` where figures, tables and checkpoints go (default
``notebooks/results``). ``BPFL_DATA_DIR`` where the synthetic dataset is generated (default ``data/``).
``BPFL_SHARED_DATA`` the real samples (default ``../shared/data`` next to the checkout). ``BPFL_DEVICE`` force a
device. ``BPFL_THREADS`` torch CPU threads (default: 1 for the kit's small backbones, else torch's choice).
``BPFL_FAST_BACKBONE`` auto | toy | tiny (fast mode). ``BPFL_OVERRIDES`` config overrides,
``"key=value;key=value"`` (e.g. ``pretrained=/path/ViT-L-14-336.pt;epochs=5``). ``BPFL_AUX_DATA`` the auxiliary
training set (e.g. a VisA root; default: the synthetic *seen* categories). ``BPFL_TARGETS`` target datasets,
``"Name=/path;Name2=/path"`` (default: the synthetic *unseen* categories and the real samples when present).

Widgets
-------
:func:`k_slider_demo` and :func:`r_slider_demo` return ``(widget, state)``: a real ``ipywidgets`` control and a
dict with the data it shows, the figure, the box to display (``state["ui"]``) and the callbacks as plain functions
(``state["update"]``, ``state["redraw"]``), so tests can drive them without a browser.
"""

import hashlib
import json
import logging
import math  # noqa: F401
import os
import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from ..backbone import default_layers, load_backbone, pick_device
from ..backbone_choice import choose_backbone, run_notes, set_cpu_threads
from ..bundled_weights import BUNDLED_ARCH, BUNDLED_TAG, short_hash
from ..config import BayesPFLConfig, parse_overrides
from ..data import SYNTHETIC_GROUPS, SYNTHETIC_PRESETS, ensure_synthetic, open_dataset
from ..evaluate import markdown_table
from ..model import BayesPFL
from ..train import load_model, seed_everything, train
from ..viz import save_figure, set_style
from .widgets import LiveLossPlot

MODES = ("fast", "paper")
REPO_ROOT = Path(__file__).resolve().parents[2]
#: how :meth:`NotebookSetup.train_or_load` announces a training run (a model from the cache prints "loaded")
TRAINING_LINE = "[bpfl] training "

#: What a random-backbone run is, in one sentence, for banners and table captions.
MECHANICS_NOTE = ("Random-weight backbone: these numbers show the pipeline's mechanics, not what Bayes-PFL "
                  "achieves (zero-shot transfer is at chance without pretrained CLIP features).")

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


def fast_backbone(image_size: int = 112) -> tuple[dict, str]:
    """Config overrides of the fast mode's backbone and why it was chosen:
    :func:`bpfl.backbone_choice.choose_backbone` of ``$BPFL_FAST_BACKBONE`` (``auto`` (default), ``toy`` or
    ``tiny``) at ``image_size``."""
    request = os.environ.get("BPFL_FAST_BACKBONE", "auto").strip().lower() or "auto"
    if request not in {"auto", "toy", "tiny"}:
        raise ValueError(f"BPFL_FAST_BACKBONE={request!r}: choose auto, toy or tiny")
    choice = choose_backbone(request, image_size=image_size)
    return choice.overrides(), choice.reason


def _env_overrides() -> dict:
    text = os.environ.get("BPFL_OVERRIDES", "").strip()
    if not text:
        return {}
    try:
        return parse_overrides([p for p in text.replace(",,", ";").split(";") if p.strip()])
    except ValueError as e:
        raise ValueError(f"BPFL_OVERRIDES: {e}") from None


def mode_config(mode: str, **overrides: Any) -> tuple[BayesPFLConfig, str]:
    """The configuration of a mode (plus ``$BPFL_OVERRIDES`` and ``overrides``) and why this backbone."""
    if mode == "fast":
        bb, why = fast_backbone()
        cfg = BayesPFLConfig.teaching(**bb, seed=0)  # the demo's recipe: one model good enough to show the method
    elif mode == "paper":
        cfg = BayesPFLConfig.paper()
        why = "the paper's backbone: OpenAI CLIP ViT-L-14-336 at 518 px, layers 6/12/18/24"
    else:
        raise ValueError(f"mode {mode!r}: choose one of {MODES}")
    changes = {**_env_overrides(), **overrides}
    if changes.get("seed", cfg.seed) == cfg.seed:
        changes.pop("seed", None)
    if "backbone" in changes and "layers" not in changes:
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
    "fast": ModeScale("default", (0, 1), (1, 2, 4, 8), 12, 90, 4, 6),
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

    @property
    def toy_backbone(self) -> bool:
        """The kit's toy CLIP: it knows the synthetic surfaces only (real samples: numbers mean nothing)."""
        return self.config.backbone == BUNDLED_ARCH and not self.random_backbone

    def weights_label(self) -> str:
        cfg = self.config
        if self.random_backbone:
            return "RANDOM weights"
        if cfg.pretrained == BUNDLED_TAG:
            return f"bundled toy CLIP, sha256 {short_hash()}"
        return f"weights: {cfg.pretrained}"

    def data_notes(self, synthetic: bool = True) -> list[str]:
        """The notes a table or figure on this data must carry (:func:`bpfl.backbone_choice.run_notes`)."""
        return run_notes(self.config, synthetic_data=synthetic)

    def banner_text(self) -> str:
        cfg = self.config
        weights = self.weights_label()
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
        elif self.toy_backbone:
            lines.append("  NOTE          : the toy CLIP knows procedural surfaces only: its numbers on the real "
                         "samples (MVTec, Kvasir) mean nothing")
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
        cfg = self.config
        torch.manual_seed(cfg.seed)  # random-weight backbones are seeded: the same in every notebook
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger().setLevel(logging.ERROR)  # open_clip's 'no pretrained weights' for bpfl-tiny
            return load_backbone(cfg.backbone, cfg.pretrained, cfg.image_size, cfg.layers, self.device,
                                 quick_gelu=cfg.quick_gelu, precision=cfg.precision)

    def new_model(self, config: BayesPFLConfig | None = None, **changes: Any):
        """A freshly initialised :class:`bpfl.model.BayesPFL` on the shared backbone (seeded by ``config.seed``)."""
        cfg = (config or self.config).replace(**changes) if changes else (config or self.config)
        backbone = self.backbone  # loaded (and its own random draws done) before the model's seed is set
        seed_everything(cfg.seed)
        return BayesPFL(cfg, backbone=backbone)

    # ---- data
    def synthetic_root(self, preset: str | None = None) -> Path:
        """The synthetic dataset of ``preset`` (default: this mode's), generated on first use, reused afterwards."""
        preset = preset or self.scale.synthetic_preset
        if preset not in SYNTHETIC_PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}: choose one of {sorted(SYNTHETIC_PRESETS)}")
        root = self.data_dir / ("synthetic" if preset == "default" else f"synthetic-{preset}")
        return ensure_synthetic(root, preset, seed=0, quiet=True)

    def aux_dataset(self, image_size: int | None = None):
        """The auxiliary (training) set: ``$BPFL_AUX_DATA`` (its test split, the paper's protocol) or the
        synthetic *seen* categories."""
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
        print(f"{TRAINING_LINE}{name}: {len(ds)} images, {cfg.epochs} epochs, batch {cfg.batch_size} ...", flush=True)
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
        return load_model(trained.checkpoint, backbone=self.backbone, **config_changes)

    # ---- output
    def save(self, fig, name: str) -> list[Path]:
        """Save a figure as PNG and PDF under this notebook's results folder."""
        return save_figure(fig, self.results / name)

    def save_table(self, df, name: str, caption: str = "") -> list[Path]:
        """Write a table as CSV and as markdown (with its caption) under this notebook's results folder."""
        base = self.results / name
        base.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(base.with_suffix(".csv"))
        base.with_suffix(".md").write_text((caption + "\n\n" if caption else "") + markdown_table(df) + "\n")
        return [base.with_suffix(".csv"), base.with_suffix(".md")]

    def provenance(self, model=None, dataset: str = "", n_samples: int | None = None,
                   seeds: Sequence[int] | None = None) -> str:
        """One line: backbone, weights, size, R, K, B, seeds, dataset (every table row carries it)."""
        cfg = model.config if model is not None else self.config
        weights = ("random weights" if _is_random(cfg.pretrained) else
                   f"bundled toy CLIP {short_hash()}" if cfg.pretrained == BUNDLED_TAG else str(cfg.pretrained))
        if weights and len(weights) > 40:
            weights = "…" + weights[-38:]
        seeds = list(self.seeds if seeds is None else seeds)
        return (f"{cfg.backbone} ({weights}), {cfg.image_size}px, R={n_samples or cfg.test_samples}, "
                f"K={cfg.flow_length}, B={cfg.n_prompts}, seeds={','.join(map(str, seeds))}, {dataset}")


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
    mode, why = detect_mode(mode)
    cfg, bb_why = mode_config(mode, seed=seed, **overrides)
    device = pick_device(os.environ.get("BPFL_DEVICE") or None)
    set_cpu_threads(cfg.backbone, device)
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


