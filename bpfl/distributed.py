"""Multi-process training with PyTorch DDP, launched by ``torchrun`` (see ``docs/distributed.md``).

``torchrun --nproc_per_node=N -m bpfl train ...`` starts N copies of the same command; :func:`bpfl.train.train`
notices the ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` variables torchrun sets and then:

* initialises the process group (``nccl`` on CUDA, ``gloo`` on CPU) and puts rank r on ``cuda:LOCAL_RANK``;
* splits every **global batch** of the single-process order into contiguous per-rank shards: with
  ``config.batch_size`` = b per rank and W ranks, global step k covers ``order[k·bW:(k+1)·bW]`` exactly as a
  one-process run with batch bW does, and rank r takes its r-th slice (the last, smaller global batch is split
  as evenly as possible; a rank left without an item computes on a placeholder whose rows are dropped);
* wraps the kit's trainable modules (never CLIP) in :class:`torch.nn.parallel.DistributedDataParallel`, which
  averages the gradients over the ranks (``static_graph=True``: every step uses the same parameters, and the
  modules a design or ablation leaves out of the graph are found once, in the first step);
* computes the loss of the **global** batch on every rank (see below), so the run matches one process with
  batch bW up to float rounding -- same losses, same gradients, same parameters;
* keeps a feature cache per rank, and lets only rank 0 print, write ``train_log.csv`` / ``last.pt`` /
  ``best.pt`` and run the per-epoch callbacks (their results are broadcast).

**Why the loss is global, not per shard.** Plain DDP averages the gradients of per-rank losses, which equals the
big-batch gradient only for losses that are means over images. Bayes-PFL's dice is pooled over the whole batch
(and the released balanced focal averages over the batch's fg/bg pixels), and the flow noise ε and the released
"one random prompt pair per step" come from one generator per batch. So each rank:

1. encodes its shard (image features, projections, x) -- the image side is sharded;
2. all-gathers x and x_cls ([bW, C], tiny) and draws the prompt-flow samples for the *global* batch with the
   shared generator (the same draws a one-process run makes), keeping its own rows;
3. encodes its shard's prompts and patch logits (text transformer, RCA: the expensive, sharded part);
4. all-gathers the patch-resolution logit differences, image logits, text embeddings, masks and labels, and
   evaluates ``model.loss`` on the global batch (upsampling to full resolution is done on every rank).

Every rank then holds the same loss L. The gather's backward hands each rank W × ∂L/∂(its own rows) -- the sum
over the W identical copies of L, with no communication -- and DDP divides the summed parameter gradients by
W, which leaves exactly ∂L/∂θ for parameters used on the local rows and for those used in the replicated steps
(flows, KL) alike.
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .backbone import ImageFeatures
from .model import BayesPFLOutput

__all__ = ["DistContext", "setup", "Shard", "shard_sizes", "epoch_plan", "gather_rows", "ShardedStep",
           "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    """Who this process is. ``world_size == 1``: plain single-process training (nothing distributed)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False
    group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (identity when not distributed)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        if self.enabled:
            for t in tensors:
                dist.broadcast(t.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        """End of a training run: wait for every rank. The process group itself stays up for later runs in the
        same process (re-initialising one under torchrun is not supported) and is destroyed at exit."""
        if self.enabled and dist.is_initialized():
            dist.barrier()


def setup(model: nn.Module | None = None) -> DistContext:
    """Join the process group torchrun describes (or one the caller initialised); move ``model`` to this rank's GPU.

    Returns a single-process context when ``WORLD_SIZE`` is unset or 1 and no group is initialised. The backend
    is ``nccl`` when the model is on CUDA, else ``gloo``. The collective timeout is ``BPFL_DIST_TIMEOUT_MIN``
    minutes (default 60: rank 0 may evaluate for a while between epochs while the others wait).
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() == 1:
            return DistContext()
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")))
    elif launched_by_torchrun():
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        on_cuda = model is not None and _device_of(model).type == "cuda"
        if model is not None and _device_of(model).type not in {"cuda", "cpu"}:
            raise RuntimeError(f"distributed training runs on CUDA (nccl) or CPU (gloo), not {_device_of(model)}; "
                               "pass --device cpu or use GPUs")
        if on_cuda:
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(minutes=float(os.environ.get("BPFL_DIST_TIMEOUT_MIN", "60")))
        dist.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timeout)
        atexit.register(_destroy)
        ctx = DistContext(dist.get_world_size(), dist.get_rank(), local_rank, initialized_here=True)
    else:
        return DistContext()
    if model is not None and _device_of(model).type == "cuda":
        target = torch.device("cuda", ctx.local_rank)
        if _device_of(model) != target:
            model.to(target)
    return ctx


def _destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _device_of(model: nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


# ------------------------------------------------------------------------------------------ sharding
def shard_sizes(n: int, world: int) -> list[int]:
    """Split n items into ``world`` contiguous shards as evenly as possible (earlier ranks get the extra ones)."""
    base, extra = divmod(n, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


@dataclass
class Shard:
    """One rank's part of one global batch: rows ``start:start+n_valid`` of it (``counts``: every rank's n)."""

    indices: list[int]  # dataset indices this rank loads (a one-item placeholder when n_valid == 0)
    n_valid: int
    start: int
    counts: list[int] = field(default_factory=list)

    @property
    def global_size(self) -> int:
        return sum(self.counts)


def epoch_plan(order: Sequence[int], global_batch: int, world: int, rank: int, first_step: int = 0) -> list[Shard]:
    """This rank's shards for every global step of an epoch, from ``first_step`` on (resume mid-epoch)."""
    plan = []
    for start in range(first_step * global_batch, len(order), global_batch):
        batch = list(order[start:start + global_batch])
        counts = shard_sizes(len(batch), world)
        lo = sum(counts[:rank])
        n = counts[rank]
        idx = batch[lo:lo + n] if n else batch[:1]
        plan.append(Shard(indices=idx, n_valid=n, start=lo, counts=counts))
    return plan


class _GatherRows(torch.autograd.Function):
    """All-gather variable-length row blocks; backward = W × the gradient of this rank's rows (no communication).

    The factor W is the sum over the W ranks' identical copies of the global loss (each rank computes the same
    L from the same gathered tensors). See the module docstring.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: tuple, rank: int, group):
        world = len(counts)
        n_max = max(counts)
        n = local.shape[0]
        padded = local
        if n < n_max:
            padded = torch.cat([local, local.new_zeros((n_max - n, *local.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.rank, ctx.counts, ctx.world = rank, counts, world
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        start = sum(ctx.counts[:ctx.rank])
        n = ctx.counts[ctx.rank]
        return grad[start:start + n] * ctx.world, None, None, None


def gather_rows(local: torch.Tensor, counts: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """Concatenate every rank's ``local`` rows (``counts[r]`` rows from rank r) in rank order."""
    if len(counts) == 1:
        return local
    return _GatherRows.apply(local, tuple(int(c) for c in counts), rank, group)


class ShardedStep(nn.Module):
    """One training step's loss of the global batch, computed from this rank's shard (see the module docstring).

    Registers only the kit's own modules and parameters (not the frozen CLIP backbone), so DDP broadcasts and
    averages exactly the trainable part. With one process (``counts == [n]``) it computes what
    ``model.loss(model(None, names, features=feats, generator=g), masks, labels, generator=g)`` computes.
    """

    def __init__(self, model: nn.Module, rank: int = 0, group=None):
        super().__init__()
        object.__setattr__(self, "model", model)  # not a submodule: keeps CLIP out of DDP
        self.parts = nn.ModuleDict({n: m for n, m in model.named_children() if n != "backbone"})
        self.direct = nn.ParameterDict({n: p for n, p in model.named_parameters(recurse=False)})
        self.rank, self.group = rank, group

    def forward(self, feats: ImageFeatures, class_names: Sequence[str], masks: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None, shard: Shard) -> dict[str, torch.Tensor]:

        model = self.model
        cfg = model.config
        dev = model.device
        counts, n = shard.counts, shard.n_valid
        gather = lambda t: gather_rows(t[:n], counts, self.rank, self.group)  # noqa: E731
        R = cfg.train_samples
        feats = feats.to(dev)
        patches = model.project_patches(feats)
        x = model.global_embedding(feats, patches)
        if model.prompt_design is None:
            # the flow samples of the GLOBAL batch, drawn with the shared generator (= the one-process draws)
            cls_all, x_all = gather(feats.cls), gather(x)
            phis, kls = model.sample_prompts(ImageFeatures(cls_all, [], feats.grid), x_all, R, generator)
            rows = slice(shard.start, shard.start + n) if n else slice(0, 1)
            mine = {k: (v[:, rows] if v is not None else None) for k, v in phis.items()}
            text = model.encode_prompts(class_names, mine)
        else:
            text, kls = model.prompt_embeddings(feats, x, class_names, R, generator)
        if cfg.ensemble == "text":
            text = F.normalize(text.mean(dim=(2, 3), keepdim=True), dim=-1)
        image_logits = model.text_branch(x, text)
        diff = model.pair_logit_differences(patches, text)  # [n, L, R·B, H, W] at patch resolution
        logits_all, diff_all, text_all = gather(image_logits), gather(diff), gather(text)
        masks_all = gather(masks.to(dev).float())
        labels_all = gather(labels.to(dev).long())
        size = (model.backbone.image_size, model.backbone.image_size)
        n_layers, n_pairs = diff_all.shape[1], diff_all.shape[2]
        # as in BayesPFL.forward (sigmoid in place: the upsampling's backward keeps no tensor)
        pair_maps = model.upsample(diff_all.flatten(1, 2), size).sigmoid_().unflatten(1, (n_layers, n_pairs))
        text_score = torch.softmax(logits_all, dim=1)[:, 1].mean(dim=(1, 2))
        empty = text_score.new_zeros(0)
        out = BayesPFLOutput(anomaly_map=empty, image_score=empty, text_score=text_score, map_max=empty,
                             image_logits=logits_all, text_embeddings=text_all, kl=kls, pair_maps=pair_maps)
        return model.loss(out, masks_all, labels_all, generator=generator)


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    """``DistributedDataParallel(ShardedStep(model))`` for this rank."""
    step = ShardedStep(model, rank=ctx.rank, group=ctx.group)
    return nn.parallel.DistributedDataParallel(step, device_ids=None, static_graph=True)
