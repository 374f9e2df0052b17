"""The teaching notebooks (notebooks/NN_*.py + .ipynb, jupytext pairs) and their helper package bpfl.notebook.

* each notebook is a jupytext pair: the percent-format .py source and the .ipynb hold the same cells (and tags);
  the .ipynb is committed without outputs or execution counts (what git stores: the index when in a checkout);
* common structure: learning goals, runtime and mode switch up front; one setup cell; a Summary; 3-5 exercises,
  each a markdown cell tagged "exercise" followed by its worked solution, a cell tagged "solution";
* every notebook executes top to bottom in fast mode WITH its solutions (nbclient, the venv's python3 kernel,
  temporary results and data folders, offline, Agg backend) on the bundled toy CLIP; the per-notebook times are
  printed and written to notebook_timings.json, but not asserted: the budget is checked on the committed
  measurement of benchmarks/notebook_times.py, which notebooks/README.md quotes;
* `bpfl notebooks student` writes copies without solutions; `bpfl notebooks html` renders executed HTML;
* the K and R widgets are real ipywidgets whose callbacks redraw the data they show;
* modes, the banner and the train-or-load cache of bpfl.notebook behave as documented.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch

from bpfl.notebook import tools

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["00_overview_and_setup", "01_prompt_banks", "02_prompt_flow_density", "03_elbo_training",
            "04_inference_and_maps", "05_ablations", "06_benchmark_and_figure4"]
TIMINGS: dict[str, float] = {}


# ----------------------------------------------------------------------------------------------- storage
def test_all_numbered_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert (NOTEBOOK_DIR / "README.md").is_file()


def _committed_text(path: Path) -> str:
    """What git stores for ``path`` (the index, i.e. after the nbstripout clean filter) inside a checkout, else
    the file itself (a clean clone, CI: the same thing)."""
    try:
        out = subprocess.run(["git", "show", f":{path.relative_to(ROOT).as_posix()}"], cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return out.stdout
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return path.read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.reads(_committed_text(path), as_version=4)
    nbformat.validate(nb)
    extra = set(nb.metadata) - {"kernelspec", "language_info", "jupytext"}
    assert not extra, f"{path.name}: extra notebook metadata {extra}"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {cell.get('id')} has outputs (strip them)"
            assert cell.execution_count is None, f"{path.name}: cell {cell.get('id')} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_and_its_jupytext_source_are_in_sync(path):
    """Editing either file in Jupyter Lab (with jupytext) rewrites the other; a hand edit of one needs
    `jupytext --sync notebooks/NN_name.ipynb`."""
    jupytext = pytest.importorskip("jupytext")
    source = path.with_suffix(".py")
    assert source.is_file(), f"{source.name} missing: run `jupytext --sync {path}`"
    text = jupytext.read(source)
    stored = nbformat.read(path, as_version=4)

    def cells(nb):
        return [(c.cell_type, c.source.strip(), sorted(c.get("metadata", {}).get("tags", []))) for c in nb.cells]
    assert cells(text) == cells(stored), f"{path.name} and {source.name} differ: run `jupytext --sync {path}`"
    config = (NOTEBOOK_DIR / "jupytext.toml").read_text()
    assert 'formats = "ipynb,py:percent"' in config


def test_git_strips_notebook_outputs_on_commit():
    """.gitattributes sends notebooks through nbstripout (dev.py installs the filter in the checkout)."""
    attrs = (ROOT / ".gitattributes").read_text()
    assert "*.ipynb filter=nbstripout" in attrs
    assert "nbstripout" in (ROOT / "dev.py").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    """Learning goals, runtime and mode switch up front; one setup cell; a Summary; then '## Exercises' and 3-5
    exercises, each a markdown cell tagged 'exercise' followed by its solution, tagged 'solution'."""
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0].source
    for words in ("Learning goals", "Runtime", "Mode switch"):
        assert words in first, f"{path.name}: the first cell lacks '{words}'"
    setups = [c for c in nb.cells if c.cell_type == "code" and "nb.setup(" in c.source]
    assert len(setups) == 1 and nb.cells[1] is setups[0] and "MODE = None" in setups[0].source
    heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(heads) == 1, f"{path.name}: one '## Exercises' cell"
    assert nb.cells[heads[0] - 1].source.startswith("## Summary")
    rest = nb.cells[heads[0] + 1:]
    assert len(rest) % 2 == 0 and 3 <= len(rest) // 2 <= 5, f"{path.name}: 3-5 exercise/solution pairs"
    for k, (ex, sol) in enumerate(zip(rest[::2], rest[1::2]), 1):
        assert ex.cell_type == "markdown" and tools.cell_tags(ex) == [tools.EXERCISE_TAG], (path.name, k)
        assert ex.source.startswith(f"**Exercise {k}"), f"{path.name}: exercise {k} starts with '**Exercise {k}'"
        assert tools.is_solution(sol), f"{path.name}: exercise {k} is not followed by a cell tagged 'solution'"
        assert sol.source.strip(), f"{path.name}: the solution of exercise {k} is empty"
    tagged = [c for c in nb.cells if tools.is_solution(c)]
    assert len(tagged) == len(rest) // 2, f"{path.name}: a 'solution' cell outside the exercises"


def test_student_copies_have_no_solutions(tmp_path):
    written = tools.write_student_copies(tmp_path / "handout")
    assert [p.name for p in written] == [p.name for p in NOTEBOOKS]
    for src, copy in zip(NOTEBOOKS, written):
        full, student = nbformat.read(src, as_version=4), nbformat.read(copy, as_version=4)
        assert len(student.cells) == len(full.cells)
        solutions = [c.source for c in full.cells if tools.is_solution(c)]
        assert solutions and not any(tools.is_solution(c) for c in student.cells)
        text = "\n".join(c.source for c in student.cells)
        assert all(sol not in text for sol in solutions if len(sol) > 40)
        assert sum(c.source == tools.STUDENT_PLACEHOLDER for c in student.cells) == len(solutions)
        exercises = [c.source for c in full.cells if tools.EXERCISE_TAG in tools.cell_tags(c)]
        assert exercises == [c.source for c in student.cells if tools.EXERCISE_TAG in tools.cell_tags(c)]
    assert (tmp_path / "handout" / "README.md").is_file()


# ----------------------------------------------------------------------------------------------- execution
@pytest.fixture(scope="session")
def kernel_home(tmp_path_factory) -> Path:
    """A kernelspec 'python3' that runs *this* interpreter (the venv's), found first through JUPYTER_PATH."""
    return tools.kernel_spec_dir(tmp_path_factory.mktemp("jupyter"))


@pytest.fixture(scope="session")
def notebook_dirs(tmp_path_factory) -> dict[str, Path]:
    """Results (and the checkpoint cache) and synthetic data shared by all notebooks of the session."""
    return {"results": tmp_path_factory.mktemp("nb_results"), "data": tmp_path_factory.mktemp("nb_data"),
            "ipython": tmp_path_factory.mktemp("ipython")}


def _fast_env(kernel_home: Path, dirs: dict[str, Path], results: Path | None = None) -> dict[str, str]:
    return {"BPFL_MODE": "fast", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "BPFL_FAST_BACKBONE": "auto",
            "BPFL_RESULTS_DIR": str(results or dirs["results"]), "BPFL_DATA_DIR": str(dirs["data"]),
            "JUPYTER_PATH": str(kernel_home), "IPYTHONDIR": str(dirs["ipython"]),
            "OMP_NUM_THREADS": "1", "PYDEVD_DISABLE_FILE_VALIDATION": "1", "PYTHONWARNINGS": "ignore"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path, kernel_home, notebook_dirs, monkeypatch):
    """Top to bottom, solutions included, on the bundled toy CLIP (auto backbone offline)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("ipywidgets")
    for k in ("BPFL_OVERRIDES", "BPFL_AUX_DATA", "BPFL_TARGETS", "BPFL_DEVICE", "BPFL_THREADS"):
        monkeypatch.delenv(k, raising=False)
    from jupyter_client.kernelspec import KernelSpecManager
    env = _fast_env(kernel_home, notebook_dirs)
    with tools.environment(env):
        assert KernelSpecManager().get_kernel_spec("python3").argv[0] == sys.executable

    nb = nbformat.read(path, as_version=4)
    assert any(tools.is_solution(c) for c in nb.cells)  # the solutions run too
    seconds = tools.execute_notebook(nb, cwd=NOTEBOOK_DIR, timeout=600, env=env)
    TIMINGS[path.stem] = seconds
    timing_file = notebook_dirs["results"] / "notebook_timings.json"
    timing_file.write_text(json.dumps(TIMINGS, indent=2))
    print(f"\n[notebooks] {path.stem}: {seconds:.1f} s (fast mode)")

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "FAST mode" in text, "the setup cell must print the banner"
    assert "bundled toy CLIP" in text and "RANDOM weights" not in text, "fast mode must run on the toy CLIP"
    saved = list((notebook_dirs["results"] / path.stem).glob("*.png"))
    assert saved, f"{path.stem} saved no figure"
    assert all(p.with_suffix(".pdf").is_file() for p in saved), "figures are saved as PNG and PDF"


def test_html_rendering_of_one_notebook(tmp_path, kernel_home, notebook_dirs, monkeypatch):
    """`bpfl notebooks html` executes a notebook and writes a page with its figures embedded, and the figures."""
    pytest.importorskip("nbconvert")
    for k in ("BPFL_OVERRIDES", "BPFL_AUX_DATA", "BPFL_TARGETS", "BPFL_DEVICE"):
        monkeypatch.delenv(k, raising=False)
    env = _fast_env(kernel_home, notebook_dirs)
    env.pop("BPFL_RESULTS_DIR")
    with tools.environment(env):
        from bpfl.cli import main
        assert main(["notebooks", "html", "--out", str(tmp_path / "site"), "00"]) == 0  # 00 trains nothing
    page = (tmp_path / "site" / "00_overview_and_setup.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "Exercise 1" in page
    assert "Traceback" not in page
    assert 'href="00_overview_and_setup.html"' in (tmp_path / "site" / "index.html").read_text()
    assert list((tmp_path / "site" / "results" / "00_overview_and_setup").glob("*.png"))
    timings = (tmp_path / "site" / "timings.csv").read_text().splitlines()
    assert timings[0] == "notebook,seconds,trained" and timings[1].startswith("00_overview_and_setup,")
    assert timings[1].endswith(",") and len(timings) == 2  # 00 trains nothing


def test_committed_notebook_times_fit_the_budget_and_the_readme_quotes_them():
    """benchmarks/notebook_times.py (cold start, in order) is what notebooks/README.md's time column says."""
    import pandas as pd

    times = ROOT / "benchmarks" / "results" / "notebook_times"
    assert times.with_suffix(".csv").is_file(), "run `python benchmarks/notebook_times.py`"
    df = pd.read_csv(times.with_suffix(".csv"), keep_default_na=False)
    rec = json.loads(times.with_suffix(".json").read_text())
    assert list(df.notebook) == EXPECTED
    assert rec["total_seconds"] == pytest.approx(df.seconds.sum(), abs=0.2)
    assert rec["total_seconds"] <= rec["budget_seconds"] == 600, "fast mode: all notebooks in <= 10 min, 2 cores"
    assert rec["cache"].startswith("cold")
    # a cold start trains the main model exactly once (the first notebook that needs it) and the baselines in 04
    trained = [name for cell in df.trained for name in cell.split()]
    assert trained.count("bayes-pfl") == 1 and {"design-aprilgan+", "design-anomalyclip+"} <= set(trained)
    assert "design-aprilgan+" in df.set_index("notebook").at["04_inference_and_maps", "trained"]
    readme_text = (NOTEBOOK_DIR / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme_text.splitlines() if line.startswith("| `")}
    for row in df.itertuples():
        assert f"| {row.seconds:.0f} s" in rows[row.notebook], f"notebooks/README.md: {row.notebook}'s time"
        nb = nbformat.read(NOTEBOOK_DIR / f"{row.notebook}.ipynb", as_version=4)
        runtime = next(" ".join(c.source.split()) for c in nb.cells if "**Runtime**" in c.source)
        assert f"fast mode {row.seconds:.0f} s in the committed cold-start run" in runtime, row.notebook
    text = " ".join(readme_text.split())
    assert f"{rec['total_seconds']:.0f} s in all" in text and rec["cpu"] in text


def test_trained_models_reads_the_training_lines():
    out = nbformat.v4.new_output
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(outputs=[out("stream", text="[bpfl] training bayes-pfl: 80 images, 30 epochs ...\n"
                                                              "[bpfl] trained in 4 s\n")]),
        nbformat.v4.new_code_cell(outputs=[out("stream", text="[bpfl] loaded the cached checkpoint x (design-x)\n")]),
        nbformat.v4.new_markdown_cell("[bpfl] training not-a-model: markdown"),
        nbformat.v4.new_code_cell(outputs=[out("stream", text="[bpfl] training design-aprilgan+: 80 images\n")])])
    assert tools.trained_models(nb) == ["bayes-pfl", "design-aprilgan+"]


# ----------------------------------------------------------------------------------------------- bpfl.notebook
@pytest.fixture
def nb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFL_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("BPFL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BPFL_FAST_BACKBONE", "tiny")
    for k in ("BPFL_MODE", "BPFL_OVERRIDES", "BPFL_AUX_DATA", "BPFL_TARGETS", "BPFL_DEVICE", "BPFL_THREADS"):
        monkeypatch.delenv(k, raising=False)
    import matplotlib

    from bpfl import notebook
    threads, rc = torch.get_num_threads(), matplotlib.rcParams.copy()
    yield notebook
    torch.set_num_threads(threads)  # setup() sets one thread and the plotting style: undo for the other tests
    matplotlib.rcParams.update(rc)


def test_mode_detection_and_configs(nb_env, monkeypatch):
    nb = nb_env
    assert nb.detect_mode()[0] == "fast"
    monkeypatch.setenv("BPFL_MODE", "paper")
    mode, why = nb.detect_mode()
    assert mode == "paper" and "BPFL_MODE" in why
    assert nb.detect_mode("fast")[0] == "fast"  # the setup cell's variable wins over the environment
    with pytest.raises(ValueError):
        nb.detect_mode("turbo")
    paper, _ = nb.mode_config("paper")
    from bpfl.config import BayesPFLConfig
    assert paper == BayesPFLConfig.paper()
    fast, why = nb.mode_config("fast")
    assert fast.backbone == "bpfl-tiny" and fast.pretrained is None and "RANDOM" in why
    monkeypatch.setenv("BPFL_OVERRIDES", "epochs=2;flow_length=3")
    fast2, _ = nb.mode_config("fast")
    assert (fast2.epochs, fast2.flow_length) == (2, 3)


def test_fast_mode_uses_the_bundled_toy_clip_by_default(nb_env, monkeypatch):
    import bpfl.backbone_choice
    from bpfl.bundled_weights import BUNDLED_TAG, short_hash
    from bpfl.toyclip import TOY_ARCH, TOY_BAYESPFL_LR
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bpfl.backbone_choice, "cached_weights_file", lambda *a, **k: None)
    monkeypatch.setenv("BPFL_FAST_BACKBONE", "auto")
    S = nb_env.setup("99_toy", quiet=True)
    assert (S.config.backbone, S.config.pretrained, S.config.lr) == (TOY_ARCH, BUNDLED_TAG, TOY_BAYESPFL_LR)
    assert not S.random_backbone and not S.mechanics_note()
    assert "bundled toy CLIP" in S.banner_text() and short_hash() in S.banner_text()
    assert "mechanics" not in S.banner_text()
    with torch.no_grad():
        out = S.new_model().eval()(torch.randn(1, 3, S.config.image_size, S.config.image_size), ["brick"], n_samples=2)
    assert out.anomaly_map.shape[-1] == S.config.image_size
    monkeypatch.setenv("BPFL_FAST_BACKBONE", "tiny")
    assert nb_env.mode_config("fast")[0].backbone == "bpfl-tiny"


def test_setup_banner_and_folders(nb_env, tmp_path, capsys):
    S = nb_env.setup("99_test")
    out = capsys.readouterr().out
    assert "FAST mode" in out and "RANDOM weights" in out and "mechanics" in out and 'MODE = "paper"' in out
    assert S.results == (tmp_path / "results" / "99_test") and S.results.is_dir()
    assert S.random_backbone and S.mechanics_note()
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    paths = S.save(fig, "line")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.is_file() for p in paths)
    plt.close(fig)


def test_synthetic_root_of_another_preset(nb_env, tmp_path):
    """Fast mode uses the default split; the tiny one can be asked for (and is generated beside it)."""
    from bpfl.data import SYNTHETIC_GROUPS, open_dataset
    S = nb_env.setup("99_presets", quiet=True)
    default, tiny = S.synthetic_root(), S.synthetic_root("tiny")
    assert tiny == tmp_path / "data" / "synthetic-tiny" and default == tmp_path / "data" / "synthetic"
    n = {root: len(open_dataset(root, split="test", categories=SYNTHETIC_GROUPS["unseen"], image_size=32))
         for root in (tiny, default)}
    assert n[default] > 3 * n[tiny]
    stamp = (default / "meta.json").stat().st_mtime_ns
    assert S.synthetic_root("default") == default and (default / "meta.json").stat().st_mtime_ns == stamp  # reused
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        S.synthetic_root("huge")


def test_train_or_load_trains_once_then_loads(nb_env):
    S = nb_env.setup("99_cache", quiet=True, epochs=1, batch_size=12)
    first = S.train_or_load()
    assert not first.loaded and first.checkpoint.is_file() and len(first.steps) >= 1
    assert {"cls", "focal", "dice", "ort", "kl_context", "total"} <= set(first.steps.columns)
    assert "loss" not in vars(first.model), "the step recorder must be removed after training"
    second = S.train_or_load()
    assert second.loaded and second.checkpoint == first.checkpoint
    assert len(second.steps) == len(first.steps) and len(second.history) == 1
    other = S.train_or_load(S.config.replace(flow_length=2))  # another config: another cache entry
    assert not other.loaded and other.checkpoint != first.checkpoint
    again = S.train_or_load(retrain=True)
    assert not again.loaded


def test_k_slider_callback_redraws_the_density(nb_env):
    slider, state = nb_env.k_slider_demo(k_max=6, grid_n=48, n_samples=20000, show=False)
    import ipywidgets
    assert isinstance(slider, ipywidgets.IntSlider) and isinstance(state["ui"], ipywidgets.VBox)
    before, shown_before = state["density"].copy(), state["images"][0].get_array().copy()
    slider.value = 6  # the observer runs the callback, as dragging the slider does
    assert state["K"] == 6 and state["history"][-1] == 6
    assert not np.allclose(before, state["density"])
    assert not np.allclose(shown_before, state["images"][0].get_array()), "the figure was not redrawn"
    assert abs(state["mass"] - 1) < 0.03
    area = (9.0 / 48) ** 2
    assert 0.5 * np.abs(state["density"] - state["hist"]).sum() * area < 0.25
    state["update"](0)  # K = 0: the standard normal
    assert abs(state["density"].max() - 1 / (2 * np.pi)) < 0.01


def test_r_slider_callback_and_redraw_button(nb_env):
    from bpfl.backbone import load_backbone
    from bpfl.config import BayesPFLConfig
    from bpfl.model import BayesPFL
    torch.manual_seed(0)
    bb = load_backbone("bpfl-tiny", None, image_size=112, layers=(1, 2, 3, 4), device="cpu")
    model = BayesPFL(BayesPFLConfig.teaching(image_size=112, layers=(1, 2, 3, 4), flow_length=2), backbone=bb).eval()
    images = torch.randn(2, 3, 112, 112)
    slider, state = nb_env.r_slider_demo(model, images, ["brick", "grass"], r_max=4, show=False)
    import ipywidgets
    assert isinstance(slider, ipywidgets.IntSlider) and isinstance(state["button"], ipywidgets.Button)
    assert state["R"] == 1
    maps1 = state["maps"].copy()
    slider.value = 4
    assert state["R"] == 4 and not np.allclose(maps1, state["maps"])
    np.testing.assert_allclose(state["maps"], state["sample_maps"][:, :4].mean(1), rtol=1e-6)
    np.testing.assert_allclose(state["scores"], state["s_text"] + state["maps"].reshape(2, -1).max(1), rtol=1e-6)
    # with all R samples, the slider's map is the model's own anomaly map for the same samples
    with torch.no_grad():
        out = model(images, ["brick", "grass"], n_samples=4, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(state["maps"], out.anomaly_map.numpy(), atol=1e-5)
    np.testing.assert_allclose(state["scores"], out.image_score.numpy(), atol=1e-5)
    maps4 = state["maps"].copy()
    state["button"].click()  # the button's handler draws new samples
    assert state["seed"] == 1 and state["R"] == 4 and not np.allclose(maps4, state["maps"])


def test_paper_tables_are_transcribed_consistently(nb_env):
    nb = nb_env
    assert set(nb.TABLE2_ROWS.values()) == set(nb.PAPER_TABLE2)
    assert nb.PAPER_TABLE2["Bayes-PFL"][2:] == (91.8, 48.3)
    assert nb.PAPER_TABLE3[10][3] == (48.3, 0.4) and nb.PAPER_TABLE4["image"][:4] == nb.PAPER_TABLE2["Bayes-PFL"]
    from bpfl.config import ABLATIONS
    assert {k for k in nb.TABLE2_ROWS if k} <= set(ABLATIONS)
    assert nb.paper_table1("MVTec-AD")["pixel"] == (91.8, 87.4, 48.3)
    assert nb.paper_table1("Kvasir")["pixel"] == (85.4, 63.9, 54.2) and nb.paper_table1("synthetic") == {}
