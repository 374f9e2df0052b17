"""Training on an auxiliary dataset (paper §3.6, §4.1).

The paper's protocol trains on the auxiliary dataset's **test split** (all normal and anomalous images with
masks): VisA to test on everything else, MVTec-AD to test on VisA. Training uses R = 1 Monte-Carlo sample,
Adam (lr 1e-4, batch 32, 20 epochs) and the loss of Eq. 14. The CLIP encoders stay frozen; only the kit's own
parameters are optimised and checkpointed.

Checkpoints are written atomically (temporary file + rename) at every epoch end (and every
``checkpoint_every`` steps); ``resume=True`` continues a killed run from the last one and reproduces the
uninterrupted run exactly on the same device: the shuffling order and the flow samples come from generators
seeded by (seed, epoch), whose states are stored in the checkpoint.

Launched by ``torchrun --nproc_per_node=N -m bpfl train ...`` the same loop trains with PyTorch DDP over N
processes (:mod:`bpfl.distributed`, ``docs/distributed.md``): ``config.batch_size`` is then the per-rank batch,
each global batch of N·batch_size images is the one a single process with that batch size would see, and the
parameters match that single-process run up to float rounding. Only rank 0 prints and writes files.

Model selection never looks at target data by default (``selection="last"``). ``"aux-val"`` holds out part of
the *auxiliary* set; ``"released-target"`` reproduces the released code's rule (pick the epoch by pixel AP on
categories of the *target* dataset, i.e. test-set leakage) and must be asked for by name.
"""
from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from . import distributed
from .backbone import ImageFeatures, WeightsNotAvailableError
from .config import BayesPFLConfig
from .data import AnomalyDataset, collate
from .evaluate import evaluate
from .model import BayesPFL

CHECKPOINT_NAME = "last.pt"


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, model: BayesPFL, **extra) -> Path:
    """Atomically write the kit's own parameters (never CLIP weights) + config + ``extra`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": "bpfl-checkpoint-v1", "config": model.config.to_dict(),
               "backbone": {"name": model.backbone.name, "pretrained": model.backbone.pretrained},
               "state": model.trainable_state_dict(), **extra}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


#: ``format`` entry of every checkpoint :func:`save_checkpoint` writes.
CHECKPOINT_FORMAT = "bpfl-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, not a file, empty, truncated or corrupt, not a bpfl checkpoint,
    refused as unsafe (pickled code), or not fitting the model its config builds.

    The message is one line that names the file and says what to do; ``bpfl`` prints it without a traceback.
    Subclass of ``ValueError`` (what :func:`read_checkpoint` raised before it existed).
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist (also a ``FileNotFoundError``)."""


def _one_line(error: BaseException | str, limit: int = 240) -> str:
    """An exception's text on one line, at most ``limit`` characters."""
    text = " ".join(str(error.args[0] if isinstance(error, KeyError) and error.args else error).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _describe_foreign_bytes(head: bytes) -> str:
    if head.startswith(b"\x89PNG"):
        return "it is a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "it is a JPEG image"
    if head.startswith((b"{", b"[")):
        return "it looks like a JSON/text file"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return "it is a text file"
    return f"it starts with the bytes {head[:8]!r}, not with a zip archive"


def _refused_pickle_detail(error: BaseException) -> str:
    import re
    text = str(error)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"a reference to {m.group(1)}"
    m = re.search(r"Unsupported operand (\d+)", text)
    if m:
        return f"pickle instruction {m.group(1)}, which plain tensors never need"
    return _one_line(text.split("WeightsUnpickler error:")[-1], 120)


def read_checkpoint(path: str | Path) -> dict:
    """Load a kit checkpoint safely, or raise :class:`CheckpointError` with one line saying what is wrong.

    Nothing in the file is ever executed: the file is first checked to be what :func:`save_checkpoint` writes
    (a zip archive with a PyTorch pickle inside; a bare pickle is refused without being unpickled), then read
    with ``torch.load(weights_only=True)``, which accepts tensors and plain containers only and stops at the
    first reference to any other Python object.
    """
    import pickle
    import warnings
    import zipfile

    path = Path(path)
    unreadable = f"{path} is not a readable bpfl checkpoint"
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} not found; train one with `bpfl train` (it writes "
                                      "OUT/last.pt) or pass the right --checkpoint path")
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        hint = f"; pass --checkpoint {inside}" if inside.is_file() else "; pass the .pt file `bpfl train` wrote"
        raise CheckpointError(f"checkpoint {path} is a folder, not a file{hint}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise CheckpointError(f"{unreadable}: it cannot be opened ({_one_line(e)}); check its permissions") from e
    again = "copy it again or use another checkpoint (e.g. an earlier OUT/last.pt)"
    if size == 0:
        raise CheckpointError(f"{unreadable}: the file is empty (0 bytes), so whatever wrote or copied it stopped "
                              f"early; {again}")
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{unreadable}: it is truncated or corrupt ({size} bytes: it starts like a "
                                  f"PyTorch checkpoint but the end of its zip archive is missing); {again}")
        if head[:1] == b"\x80":
            raise CheckpointError(f"{path} was refused: it is a bare Python pickle, not a checkpoint written by "
                                  "`bpfl train` (those are zip archives), and unpickling it could run code, so it "
                                  "was not unpickled and nothing in it ran; use a checkpoint written by `bpfl "
                                  "train` (for the authors' released .pth files: bpfl.load_reference_checkpoint)")
        raise CheckpointError(f"{unreadable}: {_describe_foreign_bytes(head)}; pass the .pt file `bpfl train` "
                              "wrote (OUT/last.pt)")
    try:
        with zipfile.ZipFile(path) as z:
            has_pickle = any(n.endswith("data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{unreadable}: it is corrupt ({_one_line(e)}); {again}") from e
    if not has_pickle:
        raise CheckpointError(f"{unreadable}: it is a zip archive but not a PyTorch file (no data.pkl inside); "
                              "pass the .pt file `bpfl train` wrote (OUT/last.pt)")
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are not for the user
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # not a refusal: the pickle itself is damaged
            raise CheckpointError(f"{unreadable}: it is corrupt ({_one_line(e, 160)}); {again}") from e
        raise CheckpointError(f"{path} was refused: it holds Python objects that a bpfl checkpoint never "
                              f"contains ({_refused_pickle_detail(e)}); loading stopped before any of them ran. "
                              "Use a checkpoint written by `bpfl train`, and do not open this file with "
                              "torch.load(weights_only=False) or pickle") from e
    except Exception as e:  # noqa: BLE001 - anything else torch's reader hits is a damaged file
        raise CheckpointError(f"{unreadable}: it is corrupt ({type(e).__name__}: {_one_line(e, 160)}); "
                              f"{again}") from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != CHECKPOINT_FORMAT:
        if isinstance(fmt, str) and fmt.startswith("bpfl-checkpoint-"):
            raise CheckpointError(f"{path} is a {fmt} checkpoint, which this version of bpfl (it reads "
                                  f"{CHECKPOINT_FORMAT}) does not know; use the bpfl version that wrote it or "
                                  "retrain with `bpfl train`")
        what = (f"a dict with keys {sorted(map(str, ckpt))[:6]}" if isinstance(ckpt, dict)
                else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path} is not a bpfl checkpoint: it is a PyTorch file holding {what}, without "
                              f"'format': '{CHECKPOINT_FORMAT}'; pass a checkpoint written by `bpfl train` (for "
                              "the authors' released .pth files: bpfl.load_reference_checkpoint)")
    for key in ("config", "state"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path} is damaged: its '{key}' entry is missing or not a dict; {again}")
    return ckpt


def load_model(path: str | Path, device: str | torch.device | None = None, backbone=None,
               **config_overrides) -> BayesPFL:
    """Rebuild a :class:`BayesPFL` from a checkpoint (CLIP weights come from the backbone named in its config).

    Every way the file can fail to give a model raises :class:`CheckpointError` (one line: the file, what is
    wrong, what to do), except pretrained CLIP weights that cannot be had here
    (:class:`bpfl.backbone.WeightsNotAvailableError`, whose message says how to get them).
    """

    ckpt = read_checkpoint(path)
    path = Path(path)
    try:
        cfg = BayesPFLConfig.from_dict(ckpt["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config does not fit this version of bpfl "
                              f"({_one_line(str(e).split('; known keys')[0])}); use the "
                              "bpfl version that wrote it or retrain with `bpfl train`") from e
    overrides = ", ".join(f"{k}={v!r}" for k, v in config_overrides.items())
    try:
        cfg = cfg.replace(**config_overrides)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the overrides {overrides} do not give a valid config ({_one_line(e)}); "
                              "fix or drop them (--set)") from e
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        model = BayesPFL(cfg, backbone=backbone, device=device)
    except (WeightsNotAvailableError, out_of_memory):
        raise
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        raise CheckpointError(f"{path}: the model its config describes cannot be built here (backbone "
                              f"{cfg.backbone}, weights {cfg.pretrained or 'random'}: "
                              f"{_one_line(str(e).split(' Available:')[0], 160)}); if the "
                              "CLIP weights are elsewhere on this machine pass --set pretrained=FILE, or use a "
                              "checkpoint trained on a backbone available here") from e
    try:
        model.load_trainable_state_dict(ckpt["state"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        import re
        m = re.search(r"size mismatch for [^\n]*?(?=\.\s|\.$|$)", str(e))
        detail = m.group(0) if m else _one_line(e, 200)
        if config_overrides:
            fix = f"drop the overrides that change the model's shape ({overrides})"
        elif backbone is not None:
            fix = (f"the backbone passed ({getattr(backbone, 'name', type(backbone).__name__)}) is not the one it "
                   f"was trained with ({cfg.backbone}); pass that one or none")
        else:
            fix = "the file was edited or written by another version of bpfl; retrain with `bpfl train`"
        raise CheckpointError(f"{path} does not fit the model its config builds ({_one_line(detail, 200)}); "
                              f"{fix}") from e
    return model.eval()


# ------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch * 101 + stream)


def make_optimizer(model: BayesPFL) -> torch.optim.Optimizer:
    """Adam over the kit's parameters: one lr (paper) or the released code's four groups."""
    cfg = model.config
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not cfg.group_lrs:
        return torch.optim.Adam([p for _, p in params], lr=cfg.lr, betas=cfg.adam_betas)
    groups: dict[str, list] = {"prompts": [], "temperatures": [], "flow": [], "rest": []}
    for n, p in params:
        if n.startswith("prompts."):
            groups["prompts"].append(p)
        elif "temperature" in n:
            groups["temperatures"].append(p)
        elif n.endswith("_xi") or ".flow." in n:  # planar u, w, b, amortisers and the IAD free vectors
            groups["flow"].append(p)
        else:
            groups["rest"].append(p)
    lrs = {"prompts": 1e-3, "temperatures": 1e-2, "flow": 1e-3, "rest": 1e-4}
    return torch.optim.Adam([{"params": v, "lr": lrs[k], "name": k} for k, v in groups.items() if v],
                            betas=cfg.adam_betas)


def make_scheduler(optimizer, total_steps: int, enabled: bool):
    """Cosine decay with 10 % linear warm-up (released code), or a constant lr."""
    if not enabled:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = max(1, int(0.1 * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FeatureCache:
    """Frozen CLIP features per dataset index, kept in memory (fp32 on the CPU) up to a byte budget.

    Valid because training applies no random augmentation: the image encoder's output for an image never
    changes, so epochs after the first skip the (dominant) CLIP image pass.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.items: dict[int, ImageFeatures] = {}

    def get(self, indices: Sequence[int]) -> ImageFeatures | None:
        if all(i in self.items for i in indices):
            return ImageFeatures.cat([self.items[i] for i in indices])
        return None

    def put(self, indices: Sequence[int], feats: ImageFeatures) -> None:
        for j, i in enumerate(indices):
            if i in self.items:
                continue
            f = feats[j:j + 1].to("cpu")
            size = 4 * (f.cls.numel() + sum(t.numel() for t in f.patch_tokens))
            if self.used + size > self.budget:
                return
            self.items[i] = f
            self.used += size


class _Indexed(Dataset):
    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.base[i])
        item["index"] = i
        return item


def _masks_for_training(batch: dict, dataset_root: str) -> torch.Tensor:
    masks = batch["mask"].clone()
    nan = torch.isnan(masks).flatten(1).any(1)
    bad = nan & (batch["label"] == 1)
    if bad.any():
        path = batch["path"][int(bad.nonzero()[0])]
        raise ValueError(f"training needs a mask for every anomalous image; {path} has none (dataset "
                         f"{dataset_root}). Train on a set with masks, or run `bpfl data check`.")
    masks[nan] = 0.0
    return masks


@dataclass
class TrainResult:
    model: BayesPFL
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------- the loop
def train(model: BayesPFL, dataset: Dataset, out_dir: str | Path, *, epochs: int | None = None,
          resume: bool = False, checkpoint_every: int = 0, max_steps: int | None = None,
          feature_cache_bytes: int = 4 << 30, progress: bool = True, num_workers: int = 0,
          epoch_callback: Callable[[int, BayesPFL], dict | None] | None = None,
          val_fn: Callable[[BayesPFL], float] | None = None, patience: int = 3) -> TrainResult:
    """Train ``model`` on ``dataset`` (items as produced by :class:`bpfl.data.AnomalyDataset`).

    Writes ``out_dir/last.pt`` (atomically, every epoch and every ``checkpoint_every`` steps),
    ``out_dir/train_log.csv`` (one row per epoch, every loss term) and, with a ``val_fn``,
    ``out_dir/best.pt``. ``max_steps`` stops early (tests, smoke runs). ``epoch_callback(epoch, model)`` runs
    after each epoch (e.g. the per-epoch evaluation behind Figure 4); a dict it returns is logged.
    ``val_fn(model) -> score`` (higher is better) implements ``selection="aux-val"`` / ``"released-target"``
    with early stopping after ``patience`` epochs without improvement.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is distributed (:mod:`bpfl.distributed`): ``cfg.batch_size``
    images per rank, global batch = that × world size, DDP-averaged gradients, results equal to one process with
    the global batch; callbacks and ``val_fn`` run on rank 0 only (their results are broadcast), and only rank 0
    writes files and prints.
    """
    dctx = distributed.setup(model)
    run = TrainingRun(model, dataset, out_dir, dctx, epochs=epochs, checkpoint_every=checkpoint_every,
                      max_steps=max_steps, feature_cache_bytes=feature_cache_bytes, progress=progress,
                      num_workers=num_workers, epoch_callback=epoch_callback, val_fn=val_fn, patience=patience)
    run.restore(resume)
    for epoch in range(run.state.epoch, run.epochs):
        if run.run_epoch(epoch):
            break
    result = run.finish()
    dctx.close()
    return result


@dataclass
class RunState:
    """Where a run stands: what ``last.pt`` stores beside the weights, optimiser and scheduler."""

    epoch: int = 0  # the epoch to run next (0-based)
    skip_steps: int = 0  # steps of that epoch already done (a checkpoint written mid-epoch)
    global_step: int = 0
    sample_generator: torch.Tensor | None = None  # the sampling RNG's state mid-epoch
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    bad_epochs: int = 0

    def checkpoint_fields(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.skip_steps, "global_step": self.global_step,
                "sample_generator": self.sample_generator, "history": self.history,
                "best_score": self.best_score, "bad_epochs": self.bad_epochs}


class TrainingRun:
    """One call of :func:`train`, in named steps: :meth:`restore` (resume), :meth:`run_epoch` (the epoch's batches:
    :meth:`epoch_loader`, :meth:`features`, :meth:`batch_losses`, :meth:`optimise`, :meth:`maybe_checkpoint`),
    :meth:`end_epoch` (callbacks, validation, log, checkpoint) and :meth:`finish` (the best weights, if any)."""

    def __init__(self, model: BayesPFL, dataset: Dataset, out_dir: str | Path, dctx: "distributed.DistContext", *,
                 epochs, checkpoint_every, max_steps, feature_cache_bytes, progress, num_workers, epoch_callback,
                 val_fn, patience):
        if len(dataset) == 0:
            raise ValueError("the training dataset is empty: check the root, split and categories")
        self.model, self.dataset, self.dctx = model, dataset, dctx
        self.cfg = cfg = model.config
        self.main = dctx.is_main
        self.progress = progress and self.main
        self.epochs = cfg.epochs if epochs is None else epochs
        self.out_dir = Path(out_dir)
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.log_path = self.out_dir / "train_log.csv"
        self.checkpoint_every, self.max_steps, self.num_workers = checkpoint_every, max_steps, num_workers
        self.epoch_callback, self.val_fn, self.patience = epoch_callback, val_fn, patience
        self.indexed = _Indexed(dataset)
        self.global_batch = cfg.batch_size * dctx.world_size
        self.steps_per_epoch = math.ceil(len(dataset) / self.global_batch)
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer, self.steps_per_epoch * self.epochs, cfg.cosine_schedule)
        self.cache = FeatureCache(feature_cache_bytes)  # one per rank: each caches the images of its own shards
        self.step_fn = distributed.wrap(model, dctx) if dctx.enabled else None
        self.state = RunState()
        self.t0 = time.perf_counter()

    # ---- resume
    def restore(self, resume: bool) -> None:
        """Continue from ``last.pt`` (``resume``), or delete a stale one (a fresh run)."""
        found = self.dctx.broadcast_object(self.ckpt_path.exists() if self.main else None)
        if resume and found:
            # rank 0 reads the checkpoint and hands it to the others (no shared filesystem needed)
            ckpt = self.dctx.broadcast_object(read_checkpoint(self.ckpt_path) if self.main else None)
            cfg = self.cfg.to_dict()
            if ckpt["config"] != cfg:
                diff = {k: (v, cfg.get(k)) for k, v in ckpt["config"].items() if cfg.get(k) != v}
                raise ValueError(f"--resume: {self.ckpt_path} was written with a different config {diff}; "
                                 "use the same settings or a new --out directory")
            self.model.load_trainable_state_dict(ckpt["state"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.state = RunState(ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"],
                                  ckpt.get("sample_generator"), list(ckpt.get("history", [])),
                                  ckpt.get("best_score", -math.inf), ckpt.get("bad_epochs", 0))
            if self.progress:
                print(f"[bpfl] resuming {self.ckpt_path}: epoch {self.state.epoch + 1}, step "
                      f"{self.state.skip_steps} of {self.steps_per_epoch}")
        elif found and not resume and self.main:
            self.ckpt_path.unlink()  # a fresh run; the old checkpoint would be misleading
        self.t0 = time.perf_counter()
        self.model.train()

    # ---- one epoch
    def epoch_loader(self, epoch: int, first: int):
        """The epoch's batches from step ``first`` on (a seeded order; resuming mid-epoch: the same order, later
        batches) and, under DDP, this rank's share of every global batch."""
        cfg = self.cfg
        order = torch.randperm(len(self.dataset), generator=_generator(cfg.seed, epoch, 0)).tolist()
        if self.dctx.enabled:  # this rank's contiguous slice of every global batch of the single-process order
            plan = distributed.epoch_plan(order, self.global_batch, self.dctx.world_size, self.dctx.rank, first)
            return DataLoader(self.indexed, batch_sampler=[s.indices for s in plan], num_workers=self.num_workers,
                              collate_fn=collate), plan
        return DataLoader(Subset(self.indexed, order[first * cfg.batch_size:]), batch_size=cfg.batch_size,
                          shuffle=False, num_workers=self.num_workers, collate_fn=collate), None

    def features(self, batch: dict) -> ImageFeatures:
        """The frozen CLIP's features of the batch, encoded once per image and then cached."""
        idx = batch["index"].tolist()
        feats = self.cache.get(idx)
        if feats is None:
            feats = self.model.backbone.encode_image(batch["image"])
            self.cache.put(idx, feats)
        return feats

    def batch_losses(self, batch: dict, feats: ImageFeatures, sampler_gen: torch.Generator, shard) -> dict:
        """Every loss term of Eq. 14 on the batch (under DDP: the global batch's loss from this rank's shard)."""
        masks = _masks_for_training(batch, getattr(self.dataset, "root", ""))
        if self.step_fn is not None:
            return self.step_fn(feats, batch["class_name"], masks, batch["label"], sampler_gen, shard)
        out = self.model(None, batch["class_name"], features=feats, generator=sampler_gen)
        return self.model.loss(out, masks, batch["label"], generator=sampler_gen)

    def optimise(self, losses: dict, epoch: int, step: int) -> None:
        """One Adam step on the total loss; a non-finite loss stops the run with what to do."""
        total = losses["total"]
        if not torch.isfinite(total):
            bad = {k: float(v.detach()) for k, v in losses.items() if not math.isfinite(float(v.detach()))}
            raise FloatingPointError(
                f"loss is {float(total.detach())} at epoch {epoch + 1}, step {step + 1} "
                f"(global step {self.state.global_step + 1}); "
                f"non-finite terms: {bad}. Lower the learning rate (now {self.cfg.lr}) or check the data; the last "
                f"good checkpoint is {self.ckpt_path if self.ckpt_path.exists() else 'not written yet'}.")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.global_step += 1

    def save(self, path: Path, **extra) -> None:
        if self.main:
            save_checkpoint(path, self.model, **extra)

    def save_state(self, epoch: int, step_in_epoch: int, sampler_gen: torch.Generator | None) -> None:
        """``last.pt``: weights, optimiser, scheduler and where the run stands (exact resume)."""
        st = self.state
        self.save(self.ckpt_path, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                  **{**st.checkpoint_fields(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                     "sample_generator": None if sampler_gen is None else sampler_gen.get_state()})

    def run_epoch(self, epoch: int) -> bool:
        """Train one epoch (from where a mid-epoch checkpoint left off); True when the run must stop."""
        st = self.state
        sampler_gen = _generator(self.cfg.seed, epoch, 1)
        if st.sample_generator is not None and epoch == st.epoch:
            sampler_gen.set_state(st.sample_generator)
        first = st.skip_steps if epoch == st.epoch else 0
        loader, plan = self.epoch_loader(epoch, first)
        sums: dict[str, float] = {}
        n_batches, steps_in_epoch, done = 0, first, False
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", disable=not self.progress, leave=False)
        for step, batch in enumerate(bar, start=first):
            losses = self.batch_losses(batch, self.features(batch), sampler_gen,
                                       plan[step - first] if plan is not None else None)
            self.optimise(losses, epoch, step)
            n_batches += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.4f}")
            steps_in_epoch = step + 1
            last_step = step + 1 == self.steps_per_epoch
            if self.checkpoint_every and st.global_step % self.checkpoint_every == 0 and not last_step:
                self.save_state(epoch, step + 1, sampler_gen)
            if self.max_steps is not None and st.global_step >= self.max_steps:
                done = True
                break
        row = {"epoch": epoch + 1, "steps": n_batches, "seconds": round(time.perf_counter() - self.t0, 2),
               **{k: v / max(1, n_batches) for k, v in sums.items()}}
        self.end_epoch(epoch, row, steps_in_epoch, sampler_gen)
        return done or (self.val_fn is not None and st.bad_epochs >= self.patience)

    def end_epoch(self, epoch: int, row: dict, steps_in_epoch: int, sampler_gen: torch.Generator) -> None:
        """The epoch callback (Figure 4), validation (best.pt), the log row and the checkpoint."""
        st, dctx, main = self.state, self.dctx, self.main
        if self.epoch_callback is not None:  # rank 0 only; the others wait for its result
            extra = dctx.broadcast_object(self.epoch_callback(epoch + 1, self.model) if main else None)
            self.model.train()
            if extra:
                row.update(extra)
        if self.val_fn is not None:
            score = float(dctx.broadcast_object(float(self.val_fn(self.model)) if main else None))
            self.model.train()
            row["val_score"] = score
            if score > st.best_score:
                st.best_score, st.bad_epochs = score, 0
                self.save(self.out_dir / "best.pt", epoch=epoch + 1, val_score=score)
            else:
                st.bad_epochs += 1
        finished = steps_in_epoch == self.steps_per_epoch
        if finished:
            st.history.append(row)
            if main:
                _write_log(self.log_path, st.history)
        self.save_state(epoch + 1 if finished else epoch, 0 if finished else steps_in_epoch,
                        None if finished else sampler_gen)
        if self.progress:
            terms = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in {"epoch", "steps", "seconds"})
            print(f"[bpfl] epoch {epoch + 1}/{self.epochs}: {terms}", flush=True)

    # ---- the end
    def finish(self) -> TrainResult:
        """Eval mode; with validation, the best epoch's weights (rank 0's, broadcast)."""
        model, dctx = self.model, self.dctx
        model.eval()
        final = self.ckpt_path
        best = self.out_dir / "best.pt"
        if self.val_fn is not None and dctx.broadcast_object(best.exists() if self.main else None):
            final = best
            if self.main:
                model.load_trainable_state_dict(read_checkpoint(final)["state"])
            dctx.broadcast_tensors([p for p in model.parameters() if p.requires_grad])  # rank 0's best weights
        return TrainResult(model=model, checkpoint=final, history=self.state.history,
                           seconds=time.perf_counter() - self.t0)


def per_epoch_eval(dataset, *, n_samples: int | None = None, batch_size: int = 8, seed: int = 0,
                   metrics: Sequence[str] = ("pixel_ap",), categories: Sequence[str] | None = None,
                   map_sigma: float | None = None, prefix: str = "eval_",
                   history: list[dict] | None = None) -> Callable[[int, BayesPFL], dict]:
    """An ``epoch_callback`` for :func:`train` that evaluates after every epoch (Figure 4: pixel AP vs epoch).

    Each call runs :func:`bpfl.evaluate.evaluate` on ``dataset`` (R = ``n_samples``, default the config's test R;
    the same Monte-Carlo ``seed`` every epoch; no AUPRO, no files) and returns ``{prefix + metric: mean over
    categories}``, which :func:`train` adds to that epoch's row of ``train_log.csv``. ``history``, if given,
    also collects ``{"epoch": e, **metrics}`` rows. Under torchrun it runs on rank 0 only.
    """

    def callback(epoch: int, model: BayesPFL) -> dict:
        res = evaluate(model, dataset, n_samples=n_samples, batch_size=batch_size, seed=seed, map_sigma=map_sigma,
                       aupro_variant=None, progress=False, categories=categories)
        row = {f"{prefix}{m}": res.mean(m) for m in metrics}
        if history is not None:
            history.append({"epoch": epoch, **row})
        return row
    return callback


def _write_log(path: Path, history: list[dict]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, path)


def split_holdout(dataset, fraction: float, seed: int):
    """Split an :class:`AnomalyDataset` into (train, held-out) by a seeded shuffle, stratified by category and label."""

    rng = np.random.default_rng(seed)
    keep, hold = [], []
    groups: dict[tuple, list] = {}
    for r in dataset.records:
        groups.setdefault((r.class_name, r.label), []).append(r)
    for key in sorted(groups):
        rs = groups[key]
        perm = rng.permutation(len(rs))
        n_hold = int(round(fraction * len(rs)))
        hold += [rs[i] for i in perm[:n_hold]]
        keep += [rs[i] for i in perm[n_hold:]]
    make = lambda recs: AnomalyDataset(recs, dataset.image_size, dataset.normalize)  # noqa: E731
    return make(keep), make(hold)
