#!/usr/bin/env python
"""Benchmark of bpfl.metrics' pixel metrics against scikit-learn on one MVTec-sized category.

What it measures
----------------
A synthetic category (default 200 maps/masks at 518², ≈ 54 M pixels): about 65% of the images have one to three
irregular blob defects of very different sizes. The maps are smoothed defect masks with a random strength,
plus low-frequency "texture" noise and a little pixel noise, and a final Gaussian blur, as in the
authors' σ-smoothing. They are clipped to [0, 1] and stored as float32. For each method the script measures

* the wall time of the metric computation, after the data are loaded;
* the peak memory, in two ways: ``tracemalloc`` (numpy's own allocations during the computation), and the
  peak resident set size (``getrusage`` max RSS) of a fresh subprocess per method, before and after the
  computation; "extra" is the difference;
* the results, and their maximum absolute difference from scikit-learn (AUROC, AP, F1-max) and from the
  kit's exact path (AUPRO).

Methods: ``sklearn`` (``roc_auc_score`` + ``average_precision_score`` + ``precision_recall_curve`` on the
flattened pixels), ``exact`` and ``binned`` (:func:`bpfl.metrics.pixel_metrics` without AUPRO), ``exact+aupro``
and ``binned+aupro`` (with both AUPRO variants), ``stream-binned+aupro`` (a :class:`PixelMetricAccumulator`
fed 8 maps at a time with a known value range [0, 1]), and ``cflow-loop`` (a reference AUPRO that loops
over the 200 cflow thresholds; per threshold it is vectorised over images, and it is still far faster than the authors'
per-image ``regionprops`` loop).

Usage::

    python benchmarks/bench_metrics.py                      # full size, one subprocess per method
    python benchmarks/bench_metrics.py --n-images 50 --size 256
    python benchmarks/bench_metrics.py --pixels 10_000_000   # about that many pixels, at --size
    python benchmarks/bench_metrics.py --smoke --inprocess   # tiny, seconds (used by the tests)

Results go to ``benchmarks/results/metrics_<tag>.{csv,md}`` (tag: ``--tag``, default the host name;
``--smoke`` appends ``-smoke``). ``main`` raises ``AssertionError`` when the exact path differs from
scikit-learn by more than 1e-9, or the binned path by more than 1e-4.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("sklearn", "exact", "binned", "exact+aupro", "binned+aupro", "stream-binned+aupro", "cflow-loop")
METRIC_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro", "pixel_aupro_cflow")
EXACT_TOL = 1e-9
BINNED_TOL = 1e-4


# ----------------------------------------------------------------------------------------------------
# synthetic category


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular blob: a rotated ellipse whose radius is modulated by a few random harmonics."""
    r = float(np.exp(rng.uniform(np.log(3.0), np.log(size * 0.18))))
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    y0, y1 = int(max(0, cy - 2 * r)), int(min(size, cy + 2 * r + 1))
    x0, x1 = int(max(0, cx - 2 * r)), int(min(size, cx + 2 * r + 1))
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    yy -= cy
    xx -= cx
    ang = np.arctan2(yy, xx)
    theta = rng.uniform(0, np.pi)
    aspect = rng.uniform(0.3, 1.0)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / aspect
    radius = r * (1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
                          for k in (2, 3, 5)))
    out = np.zeros((size, size), dtype=bool)
    out[y0:y1, x0:x1] = np.hypot(u, v) <= radius
    return out


def make_category(n_images: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (masks bool [n, size, size], maps float32 [n, size, size] in [0, 1])."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    maps = np.empty((n_images, size, size), dtype=np.float32)
    low = max(2, size // 16)
    for i in range(n_images):
        if i == 0 or (i > 1 and rng.random() < 0.65):  # image 0 anomalous, image 1 normal
            for _ in range(int(rng.integers(1, 4))):
                masks[i] |= _blob(rng, size)
        signal = ndimage.gaussian_filter(masks[i].astype(np.float32), sigma=max(1.0, size / 100))
        texture = ndimage.zoom(rng.standard_normal((low, low)).astype(np.float32), size / low, order=1)
        texture = texture[:size, :size]
        m = (rng.uniform(0.15, 0.6) * signal + 0.08 * texture
             + 0.03 * rng.standard_normal((size, size), dtype=np.float32) + 0.3)
        m = ndimage.gaussian_filter(m, sigma=max(1.0, size / 130))
        maps[i] = np.clip(m, 0.0, 1.0)
    return masks, maps


# ----------------------------------------------------------------------------------------------------
# the methods


def _sklearn(masks: np.ndarray, maps: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y, s = masks.ravel(), maps.ravel()
    auroc = roc_auc_score(y, s)
    ap = average_precision_score(y, s)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)
    return {"pixel_auroc": float(auroc), "pixel_ap": float(ap), "pixel_f1_max": float(f1.max())}


def _cflow_loop(masks: np.ndarray, maps: np.ndarray, num_thresholds: int = 200, limit: float = 0.3) -> dict:
    """Reference cflow AUPRO: one pass over the pixels per threshold (labels computed once)."""
    from scipy import ndimage
    from sklearn.metrics import auc

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True
    labels, n_regions = ndimage.label(masks, structure=structure)
    area = np.bincount(labels.ravel(), minlength=n_regions + 1)[1:].astype(np.float64)
    n_neg = int((~masks).sum())
    lo, hi = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for k in range(num_thresholds):
        # a numpy float64 scalar, so that the comparison is made in float64 (a Python float would be
        # cast to the maps' float32 first under NumPy 2's promotion rules, moving the threshold)
        th = np.float64(lo + (hi - lo) * (k / num_thresholds))
        pred = maps > th
        tp = np.bincount(labels[pred], minlength=n_regions + 1)[1:]
        pros.append(float(np.mean(tp / area)))
        fprs.append(float(np.count_nonzero(pred & ~masks)) / n_neg)
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    f = fprs[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return {"pixel_aupro_cflow": float(auc(f, pros[keep]))}


def run_method(method: str, masks: np.ndarray, maps: np.ndarray, bins: int) -> dict:
    from bpfl import metrics as M

    both = ("mvtec", "cflow")
    if method == "sklearn":
        return _sklearn(masks, maps)
    if method == "exact":
        return M.pixel_metrics(masks, maps, None, method="exact")
    if method == "binned":
        return M.pixel_metrics(masks, maps, None, method="binned", bins=bins)
    if method == "exact+aupro":
        return M.pixel_metrics(masks, maps, both, method="exact")
    if method == "binned+aupro":
        return M.pixel_metrics(masks, maps, both, method="binned", bins=bins)
    if method == "stream-binned+aupro":
        acc = M.PixelMetricAccumulator("binned", bins=bins, value_range=(0.0, 1.0))
        for i in range(0, maps.shape[0], 8):
            acc.update(masks[i:i + 8], maps[i:i + 8])
        return acc.compute(both)
    if method == "cflow-loop":
        return _cflow_loop(masks, maps)
    raise ValueError(method)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def measure(method: str, masks: np.ndarray, maps: np.ndarray, bins: int, trace: bool, repeat: int = 1) -> dict:
    """Time one method (``repeat`` runs; the first one is "cold"); optionally trace numpy allocations."""
    import sklearn.metrics  # noqa: F401  (imports are not part of the measured time)

    import bpfl.metrics  # noqa: F401
    base = _maxrss_mb()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        res = run_method(method, masks, maps, bins)
        times.append(time.perf_counter() - t0)
    peak_rss = _maxrss_mb()
    traced = math.nan
    if trace:
        tracemalloc.start()
        run_method(method, masks, maps, bins)
        traced = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return {"seconds": times[0], "seconds_best": min(times), "base_rss_mb": base, "peak_rss_mb": peak_rss,
            "tracemalloc_peak_mb": traced, "results": res}


def _worker(args: argparse.Namespace) -> int:
    masks = np.load(Path(args.data) / "masks.npy")
    maps = np.load(Path(args.data) / "maps.npy")
    out = measure(args.worker, masks, maps, args.bins, trace=not args.no_tracemalloc, repeat=args.repeat)
    print("RESULT " + json.dumps(out))
    return 0


def _run_subprocess(method: str, data_dir: Path, bins: int, trace: bool, repeat: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--data", str(data_dir),
           "--bins", str(bins), "--repeat", str(repeat)] + ([] if trace else ["--no-tracemalloc"])
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ----------------------------------------------------------------------------------------------------
# machine and report


def machine_info() -> dict:
    import scipy
    import sklearn

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gb = math.nan
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"host": socket.gethostname(), "cpu": cpu, "cores": cores, "ram_gb": round(ram_gb, 1),
            "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "sklearn": sklearn.__version__, "platform": platform.platform()}


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_report(rows: list[dict], info: dict, config: dict, out_dir: Path, tag: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"metrics_{tag}.csv", out_dir / f"metrics_{tag}.md"
    context = {k: config[k] for k in ("n_images", "size", "pixels", "bins", "repeat", "seed")}
    context.update({k: info[k] for k in ("host", "cpu", "cores", "ram_gb", "python", "numpy", "scipy", "sklearn")})
    fields = list(rows[0]) + list(context)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows({**r, **context} for r in rows)
    lines = [
        f"# bpfl.metrics benchmark ({tag})", "",
        f"Synthetic category: {config['n_images']} maps × {config['size']}² = {config['pixels']:,} pixels "
        f"({config['anomalous_fraction']:.2%} anomalous, {config['n_regions']} GT regions); bins = {config['bins']}; "
        f"seed = {config['seed']}; {'in-process' if config['inprocess'] else 'one subprocess per method'}.", "",
        "Machine: " + ", ".join(f"{k} = {v}" for k, v in info.items()), "",
        "| method | time [s] first / best | speed-up vs sklearn first / best | peak RSS [MB] | extra RSS [MB] "
        "| tracemalloc peak [MB] "
        "| memory ratio sklearn/method | AUROC | AP | F1-max | AUPRO (mvtec) | AUPRO (cflow) "
        "| max abs diff vs sklearn | max abs diff AUPRO vs exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_fmt(r['seconds'], '.2f')} / {_fmt(r['seconds_best'], '.2f')} "
            f"| {_fmt(r['speedup_vs_sklearn'], '.0f')} / {_fmt(r['speedup_vs_sklearn_best'], '.0f')} "
            f"| {_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r['extra_rss_mb'], '.0f')} "
            f"| {_fmt(r['tracemalloc_peak_mb'], '.0f')} | {_fmt(r['memory_ratio_sklearn_over_method'], '.1f')} "
            f"| {_fmt(r['pixel_auroc'], '.6f')} | {_fmt(r['pixel_ap'], '.6f')} | {_fmt(r['pixel_f1_max'], '.6f')} "
            f"| {_fmt(r['pixel_aupro'], '.6f')} | {_fmt(r['pixel_aupro_cflow'], '.6f')} "
            f"| {_fmt(r['max_abs_diff_vs_sklearn'], '.1e')} | {_fmt(r['max_abs_diff_aupro_vs_exact'], '.1e')} |")
    lines += [
        "",
        f"Time: the metric computation only (data already in memory); 'first' is the first call in a fresh "
        f"process, 'best' the fastest of {config['repeat']} calls. Extra RSS: peak RSS of the method's "
        "subprocess minus its RSS after loading the data (maps float32 + masks bool); 0 means the method stayed "
        "below the high-water mark that imports and loading had left. The tracemalloc peak "
        "counts numpy's allocations during a second, untimed run. The memory ratio uses the tracemalloc peak "
        "(or, without it, the extra RSS). 'max abs diff vs sklearn' is over AUROC, AP and F1-max; "
        "'AUPRO vs exact' is over both variants, against `exact+aupro` (for `cflow-loop`: the cflow one).",
    ]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--pixels", type=int, default=None, help="about this many pixels (sets --n-images)")
    p.add_argument("--smoke", action="store_true", help="tiny category (6 maps at 64²)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bins", type=int, default=None, help="bins of the binned path (default: the kit's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--repeat", type=int, default=1, help="timed calls per method (first and best reported)")
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (RSS columns are then NaN)")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the traced second run")
    p.add_argument("--tag", default=None, help="result file tag (default: host name)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from bpfl import metrics as M

    if args.bins is None:
        args.bins = M.DEFAULT_BINS
    if args.worker:
        _worker(args)
        return {}
    if args.smoke:
        args.n_images, args.size = 6, 64
    elif args.pixels:
        args.n_images = max(1, math.ceil(args.pixels / args.size**2))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {METHODS}")
    t0 = time.perf_counter()
    masks, maps = make_category(args.n_images, args.size, args.seed)
    n_regions = M.label_regions(masks)[1]
    config = {"n_images": args.n_images, "size": args.size, "pixels": int(maps.size),
              "anomalous_fraction": float(masks.mean()), "n_regions": n_regions, "bins": args.bins,
              "seed": args.seed, "inprocess": args.inprocess, "repeat": args.repeat}
    print(f"data: {maps.shape} float32, {masks.mean():.2%} anomalous, {n_regions} regions "
          f"({time.perf_counter() - t0:.1f} s to generate)", flush=True)

    raw: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.inprocess:
            np.save(Path(tmp) / "masks.npy", masks)
            np.save(Path(tmp) / "maps.npy", maps)
        for m in methods:
            if args.inprocess:
                r = measure(m, masks, maps, args.bins, trace=not args.no_tracemalloc, repeat=args.repeat)
                r["base_rss_mb"] = r["peak_rss_mb"] = math.nan
            else:
                r = _run_subprocess(m, Path(tmp), args.bins, trace=not args.no_tracemalloc, repeat=args.repeat)
            raw[m] = r
            print(f"{m:>20}: {r['seconds']:8.2f} s (best {r['seconds_best']:.2f} s)  "
                  f"peak RSS {r['peak_rss_mb']:8.0f} MB  "
                  f"tracemalloc {r['tracemalloc_peak_mb']:8.0f} MB  {r['results']}", flush=True)

    ref = raw.get("sklearn", {}).get("results")
    exact_aupro = raw.get("exact+aupro", {}).get("results")
    base = raw.get("sklearn")
    rows = []
    for m, r in raw.items():
        res = r["results"]
        d_sk = max((abs(res[k] - ref[k]) for k in METRIC_KEYS[:3] if ref and k in res), default=math.nan)
        d_pro = max((abs(res[k] - exact_aupro[k]) for k in METRIC_KEYS[3:]
                     if exact_aupro and k in res), default=math.nan)
        mem = r["tracemalloc_peak_mb"] if not math.isnan(r["tracemalloc_peak_mb"]) else \
            r["peak_rss_mb"] - r["base_rss_mb"]
        base_mem = (base["tracemalloc_peak_mb"] if not math.isnan(base["tracemalloc_peak_mb"]) else
                    base["peak_rss_mb"] - base["base_rss_mb"]) if base else math.nan
        rows.append({
            "method": m, "seconds": r["seconds"], "seconds_best": r["seconds_best"],
            "speedup_vs_sklearn": base["seconds"] / r["seconds"] if base else math.nan,
            "speedup_vs_sklearn_best": base["seconds_best"] / r["seconds_best"] if base else math.nan,
            "peak_rss_mb": r["peak_rss_mb"], "extra_rss_mb": r["peak_rss_mb"] - r["base_rss_mb"],
            "tracemalloc_peak_mb": r["tracemalloc_peak_mb"],
            "memory_ratio_sklearn_over_method": base_mem / mem if base and mem > 0 else math.nan,
            **{k: res.get(k, math.nan) for k in METRIC_KEYS},
            "max_abs_diff_vs_sklearn": d_sk, "max_abs_diff_aupro_vs_exact": d_pro,
        })

    info = machine_info()
    tag = args.tag or info["host"]
    if args.smoke:
        tag += "-smoke"
    csv_path, md_path = write_report(rows, info, config, Path(args.out_dir), tag)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")

    by = {r["method"]: r for r in rows}
    checks = {}
    if ref:
        for m in ("exact", "exact+aupro"):
            if m in by:
                checks[f"{m} == sklearn"] = by[m]["max_abs_diff_vs_sklearn"] <= EXACT_TOL
        for m in ("binned", "binned+aupro", "stream-binned+aupro"):
            if m in by:
                checks[f"{m} ≈ sklearn (≤ {BINNED_TOL})"] = by[m]["max_abs_diff_vs_sklearn"] <= BINNED_TOL
    if exact_aupro:
        if "cflow-loop" in by:
            checks["cflow-loop == exact cflow AUPRO"] = by["cflow-loop"]["max_abs_diff_aupro_vs_exact"] <= EXACT_TOL
        for m in ("binned+aupro", "stream-binned+aupro"):
            if m in by:
                checks[f"{m} AUPRO ≈ exact (≤ {BINNED_TOL})"] = by[m]["max_abs_diff_aupro_vs_exact"] <= BINNED_TOL
    failed = [k for k, ok in checks.items() if not ok]
    assert not failed, f"benchmark equality checks failed: {failed}"
    return {"rows": rows, "checks": checks, "machine": info, "config": config, "csv": str(csv_path),
            "md": str(md_path)}


if __name__ == "__main__":
    main()
