"""Console output shared by the command line, the demo and the notebooks, and the machine a run reports."""
from __future__ import annotations

import platform
from pathlib import Path


def banner(text: str) -> None:
    """Print ``text`` between two rules of ``=`` (a run's headline: what runs, on what, and why)."""
    lines = text.splitlines() or [""]
    line = "=" * min(100, max(40, max(len(t) for t in lines) + 4))
    body = "\n".join(f"  {t}" for t in lines)
    print(f"{line}\n{body}\n{line}", flush=True)


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what :mod:`platform` knows (recorded with timings:
    machines differ, so a time means something only beside its CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
