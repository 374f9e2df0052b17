#!/usr/bin/env python
"""One prepared GPU check (issue 21): what a CUDA machine without internet can measure for the kit in < 5 minutes.

    bash benchmarks/gpu_check.sh                 # after the README's install (`python3 dev.py test` makes .venv)
    .venv/bin/python benchmarks/gpu_check.py     # the same

Steps, each time-boxed and reported on its own (a failing step does not stop the others):

1. **tests** -- the test suite's GPU-marked tests (``pytest -m gpu``: device placement, bf16 autocast, DDP over
   NCCL when more than one GPU is visible);
2. **table3** -- inference with ViT-L-14-336 at 518 px, random weights (no download), in the layout of the paper's
   Table 3: fp32 and bf16, batch 1 and 8, R = 1 and 10; per image the image encoder, the rest (flows, text, RCA,
   maps) and the total; the encoder's FLOP/s against the GPU's measured GEMM rate at the same dtype; fp32 vs bf16
   maps; peak GPU memory. The paper's own numbers (RTX 3090, 132 ms at R = 1, 388 ms at R = 10) are shown beside;
3. **train** -- one training epoch of the teaching preset (``BayesPFLConfig.teaching()``) on the kit's synthetic
   set (the demo's protocol: 70 % of the seen categories' test split) on the GPU, then one evaluation on the unseen
   categories;
4. **bench** -- ``benchmarks/bench_inference.py`` on the GPU at ViT-L-14-336 / 518 px (the kit against the
   released code's structure, encoder options, bf16 agreement, the R x seed sweep), as a subprocess with the time
   left; its own tables go to ``results/inference_vitl14-336-518px-cuda.{md,csv}``.

Writes ``results/gpu_check_<gpu>.md`` (one markdown file: the machine -- device name, driver, torch / CUDA / cuDNN
versions -- then one table per step, with the peak GPU memory of each) and prints it.

Without a CUDA device it prints that no CUDA device is present, measures nothing and exits 0. ``--device cpu
--smoke`` runs every step on the CPU at toy size (bpfl-tiny at 56 px): the test suite does that to check the whole
script up to the device boundary.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

#: the paper's Table 3 (RTX 3090, ViT-L-14-336 at 518 px): inference time per image [ms] by R
PAPER_TABLE3_MS = {1: 132, 3: 185, 5: 232, 10: 388, 20: 626}
NO_CUDA = "no CUDA device is present"
STEPS = ("tests", "table3", "train", "bench")


# ---------------------------------------------------------------------------------------------- the machine
def machine(device: torch.device) -> dict:
    """Device name, driver, torch / CUDA / cuDNN versions, GPU count and memory, CPU and Python."""
    info = {"torch": torch.__version__, "torch CUDA": torch.version.cuda or "none (CPU build)",
            "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    info["cpu cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        info["compute capability"] = f"{props.major}.{props.minor}"
        info["GPU memory"] = f"{props.total_memory / 2**30:.1f} GiB"
        info["GPUs visible"] = torch.cuda.device_count()
        info["driver"] = _nvidia_smi("driver_version") or "unknown (nvidia-smi not found)"
        info["bf16 native"] = torch.cuda.is_bf16_supported()
    else:
        info["device"] = f"CPU ({info['cpu']})"
        info["driver"] = "-"
        from bpfl.backbone import ClipBackbone
        info["bf16 native"] = ClipBackbone.native_bf16(device)
    return info


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU not measured (NaN)."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        return False


def _text(value) -> str:
    """A subprocess output that may be None, bytes or str (TimeoutExpired keeps what was read)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else value.decode(errors="replace")


# ---------------------------------------------------------------------------------------------- 1. tests
def step_tests(args, out: dict) -> list[dict]:
    """``pytest -m gpu`` in a subprocess; returns one row with the counts pytest reports."""
    targets = ["tests/test_gpu.py"] if args.smoke else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *targets]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=args.tests_timeout)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = _text(e.stdout) + _text(e.stderr), f"timeout after {args.tests_timeout:.0f} s"
    seconds = time.perf_counter() - t0
    (out["dir"] / "gpu_check_pytest.log").write_text(text)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", text)}
    ok = rc in (0, 5) and not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    return [{"step": "tests", "case": " ".join(cmd[1:]), "passed": counts.get("passed", 0),
             "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0),
             "skipped": counts.get("skipped", 0), "seconds": seconds, "status": "ok" if ok else f"FAILED (rc {rc})",
             "detail": (text.strip().splitlines() or ["(no output)"])[-1][:200]}]


# ---------------------------------------------------------------------------------------------- 2. table 3
def step_table3(args, out: dict) -> list[dict]:
    """ViT-L-14-336 / 518 px (smoke: bpfl-tiny / 56 px): fp32 and bf16 x batch 1 and 8 x R = 1 and 10."""
    import bench_inference as bi

    from bpfl.backbone import default_layers, load_backbone
    from bpfl.config import BayesPFLConfig
    from bpfl.model import BayesPFL

    dev, size, name = args.device, args.image_size, args.backbone
    torch.manual_seed(0)
    bb = load_backbone(name, None, image_size=size, layers=default_layers(name), device=dev)
    cfg = BayesPFLConfig(backbone=name, pretrained=None, image_size=size, layers=default_layers(name),
                         test_samples=max(args.samples))
    model = BayesPFL(cfg, backbone=bb).eval()
    flops = bi.vit_image_flops(bb.clip.visual, size)
    precisions = [p for p in args.precisions if p == "fp32" or bb.native_bf16(dev)]
    gemm = {p: bi.gemm_flops_per_s({"fp32": torch.float32, "bf16": torch.bfloat16}[p], dev, args.gemm_size)
            for p in precisions}
    rows, maps = [], {}
    for prec in precisions:
        bb.precision = prec  # the image encoder and, on a GPU, the text path follow it (autocast)
        for batch in args.batches:
            images = bi.make_images(batch, size, 0).to(dev)
            names = ["bottle"] * batch
            with torch.no_grad():
                feats = bb.encode_image(images)  # warm-up
                for R in args.samples:
                    model(None, names, R, features=feats, generator=bi.gen(0))
                enc, rest = [], {R: [] for R in args.samples}
                for rep in range(args.repeats):
                    feats, t = bi.timed(lambda: bb.encode_image(images), dev)
                    enc.append(t / batch)
                    for R in bi.rotate(list(args.samples), rep):
                        _, t = bi.timed(lambda: model(None, names, R, features=feats, generator=bi.gen(0)), dev)
                        rest[R].append(t / batch)
                for R in args.samples:
                    with PeakMemory(dev) as peak:  # one whole inference: encoder + rest
                        o = model(images, names, R, generator=bi.gen(0))
                    maps[(prec, batch, R)] = o.anomaly_map.float().cpu()
                    e, r = statistics.median(enc), statistics.median(rest[R])
                    rows.append({"step": "table3", "precision": prec, "batch": batch, "R": R,
                                 "encoder_ms": 1e3 * e, "rest_ms": 1e3 * r, "total_ms": 1e3 * (e + r),
                                 "paper_ms": PAPER_TABLE3_MS.get(R, float("nan")) if not args.smoke else float("nan"),
                                 "encoder_tflops": flops / e / 1e12, "gemm_tflops": gemm[prec] / 1e12,
                                 "fraction": flops / e / gemm[prec], "peak_gib": peak.gib})
        bb.precision = "fp32"
    base = {(r["precision"], r["batch"]): r for r in rows if r["R"] == min(args.samples)}
    for r in rows:
        b = base[(r["precision"], r["batch"])]
        r["ratio_total"] = r["total_ms"] / b["total_ms"]
        r["ratio_rest"] = r["rest_ms"] / b["rest_ms"]
        if r["precision"] != "fp32" and ("fp32", r["batch"], r["R"]) in maps:
            r["map_diff_vs_fp32"] = float((maps[(r["precision"], r["batch"], r["R"])]
                                           - maps[("fp32", r["batch"], r["R"])]).abs().max())
    out["table3_model"] = f"{name} at {size} px, random weights, {flops / 1e9:.4g} GFLOP per image in the encoder"
    return rows


# ---------------------------------------------------------------------------------------------- 3. train
def step_train(args, out: dict) -> list[dict]:
    """One epoch of the teaching preset on the synthetic set (demo protocol), then one evaluation."""
    from bpfl.config import BayesPFLConfig
    from bpfl.data import SYNTHETIC_GROUPS, make_synthetic_dataset, open_dataset
    from bpfl.evaluate import evaluate
    from bpfl.model import BayesPFL
    from bpfl.train import seed_everything, split_holdout, train

    cfg = BayesPFLConfig.teaching(**({"image_size": 56} if args.smoke else {}))
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_synthetic_dataset(Path(tmp) / "synthetic", seed=0, preset="tiny" if args.smoke else "default")
        t_data = time.perf_counter() - t0
        seen = open_dataset(Path(tmp) / "synthetic", split="test", categories=SYNTHETIC_GROUPS["seen"],
                            image_size=cfg.image_size)
        unseen = open_dataset(Path(tmp) / "synthetic", split="test", categories=SYNTHETIC_GROUPS["unseen"],
                              image_size=cfg.image_size)
        train_set, _ = split_holdout(seen, 0.3, cfg.seed)
        model = BayesPFL(cfg, device=args.device)
        with PeakMemory(args.device) as peak:
            res, t_train = _timed(lambda: train(model, train_set, Path(tmp) / "run", epochs=1, progress=False),
                                  args.device)
        with PeakMemory(args.device) as peak_eval:
            ev, t_eval = _timed(lambda: evaluate(model, unseen, aupro_variant=None, progress=False), args.device)
    h = res.history[-1] if res.history else {}
    ok = bool(h) and all(v == v and abs(v) != float("inf") for k, v in h.items() if isinstance(v, float))
    return [{"step": "train", "case": f"1 epoch, teaching preset ({cfg.backbone} at {cfg.image_size} px, batch "
                                      f"{cfg.batch_size}, lr {cfg.lr}) on {len(train_set)} images",
             "steps": h.get("steps", 0), "seconds": t_train, "loss": h.get("total", float("nan")),
             "peak_gib": peak.gib, "status": "ok" if ok else "FAILED (no finite loss)",
             "detail": f"dataset generated in {t_data:.1f} s"},
            {"step": "train", "case": f"evaluate on {len(unseen)} unseen images (R = {cfg.test_samples})",
             "steps": len(unseen), "seconds": t_eval, "loss": float("nan"), "peak_gib": peak_eval.gib,
             "status": "ok", "detail": "image AUROC {:.3f}, pixel AUROC {:.3f} (random weights: mechanics only)".format(
                 ev.mean("image_auroc"), ev.mean("pixel_auroc"))}]


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- 4. bench
def step_bench(args, out: dict, seconds_left: float) -> list[dict]:
    """benchmarks/bench_inference.py on this device, in a subprocess limited to the time left."""
    cmd = [sys.executable, str(HERE / "bench_inference.py"), "--device", str(args.device), "--out-dir",
           str(out["dir"])]
    if args.smoke:
        cmd += ["--smoke", "--parts", "text,encoder"]
    else:
        cmd += ["--backbone", "ViT-L-14-336", "--image-size", "518", "--repeats", "3",
                "--parts", "text,e2e,train,memory,encoder,agreement,sweep", "--agreement-size", "518",
                "--sweep-categories", "2", "--sweep-per-category", "10", "--sweep-seeds", "0", "1", "2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=max(10, seconds_left))
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = _text(e.stdout) + _text(e.stderr), f"timeout after {max(10, seconds_left):.0f} s"
    (out["dir"] / "gpu_check_bench.log").write_text(text)
    md = re.findall(r"wrote (\S+\.csv) and (\S+\.md)", text)
    targets = [ln for ln in text.splitlines() if re.match(r"\| .* \| (met|NOT met) \|$", ln)]
    return [{"step": "bench", "case": " ".join(Path(c).name if c.endswith(".py") else c for c in cmd[1:]),
             "seconds": time.perf_counter() - t0, "status": "ok" if rc == 0 else f"FAILED (rc {rc})",
             "detail": (f"tables: {Path(md[-1][1]).name}" if md else "no table written; see gpu_check_bench.log")
             + ("; targets: " + "; ".join("{}: {} ({})".format(*[c.strip() for c in t.strip().strip("|").split("|")])
                                          for t in targets) if targets else "")}]


# ---------------------------------------------------------------------------------------------- report
def _fmt(v, spec=".1f") -> str:
    if isinstance(v, float):
        return "–" if v != v else format(v, spec)
    return str(v)


def write_report(info: dict, rows: list[dict], failures: dict, args, out: dict, wall: float) -> Path:
    md = out["dir"] / f"gpu_check_{out['tag']}.md"
    L = [f"# GPU check ({out['tag']})", "",
         "Written by `benchmarks/gpu_check.py` (`bash benchmarks/gpu_check.sh`). Random CLIP weights (no download): "
         "times and memory are those of the real architectures; metric values are not.", "",
         "| machine | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()] + [
         f"| command | `{out['command']}` |", f"| wall time | {wall:.0f} s (budget {args.budget_s:.0f} s) |", ""]
    by = {s: [r for r in rows if r["step"] == s] for s in STEPS}
    if by["tests"]:
        L += ["## 1. GPU-marked tests", "", "| command | passed | failed | skipped | time [s] | | last line |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| `{r['case']}` | {r['passed']} | {r['failed']} | {r['skipped']} | {r['seconds']:.0f} | {r['status']} "
              f"| {r['detail']} |" for r in by["tests"]]
        L += [""]
    if by["table3"]:
        L += [f"## 2. Inference per image, the layout of the paper's Table 3 ({out.get('table3_model', '')})", "",
              "| precision | batch | R | encoder [ms] | rest [ms] | total [ms] | total / R=1 | rest / R=1 | paper "
              "(RTX 3090) [ms] | encoder TFLOP/s | GEMM TFLOP/s (same dtype) | encoder / GEMM | peak GPU memory "
              "[GiB] | max map diff vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in by["table3"]:
            L.append(f"| {r['precision']} | {r['batch']} | {r['R']} | {r['encoder_ms']:.1f} | {r['rest_ms']:.1f} | "
                     f"{r['total_ms']:.1f} | {r['ratio_total']:.2f} | {r['ratio_rest']:.2f} | "
                     f"{_fmt(float(r['paper_ms']), '.0f')} | {r['encoder_tflops']:.3g} | {r['gemm_tflops']:.3g} | "
                     f"{r['fraction']:.0%} | {_fmt(r['peak_gib'], '.2f')} | "
                     f"{_fmt(r.get('map_diff_vs_fp32', float('nan')), '.1e')} |")
        L += ["", "Medians over rounds; per image = time of the batch / batch size. Encoder = "
                  "`ClipBackbone.encode_image`; rest = flows, text (2·B·R prompts), RCA, maps at 518². Peak memory: "
                  "one full inference (encoder + rest) at that precision, batch and R. The paper's times are per "
                  "image on an RTX 3090 (its Table 3), shown for orientation only: another GPU.", ""]
    if by["train"]:
        L += ["## 3. Training: one epoch of the teaching preset on the synthetic set", "",
              "| what | steps / images | time [s] | mean loss | peak GPU memory [GiB] | | detail |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {r['case']} | {r['steps']} | {r['seconds']:.1f} | {_fmt(r['loss'], '.4f')} | "
              f"{_fmt(r['peak_gib'], '.2f')} | {r['status']} | {r['detail']} |" for r in by["train"]]
        L += [""]
    if by["bench"]:
        L += ["## 4. The kit against the released code's structure on this device (bench_inference.py)", "",
              "| command | time [s] | | result |", "|---|---|---|---|"]
        L += [f"| `{r['case']}` | {r['seconds']:.0f} | {r['status']} | {r['detail']} |" for r in by["bench"]]
        L += [""]
    if failures:
        L += ["## Steps that failed or were skipped", ""] + [f"* **{k}**: {v}" for k, v in failures.items()] + [""]
    md.write_text("\n".join(L))
    with open(md.with_suffix(".csv"), "w", newline="") as fh:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return md


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --smoke")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--budget-s", type=float, default=285, help="the whole check's time budget in seconds")
    p.add_argument("--tests-timeout", type=float, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="file name tag (default: the GPU name)")
    p.add_argument("--smoke", action="store_true", help="toy sizes (bpfl-tiny at 56 px): checks the script itself")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; choose from {STEPS}")
    args.backbone, args.image_size = ("bpfl-tiny", 56) if args.smoke else ("ViT-L-14-336", 518)
    args.precisions, args.samples = ["fp32", "bf16"], [1, 10]
    args.batches = [1, 2] if args.smoke else [1, 8]
    args.gemm_size = 256 if args.smoke else 8192
    if args.smoke:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requested = torch.device(args.device)
    if requested.type != "cuda" and not args.smoke:
        print(f"gpu_check: --device {args.device} is not a CUDA device; on a CPU only --smoke runs (to test this "
              "script).")
        return 2
    if requested.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: {NO_CUDA} (torch {torch.__version__}, built with CUDA {torch.version.cuda or 'none'}; "
              "torch.cuda.is_available() is False). Nothing was measured: the kit's GPU numbers remain unmeasured. "
              "Run this on a machine with an NVIDIA GPU and its driver: bash benchmarks/gpu_check.sh")
        return 0
    args.device = requested if requested.type != "cuda" or requested.index is not None else torch.device("cuda", 0)
    t_start = time.perf_counter()
    info = machine(args.device)
    tag = args.tag or re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")[:40] + ("-smoke" if args.smoke
                                                                                            else "")
    out = {"dir": Path(args.out_dir), "tag": tag,
           "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out["dir"].mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {info['device']} (torch {info['torch']}, CUDA {info['torch CUDA']}, driver {info['driver']})",
          flush=True)
    rows: list[dict] = []
    failures: dict[str, str] = {}
    # minimum seconds each step needs to be worth starting (the bench step takes whatever is left)
    needs = {"tests": 30, "table3": 40, "train": 20, "bench": 45}
    for step in STEPS:
        if step not in args.steps:
            continue
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < needs[step] and not args.smoke:
            failures[step] = f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"
            continue
        print(f"[gpu_check] {step} ({left:.0f} s left)", flush=True)
        try:
            if step == "tests":
                rows += step_tests(args, out)
            elif step == "table3":
                rows += step_table3(args, out)
            elif step == "train":
                rows += step_train(args, out)
            else:
                rows += step_bench(args, out, left - 10)
        except Exception as e:  # one failing step must not hide the others' numbers
            failures[step] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
    wall = time.perf_counter() - t_start
    md = write_report(info, rows, failures, args, out, wall)
    print(md.read_text())
    print(f"wrote {md} and {md.with_suffix('.csv')} ({wall:.0f} s)")
    # the first three steps are the check; the bench step is what the time left allows
    bad = [r for r in rows if str(r.get("status", "ok")) != "ok" and r["step"] != "bench"]
    return 1 if bad or set(failures) - {"bench"} else 0


if __name__ == "__main__":
    sys.exit(main())
