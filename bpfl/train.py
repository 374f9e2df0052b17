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

from . import distributed
from .backbone import ImageFeatures
from .config import BayesPFLConfig
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


def read_checkpoint(path: str | Path) -> dict:
    """Load a kit checkpoint safely (``weights_only=True``), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; train one with `bpfl train` or pass --checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / foreign file
        raise ValueError(f"{path} is not a readable bpfl checkpoint ({type(e).__name__}: {e}). For the authors' "
                         "released .pth files use bpfl.load_reference_checkpoint.") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != "bpfl-checkpoint-v1":
        raise ValueError(f"{path} is not a bpfl checkpoint (no 'format' key); for the authors' released .pth "
                         "files use bpfl.load_reference_checkpoint")
    return ckpt


def load_model(path: str | Path, device: str | torch.device | None = None, backbone=None,
               **config_overrides) -> BayesPFL:
    """Rebuild a :class:`BayesPFL` from a checkpoint (CLIP weights come from the backbone named in its config)."""
    ckpt = read_checkpoint(path)
    cfg = BayesPFLConfig.from_dict(ckpt["config"]).replace(**config_overrides)
    model = BayesPFL(cfg, backbone=backbone, device=device)
    model.load_trainable_state_dict(ckpt["state"])
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
    result = _train(model, dataset, out_dir, dctx, epochs=epochs, resume=resume, checkpoint_every=checkpoint_every,
                    max_steps=max_steps, feature_cache_bytes=feature_cache_bytes, progress=progress,
                    num_workers=num_workers, epoch_callback=epoch_callback, val_fn=val_fn, patience=patience)
    dctx.close()
    return result


def _train(model: BayesPFL, dataset: Dataset, out_dir: str | Path, dctx: "distributed.DistContext", *,
           epochs, resume, checkpoint_every, max_steps, feature_cache_bytes, progress, num_workers,
           epoch_callback, val_fn, patience) -> TrainResult:
    from tqdm.auto import tqdm

    from .data import collate

    cfg = model.config
    main = dctx.is_main
    progress = progress and main
    world = dctx.world_size
    epochs = cfg.epochs if epochs is None else epochs
    out_dir = Path(out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT_NAME
    log_path = out_dir / "train_log.csv"
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty: check the root, split and categories")
    indexed = _Indexed(dataset)
    global_batch = cfg.batch_size * world
    steps_per_epoch = math.ceil(len(dataset) / global_batch)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, steps_per_epoch * epochs, cfg.cosine_schedule)
    history: list[dict] = []
    start_epoch, skip_steps, global_step = 0, 0, 0
    sample_gen_state = None
    best_score, bad_epochs = -math.inf, 0
    found = dctx.broadcast_object(ckpt_path.exists() if main else None)
    if resume and found:
        # rank 0 reads the checkpoint and hands it to the others (no shared filesystem needed)
        ckpt = dctx.broadcast_object(read_checkpoint(ckpt_path) if main else None)
        if ckpt["config"] != cfg.to_dict():
            diff = {k: (v, cfg.to_dict().get(k)) for k, v in ckpt["config"].items() if cfg.to_dict().get(k) != v}
            raise ValueError(f"--resume: {ckpt_path} was written with a different config {diff}; "
                             "use the same settings or a new --out directory")
        model.load_trainable_state_dict(ckpt["state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, skip_steps, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        sample_gen_state = ckpt.get("sample_generator")
        history = list(ckpt.get("history", []))
        best_score, bad_epochs = ckpt.get("best_score", -math.inf), ckpt.get("bad_epochs", 0)
        if progress:
            print(f"[bpfl] resuming {ckpt_path}: epoch {start_epoch + 1}, step {skip_steps} of {steps_per_epoch}")
    elif found and not resume and main:
        ckpt_path.unlink()  # a fresh run; the old checkpoint would be misleading
    cache = FeatureCache(feature_cache_bytes)  # one per rank: each caches the images of its own shards
    step_fn = distributed.wrap(model, dctx) if dctx.enabled else None

    def checkpoint(path: Path, **extra) -> None:
        if main:
            save_checkpoint(path, model, **extra)
    t0 = time.perf_counter()
    model.train()
    done = False
    for epoch in range(start_epoch, epochs):
        order = torch.randperm(len(dataset), generator=_generator(cfg.seed, epoch, 0)).tolist()
        sampler_gen = _generator(cfg.seed, epoch, 1)
        if sample_gen_state is not None and epoch == start_epoch:
            sampler_gen.set_state(sample_gen_state)
        first = skip_steps if epoch == start_epoch else 0  # resuming mid-epoch: same order, later batches
        plan = None
        if dctx.enabled:  # this rank's contiguous slice of every global batch of the single-process order
            plan = distributed.epoch_plan(order, global_batch, world, dctx.rank, first)
            loader = DataLoader(indexed, batch_sampler=[s.indices for s in plan], num_workers=num_workers,
                                collate_fn=collate)
        else:
            loader = DataLoader(Subset(indexed, order[first * cfg.batch_size:]), batch_size=cfg.batch_size,
                                shuffle=False, num_workers=num_workers, collate_fn=collate)
        sums: dict[str, float] = {}
        n_batches = 0
        steps_in_epoch = first
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for step, batch in enumerate(bar, start=first):
            idx = batch["index"].tolist()
            feats = cache.get(idx)
            if feats is None:
                feats = model.backbone.encode_image(batch["image"])
                cache.put(idx, feats)
            masks = _masks_for_training(batch, getattr(dataset, "root", ""))
            if step_fn is not None:  # DDP: the global batch's loss from this rank's shard
                losses = step_fn(feats, batch["class_name"], masks, batch["label"], sampler_gen, plan[step - first])
            else:
                out = model(None, batch["class_name"], features=feats, generator=sampler_gen)
                losses = model.loss(out, masks, batch["label"], generator=sampler_gen)
            total = losses["total"]
            if not torch.isfinite(total):
                bad = {k: float(v.detach()) for k, v in losses.items() if not math.isfinite(float(v.detach()))}
                raise FloatingPointError(
                    f"loss is {float(total.detach())} at epoch {epoch + 1}, step {step + 1} "
                    f"(global step {global_step + 1}); "
                    f"non-finite terms: {bad}. Lower the learning rate (now {cfg.lr}) or check the data; the last "
                    f"good checkpoint is {ckpt_path if ckpt_path.exists() else 'not written yet'}.")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            global_step += 1
            n_batches += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(total.detach()):.4f}")
            last_step = step + 1 == steps_per_epoch
            steps_in_epoch = step + 1
            if checkpoint_every and global_step % checkpoint_every == 0 and not last_step:
                checkpoint(ckpt_path, optimizer=optimizer.state_dict(),
                           scheduler=scheduler.state_dict(), epoch=epoch, step_in_epoch=step + 1,
                           global_step=global_step, sample_generator=sampler_gen.get_state(),
                           history=history, best_score=best_score, bad_epochs=bad_epochs)
            if max_steps is not None and global_step >= max_steps:
                done = True
                break
        row = {"epoch": epoch + 1, "steps": n_batches, "seconds": round(time.perf_counter() - t0, 2),
               **{k: v / max(1, n_batches) for k, v in sums.items()}}
        if epoch_callback is not None:  # rank 0 only; the others wait for its result
            extra = dctx.broadcast_object(epoch_callback(epoch + 1, model) if main else None)
            model.train()
            if extra:
                row.update(extra)
        if val_fn is not None:
            score = float(dctx.broadcast_object(float(val_fn(model)) if main else None))
            model.train()
            row["val_score"] = score
            if score > best_score:
                best_score, bad_epochs = score, 0
                checkpoint(out_dir / "best.pt", epoch=epoch + 1, val_score=score)
            else:
                bad_epochs += 1
        finished_epoch = steps_in_epoch == steps_per_epoch
        if finished_epoch:
            history.append(row)
            if main:
                _write_log(log_path, history)
        checkpoint(ckpt_path, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                   epoch=epoch + 1 if finished_epoch else epoch,
                   step_in_epoch=0 if finished_epoch else steps_in_epoch,
                   global_step=global_step, sample_generator=None if finished_epoch else sampler_gen.get_state(),
                   history=history, best_score=best_score, bad_epochs=bad_epochs)
        if progress:
            terms = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k not in {"epoch", "steps", "seconds"})
            print(f"[bpfl] epoch {epoch + 1}/{epochs}: {terms}", flush=True)
        if done or (val_fn is not None and bad_epochs >= patience):
            break
    model.eval()
    final = ckpt_path
    if val_fn is not None and dctx.broadcast_object((out_dir / "best.pt").exists() if main else None):
        final = out_dir / "best.pt"
        if main:
            model.load_trainable_state_dict(read_checkpoint(final)["state"])
        dctx.broadcast_tensors([p for p in model.parameters() if p.requires_grad])  # rank 0's best weights
    return TrainResult(model=model, checkpoint=final, history=history, seconds=time.perf_counter() - t0)


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
    from .evaluate import evaluate

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
    from .data import AnomalyDataset

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
