"""Distributed training with DDP under torchrun (bpfl.distributed, docs/distributed.md).

The 2-process test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2`` (torchrun) on the
CPU with the gloo backend, running the ``bpfl train`` command line twice in the same workers, and compares with
one process at the same global batch (2 ranks x 2 images vs 1 process x 4 images) on a 5-image set, so the
second global batch of every epoch has one image and one rank computes on a placeholder.

Tolerances (documented in docs/distributed.md):

* gradients agree to float32 rounding, so with plain SGD (lr 0.01, 4 steps) every parameter agrees to 1e-5
  (measured: about 2e-6);
* with the kit's Adam the per-epoch losses agree to 1e-3 relative, but Adam's first steps are about
  lr·sign(g): a gradient entry that is zero up to rounding can step the other way, so single entries may
  differ by up to 2·lr per step; the bound checked is 2·lr·steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

import bpfl.train as T
from bpfl.config import BayesPFLConfig
from bpfl.data import collate, make_synthetic_dataset, open_dataset
from bpfl.distributed import DistContext, Shard, ShardedStep, epoch_plan, shard_sizes
from bpfl.model import BayesPFL

SIZE = 112


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick"], n_test_good=2, n_test_anomalous=3)
    return root


# ------------------------------------------------------------------------------------------ sharding
def test_shards_reassemble_every_global_batch_of_the_single_process_order():
    order = [7, 3, 9, 0, 1, 8, 2, 6, 4, 5, 10]
    world, per_rank = 3, 2
    plans = [epoch_plan(order, per_rank * world, world, r) for r in range(world)]
    assert [len(p) for p in plans] == [2, 2, 2]
    for step in range(2):
        shards = [p[step] for p in plans]
        valid = [i for s in shards for i in s.indices[:s.n_valid]]
        assert valid == order[step * 6:(step + 1) * 6]
        assert all(s.counts == shards[0].counts for s in shards)
    assert plans[0][1].counts == [2, 2, 1] and [p[1].start for p in plans] == [0, 2, 4]
    # a last global batch smaller than the world: the ranks without an item get a placeholder, n_valid = 0
    tail = [epoch_plan(order[:7], 6, world, r)[1] for r in range(world)]
    assert [s.n_valid for s in tail] == [1, 0, 0] and all(len(s.indices) == 1 for s in tail)
    assert epoch_plan(order, 6, world, 1, first_step=1)[0].indices == order[8:10]  # resume mid-epoch
    assert shard_sizes(5, 2) == [3, 2] and shard_sizes(1, 3) == [1, 0, 0]
    assert not DistContext().enabled and DistContext().broadcast_object({"a": 1}) == {"a": 1}


@pytest.mark.parametrize("design", ["bayes-pfl", "anomalyclip+"])
def test_sharded_step_in_one_process_is_the_models_loss(root, design):
    """The DDP step's code path with one rank computes exactly what train() computes without torchrun."""
    from bpfl.backbone import load_backbone
    torch.manual_seed(0)
    bb = load_backbone("bpfl-tiny", None, image_size=SIZE, layers=(1, 2, 3, 4), device="cpu")
    cfg = BayesPFLConfig.teaching(image_size=SIZE, layers=(1, 2, 3, 4), prompt_design=design, loss_pairs="one",
                                  focal_balanced=True)
    ds = open_dataset(root, split="test", image_size=SIZE)
    batch = collate([ds[i] for i in range(4)])
    feats = bb.encode_image(batch["image"])
    masks = T._masks_for_training(batch, "")
    results = []
    for sharded in (False, True):
        torch.manual_seed(0)
        model = BayesPFL(cfg, backbone=bb).train()
        gen = torch.Generator().manual_seed(3)
        if sharded:
            losses = ShardedStep(model)(feats, batch["class_name"], masks, batch["label"], gen,
                                        Shard(indices=[0, 1, 2, 3], n_valid=4, start=0, counts=[4]))
        else:
            out = model(None, batch["class_name"], features=feats, generator=gen)
            losses = model.loss(out, masks, batch["label"], generator=gen)
        losses["total"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in losses.items()}, grads))
    (l1, g1), (l2, g2) = results
    assert set(l1) == set(l2) and set(g1) == set(g2) and g1
    for k in l1:
        torch.testing.assert_close(l1[k], l2[k], rtol=1e-6, atol=1e-6)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ torchrun, 2 processes
WORKER = textwrap.dedent('''
    """Two training runs in the same torchrun workers: SGD (gradient check), then the plain `bpfl train` (Adam)."""
    import sys

    import torch

    import bpfl.train as T
    from bpfl.cli import main

    sgd_out, adam_out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    adam = T.make_optimizer
    T.make_optimizer = lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=m.config.lr)
    rc = main(["train", "--out", sgd_out, "--quiet"] + args)
    T.make_optimizer = adam
    rc |= main(["train", "--out", adam_out] + args)
    sys.exit(rc)
''')

LR, EPOCHS = 0.01, 2


def _args(root, batch_size):
    return ["--data", str(root), "--preset", "teaching", "--backbone", "bpfl-tiny", "--pretrained", "random",
            "--image-size", str(SIZE), "--layers", "1", "2", "3", "4", "--batch-size", str(batch_size),
            "--epochs", str(EPOCHS), "--device", "cpu",
            "--set", f"lr={LR}", "loss_pairs=one", "focal_balanced=true", "test_samples=2"]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def test_two_process_gloo_run_matches_one_process_at_the_same_global_batch(root, tmp_path, monkeypatch):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ddp_sgd, ddp_adam = tmp_path / "ddp_sgd", tmp_path / "ddp_adam"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(ddp_sgd), str(ddp_adam)] + _args(root, batch_size=2)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

    # meanwhile, the single-process references with the global batch (4) in this process
    from bpfl.cli import main
    adam = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer",
                        lambda m: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=m.config.lr))
    assert main(["train", "--out", str(tmp_path / "one_sgd"), "--quiet"] + _args(root, batch_size=4)) == 0
    monkeypatch.setattr(T, "make_optimizer", adam)
    assert main(["train", "--out", str(tmp_path / "one_adam"), "--quiet"] + _args(root, batch_size=4)) == 0

    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + output[-3000:])
    assert proc.returncode == 0, output[-3000:]

    steps = EPOCHS * 2  # 5 images, global batch 4 -> 2 steps per epoch (4 + 1 images)
    cfg = BayesPFLConfig.load(ddp_sgd / "config.json")
    T.seed_everything(cfg.seed)
    init = BayesPFL(cfg, device="cpu").trainable_state_dict()

    # SGD: the parameters after 4 steps match to 1e-5 (the gradients are the same up to rounding) ...
    one, two = _state(tmp_path / "one_sgd" / "last.pt"), _state(ddp_sgd / "last.pt")
    assert set(one) == set(two) == set(init)
    assert max(float((one[k] - init[k]).abs().max()) for k in one) > 1e-3  # training moved them
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5, msg=k)

    # ... and with the kit's Adam (the plain `bpfl train`): same losses, parameters within Adam's sign bound
    one, two = _state(tmp_path / "one_adam" / "last.pt"), _state(ddp_adam / "last.pt")
    for k in one:
        assert float((two[k] - one[k]).abs().max()) <= 2 * LR * steps + 1e-5, k
    log1 = pd.read_csv(tmp_path / "one_adam" / "train_log.csv")
    log2 = pd.read_csv(ddp_adam / "train_log.csv")
    assert list(log2["epoch"]) == [1, 2] and list(log2["steps"]) == [2, 2]
    terms = [c for c in log1.columns if c not in {"epoch", "steps", "seconds"}]
    pd.testing.assert_frame_equal(log2[terms], log1[terms], rtol=1e-3, atol=1e-5)
    # only rank 0 logs: one progress line per epoch although two processes trained
    assert output.count("[bpfl] epoch 1/2:") == 1 and output.count("[bpfl] epoch 2/2:") == 1
    assert sorted(p.name for p in ddp_adam.iterdir()) == ["config.json", "last.pt", "train_log.csv"]
