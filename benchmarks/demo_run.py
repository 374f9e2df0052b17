"""What a newcomer sees: `bpfl demo` on a fresh checkout, measured and committed.

Runs ``bpfl demo`` (the README's main job, offline: the bundled toy CLIP) in a subprocess into a scratch folder,
with a fresh synthetic dataset, and writes ``benchmarks/results/demo.{csv,json,md}``: the unseen and held-out
AUROCs with their image counts, the wall time of the command (after install), its peak memory (max RSS of the
process tree), the backbone and weights it used, and the machine with its load average (other jobs sharing the
cores make the wall time longer, never the AUROCs different: the run is seeded). The README quotes this file
(``tests/test_benchmarks.py`` checks it).

    python benchmarks/demo_run.py
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfl.console import cpu_model  # noqa: E402
from bpfl.evaluate import markdown_table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bpfl-demo-"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bpfl", "demo", "--out", str(work / "runs"),
                           "--data", str(work / "data")], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return proc.returncode
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    results = pd.read_csv(work / "runs" / "results.csv", index_col=0)
    run = json.loads((work / "runs" / "run.json").read_text())
    record = {"command": "bpfl demo (offline, HF_HUB_OFFLINE=1, fresh data folder)", "wall_seconds": round(wall, 1),
              "demo_seconds": run["seconds"], "peak_rss_mb": round(max(peak_children, run["peak_rss_mb"]), 1),
              "backbone": run["backbone"], "weights": run["weights"], "train_images": run["train_images"],
              "unseen_images": run["unseen_images"], "held_out_images": run["held_out_images"],
              "cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_before": [round(x, 1) for x in load_before],
              "load_average_after": [round(x, 1) for x in os.getloadavg()], "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(out.with_suffix(".csv"))
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    unseen = results.loc["unseen (zero-shot)"]
    md = [
        "# `bpfl demo` as a newcomer runs it", "",
        f"`{record['command']}` on {record['cpu']} ({record['cpus']} cores), {record['date']}; load average "
        f"{record['load_average_before']} before the run (other jobs on the cores lengthen the wall time only).", "",
        f"- backbone: {record['backbone']} -- weights: {record['weights']}",
        f"- trained on {record['train_images']} images of the seen categories; evaluated zero-shot on "
        f"{record['unseen_images']} images of the unseen categories and on {record['held_out_images']} held-out "
        "images of the seen ones (synthetic default split)",
        f"- **unseen: pixel AUROC {unseen['pixel_auroc']:.3f}, image AUROC {unseen['image_auroc']:.3f}**",
        f"- wall time of the command **{record['wall_seconds']:.0f} s** (the demo's own clock: "
        f"{record['demo_seconds']:.0f} s); peak memory **{record['peak_rss_mb']:.0f} MiB**", "",
        markdown_table(results.round(3)), "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    shutil.copy(work / "runs" / "figure3_panel.png", out.with_name("demo_figure3_panel.png"))
    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
