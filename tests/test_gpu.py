"""CUDA paths (issue 21) and the prepared GPU check (``benchmarks/gpu_check.py``, ``benchmarks/gpu_check.sh``).

The ``gpu``-marked tests need a CUDA device: device placement, bf16 autocast, the feature store on a GPU, and DDP
over NCCL (only when more than one GPU is visible). Each also carries an explicit ``skipif`` on
``torch.cuda.is_available()``, so selecting them by hand (``-m gpu``) on a CPU machine skips them too.

The other tests run everywhere: without a CUDA device the check says so and exits 0, and its whole pipeline runs
on the CPU at toy size, which checks everything up to the device boundary.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZE = 112


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture()
def fp32_exact():
    """Full fp32 on the GPU (no TF32 in convolutions or matmuls) for CPU/GPU comparisons; restored afterwards."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _tiny_model(device="cpu", **overrides):
    from bpfl.backbone import load_backbone
    from bpfl.config import BayesPFLConfig
    from bpfl.model import BayesPFL

    torch.manual_seed(0)
    bb = load_backbone("bpfl-tiny", None, image_size=SIZE, layers=(1, 2, 3, 4), device=device)
    cfg = BayesPFLConfig.teaching(image_size=SIZE, layers=(1, 2, 3, 4), **overrides)
    torch.manual_seed(1)
    return BayesPFL(cfg, backbone=bb)


# ---------------------------------------------------------------------------------------------- CUDA paths
@pytest.mark.gpu
@needs_cuda
def test_model_on_cuda_keeps_everything_on_the_device_and_matches_the_cpu(fp32_exact):
    cpu = _tiny_model("cpu").eval()
    gpu = copy.deepcopy(cpu).to("cuda")
    assert gpu.device.type == "cuda" and gpu.backbone.device.type == "cuda"
    assert all(t.device.type == "cuda" for t in list(gpu.parameters()) + list(gpu.buffers()))
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))  # on the CPU on purpose
    feats = gpu.backbone.encode_image(images)
    assert feats.cls.device.type == "cuda" and all(t.device.type == "cuda" for t in feats.patch_tokens)
    names = ["bottle", "wood"]
    with torch.no_grad():
        out_cpu = cpu(images, names, 3, generator=torch.Generator().manual_seed(5))
        out_gpu = gpu(images, names, 3, generator=torch.Generator().manual_seed(5))
    for field in ("anomaly_map", "image_score", "text_score"):
        value = getattr(out_gpu, field)
        assert value.device.type == "cuda", field
        torch.testing.assert_close(value.cpu(), getattr(out_cpu, field), rtol=1e-4, atol=1e-4, msg=field)
    # one training step on the GPU: finite loss, gradients on the device
    gpu.train()
    masks = (torch.rand(2, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) > 0.8).float()
    out = gpu(images, names, generator=torch.Generator().manual_seed(3))
    losses = gpu.loss(out, masks.cuda(), torch.tensor([1, 0]).cuda(), generator=torch.Generator().manual_seed(4))
    losses["total"].backward()
    assert torch.isfinite(losses["total"])
    grads = [p.grad for p in gpu.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.device.type == "cuda" for g in grads)


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_on_cuda_runs_both_encoders_in_bf16_and_stays_close_to_fp32(fp32_exact):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    model = _tiny_model("cuda").eval()
    bb = model.backbone
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).cuda()
    names = ["bottle", "wood"]
    with torch.no_grad():
        ref_feats = bb.encode_image(images)
        ref_text = bb.encode_text(["a photo of a damaged bottle"])
        ref_map = model(images, names, 2, generator=torch.Generator().manual_seed(1)).anomaly_map
    seen = {}
    hooks = [bb.clip.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
                 lambda m, i, o: seen.setdefault("image", o.dtype)),
             bb.clip.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
                 lambda m, i, o: seen.setdefault("text", o.dtype))]
    bb.precision = "bf16"
    try:
        assert bb.image_compute_dtype == torch.bfloat16
        with torch.no_grad():
            feats = bb.encode_image(images)
            text = bb.encode_text(["a photo of a damaged bottle"])
            bf16_map = model(images, names, 2, generator=torch.Generator().manual_seed(1)).anomaly_map
    finally:
        bb.precision = "fp32"
        for h in hooks:
            h.remove()
    assert seen == {"image": torch.bfloat16, "text": torch.bfloat16}
    assert feats.cls.dtype == torch.float32 and text.dtype == torch.float32  # returned in fp32 whatever the compute
    for a, b in zip([ref_feats.cls] + ref_feats.patch_tokens, [feats.cls] + feats.patch_tokens):
        assert float((a - b).abs().max() / a.abs().max()) < 3e-2
    assert float((ref_text - text).abs().max() / ref_text.abs().max()) < 3e-2
    assert float((ref_map - bf16_map).abs().max()) < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_feature_store_on_cuda_hands_back_device_features_equal_to_the_encoder(tmp_path):
    from bpfl.data import make_synthetic_dataset, open_dataset
    from bpfl.evaluate import evaluate
    from bpfl.features import FeatureStore

    make_synthetic_dataset(tmp_path / "d", seed=0, preset="tiny", categories=["brick"])
    ds = open_dataset(tmp_path / "d", split="test", image_size=SIZE)
    model = _tiny_model("cuda").eval()
    store = FeatureStore()
    direct = model.backbone.encode_image(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    first = store.features(model.backbone, ds, list(range(len(ds))))
    again = store.features(model.backbone, ds, list(range(len(ds))))
    assert again.cls.device.type == "cuda" and store.stats()["in_memory"] == len(ds)
    assert next(iter(store._memory.values())).cls.device.type == "cpu"  # stored off the GPU by default
    for a, b, c in zip([direct.cls] + direct.patch_tokens, [first.cls] + first.patch_tokens,
                       [again.cls] + again.patch_tokens):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        assert torch.equal(b, c)
    plain = evaluate(model, ds, n_samples=2, seed=0, aupro_variant=None, progress=False).table
    cached = evaluate(model, ds, n_samples=2, seed=0, aupro_variant=None, progress=False, features=store).table
    pd.testing.assert_frame_equal(plain, cached, rtol=1e-4, atol=1e-4)


DDP_WORKER = textwrap.dedent('''
    """One `bpfl train` on this rank's GPU, then the backend the process group used."""
    import os
    import sys

    import torch.distributed as dist

    from bpfl.cli import main

    rc = main(["train", "--out", sys.argv[1], "--quiet"] + sys.argv[2:])
    with open(os.path.join(sys.argv[1] + f".backend{os.environ['RANK']}"), "w") as fh:
        fh.write(dist.get_backend() if dist.is_initialized() else "none")
    sys.exit(rc)
''')


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs more than one visible GPU")
def test_ddp_over_nccl_on_two_gpus_matches_one_gpu_at_the_same_global_batch(tmp_path):
    from bpfl.cli import main
    from bpfl.data import make_synthetic_dataset

    root = tmp_path / "data"
    make_synthetic_dataset(root, seed=0, preset="tiny", categories=["brick"], n_test_good=2, n_test_anomalous=3)

    def args(batch):
        return ["--data", str(root), "--preset", "teaching", "--backbone", "bpfl-tiny", "--pretrained", "random",
                "--image-size", str(SIZE), "--layers", "1", "2", "3", "4", "--batch-size", str(batch),
                "--epochs", "2", "--device", "cuda", "--set", "lr=0.01", "loss_pairs=one", "focal_balanced=true"]

    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "ddp")] + args(2)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert main(["train", "--out", str(tmp_path / "one"), "--quiet"] + args(4)) == 0
    assert {(tmp_path / f"ddp.backend{r}").read_text() for r in (0, 1)} == {"nccl"}
    one = pd.read_csv(tmp_path / "one" / "train_log.csv")
    two = pd.read_csv(tmp_path / "ddp" / "train_log.csv")
    terms = [c for c in one.columns if c not in {"epoch", "steps", "seconds"}]
    assert list(two["steps"]) == [2, 2]  # 5 images, global batch 4
    pd.testing.assert_frame_equal(two[terms], one[terms], rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the GPU check
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_check_without_a_cuda_device_says_so_and_exits_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", BPFL_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device is present" in proc.stdout and "GPU numbers remain unmeasured" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing measured, nothing written
    # a CPU device is refused unless --smoke asks for the toy run
    check = _load("gpu_check")
    assert check.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, run the real check: bash benchmarks/gpu_check.sh")
def test_gpu_check_runs_every_step_on_the_cpu_at_toy_size(tmp_path):
    """The whole check up to the device boundary: every step runs, and the table holds what it says."""
    check = _load("gpu_check")
    threads = torch.get_num_threads()
    try:
        rc = check.main(["--device", "cpu", "--smoke", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    md = next(tmp_path.glob("gpu_check_*-smoke.md")).read_text()
    rows = pd.read_csv(next(tmp_path.glob("gpu_check_*-smoke.csv")))
    assert rc == 0, md
    for section in ("## 1. GPU-marked tests", "## 2. Inference per image", "## 3. Training", "## 4. The kit against"):
        assert section in md, section
    assert "Steps that failed" not in md
    for key in ("| device |", "| driver |", "| torch |", "| torch CUDA |", "| cuDNN |"):
        assert key in md, key
    # 1: the GPU tests of this file were collected and skipped (no CUDA here), none failed
    tests = rows[rows.step == "tests"].iloc[0]
    n_gpu_tests = Path(__file__).read_text().count("\n@pytest.mark.gpu\n")
    assert tests.failed == 0 and tests.passed == 0 and tests.skipped == n_gpu_tests
    # 2: precisions x batches x R, with consistent derived columns
    t3 = rows[rows.step == "table3"]
    from bpfl.backbone import ClipBackbone
    precisions = {"fp32", "bf16"} if ClipBackbone.native_bf16("cpu") else {"fp32"}
    assert set(zip(t3.precision, t3.batch, t3.R)) == {(p, b, r) for p in precisions for b in (1, 2) for r in (1, 10)}
    assert (t3.encoder_ms > 0).all() and (t3.rest_ms > 0).all()
    assert ((t3.encoder_ms + t3.rest_ms - t3.total_ms).abs() < 1e-6 * t3.total_ms).all()
    assert ((t3.encoder_tflops / t3.gemm_tflops - t3.fraction).abs() < 1e-9).all()
    assert (t3[t3.R == 1].ratio_total == 1).all()
    bench = _load("bench_inference")
    from bpfl.backbone import load_backbone
    visual = load_backbone("bpfl-tiny", None, image_size=56, layers=(1, 2, 3, 4), device="cpu").clip.visual
    e = t3.iloc[0]
    assert math.isclose(e.encoder_tflops * 1e12 * e.encoder_ms / 1e3, bench.vit_image_flops(visual, 56), rel_tol=1e-9)
    # 3: one epoch = ceil(images / batch) steps with a finite loss, then an evaluation
    train = rows[rows.step == "train"]
    n_images = int(re.search(r" on (\d+) images", train.iloc[0].case).group(1))
    batch = int(re.search(r"batch (\d+)", train.iloc[0].case).group(1))
    assert train.iloc[0].steps == math.ceil(n_images / batch) and math.isfinite(train.iloc[0].loss)
    assert (train.status == "ok").all()
    # 4: the inference benchmark ran on the same device and wrote its table
    assert rows[rows.step == "bench"].iloc[0].status == "ok"
    assert list(tmp_path.glob("inference_*-smoke.md"))
