"""Console output shared by the command line, the demo and the notebooks."""
from __future__ import annotations


def banner(text: str) -> None:
    """Print ``text`` between two rules of ``=`` (a run's headline: what runs, on what, and why)."""
    lines = text.splitlines() or [""]
    line = "=" * min(100, max(40, max(len(t) for t in lines) + 4))
    body = "\n".join(f"  {t}" for t in lines)
    print(f"{line}\n{body}\n{line}", flush=True)
