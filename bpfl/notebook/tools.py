"""Tools for the teaching notebooks: student copies without solutions, and an executed static HTML rendering.

The notebooks live in ``notebooks/`` as jupytext pairs (``NN_name.py`` in the "percent" format, the source, and
``NN_name.ipynb``, committed without outputs); ``notebooks/jupytext.toml`` keeps the pair in step when either is
saved in Jupyter Lab. Every exercise is a markdown cell tagged :data:`EXERCISE_TAG` followed by its worked
solution, a cell tagged :data:`SOLUTION_TAG`.

    bpfl notebooks student --out handout/     # copies without the solution cells, for students
    bpfl notebooks html --out site/           # executes every notebook (fast mode) and writes HTML + figures

Both are plain functions too (:func:`write_student_copies`, :func:`render_html`). :func:`execute_notebook` runs a
notebook with nbclient in a given environment (the tests and the HTML rendering use it).
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Iterable, Sequence

import nbformat

from .session import REPO_ROOT, TRAINING_LINE

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
EXERCISE_TAG = "exercise"
SOLUTION_TAG = "solution"
#: what replaces a solution in a student copy
STUDENT_PLACEHOLDER = "# Your solution here.\n"


def notebook_paths(folder: str | Path = NOTEBOOK_DIR, names: Iterable[str] | None = None) -> list[Path]:
    """The numbered notebooks of ``folder`` (``names``: stems or numbers such as ``"04"`` to choose some)."""
    paths = sorted(Path(folder).glob(NOTEBOOK_GLOB))
    if names:
        wanted = list(names)
        paths = [p for p in paths if any(p.stem == n or p.stem.startswith(f"{n}_") for n in wanted)]
        if not paths:
            raise FileNotFoundError(f"no notebook in {folder} matches {wanted}")
    return paths


def cell_tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution(cell) -> bool:
    return SOLUTION_TAG in cell_tags(cell)


def strip_outputs(nb) -> None:
    """Remove outputs and execution counts in place (what is committed)."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None


def student_copy(nb):
    """A copy of ``nb`` whose solution cells are replaced by an empty code cell (tagged ``exercise-answer``)."""
    out = nbformat.from_dict(json.loads(json.dumps(nb)))
    cells = []
    for cell in out.cells:
        if is_solution(cell):
            blank = nbformat.v4.new_code_cell(STUDENT_PLACEHOLDER)
            blank.metadata["tags"] = ["exercise-answer"]
            blank.id = cell.get("id", blank.id)
            cells.append(blank)
        else:
            cells.append(cell)
    out.cells = cells
    strip_outputs(out)
    return out


def write_student_copies(out_dir: str | Path, folder: str | Path = NOTEBOOK_DIR,
                         names: Iterable[str] | None = None) -> list[Path]:
    """Write student copies (no solutions, no outputs) of the notebooks into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebook_paths(folder, names):
        nb = nbformat.read(path, as_version=4)
        target = out_dir / path.name
        nbformat.write(student_copy(nb), target)
        written.append(target)
    readme = Path(folder) / "README.md"
    if readme.is_file():
        (out_dir / "README.md").write_text(readme.read_text())
    return written


# ----------------------------------------------------------------------------------------------- execution
def polling_client(nb, **kwargs):
    """``nbclient.NotebookClient`` whose wait for a cell's reply polls the shell socket in 1 s slices.

    jupyter/nbclient#312: after a cell that creates ipywidgets, the ``execute_reply`` sometimes sits unread in the
    shell socket while the kernel is idle (a lost wake-up of the asyncio zmq poll), and execution resumes only
    when the cell timeout expires (measured: notebook 04 took 615-630 s instead of ~60 s, the kernel idle and
    the client waiting). A poll that ends re-checks the socket, so short slices read the reply at once."""
    import nbclient

    class PollingClient(nbclient.NotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            channel = kc.shell_channel
            plain = channel.get_msg

            async def get_msg(timeout=None):
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    left = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
                    try:
                        return await plain(timeout=left)
                    except Empty:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise

            channel.get_msg = get_msg
            return kc

    return PollingClient(nb, **kwargs)


@contextmanager
def environment(values: dict[str, str]):
    """Set environment variables for the duration of a block (the kernel inherits them)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def kernel_spec_dir(folder: str | Path) -> Path:
    """A Jupyter data folder whose ``python3`` kernel runs *this* interpreter (put it first on JUPYTER_PATH)."""
    spec = Path(folder) / "kernels" / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (bpfl)", "language": "python"}))
    return Path(folder)


def execute_notebook(nb, cwd: str | Path = NOTEBOOK_DIR, timeout: int = 900, env: dict[str, str] | None = None):
    """Run every cell of ``nb`` (in place) with the ``python3`` kernel in ``cwd``; returns the seconds it took.
    Raises ``nbclient.exceptions.CellExecutionError`` naming the cell when one fails."""
    client = polling_client(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    with environment(env or {}):
        client.execute()
    return time.perf_counter() - t0


def trained_models(nb) -> list[str]:
    """The models an executed notebook trained (not loaded from the cache): the names its
    ``[bpfl] training NAME: ...`` lines print (:meth:`bpfl.notebook.NotebookSetup.train_or_load`)."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            for line in str(out.get("text", "")).splitlines():
                if line.startswith(TRAINING_LINE):
                    found.append(line[len(TRAINING_LINE):].split(":", 1)[0].strip())
    return found


def render_html(out_dir: str | Path, folder: str | Path = NOTEBOOK_DIR, names: Sequence[str] | None = None,
                mode: str = "fast", timeout: int = 900, student: bool = False) -> list[Path]:
    """Execute the notebooks (``mode``: fast by default) and write each as a self-contained HTML page (figures
    embedded) into ``out_dir``, with every figure and table the notebooks save (PNG, PDF, CSV, MD; the widgets'
    figures among them) under ``out_dir/results/``, an ``index.html`` linking the pages, and ``timings.csv``
    (each notebook's execution time, in order, and the models it trained rather than loaded from the cache).
    ``student=True`` renders the student copies (solutions left out)."""
    from nbconvert import HTMLExporter

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {"BPFL_MODE": mode, "MPLBACKEND": "Agg", "BPFL_RESULTS_DIR": str(out_dir / "results"),
           "JUPYTER_PATH": str(kernel_spec_dir(out_dir / ".jupyter")) + os.pathsep + os.environ.get("JUPYTER_PATH", ""),
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}
    exporter = HTMLExporter()
    pages, timings = [], []
    for path in notebook_paths(folder, names):
        nb = nbformat.read(path, as_version=4)
        if student:
            nb = student_copy(nb)
        seconds = execute_notebook(nb, cwd=path.parent, timeout=timeout, env=env)
        body, _ = exporter.from_notebook_node(nb)
        page = out_dir / f"{path.stem}.html"
        page.write_text(body, encoding="utf-8")
        pages.append(page)
        timings.append({"notebook": path.stem, "seconds": round(seconds, 1),
                        "trained": " ".join(trained_models(nb))})
        with open(out_dir / "timings.csv", "w", newline="", encoding="utf-8") as f:  # after each: kept if stopped
            writer = csv.DictWriter(f, fieldnames=["notebook", "seconds", "trained"])
            writer.writeheader()
            writer.writerows(timings)
        print(f"[bpfl] {path.name}: executed in {seconds:.0f} s -> {page}", flush=True)
    links = "\n".join(f'<li><a href="{p.name}">{p.stem}</a></li>' for p in pages)
    (out_dir / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>bpfl notebooks</title>"
        f"<h1>bpfl teaching notebooks ({mode} mode)</h1><ul>\n{links}\n</ul>"
        "<p>Figures and tables: <a href='results/'>results/</a></p>\n", encoding="utf-8")
    return pages


def main(argv: Sequence[str] | None = None) -> int:
    """``bpfl notebooks {student,html}``."""
    import argparse

    parser = argparse.ArgumentParser(prog="bpfl notebooks", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="notebooks_cmd", required=True)
    s = sub.add_parser("student", help="copies of the notebooks without the solution cells, for students")
    s.add_argument("--out", required=True)
    s.add_argument("--src", default=str(NOTEBOOK_DIR))
    s.add_argument("names", nargs="*", help="notebook stems or numbers (default: all)")
    h = sub.add_parser("html", help="execute the notebooks and write a static HTML rendering with the figures")
    h.add_argument("--out", required=True)
    h.add_argument("--src", default=str(NOTEBOOK_DIR))
    h.add_argument("--mode", default="fast", choices=["fast", "paper"])
    h.add_argument("--student", action="store_true", help="render the student copies (no solutions)")
    h.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    h.add_argument("names", nargs="*", help="notebook stems or numbers (default: all)")


def run(args) -> int:
    if args.notebooks_cmd == "student":
        paths = write_student_copies(args.out, args.src, args.names)
        print(f"wrote {len(paths)} student notebooks (solutions removed) to {args.out}")
        return 0
    pages = render_html(args.out, args.src, args.names, mode=args.mode, timeout=args.timeout, student=args.student)
    print(f"wrote {len(pages)} HTML pages and {Path(args.out) / 'index.html'}")
    return 0
