"""How long the teaching notebooks take in fast mode, from a cold start, measured and committed.

Executes every notebook in order, top to bottom with the solutions, exactly as ``bpfl notebooks html`` does
(:func:`bpfl.notebook.tools.render_html`: the bundled toy CLIP, offline), into a scratch folder with an empty
model cache and no synthetic dataset, so the times include what a student's first run pays: generating the
dataset (notebook 00), training the main model (the first notebook that needs it) and the two baselines
(notebook 04). Writes ``benchmarks/results/notebook_times.{csv,json,md}``: each notebook's seconds (kernel start
included), which models it trained, the total, and the machine with its load average (other jobs on the cores
make the times longer). ``notebooks/README.md`` quotes this file (``tests/test_notebook_tables.py`` checks it).
The test suite only executes the notebooks; it does not time them.

    python benchmarks/notebook_times.py            # ~5-8 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bpfl.console import cpu_model  # noqa: E402
from bpfl.evaluate import markdown_table  # noqa: E402
from bpfl.notebook.tools import environment, render_html  # noqa: E402

#: the budget the notebooks' fast mode is held to (all seven together, 2-core CPU, cold start)
TOTAL_BUDGET_S = 600


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "notebook_times"))
    args = ap.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="bpfl-notebook-times-"))
    env = {"HF_HUB_OFFLINE": "1", "BPFL_FAST_BACKBONE": "auto", "BPFL_DATA_DIR": str(work / "data"),
           "IPYTHONDIR": str(work / "ipython"), "PYTHONWARNINGS": "ignore"}
    for k in ("BPFL_OVERRIDES", "BPFL_AUX_DATA", "BPFL_TARGETS", "BPFL_DEVICE", "BPFL_THREADS"):
        os.environ.pop(k, None)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with environment(env):
        render_html(work / "site", mode="fast")
    wall = time.perf_counter() - t0
    df = pd.read_csv(work / "site" / "timings.csv", keep_default_na=False)
    record = {"total_seconds": round(float(df.seconds.sum()), 1), "wall_seconds": round(wall, 1),
              "budget_seconds": TOTAL_BUDGET_S, "mode": "fast", "backbone": "auto (offline: the bundled toy CLIP)",
              "cache": "cold (empty model cache, no synthetic dataset)", "cpu": cpu_model(), "cpus": os.cpu_count(),
              "load_average_before": [round(x, 1) for x in load_before], "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out.with_suffix(".csv"), index=False)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    table = df.assign(trained=df.trained.replace("", "-")).set_index("notebook")
    out.with_suffix(".md").write_text(
        f"# Notebooks in fast mode, cold start ({record['date']})\n\n"
        f"{record['cpu']}, {record['cpus']} CPUs, torch {record['torch']}, load average before "
        f"{record['load_average_before']}. Seconds per notebook (kernel start included), executed in order with "
        f"the solutions; `trained`: the models it trained (later notebooks load them from the cache).\n\n"
        f"{markdown_table(table)}\n\nTotal: {record['total_seconds']:.0f} s (budget {TOTAL_BUDGET_S} s).\n")
    print(out.with_suffix(".md").read_text())
    return 0 if record["total_seconds"] <= TOTAL_BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
