#!/usr/bin/env python3
"""The README's two commands, with nothing but Python 3.10+ and pip on the machine.

    python3 dev.py demo     # create/reuse .venv, install bpfl, run `bpfl demo` (offline default)
    python3 dev.py test     # create/reuse .venv, install bpfl[dev,notebooks], run ruff, then the test suite

Any further arguments are passed on (``python3 dev.py demo --tiny``, ``python3 dev.py test -k flow``).
The virtual environment lives in ``.venv/`` inside the checkout and is reinstalled only when
``pyproject.toml`` changes. Tests run with ``HF_HUB_OFFLINE=1`` so no hub call can hang. In a git checkout,
the environment also installs nbstripout as the git filter of ``*.ipynb`` (``.gitattributes``): a notebook saved
in Jupyter Lab with its outputs is committed without them.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".bpfl-install-stamp"
#: what `dev.py test` lints with ruff (configured in pyproject.toml) before running the tests
LINTED = ["bpfl", "tests", "benchmarks", "notebooks", "dev.py"]


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_env() -> Path:
    if sys.version_info < (3, 10):
        sys.exit(f"bpfl needs Python >= 3.10, this is {sys.version.split()[0]}")
    py = venv_python()
    if not py.exists():
        print(f"[dev] creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        print("[dev] installing bpfl and its dependencies (first run takes a while: torch is large)", flush=True)
        subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        "-e", f"{ROOT}[dev,notebooks]"], check=True, cwd=ROOT)
        STAMP.write_text(want)
    install_notebook_filter(py)
    return py


def install_notebook_filter(py: Path) -> None:
    """`nbstripout --install` in this checkout (git config only; .gitattributes names the filter)."""
    if (ROOT / ".git").exists():
        subprocess.run([str(py), "-m", "nbstripout", "--install"], cwd=ROOT, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    py = ensure_env()
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    if argv[0] == "demo":
        cmd = [str(py), "-m", "bpfl", "demo", *argv[1:]]
    else:
        env["HF_HUB_OFFLINE"] = "1"
        lint = subprocess.call([str(py), "-m", "ruff", "check", *LINTED], cwd=ROOT, env=env)
        if lint:
            print("[dev] ruff found problems (above); `.venv/bin/ruff check --fix` repairs many", flush=True)
            return lint
        cmd = [str(py), "-m", "pytest", "-q", *argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
